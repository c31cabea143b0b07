#!/usr/bin/env python3
"""Cross-host locking through vfs-lockd vs the bare cluster file system, for GlusterFS
and CephFS side by side (Part 9, issue 20).

Sets up two hosts per cluster file system (rig/cluster.py: rig/hosts.py for GlusterFS,
rig/ceph.py for CephFS), one `vfs-lockd serve` and one guest per host, and measures in
interleaved rounds (each round visits every target, in alternating order):
- pair: F_SETLK write lock + unlock of one byte, by a process on host 1 (the host
  without the servers), on a file both hosts use; microseconds per pair;
- handoff: a process on one host holds the lock, one on the other host waits in
  F_SETLKW (we wait until the kernel shows it in the syscall); the time from the holder's
  unlock call to the waiter's grant (one clock: both hosts are on this machine). Holder
  and waiter swap every time; the median of a round's handoffs;
- pingpong: ctdb's ping_pong across hosts: one process per host on a file of 3 one-byte
  locks; each holds byte i, waits for byte i+1 (mod 3), then lets byte i go, around and
  around; microseconds per step (the mean of both processes' rates).
Targets per file system: `bare` (processes on the hosts' mounts) and `vfs-lockd`
(processes in the guests' FUSE mounts, each guest on its host's daemon); and a control,
`local` (the same on host 0's local disk: bare processes, or a guest of host 0's daemon
serving a local directory), for what vfs-lockd's own path costs. Prints medians over
rounds and the ratios vfs-lockd / bare; everything is torn down at the end.

Run as root: .venv/bin/python scripts/bench_hosts.py [--cluster gluster,ceph] [--rounds 5]
    [--pairs 300] [--handoffs 20] [--steps 300] [--no-local] [--json OUT]
(scripts/bench_gluster.py and scripts/bench_ceph.py are this with other defaults;
`scripts/bench --cluster ceph` puts it in the full benchmark.)
"""

from __future__ import annotations

import argparse
import json
import os
import select
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rig.cluster import ClusterHosts, HostsError, cluster_class  # noqa: E402

# Where each file system's benchmark cluster lives (own names: they run side by side).
PLACES = {"gluster": ("/var/tmp/vfs-lockd-bench-gluster", "vlb", "10.216"),
          "ceph": ("/var/tmp/vfs-lockd-bench-ceph", "vlbc", "10.220")}
KINDS = tuple(PLACES)
PINGPONG_LOCKS = 3  # processes + 1, as ctdb's ping_pong wants

WORKER = textwrap.dedent(
    r"""
    import fcntl, os, struct, sys, time
    fd = os.open(sys.argv[1], os.O_RDWR)
    def lk(t, start, cmd=fcntl.F_SETLK):
        fcntl.fcntl(fd, cmd, struct.pack("hhqqi4x", t, 0, start, 1, 0))
    print("ready", flush=True)
    for line in sys.stdin:
        cmd, *a = line.split()
        if cmd == "pairs":
            n = int(a[0])
            t0 = time.perf_counter_ns()
            for _ in range(n):
                lk(fcntl.F_WRLCK, 0)
                lk(fcntl.F_UNLCK, 0)
            print((time.perf_counter_ns() - t0) / n / 1000, flush=True)
        elif cmd == "lock":
            lk(fcntl.F_WRLCK, 0, fcntl.F_SETLKW)
            print(time.monotonic_ns(), flush=True)
        elif cmd == "unlock":
            t = time.monotonic_ns()
            lk(fcntl.F_UNLCK, 0)
            print(t, flush=True)
        elif cmd == "gate":  # hold the start line (byte 100) until "ungate"
            lk(fcntl.F_WRLCK, 100)
            print("ok", flush=True)
        elif cmd == "ungate":
            lk(fcntl.F_UNLCK, 100)
            print("ok", flush=True)
        elif cmd == "pingpong":  # pingpong NLOCKS STEPS [rw]: ctdb's ping_pong loop
            nl, steps = int(a[0]), int(a[1])
            rw = a[2:] == ["rw"]  # ping_pong -rw: read and bump the locked byte
            lk(fcntl.F_RDLCK, 100, fcntl.F_SETLKW)  # wait at the start line
            lk(fcntl.F_UNLCK, 100)
            i = 0
            lk(fcntl.F_WRLCK, i + 1, fcntl.F_SETLKW)
            t0 = time.perf_counter_ns()
            for _ in range(steps):
                j = (i + 1) % nl
                lk(fcntl.F_WRLCK, j + 1, fcntl.F_SETLKW)
                if rw:
                    b = os.pread(fd, 1, j + 1)
                    os.pwrite(fd, bytes([(b[0] + 1) % 256 if b else 1]), j + 1)
                lk(fcntl.F_UNLCK, i + 1)
                i = j
            t = time.perf_counter_ns() - t0
            lk(fcntl.F_UNLCK, i + 1)
            print(t / steps / 1000, flush=True)
    """
)

