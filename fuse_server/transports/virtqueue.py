"""Guest memory and split virtqueues for the vhost-user transport (vhost_user.py).

The chain walk itself (descriptor table, indirect tables, bounds checks, gathering the
readable bytes, listing the writable segments, filling the used ring) is native code:
lockd._native's vl_vq_pop / vl_vq_push. This module maps the front-end's memory regions,
translates ring addresses and keeps the per-queue state those calls work on.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import mmap
import os
import stat
import struct

from lockd.native import HAVE_NATIVE, IMPORT_ERROR, ffi, lib
from lockd.structs import NamedTuple  # typing's, without importing typing

log = logging.getLogger("vfs-lockd.virtio")

MAX_REGIONS = 8  # VHOST_MEMORY_BASELINE_NREGIONS: what SET_MEM_TABLE can carry
MAX_QUEUE_SIZE = 32768
# Linux builds indirect tables longer than the queue (a 1 MiB WRITE is ~260 entries on a
# 128-entry queue), so they get their own bound.
MAX_INDIRECT = 1024
MAX_SEGS = 2 * MAX_INDIRECT + 8  # a descriptor may straddle two adjacent regions
SEG_SIZE = 24  # sizeof(vl_seg): host, len, gpa
_SEG = struct.Struct("<QQQ")
VRING_F_LOG = 1  # SET_VRING_ADDR flag: log the used ring's writes at log_guest_addr

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                       ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_MAP_FAILED = ctypes.c_void_p(-1).value
_U64 = 1 << 64


def require_native() -> None:
    """The virtqueue walker has no pure-Python twin: refuse to start without it."""
    if not HAVE_NATIVE:
        raise RuntimeError(f"the native module lockd._native is needed: {IMPORT_ERROR}")


class Region(NamedTuple):  # not a dataclass: that import costs a back-end ~1 MiB
    gpa: int  # guest physical address
    size: int
    uva: int  # the front-end's (QEMU's) virtual address of the same bytes
    mmap_offset: int  # where the region starts in its fd


class GuestMemory:
    """One SET_MEM_TABLE: the regions mapped shared into this process."""

    def __init__(self, regions: list[Region], fds: list[int]) -> None:
        if not regions or len(regions) > MAX_REGIONS or len(fds) != len(regions):
            raise ValueError(f"{len(regions)} regions with {len(fds)} fds")
        for r, fd in zip(regions, fds, strict=True):
            if r.size <= 0 or r.gpa + r.size > _U64 or r.uva + r.size > _U64 \
                    or r.mmap_offset + r.size > _U64:
                raise ValueError(f"bad region {r}")
            # A region must lie inside its file: touching a page past the file's end
            # would kill this process with SIGBUS.
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise ValueError(f"region {r.gpa:#x}: its fd is not a memory file")
            if r.mmap_offset + r.size > st.st_size:
                raise ValueError(f"region {r.gpa:#x}+{r.size:#x} at offset {r.mmap_offset:#x} "
                                 f"runs past its {st.st_size}-byte file")
        spans = sorted((r.gpa, r.gpa + r.size) for r in regions)
        for (_, end), (start, _) in zip(spans, spans[1:], strict=False):
            if start < end:
                raise ValueError("memory regions overlap")
        self.regions = regions
        self._maps: list[tuple[int, int]] = []
        try:
            for r, fd in zip(regions, fds, strict=True):
                # Mapped from offset 0 so that mmap_offset need not be page aligned.
                length = r.mmap_offset + r.size
                addr = _libc.mmap(None, length, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED,
                                  fd, 0)
                if addr in (None, _MAP_FAILED):
                    e = ctypes.get_errno()
                    raise OSError(e, f"mmap of a {length}-byte region: {os.strerror(e)}")
                self._maps.append((addr, length))
        except BaseException:
            self.unmap()
            raise
        self.table = ffi.new("vl_region[]", len(regions))  # what vl_vq_pop reads
        for i, (r, (addr, _)) in enumerate(zip(regions, self._maps, strict=True)):
            self.table[i].gpa = r.gpa
            self.table[i].size = r.size
            self.table[i].host = addr + r.mmap_offset

    def uva_to_host(self, uva: int, length: int) -> int:
        """Host address of [uva, uva+length) of the front-end's address space; the range
        must lie in one region (rings are contiguous in QEMU's memory)."""
        for r, (addr, _) in zip(self.regions, self._maps, strict=True):
            off = uva - r.uva
            if 0 <= off and off + length <= r.size:
                return addr + r.mmap_offset + off
        raise OSError(errno.EFAULT, f"address {uva:#x}+{length} is in no memory region")

    def gpa_to_host(self, gpa: int, length: int) -> int:
        for r, (addr, _) in zip(self.regions, self._maps, strict=True):
            off = gpa - r.gpa
            if 0 <= off and off + length <= r.size:
                return addr + r.mmap_offset + off
        raise OSError(errno.EFAULT, f"guest address {gpa:#x}+{length} is in no memory region")

    def unmap(self) -> None:
        maps, self._maps = self._maps, []
        for addr, length in maps:
            _libc.munmap(addr, length)


class LogArea:
    """The front-end's dirty log (SET_LOG_BASE): one bit per 4 KiB guest page, mapped
    shared; vl_vq_push marks what it writes while VHOST_F_LOG_ALL is on."""

    def __init__(self, fd: int, size: int, offset: int) -> None:
        st = os.fstat(fd)
        if size <= 0 or offset < 0 or offset + size > st.st_size:
            raise ValueError(f"dirty log {size} bytes at {offset} in a {st.st_size}-byte file")
        length = offset + size
        addr = _libc.mmap(None, length, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED, fd, 0)
        if addr in (None, _MAP_FAILED):
            e = ctypes.get_errno()
            raise OSError(e, f"mmap of the dirty log: {os.strerror(e)}")
        self._map = (addr, length)
        self.addr = addr + offset
        self.size = size

    def unmap(self) -> None:
        if self._map is not None:
            _libc.munmap(*self._map)
            self._map = None


def remap_segs(segs: bytes, memory: GuestMemory) -> bytes:
    """The writable segments of a chain with their host addresses taken again from
    their guest addresses in `memory` (a chain popped by another process - the source
    of a migration - or before a new memory table)."""
    out = bytearray(segs)
    for at in range(0, len(out) - SEG_SIZE + 1, SEG_SIZE):
        _host, length, gpa = _SEG.unpack_from(out, at)
        _SEG.pack_into(out, at, memory.gpa_to_host(gpa, length) if length else 0, length, gpa)
    return bytes(out)


def segs_to_list(segs: bytes) -> list[list[int]]:
    """[[gpa, len], ...]: the part of the segments that means something elsewhere."""
    return [[gpa, length] for _h, length, gpa in _SEG.iter_unpack(segs)]


def segs_from_list(items: list[list[int]]) -> bytes:
    """Segments not mapped yet (host 0): remap_segs maps them when the ring starts."""
    return b"".join(_SEG.pack(0, int(length), int(gpa)) for gpa, length in items)


class RingLock:
    """A queue's lock: a native mutex, because the native reader (native/vl_ring.c)
    pushes under it too. Not reentrant."""

    def __init__(self) -> None:
        self.c = ffi.gc(lib.vl_mutex_new(), lib.vl_mutex_free)
        if self.c == ffi.NULL:
            raise MemoryError("queue mutex")

    def __enter__(self) -> None:
        lib.vl_mutex_lock(self.c)  # (the GIL is released while it waits)

    def __exit__(self, *exc: object) -> None:
        lib.vl_mutex_unlock(self.c)


class VirtQueue:
    """One split virtqueue as configured by SET_VRING_NUM/ADDR/BASE/KICK/CALL.

    `lock` serialises everything that writes the used ring (replies come from the queue's
    reader, native or not, the worker pool and lock-grant callbacks) and the
    started/generation state that says whether a popped chain may still be answered."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.num = 0
        self.addr: tuple[int, int, int] | None = None  # desc, used, avail (front-end uvas)
        self.base = 0  # SET_VRING_BASE: the next avail entry to process
        self.kick_fd = -1
        self.call_fd = -1
        self.err_fd = -1
        self.enabled = False
        self.started = False
        self.gen = 0  # bumped at every stop: chains popped before are not answered
        # Replies to chains that stay in flight across a stop (lock waits: a paused VM
        # keeps its place in the queue), pushed when the ring runs again.
        self.parked: list[tuple[int, bytes, bytes]] = []
        self.lock = RingLock()
        self.cvq = ffi.new("vl_vq *")
        self.cvq.call_fd = -1
        self.cvq.mu = self.lock.c
        self.memory: GuestMemory | None = None

    def set_log(self, addr: int, size: int) -> None:
        """Dirty logging on (the log's address and size) or off (0, 0)."""
        with self.lock:
            self.cvq.log, self.cvq.log_size = addr, size

    def set_log_used(self, on: bool, gpa: int) -> None:
        with self.lock:
            self.cvq.log_used_on, self.cvq.log_used = int(on), gpa

    def set_event_idx(self, on: bool) -> None:
        """VIRTIO_RING_F_EVENT_IDX negotiated (SET_FEATURES): the native pop publishes
        avail_event, the native notify follows used_event."""
        with self.lock:
            self.cvq.event_idx = int(on)
            self.cvq.signalled_valid = 0

    def set_call_fd(self, fd: int) -> None:
        with self.lock:
            old, self.call_fd = self.call_fd, fd
            self.cvq.call_fd = fd
            # A new interrupt path: its first notify signals whatever used_event says
            # (replies may have been pushed while there was none).
            self.cvq.signalled_valid = 0
        if old >= 0:
            os.close(old)

    def attach(self, memory: GuestMemory) -> None:
        """Point the native state at `memory` (start, or a new SET_MEM_TABLE)."""
        if self.addr is None or not self.num:
            raise OSError(errno.EINVAL, f"queue {self.index}: size or addresses not set")
        if self.num > MAX_QUEUE_SIZE or self.num & (self.num - 1):
            raise OSError(errno.EINVAL, f"queue {self.index}: size {self.num} is not a power of 2")
        desc, used, avail = self.addr
        n = self.num
        if desc % 16 or avail % 2 or used % 4:  # the spec's alignment; the C code relies on it
            raise OSError(errno.EINVAL, f"queue {self.index}: misaligned ring")
        h_desc = memory.uva_to_host(desc, 16 * n)
        h_avail = memory.uva_to_host(avail, 6 + 2 * n)
        h_used = memory.uva_to_host(used, 6 + 8 * n)
        with self.lock:
            c = self.cvq
            c.regions = memory.table
            c.nregions = len(memory.regions)
            c.num = n
            c.desc, c.avail, c.used = h_desc, h_avail, h_used
            c.max_indirect = MAX_INDIRECT
            self.memory = memory

    def start(self, memory: GuestMemory) -> None:
        self.attach(memory)
        with self.lock:
            c = self.cvq
            c.last_avail = self.base & 0xFFFF
            # What we pushed before a stop is in the ring: continue after it.
            c.used_idx = ffi.cast("uint16_t *", c.used + 2)[0]
            c.signalled_valid = 0  # as QEMU does at a stop: the first push signals
            c.broken = 0
            self.started = True
            parked, self.parked = self.parked, []
            for head, segs, data in parked:
                try:
                    segs = remap_segs(segs, memory)  # parked by another memory table
                except OSError as exc:
                    log.warning("queue %d: parked reply to head %d: %s", self.index, head, exc)
                    continue
                self._push_locked(head, segs, data)
            c.running = 1

    def notify(self) -> None:
        """Signal the call eventfd (e.g. after replies were pushed before it was set)."""
        with self.lock:
            if self.started and self.call_fd >= 0:
                lib.vl_vq_notify(self.cvq)

    def stop(self) -> int:
        """Stop serving; the index of the next avail entry we would have processed."""
        with self.lock:
            if self.started:
                self.base = self.cvq.last_avail
            self.started = False
            self.cvq.running = 0
            self.gen += 1
            return self.base

    def push(self, gen: int, head: int, segs: bytes, data: bytes, park: bool = False) -> bool:
        """Answer a popped chain; False when the ring was stopped since it was popped.
        With `park`, a reply that finds the ring stopped is kept and pushed when the
        ring starts again (the chain's memory stays mapped meanwhile)."""
        with self.lock:
            if not self.started:
                if park:  # (a copy: `data` may be a buffer its thread reuses)
                    self.parked.append((head, segs, bytes(data)))
                    return True
                return False
            if gen != self.gen:
                return False
            return self._push_locked(head, segs, data)

    def _push_locked(self, head: int, segs: bytes, data: bytes) -> bool:
        n = lib.vl_vq_push(self.cvq, head, ffi.from_buffer("vl_seg[]", segs),
                           len(segs) // SEG_SIZE, ffi.from_buffer(data), len(data), 1)
        if n < 0:
            log.warning("queue %d: push of head %d failed: %s", self.index, head, os.strerror(-n))
            return False
        return True

    def close_fds(self) -> None:
        for name in ("kick_fd", "err_fd"):
            fd = getattr(self, name)
            if fd >= 0:
                os.close(fd)
                setattr(self, name, -1)
        self.set_call_fd(-1)


RING_STOP, RING_REQUEST, RING_UNPUSHED = (lib.VL_RING_STOP, lib.VL_RING_REQUEST,
                                          lib.VL_RING_UNPUSHED) if HAVE_NATIVE else (0, 1, 2)


class Popper:
    """The reader side of one queue: a buffer for the readable bytes of a chain, room
    for its writable segments and for a native reply, reused for every chain, and the
    reader's state shared with the native loop (`state`: vl_reader)."""

    def __init__(self, vq: VirtQueue, bufsize: int, reply_cap: int, stop_fd: int) -> None:
        self.vq = vq
        self.cap = bufsize
        self.buf = _uncleared("uint8_t[]", bufsize)  # (untouched pages cost nothing)
        self.view = ffi.buffer(self.buf)
        self.segs = ffi.new("vl_seg[]", MAX_SEGS)
        self.chain = ffi.new("vl_chain *")
        self.out = _uncleared("uint8_t[]", reply_cap)
        self.out_cap = reply_cap
        self.reply_len = ffi.new("uint64_t *")
        self.state = ffi.new("vl_reader *")
        self.state.kick_fd = vq.kick_fd
        self.state.stop_fd = stop_fd

    def pop(self) -> int:
        """1: a chain is in `chain` (readable bytes in `view[:chain.in_len]`); 0: none;
        <0: -errno, the ring is broken."""
        return lib.vl_vq_pop(self.vq.cvq, self.buf, self.cap, self.segs, MAX_SEGS, self.chain)

    def serve(self, table: object) -> int:
        """Run the native reader loop (vl_ring_serve; `table`: a vl_tab, or NULL to
        answer nothing natively) until it returns: RING_REQUEST (a chain as pop leaves
        it), RING_UNPUSHED (`reply()`), RING_STOP, or -errno (the ring is broken)."""
        return lib.vl_ring_serve(self.vq.cvq, self.state, table, self.buf, self.cap, self.segs,
                                 MAX_SEGS, self.chain, self.out, self.out_cap, self.reply_len)

    def reply(self) -> bytes:
        return ffi.buffer(self.out, self.reply_len[0])[:]

    def seg_bytes(self) -> bytes:
        """The writable segments of the last chain, packed (kept until it is answered)."""
        return ffi.buffer(self.segs, SEG_SIZE * self.chain.nsegs)[:]


_uncleared = ffi.new_allocator(should_clear_after_alloc=False) if HAVE_NATIVE else None
