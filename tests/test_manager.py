"""LockManager on real host files with real host processes: coherence both ways,
deadlock detection, cancellation, FIFO fairness, limits and the descriptor budget."""

from __future__ import annotations

import errno
import os
import threading

import pytest
from hostproc import HostProc
from procutil import threads_in_setlkw, until_threads_in_setlkw

from lockd.api import F_RDLCK, F_UNLCK, F_WRLCK, NO_CONFLICT, OFFSET_MAX, QUEUED, Limits
from lockd.engine.manager import LockManager

EAGAIN = errno.EAGAIN


class Waiter:
    """Collects a wait's callback result."""

    def __init__(self) -> None:
        self.results: list[int] = []
        self.event = threading.Event()

    def __call__(self, err: int) -> None:
        self.results.append(err)
        self.event.set()

    def wait(self, timeout: float = 5.0) -> int:
        assert self.event.wait(timeout), "wait callback never fired"
        return self.results[0]


@pytest.fixture
def mgr():
    m = LockManager()
    yield m
    for g in m.stats()["guests"]:
        m.release_guest(g)


@pytest.fixture
def target(tmp_path, mgr):
    path = tmp_path / "data"
    path.write_bytes(b"\0" * 4096)
    fd = os.open(path, os.O_RDWR)
    ref = mgr.file(fd)
    yield str(path), ref
    mgr.put_file(ref)
    os.close(fd)


# ---------------------------------------------------------------- host coherence
@pytest.mark.parametrize("kind", ["posix", "ofd", "lockf"])
def test_managed_lock_blocks_host(target, mgr, kind):
    path, ref = target
    assert mgr.setlk("g1", 1, ref, F_WRLCK, 100, 199, 42) == 0
    with HostProc(path) as h:
        assert h.lock(kind, "w", 150, 10) in (errno.EAGAIN, errno.EACCES)
        assert h.lock(kind, "w", 200, 10) == 0  # outside the range: free
        assert mgr.setlk("g1", 1, ref, F_RDLCK, 100, 199, 42) == 0  # downgrade
        if kind != "lockf":  # lockf has no shared mode
            assert h.lock(kind, "r", 150, 10) == 0
        assert h.lock(kind, "w", 150, 10) in (errno.EAGAIN, errno.EACCES)
        mgr.release_owner("g1", 1, ref)
        assert h.lock(kind, "w", 150, 10) == 0


@pytest.mark.parametrize("kind", ["posix", "ofd", "lockf"])
def test_host_lock_blocks_managed(target, mgr, kind):
    path, ref = target
    with HostProc(path) as h:
        assert h.lock(kind, "w", 0, 10) == 0
        assert mgr.setlk("g1", 1, ref, F_RDLCK, 5, 5, 1) == EAGAIN
        c = mgr.getlk("g1", 1, ref, F_RDLCK, 5, 5)
        assert (c.type, c.start, c.end, c.guest) == (F_WRLCK, 0, 9, None)
        if kind != "ofd":
            assert c.pid == h.pid  # a classic holder's pid, as the kernel reports it
        assert mgr.setlk("g1", 1, ref, F_RDLCK, 10, 20, 1) == 0


def test_flock_coherent_with_host_and_guests(target, mgr):
    path, ref = target
    assert mgr.flock("g1", 10, ref, F_RDLCK, 1, wait=False) == 0
    assert mgr.flock("g2", 20, ref, F_RDLCK, 2, wait=False) == 0
    assert mgr.flock("g2", 21, ref, F_WRLCK, 2, wait=False) == EAGAIN
    with HostProc(path) as h:
        assert h.lock("flock", "r") == 0
        assert h.lock("flock", "w") == errno.EWOULDBLOCK
        assert h.lock("flock", "u") == 0
        mgr.release_flock("g1", 10)
        mgr.release_flock("g2", 20)
        assert h.lock("flock", "w") == 0
        assert mgr.flock("g1", 10, ref, F_RDLCK, 1, wait=False) == EAGAIN
    # the host process died: its flock is gone
    assert mgr.flock("g1", 10, ref, F_WRLCK, 1, wait=False) == 0


