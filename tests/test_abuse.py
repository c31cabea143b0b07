"""Bad input and abuse (issue part 8), with real processes, a real daemon and mounts.

* Bad lock arguments end in EINVAL with nothing changed: through the daemon wire, through
  the FUSE session against a daemon, and through a real mount.
* One guest abusing its limits (10,000 owners, 100,000 locks, thousands of waits) gets
  ENOLCK at exactly each limit, while another guest keeps being served, also while the
  abuser floods the daemon with requests (its latency is printed, not bounded: a bound
  would measure the load of the machine running the tests), and the daemon's memory and
  descriptors stay bounded by the limits.

Run as a script (`python test_abuse.py abuser|normal SOCKET PATH`) it is one of the two
guest processes of the abuse test.
"""

from __future__ import annotations

import errno
import json
import os
import select
import socket
import statistics
import subprocess
import sys
import threading
import time
from fcntl import F_RDLCK, F_UNLCK, F_WRLCK

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import pytest  # noqa: E402
from daemonutil import DaemonProc, Raw  # noqa: E402
from fuse_oracle import host_can_lock  # noqa: E402
from procutil import wait_until  # noqa: E402

from lockd.api import OFFSET_MAX, Limits  # noqa: E402
from lockd.daemon import wire  # noqa: E402
from lockd.engine.manager import SPARE_DESCRIPTIONS  # noqa: E402

LIMITS = Limits()  # the daemon runs with the default limits: the numbers
EXTRA = 200  # requests past each limit
FILES = 100  # the abuser's files


# ------------------------------------------------------------------ helpers
def proc_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS"))


def proc_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def snapshot(d: DaemonProc) -> dict:
    a = Raw(d.sock, None, role="admin")
    try:
        status, payload = a.call(wire.T_LIST)
        assert status == 0, payload
        return json.loads(payload)
    finally:
        a.close()


def status(d: DaemonProc) -> dict:
    # Generous: right after the abuser goes, the daemon is busy dropping its many locks.
    a = Raw(d.sock, None, role="admin", timeout=60)
    try:
        st, payload = a.call(wire.T_STATUS)
        assert st == 0, payload
        return json.loads(payload)
    finally:
        a.close()


# ------------------------------------------------------------------ bad arguments
BAD_LOCKS = [
    # (name, lk_type, start, end, lk_flags, opcode)
    ("start > end", F_WRLCK, 10, 5, 0, wire.T_SETLK),
    ("end beyond OFFSET_MAX", F_WRLCK, 0, OFFSET_MAX + 1, 0, wire.T_SETLK),
    ("start beyond OFFSET_MAX", F_RDLCK, OFFSET_MAX + 1, OFFSET_MAX + 1, 0, wire.T_SETLK),
    ("end = u64 max", F_WRLCK, 0, (1 << 64) - 1, 0, wire.T_SETLKW),
    ("unknown type", 7, 0, 9, 0, wire.T_SETLK),
    ("unknown type, waiting", 3, 0, 9, 0, wire.T_SETLKW),
    ("unknown flags", F_WRLCK, 0, 9, 1 << 5, wire.T_SETLK),
    ("flock with unknown flags", F_WRLCK, 0, 9, wire.FUSE_LK_FLOCK | 4, wire.T_SETLK),
    ("flock unknown type", 9, 0, OFFSET_MAX, wire.FUSE_LK_FLOCK, wire.T_SETLK),
    # (GETLK of F_UNLCK is not here: it asks for the owner's own lock, as Linux 6.7's
    # F_OFD_GETLK does; tests/test_lock_messages.py checks its answer.)
    ("GETLK start > end", F_WRLCK, 9, 0, 0, wire.T_GETLK),
    ("GETLK unknown flags", F_WRLCK, 0, 9, 2, wire.T_GETLK),
]


