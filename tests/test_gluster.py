"""Two hosts sharing a GlusterFS volume (Part 9): each host is a network namespace with its
own GlusterFS client mount, its own `vfs-lockd serve` and two FUSE guests on that mount
(rig/hosts.py). The cluster file system's lock server arbitrates between hosts.

The volume is created once for the module (ping timeout 3 s, so a partition costs seconds);
each test gets fresh daemons and guests, and everything is torn down even on failure.
Skipped where GlusterFS cannot run; under CI=true that is a failure.
"""

from __future__ import annotations

import errno

import pytest
from cluster_stack import (  # noqa: F401 - the shared tests, collected here
    module_cluster,
    test_blocking_lock_granted_across_hosts,
    test_counter_exact_across_hosts,
    test_cross_host_conflicts_posix_and_flock,
    test_kill9_lockd_keeps_locks_while_other_host_waits,
    wait_live,
)
from procutil import until_threads_in_setlkw, wait_until

from rig.hosts import GlusterCluster

pytestmark = [pytest.mark.fuse, pytest.mark.gluster]

BASE = "/var/tmp/vfs-lockd-gluster-test"
PING_TIMEOUT = 3


@pytest.fixture(scope="module")
def cluster():
    """Two GlusterFS hosts for this module's tests; torn down after them."""
    yield from module_cluster(GlusterCluster, BASE, hosts=2, ping_timeout=PING_TIMEOUT,
                               prefix="vlt", subnet="10.214")


@pytest.fixture(scope="module")
def flock_meets_posix() -> bool:
    """GlusterFS unifies flock and POSIX locks (one lock table)."""
    return True




def test_partitioned_host_told_of_lost_lock(stack, cluster):
    a = stack.locker(0, 0, "f")
    b = stack.locker(1, 0, "f")
    assert b.do("fcntl w 0 10 nowait") == "ok"
    a.send("fcntl w 0 10 wait")
    until_threads_in_setlkw(stack.daemons[0].pid, 1)  # host 0's daemon waits on the brick
    assert a.pending(0)
    cluster.partition(1)
    try:
        # The brick gives host 1's lock away once it stops hearing from it.
        assert a.read(PING_TIMEOUT * 5 + 10) == "ok"
    finally:
        cluster.heal(1)
    # (The file itself: GlusterFS answers even a stat of it with EBADFD while a revoked
    # description of it is open on host 1 -- the manager replaces it at the next request.)
    wait_live(stack.bare(1, ""), 60)
    # Host 1's guest learns of it at its next lock request on the file: EIO once.
    # (ENOTCONN: host 1's client has not reconnected yet, asked again.)
    answers: list[str] = []

    def answered() -> bool:
        answers.append(b.do("fcntl w 20 1 nowait", timeout=20))
        return answers[-1] != str(errno.ENOTCONN)

    wait_until(answered, 30, interval=0.5)
    assert answers[-1] == str(errno.EIO), answers
    # Then it can lock again: at once, or after EBADFD answers while GlusterFS still
    # refuses new descriptions of the file (a revoked one is still being closed on host
    # 1, e.g. the keeper's copy); never granted wrongly, never EIO again.
    later: list[str] = []

    def locked_again() -> bool:
        later.append(b.do("fcntl w 20 1 nowait"))
        return later[-1] != str(errno.EBADFD)

    wait_until(locked_again, 30, interval=0.5)
    assert later[-1] == "ok", later
    assert b.do("fcntl w 0 10 nowait") == str(errno.EAGAIN)  # host 0's guest has it
    st = stack.status(1)
    assert st["stats"]["lost_locks"] == 1, st["stats"]
    assert a.do("fcntl u 0 0 nowait") == "ok"
    assert b.do("fcntl w 0 10 nowait") == "ok"
