"""Live migration across two CephFS hosts (issue 27): the destination's back-end runs on
another host, so it cannot collect the source's descriptors and takes the descriptor-free
path (fuse_server/migration.py, "the state without descriptors").

Two hosts = two network namespaces, each with its own ceph-fuse mount of one one-node Ceph
(rig/ceph.py, as test_ceph.py). Each host runs its own `vfs-lockd virtiofs` inside its
namespace, sharing the same directory through its own mount, with its own migration
directory (as a real other host has: the source's hand-over socket is out of reach). The
front-end (tests/vhost_frontend.py, standing in for QEMU) runs here and reaches both
back-ends through their Unix socket paths, which work across network namespaces. What a
host sees is probed by processes run inside that host's namespace, through its own mount.

- A lock-free guest moves from host 0 to host 1 (find-paths and file-handles): its open
  files read and write on host 1, host 0 reads those bytes, and a lock it takes after the
  move is held on host 1's mount (host 0 sees the conflict).
- A guest holding a POSIX lock is refused by host 1; the source runs on; a prober on host
  1 never sees the lock free until the guest unlocks on the source.
- A guest holding only shared locks (a POSIX and an OFD read lock, a LOCK_SH flock) moves:
  host 1's back-end takes them again on its own mount while host 0's still holds them, so
  a prober on host 1 never sees them free; afterwards host 1's lock manager has exactly
  the source's owners (an upgrade, an unlock, a RELEASE, a flock unlock behave there).
- Refused: a shared guest that also holds a write lock; one whose locked file was
  replaced between save and load; one whose re-take meets a write lock on host 1. The
  source runs on with its locks (never seen free), and what host 1 took it gave back.

The cluster is made once for the module (slow: a Ceph) and torn down after it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import select
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cluster_stack import module_cluster
from fuse_oracle import LK_IN
from test_migration_paths import lookup_in, open_, read, resume_source, write
from test_vhost_user import (
    MIGRATABLE,
    REQ,
    Backend,
    init,
    lk,
    load_state,
    save_state,
    stop_source,
    switch_over,
)
from vhost_frontend import Frontend

from fuse_server import migration as M
from fuse_server import protocol as P
from lockd.api import F_RDLCK, F_UNLCK, F_WRLCK, OFFSET_MAX
from lockd.fuse import abi
from rig.ceph import MIN_EVICT, CephCluster
from rig.cluster import ClusterHosts

pytestmark = [pytest.mark.fuse, pytest.mark.ceph]

# Own names: this module's cluster runs beside test_ceph.py's, the rig's and the bench's.
BASE = "/var/tmp/vfs-lockd-ceph-migration"

# F_OFD_GETLK (36) for a write lock on [start, start+len) of argv[1]: the type in the way
GETLK = textwrap.dedent(
    r"""
    import fcntl, os, struct, sys
    fd = os.open(sys.argv[1], os.O_RDWR)
    arg = struct.pack("hhqqi4x", fcntl.F_WRLCK, 0, int(sys.argv[2]), int(sys.argv[3]), 0)
    print(struct.unpack("hhqqi4x", fcntl.fcntl(fd, 36, arg))[0])
    """
)
CAT = "import sys; sys.stdout.buffer.write(open(sys.argv[1], 'rb').read())"

# Probes argv[1] without pause, on a description of its own: argv[2:] the targets, each
# "START:LEN" (F_OFD_GETLK for a write lock on it, which changes nothing) or "flock"
# (flock LOCK_EX|LOCK_NB: refused while anyone holds a flock; if it is ever granted it
# counts as free and is dropped at once). A probe is free if any target is. Each line on
# stdin ("mark") is answered after one more probe made after it was read: "total free
# last_was_free". So between two marks there was at least one probe, whatever the
# timing. EOF on stdin ends it.
PROBER = textwrap.dedent(
    r"""
    import errno, fcntl, os, select, struct, sys
    fd = os.open(sys.argv[1], os.O_RDWR)
    targets = sys.argv[2:]
    total = free = 0
    def one(t):
        if t == "flock":
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno != errno.EWOULDBLOCK:
                    raise
                return False
            fcntl.flock(fd, fcntl.LOCK_UN)
            return True
        start, length = (int(x) for x in t.split(":"))
        arg = struct.pack("hhqqi4x", fcntl.F_WRLCK, 0, start, length, 0)
        return struct.unpack("hhqqi4x", fcntl.fcntl(fd, 36, arg))[0] == fcntl.F_UNLCK
    def probe():
        global total, free
        f = any([one(t) for t in targets])
        total += 1
        free += f
        return f
    last = probe()
    pending = b""
    while True:
        r, _, _ = select.select([0], [], [], 0)
        if r:
            b = os.read(0, 256)
            if not b:
                break
            pending += b
        last = probe()
        while b"\n" in pending:
            _, pending = pending.split(b"\n", 1)
            print(total, free, int(last), flush=True)
            last = probe()
    """
)

# A third party's try for a write lock on argv[1]: argv[2] "START:LEN" (F_OFD_SETLK) or
# "flock" (LOCK_EX|LOCK_NB). Prints 1 if granted (dropped at once: the process ends), 0
# if refused because someone holds the range.
TRYLOCK = textwrap.dedent(
    r"""
    import errno, fcntl, os, struct, sys
    fd = os.open(sys.argv[1], os.O_RDWR)
    try:
        if sys.argv[2] == "flock":
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        else:
            start, length = (int(x) for x in sys.argv[2].split(":"))
            fcntl.fcntl(fd, 37, struct.pack("hhqqi4x", fcntl.F_WRLCK, 0, start, length, 0))
        print(1)
    except OSError as exc:
        if exc.errno not in (errno.EAGAIN, errno.EACCES):
            raise
        print(0)
    """
)

# Holds a write lock on argv[2] ("START:LEN") of argv[1] until stdin closes; "held" once
# it has it.
HOLDER = textwrap.dedent(
    r"""
    import fcntl, os, struct, sys
    fd = os.open(sys.argv[1], os.O_RDWR)
    start, length = (int(x) for x in sys.argv[2].split(":"))
    fcntl.fcntl(fd, 37, struct.pack("hhqqi4x", fcntl.F_WRLCK, 0, start, length, 0))
    print("held", flush=True)
    sys.stdin.read()
    """
)


@pytest.fixture(scope="module")
def cluster() -> Iterator[ClusterHosts]:
    yield from module_cluster(CephCluster, BASE, hosts=2, evict_after=MIN_EVICT,
                              prefix="vlcm", subnet="10.221")


def host_backend(c: ClusterHosts, index: int, share: Path, work: Path, *args: str) -> Backend:
    """`vfs-lockd virtiofs` on host `index`: run inside the host's network namespace
    (nsenter --net execs it: the process is the back-end itself), sharing `share` (a
    directory of that host's CephFS mount), with the host's own migration directory."""
    migration_dir = work / f"migration-host{index}"
    migration_dir.mkdir(mode=0o700, exist_ok=True)
    # the hosts alone keep the descriptors apart ("" is not "off")
    env = {"VFS_LOCKD_MIGRATION_DIR": str(migration_dir), "VFS_LOCKD_MIGRATION_DESCRIPTORS": ""}
    return Backend(work, share, f"-host{index}", list(args),
                   wrap=lambda cmd: c.in_ns(c.hosts[index], *cmd), env=env)


class Prober:
    """PROBER in a host's namespace, through that host's own mount (by default on the
    range [0, 100))."""

    def __init__(self, c: ClusterHosts, index: int, path: Path,
                 targets: tuple[str, ...] = ()) -> None:
        self.proc = subprocess.Popen(c.in_ns(c.hosts[index], sys.executable, "-c", PROBER,
                                             str(path), *(targets or ("0:100",))),
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def mark(self, timeout: float = 30.0) -> tuple[int, int, bool]:
        """(probes so far, probes that saw the range free, the last one saw it free),
        after at least one probe made from now on."""
        self.proc.stdin.write("mark\n")
        self.proc.stdin.flush()
        r, _, _ = select.select([self.proc.stdout], [], [], timeout)
        assert r, "the prober did not answer"
        line = self.proc.stdout.readline()
        assert line, f"the prober ended ({self.proc.poll()})"
        total, free, last = (int(x) for x in line.split())
        return total, free, bool(last)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()


class Hosts:
    """One test's directory on the CephFS, its back-ends, front-ends and probers (all
    stopped at the end, whatever happened)."""

    def __init__(self, c: ClusterHosts, name: str, work: Path) -> None:
        self.c, self.work = c, work
        self.sub = f"{name}-{os.getpid()}"
        top = c.hosts[0].mount / self.sub
        top.mkdir()
        (top / "f").write_bytes(b"hello world\n")
        (top / "d").mkdir()
        (top / "d" / "g").write_bytes(b"gg\n")
        self.backends: list[Backend] = []
        self.frontends: list[Frontend] = []
        self.probers: list[Prober] = []
        self.holders: list[subprocess.Popen] = []

    def share(self, index: int) -> Path:
        """The test's directory through host `index`'s mount."""
        return self.c.hosts[index].mount / self.sub

    def backend(self, index: int, *args: str) -> Backend:
        b = host_backend(self.c, index, self.share(index), self.work, *args)
        self.backends.append(b)
        return b

    def frontend(self, b: Backend, **kw: object) -> Frontend:
        fe = Frontend(str(b.sock), **kw)
        self.frontends.append(fe)
        return fe

    def prober(self, index: int, name: str, *targets: str) -> Prober:
        p = Prober(self.c, index, self.share(index) / name, targets)
        self.probers.append(p)
        return p

    def holder(self, index: int, name: str, target: str) -> subprocess.Popen:
        """A process on host `index` holding a write lock on `target` of `name` (until
        its stdin closes; stopped at the end)."""
        p = subprocess.Popen(self.c.in_ns(self.c.hosts[index], sys.executable, "-c", HOLDER,
                                          str(self.share(index) / name), target),
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.holders.append(p)
        assert p.stdout.readline() == "held\n", "the holder did not get its lock"
        return p

    def can_lock(self, index: int, name: str, target: str) -> bool:
        """Could a third party on host `index` take a write lock on `target` ("START:LEN"
        or "flock") of `name` now? (If so it had it for a moment and let it go.)"""
        return self.run(index, TRYLOCK, str(self.share(index) / name), target) == b"1\n"

    def run(self, index: int, code: str, *args: str) -> bytes:
        """A Python snippet run by a process on host `index` (in its namespace)."""
        r = subprocess.run(self.c.in_ns(self.c.hosts[index], sys.executable, "-c", code,
                                        *args), capture_output=True, timeout=60)
        assert r.returncode == 0, r.stderr.decode(errors="replace")
        return r.stdout

    def cat(self, index: int, name: str) -> bytes:
        return self.run(index, CAT, str(self.share(index) / name))

    def getlk(self, index: int, name: str, start: int = 0, length: int = 100) -> int:
        """The lock type host `index` sees in the way of a write lock (F_UNLCK: none)."""
        return int(self.run(index, GETLK, str(self.share(index) / name), str(start),
                            str(length)))

    def close(self) -> None:
        with contextlib.ExitStack() as stack:  # every one runs even if another raises
            stack.callback(shutil.rmtree, self.share(0), ignore_errors=True)
            for b in self.backends:
                stack.callback(b.stop)
            for fe in self.frontends:
                stack.callback(fe.close)
            for p in self.probers:
                stack.callback(p.close)
            for h in self.holders:
                stack.callback(_stop_holder, h)


def _stop_holder(p: subprocess.Popen) -> None:
    with contextlib.suppress(OSError):
        p.stdin.close()
    try:
        p.wait(10)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
    p.stdout.close()


@pytest.fixture
def hosts(cluster: ClusterHosts, tmp_path: Path) -> Iterator[Hosts]:
    h = Hosts(cluster, tmp_path.name, tmp_path)
    try:
        yield h
    finally:
        h.close()


class Guest:
    """A guest on `b`, with f open O_RDWR and d/g open O_WRONLY|O_APPEND."""

    def __init__(self, hosts: Hosts, b: Backend) -> None:
        self.fe = fe = hosts.frontend(b, nqueues=3, protocol_features=MIGRATABLE)
        init(fe)
        self.f = lookup_in(fe, 1, b"f")
        self.d = lookup_in(fe, 1, b"d")
        self.g = lookup_in(fe, self.d, b"g")
        self.fh = open_(fe, self.f, os.O_RDWR)
        self.fh2 = open_(fe, self.f, os.O_RDWR)  # another open file (another owner's)
        self.gapp = open_(fe, self.g, os.O_WRONLY | os.O_APPEND)


# ------------------------------------------------------- a lock-free guest moves hosts
@pytest.mark.parametrize("mode", ["find-paths", "file-handles"])
def test_lock_free_guest_moves_to_the_other_host(hosts: Hosts, mode: str) -> None:
    """A guest holding no lock moves from host 0's back-end to host 1's: its inodes and
    handles are found again through host 1's mount (by path or by file handle), the files
    it opened on host 0 read and write there, and host 0 reads what it wrote through its
    own mount (by file handle, a file renamed on host 0 after the save is still found).
    A lock the guest takes afterwards is held on host 1's mount: a process on host 0
    sees it in the way, and free once the guest unlocks."""
    b0 = hosts.backend(0, f"--migration-mode={mode}")
    gst = Guest(hosts, b0)
    fe = gst.fe
    assert read(fe, gst.f, gst.fh).payload == b"hello world\n"
    assert hosts.getlk(0, "f") == F_UNLCK
    b1 = hosts.backend(1, f"--migration-mode={mode}")
    bases = stop_source(fe)
    status, data = save_state(fe)
    assert status == 0, b0.output()
    g = "d/g"
    if mode == "file-handles":  # a path no longer leads to it: only its handle finds it
        hosts.run(0, "import os, sys; os.rename(sys.argv[1], sys.argv[2])",
                  str(hosts.share(0) / "d" / "g"), str(hosts.share(0) / "d" / "g-renamed"))
        g = "d/g-renamed"
    dst = hosts.frontend(b1, protocol_features=MIGRATABLE, mem=fe.mem, queues=fe.queues)
    assert load_state(dst, data) == 0, b1.output()
    switch_over(fe, dst, bases)
    fe.close()  # the source QEMU quits: its back-end ends
    assert b0.proc.wait(15) == 0, b0.output()
    out = b1.output()
    assert "WITHOUT the source's descriptors" in out, out
    # the handles opened on host 0 work on host 1, and host 0 sees the bytes
    assert read(dst, gst.f, gst.fh).payload == b"hello world\n"
    assert P.WRITE_OUT.unpack_from(write(dst, gst.f, gst.fh, b"HELLO").payload)[0] == 5
    assert hosts.cat(0, "f") == b"HELLO world\n"
    assert write(dst, gst.g, gst.gapp, b"appended\n", offset=0).error == 0  # O_APPEND kept
    assert hosts.cat(0, g) == b"gg\nappended\n"
    # a new lock is taken through host 1's mount (host 0's back-end is gone)
    assert dst.fuse(REQ, P.SETLK, lk(gst.fh, 1, F_WRLCK, 0, 99), gst.f).error == 0
    assert hosts.getlk(0, "f") == F_WRLCK
    assert dst.fuse(REQ, P.SETLK, lk(gst.fh2, 2, F_WRLCK, 0, 0), gst.f).error == errno.EAGAIN
    assert dst.fuse(REQ, P.SETLK, lk(gst.fh, 1, F_UNLCK, 0, 99), gst.f).error == 0
    assert hosts.getlk(0, "f") == F_UNLCK
    assert "Traceback" not in b1.output() + b0.output()


# --------------------------------------------------- a guest holding a lock is refused
def test_guest_holding_a_lock_is_refused_and_the_source_runs_on(hosts: Hosts) -> None:
    """A guest on host 0 holds a POSIX lock: host 1's back-end refuses its state (the lock
    cannot cross hosts without being free in between), QEMU fails the migration, and the
    source runs on with the lock. A process on host 1 probing the range through its own
    mount from before the migration until after it never sees it free; once the guest
    unlocks on the source, the prober sees it free."""
    b0 = hosts.backend(0)
    gst = Guest(hosts, b0)
    fe = gst.fe
    assert fe.fuse(REQ, P.SETLK, lk(gst.fh, 1, F_WRLCK, 0, 99), gst.f).error == 0
    prober = hosts.prober(1, "f")
    marks = [prober.mark()]  # probing from host 1 before anything starts
    assert marks[-1][2] is False, "host 1 does not see the guest's lock"
    b1 = hosts.backend(1)
    bases = stop_source(fe)
    status, data = save_state(fe)
    assert status == 0, b0.output()
    marks.append(prober.mark())  # the source stopped and saved
    dst = hosts.frontend(b1, protocol_features=MIGRATABLE, mem=fe.mem, queues=fe.queues)
    assert load_state(dst, data) != 0
    out = b1.output()
    assert "holds no lock" in out and "lock description(s) held" in out \
        and "source runs on" in out, out
    marks.append(prober.mark())  # the destination refused
    resume_source(fe, bases)
    assert "keeps the guest" in b0.output(), b0.output()
    # the source runs on, with the guest's lock and files
    assert read(fe, gst.f, gst.fh).payload == b"hello world\n"
    assert fe.fuse(REQ, P.SETLK, lk(gst.fh2, 2, F_WRLCK, 0, 0), gst.f).error == errno.EAGAIN
    marks.append(prober.mark())
    assert hosts.getlk(0, "f") == F_WRLCK
    assert all(a[0] < b[0] for a, b in zip(marks, marks[1:], strict=False)), marks
    total, free, _ = marks[-1]
    assert free == 0, \
        f"{free} of {total} probes on host 1 saw the lock free (marks {marks})"
    assert fe.fuse(REQ, P.SETLK, lk(gst.fh, 1, F_UNLCK, 0, 99), gst.f).error == 0
    assert prober.mark()[2], "host 1 still sees the range locked after the unlock"
    assert "Traceback" not in b1.output() + b0.output()


# ------------------------------------------- a guest holding only shared locks moves
def flk(fh: int, type_: int) -> bytes:
    """A flock request (FUSE_LK_FLOCK) through handle `fh`."""
    return LK_IN.pack(fh, 0x900 + fh, 0, OFFSET_MAX, type_, 4242, abi.LK_FLOCK)


class SharedGuest(Guest):
    """A Guest holding only shared locks on f: a POSIX read lock on [0, 99] (owner 1,
    through fh), an OFD read lock on [200, 299] (owner 2, through fh2: dropped at fh2's
    RELEASE) and a LOCK_SH flock through fh3 (another open file)."""

    RANGES = ("0:100", "200:100")

    def __init__(self, hosts: Hosts, b: Backend) -> None:
        super().__init__(hosts, b)
        fe, f = self.fe, self.f
        self.fh3 = open_(fe, f, os.O_RDONLY)
        assert fe.fuse(REQ, P.SETLK, lk(self.fh, 1, F_RDLCK, 0, 99), f).error == 0
        assert fe.fuse(REQ, P.SETLK, lk(self.fh2, 2, F_RDLCK, 200, 299), f).error == 0
        assert fe.fuse(REQ, P.SETLK, flk(self.fh3, F_RDLCK), f).error == 0


def load_ms(b: Backend) -> float:
    """The destination's own time for the load (its log), ms."""
    m = re.search(r"state loaded in ([0-9.]+) ms", b.output())
    assert m, b.output()
    return float(m.group(1))


