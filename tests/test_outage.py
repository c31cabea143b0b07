"""A central daemon away for longer than its clients' patience (kill -9; restarted once a
client has given up on it): every answer a guest got stays true, and files keep working
meanwhile.

What a guest's server may answer by itself is only what never reached the daemon (a
lock request sent during the outage: ENOLCK once its patience is over; it holds
nothing). A request the daemon may have seen (a wait queued before the kill) is
answered by the daemon only, after its restart. Opening, reading and writing files
never wait for the daemon: a file is registered with it at its first lock request.
"""

from __future__ import annotations

import errno
import json
import time
from pathlib import Path

import pytest
from daemonutil import DaemonProc, cli
from fuse_oracle import host_can_lock
from procutil import wait_until
from test_fuse_locks import Locker

pytestmark = [pytest.mark.fuse, pytest.mark.slow]

# The guest servers' patience (`mount --lockd-patience`; 10 s by default): the same
# outage, over in a fifth of the time.
PATIENCE_S = 2.0


def held(sock: str) -> set[tuple]:
    r = cli("locks", "--socket", sock, "--json")
    assert r.returncode == 0, r.stderr
    return {(lk["guest"], lk["start"], lk["end"], lk["type"]) for lk in json.loads(r.stdout)["locks"]}


def waiting(sock: str) -> set[str]:
    """The guests with a wait queued in the daemon."""
    r = cli("locks", "--socket", sock, "--json")
    assert r.returncode == 0, r.stderr
    return {w["guest"] for w in json.loads(r.stdout)["waiters"]}


def test_kill9_outage_answers_stay_true(mounts, tmp_path: Path) -> None:
    d = DaemonProc(str(tmp_path)).start()
    lockers: list[Locker] = []
    try:
        source, (ma, mb) = mounts(2, ["--lockd", d.sock, "--lockd-patience", str(PATIENCE_S)],
                                guests=["ga", "gb"])
        (source / "f").write_bytes(b"x" * 100)
        a = Locker(ma.path / "f")
        b_wait = Locker(mb.path / "f")
        b_late = Locker(mb.path / "f")
        lockers += [a, b_wait, b_late]
        assert a.do("fcntl w 0 10 nowait") == "ok"
        b_wait.send("fcntl w 0 10 wait")  # queued in the daemon before the kill
        assert wait_until(lambda: waiting(d.sock) == {"gb"}, 10, interval=0.1)
        assert b_wait.pending(0)
        assert held(d.sock) == {("ga", 0, 9, "WRITE")}
        d.kill9()
        t_kill = time.monotonic()
        # Files work without the daemon: create, write, read, close, in both guests.
        for m in (ma, mb):
            p = m.path / f"during-{m.guest}"
            p.write_bytes(b"written during the outage")
            assert p.read_bytes() == b"written during the outage"
        assert (ma.path / "f").read_bytes() == b"x" * 100
        # A lock asked for during the outage never reaches the daemon: after the
        # client's patience it answers ENOLCK, and nothing is held for it.
        b_late.send("fcntl w 20 10 nowait")
        assert b_late.read(timeout=PATIENCE_S + 20) == str(errno.ENOLCK)
        # That answer comes only once the client's patience is over: the outage has
        # lasted longer than that now (no need to wait on the clock for it).
        assert time.monotonic() - t_kill >= PATIENCE_S
        assert b_wait.pending(0.1)  # the queued wait was not answered by the client
        d.logf.close()
        d = DaemonProc(str(tmp_path)).start()
        # The wait survived (the restarted daemon has it queued): it is granted when the
        # holder lets go.
        assert wait_until(lambda: waiting(d.sock) == {"gb"}, 30, interval=0.1)
        assert b_wait.pending(0)
        assert a.do("fcntl u 0 10 nowait", timeout=30) == "ok"
        assert b_wait.read(timeout=30) == "ok"
        # What the daemon holds is exactly what guests were told they hold.
        assert wait_until(lambda: held(d.sock) == {("gb", 0, 9, "WRITE")}, 10), held(d.sock)
        assert host_can_lock(str(source / "f"), 20, 10)
        assert not host_can_lock(str(source / "f"), 0, 10)
        status = json.loads(cli("status", "--socket", d.sock, "--json").stdout)
        assert status["stats"]["lost"] == 0
    finally:
        for lk in lockers:
            lk.close()
        d.stop()
