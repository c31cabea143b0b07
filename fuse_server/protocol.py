"""FUSE wire protocol (include/uapi/linux/fuse.h, 7.31 .. 7.38): opcodes, INIT flags,
struct layouts and one typed request per opcode.

The header and the lock-related bodies are decoded by `lockd.fuse.codec.CODEC` (the native
fast path); everything else is decoded here with the struct module. A body that is too
short raises `struct.error`/`ValueError`, which the session turns into EINVAL.
"""

from __future__ import annotations

import os
import struct
from typing import NamedTuple

# Protocol versions we speak: 7.31 (Linux 5.4) up to the header we were written against.
KERNEL_VERSION = 7
MIN_MINOR = 31
MAX_MINOR = 38

# --- opcodes (enum fuse_opcode) ---
LOOKUP = 1
FORGET = 2
GETATTR = 3
SETATTR = 4
READLINK = 5
SYMLINK = 6
MKNOD = 8
MKDIR = 9
UNLINK = 10
RMDIR = 11
RENAME = 12
LINK = 13
OPEN = 14
READ = 15
WRITE = 16
STATFS = 17
RELEASE = 18
FSYNC = 20
SETXATTR = 21
GETXATTR = 22
LISTXATTR = 23
REMOVEXATTR = 24
FLUSH = 25
INIT = 26
OPENDIR = 27
READDIR = 28
RELEASEDIR = 29
FSYNCDIR = 30
GETLK = 31
SETLK = 32
SETLKW = 33
ACCESS = 34
CREATE = 35
INTERRUPT = 36
BMAP = 37
DESTROY = 38
IOCTL = 39
POLL = 40
NOTIFY_REPLY = 41
BATCH_FORGET = 42
FALLOCATE = 43
READDIRPLUS = 44
RENAME2 = 45
LSEEK = 46
COPY_FILE_RANGE = 47

# --- INIT flags (fuse_init_in/out.flags; bits 32.. go in flags2 with INIT_EXT) ---
ASYNC_READ = 1 << 0
POSIX_LOCKS = 1 << 1
ATOMIC_O_TRUNC = 1 << 3
EXPORT_SUPPORT = 1 << 4
BIG_WRITES = 1 << 5
DONT_MASK = 1 << 6
FLOCK_LOCKS = 1 << 10
AUTO_INVAL_DATA = 1 << 12
DO_READDIRPLUS = 1 << 13
READDIRPLUS_AUTO = 1 << 14
ASYNC_DIO = 1 << 15
WRITEBACK_CACHE = 1 << 16
PARALLEL_DIROPS = 1 << 18
MAX_PAGES = 1 << 22
CACHE_SYMLINKS = 1 << 23
INIT_EXT = 1 << 30

# fuse_open_out.open_flags
FOPEN_DIRECT_IO = 1 << 0
FOPEN_KEEP_CACHE = 1 << 1
FOPEN_CACHE_DIR = 1 << 3

# fuse_setattr_in.valid
FATTR_MODE = 1 << 0
FATTR_UID = 1 << 1
FATTR_GID = 1 << 2
FATTR_SIZE = 1 << 3
FATTR_ATIME = 1 << 4
FATTR_MTIME = 1 << 5
FATTR_FH = 1 << 6
FATTR_ATIME_NOW = 1 << 7
FATTR_MTIME_NOW = 1 << 8
FATTR_LOCKOWNER = 1 << 9
FATTR_CTIME = 1 << 10

GETATTR_FH = 1 << 0
FSYNC_FDATASYNC = 1 << 0
LK_FLOCK = 1 << 0
RELEASE_FLUSH = 1 << 0
RELEASE_FLOCK_UNLOCK = 1 << 1
# The kernel marks an INTERRUPT request's own unique with this bit.
INT_REQ_BIT = 1

# Notifications (written with unique 0 and error = code).
NOTIFY_INVAL_INODE = 2
NOTIFY_INVAL_ENTRY = 3

ROOT_ID = 1

