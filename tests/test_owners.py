"""The owner table (lockd.engine.owners.OwnerTable) is the only writer of who holds what:
every path that grants, converts, drops, hands over, adopts or takes back a lock leaves
the guests' counts agreeing with the files' tables (LockManager.audit), and a restore
over held locks is refused rather than miscounted. Real files, real host processes,
a real journal."""

from __future__ import annotations

import errno
import os

import pytest
from hostproc import HostProc
from procutil import until_threads_in_flock
from test_manager import Waiter

from lockd.api import F_RDLCK, F_UNLCK, F_WRLCK, QUEUED
from lockd.engine.manager import FLOCK, POSIX, LockManager
from lockd.engine.owners import OwnerTable
from lockd.engine.ranges import LockRange
from lockd.engine.state import FileState, GuestState
from lockd.journal.store import Journal


@pytest.fixture
def target(tmp_path):
    path = tmp_path / "data"
    path.write_bytes(b"\0" * 4096)
    fd = os.open(path, os.O_RDWR)
    yield str(path), fd
    os.close(fd)


def held(m: LockManager) -> int:
    return m.stats()["held_locks"]


def test_counts_follow_every_flock_and_posix_path(target):
    path, fd = target
    m = LockManager()
    f = m.file(fd)
    try:
        # grant, then a conversion that Linux decides by dropping the old lock first
        assert m.flock("g1", 10, f, F_RDLCK, 1, wait=False) == 0
        assert m.flock("g2", 20, f, F_RDLCK, 2, wait=False) == 0
        assert m.audit() == [] and held(m) == 2
        assert m.flock("g1", 10, f, F_WRLCK, 1, wait=False) == errno.EAGAIN
        assert m.audit() == [] and held(m) == 1
        m.release_flock("g2", 20)
        assert m.audit() == [] and held(m) == 0

        # a flock granted by the kernel to a wait on a host holder
        with HostProc(path) as h:
            assert h.lock("flock", "w") == 0
            w = Waiter()
            assert m.flock("g3", 30, f, F_WRLCK, 3, wait=True, callback=w) == QUEUED
            until_threads_in_flock(os.getpid(), 1)
            assert h.lock("flock", "u") == 0
            assert w.wait(10.0) == 0
        assert m.audit() == [] and held(m) == 1

        # POSIX ranges split and merged
        assert m.setlk("g1", 1, f, F_WRLCK, 100, 199, 1) == 0
        assert m.setlk("g1", 1, f, F_UNLCK, 140, 149, 1) == 0
        assert m.setlk("g1", 1, f, F_RDLCK, 300, 309, 1) == 0
        assert m.audit() == [] and held(m) == 4

        # handed over with a duplicate of each description, adopted by another guest
        out = {g: m.hand_over(g, f) for g in ("g1", "g3")}
        assert m.audit() == [] and held(m) == 0
        for g, items in out.items():
            for kind, owner, dup, ranges, pid in items:
                assert m.adopt(g + "-new", f, kind, owner, dup, ranges, pid) == 0
        assert m.audit() == [] and held(m) == 4
        assert m.holds("g3-new", FLOCK, 30, f, F_WRLCK)
        assert m.holds("g1-new", POSIX, 1, f, F_RDLCK, 300, 309)

        for g in m.stats()["guests"]:
            m.release_guest(g)
        assert m.audit() == [] and held(m) == 0
    finally:
        for g in m.stats()["guests"]:
            m.release_guest(g)
        m.put_file(f)


def fail_next_write(m: LockManager) -> None:
    """The journal's next change-log write fails as on a full disk."""
    full = os.open("/dev/full", os.O_WRONLY)
    os.dup2(full, m.durable.journal._log_fd)
    os.close(full)


def test_counts_follow_a_journal_failure_taking_grants_back(target, tmp_path):
    path, fd = target
    m = LockManager(journal=Journal(str(tmp_path / "journal.db")))
    m.recover()
    f = m.file(fd)
    try:
        assert m.setlk("g", 1, f, F_WRLCK, 0, 9, 1) == 0
        assert m.flock("g", 5, f, F_RDLCK, 1, wait=False) == 0
        assert m.audit() == [] and held(m) == 2
        fail_next_write(m)
        assert m.flock("g", 6, f, F_RDLCK, 1, wait=False) == errno.ENOLCK  # taken back
        assert m.journal_error
        assert m.audit() == [] and held(m) == 2
        m.flush_durable()  # the journal's fresh log takes the batch again
        assert m.journal_error is None
        fail_next_write(m)
        assert m.setlk("g", 2, f, F_WRLCK, 20, 29, 1) == errno.ENOLCK  # taken back
        assert m.audit() == [] and held(m) == 2
        with HostProc(path) as h:
            assert h.lock("ofd", "w", 20, 10) == 0  # nothing of the failed grants is left
            assert h.lock("flock", "r") == 0  # fh 5's read flock: shared
            assert h.lock("flock", "w") == errno.EWOULDBLOCK
    finally:
        for g in m.stats()["guests"]:
            m.release_guest(g)
        m.put_file(f)


def recorded() -> tuple[OwnerTable, list, GuestState, FileState]:
    ops: list = []
    table = OwnerTable(ops.append, {"locks_granted": 0}, journaled=True)
    return table, ops, GuestState("g"), FileState(1, 2, "/nowhere", -1)


def test_restore_over_held_locks_is_refused():
    """FileLocks.restore replaces an owner's list: restoring over held ranges would
    leave the guest's count off by the old ones. The table refuses, unchanged."""
    table, ops, g, f = recorded()
    table.restore_posix(g, ("g", 1), f, [LockRange(0, 9, F_WRLCK)], 7)
    table.restore_flock(g, ("g", 5), f, F_RDLCK, 7)
    assert (g.nlocks, f.pids, ops) == (2, {("g", 1): 7, ("g", 5): 7}, [])
    with pytest.raises(ValueError):
        table.restore_posix(g, ("g", 1), f, [LockRange(20, 29, F_RDLCK)], 8)
    with pytest.raises(ValueError):
        table.restore_flock(g, ("g", 5), f, F_WRLCK, 8)
    assert g.nlocks == 2 and f.locks.owners[("g", 1)] == [LockRange(0, 9, F_WRLCK)]
    assert f.flocks == {("g", 5): F_RDLCK} and f.pids[("g", 1)] == 7
    assert OwnerTable.audit({"g": g}, {f.key: f}) == []


def test_flock_changes_are_recorded_once_with_their_counts():
    table, ops, g, f = recorded()
    key = ("g", 5)
    assert table.drop_flock(g, key, f) is None and ops == []  # held nothing: no record
    table.set_flock(g, key, f, F_RDLCK, 7)
    table.set_flock(g, key, f, F_WRLCK, 8)  # a conversion: still one flock
    assert (g.nlocks, g.flock_files, f.pids[key]) == (1, {key: f}, 8)
    assert table.drop_flock(g, key, f) == F_WRLCK
    assert (g.nlocks, g.flock_files, f.pids, f.flocks) == (0, {}, {}, {})
    assert [(type(op).__name__, op.type) for op in ops] == [
        ("FlockRow", F_RDLCK), ("FlockRow", F_WRLCK), ("FlockRow", F_UNLCK)]
    g.nlocks = 3  # what a hand-written update elsewhere would leave
    assert OwnerTable.audit({"g": g}, {f.key: f}) == ["guest 'g': nlocks 3, holds 0"]
