"""A holder that converts its lock wakes the waits it held back (issue 23, 1b).

A process holds a write lock; a reader blocks in F_SETLKW (or flock) on the same bytes;
the holder turns its write lock into a read lock. The kernel grants the reader at once
(fs/locks.c wakes the waiters of every lock a request modifies), while the holder keeps
its read lock. Through real mounts, in every place the wait can be: the embedded
manager of one mount, another mount's manager (which waits for the first's host lock
in the kernel), and the central daemon (two mounts, and one mount whose file starts
delegated to it). The same for flock(LOCK_EX) -> flock(LOCK_SH).

In-process, against the kernel's own flock: a conversion is decided against the holders
only, never queued behind the waiters it woke (Linux drops the old lock and takes the
new one in one critical section). Waits the kernel keeps itself (a host process behind
a managed holder, a manager's host-wait thread behind a host holder) are woken by the
kernel. A soak like FreeBSD's flock test 14 finishes through a mount in both modes.
The random differential test against the kernel is in test_manager_kernel.py.
"""

from __future__ import annotations

import errno
import json
import os
import platform
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from fcntl import LOCK_EX, LOCK_NB, LOCK_SH, LOCK_UN

import pytest
from daemonutil import cli, host_can_lock
from procutil import F_OFD_SETLKW, SYS_FCNTL, threads_in_setlkw, wait_until

from lockd.api import F_RDLCK, F_UNLCK, F_WRLCK, OFFSET_MAX, QUEUED
from lockd.engine import ofd
from lockd.engine.manager import LockManager

EAGAIN, EWOULD = str(errno.EAGAIN), str(errno.EWOULDBLOCK)
SYS_FLOCK = {"x86_64": 73, "aarch64": 32, "riscv64": 32}.get(platform.machine())

# Each kind: (take the write lock, wait for a read lock, downgrade, unlock, a third
# party's try for a write lock, which a read lock refuses with this answer).
KINDS = {
    "posix": ("fcntl w 0 10 nowait", "fcntl r 0 10 wait", "fcntl r 0 10 nowait",
              "fcntl u 0 0 nowait", "fcntl w 0 10 nowait", EAGAIN),
    "flock": ("flock ex nowait", "flock sh wait", "flock sh nowait", "flock un nowait",
              "flock ex nowait", EWOULD),
}
# Where holder and reader are: embedded in one mount (two processes), embedded in two
# mounts, central through two mounts, central through one mount.
PLACES = ["embedded-1", "embedded-2", "central-2", "central-1"]


