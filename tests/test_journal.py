"""Crash recovery of the embedded manager: the journal, the descriptor keeper, lost locks
and damaged journals. A real child process holds the locks and is killed with SIGKILL."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap

import pytest
from hostproc import HostProc

from lockd.api import F_RDLCK, F_UNLCK, F_WRLCK, OFFSET_MAX, QUEUED
from lockd.engine.manager import LockManager
from lockd.journal.keeper import ensure_keeper, keeper_address
from lockd.journal.store import Journal, JournalError, check_file, offline_snapshot

HOLDER = textwrap.dedent("""
    import os, sys, time
    from lockd.api import *
    from lockd.journal.store import Journal
    from lockd.journal.keeper import ensure_keeper, keeper_address
    from lockd.engine.manager import LockManager
    journal, path, use_keeper = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
    m = LockManager(journal=Journal(journal))
    if use_keeper:
        m.keeper = ensure_keeper(keeper_address(journal), journal)
    m.recover()
    fd = os.open(path, os.O_RDWR)
    f = m.file(fd)
    assert m.setlk("g1", 1, f, F_WRLCK, 0, 9, 111) == 0
    assert m.setlk("g1", 1, f, F_RDLCK, 20, 29, 111) == 0
    assert m.flock("g2", 5, f, F_WRLCK, 222, False) == 0
    assert m.setlkw("g3", 3, f, F_WRLCK, 5, 5, 333, lambda e: None, tag=77) == QUEUED
    print("ready", flush=True)
    time.sleep(60)
