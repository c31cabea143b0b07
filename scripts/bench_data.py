#!/usr/bin/env python3
"""The data path measured through a mount and on the host directory itself: what
`scripts/bench --only data` runs (and, on its own, a quick look at one mount).

Each function measures one thing on one target directory; the caller interleaves targets
round by round. Every target is a view of the same host directory, so each file also has a
host path, used to drop the host's page cache before a read (a POSIX_FADV_DONTNEED on a
FUSE file only drops the FUSE page cache: a passthrough file's pages are the host file's).

    .venv/bin/python scripts/bench_data.py DIR [--host-dir SRC]   # one target, printed
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench_mount import stats  # seconds per stat(2) of one file

BLOCK = 1 << 20
__all__ = ["stats", "seq_write", "seq_read", "small_files", "make_git_tree", "git_status"]
GIT_ENV = {"GIT_OPTIONAL_LOCKS": "0",  # git status must not rewrite the index
           "GIT_CONFIG_NOSYSTEM": "1", "HOME": "/nonexistent", "LC_ALL": "C"}


def _drop(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def seq_write(path: Path, size: int) -> float:
    """MiB/s of a sequential write in 1 MiB blocks, fsync included."""
    block = os.urandom(BLOCK)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        t0 = time.perf_counter()
        for _ in range(size // BLOCK):
            os.write(fd, block)
        os.fsync(fd)
        dt = time.perf_counter() - t0
    finally:
        os.close(fd)
    return size / BLOCK / dt


def seq_read(path: Path, host_path: Path) -> float:
    """MiB/s of a sequential read in 1 MiB blocks from a cold cache: the host's pages
    (through host_path) and the mount's own are dropped first."""
    _drop(host_path)
    _drop(path)
    fd = os.open(path, os.O_RDONLY)
    try:
        n = 0
        t0 = time.perf_counter()
        while True:
            got = os.read(fd, BLOCK)
            if not got:
                break
            n += len(got)
        dt = time.perf_counter() - t0
    finally:
        os.close(fd)
    return n / BLOCK / dt


def small_files(d: Path, n: int, size: int = 4096) -> tuple[float, float]:
    """(seconds per create+write+close, seconds per unlink) of n files of `size` bytes in
    a fresh directory under d."""
    sub = d / f"small-{os.getpid()}-{time.monotonic_ns()}"
    sub.mkdir()
    data = os.urandom(size)
    names = [os.fsencode(sub / f"f{i:05d}") for i in range(n)]
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    try:
        t0 = time.perf_counter()
        for name in names:
            fd = os.open(name, flags, 0o644)
            os.write(fd, data)
            os.close(fd)
        t1 = time.perf_counter()
        for name in names:
            os.unlink(name)
        t2 = time.perf_counter()
    finally:
        shutil.rmtree(sub, ignore_errors=True)
    return (t1 - t0) / n, (t2 - t1) / n


def make_git_tree(src: Path, files: int = 10_000, per_dir: int = 100) -> Path:
    """A committed git work tree of `files` small files (per_dir to a directory) under
    src/gitrepo, made on the host (a few seconds); returns it."""
    repo = src / "gitrepo"
    if (repo / ".git").exists():
        return repo
    repo.mkdir()
    for i in range(files):
        sub = repo / f"d{i // per_dir:03d}"
        if i % per_dir == 0:
            sub.mkdir()
        f = sub / f"f{i % per_dir:03d}.txt"
        f.write_text(f"file {i}\n")
        # An hour old: files as new as the index are "racily clean" to git, which then
        # reads every one of them on each status (it cannot rewrite the index here).
        os.utime(f, (time.time() - 3600,) * 2)
    env = dict(os.environ, **GIT_ENV, GIT_AUTHOR_NAME="bench", GIT_AUTHOR_EMAIL="b@x",
               GIT_COMMITTER_NAME="bench", GIT_COMMITTER_EMAIL="b@x")
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                ["git", "commit", "-q", "-m", "tree"]):
        subprocess.run(cmd, cwd=repo, env=env, check=True, stdout=subprocess.DEVNULL)
    return repo


def git_status(repo: Path) -> float:
    """Seconds for `git status --porcelain` in repo (the index is not rewritten)."""
    env = dict(os.environ, **GIT_ENV)
    t0 = time.perf_counter()
    r = subprocess.run(["git", "-c", f"safe.directory={repo}", "status", "--porcelain"],
                       cwd=repo, env=env, capture_output=True)
    dt = time.perf_counter() - t0
    if r.returncode != 0 or r.stdout.strip():
        raise RuntimeError(f"git status in {repo}: rc {r.returncode}, "
                           f"{(r.stdout + r.stderr)[-500:]!r}")
    return dt


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dir", type=Path, help="the target (a mount, or the host directory)")
    ap.add_argument("--host-dir", type=Path, default=None,
                    help="the same directory on the host (default: DIR itself)")
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--stats", type=int, default=2000)
    ap.add_argument("--files", type=int, default=1000)
    args = ap.parse_args()
    host = args.host_dir or args.dir
    (host / "statfile").write_bytes(b"x")
    print(f"stat {stats(args.dir / 'statfile', args.stats) * 1e6:.1f} us")
    w = seq_write(args.dir / "big", args.mib << 20)
    r = seq_read(args.dir / "big", host / "big")
    os.unlink(host / "big")
    print(f"sequential {args.mib} MiB: write+fsync {w:.0f} MiB/s, read {r:.0f} MiB/s")
    c, u = small_files(args.dir, args.files)
    print(f"small files: create+write+close {c * 1e6:.1f} us, unlink {u * 1e6:.1f} us")
    make_git_tree(host)
    git_status(args.dir / "gitrepo")
    print(f"git status, 10,000 files: {git_status(args.dir / 'gitrepo') * 1e3:.0f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