# --- struct layouts (little-endian, as the kernel lays them out on x86/arm) ---
IN_HEADER = struct.Struct("<IIQQIIIHH")  # 40
OUT_HEADER = struct.Struct("<IiQ")  # 16
# fuse_attr: ino size blocks atime mtime ctime, atimensec mtimensec ctimensec mode nlink
# uid gid rdev blksize flags
ATTR = struct.Struct("<QQQQQQIIIIIIIIII")  # 88
ENTRY_OUT = struct.Struct("<QQQQII")  # 40 + ATTR
ATTR_OUT = struct.Struct("<QII")  # 16 + ATTR
GETATTR_IN = struct.Struct("<IIQ")
SETATTR_IN = struct.Struct("<IIQQQQQQIIIIIIII")  # 88
OPEN_IN = struct.Struct("<II")
OPEN_OUT = struct.Struct("<QII")
CREATE_IN = struct.Struct("<IIII")
MKNOD_IN = struct.Struct("<IIII")
MKDIR_IN = struct.Struct("<II")
RENAME_IN = struct.Struct("<Q")
RENAME2_IN = struct.Struct("<QII")
LINK_IN = struct.Struct("<Q")
READ_IN = struct.Struct("<QQIIQII")  # 40
WRITE_IN = struct.Struct("<QQIIQII")  # 40
WRITE_OUT = struct.Struct("<II")
KSTATFS = struct.Struct("<QQQQQIIII24x")  # 80
FSYNC_IN = struct.Struct("<QII")
SETXATTR_IN = struct.Struct("<II")  # compat layout: we never negotiate SETXATTR_EXT
GETXATTR_IN = struct.Struct("<II")
GETXATTR_OUT = struct.Struct("<II")
ACCESS_IN = struct.Struct("<II")
INIT_IN = struct.Struct("<IIII")  # major minor max_readahead flags
INIT_IN_FLAGS2 = struct.Struct("<I")  # at offset 16 when INIT_EXT (7.36+)
INIT_OUT = struct.Struct("<IIIIHHIIHHI28x")  # 64
FORGET_IN = struct.Struct("<Q")
BATCH_FORGET_IN = struct.Struct("<II")
FORGET_ONE = struct.Struct("<QQ")
DIRENT = struct.Struct("<QQII")  # ino off namelen type, then the name padded to 8
FALLOCATE_IN = struct.Struct("<QQQII")
LSEEK_IN = struct.Struct("<QQII")
LSEEK_OUT = struct.Struct("<Q")
NOTIFY_INVAL_INODE_OUT = struct.Struct("<Qqq")
NOTIFY_INVAL_ENTRY_OUT = struct.Struct("<QII")

ENTRY_OUT_SIZE = ENTRY_OUT.size + ATTR.size  # 128
DIRENTPLUS_BASE = ENTRY_OUT_SIZE + DIRENT.size


def align8(n: int) -> int:
    return (n + 7) & ~7


# --- typed requests: one per opcode that has a body beyond the header ---
class Header(NamedTuple):
    opcode: int
    unique: int
    nodeid: int
    uid: int
    gid: int
    pid: int


class NameReq(NamedTuple):  # LOOKUP UNLINK RMDIR REMOVEXATTR
    name: bytes


class ForgetReq(NamedTuple):
    nlookup: int


class BatchForgetReq(NamedTuple):
    items: list[tuple[int, int]]  # (nodeid, nlookup)


class GetattrReq(NamedTuple):
    flags: int
    fh: int


class SetattrReq(NamedTuple):
    valid: int
    fh: int
    size: int
    atime: int
    mtime: int
    atimensec: int
    mtimensec: int
    mode: int
    uid: int
    gid: int


class SymlinkReq(NamedTuple):
    name: bytes
    target: bytes


class MknodReq(NamedTuple):
    mode: int
    rdev: int
    umask: int
    name: bytes


class MkdirReq(NamedTuple):
    mode: int
    umask: int
    name: bytes


class RenameReq(NamedTuple):
    newdir: int
    flags: int
    oldname: bytes
    newname: bytes


class LinkReq(NamedTuple):
    oldnodeid: int
    name: bytes


class OpenReq(NamedTuple):
    flags: int


class CreateReq(NamedTuple):
    flags: int
    mode: int
    umask: int
    name: bytes


class ReadReq(NamedTuple):
    fh: int
    offset: int
    size: int


class WriteReq(NamedTuple):
    fh: int
    offset: int
    data: bytes


class FsyncReq(NamedTuple):
    fh: int
    datasync: bool


class SetxattrReq(NamedTuple):
    flags: int
    name: bytes
    value: bytes


class GetxattrReq(NamedTuple):
    size: int
    name: bytes


class ListxattrReq(NamedTuple):
    size: int


class AccessReq(NamedTuple):
    mask: int


class InitReq(NamedTuple):
    major: int
    minor: int
    max_readahead: int
    flags: int  # flags | flags2 << 32


class FallocateReq(NamedTuple):
    fh: int
    offset: int
    length: int
    mode: int


class LseekReq(NamedTuple):
    fh: int
    offset: int
    whence: int


class FhReq(NamedTuple):  # RELEASEDIR FSYNCDIR-less forms
    fh: int


def _cstr(body: bytes | memoryview, start: int = 0) -> tuple[bytes, int]:
    """A NUL-terminated string at `start`; returns (string, offset after the NUL)."""
    raw = bytes(body[start:])
    end = raw.find(b"\0")
    if end < 0:
        raise ValueError("unterminated name")
    return raw[:end], start + end + 1


