"""The passthrough filesystem on SOURCE.

Every inode the guest knows is an O_PATH fd (keyed by host (dev, ino), counted by the
guest's lookups); every open file is a real host fd. All name-based calls are *at()
calls relative to a parent O_PATH fd with a single path component, never following a
symlink, so nothing outside SOURCE can be reached: names with '/' are rejected, '..' at
the root resolves to the root itself, and symlink targets are returned as text for the
guest kernel to resolve inside the mount.

A directory the guest holds may be moved outside SOURCE on the host at any time; its
'..' then leads to the host's tree (a chroot does not stop that). So no name is resolved
under, nothing is created in, moved to or listed from a directory that is no longer
under SOURCE (ENOENT, as for a removed directory), and '..' answers only a directory that
is (see `_inside`: the kernel names the directory's path, and resolving that path beneath
SOURCE must lead back to it). What the guest already holds (the moved directory's
attributes, its open files) stays its own; nothing new is reached through it.

The guest is not trusted. Only regular files and directories are ever opened on the host
(as virtiofsd does): a device node would hand the guest the host's device, a FIFO blocks
open(2); a Linux guest handles its special files itself and never asks. New objects get the
caller's owner as they are created (fuse_server/creds.py), never by a chown of a name.

Methods raise OSError with the host's errno; the session turns that into the reply.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import itertools
import os
import stat
import threading

from fuse_server import creds, moves
from fuse_server.backing import BackingFiles
from fuse_server.fdtable import new_table, pack_entries, unpack_entries
from lockd import native, procfd

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
# the /proc/self/fd re-open, O_DIRECT's alignment rules are the guest kernel's business;
# O_PATH and O_TMPFILE (which would make an unnamed file in a directory) are not opens a
# guest kernel sends.
_O_TMPFILE_BIT = os.O_TMPFILE & ~os.O_DIRECTORY
_STRIP_OPEN = (os.O_CREAT | os.O_EXCL | os.O_NOCTTY | os.O_NOFOLLOW | os.O_DIRECT | os.O_PATH
               | _O_TMPFILE_BIT)
ACL_ACCESS = b"system.posix_acl_access"
ACL_DEFAULT = b"system.posix_acl_default"
ACL_NAMES = frozenset((ACL_ACCESS, ACL_DEFAULT))
_SETID = stat.S_ISUID | stat.S_ISGID


def _check(ret: int) -> None:
    if ret < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def _proc(fd: int) -> str:
    return procfd.path(fd)  # "/proc/self/fd/N", or relative to it inside a sandbox


def _openable(fmt: int) -> None:
    """Refuse, before any open(2), what must never be opened on the host."""
    if fmt == stat.S_IFLNK:
        raise OSError(errno.ELOOP, "open of a symlink")
    if fmt == stat.S_IFSOCK:
        # What open(2) of a socket answers on any Linux file system.
        raise OSError(errno.ENXIO, "a socket is not opened")
    if fmt != stat.S_IFREG and fmt != stat.S_IFDIR:
        # Device nodes and FIFOs are the guest kernel's to handle: EACCES, what a nodev
        # mount answers for a device node ("Permission denied", not virtiofsd's EBADF).
        raise OSError(errno.EACCES, "special files are never opened on the host")


# openat2(2) (Linux 5.6; one number on every architecture) and its struct open_how.
_SYS_OPENAT2 = 437
_RESOLVE_NO_XDEV, _RESOLVE_NO_SYMLINKS, _RESOLVE_BENEATH = 0x01, 0x04, 0x08
_MAX_WALK = 4096  # '..' steps before a directory counts as not under the share


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64),
                ("resolve", ctypes.c_uint64)]


_openat2 = ctypes.CFUNCTYPE(ctypes.c_long, ctypes.c_long, ctypes.c_int, ctypes.c_char_p,
                            ctypes.POINTER(_OpenHow), ctypes.c_size_t,
                            use_errno=True)(("syscall", _libc))


def _openat2_beneath_py(dir_fd: int, path: bytes, flags: int, resolve: int = 0) -> int:
    how = _OpenHow(flags | os.O_CLOEXEC, 0, _RESOLVE_BENEATH | _RESOLVE_NO_SYMLINKS | resolve)
    fd = _openat2(_SYS_OPENAT2, dir_fd, path, how, ctypes.sizeof(_OpenHow))
    return -ctypes.get_errno() if fd < 0 else fd


def _dir_under_root_py(link: bytes, root_fd: int, top: bytes, top_len: int, dev: int,
                       ino: int) -> int:
    """The reference of native vl_dir_under_root (vl_native.h): 1 if the directory named
    by the magic link `link` is the one its path, below `top`, leads to beneath root_fd,
    2 if so without crossing a mount; 0 if not; -errno if the link cannot be read."""
    try:
        path = os.readlink(link)
    except OSError as exc:
        return -(exc.errno or errno.EIO)
    if len(path) >= 4096:
        return -errno.ENAMETOOLONG
    if not path.startswith(top[:top_len]):
        return 0
    rel = path[top_len:] or b"."
    within = 2
    probe = _openat2_beneath_py(root_fd, rel, os.O_PATH | os.O_DIRECTORY, _RESOLVE_NO_XDEV)
    if probe == -errno.EXDEV:
        within = 1
        probe = _openat2_beneath_py(root_fd, rel, os.O_PATH | os.O_DIRECTORY)
    if probe < 0:
        return 0  # not there (moved, " (deleted)", or it leaves the share)
    try:
        st = os.fstat(probe)
    finally:
        os.close(probe)
    return within if (st.st_dev, st.st_ino) == (dev, ino) else 0


# The native ones when the extension is built (lockd.native), the same contract.
_OPENAT2_BENEATH = native.lib.vl_openat2_beneath if native.HAVE_NATIVE else _openat2_beneath_py
_DIR_UNDER_ROOT = native.lib.vl_dir_under_root if native.HAVE_NATIVE else _dir_under_root_py


def _openat2_beneath(dir_fd: int, path: bytes, flags: int) -> int:
    """openat2(dir_fd, path, flags) resolved strictly beneath dir_fd, no symlinks."""
    fd = _OPENAT2_BENEATH(dir_fd, path, flags)
    if fd < 0:
        raise OSError(-fd, os.strerror(-fd))
    return fd


def _have_openat2() -> bool:
    try:
        os.close(_openat2_beneath(-100, b".", os.O_PATH))
    except OSError:
        return False
    return True


def _stand_in() -> int:
    """A descriptor standing in for a file a migration lost: an anonymous empty file,
    so that nothing reaching it by mistake can touch a file of the share."""
    m = os.memfd_create("vfs-lockd-lost", os.MFD_CLOEXEC)
    try:
        return os.open(_proc(m), os.O_PATH | os.O_CLOEXEC)
    finally:
        os.close(m)


def _tracked_state(t: tuple[int, bool, bool, int]) -> list:
    """A migration state's form of the table's caching state of an inode (fdtable.py
    `tracked`): [parent, locked, lockdir, cached_until in monotonic seconds]."""
    parent, locked, lockdir, cached_ns = t
    return [parent, locked, lockdir, cached_ns / 1e9]


def valid_name(name: bytes) -> bytes:
    """A single path component that creates/removes something: no '/', no '.' or '..'."""
    if not name or b"/" in name or name in (b".", b".."):
        raise OSError(errno.EINVAL, "bad name")
    if len(name) > 255:
        raise OSError(errno.ENAMETOOLONG, "name too long")
    return name


class Inode:
    """What this side keeps of an inode; its lookup count and the index by host identity
    are the descriptor table's (fuse_server/fdtable.py), where native lookups count.
    (Inode and Handle are plain classes: importing dataclasses costs a back-end ~1 MiB.)"""

    def __init__(self, nodeid: int, fd: int, dev: int, ino: int, fmt: int, nopen: int = 0,
                 backing_id: int = 0, backing_users: int = 0, plain_users: int = 0,
                 no_backing: bool = False, lent: bool = False, lost: str = "") -> None:
        self.nodeid = nodeid
        self.fd = fd  # O_PATH | O_NOFOLLOW
        self.dev = dev
        self.ino = ino
        self.fmt = fmt  # S_IFMT bits: the type never changes
        self.nopen = nopen  # open handles of the inode
        # Passthrough (fuse_server/backing.py): the inode's backing id while
        # `backing_users` handles use it; `plain_users` handles are served by us. The
        # kernel refuses an inode open both ways at once, so one kind excludes the other.
        self.backing_id = backing_id
        self.backing_users = backing_users
        self.plain_users = plain_users
        self.no_backing = no_backing  # the kernel refused it (e.g. stacked too deep)
        # `fd` is, for now, the open file of one of its handles instead of an O_PATH (see
        # _lend): that handle gives it back (or closes it, once the inode is forgotten).
        self.lent = lent
        # (Cache state for a transport that cannot invalidate -- virtio-fs, cache auto --
        # is the descriptor table's: fdtable.py `first_lock`.)
        # A live migration without descriptors could not find it again (--migration-on-
        # error=guest-error): every request on it answers EIO; `fd` is a stand-in.
        self.lost = lost

    def __repr__(self) -> str:
        return f"Inode(nodeid={self.nodeid}, fd={self.fd}, dev={self.dev}, ino={self.ino})"


class Listing:
    """A directory handle's snapshot: packed as the table reads it (fdtable.pack_entries),
    its entries' count, and the entries as (name, ino, d_type), unpacked when the
    session needs one (a new inode in a READDIRPLUS, or no native table)."""

    __slots__ = ("packed", "count", "_entries")

    def __init__(self, packed: bytes, count: int,
                 entries: list[tuple[bytes, int, int]] | None = None) -> None:
        self.packed = packed
        self.count = count
        self._entries = entries

    def entries(self) -> list[tuple[bytes, int, int]]:
        if self._entries is None:
            self._entries = unpack_entries(self.packed)
        return self._entries


def _list_dir_py(fd: int, ino: int) -> Listing:
    """The reference of native vl_dir_list: "." and ".." (the directory's inode), then
    the directory's entries in the order the kernel gives them."""
    ents: list[tuple[bytes, int, int]] = [(b".", ino, DT_DIR), (b"..", ino, DT_DIR)]
    with os.scandir(fd) as it:
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
    return Listing(pack_entries(ents), len(ents), ents)


def _list_dir_native(fd: int, ino: int) -> Listing:
    ffi, lib = native.ffi, native.lib
    out, n, count = ffi.new("uint8_t **"), ffi.new("size_t *"), ffi.new("uint64_t *")
    r = lib.vl_dir_list(fd, ino, out, n, count)
    if r < 0:
        raise OSError(-r, os.strerror(-r))
    try:
        return Listing(ffi.buffer(out[0], n[0])[:], count[0])
    finally:
        lib.vl_free(out[0])


_LIST_DIR = _list_dir_native if native.HAVE_NATIVE else _list_dir_py


class Handle:
    def __init__(self, fd: int, inode: Inode, is_dir: bool = False,
                 backing_id: int = 0, lost: str = "") -> None:
        self.fd = fd
        self.inode = inode
        self.is_dir = is_dir
        # The table's snapshot of the directory as last read here, and its serial
        # (dir_entries: the table owns it; this saves the copy while it is the same).
        self.listing: Listing | None = None
        self.listing_serial = 0
        self.lock = threading.Lock()
        self.backing_id = backing_id  # > 0: opened for passthrough with this backing id
        self.lost = lost  # not reopened after a migration (see Inode.lost): EIO

    def __repr__(self) -> str:
        return f"Handle(fd={self.fd}, inode={self.inode!r}, is_dir={self.is_dir})"


class Passthrough:
    # How `_inside` checks: by the kernel's path of a directory (openat2), else, on
    # kernels before 5.6, by walking '..' to the share's root.
    by_path: bool = _have_openat2()

    def __init__(self, source: str) -> None:
        self.source = os.path.realpath(source)
        fd = os.open(self.source, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        st = os.fstat(fd)
        self.root = Inode(1, fd, st.st_dev, st.st_ino, stat.S_IFDIR)
        self._top: bytes | None = None  # the share's path as /proc names it, plus "/"
        self._inodes: dict[int, Inode] = {1: self.root}
        self._handles: dict[int, Handle] = {}
        self._lock = threading.Lock()
        self._next_node = itertools.count(2)
        # Set by the session when the transport can pass files through (/dev/fuse).
        self.backing: BackingFiles | None = None
        # Every inode and handle is published there (the native fast path finds their
        # descriptors), and their descriptors are closed through it (fdtable.py).
        self.table = new_table()
        self.table.put_inode(1, fd, st.st_dev, st.st_ino, stat.S_IFDIR, 1)
        if self.by_path:
            self.table.set_moves(moves.for_share(fd))

    # ---- tables ----
    def inode(self, nodeid: int) -> Inode:
        ino = self._inodes.get(nodeid)
        if ino is None:
            raise OSError(errno.ESTALE, "unknown nodeid")
        if ino.lost:
            raise OSError(errno.EIO, ino.lost)
        return ino

    def known(self, nodeid: int) -> Inode | None:
        """The inode, or None when the guest has forgotten it (no exception)."""
        return self._inodes.get(nodeid)

    def handle(self, fh: int) -> Handle:
        h = self._find(fh)
        if h is None:
            raise OSError(errno.EBADF, "unknown file handle")
        if h.lost:
            raise OSError(errno.EIO, h.lost)
        return h

    def _register(self, fd: int, st: os.stat_result) -> Inode:
        """Count one lookup of the inode open at `fd` (consumed: kept or closed). A new
        inode is made here, under our lock, so the table finds by identity only inodes
        this side has (the native LOOKUP counts those, never makes one)."""
        with self._lock:
            node = self._inodes.get(self.table.ref_key(st.st_dev, st.st_ino))
            if node is None:
                fmt = stat.S_IFMT(st.st_mode)
                node = Inode(next(self._next_node), fd, st.st_dev, st.st_ino, fmt)
                # Ours before the table's: a native LOOKUP may answer with it as soon as
                # the table has it, and the guest may then ask us about it.
                self._inodes[node.nodeid] = node
                try:
                    self.table.put_inode(node.nodeid, fd, st.st_dev, st.st_ino, fmt, 1)
                except BaseException:
                    del self._inodes[node.nodeid]
                    raise
                fd = -1
        if fd >= 0:
            os.close(fd)
        return node

    def _inside(self, node: Inode) -> Inode:
        """`node`, if it is still under the share; else ENOENT (see the module doc)."""
        if node is self.root:
            return node
        if node.fmt != stat.S_IFDIR:
            raise OSError(errno.ENOTDIR, "not a directory")
        known, count = self.table.beneath(node.nodeid)  # (moves.py)
        if known:
            return node
        below = (self._under_root(node.fd, (node.dev, node.ino)) if self.by_path
                 else self._walks_to_root(node.fd))
        if not below:
            raise OSError(errno.ENOENT, "directory moved outside the share")
        if below == 2:
            self.table.beneath_seen(node.nodeid, count)
        return node

    def _under_root(self, fd: int, key: tuple[int, int]) -> int:
        """Is directory `fd` under the share? Its path as the kernel names it, resolved
        beneath the share's root, must be that very directory (a directory has one
        name). Constant cost whatever the depth: the kernel walks, not us. 2: yes,
        within the share's mount (fuse_server/moves.py); 1: yes; 0: no."""
        link = _proc(fd).encode()
        for fresh in (False, True):  # the share's own path, as last seen, then again
            if fresh or self._top is None:
                top = os.readlink(_proc(self.root.fd).encode()).rstrip(b"/") + b"/"
                if top != self._top:
                    self._top = top
                    self.table.set_share(top)  # for the native LOOKUP
            # (a chroot's or namespace's "/" is every path's prefix: resolved below)
            verdict = _DIR_UNDER_ROOT(link, self.root.fd, self._top, len(self._top), *key)
            if verdict == -errno.ENAMETOOLONG:
                return int(self._walks_to_root(fd))
            if verdict < 0:
                raise OSError(-verdict, os.strerror(-verdict))
            if verdict:
                return verdict
        return 0

    def native_lookups(self) -> bool:
        """Readies the table for LOOKUPs answered natively (vl_serve.c), which check a
        directory as `_under_root` does; False where that check is not ours (no
        openat2: '..' is walked)."""
        if not self.by_path:
            return False
        if self._top is None:
            self._top = os.readlink(_proc(self.root.fd).encode()).rstrip(b"/") + b"/"
            self.table.set_share(self._top)
        return True

    def _walks_to_root(self, fd: int) -> bool:
        """Does '..' from directory `fd` reach the share's root (and not the host's)?"""
        root = (self.root.dev, self.root.ino)
        st = os.fstat(fd)
        cur = -1
        try:
            for _ in range(_MAX_WALK):
                if (st.st_dev, st.st_ino) == root:
                    return True
                up = os.open("..", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC,
                             dir_fd=fd if cur < 0 else cur)
                if cur >= 0:
                    os.close(cur)
                cur = up
                prev, st = st, os.fstat(cur)
                if (st.st_dev, st.st_ino) == (prev.st_dev, prev.st_ino):
                    return False  # the top of the host's tree (or of a chroot)
            return False
        finally:
            if cur >= 0:
                os.close(cur)

    def below_share(self, node: Inode) -> bool:
        """Is directory `node` still below the share (`_inside`, without raising)?"""
        try:
            self._inside(node)
        except OSError:
            return False
        return True

    def _dir(self, nodeid: int) -> Inode:
        """The directory `nodeid`, to resolve a name in: under the share, or ENOENT."""
        return self._inside(self.inode(nodeid))

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
        self._inside(parent)
        if name == b"." or (name == b".." and parent is self.root):
            # The root is its own parent: '..' never leaves SOURCE.
            self.table.ref(parent.nodeid, 1)
            return parent, os.fstat(parent.fd)
        if name == b"..":
            # Only to a directory still under the share (the parent was, a moment ago).
            node, st = self._lookup_fd(parent, name)
            try:
                self._inside(node)
            except OSError:
                self.forget(node.nodeid, 1)
                raise
            return node, st
        return self._lookup_fd(parent, name)

    def forget(self, nodeid: int, n: int) -> None:
        with self._lock:
            node = self._inodes.get(nodeid)
            if node is None or node is self.root:
                return
            if self.table.ref(nodeid, -min(n, 1 << 62)) > 0:
                return
            del self._inodes[nodeid]
            # A lent descriptor is closed by the handle that has it (release).
            self.table.drop_inode(nodeid, node.fd, close=not node.lent)

    # ---- attributes ----
    def _handle_of(self, node: Inode, fh: int | None) -> Handle | None:
        """The handle `fh` if it is one of `node`'s (a guest may name any handle)."""
        h = self._find(fh) if fh is not None else None
        return h if h is not None and h.inode is node and not h.lost else None

    def getattr(self, nodeid: int, fh: int | None = None) -> os.stat_result:
        node = self.inode(nodeid)
        h = self._handle_of(node, fh)
        return os.fstat(h.fd if h is not None else node.fd)

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
        writer_gid: int | None = None,
    ) -> os.stat_result:
        """`writer_gid`: a truncation or chown that clears setuid/setgid as the host
        would for that caller (drop_setid; None: only what the host itself does)."""
        node = self.inode(nodeid)
        h = self._handle_of(node, fh)
        kill = writer_gid is not None and (size is not None or uid is not None
                                           or gid is not None)
        before = os.fstat(node.fd) if kill else None
        if size is not None and node.fmt != stat.S_IFREG:
            # Only a regular file has a size to set (and nothing else is opened for it).
            raise OSError(errno.EISDIR if node.fmt == stat.S_IFDIR else errno.EINVAL,
                          "truncate of a non-regular file")
        if mode is not None:
            if node.fmt == stat.S_IFLNK:
                raise OSError(errno.EOPNOTSUPP, "chmod on a symlink")
            os.chmod(_proc(node.fd), stat.S_IMODE(mode))
        if uid is not None or gid is not None:
            u = 0xFFFFFFFF if uid is None else uid
            g = 0xFFFFFFFF if gid is None else gid
            _check(_libc.fchownat(node.fd, b"", u, g, AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW))
        if size is not None:
            if h is not None and not h.is_dir:
                os.ftruncate(h.fd, size)
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
        if kill:
            self.drop_setid(node.fd, writer_gid, before)
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
    # Each creating call runs as the caller (creds.as_caller): the object is theirs (with a
    # setgid parent's group) from the instant it exists, so no rename can make us chown
    # another file. The entry returned is looked up by name afterwards, like a LOOKUP.
    def device_nodes_inert(self, parent: Inode) -> bool:
        """Is the file system under `parent` mounted nodev (its device nodes open nothing)?"""
        return bool(os.fstatvfs(parent.fd).f_flag & os.ST_NODEV)

    def mknod(self, parent_id: int, name: bytes, mode: int, rdev: int, uid: int, gid: int):
        parent = self._dir(parent_id)
        name = valid_name(name)
        if (stat.S_ISCHR(mode) or stat.S_ISBLK(mode)) and rdev != 0 \
                and not self.device_nodes_inert(parent):
            # We never open device nodes, but a host process could open one a guest made
            # (any major:minor, any mode): only where the host ignores them (a nodev
            # mount). 0:0 is overlayfs's whiteout, no device.
            raise OSError(errno.EPERM, "device nodes only on a nodev share")
        with creds.as_caller(uid, gid):
            os.mknod(name, mode, rdev, dir_fd=parent.fd)
        return self._lookup_fd(parent, name)

    def mkdir(self, parent_id: int, name: bytes, mode: int, uid: int, gid: int):
        parent = self._dir(parent_id)
        name = valid_name(name)
        with creds.as_caller(uid, gid):
            os.mkdir(name, mode, dir_fd=parent.fd)
        return self._lookup_fd(parent, name)

    def symlink(self, parent_id: int, name: bytes, target: bytes, uid: int, gid: int):
        parent = self._dir(parent_id)
        name = valid_name(name)
        with creds.as_caller(uid, gid):
            os.symlink(target, name, dir_fd=parent.fd)
        return self._lookup_fd(parent, name)

    def link(self, nodeid: int, parent_id: int, name: bytes):
        node, parent = self.inode(nodeid), self._dir(parent_id)
        # linkat on the magic link: links the inode itself (a symlink stays a symlink).
        os.link(_proc(node.fd), valid_name(name), dst_dir_fd=parent.fd, follow_symlinks=True)
        return self._lookup_fd(parent, name)

    def unlink(self, parent_id: int, name: bytes) -> None:
        os.unlink(valid_name(name), dir_fd=self._dir(parent_id).fd)

    def rmdir(self, parent_id: int, name: bytes) -> None:
        os.rmdir(valid_name(name), dir_fd=self._dir(parent_id).fd)

    def rename(self, parent_id: int, old: bytes, newparent_id: int, new: bytes, flags: int = 0) -> None:
        src, dst = self._dir(parent_id), self._dir(newparent_id)
        valid_name(old), valid_name(new)
        if flags == 0:
            os.rename(old, new, src_dir_fd=src.fd, dst_dir_fd=dst.fd)
        else:
            _check(_libc.renameat2(src.fd, old, dst.fd, new, flags))

    # ---- files ----
    def _new_handle(self, fd: int, node: Inode, is_dir: bool = False,
                    flags: int = 0) -> int:
        h = Handle(fd, node, is_dir)
        with self._lock:
            fh = self.table.new_fh()
            self._handles[fh] = h
            node.nopen += 1
            if not is_dir:
                self._lend(h)
                self._choose_backing(h, flags)
            self.table.put_handle(fh, h.fd, node.nodeid, is_dir, False)
        return fh

    def _lend(self, h: Handle) -> None:
        """One descriptor per open file, not two (issue 23 item 6): the first handle of
        a regular file's inode takes the place of the inode's O_PATH descriptor, at the
        same number (dup3 replaces it atomically: a request using `node.fd` meanwhile
        sees the same inode either way, and every use of it - fstat, *at with
        AT_EMPTY_PATH, /proc/self/fd reopen, xattrs by that path - works on an open file
        too). Under self._lock; `release` gives the number its O_PATH back."""
        node = h.inode
        if node.lent or node.fmt != stat.S_IFREG or self._inodes.get(node.nodeid) is not node:
            return
        os.dup2(h.fd, node.fd, inheritable=False)
        os.close(h.fd)
        h.fd = node.fd
        node.lent = True

    def _give_back(self, h: Handle) -> bool:
        """Under self._lock, for a handle being released: True when its descriptor is
        still the inode's (`_lend`) and must not be closed. The inode gets an O_PATH at
        that number again; if none can be opened (a full table), it keeps the open file."""
        node = h.inode
        if not node.lent or h.fd != node.fd:
            return False
        node.lent = False
        if self._inodes.get(node.nodeid) is not node:
            return False  # forgotten meanwhile: the descriptor is the handle's to close
        try:
            opath = os.open(_proc(node.fd), os.O_PATH | os.O_CLOEXEC)
        except OSError:
            return True
        os.dup2(opath, node.fd, inheritable=False)
        os.close(opath)
        return True

    def _choose_backing(self, h: Handle, flags: int) -> None:
        """Passthrough or not for a new file handle (under self._lock: one backing id per
        inode, and never both kinds of handle at once, as the kernel requires)."""
        node = h.inode
        files = self.backing
        if node.backing_users:
            h.backing_id = node.backing_id
        elif (files is not None and files.enabled and not node.plain_users
              and not node.no_backing and not flags & os.O_DIRECT
              and not os.fstat(h.fd).st_mode & _SETID):
            # Served by us instead: O_DIRECT (as before, with no alignment rules), and
            # setuid/setgid files, whose bits a write by a user must clear as on the host
            # (drop_setid: the guest kernel clears setgid only with group execute).
            # Either one only while the inode is not open for passthrough already.
            h.backing_id = node.backing_id = files.open(h.fd)
            node.no_backing = h.backing_id == 0
        if h.backing_id:
            node.backing_users += 1
        else:
            node.plain_users += 1

    def _find(self, fh: int) -> Handle | None:
        """Handle fh: ours, or one the native fast path opened (OPENDIR), adopted now,
        the first time the session needs it."""
        h = self._handles.get(fh)
        if h is None and self.table.native is not None:
            with self._lock:
                h = self._handles.get(fh) or self._adopt(fh)
        return h

    def _adopt(self, fh: int, keep: bool = True) -> Handle | None:
        """Under self._lock: a natively opened directory handle made ours (kept in
        `_handles` unless `keep` is False: being released), or None. One whose inode the
        guest has forgotten meanwhile (which a kernel never does while it is open) is
        closed: EBADF from then on."""
        got = self.table.adopt(fh)
        if got is None:
            return None
        fd, nodeid = got
        node = self._inodes.get(nodeid)
        if node is None:
            self.table.drop_handle(fh, fd, close=True)
            return None
        h = Handle(fd, node, is_dir=True)
        node.nopen += 1
        if keep:
            self._handles[fh] = h
        return h

    def _adopt_all(self) -> None:
        """Under self._lock: every natively opened handle made ours (before they are
        saved or closed)."""
        for fh in self.table.native_handles():
            self._adopt(fh)

    def fd_of(self, fh: int, nodeid: int | None = None) -> int | None:
        """The descriptor of an open regular file's handle (None for anything else, and
        for a handle of another inode than `nodeid` when it is given)."""
        h = self._handles.get(fh)
        if h is None or h.lost or h.is_dir or h.inode.fmt != stat.S_IFREG:
            return None
        if nodeid is not None and h.inode.nodeid != nodeid:
            return None
        return h.fd

    def nodeid_of(self, fh: int) -> int | None:
        """The inode a handle was opened for (None: no such handle)."""
        h = self._find(fh)
        return None if h is None else h.inode.nodeid

    @staticmethod
    def drop_setid(fd: int, writer_gid: int | None, before: os.stat_result | None = None
                   ) -> None:
        """What the host does when a file is written, truncated or chowned by a caller
        without CAP_FSETID (`writer_gid`: its group; None for a caller who has it, and
        then nothing changes here): clear setuid, and setgid where group execute is set
        or the caller is not in the file's group (only its primary group is known here).
        We write as root, so the host keeps them; with direct I/O no guest kernel clears
        them either. `before`: the file as it was before the change (a chown judges the
        old group, as the host does). security.capability needs nothing: the host
        removes it on our own pwrite/truncate/chown, root's included. `fd` may be O_PATH."""
        if writer_gid is None:
            return
        st = os.fstat(fd)
        was = st if before is None else before
        kill = was.st_mode & stat.S_ISUID
        if was.st_mode & stat.S_IXGRP or was.st_gid != writer_gid:
            kill |= was.st_mode & stat.S_ISGID
        kill &= st.st_mode  # (what the host's chown cleared already)
        if kill and stat.S_ISREG(st.st_mode):
            try:
                os.fchmod(fd, stat.S_IMODE(st.st_mode) & ~kill)
            except OSError as exc:
                if exc.errno != errno.EBADF:
                    raise
                os.chmod(_proc(fd), stat.S_IMODE(st.st_mode) & ~kill)  # O_PATH

    def open(self, nodeid: int, flags: int, writer_gid: int | None = None
             ) -> tuple[int, Handle]:
        node = self.inode(nodeid)
        _openable(node.fmt)  # the inode's type never changes: this is what we reopen
        fd = os.open(_proc(node.fd), (flags & ~_STRIP_OPEN) | os.O_CLOEXEC)
        if flags & os.O_TRUNC:
            try:
                self.drop_setid(fd, writer_gid)
            except BaseException:
                os.close(fd)
                raise
        fh = self._new_handle(fd, node, flags=flags)
        return fh, self._handles[fh]

    def create(
        self, parent_id: int, name: bytes, flags: int, mode: int, uid: int, gid: int,
        writer_gid: int | None = None,
    ) -> tuple[Inode, os.stat_result, int, Handle]:
        parent = self._dir(parent_id)
        name = valid_name(name)
        base = (flags & ~_STRIP_OPEN) | os.O_CLOEXEC
        try:
            # O_EXCL first, as the caller: only a file we really create is theirs.
            with creds.as_caller(uid, gid):
                fd = os.open(name, base | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode,
                             dir_fd=parent.fd)
        except FileExistsError:
            if flags & os.O_EXCL:
                raise
            fd = -1
        pfd = -1
        try:
            if fd < 0:
                # The name exists (created meanwhile): never open(2) it by name, it may be
                # a FIFO or a device node. Pin it, check its type, reopen what was pinned.
                pfd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC,
                              dir_fd=parent.fd)
            else:
                pfd = os.open(_proc(fd), os.O_PATH | os.O_CLOEXEC)  # the file we created
            st = os.fstat(pfd)
            if fd < 0:
                if stat.S_ISDIR(st.st_mode):
                    raise OSError(errno.EISDIR, "create of a directory's name")
                _openable(stat.S_IFMT(st.st_mode))
                fd = os.open(_proc(pfd), base, 0)
                if flags & os.O_TRUNC:
                    self.drop_setid(fd, writer_gid)
                st = os.fstat(fd)  # as opened (O_TRUNC)
        except BaseException:
            for d in (pfd, fd):
                if d >= 0:
                    os.close(d)
            raise
        node = self._register(pfd, st)  # the inode of `fd`, not whatever the name is now
        fh = self._new_handle(fd, node, flags=flags)
        return node, st, fh, self._handles[fh]

    def read(self, fh: int, offset: int, size: int) -> bytes:
        return os.pread(self.handle(fh).fd, size, offset)

    def write(self, fh: int, offset: int, data: bytes, writer_gid: int | None = None) -> int:
        fd = self.handle(fh).fd
        n = os.pwrite(fd, data, offset)
        if n:
            self.drop_setid(fd, writer_gid)
        return n

    def release(self, fh: int) -> Handle | None:
        """Close the handle; its inode's `nopen` then says whether it was the last."""
        forget = 0
        with self._lock:
            h = self._handles.pop(fh, None) or self._adopt(fh, keep=False)
            if h is None:
                return None
            node = h.inode
            node.nopen -= 1
            if h.backing_id:
                node.backing_users -= 1
                if not node.backing_users:
                    forget, node.backing_id = node.backing_id, 0
            elif not h.is_dir:
                node.plain_users -= 1
            kept = self._give_back(h)
            self.table.drop_handle(fh, h.fd, close=not kept)
        if forget and self.backing is not None:
            # The kernel dropped the inode's backing file when its last passthrough file
            # closed (before this RELEASE was sent); the id is ours to forget.
            self.backing.close(forget)
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
        if node.fmt != stat.S_IFDIR:
            raise OSError(errno.ENOTDIR, "opendir of a non-directory")
        self._inside(node)
        fd = os.open(_proc(node.fd), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        return self._new_handle(fd, node, is_dir=True)

    def dir_entries(self, fh: int, offset: int) -> Listing:
        """The directory's listing; offset i+1 follows entry i. A read from offset 0
        takes a fresh snapshot (opendir or rewinddir), kept by the table, where the fast
        path's READDIRs take and read snapshots too."""
        h = self.handle(fh)
        if not h.is_dir:
            raise OSError(errno.ENOTDIR, "readdir of a file handle")
        with h.lock:
            serial, got = (0, None) if offset == 0 else self.table.listing(fh, h.listing_serial)
            if offset == 0 or (serial == 0 and h.listing is None):  # (else one not kept)
                self._inside(h.inode)  # no listing of a directory that left the share
                listing = _LIST_DIR(h.fd, os.fstat(h.fd).st_ino)
                serial = self.table.set_listing(fh, listing.packed, listing.count)
                h.listing, h.listing_serial = listing, serial
            elif got is not None:
                h.listing, h.listing_serial = Listing(*got), serial
            return h.listing

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

    # ---- POSIX ACLs (the system.posix_acl_* xattrs) ----
    def acl_supported(self) -> bool:
        """Does the share's file system keep POSIX ACLs?"""
        try:
            os.getxattr(_proc(self.root.fd), ACL_ACCESS)
        except OSError as exc:
            if exc.errno == errno.ENODATA:
                return True
            if exc.errno in (errno.EOPNOTSUPP, errno.ENOTSUP):
                return False
            raise
        return True

    def has_default_acl(self, nodeid: int) -> bool:
        """Does directory `nodeid` carry a default ACL (new objects inherit it)?"""
        node = self.inode(nodeid)
        if node.fmt != stat.S_IFDIR:
            return False
        try:
            return bool(os.getxattr(_proc(node.fd), ACL_DEFAULT))
        except OSError as exc:
            if exc.errno in (errno.ENODATA, errno.EOPNOTSUPP):
                return False
            raise

    # ---- live migration (fuse_server/migration.py) ----
    def save_state(self, table) -> dict:  # noqa: ANN001 - a migration.FdTable
        """The inodes the guest knows and its handles; their descriptors go into
        `table` (a lent inode descriptor is its handle's: one entry)."""
        with self._lock:
            self._adopt_all()
            count, tracked = self.table.nlookup, self.table.tracked
            inodes = [[n.nodeid, table.add(n.fd), n.fmt, count(n.nodeid),
                       *_tracked_state(tracked(n.nodeid))]
                      for n in self._inodes.values() if n.nodeid != 1]
            handles = [[fh, table.add(h.fd), h.inode.nodeid, h.is_dir]
                       for fh, h in self._handles.items()]
            return {"root_nlookup": count(1), "inodes": inodes, "handles": handles}

    def load_state(self, st: dict, rx) -> None:  # noqa: ANN001 - a migration.Received
        """Take over what save_state described, with the descriptors received."""
        with self._lock:
            if len(self._inodes) > 1 or self._handles:
                raise OSError(errno.EBUSY, "the file system already has inodes")
            looked = {1: int(st["root_nlookup"])}
            tracks: dict[int, tuple] = {}
            by_index: dict[int, Inode] = {}
            for nodeid, i, fmt, nlookup, parent, locked, lockdir, cached in st["inodes"]:
                fd = rx.take(i)
                fs = os.fstat(fd)
                if stat.S_IFMT(fs.st_mode) != fmt or nodeid in self._inodes:
                    raise OSError(errno.EINVAL, f"inode {nodeid}: not what the state says")
                node = Inode(int(nodeid), fd, fs.st_dev, fs.st_ino, fmt)
                self._inodes[node.nodeid] = node
                looked[node.nodeid] = int(nlookup)
                tracks[node.nodeid] = (parent, locked, lockdir, cached)
                by_index[i] = node
            for fh, i, nodeid, is_dir in st["handles"]:
                node = self._inodes.get(nodeid)
                if node is None or fh in self._handles:
                    raise OSError(errno.EINVAL, f"handle {fh}: not what the state says")
                lent = by_index.get(i) is node
                h = Handle(node.fd if lent else rx.take(i), node, bool(is_dir))
                node.lent = node.lent or lent
                node.nopen += 1
                if not h.is_dir:
                    node.plain_users += 1
                self._handles[int(fh)] = h
            self._next_node = itertools.count(max(self._inodes) + 1)
            self.table.set_next_fh(max(self._handles, default=0) + 1)
            self._publish_all(looked, tracks)

    def _publish_all(self, looked: dict[int, int], tracks: dict[int, tuple]) -> None:
        """Under self._lock, after a migration's load: every inode (`looked`: their
        lookup counts, the root's too; `tracks`: the caching state the source kept, see
        `_tracked_state`) and handle."""
        self.table.ref(1, looked[1] - self.table.nlookup(1))
        for node in self._inodes.values():
            if node is not self.root:
                self.table.put_inode(node.nodeid, node.fd, node.dev, node.ino, node.fmt,
                                     looked[node.nodeid], bool(node.lost))
                parent, locked, lockdir, cached = tracks[node.nodeid]
                self.table.set_tracked(node.nodeid, int(parent), bool(locked), bool(lockdir),
                                       int(float(cached) * 1e9))
        for fh, h in self._handles.items():
            self.table.put_handle(fh, h.fd, h.inode.nodeid, h.is_dir, bool(h.lost))

    # Without descriptors (another host): inodes by path or file handle, handles by
    # their open flags (fuse_server/migration.py, "the state without descriptors").
    def save_portable(self, opts) -> dict:  # noqa: ANN001 - a migration.PortableOptions
        """Each inode the guest knows as its path below the share (find-paths: from
        /proc/self/fd, checked to lead back to it with --migration-confirm-paths; its
        file handle too with --migration-verify-handles) or its file handle
        (file-handles); each open handle with its open flags. One that cannot be
        represented goes with the reason: the destination applies its
        --migration-on-error to it."""
        from fuse_server import migration as M

        with self._lock:
            self._adopt_all()
            nodes = [n for n in self._inodes.values() if n is not self.root]
            handles = list(self._handles.items())
        top = os.readlink(_proc(self.root.fd).encode()).rstrip(b"/") + b"/"
        inodes = []
        for n in nodes:
            where = fh = err = None
            try:
                if n.lost:
                    raise OSError(errno.EIO, n.lost)
                if opts.mode == "file-handles":
                    where = M.file_handle(n.fd)
                else:
                    where = M.b64(self._path_below(n, top, opts.confirm_paths))
                    if opts.verify_handles:
                        fh = M.file_handle(n.fd)
            except OSError as exc:
                err = exc.strerror or str(exc)
            inodes.append([n.nodeid, n.fmt, self.table.nlookup(n.nodeid),
                           *_tracked_state(self.table.tracked(n.nodeid)), where, fh, err])
        flags = os.O_ACCMODE | os.O_APPEND | os.O_NONBLOCK | os.O_DIRECT | os.O_NOATIME \
            | os.O_SYNC | os.O_DSYNC
        hs = [[fh, h.inode.nodeid, h.is_dir,
               0 if h.is_dir or h.lost else fcntl.fcntl(h.fd, fcntl.F_GETFL) & flags]
              for fh, h in handles]
        return {"mode": opts.mode, "root_nlookup": self.table.nlookup(1), "inodes": inodes,
                "handles": hs}

    def _path_below(self, n: Inode, top: bytes, confirm: bool) -> bytes:
        """The path of inode `n` relative to the share, as the kernel names it now."""
        link = os.readlink(_proc(n.fd).encode())
        if not link.startswith(top) or len(link) == len(top):
            raise OSError(errno.ENOENT, "not below the share")
        rel = link[len(top):]
        if confirm:  # the path must lead back to this very inode (not deleted, not moved)
            probe = _openat2_beneath(self.root.fd, rel, os.O_PATH | os.O_NOFOLLOW)
            try:
                st = os.fstat(probe)
            finally:
                os.close(probe)
            if (st.st_dev, st.st_ino) != (n.dev, n.ino):
                raise OSError(errno.ESTALE, "its path leads to another file")
        return rel

    def load_portable(self, st: dict, on_error: str) -> list[str]:
        """Open what save_portable described, below our own share. An inode or handle
        that cannot be found again, or is not the same file (another type; another file
        handle with --migration-verify-handles): with on_error "abort" the load fails
        (MigrationError: QEMU fails the migration, the source runs on); with
        "guest-error" it answers EIO from now on. Returns those problems."""
        from fuse_server import migration as M

        with self._lock:
            if len(self._inodes) > 1 or self._handles:
                raise OSError(errno.EBUSY, "the file system already has inodes")
        by_handle = st["mode"] == "file-handles"
        problems: list[str] = []
        nodes: dict[int, Inode] = {}
        looked = {1: int(st["root_nlookup"])}
        tracks: dict[int, tuple] = {}
        hands: dict[int, Handle] = {}
        # open_by_handle_at wants a real descriptor of the file system (not O_PATH)
        mount_fd = os.open(_proc(self.root.fd), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC) \
            if by_handle else -1

        def lost(what: str, exc: OSError) -> str:
            why = f"{what}: {exc.strerror or exc}"
            if on_error != "guest-error":
                raise M.MigrationError(f"{why} (--migration-on-error=abort: the migration "
                                       "fails, the source runs on)")
            problems.append(why)
            return why

        try:
            for nodeid, fmt, nlookup, parent, locked, lockdir, cached, where, fh, err \
                    in st["inodes"]:
                nodeid, fmt = int(nodeid), int(fmt)
                if nodeid <= 1 or nodeid in nodes:
                    raise OSError(errno.EINVAL, f"inode {nodeid}: twice, or the root")
                name = "by handle" if by_handle or where is None else \
                    os.fsdecode(M.unb64(where))
                fd, why = -1, ""
                try:
                    if err:
                        raise OSError(errno.ENOENT, f"the source could not say where: {err}")
                    fd = M.open_handle(mount_fd, where, os.O_PATH) if by_handle else \
                        _openat2_beneath(self.root.fd, M.unb64(where), os.O_PATH | os.O_NOFOLLOW)
                    if stat.S_IFMT(os.fstat(fd).st_mode) != fmt:
                        raise OSError(errno.ESTALE, "another type of file is there now")
                    if fh is not None and M.file_handle(fd) != fh:
                        raise OSError(errno.ESTALE, "another file is there now (its file "
                                      "handle differs)")
                except OSError as exc:
                    if fd >= 0:
                        os.close(fd)
                    why = lost(f"inode {nodeid} ({name})", exc)
                    fd = _stand_in()
                fs = os.fstat(fd)
                node = nodes[nodeid] = Inode(nodeid, fd, fs.st_dev, fs.st_ino, fmt, lost=why)
                looked[nodeid] = int(nlookup)
                tracks[nodeid] = (parent, locked, lockdir, cached)
                if fmt == stat.S_IFDIR and not why:
                    try:
                        self._inside(node)  # a handle may name a directory elsewhere
                    except OSError as exc:
                        node.lost = lost(f"inode {nodeid} ({name})", exc)
            for fh, nodeid, is_dir, flags in st["handles"]:
                node = nodes.get(int(nodeid))
                if node is None or int(fh) in hands:
                    raise OSError(errno.EINVAL, f"handle {fh}: not what the state says")
                hfd, why = -1, node.lost
                if not why:
                    try:
                        if is_dir:
                            hfd = os.open(_proc(node.fd), os.O_RDONLY | os.O_DIRECTORY
                                          | os.O_CLOEXEC)
                        else:
                            _openable(node.fmt)
                            hfd = os.open(_proc(node.fd), (int(flags) & ~_STRIP_OPEN
                                                           & ~os.O_TRUNC) | os.O_CLOEXEC)
                    except OSError as exc:
                        why = lost(f"handle {fh} of inode {nodeid}", exc)
                h = hands[int(fh)] = Handle(hfd if hfd >= 0 else _stand_in(), node,
                                            bool(is_dir), lost=why)
                node.nopen += 1
                if not h.is_dir:
                    node.plain_users += 1
        except BaseException:
            for x in [*nodes.values(), *hands.values()]:
                os.close(x.fd)
            raise
        finally:
            if mount_fd >= 0:
                os.close(mount_fd)
        with self._lock:
            self._inodes.update(nodes)
            self._handles.update(hands)
            self._next_node = itertools.count(max(self._inodes) + 1)
            self.table.set_next_fh(max(self._handles, default=0) + 1)
            self._publish_all(looked, tracks)
        return problems

    def any_fd(self, nodeid: int) -> int | None:
        """An open regular file's descriptor of the inode (one of its handles)."""
        with self._lock:
            for h in self._handles.values():
                if h.inode.nodeid == nodeid and not h.is_dir and not h.lost \
                        and h.inode.fmt == stat.S_IFREG:
                    return h.fd
        return None

    def close(self) -> None:
        """Close every fd (the server is going away)."""
        with self._lock:
            self._adopt_all()
            # A lent descriptor is both a handle's and its inode's: closed once.
            inode_fds = {node.fd for node in self._inodes.values()}
            for fh, h in self._handles.items():
                self.table.drop_handle(fh, h.fd, close=h.fd not in inode_fds)
            for nodeid, node in self._inodes.items():
                self.table.drop_inode(nodeid, node.fd, close=True)
            self._handles.clear()
            self._inodes.clear()
