"""Two hosts sharing a CephFS (issue 20): each host is a network namespace with its own
ceph-fuse mount, its own `vfs-lockd serve` and two FUSE guests on that mount; a one-node
Ceph cluster (monitor, manager, memstore OSD, MDS) runs in host 0's namespace
(rig/ceph.py). The MDS arbitrates locks between hosts.

The same tests as test_gluster.py (shared parts: cluster_stack.py), plus what CephFS does
that GlusterFS does not: it keeps flock and POSIX locks apart, and its MDS detects a
deadlock cycle that spans hosts. The cluster is made once for the module (the MDS evicts
a silent client after 30 s, Ceph's minimum) and torn down after its last test; each test
gets fresh daemons and guests, and everything is torn down even on failure. Skipped where
Ceph cannot run; under CI=true that is a failure.
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
from fuse_oracle import host_can_lock
from procutil import until_threads_in_flock, until_threads_in_setlkw

from rig.ceph import MIN_EVICT, CephCluster

pytestmark = [pytest.mark.fuse, pytest.mark.ceph]

BASE = "/var/tmp/vfs-lockd-ceph-test"
EVICT_AFTER = MIN_EVICT


@pytest.fixture(scope="module")
def cluster():
    """Two CephFS hosts for this module's tests; torn down after them (its daemons
    would otherwise share the cores with every later test)."""
    yield from module_cluster(CephCluster, BASE, hosts=2, evict_after=EVICT_AFTER,
                               prefix="vlk", subnet="10.218")


@pytest.fixture(scope="module")
def flock_meets_posix() -> bool:
    """CephFS keeps flock and POSIX locks apart, as ext4 does."""
    return False




def test_cross_host_deadlock_detected_by_the_mds(stack):
    """Each daemon sees only its own host's wait-for graph; CephFS's MDS sees every
    client's: the request that closes a cycle across hosts fails with EDEADLK."""
    a = stack.locker(0, 0, "f")
    b = stack.locker(1, 0, "f")
    assert a.do("fcntl w 0 1 nowait") == "ok"
    assert b.do("fcntl w 10 1 nowait") == "ok"
    a.send("fcntl w 10 1 wait")  # a waits for b (on the MDS)
    until_threads_in_setlkw(stack.daemons[0].pid, 1)
    assert a.pending(0)
    assert b.do("fcntl w 0 1 wait", timeout=10) == str(errno.EDEADLK)  # b would wait for a
    assert a.pending(0.2)  # the other wait goes on
    assert b.do("fcntl u 10 1 nowait") == "ok"
    assert a.read(10) == "ok"
    assert b.do("fcntl w 10 1 nowait") == str(errno.EAGAIN)


def test_mds_restart_keeps_locks_and_waits(stack, cluster):
    """kill -9 of the MDS: the clients reconnect to the new one and resend their locks
    and waits (Ceph's reconnect phase); no host loses anything."""
    a = stack.locker(0, 0, "f")
    b = stack.locker(1, 0, "f")
    bf = stack.locker(1, 1, "g")
    assert a.do("fcntl w 0 10 nowait") == "ok"
    assert bf.do("flock ex nowait") == "ok"
    b.send("fcntl w 0 10 wait")
    until_threads_in_setlkw(stack.daemons[1].pid, 1)  # b waits on the host (the MDS)
    assert b.pending(0)
    cluster.restart_mds()
    assert b.pending(0.5)
    assert not host_can_lock(stack.bare(1, "f"))
    assert stack.locker(0, 1, "g").do("flock sh nowait") == str(errno.EWOULDBLOCK)
    assert a.do("fcntl u 0 0 nowait", timeout=30) == "ok"
    assert b.read(30) == "ok"
    assert a.do("fcntl w 0 1 nowait") == str(errno.EAGAIN)
    for i in (0, 1):
        assert stack.status(i)["stats"]["lost_locks"] == 0


def test_partitioned_host_told_of_lost_lock(stack, cluster):
    a = stack.locker(0, 0, "f")
    b = stack.locker(1, 0, "f")
    af = stack.locker(0, 1, "g")
    bf = stack.locker(1, 1, "g")
    assert b.do("fcntl w 0 10 nowait") == "ok"
    assert bf.do("flock ex nowait") == "ok"
    a.send("fcntl w 0 10 wait")
    until_threads_in_setlkw(stack.daemons[0].pid, 1)  # host 0's daemon waits on the MDS
    assert a.pending(0)
    af.send("flock ex wait")
    until_threads_in_flock(stack.daemons[0].pid, 1)
    assert af.pending(0)
    cluster.partition(1)
    try:
        # The MDS evicts (and blocklists) host 1's client once it has not heard from it
        # for EVICT_AFTER seconds, and gives its locks to host 0's waiters.
        assert a.read(EVICT_AFTER * 4 + 30) == "ok"
        assert af.read(30) == "ok"
    finally:
        outcome = cluster.heal(1)  # a blocklisted client never comes back: remounted
    assert outcome == "remounted"
    wait_live(stack.bare(1, ""), 60)
    # Host 1's guests learn of it at their next lock request on the file: EIO once. (For
    # flock, the next request that changes the lock: the manager answers a request for
    # the mode already held without asking the host.)
    assert b.do("fcntl w 20 1 nowait", timeout=30) == str(errno.EIO)
    assert bf.do("flock un nowait", timeout=30) == str(errno.EIO)
    # Once: later requests fail as the dead mount does (its files cannot be opened
    # again: ESHUTDOWN, Ceph's EBLOCKLISTED), and count nothing more.
    again = b.do("fcntl w 20 1 nowait", timeout=30), bf.do("flock ex nowait", timeout=30)
    assert again == (str(errno.ESHUTDOWN), str(errno.ESHUTDOWN)), again
    st = stack.status(1)
    assert st["stats"]["lost_locks"] == 2, st["stats"]
    lost = stack.journal_lost(1)
    assert sorted((r["kind"], r["guest"]) for r in lost) == [("flock", "h1g1"),
                                                            ("posix", "h1g0")], lost
    # Those guests sit on the old, dead mount: restarted on the new one, they lock again,
    # and host 0's guests still hold what they were given.
    b.close()
    bf.close()
    stack.restart_guest(1, 0)
    stack.restart_guest(1, 1)
    b = stack.locker(1, 0, "f")
    bf = stack.locker(1, 1, "g")
    assert b.do("fcntl w 20 1 nowait") == "ok"
    assert b.do("fcntl w 0 10 nowait") == str(errno.EAGAIN)
    assert bf.do("flock ex nowait") == str(errno.EWOULDBLOCK)
    assert a.do("fcntl u 0 0 nowait") == "ok"
    assert af.do("flock un nowait") == "ok"
    assert b.do("fcntl w 0 10 nowait") == "ok"
    assert bf.do("flock ex nowait") == "ok"