def test_bad_lock_arguments_over_the_wire(daemon, tmp_path):
    """Every bad lock frame answers EINVAL and changes nothing: the lock table, the
    host's view and the other guest's locks are as before."""
    path = str(tmp_path / "f")
    a, b = Raw(daemon.sock, "g-a"), Raw(daemon.sock, "g-b")
    try:
        ha, hb = a.file(path), b.file(path)
        assert a.expect(a.lk(wire.T_SETLK, ha, F_WRLCK, 100, 199, owner=1))[0] == 0
        assert b.expect(b.lk(wire.T_SETLK, hb, F_RDLCK, 300, 399, owner=2))[0] == 0
        before = snapshot(daemon)
        for name, t, s, e, flags, op in BAD_LOCKS:
            rid = b.lk(op, hb, t, s, e, owner=2, fh=5, flags=flags)
            assert b.expect(rid)[0] == -errno.EINVAL, name
        # a handle this guest never registered (another guest's handle number, or none)
        for h in (hb + 1000, 0, ha + hb + 7):
            for op in (wire.T_SETLK, wire.T_SETLKW, wire.T_GETLK):
                assert b.expect(b.lk(op, h, F_WRLCK, 0, 9))[0] == -errno.EINVAL, (h, op)
        after = snapshot(daemon)
        assert after["locks"] == before["locks"] and not after["waiters"]
        assert not host_can_lock(path, 100, 100) and host_can_lock(path, 0, 100)
        assert host_can_lock(path, 200, 100)  # b's read lock only blocks writers: a read
        # the daemon still serves both, with the same answers as before
        assert b.expect(b.lk(wire.T_SETLK, hb, F_WRLCK, 150, 150, owner=2))[0] == -errno.EAGAIN
        assert a.expect(a.lk(wire.T_SETLK, ha, F_UNLCK, 0, OFFSET_MAX, owner=1))[0] == 0
    finally:
        a.close()
        b.close()


def test_bad_lock_arguments_through_fuse_session_and_daemon(daemon, tmp_path):
    """The FUSE server's lock path (Session -> LockDelegate -> LockClient -> daemon) fed
    crafted FUSE lock requests: EINVAL for each, nothing reaches the lock table."""
    from fuse_oracle import LK_IN
    from sessionrig import Sent

    from fuse_server import protocol as P
    from fuse_server.locks import RemoteLocks
    from fuse_server.passthrough import Passthrough
    from fuse_server.session import Session
    from lockd.daemon.client import LockClient

    root = tmp_path / "root"
    root.mkdir()
    (root / "f").write_bytes(b"x")
    sent = Sent()
    client = LockClient(daemon.sock, "fuse-g")
    try:
        sess = Session(Passthrough(str(root)), client, "fuse-g", sent, "auto",
                       locks=RemoteLocks)
        uniq = iter(range(100, 10_000, 2))

        def req(op: int, body: bytes = b"", node: int = 1) -> bytes | None:
            """The reply, also when it comes later (forwarded to the daemon)."""
            unique = next(uniq)
            hdr = P.IN_HEADER.pack(P.IN_HEADER.size + len(body), op, unique, node, 0, 0,
                                   4242, 0, 0)
            reply = sess.handle(hdr + body)
            if reply is None and op in (P.SETLK, P.SETLKW, P.GETLK):
                return sent.reply_to(unique)
            return reply

        def err(reply: bytes | None) -> int:
            assert reply is not None
            return -P.OUT_HEADER.unpack_from(reply)[1]

        init = req(P.INIT, P.INIT_IN.pack(7, 38, 65536, 0xFFFFFFFF) + bytes(48))
        assert err(init) == 0
        out = req(P.LOOKUP, b"f\0")
        node = P.ENTRY_OUT.unpack_from(out, 16)[0]
        out = req(P.OPEN, P.OPEN_IN.pack(os.O_RDWR, 0), node)
        fh = P.OPEN_OUT.unpack_from(out, 16)[0]
        assert err(req(P.SETLK, LK_IN.pack(fh, 1, 0, 9, F_WRLCK, 1, 0), node)) == 0
        before = snapshot(daemon)
        for name, t, s, e, flags, op in BAD_LOCKS:
            fop = {wire.T_SETLK: P.SETLK, wire.T_SETLKW: P.SETLKW, wire.T_GETLK: P.GETLK}[op]
            if e > (1 << 64) - 1 or s > (1 << 64) - 1:
                continue
            got = req(fop, LK_IN.pack(fh, 1, s, e, t, 1, flags), node)
            assert err(got) == errno.EINVAL, name
        # a file handle this guest never opened
        for op in (P.SETLK, P.SETLKW, P.GETLK):
            assert err(req(op, LK_IN.pack(fh + 77, 1, 0, 9, F_WRLCK, 1, 0), node)) == errno.EINVAL
        assert snapshot(daemon)["locks"] == before["locks"]
        # every request was answered once, and nothing queued (no second, later answer)
        answered = [P.OUT_HEADER.unpack_from(m)[2] for m in sent.items]
        answered = [u for u in answered if u != 0]  # 0: the grant's cache notification
        assert len(answered) == len(set(answered)), answered
    finally:
        client.close()


