"""The descriptor keeper never outlives its daemon for long (lockd/journal/keeper.py).

A daemon that stops holding nothing takes its keeper with it, also when the keeper holds
lock-free descriptions kept for reuse; a daemon stopped or killed while guests hold
locks leaves the keeper holding them for its restart, for at most --keeper-linger
seconds; a restart within that time takes the locks back.
"""

from __future__ import annotations

import os
import signal
import time

import procutil
from test_daemon_util import F_UNLCK, F_WRLCK, DaemonProc, Raw, host_can_lock

from lockd.daemon import wire


def keeper_pids(tag: str) -> list[int]:
    return procutil.keeper_pids(tag.encode())


def gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1].startswith("Z")  # a zombie is gone too
    except FileNotFoundError:
        return True


def wait_gone(pids: list[int], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not all(gone(p) for p in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)  # polling /proc: the keeper is not our child
    return True


def stopped(pid: int) -> bool:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(") ", 1)[1].startswith("T")


def lock_and_unlock(d: DaemonProc, path: str, keep: bool) -> Raw:
    """A guest takes a lock (and with keep=False gives it back: its description then
    stays in the file's spare pool, and in the keeper)."""
    r = Raw(d.sock, "g1")
    h = r.file(path)
    assert r.expect(r.lk(wire.T_SETLK, h, F_WRLCK, 0, 9))[0] == 0
    if not keep:
        assert r.expect(r.lk(wire.T_SETLK, h, F_UNLCK, 0, 9))[0] == 0
    return r


def test_sigterm_holding_nothing_ends_the_keeper(tmp_path) -> None:
    d = DaemonProc(str(tmp_path)).start()
    try:
        r = lock_and_unlock(d, str(tmp_path / "f"), keep=False)
        pids = keeper_pids(str(tmp_path))
        assert len(pids) == 1
        r.close()
    finally:
        assert d.stop() == 0
    assert wait_gone(pids, 10), "keeper outlived a daemon that held nothing"


def test_kill9_holding_nothing_ends_the_keeper(tmp_path) -> None:
    d = DaemonProc(str(tmp_path)).start()
    try:
        guest = lock_and_unlock(d, str(tmp_path / "f"), keep=False)  # noqa: F841
        pids = keeper_pids(str(tmp_path))
        assert len(pids) == 1
        d.kill9()
    finally:
        d.stop()
    # It keeps only a lock-free spare: nothing to protect, nothing to wait for.
    assert wait_gone(pids, 10), "keeper of a killed daemon that held nothing lingered"


def test_kill9_holding_locks_keeps_them_for_linger_seconds(tmp_path) -> None:
    path = str(tmp_path / "f")
    d = DaemonProc(str(tmp_path), "--keeper-linger", "3").start()
    try:
        guest = lock_and_unlock(d, path, keep=True)  # noqa: F841 - its connection holds
        pids = keeper_pids(str(tmp_path))
        t0 = time.monotonic()
        d.kill9()
        # the keeper holds the lock for the daemon's restart...
        assert not gone(pids[0]) and not host_can_lock(path, 0, 10)
        # ...and gives up after --keeper-linger seconds: the lock is released.
        assert wait_gone(pids, 30), "keeper outlived its linger time"
        waited = time.monotonic() - t0
        assert waited >= 2.5, waited  # not before the linger time (a lower bound only)
        assert host_can_lock(path, 0, 10)
    finally:
        d.stop()


def test_restart_within_linger_takes_the_locks_back(tmp_path) -> None:
    path = str(tmp_path / "f")
    d = DaemonProc(str(tmp_path), "--keeper-linger", "60").start()
    try:
        guest = lock_and_unlock(d, path, keep=True)  # noqa: F841 - its connection holds
        pids = keeper_pids(str(tmp_path))
        d.proc.send_signal(signal.SIGTERM)  # a clean stop keeps guests' locks too
        assert d.proc.wait(10) == 0
        assert not gone(pids[0]) and not host_can_lock(path, 0, 10)
        d = DaemonProc(str(tmp_path), "--keeper-linger", "60").start()
        assert keeper_pids(str(tmp_path)) == pids  # the same keeper, taken back
        assert not host_can_lock(path, 0, 10)
        # the guest does not come back: after its grace the lock goes, and the daemon,
        # stopped holding nothing now, takes the keeper with it
        r = Raw(d.sock, None, "admin")
        assert r.call(wire.T_EVICT, b"g1")[0] == 0
        assert host_can_lock(path, 0, 10)
        r.close()
    finally:
        assert d.stop() == 0
    assert wait_gone(pids, 10)


def test_spare_description_reuse_keeps_the_owners_key(tmp_path) -> None:
    """A lock description goes back to the file's spare pool when its owner holds
    nothing; the owner may then get another description from the pool while its old one
    still sits there. Whoever takes that old one next must not make the keeper forget
    the owner's current description: after a kill -9 its lock must still be held."""
    path = str(tmp_path / "f")
    d = DaemonProc(str(tmp_path)).start()
    try:
        r = Raw(d.sock, "g1")
        h = r.file(path)

        def lk(owner: int, type_: int, start: int) -> int:
            return r.expect(r.lk(wire.T_SETLK, h, type_, start, start, owner=owner))[0]

        assert lk(1, F_WRLCK, 0) == 0 and lk(2, F_WRLCK, 1) == 0  # descriptions D1, D2
        assert lk(1, F_UNLCK, 0) == 0 and lk(2, F_UNLCK, 1) == 0  # spare pool [D1, D2]
        assert lk(1, F_WRLCK, 0) == 0  # owner 1 now on D2; D1 still names owner 1
        assert lk(3, F_WRLCK, 2) == 0  # owner 3 takes D1
        d.kill9()
        # Owner 1's lock survives in the keeper: no host process can take it...
        assert not host_can_lock(path, 0, 1)
        d = DaemonProc(str(tmp_path)).start()
        # ...and the restarted daemon has it, lost nothing.
        st = Raw(d.sock, None, "admin")
        status, payload = st.call(wire.T_STATUS)
        assert status == 0 and b'"lost":0' in payload, payload
        assert not host_can_lock(path, 0, 1) and not host_can_lock(path, 2, 1)
    finally:
        d.stop()


def test_keeper_that_ended_holding_nothing_settles_open_leases(tmp_path) -> None:
    """Lock and unlock under a lease (never journaled one by one), then kill -9: the
    keeper ends (it holds nothing) and says so beside the journal, so the restarted
    daemon knows the owner held nothing - no lock comes back, nobody hears EIO."""
    path = str(tmp_path / "f")
    d = DaemonProc(str(tmp_path), "--journal-lease", "3600").start()
    try:
        r = lock_and_unlock(d, path, keep=False)
        h = r.file(path)
        assert r.expect(r.lk(wire.T_SETLK, h, F_WRLCK, 20, 29))[0] == 0  # under the lease
        assert r.expect(r.lk(wire.T_SETLK, h, F_UNLCK, 20, 29))[0] == 0
        pids = keeper_pids(str(tmp_path))
        d.kill9()
        r.close()
        assert wait_gone(pids, 10)
        assert os.path.exists(str(tmp_path / "journal.db-keeper-released"))
    finally:
        d.stop()
    d = DaemonProc(str(tmp_path), "--journal-lease", "3600").start()
    try:
        rec = d.events("recovered")[0]
        assert rec["keeper_survived"] and rec["uncertain"] == 0 and rec["lost"] == 0, rec
        assert not os.path.exists(str(tmp_path / "journal.db-keeper-released"))
        r = Raw(d.sock, "g1")
        h = r.file(path)
        assert r.expect(r.lk(wire.T_SETLK, h, F_WRLCK, 0, 29))[0] == 0  # no EIO
        assert host_can_lock(path, 30, 10) and not host_can_lock(path, 0, 10)
        r.close()
    finally:
        d.stop()


def test_messages_of_a_replaced_daemon_are_applied_first(tmp_path) -> None:
    """A daemon's last D (queued while the keeper was not running) still counts when a
    new daemon connects in the same instant: the keeper never keeps a description its
    daemon let go (that would be a lock nobody holds)."""
    import fcntl
    import struct

    from lockd.journal.keeper import ensure_keeper, keeper_address

    journal = str(tmp_path / "locks.db")
    path = str(tmp_path / "f")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.fcntl(fd, 37, struct.pack("hhqqi4x", fcntl.F_WRLCK, 0, 0, 10, 0))  # F_OFD_SETLK
    old = ensure_keeper(keeper_address(journal), journal)
    pid = keeper_pids(str(tmp_path))[0]
    new = None
    try:
        old.put("k1", fd)
        os.close(fd)
        taken = old.take_all()  # a round trip: the keeper holds k1
        assert list(taken) == ["k1"]
        os.close(taken["k1"])
        os.kill(pid, signal.SIGSTOP)
        try:
            assert procutil.wait_until(lambda: stopped(pid), 10)  # out of its select()
            old.drop("k1")      # queued while the keeper is stopped ...
            new = ensure_keeper(keeper_address(journal), journal)  # ... and so is this
        finally:
            os.kill(pid, signal.SIGCONT)
        assert keeper_pids(str(tmp_path)) == [pid]
        assert new.take_all() == {}
        assert host_can_lock(path, 0, 10)
    finally:
        old.close()
        if new is not None:
            new.quit()
            new.close()
        assert wait_gone([pid], 10)
