"""Guest sessions and the first connection to `vfs-lockd serve`, under a damaged journal
and a crowded daemon. Real daemon, real mounts, real descriptor keeper.

* A lock recovered after a restart whose journal lost the guest's session (garbage in
  the journal's WAL, then kill -9) stays the guest's: its server resumes, and another
  guest is refused; never a silent release.
* Connections that never say HELLO are closed after --hello-timeout with one log line
  per interval, not one each.
* A `mount --lockd` started while the daemon's listen backlog is full waits for room
  (within its connect timeout) instead of exiting with EAGAIN.
"""

from __future__ import annotations

import errno
import glob
import json
import os
import signal
import socket
import sqlite3
import threading
from pathlib import Path

from conftest import Mount
from daemonutil import DaemonProc, cli
from fuse_oracle import host_can_lock
from procutil import wait_until
from test_fuse_locks import Locker

from lockd.journal.store import offline_snapshot

SILENT = 300
EAGAIN = str(errno.EAGAIN)


def status(sock: str) -> dict:
    r = cli("status", "--socket", sock, "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def held(sock: str) -> set[tuple]:
    r = cli("locks", "--socket", sock, "--json")
    assert r.returncode == 0, r.stderr
    return {(lk["guest"], lk["start"], lk["end"], lk["type"])
            for lk in json.loads(r.stdout)["locks"]}


def connected(sock: str) -> set[str]:
    return {g["guest"] for g in status(sock)["guests"] if g["connected"]}


def _checkpointed(journal: str) -> bool:
    """Every change is in SQLite (its WAL): no change log holds anything."""
    return all(os.path.getsize(p) == 0 for p in glob.glob(journal + "-log.*"))


def _ga_holds_centrally(fa: Path, fb: Path, sock: str,
                        lockers: list[Locker]) -> tuple[Locker, Locker]:
    """A process of ga write-locks [0, 10) of the file, gb's request recalls ga's
    delegation: the lock is the daemon's (and the keeper's)."""
    a, b = Locker(fa), Locker(fb)
    lockers += [a, b]
    assert a.do("fcntl w 0 10 nowait") == "ok"
    assert b.do("fcntl w 0 10 nowait", timeout=30) == EAGAIN
    assert held(sock) == {("ga", 0, 9, "WRITE")}
    return a, b


def _garbage_wal_then_restart(d: DaemonProc, tmp_path: Path, journal: str) -> DaemonProc:
    """Garbage over the WAL's header, kill -9 of the daemon, a new one started; both
    guests' servers connected to it again."""
    with open(journal + "-wal", "r+b") as w:
        w.write(os.urandom(64))
    d.kill9()
    d.logf.close()
    d = DaemonProc(str(tmp_path)).start()
    assert wait_until(lambda: connected(d.sock) == {"ga", "gb"}, 30), status(d.sock)
    return d


def test_lock_survives_a_wal_lost_with_its_session(mounts, tmp_path: Path) -> None:
    d = DaemonProc(str(tmp_path)).start()
    journal = os.path.join(str(tmp_path), "journal.db")
    lockers: list[Locker] = []
    try:
        source, (ma, mb) = mounts(2, ["--lockd", d.sock], guests=["ga", "gb"])
        (source / "f").write_bytes(b"x" * 100)
        a, b = _ga_holds_centrally(ma.path / "f", mb.path / "f", d.sock, lockers)
        assert wait_until(lambda: _checkpointed(journal), 10)
        assert os.path.getsize(journal + "-wal") > 0
        d = _garbage_wal_then_restart(d, tmp_path, journal)
        # ga's server resumed its session: the lock is still ga's, gb is refused
        assert b.do("fcntl w 0 10 nowait", timeout=30) == EAGAIN
        assert held(d.sock) == {("ga", 0, 9, "WRITE")}
        assert not host_can_lock(str(source / "f"), 0, 10)
        assert a.do("fcntl u 0 10 nowait", timeout=30) == "ok"
        assert b.do("fcntl w 0 10 nowait", timeout=30) == "ok"
    finally:
        for lk in lockers:
            lk.close()
        d.stop()


def _closed_by_peer(s: socket.socket) -> bool:
    try:
        while True:
            data = s.recv(4096)
            if not data:
                return True
    except BlockingIOError:
        return False
    except OSError:
        return True


def test_lock_of_a_refused_session_is_reported_lost(mounts, tmp_path: Path) -> None:
    """The journal's record of the guest's session is an older one (its newer record
    went with the WAL): the guest's server is refused and starts a new session, and the
    owner that held the lock learns EIO at its next request, the loss recorded."""
    d = DaemonProc(str(tmp_path)).start()
    journal = os.path.join(str(tmp_path), "journal.db")
    lockers: list[Locker] = []
    try:
        source, (ma, mb) = mounts(2, ["--lockd", d.sock], guests=["ga", "gb"])
        (source / "f").write_bytes(b"x" * 100)
        assert wait_until(lambda: _checkpointed(journal), 10)
        db = sqlite3.connect(journal)  # ga's first session into the database file itself
        try:
            assert db.execute("SELECT COUNT(*) FROM guests WHERE name = 'ga'").fetchone()[0]
            busy, frames, copied = db.execute("PRAGMA wal_checkpoint(FULL)").fetchone()
            assert busy == 0 and frames == copied
        finally:
            db.close()
        r = cli("evict", "--socket", d.sock, "--guest", "ga")
        assert r.returncode == 0, r.stderr
        # ga's server comes back under a new session (journaled in the WAL only)
        assert wait_until(lambda: "ga" in connected(d.sock), 30)
        a, b = _ga_holds_centrally(ma.path / "f", mb.path / "f", d.sock, lockers)
        assert wait_until(lambda: _checkpointed(journal), 10)
        d = _garbage_wal_then_restart(d, tmp_path, journal)
        # The lock went with the refused session, visibly: listed lost, journaled, counted
        lost = json.loads(cli("locks", "--socket", d.sock, "--json").stdout)["lost"]
        assert [(r["guest"], r["start"], r["end"], r["type"]) for r in lost] == [
            ("ga", 0, 9, "WRITE")]
        assert status(d.sock)["stats"]["lost_locks"] == 1
        assert wait_until(lambda: [(r["guest"], r["start"]) for r in
                                   offline_snapshot(journal)["lost"]] == [("ga", 0)], 10)
        # and its owner is told at its next request on the file, once
        assert a.do("fcntl w 20 5 nowait", timeout=30) == str(errno.EIO)
        assert a.do("fcntl w 20 5 nowait", timeout=30) == "ok"
        assert [e["locks_lost"] for e in d.events("session_lost")] == [1]
    finally:
        for lk in lockers:
            lk.close()
        d.stop()


def test_hello_timeouts_are_logged_once_per_interval(tmp_path) -> None:
    d = DaemonProc(str(tmp_path), "--hello-timeout", "0.2", "--max-unauthenticated",
                   "32").start()
    silent: list[socket.socket] = []
    try:
        for _ in range(SILENT):  # none says HELLO; the backlog holds those not accepted
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(d.sock)
            s.setblocking(False)
            silent.append(s)
        open_ = list(silent)

        def all_closed() -> bool:
            open_[:] = [s for s in open_ if not _closed_by_peer(s)]
            return not open_

        assert wait_until(all_closed, 60), f"{len(open_)} silent connections still open"
        status = json.loads(cli("status", "--socket", d.sock, "--json").stdout)
        assert status["daemon"]["connections_dropped"] >= SILENT
        lines = [ln for ln in d.log().splitlines() if "HELLO" in ln or "hello_timeout" in ln]
        # One line per LOG_EVERY (10 s) interval: a handful however slow the machine,
        # never one per connection.
        assert 1 <= len(lines) <= SILENT // 20, lines[:5]
    finally:
        for s in silent:
            s.close()
        assert d.stop() == 0


def test_mount_waits_out_a_full_listen_backlog(fuse_ok, tmp_path) -> None:
    d = DaemonProc(str(tmp_path)).start()
    source = tmp_path / "src"
    source.mkdir()
    (tmp_path / "mnt").mkdir()
    filler: list[socket.socket] = []
    started: list = []
    stopped = False
    try:
        os.kill(d.proc.pid, signal.SIGSTOP)  # accepts nothing: the backlog fills
        stopped = True
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.setblocking(False)
            try:
                s.connect(d.sock)
            except BlockingIOError as exc:
                assert exc.errno == errno.EAGAIN
                s.close()
                break
            filler.append(s)
            assert len(filler) < 100_000
        log = tmp_path / "mount.log"

        def mount() -> None:
            try:
                started.append(Mount(source, tmp_path / "mnt", "gq", ["--lockd", d.sock], log))
            except RuntimeError as exc:  # it exited instead of waiting
                started.append(exc)

        t = threading.Thread(target=mount)
        t.start()
        # The mount has met the full backlog (it says so) or has given up.
        assert wait_until(lambda: started or (log.exists() and "backlog full" in
                                              log.read_text(errors="replace")), 30)
        os.kill(d.proc.pid, signal.SIGCONT)
        stopped = False
        for s in filler:  # room again: the daemon drops these at once (closed, silent)
            s.close()
        filler.clear()
        t.join(60)
        assert started and isinstance(started[0], Mount), started
        m = started[0]
        (source / "f").write_bytes(b"x")
        assert (m.path / "f").read_bytes() == b"x"
    finally:
        if stopped:
            os.kill(d.proc.pid, signal.SIGCONT)
        for s in filler:
            s.close()
        for m in started:
            if isinstance(m, Mount):
                m.stop()
        assert d.stop() == 0
