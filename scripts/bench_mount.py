#!/usr/bin/env python3
"""Benchmark the FUSE mount against the host kernel and bindfs (libfuse, C).

Interleaved in one run (each round visits every target, medians over rounds):
- lock+unlock pairs: fcntl F_SETLK write lock, then unlock, in one process;
- a plain FUSE round trip: os.stat with caching off (--cache none / bindfs timeouts 0);
- 256 MiB sequential write (then fsync) and read, 1 MiB blocks.
Targets: the host directory, `vfs-lockd mount` (embedded manager), `vfs-lockd mount
--lockd` (central daemon, when lockd.daemon.client and `vfs-lockd serve` work), and
`bindfs --multithreaded --enable-lock-forwarding`.

Run as root: .venv/bin/python scripts/bench_mount.py [--rounds N] [--pairs N] [--json OUT]
"""

from __future__ import annotations

import argparse
import fcntl
import importlib.util
import json
import os
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VFS_LOCKD = [sys.executable, "-c", "import sys; from lockd.cli import main; sys.exit(main())"]
WRLCK = struct.pack("hhqqi", fcntl.F_WRLCK, 0, 0, 0, 0)
UNLCK = struct.pack("hhqqi", fcntl.F_UNLCK, 0, 0, 0, 0)


def live(path: Path) -> bool:
    try:
        return os.path.ismount(path) and os.statvfs(path) is not None
    except OSError:
        return False


def wait_mounted(path: Path, proc: subprocess.Popen | None, what: str) -> None:
    deadline = time.monotonic() + 20
    while not live(path):
        if (proc is not None and proc.poll() is not None) or time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not mount at {path}")
        time.sleep(0.05)


def ensure_bindfs() -> bool:
    if shutil.which("bindfs"):
        return True
    print("bindfs missing: apt-get install -y bindfs", flush=True)
    for cmd in (["apt-get", "install", "-y", "bindfs"], ["apt-get", "update"], ["apt-get", "install", "-y", "bindfs"]):
        subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
        if shutil.which("bindfs"):
            return True
    return False


