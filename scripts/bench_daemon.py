#!/usr/bin/env python3
"""Benchmark `vfs-lockd serve`: lock+unlock pairs over the socket with 1, 8 and 64
connections (separate processes, each its own guest and its own file), as ratios to the
embedded LockManager measured in the same run. Rounds are interleaved; medians printed.

Each worker pipelines: it sends a window of lock+unlock pairs in one write and reads all
the replies, so the daemon sees batches (as it would from a busy guest server with many
FUSE threads). `--sync` adds LockClient one-call-at-a-time runs for comparison.

    .venv/bin/python scripts/bench_daemon.py [--seconds 1] [--rounds 5] [--window 64]
"""

from __future__ import annotations

import argparse
import array
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from lockd.api import F_UNLCK, F_WRLCK  # noqa: E402
from lockd.daemon import wire  # noqa: E402


def worker(sock_path: str, guest: str, path: str, window: int, mode: str) -> None:
    """Runs in its own process; commands on stdin: 'run SECONDS' -> 'OPS ELAPSED'."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    if mode == "sync":
        from lockd.daemon.client import LockClient

        c = LockClient(sock_path, guest)
        ref = c.file(fd, path)

        def run(seconds: float) -> int:
            n = 0
            end = time.perf_counter() + seconds
            while time.perf_counter() < end:
                for _ in range(50):
                    if c.setlk(guest, 1, ref, F_WRLCK, 0, 99, 1) or c.setlk(
                            guest, 1, ref, F_UNLCK, 0, 99, 1):
                        raise SystemExit("lock failed")
                n += 100
            return n
    else:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(sock_path)
        from lockd.daemon.client import hello_exchange

        hello_exchange(s, guest, "guest", None)
        s.sendmsg([wire.file_frame(2, path)],
                  [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fd.to_bytes(4, "little"))])
        r = s.recv(64)
        handle = wire.FILE_OUT.unpack_from(r, 16)[0]
        batch = b"".join(
            wire.lk(wire.T_SETLK, 10 + 2 * i, handle, 0, 1, F_WRLCK, 0, 99, 1)
            + wire.lk(wire.T_SETLK, 11 + 2 * i, handle, 0, 1, F_UNLCK, 0, 99, 1)
            for i in range(window))
        expect = b"".join(wire.reply(10 + i, 0) for i in range(2 * window))
        buf = bytearray(len(expect))
        view = memoryview(buf)

        def run(seconds: float) -> int:
            n = 0
            end = time.perf_counter() + seconds
            while time.perf_counter() < end:
                s.sendall(batch)
                got = 0
                while got < len(buf):
                    k = s.recv_into(view[got:])
                    if not k:
                        raise SystemExit("daemon closed")
                    got += k
                if buf != expect:
                    raise SystemExit("unexpected reply")
                n += 2 * window
            return n

    print("ready", flush=True)
    for line in sys.stdin:
        cmd = line.split()
        if cmd[0] == "run":
            t0 = time.perf_counter()
            n = run(float(cmd[1]))
            print(n, time.perf_counter() - t0, flush=True)
        else:
            break


class WireGuest:
    """One guest connection to `vfs-lockd serve` speaking the wire protocol directly (no
    LockClient threads in the way): register files, take many locks pipelined, time
    one-at-a-time lock+unlock pairs. Used by scripts/bench (scaling, recovery)."""

    def __init__(self, sock_path: str, guest: str) -> None:
        from lockd.daemon.client import hello_exchange

        self.guest = guest
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.s.connect(sock_path)
        _, self.buf = hello_exchange(self.s, guest, "guest", None)
        self.rid = 1

    def _id(self) -> int:
        self.rid += 1
        return self.rid

    def _reply(self) -> tuple[int, int, bytes]:
        buf = self.buf
        while True:
            if len(buf) >= wire.REPLY_SIZE:
                ln, status, rid = wire.REPLY.unpack_from(buf)
                if len(buf) >= ln:
                    payload = bytes(buf[wire.REPLY_SIZE:ln])
                    del buf[:ln]
                    return rid, status, payload
            data = self.s.recv(1 << 20)
            if not data:
                raise ConnectionResetError("daemon closed the connection")
            buf += data

    def file(self, path: str) -> int:
        """Register `path` (created if missing); the daemon's handle for it."""
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            self.s.sendmsg([wire.file_frame(self._id(), path)],
                           [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])
        finally:
            os.close(fd)
        _, status, payload = self._reply()
        if status:
            raise OSError(-status, f"FILE {path}: {payload!r}")
        return wire.FILE_OUT.unpack_from(payload)[0]

    def setlk_many(self, handle: int, locks: list[tuple[int, int, int, int]],
                   window: int = 2048) -> None:
        """SETLK every (owner, type, start, end), `window` frames per write."""
        for i in range(0, len(locks), window):
            chunk = locks[i:i + window]
            self.s.sendall(b"".join(wire.lk(wire.T_SETLK, self._id(), handle, 0, o, t, a, b, 1)
                                    for o, t, a, b in chunk))
            for _ in chunk:
                _, status, _ = self._reply()
                if status:
                    raise OSError(-status, f"{self.guest}: SETLK failed")

    def pairs(self, handle: int, n: int, start: int, owner: int = 1) -> float:
        """Seconds per synchronous write lock + unlock pair on byte `start`."""
        send, reply, lk = self.s.sendall, self._reply, wire.lk
        t0 = time.perf_counter()
        for _ in range(n):
            send(lk(wire.T_SETLK, self._id(), handle, 0, owner, F_WRLCK, start, start, 1))
            if reply()[1]:
                raise OSError("bench pair: lock refused")
            send(lk(wire.T_SETLK, self._id(), handle, 0, owner, F_UNLCK, start, start, 1))
            if reply()[1]:
                raise OSError("bench pair: unlock refused")
        return (time.perf_counter() - t0) / n

    def close(self) -> None:
        self.s.close()