def test_guest_with_shared_locks_moves_to_the_other_host(hosts: Hosts) -> None:
    """A guest on host 0 holding a POSIX read lock, an OFD read lock and a LOCK_SH flock
    moves to host 1: host 1's back-end takes the same shared locks on its own mount while
    host 0's still holds them (before it answers CHECK_DEVICE_STATE), and host 0's let go
    only when it ends. A process on host 1 probing for a write lock on both ranges and
    the flock sees them held before, during and after the move, and after host 0's
    back-end is gone. Host 1's lock manager then has the source's owners exactly: a third
    party on either host is refused, another owner of the guest conflicts, owner 1
    upgrades to a write lock and unlocks, fh2's RELEASE drops the OFD lock, and the
    flock's unlock frees it -- each freeing its range for both hosts."""
    b0 = hosts.backend(0)
    gst = SharedGuest(hosts, b0)
    fe, f = gst.fe, gst.f
    prober = hosts.prober(1, "f", *SharedGuest.RANGES, "flock")
    marks = [prober.mark()]  # host 1 probing before anything starts
    assert marks[-1][2] is False, "host 1 does not see the guest's locks"
    b1 = hosts.backend(1)
    t0 = time.monotonic()
    bases = stop_source(fe)
    status, data = save_state(fe)
    assert status == 0, b0.output()
    marks.append(prober.mark())  # the source stopped and saved
    dst = hosts.frontend(b1, protocol_features=MIGRATABLE, mem=fe.mem, queues=fe.queues)
    t1 = time.monotonic()
    assert load_state(dst, data) == 0, b1.output()
    t2 = time.monotonic()
    marks.append(prober.mark())  # both hosts hold them now
    switch_over(fe, dst, bases)
    t3 = time.monotonic()
    marks.append(prober.mark())  # the guest runs on host 1
    fe.close()  # the source QEMU quits: host 0's back-end ends and lets its locks go
    assert b0.proc.wait(15) == 0, b0.output()
    marks.append(prober.mark())
    out = b1.output()
    assert "3 shared lock description(s) taken again" in out, out
    print(f"\nshared-lock move: stop+save {1000 * (t1 - t0):.1f} ms, load (CHECK round trip) "
          f"{1000 * (t2 - t1):.1f} ms (the back-end's own {load_ms(b1):.1f} ms), switch "
          f"{1000 * (t3 - t2):.1f} ms; total {1000 * (t3 - t0):.1f} ms; marks {marks}")
    # only host 1 holds them now: host 0 sees them too, a third party anywhere is refused
    assert hosts.getlk(0, "f", 0, 100) == F_RDLCK
    assert hosts.getlk(0, "f", 200, 100) == F_RDLCK
    for h in (0, 1):
        for target in (*SharedGuest.RANGES, "flock"):
            assert not hosts.can_lock(h, "f", target), (h, target)
    assert hosts.can_lock(0, "f", "100:100")  # between the two ranges: nothing held
    marks.append(prober.mark())
    assert all(a[0] < b[0] for a, b in zip(marks, marks[1:], strict=False)), marks
    total, free, _ = marks[-1]
    assert free == 0, f"{free} of {total} probes on host 1 saw a lock free (marks {marks})"
    # the lock manager on host 1 has the source's owners: another owner conflicts (a
    # managed holder), owner 1's own read lock upgrades
    assert dst.fuse(REQ, P.SETLK, lk(gst.fh, 3, F_WRLCK, 0, 0), f).error == errno.EAGAIN
    assert dst.fuse(REQ, P.SETLK, lk(gst.fh, 1, F_WRLCK, 0, 99), f).error == 0
    assert hosts.getlk(0, "f", 0, 100) == F_WRLCK
    assert dst.fuse(REQ, P.SETLK, lk(gst.fh, 1, F_UNLCK, 0, 99), f).error == 0
    assert hosts.can_lock(0, "f", "0:100") and hosts.can_lock(1, "f", "0:100")
    # the OFD lock goes with fh2's RELEASE (its bookkeeping moved too)
    assert not hosts.can_lock(0, "f", "200:100")
    assert dst.fuse(REQ, P.RELEASE, abi.RELEASE_IN.pack(gst.fh2, 0, 0, 0), f).error == 0
    assert hosts.can_lock(0, "f", "200:100") and hosts.can_lock(1, "f", "200:100")
    # the flock is fh3's
    assert not hosts.can_lock(1, "f", "flock")
    assert dst.fuse(REQ, P.SETLK, flk(gst.fh3, F_UNLCK), f).error == 0
    assert prober.mark()[2], "host 1 still sees something held after every unlock"
    prober.close()  # its flock probe now holds the flock for a moment each time
    assert hosts.can_lock(0, "f", "flock") and hosts.can_lock(1, "f", "flock")
    assert "Traceback" not in b1.output() + b0.output()


