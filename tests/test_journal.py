"""Crash recovery of the embedded manager: the journal, the descriptor keeper, lost locks
and damaged journals. A real child process holds the locks and is killed with SIGKILL."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from hostproc import HostProc

from lockd.api import F_RDLCK, F_UNLCK, F_WRLCK, OFFSET_MAX, QUEUED
from lockd.engine.manager import LockManager
from lockd.journal.keeper import KeeperClient, ensure_keeper, keeper_address
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


def kill9_when_ready(script: str, *args: str) -> None:
    """Run a holder script until it prints "ready", then kill -9 it."""
    p = subprocess.Popen([sys.executable, "-c", script, *args], stdout=subprocess.PIPE,
                         text=True)
    try:
        assert p.stdout.readline().strip() == "ready"
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
        p.stdout.close()


def crash_holder(journal: str, path: str, keeper: bool) -> None:
    kill9_when_ready(HOLDER, journal, path, "1" if keeper else "0")


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


@pytest.mark.parametrize("lease_s", [0, 3600])
def test_journal_survives_many_changes_exactly(files, tmp_path, lease_s):
    """Every change journaled before its reply, or under leases that end (flush):
    either way the journal ends equal to the lock table."""
    path, journal = files
    m = LockManager(journal=Journal(journal), lease_s=lease_s)
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
        if rng.randrange(50) == 0:
            m.flush_durable(end_leases=True)
    m.flush_durable(end_leases=True)
    want = sorted((r["guest"], r["owner"], r["start"], r["end"], r["type"])
                  for r in m.snapshot()["locks"])
    got = sorted((r["guest"], r["owner"], r["start"], r["end"], r["type"])
                 for r in offline_snapshot(journal)["locks"])
    assert got == want
    for g in ("g0", "g1"):
        m.release_guest(g)
    m.flush_durable(end_leases=True)
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
    m.durable.journal.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    m.durable.journal.close()
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
    os.dup2(full, m.durable.journal._log_fd)
    os.close(full)
    m.setlk("g", 1, f, F_WRLCK, 1, 1, 1)
    assert m.journal_error
    assert m.setlk("g", 2, f, F_WRLCK, 10, 10, 1) == errno.ENOLCK
    assert m.setlk("g", 1, f, F_UNLCK, 0, OFFSET_MAX, 1) == 0  # unlocking still works
    m.put_file(f)
    os.close(fd)


# ---------------------------------------------------------------- leases
LEASED_HOLDER = textwrap.dedent("""
    import os, sys, time
    from lockd.api import *
    from lockd.journal.store import Journal
    from lockd.journal.keeper import ensure_keeper, keeper_address
    from lockd.engine.manager import LockManager
    journal, path = sys.argv[1], sys.argv[2]
    # A lease that never ends by itself: what the test kills is under it, every time.
    m = LockManager(journal=Journal(journal), lease_s=3600)
    m.keeper = ensure_keeper(keeper_address(journal), journal)
    m.recover(m.keeper.take_all(), keeper_survived=m.keeper.complete)
    m.keeper.seal()
    fd = os.open(path, os.O_RDWR)
    f = m.file(fd)
    assert m.setlk("g4", 7, f, F_WRLCK, 60, 69, 444) == 0
    m.flush_durable(end_leases=True)            # g4's lease ends: journaled exactly
    assert m.setlk("g1", 1, f, F_WRLCK, 0, 9, 111) == 0    # journaled, lease begins
    assert m.setlk("g1", 1, f, F_RDLCK, 20, 29, 111) == 0  # under the lease
    assert m.setlk("g1", 1, f, F_UNLCK, 0, 9, 111) == 0    # under the lease
    assert m.setlk("g1", 2, f, F_WRLCK, 40, 49, 112) == 0  # journaled, lease begins
    assert m.setlk("g1", 2, f, F_UNLCK, 40, 49, 112) == 0  # under it: description closed
    assert m.flock("g2", 5, f, F_WRLCK, 222, False) == 0   # journaled, lease begins
    print("ready", flush=True)
    time.sleep(60)
