"""A vhost-user back-end for QEMU's vhost-user-fs-pci: the Session served over virtqueues.

QEMU (the front-end) connects to our Unix socket and drives the vhost-user protocol
(qemu docs/interop/vhost-user.rst): feature negotiation, the guest memory table (regions
passed as fds), and per-queue size/addresses/base/kick/call. Queue 0 is virtio-fs's
hiprio queue (FORGET), queues 1.. carry requests. One reader thread per started queue
runs a native loop (vl_ring_serve: waits on its kick eventfd, pops descriptor chains with
a bounds-checked walk, answers the native fast path's requests and pushes their replies)
and hands every other FUSE request to the Session: the lock requests, and with the
embedded manager those that are a few host calls (Session.inline_ops), on the reader;
the rest on the workers.

A SETLKW the Session defers keeps its chain until the lock service's callback answers
it (from any thread: pushes are serialised by the queue's lock); the queue keeps being
served meanwhile. Stopping a queue (GET_VRING_BASE: VM pause, snapshot, migration) is
not the end of the guest: its lock waits keep their chains and their place in the lock
queues, and a wait granted while the ring is stopped is answered when the ring runs
again (the guest cannot interrupt a request over virtio-fs, and an EINTR it did not ask
for would reach the program as errno 512). Only the end of the FUSE session cancels a
guest's waits: a reset (RESET_OWNER/RESET_DEVICE), a second FUSE INIT (the guest
rebooted) or the socket closing, which also release the guest's locks.

Live migration (fuse_server/migration.py): while QEMU copies guest memory every page we
write is marked in its dirty log (SET_LOG_BASE, VHOST_F_LOG_ALL; vl_vq_push marks from
the segments' guest addresses). Once the rings are stopped, SET_DEVICE_STATE_FD (save)
withdraws the guest's lock waits (their chains stay in flight), writes the state to
QEMU's pipe and offers the descriptors on a side socket; the destination's load
(applied at CHECK_DEVICE_STATE) collects them and owns the guest once its rings run,
re-submitting the waits in their order (with --lockd the daemon keeps the locks and the
waits in place, and the destination takes the guest's daemon session over then). A source whose rings run again takes everything
back; one whose state was collected ends, when QEMU closes the connection, without
unlocking anything (the destination holds the same descriptions), and so does a
destination that loaded a state and never ran.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import queue
import select
import socket
import stat
import struct
import threading
import time
from collections.abc import Callable

from fuse_server import migration as M
from fuse_server import protocol as P
from fuse_server.fdtable import reply_cap
from fuse_server.session import NO_REPLY
from fuse_server.transports.virtqueue import (
    RING_STOP,
    RING_UNPUSHED,
    VRING_F_LOG,
    GuestMemory,
    LogArea,
    Popper,
    Region,
    VirtQueue,
    remap_segs,
    require_native,
    segs_from_list,
    segs_to_list,
)
from lockd.api import F_UNLCK
from lockd.fuse.codec import CODEC, lk_type_of, unique_of
from lockd.native import ffi
from lockd.unixsock import listen_at

log = logging.getLogger("vfs-lockd.virtio")

# ---- protocol constants (docs/interop/vhost-user.rst) ----
GET_FEATURES = 1
SET_FEATURES = 2
SET_OWNER = 3
RESET_OWNER = 4
SET_MEM_TABLE = 5
SET_LOG_BASE = 6
SET_LOG_FD = 7
SET_VRING_NUM = 8
SET_VRING_ADDR = 9
SET_VRING_BASE = 10
GET_VRING_BASE = 11
SET_VRING_KICK = 12
SET_VRING_CALL = 13
SET_VRING_ERR = 14
GET_PROTOCOL_FEATURES = 15
SET_PROTOCOL_FEATURES = 16
GET_QUEUE_NUM = 17
SET_VRING_ENABLE = 18
SET_BACKEND_REQ_FD = 21
GET_CONFIG = 24
RESET_DEVICE = 34
GET_MAX_MEM_SLOTS = 36
SET_STATUS = 39
GET_STATUS = 40
SET_DEVICE_STATE_FD = 42
CHECK_DEVICE_STATE = 43

NAMES = {v: k for k, v in globals().items() if k.isupper() and isinstance(v, int) and k[:4] in
         ("GET_", "SET_", "RESE", "CHEC")}

VERSION = 1
FLAG_REPLY = 1 << 2
FLAG_NEED_REPLY = 1 << 3
VRING_INDEX_MASK = 0xFF
VRING_NOFD = 1 << 8

F_LOG_ALL = 1 << 26  # VHOST_F_LOG_ALL: mark what we write in the dirty log (migration)
F_INDIRECT_DESC = 1 << 28  # VIRTIO_RING_F_INDIRECT_DESC
# VIRTIO_RING_F_EVENT_IDX: fewer kicks and calls (used_event/avail_event, in the native
# ring code); a guest started on Rust virtiofsd has it, so migrating it here needs it.
F_EVENT_IDX = 1 << 29
F_PROTOCOL_FEATURES = 1 << 30  # VHOST_USER_F_PROTOCOL_FEATURES
F_VERSION_1 = 1 << 32  # VIRTIO_F_VERSION_1
FEATURES = F_VERSION_1 | F_PROTOCOL_FEATURES | F_INDIRECT_DESC | F_EVENT_IDX | F_LOG_ALL

PF_MQ = 1 << 0  # needed for GET_QUEUE_NUM
PF_LOG_SHMFD = 1 << 1  # SET_LOG_BASE with the log as an fd: QEMU's first migration check
PF_REPLY_ACK = 1 << 3  # need_reply -> u64 0 (ok) / 1 (failed)
PF_RESET_DEVICE = 1 << 13
PF_STATUS = 1 << 16  # not offered (GET/SET_STATUS still answered): see below
PF_DEVICE_STATE = 1 << 19  # SET_DEVICE_STATE_FD / CHECK_DEVICE_STATE (fuse_server/migration.py)
# Only what is used: with F_STATUS QEMU adds a GET_STATUS round trip and a SET_STATUS to
# every device start, a live migration's destination's included (its downtime), and
# nothing here reads the status.
PROTOCOL_FEATURES = PF_MQ | PF_LOG_SHMFD | PF_REPLY_ACK | PF_RESET_DEVICE | PF_DEVICE_STATE

MAX_QUEUES = 64  # hiprio + 63 request queues (QEMU's num-request-queues defaults to 1)
MAX_FDS = 8
MAX_PAYLOAD = 4096  # the largest message we handle (SET_MEM_TABLE) is 8 + 8 * 32 bytes
HIPRIO = 0

HDR = struct.Struct("<III")  # request, flags, size
U64 = struct.Struct("<Q")
STATE = struct.Struct("<II")  # vhost_vring_state: index, num
ADDR = struct.Struct("<IIQQQQ")  # index, flags, desc, used, avail, log (uvas)
REGION = struct.Struct("<QQQQ")  # guest_phys_addr, memory_size, userspace_addr, mmap_offset
LOG = struct.Struct("<QQ")  # vhost_user_log: mmap_size, mmap_offset
STATE_SAVE, STATE_LOAD = 0, 1  # SET_DEVICE_STATE_FD directions (phase 0: stopped)

BUFSIZE = (1 << 20) + 8192  # a 1 MiB WRITE plus its headers (Session.MAX_WRITE)
DRAIN_SECONDS = 2.0  # how long stopping a ring waits for its requests to be answered
# Central, a migration's destination: the daemon takeover starts once the front-end sent
# nothing for this long after the rings started (QEMU's start is a burst of messages).
TAKEOVER_QUIET_S = 0.005


class VhostUserError(Exception):
    """The front-end broke the framing: the connection cannot continue."""


# Plain classes, not dataclasses: that import (with the inspect, ast and dis it pulls in)
# costs every back-end ~1 MiB.
class Pending:
    """A popped chain waiting for its reply."""

    __slots__ = ("vq", "gen", "head", "segs", "out_len", "opcode", "session_gen", "req")

    def __init__(self, vq: VirtQueue, gen: int, head: int, segs: bytes, out_len: int,
                 opcode: int, session_gen: int, req: bytes | None = None) -> None:
        self.vq = vq
        self.gen = gen
        self.head = head
        self.segs = segs
        self.out_len = out_len
        self.opcode = opcode
        self.session_gen = session_gen  # the FUSE session it belongs to: only it may answer
        self.req = req  # a SETLKW's request: a migration re-submits it


class MigrationConfig:
    """What a device needs to hand its state over (fuse_server/migration.py)."""

    __slots__ = ("dir_fd", "central", "daemon", "wrap", "portable")

    def __init__(self, dir_fd: int = -1, central: bool = False, daemon: str | None = None,
                 wrap: Callable[[object], object] | None = None,
                 portable: M.PortableOptions | None = None) -> None:
        self.dir_fd = dir_fd  # the rendezvous directory, opened before the sandbox
        self.central = central  # locks held by the lock daemon (--lockd)
        self.daemon = daemon  # its socket as reachable from here (inside the sandbox)
        self.wrap = wrap  # what the back-end puts around a client
        # virtiofsd's --migration-* options: the state without descriptors (another host)
        self.portable = M.PortableOptions() if portable is None else portable


class _Saved:
    """A source whose state was saved and whose rings have not run since."""

    __slots__ = ("offer", "suspended")

    def __init__(self, offer: M.Offer, suspended: list[int]) -> None:
        self.offer = offer
        self.suspended = suspended  # SETLKW uniques whose waits were withdrawn, in order


class _Reader:
    """A ring's reader thread (its loop is native: vl_ring.c). It answers what the native
    fast path can on its own thread, and the session's requests that are a few host calls
    (Session.inline_ops) too (no hand-over to a worker: the wake-up that costs most under
    a busy guest), but such a host call may hang (a stuck file system in the share), and
    a reader must always be stoppable. So, under the queue's lock, in the
    popper's `state`: `busy` while it is in that call; `stopping` once asked to stop (it
    starts no more of them, the pool answers); a reader asked to stop while busy is
    `abandoned`: not waited for, it completes its request when the call returns (parked
    if the ring stopped) and leaves, never touching the ring again; it then closes its
    stop_fd."""

    def __init__(self, popper: Popper) -> None:
        self.done = threading.Event()
        self.popper = popper
        self.stop_fd = popper.state.stop_fd

    @property
    def abandoned(self) -> bool:
        return bool(self.popper.state.abandoned)


class _Parked:
    """Threads parked for the connection's short-lived jobs (a ring's reader, a state
    transfer through QEMU's pipe). Starting a thread costs 1-2 ms on a loaded host, and
    QEMU waits for these handlers inside a migration's switch-over (the guest is
    stopped): a parked thread takes the job at once. One is spawned only when none is
    idle."""

    def __init__(self, spare: int) -> None:
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._mu = threading.Lock()
        self._idle = 0
        self._threads = 0
        self._closed = False
        for _ in range(spare):
            self._spawn(None)

    def _spawn(self, first: tuple[Callable[[], None], threading.Event, str] | None) -> None:
        with self._mu:
            self._threads += 1
        threading.Thread(target=self._loop, args=(first,), daemon=True,
                         name="vhost-parked").start()

    def _loop(self, job: tuple[Callable[[], None], threading.Event, str] | None) -> None:
        while True:
            if job is not None:
                fn, done, name = job
                threading.current_thread().name = name
                try:
                    fn()
                except Exception:
                    log.exception("%s failed", name)
                finally:
                    done.set()
                with self._mu:
                    self._idle += 1
            else:
                with self._mu:
                    self._idle += 1
            job = self._jobs.get()
            if job is None:
                return

    def run(self, fn: Callable[[], None], name: str) -> threading.Event:
        """Run fn on a parked thread; the event is set when it returned."""
        done = threading.Event()
        job = (fn, done, name)
        with self._mu:
            if self._closed:
                raise RuntimeError("connection closed")
            take = self._idle > 0
            if take:
                self._idle -= 1
        if take:
            self._jobs.put(job)
        else:
            self._spawn(job)
        return done

    def close(self) -> None:
        """The parked threads end (a running job finishes first)."""
        with self._mu:
            self._closed = True
            n = self._threads
        for _ in range(n):
            self._jobs.put(None)


class _Workers:
    """The session's requests that may block in a host call run here, on up to `n`
    threads started as they are needed. A plain queue of jobs: a ThreadPoolExecutor's
    futures made the hand-off cost more (an ACCESS through a vhost-user front-end:
    160-182 us of back-end CPU with it, 104-149 with this; answered on the reader, as
    the quick requests are, a FLUSH costs 30-45)."""

    def __init__(self, n: int, name: str) -> None:
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._n, self._name = n, name
        self._mu = threading.Lock()
        self._threads = self._idle = 0

    def submit(self, fn: Callable[..., None], *args: object) -> None:
        self._jobs.put((fn, args))
        with self._mu:
            start = not self._idle and self._threads < self._n
            if start:
                self._threads += 1
        if start:
            threading.Thread(target=self._loop, daemon=True,
                             name=f"{self._name}_{self._threads}").start()

    def _loop(self) -> None:
        while True:
            with self._mu:
                self._idle += 1
            job = self._jobs.get()
            with self._mu:
                self._idle -= 1
            if job is None:
                return
            fn, args = job
            try:
                fn(*args)
            except Exception:
                log.exception("a worker's job failed")

    def shutdown(self) -> None:
        """Jobs not started are dropped; running ones finish, not waited for (one may
        be stuck in a host call)."""
        while True:
            try:
                self._jobs.get_nowait()
            except queue.Empty:
                break
        with self._mu:
            n = self._threads
        for _ in range(n):
            self._jobs.put(None)


class _StatePipe:
    """One device-state transfer through QEMU's pipe (SET_DEVICE_STATE_FD), moved by the
    connection's thread without blocking: `data` to write (save), or None to read
    (load). The fd is ours (QEMU closed its copy after sending it)."""

    __slots__ = ("fd", "out", "chunks", "total", "error", "done")

    def __init__(self, fd: int, data: bytes | None) -> None:
        self.fd = fd
        self.out = memoryview(data) if data is not None else None
        self.chunks: list[bytes] = []
        self.total = 0
        self.error: str | None = None
        self.done = False
        try:
            os.set_blocking(fd, False)
        except OSError as exc:
            self._fail(f"the state pipe: {exc}")

    @property
    def events(self) -> int:
        return select.POLLOUT if self.out is not None else select.POLLIN

    def pump(self) -> bool:
        """Move what the pipe takes (save) or holds (load) now; True once finished:
        everything written and our end closed (QEMU reads EOF), or EOF read."""
        if self.done:
            return True
        try:
            if self.out is not None:
                while self.out:
                    self.out = self.out[os.write(self.fd, self.out):]
            else:
                while b := os.read(self.fd, 1 << 16):
                    self.total += len(b)
                    if self.total > M.MAX_STATE:
                        raise OSError(errno.EFBIG, f"device state over {M.MAX_STATE} bytes")
                    self.chunks.append(b)
        except BlockingIOError:
            return False
        except OSError as exc:
            self._fail(f"{'writing' if self.out is not None else 'reading'} the state: {exc}")
            return True
        self.close()
        return True

    def loaded(self) -> bytes | None:
        """The bytes read, once a load finished without error."""
        if self.out is not None or not self.done or self.error:
            return None
        return b"".join(self.chunks)

    def _fail(self, why: str) -> None:
        self.error = self.error or why
        self.close()

    def close(self) -> None:
        if not self.done:
            self.done = True
            with contextlib.suppress(OSError):
                os.close(self.fd)


SessionFactory = Callable[[Callable[[bytes], None]], object]  # send -> fuse_server Session


class Device:
    """One front-end connection: the vhost-user state machine and the FUSE session."""

    def __init__(self, conn: socket.socket, new_session: SessionFactory, threads: int = 4,
                 migration: MigrationConfig | None = None) -> None:
        require_native()
        self.conn = conn
        self._new_session_fn = new_session
        self.features = 0
        self.protocol_features = 0
        self.status = 0
        self.memory: GuestMemory | None = None
        self._old_memory: list[GuestMemory] = []  # in-flight chains may point into them
        self.queues: dict[int, VirtQueue] = {}
        self._readers: dict[int, _Reader] = {}
        self.inflight: dict[int, Pending] = {}  # fuse unique -> chain
        self._waits: dict[int, int] = {}  # queue index -> SETLKW chains held
        self._inflight_lock = threading.Lock()
        self._answered = threading.Condition(self._inflight_lock)  # an in-flight chain answered
        self._session_lock = threading.Lock()
        self._session_gen = 0
        self.session = self._make_session()
        self.pool = _Workers(max(1, threads), "virtiofs")
        self.warned_notify = False
        # Live migration (fuse_server/migration.py): the dirty log, the state transfer
        # in progress, a saved source's offer, a loaded destination not yet run.
        self.migration = migration or MigrationConfig()
        self.log_area: LogArea | None = None
        self._state: _StatePipe | None = None  # the state transfer in progress
        # a reader per ring and a state transfer: the ones a switch-over needs at once
        self._parked = _Parked(spare=3)
        self._state_error: str | None = None
        self._saved: _Saved | None = None
        self._pre_offer: M.Offer | None = None  # a source's hand-over socket, not armed yet
        self._suspended: set[int] = set()  # their deferred replies are dropped
        self._adopted = False  # loaded, rings not run yet: the source still owns
        self._resubmit: list[int] = []  # waits to re-submit when the rings run
        self._takeover: threading.Event | None = None  # central: the daemon takeover, done
        self._takeover_due: object | None = None  # central: its lock client, not started yet
        self._handlers: dict[int, Callable[[bytes, list[int]], bytes | None]] = {
            GET_FEATURES: self.get_features,
            SET_FEATURES: self.set_features,
            SET_OWNER: lambda p, f: None,
            RESET_OWNER: self.reset,
            RESET_DEVICE: self.reset,
            SET_MEM_TABLE: self.set_mem_table,
            SET_LOG_BASE: self.set_log_base,
            SET_DEVICE_STATE_FD: self.set_device_state_fd,
            CHECK_DEVICE_STATE: self.check_device_state,
            SET_VRING_NUM: self.set_vring_num,
            SET_VRING_ADDR: self.set_vring_addr,
            SET_VRING_BASE: self.set_vring_base,
            GET_VRING_BASE: self.get_vring_base,
            SET_VRING_KICK: self.set_vring_kick,
            SET_VRING_CALL: self.set_vring_call,
            SET_VRING_ERR: self.set_vring_err,
            GET_PROTOCOL_FEATURES: lambda p, f: U64.pack(PROTOCOL_FEATURES),
            SET_PROTOCOL_FEATURES: self.set_protocol_features,
            GET_QUEUE_NUM: lambda p, f: U64.pack(MAX_QUEUES),
            SET_VRING_ENABLE: self.set_vring_enable,
            SET_STATUS: self.set_status,
            GET_STATUS: lambda p, f: U64.pack(self.status),
        }

    # ------------------------------------------------------------ the session
    def _make_session(self):  # noqa: ANN202 - a fuse_server Session
        self._session_gen += 1
        gen = self._session_gen
        session = self._new_session_fn(lambda reply: self._send(reply, gen))
        self.quick = session.quick_ops()
        self.inline = session.inline_ops()
        return session

    def _end_session(self, replace: bool, keep: int | None = None) -> None:
        """The FUSE connection is over: release the guest's locks and waits (and file
        references, descriptors); with `replace`, a fresh session serves what comes next
        (starting with request `keep`, the INIT that opens it)."""
        with self._session_lock:
            old = self.session
            self._session_gen += 1  # late replies of the old session go nowhere
            with self._inflight_lock:  # its requests will never be answered now
                kept = self.inflight.get(keep) if keep is not None else None
                self.inflight = {}
                if kept is not None:
                    self.inflight[keep] = kept
                self._waits.clear()
                self._answered.notify_all()
            self._suspended.clear()
            self._resubmit.clear()
            for vq in self.queues.values():
                with vq.lock:
                    vq.parked.clear()
            try:
                old.end()
            except Exception:
                log.exception("ending the FUSE session of guest %r", old.guest)
            if replace:
                self.session = self._make_session()  # a new generation again
            if kept is not None:
                kept.session_gen = self._session_gen

    # --------------------------------------------------------- the socket side
    def run(self) -> None:
        """Serve the connection until the front-end closes it; then tear everything down
        (the guest's locks are released)."""
        try:
            while True:
                if self._state is not None and not self._state.done:
                    self._pump_state()
                if self._takeover_due is not None and not select.select(
                        [self.conn], [], [], TAKEOVER_QUIET_S)[0]:
                    self._start_takeover()  # the device start is over
                msg = self._recv()
                if msg is None:
                    log.info("front-end closed the connection")
                    return
                self._dispatch_msg(*msg)
        except VhostUserError as exc:
            log.error("vhost-user protocol error: %s; closing the connection", exc)
        except OSError as exc:
            log.error("vhost-user connection: %s", exc)
        finally:
            self.close()

    def _pump_state(self) -> None:
        """Move the state through QEMU's pipe as it drains or fills, until it is done or
        the front-end sends its next message (CHECK_DEVICE_STATE, after its end)."""
        st = self._state
        assert st is not None
        p = select.poll()
        p.register(self.conn.fileno(), select.POLLIN)
        p.register(st.fd, st.events)
        while not st.done:
            ready = dict(p.poll())
            if st.fd in ready and st.pump():
                return
            if self.conn.fileno() in ready:
                return

    def _recv_exact(self, n: int) -> bytes:
        chunks, got = [], 0
        while got < n:
            b = self.conn.recv(n - got)
            if not b:
                raise VhostUserError("connection closed inside a message")
            chunks.append(b)
            got += len(b)
        return b"".join(chunks)

    def _recv(self) -> tuple[int, int, bytes, list[int]] | None:
        fds: list[int] = []
        data, anc, mflags, _ = self.conn.recvmsg(HDR.size, socket.CMSG_SPACE(MAX_FDS * 4),
                                                 socket.MSG_CMSG_CLOEXEC)
        for level, type_, cdata in anc:
            if level == socket.SOL_SOCKET and type_ == socket.SCM_RIGHTS:
                n = len(cdata) // 4
                fds.extend(struct.unpack(f"{n}i", cdata[: 4 * n]))
        try:
            if not data:
                if fds:
                    raise VhostUserError("fds without a message")
                return None
            if mflags & socket.MSG_CTRUNC:
                raise VhostUserError(f"more than {MAX_FDS} fds with one message")
            if len(data) < HDR.size:
                data += self._recv_exact(HDR.size - len(data))
            req, flags, size = HDR.unpack(data)
            if flags & 3 != VERSION:
                raise VhostUserError(f"message version {flags & 3}, expected {VERSION}")
            if size > MAX_PAYLOAD:
                raise VhostUserError(f"request {req}: {size}-byte payload")
            payload = self._recv_exact(size) if size else b""
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        return req, flags, payload, fds

    def _reply(self, req: int, payload: bytes) -> None:
        self.conn.sendall(HDR.pack(req, VERSION | FLAG_REPLY, len(payload)) + payload)

    def _dispatch_msg(self, req: int, flags: int, payload: bytes, fds: list[int]) -> None:
        handler = self._handlers.get(req)
        name = NAMES.get(req, str(req))
        reply: bytes | None = None
        ok = False
        try:
            if handler is None:
                log.warning("unsupported vhost-user request %s (%d bytes): failed", name,
                            len(payload))
            else:
                log.debug("vhost-user %s %s", name, payload.hex() if len(payload) <= 40 else
                          f"({len(payload)} bytes)")
                t0 = time.monotonic()
                reply = handler(payload, fds)
                ok = True
                log.debug("vhost-user %s done in %.2f ms", name, (time.monotonic() - t0) * 1000)
        except (OSError, ValueError, struct.error) as exc:
            log.warning("vhost-user %s failed: %s", name, exc)
        except Exception:  # a bug costs this request, not the connection
            log.exception("vhost-user %s failed", name)
        finally:
            for fd in fds:  # handlers take the fds they keep out of the list
                os.close(fd)
        if reply is not None:
            self._reply(req, reply)
        elif flags & FLAG_NEED_REPLY and self.protocol_features & PF_REPLY_ACK:
            self._reply(req, U64.pack(0 if ok else 1))
        elif not ok and req in (GET_FEATURES, GET_PROTOCOL_FEATURES, GET_QUEUE_NUM,
                                GET_VRING_BASE, GET_STATUS, GET_CONFIG, GET_MAX_MEM_SLOTS,
                                SET_LOG_BASE, SET_DEVICE_STATE_FD, CHECK_DEVICE_STATE):
            # The front-end blocks on an answer to these: a failed one must still answer
            # (the state transfer ones with "failed": QEMU then fails the migration).
            if req == GET_VRING_BASE:
                self._reply(req, STATE.pack(0, 0))
            elif req == SET_LOG_BASE:
                self._reply(req, b"")
            else:
                self._reply(req, U64.pack(1 if req in (SET_DEVICE_STATE_FD,
                                                       CHECK_DEVICE_STATE) else 0))

    # ------------------------------------------------------------- handlers
    def get_features(self, payload: bytes, fds: list[int]) -> bytes:
        return U64.pack(FEATURES)

    def set_features(self, payload: bytes, fds: list[int]) -> None:
        (features,) = U64.unpack_from(payload)
        if features & ~FEATURES:
            raise ValueError(f"features {features:#x} include ones not offered")
        logging_before = self.features & F_LOG_ALL
        self.features = features
        if features & F_LOG_ALL and not logging_before:
            self._prepare_offer()  # a migration begins: we are its source
        elif not features & F_LOG_ALL:
            self._drop_pre_offer()  # it ended (or never began) without a save here
        if not features & F_PROTOCOL_FEATURES:
            for vq in self.queues.values():
                vq.enabled = True  # rings start enabled without PROTOCOL_FEATURES
        for vq in self.queues.values():
            vq.set_event_idx(bool(features & F_EVENT_IDX))
            self._apply_log(vq)
        log.info("features %#x: event idx %s, dirty log %s", features,
                 "on" if features & F_EVENT_IDX else "off",
                 "on" if features & F_LOG_ALL else "off")

    # ------------------------------------------------------------ dirty log
    def _apply_log(self, vq: VirtQueue) -> None:
        area = self.log_area
        if area is not None and self.features & F_LOG_ALL:
            vq.set_log(area.addr, area.size)
        else:
            vq.set_log(0, 0)

    def set_log_base(self, payload: bytes, fds: list[int]) -> bytes:
        """The dirty log QEMU reads while migrating (answered empty: QEMU waits)."""
        size, offset = LOG.unpack_from(payload)
        if len(fds) != 1:
            raise ValueError(f"SET_LOG_BASE with {len(fds)} fds (we asked for LOG_SHMFD)")
        area = LogArea(fds[0], size, offset)
        old, self.log_area = self.log_area, area
        # A reader marks avail_event (EVENT_IDX) without the queue's lock: the readers
        # are paused while `old` is swapped out, so none of them still writes into it.
        running = list(self._readers) if old is not None else []
        for i in running:
            self._stop_reader(i)
        try:
            for vq in self.queues.values():
                self._apply_log(vq)  # under each queue's lock: no push uses `old` after this
        finally:
            for i in running:
                self._start_reader(self.queues[i])
        if old is not None:
            old.unmap()
        log.info("dirty log: %d bytes (%s)", size, "on" if self.features & F_LOG_ALL else "off")
        return b""
    def set_protocol_features(self, payload: bytes, fds: list[int]) -> None:
        (pf,) = U64.unpack_from(payload)
        self.protocol_features = pf & PROTOCOL_FEATURES

    def set_status(self, payload: bytes, fds: list[int]) -> None:
        (self.status,) = U64.unpack_from(payload)

    def _queue(self, index: int) -> VirtQueue:
        if index >= MAX_QUEUES:
            raise ValueError(f"queue {index} out of range (we offered {MAX_QUEUES})")
        vq = self.queues.get(index)
        if vq is None:
            vq = self.queues[index] = VirtQueue(index)
            vq.enabled = not self.features & F_PROTOCOL_FEATURES
            vq.set_event_idx(bool(self.features & F_EVENT_IDX))
            self._apply_log(vq)
        return vq

    def _take_fd(self, payload: bytes, fds: list[int]) -> tuple[VirtQueue, int]:
        """SET_VRING_KICK/CALL/ERR: the queue and its fd (-1 with the no-fd flag)."""
        (v,) = U64.unpack_from(payload)
        vq = self._queue(v & VRING_INDEX_MASK)
        if v & VRING_NOFD:
            return vq, -1
        if len(fds) != 1:
            raise ValueError(f"expected one fd, got {len(fds)}")
        return vq, fds.pop()

    def set_mem_table(self, payload: bytes, fds: list[int]) -> None:
        nregions, _ = STATE.unpack_from(payload)
        if len(payload) < 8 + nregions * REGION.size:
            raise ValueError(f"{nregions} regions in a {len(payload)}-byte payload")
        regions = [Region(*REGION.unpack_from(payload, 8 + i * REGION.size))
                   for i in range(nregions)]
        memory = GuestMemory(regions, fds)  # mapped: the fds are no longer needed
        if log.isEnabledFor(logging.DEBUG):  # (a migration's destination waits for this)
            log.debug("memory table: %s", ", ".join(f"{r.gpa:#x}+{r.size:#x}" for r in regions))
        running = [i for i in self._readers]
        for i in running:
            self._stop_reader(i)
        try:
            for vq in self.queues.values():
                if vq.started:
                    vq.attach(memory)
        finally:
            if self.memory is not None:
                self._old_memory.append(self.memory)  # unmapped when the connection ends
            self.memory = memory
            for i in running:
                self._start_reader(self.queues[i])

    def set_vring_num(self, payload: bytes, fds: list[int]) -> None:
        index, num = STATE.unpack_from(payload)
        vq = self._queue(index)
        if vq.started:
            raise ValueError(f"queue {index} is running")
        vq.num = num

    def set_vring_addr(self, payload: bytes, fds: list[int]) -> None:
        index, flags, desc, used, avail, log_gpa = ADDR.unpack_from(payload)
        vq = self._queue(index)
        vq.addr = (desc, used, avail)
        vq.set_log_used(bool(flags & VRING_F_LOG), log_gpa)
        if vq.started and self.memory is not None:
            vq.attach(self.memory)

    def set_vring_base(self, payload: bytes, fds: list[int]) -> None:
        index, num = STATE.unpack_from(payload)
        vq = self._queue(index)
        if vq.started:
            raise ValueError(f"queue {index} is running")
        vq.base = num & 0xFFFF

    def get_vring_base(self, payload: bytes, fds: list[int]) -> bytes:
        index, _ = STATE.unpack_from(payload)
        vq = self._queue(index)
        self._stop_queue(vq)
        # (debug, as the start's: a line costs 0.05-0.15 ms on a loaded host, and QEMU
        # waits for these inside a migration's switch-over)
        log.debug("queue %d stopped at avail index %d", index, vq.base)
        return STATE.pack(index, vq.base)

    def set_vring_kick(self, payload: bytes, fds: list[int]) -> None:
        vq, fd = self._take_fd(payload, fds)
        if fd < 0:
            raise ValueError("polling mode (no kick fd) is not supported")
        self._stop_reader(vq.index)
        if vq.kick_fd >= 0:
            os.close(vq.kick_fd)
        vq.kick_fd = fd
        os.set_blocking(fd, False)
        if self.memory is None:
            raise ValueError(f"queue {vq.index}: kick before the memory table")
        # Requests that stayed in flight across a stop belong to this run of the ring
        # now: their replies (and the ones parked while it was stopped) go into it. Their
        # segments are mapped again from their guest addresses: a chain may have been
        # popped by the source of a migration, or before a new memory table.
        with self._inflight_lock:
            for p in self.inflight.values():
                if p.vq is vq:
                    p.gen = vq.gen
                    try:
                        p.segs = remap_segs(p.segs, self.memory)
                    except OSError as exc:  # answered into nothing: a bad chain
                        log.warning("queue %d: request %d: %s", vq.index, p.head, exc)
                        p.segs = b""
        vq.start(self.memory)
        self._start_reader(vq)
        self._rings_run()
        log.debug("queue %d started: size %d, base %d, %d waits in flight", vq.index, vq.num,
                  vq.base, self._waits.get(vq.index, 0))

    def set_vring_call(self, payload: bytes, fds: list[int]) -> None:
        vq, fd = self._take_fd(payload, fds)
        vq.set_call_fd(fd)
        vq.notify()  # replies pushed before the guest's interrupt was wired up

    def set_vring_err(self, payload: bytes, fds: list[int]) -> None:
        vq, fd = self._take_fd(payload, fds)
        old, vq.err_fd = vq.err_fd, fd
        if old >= 0:
            os.close(old)

    def set_vring_enable(self, payload: bytes, fds: list[int]) -> None:
        index, num = STATE.unpack_from(payload)
        # Served either way: virtio-fs has no traffic that must wait for enabling.
        self._queue(index).enabled = bool(num)

    def reset(self, payload: bytes, fds: list[int]) -> None:
        for vq in list(self.queues.values()):
            self._stop_queue(vq)
        self._join_takeover()
        self._let_go_if_handed_over()
        self._end_session(replace=True)
        log.info("device reset: guest %r's FUSE session ended", self.session.guest)

    # -------------------------------------------------------------- queues
    def _start_reader(self, vq: VirtQueue) -> None:
        r = _Reader(Popper(vq, BUFSIZE, reply_cap(None),
                           os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)))
        r.done = self._parked.run(lambda: self._reader(vq, r), f"vq-{vq.index}")
        self._readers[vq.index] = r

    def _stop_reader(self, index: int) -> None:
        r = self._readers.pop(index, None)
        if r is None:
            return
        state = r.popper.state
        with self.queues[index].lock:
            state.stopping = 1
            state.abandoned = state.busy
        if r.abandoned:
            log.warning("queue %d: its reader is held in a host call; it leaves when the "
                        "call returns", index)
            return
        os.eventfd_write(r.stop_fd, 1)
        r.done.wait()
        os.close(r.stop_fd)

    def _stop_queue(self, vq: VirtQueue, drain: float = DRAIN_SECONDS) -> None:
        """GET_VRING_BASE, reset, disconnect: stop popping, give the requests in flight up
        to `drain` seconds to be answered, then stop the ring. Whatever is still in flight
        then (lock waits always: a stopped VM keeps its place in the lock queues; see the
        module doc) keeps its chain and is answered when the ring runs again; the end of
        the session drops it."""
        self._stop_reader(vq.index)
        deadline = time.monotonic() + drain
        with self._inflight_lock:
            while True:
                busy = sum(1 for p in self.inflight.values()
                           if p.vq is vq and p.opcode != P.SETLKW)
                left = deadline - time.monotonic()
                if not busy or left <= 0:
                    break
                self._answered.wait(left)  # notified by _complete
        vq.stop()
        if busy:
            log.warning("queue %d stopped with %d requests in flight: answered when it runs "
                        "again", vq.index, busy)

    def _reader(self, vq: VirtQueue, r: _Reader) -> None:
        """The native loop (vl_ring.c) pops, answers what the fast path can, pushes and
        waits for kicks; it comes back here for the session's chains."""
        popper = r.popper
        gen = vq.gen  # a reader lives within one start..stop of its queue
        try:
            while True:
                session_gen = self._session_gen
                # (re-read each time: a new session has a new table; an ended one's
                # table answers nothing, so a loop still using it comes back here)
                table = ffi.NULL if vq.index == HIPRIO else self.session.fs.table.native
                got = popper.serve(table)
                if got == RING_STOP:
                    return
                if got < 0:
                    self._broken(vq, -got)
                    return
                if got == RING_UNPUSHED:
                    # The ring stopped meanwhile (parked until it runs again), or this
                    # reader was abandoned; not for a session that has ended.
                    if session_gen == self._session_gen:
                        vq.push(gen, popper.chain.head, popper.seg_bytes(), popper.reply(),
                                park=True)
                else:
                    try:
                        self._dispatch(vq, popper, gen, r)
                    except Exception:
                        log.exception("queue %d: request dispatch failed", vq.index)
                if r.abandoned:
                    return
        except Exception:
            log.exception("queue %d reader failed", vq.index)
        finally:
            if r.abandoned:
                os.close(r.stop_fd)

    def _broken(self, vq: VirtQueue, err: int) -> None:
        log.error("queue %d is broken (%s): not served until it is set up again",
                  vq.index, os.strerror(err))
        if vq.err_fd >= 0:
            try:
                os.eventfd_write(vq.err_fd, 1)  # QEMU logs the vring error
            except OSError:
                pass

    def _dispatch(self, vq: VirtQueue, popper: Popper, gen: int, reader: _Reader) -> None:
        ch = popper.chain
        head, n, out_len = ch.head, ch.in_len, ch.out_len
        segs = popper.seg_bytes()
        buf = memoryview(popper.view)
        unique = unique_of(buf) if n >= P.OUT_HEADER_SIZE else 0
        if ch.error or n < P.IN_HEADER.size:
            why = os.strerror(ch.error) if ch.error else f"{n}-byte request"
            log.warning("queue %d: bad descriptor chain (head %d, %d descriptors): %s",
                        vq.index, head, ch.ndesc, why)
            vq.push(gen, head, segs, _error_reply(unique, errno.EIO, out_len))
            return
        _, opcode, unique = P.IN_HEADER_START.unpack_from(buf)
        p = Pending(vq, gen, head, segs, out_len, opcode, self._session_gen,
                    bytes(buf[:n]) if opcode == P.SETLKW else None)
        refuse = 0
        with self._inflight_lock:
            if unique in self.inflight:
                refuse = errno.EINVAL  # a unique still in flight: it would answer the wrong chain
            elif opcode == P.SETLKW:
                held = self._waits.get(vq.index, 0)
                # Keep half the ring free of waits, so the guest can still send the
                # unlocks that end them; the manager's own limit is per guest.
                if held >= max(1, vq.num // 2) and lk_type_of(buf[:n]) not in (None, F_UNLCK):
                    refuse = errno.ENOLCK
                else:
                    self._waits[vq.index] = held + 1
            if not refuse:
                self.inflight[unique] = p
        if refuse:
            vq.push(gen, head, segs, _error_reply(unique, refuse, out_len))
            return
        if opcode in self.quick or vq.index == HIPRIO:
            self._run(buf[:n], opcode, unique, out_len)  # never blocks: answered on this thread
        elif opcode in self.inline and self._hold(vq, reader):
            # A few host calls: on this thread too (no hand-over to a worker), under the
            # rule of a native host call (_Reader: abandoned if stopped meanwhile).
            try:
                self._run(buf[:n], opcode, unique, out_len)
            finally:
                with vq.lock:
                    reader.popper.state.busy = 0
        else:  # (what the native loop could answer, it did)
            self.pool.submit(self._run, bytes(buf[:n]), opcode, unique, out_len)

    @staticmethod
    def _hold(vq: VirtQueue, reader: _Reader) -> bool:
        """The reader may start a host call (see _Reader): now busy."""
        state = reader.popper.state
        with vq.lock:
            if state.stopping:
                return False
            state.busy = 1
            return True

    def _run(self, buf: bytes | memoryview, opcode: int, unique: int, room: int) -> None:
        session = self.session
        if opcode == P.INIT and session.initialized:
            # A new FUSE connection on this device: the guest rebooted or remounted.
            log.info("FUSE INIT again: guest %r's previous session ends", session.guest)
            self._end_session(replace=True, keep=unique)
            session = self.session
        try:
            reply = session.handle(buf, room)  # replies bounded by the chain's room
        except Exception as exc:  # Session maps errors itself; this is a bug's safety net
            log.exception("request %d (opcode %d) failed", unique, opcode, exc_info=exc)
            reply = CODEC.encode_reply(unique, -errno.EIO)
        if reply is None:
            if opcode not in NO_REPLY:
                return  # answered later through the session's send (or already was)
            reply = b""  # FORGET and friends: the chain goes back with nothing written
        self._complete(unique, reply)

    def _complete(self, unique: int, reply: bytes) -> bool:
        with self._inflight_lock:
            p = self.inflight.pop(unique, None)
            if p is not None and p.session_gen != self._session_gen:
                p = None  # a request of a session that has ended: nobody waits for it
            if p is not None and p.opcode == P.SETLKW:
                self._waits[p.vq.index] = self._waits.get(p.vq.index, 1) - 1
            self._answered.notify_all()
        if p is None:
            return False
        if len(reply) > p.out_len:
            log.warning("reply to %d (%d bytes) does not fit its %d-byte buffer", unique,
                        len(reply), p.out_len)
            reply = _error_reply(unique, errno.EIO, p.out_len)
        # A reply that finds its ring stopped is parked until the ring runs again.
        return p.vq.push(p.gen, p.head, p.segs, reply, park=True)

    def _send(self, reply: bytes, session_gen: int) -> None:
        """The Session's send callback: deferred replies (granted or cancelled waits) and
        notifications."""
        unique = unique_of(reply)
        if unique == 0:
            # virtio-fs has no notification queue in Linux guests: nothing to send on.
            if not self.warned_notify:
                self.warned_notify = True
                log.info("FUSE notifications are dropped: virtio-fs guests have no "
                         "notification queue (use --cache none for coherence under locks)")
            return
        if unique in self._suspended:
            return  # a wait withdrawn for a migration: re-submitted where the guest runs
        if session_gen != self._session_gen or not self._complete(unique, reply):
            raise OSError(errno.ENOENT, "request no longer in flight")

    # ------------------------------------------------------- device state
    def set_device_state_fd(self, payload: bytes, fds: list[int]) -> bytes:
        """Start a state transfer through QEMU's pipe: we write (save) or read (load) it,
        QEMU reads or writes the other end meanwhile; the reply says we use QEMU's fd
        (no fd of ours). A saved state is written here at once (it fits the pipe unless
        the guest has a great many files); what does not fit, and a load, is moved by
        the connection's own loop between the front-end's messages (run): no thread
        hand-over inside the switch-over, where QEMU waits for us."""
        direction, phase = STATE.unpack_from(payload)
        if len(fds) != 1:
            raise ValueError(f"SET_DEVICE_STATE_FD with {len(fds)} fds")
        if phase != 0 or direction not in (STATE_SAVE, STATE_LOAD):
            raise ValueError(f"state transfer direction {direction} phase {phase}")
        fd = fds.pop()
        self._drop_state()
        self._state_error = None
        if direction == STATE_SAVE:
            try:
                data = self._save_state()
            except (M.MigrationError, OSError, ValueError) as exc:
                log.error("migration: the state cannot be saved: %s (QEMU fails the "
                          "migration; this back-end runs on)", exc)
                self._state_error, data = str(exc), b""
            self._state = _StatePipe(fd, data)
        else:
            self._state = _StatePipe(fd, None)
        self._state.pump()
        return U64.pack(VRING_NOFD)

    def _drop_state(self) -> None:
        """A transfer the front-end left unfinished ends (a new one starts, or the
        connection ends)."""
        st, self._state = self._state, None
        if st is not None and not st.done:
            st.close()

    def check_device_state(self, payload: bytes, fds: list[int]) -> bytes:
        """0 when the transfer worked; a load is applied here (on the connection's
        thread, between the front-end's messages)."""
        st, self._state = self._state, None
        data = None
        if st is not None:
            # QEMU sends this only after its end of the pipe is done (read to EOF, or
            # written and closed): what is left is in the pipe now, never waited for.
            if not st.pump():
                st.close()
                st.error = st.error or "the front-end checked an unfinished transfer"
            self._state_error = self._state_error or st.error
            data = st.loaded()
        if data is not None and self._state_error is None:
            try:
                t0 = time.monotonic()
                before, after = self._load_state(data)
                log.info("migration: %sstate loaded in %.1f ms (%d bytes%s)", before,
                         (time.monotonic() - t0) * 1000, len(data), after)
            except (M.MigrationError, OSError, ValueError, KeyError, TypeError) as exc:
                self._state_error = str(exc)
                log.error("migration: the state cannot be loaded: %s (QEMU fails the "
                          "migration; the source runs on)", exc)
        if self._state_error:
            return U64.pack(1)
        return U64.pack(0)

    def _save_state(self) -> bytes:
        """The source's state (rings stopped). The guest's waits are withdrawn (their
        chains stay in flight) so that nothing here changes the locks any more; the
        descriptors are offered on the rendezvous socket. If the rings run again, all
        of it is taken back (_rings_run)."""
        t0 = time.monotonic()
        running = [vq.index for vq in self.queues.values() if vq.started]
        if running:
            raise M.MigrationError(f"queues {running} still running")
        self._join_takeover()
        session = self.session
        # Embedded, the waits are withdrawn here (and queued again where the guest runs
        # next); the lock daemon keeps them in their places instead.
        withdraw = not session.locks.keeps_waits
        with self._inflight_lock:
            busy = [u for u, p in self.inflight.items() if p.opcode != P.SETLKW]
            waits = [u for u, p in self.inflight.items() if p.opcode == P.SETLKW]
            if withdraw:
                self._suspended.update(waits)
        if busy:
            raise M.MigrationError(f"{len(busy)} requests still being served")
        if self._saved is not None:  # saved before, the rings never ran: a fresh offer
            self._saved.offer.close()
            self._saved = None
        if withdraw:
            for unique in waits:
                session.locks.suspend(unique)
        else:
            waits = []  # nothing to queue again here if the source runs on
        table = M.FdTable()
        try:
            state = {
                "format": M.FORMAT,
                "device": self._save_device(),
                "session": session.save_state(),
                "fs": session.fs.save_state(table),
                "locks": session.locks.save_state(table),
            }
            # For a destination that cannot collect descriptors (another host).
            state["portable"] = M.save_portable(state, session.fs, self.migration.portable)
            # The offer gets its own duplicates: our descriptors live on if we run again.
            fds = [fd if fd in table.owned else os.dup(fd) for fd in table.fds]
        except BaseException:
            table.close_owned()
            session.locks.migration_cancelled()
            self._resume_waits(waits)
            raise
        # The socket made ready when the migration began (_prepare_offer), else now.
        offer, self._pre_offer = self._pre_offer, None
        try:
            if offer is None:
                offer = self._new_offer()
            offer.arm(fds, set(fds))
        except BaseException:
            for fd in fds:
                os.close(fd)
            if offer is not None:
                offer.close()
            session.locks.migration_cancelled()
            self._resume_waits(waits)
            raise
        state["rendezvous"] = offer.describe()
        self._saved = _Saved(offer, waits)
        data = M.encode(state)
        log.info("migration: state saved in %.1f ms (%d bytes, %d descriptors offered, %d "
                 "waits in flight)", (time.monotonic() - t0) * 1000, len(data), len(fds),
                 len(waits))
        return data

    def _new_offer(self) -> M.Offer:
        return M.Offer(self.migration.dir_fd,
                       run=lambda fn: self._parked.run(fn, "migration-offer"))

    def _prepare_offer(self) -> None:
        """The migration began (QEMU turned the dirty log on): bind and listen on the
        hand-over socket now, while QEMU copies RAM, so that the save in the switch-over
        (the guest stopped) only arms it with the descriptors. It gives nothing until
        then, and goes when the migration ends without a save (_drop_pre_offer)."""
        if self._pre_offer is not None or self.migration.dir_fd < 0:
            return
        try:
            self._pre_offer = self._new_offer()
        except (M.MigrationError, OSError, RuntimeError) as exc:
            log.debug("migration: no hand-over socket ready (%s); made at the save", exc)

    def _drop_pre_offer(self) -> None:
        offer, self._pre_offer = self._pre_offer, None
        if offer is not None:
            offer.close()

    def _save_device(self) -> dict:
        with self._inflight_lock:
            waits = [{"q": p.vq.index, "head": p.head, "segs": segs_to_list(p.segs),
                      "out": p.out_len, "unique": u, "req": M.b64(p.req or b"")}
                     for u, p in self.inflight.items() if p.opcode == P.SETLKW]
        parked = []
        for vq in self.queues.values():
            with vq.lock:
                parked += [{"q": vq.index, "head": head, "segs": segs_to_list(segs),
                            "data": M.b64(data)} for head, segs, data in vq.parked]
        return {"waits": waits, "parked": parked}

    def _load_state(self, data: bytes) -> tuple[str, str]:
        """The destination's side: nothing of the guest is here yet. What was loaded is
        owned only once the rings run (_rings_run); until then ending (killed, cancelled)
        closes our references and unlocks nothing. Returns what the one log line of the
        load says before and after its time (one line: each costs the switch-over)."""
        state = M.decode(data)
        central = "client" in state["locks"]
        if central != self.migration.central or (central and not self.migration.daemon):
            raise M.MigrationError("the source's locks are " + (
                "with a lock daemon" if central else "embedded") + ", this back-end's "
                + ("with a lock daemon" if self.migration.central else "embedded")
                + ": start both the same way (--lockd)")
        session = self.session
        if session.initialized or self.inflight or self._adopted:
            raise M.MigrationError("this back-end already serves a guest")
        t0 = time.monotonic()
        rx, why = M.receive(state, self.migration.dir_fd)
        if rx is None:
            self._load_portable(state, why)
            return "", ""
        collected = (time.monotonic() - t0) * 1000
        try:
            session.load_state(state["session"])
            session.fs.load_state(state["fs"], rx)
            if central:
                # The guest's session at the daemon is taken over when it runs here;
                # this back-end's own (empty) one is left alone.
                session.locks = type(session.locks).taken_over(
                    state["locks"], session.fs, self.migration.daemon, session._deferred,
                    self.migration.wrap or (lambda c: c))
            else:
                session.locks.load_state(state["locks"], rx, session.fs)
            self._load_device(state["device"], resubmit=not central)
        except BaseException:
            self._abandon()
            self._end_session(replace=True)  # a fresh session; nothing was unlocked
            raise
        finally:
            rx.close_rest()
        self._adopted = True
        return (f"{len(rx.fds)} descriptors collected from the source in {collected:.1f} ms; ",
                f", {len(self._resubmit)} waits: the guest is ours once its rings run")

    def _load_portable(self, state: dict, why: str) -> None:
        """The destination's side without the source's descriptors (another host): only
        a guest holding no lock or only shared ones, and waiting for none (else
        MigrationError: the source runs on). Its inodes and handles are opened here
        again; its shared locks are taken again here (while the source still holds them)
        before the load is answered; anything else starts empty."""
        port = M.check_portable(state, why)
        session = self.session
        nlocks = 0
        try:
            session.load_state(state["session"])
            lost = session.fs.load_portable(port["fs"], self.migration.portable.on_error)
            if "locked" in port:  # embedded only: a central source refused (portable_refusal)
                nlocks = session.locks.load_portable(state["locks"], port, session.fs)
            self._load_device(state["device"], resubmit=False)  # parked replies only
        except BaseException:
            self._end_session(replace=True)
            raise
        self._adopted = True
        log.warning("migration: state loaded WITHOUT the source's descriptors (%s): %d "
                    "inodes and %d handles opened again here, %d shared lock "
                    "description(s) taken again%s", why,
                    len(port["fs"]["inodes"]), len(port["fs"]["handles"]), nlocks,
                    f"; {len(lost)} answer EIO (--migration-on-error=guest-error): "
                    + "; ".join(lost[:5]) if lost else "")

    def _load_device(self, st: dict, resubmit: bool) -> None:
        for w in st["waits"]:
            vq = self._queue(int(w["q"]))
            unique = int(w["unique"])
            p = Pending(vq, vq.gen, int(w["head"]), segs_from_list(w["segs"]), int(w["out"]),
                        P.SETLKW, self._session_gen, M.unb64(w["req"]))
            with self._inflight_lock:
                self.inflight[unique] = p
                self._waits[vq.index] = self._waits.get(vq.index, 0) + 1
            if resubmit:  # embedded: queued again here; the daemon kept its own
                self._resubmit.append(unique)
        for pk in st["parked"]:
            vq = self._queue(int(pk["q"]))
            with vq.lock:
                vq.parked.append((int(pk["head"]), segs_from_list(pk["segs"]),
                                  M.unb64(pk["data"])))

    def _rings_run(self) -> None:
        """A ring started: a saved source runs again (the migration failed or was
        cancelled: take the offer back, re-submit the withdrawn waits); a loaded
        destination owns the guest from now on (submit the waits it was given)."""
        saved, self._saved = self._saved, None
        if saved is not None:
            saved.offer.close()
            log.info("migration: the rings run again here: this back-end keeps the guest")
            self.session.locks.migration_cancelled()
            self._resume_waits(saved.suspended)
        if self._adopted:
            self._adopted = False
            resubmit, self._resubmit = self._resubmit, []
            locks = self.session.locks
            if locks.keeps_waits:
                # Central: the takeover is a round trip to the daemon (the source's
                # connection is superseded there). The rings need not wait for it: the
                # guest's lock requests meanwhile queue in the client and go out, in
                # order, once the session is ours; until then the source holds it, and
                # a wait granted meanwhile is answered here (resume_waits first).
                # It starts once the device start is over (the front-end quiet for
                # TAKEOVER_QUIET_S, see run): its thread would otherwise hold the GIL
                # for a millisecond or more, which the rest of the start (QEMU waits for
                # it) would wait for.
                self._takeover_due = locks
            else:
                self._take_over(locks)  # embedded: owned since the load, nothing to do
            log.info("migration: the guest runs here now (%d waits re-submitted)",
                     len(resubmit))
            self._resume_waits(resubmit, suspended=False)

    def _take_over(self, locks: object) -> None:
        t0 = time.monotonic()
        try:
            locks.start_after_migration()  # type: ignore[attr-defined]
        except OSError as exc:
            log.error("migration: taking the guest's lock session over: %s", exc)
            return
        if locks.keeps_waits:  # type: ignore[attr-defined]
            log.info("migration: the guest's lock session is ours (takeover %.1f ms)",
                     (time.monotonic() - t0) * 1000)

    def _start_takeover(self) -> None:
        """Start a due takeover (central, a loaded destination whose rings run)."""
        locks, self._takeover_due = self._takeover_due, None
        if locks is not None:
            self._takeover = self._parked.run(lambda: self._take_over(locks),
                                              "lock-takeover")

    def _join_takeover(self) -> None:
        """A takeover in flight (or due) finishes before the session is saved again or
        ends."""
        self._start_takeover()
        done, self._takeover = self._takeover, None
        if done is not None:
            done.wait()

    def _resume_waits(self, uniques: list[int], suspended: bool = True) -> None:
        for unique in uniques:
            if suspended:
                self._suspended.discard(unique)
            p = self.inflight.get(unique)
            if p is None or p.req is None:
                continue
            try:
                self._run(p.req, P.SETLKW, unique, p.out_len)
            except Exception:
                log.exception("re-submitting the wait %d", unique)

    def _abandon(self) -> None:
        """Let the guest's state go without unlocking anything: the other back-end of
        a migration holds the same descriptions and owns them."""
        abandon = getattr(self.session.locks, "abandon", None)
        if abandon is not None:
            abandon()
        self._suspended.clear()
        self._resubmit.clear()

    def _let_go_if_handed_over(self) -> None:
        """The session ends (disconnect, reset) while the other back-end of a migration
        owns the guest (our state was collected and our rings never ran again, or we
        loaded a state and never ran): let go without unlocking."""
        saved, self._saved = self._saved, None
        if saved is not None:
            saved.offer.close()
            if not saved.offer.collected.is_set() and not self._adopted:
                # Nobody collected our descriptors (no destination, or one on another
                # host that moved a lock-free guest without them): no takeover can come
                # now that the offer is closed, so the end releases as always.
                self.session.locks.migration_cancelled()
        if (saved is not None and saved.offer.collected.is_set()) or self._adopted:
            log.info("migration: the session ends after the hand-over: the guest's locks "
                     "stay with the other back-end")
            self._abandon()
            self._adopted = False

    # -------------------------------------------------------------- teardown
    def close(self) -> None:
        """Disconnect: stop every queue, release the guest, close fds, unmap memory.
        After a migration (our state was collected and our rings never ran again, or
        we loaded a state and never ran) the locks stay: the other side has them."""
        for vq in list(self.queues.values()):
            self._stop_queue(vq)
        # Requests not started never run; one still running after the drain may be stuck
        # in a host call (a hung file system): the guest's locks are released now, not
        # when it returns (its late reply goes nowhere: the session has ended).
        self.pool.shutdown()
        self._join_takeover()
        self._let_go_if_handed_over()
        self._drop_state()
        self._drop_pre_offer()
        self._parked.close()  # no reader runs now (the queues are stopped)
        self._end_session(replace=False)
        if self.log_area is not None:
            for vq in self.queues.values():
                vq.set_log(0, 0)
            self.log_area.unmap()
            self.log_area = None
        for vq in self.queues.values():
            vq.close_fds()
        for mem in [*self._old_memory, *([self.memory] if self.memory else [])]:
            mem.unmap()
        self._old_memory.clear()
        self.memory = None
        try:
            self.conn.close()
        except OSError:
            pass


def _error_reply(unique: int, err: int, room: int) -> bytes:
    """An errno reply when the chain has room for a fuse_out_header, else nothing."""
    return CODEC.encode_reply(unique, -err) if room >= P.OUT_HEADER_SIZE else b""


def listen(path: str) -> socket.socket:
    """The listening socket at `path` (a stale socket file there is replaced)."""
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
    except FileNotFoundError:
        pass
    # 0600 from the start (the socket hands out guest memory), listening before it
    # appears at `path` (a front-end started when the file appears must not be refused)
    return listen_at(path, 0o600, 1)


def serve(sock: socket.socket, new_session: SessionFactory, threads: int = 4,
          persist: bool = False, migration: MigrationConfig | None = None) -> None:
    """Accept front-ends one at a time; each connection is one device with its own FUSE
    session. Without `persist`, return after the first one ends."""
    while True:
        conn, _ = sock.accept()
        log.info("front-end connected")
        Device(conn, new_session, threads, migration).run()
        if not persist:
            return
