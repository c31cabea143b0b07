"""The passthrough filesystem on SOURCE.

Every inode the guest knows is an O_PATH fd (keyed by host (dev, ino), counted by the
guest's lookups); every open file is a real host fd. All name-based calls are *at()
calls relative to a parent O_PATH fd with a single path component, never following a
symlink, so nothing outside SOURCE can be reached: names with '/' are rejected, '..' at
the root resolves to the root itself, and symlink targets are returned as text for the
guest kernel to resolve inside the mount.

Methods raise OSError with the host's errno; the session turns that into the reply.
"""

from __future__ import annotations

import ctypes
import errno
import itertools
import os
import stat
import threading
from dataclasses import dataclass, field

from lockd import procfd

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fchownat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint, ctypes.c_uint, ctypes.c_int]
_libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


_libc.utimensat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.POINTER(_Timespec), ctypes.c_int]

AT_EMPTY_PATH = 0x1000
AT_SYMLINK_NOFOLLOW = 0x100
UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2
DT_UNKNOWN, DT_DIR, DT_REG, DT_LNK = 0, 4, 8, 10

# Guest open flags we never pass on: creation is done by create(), O_NOFOLLOW would refuse
# the /proc/self/fd re-open, O_DIRECT's alignment rules are the guest kernel's business.
_STRIP_OPEN = os.O_CREAT | os.O_EXCL | os.O_NOCTTY | os.O_NOFOLLOW | os.O_DIRECT


def _check(ret: int) -> None:
    if ret < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def _proc(fd: int) -> str:
    return procfd.path(fd)  # "/proc/self/fd/N", or relative to it inside a sandbox


def valid_name(name: bytes) -> bytes:
    """A single path component that creates/removes something: no '/', no '.' or '..'."""
    if not name or b"/" in name or name in (b".", b".."):
        raise OSError(errno.EINVAL, "bad name")
    if len(name) > 255:
        raise OSError(errno.ENAMETOOLONG, "name too long")
    return name


@dataclass(eq=False)
class Inode:
    nodeid: int
    fd: int  # O_PATH | O_NOFOLLOW
    dev: int
    ino: int
    fmt: int  # S_IFMT bits: the type never changes
    nlookup: int = 0
    nopen: int = 0  # open handles of the inode


@dataclass(eq=False)
class Handle:
    fd: int
    inode: Inode
    is_dir: bool = False
    entries: list[tuple[bytes, int, int]] | None = None  # dir snapshot (name, ino, type)
    lock: threading.Lock = field(default_factory=threading.Lock)


