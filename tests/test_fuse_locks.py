"""Locks through real FUSE mounts: two guests (two `vfs-lockd mount` processes on one
source) and the host, POSIX (fcntl, lockf) and flock, blocking waits, signals, close
semantics, a killed server, and SQLite writers everywhere."""

from __future__ import annotations

import errno
import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from fcntl import F_WRLCK
from pathlib import Path

import pytest
from conftest import REPO, VFS_LOCKD, Mount
from procutil import threads_in_setlkw, until_threads_in_flock, until_threads_in_setlkw, wait_until

pytestmark = pytest.mark.fuse

# A lock-taking process driven line by line on stdin; each command answers one line:
# "ok" or the errno number. F_SETLKW goes through ctypes so that a signal shows up as
# EINTR instead of being retried by Python (PEP 475).
LOCKER = textwrap.dedent(
    r"""
    import ctypes, fcntl, os, signal, sys
    libc = ctypes.CDLL(None, use_errno=True)
    class Flock(ctypes.Structure):
        _fields_ = [("l_type", ctypes.c_short), ("l_whence", ctypes.c_short),
                    ("l_start", ctypes.c_int64), ("l_len", ctypes.c_int64),
                    ("l_pid", ctypes.c_int)]
    signal.signal(signal.SIGUSR1, lambda *a: None)  # no SA_RESTART: EINTR comes back
    fds = [os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o666)]
    T = {"r": fcntl.F_RDLCK, "w": fcntl.F_WRLCK, "u": fcntl.F_UNLCK}
    print("ready", flush=True)
    for line in sys.stdin:
        cmd, *a = line.split()
        try:
            if cmd == "fcntl":  # fcntl TYPE START LEN wait|nowait
                fl = Flock(T[a[0]], 0, int(a[1]), int(a[2]), 0)
                op = fcntl.F_SETLKW if a[3] == "wait" else fcntl.F_SETLK
                if libc.fcntl(fds[0], op, ctypes.byref(fl)) < 0:
                    raise OSError(ctypes.get_errno(), "fcntl")
            elif cmd == "getlk":  # getlk TYPE -> "TYPE PID"
                fl = Flock(T[a[0]], 0, 0, 0, 0)
                if libc.fcntl(fds[0], fcntl.F_GETLK, ctypes.byref(fl)) < 0:
                    raise OSError(ctypes.get_errno(), "getlk")
                print(f"{fl.l_type} {fl.l_pid}", flush=True)
                continue
            elif cmd == "lockf":  # lockf ex|un nowait|wait
                fcntl.lockf(fds[0], fcntl.LOCK_UN if a[0] == "un" else fcntl.LOCK_EX
                            | (fcntl.LOCK_NB if a[1] == "nowait" else 0))
            elif cmd == "flock":  # flock sh|ex|un nowait|wait
                fcntl.flock(fds[0], {"sh": fcntl.LOCK_SH, "ex": fcntl.LOCK_EX,
                                      "un": fcntl.LOCK_UN}[a[0]]
                            | (fcntl.LOCK_NB if a[1] == "nowait" else 0))
            elif cmd == "open2":
                fds.append(os.open(sys.argv[1], os.O_RDONLY))
            elif cmd == "close2":
                os.close(fds.pop())
            elif cmd == "exit":
                break
            print("ok", flush=True)
        except OSError as e:
            print(e.errno, flush=True)
    """
)


