"""Locks from real VM guests: QEMU (TCG) guests booting the image of scripts/guest-image,
each on its own `vfs-lockd virtiofs` backend, all backends on one `vfs-lockd serve`
daemon, plus host processes on the shared directory. Inside the guests the static probe
(scripts/guest/vlprobe.c) takes the locks; every probe "owner" is its own guest process.

Skipped without root or QEMU; under CI=true those fail instead. One module-scoped pair of
guests (about 6 s of boot under TCG) serves most tests; a test that kills a guest boots
its own. What the other back-ends do with locks (the legacy C virtiofsd, which only Debian
12 has, and Rust virtiofsd) is checked by scripts/virtiofsd_locks.py, not here: the suite
holds no test that depends on the host's release.

VM_TEST_BACKEND=virtiofsd runs the shared-guest tests on the legacy virtiofsd instead (a
development aid: they are expected to fail there, e.g. blocking waits, EDEADLK).
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import REPO, VFS_LOCKD
from hostproc import HostProc
from procutil import fail_or_skip, kill_keepers, wait_until

from rig.vm import (
    VmError,
    VmGuest,
    ensure_image,
    errno_of,
    legacy_virtiofsd_present,
    qemu_missing,
)

pytestmark = pytest.mark.vm

BACKEND = os.environ.get("VM_TEST_BACKEND", "vfs-lockd")
EAGAIN, EDEADLK, EOPNOTSUPP = errno.EAGAIN, errno.EDEADLK, errno.EOPNOTSUPP
# How long to wait for an answer that must come (a timeout, not a speed bound: blocking
# waits are answered through TCG, the backend and the daemon on 2 loaded cores).
GRANT_S = 20.0
_owner_ids = itertools.count()


def _fail_or_skip(why: str) -> None:
    fail_or_skip(why, "VM guests must be available")


def _backend_present() -> bool:
    if BACKEND != "vfs-lockd":
        return legacy_virtiofsd_present()
    r = subprocess.run([*VFS_LOCKD, "virtiofs", "--help"], capture_output=True, cwd=REPO,
                       env=dict(os.environ, PYTHONPATH=str(REPO)))
    return r.returncode == 0


@pytest.fixture(scope="session")
def vm_image() -> tuple[Path, Path]:
    why = qemu_missing()
    if why:
        _fail_or_skip(why)
    try:
        return ensure_image()
    except VmError as exc:
        _fail_or_skip(f"guest image could not be built: {exc}")
        raise


@dataclass
class Cluster:
    work: Path
    share: Path
    sock: Path
    a: VmGuest
    b: VmGuest
    image: tuple[Path, Path]

    def guest(self, name: str, **kw) -> VmGuest:  # noqa: ANN003
        return VmGuest.start(name, self.share, self.work, backend=BACKEND,
                             lockd=self.sock if BACKEND == "vfs-lockd" else None,
                             kernel=self.image[0], initrd=self.image[1], **kw)


@pytest.fixture(scope="module")
def cluster(vm_image) -> Iterator[Cluster]:
    if not _backend_present():
        _fail_or_skip(f"backend {BACKEND!r} not available (`vfs-lockd virtiofs --help` fails)")
    # Outside pytest's basetemp: conftest's per-test keeper sweep would otherwise end this
    # module-long daemon's keeper after the first test.
    work = Path(tempfile.mkdtemp(prefix="vfs-lockd-vm-"))
    share = work / "share"
    share.mkdir()
    sock = work / "lockd.sock"
    journal = work / "journal.sqlite"
    serve_log = open(work / "serve.log", "wb")  # noqa: SIM115
    serve = subprocess.Popen(
        [*VFS_LOCKD, "serve", "--socket", str(sock), "--journal", str(journal)],
        stdout=serve_log, stderr=subprocess.STDOUT, cwd=REPO,
        env=dict(os.environ, PYTHONPATH=str(REPO)), start_new_session=True)
    guests: list[VmGuest] = []
    ok = False
    try:
        deadline = time.monotonic() + 20
        while not sock.exists():
            assert serve.poll() is None and time.monotonic() < deadline, \
                (work / "serve.log").read_text()
            time.sleep(0.05)
        c = Cluster(work, share, sock, None, None, vm_image)  # type: ignore[arg-type]
        c.a = c.guest("vmA")
        guests.append(c.a)
        c.b = c.guest("vmB")
        guests.append(c.b)
        yield c
        ok = True
    finally:
        for g in guests:
            g.close()
        serve.send_signal(signal.SIGTERM)
        try:
            serve.wait(10)
        except subprocess.TimeoutExpired:
            serve.kill()
            serve.wait()
        serve_log.close()
        kill_keepers(str(journal).encode())
        if ok or os.environ.get("VM_TEST_KEEP") != "1":
            shutil.rmtree(work, ignore_errors=True)


class Owners:
    """Fresh probe owners (guest processes) for one test; killed at its end, which closes
    their files and so drops their locks."""

    def __init__(self) -> None:
        self.used: list[tuple[VmGuest, str]] = []

    def new(self, g: VmGuest, path: str | None = None, mode: str = "rw") -> Owner:
        o = Owner(g, f"o{next(_owner_ids)}")
        self.used.append((g, o.name))
        if path is not None:
            assert o.do(f"open 0 {path} {mode}") == "ok"
        return o

    def close(self) -> None:
        for g, name in self.used:
            with contextlib.suppress(Exception):
                g.do("-", f"kill {name}", timeout=5)


@dataclass
class Owner:
    g: VmGuest
    name: str

    def do(self, line: str, timeout: float = 15.0) -> str:
        return self.g.do(self.name, line, timeout)

    def send(self, line: str) -> str:
        return self.g.send(self.name, line)

    def lock(self, kind: str, t: str, start: int = 0, length: int = 0) -> int:
        return errno_of(self.do(f"lock 0 {kind} {t} {start} {length}"))


@pytest.fixture
def owners() -> Iterator[Owners]:
    o = Owners()
    try:
        yield o
    finally:
        o.close()


@pytest.fixture
def hosts() -> Iterator:
    made: list[HostProc] = []

    def make(path: Path) -> HostProc:
        made.append(HostProc(str(path)))
        return made[-1]

    try:
        yield make
    finally:
        for h in made:
            h.close()


def _file(c: Cluster, name: str, data: bytes = b"") -> tuple[Path, str]:
    (c.share / name).write_bytes(data)
    return c.share / name, f"/mnt/{name}"


# ------------------------------------------------------------------------------ tests
def test_posix_conflicts_guests_and_host(cluster: Cluster, owners: Owners, hosts) -> None:
    hpath, gpath = _file(cluster, "posix.dat", b"x" * 100)
    a1 = owners.new(cluster.a, gpath)
    a2 = owners.new(cluster.a, gpath)  # another process in the same guest
    b1 = owners.new(cluster.b, gpath)
    host = hosts(hpath)
    assert a1.lock("posix", "w", 0, 10) == 0
    for o in (a2, b1):
        assert o.lock("posix", "w", 5, 1) == EAGAIN, o
        assert o.lock("posix", "r", 0, 1) == EAGAIN, o
        assert o.lock("posix", "w", 10, 5) == 0, o  # no overlap
        assert o.lock("posix", "u", 0, 0) == 0
        assert o.do("getlk 0 posix w 0 0").split()[:2] == ["ok", "w"]
    assert host.lock("posix", "w", 5, 1) == EAGAIN
    assert host.lock("posix", "w", 10, 1) == 0
    assert b1.lock("posix", "r", 10, 1) == EAGAIN  # the host's lock, seen in guest B
    assert host.lock("posix", "u", 0, 0) == 0
    assert a1.lock("posix", "u", 0, 0) == 0
    # Readers share across guests and host; a writer anywhere is refused.
    assert a1.lock("posix", "r", 0, 0) == 0
    assert b1.lock("posix", "r", 0, 0) == 0
    assert host.lock("posix", "r", 0, 0) == 0
    assert a2.lock("posix", "w", 50, 1) == EAGAIN
    assert host.lock("posix", "u", 0, 0) == 0
    # OFD locks of a guest conflict with POSIX locks of another (one host lock space).
    assert a1.lock("posix", "u", 0, 0) == 0 and b1.lock("posix", "u", 0, 0) == 0
    assert a2.lock("ofd", "w", 0, 10) == 0
    assert b1.lock("posix", "w", 9, 1) == EAGAIN
    assert host.lock("posix", "w", 0, 1) == EAGAIN


def test_flock_conflicts_guests_and_host(cluster: Cluster, owners: Owners, hosts) -> None:
    hpath, gpath = _file(cluster, "flock.dat")
    a1, b1 = owners.new(cluster.a, gpath), owners.new(cluster.b, gpath)
    host = hosts(hpath)
    assert a1.lock("flock", "w") == 0
    assert b1.lock("flock", "r") == EAGAIN
    assert host.lock("flock", "r") == EAGAIN
    assert a1.lock("flock", "u") == 0
    assert host.lock("flock", "w") == 0
    assert a1.lock("flock", "r") == EAGAIN and b1.lock("flock", "w") == EAGAIN
    assert host.lock("flock", "u") == 0
    for o in (a1, b1):
        assert o.lock("flock", "r") == 0  # shared flocks coexist everywhere
    assert host.lock("flock", "r") == 0
    assert host.lock("flock", "u") == 0
    # flock and POSIX locks are separate spaces (Linux semantics)
    assert b1.lock("posix", "w", 0, 0) == 0


def test_blocking_wait_granted_on_release(cluster: Cluster, owners: Owners, hosts) -> None:
    hpath, gpath = _file(cluster, "wait.dat")
    a1, b1 = owners.new(cluster.a, gpath), owners.new(cluster.b, gpath)
    assert a1.lock("posix", "w", 0, 0) == 0
    tag = b1.send("lock 0 posix w 0 0 wait")
    assert cluster.b.pending(tag, 1.0), "guest B's F_SETLKW returned while A holds the lock"
    assert a1.lock("posix", "u", 0, 0) == 0
    assert cluster.b.result(tag, GRANT_S) == "ok"
    # B holds it now: A and the host are refused.
    assert a1.lock("posix", "w", 0, 1) == EAGAIN
    host = hosts(hpath)
    assert host.lock("posix", "w", 0, 1) == EAGAIN
    # Blocking flock across guests, and a host holder releasing a guest's waiter.
    assert host.lock("flock", "w") == 0
    tag = a1.send("lock 0 flock w 0 0 wait")
    assert cluster.a.pending(tag, 1.0)
    assert host.lock("flock", "u") == 0
    assert cluster.a.result(tag, GRANT_S) == "ok"
    tag = b1.send("lock 0 flock r 0 0 wait")
    assert cluster.b.pending(tag, 0.5)
    assert a1.lock("flock", "u") == 0
    assert cluster.b.result(tag, GRANT_S) == "ok"


def test_cross_guest_deadlock_gets_edeadlk(cluster: Cluster, owners: Owners) -> None:
    _, gpath = _file(cluster, "deadlock.dat", b"\0" * 64)
    a1, b1 = owners.new(cluster.a, gpath), owners.new(cluster.b, gpath)
    assert a1.lock("posix", "w", 0, 10) == 0
    assert b1.lock("posix", "w", 10, 10) == 0
    ta = a1.send("lock 0 posix w 10 10 wait")  # A waits for B
    assert cluster.a.pending(ta, 1.0)
    # B waiting for A would close the cycle: refused at once, A keeps waiting.
    assert errno_of(b1.do("lock 0 posix w 0 10 wait", timeout=GRANT_S)) == EDEADLK
    assert cluster.a.pending(ta, 0.3)
    assert b1.lock("posix", "u", 10, 10) == 0
    assert cluster.a.result(ta, GRANT_S) == "ok"
    assert b1.lock("posix", "w", 15, 1) == EAGAIN  # A holds 0-19 now


def _lockd_holders(c: Cluster, path: Path) -> dict[str, str]:
    """Who the daemon says holds what on `path`: guest -> TYPE (from `vfs-lockd locks`)."""
    r = subprocess.run([*VFS_LOCKD, "locks", "--socket", str(c.sock), "--json"],
                       capture_output=True, text=True, cwd=REPO, timeout=30,
                       env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert r.returncode == 0, r.stderr
    snap = json.loads(r.stdout)
    return {lk["guest"]: lk["type"] for lk in snap["locks"] if lk["path"] == str(path)}


def _wait_for(cond, timeout: float = 10.0) -> bool:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)  # polling the daemon's table or the host's locks
    return True


def test_paused_waiter_keeps_its_place(cluster: Cluster, owners: Owners, hosts) -> None:
    """QMP stop (virsh suspend) of a guest whose process waits in F_SETLKW: the wait
    keeps its place in the queue across stop/cont, is granted while the VM is paused
    (nobody else gets the range meanwhile) and answered after cont, not with EINTR
    (which the program would see as errno 512)."""
    hpath, gpath = _file(cluster, "pause-wait.dat")
    a1, a2 = owners.new(cluster.a, gpath), owners.new(cluster.a, gpath)
    b1 = owners.new(cluster.b, gpath)
    host = hosts(hpath)
    assert a1.lock("posix", "w", 0, 0) == 0
    tag = b1.send("lock 0 posix w 0 0 wait")
    assert cluster.b.pending(tag, 1.0)
    cluster.b.pause()
    try:
        tag2 = a2.send("lock 0 posix w 0 0 wait")  # queued behind the paused waiter
        assert cluster.a.pending(tag2, 1.0)
        assert a1.lock("posix", "u", 0, 0) == 0
        # The paused guest's waiter gets the lock, not A's later waiter or the host.
        assert _wait_for(lambda: _lockd_holders(cluster, hpath) == {"vmB": "WRITE"})
        assert host.lock("posix", "w", 0, 1) == EAGAIN
        assert cluster.a.pending(tag2, 0.5)
    finally:
        cluster.b.resume()
    assert cluster.b.result(tag, GRANT_S) == "ok"
    assert b1.lock("posix", "u", 0, 0) == 0
    assert cluster.a.result(tag2, GRANT_S) == "ok"
    assert a2.lock("posix", "u", 0, 0) == 0


def test_paused_holder_keeps_its_lock(cluster: Cluster, owners: Owners, hosts) -> None:
    """A paused guest still holds its locks (a stopped ring is not a dead guest); it
    unlocks after cont and the other guest's waiter gets the lock."""
    hpath, gpath = _file(cluster, "pause-hold.dat")
    a1, b1 = owners.new(cluster.a, gpath), owners.new(cluster.b, gpath)
    host = hosts(hpath)
    assert b1.lock("posix", "w", 0, 0) == 0
    cluster.b.pause()
    try:
        tag = a1.send("lock 0 posix w 0 0 wait")
        assert cluster.a.pending(tag, 1.0)
        assert host.lock("posix", "w", 0, 1) == EAGAIN
        assert _lockd_holders(cluster, hpath) == {"vmB": "WRITE"}
    finally:
        cluster.b.resume()
    assert b1.lock("posix", "u", 0, 0) == 0
    assert cluster.a.result(tag, GRANT_S) == "ok"
    assert a1.lock("posix", "u", 0, 0) == 0


