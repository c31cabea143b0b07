"""A lock wait inside a virtio-fs guest and signals (issue 23 item 4c; README "A lock wait
inside a virtio-fs guest cannot be ended by a signal").

The guest kernel sends no FUSE_INTERRUPT over virtio-fs, and once a request has left the
guest even SIGKILL does not end the waiting process. What ends it is an answer: here the
administrator's `vfs-lockd cancel --wait ID` on the central daemon. Real QEMU guests (the
module-scoped pair of tests/test_vm.py) and the static probe inside them.
"""

from __future__ import annotations

import json
import subprocess

from conftest import REPO, VFS_LOCKD
from procutil import wait_until
from test_vm import GRANT_S, Cluster, Owners, _file, cluster, owners, vm_image  # noqa: F401

from rig.vm import errno_of

EAGAIN = 11


def _admin(c: Cluster, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*VFS_LOCKD, *args, "--socket", str(c.sock)], capture_output=True,
                          text=True, cwd=REPO, timeout=30)


def _waits(c: Cluster, name: str) -> list[dict]:
    r = _admin(c, "locks", "--json")
    assert r.returncode == 0, r.stderr
    return [w for w in json.loads(r.stdout)["waiters"] if w["path"].endswith(name)]


def test_a_killed_waiter_ends_when_its_wait_is_cancelled(cluster: Cluster,  # noqa: F811
                                                        owners: Owners) -> None:  # noqa: F811
    g = cluster.a
    _, gpath = _file(cluster, "wedge.dat")
    holder, waiter = owners.new(g, gpath), owners.new(g, gpath)
    assert holder.lock("flock", "w") == 0
    waiter.send("lock 0 flock w 0 0 wait")
    assert wait_until(lambda: len(_waits(cluster, "wedge.dat")) == 1, GRANT_S)
    (wait,) = _waits(cluster, "wedge.dat")
    # SIGKILL: the guest kernel keeps waiting for the answer (nothing reaches the host)
    assert g.do("-", f"kill {waiter.name}") == "ok"
    exited = f"* exit {waiter.name} -9"
    # not reaped: it is still in the guest kernel's wait (as long as it would wait for
    # the lock; a lapse of time can only hide an exit, never invent one)
    assert not wait_until(lambda: exited in g.events, 3.0)
    # and the daemon still has the wait: nothing reached the host
    assert [w["id"] for w in _waits(cluster, "wedge.dat")] == [wait["id"]]
    # the administrator's answer ends it: the process exits, holding nothing
    r = _admin(cluster, "cancel", "--wait", str(wait["id"]))
    assert r.returncode == 0, r.stderr
    assert wait_until(lambda: exited in g.events, GRANT_S)
    assert _waits(cluster, "wedge.dat") == []
    other = owners.new(g, gpath)
    assert other.lock("flock", "w") == EAGAIN  # the holder still holds
    assert holder.lock("flock", "u") == 0
    assert errno_of(other.do("lock 0 flock w 0 0")) == 0
