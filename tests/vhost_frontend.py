"""A vhost-user front-end in Python, standing in for QEMU in tests: guest memory is a real
memfd passed with SCM_RIGHTS, split virtqueues are laid out in it as a driver would
(virtio 1.1 section 2.6), kicks and calls are real eventfds.

    fe = Frontend(socket_path)          # connects, negotiates, maps memory, starts queues
    reply = fe.fuse(1, FUSE_GETATTR, body, nodeid=1)     # -> Reply(error, payload, head)
    head = fe.queue(1).post([request_bytes], [4096])     # raw posting; fe.queue(1).wait(head)

Addresses on purpose differ between the three spaces: ring addresses are sent as the
front-end's "user virtual" addresses (UVA_BASE + ...), descriptors carry guest physical
ones, and the two regions are not in memfd order (region 0 sits after region 1 in the
memfd), so any confusion of the translations shows up as wrong bytes.
"""

from __future__ import annotations

import array
import ctypes
import mmap
import os
import select
import socket
import struct
import threading
import time
from dataclasses import dataclass

from fuse_oracle import IN_HEADER, OUT_HEADER
from procutil import wait_until

HDR = struct.Struct("<III")
U64 = struct.Struct("<Q")
STATE = struct.Struct("<II")
ADDR = struct.Struct("<IIQQQQ")
REGION = struct.Struct("<QQQQ")
DESC = struct.Struct("<QIHH")

GET_FEATURES, SET_FEATURES, SET_OWNER, RESET_OWNER, SET_MEM_TABLE = 1, 2, 3, 4, 5
SET_VRING_NUM, SET_VRING_ADDR, SET_VRING_BASE, GET_VRING_BASE = 8, 9, 10, 11
SET_VRING_KICK, SET_VRING_CALL, SET_VRING_ERR = 12, 13, 14
GET_PROTOCOL_FEATURES, SET_PROTOCOL_FEATURES, GET_QUEUE_NUM, SET_VRING_ENABLE = 15, 16, 17, 18
FLAG_REPLY, FLAG_NEED_REPLY = 1 << 2, 1 << 3
F_PROTOCOL_FEATURES, F_VERSION_1, F_INDIRECT_DESC = 1 << 30, 1 << 32, 1 << 28
F_EVENT_IDX = 1 << 29  # VIRTIO_RING_F_EVENT_IDX
PF_MQ, PF_REPLY_ACK = 1 << 0, 1 << 3

VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_INDIRECT = 1, 2, 4

UVA_BASE = 0x7F00_0000_0000
REGION_SIZE = 8 << 20
# (gpa, memfd offset) of the two regions: adjacent in gpa, swapped in the memfd.
REGIONS = ((0x0, REGION_SIZE), (REGION_SIZE, 0))
PAGE = 4096

_FENCE = threading.Lock()


def fence() -> None:
    """A full memory barrier between our mmap stores and the loads after them (a lock's
    atomic instruction): the event-index handshakes need store-then-load order."""
    with _FENCE:
        pass


def need_event(event: int, new: int, old: int) -> bool:
    """vring_need_event: moving an index from old to new passes `event`."""
    return (new - event - 1) & 0xFFFF < (new - old) & 0xFFFF


@dataclass
class Reply:
    head: int
    used_len: int
    data: bytes  # the writable buffers' bytes, first used_len of them

    @property
    def error(self) -> int:
        """-fuse_out_header.error (0 or an errno)."""
        assert self.used_len >= 16, f"no reply header ({self.used_len} bytes)"
        length, err, _ = OUT_HEADER.unpack_from(self.data)
        assert length == self.used_len, (length, self.used_len)
        return -err

    @property
    def unique(self) -> int:
        return OUT_HEADER.unpack_from(self.data)[2]

    @property
    def payload(self) -> bytes:
        assert self.error == 0, os.strerror(self.error)
        return self.data[16 : self.used_len]


