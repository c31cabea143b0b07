#!/usr/bin/env python3
"""Benchmark crash recovery (Part 4): what the journal costs, how fast a restart re-takes
journaled locks, and how long a host process can steal a guest's lock while the daemon
is down, with and without the descriptor keeper. One run prints all three.

1. Throughput: `vfs-lockd serve` with the journal (and keeper, the default) vs the same
   daemon with the hidden `--no-journal` flag, the same 8 pipelined workers against each
   (bench_daemon's Pool), interleaved rounds; cost = 1 - on/off. Also `--no-keeper` (the
   journal alone) and the embedded manager with and without a journal, for context.
2. Recovery: a child process journals N locks (N/100 owners x 100 one-byte write locks,
   10 owners per file), is killed -9, then another child times Journal() + recover():
   without the keeper (every lock re-taken on a freshly opened description) and with it
   (descriptions taken back from the keeper, whose locks never left the host).
3. Steal window: a guest holds a write lock through a daemon; a host thread tries
   F_OFD_SETLK+unlock on the range every ~100 us; the daemon is killed -9 and restarted
   at once on the same socket and journal; window = time during which the host got it.

    .venv/bin/python scripts/bench_journal.py [--rounds 5] [--seconds 2]
        [--sizes 1000,10000,100000] [--steal-runs 5] [--quick] [--json FILE]
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import os
import platform
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from lockd.api import F_UNLCK, F_WRLCK  # noqa: E402
from lockd.engine import ofd  # noqa: E402

_spec = importlib.util.spec_from_file_location("bench_daemon", os.path.join(HERE,
                                                                           "bench_daemon.py"))
bd = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bd)

EXE = os.path.join(os.path.dirname(sys.executable), "vfs-lockd")
LOCKS_PER_OWNER = 100
OWNERS_PER_FILE = 10


# ---------------------------------------------------------------- helpers
def machine() -> dict:
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    from lockd.native import HAVE_NATIVE

    return {"cores": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0)),
            "cpu": cpu, "kernel": platform.release(), "python": platform.python_version(),
            "sqlite": sqlite3.sqlite_version, "native": HAVE_NATIVE}


def summary(vals: list[float]) -> dict:
    return {"median": statistics.median(vals), "min": min(vals), "max": max(vals),
            "values": vals}


def fmt(s: dict, scale: float = 1.0, spec: str = ",.0f") -> str:
    return (f"{s['median'] * scale:{spec}} (min {s['min'] * scale:{spec}}, "
            f"max {s['max'] * scale:{spec}})")


class Daemon:
    """`vfs-lockd serve` with its JSON log lines collected (monotonic arrival time)."""

    def __init__(self, sock: str, journal: str, *extra: str) -> None:
        self.sock, self.journal = sock, journal
        self.proc = subprocess.Popen([EXE, "serve", "--socket", sock, "--journal", journal,
                                      *extra], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)
        self.events: list[tuple[float, dict]] = []
        self._cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            t = time.monotonic()
            try:
                rec = json.loads(line)
            except ValueError:
                rec = {"event": "text", "line": line.rstrip()}
            with self._cond:
                self.events.append((t, rec))
                self._cond.notify_all()
        with self._cond:
            self.events.append((time.monotonic(), {"event": "eof"}))
            self._cond.notify_all()

    def wait_event(self, name: str, timeout: float = 30.0) -> tuple[float, dict]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for t, rec in self.events:
                    if rec.get("event") == name:
                        return t, rec
                    if rec.get("event") == "eof":
                        raise RuntimeError(f"daemon exited before {name!r}: {self.events}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RuntimeError(f"daemon: no {name!r} within {timeout}s")
                self._cond.wait(left)

    def kill9(self) -> None:
        self.proc.kill()
        self.proc.wait()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def status(sock: str) -> dict:
    out = subprocess.run([EXE, "status", "--socket", sock, "--json"], capture_output=True,
                         text=True, timeout=30, check=True).stdout
    return json.loads(out)


def child(args: list[str], **kw: object) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, __file__, "--child", *args], text=True, **kw)


def reap_keepers(tmp: str) -> int:
    """Kill keeper processes still serving a journal under `tmp` (started by this run)."""
    pids = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if b"lockd.journal.keeper" in argv and any(a.startswith(tmp.encode()) for a in argv):
            pids.append(int(pid))
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return len(pids)


# ---------------------------------------------------------------- children
def child_build(journal: str, data: str, n: int, use_keeper: bool) -> None:
    """Journal n locks, report, then wait to be killed -9."""
    from lockd.engine.manager import LockManager
    from lockd.journal.keeper import ensure_keeper, keeper_address
    from lockd.journal.store import Journal

    m = LockManager(journal=Journal(journal))
    deferred = hasattr(m, "defer_journal")
    if deferred:
        m.defer_journal = True
    if use_keeper:
        m.keeper = ensure_keeper(keeper_address(journal), journal)
    owners = max(1, n // LOCKS_PER_OWNER)
    nfiles = max(1, owners // OWNERS_PER_FILE)
    refs = []
    for i in range(nfiles):
        path = f"{data}/f{i}"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        refs.append(m.file(fd, path))
        os.close(fd)
    t0 = time.perf_counter()
    for o in range(owners):
        ref, slot = refs[o % nfiles], o // nfiles
        for k in range(LOCKS_PER_OWNER):
            s = (slot * LOCKS_PER_OWNER + k) * 2  # one byte each, never adjacent
            rc = m.setlk(f"g{o % 10}", o + 1, ref, F_WRLCK, s, s, 1000 + o)
            if rc:
                raise SystemExit(f"build: setlk failed with errno {rc}")
        if deferred:
            m.flush_journal()
    if deferred:
        m.flush_journal()
    st = m.stats()
    print(json.dumps({"build_s": time.perf_counter() - t0, "deferred": deferred,
                      "owners": owners, "files": nfiles, "held": st["held_locks"],
                      "descriptions": st["descriptions"]}), flush=True)
    sys.stdin.read()  # until killed


def child_recover(journal: str, use_keeper: bool) -> None:
    from lockd.engine.manager import LockManager
    from lockd.journal.keeper import ensure_keeper, keeper_address
    from lockd.journal.store import Journal

    t0 = time.perf_counter()
    j = Journal(journal)
    t1 = time.perf_counter()
    m = LockManager(journal=j)
    fds = None
    if use_keeper:
        k = ensure_keeper(keeper_address(journal), journal)
        fds = k.take_all()
        m.keeper = k
    t2 = time.perf_counter()
    rep = m.recover(fds)
    t3 = time.perf_counter()
    print(json.dumps({"open_s": t1 - t0, "take_all_s": t2 - t1, "recover_s": t3 - t2,
                      "total_s": t3 - t0, "keeper_fds": len(fds or {}), "report": rep}),
          flush=True)
    os._exit(0)  # like a crash: the keeper keeps its descriptions


def child_guest(sock: str, path: str) -> None:
    from lockd.daemon.client import LockClient

    guest = "steal-guest"
    c = LockClient(sock, guest)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    ref = c.file(fd, path)
    print("locked", c.setlk(guest, 7, ref, F_WRLCK, 0, 99, os.getpid()), flush=True)
    sys.stdin.read()  # hold until the parent closes stdin
    c.close()


# ---------------------------------------------------------------- 1. throughput
def bench_throughput(tmp: str, args: argparse.Namespace) -> dict:
    configs = {"journal on": (), "journal off": ("--no-journal",),
               "journal on, no keeper": ("--no-keeper",)}
    daemons: dict[str, Daemon] = {}
    pools: dict[str, object] = {}
    vals: dict[str, list[float]] = {k: [] for k in configs}
    vals.update({"embedded": [], "embedded+journal": []})
    costs: list[float] = []
    try:
        for i, (name, extra) in enumerate(configs.items()):
            d = daemons[name] = Daemon(f"{tmp}/t{i}.sock", f"{tmp}/t{i}.db", *extra)
            d.wait_event("serving")
            pools[name] = bd.Pool(d.sock, tmp, f"w{i}", 8, args.window, "pipe")
        for r in range(args.rounds):
            order = list(configs) if r % 2 == 0 else list(reversed(configs))
            got = {}
            for name in order:  # A B C, then C B A: no config always goes first
                got[name] = pools[name].run(args.seconds)
                vals[name].append(got[name])
            costs.append(1 - got["journal on"] / got["journal off"])
            vals["embedded"].append(bd.embedded(args.seconds, f"{tmp}/emb"))
            vals["embedded+journal"].append(
                bd.embedded(args.seconds, f"{tmp}/emb", f"{tmp}/emb-{r}.db"))
            print(f"  throughput round {r + 1}/{args.rounds}: on {got['journal on']:,.0f}"
                  f" off {got['journal off']:,.0f} ops/s", file=sys.stderr)
    finally:
        for p in pools.values():
            p.close()
        for d in daemons.values():
            d.stop()
    out = {k: summary(v) for k, v in vals.items()}
    out["cost"] = summary(costs)
    out["embedded_cost"] = summary([1 - a / b for a, b in
                                    zip(vals["embedded+journal"], vals["embedded"],
                                        strict=True)])
    return out


# ---------------------------------------------------------------- 2. recovery
def journal_files(j: str) -> list[str]:
    """Every file of the journal at j but SQLite's shared-memory index (rebuilt on open)."""
    return [f for f in glob.glob(glob.escape(j) + "*") if not f.endswith("-shm")]


