#!/usr/bin/env python3
"""Cross-host locking through vfs-lockd vs bare GlusterFS mounts (Part 9).

Sets up two GlusterFS hosts (rig/hosts.py), one `vfs-lockd serve` and one guest
per host, and measures in interleaved rounds (each round visits both targets):
- pair: F_SETLK write lock + unlock of one byte, by a process on host 1 (the host
  without the brick), on a file both hosts use;
- handoff: a process on one host holds the lock, one on the other host waits in
  F_SETLKW; the time from the holder's unlock call to the waiter's grant (one clock:
  both hosts are on this machine). Holder and waiter swap every time.
Targets: `bare` (processes on the hosts' GlusterFS mounts) and `vfs-lockd` (processes in
the guests' FUSE mounts, each guest on its host's daemon). Prints medians over rounds and
the ratio vfs-lockd / bare; everything is torn down at the end.

Run as root: .venv/bin/python scripts/bench_gluster.py [--rounds 5] [--pairs 300]
    [--handoffs 20] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import select
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rig.hosts import Cluster, HostsError  # noqa: E402

WORKER = textwrap.dedent(
    r"""
    import fcntl, os, struct, sys, time
    fd = os.open(sys.argv[1], os.O_RDWR)
    W = struct.pack("hhqqi4x", fcntl.F_WRLCK, 0, 0, 1, 0)
    U = struct.pack("hhqqi4x", fcntl.F_UNLCK, 0, 0, 1, 0)
    print("ready", flush=True)
    for line in sys.stdin:
        cmd, *a = line.split()
        if cmd == "pairs":
            n = int(a[0])
            t0 = time.perf_counter_ns()
            for _ in range(n):
                fcntl.fcntl(fd, fcntl.F_SETLK, W)
                fcntl.fcntl(fd, fcntl.F_SETLK, U)
            print((time.perf_counter_ns() - t0) / n / 1000, flush=True)
        elif cmd == "lock":
            fcntl.fcntl(fd, fcntl.F_SETLKW, W)
            print(time.monotonic_ns(), flush=True)
        elif cmd == "unlock":
            t = time.monotonic_ns()
            fcntl.fcntl(fd, fcntl.F_SETLK, U)
            print(t, flush=True)
    """
)


class Worker:
    def __init__(self, path: Path) -> None:
        self.p = subprocess.Popen([sys.executable, "-c", WORKER, str(path)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.read(20) == "ready"

    def send(self, line: str) -> None:
        assert self.p.stdin is not None
        self.p.stdin.write(line + "\n")
        self.p.stdin.flush()

    def read(self, timeout: float = 60) -> str:
        assert self.p.stdout is not None
        if not select.select([self.p.stdout], [], [], timeout)[0]:
            raise TimeoutError("worker did not answer")
        return self.p.stdout.readline().strip()

    def do(self, line: str, timeout: float = 60) -> str:
        self.send(line)
        return self.read(timeout)

    def close(self) -> None:
        if self.p.poll() is None:
            self.p.kill()
        self.p.wait()


def pair_us(w: Worker, n: int) -> float:
    return float(w.do(f"pairs {n}"))


def handoffs_us(a: Worker, b: Worker, n: int) -> list[float]:
    """n handoffs, alternating direction; microseconds each."""
    out = []
    holder, waiter = a, b
    holder.do("lock")
    for _ in range(n):
        waiter.send("lock")
        time.sleep(0.02)  # let the waiter block in F_SETLKW
        t_rel = int(holder.do("unlock"))
        t_got = int(waiter.read())
        out.append((t_got - t_rel) / 1000)
        holder, waiter = waiter, holder
    holder.do("unlock")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--pairs", type=int, default=300)
    ap.add_argument("--handoffs", type=int, default=20)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    c = Cluster("/var/tmp/vfs-lockd-bench-gluster", hosts=2, prefix="vlb", subnet="10.216")
    c.teardown()
    workers: list[Worker] = []
    try:
        c.setup()
        sub = "bench"
        (c.hosts[0].mount / sub).mkdir(exist_ok=True)
        (c.hosts[0].mount / sub / "f").write_bytes(b"\0" * 16)
        guest_mp = {}
        for h in c.hosts:
            c.start_lockd(h)
            _p, guest_mp[h.index] = c.start_guest(h, f"g{h.index}", sub)
        paths = {
            "bare": [c.hosts[i].mount / sub / "f" for i in (0, 1)],
            "vfs-lockd": [guest_mp[i] / "f" for i in (0, 1)],
        }
        ws = {}
        for t, (p0, p1) in paths.items():
            ws[t] = (Worker(p0), Worker(p1))
            workers += ws[t]
        res: dict = {t: {"pair_us": [], "handoff_us": []} for t in paths}
        for r in range(a.rounds):
            order = list(paths) if r % 2 == 0 else list(reversed(paths))
            for t in order:
                w0, w1 = ws[t]
                res[t]["pair_us"].append(pair_us(w1, a.pairs))
                res[t]["handoff_us"].append(statistics.median(handoffs_us(w0, w1,
                                                                          a.handoffs)))
            print(f"round {r + 1}/{a.rounds}: " + ", ".join(
                f"{t} pair {res[t]['pair_us'][-1]:.0f} us handoff "
                f"{res[t]['handoff_us'][-1]:.0f} us" for t in paths), flush=True)
        summary = {t: {k: round(statistics.median(v), 1) for k, v in d.items()}
                   for t, d in res.items()}
        for k in ("pair_us", "handoff_us"):
            ratio = summary["vfs-lockd"][k] / summary["bare"][k]
            summary[f"ratio_{k}"] = round(ratio, 3)
            print(f"{k[:-3]}: vfs-lockd {summary['vfs-lockd'][k]:.0f} us, bare GlusterFS "
                  f"{summary['bare'][k]:.0f} us: ratio {ratio:.2f} "
                  f"(+{(ratio - 1) * 100:.0f} %)")
        if a.json:
            Path(a.json).write_text(json.dumps({"rounds": res, "summary": summary}, indent=1))
    except HostsError as exc:
        print(f"bench_gluster: {exc}", file=sys.stderr)
        return 1
    finally:
        for w in workers:
            w.close()
        for left in c.teardown():
            print(f"teardown: {left}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