LOCKER = r"""
import ctypes, fcntl, json, os, struct, sys
libc = ctypes.CDLL(None, use_errno=True)
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
def fl(cmd, t, start, length, whence=0):
    buf = ctypes.create_string_buffer(struct.pack("hhqqi4x", t, whence, start, length, 0))
    rc = libc.fcntl(fd, cmd, buf)
    return 0 if rc == 0 else ctypes.get_errno()
res = {}
res["start > end (negative start)"] = fl(fcntl.F_SETLK, fcntl.F_WRLCK, -5, 2)
res["len negative past 0"] = fl(fcntl.F_SETLK, fcntl.F_WRLCK, 2, -5)
res["beyond OFFSET_MAX"] = fl(fcntl.F_SETLK, fcntl.F_WRLCK, 0x7FFFFFFFFFFFFFF0, 100)
res["unknown type"] = fl(fcntl.F_SETLK, 7, 0, 10)
res["unknown type, waiting"] = fl(fcntl.F_SETLKW, 5, 0, 10)
res["GETLK F_UNLCK"] = fl(fcntl.F_GETLK, fcntl.F_UNLCK, 0, 10)
res["bad whence"] = fl(fcntl.F_SETLK, fcntl.F_WRLCK, 0, 10, whence=9)
res["OFD GETLK F_UNLCK"] = fl(36, fcntl.F_UNLCK, 0, 10)
print(json.dumps(res))
"""