def test_ofd_lock_goes_with_its_last_close(cluster: Cluster, owners: Owners, hosts) -> None:
    """An OFD lock taken in a guest is released when its description is closed (the
    guest kernel sends no unlock for it: the back-end infers it from RELEASE)."""
    hpath, gpath = _file(cluster, "ofd-close.dat")
    a1, b1 = owners.new(cluster.a, gpath), owners.new(cluster.b, gpath)
    host = hosts(hpath)
    assert a1.lock("ofd", "w", 0, 10) == 0
    assert b1.lock("ofd", "w", 0, 1) == EAGAIN
    assert host.lock("posix", "w", 0, 1) == EAGAIN
    assert a1.do("close 0") == "ok"
    assert _wait_for(lambda: not _lockd_holders(cluster, hpath))
    assert host.lock("posix", "w", 0, 1) == 0 and host.lock("posix", "u", 0, 0) == 0
    assert b1.lock("ofd", "w", 0, 1) == 0


def test_data_written_under_lock_read_in_other_guest(cluster: Cluster, owners: Owners) -> None:
    hpath, gpath = _file(cluster, "data.dat", b"." * 32)
    a1, b1 = owners.new(cluster.a, gpath), owners.new(cluster.b, gpath)
    for i in range(3):
        w, r = (a1, b1) if i % 2 == 0 else (b1, a1)
        assert w.lock("posix", "w", 0, 0) == 0
        word = f"round{i}-from-{w.g.name}"
        assert w.do(f"write 0 0 {word}") == f"ok {len(word)}"
        tag = r.send("lock 0 posix r 0 0 wait")
        assert r.g.pending(tag, 0.3)
        assert w.lock("posix", "u", 0, 0) == 0
        assert r.g.result(tag, GRANT_S) == "ok"
        assert r.do(f"read 0 0 {len(word)}") == f"ok {word}"
        assert r.lock("posix", "u", 0, 0) == 0
    assert hpath.read_bytes().startswith(b"round2-from-vmA")