def p_name(b: bytes) -> NameReq:
    return NameReq(_cstr(b)[0])


def p_forget(b: bytes) -> ForgetReq:
    return ForgetReq(*FORGET_IN.unpack_from(b))


def p_batch_forget(b: bytes) -> BatchForgetReq:
    count, _ = BATCH_FORGET_IN.unpack_from(b)
    off = BATCH_FORGET_IN.size
    if count > (len(b) - off) // FORGET_ONE.size:
        raise ValueError("batch_forget count beyond body")
    items = [FORGET_ONE.unpack_from(b, off + i * FORGET_ONE.size) for i in range(count)]
    return BatchForgetReq(items)


def p_getattr(b: bytes) -> GetattrReq:
    if len(b) < GETATTR_IN.size:  # very old kernels sent no body
        return GetattrReq(0, 0)
    flags, _, fh = GETATTR_IN.unpack_from(b)
    return GetattrReq(flags, fh)


def p_setattr(b: bytes) -> SetattrReq:
    v = SETATTR_IN.unpack_from(b)
    # valid pad fh size lock_owner atime mtime ctime atimens mtimens ctimens mode u4 uid gid u5
    return SetattrReq(v[0], v[2], v[3], v[5], v[6], v[8], v[9], v[11], v[13], v[14])


def p_symlink(b: bytes) -> SymlinkReq:
    name, off = _cstr(b)
    target, _ = _cstr(b, off)
    return SymlinkReq(name, target)


def p_mknod(b: bytes) -> MknodReq:
    mode, rdev, umask, _ = MKNOD_IN.unpack_from(b)
    return MknodReq(mode, rdev, umask, _cstr(b, MKNOD_IN.size)[0])


def p_mkdir(b: bytes) -> MkdirReq:
    mode, umask = MKDIR_IN.unpack_from(b)
    return MkdirReq(mode, umask, _cstr(b, MKDIR_IN.size)[0])


def p_rename(b: bytes) -> RenameReq:
    (newdir,) = RENAME_IN.unpack_from(b)
    old, off = _cstr(b, RENAME_IN.size)
    return RenameReq(newdir, 0, old, _cstr(b, off)[0])


def p_rename2(b: bytes) -> RenameReq:
    newdir, flags, _ = RENAME2_IN.unpack_from(b)
    old, off = _cstr(b, RENAME2_IN.size)
    return RenameReq(newdir, flags, old, _cstr(b, off)[0])


def p_link(b: bytes) -> LinkReq:
    (old,) = LINK_IN.unpack_from(b)
    return LinkReq(old, _cstr(b, LINK_IN.size)[0])


def p_open(b: bytes) -> OpenReq:
    return OpenReq(OPEN_IN.unpack_from(b)[0])


def p_create(b: bytes) -> CreateReq:
    flags, mode, umask, _ = CREATE_IN.unpack_from(b)
    return CreateReq(flags, mode, umask, _cstr(b, CREATE_IN.size)[0])


def p_read(b: bytes) -> ReadReq:
    fh, offset, size = READ_IN.unpack_from(b)[:3]
    return ReadReq(fh, offset, size)


def p_write(b: bytes) -> WriteReq:
    fh, offset, size = WRITE_IN.unpack_from(b)[:3]
    data = b[WRITE_IN.size : WRITE_IN.size + size]
    if len(data) != size:
        raise ValueError("write body shorter than its size")
    return WriteReq(fh, offset, data)


def p_fsync(b: bytes) -> FsyncReq:
    fh, flags, _ = FSYNC_IN.unpack_from(b)
    return FsyncReq(fh, bool(flags & FSYNC_FDATASYNC))


def p_setxattr(b: bytes) -> SetxattrReq:
    size, flags = SETXATTR_IN.unpack_from(b)
    name, off = _cstr(b, SETXATTR_IN.size)
    value = bytes(b[off : off + size])
    if len(value) != size:
        raise ValueError("xattr value shorter than its size")
    return SetxattrReq(flags, name, value)


def p_getxattr(b: bytes) -> GetxattrReq:
    size, _ = GETXATTR_IN.unpack_from(b)
    return GetxattrReq(size, _cstr(b, GETXATTR_IN.size)[0])


def p_listxattr(b: bytes) -> ListxattrReq:
    return ListxattrReq(GETXATTR_IN.unpack_from(b)[0])


def p_access(b: bytes) -> AccessReq:
    return AccessReq(ACCESS_IN.unpack_from(b)[0])


