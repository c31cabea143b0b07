#!/usr/bin/env python3
"""What the sandbox of `vfs-lockd-virtiofsd` costs: time from exec to the readiness line
launchers wait for, and a lock+unlock pair (embedded manager) through the Python
vhost-user front-end of the tests, for --sandbox none, chroot and namespace, interleaved
round by round in one run. Needs root.

    .venv/bin/python scripts/bench_sandbox.py [--rounds 5] [--pairs 200]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from test_vhost_user import LK_IN, REQ, init, lookup, open_file  # noqa: E402
from vhost_frontend import Frontend  # noqa: E402

from fuse_server import protocol as P  # noqa: E402
from fuse_server.launch import READY_LINE  # noqa: E402
from lockd.api import F_UNLCK, F_WRLCK  # noqa: E402

BIN = Path(sys.executable).parent / "vfs-lockd-virtiofsd"
MODES = ("none", "chroot", "namespace")


def one(work: Path, mode: str, pairs: int) -> tuple[float, float]:
    """(seconds from exec to the readiness line, microseconds per lock+unlock pair)."""
    log = work / "backend.log"
    sock = work / "vfs.sock"
    with open(log, "wb") as logf:
        t0 = time.monotonic()
        p = subprocess.Popen([str(BIN), f"--socket-path={sock}", f"--shared-dir={work / 'share'}",
                              f"--sandbox={mode}"], stderr=logf, stdout=logf,
                             env=dict(os.environ, VFS_LOCKD_SOCKET=""))
        try:
            deadline = t0 + 30
            while READY_LINE.encode() not in log.read_bytes():
                if p.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(log.read_text())
                time.sleep(0.001)
            ready = time.monotonic() - t0
            fe = Frontend(str(sock))
            try:
                init(fe)
                node = lookup(fe, b"f")
                fh = open_file(fe, node)
                lock = LK_IN.pack(fh, 1, 0, 9, F_WRLCK, 1, 0)
                unlock = LK_IN.pack(fh, 1, 0, 9, F_UNLCK, 1, 0)
                t1 = time.monotonic()
                for _ in range(pairs):
                    assert fe.fuse(REQ, P.SETLK, lock, node).error == 0
                    assert fe.fuse(REQ, P.SETLK, unlock, node).error == 0
                per_pair = (time.monotonic() - t1) / pairs * 1e6
            finally:
                fe.close()
            p.wait(15)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
    return ready, per_pair


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--pairs", type=int, default=200)
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("needs root (the chroot and namespace sandboxes)", file=sys.stderr)
        return 1
    work = Path(tempfile.mkdtemp(prefix="vlsb-"))
    try:
        (work / "share").mkdir()
        (work / "share" / "f").write_bytes(b"")
        res: dict[str, list[tuple[float, float]]] = {m: [] for m in MODES}
        load0 = os.getloadavg()[0]
        for _ in range(args.rounds):
            for m in MODES:
                res[m].append(one(work, m, args.pairs))
        print(f"{args.rounds} rounds, {args.pairs} pairs each; load average "
              f"{load0:.2f} -> {os.getloadavg()[0]:.2f}")
        print(f"{'sandbox':10} {'start->ready ms (median, min-max)':36} lock+unlock pair us")
        for m in MODES:
            ready = [r * 1000 for r, _ in res[m]]
            pair = [x for _, x in res[m]]
            print(f"{m:10} {statistics.median(ready):6.0f} ({min(ready):.0f}-{max(ready):.0f})"
                  f"{'':22} {statistics.median(pair):6.0f} ({min(pair):.0f}-{max(pair):.0f})")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
