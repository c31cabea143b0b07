"""Faults (issue part 8) with a real daemon, real SQLite and real file systems:

* the journal's disk fills up (a small tmpfs) or turns read-only: lock requests answer
  ENOLCK, a failed group commit takes its grants back (no host lock is left that the
  journal does not hold; waiters hear ENOLCK), and locking resumes once the disk is
  writable again, with the journal equal to what is held (also across a kill -9);
* the daemon is stopped (SIGSTOP) and continued: requests stall, then complete correctly;
* no wall clock measures a duration or a timeout (an AST scan of lockd/ and fuse_server/).

A guest server that stops reading its replies is dropped without blocking the daemon:
tests/test_daemon.py::test_stuck_client_is_dropped_not_blocking.
"""

from __future__ import annotations

import ast
import contextlib
import errno
import fcntl
import json
import os
import select
import signal
import subprocess
from pathlib import Path

import pytest
from daemonutil import F_RDLCK, F_UNLCK, F_WRLCK, Agent, DaemonProc, Raw, admin
from fuse_oracle import F_OFD_GETLK, flock, host_can_lock, unflock
from procutil import unread_from, wait_until

from lockd.api import OFFSET_MAX
from lockd.daemon import wire
from lockd.journal.store import offline_snapshot

REPO = Path(__file__).resolve().parent.parent
QUEUED = -1


# ------------------------------------------------------------------ helpers
def held(d: DaemonProc) -> set[tuple]:
    """The daemon's lock table: {(guest, kind, owner, start, end, type)}."""
    return {(lk["guest"], lk["kind"], lk["owner"], lk["start"], lk["end"], lk["type"])
            for lk in admin(d, wire.T_LIST)["locks"]}


def journaled(journal: str) -> set[tuple]:
    """What the journal holds (its database and change logs), in the same form."""
    return {(lk["guest"], lk["kind"], lk["owner"], lk["start"], lk["end"], lk["type"])
            for lk in offline_snapshot(journal)["locks"]}


def host_held(path: str, start: int, end: int) -> bool:
    """Does anyone hold a lock on [start, end] on the host (F_OFD_GETLK, in-process)?"""
    fd = os.open(path, os.O_RDWR)
    try:
        res = fcntl.fcntl(fd, F_OFD_GETLK, flock(F_WRLCK, start, end - start + 1))
        return unflock(res)[0] != F_UNLCK
    finally:
        os.close(fd)


def fill(d: Path) -> int:
    """Fill the file system at d up to ENOSPC; bytes written."""
    n = 0
    with open(d / "filler", "wb", buffering=0) as f:
        chunk = b"\xa5" * 65536
        with contextlib.suppress(OSError):
            while True:
                n += f.write(chunk)
        with contextlib.suppress(OSError):  # the last partial page
            while True:
                n += f.write(b"\xa5" * 512)
    return n


def statuses(r: Raw, frames: list[bytes]) -> dict[int, int]:
    """Send frames in one write (one daemon batch, as far as the socket allows) and
    collect {id: status}."""
    ids = [wire.PEEK.unpack_from(f)[2] for f in frames]
    r.send(b"".join(frames))
    return {rid: r.expect(rid, timeout=10)[0] for rid in ids}


