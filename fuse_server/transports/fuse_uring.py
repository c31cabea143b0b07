"""FUSE over io_uring (Linux 6.14+, `/sys/module/fuse/parameters/enable_uring`): the
kernel hands each request to a ring entry of the queue of the CPU its caller runs on, and
the server answers it and fetches the next one with one io_uring_enter.

Why (measured on a 2-core VM, see README "Performance"): over /dev/fuse every request
wakes a server thread, and the caller and that thread usually end up on different CPUs;
each wake-up of an idle CPU costs tens of microseconds there, more than the request.
Here each CPU's queue is served by threads pinned to that CPU, so caller and server take
turns on one CPU.

Protocol (fs/fuse/dev_uring.c, include/uapi/linux/fuse.h):
* INIT grants FUSE_OVER_IO_URING (bit 41); after the INIT reply, IORING_OP_URING_CMD
  `FUSE_IO_URING_CMD_REGISTER` on /dev/fuse gives the kernel one entry: two buffers (an
  iovec pair), the 288-byte `fuse_uring_req_header` {in_out[128]: fuse_in_header in,
  fuse_out_header out; op_in[128]: the request's first argument; ring_ent_in_out {u64
  flags, u64 commit_id, u32 payload_sz, ...}} and a payload buffer of at least the
  connection's largest request (max(max_write, max_pages * 4096)): the other arguments
  in, every reply argument out. The command's data is `fuse_uring_cmd_req` {u64 flags,
  u64 commit_id, u16 qid}. Requests wait until every queue (one per possible CPU) has an
  entry.
* The command completes when a request is in the entry; `COMMIT_AND_FETCH` with
  commit_id = the request's unique hands the reply back and waits for the next one.
* FORGET and INTERRUPT still come through read(2) on /dev/fuse, and notifications are
  still written there.

A reply produced later (a lock granted after a wait, the central daemon's answer, a grant
after the invalidation of cached pages) must be committed through the entry that holds
its request: `send()` finds it by unique and hands it to the entry's thread (an eventfd
read is always pending in each ring to wake it). Meanwhile that thread registers a new
entry, so held requests never starve the queue.
"""

from __future__ import annotations

import collections
import ctypes
import errno
import logging
import mmap
import os
import struct
import threading
from collections.abc import Callable

from fuse_server.transports.uring import Ring
from lockd.fuse import abi
from lockd.fuse.abi import OVER_IO_URING  # noqa: F401 - the session asks for it from here
from lockd.fuse.codec import unique_of

log = logging.getLogger("vfs-lockd.fuse")

_U32 = struct.Struct("<I")
_WAKE = 1 << 62  # user_data of the eventfd read
RING_SIZE = 64


ENABLE = "/sys/module/fuse/parameters/enable_uring"


def uring_enabled() -> bool:
    """Does the kernel offer FUSE over io_uring to new mounts (an administrator's switch:
    `echo Y > /sys/module/fuse/parameters/enable_uring`)?"""
    try:
        with open(ENABLE) as f:
            return f.read().strip() in ("Y", "1")
    except OSError:
        return False


def _unset(req: memoryview) -> bytes | None:
    raise RuntimeError("UringQueues.handle was not set")


def possible_cpus() -> list[int]:
    """The kernel's num_possible_cpus() queues, by CPU number."""
    try:
        text = open("/sys/devices/system/cpu/possible").read().strip()
    except OSError:
        return list(range(os.cpu_count() or 1))
    cpus: list[int] = []
    for part in text.split(","):
        a, _, b = part.partition("-")
        cpus.extend(range(int(a), int(b or a) + 1))
    return cpus


class _Entry:
    """One ring entry's memory: the header buffer at 0, the payload at `page`. A request
    is laid out contiguously in /dev/fuse's format just before the payload (header and
    first argument copied there), so the payload itself is never copied."""

    def __init__(self, index: int, payload: int) -> None:
        self.index = index
        self.page = mmap.PAGESIZE
        self.mem = mmap.mmap(-1, self.page + payload)
        self._anchor = ctypes.c_char.from_buffer(self.mem)
        base = ctypes.addressof(self._anchor)
        self.iov = (ctypes.c_uint64 * 4)(base, abi.URING_HEADER_SIZE, base + self.page, payload)
        self.view = memoryview(self.mem)
        self.unique = 0

    def request(self) -> memoryview:
        mem, page = self.mem, self.page
        length, _, self.unique = abi.IN_HEADER_START.unpack_from(mem, 0)
        payload = _U32.unpack_from(mem, abi.URING_PAYLOAD_SZ)[0]
        first = length - abi.IN_HEADER_SIZE - payload
        if first < 0 or first > abi.URING_OP_IN or payload > len(mem) - page:
            raise ValueError(f"ring entry with len {length}, payload {payload}")
        start = page - abi.IN_HEADER_SIZE - first
        mem[start:start + abi.IN_HEADER_SIZE] = mem[0:abi.IN_HEADER_SIZE]
        mem[start + abi.IN_HEADER_SIZE:page] = mem[abi.URING_OP_IN:abi.URING_OP_IN + first]
        return self.view[start:page + payload]

    def put_reply(self, reply: bytes) -> None:
        hdr = abi.OUT_HEADER_SIZE
        body = len(reply) - hdr
        self.mem[0:hdr] = reply[:hdr]
        self.mem[self.page:self.page + body] = reply[hdr:]
        _U32.pack_into(self.mem, abi.URING_PAYLOAD_SZ, body)

    def close(self) -> None:
        self.view.release()
        del self._anchor
        self.mem.close()


