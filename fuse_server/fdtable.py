"""Where a node id or a file handle becomes a host descriptor (native/vl_serve.c).

`Passthrough` owns the guest's inodes and handles; it publishes each one here when it
exists and retires it here when it goes, and the descriptors it published are closed
here, never directly: a request the native fast path is serving may be using one, and
then its last user closes it. The table also keeps each inode's "uncached" mark (the
invalidator's: fuse_server/invalidate.py), since every request served natively must
clear it as the Python session does.

`DescriptorTable` is the native one; `PyDescriptorTable` the same contract without the
extension (no fast path then: `native` is None).
"""

from __future__ import annotations

import errno
import os
import threading

from lockd import native

LOST, DIR, UNCACHED = 1, 2, 4
MAX_REPLY_DATA = 1 << 20  # what a READ may return (INIT's max_write: session.MAX_WRITE)


def reply_cap(room: int | None) -> int:
    """The bytes a reply may take: the 16-byte header and at most MAX_REPLY_DATA, within
    the guest's `room` (a virtqueue chain's writable part; None: /dev/fuse's buffers)."""
    if room is None:
        return 16 + MAX_REPLY_DATA
    return 16 + max(0, min(MAX_REPLY_DATA, room - 16))


class PyDescriptorTable:
    """The contract, in Python (no native fast path)."""

    native = None

    def __init__(self) -> None:
        self._flags: dict[int, int] = {}
        self._mu = threading.Lock()

    def put_inode(self, nodeid: int, fd: int, lost: bool = False) -> None:
        with self._mu:
            self._flags[nodeid] = LOST if lost else 0

    def put_handle(self, fh: int, fd: int, nodeid: int, is_dir: bool, lost: bool) -> None:
        pass

    def drop_inode(self, nodeid: int, fd: int, close: bool) -> None:
        with self._mu:
            self._flags.pop(nodeid, None)
        if close:
            os.close(fd)

    def drop_handle(self, fh: int, fd: int, close: bool) -> None:
        if close:
            os.close(fd)

    def flags(self, nodeid: int, set_: int = 0, clear: int = 0) -> int:
        """The inode's flags before the change; -ENOENT for an unknown one."""
        with self._mu:
            old = self._flags.get(nodeid)
            if old is None:
                return -errno.ENOENT
            self._flags[nodeid] = (old | set_) & ~clear
            return old

    def config(self, ops: frozenset[int], attr_sec: int, attr_nsec: int) -> None:
        pass

    def served(self, opcode: int) -> int:
        """Requests of `opcode` the native fast path has answered."""
        return 0

    def serve(self, buf: bytes | bytearray | memoryview, room: int | None) -> bytes | None:
        """The fast path's reply to one request, or None when the session must answer
        it. `room` as for Session.handle (None: /dev/fuse)."""
        return None


class DescriptorTable(PyDescriptorTable):
    def __init__(self) -> None:
        lib, ffi = native.lib, native.ffi
        self._lib = lib
        self.native = ffi.gc(lib.vl_tab_new(), lib.vl_tab_free)
        if self.native == ffi.NULL:
            raise MemoryError("descriptor table")

    def _check(self, ret: int) -> None:
        if ret < 0:
            raise OSError(-ret, os.strerror(-ret))

    def put_inode(self, nodeid: int, fd: int, lost: bool = False) -> None:
        self._check(self._lib.vl_tab_put_inode(self.native, nodeid, fd, LOST if lost else 0))

    def put_handle(self, fh: int, fd: int, nodeid: int, is_dir: bool, lost: bool) -> None:
        flags = (DIR if is_dir else 0) | (LOST if lost else 0)
        self._check(self._lib.vl_tab_put_handle(self.native, fh, fd, nodeid, flags))

    def drop_inode(self, nodeid: int, fd: int, close: bool) -> None:
        if self._lib.vl_tab_drop_inode(self.native, nodeid, int(close)) < 0 and close:
            os.close(fd)  # never published (a load that failed half-way)

    def drop_handle(self, fh: int, fd: int, close: bool) -> None:
        if self._lib.vl_tab_drop_handle(self.native, fh, int(close)) < 0 and close:
            os.close(fd)

    def flags(self, nodeid: int, set_: int = 0, clear: int = 0) -> int:
        return self._lib.vl_tab_flags(self.native, nodeid, set_, clear)

    def config(self, ops: frozenset[int], attr_sec: int, attr_nsec: int) -> None:
        """Which opcodes the fast path answers from now on, and GETATTR's timeout."""
        mask = 0
        for op in ops:
            mask |= 1 << op
        self._lib.vl_tab_config(self.native, mask, attr_sec, attr_nsec)

    def served(self, opcode: int) -> int:
        return self._lib.vl_tab_served(self.native, opcode)

    def serve(self, buf: bytes | bytearray | memoryview, room: int | None) -> bytes | None:
        cap = reply_cap(room)
        out = native.ffi.new("uint8_t[]", cap)
        n = self._lib.vl_serve(self.native, native.ffi.from_buffer(buf), len(buf), out, cap)
        return bytes(native.ffi.buffer(out, n)) if n else None


class FastReplies:
    """One thread's buffer for the fast path's replies (a READ's up to 1 MiB, never
    cleared: only what a reply writes is touched), for a transport that has the request
    in native memory already (a virtqueue's popped chain)."""

    def __init__(self) -> None:
        self._out = _uncleared("uint8_t[]", reply_cap(None))

    def serve(self, table: PyDescriptorTable, req, n: int, room: int) -> memoryview | None:  # noqa: ANN001
        """The reply to the `n`-byte request at `req` (a cdata pointer), valid until the
        next call; None when the session must answer it (or there is no fast path)."""
        if table.native is None:
            return None
        got = native.lib.vl_serve(table.native, req, n, self._out, reply_cap(room))
        return memoryview(native.ffi.buffer(self._out, got)) if got else None


_uncleared = native.ffi.new_allocator(should_clear_after_alloc=False) if native.HAVE_NATIVE \
    else None


def new_table() -> PyDescriptorTable:
    return DescriptorTable() if native.HAVE_NATIVE else PyDescriptorTable()