def test_flock_waits_for_guest_then_host(target, mgr):
    path, ref = target
    assert mgr.flock("g1", 1, ref, F_WRLCK, 1, wait=False) == 0
    w = Waiter()
    assert mgr.flock("g2", 2, ref, F_WRLCK, 2, wait=True, callback=w) == QUEUED
    mgr.flock("g1", 1, ref, F_UNLCK, 1, wait=False)
    assert w.wait() == 0
    with HostProc(path) as h:
        assert h.lock("flock", "w") == errno.EWOULDBLOCK
        mgr.release_flock("g2", 2)
        assert h.lock("flock", "w") == 0
        w2 = Waiter()
        assert mgr.flock("g3", 3, ref, F_RDLCK, 3, wait=True, callback=w2) == QUEUED
        assert h.lock("flock", "u") == 0
        assert w2.wait() == 0
        # A shared flock granted after a host wait keeps its description (F_RDLCK is 0:
        # once it was mistaken for "holds nothing" and the lock was orphaned on the host).
        assert h.lock("flock", "w") == errno.EWOULDBLOCK
        mgr.flock("g3", 3, ref, F_UNLCK, 3, wait=False)
        assert h.lock("flock", "w") == 0


def test_read_lock_on_read_only_file(tmp_path, mgr):
    """A file the manager can only open read-only (a read-only mount: root too gets
    EROFS) takes read locks; a write lock there is EBADF, as fcntl answers it."""
    import subprocess

    src, ro = tmp_path / "src", tmp_path / "ro"
    src.mkdir()
    ro.mkdir()
    (src / "f").write_bytes(b"x" * 10)
    subprocess.run(["mount", "--bind", str(src), str(ro)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(ro)], check=True)
        fd = os.open(ro / "f", os.O_RDONLY)
        ref = mgr.file(fd)
        try:
            assert mgr.setlk("g1", 1, ref, F_RDLCK, 0, OFFSET_MAX, 1) == 0
            assert mgr.setlk("g2", 1, ref, F_WRLCK, 0, 0, 1) == EAGAIN
            mgr.release_guest("g1")
            assert mgr.setlk("g3", 1, ref, F_WRLCK, 0, 0, 1) == errno.EBADF
            assert mgr.snapshot()["locks"] == []
        finally:
            mgr.release_guest("g3")
            mgr.put_file(ref)
            os.close(fd)
    finally:
        subprocess.run(["umount", str(ro)], check=True)


# ---------------------------------------------------------------- waiting
def test_wait_granted_when_guest_releases(target, mgr):
    _, ref = target
    assert mgr.setlk("g1", 1, ref, F_WRLCK, 0, 99, 1) == 0
    w = Waiter()
    # A wait on a managed holder is answered inside the call that frees it (its callback
    # runs before setlk/release returns): checked right after each call, no window.
    assert mgr.setlkw("g2", 1, ref, F_WRLCK, 50, 60, 2, w) == QUEUED
    assert not w.results
    assert mgr.snapshot()["waiters"][0]["waiting_for"] == ["g1"]
    assert mgr.setlk("g1", 1, ref, F_UNLCK, 0, 54, 1) == 0  # still overlaps 55..60
    assert not w.results
    assert [x["waiting_for"] for x in mgr.snapshot()["waiters"]] == [["g1"]]
    mgr.release_owner("g1", 1, ref)
    assert w.wait() == 0
    c = mgr.getlk("g3", 1, ref, F_RDLCK, 0, OFFSET_MAX)
    assert (c.start, c.end, c.guest) == (50, 60, "g2")


