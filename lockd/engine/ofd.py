"""Host lock calls used by the lock manager: OFD and classic fcntl locks, flock, the wake
signal that cancels a blocked wait, and file handles.

The same names exist whether lockd._native is built or not:

- `setlk(fd, type, start, end) -> int` / `setlkw(...)`: F_OFD_SETLK / F_OFD_SETLKW on
  the inclusive range [start, end] (end == OFFSET_MAX: to EOF). 0 or an errno.
- `getlk(fd, type, start, end) -> (type, start, end, pid) | int`: F_OFD_GETLK; the first
  conflicting lock (end inclusive, OFFSET_MAX = to EOF; pid -1 for an OFD holder) or
  (F_UNLCK, 0, 0, 0). An int errno when the call fails.
- `posix_getlk(...)`: the same with classic F_GETLK (reports a classic holder's pid).
- `flock(fd, op) -> int`: flock(2), 0 or an errno.
- `install_wake_signal(signo) -> int`, `WAKE_SIGNAL`: after installing, a thread blocked
  in setlkw/flock returns EINTR when `signal.pthread_kill(ident, WAKE_SIGNAL)` hits it.
  A kill that lands before the thread enters the syscall is lost: repeat it until the
  waiter reports back.
- `name_to_handle(fd) -> (handle_type, handle) | None`,
  `open_by_handle(mount_fd, handle_type, handle, flags) -> fd | -errno`.

Native calls never raise and release the GIL. The pure-Python fallback (fcntl module)
has one real limitation: Python retries a syscall interrupted by a signal whose handler
does not raise (PEP 475), so a fallback setlkw/flock wait CANNOT be woken by
WAKE_SIGNAL; `CAN_WAKE` says which one you got. The fallback has no file handles.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import signal
import struct

from lockd.api import F_UNLCK, OFFSET_MAX
from lockd.native import HAVE_NATIVE
from lockd.native import ffi as _ffi
from lockd.native import lib as _lib

# A real-time signal nobody else uses; chosen once for the whole process.
WAKE_SIGNAL: int = signal.SIGRTMIN + 4

LockInfo = tuple[int, int, int, int]  # (type, start, end, pid)

# Errnos with which a cluster file system says "this description's locks were given to
# another host while this one was cut off" (the manager records them as lost locks):
# GlusterFS with client.strict-locks fails every later call on such a description with
# EBADFD. CephFS: the MDS evicts and blocklists a client that stayed silent too long;
# that ceph-fuse then fails lock calls on its descriptions with ESHUTDOWN (Ceph's
# EBLOCKLISTED: the first calls, and those in flight) and EIO (every later one). A local
# file system never answers a lock call with any of these.
REVOKED: frozenset[int] = frozenset({errno.EBADFD, errno.ESHUTDOWN, errno.EIO})

CAN_WAKE = HAVE_NATIVE
MAX_HANDLE_SZ = 128

if HAVE_NATIVE:
    # Hot path: the cffi functions themselves, no Python frame in between.
    setlk = _lib.vl_ofd_setlk
    setlkw = _lib.vl_ofd_setlkw
    flock = _lib.vl_flock
    install_wake_signal = _lib.vl_install_wake_signal
    MAX_HANDLE_SZ = _lib.vl_max_handle_sz()

    _lock_new = _ffi.new
    _ofd_getlk = _lib.vl_ofd_getlk
    _posix_getlk = _lib.vl_posix_getlk

    def getlk(fd: int, type_: int, start: int, end: int) -> LockInfo | int:
        """F_OFD_GETLK: the first conflicting lock, or (F_UNLCK, 0, 0, 0); errno on failure."""
        out = _lock_new("vl_lock *")
        err = _ofd_getlk(fd, type_, start, end, out)
        return err or (out.type, out.start, out.end, out.pid)

    def posix_getlk(fd: int, type_: int, start: int, end: int) -> LockInfo | int:
        """Classic F_GETLK (reports the classic holder's pid); errno on failure."""
        out = _lock_new("vl_lock *")
        err = _posix_getlk(fd, type_, start, end, out)
        return err or (out.type, out.start, out.end, out.pid)

    def name_to_handle(fd: int) -> tuple[int, bytes] | None:
        """name_to_handle_at(fd, "", AT_EMPTY_PATH): (handle_type, handle) or None."""
        buf = _ffi.new(f"uint8_t[{MAX_HANDLE_SZ}]")
        htype = _ffi.new("int *")
        hlen = _ffi.new("int *")
        if _lib.vl_name_to_handle(fd, buf, MAX_HANDLE_SZ, htype, hlen):
            return None
        return htype[0], _ffi.buffer(buf, hlen[0])[:]

    def open_by_handle(mount_fd: int, handle_type: int, handle: bytes, flags: int) -> int:
        """open_by_handle_at (needs CAP_DAC_READ_SEARCH): an fd or -errno."""
        return _lib.vl_open_by_handle(mount_fd, bytes(handle), len(handle), handle_type, flags)

else:
    # struct flock: short l_type, short l_whence, off_t l_start, off_t l_len, pid_t l_pid,
    # in native layout (padding after l_whence and at the end on 64-bit Linux).
    _FLOCK = struct.Struct("@hhqqi4x")
    _F_OFD_GETLK = getattr(fcntl, "F_OFD_GETLK", 36)
    _F_OFD_SETLK = getattr(fcntl, "F_OFD_SETLK", 37)
    _F_OFD_SETLKW = getattr(fcntl, "F_OFD_SETLKW", 38)

    def _pack(type_: int, start: int, end: int) -> bytes | None:
        if not (0 <= start <= end <= OFFSET_MAX):
            return None
        length = 0 if end == OFFSET_MAX else end - start + 1
        return _FLOCK.pack(type_, os.SEEK_SET, start, length, 0)

    def _call(cmd: int, fd: int, type_: int, start: int, end: int) -> bytes | int:
        """fcntl(fd, cmd, struct flock): the kernel's struct, or an errno."""
        arg = _pack(type_, start, end)
        if arg is None:
            return errno.EINVAL
        try:
            return fcntl.fcntl(fd, cmd, arg)
        except OSError as e:
            return e.errno or errno.EIO
        except ValueError:  # negative fd: Python refuses before the syscall
            return errno.EBADF
        except (OverflowError, struct.error):
            return errno.EINVAL

    def _set(cmd: int, fd: int, type_: int, start: int, end: int) -> int:
        res = _call(cmd, fd, type_, start, end)
        return res if isinstance(res, int) else 0

    def _get(cmd: int, fd: int, type_: int, start: int, end: int) -> LockInfo | int:
        res = _call(cmd, fd, type_, start, end)
        if isinstance(res, int):
            return res
        ltype, _whence, lstart, llen, lpid = _FLOCK.unpack(res)
        if ltype == F_UNLCK:
            return (F_UNLCK, 0, 0, 0)
        return (ltype, lstart, OFFSET_MAX if llen == 0 else lstart + llen - 1, lpid)

    def setlk(fd: int, type_: int, start: int, end: int) -> int:
        """F_OFD_SETLK: 0 or an errno."""
        return _set(_F_OFD_SETLK, fd, type_, start, end)

    def setlkw(fd: int, type_: int, start: int, end: int) -> int:
        """F_OFD_SETLKW: 0 or an errno. Fallback: cannot be woken by WAKE_SIGNAL."""
        return _set(_F_OFD_SETLKW, fd, type_, start, end)

    def getlk(fd: int, type_: int, start: int, end: int) -> LockInfo | int:
        """F_OFD_GETLK: the first conflicting lock, or (F_UNLCK, 0, 0, 0); errno on failure."""
        return _get(_F_OFD_GETLK, fd, type_, start, end)

    def posix_getlk(fd: int, type_: int, start: int, end: int) -> LockInfo | int:
        """Classic F_GETLK (reports the classic holder's pid); errno on failure."""
        return _get(fcntl.F_GETLK, fd, type_, start, end)

    def flock(fd: int, op: int) -> int:
        """flock(2): 0 or an errno. Fallback: cannot be woken by WAKE_SIGNAL."""
        try:
            fcntl.flock(fd, op)
        except OSError as e:
            return e.errno or errno.EIO
        except ValueError:
            return errno.EBADF
        return 0

    def install_wake_signal(signo: int) -> int:
        """Install a no-op handler (main thread only). Waits stay unwakeable: see above."""
        try:
            signal.signal(signo, lambda _signo, _frame: None)
        except (ValueError, OSError):
            return errno.EINVAL
        return 0

    def name_to_handle(fd: int) -> tuple[int, bytes] | None:
        """Not available without the native module."""
        return None

    def open_by_handle(mount_fd: int, handle_type: int, handle: bytes, flags: int) -> int:
        """Not available without the native module."""
        return -errno.ENOSYS


_FUSE_SUPER_MAGIC = 0x65735546
_libc = ctypes.CDLL(None, use_errno=True)


def on_fuse(fd: int) -> bool:
    """Is `fd` a file of a FUSE file system? Such a file system (a cluster mount) keeps
    its locks itself: the kernel's list of a description's locks (/proc/self/fdinfo)
    shows none of them."""
    buf = ctypes.create_string_buffer(120)  # struct statfs; f_type is its first field
    if _libc.fstatfs(fd, buf) != 0:
        return False
    return struct.unpack_from("l", buf)[0] & 0xFFFFFFFF == _FUSE_SUPER_MAGIC