F_SETLKW = 7
SYS_FCNTL = 72  # x86_64


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

    def in_setlkw(self) -> bool:
        """Is the worker blocked in fcntl(F_SETLKW) (per /proc/PID/syscall)?"""
        try:
            parts = Path(f"/proc/{self.p.pid}/syscall").read_text().split()
        except OSError:
            return False
        return (len(parts) > 2 and parts[0].isdigit() and int(parts[0]) == SYS_FCNTL
                and int(parts[2], 16) == F_SETLKW)

    def close(self) -> None:
        if self.p.poll() is None:
            self.p.kill()
        self.p.wait()


def pair_us(w: Worker, n: int) -> float:
    return float(w.do(f"pairs {n}"))


def wait_blocked(ws: list[Worker], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not all(w.in_setlkw() for w in ws):
        if time.monotonic() > deadline:
            raise TimeoutError("a worker never blocked in F_SETLKW")
        time.sleep(0.0005)


def handoffs_us(a: Worker, b: Worker, n: int, settle: float = 0.003) -> list[float]:
    """n handoffs, alternating direction; microseconds each."""
    out = []
    holder, waiter = a, b
    holder.do("lock")
    for _ in range(n):
        waiter.send("lock")
        wait_blocked([waiter])  # the waiter's syscall is in the kernel...
        time.sleep(settle)  # ...and its request has reached the lock server
        t_rel = int(holder.do("unlock"))
        t_got = int(waiter.read())
        out.append((t_got - t_rel) / 1000)
        holder, waiter = waiter, holder
    holder.do("unlock")
    return out


def pingpong_us(a: Worker, b: Worker, gate: Worker, steps: int, rw: bool = False) -> float:
    """ping_pong with one process per host, both released from a start line at once;
    microseconds per step (the mean of both). rw: ping_pong -rw (each step reads and
    writes the byte it locked)."""
    assert gate.do("gate") == "ok"
    for w in (a, b):
        w.send(f"pingpong {PINGPONG_LOCKS} {steps}{' rw' if rw else ''}")
    wait_blocked([a, b])
    time.sleep(0.003)
    assert gate.do("ungate") == "ok"
    return statistics.mean(float(w.read(600)) for w in (a, b))


def setup(kind: str) -> tuple[ClusterHosts, dict[str, tuple[Path, Path]]]:
    """kind's two hosts, a daemon and a guest each; the file both targets use."""
    base, prefix, subnet = PLACES[kind]
    c = cluster_class(kind)(base, hosts=2, prefix=prefix, subnet=subnet)
    c.teardown()
    t0 = time.monotonic()
    c.setup()
    took = time.monotonic() - t0
    sub = "bench"
    (c.hosts[0].mount / sub).mkdir(exist_ok=True)
    (c.hosts[0].mount / sub / "f").write_bytes(b"\0" * 128)
    guest_mp = {}
    for h in c.hosts:
        c.start_lockd(h)
        _p, guest_mp[h.index] = c.start_guest(h, f"g{h.index}", sub)
    mem = c.memory()
    print(f"{c.KIND}: set up in {took:.1f} s"
          + (f", {sum(mem.values()) / 1024:.0f} MiB RSS" if mem else ""), flush=True)
    return c, {"bare": (c.hosts[0].mount / sub / "f", c.hosts[1].mount / sub / "f"),
               "vfs-lockd": (guest_mp[0] / "f", guest_mp[1] / "f")}


def local_control(c: ClusterHosts) -> dict[str, tuple[Path, Path]]:
    """The same measurements on one host's local disk, for what vfs-lockd's own path
    costs: two processes on a local directory (`bare`: the host kernel's locks), or in a
    guest serving it on host 0's daemon (`vfs-lockd`)."""
    d = c.base / "local"
    d.mkdir(exist_ok=True)
    (d / "f").write_bytes(b"\0" * 128)
    _p, mp = c.start_guest(c.hosts[0], "local", source=d)
    return {"bare": (d / "f", d / "f"), "vfs-lockd": (mp / "f", mp / "f")}


METRICS = ("pair_us", "handoff_us", "pingpong_us")


def run(kinds: tuple[str, ...] = KINDS, rounds: int = 5, pairs: int = 300, handoffs: int = 20,
        steps: int = 300, log=print, local: bool = True) -> dict:  # noqa: ANN001
    """The measurements; returns {"rounds": {target: {metric: [...]}}, "summary": ...,
    "setup": {kind: {seconds, memory_kib}}}. Targets are "KIND bare" / "KIND vfs-lockd",
    and with `local` "local bare" / "local vfs-lockd" (see local_control)."""
    clusters: list[ClusterHosts] = []
    workers: list[Worker] = []
    info: dict = {}
    try:
        ws: dict[str, tuple[Worker, Worker, Worker]] = {}
        for kind in kinds:
            t0 = time.monotonic()
            c, paths = setup(kind)
            clusters.append(c)
            info[c.KIND] = {"seconds": round(time.monotonic() - t0, 1),
                            "memory_kib": c.memory()}
            for t, (p0, p1) in paths.items():
                ws[f"{c.KIND} {t}"] = (Worker(p0), Worker(p1), Worker(p0))  # + the gate
                workers += ws[f"{c.KIND} {t}"]
        if local and clusters:
            for t, (p0, p1) in local_control(clusters[0]).items():
                ws[f"local {t}"] = (Worker(p0), Worker(p1), Worker(p0))
                workers += ws[f"local {t}"]
        res: dict = {t: {m: [] for m in METRICS} for t in ws}
        for r in range(rounds):
            order = list(ws) if r % 2 == 0 else list(reversed(ws))
            for t in order:
                w0, w1, gate = ws[t]
                res[t]["pair_us"].append(pair_us(w1, pairs))
                res[t]["handoff_us"].append(statistics.median(handoffs_us(w0, w1,
                                                                          handoffs)))
                res[t]["pingpong_us"].append(pingpong_us(w0, w1, gate, steps))
            log(f"round {r + 1}/{rounds}: " + "; ".join(
                f"{t} pair {res[t]['pair_us'][-1]:.0f} handoff {res[t]['handoff_us'][-1]:.0f}"
                f" pingpong {res[t]['pingpong_us'][-1]:.0f}" for t in ws))
        summary: dict = {t: {m: round(statistics.median(v), 1) for m, v in d.items()}
                         for t, d in res.items()}
        return {"rounds": res, "summary": summary, "setup": info,
                "config": {"rounds": rounds, "pairs": pairs, "handoffs": handoffs,
                           "steps": steps}}
    finally:
        for w in workers:
            w.close()
        for c in clusters:
            for left in c.teardown():
                log(f"teardown of {c.KIND}: {left}")


def report(res: dict) -> list[str]:
    """Lines: per metric, every target's median and the ratios."""
    s = res["summary"]
    kinds = list(dict.fromkeys(t.rsplit(" ", 1)[0] for t in s))  # in the order asked
    out = []
    for m in METRICS:
        for k in kinds:
            ours, bare = s[f"{k} vfs-lockd"][m], s[f"{k} bare"][m]
            out.append(f"{m[:-3]}, {k}: vfs-lockd {ours:.0f} us, bare {bare:.0f} us: "
                       f"{ours / bare:.2f}x")
        fs = [k for k in kinds if k != "local"]
        if len(fs) == 2:
            a, b = fs
            out.append(f"{m[:-3]}, {a} / {b}: bare {s[f'{a} bare'][m] / s[f'{b} bare'][m]:.2f}x,"
                       f" vfs-lockd {s[f'{a} vfs-lockd'][m] / s[f'{b} vfs-lockd'][m]:.2f}x")
    for kind, d in res.get("setup", {}).items():
        mem = d.get("memory_kib") or {}
        out.append(f"{kind}: setup {d['seconds']} s"
                   + (f", RSS {sum(mem.values()) / 1024:.0f} MiB ("
                      + ", ".join(f"{n} {v / 1024:.0f}" for n, v in sorted(mem.items())) + ")"
                      if mem else ""))
    return out


def main(argv: list[str] | None = None, default_kinds: tuple[str, ...] = KINDS,
         doc: str | None = None) -> int:
    ap = argparse.ArgumentParser(description=doc or __doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cluster", default=",".join(default_kinds),
                    help=f"comma-separated: {','.join(KINDS)}")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--pairs", type=int, default=300)
    ap.add_argument("--handoffs", type=int, default=20)
    ap.add_argument("--steps", type=int, default=300, help="ping_pong steps per round")
    ap.add_argument("--no-local", action="store_true",
                    help="leave out the local-disk control (vfs-lockd's own cost)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    kinds = tuple(k.strip() for k in a.cluster.split(",") if k.strip())
    bad = [k for k in kinds if k not in KINDS]
    if bad or not kinds:
        ap.error(f"--cluster: choose from {','.join(KINDS)}")
    if os.geteuid() != 0:
        ap.error("run as root (network namespaces, mounts)")
    try:
        res = run(kinds, a.rounds, a.pairs, a.handoffs, a.steps, local=not a.no_local)
    except HostsError as exc:
        print(f"bench_hosts: {exc}", file=sys.stderr)
        return 1
    for line in report(res):
        print(line)
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