def _wchan(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/wchan") as f:
            return f.read()
    except OSError:
        return ""


def _in_fuse_request(pid: int) -> bool:
    """The process sleeps waiting for a FUSE server's answer."""
    return _wchan(pid) in ("request_wait_answer", "fuse_simple_request",
                           "__fuse_simple_request")


def _threads_in_flock(pid: int) -> int:
    """Threads of `pid` blocked in flock(2) now (an embedded manager's host wait)."""
    n = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/syscall") as f:
                parts = f.read().split()
        except OSError:
            continue
        if parts and parts[0].isdigit() and int(parts[0]) == SYS_FLOCK:
            n += 1
    return n


def _daemon_waiters(sock: str) -> list[dict]:
    r = cli("locks", "--socket", sock, "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)["waiters"]


@pytest.mark.fuse
@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("place", PLACES)
def test_downgrade_wakes_the_blocked_reader(daemon, mounts, lockers, place: str,
                                           kind: str) -> None:
    take, wait, down, unlock, other, refused = KINDS[kind]
    mode, n = place.split("-")
    if mode == "central":
        args = ["--lockd", daemon.sock]
    else:
        # One request thread, which reads requests in the kernel's order: a request
        # sent after the reader's F_SETLKW and answered proves the manager has queued
        # that wait (the barrier below).
        args = ["--threads", "1"] if n == "1" else []
    src, ms = mounts(int(n), args)
    (src / "f").write_bytes(b"x" * 100)
    mh, mr = ms[0], ms[-1]
    holder, reader = lockers(mh.path / "f"), lockers(mr.path / "f")
    assert holder.do(take) == "ok"
    reader.send(wait)

    # Really waiting, where each place keeps the wait:
    assert wait_until(lambda: _in_fuse_request(reader.p.pid), 10), _wchan(reader.p.pid)
    if mode == "central":  # in the daemon's queue
        assert wait_until(lambda: len(_daemon_waiters(daemon.sock)) == 1, 10)
        (w,) = _daemon_waiters(daemon.sock)
        assert (w["type"], w["start"], w["kind"]) == ("READ", 0, kind)
    elif n == "2":  # the reader's manager waits for the holder's host lock in the kernel
        count = threads_in_setlkw if kind == "posix" else _threads_in_flock
        assert wait_until(lambda: count(mr.proc.pid) == 1, 10)
    else:  # the single request thread has handled the wait before this request
        assert lockers(mh.path / "f").do(other) == refused
    assert reader.pending(0)

    assert holder.do(down) == "ok"
    assert reader.read(10) == "ok"  # granted at once (TimeoutError: still waiting)
    # ...while the holder still holds its read lock: the two read locks share the bytes.
    for p in (src / "f", mh.path / "f", mr.path / "f"):
        assert lockers(p).do(other) == refused, p
    assert reader.do(unlock) == "ok"
    assert reader.do(other) == refused  # the holder's read lock, alone now
    if mode == "central":
        assert _daemon_waiters(daemon.sock) == []


# ------------------------------------------------------------------ flock, in-process
class Blocking:
    """A blocking host lock call (flock, F_OFD_SETLKW) in a thread: the kernel's answer."""

    def __init__(self, call: Callable[..., int], *args: int) -> None:
        self.rc: int | None = None
        self.thread = threading.Thread(target=self._run, args=(call, *args), daemon=True)
        self.thread.start()

    def _run(self, call: Callable[..., int], *args: int) -> None:
        self.rc = call(*args)

    def stop(self) -> None:
        """Kicked out of the kernel (a failed run's wait) with the manager's wake signal."""
        while self.thread.is_alive():
            signal.pthread_kill(self.thread.ident, ofd.WAKE_SIGNAL)
            self.thread.join(0.01)  # a kill before it entered the kernel is lost


def _in_kernel_wait(t: threading.Thread) -> bool:
    """The thread sleeps in flock(2) or fcntl(F_OFD_SETLKW) now."""
    try:
        with open(f"/proc/self/task/{t.native_id}/syscall") as f:
            parts = f.read().split()
    except OSError:
        return False
    if not parts or not parts[0].isdigit():
        return False
    nr = int(parts[0])
    return nr == SYS_FLOCK or (nr == SYS_FCNTL and int(parts[2], 16) == F_OFD_SETLKW)


def test_flock_conversions_as_the_kernel_does_them(tmp_path) -> None:
    """EX -> SH wakes a blocked LOCK_SH while the holder keeps its shared lock; SH -> EX
    and back with a LOCK_EX waiting keep the holder's lock (the waiter it woke finds the
    new lock taken). The same steps on real descriptions of another file give the
    kernel's answers."""
    kpath, mpath = tmp_path / "kernel", tmp_path / "managed"
    for p in (kpath, mpath):
        p.write_bytes(b"")
    k = [os.open(kpath, os.O_RDWR) for _ in range(3)]  # h, r, x
    mfd = os.open(mpath, os.O_RDWR)
    mgr = LockManager()
    ref = mgr.file(mfd)
    got: list[tuple[int, int]] = []
    kw: list[Blocking] = []

    def both(i: int, type_: int, op: int) -> int:
        rc = ofd.flock(k[i], op | LOCK_NB)
        assert mgr.flock("g", i, ref, type_, 100 + i, False) == rc, (i, op)
        return rc

    def wait(i: int, type_: int, op: int) -> None:
        kw.append(Blocking(ofd.flock, k[i], op))
        assert wait_until(lambda: _in_kernel_wait(kw[-1].thread), 10)
        rc = mgr.flock("g", i, ref, type_, 100 + i, True, lambda rc: got.append((i, rc)))
        assert rc == QUEUED

    try:
        assert both(0, F_WRLCK, LOCK_EX) == 0
        wait(1, F_RDLCK, LOCK_SH)
        assert both(0, F_RDLCK, LOCK_SH) == 0  # the downgrade
        kw[0].thread.join(10)
        assert kw[0].rc == 0
        assert got == [(1, 0)]
        # Both shared locks are held on the managed file's host side.
        probe = os.open(mpath, os.O_RDWR)
        try:
            assert ofd.flock(probe, LOCK_EX | LOCK_NB) == errno.EWOULDBLOCK
            assert ofd.flock(probe, LOCK_SH | LOCK_NB) == 0
        finally:
            os.close(probe)
        wait(2, F_WRLCK, LOCK_EX)
        assert both(1, F_UNLCK, LOCK_UN) == 0
        assert both(0, F_WRLCK, LOCK_EX) == 0  # the upgrade, x still waiting
        assert both(0, F_RDLCK, LOCK_SH) == 0  # and down again
        assert kw[1].thread.is_alive() and got == [(1, 0)]
        assert both(0, F_UNLCK, LOCK_UN) == 0
        kw[1].thread.join(10)
        assert kw[1].rc == 0
        assert got == [(1, 0), (2, 0)]
    finally:
        for w in kw:
            w.stop()
        for fd in k:
            os.close(fd)
        mgr.release_guest("g")
        mgr.put_file(ref)
        os.close(mfd)


# ------------------------------------------------------------------ a soak, as FreeBSD's
# FreeBSD's flock test 14 (a soak: children lock and unlock random ranges of 128 bytes
# with F_SETLKW) hung in a guest when a conversion left a waiter parked. The same here:
# every child's requests are answered (granted, or EDEADLK for a cycle), none hangs.
SOAK = r"""
import ctypes, errno, fcntl, os, random, sys
libc = ctypes.CDLL(None, use_errno=True)
class Flock(ctypes.Structure):
    _fields_ = [("l_type", ctypes.c_short), ("l_whence", ctypes.c_short),
                ("l_start", ctypes.c_int64), ("l_len", ctypes.c_int64), ("l_pid", ctypes.c_int)]
fd = os.open(sys.argv[1], os.O_RDWR)
rnd = random.Random(int(sys.argv[2]))
deadlocks = 0
for _ in range(int(sys.argv[3])):
    start = rnd.randrange(127)
    end = rnd.randrange(start + 1, 128)
    t = rnd.choice([fcntl.F_RDLCK, fcntl.F_WRLCK]) if rnd.random() < 0.5 else fcntl.F_UNLCK
    fl = Flock(t, 0, start, end - start, 0)
    if libc.fcntl(fd, fcntl.F_SETLKW, ctypes.byref(fl)) < 0:
        e = ctypes.get_errno()
        if e != errno.EDEADLK:
            sys.exit(f"F_SETLKW {t} {start} {end}: errno {e}")
        deadlocks += 1
print(deadlocks)
"""
SOAK_CHILDREN, SOAK_STEPS = 12, 40


@pytest.mark.fuse
@pytest.mark.parametrize("mode", ["embedded", "lockd"])
def test_random_soak_never_hangs(daemon, mounts, mode: str) -> None:
    args = ["--lockd", daemon.sock] if mode == "lockd" else []
    src, ms = mounts(2 if mode == "lockd" else 1, args)
    (src / "f").write_bytes(b"x" * 128)
    kids = [subprocess.Popen([sys.executable, "-c", SOAK, str(ms[i % len(ms)].path / "f"),
                              str(1000 + i), str(SOAK_STEPS)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for i in range(SOAK_CHILDREN)]
    try:
        for k in kids:
            # A bound only against a hang (a parked waiter): each child needs well under
            # a second when nothing is parked.
            out, err = k.communicate(timeout=120)
            assert k.returncode == 0, err
    finally:
        for k in kids:
            if k.poll() is None:
                k.kill()  # the server answers the kernel's INTERRUPT: the child ends
            k.wait(10)
    assert host_can_lock(str(src / "f"), 0, 128)  # nothing left behind
    if mode == "lockd":
        assert _daemon_waiters(daemon.sock) == []


# ------------------------------------------------------------------ host holders, in-process
def test_kernel_wakes_waits_across_the_managed_boundary(tmp_path) -> None:
    """The waits the kernel itself keeps: a host process blocked behind a managed write
    lock, and a manager's wait blocked (in its host-wait thread, F_OFD_SETLKW) behind a
    host write lock. A downgrade on either side is an OFD lock change the kernel sees,
    and it wakes the other side's reader at once."""
    path = tmp_path / "f"
    path.write_bytes(b"x" * 16)
    mfd = os.open(path, os.O_RDWR)
    host = os.open(path, os.O_RDWR)  # a host process's own description
    mgr = LockManager()
    ref = mgr.file(mfd)
    granted = threading.Event()
    hw: Blocking | None = None
    try:
        # A managed holder; a host reader waits in the kernel; the holder downgrades.
        assert mgr.setlk("g", 1, ref, F_WRLCK, 0, 9, 100) == 0
        hw = Blocking(ofd.setlkw, host, F_RDLCK, 0, 9)
        assert wait_until(lambda: _in_kernel_wait(hw.thread), 10)
        assert mgr.setlk("g", 1, ref, F_RDLCK, 0, 9, 100) == 0
        hw.thread.join(10)
        assert hw.rc == 0  # granted, beside the manager's read lock
        assert mgr.getlk("g", 2, ref, F_WRLCK, 0, 9).type == F_RDLCK
        assert mgr.setlk("g", 1, ref, F_UNLCK, 0, OFFSET_MAX, 100) == 0
        # The host holds a write lock; a managed reader waits in a host-wait thread.
        assert ofd.setlk(host, F_WRLCK, 0, 9) == 0  # the host's read lock upgraded
        rc = mgr.setlkw("g", 2, ref, F_RDLCK, 0, 9, 101, lambda rc: granted.set())
        assert rc == QUEUED
        assert wait_until(lambda: threads_in_setlkw(os.getpid()) == 1, 10)
        assert ofd.setlk(host, F_RDLCK, 0, 9) == 0  # the host downgrades
        assert granted.wait(10)
        assert mgr.getlk("g", 3, ref, F_WRLCK, 0, 9).type == F_RDLCK
    finally:
        if hw is not None:
            hw.stop()
        mgr.release_guest("g")
        mgr.put_file(ref)
        os.close(host)
        os.close(mfd)