""")


def crash_leased_holder(journal: str, path: str) -> None:
    kill9_when_ready(LEASED_HOLDER, journal, path)


def restart_leased(journal: str) -> tuple[LockManager, dict]:
    m = LockManager(journal=Journal(journal), lease_s=3600)
    m.keeper = ensure_keeper(keeper_address(journal), journal)
    report = m.recover(m.keeper.take_all(), keeper_survived=m.keeper.complete)
    m.keeper.seal()
    return m, report


def stop_leased(m: LockManager) -> None:
    """Release what restart_leased() recovered and end its keeper."""
    for g in ("g1", "g2", "g4"):
        m.release_guest(g)
    m.keeper.quit()


def held(m: LockManager) -> list[tuple]:
    return sorted((r["guest"], r["owner"], r["start"], r["end"], r["type"])
                  for r in m.snapshot()["locks"])


def test_leased_changes_survive_a_daemon_kill_exactly(files):
    """kill -9 of the daemon alone: the keeper and the kernel hold the truth, including
    every change made under a lease and never journaled."""
    path, journal = files
    crash_leased_holder(journal, path)
    assert offline_snapshot(journal)["leases"], "the kill must land under open leases"
    m, report = restart_leased(journal)
    try:
        assert report["lost"] == 0 and report["uncertain"] == 0
        assert held(m) == [("g1", 1, 20, 29, "READ"), ("g2", 5, 0, OFFSET_MAX, "WRITE"),
                           ("g4", 7, 60, 69, "WRITE")]
        with HostProc(path) as h:
            assert h.lock("ofd", "w", 0, 10) == 0    # released under the lease
            assert h.lock("ofd", "w", 40, 10) == 0   # ditto, description closed
            assert h.lock("ofd", "w", 25, 1) in (errno.EAGAIN, errno.EACCES)
            assert h.lock("ofd", "w", 65, 1) in (errno.EAGAIN, errno.EACCES)
        assert offline_snapshot(journal)["leases"] == []  # recovery settled them
        fd = os.open(path, os.O_RDWR)
        f = m.file(fd)
        # nobody is told anything: nothing was lost
        assert m.setlk("g1", 1, f, F_WRLCK, 80, 80, 111) == 0
        assert m.setlk("g1", 2, f, F_WRLCK, 81, 81, 112) == 0
        snap = offline_snapshot(journal)
        assert sorted((r["owner"], r["start"]) for r in snap["locks"]) == [
            (1, 20), (1, 80), (2, 81), (5, 0), (7, 60)]
        m.put_file(f)
        os.close(fd)
    finally:
        stop_leased(m)


def test_recovery_whose_journal_write_fails_takes_nothing_back(files):
    """Recovery commits its corrections (here: the ranges the kernel holds for a leased
    owner instead of its journaled ones, and the leases' end) in one transaction. A
    journal that refuses that write fails the recovery: unlike a request's failed write,
    nothing is taken back, since the owners were answered before the crash and hold
    what the kernel lists. The corrections stay queued for the next write."""
    from test_owners import fail_next_write

    path, journal = files
    crash_leased_holder(journal, path)
    m = LockManager(journal=Journal(journal), lease_s=3600)
    m.keeper = ensure_keeper(keeper_address(journal), journal)
    try:
        fds = m.keeper.take_all()
        fail_next_write(m)
        with pytest.raises(JournalError):
            m.recover(fds, keeper_survived=m.keeper.complete)
        assert m.journal_error is None and m.journal_failures == 0  # no rollback
        assert held(m) == [("g1", 1, 20, 29, "READ"), ("g2", 5, 0, OFFSET_MAX, "WRITE"),
                           ("g4", 7, 60, 69, "WRITE")]
        with HostProc(path) as h:
            assert h.lock("ofd", "w", 25, 1) in (errno.EAGAIN, errno.EACCES)
            assert h.lock("flock", "r") == errno.EWOULDBLOCK
        assert offline_snapshot(journal)["leases"], "nothing of the batch is written"
        m.flush_durable()  # the journal's fresh log takes the queued corrections
        snap = offline_snapshot(journal)
        assert snap["leases"] == []
        assert sorted((r["owner"], r["start"], r["end"]) for r in snap["locks"]) == [
            (1, 20, 29), (5, 0, OFFSET_MAX), (7, 60, 69)]
    finally:
        stop_leased(m)


def test_leased_owners_are_told_when_daemon_and_keeper_die_together(files):
    """kill -9 of the daemon and its keeper at once: an owner whose lease was open
    gets its journaled locks back and EIO once; an owner whose lease had ended is
    exact and hears nothing."""
    path, journal = files
    crash_leased_holder(journal, path)
    k = ensure_keeper(keeper_address(journal), journal)
    k.quit()  # the keeper dies too (and with it every host lock)
    k.close()
    deadline = time.monotonic() + 10
    while True:  # until it is gone (a new one is started by the restart)
        try:
            KeeperClient(keeper_address(journal)).close()
        except OSError:
            break
        assert time.monotonic() < deadline, "the keeper did not quit"
        time.sleep(0.01)  # polling for the keeper's exit
    m, report = restart_leased(journal)
    try:
        assert report["uncertain"] == 3
        # as last journaled: g1/1 W 0-9 (its later changes unknown), g1/2 W 40-49, flock
        assert held(m) == [("g1", 1, 0, 9, "WRITE"), ("g1", 2, 40, 49, "WRITE"),
                           ("g2", 5, 0, OFFSET_MAX, "WRITE"), ("g4", 7, 60, 69, "WRITE")]
        fd = os.open(path, os.O_RDWR)
        f = m.file(fd)
        assert m.setlk("g4", 7, f, F_WRLCK, 90, 90, 444) == 0  # exact: told nothing
        for owner in (1, 2):
            assert m.setlk("g1", owner, f, F_WRLCK, 90 + owner, 90 + owner, 1) == errno.EIO
            assert m.setlk("g1", owner, f, F_WRLCK, 90 + owner, 90 + owner, 1) == 0
        assert m.flock("g2", 5, f, F_WRLCK, 222, False) == errno.EIO
        assert m.flock("g2", 5, f, F_WRLCK, 222, False) == 0
        lost = offline_snapshot(journal)["lost"]
        assert sorted((r["guest"], r["owner"], r["type"]) for r in lost) == [
            ("g1", 1, "UNLCK"), ("g1", 2, "UNLCK"), ("g2", 5, "UNLCK")]
        m.put_file(f)
        os.close(fd)
    finally:
        stop_leased(m)


def fail_next_write(m: LockManager) -> None:
    """The journal's next change-log write fails as on a full disk (the journal then
    goes on in a fresh log)."""
    full = os.open("/dev/full", os.O_WRONLY)
    os.dup2(full, m.durable.journal._log_fd)
    os.close(full)


def test_failed_write_keeps_leased_grants_and_takes_back_the_others(files):
    """A grant under a lease was answered before its write: a failing journal cannot
    take it back (its Lease record tells recovery); a grant waiting for the write can."""
    path, journal = files
    m = LockManager(journal=Journal(journal), lease_s=3600)
    m.recover()
    fd = os.open(path, os.O_RDWR)
    f = m.file(fd)
    try:
        assert m.setlk("g", 1, f, F_WRLCK, 0, 0, 1) == 0  # journaled, lease begins
        fail_next_write(m)
        assert m.setlk("g", 1, f, F_WRLCK, 1, 1, 1) == 0  # under the lease: no write
        assert m.setlk("g", 2, f, F_WRLCK, 10, 10, 1) == errno.ENOLCK  # write fails
        assert m.journal_error
        with HostProc(path) as h:
            assert h.lock("ofd", "w", 0, 2) in (errno.EAGAIN, errno.EACCES)
            assert h.lock("ofd", "w", 10, 1) == 0  # taken back
            assert h.lock("ofd", "u", 10, 1) == 0
        fail_next_write(m)
        m.flush_durable(end_leases=True)  # a lease cannot end by a failed write
        assert m.journal_error and m.durable.leased
        m.flush_durable(end_leases=True)
        assert m.journal_error is None and not m.durable.leased
        snap = offline_snapshot(journal)
        assert sorted((r["owner"], r["start"], r["end"]) for r in snap["locks"]) == [(1, 0, 1)]
        assert snap["leases"] == []
    finally:
        m.release_guest("g")
        m.put_file(f)
        os.close(fd)


# A Journal whose next change log cannot be opened (descriptor table full, for real:
# RLIMIT_NOFILE at the number open), then whose database cannot grow (RLIMIT_FSIZE)
# while a checkpoint applies what that log holds; killed -9 after.
EMFILE_WRITER = textwrap.dedent("""
    import os, resource, signal, sys, types
    from lockd.journal import ops as J
    from lockd.journal.store import Journal
    journal, target = sys.argv[1], sys.argv[2]
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # past RLIMIT_FSIZE: EFBIG, no signal
    st = os.stat(target)
    f = types.SimpleNamespace(dev=st.st_dev, ino=st.st_ino, path=target, handle=None,
                              handle_type=None)
    j = Journal(journal, checkpoint_s=3600)  # no checkpoint thread round meanwhile
    j.checkpoint()
    j.write([J.LockRows("g", 1, f, (), ((0, 0, 1),), 7)])
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) - 1, hard))
    try:
        j.checkpoint()  # the next log cannot be opened: EMFILE
    except Exception as exc:
        print("first checkpoint:", exc, file=sys.stderr)
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    j.write([J.LockRows("g", 2, f, (), tuple((i, i, 1) for i in range(10, 4010, 2)), 8)])
    room = max(os.path.getsize(journal + "-wal"), *(
        os.path.getsize(os.path.join(os.path.dirname(journal), n))
        for n in os.listdir(os.path.dirname(journal)) if "-log." in n))
    # Room for the first batch's few pages, not for the second's 2,000 rows.
    resource.setrlimit(resource.RLIMIT_FSIZE, (room + 32 * 1024, resource.RLIM_INFINITY))
    try:
        j.checkpoint()
    except Exception as exc:
        print("second checkpoint:", exc, file=sys.stderr)
    print("ready", flush=True)
    signal.pause()
""")


def test_checkpoint_that_cannot_open_the_next_log_loses_nothing(files):
    """The next change log cannot be opened (EMFILE): the records written meanwhile go
    to the same log, and that log is deleted only once all of them are applied, so a
    failed apply of the later ones followed by kill -9 still finds them."""
    path, journal = files
    kill9_when_ready(EMFILE_WRITER, journal, path)
    snap = offline_snapshot(journal)
    assert sorted({r["owner"] for r in snap["locks"]}) == [1, 2]
    assert len(snap["locks"]) == 2001
    m = LockManager(journal=Journal(journal))
    m.recover()
    assert len(m.snapshot()["locks"]) == 2001
    m.release_guest("g")
