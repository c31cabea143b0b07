"""What a live migration's switch-over does ahead of time or without a thread, driven by
the Python vhost-user front-end (tests/vhost_frontend.py) against real back-ends, as in
tests/test_vhost_user.py: the source's descriptor hand-over socket is made when QEMU
turns the dirty log on (the migration begins), gives nothing until the state is saved,
and goes if the migration ends without a save; a device state larger than QEMU's pipe
moves both ways through the connection's own loop (no thread), here through pipes cut
to one page."""

from __future__ import annotations

import fcntl
import json
import os
import socket
import struct
from pathlib import Path

import pytest
from procutil import wait_until
from test_vhost_user import (
    MIGRATABLE,
    PAGE,
    REQ,
    STATE,
    Rig,
    dirty_log,
    init,
    lk,
    load_state,
    lookup,
    open_file,
    save_state,
    share,  # noqa: F401 - a fixture
    switch_over,
)
from vhost_frontend import SET_VRING_ENABLE, Frontend

from fuse_server import protocol as P
from fuse_server.migration import MAGIC
from lockd.api import F_UNLCK, F_WRLCK

F_SETPIPE_SZ = 1031
SOCKET_PREFIX = ".vfs-lockd-migration-"


@pytest.fixture
def mig_dir(tmp_path: Path) -> Path:
    """A migration directory of these back-ends alone (other back-ends of this host
    use theirs meanwhile)."""
    d = tmp_path / "migration"
    d.mkdir(mode=0o700)
    return d


@pytest.fixture
def rig(tmp_path: Path, share: Path, mig_dir: Path):  # noqa: F811
    """Back-ends using `mig_dir` (test_vhost_user.Rig)."""
    r = Rig(tmp_path, share, env={"VFS_LOCKD_MIGRATION_DIR": str(mig_dir)})
    try:
        yield r
    finally:
        r.close()


def sockets(d: Path) -> set[str]:
    return {p.name for p in d.iterdir() if p.name.startswith(SOCKET_PREFIX)}


def stop_rings(fe: Frontend) -> list[int]:
    """QEMU's device stop in a migration: the rings' addresses with logging, then every
    ring disabled, then each one's base asked for (GET_VRING_BASE)."""
    for q in fe.queues:
        fe.set_addr(q, log=True)
    for q in fe.queues:
        assert fe.acked(SET_VRING_ENABLE, STATE.pack(q.index, 0)) == 0
    return [fe.stop_queue(q) for q in fe.queues]