class Passthrough:
    def __init__(self, source: str) -> None:
        self.source = os.path.realpath(source)
        fd = os.open(self.source, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        st = os.fstat(fd)
        self.root = Inode(1, fd, st.st_dev, st.st_ino, stat.S_IFDIR, 1)
        self._inodes: dict[int, Inode] = {1: self.root}
        self._by_key: dict[tuple[int, int], Inode] = {(st.st_dev, st.st_ino): self.root}
        self._handles: dict[int, Handle] = {}
        self._lock = threading.Lock()
        self._next_node = itertools.count(2)
        self._next_fh = itertools.count(1)

    # ---- tables ----
    def inode(self, nodeid: int) -> Inode:
        ino = self._inodes.get(nodeid)
        if ino is None:
            raise OSError(errno.ESTALE, "unknown nodeid")
        return ino

    def handle(self, fh: int) -> Handle:
        h = self._handles.get(fh)
        if h is None:
            raise OSError(errno.EBADF, "unknown file handle")
        return h

    def _register(self, fd: int, st: os.stat_result) -> Inode:
        """Count one lookup of the inode open at `fd` (consumed: kept or closed)."""
        key = (st.st_dev, st.st_ino)
        with self._lock:
            node = self._by_key.get(key)
            if node is None:
                node = Inode(next(self._next_node), fd, st.st_dev, st.st_ino, stat.S_IFMT(st.st_mode))
                self._inodes[node.nodeid] = node
                self._by_key[key] = node
                fd = -1
            node.nlookup += 1
        if fd >= 0:
            os.close(fd)
        return node

    def _lookup_fd(self, parent: Inode, name: bytes) -> tuple[Inode, os.stat_result]:
        fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent.fd)
        try:
            st = os.fstat(fd)
        except BaseException:
            os.close(fd)
            raise
        return self._register(fd, st), st

    def lookup(self, parent_id: int, name: bytes) -> tuple[Inode, os.stat_result]:
        parent = self.inode(parent_id)
        if not name or b"/" in name:
            raise OSError(errno.EINVAL, "bad name")
        if len(name) > 255:
            raise OSError(errno.ENAMETOOLONG, "name too long")
        if name == b"." or (name == b".." and parent is self.root):
            # The root is its own parent: '..' never leaves SOURCE.
            with self._lock:
                parent.nlookup += 1
            return parent, os.fstat(parent.fd)
        return self._lookup_fd(parent, name)

    def forget(self, nodeid: int, n: int) -> None:
        with self._lock:
            node = self._inodes.get(nodeid)
            if node is None or node is self.root:
                return
            node.nlookup -= n
            if node.nlookup > 0:
                return
            del self._inodes[nodeid]
            self._by_key.pop((node.dev, node.ino), None)
        os.close(node.fd)

    # ---- attributes ----
    def getattr(self, nodeid: int, fh: int | None = None) -> os.stat_result:
        if fh is not None and fh in self._handles:
            return os.fstat(self._handles[fh].fd)
        return os.fstat(self.inode(nodeid).fd)

    def setattr(
        self,
        nodeid: int,
        *,
        fh: int | None = None,
        mode: int | None = None,
        uid: int | None = None,
        gid: int | None = None,
        size: int | None = None,
        atime: int | None = None,  # ns, UTIME_NOW or None (omit)
        mtime: int | None = None,
    ) -> os.stat_result:
        node = self.inode(nodeid)
        hfd = self._handles[fh].fd if fh is not None and fh in self._handles else None
        if mode is not None:
            if node.fmt == stat.S_IFLNK:
                raise OSError(errno.EOPNOTSUPP, "chmod on a symlink")
            os.chmod(_proc(node.fd), stat.S_IMODE(mode))
        if uid is not None or gid is not None:
            u = 0xFFFFFFFF if uid is None else uid
            g = 0xFFFFFFFF if gid is None else gid
            _check(_libc.fchownat(node.fd, b"", u, g, AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW))
        if size is not None:
            if hfd is not None:
                os.ftruncate(hfd, size)
            else:
                os.truncate(_proc(node.fd), size)
        if atime is not None or mtime is not None:
            ts = (_Timespec * 2)()
            for i, t in enumerate((atime, mtime)):
                if t is None:
                    ts[i].tv_sec, ts[i].tv_nsec = 0, UTIME_OMIT
                elif t == UTIME_NOW:
                    ts[i].tv_sec, ts[i].tv_nsec = 0, UTIME_NOW
                else:
                    ts[i].tv_sec, ts[i].tv_nsec = divmod(t, 1_000_000_000)
            _check(_libc.utimensat(node.fd, b"", ts, AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW))
        return os.fstat(node.fd)

    def readlink(self, nodeid: int) -> bytes:
        node = self.inode(nodeid)
        if node.fmt != stat.S_IFLNK:
            raise OSError(errno.EINVAL, "not a symlink")
        return os.readlink(b"", dir_fd=node.fd)

    def access(self, nodeid: int, mask: int, uid: int, gid: int) -> None:
        st = os.fstat(self.inode(nodeid).fd)
        if mask == os.F_OK:
            return
        if uid == 0:
            # root may do anything but execute a file nobody may execute.
            if mask & os.X_OK and not stat.S_ISDIR(st.st_mode) and not st.st_mode & 0o111:
                raise OSError(errno.EACCES, "no x bit")
            return
        if st.st_uid == uid:
            bits = (st.st_mode >> 6) & 7
        elif st.st_gid == gid:
            bits = (st.st_mode >> 3) & 7
        else:
            bits = st.st_mode & 7
        if mask & ~bits & 7:
            raise OSError(errno.EACCES, "permission denied")

    def statfs(self, nodeid: int) -> os.statvfs_result:
        s = os.fstatvfs(self.inode(nodeid).fd)
        if min(s) >= 0:
            return s
        # Python reads an all-ones count as -1 (CephFS reports free inodes as 2**64-1,
        # "unknown"): hand the kernel the unsigned value it gave.
        return os.statvfs_result(tuple(v & 0xFFFF_FFFF_FFFF_FFFF for v in s))

    # ---- namespace ----
    def _owner(self, parent: Inode, uid: int, gid: int) -> tuple[int, int]:
        """The owner a new file gets: the caller, or the parent's group under setgid."""
        pst = os.fstat(parent.fd)
        if pst.st_mode & stat.S_ISGID:
            gid = pst.st_gid
        return uid, gid

    def _chown_new(self, parent: Inode, name: bytes, uid: int, gid: int) -> None:
        u, g = self._owner(parent, uid, gid)
        if (u, g) != (os.geteuid(), os.getegid()):
            os.chown(name, u, g, dir_fd=parent.fd, follow_symlinks=False)

    def mknod(self, parent_id: int, name: bytes, mode: int, rdev: int, uid: int, gid: int):
        parent = self.inode(parent_id)
        os.mknod(valid_name(name), mode, rdev, dir_fd=parent.fd)
        self._chown_new(parent, name, uid, gid)
        return self._lookup_fd(parent, name)

    def mkdir(self, parent_id: int, name: bytes, mode: int, uid: int, gid: int):
        parent = self.inode(parent_id)
        os.mkdir(valid_name(name), mode, dir_fd=parent.fd)
        self._chown_new(parent, name, uid, gid)
        return self._lookup_fd(parent, name)

    def symlink(self, parent_id: int, name: bytes, target: bytes, uid: int, gid: int):
        parent = self.inode(parent_id)
        os.symlink(target, valid_name(name), dir_fd=parent.fd)
        self._chown_new(parent, name, uid, gid)
        return self._lookup_fd(parent, name)

    def link(self, nodeid: int, parent_id: int, name: bytes):
        node, parent = self.inode(nodeid), self.inode(parent_id)
        # linkat on the magic link: links the inode itself (a symlink stays a symlink).
        os.link(_proc(node.fd), valid_name(name), dst_dir_fd=parent.fd, follow_symlinks=True)
        return self._lookup_fd(parent, name)

    def unlink(self, parent_id: int, name: bytes) -> None:
        os.unlink(valid_name(name), dir_fd=self.inode(parent_id).fd)

    def rmdir(self, parent_id: int, name: bytes) -> None:
        os.rmdir(valid_name(name), dir_fd=self.inode(parent_id).fd)

    def rename(self, parent_id: int, old: bytes, newparent_id: int, new: bytes, flags: int = 0) -> None:
        src, dst = self.inode(parent_id), self.inode(newparent_id)
        valid_name(old), valid_name(new)
        if flags == 0:
            os.rename(old, new, src_dir_fd=src.fd, dst_dir_fd=dst.fd)
        else:
            _check(_libc.renameat2(src.fd, old, dst.fd, new, flags))

    # ---- files ----
    def _new_handle(self, fd: int, node: Inode, is_dir: bool = False) -> int:
        with self._lock:
            fh = next(self._next_fh)
            self._handles[fh] = Handle(fd, node, is_dir)
            node.nopen += 1
        return fh

    def fd_of(self, fh: int) -> int | None:
        """The descriptor of an open regular file's handle (None for anything else)."""
        h = self._handles.get(fh)
        if h is None or h.is_dir or h.inode.fmt != stat.S_IFREG:
            return None
        return h.fd

    def open(self, nodeid: int, flags: int) -> tuple[int, Handle]:
        node = self.inode(nodeid)
        if node.fmt == stat.S_IFLNK:
            raise OSError(errno.ELOOP, "open of a symlink")
        fd = os.open(_proc(node.fd), (flags & ~_STRIP_OPEN) | os.O_CLOEXEC)
        fh = self._new_handle(fd, node)
        return fh, self._handles[fh]

    def create(
        self, parent_id: int, name: bytes, flags: int, mode: int, uid: int, gid: int
    ) -> tuple[Inode, os.stat_result, int, Handle]:
        parent = self.inode(parent_id)
        name = valid_name(name)
        base = (flags & ~(os.O_NOCTTY | os.O_DIRECT | os.O_CREAT)) | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            # O_EXCL first so that only a file we really created gets the caller as owner.
            fd = os.open(name, base | os.O_CREAT | os.O_EXCL, mode, dir_fd=parent.fd)
            created = True
        except FileExistsError:
            if flags & os.O_EXCL:
                raise
            fd = os.open(name, base & ~os.O_EXCL, dir_fd=parent.fd)
            created = False
        try:
            if created:
                u, g = self._owner(parent, uid, gid)
                if (u, g) != (os.geteuid(), os.getegid()):
                    os.fchown(fd, u, g)
            node, st = self._lookup_fd(parent, name)
        except BaseException:
            os.close(fd)
            raise
        fh = self._new_handle(fd, node)
        return node, st, fh, self._handles[fh]

    def read(self, fh: int, offset: int, size: int) -> bytes:
        return os.pread(self.handle(fh).fd, size, offset)

    def write(self, fh: int, offset: int, data: bytes) -> int:
        return os.pwrite(self.handle(fh).fd, data, offset)

    def release(self, fh: int) -> Handle | None:
        """Close the handle; its inode's `nopen` then says whether it was the last."""
        with self._lock:
            h = self._handles.pop(fh, None)
            if h is None:
                return None
            h.inode.nopen -= 1
        os.close(h.fd)
        return h

    def fsync(self, fh: int, datasync: bool) -> None:
        fd = self.handle(fh).fd
        (os.fdatasync if datasync else os.fsync)(fd)

    def fallocate(self, fh: int, offset: int, length: int, mode: int) -> None:
        _check(_libc.fallocate(self.handle(fh).fd, mode, offset, length))

    def lseek(self, fh: int, offset: int, whence: int) -> int:
        return os.lseek(self.handle(fh).fd, offset, whence)

    # ---- directories ----
    def opendir(self, nodeid: int) -> int:
        node = self.inode(nodeid)
        fd = os.open(_proc(node.fd), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        return self._new_handle(fd, node, is_dir=True)

    def dir_entries(self, fh: int, offset: int) -> list[tuple[bytes, int, int]]:
        """The directory's entries as (name, ino, d_type); offset i+1 follows entry i.
        A read from offset 0 takes a fresh snapshot (opendir or rewinddir)."""
        h = self.handle(fh)
        with h.lock:
            if h.entries is None or offset == 0:
                st = os.fstat(h.fd)
                ents: list[tuple[bytes, int, int]] = [(b".", st.st_ino, DT_DIR), (b"..", st.st_ino, DT_DIR)]
                with os.scandir(h.fd) as it:
                    for e in it:
                        if e.is_dir(follow_symlinks=False):
                            t = DT_DIR
                        elif e.is_symlink():
                            t = DT_LNK
                        elif e.is_file(follow_symlinks=False):
                            t = DT_REG
                        else:
                            t = DT_UNKNOWN
                        ents.append((os.fsencode(e.name), e.inode(), t))
                h.entries = ents
            return h.entries

    def fsyncdir(self, fh: int, datasync: bool) -> None:
        self.fsync(fh, datasync)

    # ---- xattrs (through the magic link: O_PATH fds refuse f*xattr) ----
    def _xpath(self, nodeid: int) -> str:
        node = self.inode(nodeid)
        if node.fmt == stat.S_IFLNK:
            raise OSError(errno.EPERM, "no xattrs on symlinks")
        return _proc(node.fd)

    def getxattr(self, nodeid: int, name: bytes) -> bytes:
        if self.inode(nodeid).fmt == stat.S_IFLNK:
            raise OSError(errno.ENODATA, "no xattrs on symlinks")
        return os.getxattr(self._xpath(nodeid), name)

    def listxattr(self, nodeid: int) -> bytes:
        if self.inode(nodeid).fmt == stat.S_IFLNK:
            return b""
        names = os.listxattr(self._xpath(nodeid))
        return b"".join(os.fsencode(n) + b"\0" for n in names)

    def setxattr(self, nodeid: int, name: bytes, value: bytes, flags: int) -> None:
        os.setxattr(self._xpath(nodeid), name, value, flags)

    def removexattr(self, nodeid: int, name: bytes) -> None:
        os.removexattr(self._xpath(nodeid), name)

    def close(self) -> None:
        """Close every fd (the server is going away)."""
        with self._lock:
            for h in self._handles.values():
                os.close(h.fd)
            self._handles.clear()
            for node in self._inodes.values():
                os.close(node.fd)
            self._inodes.clear()
            self._by_key.clear()