""")


def crash_holder(journal: str, path: str, keeper: bool) -> None:
    p = subprocess.Popen([sys.executable, "-c", HOLDER, journal, path, "1" if keeper else "0"],
                         stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "ready"
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
        p.stdout.close()


@pytest.fixture
def files(tmp_path):
    path = tmp_path / "data"
    path.write_bytes(b"\0" * 100)
    journal = str(tmp_path / "locks.db")
    yield str(path), journal
    # the keeper exits once its journal is gone
    for suffix in ("", "-wal", "-shm"):
        try:
            os.unlink(journal + suffix)
        except FileNotFoundError:
            pass


def restart(journal: str, keeper: bool) -> tuple[LockManager, dict]:
    m = LockManager(journal=Journal(journal))
    fds = None
    if keeper:
        m.keeper = ensure_keeper(keeper_address(journal), journal)
        fds = m.keeper.take_all()
    return m, m.recover(fds)


def test_keeper_closes_the_window_and_recovery_restores_everything(files):
    path, journal = files
    crash_holder(journal, path, keeper=True)
    with HostProc(path) as h:
        # the daemon is dead, but no host process can take what the guests hold
        assert h.lock("ofd", "w", 5, 1) in (errno.EAGAIN, errno.EACCES)
        assert h.lock("flock", "r") == errno.EWOULDBLOCK
        assert h.lock("ofd", "r", 25, 1) == 0  # a read lock is compatible
        assert h.lock("ofd", "u", 0, 0) == 0
        m, report = restart(journal, keeper=True)
        assert report["locks"] == 3 and report["lost"] == 0 and report["waits"] == 1
        assert report["from_keeper"] == 2
        assert h.lock("ofd", "w", 5, 1) in (errno.EAGAIN, errno.EACCES)
        fd = os.open(path, os.O_RDWR)
        f = m.file(fd)
        snap = m.snapshot()
        assert sorted((r["guest"], r["kind"], r["start"], r["end"], r["type"], r["pid"])
                      for r in snap["locks"]) == [
            ("g1", "posix", 0, 9, "WRITE", 111), ("g1", "posix", 20, 29, "READ", 111),
            ("g2", "flock", 0, OFFSET_MAX, "WRITE", 222)]
        assert [(w["guest"], w["start"]) for w in snap["waiters"]] == [("g3", 5)]
        # the reconnected guest re-sends its wait: it keeps its place, gets the lock
        got = []
        assert m.setlkw("g3", 3, f, F_WRLCK, 5, 5, 333, got.append, tag=77) == QUEUED
        assert len(m.snapshot()["waiters"]) == 1
        m.release_owner("g1", 1, f)
        assert got == [0]
        m.release_guest("g2")
        m.release_guest("g3")
        assert h.lock("ofd", "w", 0, 0) == 0
        m.put_file(f)
        os.close(fd)


def test_without_keeper_a_stolen_range_is_a_lost_lock(files):
    path, journal = files
    crash_holder(journal, path, keeper=False)
    with HostProc(path) as h:
        assert h.lock("ofd", "w", 5, 1) == 0  # the window: the lock was dropped
        m, report = restart(journal, keeper=False)
        assert report["lost"] == 1 and report["locks"] == 2
        snap = m.snapshot()
        assert [(r["guest"], r["start"], r["end"]) for r in snap["lost"]] == [("g1", 0, 9)]
        assert [r["start"] for r in offline_snapshot(journal)["lost"]] == [0]
        fd = os.open(path, os.O_RDWR)
        f = m.file(fd)
        # the owner learns of it once, then goes on
        assert m.setlk("g1", 1, f, F_WRLCK, 50, 50, 111) == errno.EIO
        assert m.setlk("g1", 1, f, F_WRLCK, 50, 50, 111) == 0
        # still held: the other range and the flock
        assert h.lock("ofd", "w", 25, 1) in (errno.EAGAIN, errno.EACCES)
        for g in ("g1", "g2", "g3"):
            m.release_guest(g)
        m.put_file(f)
        os.close(fd)
    # a restart after the report does not report it again
    m2, _ = restart(journal, keeper=False)
    fd = os.open(path, os.O_RDWR)
    f = m2.file(fd)
    assert m2.setlk("g1", 1, f, F_WRLCK, 0, 0, 1) == 0
    m2.release_guest("g1")
    m2.put_file(f)
    os.close(fd)


def test_journal_survives_many_changes_exactly(files, tmp_path):
    path, journal = files
    m = LockManager(journal=Journal(journal))
    m.recover()
    fd = os.open(path, os.O_RDWR)
    f = m.file(fd)
    import random

    rng = random.Random(5)
    for _ in range(500):
        o = rng.randrange(4)
        t = rng.choice([F_RDLCK, F_WRLCK, F_UNLCK])
        s = rng.randrange(50)
        m.setlk(f"g{o % 2}", o, f, t, s, s + rng.randrange(10), 1)
    want = sorted((r["guest"], r["owner"], r["start"], r["end"], r["type"])
                  for r in m.snapshot()["locks"])
    got = sorted((r["guest"], r["owner"], r["start"], r["end"], r["type"])
                 for r in offline_snapshot(journal)["locks"])
    assert got == want
    for g in ("g0", "g1"):
        m.release_guest(g)
    assert offline_snapshot(journal)["locks"] == []
    m.put_file(f)
    os.close(fd)


@pytest.mark.parametrize("damage", ["garbage", "truncate", "orphan"])
def test_damaged_journal_is_refused(files, damage):
    path, journal = files
    m = LockManager(journal=Journal(journal))
    m.recover()
    fd = os.open(path, os.O_RDWR)
    f = m.file(fd)
    for i in range(200):
        assert m.setlk("g", i, f, F_WRLCK, i, i, 1) == 0
    m._journal.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    m._journal.close()
    size = os.path.getsize(journal)
    if damage == "garbage":
        with open(journal, "r+b") as j:
            j.seek(0)
            j.write(b"this is not sqlite")
    elif damage == "truncate":
        os.truncate(journal, size // 2 + 100)
    else:
        import sqlite3

        c = sqlite3.connect(journal)
        c.execute("DELETE FROM files")
        c.commit()
        c.close()
    assert check_file(journal)
    with pytest.raises(JournalError) as exc:
        Journal(journal)
    assert journal in str(exc.value)
    os.close(fd)


def test_unwritable_journal_answers_enolck(files):
    path, journal = files
    m = LockManager(journal=Journal(journal))
    m.recover()
    fd = os.open(path, os.O_RDWR)
    f = m.file(fd)
    assert m.setlk("g", 1, f, F_WRLCK, 0, 0, 1) == 0
    # Every change-log write now fails as on a full disk.
    full = os.open("/dev/full", os.O_WRONLY)
    os.dup2(full, m._journal._log_fd)
    os.close(full)
    m.setlk("g", 1, f, F_WRLCK, 1, 1, 1)
    assert m.journal_error
    assert m.setlk("g", 2, f, F_WRLCK, 10, 10, 1) == errno.ENOLCK
    assert m.setlk("g", 1, f, F_UNLCK, 0, OFFSET_MAX, 1) == 0  # unlocking still works
    m.put_file(f)
    os.close(fd)