def p_init(b: bytes) -> InitReq:
    major, minor, ra, flags = INIT_IN.unpack_from(b)
    # 7.36 added flags2 right after flags (and INIT_EXT to say it is there); an older
    # kernel's INIT_EXT bit means nothing.
    if minor < 36:
        flags &= ~INIT_EXT
    if flags & INIT_EXT and len(b) >= INIT_IN.size + INIT_IN_FLAGS2.size:
        flags |= INIT_IN_FLAGS2.unpack_from(b, INIT_IN.size)[0] << 32
    return InitReq(major, minor, ra, flags)


def p_fallocate(b: bytes) -> FallocateReq:
    fh, off, length, mode, _ = FALLOCATE_IN.unpack_from(b)
    return FallocateReq(fh, off, length, mode)


def p_lseek(b: bytes) -> LseekReq:
    fh, off, whence, _ = LSEEK_IN.unpack_from(b)
    return LseekReq(fh, off, whence)


def p_fh(b: bytes) -> FhReq:
    return FhReq(struct.unpack_from("<Q", b)[0])


def p_none(b: bytes) -> None:
    return None


# opcode -> body parser. Lock opcodes (GETLK/SETLK/SETLKW/INTERRUPT/FLUSH/RELEASE[DIR])
# are absent: the codec decodes those.
PARSERS = {
    LOOKUP: p_name,
    FORGET: p_forget,
    GETATTR: p_getattr,
    SETATTR: p_setattr,
    READLINK: p_none,
    SYMLINK: p_symlink,
    MKNOD: p_mknod,
    MKDIR: p_mkdir,
    UNLINK: p_name,
    RMDIR: p_name,
    RENAME: p_rename,
    LINK: p_link,
    OPEN: p_open,
    READ: p_read,
    WRITE: p_write,
    STATFS: p_none,
    FSYNC: p_fsync,
    SETXATTR: p_setxattr,
    GETXATTR: p_getxattr,
    LISTXATTR: p_listxattr,
    REMOVEXATTR: p_name,
    INIT: p_init,
    OPENDIR: p_open,
    READDIR: p_read,
    FSYNCDIR: p_fsync,
    ACCESS: p_access,
    CREATE: p_create,
    DESTROY: p_none,
    BATCH_FORGET: p_batch_forget,
    FALLOCATE: p_fallocate,
    READDIRPLUS: p_read,
    RENAME2: p_rename2,
    LSEEK: p_lseek,
}


# --- reply encoders ---
def pack_attr(st: os.stat_result) -> bytes:
    return ATTR.pack(
        st.st_ino,
        st.st_size,
        st.st_blocks,
        max(int(st.st_atime_ns // 1_000_000_000), 0),
        max(int(st.st_mtime_ns // 1_000_000_000), 0),
        max(int(st.st_ctime_ns // 1_000_000_000), 0),
        st.st_atime_ns % 1_000_000_000,
        st.st_mtime_ns % 1_000_000_000,
        st.st_ctime_ns % 1_000_000_000,
        st.st_mode,
        st.st_nlink & 0xFFFFFFFF,
        st.st_uid,
        st.st_gid,
        new_encode_dev(st.st_rdev),
        st.st_blksize,
        0,
    )


def new_encode_dev(dev: int) -> int:
    """The kernel's new_encode_dev (fuse_attr.rdev is a 32-bit encoded dev_t)."""
    major, minor = os.major(dev), os.minor(dev)
    return ((minor & 0xFF) | (major << 8) | ((minor & ~0xFF) << 12)) & 0xFFFFFFFF


def split_timeout(seconds: float) -> tuple[int, int]:
    s = int(seconds)
    return s, int((seconds - s) * 1e9)


def pack_entry(nodeid: int, st: os.stat_result, entry_timeout: float, attr_timeout: float) -> bytes:
    es, ens = split_timeout(entry_timeout)
    as_, ans = split_timeout(attr_timeout)
    return ENTRY_OUT.pack(nodeid, 0, es, as_, ens, ans) + pack_attr(st)


def pack_attr_out(st: os.stat_result, attr_timeout: float) -> bytes:
    s, ns = split_timeout(attr_timeout)
    return ATTR_OUT.pack(s, ns, 0) + pack_attr(st)


def pack_dirent(ino: int, off: int, dtype: int, name: bytes) -> bytes:
    rec = DIRENT.pack(ino, off, len(name), dtype) + name
    return rec + b"\0" * (align8(len(rec)) - len(rec))


# fuse_out_header + fuse_notify_inval_inode_out in one pack (sent on every lock grant).
_NOTIFY_INVAL_INODE = struct.Struct("<IiQQqq")


def notify_inval_inode(nodeid: int, offset: int = 0, length: int = -1) -> bytes:
    """FUSE_NOTIFY_INVAL_INODE: drop the guest's cached pages and attributes."""
    return _NOTIFY_INVAL_INODE.pack(_NOTIFY_INVAL_INODE.size, NOTIFY_INVAL_INODE, 0, nodeid,
                                    offset, length)