def test_counter_two_guests_and_host(cluster: Cluster, owners: Owners) -> None:
    """Read-increment-write under a blocking write lock from two processes in each guest
    at once: every increment must land (lost updates mean two holders at once, or stale
    data read under the lock)."""
    hpath, gpath = _file(cluster, "counter", b"0".rjust(20) + b"\n")
    n = 60
    workers = [owners.new(g, gpath) for g in (cluster.a, cluster.b) for _ in range(2)]
    tags = [(o, o.send(f"counter 0 posix {n}")) for o in workers]
    for o, tag in tags:
        ans = o.g.result(tag, 180).split()
        assert ans[0] == "ok", ans
        assert ans[1:] == [str(n), ans[2], "0", "0"], ans  # all done, no bad read, no error
    assert int(hpath.read_bytes()) == n * len(workers)


@pytest.fixture
def own_guest(cluster: Cluster) -> Iterator[list[VmGuest]]:
    made: list[VmGuest] = []
    try:
        yield made
    finally:
        for g in made:
            g.close(grace=1)


def test_killed_guest_locks_released(cluster: Cluster, owners: Owners, hosts,
                                     own_guest: list[VmGuest]) -> None:
    hpath, gpath = _file(cluster, "kill.dat")
    c = cluster.guest("vmC")
    own_guest.append(c)
    c1 = owners.new(c, gpath)
    assert c1.lock("posix", "w", 0, 0) == 0
    assert c1.lock("flock", "w") == 0
    b1 = owners.new(cluster.b, gpath)
    tag = b1.send("lock 0 posix w 0 0 wait")  # B waits for the doomed guest
    host = hosts(hpath)
    assert host.lock("posix", "w", 0, 1) == EAGAIN
    assert host.lock("flock", "r") == EAGAIN
    assert cluster.b.pending(tag, 0.5)
    c.kill()  # kill -9 of QEMU: the guest gets no chance to unlock
    deadline = time.monotonic() + 10
    assert cluster.b.result(tag, 10) == "ok"  # B's wait is granted once C's locks go
    assert b1.lock("posix", "u", 0, 0) == 0
    while host.lock("flock", "w") != 0:
        assert time.monotonic() < deadline, "guest C's flock still held after its kill"
        time.sleep(0.02)  # polling the host lock
    assert host.lock("posix", "w", 0, 0) == 0
    assert c.backend is not None and c.backend.wait(5) is not None, \
        "the backend did not exit after QEMU died"