def test_wait_on_host_holder_wakes_fast(target, mgr):
    path, ref = target
    with HostProc(path) as h:
        assert h.lock("posix", "w", 0, 0) == 0
        w = Waiter()
        assert mgr.setlkw("g1", 1, ref, F_WRLCK, 10, 20, 1, w) == QUEUED
        assert mgr.snapshot()["waiters"][0]["waiting_for"] == ["host"]
        # a thread of ours waits in the kernel: the release itself wakes it (no polling)
        until_threads_in_setlkw(os.getpid(), 1)
        assert h.lock("posix", "u", 0, 0) == 0
        assert w.wait() == 0
        assert threads_in_setlkw(os.getpid()) == 0
        assert h.lock("posix", "w", 10, 1) == EAGAIN or h.lock("posix", "w", 10, 1) == 13


def test_guest_release_grants_waiters_behind(target, mgr):
    _, ref = target
    assert mgr.setlk("g1", 1, ref, F_WRLCK, 0, 0, 1) == 0
    ws = [Waiter() for _ in range(3)]
    for i, w in enumerate(ws):
        assert mgr.setlkw(f"g{i + 2}", 1, ref, F_RDLCK, 0, 0, 1, w) == QUEUED
    mgr.release_guest("g1")
    assert [w.wait() for w in ws] == [0, 0, 0]


# ---------------------------------------------------------------- fairness
def test_fifo_writer_not_starved_by_readers(target, mgr):
    _, ref = target
    assert mgr.setlk("r1", 1, ref, F_RDLCK, 0, 9, 1) == 0
    writer = Waiter()
    assert mgr.setlkw("w", 1, ref, F_WRLCK, 0, 9, 2, writer) == QUEUED
    # a later reader may not overtake the queued writer
    assert mgr.setlk("r2", 1, ref, F_RDLCK, 5, 5, 3) == EAGAIN
    late = Waiter()
    assert mgr.setlkw("r2", 1, ref, F_RDLCK, 5, 5, 3, late) == QUEUED
    assert mgr.setlk("r3", 1, ref, F_RDLCK, 20, 30, 3) == 0  # no overlap: fine
    mgr.release_guest("r1")
    assert writer.wait() == 0
    assert not late.results  # (answered inside release_guest if at all)
    assert [x["waiting_for"] for x in mgr.snapshot()["waiters"]] == [["w"]]
    mgr.release_guest("w")
    assert late.wait() == 0


def test_fairness_never_creates_a_deadlock(target, mgr):
    # r1 holds a read lock; w waits for r1. r1 upgrading must not queue behind w.
    _, ref = target
    assert mgr.setlk("r1", 1, ref, F_RDLCK, 0, 9, 1) == 0
    writer = Waiter()
    assert mgr.setlkw("w", 1, ref, F_WRLCK, 0, 9, 2, writer) == QUEUED
    assert mgr.setlk("r1", 1, ref, F_RDLCK, 0, 19, 1) == 0
    up = Waiter()
    assert mgr.setlkw("r1", 1, ref, F_WRLCK, 0, 9, 1, up) == 0  # granted at once
    mgr.release_guest("r1")
    assert writer.wait() == 0


# ---------------------------------------------------------------- deadlocks
@pytest.mark.parametrize("length", [2, 3])
def test_deadlock_cycle_across_guests(target, mgr, length):
    _, ref = target
    guests = [f"g{i}" for i in range(length)]
    for i, g in enumerate(guests):
        assert mgr.setlk(g, 7, ref, F_WRLCK, i * 10, i * 10 + 9, 100 + i) == 0
    waits = []
    for i, g in enumerate(guests[:-1]):
        w = Waiter()
        nxt = (i + 1) * 10
        assert mgr.setlkw(g, 7, ref, F_WRLCK, nxt, nxt, 100 + i, w) == QUEUED
        waits.append(w)
    # the last one closes the cycle: refused at once, the others keep waiting
    w_last = Waiter()
    assert mgr.setlkw(guests[-1], 7, ref, F_WRLCK, 0, 0, 99, w_last) == errno.EDEADLK
    assert not any(w.results for w in waits)
    assert mgr.stats()["deadlocks"] == 1
    mgr.release_guest(guests[-1])
    for w in reversed(waits):
        assert w.wait() == 0
        mgr.release_guest(guests[waits.index(w)])


