"""The FUSE ABI as the Linux kernel defines it (include/uapi/linux/fuse.h, protocol 7.31
to 7.38, plus the optional 7.40 passthrough and 7.42 io_uring parts): every opcode, flag,
ioctl and struct layout this project uses, written once. A new kernel feature puts its
ABI here, not beside the feature.

The lock messages (fuse_lk_in, fuse_interrupt_in, fuse_flush_in, fuse_release_in) are
decoded by `lockd.fuse.codec`; the other request bodies by `fuse_server.protocol`; the
central daemon's wire protocol (`lockd.daemon.wire`) frames its lock requests as these
same messages. Layouts are little-endian, as the kernel lays them out on x86 and arm.
"""

from __future__ import annotations

import struct

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
POSIX_ACL = 1 << 20
MAX_PAGES = 1 << 22
CACHE_SYMLINKS = 1 << 23
# 7.33 (Linux 5.11): the server clears setuid/setgid and security.capability on write,
# truncate and chown, told by the flags below when the caller lacks CAP_FSETID; the
# guest then stops asking for security.capability before each buffered write.
HANDLE_KILLPRIV_V2 = 1 << 28
INIT_EXT = 1 << 30
# flags2 bit 4 (7.39, Linux 6.6, first named DIRECT_IO_RELAX): a file opened with
# FOPEN_DIRECT_IO may still be mmap'ed MAP_SHARED (else the guest's mmap says ENODEV).
DIRECT_IO_ALLOW_MMAP = 1 << 36
# flags2 bit 5 (7.40, Linux 6.9): OPEN replies may name a backing file (see
# fuse_server.backing); INIT_OUT's max_stack_depth then counts.
PASSTHROUGH = 1 << 37
# flags2 bit 9 (7.42, Linux 6.14): requests may come over io_uring (see
# fuse_server.transports.fuse_uring).
OVER_IO_URING = 1 << 41

# fuse_open_out.open_flags
FOPEN_DIRECT_IO = 1 << 0
FOPEN_KEEP_CACHE = 1 << 1
FOPEN_CACHE_DIR = 1 << 3
FOPEN_PASSTHROUGH = 1 << 7  # with fuse_open_out.backing_id

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
FATTR_KILL_SUIDGID = 1 << 11  # with HANDLE_KILLPRIV_V2: truncate by a caller without CAP_FSETID

# fuse_write_in.write_flags, fuse_open_in/fuse_create_in.open_flags (HANDLE_KILLPRIV_V2)
WRITE_KILL_SUIDGID = 1 << 2
OPEN_KILL_SUIDGID = 1 << 0  # an O_TRUNC open by a caller without CAP_FSETID

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
NOTIFY_INC_EPOCH = 8  # 7.44 (Linux 6.16): no payload
# The kernel minor that handles NOTIFY_INC_EPOCH (it is not negotiated: the kernel's own).
INC_EPOCH_MINOR = 44

ROOT_ID = 1

# --- struct layouts ---
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
# fuse_init_out as of 7.40: major minor max_readahead flags max_background
# congestion_threshold max_write time_gran max_pages map_alignment flags2
# max_stack_depth, then 6 unused u32. Older kernels read the same 64 bytes; before 7.40
# max_stack_depth is one of the unused words (we send 0 unless PASSTHROUGH is granted).
INIT_OUT = struct.Struct("<IIIIHHIIHHII24x")  # 64
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

# The lock messages.
LK_IN = struct.Struct("<QQQQIII4x")  # fh, owner, lk {start, end, type, pid}, lk_flags, pad
LK_OUT = struct.Struct("<QQII")  # fuse_file_lock: start, end (inclusive), type, pid
INTERRUPT_IN = struct.Struct("<Q")  # unique of the request to interrupt
FLUSH_IN = struct.Struct("<QIIQ")  # fh, unused, padding, lock_owner
RELEASE_IN = struct.Struct("<QIIQ")  # fh, flags, release_flags, lock_owner
IN_HEADER_SIZE = IN_HEADER.size  # 40
OUT_HEADER_SIZE = OUT_HEADER.size  # 16
# Where a transport that only peeks finds things (lockd.fuse.codec.unique_of, lk_type_of).
UNIQUE_OFFSET = 8  # fuse_in_header.unique and fuse_out_header.unique alike
IN_HEADER_START = struct.Struct("<IIQ")  # fuse_in_header's len, opcode, unique
OPCODE_OFFSET = 4  # fuse_in_header.opcode
LK_TYPE_OFFSET = IN_HEADER_SIZE + 32  # fuse_lk_in.lk.type (72)

# --- /dev/fuse ioctls (FUSE_DEV_IOC_*, magic 229) ---
BACKING_MAP = struct.Struct("<iIQ")  # struct fuse_backing_map {s32 fd; u32 flags; u64 pad}


def _dev_iow(nr: int, size: int) -> int:
    """_IOW(FUSE_DEV_IOC_MAGIC, nr, size)."""
    return (1 << 30) | (size << 16) | (229 << 8) | nr


DEV_IOC_BACKING_OPEN = _dev_iow(1, BACKING_MAP.size)  # returns the backing id
DEV_IOC_BACKING_CLOSE = _dev_iow(2, 4)  # the backing id (u32)

# --- FUSE over io_uring (7.42): struct fuse_uring_req_header and its commands ---
URING_CMD_REGISTER = 1  # FUSE_IO_URING_CMD_REGISTER
URING_CMD_COMMIT_AND_FETCH = 2  # FUSE_IO_URING_CMD_COMMIT_AND_FETCH
URING_HEADER_SIZE = 288  # in_out[128] op_in[128] ring_ent_in_out[32]
URING_OP_IN = 128  # offset of op_in
URING_PAYLOAD_SZ = 256 + 16  # offset of ring_ent_in_out.payload_sz
URING_CMD_REQ = struct.Struct("<QQH6x")  # fuse_uring_cmd_req: flags, commit_id, qid
