"""Typed FUSE requests: one parser per opcode that has a body, and the reply encoders.
Every opcode, flag and struct layout comes from `lockd.fuse.abi` (re-exported here, so
`P.LOOKUP` and `P.ATTR` read as before).

The header and the lock-related bodies are decoded by `lockd.fuse.codec.CODEC` (the native
fast path); everything else is decoded here with the struct module. A body that is too
short raises `struct.error`/`ValueError`, which the session turns into EINVAL.
"""

from __future__ import annotations

import os
import struct

from lockd.fuse.abi import *  # noqa: F403 - the ABI's names, used as P.NAME
from lockd.structs import NamedTuple  # typing's, without importing typing


def align8(n: int) -> int:
    return (n + 7) & ~7


# --- typed requests: one per opcode that has a body beyond the header ---
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


def notify_inc_epoch() -> bytes:
    """FUSE_NOTIFY_INC_EPOCH: every name the guest looked up before it is stale."""
    return OUT_HEADER.pack(OUT_HEADER.size, NOTIFY_INC_EPOCH, 0)
