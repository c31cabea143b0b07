"""The /dev/fuse transport: mount(2), worker threads that read requests and write
replies, umount2. Knows nothing about what the requests mean (that is the Session).
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from fuse_server.fdtable import PyDescriptorTable, reply_cap
from lockd import native
from lockd.fuse import abi

if TYPE_CHECKING:
    from fuse_server.transports.fuse_uring import UringQueues

log = logging.getLogger("vfs-lockd.fuse")

MS_NOSUID = 2
MS_NODEV = 4
MNT_DETACH = 2
FSTYPE = "fuse.vfs-lockd"

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


def umount(mountpoint: str, flags: int = MNT_DETACH) -> int:
    """umount2(); 0 or the errno."""
    if _libc.umount2(os.fsencode(mountpoint), flags) < 0:
        return ctypes.get_errno()
    return 0


def _mount_fstype(mountpoint: str) -> str | None:
    """The fs type mounted exactly at mountpoint (the top one), from mountinfo."""
    target = os.path.realpath(mountpoint)
    found = None
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                parts = line.split()
                sep = parts.index("-")
                mp = parts[4].encode().decode("unicode_escape")
                if mp == target:
                    found = parts[sep + 1]
    except OSError:
        return None
    return found


def clean_stale(mountpoint: str) -> None:
    """A server killed without unmounting leaves a mount whose every access fails with
    ENOTCONN: detach it. A live mount of ours there is an error (two servers, one path)."""
    try:
        # statfs always reaches the server (a stat may be answered from cached attributes).
        os.statvfs(mountpoint)
    except OSError as exc:
        if exc.errno != errno.ENOTCONN:
            raise
        err = umount(mountpoint)
        log.warning(
            "stale FUSE mount at %s (its server is gone): detached it%s",
            mountpoint,
            f" (umount2 failed: {os.strerror(err)})" if err else "",
        )
        if err:
            raise RuntimeError(f"stale mount at {mountpoint} could not be removed: {os.strerror(err)}") from None
        return
    if os.path.ismount(mountpoint) and _mount_fstype(mountpoint) == FSTYPE:
        raise RuntimeError(f"{mountpoint} is already served by a running vfs-lockd mount")


class DevFuse:
    """One FUSE connection: a /dev/fuse fd mounted at `mountpoint`."""

    def __init__(self, mountpoint: str, bufsize: int) -> None:
        self.mountpoint = os.path.realpath(mountpoint)
        self.bufsize = bufsize
        self.fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
        self.stopped = threading.Event()
        self._threads: list[threading.Thread] = []
        # FUSE over io_uring (transports/fuse_uring.py), when the session negotiates it:
        # `after_init` (set by the caller) starts its queues once INIT is answered.
        self.uring: UringQueues | None = None
        self.after_init: Callable[[], None] | None = None

    def mount(self) -> None:
        st = os.stat(self.mountpoint)
        opts = (
            f"fd={self.fd},rootmode={st.st_mode & 0o170000:o},user_id=0,group_id=0,"
            "allow_other,default_permissions"
        )
        ret = _libc.mount(
            b"vfs-lockd", os.fsencode(self.mountpoint), FSTYPE.encode(), MS_NOSUID | MS_NODEV, opts.encode()
        )
        if ret < 0:
            e = ctypes.get_errno()
            raise OSError(e, f"mount {self.mountpoint}: {os.strerror(e)}")

    def send(self, reply: bytes) -> None:
        """Write one reply or notification. Raises OSError (ENOENT: request interrupted
        and gone; the caller decides whether it matters). Notifications come only from
        the session's invalidator thread, never from a thread that reads requests (see
        fuse_server/invalidate.py). A reply to a request that came through an io_uring
        entry is committed there instead."""
        if self.uring is not None and self.uring.send(reply):
            return
        os.write(self.fd, reply)

    def _worker(self, handle: Callable[[memoryview], bytes | None],
                table: PyDescriptorTable | None) -> None:
        """Every worker blocks in read(2) on /dev/fuse and answers what it read itself;
        the kernel wakes one waiting reader per request. Measured on a 2-core VM, this
        beats handing a "lead" between threads (one reader at a time, the lead handed on
        before any request that may block): there each request woke a second thread that
        then competed for the GIL with the one handling it (stat with caching off 118 ->
        75 us, a lock+unlock pair 105 -> 52 us). A slow request holds only its thread."""
        buf = bytearray(self.bufsize)
        view = memoryview(buf)
        stopped = self.stopped
        reply = self._reply
        read = self._reader(buf, table)
        while not stopped.is_set():
            try:
                n = read()
            except OSError as exc:
                if exc.errno in (errno.ENOENT, errno.EINTR, errno.EAGAIN):
                    continue  # ENOENT: the request was interrupted before we read it
                if exc.errno != errno.ENODEV:
                    log.error("read /dev/fuse: %s", exc)
                stopped.set()  # ENODEV: unmounted
                return
            if not reply(handle(view[:n])):
                return
            # INIT < 256: the opcode's low byte is enough.
            if self.after_init is not None and n >= 8 and buf[abi.OPCODE_OFFSET] == abi.INIT:
                start, self.after_init = self.after_init, None
                start()  # the kernel has processed the INIT reply: io_uring may register

    def _reader(self, buf: bytearray, table: PyDescriptorTable | None) -> Callable[[], int]:
        """The next request for the session, read into `buf`: with a native table, the
        requests the native fast path answers never reach the session (vl_fuse_serve
        reads and answers them without the GIL); else one read(2)."""
        if table is None or table.native is None:
            return lambda: os.readv(self.fd, [buf])
        lib, ffi = native.lib, native.ffi
        tab, fd, inbuf = table.native, self.fd, ffi.from_buffer(buf)
        out = ffi.new("uint8_t[]", reply_cap(None))

        def read() -> int:
            n = lib.vl_fuse_serve(tab, fd, inbuf, len(buf), out, len(out))
            if n < 0:
                raise OSError(-n, os.strerror(-n))
            return n

        return read

    def _reply(self, reply: bytes | None) -> bool:
        """Write a reply (one write per message); False once the connection is gone."""
        if reply is None:
            return True
        try:
            os.write(self.fd, reply)
        except OSError as exc:
            if exc.errno == errno.ENODEV:
                self.stopped.set()
                return False
            if exc.errno != errno.ENOENT:  # ENOENT: interrupted meanwhile
                log.warning("write reply: %s", exc)
        return True

    def start(self, handle: Callable[[memoryview], bytes | None], threads: int,
              quick: frozenset[int] = frozenset(),
              table: PyDescriptorTable | None = None) -> None:
        """Serve with `threads` threads, each reading and answering requests (`quick`,
        the opcodes that never block, needs no special path here: see _worker). With
        `table` (the session's file system's), the native fast path answers what it can,
        and every request's unique is noted as it is read (until io_uring takes over:
        the session's _after_releases)."""
        if table is not None and table.native is not None:
            table.order_reads(True)
        for i in range(max(1, threads)):
            t = threading.Thread(target=self._worker, args=(handle, table), name=f"fuse-{i}",
                                 daemon=True)
            t.start()
            self._threads.append(t)

    def unmount(self) -> None:
        err = umount(self.mountpoint)
        if err not in (0, errno.EINVAL, errno.ENOENT):
            log.warning("umount %s: %s", self.mountpoint, os.strerror(err))