class Memory:
    """Guest memory: one memfd, two regions, a bump allocator over guest physical space."""

    def __init__(self) -> None:
        self.size = 2 * REGION_SIZE
        self.fd = os.memfd_create("vhost-frontend-guest", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, self.size)
        self.map = mmap.mmap(self.fd, self.size)
        self.next = 0x1000  # gpa 0 stays unused: a null address is a bug to catch

    def off(self, gpa: int, n: int = 1) -> int:
        for base, foff in REGIONS:
            if base <= gpa and gpa + n <= base + REGION_SIZE:
                return foff + gpa - base
        # spans the two adjacent regions: callers use read/write, which split
        raise ValueError(f"gpa {gpa:#x}+{n} not inside one region")

    def uva(self, gpa: int) -> int:
        return UVA_BASE + gpa  # the front-end's view: region i at UVA_BASE + its gpa

    def alloc(self, n: int, align: int = 16) -> int:
        gpa = (self.next + align - 1) // align * align
        if gpa + n > self.size:
            raise MemoryError("guest memory exhausted")
        self.next = gpa + n
        return gpa

    def write(self, gpa: int, data: bytes) -> None:
        while data:
            n = min(len(data), REGION_SIZE - gpa % REGION_SIZE)
            o = self.off(gpa, n)
            self.map[o : o + n] = data[:n]
            gpa, data = gpa + n, data[n:]

    def read(self, gpa: int, n: int) -> bytes:
        out = b""
        while n:
            k = min(n, REGION_SIZE - gpa % REGION_SIZE)
            o = self.off(gpa, k)
            out += self.map[o : o + k]
            gpa, n = gpa + k, n - k
        return out

    # One 16-bit load or store, as a driver's READ_ONCE/WRITE_ONCE of a ring index:
    # struct moves the two bytes one at a time, and the back-end reading between them
    # saw an index torn across a 256 boundary (e.g. 0x00ff -> 0x0000 on the way to
    # 0x0100: "more entries than the ring holds", the ring taken as broken).
    def u16(self, gpa: int) -> int:
        return ctypes.c_uint16.from_buffer(self.map, self.off(gpa, 2)).value

    def set_u16(self, gpa: int, v: int) -> None:
        ctypes.c_uint16.from_buffer(self.map, self.off(gpa, 2)).value = v

    def close(self) -> None:
        if self.fd >= 0:
            self.map.close()
            os.close(self.fd)
            self.fd = -1