# ------------------------------------------------------- a lock wait and signals
# Issue 23 item 4c; README "A lock wait inside a virtio-fs guest cannot be ended by a
# signal". The guest kernel sends no FUSE_INTERRUPT over virtio-fs, and once a request has
# left the guest even SIGKILL does not end the waiting process. What ends it is an answer:
# here the administrator's `vfs-lockd cancel --wait ID` on the central daemon. (On the
# module's pair of guests: a module of its own booted a pair for this one test.)
def _admin(c: Cluster, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*VFS_LOCKD, *args, "--socket", str(c.sock)], capture_output=True,
                          text=True, cwd=REPO, timeout=30)


def _waits(c: Cluster, name: str) -> list[dict]:
    r = _admin(c, "locks", "--json")
    assert r.returncode == 0, r.stderr
    return [w for w in json.loads(r.stdout)["waiters"] if w["path"].endswith(name)]


def test_a_killed_waiter_ends_when_its_wait_is_cancelled(cluster: Cluster,
                                                        owners: Owners) -> None:
    g = cluster.a
    _, gpath = _file(cluster, "wedge.dat")
    holder, waiter = owners.new(g, gpath), owners.new(g, gpath)
    assert holder.lock("flock", "w") == 0
    waiter.send("lock 0 flock w 0 0 wait")
    assert wait_until(lambda: len(_waits(cluster, "wedge.dat")) == 1, GRANT_S)
    (wait,) = _waits(cluster, "wedge.dat")
    # SIGKILL: the guest kernel keeps waiting for the answer (nothing reaches the host)
    assert g.do("-", f"kill {waiter.name}") == "ok"
    exited = f"* exit {waiter.name} -9"
    # not reaped: it is still in the guest kernel's wait (as long as it would wait for
    # the lock; a lapse of time can only hide an exit, never invent one)
    assert not wait_until(lambda: exited in g.events, 3.0)
    # and the daemon still has the wait: nothing reached the host
    assert [w["id"] for w in _waits(cluster, "wedge.dat")] == [wait["id"]]
    # the administrator's answer ends it: the process exits, holding nothing
    r = _admin(cluster, "cancel", "--wait", str(wait["id"]))
    assert r.returncode == 0, r.stderr
    assert wait_until(lambda: exited in g.events, GRANT_S)
    assert _waits(cluster, "wedge.dat") == []
    other = owners.new(g, gpath)
    assert other.lock("flock", "w") == EAGAIN  # the holder still holds
    assert holder.lock("flock", "u") == 0
    assert errno_of(other.do("lock 0 flock w 0 0")) == 0


