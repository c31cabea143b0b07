"""What the cluster-hosts tests (test_gluster.py, test_ceph.py) share: the module's
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
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import REPO, VFS_LOCKD, force_unmount
from fuse_oracle import host_can_lock
from procutil import (
    kill_keepers,
    threads_in_setlkw,
    until_threads_in_flock,
    until_threads_in_setlkw,
    wait_until,
)
from procutil import stop as stop_process
from test_fuse_locks import Locker

sys.path.insert(0, str(REPO))
from rig.cluster import ClusterHosts, HostsError  # noqa: E402

GUESTS_PER_HOST = 2


def module_cluster(cls: type[ClusterHosts], base: str, **kw: object
                    ) -> Iterator[ClusterHosts]:
    """The body of a module fixture: a cluster of `cls` at `base` (anything an earlier,
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
            lk.kill()  # reaped once their mounts are gone (one may wait on a dead host)
        for p, mp in self.guests.values():
            stop_process(p)
            force_unmount(mp)
        for lk in self.lockers:
            lk.close(30)
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


def wait_live(path: Path, timeout: float) -> None:
    """Until `path` can be stat()ed again (a host's mount back after a partition)."""

    def live() -> bool:
        try:
            os.stat(path)
            return True
        except OSError:
            return False

    if not wait_until(live, timeout, interval=0.2):
        os.stat(path)  # raises why not




# ------------------------------------------------------------ what every cluster must pass
# A cluster's test module imports the tests below (pytest collects them there) and defines
# its module-scoped `cluster` and `flock_meets_posix`; `stack` is in conftest.py.
def stack_of(cluster: ClusterHosts, request: pytest.FixtureRequest) -> Iterator[Stack]:
    """A test's daemons and guests, stopped after it."""
    s = Stack(cluster, request.node.name.replace("test_", "")[:20])
    try:
        yield s
    finally:
        s.stop()


def test_cross_host_conflicts_posix_and_flock(stack: Stack, flock_meets_posix: bool) -> None:
    """POSIX locks and flocks conflict across hosts both ways (and within a host, through
    its daemon). `flock_meets_posix`: the file system unifies the two kinds (GlusterFS)
    instead of keeping them apart (ext4, CephFS)."""
    a = stack.locker(0, 0, "f")  # host 0, guest 0
    a2 = stack.locker(0, 1, "f")  # host 0, guest 1
    b = stack.locker(1, 0, "f")  # host 1, guest 0
    b2 = stack.locker(1, 1, "f")
    # POSIX, host 0 -> host 1 and back
    assert a.do("fcntl w 0 10 nowait") == "ok"
    assert b.do("fcntl w 5 1 nowait") == str(errno.EAGAIN)
    assert b2.do("fcntl r 0 1 nowait") == str(errno.EAGAIN)
    assert a2.do("fcntl w 9 1 nowait") == str(errno.EAGAIN)  # same host: the manager
    t, _pid = b.do("getlk w").split()
    assert int(t) == 1  # a write lock is in the way (its pid is the other host's business)
    assert b.do("fcntl w 100 10 nowait") == "ok"
    assert a.do("fcntl w 105 1 nowait") == str(errno.EAGAIN)
    assert a2.do("fcntl r 100 1 nowait") == str(errno.EAGAIN)
    assert b.do("fcntl r 0 1 nowait") == str(errno.EAGAIN)
    assert a.do("fcntl u 0 0 nowait") == "ok"
    assert b.do("fcntl u 0 0 nowait") == "ok"
    assert b2.do("fcntl w 0 0 nowait") == "ok"  # everything free again
    assert b2.do("fcntl u 0 0 nowait") == "ok"
    # flock, both directions
    assert b.do("flock ex nowait") == "ok"
    assert a.do("flock ex nowait") == str(errno.EWOULDBLOCK)
    assert a.do("flock sh nowait") == str(errno.EWOULDBLOCK)
    assert a2.do("flock sh nowait") == str(errno.EWOULDBLOCK)
    assert b.do("flock un nowait") == "ok"
    assert a.do("flock sh nowait") == "ok"
    assert b2.do("flock sh nowait") == "ok"  # shared with shared, across hosts
    assert b.do("flock ex nowait") == str(errno.EWOULDBLOCK)
    assert a.do("flock un nowait") == "ok"
    assert b2.do("flock un nowait") == "ok"
    # A flock on host 1 against a POSIX lock on host 0.
    assert b.do("flock ex nowait") == "ok"
    if flock_meets_posix:
        assert a.do("fcntl w 0 1 nowait") == str(errno.EAGAIN)
        assert b.do("flock un nowait") == "ok"
        assert a.do("fcntl w 0 1 nowait") == "ok"
    else:
        assert a.do("fcntl w 0 1 nowait") == "ok"
        assert b2.do("fcntl w 0 1 nowait") == str(errno.EAGAIN)
        assert b.do("flock un nowait") == "ok"
    assert a.do("fcntl u 0 0 nowait") == "ok"


def test_blocking_lock_granted_across_hosts(stack: Stack) -> None:
    """A waiter on one host is granted when a guest on the other host releases, woken by
    the file system itself: its daemon has a thread blocked in F_OFD_SETLKW on the
    waiter's own description (no polling; scripts/bench_hosts.py measures the latency)."""
    a = stack.locker(0, 0, "f")
    b = stack.locker(1, 0, "f")
    for (holder, hi), (waiter, wi) in (((a, 0), (b, 1)), ((b, 1), (a, 0))):
        assert holder.do("fcntl w 0 10 nowait") == "ok"
        waiter.send("fcntl w 5 10 wait")
        until_threads_in_setlkw(stack.daemons[wi].pid, 1)
        assert waiter.pending(0)
        assert holder.do("fcntl u 0 0 nowait") == "ok"
        assert waiter.read(10) == "ok"
        assert threads_in_setlkw(stack.daemons[wi].pid) == 0
        assert holder.do("fcntl w 5 1 nowait") == str(errno.EAGAIN)
        assert waiter.do("fcntl u 0 0 nowait") == "ok"
        assert threads_in_setlkw(stack.daemons[hi].pid) == 0
    # flock: the same
    assert a.do("flock ex nowait") == "ok"
    b.send("flock ex wait")
    until_threads_in_flock(stack.daemons[1].pid, 1)  # host 1's daemon waits in flock(2)
    assert b.pending(0)
    assert a.do("flock un nowait") == "ok"
    assert b.read(10) == "ok"
    assert a.do("flock sh nowait") == str(errno.EWOULDBLOCK)
    assert b.do("flock un nowait") == "ok"


def test_counter_exact_across_hosts(stack: Stack) -> None:
    want = run_counter(stack, 40, 2)  # 8 processes: 2 in each of 4 guests on 2 hosts
    assert int(stack.bare(1, "counter").read_bytes()) == want
    assert int(stack.path(0, 1, "counter").read_bytes()) == want


def test_kill9_lockd_keeps_locks_while_other_host_waits(stack: Stack) -> None:
    a = stack.locker(0, 0, "f")
    b = stack.locker(1, 0, "f")
    assert a.do("fcntl w 0 10 nowait") == "ok"
    b.send("fcntl w 0 10 wait")
    until_threads_in_setlkw(stack.daemons[1].pid, 1)  # host 1's daemon waits on the host
    assert b.pending(0)
    stack.daemons[0].kill()  # kill -9 host 0's daemon: its keeper holds the lock
    stack.daemons[0].wait()
    assert b.pending(2.0)
    assert not host_can_lock(stack.bare(1, "f"))
    assert not host_can_lock(stack.bare(0, "f"))
    stack.start_lockd(0)
    rec = stack.status(0)["recovery"]
    assert rec["locks"] == 1 and rec["lost"] == 0 and rec["from_keeper"] == 1
    assert b.pending(0.5)
    # The guest's server reconnects and resumes its session; its unlock reaches the
    # restarted daemon, and host 1's waiter gets the lock. (An unlock that raced the
    # reconnect fails: asked again.)
    assert wait_until(lambda: a.do("fcntl u 0 0 nowait", timeout=20) == "ok", 20, interval=0.2)
    assert b.read(10) == "ok"
    assert a.do("fcntl w 0 1 nowait") == str(errno.EAGAIN)
