"""What the cluster-hosts tests (test_gluster.py, test_ceph.py) share: the session's
cluster, one test's daemons and guests on it (Stack), the counter workload, and probes
of the host side.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import REPO, VFS_LOCKD, force_unmount
from procutil import kill_keepers
from procutil import stop as stop_process
from test_fuse_locks import Locker

sys.path.insert(0, str(REPO))
from rig.cluster import ClusterHosts, HostsError  # noqa: E402

GUESTS_PER_HOST = 2


def session_cluster(cls: type[ClusterHosts], base: str, **kw: object
                    ) -> Iterator[ClusterHosts]:
    """The body of a session fixture: a cluster of `cls` at `base` (anything an earlier,
    killed run left there torn down first), torn down at the end -- asserted clean.
    Skipped where the file system cannot run; under CI=true that is a failure."""
    missing = cls.missing_tools()
    if missing:
        why = f"{cls.KIND} hosts need: " + ", ".join(missing)
        if os.environ.get("CI") == "true":
            pytest.fail(f"{why} (CI=true: scripts/setup.sh installs them)")
        pytest.skip(why)
    c = cls(base, **kw)
    c.teardown()
    try:
        c.setup()
    except HostsError as exc:
        c.teardown()
        pytest.fail(f"{cls.KIND} setup failed: {exc}")
    try:
        yield c
    finally:
        problems = c.teardown()
        assert not problems, problems


class Stack:
    """One test's daemons (one per host) and guests, on a fresh directory of the cluster
    file system."""

    def __init__(self, c: ClusterHosts, name: str) -> None:
        self.c = c
        self.sub = f"t-{name}-{os.getpid()}"
        (c.hosts[0].mount / self.sub).mkdir()
        self.daemons: dict[int, subprocess.Popen] = {}
        self.guests: dict[tuple[int, int], tuple[subprocess.Popen, Path]] = {}
        self.lockers: list[Locker] = []
        for h in c.hosts:
            self.start_lockd(h.index)
            for j in range(GUESTS_PER_HOST):
                self.start_guest(h.index, j)

    def start_lockd(self, i: int) -> None:
        self.daemons[i] = self.c.start_lockd(self.c.hosts[i])

    def start_guest(self, i: int, j: int) -> None:
        self.guests[(i, j)] = self.c.start_guest(self.c.hosts[i], f"h{i}g{j}", self.sub)

    def restart_guest(self, i: int, j: int) -> None:
        """Stop guest j of host i and start it again (on host i's current mount)."""
        p, mp = self.guests.pop((i, j))
        stop_process(p)
        force_unmount(mp)
        self.start_guest(i, j)

    def path(self, host: int, guest: int, name: str) -> Path:
        """`name` as guest `guest` of host `host` sees it."""
        return self.guests[(host, guest)][1] / name

    def bare(self, host: int, name: str) -> Path:
        """`name` on host `host`'s cluster file system mount (no vfs-lockd)."""
        return self.c.hosts[host].mount / self.sub / name

    def locker(self, host: int, guest: int, name: str) -> Locker:
        lk = Locker(self.path(host, guest, name))
        self.lockers.append(lk)
        return lk

    def status(self, i: int) -> dict:
        sock, _ = self.c.lockd_paths(self.c.hosts[i])
        r = subprocess.run([*VFS_LOCKD, "status", "--socket", str(sock), "--json"],
                           capture_output=True, text=True, timeout=20, cwd=REPO)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    def journal_lost(self, i: int) -> list[dict]:
        """The `lost` table of host i's journal, read offline."""
        _, journal = self.c.lockd_paths(self.c.hosts[i])
        r = subprocess.run([*VFS_LOCKD, "locks", "--journal", str(journal), "--json"],
                           capture_output=True, text=True, timeout=20, cwd=REPO)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout).get("lost", [])

    def stop(self) -> None:
        for lk in self.lockers:
            lk.close()
        for p, mp in self.guests.values():
            stop_process(p)
            force_unmount(mp)
        for p in self.daemons.values():
            stop_process(p)
        # A daemon stopped while guests hold locks leaves its descriptor keeper running
        # (by design): end it, and the journals, so the next test starts clean.
        kill_keepers(str(self.c.base).encode())
        for h in self.c.hosts:
            shutil.rmtree(self.c.lockd_paths(h)[0].parent, ignore_errors=True)
        shutil.rmtree(self.c.hosts[0].mount / self.sub, ignore_errors=True)


COUNTER = textwrap.dedent(
    r"""
    import fcntl, os, struct, sys
    path, n = sys.argv[1], int(sys.argv[2])
    fd = os.open(path, os.O_RDWR)
    W = struct.pack("hhqqi4x", fcntl.F_WRLCK, 0, 0, 0, 0)
    U = struct.pack("hhqqi4x", fcntl.F_UNLCK, 0, 0, 0, 0)
    for _ in range(n):
        fcntl.fcntl(fd, fcntl.F_SETLKW, W)
        v = int(os.pread(fd, 32, 0) or b"0")
        data = b"%020d" % (v + 1)
        assert os.pwrite(fd, data, 0) == len(data)
        fcntl.fcntl(fd, fcntl.F_SETLK, U)
    """
)


def run_counter(stack: Stack, n: int, procs: int) -> int:
    """`procs` processes in every guest of every host add 1 to the counter file `n` times
    each under an fcntl write lock; returns how many increments there were."""
    stack.bare(0, "counter").write_bytes(b"%020d" % 0)
    ps = []
    for h in stack.c.hosts:
        for g in range(GUESTS_PER_HOST):
            for _ in range(procs):
                ps.append(subprocess.Popen([sys.executable, "-c", COUNTER,
                                            str(stack.path(h.index, g, "counter")), str(n)]))
    try:
        for p in ps:
            assert p.wait(240) == 0
    finally:
        for p in ps:
            if p.poll() is None:
                p.kill()
                p.wait()
    return n * len(ps)


def host_can_lock(path: Path) -> bool:
    """Can a plain process on that host's mount take [0, 10] now?"""
    import fcntl
    import struct

    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, struct.pack("hhqqi4x", fcntl.F_WRLCK, 0, 0, 10, 0))
        return True
    except OSError as exc:
        assert exc.errno in (errno.EAGAIN, errno.EACCES), exc
        return False
    finally:
        os.close(fd)


def wait_live(path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            os.stat(path)
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


F_OFD_SETLKW = 38
SYS_FCNTL = {"x86_64": 72, "aarch64": 25, "riscv64": 25}


def threads_in_setlkw(pid: int) -> int:
    """How many threads of process `pid` sit in fcntl(F_OFD_SETLKW) in the kernel now."""
    import platform

    nr = SYS_FCNTL.get(platform.machine())
    found = 0
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/syscall") as f:
                parts = f.read().split()
        except OSError:
            continue
        if (len(parts) > 2 and parts[0].isdigit() and int(parts[0]) == nr
                and int(parts[2], 16) == F_OFD_SETLKW):
            found += 1
    return found