def test_no_false_deadlock_for_independent_waits(target, mgr):
    _, ref = target
    assert mgr.setlk("a", 1, ref, F_WRLCK, 0, 0, 1) == 0
    assert mgr.setlk("b", 1, ref, F_WRLCK, 1, 1, 1) == 0
    w1, w2 = Waiter(), Waiter()
    assert mgr.setlkw("c", 1, ref, F_WRLCK, 0, 1, 1, w1) == QUEUED
    assert mgr.setlkw("a", 1, ref, F_WRLCK, 5, 5, 1, w2) == 0
    assert mgr.setlkw("b", 1, ref, F_WRLCK, 6, 6, 1, w2) == 0


# ---------------------------------------------------------------- cancellation
def test_cancel_by_id_tag_and_guest(target, mgr):
    _, ref = target
    assert mgr.setlk("g1", 1, ref, F_WRLCK, 0, 0, 1) == 0
    a, b, c = Waiter(), Waiter(), Waiter()
    assert mgr.setlkw("g2", 1, ref, F_WRLCK, 0, 0, 1, a) == QUEUED
    assert mgr.setlkw("g3", 1, ref, F_WRLCK, 0, 0, 1, b, tag=555) == QUEUED
    assert mgr.setlkw("g4", 1, ref, F_WRLCK, 0, 0, 1, c) == QUEUED
    wid = mgr.snapshot()["waiters"][0]["id"]
    assert mgr.cancel(wid) is True
    assert a.wait() == errno.EINTR
    assert mgr.cancel(wid) is False
    assert mgr.cancel_tag("g2", 555) is False  # another guest's tag
    assert mgr.cancel_tag("g3", 555) is True
    assert b.wait() == errno.EINTR
    mgr.release_guest("g4")
    assert c.wait() == errno.EINTR
    assert mgr.snapshot()["waiters"] == []
    mgr.release_guest("g1")


def test_cancel_host_wait(target, mgr):
    path, ref = target
    with HostProc(path) as h:
        assert h.lock("ofd", "w", 0, 0) == 0
        w = Waiter()
        assert mgr.setlkw("g1", 1, ref, F_WRLCK, 0, 0, 1, w, tag=9) == QUEUED
        until_threads_in_setlkw(os.getpid(), 1)  # blocked in the kernel, then cancelled
        assert mgr.cancel_tag("g1", 9)
        assert w.wait() == errno.EINTR
        assert threads_in_setlkw(os.getpid()) == 0
        assert h.lock("ofd", "u", 0, 0) == 0
        # the cancelled wait did not take the lock behind our back (its kernel wait is
        # gone: no thread of ours is left in F_OFD_SETLKW, checked above)
        assert h.lock("ofd", "w", 0, 0) == 0
    assert mgr.stats()["descriptions"] == 0


