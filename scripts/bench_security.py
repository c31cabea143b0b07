#!/usr/bin/env python3
"""What the hostile-guest hardening costs (issue 15), measured in one run, interleaved:

* POSIX ACLs: `vfs-lockd mount --posix-acl` vs `--no-posix-acl` (--cache, default none),
  an unprivileged user (not the files' owner, so the kernel consults the ACL) doing stat
  and open+read+close of N files; per operation, microseconds.
* Creating as the caller: MKDIR+RMDIR through a Session by uid 0 (nothing to switch) vs
  uid 65534 (fsuid/fsgid switched and the capabilities raised around the mkdir).

    .venv/bin/python scripts/bench_security.py [--rounds 7] [--files 300] [--cache none]

Needs root and /dev/fuse. Prints medians (min-max) per variant and the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
NOBODY = 65534


def start_mount(src: str, mnt: str, cache: str, *args: str) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys; from lockd.cli import main; sys.exit(main())",
         "mount", src, mnt, "--guest", os.path.basename(mnt), "--cache", cache, *args],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env=dict(os.environ, PYTHONPATH=ROOT))
    deadline = time.monotonic() + 15
    while not os.path.ismount(mnt):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"mount {mnt} did not come up")
        time.sleep(0.02)
    return proc


def as_nobody(fn, *args):  # noqa: ANN001, ANN201 - fn(*args) -> JSON, run by uid 65534
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)
        os.write(w, json.dumps(fn(*args)).encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    return json.loads(data)


def walk(mnt: str, files: int) -> dict:
    t0 = time.perf_counter()
    for i in range(files):
        os.stat(f"{mnt}/f{i}")
    t1 = time.perf_counter()
    for i in range(files):
        fd = os.open(f"{mnt}/f{i}", os.O_RDONLY)
        os.read(fd, 64)
        os.close(fd)
    t2 = time.perf_counter()
    return {"stat": (t1 - t0) / files * 1e6, "open+read+close": (t2 - t1) / files * 1e6}


def creation(share: str, pairs: int) -> dict:
    from fuse_server import protocol as P
    from fuse_server.passthrough import Passthrough
    from fuse_server.session import Session
    from lockd.engine.manager import LockManager

    s = Session(Passthrough(share), LockManager(), "bench", lambda b: None, "none")
    s.handle(P.IN_HEADER.pack(104, P.INIT, 1, 1, 0, 0, 0, 0, 0) +
             P.INIT_IN.pack(7, 38, 65536, 0xFFFFFFFF) + bytes(48))
    out = {}
    for uid in (0, NOBODY):
        mk = P.MKDIR_IN.pack(0o755, 0) + b"d\0"
        hdr_mk = P.IN_HEADER.pack(40 + len(mk), P.MKDIR, 2, 1, uid, uid, 0, 0, 0)
        hdr_rm = P.IN_HEADER.pack(42, P.RMDIR, 4, 1, uid, uid, 0, 0, 0)
        t0 = time.perf_counter()
        for _ in range(pairs):
            assert P.OUT_HEADER.unpack_from(s.handle(hdr_mk + mk))[1] == 0
            assert P.OUT_HEADER.unpack_from(s.handle(hdr_rm + b"d\0"))[1] == 0
        out[f"mkdir+rmdir as uid {uid}"] = (time.perf_counter() - t0) / pairs * 1e6
    s.end()
    return out


def summary(name: str, values: list[float]) -> str:
    return f"{statistics.median(values):9.1f} ({min(values):.1f}-{max(values):.1f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--files", type=int, default=300)
    ap.add_argument("--cache", choices=("none", "auto", "always"), default="none")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench_security: needs root (mounts, fsuid)")
    base = tempfile.mkdtemp(prefix="vfs-lockd-bench-sec-", dir="/tmp")
    os.chmod(base, 0o755)
    src = os.path.join(base, "src")
    os.mkdir(src, 0o755)
    os.chmod(src, 0o755)
    for i in range(args.files):
        with open(f"{src}/f{i}", "wb") as f:
            f.write(b"x" * 64)
        os.chmod(f"{src}/f{i}", 0o644)
    mounts = {}
    results: dict[str, list[float]] = {}
    try:
        for label, opt in (("acl on", "--posix-acl"), ("acl off", "--no-posix-acl")):
            mnt = os.path.join(base, label.replace(" ", "-"))
            os.mkdir(mnt)
            mounts[label] = (mnt, start_mount(src, mnt, args.cache, opt))
        print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, load "
              f"{os.getloadavg()[0]:.2f}, {args.rounds} rounds, {args.files} files, "
              f"cache {args.cache}")
        for _ in range(args.rounds):
            for label, (mnt, _) in mounts.items():
                for what, us in as_nobody(walk, mnt, args.files).items():
                    results.setdefault(f"{what}, {label}", []).append(us)
            work = os.path.join(base, "session")
            os.mkdir(work)
            for what, us in creation(work, 300).items():
                results.setdefault(what, []).append(us)
            shutil.rmtree(work)
        print(f"{'what':40} {'us/op median (min-max)':>28}")
        for name, values in results.items():
            print(f"{name:40} {summary(name, values):>28}")
        med = {k: statistics.median(v) for k, v in results.items()}
        for what in ("stat", "open+read+close"):
            print(f"ratio {what}: acl on / acl off = "
                  f"{med[f'{what}, acl on'] / med[f'{what}, acl off']:.2f}")
        print(f"ratio mkdir+rmdir: uid {NOBODY} / uid 0 = "
              f"{med[f'mkdir+rmdir as uid {NOBODY}'] / med['mkdir+rmdir as uid 0']:.2f}")
    finally:
        for mnt, proc in mounts.values():
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            subprocess.run(["umount", "-l", mnt], capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
