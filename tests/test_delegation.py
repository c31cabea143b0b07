"""Delegations (lockd/daemon/delegation.py): a file only one guest uses is decided by
that guest's server; the daemon takes it back when another guest comes, an admin lists
the locks, or the guest would have to wait - and nothing the daemon promises changes:
host processes conflict both ways, FIFO order, deadlock detection, naming holders,
eviction, and a kill -9 of the daemon loses nothing.
"""

from __future__ import annotations

import errno
import json
import signal
import time
from pathlib import Path

import pytest
from daemonutil import DaemonProc, cli, host_can_lock
from procutil import wait_until
from test_fuse_locks import Locker

from lockd.daemon import wire

pytestmark = pytest.mark.fuse

EAGAIN, EDEADLK = str(errno.EAGAIN), str(errno.EDEADLK)


def listed(sock: str) -> set[tuple]:
    """The daemon's table (a LIST recalls every delegation first)."""
    r = cli("locks", "--socket", sock, "--json")
    assert r.returncode == 0, r.stderr
    return {(lk["guest"], lk["start"], lk["end"], lk["type"])
            for lk in json.loads(r.stdout)["locks"]}


def counters(sock: str) -> dict:
    return json.loads(cli("status", "--socket", sock, "--json").stdout)["stats"]


@pytest.fixture
def central(mounts, tmp_path):
    d = DaemonProc(str(tmp_path)).start()
    lockers: list[Locker] = []

    def locker(path: Path) -> Locker:
        lockers.append(Locker(path))
        return lockers[-1]

    try:
        source, (ma, mb) = mounts(2, ["--lockd", d.sock], guests=["ga", "gb"])
        (source / "f").write_bytes(b"x" * 100)
        yield d, source, ma, mb, locker
    finally:
        try:  # the daemon is stopped even when a locker cannot be reaped
            for lk in lockers:
                lk.kill()
            for lk in lockers:
                lk.close()
        finally:
            d.stop()


def test_single_guest_file_is_decided_by_its_server(central) -> None:
    d, source, ma, mb, locker = central
    a1, a2 = locker(ma.path / "f"), locker(ma.path / "f")
    granted0 = counters(d.sock)["locks_granted"]
    for _ in range(20):  # decided by guest A's server: the daemon sees none of these
        assert a1.do("fcntl w 0 10 nowait") == "ok"
        assert a2.do("fcntl r 5 1 nowait") == EAGAIN  # another owner of the same guest
        assert a1.do("fcntl u 0 10 nowait") == "ok"
    assert counters(d.sock)["locks_granted"] == granted0
    assert a1.do("fcntl w 0 10 nowait") == "ok"
    assert not host_can_lock(str(source / "f"), 0, 10)  # host processes still conflict
    # An admin listing the locks takes the delegation back: the lock is in the table.
    assert listed(d.sock) == {("ga", 0, 9, "WRITE")}
    assert a1.do("fcntl u 0 10 nowait") == "ok"
    assert listed(d.sock) == set()


def test_second_guest_recalls_and_waits_in_fifo_order(central) -> None:
    d, source, ma, mb, locker = central
    a1, a2 = locker(ma.path / "f"), locker(ma.path / "f")
    b1 = locker(mb.path / "f")
    assert a1.do("fcntl w 0 10 nowait") == "ok"  # delegated to guest A
    assert b1.do("fcntl w 0 10 nowait") == EAGAIN  # guest B comes: recalled
    assert b1.do("getlk w").split()[0] == "1"  # B sees A's write lock
    b1.send("fcntl w 0 10 wait")  # B waits first...
    assert b1.pending(0.5)
    assert listed(d.sock) == {("ga", 0, 9, "WRITE")}
    a2.send("fcntl w 0 10 wait")  # ...then another owner of A
    assert a2.pending(0.5)
    assert a1.do("fcntl u 0 10 nowait") == "ok"
    assert b1.read(10) == "ok"  # FIFO: B first
    assert a2.pending(0.3)
    assert b1.do("fcntl u 0 10 nowait") == "ok"
    assert a2.read(10) == "ok"


TWO = r"""
import ctypes, fcntl, os, sys
libc = ctypes.CDLL(None, use_errno=True)
class Flock(ctypes.Structure):
    _fields_ = [("l_type", ctypes.c_short), ("l_whence", ctypes.c_short),
                ("l_start", ctypes.c_int64), ("l_len", ctypes.c_int64), ("l_pid", ctypes.c_int)]
fds = [os.open(p, os.O_RDWR) for p in sys.argv[1:]]
T = {"r": fcntl.F_RDLCK, "w": fcntl.F_WRLCK, "u": fcntl.F_UNLCK}
print("ready", flush=True)
for line in sys.stdin:  # IDX TYPE START LEN wait|nowait
    i, t, s, n, w = line.split()
    fl = Flock(T[t], 0, int(s), int(n), 0)
    rc = libc.fcntl(fds[int(i)], fcntl.F_SETLKW if w == "wait" else fcntl.F_SETLK,
                    ctypes.byref(fl))
    print("ok" if rc == 0 else ctypes.get_errno(), flush=True)
"""