def test_bad_lock_arguments_through_a_mount(mounts, tmp_path):
    """Bad fcntl arguments in a guest process on a real mount (central daemon): refused
    (by the guest kernel already, before any FUSE request), nothing held, the server
    still up. What the server itself answers is tested through the session above."""
    d = DaemonProc(str(tmp_path)).start()
    try:
        source, (m,) = mounts(1, ["--lockd", d.sock])
        path = m.path / "f"
        r = subprocess.run([sys.executable, "-c", LOCKER, str(path)], capture_output=True,
                           text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        res = json.loads(r.stdout)
        # Exactly what the same calls answer on the host's own file system (EINVAL, the
        # kernel's EOVERFLOW past OFFSET_MAX, and 0 for F_OFD_GETLK of F_UNLCK on 6.7+).
        local = tmp_path / "local"
        r = subprocess.run([sys.executable, "-c", LOCKER, str(local)], capture_output=True,
                           text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        want = json.loads(r.stdout)
        assert want["unknown type"] == errno.EINVAL  # the table is not vacuous
        assert res == want, res
        assert not snapshot(d)["locks"]
        assert host_can_lock(str(source / "f"), 0, 1 << 40)
        assert m.proc.poll() is None
    finally:
        d.stop()


# ------------------------------------------------------------------ abuse
def _connect(sock: str, guest: str, path: str) -> tuple[socket.socket, int]:
    r = Raw(sock, guest)
    return r.s, r.file(path)


def _pipeline(s: socket.socket, frames: list[bytes], window: int = 256) -> list[int]:
    """Send frames `window` at a time and collect their statuses (in order of ids)."""
    out: list[int] = []
    buf = bytearray()
    s.settimeout(60)
    for i in range(0, len(frames), window):
        chunk = frames[i:i + window]
        s.sendall(b"".join(chunk))
        got: dict[int, int] = {}
        while len(got) < len(chunk):
            data = s.recv(1 << 20)
            if not data:
                raise EOFError("daemon closed the connection")
            buf += data
            for rid, st, _ in wire.split_replies(buf):
                got[rid] = st
        out.extend(got[rid] for rid in sorted(got))
    return out


def _count(statuses: list[int]) -> dict[str, int]:
    names = {0: "ok", wire.STATUS_QUEUED: "queued"}
    c: dict[str, int] = {}
    for st in statuses:
        k = names.get(st) or errno.errorcode.get(-st, str(st))
        c[k] = c.get(k, 0) + 1
    return c


def abuser_main(sock: str, path: str) -> None:
    """One guest going over every limit, then hammering the daemon with requests that
    all answer ENOLCK until told to stop. Reports each phase as a JSON line; on a "mark"
    line, how many hammer requests were answered so far; exits when stdin closes.

    The locks are spread over FILES files (as the README's 100,000-lock benchmark):
    100,000 locks on one file make every lock call on that file O(n) in the host kernel
    (its per-inode list) and in the owner's range list, see the issue notes."""
    r = Raw(sock, "abuser")
    s = r.s
    os.makedirs(path, exist_ok=True)
    hs = [r.file(os.path.join(path, f"f{i}")) for i in range(FILES)]
    rid = iter(range(1 << 20, 1 << 62))

    def report(phase: str, statuses: list[int]) -> None:
        print(json.dumps({"phase": phase, **_count(statuses)}), flush=True)

    n_owners = LIMITS.max_owners + EXTRA
    report("owners", _pipeline(s, [wire.lk(wire.T_SETLK, next(rid), hs[o % FILES], 0, o,
                                           F_WRLCK, o, o, 1)
                                   for o in range(1, n_owners + 1)]))
    base = 10 * n_owners
    n_locks = LIMITS.max_locks + EXTRA
    report("locks", _pipeline(s, [wire.lk(wire.T_SETLK, next(rid), hs[k % FILES], 0, 1,
                                          F_WRLCK, base + 2 * k, base + 2 * k, 1)
                                  for k in range(n_locks)]))
    n_waits = 3 * LIMITS.max_waiters
    # owner 10**9 waits behind owner o's lock on its file
    report("waits", _pipeline(s, [wire.lk(wire.T_SETLKW, next(rid), hs[o % FILES], 0, 10**9,
                                          F_WRLCK, o, o, 1)
                                  for o in (2 + k % 5000 for k in range(n_waits))]))
    h = hs[0]
    print(json.dumps({"phase": "hammering"}), flush=True)
    hammered: list[int] = []
    k = 0
    while True:
        # Between rounds: the test's "mark" and "stop" (nothing else comes on stdin).
        if select.select([sys.stdin], [], [], 0)[0]:
            cmd = sys.stdin.readline().strip()
            if cmd != "mark":
                break
            print(json.dumps({"phase": "mark", "answered": len(hammered)}), flush=True)
        frames = []
        for _ in range(128):
            k += 1
            frames.append(wire.lk(wire.T_SETLK, next(rid), h, 0, 2 * 10**9 + k, F_WRLCK,
                                  base - 1 - k % 1000, base - 1 - k % 1000, 1))
            # owner 3 would wait behind owner 100's lock (file 0): over the waiter limit
            frames.append(wire.lk(wire.T_SETLKW, next(rid), h, 0, 3, F_WRLCK, 100, 100, 1))
            frames.append(wire.lk(wire.T_GETLK, next(rid), h, 0, 3, F_WRLCK, 0, OFFSET_MAX, 1))
        hammered.extend(_pipeline(s, frames, window=len(frames)))
    print(json.dumps({"phase": "hammer", "answered": len(hammered), **_count(hammered)}),
          flush=True)
    sys.stdin.read()
    s.close()


def normal_main(sock: str, path: str) -> None:
    """A well-behaved guest: on each "measure N" line, N lock+unlock pairs, one request
    at a time; answers the pair latencies (us) as a JSON list."""
    s, h = _connect(sock, "normal", path)
    s.settimeout(30)
    rid = 0
    for line in sys.stdin:
        n = int(line.split()[1])
        lat = []
        for _ in range(n):
            t0 = time.perf_counter_ns()
            for t in (F_WRLCK, F_UNLCK):
                rid += 1
                s.sendall(wire.lk(wire.T_SETLK, rid, h, 0, 1, t, 0, 99, 7))
                data = s.recv(64)
                st = wire.REPLY.unpack_from(data)[1]
                assert len(data) == 16 and st == 0, (data, st)
            lat.append((time.perf_counter_ns() - t0) / 1000)
        print(json.dumps(lat), flush=True)


class Child:
    """One of the two guest processes, driven by lines on its stdin and answering lines
    on its stdout (read unbuffered: two lines that arrive together are both seen)."""

    def __init__(self, *args: str) -> None:
        self.p = subprocess.Popen([sys.executable, __file__, *args], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True)
        self.fd = self.p.stdout.fileno()
        self.buf = b""

    def line(self, timeout: float = 120) -> str:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.fd], [], [], left)[0]:
                raise TimeoutError("child did not answer")
            data = os.read(self.fd, 1 << 16)
            if not data:
                raise EOFError(f"child exited {self.p.wait()}")
            self.buf += data
        out, _, self.buf = self.buf.partition(b"\n")
        return out.decode()

    def ready(self) -> bool:
        return b"\n" in self.buf or bool(select.select([self.fd], [], [], 0)[0])

    def send(self, text: str) -> None:
        self.p.stdin.write(text + "\n")
        self.p.stdin.flush()

    def stop(self) -> None:
        try:
            self.p.stdin.close()
        except OSError:
            pass
        try:
            self.p.wait(10)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait(10)


