"""Cache invalidation under locks cannot deadlock a mount (`--cache auto`).

Every lock grant first drops the guest's cached pages of the file
(FUSE_NOTIFY_INVAL_INODE), which waits for page locks that READs and WRITEs waiting for
the server hold (fuse_server/invalidate.py). 20 processes take random blocking POSIX
and flock locks and read and write the data they protect through two mounts, and a
process reads the file through a shared mapping under read locks, for STRESS_S seconds:
every process must finish (none stuck in D state), and every block read under a lock
must be whole (the caches really were dropped).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.fuse, pytest.mark.slow]

WORKER = str(Path(__file__).with_name("stressworker.py"))
# The suite's run (every worker must get through operations: asserted below); a soak:
# VFS_LOCKD_STRESS_S=600 pytest tests/test_invalidation.py
STRESS_S = float(os.environ.get("VFS_LOCKD_STRESS_S", "20"))
PROCS = 20


def state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return "gone"


def abort_fuse_connections(paths: list[Path]) -> None:
    """Unwedge hung mounts (their servers are stopped by the fixture afterwards). The
    connection number is the mount's minor device number, read from mountinfo: a stat
    of a hung mount would hang too."""
    fusectl = Path("/sys/fs/fuse/connections")  # mounted for the run (conftest.py)
    wanted = {str(p) for p in paths}
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] in wanted:
                abort = fusectl / fields[2].split(":")[1] / "abort"
                if abort.exists():
                    abort.write_text("1")


@pytest.mark.parametrize("mode", ["lockd", "embedded"])
def test_random_locks_reads_writes_and_mmap_never_hang(mounts, daemon, mode: str) -> None:
    seconds = STRESS_S if mode == "lockd" else max(STRESS_S / 3, 5)
    args = ["--cache", "auto"] + (["--lockd", daemon.sock] if mode == "lockd" else [])
    source, (ma, mb) = mounts(2, args)
    (source / "f").write_bytes(bytes(4096 * 9))
    procs = []
    try:
        for i in range(PROCS):
            m = (ma, mb)[i % 2]
            procs.append(subprocess.Popen(
                [sys.executable, WORKER, str(m.path / "f"), str(seconds), str(i), "rw"],
                stdout=subprocess.PIPE, text=True))
        procs.append(subprocess.Popen(
            [sys.executable, WORKER, str(ma.path / "f"), str(seconds), str(PROCS), "mmap"],
            stdout=subprocess.PIPE, text=True))
        deadline = time.monotonic() + seconds + 60
        results = []
        for p in procs:
            try:
                out, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                stuck = {q.pid: state(q.pid) for q in procs if q.poll() is None}
                abort_fuse_connections([ma.path, mb.path])
                pytest.fail(f"workers did not finish (pid: state {stuck}); mounts aborted")
            assert p.returncode == 0, out
            results.append(json.loads(out))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)
    assert sum(r["violations"] for r in results) == 0, results
    assert all(r["ops"] > 0 for r in results), results
    # nothing on the mounts is left in D state
    for m in (ma, mb):
        assert m.live(), m.output()