class Queue:
    """The driver side of one split virtqueue. With `event_idx` it behaves as the Linux
    driver does with VIRTIO_RING_F_EVENT_IDX: it kicks only when the new avail index
    passes the device's avail_event, and before waiting for a call it sets used_event to
    the next used entry (unless `auto_used_event` is turned off: tests set it then).
    `kicks` counts the kicks sent. With `avail_event_own_page` the used ring ends at a
    page boundary, so its avail_event field is alone on the next page."""

    def __init__(self, mem: Memory, index: int, num: int, event_idx: bool = False,
                 avail_event_own_page: bool = False) -> None:
        self.mem, self.index, self.num = mem, index, num
        self.event_idx, self.auto_used_event, self.kicks = event_idx, True, 0
        self.desc = mem.alloc(16 * num, 16)
        self.avail = mem.alloc(6 + 2 * num, 2)
        if avail_event_own_page:
            end = (mem.next + 4 + 8 * num + PAGE - 1) // PAGE * PAGE  # avail_event's gpa
            mem.next = end - 4 - 8 * num
        self.used = mem.alloc(6 + 8 * num, 4)
        self.kick = os.eventfd(0, os.EFD_CLOEXEC)
        self.call = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.err = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.free = list(range(num))
        self.avail_idx = 0
        self.last_used = 0
        self.done: dict[int, tuple[int, list[tuple[int, int]]]] = {}  # head -> (len, writable)
        self.chains: dict[int, tuple[list[int], list[tuple[int, int]]]] = {}

    @property
    def used_event_gpa(self) -> int:
        return self.avail + 4 + 2 * self.num

    @property
    def avail_event_gpa(self) -> int:
        return self.used + 4 + 8 * self.num

    def _publish(self, head: int) -> None:
        self.mem.set_u16(self.avail + 4 + 2 * (self.avail_idx % self.num), head)
        old, self.avail_idx = self.avail_idx, (self.avail_idx + 1) & 0xFFFF
        self.mem.set_u16(self.avail + 2, self.avail_idx)  # mmap stores are ordered on x86
        if self.event_idx:
            fence()  # the index store before the avail_event load
            if not need_event(self.mem.u16(self.avail_event_gpa), self.avail_idx, old):
                return
        self.kicks += 1
        os.eventfd_write(self.kick, 1)

    def post(self, readable: list[bytes], writable: list[int], indirect: bool = False) -> int:
        """A request: readable buffers (copied to guest memory) then writable ones of
        the given sizes. With `indirect`, one ring descriptor pointing at a table."""
        bufs = [(self.mem.alloc(max(len(b), 1)), len(b), 0) for b in readable]
        for (gpa, _, _), b in zip(bufs, readable, strict=True):
            self.mem.write(gpa, b)
        bufs += [(self.mem.alloc(n), n, VIRTQ_DESC_F_WRITE) for n in writable]
        wbufs = [(g, n) for g, n, f in bufs if f]
        if indirect:
            table = self.mem.alloc(16 * len(bufs), 16)
            for i, (g, n, f) in enumerate(bufs):
                nxt = VIRTQ_DESC_F_NEXT if i + 1 < len(bufs) else 0
                self.mem.write(table + 16 * i, DESC.pack(g, n, f | nxt, i + 1 if nxt else 0))
            return self.post_raw([(table, 16 * len(bufs), VIRTQ_DESC_F_INDIRECT)], wbufs)
        return self.post_raw([(g, n, f) for g, n, f in bufs], wbufs)

    def post_raw(self, descs: list[tuple[int, int, int]], wbufs: list[tuple[int, int]],
                 nexts: list[int] | None = None) -> int:
        """Descriptors as given (addr, len, flags); chained in order with NEXT unless
        `nexts` gives each descriptor's next index (relative to the chain's own slots,
        or absolute when >= 1000: absolute - 1000), for hostile chains."""
        if len(descs) > len(self.free):
            raise RuntimeError("ring full")
        slots = [self.free.pop(0) for _ in descs]
        for i, (g, n, f) in enumerate(descs):
            if nexts is not None:
                nx = nexts[i]
                idx = nx - 1000 if nx >= 1000 else slots[nx] if nx >= 0 else 0
                flags = f | (VIRTQ_DESC_F_NEXT if nx >= 0 else 0)
            else:
                last = i + 1 == len(descs)
                idx = 0 if last else slots[i + 1]
                flags = f | (0 if last else VIRTQ_DESC_F_NEXT)
            self.mem.write(self.desc + 16 * slots[i], DESC.pack(g, n, flags, idx))
        head = slots[0]
        self.chains[head] = (slots, wbufs)
        self._publish(head)
        return head

    def collect(self) -> None:
        """Move new used entries into `done`."""
        used_idx = self.mem.u16(self.used + 2)
        while self.last_used != used_idx:
            slot = self.used + 4 + 8 * (self.last_used % self.num)
            head, ln = struct.unpack("<II", self.mem.read(slot, 8))
            slots, wbufs = self.chains.pop(head)
            self.free.extend(slots)
            self.done[head] = (ln, wbufs)
            self.last_used = (self.last_used + 1) & 0xFFFF

    def wait(self, head: int, timeout: float = 10.0) -> Reply:
        """The used entry for `head` (TimeoutError when none comes in time)."""
        deadline = time.monotonic() + timeout
        while True:
            self.collect()
            if head in self.done:
                ln, wbufs = self.done.pop(head)
                data = b"".join(self.mem.read(g, n) for g, n in wbufs)
                return Reply(head, ln, data)
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"queue {self.index}: no used entry for head {head}")
            if self.event_idx and self.auto_used_event:
                # Ask for a call at the next used entry, then look again before sleeping:
                # an entry used in between came with no call, and once it is collected
                # used_event is behind (asks for an entry already used), so set it again.
                seen = self.last_used
                self.mem.set_u16(self.used_event_gpa, seen)
                fence()
                self.collect()
                if self.last_used != seen:
                    continue
            r, _, _ = select.select([self.call], [], [], left)
            if r:
                try:
                    os.eventfd_read(self.call)
                except BlockingIOError:
                    pass

    def is_done(self, head: int) -> bool:
        self.collect()
        return head in self.done

    def close(self) -> None:
        for fd in (self.kick, self.call, self.err):
            os.close(fd)