class Locker:
    def __init__(self, path: Path) -> None:
        self.p = subprocess.Popen(
            [sys.executable, "-c", LOCKER, str(path)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        assert self.read(10) == "ready"

    def read(self, timeout: float = 5.0) -> str:
        import select

        r, _, _ = select.select([self.p.stdout], [], [], timeout)
        if not r:
            raise TimeoutError("locker did not answer")
        return self.p.stdout.readline().strip()

    def send(self, line: str) -> None:
        self.p.stdin.write(line + "\n")
        self.p.stdin.flush()

    def do(self, line: str, timeout: float = 5.0) -> str:
        self.send(line)
        return self.read(timeout)

    def pending(self, wait: float = 0.3) -> bool:
        """True when the last command has not answered after `wait` seconds (0: now; after
        a barrier that shows the request waiting, e.g. a thread in F_OFD_SETLKW)."""
        import select

        return not select.select([self.p.stdout], [], [], wait)[0]

    def kill(self) -> None:
        if self.p.poll() is None:
            self.p.kill()

    def close(self, timeout: float = 5.0) -> None:
        """Killed and reaped. A locker killed inside a FUSE request that its server has
        already taken waits for the answer: stop (or abort) that server first."""
        self.kill()
        self.p.wait(timeout)


EAGAIN = str(errno.EAGAIN)
EWOULD = str(errno.EWOULDBLOCK)


def test_posix_conflicts_every_direction(mounts, lockers) -> None:
    src, (m1, m2) = mounts(2)
    (src / "f").write_bytes(b"x" * 100)
    places = {"host": src / "f", "g1": m1.path / "f", "g2": m2.path / "f"}
    for holder, hpath in places.items():
        h = lockers(hpath)
        assert h.do("fcntl w 0 10 nowait") == "ok"
        for other, opath in places.items():
            o = lockers(opath)  # another process, also for other == holder (same guest)
            assert o.do("fcntl w 5 1 nowait") == EAGAIN, (holder, other)
            assert o.do("fcntl r 0 1 nowait") == EAGAIN, (holder, other)
            assert o.do("fcntl w 10 5 nowait") == "ok", (holder, other)  # no overlap
            assert o.do("fcntl u 0 0 nowait") == "ok"
            if other != "host":  # the host would see our OFD lock's pid -1
                kind, pid = map(int, o.do("getlk w").split())
                assert kind == F_WRLCK, (holder, other)
                # Embedded managers see another guest's lock only as a host OFD lock,
                # which has no pid; the host's own and same-guest holders are exact.
                assert pid == (0 if holder not in ("host", other) else h.p.pid), (holder, other)
            o.close()
        assert h.do("fcntl u 0 0 nowait") == "ok"
        h.close()


def test_lockf_and_flock_every_direction(mounts, lockers) -> None:
    src, (m1, m2) = mounts(2)
    (src / "f").write_bytes(b"")
    places = [src / "f", m1.path / "f", m2.path / "f"]
    for hp in places:
        h = lockers(hp)
        assert h.do("lockf ex nowait") == "ok"
        assert h.do("flock ex nowait") == "ok"
        for op in places:
            o = lockers(op)
            assert o.do("lockf ex nowait") in (EAGAIN, str(errno.EACCES)), (hp, op)
            assert o.do("flock sh nowait") == EWOULD, (hp, op)
            o.close()
        assert h.do("flock un nowait") == "ok"
        assert h.do("lockf un nowait") == "ok"
        # Shared flocks coexist across guests and host.
        assert h.do("flock sh nowait") == "ok"
        for op in places:
            o = lockers(op)
            assert o.do("flock sh nowait") == "ok"
            o.close()
        h.close()


def test_blocking_lock_granted_on_release(mounts, lockers) -> None:
    src, (m1, m2) = mounts(2)
    (src / "f").write_bytes(b"")
    a, b = lockers(m1.path / "f"), lockers(m2.path / "f")
    assert a.do("fcntl w 0 0 nowait") == "ok"
    b.send("fcntl w 0 0 wait")
    # m2's manager waits on m1's host lock in the kernel (F_OFD_SETLKW on the waiter's
    # own description): the release itself wakes it, no polling.
    until_threads_in_setlkw(m2.proc.pid, 1)
    assert b.pending(0)
    assert a.do("fcntl u 0 0 nowait") == "ok"
    assert b.read(10) == "ok"
    assert threads_in_setlkw(m2.proc.pid) == 0
    # and blocking flock across guests
    assert b.do("flock ex nowait") == "ok"
    a.send("flock ex wait")
    until_threads_in_flock(m1.proc.pid, 1)  # m1's manager waits in flock(2) on the host
    assert a.pending(0)
    assert b.do("flock un nowait") == "ok"
    assert a.read(5) == "ok"


def test_signal_interrupts_blocked_setlkw(mounts, lockers) -> None:
    src, (m1, m2) = mounts(2)
    (src / "f").write_bytes(b"")
    holder, waiter = lockers(m1.path / "f"), lockers(m2.path / "f")
    assert holder.do("fcntl w 0 0 nowait") == "ok"
    waiter.send("fcntl w 0 0 wait")
    until_threads_in_setlkw(m2.proc.pid, 1)  # m2 waits on m1's host lock in the kernel
    assert waiter.pending(0)
    waiter.p.send_signal(signal.SIGUSR1)
    assert waiter.read(5) == str(errno.EINTR)
    # No waiter is left behind: m2's wait in the kernel ends with the interrupt, so once
    # the holder lets go, the host gets the lock at once.
    until_threads_in_setlkw(m2.proc.pid, 0)
    assert holder.do("fcntl u 0 0 nowait") == "ok"
    host = lockers(src / "f")
    assert host.do("fcntl w 0 0 nowait") == "ok"
    assert waiter.do("fcntl w 0 0 nowait") == EAGAIN  # the interrupted guest does not hold it


def test_close_any_fd_drops_posix_locks(mounts, lockers) -> None:
    src, (m1,) = mounts(1)
    (src / "f").write_bytes(b"")
    a = lockers(m1.path / "f")
    host = lockers(src / "f")
    assert a.do("open2") == "ok"
    assert a.do("fcntl w 0 0 nowait") == "ok"
    assert host.do("fcntl w 0 0 nowait") == EAGAIN
    assert a.do("close2") == "ok"  # a different fd of the same process
    assert host.do("fcntl w 0 0 nowait") == "ok"


def test_killed_server_releases_locks(mounts, lockers, tmp_path) -> None:
    src, (m1,) = mounts(1)
    (src / "f").write_bytes(b"")
    a = lockers(m1.path / "f")
    assert a.do("fcntl w 0 0 nowait") == "ok"
    assert a.do("flock ex nowait") == "ok"
    host = lockers(src / "f")
    assert host.do("fcntl w 0 0 nowait") == EAGAIN
    m1.proc.kill()  # kill -9: no cleanup of its own
    # the kernel closes its descriptions as it exits
    assert wait_until(lambda: host.do("fcntl w 0 0 nowait") == "ok", 10), \
        "locks of a killed server still held"
    assert host.do("flock ex nowait") == "ok"
    a.close()
    # The dead server left a stale mount: the next mount there detects and replaces it.
    with pytest.raises(OSError) as exc:
        os.stat(m1.path / "f")
    assert exc.value.errno == errno.ENOTCONN
    m = Mount(src, m1.path, "guest0b", [], tmp_path / "again.log")
    try:
        assert (m.path / "f").exists()
        assert "stale FUSE mount" in m.output()
    finally:
        assert m.stop() == 0


def test_sigterm_unmounts_cleanly(mounts) -> None:
    src, (m1,) = mounts(1)
    (m1.path / "x").write_text("y")
    assert m1.stop() == 0
    assert not os.path.ismount(m1.path)
    assert (src / "x").read_text() == "y"


SQLITE_WRITER = textwrap.dedent(
    """
    import sqlite3, sys
    db, who, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    try:
        con = sqlite3.connect(db, timeout=60, isolation_level=None)
        con.execute("PRAGMA journal_mode=DELETE")
        for i in range(n):
            con.execute("BEGIN IMMEDIATE")
            con.execute("INSERT INTO t(who, i) VALUES (?, ?)", (who, i))
            con.execute("INSERT INTO t(who, i) VALUES (?, ?)", (who, -i))
            con.execute("UPDATE c SET n = n + 1")  # a read-modify-write: stale pages lose it
            con.execute("COMMIT")
        con.close()
    except sqlite3.Error as exc:  # which writer, and SQLite's extended code (which call)
        sys.exit(f"{who}: {exc} ({getattr(exc, 'sqlite_errorname', '?')})")
    """
)


def sqlite_across(src: Path, places: list[Path], per_place: int, n: int,
                  timeout: float) -> None:
    """`per_place` processes in each place (the host's source and mounts of it) each add
    `n` pairs of rows and `n` increments to one SQLite database in rollback-journal mode:
    no update may be lost, the database stays whole, no journal is left."""
    con = sqlite3.connect(src / "t.db")
    con.execute("PRAGMA journal_mode=DELETE")
    con.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, who TEXT, i INTEGER)")
    con.execute("CREATE TABLE c(n INTEGER)")
    con.execute("INSERT INTO c VALUES (0)")
    con.commit()
    con.close()
    writers = [subprocess.Popen([sys.executable, "-c", SQLITE_WRITER, str(place / "t.db"),
                                 f"{place.name}{k}", str(n)], stderr=subprocess.PIPE, text=True)
               for place in places for k in range(per_place)]
    try:
        for w in writers:
            _, err = w.communicate(timeout=timeout)
            assert w.returncode == 0, err
    finally:
        for w in writers:
            if w.poll() is None:
                w.kill()
                w.wait()
    for place in places:
        con = sqlite3.connect(place / "t.db")
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert con.execute("SELECT count(*) FROM t").fetchone()[0] == len(writers) * n * 2
        assert con.execute("SELECT n FROM c").fetchone()[0] == len(writers) * n
        con.close()
    assert not (src / "t.db-journal").exists()


@pytest.mark.parametrize("cache", ["auto", "none"])
def test_sqlite_two_guests_and_host(mounts, cache: str) -> None:
    src, (m1, m2) = mounts(2, ["--cache", cache])
    sqlite_across(src, [src, m1.path, m2.path], 3, 80, 120)


@pytest.fixture
def central(tmp_path):
    """A `vfs-lockd serve` daemon; requested before `mounts`/`lockers` so that it is torn
    down after them (a guest's close must still reach it)."""
    sock = tmp_path / "lockd.sock"
    log = open(tmp_path / "serve.log", "wb")  # noqa: SIM115
    serve = subprocess.Popen(
        [*VFS_LOCKD, "serve", "--socket", str(sock), "--journal", str(tmp_path / "j.db")],
        stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)),
    )
    try:
        assert wait_until(lambda: sock.exists() or serve.poll() is not None, 15)
        assert sock.exists(), (tmp_path / "serve.log").read_text()
        yield sock
    finally:
        serve.send_signal(signal.SIGTERM)
        try:
            serve.wait(10)
        except subprocess.TimeoutExpired:
            serve.kill()
        log.close()