@pytest.mark.slow
def test_abusive_guest_hits_limits_without_harming_others(daemon, tmp_path):
    pid = daemon.proc.pid
    norm_path, abuse_path = str(tmp_path / "normal"), str(tmp_path / "abuse")
    children: list[Child] = []
    peak = {"rss": 0, "fds": 0}
    stop = threading.Event()

    def sampler() -> None:
        while not stop.is_set():
            try:
                peak["rss"] = max(peak["rss"], proc_rss_kib(pid))
                peak["fds"] = max(peak["fds"], proc_fds(pid))
            except OSError:
                pass
            stop.wait(0.02)

    def measure(n: int) -> list[float]:
        normal.send(f"measure {n}")
        return json.loads(normal.line())

    try:
        normal = Child("normal", daemon.sock, norm_path)
        children.append(normal)
        measure(300)  # warm up
        before = measure(1000)
        rss0, fds0 = proc_rss_kib(pid), proc_fds(pid)
        t = threading.Thread(target=sampler, daemon=True)
        t.start()
        abuser = Child("abuser", daemon.sock, abuse_path)
        children.append(abuser)
        during: list[float] = []
        phases: dict[str, dict] = {}

        def phase(rec: dict) -> None:
            phases[rec.pop("phase")] = rec

        while "hammering" not in phases:
            during.extend(measure(200))
            while abuser.ready():
                phase(json.loads(abuser.line()))
        # The abuser floods the daemon from here until it reads "stop". Its answered
        # count before and after 200 pairs of the other guest: both guests were served
        # in that window (the other guest one request at a time, so none of its requests
        # can hide in a batch).
        abuser.send("mark")
        phase(json.loads(abuser.line()))
        under_hammer = measure(200)
        abuser.send("stop")
        phase(json.loads(abuser.line()))
        during.extend(under_hammer)
        st = status(daemon)["stats"]
        rss_peak, fds_peak = peak["rss"], peak["fds"]
        abuser.stop()
        # the abuser's connection is gone: its locks, waits and descriptions go with it
        wait_until(lambda: status(daemon)["stats"]["held_locks"] <= 1, 20)
        after = measure(1000)
        stop.set()
        t.join()
        rss1, fds1 = proc_rss_kib(pid), proc_fds(pid)
    finally:
        stop.set()
        for c in children:
            c.stop()
    med_before, med_during = statistics.median(before), statistics.median(during)
    med_after = statistics.median(after)
    numbers = {
        "median_us": {"before": round(med_before, 1), "during": round(med_during, 1),
                      "after": round(med_after, 1), "samples_during": len(during)},
        "ratio": round(med_during / med_before, 2),
        "rss_kib": {"before": rss0, "peak": rss_peak, "after": rss1},
        "fds": {"before": fds0, "peak": fds_peak, "after": fds1},
        "phases": phases, "held_at_peak": st["held_locks"], "waiters_at_peak": st["waiters"],
        "owners_at_peak": st["owners"],
    }
    print("\nabuse:", json.dumps(numbers))
    # every limit answered ENOLCK at exactly its number, nothing else failed
    assert phases["owners"] == {"ok": LIMITS.max_owners, "ENOLCK": EXTRA}
    assert phases["locks"] == {"ok": LIMITS.max_locks - LIMITS.max_owners,
                               "ENOLCK": LIMITS.max_locks + EXTRA
                               - (LIMITS.max_locks - LIMITS.max_owners)}
    assert phases["waits"] == {"queued": LIMITS.max_waiters,
                               "ENOLCK": 2 * LIMITS.max_waiters}
    hammer = dict(phases["hammer"])
    answered = hammer.pop("answered")
    assert set(hammer) <= {"ENOLCK", "ok"} and hammer["ENOLCK"] > 1000, hammer
    # the abuser holds exactly its limit (the normal guest holds 0 or 1 at that moment)
    assert st["held_locks"] - LIMITS.max_locks in (0, 1)
    assert st["waiters"] == LIMITS.max_waiters
    # the other guest kept being served throughout, also while the abuser's flood went
    # on and was answered (its latency is printed above; a timing bound would only
    # measure this 2-core machine's load)
    assert len(under_hammer) == 200 and len(during) >= 400, numbers
    assert answered > phases["mark"]["answered"], numbers
    # memory: bounded by what the limits allow (measured: ~28 MiB for all of it, i.e.
    # ~0.3 KiB per held lock; the budget is 1 KiB per lock, 4 KiB per owner and per wait)
    budget_kib = LIMITS.max_locks + 4 * LIMITS.max_owners + 4 * LIMITS.max_waiters + 16384
    assert rss_peak - rss0 <= budget_kib, numbers
    # descriptors: one description per owner, plus per file one O_PATH reference and at
    # most SPARE_DESCRIPTIONS spare ones; all given back when the abuser is gone
    assert fds_peak - fds0 <= LIMITS.max_owners + FILES * (1 + SPARE_DESCRIPTIONS) + 32, numbers
    assert fds1 - fds0 <= 8, numbers


if __name__ == "__main__":
    if sys.argv[1] == "abuser":
        abuser_main(sys.argv[2], sys.argv[3])
    elif sys.argv[1] == "normal":
        normal_main(sys.argv[2], sys.argv[3])
