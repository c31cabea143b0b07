"""`vfs-lockd virtiofs` driven by a Python vhost-user front-end (tests/vhost_frontend.py)
instead of QEMU: real Unix socket, memfd guest memory passed with SCM_RIGHTS, split rings
laid out in it, eventfd kicks and calls, a real back-end process and real host locks."""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import subprocess
from pathlib import Path

import pytest
from conftest import REPO, VFS_LOCKD
from daemonutil import HostHolder
from fuse_oracle import LK_IN, LK_OUT, host_can_lock
from procutil import stop as stop_process
from procutil import wait_until
from vhost_frontend import (
    DESC,
    GET_FEATURES,
    HDR,
    REGION,
    STATE,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_WRITE,
    Frontend,
)

from fuse_server import protocol as P
from lockd.api import F_RDLCK, F_UNLCK, F_WRLCK, OFFSET_MAX

REQ = 1  # the first request queue


class Backend:
    def __init__(self, tmp: Path, share: Path, n: int, args: list[str]) -> None:
        self.sock = tmp / f"vu{n}.sock"
        self.log = tmp / f"backend{n}.log"
        self._logf = open(self.log, "wb")  # noqa: SIM115 - closed in stop()
        env = dict(os.environ, PYTHONPATH=str(REPO))
        self.proc = subprocess.Popen(
            [*VFS_LOCKD, "virtiofs", "--socket-path", str(self.sock), "--shared-dir", str(share),
             "--guest", f"vm{n}", *args],
            stdout=self._logf, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        if not wait_until(lambda: self.sock.exists() or self.proc.poll() is not None, 15) \
                or not self.sock.exists():
            self.stop()
            raise RuntimeError(f"back-end did not come up:\n{self.output()}")

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


@pytest.fixture
def rig(tmp_path: Path, share: Path):
    """rig.backend(*args) starts a back-end; rig.frontend(backend) connects to it. All
    of them are stopped and closed at the end, whatever happened."""

    class Rig:
        def __init__(self) -> None:
            self.backends: list[Backend] = []
            self.frontends: list[Frontend] = []

        def backend(self, *args: str) -> Backend:
            b = Backend(tmp_path, share, len(self.backends), list(args))
            self.backends.append(b)
            return b

        def frontend(self, b: Backend, **kw) -> Frontend:
            fe = Frontend(str(b.sock), **kw)
            self.frontends.append(fe)
            return fe

    r = Rig()
    try:
        yield r
    finally:
        with contextlib.ExitStack() as stack:  # every one runs even if another raises
            for b in r.backends:
                stack.callback(b.stop)
            for fe in r.frontends:
                stack.callback(fe.close)


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
    # A unique that is still in flight is refused instead of answering the wrong chain.
    blocker = fe.fuse_post(REQ, P.SETLKW, lk(fh, 4, F_WRLCK, 10, 20), nodeid, unique=777)
    dup = fe.fuse_post(REQ, P.GETATTR, P.GETATTR_IN.pack(0, 0, 0), nodeid, unique=777)
    assert q.wait(dup).error == errno.EINVAL
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

    def cycle() -> None:
        fe = Frontend(str(b.sock))
        try:
            init(fe)
            nodeid = lookup(fe, b"f")
            fh = open_file(fe, nodeid)
            assert fe.fuse(REQ, P.SETLK, lk(fh, 1, F_WRLCK), nodeid).error == 0
        finally:
            fe.close()

    idle = fds()  # listening, no session yet
    for i in range(6):
        cycle()
        # the session is torn down after the front-end leaves: its descriptors go back
        assert wait_until(lambda: fds() <= idle + 1, 10), (i, idle, fds())


def test_socket_is_private(rig) -> None:
    b = rig.backend()
    assert os.stat(b.sock).st_mode & 0o777 == 0o600
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(str(b.sock))
    finally:
        s.close()
    assert b.proc.wait(10) == 0  # a front-end that leaves at once: clean exit


def test_central_daemon_locks(rig, share: Path, tmp_path: Path) -> None:
    """--lockd: two back-ends (two guests) on one `vfs-lockd serve`; a wait of one guest
    is granted by the other's unlock, through the daemon's deferred reply."""
    sock = tmp_path / "lockd.sock"
    log = open(tmp_path / "lockd.log", "wb")  # noqa: SIM115 - closed below
    daemon = subprocess.Popen(
        [*VFS_LOCKD, "serve", "--socket", str(sock), "--journal", str(tmp_path / "j.db")],
        stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONPATH=str(REPO)),
        cwd=REPO)
    try:
        assert wait_until(lambda: sock.exists() or daemon.poll() is not None, 15)
        assert sock.exists(), "daemon not up"
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
        stop_process(daemon)
        log.close()