# ------------------------------------------------------------------------------ the rig
def test_rig_with_vm_guests(vm_image, tmp_path: Path) -> None:
    """`vfs-lockd rig --vm-guests`: a VM guest's increments count in the rig's counter
    check next to a FUSE guest's and a host worker's, and the run leaves nothing behind."""
    from test_rig import run_rig

    if not _backend_present():
        _fail_or_skip("`vfs-lockd virtiofs` not available")
    rc, r, out = run_rig(tmp_path, "--guests", "1", "--procs", "1", "--vm-guests", "1",
                         "--host-procs", "1", "--seconds", "4", "--workload", "counter",
                         timeout=180)
    assert r is not None, out
    assert rc == 0 and r["violations"] == 0, out
    assert r["vm_guests"]["guests"] == 1 and r["vm_guests"]["per_op_us_median"]["counter"] > 0
    c = r["checks"]["counter"]
    assert c["ok"] and c["value"] == c["increments"] > 0, out


def test_rig_with_vm_guests_detects_broken_locking(vm_image, tmp_path: Path) -> None:
    """The same with the manager granting without checking: the guests' lost updates
    must fail the run (a rig that cannot fail proves nothing)."""
    from test_rig import run_rig

    if not _backend_present():
        _fail_or_skip("`vfs-lockd virtiofs` not available")
    rc, r, out = run_rig(tmp_path, "--guests", "0", "--vm-guests", "2", "--procs", "2",
                         "--host-procs", "0", "--seconds", "4", "--workload", "counter",
                         "--test-skip-host-lock", timeout=180)
    assert r is not None, out
    assert rc == 1 and not r["checks"]["counter"]["ok"], out