def test_a_wait_in_a_delegated_file_goes_central_so_cycles_are_seen(central) -> None:
    """An owner that would wait in a delegated file hands the delegation back first, so
    a cycle through a delegated file and a central one is detected (EDEADLK)."""
    import subprocess
    import sys

    d, source, ma, mb, locker = central
    (source / "g").write_bytes(b"y" * 100)
    procs = [subprocess.Popen([sys.executable, "-c", TWO, str(ma.path / "f"),
                               str(ma.path / "g")], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        for p in procs:
            assert p.stdout.readline().strip() == "ready"

        def do(p: subprocess.Popen, line: str) -> None:
            p.stdin.write(line + "\n")
            p.stdin.flush()

        o1, o2 = procs
        b = locker(mb.path / "g")
        assert b.do("fcntl r 50 1 nowait") == "ok"  # g: both guests, central
        do(o1, "0 w 0 10 nowait")  # f: only guest A, delegated
        assert o1.stdout.readline().strip() == "ok"
        do(o2, "1 w 0 10 nowait")
        assert o2.stdout.readline().strip() == "ok"
        do(o1, "1 w 0 10 wait")  # o1 waits for o2 (in the daemon)
        assert not _answered(o1, 0.5)
        do(o2, "0 w 0 10 wait")  # o2 would wait for o1 in the delegated file: a cycle
        assert o2.stdout.readline().strip() == EDEADLK
        do(o2, "1 u 0 10 nowait")
        assert o2.stdout.readline().strip() == "ok"
        assert o1.stdout.readline().strip() == "ok"  # o1 got g
    finally:
        for p in procs:
            p.kill()
            p.wait(10)


def _answered(p, wait: float) -> bool:  # noqa: ANN001
    import select

    return bool(select.select([p.stdout], [], [], wait)[0])


def test_kill9_of_the_daemon_keeps_delegated_locks(central, tmp_path) -> None:
    d, source, ma, mb, locker = central
    a1 = locker(ma.path / "f")
    assert a1.do("fcntl w 0 10 nowait") == "ok"
    d.kill9()
    assert not host_can_lock(str(source / "f"), 0, 10)  # held by A's server itself
    d2 = DaemonProc(str(tmp_path)).start()
    try:
        b1 = locker(mb.path / "f")
        assert b1.do("fcntl w 0 10 nowait", timeout=20) == EAGAIN
        assert a1.do("fcntl u 0 10 nowait", timeout=20) == "ok"
        deadline = time.monotonic() + 10
        while b1.do("fcntl w 0 10 nowait", timeout=20) != "ok":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert counters(d2.sock)["lost"] == 0
    finally:
        d2.stop()


def test_eviction_drops_delegated_locks(central) -> None:
    d, source, ma, mb, locker = central
    a1 = locker(ma.path / "f")
    assert a1.do("fcntl w 0 10 nowait") == "ok"
    r = cli("evict", "--socket", d.sock, "--guest", "ga")
    assert r.returncode == 0, r.stderr
    deadline = time.monotonic() + 10
    while not host_can_lock(str(source / "f"), 0, 10):
        assert time.monotonic() < deadline, "an evicted guest's delegated lock stayed"
        time.sleep(0.02)
    a1.p.send_signal(signal.SIGKILL)


MANY = r"""
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
for i in range(int(sys.argv[2])):  # disjoint 1-byte write locks: one owner, N ranges
    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, 2 * i)
print("held", flush=True)
for line in sys.stdin:  # START: unlock that byte
    fcntl.lockf(fd, fcntl.LOCK_UN, 1, int(line))
    print("ok", flush=True)
"""


@pytest.mark.parametrize("waiter", ["gb", "ga"], ids=["recalled", "own-wait"])
def test_handing_back_thousands_of_locks_fits_the_frames(central, waiter: str) -> None:
    """One owner's 5,000 ranges in a delegated file are more than one frame can carry:
    the hand-back that a blocking request forces (another guest's, which recalls the
    delegation, or one of the same guest, which must wait centrally) is split, the
    daemon adopts every range, and the first guest's connection is never dropped (no
    reconnect loop)."""
    import subprocess
    import sys

    d, source, ma, mb, locker = central
    n = 5000
    many = subprocess.Popen([sys.executable, "-c", MANY, str(ma.path / "f"), str(n)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert many.stdout.readline().strip() == "held"  # decided by guest A's server
        # One RETURN frame with every range would not fit the daemon's limit.
        assert n * len("[9998,9998,1],") > wire.MAX_FRAME
        b = locker((mb if waiter == "gb" else ma).path / "f")
        b.send("fcntl w 0 1 wait")  # recalled (guest B comes) or handed back (A waits)

        def waiting() -> list:
            r = cli("locks", "--socket", d.sock, "--json")
            assert r.returncode == 0, r.stderr
            return [w for w in json.loads(r.stdout)["waiters"] if w["guest"] == waiter]

        assert wait_until(lambda: len(waiting()) == 1, 15)  # queued in the daemon
        assert listed(d.sock) == {("ga", 2 * i, 2 * i, "WRITE") for i in range(n)}
        assert not host_can_lock(str(source / "f"), 2 * (n - 1), 1)  # still held on the host
        many.stdin.write("0\n")
        many.stdin.flush()
        assert many.stdout.readline().strip() == "ok"
        assert b.read(15) == "ok"  # the waiter is granted when A lets go of byte 0
        assert listed(d.sock) == {(waiter, 0, 0, "WRITE")} | {
            ("ga", 2 * i, 2 * i, "WRITE") for i in range(1, n)}
        a2 = locker(ma.path / "f")  # guest A's new locks are answered (centrally now)
        assert a2.do("fcntl w 20000 1 nowait") == "ok"
    finally:
        many.kill()
        many.wait(10)
    connects = [e for e in d.events("connect") if e.get("guest") == "ga"]
    assert len(connects) == 1, f"guest A's server connected {len(connects)} times"
    log = d.log()
    assert "bad frame" not in log and "frame_refused" not in log
    assert "return_failed" not in log
    assert "lost connection" not in ma.output()
