"""What `vfs-lockd serve` needs around it (issue 23, item 8): the socket's directory, made
when missing as systemd's RuntimeDirectory= would (or named when it cannot be), and
descriptors for the journal when connections fill the table (accept() leaves the last
lockd.daemon.server.FD_RESERVE of them alone).
"""

from __future__ import annotations

import os
import socket
import sqlite3
import stat

from daemonutil import F_UNLCK, F_WRLCK, DaemonProc, Raw, cli
from procutil import wait_until

from lockd.daemon import wire


def test_serve_creates_the_missing_socket_directory(tmp_path) -> None:
    """`--socket DIR/lockd.sock` with no DIR (as /run/vfs-lockd before systemd made it):
    DIR is made, root's and 0755 whatever the umask, and the daemon serves there."""
    sock = str(tmp_path / "run" / "lockd.sock")
    d = DaemonProc(str(tmp_path), socket_path=sock,
                   prefix=("sh", "-c", 'umask 077; exec "$@"', "sh")).start()
    try:
        st = os.stat(tmp_path / "run")
        assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o755, oct(st.st_mode)
        assert st.st_uid == 0
        r = Raw(sock, "g1")
        r.close()
    finally:
        assert d.stop() == 0


def test_serve_names_the_socket_directory_it_cannot_make(tmp_path) -> None:
    """Two levels missing (a mistyped path, likelier than a wanted tree): no directory is
    made, and the error names the socket and the directory, not just ENOENT."""
    sock = str(tmp_path / "no" / "such" / "lockd.sock")
    r = cli("serve", "--socket", sock, "--journal", str(tmp_path / "journal.db"))
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"cannot listen on {sock}" in r.stderr, r.stderr
    assert f"cannot create its directory {tmp_path / 'no' / 'such'}" in r.stderr, r.stderr
    assert not os.path.exists(tmp_path / "no")


def _journaled_locks(journal: str) -> list[tuple]:
    db = sqlite3.connect(f"file:{journal}?mode=ro", uri=True)
    try:
        return db.execute("SELECT guest, start, end, type FROM locks").fetchall()
    finally:
        db.close()


def test_checkpoint_succeeds_when_connections_fill_the_table(tmp_path) -> None:
    """Connections that never say HELLO fill the daemon's descriptor table (64): a lock
    change made then (on a description the daemon already has, so it needs no new
    descriptor itself) must still reach the journal's database: its checkpoint opens the
    next change log, which the connections must not have taken."""
    journal = str(tmp_path / "journal.db")
    d = DaemonProc(str(tmp_path), "--journal-lease", "0", "--max-unauthenticated", "1000",
                   "--hello-timeout", "3600",
                   prefix=("prlimit", "--nofile=64:64", "--")).start()
    silent: list[socket.socket] = []
    try:
        r = Raw(d.sock, "g1")
        h = r.file(str(tmp_path / "f"))
        assert r.expect(r.lk(wire.T_SETLK, h, F_WRLCK, 0, 9))[0] == 0
        assert r.expect(r.lk(wire.T_SETLK, h, F_UNLCK, 0, 9))[0] == 0  # kept for reuse
        assert wait_until(lambda: _journaled_locks(journal) == [], 10)
        for _ in range(100):  # more than the table holds; queued in the listen backlog
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(d.sock)
            silent.append(s)
        assert wait_until(lambda: d.events("accept_failed"), 10), d.log()
        assert r.expect(r.lk(wire.T_SETLK, h, F_WRLCK, 0, 9))[0] == 0
        assert wait_until(lambda: _journaled_locks(journal) or "checkpoint failed" in d.log(),
                          10)
        assert _journaled_locks(journal) == [("g1", 0, 9, F_WRLCK)], d.log()[-2000:]
        assert "checkpoint failed" not in d.log(), d.log()[-2000:]
        r.close()
    finally:
        for s in silent:
            s.close()
        assert d.stop() == 0
