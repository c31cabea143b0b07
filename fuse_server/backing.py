"""FUSE passthrough (Linux 6.9+): the kernel reads and writes an open file's host file
itself, so the data never passes through this server.

How it works (include/uapi/linux/fuse.h, fs/fuse/backing.c, passthrough.c, iomode.c):
* INIT: the server grants `FUSE_PASSTHROUGH` (bit 37, i.e. bit 5 of flags2) and names
  `max_stack_depth` in fuse_init_out (the u32 after flags2): backing files may live on
  file systems stacked less deep than that, and our mount counts as that deep itself.
* `FUSE_DEV_IOC_BACKING_OPEN` on /dev/fuse registers a host descriptor (regular files
  only) and returns a backing id; it needs CAP_SYS_ADMIN in the initial user namespace.
  The kernel keeps its own reference to the file; `FUSE_DEV_IOC_BACKING_CLOSE` forgets
  the id (files already opened with it keep working).
* An OPEN/CREATE reply with `FOPEN_PASSTHROUGH` and that id in fuse_open_out.backing_id
  makes the kernel open its own file on the backing file's path, with the guest file's
  flags and the registering thread's credentials: read, write, splice and mmap of that
  open file go to the host file and its page cache. FOPEN_DIRECT_IO would override it for
  read/write, FOPEN_KEEP_CACHE is refused with it.
* Every open file of one inode must use the same backing file while any of them is open
  (a different one: EBUSY), and an inode open for passthrough cannot also be open in the
  page-cache mode (ETXTBSY) and vice versa: the open fails with EIO. So the backing id is
  per inode, kept while the inode has open passthrough handles (`Passthrough` counts).

The coherence this gives: the page cache is the host file's own, so reads see every
write by other guests and host processes at once, and mmap is shared with them.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import stat
import struct
import threading

from lockd.fuse import abi
from lockd.fuse.abi import FOPEN_PASSTHROUGH, INIT_OUT, PASSTHROUGH  # noqa: F401 - session: B.*

log = logging.getLogger("vfs-lockd.fuse")

# The passthrough ABI (PASSTHROUGH, FOPEN_PASSTHROUGH, the 7.40 INIT_OUT with
# max_stack_depth, the backing ioctls) is lockd.fuse.abi's; the session reads the first
# three through this module.
FILESYSTEM_MAX_STACK_DEPTH = 2
OVERLAYFS_MAGIC = 0x794C7630


def stack_depth_for(source: str) -> int:
    """max_stack_depth for a share at `source`: 1 lets backing files live on ordinary file
    systems and still lets an overlayfs be stacked on the mount; a share on overlayfs
    (a container's root) needs 2 (then nothing can be stacked on the mount)."""
    try:
        magic = _statfs_magic(source)
    except OSError:
        return 1
    return FILESYSTEM_MAX_STACK_DEPTH if magic == OVERLAYFS_MAGIC else 1


def _statfs_magic(path: str) -> int:
    import ctypes

    class _Statfs(ctypes.Structure):
        _fields_ = [("f_type", ctypes.c_long), ("rest", ctypes.c_byte * 112)]

    libc = ctypes.CDLL(None, use_errno=True)
    buf = _Statfs()
    if libc.statfs(os.fsencode(path), ctypes.byref(buf)) < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return buf.f_type & 0xFFFFFFFF


class BackingFiles:
    """The backing-file ioctls of one /dev/fuse connection, and whether passthrough is on
    for it. `enabled` is set by the session when INIT granted FUSE_PASSTHROUGH; an ioctl
    refused for the whole connection (EPERM: no CAP_SYS_ADMIN in the initial user
    namespace, or the kernel did not take the INIT flag) turns it off, logged once.
    Refusals for one file (ELOOP: its file system is stacked too deep, e.g. a FUSE share
    that uses passthrough itself) fall back for that inode only."""

    def __init__(self, dev_fd: int, stack_depth: int = 1) -> None:
        self.dev_fd = dev_fd
        self.stack_depth = stack_depth
        self.enabled = False
        self._logged: set[int] = set()
        self._log_lock = threading.Lock()
        self.opened = 0  # ids registered (for tests and the log)
        self.refused = 0  # registrations refused (inodes served without passthrough)

    def open(self, fd: int) -> int:
        """Register `fd` (an open regular file); its backing id, or 0 when the kernel
        refused (then the caller serves the file without passthrough)."""
        if not self.enabled:
            return 0
        arg = bytearray(abi.BACKING_MAP.pack(fd, 0, 0))
        try:
            backing_id = fcntl.ioctl(self.dev_fd, abi.DEV_IOC_BACKING_OPEN, arg, True)
        except OSError as exc:
            self.refused += 1
            if exc.errno in (errno.EPERM, errno.ENOTTY, errno.EOPNOTSUPP):
                self.enabled = False  # nothing on this connection will pass through
                self._once(exc.errno, "passthrough off for this mount: the kernel refused a "
                           f"backing file ({exc.strerror}); reads and writes go through "
                           "the server")
            else:
                self._once(exc.errno, "passthrough refused for some files "
                           f"({exc.strerror}); those go through the server")
            return 0
        self.opened += 1
        return backing_id

    def close(self, backing_id: int) -> None:
        """Forget a backing id (open files that use it keep their backing file)."""
        try:
            fcntl.ioctl(self.dev_fd, abi.DEV_IOC_BACKING_CLOSE, bytearray(struct.pack("<I", backing_id)),
                        True)
        except OSError as exc:  # ENODEV: the connection is gone, and the id with it
            if exc.errno != errno.ENODEV:
                log.debug("backing close %d: %s", backing_id, exc)

    def _once(self, err: int, msg: str) -> None:
        with self._log_lock:
            if err in self._logged:
                return
            self._logged.add(err)
        log.warning(msg)


def can_pass_through(mode: int) -> bool:
    """Only regular files have a backing file (directories are read by the server)."""
    return stat.S_ISREG(mode)
