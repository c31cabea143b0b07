"""Crash recovery of `vfs-lockd serve`: kill -9 of the daemon while guests hold locks and
wait, then a restart on the same journal. Real daemon, real LockClient guests in their own
processes, real host processes."""

from __future__ import annotations

import errno
import json
import os
import subprocess

import pytest
from daemonutil import Agent, DaemonProc, HostHolder, cli, host_can_lock
from procutil import wait_until

F_RDLCK, F_WRLCK, F_UNLCK = 0, 1, 2
QUEUED = -1


@pytest.fixture
def rig(tmp_path):
    """Daemons and agents started by a test; all stopped at the end, keeper included."""
    started: dict = {"daemons": [], "agents": []}

    def daemon(*extra: str) -> DaemonProc:
        d = DaemonProc(str(tmp_path), *extra).start()
        started["daemons"].append(d)
        return d

    def agent(sock: str, guest: str) -> Agent:
        a = Agent(sock, guest, "reconnect_timeout=30")
        started["agents"].append(a)
        return a

    try:
        yield daemon, agent
    finally:
        for a in started["agents"]:
            a.kill()
        for d in started["daemons"]:
            d.stop()
        # conftest's no_stray_keepers ends the descriptor keepers


def status(sock: str) -> dict:
    r = cli("status", "--socket", sock, "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_kill9_keeps_locks_and_waits(tmp_path, rig):
    daemon, agent = rig
    path = str(tmp_path / "data")
    open(path, "wb").close()
    d = daemon()
    a, b, c = (agent(d.sock, g) for g in ("ga", "gb", "gc"))
    for x in (a, b, c):
        x.do("file", path=path)
    assert a.do("setlk", type=F_WRLCK, start=0, end=9) == 0
    assert b.do("setlkw", type=F_WRLCK, start=0, end=9, tag=11) == QUEUED
    assert c.do("setlkw", type=F_WRLCK, start=5, end=5, tag=12) == QUEUED
    assert a.do("setlk", type=F_RDLCK, start=100, end=199) == 0
    d.kill9()
    # the daemon is dead; the keeper still holds every lock description
    assert not host_can_lock(path, 0, 10)
    assert not host_can_lock(path, 150, 1)
    d = daemon()
    rec = status(d.sock)["recovery"]
    assert rec["locks"] == 2 and rec["lost"] == 0 and rec["waits"] == 2
    assert rec["from_keeper"] == 1
    assert wait_until(lambda: all(x.do("reconnects") >= 1 for x in (a, b, c)), 10)
    assert not host_can_lock(path, 0, 10)
    snap = json.loads(cli("locks", "--socket", d.sock, "--json").stdout)
    assert [w["guest"] for w in snap["waiters"]] == ["gb", "gc"]  # FIFO order kept
    # the holder's guest releases: the waits are granted in their old order
    assert a.do("setlk", type=F_UNLCK, start=0, end=9) == 0
    assert b.event() == {"event": "wait", "tag": 11, "err": 0}
    assert not c.events
    assert b.do("setlk", type=F_UNLCK, start=0, end=9) == 0
    assert c.event() == {"event": "wait", "tag": 12, "err": 0}


def test_without_keeper_a_stolen_range_is_reported_lost(tmp_path, rig):
    daemon, agent = rig
    path = str(tmp_path / "data")
    open(path, "wb").close()
    d = daemon("--no-keeper")
    a = agent(d.sock, "ga")
    a.do("file", path=path)
    assert a.do("setlk", type=F_WRLCK, start=0, end=9) == 0
    assert a.do("setlk", type=F_WRLCK, start=20, end=29) == 0
    d.kill9()
    thief = HostHolder(path, 5, 1)  # the window: the host takes part of the range
    assert thief.locked
    d = daemon("--no-keeper")
    rec = status(d.sock)["recovery"]
    assert rec["lost"] == 1 and rec["locks"] == 1
    locks = cli("locks", "--socket", d.sock)
    assert "LOST" in locks.stdout.upper(), locks.stdout
    assert wait_until(lambda: a.do("reconnects") >= 1, 10)
    # the owner learns of it with EIO, once
    assert a.do("setlk", type=F_WRLCK, start=50, end=50) == errno.EIO
    assert a.do("setlk", type=F_WRLCK, start=50, end=50) == 0
    assert not host_can_lock(path, 20, 10)  # the other lock was re-taken
    thief.release()


def test_damaged_journal_refuses_to_start(tmp_path):
    journal = tmp_path / "journal.db"
    journal.write_bytes(b"definitely not a database" * 100)
    r = subprocess.run(
        [os.path.join(os.path.dirname(os.sys.executable), "vfs-lockd"), "serve", "--socket",
         str(tmp_path / "s"), "--journal", str(journal)],
        capture_output=True, text=True, timeout=30)
    assert r.returncode != 0
    assert str(journal) in r.stderr and "damaged" in r.stderr
    assert "journal repair" in r.stderr