def embedded(seconds: float, path: str, journal: str | None = None) -> float:
    from lockd.engine.durability import LEASE_S
    from lockd.engine.manager import LockManager

    j = None
    if journal:
        from lockd.journal.store import Journal

        j = Journal(journal)
    # With a journal: leases as `vfs-lockd mount --journal` uses them.
    m = LockManager(journal=j, lease_s=LEASE_S if j is not None else 0.0)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    ref = m.file(fd, path)
    n = 0
    t0 = time.perf_counter()
    end = t0 + seconds
    while time.perf_counter() < end:
        for _ in range(100):
            m.setlk("g", 1, ref, F_WRLCK, 0, 99, 1)
            m.setlk("g", 1, ref, F_UNLCK, 0, 99, 1)
        n += 200
    el = time.perf_counter() - t0
    m.put_file(ref)
    os.close(fd)
    return n / el


class Pool:
    def __init__(self, sock: str, tmp: str, name: str, count: int, window: int, mode: str):
        self.procs = []
        for i in range(count):
            guest = f"{name}-{i}"
            p = subprocess.Popen(
                [sys.executable, __file__, "--worker", sock, guest, f"{tmp}/{guest}",
                 str(window), mode], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            self.procs.append(p)
        for p in self.procs:
            if p.stdout.readline().strip() != "ready":
                raise SystemExit("worker failed to start")

    def run(self, seconds: float) -> float:
        for p in self.procs:
            p.stdin.write(f"run {seconds}\n")
            p.stdin.flush()
        total = 0.0
        for p in self.procs:
            n, el = p.stdout.readline().split()
            total += int(n) / float(el)
        return total

    def close(self) -> None:
        for p in self.procs:
            try:
                p.stdin.close()
            except OSError:
                pass
        for p in self.procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=1.0)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--window", type=int, default=64, help="lock+unlock pairs per batch")
    ap.add_argument("--conns", default="1,8,64")
    ap.add_argument("--sync", action="store_true", help="also LockClient, one call at a time")
    args = ap.parse_args()
    conns = [int(x) for x in args.conns.split(",")]
    tmp = tempfile.mkdtemp(prefix="bench-daemon-")
    sock = f"{tmp}/lockd.sock"
    exe = os.path.join(os.path.dirname(sys.executable), "vfs-lockd")
    daemon = subprocess.Popen([exe, "serve", "--socket", sock, "--journal", f"{tmp}/j.db"],
                              stderr=subprocess.DEVNULL)
    pools: dict[str, Pool] = {}
    try:
        for _ in range(100):
            if os.path.exists(sock):
                break
            time.sleep(0.05)
        for n in conns:
            pools[f"pipelined x{n}"] = Pool(sock, tmp, f"p{n}", n, args.window, "pipe")
        if args.sync:
            for n in (1, 8):
                pools[f"sync LockClient x{n}"] = Pool(sock, tmp, f"s{n}", n, 1, "sync")
        import importlib.util

        has_journal = importlib.util.find_spec("lockd.journal.store") is not None
        results: dict[str, list[float]] = {"embedded": []}
        ratios: dict[str, list[float]] = {}
        for r in range(args.rounds):
            emb = embedded(args.seconds, f"{tmp}/embedded")
            results["embedded"].append(emb)
            if has_journal:  # the daemon journals; so does this embedded run
                ej = embedded(args.seconds, f"{tmp}/embedded", f"{tmp}/embedded-{r}.db")
                results.setdefault("embedded+journal", []).append(ej)
                ratios.setdefault("embedded+journal", []).append(ej / emb)
            for name, pool in pools.items():
                ops = pool.run(args.seconds)
                results.setdefault(name, []).append(ops)
                ratios.setdefault(name, []).append(ops / emb)
            print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
        print(f"lock+unlock pairs, {args.seconds}s x {args.rounds} rounds, "
              f"window {args.window} pairs; medians")
        print(f"{'mode':<24}{'ops/s':>12}{'us/op':>10}{'ratio to embedded':>20}")
        for name, vals in results.items():
            med = statistics.median(vals)
            ratio = statistics.median(ratios[name]) if name in ratios else 1.0
            print(f"{name:<24}{med:>12,.0f}{1e6 / med:>10.2f}{ratio:>20.2f}")
    finally:
        for pool in pools.values():
            pool.close()
        daemon.terminate()
        daemon.wait(10)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), sys.argv[6])
    else:
        main()
