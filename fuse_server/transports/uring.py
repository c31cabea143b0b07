"""A minimal io_uring (Linux 5.1+; include/uapi/linux/io_uring.h): one ring with 128-byte
submission entries (IORING_SETUP_SQE128, which IORING_OP_URING_CMD to /dev/fuse needs),
driven by one thread at a time (the caller serialises submissions and reaping).

Only what the FUSE transport uses: URING_CMD and READ submissions, io_uring_enter that
submits and waits in one call, and reaping completions. No liburing: the rings are
mapped with mmap and read and written with struct (x86 and arm64 both give the ordering
this needs: an entry is written before the tail that publishes it, and the kernel's
release of a completion's tail is paired with our acquire by the system call boundary
or the lock-free read of a naturally aligned u32).
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import struct

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.syscall.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_long, ctypes.c_long,
                          ctypes.c_long, ctypes.c_void_p, ctypes.c_long]
_NR = {"x86_64": (425, 426), "aarch64": (425, 426), "riscv64": (425, 426)}
NR_SETUP, NR_ENTER = _NR.get(os.uname().machine, (425, 426))

SETUP_SQE128 = 1 << 10
ENTER_GETEVENTS = 1
FEAT_SINGLE_MMAP = 1 << 0
OFF_SQ_RING, OFF_CQ_RING, OFF_SQES = 0, 0x8000000, 0x10000000
OP_READ = 22
OP_URING_CMD = 46
SQE_SIZE = 128
CMD_OFFSET = 48  # struct io_uring_sqe: cmd[] (80 bytes with SQE128) starts at addr3

# struct io_uring_params: 10 u32 (sq_entries .. resv[3]), io_sqring_offsets (8 u32 +
# u64), io_cqring_offsets (8 u32 + u64): 120 bytes.
_PARAMS_HEAD = struct.Struct("<10I")
_OFFSETS = struct.Struct("<8IQ")
_SQE_HEAD = struct.Struct("<BBHiIIQIIQ")  # opcode flags ioprio fd off(cmd_op, pad) addr len
#                                           op_flags user_data: the first 40 bytes
_CQE = struct.Struct("<QiI")
_U32 = struct.Struct("<I")


def available() -> str | None:
    """Why io_uring cannot be used here (None: it can)."""
    try:
        Ring(2).close()
    except OSError as exc:
        return f"io_uring_setup: {exc.strerror}"
    return None


class Ring:
    """One io_uring instance. Not thread-safe: one owner thread submits and reaps."""

    def __init__(self, entries: int) -> None:
        params = bytearray(120)
        _U32.pack_into(params, 8, SETUP_SQE128)
        buf = (ctypes.c_char * len(params)).from_buffer(params)
        fd = _libc.syscall(NR_SETUP, entries, ctypes.addressof(buf), 0, 0, None, 0)
        if fd < 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))
        self.fd = fd
        try:
            p = _PARAMS_HEAD.unpack_from(params)
            sq_entries, cq_entries, features = p[0], p[1], p[5]
            sq = _OFFSETS.unpack_from(params, 40)
            cq = _OFFSETS.unpack_from(params, 80)
            sq_size = sq[6] + sq_entries * 4
            cq_size = cq[5] + cq_entries * _CQE.size
            flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0x8000)
            if features & FEAT_SINGLE_MMAP:
                self._sqm = mmap.mmap(fd, max(sq_size, cq_size), flags, offset=OFF_SQ_RING)
                self._cqm = self._sqm
            else:
                self._sqm = mmap.mmap(fd, sq_size, flags, offset=OFF_SQ_RING)
                self._cqm = mmap.mmap(fd, cq_size, flags, offset=OFF_CQ_RING)
            self._sqes = mmap.mmap(fd, sq_entries * SQE_SIZE, flags, offset=OFF_SQES)
        except BaseException:
            os.close(fd)
            raise
        self._sq_head, self._sq_tail, self._sq_array = sq[0], sq[1], sq[6]
        self._sq_mask = _U32.unpack_from(self._sqm, sq[2])[0]
        self.sq_entries = sq_entries
        self._cq_head, self._cq_tail, self._cqes = cq[0], cq[1], cq[5]
        self._cq_mask = _U32.unpack_from(self._cqm, cq[2])[0]
        self._unsubmitted = 0

    def _next_sqe(self) -> int:
        """Offset of a free submission entry (published by _publish)."""
        tail = _U32.unpack_from(self._sqm, self._sq_tail)[0]
        head = _U32.unpack_from(self._sqm, self._sq_head)[0]
        if tail - head >= self.sq_entries:
            raise OSError(errno.EBUSY, "submission queue full")
        return tail

    def _publish(self, tail: int, sqe: bytes) -> None:
        idx = tail & self._sq_mask
        self._sqes[idx * SQE_SIZE:(idx + 1) * SQE_SIZE] = sqe
        _U32.pack_into(self._sqm, self._sq_array + idx * 4, idx)
        _U32.pack_into(self._sqm, self._sq_tail, (tail + 1) & 0xFFFFFFFF)
        self._unsubmitted += 1

    def uring_cmd(self, fd: int, cmd_op: int, addr: int, length: int, user_data: int,
                  cmd: bytes) -> None:
        """Queue an IORING_OP_URING_CMD (cmd: up to 80 bytes of command data)."""
        tail = self._next_sqe()
        sqe = bytearray(SQE_SIZE)
        _SQE_HEAD.pack_into(sqe, 0, OP_URING_CMD, 0, 0, fd, cmd_op, 0, addr, length, 0,
                            user_data)
        sqe[CMD_OFFSET:CMD_OFFSET + len(cmd)] = cmd
        self._publish(tail, bytes(sqe))

    def read(self, fd: int, addr: int, length: int, user_data: int) -> None:
        """Queue an IORING_OP_READ of `length` bytes into `addr`."""
        tail = self._next_sqe()
        sqe = bytearray(SQE_SIZE)
        _SQE_HEAD.pack_into(sqe, 0, OP_READ, 0, 0, fd, 0, 0, addr, length, 0, user_data)
        self._publish(tail, bytes(sqe))

    def submit(self, wait: int = 0) -> None:
        """Submit what is queued; with `wait`, also wait for that many completions (one
        system call; EINTR returns early)."""
        n = self._unsubmitted
        if not n and not wait:
            return
        r = _libc.syscall(NR_ENTER, self.fd, n, wait, ENTER_GETEVENTS if wait else 0, None, 0)
        if r < 0:
            e = ctypes.get_errno()
            if e == errno.EINTR:
                return
            raise OSError(e, os.strerror(e))
        self._unsubmitted -= min(n, r)

    def completions(self) -> list[tuple[int, int]]:
        """Reap every completion there is: [(user_data, res), ...]."""
        cqm = self._cqm
        head = _U32.unpack_from(cqm, self._cq_head)[0]
        tail = _U32.unpack_from(cqm, self._cq_tail)[0]
        out = []
        while head != tail:
            ud, res, _ = _CQE.unpack_from(cqm, self._cqes + (head & self._cq_mask) * _CQE.size)
            out.append((ud, res))
            head = (head + 1) & 0xFFFFFFFF
        _U32.pack_into(cqm, self._cq_head, head)
        return out

    def close(self) -> None:
        for m in {id(x): x for x in (self._sqes, self._sqm, self._cqm)}.values():
            try:
                m.close()
            except BufferError:
                pass
        os.close(self.fd)