@pytest.mark.parametrize("why", ["write-lock", "replaced", "conflict"])
def test_shared_guest_refused_keeps_its_locks(hosts: Hosts, why: str) -> None:
    """A guest with shared locks that cannot move; host 1 refuses, QEMU fails the
    migration, the source runs on with its locks:
    - write-lock: it also holds a write lock (owner 4, [300, 399]): refused by the rule,
      naming it;
    - replaced: it also read-locks d/g, which is replaced on host 0 between the save and
      the load (--migration-on-error=abort): host 1 has taken f's locks again, then finds
      d/g is not the file locked on host 0, and gives f's back;
    - conflict: the state says owner 4 read-locks [300, 399] (the test, as QEMU, changes
      the state: the source's guest holds nothing there), where a process on host 1
      holds a write lock: the re-take gets EAGAIN, after f's other locks were taken again
      there, and gives them back.
    A prober on host 1 never sees the source's locks free; after the guest unlocks on the
    source they are free for host 1 (host 1's back-end, still running, kept nothing)."""
    b0 = hosts.backend(0)
    gst = SharedGuest(hosts, b0)
    fe, f = gst.fe, gst.f
    targets = [*SharedGuest.RANGES, "flock"]
    fhg = None
    if why == "write-lock":
        assert fe.fuse(REQ, P.SETLK, lk(gst.fh, 4, F_WRLCK, 300, 399), f).error == 0
        targets.append("300:100")
    elif why == "replaced":
        fhg = open_(fe, gst.g, os.O_RDONLY)
        assert fe.fuse(REQ, P.SETLK, lk(fhg, 5, F_RDLCK, 0, 99), gst.g).error == 0
    prober = hosts.prober(1, "f", *targets)
    gprober = hosts.prober(1, "d/g", "0:100") if why == "replaced" else None
    marks = [prober.mark()]
    assert marks[-1][2] is False, "host 1 does not see the guest's locks"
    if gprober:
        assert gprober.mark()[2] is False
    b1 = hosts.backend(1)
    bases = stop_source(fe)
    status, data = save_state(fe)
    assert status == 0, b0.output()
    if why == "replaced":  # the locked d/g is another file now (the probers keep the old)
        hosts.run(0, "import os, sys; os.rename(sys.argv[1], sys.argv[2]); "
                  "open(sys.argv[1], 'wb').write(b'new\\n')",
                  str(hosts.share(0) / "d" / "g"), str(hosts.share(0) / "d" / "g.old"))
    elif why == "conflict":
        state = M.decode(data)
        (locked,) = [x for x in state["locks"]["files"] if x["descs"]]
        kind, _owner, i, _ranges, pid = locked["descs"][0]
        locked["descs"].append([kind, 4, i, [[300, 399, F_RDLCK]], pid])  # taken last
        data = M.encode(state)
        hosts.holder(1, "f", "300:100")
    marks.append(prober.mark())
    dst = hosts.frontend(b1, protocol_features=MIGRATABLE, mem=fe.mem, queues=fe.queues)
    assert load_state(dst, data) != 0
    out = b1.output()
    assert "source runs on" in out, out
    assert {"write-lock": "1 lock description(s) held with a write lock",
            "replaced": "is not the file the guest locked on the source",
            "conflict": "[300, 399] of owner 0x4 on inode"}[why] in out, out
    if why == "conflict":
        assert "EAGAIN" in out, out
    marks.append(prober.mark())  # the destination refused
    resume_source(fe, bases)
    assert "keeps the guest" in b0.output(), b0.output()
    # the source runs on with its locks: another owner of the guest is refused
    assert fe.fuse(REQ, P.SETLK, lk(gst.fh2, 6, F_WRLCK, 0, 0), f).error == errno.EAGAIN
    assert fe.fuse(REQ, P.SETLK, flk(gst.fh2, F_WRLCK), f).error == errno.EAGAIN
    for target in targets:
        assert not hosts.can_lock(1, "f", target), target
    marks.append(prober.mark())
    assert all(a[0] < b[0] for a, b in zip(marks, marks[1:], strict=False)), marks
    total, free, _ = marks[-1]
    assert free == 0, f"{free} of {total} probes on host 1 saw a lock free (marks {marks})"
    if gprober:
        gtotal, gfree, _ = gprober.mark()
        assert gfree == 0, f"{gfree} of {gtotal} probes of d/g saw it free"
    print(f"\n{why}: {total} probes on host 1, none saw a lock free")
    # the guest unlocks on the source: free for host 1, whose back-end kept nothing
    assert fe.fuse(REQ, P.SETLK, lk(gst.fh, 1, F_UNLCK, 0, 99), f).error == 0
    assert fe.fuse(REQ, P.SETLK, lk(gst.fh2, 2, F_UNLCK, 200, 299), f).error == 0
    assert fe.fuse(REQ, P.SETLK, flk(gst.fh3, F_UNLCK), f).error == 0
    if why == "write-lock":
        assert fe.fuse(REQ, P.SETLK, lk(gst.fh, 4, F_UNLCK, 300, 399), f).error == 0
    if fhg is not None:
        assert fe.fuse(REQ, P.SETLK, lk(fhg, 5, F_UNLCK, 0, 99), gst.g).error == 0
        assert gprober.mark()[2], "host 1 still sees the old d/g locked"
    assert prober.mark()[2], "host 1 still sees something held after every unlock"
    prober.close()  # its flock probe now holds the flock for a moment each time
    for target in targets:
        assert hosts.can_lock(1, "f", target), target
    assert b1.proc.poll() is None  # host 1's back-end still runs: it holds nothing
    assert "Traceback" not in b1.output() + b0.output()


def test_shared_state_restored_after_its_source_ended_is_refused(hosts: Hosts) -> None:
    """A shared-lock guest's state loaded after its source has ended (a "migration to
    file" restored later): the guest's read locks were free in between, so host 1 does
    not hand them to the guest as if they had been held all along: it finds the ranges
    held by no one and refuses, keeping nothing."""
    b0 = hosts.backend(0)
    gst = SharedGuest(hosts, b0)
    fe = gst.fe
    b1 = hosts.backend(1)
    stop_source(fe)
    status, data = save_state(fe)
    assert status == 0, b0.output()
    queues = fe.queues
    fe.owns = False  # the guest's memory stays (in the file), the source quits:
    fe.close()  # its locks go
    assert b0.proc.wait(15) == 0, b0.output()
    assert hosts.can_lock(1, "f", "0:100")
    dst = hosts.frontend(b1, protocol_features=MIGRATABLE, mem=fe.mem, queues=queues)
    dst.owns = True
    assert load_state(dst, data) != 0
    out = b1.output()
    assert "is held by no one" in out and "source runs on" in out, out
    for target in (*SharedGuest.RANGES, "flock"):
        assert hosts.can_lock(1, "f", target), target
    assert b1.proc.poll() is None and "Traceback" not in out