def bench_recovery(tmp: str, args: argparse.Namespace) -> dict:
    out: dict = {}
    for n in args.sizes:
        dirs = {}
        for mode in ("no keeper", "keeper"):
            d = f"{tmp}/rec-{n}-{mode.replace(' ', '')}"
            os.makedirs(d)
            j = f"{d}/journal.db"
            p = child(["build", j, d, str(n), str(int(mode == "keeper"))],
                      stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            try:
                line = p.stdout.readline()
                if not line:
                    raise RuntimeError(f"build of {n} locks failed")
                build = json.loads(line)
            finally:
                p.kill()  # kill -9 while it holds every lock
                p.wait()
            # Snapshot the journal as the crash left it (the SQLite file, its WAL and the
            # change logs not yet checkpointed); each round recovers from it.
            os.makedirs(f"{d}/crash")
            for f in journal_files(j):
                shutil.copyfile(f, f"{d}/crash/{os.path.basename(f)}")
            dirs[mode] = j
            out.setdefault(n, {})[mode] = {"build": build, "rounds": []}
            print(f"  built {n:,} locks ({mode}) in {build['build_s']:.1f}s",
                  file=sys.stderr)
        for r in range(args.rounds):
            for mode, j in (dirs.items() if r % 2 == 0 else reversed(dirs.items())):
                for f in glob.glob(glob.escape(j) + "*"):
                    os.unlink(f)
                crash = os.path.join(os.path.dirname(j), "crash")
                for f in os.listdir(crash):
                    shutil.copyfile(os.path.join(crash, f), os.path.join(os.path.dirname(j), f))
                p = child(["recover", j, str(int(mode == "keeper"))], stdout=subprocess.PIPE)
                try:
                    line, _ = p.communicate(timeout=600)
                finally:
                    if p.poll() is None:
                        p.kill()
                        p.wait()
                res = json.loads(line)
                if res["report"]["locks"] != n or res["report"]["lost"]:
                    raise RuntimeError(f"recovery of {n} ({mode}) was wrong: {res}")
                out[n][mode]["rounds"].append(res)
            print(f"  recovery {n:,} round {r + 1}/{args.rounds}", file=sys.stderr)
        for mode in dirs:
            rs = out[n][mode]["rounds"]
            for key in ("recover_s", "total_s", "open_s", "take_all_s"):
                out[n][mode][key] = summary([x[key] for x in rs])
            out[n][mode]["from_keeper"] = rs[-1]["report"]["from_keeper"]
    return out


# ---------------------------------------------------------------- 3. steal window
class Prober(threading.Thread):
    """A host process's own description, trying the guest's range every ~100 us."""

    def __init__(self, path: str) -> None:
        super().__init__(daemon=True)
        self.fd = os.open(path, os.O_RDWR)
        self.samples: list[tuple[float, bool]] = []
        self.halt = False

    def run(self) -> None:
        fd, samples = self.fd, self.samples
        while not self.halt:
            t = time.monotonic()
            ok = ofd.setlk(fd, F_WRLCK, 0, 99) == 0
            if ok:
                ofd.setlk(fd, F_UNLCK, 0, 99)
            samples.append((t, ok))
            time.sleep(0.0001)
        os.close(fd)


def window(samples: list[tuple[float, bool]]) -> tuple[float, int]:
    """Total time the host held the range: each run of successes counts from its first
    success to the first failed probe after it. Returns (seconds, successful probes)."""
    total, start, hits = 0.0, None, 0
    for t, ok in samples:
        if ok:
            hits += 1
            if start is None:
                start = t
        elif start is not None:
            total += t - start
            start = None
    if start is not None:
        total += samples[-1][0] - start
    return total, hits


def steal_run(tmp: str, i: int, keeper: bool) -> dict:
    d = f"{tmp}/steal-{i}-{'k' if keeper else 'n'}"
    os.makedirs(d)
    sock, j, path = f"{d}/lockd.sock", f"{d}/journal.db", f"{d}/data"
    extra = () if keeper else ("--no-keeper",)
    daemons = [Daemon(sock, j, *extra)]
    guest = prober = None
    try:
        daemons[0].wait_event("serving")
        guest = child(["guest", sock, path], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        if guest.stdout.readline().split() != ["locked", "0"]:
            raise RuntimeError("guest could not take its lock")
        prober = Prober(path)
        prober.start()
        time.sleep(0.1)
        t0 = time.monotonic()
        daemons[0].kill9()
        daemons.append(Daemon(sock, j, *extra))
        t_serving, _ = daemons[1].wait_event("serving")
        time.sleep(0.5)
        prober.halt = True
        prober.join()
        st = status(sock)
    finally:
        if prober is not None and prober.is_alive():
            prober.halt = True
            prober.join()
        if guest is not None:
            guest.stdin.close()
            try:
                guest.wait(10)
            except subprocess.TimeoutExpired:
                guest.kill()
                guest.wait()
        for dm in daemons:
            dm.stop()
    before = [s for s in prober.samples if s[0] < t0]
    after = [s for s in prober.samples if s[0] >= t0]
    win, hits = window(after)
    rec = (st.get("recovery") or {})
    return {"keeper": keeper, "window_s": win, "stolen_probes": hits, "probes": len(after),
            "stolen_before_kill": sum(ok for _, ok in before),
            "held_at_end": not any(ok for _, ok in after[-50:]),
            "kill_to_serving_s": t_serving - t0, "lost": rec.get("lost"),
            "recovered_locks": rec.get("locks"), "from_keeper": rec.get("from_keeper")}


def bench_steal(tmp: str, args: argparse.Namespace) -> dict:
    runs: dict[str, list[dict]] = {"no keeper": [], "keeper": []}
    for i in range(args.steal_runs):
        for keeper in ((False, True) if i % 2 == 0 else (True, False)):
            runs["keeper" if keeper else "no keeper"].append(steal_run(tmp, i, keeper))
        print(f"  steal run {i + 1}/{args.steal_runs}", file=sys.stderr)
    out = {}
    for mode, rs in runs.items():
        out[mode] = {"window_s": summary([r["window_s"] for r in rs]),
                     "kill_to_serving_s": summary([r["kill_to_serving_s"] for r in rs]),
                     "runs_with_lost_lock": sum(bool(r["lost"]) for r in rs),
                     "runs_with_steal": sum(r["stolen_probes"] > 0 for r in rs),
                     "runs_held_at_end": sum(r["held_at_end"] for r in rs),
                     "runs": rs}
    return out


# ---------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=2.0, help="per throughput measurement")
    ap.add_argument("--sizes", default="1000,10000,100000")
    ap.add_argument("--steal-runs", type=int, default=5)
    ap.add_argument("--window", type=int, default=64, help="lock+unlock pairs per batch")
    ap.add_argument("--quick", action="store_true", help="small sizes, 2 rounds")
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.seconds, args.steal_runs = 2, 0.5, 2
        args.sizes = "1000,10000"
    args.sizes = [int(x) for x in args.sizes.split(",")]

    info = machine()
    print(f"machine: {info['cores']} cores ({info['usable_cores']} usable), {info['cpu']}; "
          f"kernel {info['kernel']}; Python {info['python']}; SQLite {info['sqlite']}; "
          f"native ofd {info['native']}")
    print(f"command: {' '.join([os.path.relpath(sys.executable, ROOT)] + sys.argv)}")
    tmp = tempfile.mkdtemp(prefix="bench-journal-")
    result: dict = {"machine": info, "args": {k: v for k, v in vars(args).items()}}
    try:
        print("\n1. lock throughput, 8 pipelined workers (lock+unlock pairs, window "
              f"{args.window}), {args.seconds}s x {args.rounds} interleaved rounds; "
              "median (min, max) ops/s", flush=True)
        tp = result["throughput"] = bench_throughput(tmp, args)
        for name in ("journal on", "journal off", "journal on, no keeper", "embedded",
                     "embedded+journal"):
            print(f"   {name:<24}{fmt(tp[name])}")
        print(f"   journal cost (1 - on/off, per round): {fmt(tp['cost'], 100, '.1f')} %"
              "   target < 30 %")
        print(f"   embedded journal cost: {fmt(tp['embedded_cost'], 100, '.1f')} % "
              "(embedded commits once per call: no defer_journal group commit)")

        print("\n2. recovery after kill -9 (child builds, child recovers; "
              f"{LOCKS_PER_OWNER} locks/owner, {OWNERS_PER_FILE} owners/file); "
              f"median (min, max) s over {args.rounds} rounds", flush=True)
        rec = result["recovery"] = bench_recovery(tmp, args)
        for n, modes in rec.items():
            for mode, r in modes.items():
                b = r["build"]
                print(f"   {n:>7,} locks {mode:<9} recover() {fmt(r['recover_s'], 1, '.3f')}"
                      f"  Journal()+recover {fmt(r['total_s'], 1, '.3f')}"
                      + (f"  take_all {r['take_all_s']['median']:.3f}" if mode == "keeper"
                         else "")
                      + f"  [{b['owners']} owners, {b['files']} files, built in "
                      f"{b['build_s']:.1f}s{', deferred' if b['deferred'] else ''}]")
        big = max(rec)
        print(f"   target: 100,000 in < 1 s; largest ({big:,}): no keeper "
              f"{rec[big]['no keeper']['recover_s']['median']:.3f} s, keeper "
              f"{rec[big]['keeper']['recover_s']['median']:.3f} s")

        print(f"\n3. lock-steal window, kill -9 + immediate restart, {args.steal_runs} runs "
              "each; median (min, max)", flush=True)
        st = result["steal"] = bench_steal(tmp, args)
        for mode, s in st.items():
            print(f"   {mode:<9} window {fmt(s['window_s'], 1e3, '.1f')} ms   "
                  f"kill->serving {fmt(s['kill_to_serving_s'], 1e3, '.0f')} ms   "
                  f"runs with a steal {s['runs_with_steal']}/{len(s['runs'])}, "
                  f"lost lock {s['runs_with_lost_lock']}/{len(s['runs'])}, "
                  f"guest still holding at end {s['runs_held_at_end']}/{len(s['runs'])}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # keepers exit once their journal is gone
        time.sleep(2.5)
        left = reap_keepers(tmp)
        if left:
            print(f"(killed {left} leftover keeper process(es))", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1, default=str)
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        kind, a = sys.argv[2], sys.argv[3:]
        if kind == "build":
            child_build(a[0], a[1], int(a[2]), a[3] == "1")
        elif kind == "recover":
            child_recover(a[0], a[1] == "1")
        else:
            child_guest(a[0], a[1])
    else:
        main()
