"""`vfs-lockd virtiofs` driven by a Python vhost-user front-end (tests/vhost_frontend.py)
instead of QEMU: real Unix socket, memfd guest memory passed with SCM_RIGHTS, split rings
laid out in it, eventfd kicks and calls, a real back-end process and real host locks."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import select
import socket
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import REPO, VFS_LOCKD
from daemonutil import DaemonProc, HostHolder
from fuse_oracle import LK_IN, LK_OUT, host_can_lock
from procutil import stop as stop_process
from procutil import wait_until
from vhost_frontend import (
    DESC,
    GET_FEATURES,
    GET_PROTOCOL_FEATURES,
    HDR,
    REGION,
    SET_VRING_CALL,
    STATE,
    U64,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_WRITE,
    Frontend,
)

from fuse_server import protocol as P
from lockd.api import F_RDLCK, F_UNLCK, F_WRLCK, OFFSET_MAX

REQ = 1  # the first request queue


class Backend:
    """`vfs-lockd virtiofs` on socket TMP/vu{n}.sock (`name`, default str(n), names the
    socket, log and guest); `wrap` runs its command line inside something (another host's
    network namespace), `env` adds to its environment."""

    def __init__(self, tmp: Path, share: Path, n: int | str, args: list[str],
                 wrap: Callable[[list[str]], list[str]] = list,
                 env: dict[str, str] | None = None) -> None:
        self.sock = tmp / f"vu{n}.sock"
        self.log = tmp / f"backend{n}.log"
        self._logf = open(self.log, "wb")  # noqa: SIM115 - closed in stop()
        env = dict(os.environ, PYTHONPATH=str(REPO), **(env or {}))
        self.proc = subprocess.Popen(
            wrap([*VFS_LOCKD, "virtiofs", "--socket-path", str(self.sock), "--shared-dir",
                  str(share), "--guest", f"vm{n}", *args]),
            stdout=self._logf, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        if not wait_until(lambda: self.sock.exists() or self.proc.poll() is not None, 20) \
                or not self.sock.exists():
            self.stop()
            raise RuntimeError(f"back-end {n} did not come up:\n{self.output()}")

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> int | None:
        rc = stop_process(self.proc)
        self._logf.close()
        return rc


@pytest.fixture
def share(tmp_path: Path) -> Path:
    d = tmp_path / "share"
    d.mkdir()
    (d / "f").write_bytes(b"hello world\n")
    return d


class Rig:
    """rig.backend(*args) starts a back-end (with `env` added to its environment);
    rig.frontend(backend) connects to it. close() stops and closes all of them, whatever
    happened."""

    def __init__(self, tmp: Path, share: Path, env: dict[str, str] | None = None) -> None:
        self.tmp, self.share, self.env = tmp, share, env
        self.backends: list[Backend] = []
        self.frontends: list[Frontend] = []

    def backend(self, *args: str) -> Backend:
        b = Backend(self.tmp, self.share, len(self.backends), list(args), env=self.env)
        self.backends.append(b)
        return b

    def frontend(self, b: Backend, **kw) -> Frontend:
        fe = Frontend(str(b.sock), **kw)
        self.frontends.append(fe)
        return fe

    def close(self) -> None:
        with contextlib.ExitStack() as stack:  # every one runs even if another raises
            for b in self.backends:
                stack.callback(b.stop)
            for fe in self.frontends:
                stack.callback(fe.close)


@pytest.fixture
def rig(tmp_path: Path, share: Path):
    r = Rig(tmp_path, share)
    try:
        yield r
    finally:
        r.close()


# ---- FUSE helpers ----
def init(fe: Frontend) -> int:
    body = P.INIT_IN.pack(7, 38, 65536, 0xFFFFFFFF) + bytes(48)
    out = fe.fuse(REQ, P.INIT, body).payload
    major, minor, _, flags, *_ = P.INIT_OUT.unpack_from(out)
    assert (major, minor) == (7, 38)
    return flags


def lookup(fe: Frontend, name: bytes, indirect: bool = False) -> int:
    out = fe.fuse(REQ, P.LOOKUP, name + b"\0", indirect=indirect).payload
    return P.ENTRY_OUT.unpack_from(out)[0]


def open_file(fe: Frontend, nodeid: int, flags: int = os.O_RDWR) -> int:
    return P.OPEN_OUT.unpack_from(fe.fuse(REQ, P.OPEN, P.OPEN_IN.pack(flags, 0), nodeid).payload)[0]


def lk(fh: int, owner: int, type_: int, start: int = 0, end: int = OFFSET_MAX) -> bytes:
    return LK_IN.pack(fh, owner, start, end, type_, 4242, 0)


@pytest.fixture
def session(rig, share):
    """A back-end with an initialised FUSE session and `f` open: (backend, fe, nodeid, fh)."""
    b = rig.backend()
    fe = rig.frontend(b)
    flags = init(fe)
    assert flags & P.POSIX_LOCKS and flags & P.FLOCK_LOCKS
    nodeid = lookup(fe, b"f")
    return b, fe, nodeid, open_file(fe, nodeid)


# ---- tests ----
def test_init_lookup_getattr_read_write(session, share: Path) -> None:
    b, fe, nodeid, fh = session
    out = fe.fuse(REQ, P.GETATTR, P.GETATTR_IN.pack(0, 0, 0), nodeid).payload
    assert P.ATTR.unpack_from(out, 16)[1] == len(b"hello world\n")  # attr.size
    assert lookup(fe, b"f", indirect=True) == nodeid  # the same request via an indirect table
    assert fe.fuse(REQ, P.LOOKUP, b"nope\0").error == errno.ENOENT
    # A WRITE whose data straddles the two guest-memory regions (adjacent in guest
    # physical space, swapped in the memfd): the gathered bytes must come out in order.
    q = fe.queue(REQ)
    data = bytes(range(256)) * 64
    fe.mem.next = 8 << 20  # REGION_SIZE: the next allocation starts at the boundary...
    fe.mem.next -= 5000  # ...and the data buffer crosses it
    hdr, _ = fe.fuse_msg(P.WRITE, P.WRITE_IN.pack(fh, 0, len(data), 0, 0, 0, 0) + data, nodeid)
    head = q.post([hdr[:40], hdr[40:80], hdr[80:]], [16, 8])
    r = q.wait(head)
    assert P.WRITE_OUT.unpack_from(r.payload)[0] == len(data)
    assert (share / "f").read_bytes() == data
    # READ into writable buffers that straddle the boundary too.
    fe.mem.next = (8 << 20) - 3000
    r = fe.fuse(REQ, P.READ, P.READ_IN.pack(fh, 0, len(data), 0, 0, 0, 0), nodeid,
                out=16 + len(data))
    assert r.payload == data
    # The hiprio queue takes FORGET: the chain comes back with nothing written.
    head = fe.queue(0).post([fe.fuse_msg(P.FORGET, P.FORGET_IN.pack(1), nodeid)[0]], [])
    assert fe.queue(0).wait(head).used_len == 0
    assert "Traceback" not in b.output()


def test_setlk_getlk_and_host_conflicts(session, share: Path) -> None:
    b, fe, nodeid, fh = session
    assert fe.fuse(REQ, P.SETLK, lk(fh, 1, F_WRLCK, 0, 99), nodeid).error == 0
    assert not host_can_lock(share / "f", 0, 0)  # a host process sees the guest's lock
    assert fe.fuse(REQ, P.SETLK, lk(fh, 2, F_RDLCK, 50, 60), nodeid).error == errno.EAGAIN
    out = fe.fuse(REQ, P.GETLK, lk(fh, 2, F_WRLCK, 10, 20), nodeid).payload
    start, end, type_, _pid = LK_OUT.unpack_from(out)
    assert (start, end, type_) == (0, 99, F_WRLCK)
    assert fe.fuse(REQ, P.SETLK, lk(fh, 1, F_UNLCK), nodeid).error == 0
    assert host_can_lock(share / "f", 0, 0)


def test_setlkw_waits_without_stalling_the_queue(session, share: Path) -> None:
    b, fe, nodeid, fh = session
    q = fe.queue(REQ)
    assert fe.fuse(REQ, P.SETLK, lk(fh, 1, F_WRLCK), nodeid).error == 0
    wait_head = fe.fuse_post(REQ, P.SETLKW, lk(fh, 2, F_WRLCK, 10, 20), nodeid)
    # While the wait holds its chain, later requests on the same queue are answered.
    for _ in range(5):
        assert fe.fuse(REQ, P.GETATTR, P.GETATTR_IN.pack(0, 0, 0), nodeid).error == 0
    assert fe.fuse(REQ, P.SETLK, lk(fh, 3, F_RDLCK, 10, 10), nodeid).error == errno.EAGAIN
    # The ring's lock requests are handled in order on its reader thread: the SETLK just
    # answered came after the wait was queued, and a grant would have been answered
    # inside the call that made it. Not answered by now: still waiting.
    assert not q.is_done(wait_head)
    # The holder unlocks: the wait is granted and its chain answered (callback thread).
    assert fe.fuse(REQ, P.SETLK, lk(fh, 1, F_UNLCK), nodeid).error == 0
    r = q.wait(wait_head, timeout=5)
    assert r.error == 0
    assert fe.fuse(REQ, P.SETLK, lk(fh, 1, F_WRLCK, 15, 15), nodeid).error == errno.EAGAIN
    # A unique that is still in flight is refused instead of answering the wrong chain
    # (a session's request: the native loop answers each chain itself, whatever its
    # unique).
    blocker = fe.fuse_post(REQ, P.SETLKW, lk(fh, 4, F_WRLCK, 10, 20), nodeid, unique=777)
    dup = fe.fuse_post(REQ, P.SETLK, lk(fh, 3, F_RDLCK, 30, 40), nodeid, unique=777)
    assert q.wait(dup).error == errno.EINVAL
    native = fe.fuse_post(REQ, P.GETATTR, P.GETATTR_IN.pack(0, 0, 0), nodeid, unique=777)
    assert q.wait(native).error == 0
    assert fe.fuse(REQ, P.SETLK, lk(fh, 2, F_UNLCK), nodeid).error == 0
    assert q.wait(blocker).error == 0


def test_waits_beyond_half_the_ring_get_enolck(rig, share: Path) -> None:
    b = rig.backend()
    fe = rig.frontend(b, num=8)
    init(fe)
    nodeid = lookup(fe, b"f")
    fh = open_file(fe, nodeid)
    q = fe.queue(REQ)
    assert fe.fuse(REQ, P.SETLK, lk(fh, 1, F_WRLCK), nodeid).error == 0
    heads = [fe.fuse_post(REQ, P.SETLKW, lk(fh, 10 + i, F_WRLCK), nodeid, out=16,
                          indirect=True) for i in range(4)]
    # Half of the 8-entry ring holds waits: the next wait is refused, other requests pass.
    extra = fe.fuse_post(REQ, P.SETLKW, lk(fh, 20, F_WRLCK), nodeid, out=16, indirect=True)
    assert q.wait(extra).error == errno.ENOLCK
    assert fe.fuse(REQ, P.SETLK, lk(fh, 1, F_UNLCK), nodeid, indirect=True).error == 0
    # One of them gets it; the others keep waiting for it.
    assert wait_until(lambda: any(q.is_done(h) for h in heads), 10)
    # Every grant the unlock made was answered inside it, before this later request on
    # the same reader thread: a second winner would be done by now.
    assert fe.fuse(REQ, P.SETLK, lk(fh, 30, F_WRLCK), nodeid, indirect=True).error == errno.EAGAIN
    assert sum(q.is_done(h) for h in heads) == 1


def hostile_chains(fe: Frontend):
    """(name, descriptors, nexts) of chains a malicious guest could post."""
    mem = fe.mem
    hdr, _ = fe.fuse_msg(P.GETATTR, P.GETATTR_IN.pack(0, 0, 0))
    good_r = mem.alloc(len(hdr))
    mem.write(good_r, hdr)
    out = mem.alloc(64)
    nested = mem.alloc(32, 16)
    mem.write(nested, DESC.pack(good_r, len(hdr), 0, 0) + DESC.pack(0, 0, 0, 0))
    outer = mem.alloc(16, 16)
    mem.write(outer, DESC.pack(nested, 32, VIRTQ_DESC_F_INDIRECT, 0))
    looping = mem.alloc(32, 16)  # an indirect table whose entries point at each other
    mem.write(looping, DESC.pack(good_r, len(hdr), 1, 1) + DESC.pack(good_r, 8, 1, 0))
    R, W, IND = 0, VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_INDIRECT  # noqa: N806
    end = 2 * (8 << 20)
    return [
        ("address outside guest memory", [(good_r, len(hdr), R), (1 << 40, 64, W)], None),
        ("readable outside guest memory", [(1 << 40, 64, R), (out, 64, W)], None),
        ("length running off the end", [(good_r, len(hdr), R), (end - 16, 4096, W)], None),
        ("length overflowing 64 bits", [(0xFFFFFFFFFFFFF000, 0xFFFFFFFF, R), (out, 64, W)], None),
        ("chain looping on itself", [(good_r, len(hdr), R), (good_r, 8, R)], [1, 0]),
        ("next index beyond the ring", [(good_r, len(hdr), R), (out, 64, W)], [1, 1000 + 5000]),
        ("readable after writable", [(good_r, len(hdr), R), (out, 64, W), (good_r, 8, R)], None),
        ("indirect inside indirect", [(outer, 16, IND)], None),
        ("indirect table not a multiple of 16", [(nested, 24, IND)], None),
        ("indirect table outside memory", [(1 << 41, 32, IND)], None),
        ("indirect table that loops", [(looping, 32, IND)], None),
        ("indirect with NEXT", [(nested, 32, IND), (out, 64, W)], None),
        ("request shorter than a header", [(good_r, 10, R), (out, 64, W)], None),
        ("readable part larger than the buffer", [(good_r, 0x7FFFFFFF, R), (out, 64, W)], None),
    ]


def test_hostile_descriptor_chains_get_errors(session) -> None:
    b, fe, nodeid, fh = session
    q = fe.queue(REQ)
    chains = hostile_chains(fe)
    eio = []
    for name, descs, nexts in chains:
        # The guest-memory part of the first writable buffer (the back-end may fill it).
        wbufs = [(g, min(n, (16 << 20) - g)) for g, n, f in descs
                 if f & VIRTQ_DESC_F_WRITE and g < (16 << 20)]
        head = q.post_raw(descs, wbufs[:1], nexts)
        r = q.wait(head, timeout=5)  # every chain comes back...
        if r.used_len:  # ...with an error reply where the walk had found room for one
            assert r.error == errno.EIO, name
            eio.append(name)
        # ... and the back-end still serves the next request.
        assert fe.fuse(REQ, P.GETATTR, P.GETATTR_IN.pack(0, 0, 0), nodeid).error == 0, name
    assert {"next index beyond the ring", "readable after writable",
            "request shorter than a header"} <= set(eio), eio
    assert b.proc.poll() is None
    out = b.output()
    assert "Traceback" not in out
    assert out.count("bad descriptor chain") == len(chains)


def test_broken_ring_signals_err_and_spares_other_queues(session) -> None:
    b, fe, nodeid, fh = session
    q = fe.queue(REQ)
    assert lookup(fe, b"f") == nodeid  # one more lookup, for the FORGET below
    # The driver claims more available entries than the ring holds: the ring is broken.
    q.avail_idx = (q.avail_idx + q.num + 5) & 0xFFFF
    fe.mem.set_u16(q.avail + 2, q.avail_idx)
    os.eventfd_write(q.kick, 1)

    def err_signalled() -> bool:
        try:
            return os.eventfd_read(q.err) >= 1
        except BlockingIOError:
            return False

    assert wait_until(err_signalled), "no vring error signalled"
    head = fe.queue(0).post([fe.fuse_msg(P.FORGET, P.FORGET_IN.pack(1), nodeid)[0]], [])
    assert fe.queue(0).wait(head).used_len == 0  # hiprio still served
    # Resetting the ring (stop, set up again from index 0) serves it again.
    fe.stop_queue(q)
    q.avail_idx = q.last_used = 0
    q.free = list(range(q.num))
    q.chains.clear()
    fe.mem.write(q.avail, bytes(4))
    fe.mem.write(q.used, bytes(4))
    fe.start_queue(q)
    assert fe.fuse(REQ, P.GETATTR, P.GETATTR_IN.pack(0, 0, 0), nodeid).error == 0
    assert b.proc.poll() is None


@pytest.mark.parametrize("holder", ["guest", "host"])
def test_stopped_ring_keeps_waits_and_answers_them_when_it_runs_again(
        rig, share: Path, holder: str) -> None:
    """GET_VRING_BASE (VM pause, snapshot) is not the end of the guest: a lock wait on a
    stopped ring keeps its place in the lock queue, is granted while the ring is stopped
    and answered once it runs again, never with EINTR (the guest did not interrupt it).
    Meanwhile nobody else gets the range. The holder is another owner of the same guest
    (on a second request queue that keeps running) or a host process."""
    b = rig.backend()
    fe = rig.frontend(b, nqueues=3)  # hiprio + two request queues
    init(fe)
    nodeid = lookup(fe, b"f")
    fh = open_file(fe, nodeid)
    other = REQ + 1
    q = fe.queue(REQ)
    host = None
    if holder == "guest":
        assert fe.fuse(other, P.SETLK, lk(fh, 1, F_WRLCK), nodeid).error == 0
    else:
        host = HostHolder(str(share / "f"), 0, 0)
        assert host.locked
    wait_head = fe.fuse_post(REQ, P.SETLKW, lk(fh, 2, F_WRLCK), nodeid)
    # The ring is served in order: once this GETATTR is answered the wait is queued.
    assert fe.fuse(REQ, P.GETATTR, P.GETATTR_IN.pack(0, 0, 0), nodeid).error == 0
    base = fe.stop_queue(q)  # the VM is paused
    assert base == q.avail_idx and not q.is_done(wait_head)
    # A third owner asks for the range while the waiter is paused: it is queued behind
    # the waiter (FIFO), not granted.
    third = fe.fuse_post(other, P.SETLKW, lk(fh, 3, F_WRLCK), nodeid)
    assert fe.fuse(other, P.GETATTR, P.GETATTR_IN.pack(0, 0, 0), nodeid).error == 0
    assert not fe.queue(other).is_done(third)
    # The holder lets go while the waiter's ring is stopped: the grant is the waiter's,
    # and its reply waits for the ring.
    if host is None:
        assert fe.fuse(other, P.SETLK, lk(fh, 1, F_UNLCK), nodeid).error == 0
    else:
        host.release()
    assert not fe.queue(other).is_done(third)  # the range went to the paused waiter
    assert not q.is_done(wait_head)  # nothing is written to a stopped ring
    fe.start_queue(q, base)  # the VM runs again
    assert q.wait(wait_head).error == 0
    assert not host_can_lock(share / "f", 0, 0)
    # the waiter unlocks: now the third owner's turn
    assert fe.fuse(REQ, P.SETLK, lk(fh, 2, F_UNLCK), nodeid).error == 0
    assert fe.queue(other).wait(third).error == 0
    assert "EINTR" not in b.output()


def test_disconnect_releases_locks_and_exits(rig, share: Path) -> None:
    b = rig.backend()
    fe = rig.frontend(b)
    init(fe)
    nodeid = lookup(fe, b"f")
    fh = open_file(fe, nodeid)
    assert fe.fuse(REQ, P.SETLK, lk(fh, 1, F_WRLCK), nodeid).error == 0
    fe.fuse_post(REQ, P.SETLKW, lk(fh, 2, F_WRLCK), nodeid)  # left waiting
    assert not host_can_lock(share / "f", 0, 0)
    fe.close()  # QEMU gone: socket EOF
    assert b.proc.wait(10) == 0, b.output()
    assert host_can_lock(share / "f", 0, 0)
    assert not b.sock.exists()


def test_persist_serves_a_new_connection_with_a_new_session(rig, share: Path) -> None:
    b = rig.backend("--persist")
    fe = rig.frontend(b)
    init(fe)
    nodeid = lookup(fe, b"f")
    fh = open_file(fe, nodeid)
    assert fe.fuse(REQ, P.SETLK, lk(fh, 1, F_WRLCK), nodeid).error == 0
    fe.close()
    assert wait_until(lambda: host_can_lock(share / "f", 0, 0))  # once it saw the EOF
    assert b.proc.poll() is None
    fe2 = rig.frontend(b)
    # A new session: requests before INIT fail, INIT works, the old fh is unknown.
    assert fe2.fuse(REQ, P.GETATTR, P.GETATTR_IN.pack(0, 0, 0)).error == errno.EIO
    init(fe2)
    assert fe2.fuse(REQ, P.SETLK, lk(fh, 1, F_WRLCK), nodeid).error in (
        errno.EBADF, errno.EINVAL, errno.ESTALE)
    nodeid = lookup(fe2, b"f")
    fh = open_file(fe2, nodeid)
    assert fe2.fuse(REQ, P.SETLK, lk(fh, 1, F_WRLCK), nodeid).error == 0
    assert b.stop() == 0  # SIGTERM: clean exit, the guest released
    assert host_can_lock(share / "f", 0, 0)


def test_reinit_after_reset_releases_the_old_session(session, share: Path) -> None:
    b, fe, nodeid, fh = session
    assert fe.fuse(REQ, P.SETLK, lk(fh, 1, F_WRLCK), nodeid).error == 0
    # The guest reboots: QEMU stops the rings, the new kernel sets them up from scratch
    # and sends INIT again. The locks of the old kernel must go.
    for q in fe.queues:
        fe.stop_queue(q)
        q.avail_idx = q.last_used = 0
        q.free = list(range(q.num))
        q.chains.clear()
        fe.mem.write(q.avail, bytes(4))
        fe.mem.write(q.used, bytes(4))
        fe.start_queue(q)
    init(fe)
    assert host_can_lock(share / "f", 0, 0)


def test_protocol_edge_cases(rig) -> None:
    b = rig.backend()
    fe = rig.frontend(b)
    # An unknown request with need_reply gets a failure ack, not a crash.
    assert fe.acked(99, b"\0" * 8) != 0
    # A memory table whose fd count does not match fails; the old table stays in use.
    assert fe.acked(5, STATE.pack(2, 0) + bytes(64), [fe.mem.fd]) != 0
    init(fe)
    # Garbage framing (wrong version bits) closes this connection; the back-end exits 0.
    fe.sock.sendall(HDR.pack(GET_FEATURES, 0, 0))
    assert b.proc.wait(10) == 0, b.output()
    assert "protocol error" in b.output()


def test_offers_no_protocol_feature_it_does_not_use(rig) -> None:
    """Each protocol feature offered is work QEMU does at every device start, a live
    migration's destination's included (its downtime): F_STATUS (bit 16) is a GET_STATUS
    round trip and a SET_STATUS there, for a status nothing here reads."""
    fe = rig.frontend(rig.backend())
    offered = U64.unpack(fe.call(GET_PROTOCOL_FEATURES))[0]
    assert not offered & 1 << 16, hex(offered)
    # what is used: MQ, LOG_SHMFD, REPLY_ACK, RESET_DEVICE, DEVICE_STATE
    assert offered == 1 << 0 | 1 << 1 | 1 << 3 | 1 << 13 | 1 << 19, hex(offered)


def test_memory_table_past_its_file_is_refused(session, share: Path) -> None:
    """A hostile front-end describes a region larger than its memfd (touching the part
    past the file's end would kill the back-end with SIGBUS): the table is refused, the
    one in use stays, and the guest keeps being served."""
    b, fe, nodeid, fh = session
    small = os.memfd_create("hostile", os.MFD_CLOEXEC)
    os.ftruncate(small, 16 << 20)
    try:
        big = REGION.pack(0, 1 << 30, 0x7000_0000_0000, 0)  # 1 GiB on a 16 MiB file
        assert fe.acked(5, STATE.pack(1, 0) + big, [small]) != 0
        overlap = (REGION.pack(0, 8 << 20, 0x7000_0000_0000, 0)
                   + REGION.pack(4 << 20, 8 << 20, 0x7100_0000_0000, 8 << 20))
        assert fe.acked(5, STATE.pack(2, 0) + overlap, [small, small]) != 0
    finally:
        os.close(small)
    assert fe.fuse(REQ, P.GETATTR, P.GETATTR_IN.pack(0, 0, 0), nodeid).error == 0
    assert b.proc.poll() is None
    assert "runs past" in b.output() and "overlap" in b.output()


def test_no_leak_across_sessions(rig) -> None:
    """Many connect/INIT/open/lock/disconnect cycles on one --persist back-end: its fd
    count stays flat (sessions give back their descriptors)."""
    b = rig.backend("--persist", "--sandbox", "none")  # the pid that serves is b.proc's

    def fds() -> int:
        return len(os.listdir(f"/proc/{b.proc.pid}/fd"))

    def held() -> list[str]:  # (what is open, for the failure's message)
        out = []
        for fd in os.listdir(f"/proc/{b.proc.pid}/fd"):
            with contextlib.suppress(OSError):
                out.append(f"{fd}:{os.readlink(f'/proc/{b.proc.pid}/fd/{fd}')}")
        return out

    def cycle() -> None:
        fe = Frontend(str(b.sock))
        try:
            init(fe)
            nodeid = lookup(fe, b"f")
            fh = open_file(fe, nodeid)
            assert fe.fuse(REQ, P.SETLK, lk(fh, 1, F_WRLCK), nodeid).error == 0
        finally:
            fe.close()

    idle, before = fds(), held()  # listening, no session yet
    for i in range(6):
        cycle()
        # the session is torn down after the front-end leaves: its descriptors go back
        assert wait_until(lambda: fds() <= idle + 1, 30), \
            f"cycle {i}: {fds()} open, {idle} idle\nbefore: {before}\nnow: {held()}"


def test_socket_is_private(rig) -> None:
    b = rig.backend()
    assert os.stat(b.sock).st_mode & 0o777 == 0o600
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(str(b.sock))
    finally:
        s.close()
    assert b.proc.wait(10) == 0  # a front-end that leaves at once: clean exit


def test_central_daemon_locks(rig, share: Path, lock_daemon: Path) -> None:
    """--lockd: two back-ends (two guests) on one `vfs-lockd serve`; a wait of one guest
    is granted by the other's unlock, through the daemon's deferred reply."""
    sock = lock_daemon
    try:
        fes = []
        for _ in range(2):
            fe = rig.frontend(rig.backend("--lockd", str(sock)))
            init(fe)
            nodeid = lookup(fe, b"f")
            fes.append((fe, nodeid, open_file(fe, nodeid)))
        (a, na, fa), (b, nb, fb) = fes
        assert a.fuse(REQ, P.SETLK, lk(fa, 1, F_WRLCK), na).error == 0
        assert b.fuse(REQ, P.SETLK, lk(fb, 1, F_WRLCK), nb).error == errno.EAGAIN
        head = b.fuse_post(REQ, P.SETLKW, lk(fb, 1, F_WRLCK), nb)
        assert b.fuse(REQ, P.GETATTR, P.GETATTR_IN.pack(0, 0, 0), nb).error == 0
        assert not b.queue(REQ).is_done(head)
        assert a.fuse(REQ, P.SETLK, lk(fa, 1, F_UNLCK), na).error == 0
        assert b.queue(REQ).wait(head, timeout=5).error == 0
        assert not host_can_lock(share / "f", 0, 0)
        b.close()  # guest b gone: its lock is released by the daemon
        assert wait_until(lambda: host_can_lock(share / "f", 0, 0)), \
            "guest b's lock outlived its connection"
    finally:
        for fe in rig.frontends:  # guests and back-ends first: a client whose daemon is
            fe.close()  # gone waits for it to come back before giving up
        for be in rig.backends:
            be.stop()


# ---- live migration (fuse_server/migration.py), with the Python front-end as QEMU ----
SET_LOG_BASE, SET_DEVICE_STATE_FD, CHECK_DEVICE_STATE = 6, 42, 43
F_LOG_ALL = 1 << 26
PF_LOG_SHMFD, PF_DEVICE_STATE = 1 << 1, 1 << 19
MIGRATABLE = PF_LOG_SHMFD | PF_DEVICE_STATE
MIGRATION_DIR = "/run/vfs-lockd/migration"  # the back-ends' default as root (launch.py)
PAGE = 4096


class Prober:
    """A host process's view, probed continuously from a thread until stopped: is the
    guest's POSIX range [0, 100) held (F_OFD_GETLK, which changes nothing) and its
    flock (a non-blocking flock attempt, which only succeeds when the guest's is gone)?
    Every probe is recorded."""

    def __init__(self, path: Path, flock_too: bool = True) -> None:
        import fcntl
        import struct
        import threading

        self.results: list[tuple[bool, bool]] = []
        self._stop = threading.Event()
        self._fd = os.open(path, os.O_RDWR)
        self._ffd = os.open(path, os.O_RDWR)
        F_OFD_GETLK = 36

        def probe() -> None:
            while not self._stop.is_set():
                arg = struct.pack("hhqqi4x", fcntl.F_WRLCK, 0, 0, 100, 0)
                typ = struct.unpack("hhqqi4x", fcntl.fcntl(self._fd, F_OFD_GETLK, arg))[0]
                flocked = True
                if flock_too:
                    try:
                        fcntl.flock(self._ffd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        fcntl.flock(self._ffd, fcntl.LOCK_UN)
                        flocked = False
                    except BlockingIOError:
                        pass
                self.results.append((typ != fcntl.F_UNLCK, flocked))

        self._thread = threading.Thread(target=probe, daemon=True)
        self._thread.start()

    def stop(self) -> list[tuple[bool, bool]]:
        self._stop.set()
        self._thread.join()
        os.close(self._fd)
        os.close(self._ffd)
        return self.results


STUCK_S = 60


def stuck(fd: int, events: int, what: str) -> None:
    """Wait until `fd` is ready; fail (instead of hanging) if the back-end does not
    move its end of the pipe (not a speed bound: a minute of no progress at all)."""
    p = select.poll()
    p.register(fd, events)
    assert p.poll(STUCK_S * 1000), f"the back-end did not {what} in {STUCK_S} s"


def save_state(fe: Frontend, pipe: tuple[int, int] | None = None) -> tuple[int, bytes]:
    """The source side of QEMU's vhost_save_backend_state, through `pipe` (a new one by
    default): (CHECK status, the bytes)."""
    r, w = pipe or os.pipe()
    try:
        fe.send(SET_DEVICE_STATE_FD, STATE.pack(0, 0), [w])
        os.close(w)
        w = -1
        reply = int.from_bytes(fe.recv(SET_DEVICE_STATE_FD), "little")
        assert reply == 1 << 8, hex(reply)  # accepted, "use your fd"
        chunks = []
        while True:
            stuck(r, select.POLLIN, "write the rest of its state")
            b = os.read(r, 1 << 16)
            if not b:
                break
            chunks.append(b)
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)
    status = int.from_bytes(fe.call(CHECK_DEVICE_STATE), "little")
    return status, b"".join(chunks)


def load_state(fe: Frontend, data: bytes, pipe: tuple[int, int] | None = None) -> int:
    """The destination side (vhost_load_backend_state): all of `data` written (the
    back-end must read while it waits for the next message), the pipe closed, then the
    CHECK status."""
    r, w = pipe or os.pipe()
    try:
        fe.send(SET_DEVICE_STATE_FD, STATE.pack(1, 0), [r])
        os.close(r)
        r = -1
        assert int.from_bytes(fe.recv(SET_DEVICE_STATE_FD), "little") == 1 << 8
        view = memoryview(data)
        os.set_blocking(w, False)
        while view:
            stuck(w, select.POLLOUT, "read the state while QEMU writes it")
            view = view[os.write(w, view):]
    finally:
        os.close(w)
        if r >= 0:
            os.close(r)
    return int.from_bytes(fe.call(CHECK_DEVICE_STATE), "little")


def dirty_log(fe: Frontend, on: bool) -> None:
    """QEMU's dirty logging switched on (the migration begins: SET_LOG_BASE, then the
    features with VHOST_F_LOG_ALL) or off (it ended: the features without it)."""
    if on:
        log = os.memfd_create("dirty-log", os.MFD_CLOEXEC)
        try:
            os.ftruncate(log, fe.mem.size // PAGE // 8)
            fe.send(SET_LOG_BASE, struct_pack_log(fe.mem.size // PAGE // 8), [log])
            assert fe.recv(SET_LOG_BASE) == b""
        finally:
            os.close(log)
    features = fe.features | F_LOG_ALL if on else fe.features & ~F_LOG_ALL
    assert fe.acked(2, features.to_bytes(8, "little")) == 0


def stop_source(fe: Frontend) -> list[int]:
    """QEMU's migration: dirty logging on, then the rings stopped; their bases."""
    dirty_log(fe, True)
    for q in fe.queues:
        fe.set_addr(q, log=True)
    return [fe.stop_queue(q) for q in fe.queues]


