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

The cluster is made once for the module (slow: a Ceph) and torn down after it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from cluster_stack import module_cluster
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

from fuse_server import protocol as P
from lockd.api import F_UNLCK, F_WRLCK
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

# Probes [0, 100) of argv[1] with F_OFD_GETLK (which changes nothing) without pause, on a
# description of its own. Each line on stdin ("mark") is answered after one more probe
# made after it was read: "total free last_was_free". So between two marks there was at
# least one probe, whatever the timing. EOF on stdin ends it.
PROBER = textwrap.dedent(
    r"""
    import fcntl, os, select, struct, sys
    fd = os.open(sys.argv[1], os.O_RDWR)
    total = free = 0
    def probe():
        global total, free
        arg = struct.pack("hhqqi4x", fcntl.F_WRLCK, 0, 0, 100, 0)
        t = struct.unpack("hhqqi4x", fcntl.fcntl(fd, 36, arg))[0]
        total += 1
        free += t == fcntl.F_UNLCK
        return t == fcntl.F_UNLCK
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
    """PROBER in a host's namespace, through that host's own mount."""

    def __init__(self, c: ClusterHosts, index: int, path: Path) -> None:
        self.proc = subprocess.Popen(c.in_ns(c.hosts[index], sys.executable, "-c", PROBER,
                                             str(path)),
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

    def prober(self, index: int, name: str) -> Prober:
        p = Prober(self.c, index, self.share(index) / name)
        self.probers.append(p)
        return p

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
