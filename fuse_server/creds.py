"""Creating a file system object with the guest caller's owner, atomically.

A new file, directory, node or symlink must belong to the guest's caller from the moment it
exists: chowning it afterwards by name would chown whatever a concurrent rename put under
that name. So the creating call runs with the caller's fsuid/fsgid, which the kernel stamps
on the new inode (and a setgid parent's group, as for any process).

setfsuid(2)/setfsgid(2) act on the calling thread only (glibc does not broadcast them), so
one worker switching does not touch the others. Leaving fsuid 0 also clears the file system
capabilities (CAP_DAC_OVERRIDE, CAP_FOWNER, ...) from the thread's effective set; they are
raised again for the duration of the call, so the host does not re-check the caller's
permissions with the server's supplementary groups (the guest kernel checked them with the
caller's own, FUSE `default_permissions`): only ownership changes, never what may be done.
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager

_libc = ctypes.CDLL(None, use_errno=True)
_libc.setfsuid.argtypes = [ctypes.c_uint]
_libc.setfsgid.argtypes = [ctypes.c_uint]
_CAP_V3 = 0x20080522  # _LINUX_CAPABILITY_VERSION_3: two data words
_QUERY = 0xFFFFFFFF  # setfs[ug]id(-1) changes nothing and returns the current id


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


_libc.capget.argtypes = [ctypes.POINTER(_CapHeader), ctypes.POINTER(_CapData)]
_libc.capset.argtypes = [ctypes.POINTER(_CapHeader), ctypes.POINTER(_CapData)]


def _raise_effective() -> None:
    """This thread's effective capabilities = its permitted ones (pid 0: this thread)."""
    hdr = _CapHeader(_CAP_V3, 0)
    data = (_CapData * 2)()
    if _libc.capget(ctypes.byref(hdr), data) < 0:
        e = ctypes.get_errno()
        raise OSError(e, f"capget: {os.strerror(e)}")
    for d in data:
        d.effective = d.permitted
    if _libc.capset(ctypes.byref(hdr), data) < 0:
        e = ctypes.get_errno()
        raise OSError(e, f"capset: {os.strerror(e)}")


def _set(fn, want: int) -> int:  # noqa: ANN001 - _libc.setfsuid or setfsgid
    """Switch this thread's fs id to `want`; the previous one. EINVAL when the kernel
    did not take it (-1, or an id with no mapping)."""
    before = fn(want)
    if fn(_QUERY) != want:
        fn(before)
        raise OSError(errno.EINVAL, f"cannot act as id {want}")
    return before


@contextmanager
def as_caller(uid: int, gid: int) -> Iterator[None]:
    """Within the block, objects this thread creates belong to uid:gid (see the module
    doc). Without root there is nothing to switch: objects belong to the server."""
    if os.geteuid() != 0 or (uid, gid) == (0, 0):
        yield
        return
    old_gid = _set(_libc.setfsgid, gid)
    try:
        old_uid = _set(_libc.setfsuid, uid)
        try:
            if uid != 0:
                _raise_effective()
            yield
        finally:
            _libc.setfsuid(old_uid)  # back to 0: the kernel restores the fs capabilities
    finally:
        _libc.setfsgid(old_gid)