def struct_pack_log(size: int, offset: int = 0) -> bytes:
    return size.to_bytes(8, "little") + offset.to_bytes(8, "little")


def as_nobody_connect(path: str) -> int:
    """The errno of connect(path) by uid/gid 65534 (0: it connected)."""
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            os.setgid(65534)
            os.setuid(65534)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.connect(path)
        except OSError as exc:
            code = exc.errno or 255
        finally:
            os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def switch_over(src: Frontend, dst: Frontend, bases: list[int]) -> None:
    """The destination's rings run from the source's bases (QEMU after a load), and the
    guest's memory and rings are the destination's from now on."""
    for q, base in zip(dst.queues, bases, strict=True):
        dst.start_queue(q, base)
    src.owns, dst.owns = False, True


def migrate(rig, src: Frontend, dst_backend: Backend) -> Frontend:
    """src's guest (memory and rings) moved to dst_backend: its front-end, rings running."""
    bases = stop_source(src)
    status, data = save_state(src)
    assert status == 0 and data, data[:200]
    dst = rig.frontend(dst_backend, protocol_features=MIGRATABLE, mem=src.mem,
                       queues=src.queues)
    assert load_state(dst, data) == 0
    switch_over(src, dst, bases)  # the memory and rings are the destination's now
    return dst