class Frontend:
    """A connected, negotiated front-end with `nqueues` started queues (0 = hiprio)."""

    def __init__(self, socket_path: str, nqueues: int = 2, num: int = 64,
                 timeout: float = 10.0, protocol_features: int = 0,
                 mem: Memory | None = None, queues: list[Queue] | None = None,
                 event_idx: bool | None = None, avail_event_own_page: bool = False,
                 base: int = 0) -> None:
        # A migration's destination shares the source's memory and rings (`mem`,
        # `queues`: not started here, not closed by close()), and their EVENT_IDX.
        self.owns = mem is None
        self.event_idx = bool(queues and queues[0].event_idx) if event_idx is None \
            else event_idx
        self.avail_event_own_page = avail_event_own_page
        self.base = base  # the rings' first index (near 65535: the 16-bit wrap early)
        self.mem = mem or Memory()
        self.extra_pf = protocol_features
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.queues: list[Queue] = list(queues or [])
        self.unique = 0
        try:
            def connected() -> bool:
                try:
                    self.sock.connect(socket_path)
                    return True
                except (FileNotFoundError, ConnectionRefusedError):
                    return False  # the back-end is not listening yet

            if not wait_until(connected, timeout):
                self.sock.connect(socket_path)  # raises why it cannot
            self.sock.settimeout(timeout)
            self.handshake(nqueues, num)
        except BaseException:
            self.close()
            raise

    # ---- vhost-user messages ----
    def send(self, req: int, payload: bytes = b"", fds: list[int] = (), flags: int = 1) -> None:
        msg = HDR.pack(req, flags, len(payload)) + payload
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        self.sock.sendmsg([msg], anc)

    def recv(self, req: int) -> bytes:
        hdr = self._exact(HDR.size)
        r, flags, size = HDR.unpack(hdr)
        assert r == req and flags == 1 | FLAG_REPLY, (r, req, flags)
        return self._exact(size)

    def _exact(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            b = self.sock.recv(n - len(out))
            if not b:
                raise ConnectionError("back-end closed the connection")
            out += b
        return out

    def call(self, req: int, payload: bytes = b"") -> bytes:
        self.send(req, payload)
        return self.recv(req)

    def acked(self, req: int, payload: bytes = b"", fds: list[int] = ()) -> int:
        """Send with need_reply; the back-end's u64 status (0 = success)."""
        self.send(req, payload, fds, flags=1 | FLAG_NEED_REPLY)
        return U64.unpack(self.recv(req))[0]

    def handshake(self, nqueues: int, num: int) -> None:
        self.send(SET_OWNER)
        features = U64.unpack(self.call(GET_FEATURES))[0]
        assert features & F_VERSION_1 and features & F_PROTOCOL_FEATURES, hex(features)
        self.features = features & (F_VERSION_1 | F_PROTOCOL_FEATURES | F_INDIRECT_DESC)
        if self.event_idx:
            assert features & F_EVENT_IDX, f"EVENT_IDX not offered: {features:#x}"
            self.features |= F_EVENT_IDX
        pf = U64.unpack(self.call(GET_PROTOCOL_FEATURES))[0]
        assert pf & PF_MQ and pf & PF_REPLY_ACK, hex(pf)
        assert pf & self.extra_pf == self.extra_pf, hex(pf)
        self.send(SET_PROTOCOL_FEATURES, U64.pack(PF_MQ | PF_REPLY_ACK | self.extra_pf))
        self.max_queues = U64.unpack(self.call(GET_QUEUE_NUM))[0]
        assert self.max_queues >= nqueues
        assert self.acked(SET_FEATURES, U64.pack(self.features)) == 0
        regions = b"".join(REGION.pack(gpa, REGION_SIZE, self.mem.uva(gpa), foff)
                           for gpa, foff in REGIONS)
        status = self.acked(SET_MEM_TABLE, STATE.pack(len(REGIONS), 0) + regions,
                            [self.mem.fd] * len(REGIONS))
        assert status == 0
        if self.queues:
            return  # the destination's rings start after the state is loaded
        for i in range(nqueues):
            q = Queue(self.mem, i, num, self.event_idx, self.avail_event_own_page)
            q.avail_idx = q.last_used = self.base
            self.mem.set_u16(q.avail + 2, self.base)
            self.mem.set_u16(q.used + 2, self.base)
            self.queues.append(q)
            self.start_queue(q, self.base)

    def start_queue(self, q: Queue, base: int = 0, log: bool = False) -> None:
        assert self.acked(SET_VRING_NUM, STATE.pack(q.index, q.num)) == 0
        assert self.acked(SET_VRING_BASE, STATE.pack(q.index, base)) == 0
        self.set_addr(q, log)
        assert self.acked(SET_VRING_CALL, U64.pack(q.index), [q.call]) == 0
        assert self.acked(SET_VRING_ERR, U64.pack(q.index), [q.err]) == 0
        assert self.acked(SET_VRING_KICK, U64.pack(q.index), [q.kick]) == 0
        assert self.acked(SET_VRING_ENABLE, STATE.pack(q.index, 1)) == 0

    def set_addr(self, q: Queue, log: bool = False) -> None:
        """SET_VRING_ADDR; with `log`, VHOST_VRING_F_LOG and the used ring's gpa."""
        addr = ADDR.pack(q.index, 1 if log else 0, self.mem.uva(q.desc), self.mem.uva(q.used),
                         self.mem.uva(q.avail), q.used if log else 0)
        assert self.acked(SET_VRING_ADDR, addr) == 0

    def stop_queue(self, q: Queue) -> int:
        """GET_VRING_BASE: the back-end stops the ring; its last avail index."""
        index, base = STATE.unpack(self.call(GET_VRING_BASE, STATE.pack(q.index, 0)))
        assert index == q.index
        return base

    def queue(self, i: int) -> Queue:
        return self.queues[i]

    # ---- FUSE over the request queues ----
    def fuse_msg(self, opcode: int, body: bytes = b"", nodeid: int = 1,
                 unique: int | None = None) -> tuple[bytes, int]:
        if unique is None:
            self.unique += 2
            unique = self.unique
        hdr = IN_HEADER.pack(IN_HEADER.size + len(body), opcode, unique, nodeid, 0, 0, 4242, 0, 0)
        return hdr + body, unique

    def fuse_post(self, q: int, opcode: int, body: bytes = b"", nodeid: int = 1,
                  out: int = 4096, indirect: bool = False, unique: int | None = None) -> int:
        msg, _ = self.fuse_msg(opcode, body, nodeid, unique)
        # Header and body in separate descriptors, as the Linux driver sends them.
        parts = [msg[:IN_HEADER.size], msg[IN_HEADER.size:]] if body else [msg]
        return self.queues[q].post(parts, [16, out - 16] if out > 16 else [out],
                                   indirect=indirect)

    def fuse(self, q: int, opcode: int, body: bytes = b"", nodeid: int = 1, out: int = 4096,
             indirect: bool = False, timeout: float = 10.0) -> Reply:
        head = self.fuse_post(q, opcode, body, nodeid, out, indirect)
        return self.queues[q].wait(head, timeout)

    def close(self) -> None:
        try:
            self.sock.close()
        finally:
            if self.owns:
                for q in self.queues:
                    q.close()
                self.mem.close()
            self.queues = []
