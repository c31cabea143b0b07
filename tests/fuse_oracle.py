"""The test side's own copy of the ABI the tests speak: the FUSE lock structs and header
(include/uapi/linux/fuse.h), `struct flock` (x86-64 glibc), and a probe of the host's
locks. Written from the kernel headers, not imported from lockd/ or fuse_server/, so that a
mistake in the server's ABI module shows up as a test failure instead of agreeing with
itself.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
from pathlib import Path

# ---------------------------------------------------------------- FUSE (fuse.h)
# fuse_in_header: len, opcode, unique, nodeid, uid, gid, pid, total_extlen, padding
IN_HEADER = struct.Struct("<IIQQIIIHH")
# fuse_out_header: len, error (negative errno), unique
OUT_HEADER = struct.Struct("<IiQ")
# fuse_file_lock: start, end (inclusive), type, pid
FILE_LOCK = struct.Struct("<QQII")
# fuse_lk_in: fh, owner, fuse_file_lock, lk_flags, padding
LK_IN = struct.Struct("<QQQQIII4x")
# fuse_lk_out: fuse_file_lock
LK_OUT = FILE_LOCK

GETLK, SETLK, SETLKW, INTERRUPT = 31, 32, 33, 36
LK_FLOCK = 1  # FUSE_LK_FLOCK in lk_flags: a flock(2) request, not a POSIX one
OFFSET_MAX = (1 << 63) - 1  # the kernel's "to the end of the file" end of a range

# ---------------------------------------------------------------- struct flock
# l_type, l_whence, l_start, l_len, l_pid (and the tail padding of the x86-64 layout)
FLOCK = struct.Struct("hhqqi4x")
F_OFD_GETLK, F_OFD_SETLK, F_OFD_SETLKW = 36, 37, 38


def flock(type_: int, start: int = 0, length: int = 0, whence: int = os.SEEK_SET,
          pid: int = 0) -> bytes:
    """A `struct flock` for fcntl(2): `length` 0 means to the end of the file."""
    return FLOCK.pack(type_, whence, start, length, pid)


def unflock(buf: bytes) -> tuple[int, int, int, int, int]:
    """(type, whence, start, length, pid) of a `struct flock` fcntl(2) gave back."""
    return FLOCK.unpack(buf)


# ---------------------------------------------------------------- the host's view
def host_can_lock(path: str | Path, start: int = 0, length: int = 10,
                  mode: str = "posix") -> bool:
    """Could another host process take an exclusive lock on [start, start+length) (length
    0: to the end of the file), or an exclusive flock with mode="flock", right now?

    Probed from this process on a description of its own: an OFD lock conflicts with
    every other description's OFD lock and every process's classic lock (this one's
    included), and a flock with every other description's, so the answer is what a
    separate process would get, without starting one. The probe's lock goes with the
    close."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if mode == "flock":
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        else:
            fcntl.fcntl(fd, F_OFD_SETLK, flock(fcntl.F_WRLCK, start, length))
        return True
    except OSError as exc:
        if exc.errno not in (errno.EAGAIN, errno.EACCES):
            raise
        return False
    finally:
        os.close(fd)