def migration_session(rig, *args: str):
    b = rig.backend(*args)
    fe = rig.frontend(b, nqueues=3, protocol_features=MIGRATABLE)
    init(fe)
    nodeid = lookup(fe, b"f")
    return b, fe, nodeid, open_file(fe, nodeid), open_file(fe, nodeid)


@pytest.mark.parametrize("event_idx", [False, True])
def test_dirty_log_marks_what_the_backend_writes(rig, event_idx: bool) -> None:
    """With VHOST_F_LOG_ALL on, every guest page a reply is written into and the used
    ring's element and index are marked in the log, and nothing else; off, nothing.
    With EVENT_IDX also the page of avail_event (the used ring's last field, alone on
    its page here), which the back-end writes when it runs out of requests."""
    b = rig.backend()
    fe = rig.frontend(b, protocol_features=PF_LOG_SHMFD, event_idx=event_idx,
                      avail_event_own_page=True)
    init(fe)
    q = fe.queue(REQ)
    size = fe.mem.size // PAGE // 8
    log = os.memfd_create("dirty-log", os.MFD_CLOEXEC)
    import mmap

    os.ftruncate(log, size + PAGE)
    view = mmap.mmap(log, size + PAGE)
    try:
        # The log at an offset in its file, as the protocol allows.
        fe.send(SET_LOG_BASE, struct_pack_log(size, PAGE), [log])
        assert fe.recv(SET_LOG_BASE) == b""

        def marked() -> set[int]:
            bits = int.from_bytes(view[PAGE:PAGE + size], "little")
            return {i for i in range(size * 8) if bits >> i & 1}

        def read_reply(n: int) -> tuple[set[int], int]:
            """A READ of n bytes into buffers spanning pages: the pages written."""
            fe.mem.next = (fe.mem.next // PAGE + 1) * PAGE - 100  # straddles a page
            head = fe.fuse_post(REQ, P.READ, P.READ_IN.pack(fh, 0, n, 0, 0, 0, 0), nodeid,
                                out=16 + n)
            r = q.wait(head)
            written, pages = r.used_len, set()
            for gpa, length in wbufs.pop(head):
                k = min(length, written)
                if k:
                    pages |= set(range(gpa // PAGE, (gpa + k - 1) // PAGE + 1))
                written -= k
            return pages, r.used_len

        nodeid = lookup(fe, b"f")
        fh = open_file(fe, nodeid)
        wbufs: dict[int, list[tuple[int, int]]] = {}
        orig_post_raw = q.post_raw

        def post_raw(descs, wb, nexts=None):  # noqa: ANN001, ANN202 - remember the buffers
            head = orig_post_raw(descs, wb, nexts)
            wbufs[head] = list(wb)
            return head

        q.post_raw = post_raw  # type: ignore[method-assign]
        read_reply(5000)
        assert marked() == set(), "pages marked before LOG_ALL"
        assert fe.acked(2, (fe.features | F_LOG_ALL).to_bytes(8, "little")) == 0
        read_reply(5000)
        # The used ring's writes are not logged until SET_VRING_ADDR asks (VRING_F_LOG).
        fe.set_addr(q, log=True)
        view[PAGE:PAGE + size] = bytes(size)
        slot = q.last_used % q.num
        pages, used_len = read_reply(12000)
        assert used_len == 16 + len(b"hello world\n")
        used = {(q.used + 4 + 8 * slot) // PAGE, (q.used + 2) // PAGE}
        assert q.avail_event_gpa // PAGE not in used | pages  # the test can tell them apart
        if event_idx:
            used.add(q.avail_event_gpa // PAGE)
            # written by the reader once the ring is empty: maybe after the reply
            wait_until(lambda: marked() == pages | used)
        assert marked() == pages | used, (sorted(marked()), sorted(pages | used))
        # Off again: nothing more is marked.
        assert fe.acked(2, fe.features.to_bytes(8, "little")) == 0
        view[PAGE:PAGE + size] = bytes(size)
        read_reply(5000)
        assert marked() == set()
    finally:
        view.close()
        os.close(log)
    assert "Traceback" not in b.output()


@pytest.mark.parametrize("journal", [False, True])
def test_migration_moves_locks_waits_and_open_files(rig, share: Path, tmp_path: Path,
                                                    journal: bool) -> None:
    """A guest holding a POSIX lock and a flock, with a SETLKW of another owner queued
    behind the POSIX lock, moves to a second back-end and back to a third: a host
    process probing all along never sees the lock or the flock free; the wait is
    granted on the destination when the holder unlocks there; the handles opened before
    read and write; the source's end after each move unlocks nothing."""
    def args() -> list[str]:  # with --journal, each back-end its own (embedded) journal
        return ["--journal", str(tmp_path / f"j{len(rig.backends)}.db")] if journal else []

    b0, fe, nodeid, fh, fh2 = migration_session(rig, *args())
    assert fe.fuse(REQ, P.SETLK, lk(fh, 1, F_WRLCK, 0, 99), nodeid).error == 0
    flock = LK_IN.pack(fh2, 7, 0, OFFSET_MAX, F_WRLCK, 4242, 1)  # FUSE_LK_FLOCK
    assert fe.fuse(REQ, P.SETLK, flock, nodeid).error == 0
    waiter = fe.fuse_post(REQ, P.SETLKW, lk(fh, 2, F_WRLCK, 50, 60), nodeid)
    assert fe.fuse(REQ, P.GETATTR, P.GETATTR_IN.pack(0, 0, 0), nodeid).error == 0
    assert not fe.queue(REQ).is_done(waiter)
    prober = Prober(share / "f")
    try:
        b1 = rig.backend(*args())
        fe1 = migrate(rig, fe, b1)
        fe.close()  # the source QEMU quits: its back-end ends, unlocking nothing
        assert b0.proc.wait(10) == 0, b0.output()
        assert not host_can_lock(share / "f", 0, 100)
        assert not host_can_lock(share / "f", mode="flock")
        assert "stay with the other back-end" in b0.output()
        q = fe1.queue(REQ)
        assert not q.is_done(waiter)  # still waiting, now on b1
        # the handles opened on b0 work on b1
        r = fe1.fuse(REQ, P.READ, P.READ_IN.pack(fh, 0, 100, 0, 0, 0, 0), nodeid, out=116)
        assert r.payload == b"hello world\n"
        w = fe1.fuse(REQ, P.WRITE, P.WRITE_IN.pack(fh2, 0, 5, 0, 0, 0, 0) + b"HELLO", nodeid)
        assert P.WRITE_OUT.unpack_from(w.payload)[0] == 5
        assert (share / "f").read_bytes() == b"HELLO world\n"
        # b1 knows the locks: another owner conflicts, the holder's unlock grants the wait
        assert fe1.fuse(REQ, P.SETLK, lk(fh, 3, F_RDLCK, 0, 0), nodeid).error == errno.EAGAIN
        other_flock = LK_IN.pack(fh, 8, 0, OFFSET_MAX, F_RDLCK, 4242, 1)
        assert fe1.fuse(REQ, P.SETLK, other_flock, nodeid).error == errno.EAGAIN
        assert fe1.fuse(REQ, P.SETLK, lk(fh, 1, F_UNLCK, 0, 49), nodeid).error == 0
        assert not q.is_done(waiter)  # 50..99 is still owner 1's
        # Back again, to a third back-end, with the wait still queued.
        b2 = rig.backend(*args())
        fe2 = migrate(rig, fe1, b2)
        fe1.close()
        assert b1.proc.wait(10) == 0, b1.output()
        # The probes end here: an unlock followed by a grant to another owner leaves
        # the range free for an instant in any lock manager, migration or not.
        results = prober.stop()
        prober = None
        assert results and all(posix and fl for posix, fl in results), \
            f"{sum(1 for p, f in results if not (p and f))} of {len(results)} probes saw a lock free"
        q = fe2.queue(REQ)
        assert fe2.fuse(REQ, P.SETLK, lk(fh, 1, F_UNLCK), nodeid).error == 0
        assert q.wait(waiter).error == 0  # granted on b2
        assert fe2.fuse(REQ, P.SETLK, lk(fh, 3, F_RDLCK, 55, 55), nodeid).error == errno.EAGAIN
        # the guest lets go: then the host sees it all free
        assert fe2.fuse(REQ, P.SETLK, lk(fh, 2, F_UNLCK), nodeid).error == 0
        assert fe2.fuse(REQ, P.SETLK, LK_IN.pack(fh2, 7, 0, OFFSET_MAX, F_UNLCK, 4242, 1),
                        nodeid).error == 0
        assert host_can_lock(share / "f", 0, 100) and host_can_lock(share / "f", mode="flock")
        for out in (b1.output(), b2.output()):
            assert "Traceback" not in out
    finally:
        if prober is not None:
            prober.stop()


@pytest.mark.parametrize("how", ["destination-refused", "destination-killed",
                                 "destination-reset"])
def test_failed_migration_leaves_the_source_running(rig, share: Path, how: str) -> None:
    """The source saved its state (its wait withdrawn, its descriptors offered); the
    destination then fails: the source's rings run again and it has everything: its
    locks were never free, its wait is queued again and granted by the holder's unlock.
    A destination that collected the descriptors and dies unlocks nothing."""
    b0, fe, nodeid, fh, fh2 = migration_session(rig)
    assert fe.fuse(REQ, P.SETLK, lk(fh, 1, F_WRLCK, 0, 99), nodeid).error == 0
    waiter = fe.fuse_post(REQ, P.SETLKW, lk(fh, 2, F_WRLCK, 0, 99), nodeid)
    assert fe.fuse(REQ, P.GETATTR, P.GETATTR_IN.pack(0, 0, 0), nodeid).error == 0
    prober = Prober(share / "f", flock_too=False)
    try:
        bases = stop_source(fe)
        status, data = save_state(fe)
        assert status == 0
        b1 = rig.backend()
        dst = rig.frontend(b1, protocol_features=MIGRATABLE, mem=fe.mem, queues=fe.queues)
        offer = json.loads(data[data.index(b"{"):])["rendezvous"]
        where = Path(MIGRATION_DIR)
        assert where.stat().st_mode & 0o777 == 0o700
        assert (where / offer["name"]).stat().st_mode & 0o777 == 0o600
        if how == "destination-refused":
            # Someone else (here: of our uid) without the secret gets no descriptor.
            thief = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                thief.connect(str(where / offer["name"]))
                thief.sendall(bytes(32))
                data_, anc, _, _ = thief.recvmsg(16, socket.CMSG_SPACE(64))
                assert data_ == b"" and not anc
            finally:
                thief.close()
            # Another uid cannot even reach the socket (a real second uid).
            assert as_nobody_connect(str(where / offer["name"])) == errno.EACCES
            assert load_state(dst, data.replace(b'"format":1', b'"format":9')) != 0
            assert "format 9" in b1.output()
        else:
            assert load_state(dst, data) == 0  # it holds references to the descriptions
            if how == "destination-reset":  # a device reset before it ran: not its locks
                assert dst.acked(4) == 0  # RESET_OWNER
                assert not host_can_lock(share / "f", 0, 100)
            dst.close()
            assert b1.proc.wait(10) == 0, b1.output()
            assert not host_can_lock(share / "f", 0, 100)
            assert "stay with the other back-end" in b1.output()
        assert not host_can_lock(share / "f", 0, 100)
        # QEMU resumes the source
        assert fe.acked(2, fe.features.to_bytes(8, "little")) == 0
        for q, base in zip(fe.queues, bases, strict=True):
            fe.start_queue(q, base)
        assert "keeps the guest" in b0.output()
        assert not (where / offer["name"]).exists()  # the offer is withdrawn
        q = fe.queue(REQ)
        assert not q.is_done(waiter)
        assert fe.fuse(REQ, P.SETLK, lk(fh, 3, F_RDLCK, 0, 0), nodeid).error == errno.EAGAIN
        results = prober.stop()
        prober = None
        assert results and all(p for p, _ in results), \
            f"{sum(1 for p, _ in results if not p)} of {len(results)} probes saw the lock free"
        assert fe.fuse(REQ, P.SETLK, lk(fh, 1, F_UNLCK), nodeid).error == 0
        assert q.wait(waiter).error == 0
        r = fe.fuse(REQ, P.READ, P.READ_IN.pack(fh, 0, 100, 0, 0, 0, 0), nodeid, out=116)
        assert r.payload == b"hello world\n"
        # and it is the owner as before: its disconnect releases the guest
        fe.close()
        assert b0.proc.wait(10) == 0, b0.output()
        assert host_can_lock(share / "f", 0, 100)
        assert "EINTR" not in b0.output()
    finally:
        if prober is not None:
            prober.stop()


@pytest.fixture
def lock_daemon(tmp_path: Path):
    """A `vfs-lockd serve` (journaled) for central-mode back-ends: its socket."""
    d = DaemonProc(str(tmp_path)).start()
    try:
        yield Path(d.sock)
    finally:
        d.stop()


@pytest.mark.parametrize("outcome", ["migrated", "refused"])
def test_central_mode_migration(rig, share: Path, lock_daemon: Path, outcome: str) -> None:
    """--lockd: the daemon holds the guest's locks and its queued wait; the destination's
    back-end takes the guest's daemon session over when the guest runs there (the wait
    keeps its place and is answered there), the source's end releases nothing. A
    refused state leaves the source running with everything, the wait still queued."""
    b0 = rig.backend("--lockd", str(lock_daemon))
    fe = rig.frontend(b0, nqueues=3, protocol_features=MIGRATABLE)
    init(fe)
    nodeid = lookup(fe, b"f")
    fh, fh2 = open_file(fe, nodeid), open_file(fe, nodeid)
    assert fe.fuse(REQ, P.SETLK, lk(fh, 1, F_WRLCK, 0, 99), nodeid).error == 0
    flock = LK_IN.pack(fh2, 7, 0, OFFSET_MAX, F_WRLCK, 4242, 1)  # FUSE_LK_FLOCK
    assert fe.fuse(REQ, P.SETLK, flock, nodeid).error == 0
    waiter = fe.fuse_post(REQ, P.SETLKW, lk(fh, 2, F_WRLCK, 50, 60), nodeid)
    assert fe.fuse(REQ, P.GETATTR, P.GETATTR_IN.pack(0, 0, 0), nodeid).error == 0
    assert not fe.queue(REQ).is_done(waiter)
    prober = Prober(share / "f")
    try:
        b1 = rig.backend("--lockd", str(lock_daemon))
        if outcome == "refused":
            bases = stop_source(fe)
            status, data = save_state(fe)
            assert status == 0
            dst = rig.frontend(b1, protocol_features=MIGRATABLE, mem=fe.mem,
                               queues=fe.queues)
            assert load_state(dst, data.replace(b'"format":1', b'"format":9')) != 0
            assert fe.acked(2, fe.features.to_bytes(8, "little")) == 0
            for q, base in zip(fe.queues, bases, strict=True):
                fe.start_queue(q, base)
            live, q = fe, fe.queue(REQ)
        else:
            live = migrate(rig, fe, b1)
            fe.close()  # the source QEMU quits: its back-end ends, releasing nothing
            assert b0.proc.wait(15) == 0, b0.output()
            assert not host_can_lock(share / "f", 0, 100)
            q = live.queue(REQ)
            r = live.fuse(REQ, P.READ, P.READ_IN.pack(fh, 0, 100, 0, 0, 0, 0), nodeid, out=116)
            assert r.payload == b"hello world\n"
        assert not q.is_done(waiter)
        assert live.fuse(REQ, P.SETLK, lk(fh, 3, F_RDLCK, 0, 0), nodeid).error == errno.EAGAIN
        results = prober.stop()
        prober = None
        assert results and all(p and f for p, f in results), \
            f"{sum(1 for p, f in results if not (p and f))} of {len(results)} probes saw a lock free"
        # the holder unlocks where the guest runs: the wait, queued all along, is granted
        assert live.fuse(REQ, P.SETLK, lk(fh, 1, F_UNLCK), nodeid).error == 0
        assert q.wait(waiter).error == 0
        assert live.fuse(REQ, P.SETLK, lk(fh, 3, F_RDLCK, 55, 55), nodeid).error == errno.EAGAIN
        assert live.fuse(REQ, P.SETLK, lk(fh, 2, F_UNLCK), nodeid).error == 0
        assert live.fuse(REQ, P.SETLK, LK_IN.pack(fh2, 7, 0, OFFSET_MAX, F_UNLCK, 4242, 1),
                         nodeid).error == 0
        assert host_can_lock(share / "f", 0, 100) and host_can_lock(share / "f", mode="flock")
        for b in rig.backends:
            assert "Traceback" not in b.output(), b.output()
    finally:
        if prober is not None:
            prober.stop()
        for f in rig.frontends:  # back-ends before the daemon (the fixture's finally)
            f.close()
        for b in rig.backends:
            b.stop()


def test_central_takeover_does_not_hold_the_rings(rig, share: Path,
                                                  lock_daemon: Path) -> None:
    """--lockd: the destination's rings start (and serve) while the daemon session
    takeover is still in flight (the daemon is stopped, SIGSTOP, right after the
    load); a lock request sent meanwhile waits for the takeover and is then answered
    by the session the guest held all along; nothing is free at any point."""
    import signal

    b0 = rig.backend("--lockd", str(lock_daemon))
    fe = rig.frontend(b0, nqueues=3, protocol_features=MIGRATABLE)
    init(fe)
    nodeid = lookup(fe, b"f")
    fh = open_file(fe, nodeid)
    assert fe.fuse(REQ, P.SETLK, lk(fh, 1, F_WRLCK, 0, 99), nodeid).error == 0
    daemon = daemon_pid(lock_daemon)
    prober = Prober(share / "f", flock_too=False)
    stopped = False
    try:
        b1 = rig.backend("--lockd", str(lock_daemon))
        bases = stop_source(fe)
        status, data = save_state(fe)
        assert status == 0
        dst = rig.frontend(b1, protocol_features=MIGRATABLE, mem=fe.mem, queues=fe.queues)
        assert load_state(dst, data) == 0
        os.kill(daemon, signal.SIGSTOP)
        stopped = True
        switch_over(fe, dst, bases)  # acked: the rings run with the daemon stopped
        r = dst.fuse(REQ, P.READ, P.READ_IN.pack(fh, 0, 100, 0, 0, 0, 0), nodeid, out=116)
        assert r.payload == b"hello world\n"  # served before the takeover is done
        q = dst.queue(REQ)
        probe = dst.fuse_post(REQ, P.SETLK, lk(fh, 3, F_RDLCK, 0, 0), nodeid)
        assert dst.fuse(REQ, P.GETATTR, P.GETATTR_IN.pack(0, 0, 0), nodeid).error == 0
        assert not q.is_done(probe)  # behind the takeover, after a later GETATTR
        os.kill(daemon, signal.SIGCONT)
        stopped = False
        assert q.wait(probe).error == errno.EAGAIN  # the guest's lock, held all along
        assert wait_until(lambda: "lock session is ours" in b1.output(), 15), b1.output()
        fe.close()  # the source QEMU quits: its back-end ends, releasing nothing
        assert b0.proc.wait(15) == 0, b0.output()
        assert not host_can_lock(share / "f", 0, 100)
        results = prober.stop()
        prober = None
        assert results and all(p for p, _ in results), \
            f"{sum(1 for p, _ in results if not p)} of {len(results)} probes saw the lock free"
        assert dst.fuse(REQ, P.SETLK, lk(fh, 1, F_UNLCK), nodeid).error == 0
        assert host_can_lock(share / "f", 0, 100)
        for b in rig.backends:
            assert "Traceback" not in b.output(), b.output()
    finally:
        if stopped:
            os.kill(daemon, signal.SIGCONT)
        if prober is not None:
            prober.stop()
        for f in rig.frontends:  # back-ends before the daemon (the fixture's finally)
            f.close()
        for b in rig.backends:
            b.stop()


def daemon_pid(sock: Path) -> int:
    """The pid of the `vfs-lockd serve` listening on sock (its peer credentials)."""
    import struct

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(str(sock))
        pid, _, _ = struct.unpack("3i", s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                     struct.calcsize("3i")))
    return pid


def test_native_log_mark_bits_and_bounds() -> None:
    """vl_log_mark: bit (page % 64) of 64-bit word page // 64, for every 4 KiB page the
    range touches; nothing past the log (-ERANGE, the pages before it still marked);
    a range that wraps the address space ends at the log's end too."""
    from lockd.native import ffi, lib

    log = ffi.new("uint64_t[]", 2)  # 128 pages
    addr = int(ffi.cast("uintptr_t", log))

    def bits() -> set[int]:
        return {64 * w + b for w in range(2) for b in range(64) if log[w] >> b & 1}

    assert lib.vl_log_mark(addr, 16, PAGE - 1, 2) == 0  # straddles pages 0 and 1
    assert bits() == {0, 1}
    assert lib.vl_log_mark(addr, 16, 63 * PAGE, PAGE + 1) == 0  # 63, 64: two words
    assert bits() == {0, 1, 63, 64}
    assert lib.vl_log_mark(addr, 16, 10 * PAGE, 0) == 0  # nothing written, nothing marked
    assert lib.vl_log_mark(0, 16, 0, 100) == 0  # not logging
    log[0] = log[1] = 0
    assert lib.vl_log_mark(addr, 16, 127 * PAGE, 2 * PAGE) == -errno.ERANGE
    assert bits() == {127}
    assert lib.vl_log_mark(addr, 15, 64 * PAGE, 1) == -errno.ERANGE  # a partial word
    assert bits() == {127}
    assert lib.vl_log_mark(addr, 16, (1 << 64) - 10, 20) == -errno.ERANGE  # wraps
    assert bits() == {127}


# ---- VIRTIO_RING_F_EVENT_IDX (virtio 1.1, 2.6.7 and 2.6.10) ----
def _calls(q) -> int:  # noqa: ANN001 - a vhost_frontend.Queue
    """The calls signalled since the last look (the eventfd's counter)."""
    try:
        return os.eventfd_read(q.call)
    except BlockingIOError:
        return 0


def _wait_call(q) -> int:  # noqa: ANN001
    """Block until a call comes (at most 10 s); the calls counted."""
    import select

    r, _, _ = select.select([q.call], [], [], 10)
    assert r, "no call"
    return _calls(q)


def test_event_idx_calls_follow_used_event_and_avail_event_is_written(rig) -> None:
    """EVENT_IDX negotiated: the back-end signals only when the used index passes the
    driver's used_event (several replies, one call), ignores the NO_INTERRUPT flag, and
    when it runs out of requests it publishes avail_event = the next avail index (the
    front-end kicks only when it crosses that, so every request here also needs it)."""
    b = rig.backend()
    fe = rig.frontend(b, event_idx=True)
    init(fe)
    nodeid = lookup(fe, b"f")
    q = fe.queue(REQ)
    q.auto_used_event = False
    getattr_in = P.GETATTR_IN.pack(0, 0, 0)

    def used_idx() -> int:
        return fe.mem.u16(q.used + 2)

    def post() -> int:
        return fe.fuse_post(REQ, P.GETATTR, getattr_in, nodeid)

    def sync() -> int:
        """One request with used_event at its entry: the calls counted when its call
        comes (pushes and their calls are serialised: every earlier push has signalled
        or not by then)."""
        fe.mem.set_u16(q.used_event_gpa, used_idx())
        head = post()
        n = _wait_call(q)
        assert q.is_done(head)
        return n

    # A fresh call eventfd: the back-end signals it once at once (replies may have been
    # pushed while there was none), and every later call on it is one we count here.
    old, q.call = q.call, os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    os.close(old)
    assert fe.acked(SET_VRING_CALL, q.index.to_bytes(8, "little"), [q.call]) == 0
    assert _calls(q) == 1
    # used_event three entries ahead: three replies without a call, the fourth calls.
    u = used_idx()
    fe.mem.set_u16(q.used_event_gpa, (u + 3) & 0xFFFF)
    for k in range(1, 4):
        post()
        assert wait_until(lambda k=k: used_idx() == (u + k) & 0xFFFF, 10)
    post()
    assert _wait_call(q) == 1  # the first three were not signalled
    assert used_idx() == (u + 4) & 0xFFFF
    # Eight requests at once, used_event at the last one's entry: one call for all.
    u = used_idx()
    fe.mem.set_u16(q.used_event_gpa, (u + 7) & 0xFFFF)
    heads = [post() for _ in range(8)]
    assert _wait_call(q) == 1
    assert all(q.is_done(h) for h in heads)
    # used_event behind the used index: no call until it is set again.
    assert sync() == 1
    fe.mem.set_u16(q.used_event_gpa, (used_idx() - 1) & 0xFFFF)
    u = used_idx()
    post()
    post()
    assert wait_until(lambda: used_idx() == (u + 2) & 0xFFFF, 10)
    assert sync() == 1  # its own call only
    # NO_INTERRUPT in the avail flags is ignored under EVENT_IDX.
    fe.mem.set_u16(q.avail, 1)
    fe.mem.set_u16(q.used_event_gpa, used_idx())
    post()
    assert _wait_call(q) == 1
    fe.mem.set_u16(q.avail, 0)
    # Idle: the back-end asks to be kicked at the next avail entry.
    assert wait_until(lambda: fe.mem.u16(q.avail_event_gpa) == q.avail_idx, 10), \
        (fe.mem.u16(q.avail_event_gpa), q.avail_idx)
    assert "Traceback" not in b.output()


def _stream(fe: Frontend, nodeid: int, n: int, window: int) -> None:
    """n requests, up to `window` in flight, through a front-end that kicks and waits as
    the Linux driver does with EVENT_IDX: every reply must come, to its own request."""
    q = fe.queue(REQ)
    flight: list[tuple[int, int, int]] = []  # head, unique, opcode
    sent = 0
    while sent < n or flight:
        while sent < n and len(flight) < window:
            if sent % 3 == 1:
                body, op = b"f\0", P.LOOKUP
            else:
                body, op = P.GETATTR_IN.pack(0, 0, 0), P.GETATTR
            msg, unique = fe.fuse_msg(op, body, 1 if op == P.LOOKUP else nodeid)
            head = q.post([msg[:40], msg[40:]], [16, 4080], indirect=sent % 4 != 0)
            flight.append((head, unique, op))
            sent += 1
        head, unique, op = flight.pop(0)
        r = q.wait(head)
        assert r.unique == unique and r.error == 0
        if op == P.LOOKUP:
            assert P.ENTRY_OUT.unpack_from(r.payload)[0] == nodeid


def test_event_idx_stream_loses_no_kick_and_no_call(rig, share: Path) -> None:
    """A stream of requests (up to 12 in flight on a 32-entry ring, indexes wrapping past
    65535) with EVENT_IDX on both sides, then the guest migrated to a second back-end
    with a lock wait in flight, and the stream again there: every reply comes (a lost kick
    or call would leave a request waiting), and the wait is answered on the destination."""
    b0 = rig.backend()
    fe = rig.frontend(b0, num=32, event_idx=True, base=65500, protocol_features=MIGRATABLE)
    init(fe)
    nodeid = lookup(fe, b"f")
    fh = open_file(fe, nodeid)
    q = fe.queue(REQ)
    _stream(fe, nodeid, 300, 12)
    _stream(fe, nodeid, 20, 1)  # one at a time: each reply's own call must come
    assert q.avail_idx < 65500  # wrapped
    assert fe.fuse(REQ, P.SETLK, lk(fh, 1, F_WRLCK), nodeid).error == 0
    waiter = fe.fuse_post(REQ, P.SETLKW, lk(fh, 2, F_WRLCK), nodeid)
    b1 = rig.backend()
    fe1 = migrate(rig, fe, b1)
    fe.close()
    assert b0.proc.wait(10) == 0, b0.output()
    _stream(fe1, nodeid, 200, 12)
    _stream(fe1, nodeid, 20, 1)
    assert not fe1.queue(REQ).is_done(waiter)
    assert fe1.fuse(REQ, P.SETLK, lk(fh, 1, F_UNLCK), nodeid).error == 0
    assert fe1.queue(REQ).wait(waiter).error == 0  # granted, and its call came
    for be in (b0, b1):
        assert "Traceback" not in be.output()


def _connect_when_it_appears(path: Path, seen: threading.Event,
                             refused: list[OSError]) -> None:
    while not path.exists():  # as a script waiting for the file would (no sleep: a race)
        pass
    seen.set()
    c = socket.socket(socket.AF_UNIX)
    try:
        c.connect(str(path))
    except OSError as exc:
        refused.append(exc)
    finally:
        c.close()


def test_the_socket_appears_only_once_it_listens(tmp_path: Path) -> None:
    """A front-end started as soon as the socket file appears (QEMU or a script waiting
    for it) is never refused: the path appears only once the socket listens
    (lockd/unixsock.py, used by the back-end's and the lock daemon's listeners)."""
    from lockd.unixsock import listen_at

    for n in range(300):
        path = tmp_path / f"s{n}.sock"
        refused: list[OSError] = []
        seen = threading.Event()
        t = threading.Thread(target=_connect_when_it_appears, args=(path, seen, refused))
        t.start()
        s = listen_at(str(path), 0o600, 1)
        try:
            assert seen.wait(10)
            t.join(10)
            assert not refused, (n, refused)
            assert os.stat(path).st_mode & 0o777 == 0o600
            assert [p.name for p in tmp_path.iterdir() if p.name.endswith("~")] == []
        finally:
            s.close()