@pytest.fixture
def small_fs(tmp_path: Path):
    """A 3 MiB tmpfs for the journal (root only); always unmounted."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    d = tmp_path / "jfs"
    d.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m,mode=0700", "tmpfs", str(d)],
                   check=True)
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", str(d)], check=False)


def start_daemon(tmp_path: Path, journal: Path, *extra: str) -> DaemonProc:
    # The log stays in tmp_path (not on the small file system); the last --journal wins.
    return DaemonProc(str(tmp_path), "--journal", str(journal), *extra).start()


# ------------------------------------------------------------------ disk full
def test_journal_disk_full_rolls_back_and_recovers(tmp_path, small_fs):
    """Every change journaled before its reply (--journal-lease 0): a failed write takes
    back exactly the grants it carried. (Under a lease a grant is answered before its
    write and stays: tests/test_journal.py::test_failed_write_keeps_leased_grants...)"""
    journal = small_fs / "journal.db"
    path = str(tmp_path / "f")
    d = start_daemon(tmp_path, journal, "--journal-lease", "0")
    rid = iter(range(10_000, 1 << 40))
    try:
        a, b = Raw(d.sock, "g-a"), Raw(d.sock, "g-b")
        ha, hb = a.file(path), b.file(path)
        assert a.expect(a.lk(wire.T_SETLK, ha, F_WRLCK, 0, 9, owner=1))[0] == 0
        assert a.expect(a.lk(wire.T_SETLK, ha, F_RDLCK, 20, 29, owner=1))[0] == 0
        assert b.expect(b.lk(wire.T_SETLKW, hb, F_WRLCK, 0, 9, owner=2, rid=500))[0] == wire.STATUS_QUEUED
        assert held(d) <= journaled(str(journal))
        fill(small_fs)
        # Batches of new grants until the journal's commit fails (the WAL may still have
        # room for a few). Each batch: fresh write locks, an upgrade of [20, 29], a lock
        # merging with [0, 9], and a flock.
        granted: list[tuple] = []
        refused: list[tuple] = []
        for k in range(200):
            base = 1000 + 100 * k
            reqs = [(next(rid), F_WRLCK, base + 2 * i, base + 2 * i, 3, 0) for i in range(30)]
            reqs += [(next(rid), F_WRLCK, 20, 29, 1, 0), (next(rid), F_WRLCK, 10, 12, 1, 0),
                     (next(rid), F_WRLCK, 0, OFFSET_MAX, 0, wire.FUSE_LK_FLOCK)]
            got = statuses(a, [wire.lk(wire.T_SETLK, r, ha, 40 + k, o, t, s, e, 1, fl)
                               for r, t, s, e, o, fl in reqs])
            jl = journaled(str(journal))
            for r, _t, s, e, o, fl in reqs:
                assert got[r] in (0, -errno.ENOLCK), got[r]
                (granted if got[r] == 0 else refused).append((s, e, o, fl, k))
                if o == 3:  # a grant is held and journaled; a refusal left nothing
                    assert host_held(path, s, e) == (got[r] == 0), (k, s, got[r])
                    assert (("g-a", "posix", 3, s, e, "WRITE") in jl) == (got[r] == 0)
            if any(got[r] == -errno.ENOLCK for r, *_ in reqs[:30]):
                break
            # undo what the batch got, so that the next one tries the same again
            a.expect(a.lk(wire.T_SETLK, ha, F_UNLCK, 1000, OFFSET_MAX, owner=3))
            a.expect(a.lk(wire.T_SETLK, ha, F_RDLCK, 20, 29, owner=1))
            a.expect(a.lk(wire.T_SETLK, ha, F_UNLCK, 10, 19, owner=1))
            a.send(wire.release_flock(next(rid), 40 + k))
        else:
            pytest.fail("the journal never failed on a full disk")
        st = admin(d, wire.T_STATUS)["stats"]
        assert st["journal_error"] and st["journal_failures"] >= 1
        # nothing is held that the journal does not hold
        now = held(d)
        assert now <= journaled(str(journal)), now - journaled(str(journal))
        # a refused request left nothing on the host: the last batch's new ranges are
        # free, [20, 29] is still a read lock (the upgrade was undone), [10, 12] is free
        last = [x for x in refused if x[4] == k]
        assert last and all(host_can_lock(path, s, e - s + 1) for s, e, o, fl, _ in last
                            if o == 3)
        assert ("g-a", "posix", 1, 20, 29, "READ") in now
        assert host_can_lock(path, 10, 3) and not host_can_lock(path, 0, 10)
        assert not any(lk[1] == "flock" for lk in now) and host_can_lock(path, mode="flock")
        # while the disk is full: new locks ENOLCK, unlocks work, and the waiter whose
        # turn comes hears ENOLCK instead of a grant nobody could journal
        assert a.expect(a.lk(wire.T_SETLK, ha, F_WRLCK, 500, 500, owner=4))[0] == -errno.ENOLCK
        assert a.expect(a.lk(wire.T_SETLK, ha, F_UNLCK, 0, 9, owner=1))[0] == 0
        assert b.expect(500)[0] == -errno.ENOLCK
        assert host_can_lock(path, 0, 10) and host_can_lock(path, 500, 1)
        assert held(d) <= journaled(str(journal))
        # space again: locking resumes, and the journal equals the lock table
        os.unlink(small_fs / "filler")
        assert wait_until(lambda: a.expect(a.lk(wire.T_SETLK, ha, F_WRLCK, 600, 609,
                                                owner=5))[0] == 0, 10, interval=0.05), \
            "locking did not resume"
        assert b.expect(b.lk(wire.T_SETLK, hb, F_WRLCK, 700, 709, owner=2))[0] == 0
        before = held(d)
        assert before == journaled(str(journal))
        assert admin(d, wire.T_STATUS)["stats"]["journal_error"] is None
        # and a kill -9 loses nothing of it
        d.kill9()
        d.logf.close()
        d = start_daemon(tmp_path, journal, "--journal-lease", "0")
        assert held(d) == before
        assert admin(d, wire.T_STATUS)["stats"]["lost"] == 0
        assert not host_can_lock(path, 600, 10) and not host_can_lock(path, 700, 10)
    finally:
        d.stop()


def test_embedded_journal_disk_full(mounts, tmp_path, small_fs):
    """The same through a real mount with an embedded manager (`mount --journal`, whose
    changes under a lease are written behind the replies): once a write has failed, a
    process's fcntl gets ENOLCK and holds nothing on the host; its granted locks stay
    journaled; once there is space again it locks."""
    from test_fuse_locks import Locker

    journal = small_fs / "journal.db"
    source, (m,) = mounts(1, ["--journal", str(journal)])
    lk = Locker(m.path / "f")
    try:
        assert lk.do("fcntl w 0 10 nowait") == "ok"
        fill(small_fs)
        results: list[str] = []

        def failed() -> bool:  # until a write (or the lease's) fails
            results.append(lk.do(f"fcntl w {100 + 2 * len(results)} 1 nowait"))
            return results[-1] != "ok"

        assert wait_until(failed, 30, interval=0), results[-5:]
        assert results[-1] == str(errno.ENOLCK), results
        src = str(source / "f")
        assert host_can_lock(src, 100 + 2 * (len(results) - 1), 1)  # nothing left behind
        assert not host_can_lock(src, 0, 10)
        rows = {(lk["start"], lk["end"]) for lk in offline_snapshot(str(journal))["locks"]}
        assert (0, 9) in rows  # what was granted before is journaled
        os.unlink(small_fs / "filler")
        assert wait_until(lambda: lk.do("fcntl w 5000 10 nowait") == "ok", 10, interval=0.05), \
            "locking did not resume"
        assert not host_can_lock(src, 5000, 10)
        assert m.proc.poll() is None
    finally:
        lk.close()


# ------------------------------------------------------------------ SIGSTOP / SIGCONT
def _send(agent: Agent, op: str, **kw: object) -> None:
    agent.p.stdin.write(json.dumps({"op": op, **kw}) + "\n")
    agent.p.stdin.flush()


def _answered(agent: Agent) -> bool:
    return "\n" in agent.buf or bool(select.select([agent.p.stdout], [], [], 0)[0])


def _result(agent: Agent, timeout: float = 10) -> object:
    while True:
        msg = agent._line(timeout)
        if "event" in msg:
            agent.events.append(msg)
        else:
            return msg["result"]


def test_daemon_sigstop_sigcont_stalls_then_completes(tmp_path):
    d = DaemonProc(str(tmp_path)).start()
    path = str(tmp_path / "f")
    agents: list[Agent] = []
    try:
        a, b, c = (Agent(d.sock, g, "reconnect_timeout=30") for g in ("g-a", "g-b", "g-c"))
        agents += [a, b, c]
        for x in agents:
            assert x.do("file", path=path) == 0
        assert a.do("setlk", type=F_WRLCK, start=0, end=9) == 0
        assert b.do("setlkw", type=F_WRLCK, start=0, end=9, tag=1, pid=222) == QUEUED
        os.kill(d.proc.pid, signal.SIGSTOP)
        try:
            _send(a, "setlk", type=F_UNLCK, start=0, end=9)
            _send(c, "setlk", type=F_WRLCK, start=50, end=59, pid=333)
            # Both requests wait in the stopped daemon's sockets, unread: nothing is
            # answered while it is stopped (no client answers in its place), and
            # nothing changed.
            assert wait_until(lambda: unread_from(d.proc.pid, a.p.pid)
                              and unread_from(d.proc.pid, c.p.pid), 10)
            assert not _answered(a) and not _answered(c) and not b.events
            assert not host_can_lock(path, 0, 10) and host_can_lock(path, 50, 10)
        finally:
            os.kill(d.proc.pid, signal.SIGCONT)
        assert _result(a) == 0 and _result(c) == 0
        assert b.event() == {"event": "wait", "tag": 1, "err": 0}
        assert held(d) == {("g-b", "posix", 1, 0, 9, "WRITE"), ("g-c", "posix", 1, 50, 59,
                                                                  "WRITE")}
        assert not host_can_lock(path, 0, 10) and not host_can_lock(path, 50, 10)
        st = admin(d, wire.T_STATUS)
        assert st["stats"]["lost"] == 0 and len(st["guests"]) == 3
        assert all(g["connected"] for g in st["guests"])
        assert b.do("reconnects") == 0  # nobody lost its connection
    finally:
        for x in agents:
            x.kill()
        d.stop()


def test_daemon_sigstop_through_a_mount(mounts, tmp_path):
    """A process in a guest mount (central mode) blocks in fcntl while the daemon is
    stopped and gets its lock when it continues."""
    from test_fuse_locks import Locker

    d = DaemonProc(str(tmp_path)).start()
    lk = other = None
    try:
        source, (m, m2) = mounts(2, ["--lockd", d.sock])
        # Two guests use the file, so its locks are decided by the daemon (a file only
        # one guest uses is delegated to that guest's server: test_delegation.py).
        other = Locker(m2.path / "f")
        assert other.do("fcntl w 200 10 nowait") == "ok"
        lk = Locker(m.path / "f")
        assert lk.do("fcntl w 0 10 nowait") == "ok"
        os.kill(d.proc.pid, signal.SIGSTOP)
        try:
            lk.send("fcntl w 100 10 nowait")
            # the guest's request waits in the stopped daemon's socket, unanswered
            assert wait_until(lambda: unread_from(d.proc.pid, m.proc.pid), 10)
            assert lk.pending(0.1)
        finally:
            os.kill(d.proc.pid, signal.SIGCONT)
        assert lk.read(15) == "ok"
        assert not host_can_lock(str(source / "f"), 100, 10)
        assert not host_can_lock(str(source / "f"), 0, 10)
        assert m.proc.poll() is None
    finally:
        for x in (lk, other):
            if x is not None:
                x.close()
        d.stop()


# ------------------------------------------------------------------ clocks
# Wall-clock reads that are fine: timestamps shown to people or stored as dates.
_WALL_CLOCK_OK = {
    "lockd/daemon/logs.py": {"log"},  # log line "ts"
    "lockd/daemon/server.py": {"__init__"},  # Daemon "started"
    "lockd/daemon/sessions.py": {"__init__"},  # GuestSession "created"
    "lockd/daemon/conn.py": {"__init__"},  # Conn "since"
    "lockd/engine/manager.py": {"_revoked"},  # a lost lock's "at" date
    "lockd/engine/recovery.py": {"_lost"},  # a lost lock's "at" date
    "lockd/journal/schema.py": {"create_schema"},  # the journal's "created" date
    "lockd/journal/records.py": {"_enc_guest"},  # a guest session's "seen" date
    "lockd/journal/cli.py": {"repair_cmd", "_salvage_rows"},  # file-name suffixes, dates
}


def _wall_clock_uses(path: Path) -> list[tuple[str, int, str, bool]]:
    """(function, line, call, used in arithmetic or a comparison) for every wall-clock
    read (time.time, time.time_ns, datetime.now/utcnow, CLOCK_REALTIME)."""
    tree = ast.parse(path.read_text(), str(path))
    parents: dict[ast.AST, ast.AST] = {}
    for node in ast.walk(tree):
        for child in ast.iter_child_nodes(node):
            parents[child] = node
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = ast.unparse(node.func)
        wall = name in ("time.time", "time.time_ns", "datetime.now", "datetime.utcnow",
                        "datetime.datetime.now") or (
            name in ("time.clock_gettime", "time.clock_gettime_ns")
            and "CLOCK_REALTIME" in ast.unparse(node))
        if not wall:
            continue
        # arithmetic: the value (maybe through int()/round()) is an operand of +, -, <...
        p = parents.get(node)
        while isinstance(p, ast.Call):
            p = parents.get(p)
        arith = isinstance(p, (ast.BinOp, ast.Compare, ast.AugAssign))
        func = "<module>"
        while p is not None:
            if isinstance(p, (ast.FunctionDef, ast.AsyncFunctionDef)):
                func = p.name
                break
            p = parents.get(p)
        out.append((func, node.lineno, name, arith))
    return out


def test_no_wall_clock_for_durations_or_timeouts():
    """Durations, deadlines and wait timeouts use the monotonic clock, so a jump of the
    wall clock (NTP, `date -s`) cannot expire or extend a wait, a grace period or a
    reconnect deadline. Wall-clock reads appear only as displayed/stored dates."""
    files = sorted((REPO / "lockd").rglob("*.py")) + sorted((REPO / "fuse_server").rglob("*.py"))
    assert len(files) > 20
    bad = []
    for f in files:
        rel = str(f.relative_to(REPO))
        for func, line, name, arith in _wall_clock_uses(f):
            if arith or func not in _WALL_CLOCK_OK.get(rel, set()):
                bad.append(f"{rel}:{line} {name}() in {func}{' (arithmetic)' if arith else ''}")
    assert not bad, "wall clock used where a monotonic one belongs:\n" + "\n".join(bad)


def test_wall_clock_scan_catches_a_timeout(tmp_path):
    """The scan itself: a deadline computed from time.time() is reported."""
    f = tmp_path / "x.py"
    f.write_text("import time\ndef wait(t):\n    deadline = time.time() + t\n"
                 "    return deadline\ndef stamp():\n    return {'at': time.time()}\n")
    uses = _wall_clock_uses(f)
    assert ("wait", 3, "time.time", True) in uses
    assert ("stamp", 6, "time.time", False) in uses