class Rig:
    """Mounts and processes of one benchmark run on one shared source directory.

    Reused by scripts/bench: several servers and daemons by name, started without
    waiting so that a section can bring up all its mounts in parallel (each `vfs-lockd
    mount` pays a Python start-up), and a close() that always unmounts everything."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.src = work / "src"
        self.src.mkdir(exist_ok=True)
        self.procs: list[subprocess.Popen] = []
        self.mounts: list[Path] = []
        self.proc_of: dict[str, subprocess.Popen] = {}  # mount/daemon name -> its process
        self.env = dict(os.environ, PYTHONPATH=str(REPO))

    def start_ours(self, name: str, *args: str) -> Path:
        """Start `vfs-lockd mount` as guest `name`; wait_mounted(name) before use."""
        mp = self.work / name
        mp.mkdir()
        log = open(self.work / f"{name}.log", "wb")  # noqa: SIM115 - lives as long as the mount
        p = subprocess.Popen([*VFS_LOCKD, "mount", str(self.src), str(mp), "--guest", name, *args],
                             stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=REPO)
        self.procs.append(p)
        self.mounts.append(mp)
        self.proc_of[name] = p
        return mp

    def wait_mounted(self, name: str) -> Path:
        mp = self.work / name
        try:
            wait_mounted(mp, self.proc_of.get(name), name)
        except RuntimeError:
            log = self.work / f"{name}.log"
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise RuntimeError(f"{name} did not mount at {mp}:\n{tail}") from None
        return mp

    def mount_ours(self, name: str, *args: str) -> Path:
        self.start_ours(name, *args)
        return self.wait_mounted(name)

    def mount_bindfs(self, name: str, *opts: str, foreground: bool = False) -> Path:
        """bindfs with lock forwarding; foreground=True keeps it our child (its pid is
        needed to kill -9 it), else it daemonizes as usual."""
        mp = self.work / name
        mp.mkdir()
        cmd = ["bindfs", "--multithreaded", "--enable-lock-forwarding", *opts, str(self.src), str(mp)]
        self.mounts.append(mp)
        if foreground:
            p = subprocess.Popen([*cmd[:1], "-f", *cmd[1:]], stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)
            self.procs.append(p)
            self.proc_of[name] = p
        else:
            subprocess.run(cmd, check=True)
        wait_mounted(mp, self.proc_of.get(name), name)
        return mp

    def serve(self, name: str = "lockd", *extra: str) -> str | None:
        """Start a central daemon; its socket, or None when central mode is unavailable."""
        if importlib.util.find_spec("lockd.daemon.client") is None:
            print("central mode skipped: lockd.daemon.client is not importable")
            return None
        sock = self.work / f"{name}.sock"
        log = open(self.work / f"{name}.log", "wb")  # noqa: SIM115
        p = subprocess.Popen([*VFS_LOCKD, "serve", "--socket", str(sock), "--journal",
                              str(self.work / f"{name}.db"), *extra],
                             stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=REPO)
        self.procs.append(p)
        self.proc_of[name] = p
        deadline = time.monotonic() + 15
        while not sock.exists():
            if p.poll() is not None or time.monotonic() > deadline:
                print(f"central mode skipped: `vfs-lockd serve` did not start:\n"
                      f"{(self.work / f'{name}.log').read_text(errors='replace')[-2000:]}")
                return None
            time.sleep(0.05)
        return str(sock)

    def close(self) -> None:
        for mp in reversed(self.mounts):
            subprocess.run(["umount", str(mp)], stderr=subprocess.DEVNULL)
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        for mp in self.mounts:
            subprocess.run(["umount", "-l", str(mp)], stderr=subprocess.DEVNULL)


def lock_pairs(fd: int, n: int) -> float:
    """Seconds per lock+unlock pair."""
    f, setlk = fcntl.fcntl, fcntl.F_SETLK
    t0 = time.perf_counter()
    for _ in range(n):
        f(fd, setlk, WRLCK)
        f(fd, setlk, UNLCK)
    return (time.perf_counter() - t0) / n


def ofd_pairs(fd: int, n: int) -> float:
    """Seconds per F_OFD_SETLK write lock + unlock pair (whole file), like lock_pairs."""
    from lockd.api import F_UNLCK, F_WRLCK, OFFSET_MAX
    from lockd.engine import ofd

    setlk = ofd.setlk
    t0 = time.perf_counter()
    for _ in range(n):
        setlk(fd, F_WRLCK, 0, OFFSET_MAX)
        setlk(fd, F_UNLCK, 0, OFFSET_MAX)
    return (time.perf_counter() - t0) / n


def stats(path: Path, n: int) -> float:
    st = os.stat
    t0 = time.perf_counter()
    for _ in range(n):
        st(path)
    return (time.perf_counter() - t0) / n


def throughput(path: Path, size: int) -> tuple[float, float]:
    """(write MiB/s, read MiB/s) for a sequential 1 MiB-block pass."""
    block = os.urandom(1 << 20)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    t0 = time.perf_counter()
    for _ in range(size >> 20):
        os.write(fd, block)
    os.fsync(fd)
    os.close(fd)
    w = (size >> 20) / (time.perf_counter() - t0)
    fd = os.open(path, os.O_RDONLY)
    try:  # drop the host's clean pages so the read is not just memcpy for everyone
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    except OSError:
        pass
    t0 = time.perf_counter()
    while os.read(fd, 1 << 20):
        pass
    os.close(fd)
    r = (size >> 20) / (time.perf_counter() - t0)
    os.unlink(path)
    return w, r


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--pairs", type=int, default=2000, help="lock+unlock pairs per round")
    ap.add_argument("--stats", type=int, default=2000, help="stat calls per round")
    ap.add_argument("--mib", type=int, default=256, help="throughput file size")
    ap.add_argument("--threads", type=int, default=4)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("run as root (mount(2))", file=sys.stderr)
        return 2
    have_bindfs = ensure_bindfs()
    if not have_bindfs:
        print("bindfs could not be installed: bindfs columns skipped")
    work = Path(tempfile.mkdtemp(prefix="bench-mount-"))
    rig = Rig(work)
    results: dict[str, dict[str, float]] = {}
    try:
        th = ["--threads", str(args.threads)]
        lock_targets = {"host": rig.src, "vfs-lockd": rig.mount_ours("ours", *th)}
        sock = rig.serve("lockd")
        if sock:
            lock_targets["vfs-lockd central"] = rig.mount_ours("central", "--lockd", sock, *th)
        stat_targets = {"host": rig.src, "vfs-lockd": rig.mount_ours("ours_nc", "--cache", "none", *th)}
        if have_bindfs:
            lock_targets["bindfs"] = rig.mount_bindfs("bindfs")
            stat_targets["bindfs"] = rig.mount_bindfs("bindfs_nc", "-o", "attr_timeout=0,entry_timeout=0")
        (rig.src / "lockfile").write_bytes(b"x" * 4096)
        fds = {k: os.open(p / "lockfile", os.O_RDWR) for k, p in lock_targets.items()}
        pairs: dict[str, list[float]] = {k: [] for k in fds}
        stat_t: dict[str, list[float]] = {k: [] for k in stat_targets}
        for fd in fds.values():  # warm up
            lock_pairs(fd, 200)
        for _ in range(args.rounds):
            for k, fd in fds.items():
                pairs[k].append(lock_pairs(fd, args.pairs))
            for k, p in stat_targets.items():
                stat_t[k].append(stats(p / "lockfile", args.stats))
        for fd in fds.values():
            os.close(fd)
        tput: dict[str, tuple[float, float]] = {}
        tp_targets = {"host": rig.src, "vfs-lockd": lock_targets["vfs-lockd"]}
        if have_bindfs:
            tp_targets["bindfs"] = lock_targets["bindfs"]
        for k, p in tp_targets.items():
            tput[k] = throughput(p / f"big-{k.replace(' ', '_')}", args.mib << 20)
    finally:
        rig.close()
        shutil.rmtree(work, ignore_errors=True)

    def us(xs: list[float]) -> float:
        return statistics.median(xs) * 1e6

    print(f"\nlock+unlock pair (fcntl F_SETLK W then UNLCK), median of {args.rounds} rounds "
          f"x {args.pairs} pairs:")
    base = us(pairs["bindfs"]) if "bindfs" in pairs else None
    for k, xs in pairs.items():
        ratio = f"  {us(xs) / base:5.2f}x bindfs" if base else ""
        print(f"  {k:20s} {us(xs):8.2f} us{ratio}")
        results.setdefault(k, {})["lock_pair_us"] = us(xs)
    if "vfs-lockd central" not in pairs:
        print("  vfs-lockd central    skipped (no lockd.daemon.client / serve)")
    print(f"\nstat round trip, caching off, median of {args.rounds} rounds x {args.stats}:")
    base = us(stat_t["bindfs"]) if "bindfs" in stat_t else None
    for k, xs in stat_t.items():
        ratio = f"  {us(xs) / base:5.2f}x bindfs" if base else ""
        print(f"  {k:20s} {us(xs):8.2f} us{ratio}")
        results.setdefault(k, {})["stat_us"] = us(xs)
    print(f"\nsequential {args.mib} MiB, 1 MiB blocks (write incl. fsync / read):")
    for k, (w, r) in tput.items():
        print(f"  {k:20s} write {w:8.1f} MiB/s   read {r:8.1f} MiB/s")
        results.setdefault(k, {}).update(write_mib_s=w, read_mib_s=r)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