class _Worker:
    """One thread, pinned to its queue's CPU, with its own ring and entries."""

    def __init__(self, owner: UringQueues, qid: int, cpu: int | None) -> None:
        self.owner, self.qid, self.cpu = owner, qid, cpu
        self.ring = Ring(RING_SIZE)
        self.efd = os.eventfd(0, os.EFD_CLOEXEC)
        self._wake_buf = ctypes.create_string_buffer(8)
        self.entries: list[_Entry] = []
        self.pending: collections.deque[tuple[_Entry, bytes]] = collections.deque()
        self.live = 0  # entries the kernel holds
        self.thread = threading.Thread(target=self._run, name=f"fuse-uring-{qid}", daemon=True)

    def _cmd(self, op: int, e: _Entry, commit: int = 0) -> None:
        self.ring.uring_cmd(self.owner.dev_fd, op, ctypes.addressof(e.iov), 2, e.index,
                            abi.URING_CMD_REQ.pack(0, commit, self.qid))

    def register(self) -> None:
        e = _Entry(len(self.entries), self.owner.payload)
        self.entries.append(e)
        self._cmd(abi.URING_CMD_REGISTER, e)
        self.live += 1

    def _arm_wake(self) -> None:
        self.ring.read(self.efd, ctypes.addressof(self._wake_buf), 8, _WAKE)

    def wake(self) -> None:
        os.eventfd_write(self.efd, 1)

    def _run(self) -> None:
        if self.cpu is not None:
            try:
                os.sched_setaffinity(0, {self.cpu})
            except OSError as exc:
                log.debug("pinning the queue %d thread: %s", self.qid, exc)
        try:
            self.register()
            self._arm_wake()
            self._loop()
        except Exception:
            log.exception("io_uring queue %d failed", self.qid)
        finally:
            self.owner._worker_ended(self)

    def _loop(self) -> None:
        ring = self.ring
        handle = self.owner.handle
        deferred = self.owner.deferred
        stopped = self.owner.stopped
        while True:
            ring.submit(wait=1)
            for ud, res in ring.completions():
                if ud == _WAKE:
                    if stopped.is_set():
                        return
                    self._commit_pending()
                    self._arm_wake()
                    continue
                e = self.entries[ud]
                if res < 0:
                    self.live -= 1
                    if res in (-errno.ENOTCONN, -errno.ECANCELED) or stopped.is_set():
                        if not self.live:
                            return  # the connection is gone
                        continue
                    log.warning("io_uring queue %d: entry answered %s; replaced", self.qid,
                                os.strerror(-res))
                    self.register()
                    continue
                try:
                    req = e.request()
                except ValueError as exc:
                    log.error("io_uring queue %d: %s", self.qid, exc)
                    continue
                unique = e.unique
                deferred[unique] = (self, e)  # before handling: a later reply finds it
                reply = handle(req)
                if reply is not None:
                    if deferred.pop(unique, None) is not None:
                        self._commit(e, reply)
                    continue
                # Answered later (send()): this entry stays with its request; another
                # one serves meanwhile (it comes back when the reply is committed).
                self.register()

    def _commit(self, e: _Entry, reply: bytes) -> None:
        e.put_reply(reply)
        self._cmd(abi.URING_CMD_COMMIT_AND_FETCH, e, e.unique)

    def _commit_pending(self) -> None:
        while self.pending:
            e, reply = self.pending.popleft()
            self._commit(e, reply)

    def close(self) -> None:
        os.close(self.efd)
        self.ring.close()
        for e in self.entries:
            e.close()


class UringQueues:
    """The io_uring queues of one /dev/fuse connection. Create (the rings) before the
    mount: `ok` then says whether to ask for FUSE_OVER_IO_URING in INIT; `start()` after
    the INIT reply registers the entries."""

    def __init__(self, dev_fd: int, payload: int, threads_per_cpu: int = 1) -> None:
        self.dev_fd = dev_fd
        # The session's handle (set before start()): a request in, its reply or None.
        self.handle: Callable[[memoryview], bytes | None] = _unset
        self.payload = payload
        self.stopped = threading.Event()
        self.deferred: dict[int, tuple[_Worker, _Entry]] = {}  # unique -> its entry
        self.workers: list[_Worker] = []
        self.started = False
        self._lock = threading.Lock()
        allowed = os.sched_getaffinity(0)
        try:
            for qid in possible_cpus():
                for _ in range(max(1, threads_per_cpu)):
                    self.workers.append(_Worker(self, qid, qid if qid in allowed else None))
        except OSError as exc:
            log.info("io_uring unavailable (%s): requests go through /dev/fuse", exc.strerror)
            for w in self.workers:
                w.close()
            self.workers = []
        self.ok = bool(self.workers)

    def start(self) -> None:
        with self._lock:
            if self.started or not self.ok:
                return
            self.started = True
        for w in self.workers:
            w.thread.start()
        log.info("FUSE over io_uring: %d queues, %d threads", len(possible_cpus()),
                 len(self.workers))

    def send(self, reply: bytes) -> bool:
        """Route a reply produced later to the entry holding its request; False when the
        request did not come through a ring (the caller writes it to /dev/fuse)."""
        if len(reply) < abi.OUT_HEADER_SIZE:
            return False
        held = self.deferred.pop(unique_of(reply), None)
        if held is None:
            return False
        w, e = held
        w.pending.append((e, reply))
        w.wake()
        return True

    def stop(self) -> None:
        self.stopped.set()
        for w in self.workers:
            try:
                w.wake()
            except OSError:
                pass

    def _worker_ended(self, w: _Worker) -> None:
        if not self.stopped.is_set():
            log.info("io_uring queue %d thread ended", w.qid)