def daemon_snapshot(sock: Path) -> dict:
    """The daemon's locks and waiters (`vfs-lockd locks --json`)."""
    r = subprocess.run([*VFS_LOCKD, "locks", "--socket", str(sock), "--json"],
                       capture_output=True, text=True, timeout=20, cwd=REPO)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_central_daemon_mode(central, mounts, lockers) -> None:
    """Two mounts sending their locks to one `vfs-lockd serve`: conflicts, holder pids
    across guests, and a blocking wait granted across guests."""
    src, (m1, m2) = mounts(2, ["--lockd", str(central)])
    (src / "f").write_bytes(b"")
    a, b, host = lockers(m1.path / "f"), lockers(m2.path / "f"), lockers(src / "f")
    assert a.do("fcntl w 0 0 nowait") == "ok"
    assert b.do("fcntl r 0 0 nowait") == EAGAIN
    assert host.do("fcntl r 0 0 nowait") == EAGAIN
    kind, pid = map(int, b.do("getlk w").split())
    assert (kind, pid) == (F_WRLCK, a.p.pid)  # one manager knows every guest's holder
    b.send("fcntl w 0 0 wait")
    assert wait_until(lambda: len(daemon_snapshot(central)["waiters"]) == 1, 10, interval=0.1)
    assert b.pending(0)  # queued in the daemon, not answered
    assert a.do("fcntl u 0 0 nowait") == "ok"
    assert b.read(5) == "ok"