# ---------------------------------------------------------------- limits and budget
def test_limits_answer_enolck(tmp_path):
    m = LockManager(limits=Limits(max_owners=2, max_locks=3, max_waiters=1))
    p = tmp_path / "f"
    p.write_bytes(b"")
    fd = os.open(p, os.O_RDWR)
    ref = m.file(fd)
    for i in range(3):
        assert m.setlk("g", 1, ref, F_WRLCK, i * 2, i * 2, 1) == 0
    assert m.setlk("g", 1, ref, F_WRLCK, 10, 10, 1) == errno.ENOLCK
    assert m.setlk("g", 1, ref, F_WRLCK, 1, 1, 1) == 0  # merges [0,2]: two locks now
    assert m.setlk("g", 2, ref, F_RDLCK, 200, 200, 1) == 0
    assert m.setlk("g", 2, ref, F_RDLCK, 300, 300, 1) == errno.ENOLCK  # lock limit again
    m.setlk("g", 1, ref, F_UNLCK, 0, OFFSET_MAX, 1)
    m.setlk("g", 2, ref, F_UNLCK, 0, OFFSET_MAX, 1)
    assert m.setlk("g", 2, ref, F_RDLCK, 100, 100, 1) == 0
    assert m.setlk("g", 3, ref, F_RDLCK, 101, 101, 1) == 0
    assert m.setlk("g", 4, ref, F_RDLCK, 102, 102, 1) == errno.ENOLCK  # owners
    assert m.setlk("other", 1, ref, F_WRLCK, 100, 100, 1) == EAGAIN  # other guest unharmed
    w = Waiter()
    assert m.setlkw("g", 2, ref, F_WRLCK, 50, 50, 1, w) == 0
    assert m.setlk("x", 1, ref, F_WRLCK, 60, 60, 1) == 0
    assert m.setlkw("g", 2, ref, F_WRLCK, 60, 60, 1, w) == QUEUED
    assert m.setlkw("g", 3, ref, F_WRLCK, 60, 60, 1, Waiter()) == errno.ENOLCK  # waiters
    for g in m.stats()["guests"]:
        m.release_guest(g)
    m.put_file(ref)
    os.close(fd)


def _fds_on(path: str) -> int:
    """Descriptors of this process open on `path` (other tests' leftovers do not count)."""
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            n += os.readlink(f"/proc/self/fd/{fd}") == path
        except OSError:
            pass
    return n


def test_ten_thousand_owners_leave_no_descriptor(target, mgr):
    path, ref = target
    before = _fds_on(path)
    for i in range(10_000):
        assert mgr.setlk(f"g{i % 10}", i, ref, F_WRLCK, i, i, 1) == 0
    assert mgr.stats()["descriptions"] == 10_000
    for i in range(10_000):
        if i % 2:
            assert mgr.setlk(f"g{i % 10}", i, ref, F_UNLCK, 0, OFFSET_MAX, 1) == 0
        else:
            mgr.release_owner(f"g{i % 10}", i, ref)
    st = mgr.stats()
    assert st["descriptions"] == 0
    # at most a few lock-free descriptions are kept for reuse while the file is in use
    assert _fds_on(path) == before + st["spare_descriptions"] <= before + 4


def test_descriptor_budget_answers_enolck(target, mgr):
    _, ref = target
    mgr.descs.fd_budget = mgr.stats()["descriptors"] + 5
    got = [mgr.setlk("g", i, ref, F_RDLCK, 0, 0, 1) for i in range(8)]
    assert got == [0] * 5 + [errno.ENOLCK] * 3


def test_bad_arguments_change_nothing(target, mgr):
    _, ref = target
    assert mgr.setlk("g", 1, ref, F_WRLCK, 10, 5, 1) == errno.EINVAL
    assert mgr.setlk("g", 1, ref, F_WRLCK, 0, OFFSET_MAX + 1, 1) == errno.EINVAL
    assert mgr.setlk("g", 1, ref, 7, 0, 0, 1) == errno.EINVAL
    assert mgr.getlk("g", 1, ref, 7, 0, 0) == errno.EINVAL
    # F_UNLCK: the owner's own locks (Linux 6.7's F_OFD_GETLK extension), here none
    assert mgr.getlk("g", 1, ref, F_UNLCK, 0, 0) == NO_CONFLICT
    assert mgr.flock("g", 1, ref, 9, 1, wait=False) == errno.EINVAL
    assert mgr.snapshot()["locks"] == []
    assert mgr.getlk("g", 1, ref, F_WRLCK, 0, OFFSET_MAX) == NO_CONFLICT