def collect_without_secret(path: Path) -> tuple[bytes, int]:
    """Connect as the destination would, present a secret that is not the state's:
    (what came back, how many descriptors)."""
    dir_fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(30)
        try:  # (through the directory: a test's path may pass AF_UNIX's 108 bytes)
            s.connect(f"/proc/self/fd/{dir_fd}/{path.name}")
        finally:
            os.close(dir_fd)
        s.sendall(os.urandom(32))
        got, nfds = b"", 0
        while True:
            data, anc, _, _ = s.recvmsg(64, socket.CMSG_SPACE(64 * 4))
            for level, type_, cdata in anc:
                if level == socket.SOL_SOCKET and type_ == socket.SCM_RIGHTS:
                    fds = struct.unpack(f"{len(cdata) // 4}i", cdata[:len(cdata) // 4 * 4])
                    nfds += len(fds)
                    for fd in fds:
                        os.close(fd)
            if not data:
                return got, nfds
            got += data


def small_pipe() -> tuple[int, int]:
    """A pipe that holds one page: a state larger than that cannot be written (or read)
    at once by either side."""
    r, w = os.pipe()
    fcntl.fcntl(w, F_SETPIPE_SZ, PAGE)
    assert fcntl.fcntl(w, F_SETPIPE_SZ + 1) == PAGE  # F_GETPIPE_SZ
    return r, w


def session(rig, share: Path, nfiles: int = 0):  # noqa: F811
    """A guest on a fresh back-end holding a POSIX write lock on `f`; with nfiles, that
    many more files created and looked up (a larger state)."""
    b = rig.backend()
    fe = rig.frontend(b, nqueues=3, protocol_features=MIGRATABLE)
    init(fe)
    for i in range(nfiles):
        (share / f"n{i:04d}").write_bytes(b"x")
        lookup(fe, f"n{i:04d}".encode())
    nodeid = lookup(fe, b"f")
    fh = open_file(fe, nodeid)
    assert fe.fuse(REQ, P.SETLK, lk(fh, 1, F_WRLCK, 0, 99), nodeid).error == 0
    return b, fe, nodeid, fh


def held_on_host(path: Path) -> bool:
    fd = os.open(path, os.O_RDWR)
    try:
        arg = struct.pack("hhqqi4x", fcntl.F_WRLCK, 0, 0, 100, 0)
        return struct.unpack("hhqqi4x", fcntl.fcntl(fd, 36, arg))[0] != fcntl.F_UNLCK
    finally:
        os.close(fd)


def test_hand_over_socket_is_ready_before_the_stop(rig, share: Path,  # noqa: F811
                                                    mig_dir: Path) -> None:
    """Dirty logging on (the migration begins): the source's hand-over socket appears,
    while its rings still run; before the state is saved it gives nothing, even to a
    process of our uid. Logging off without a save (a migration cancelled while RAM
    was copied): it goes. On again, then the stop and the save: the state names that
    very socket and a destination collects the descriptors from it (the lock is held
    throughout and is the destination's after)."""
    b0, fe, nodeid, fh = session(rig, share)
    assert sockets(mig_dir) == set()
    dirty_log(fe, True)
    assert wait_until(lambda: len(sockets(mig_dir)) == 1, 10), sockets(mig_dir)
    (first,) = sockets(mig_dir)
    got, nfds = collect_without_secret(mig_dir / first)
    assert (got, nfds) == (b"", 0)
    assert fe.fuse(REQ, P.GETATTR, P.GETATTR_IN.pack(0, 0, 0), nodeid).error == 0  # runs on
    dirty_log(fe, False)
    assert wait_until(lambda: not sockets(mig_dir), 10), sockets(mig_dir)

    dirty_log(fe, True)
    assert wait_until(lambda: len(sockets(mig_dir)) == 1, 10), sockets(mig_dir)
    (ready,) = sockets(mig_dir)
    assert ready != first
    bases = stop_rings(fe)
    status, data = save_state(fe, os.pipe())
    assert status == 0 and data.startswith(MAGIC), data[:200]
    state = json.loads(data[len(MAGIC):])
    assert state["rendezvous"]["name"] == ready
    assert state["rendezvous"]["nfds"] >= 1
    b1 = rig.backend()
    fe1 = rig.frontend(b1, protocol_features=MIGRATABLE, mem=fe.mem, queues=fe.queues)
    assert load_state(fe1, data, os.pipe()) == 0
    assert "descriptors collected from the source" in b1.output()
    switch_over(fe, fe1, bases)
    assert wait_until(lambda: not sockets(mig_dir), 10), sockets(mig_dir)  # used: removed
    fe.close()
    assert b0.proc.wait(10) == 0, b0.output()
    assert held_on_host(share / "f")  # the source's end unlocked nothing
    assert fe1.fuse(REQ, P.SETLK, lk(fh, 2, F_WRLCK, 0, 0), nodeid).error != 0
    assert fe1.fuse(REQ, P.SETLK, lk(fh, 1, F_UNLCK, 0, 99), nodeid).error == 0
    assert not held_on_host(share / "f")
    for b in (b0, b1):
        assert "Traceback" not in b.output(), b.output()


def test_state_larger_than_the_pipe_moves_both_ways(rig, share: Path) -> None:  # noqa: F811
    """A device state of many inodes through pipes that hold one page: the source writes
    what the pipe takes at once and the rest as QEMU drains it, the destination reads
    while QEMU still writes (QEMU sends CHECK_DEVICE_STATE only after its end is
    done, so a back-end that read only then would wait forever on a full pipe)."""
    b0, fe, nodeid, fh = session(rig, share, nfiles=400)
    dirty_log(fe, True)
    bases = stop_rings(fe)
    status, data = save_state(fe, small_pipe())
    assert status == 0 and len(data) > 3 * PAGE, len(data)
    b1 = rig.backend()
    fe1 = rig.frontend(b1, protocol_features=MIGRATABLE, mem=fe.mem, queues=fe.queues)
    assert load_state(fe1, data, small_pipe()) == 0
    switch_over(fe, fe1, bases)
    fe.close()
    assert b0.proc.wait(10) == 0, b0.output()
    assert held_on_host(share / "f")
    r = fe1.fuse(REQ, P.READ, P.READ_IN.pack(fh, 0, 100, 0, 0, 0, 0), nodeid, out=116)
    assert r.payload == b"hello world\n"
    assert lookup(fe1, b"n0399")  # an inode known before the move
    for b in (b0, b1):
        assert "Traceback" not in b.output(), b.output()

