"""A FUSE session, independent of its transport.

`Session.handle(buf)` takes one request and returns its reply (None when there is none
now: FORGET, a queued SETLKW, an INTERRUPT that needs no answer). Replies produced later
(a granted or cancelled SETLKW) and notifications (cache invalidation) go out through the
`send` callable. /dev/fuse (devfuse.py) and a virtqueue feed the same Session.

Like fs/fuse and virtiofsd: each request is decoded into a typed request, handled by one
method per opcode, and answered through one reply path; errors become -errno replies.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import struct
from collections.abc import Callable

from fuse_server import protocol as P
from fuse_server.locks import LockDelegate
from fuse_server.passthrough import UTIME_NOW, Passthrough
from lockd.fuse.codec import (
    CODEC,
    FH,
    GID,
    LEN,
    NODEID,
    OPCODE,
    OWNER,
    RELEASE_FLAGS,
    STATUS,
    UID,
    UNIQUE,
)

log = logging.getLogger("vfs-lockd.fuse")

CACHE_MODES = ("none", "auto", "always")
_NO_REPLY = frozenset((P.FORGET, P.BATCH_FORGET, P.NOTIFY_REPLY))
MAX_WRITE = 1 << 20
MAX_PAGES = MAX_WRITE // 4096

# Capabilities we ask for (the kernel grants the intersection with what it offers).
WANT_FLAGS = (
    P.ASYNC_READ  # several reads of one file in flight
    | P.POSIX_LOCKS  # fcntl/lockf locks come to us instead of staying in the guest
    | P.FLOCK_LOCKS  # flock too (FUSE_LK_FLOCK)
    | P.ATOMIC_O_TRUNC  # open(O_TRUNC) truncates in OPEN, not a separate SETATTR
    | P.EXPORT_SUPPORT  # lookups of "." and ".." are handled
    | P.BIG_WRITES
    | P.DONT_MASK  # we apply the umask sent with create/mkdir/mknod ourselves
    | P.PARALLEL_DIROPS
    | P.MAX_PAGES  # 1 MiB requests
    | P.DO_READDIRPLUS
    | P.READDIRPLUS_AUTO
    | P.ASYNC_DIO
)


class Session:
    def __init__(
        self,
        fs: Passthrough,
        service,  # noqa: ANN001 - a lockd.api.LockService
        guest: str,
        send: Callable[[bytes], None],
        cache: str = "auto",
    ) -> None:
        if cache not in CACHE_MODES:
            raise ValueError(f"cache must be one of {CACHE_MODES}")
        self.fs = fs
        self.guest = guest
        self.send = send
        self.cache = cache
        # none: every byte and every name goes to the host. auto: page cache, but no
        # writeback (writes go through) and the cache is dropped whenever a lock is granted;
        # names are revalidated on every walk (a stale dentry could resurrect a deleted
        # SQLite journal). always: long-lived caches, not coherent between guests.
        self.entry_timeout, self.attr_timeout = {"none": (0.0, 0.0), "auto": (0.0, 1.0), "always": (60.0, 60.0)}[cache]
        self.open_flags = {"none": P.FOPEN_DIRECT_IO, "auto": 0, "always": P.FOPEN_KEEP_CACHE}[cache]
        self.locks = LockDelegate(service, guest, send, CODEC, invalidate_on_grant=cache == "auto")
        # Every request but a lock request may put pages or attributes of an inode into
        # the guest's caches: it must be invalidated at the next grant (see LockDelegate).
        self._cached = self.locks.uncached.discard
        self.proto_minor = 0
        self.initialized = False
        self.destroyed = False
        self._encode = CODEC.encode_reply
        self._ops: dict[int, Callable[[tuple[int, ...], memoryview], bytes | None]] = {
            P.INIT: self.op_init,
            P.DESTROY: self.op_destroy,
            P.LOOKUP: self.op_lookup,
            P.FORGET: self.op_forget,
            P.BATCH_FORGET: self.op_batch_forget,
            P.GETATTR: self.op_getattr,
            P.SETATTR: self.op_setattr,
            P.READLINK: self.op_readlink,
            P.SYMLINK: self.op_symlink,
            P.MKNOD: self.op_mknod,
            P.MKDIR: self.op_mkdir,
            P.UNLINK: self.op_unlink,
            P.RMDIR: self.op_rmdir,
            P.RENAME: self.op_rename,
            P.RENAME2: self.op_rename,
            P.LINK: self.op_link,
            P.OPEN: self.op_open,
            P.CREATE: self.op_create,
            P.READ: self.op_read,
            P.WRITE: self.op_write,
            P.FLUSH: self.op_flush,
            P.RELEASE: self.op_release,
            P.FSYNC: self.op_fsync,
            P.OPENDIR: self.op_opendir,
            P.READDIR: self.op_readdir,
            P.READDIRPLUS: self.op_readdirplus,
            P.RELEASEDIR: self.op_releasedir,
            P.FSYNCDIR: self.op_fsyncdir,
            P.STATFS: self.op_statfs,
            P.ACCESS: self.op_access,
            P.FALLOCATE: self.op_fallocate,
            P.LSEEK: self.op_lseek,
            P.SETXATTR: self.op_setxattr,
            P.GETXATTR: self.op_getxattr,
            P.LISTXATTR: self.op_listxattr,
            P.REMOVEXATTR: self.op_removexattr,
            P.GETLK: self.op_getlk,
            P.SETLK: self.op_setlk,
            P.SETLKW: self.op_setlkw,
            P.INTERRUPT: self.op_interrupt,
        }
        # The lock opcodes find everything in the decoded tuple: they are answered straight
        # from it, without the body view and the op_* wrappers of the generic dispatch.
        self._msg_ops: dict[int, Callable[[tuple[int, ...]], bytes | None]] = {
            P.GETLK: self.locks.getlk,
            P.SETLK: self.locks.setlk,
            P.SETLKW: self.locks.setlkw,
            P.FLUSH: self.op_flush_msg,
        }

    def quick_ops(self) -> frozenset[int]:
        """Opcodes whose handling never blocks (no filesystem call, no journal write, no
        daemon round trip): a transport may handle them on the thread that read them."""
        if not getattr(self.locks.service, "nonblocking", False):
            return frozenset()
        return frozenset((P.GETLK, P.SETLK, P.SETLKW, P.FLUSH, P.FORGET, P.BATCH_FORGET))

    # ---- the one entry point ----
    def handle(self, buf: bytes | bytearray | memoryview) -> bytes | None:
        msg = CODEC.decode(buf)
        opcode = msg[OPCODE]
        mop = self._msg_ops.get(opcode)
        if mop is not None and not msg[STATUS] and self.initialized:
            # Lock opcodes (decoded in full, always answered): no body view to slice.
            try:
                return mop(msg)
            except Exception as exc:  # noqa: BLE001 - the same errno mapping as below
                return self._failed(msg, exc)
        unique = msg[UNIQUE]
        no_reply = opcode in _NO_REPLY
        if msg[STATUS]:
            if len(buf) < P.IN_HEADER.size or no_reply:
                log.warning("dropping malformed message (%d bytes)", len(buf))
                return None  # no header, no request to answer
            return self._encode(unique, -msg[STATUS])
        op = self._ops.get(opcode)
        if op is None:
            return None if no_reply else self._encode(unique, -errno.ENOSYS)
        if not self.initialized and opcode != P.INIT:
            return None if no_reply else self._encode(unique, -errno.EIO)
        body = memoryview(buf)[P.IN_HEADER.size : msg[LEN]]
        self._cached(msg[NODEID])  # before the request runs (see LockDelegate.uncached)
        try:
            reply = op(msg, body)
        except Exception as exc:  # noqa: BLE001 - mapped to an errno reply
            reply = self._failed(msg, exc)
        return None if no_reply else reply

    def _failed(self, msg: tuple[int, ...], exc: Exception) -> bytes:
        """The errno reply for a request whose handler raised."""
        opcode, unique = msg[OPCODE], msg[UNIQUE]
        if isinstance(exc, OSError):
            return self._encode(unique, -(exc.errno or errno.EIO))
        if isinstance(exc, (struct.error, ValueError, IndexError, TypeError, OverflowError)):
            log.info("bad request opcode=%d unique=%d: %s", opcode, unique, exc)
            return self._encode(unique, -errno.EINVAL)
        # a bug must cost one request, not the server
        log.error("opcode %d failed", opcode, exc_info=exc)
        return self._encode(unique, -errno.EIO)

    def _ok(self, msg: tuple[int, ...], payload: bytes = b"") -> bytes:
        return self._encode(msg[UNIQUE], 0, payload)

    def _entry(self, msg: tuple[int, ...], node, st: os.stat_result) -> bytes:  # noqa: ANN001
        self._cached(node.nodeid)  # the guest caches the attributes it gets
        return self._ok(msg, P.pack_entry(node.nodeid, st, self.entry_timeout, self.attr_timeout))

    # ---- session ----
    def op_init(self, msg: tuple[int, ...], body: memoryview) -> bytes:
        r = P.p_init(body)
        if r.major < P.KERNEL_VERSION:
            return self._encode(msg[UNIQUE], -errno.EPROTO)
        if r.major > P.KERNEL_VERSION:
            # Tell the kernel our major; it will send INIT again with 7.x.
            return self._ok(msg, P.INIT_OUT.pack(P.KERNEL_VERSION, P.MAX_MINOR, 0, 0, 0, 0, 0, 0, 0, 0, 0))
        if r.minor < P.MIN_MINOR:
            log.error("guest kernel speaks FUSE 7.%d; 7.%d or newer is needed", r.minor, P.MIN_MINOR)
            return self._encode(msg[UNIQUE], -errno.EPROTO)
        minor = min(r.minor, P.MAX_MINOR)
        want = WANT_FLAGS | (P.AUTO_INVAL_DATA if self.cache == "auto" else 0)
        granted = want & r.flags
        for need, name in ((P.POSIX_LOCKS, "POSIX_LOCKS"), (P.FLOCK_LOCKS, "FLOCK_LOCKS")):
            if not granted & need:
                log.warning("guest kernel does not offer %s: those locks stay guest-local", name)
        if r.flags & P.INIT_EXT:
            granted |= P.INIT_EXT
        self.proto_minor = minor
        self.initialized = True
        log.info("INIT: kernel 7.%d, speaking 7.%d, flags %#x", r.minor, minor, granted)
        out = P.INIT_OUT.pack(
            P.KERNEL_VERSION,
            minor,
            r.max_readahead,
            granted & 0xFFFFFFFF,
            64,  # max_background
            48,  # congestion_threshold
            MAX_WRITE,
            1,  # time_gran (ns)
            MAX_PAGES,
            0,  # map_alignment
            granted >> 32,  # flags2
        )
        return self._ok(msg, out)

    def op_destroy(self, msg: tuple[int, ...], body: memoryview) -> bytes:
        self.destroyed = True
        self.locks.release_all()
        return self._ok(msg)

    # ---- inodes and attributes ----
    def op_lookup(self, msg: tuple[int, ...], body: memoryview) -> bytes:
        node, st = self.fs.lookup(msg[NODEID], P.p_name(body).name)
        return self._entry(msg, node, st)

    def op_forget(self, msg: tuple[int, ...], body: memoryview) -> None:
        self.fs.forget(msg[NODEID], P.p_forget(body).nlookup)

    def op_batch_forget(self, msg: tuple[int, ...], body: memoryview) -> None:
        for nodeid, n in P.p_batch_forget(body).items:
            self.fs.forget(nodeid, n)

    def op_getattr(self, msg: tuple[int, ...], body: memoryview) -> bytes:
        r = P.p_getattr(body)
        st = self.fs.getattr(msg[NODEID], r.fh if r.flags & P.GETATTR_FH else None)
        return self._ok(msg, P.pack_attr_out(st, self.attr_timeout))

    def op_setattr(self, msg: tuple[int, ...], body: memoryview) -> bytes:
        r = P.p_setattr(body)
        v = r.valid
        atime = mtime = None
        if v & P.FATTR_ATIME_NOW:
            atime = UTIME_NOW
        elif v & P.FATTR_ATIME:
            atime = r.atime * 1_000_000_000 + r.atimensec
        if v & P.FATTR_MTIME_NOW:
            mtime = UTIME_NOW
        elif v & P.FATTR_MTIME:
            mtime = r.mtime * 1_000_000_000 + r.mtimensec
        st = self.fs.setattr(
            msg[NODEID],
            fh=r.fh if v & P.FATTR_FH else None,
            mode=r.mode if v & P.FATTR_MODE else None,
            uid=r.uid if v & P.FATTR_UID else None,
            gid=r.gid if v & P.FATTR_GID else None,
            size=r.size if v & P.FATTR_SIZE else None,
            atime=atime,
            mtime=mtime,
        )
        return self._ok(msg, P.pack_attr_out(st, self.attr_timeout))

    def op_readlink(self, msg: tuple[int, ...], body: memoryview) -> bytes:
        return self._ok(msg, self.fs.readlink(msg[NODEID]))

    def op_symlink(self, msg: tuple[int, ...], body: memoryview) -> bytes:
        r = P.p_symlink(body)
        node, st = self.fs.symlink(msg[NODEID], r.name, r.target, msg[UID], msg[GID])
        return self._entry(msg, node, st)

    def op_mknod(self, msg: tuple[int, ...], body: memoryview) -> bytes:
        r = P.p_mknod(body)
        mode = stat.S_IFMT(r.mode) | (stat.S_IMODE(r.mode) & ~r.umask)
        rdev = os.makedev((r.rdev >> 8) & 0xFFF, (r.rdev & 0xFF) | ((r.rdev >> 12) & 0xFFF00))
        node, st = self.fs.mknod(msg[NODEID], r.name, mode, rdev, msg[UID], msg[GID])
        return self._entry(msg, node, st)

    def op_mkdir(self, msg: tuple[int, ...], body: memoryview) -> bytes:
        r = P.p_mkdir(body)
        node, st = self.fs.mkdir(msg[NODEID], r.name, r.mode & ~r.umask & 0o7777, msg[UID], msg[GID])
        return self._entry(msg, node, st)

    def op_unlink(self, msg: tuple[int, ...], body: memoryview) -> bytes:
        self.fs.unlink(msg[NODEID], P.p_name(body).name)
        return self._ok(msg)

    def op_rmdir(self, msg: tuple[int, ...], body: memoryview) -> bytes:
        self.fs.rmdir(msg[NODEID], P.p_name(body).name)
        return self._ok(msg)

    def op_rename(self, msg: tuple[int, ...], body: memoryview) -> bytes:
        r = P.p_rename2(body) if msg[OPCODE] == P.RENAME2 else P.p_rename(body)
        self.fs.rename(msg[NODEID], r.oldname, r.newdir, r.newname, r.flags)
        return self._ok(msg)

    def op_link(self, msg: tuple[int, ...], body: memoryview) -> bytes:
        r = P.p_link(body)
        node, st = self.fs.link(r.oldnodeid, msg[NODEID], r.name)
        return self._entry(msg, node, st)

    # ---- files ----
    def _opened(self, fh: int, fd: int, fmt: int) -> None:
        if fmt == stat.S_IFREG:
            try:
                self.locks.opened(fh, fd)
            except BaseException:
                self.fs.release(fh)
                raise

    def op_open(self, msg: tuple[int, ...], body: memoryview) -> bytes:
        r = P.p_open(body)
        fh, h = self.fs.open(msg[NODEID], r.flags)
        self._opened(fh, h.fd, h.inode.fmt)
        return self._ok(msg, P.OPEN_OUT.pack(fh, self.open_flags, 0))

    def op_create(self, msg: tuple[int, ...], body: memoryview) -> bytes:
        r = P.p_create(body)
        mode = stat.S_IMODE(r.mode) & ~r.umask
        node, st, fh, h = self.fs.create(msg[NODEID], r.name, r.flags, mode, msg[UID], msg[GID])
        self._opened(fh, h.fd, node.fmt)
        self._cached(node.nodeid)
        entry = P.pack_entry(node.nodeid, st, self.entry_timeout, self.attr_timeout)
        return self._ok(msg, entry + P.OPEN_OUT.pack(fh, self.open_flags, 0))

    def op_read(self, msg: tuple[int, ...], body: memoryview) -> bytes:
        r = P.p_read(body)
        return self._ok(msg, self.fs.read(r.fh, r.offset, r.size))

    def op_write(self, msg: tuple[int, ...], body: memoryview) -> bytes:
        r = P.p_write(body)
        return self._ok(msg, P.WRITE_OUT.pack(self.fs.write(r.fh, r.offset, r.data), 0))

    def op_flush(self, msg: tuple[int, ...], body: memoryview) -> bytes:
        return self.op_flush_msg(msg)

    def op_flush_msg(self, msg: tuple[int, ...]) -> bytes:
        self.locks.flush(msg)
        return self._encode(msg[UNIQUE], 0)

    def op_release(self, msg: tuple[int, ...], body: memoryview) -> bytes:
        fh = msg[FH]
        try:
            self.locks.released(fh, msg[RELEASE_FLAGS], msg[OWNER])
        finally:
            self.fs.release(fh)
        return self._ok(msg)

    def op_fsync(self, msg: tuple[int, ...], body: memoryview) -> bytes:
        r = P.p_fsync(body)
        self.fs.fsync(r.fh, r.datasync)
        return self._ok(msg)

    def op_fallocate(self, msg: tuple[int, ...], body: memoryview) -> bytes:
        r = P.p_fallocate(body)
        self.fs.fallocate(r.fh, r.offset, r.length, r.mode)
        return self._ok(msg)

    def op_lseek(self, msg: tuple[int, ...], body: memoryview) -> bytes:
        r = P.p_lseek(body)
        return self._ok(msg, P.LSEEK_OUT.pack(self.fs.lseek(r.fh, r.offset, r.whence)))

    # ---- directories ----
    def op_opendir(self, msg: tuple[int, ...], body: memoryview) -> bytes:
        fh = self.fs.opendir(msg[NODEID])
        flags = P.FOPEN_CACHE_DIR | P.FOPEN_KEEP_CACHE if self.cache == "always" else 0
        return self._ok(msg, P.OPEN_OUT.pack(fh, flags, 0))

    def _readdir(self, msg: tuple[int, ...], body: memoryview, plus: bool) -> bytes:
        r = P.p_read(body)
        h = self.fs.handle(r.fh)
        ents = self.fs.dir_entries(r.fh, r.offset)
        out: list[bytes] = []
        total = 0
        for i in range(r.offset, len(ents)):
            name, ino, dtype = ents[i]
            size = P.align8((P.DIRENTPLUS_BASE if plus else P.DIRENT.size) + len(name))
            if total + size > r.size:
                break
            if plus:
                if name in (b".", b".."):
                    # nodeid 0: the kernel links nothing and counts no lookup.
                    entry = bytes(P.ENTRY_OUT_SIZE)
                else:
                    try:
                        node, st = self.fs.lookup(h.inode.nodeid, name)
                    except OSError:
                        continue  # gone since the snapshot
                    self._cached(node.nodeid)
                    entry = P.pack_entry(node.nodeid, st, self.entry_timeout, self.attr_timeout)
                    ino = st.st_ino
                out.append(entry)
            out.append(P.pack_dirent(ino, i + 1, dtype, name))
            total += size
        return self._ok(msg, b"".join(out))

    def op_readdir(self, msg: tuple[int, ...], body: memoryview) -> bytes:
        return self._readdir(msg, body, False)

    def op_readdirplus(self, msg: tuple[int, ...], body: memoryview) -> bytes:
        return self._readdir(msg, body, True)

    def op_releasedir(self, msg: tuple[int, ...], body: memoryview) -> bytes:
        self.fs.release(msg[FH])
        return self._ok(msg)

    def op_fsyncdir(self, msg: tuple[int, ...], body: memoryview) -> bytes:
        r = P.p_fsync(body)
        self.fs.fsyncdir(r.fh, r.datasync)
        return self._ok(msg)

    def op_statfs(self, msg: tuple[int, ...], body: memoryview) -> bytes:
        s = self.fs.statfs(msg[NODEID])
        out = P.KSTATFS.pack(
            s.f_blocks, s.f_bfree, s.f_bavail, s.f_files, s.f_ffree, s.f_bsize, s.f_namemax, s.f_frsize, 0
        )
        return self._ok(msg, out)

    def op_access(self, msg: tuple[int, ...], body: memoryview) -> bytes:
        self.fs.access(msg[NODEID], P.p_access(body).mask, msg[UID], msg[GID])
        return self._ok(msg)

    # ---- xattrs ----
    def _sized(self, msg: tuple[int, ...], data: bytes, size: int) -> bytes:
        """getxattr/listxattr: size 0 asks for the length; a short buffer is ERANGE."""
        if size == 0:
            return self._ok(msg, P.GETXATTR_OUT.pack(len(data), 0))
        if len(data) > size:
            return self._encode(msg[UNIQUE], -errno.ERANGE)
        return self._ok(msg, data)

    def op_getxattr(self, msg: tuple[int, ...], body: memoryview) -> bytes:
        r = P.p_getxattr(body)
        return self._sized(msg, self.fs.getxattr(msg[NODEID], r.name), r.size)

    def op_listxattr(self, msg: tuple[int, ...], body: memoryview) -> bytes:
        return self._sized(msg, self.fs.listxattr(msg[NODEID]), P.p_listxattr(body).size)

    def op_setxattr(self, msg: tuple[int, ...], body: memoryview) -> bytes:
        r = P.p_setxattr(body)
        self.fs.setxattr(msg[NODEID], r.name, r.value, r.flags)
        return self._ok(msg)

    def op_removexattr(self, msg: tuple[int, ...], body: memoryview) -> bytes:
        self.fs.removexattr(msg[NODEID], P.p_name(body).name)
        return self._ok(msg)

    # ---- locks ----
    def op_getlk(self, msg: tuple[int, ...], body: memoryview) -> bytes:
        return self.locks.getlk(msg)

    def op_setlk(self, msg: tuple[int, ...], body: memoryview) -> bytes | None:
        return self.locks.setlk(msg)

    def op_setlkw(self, msg: tuple[int, ...], body: memoryview) -> bytes | None:
        return self.locks.setlkw(msg)

    def op_interrupt(self, msg: tuple[int, ...], body: memoryview) -> bytes | None:
        return self.locks.interrupt(msg, msg[UNIQUE])

    def close(self) -> None:
        """The guest is gone (unmount, exit): release every lock and wait it had."""
        self.locks.release_all()

    def end(self) -> None:
        """close(), and this Session will not be used again (a virtio-fs device reset or
        re-INIT starts a new one): give the lock service back its file references and
        close every descriptor, so a guest rebooting many times leaks nothing."""
        self.close()
        self.locks.forget_files()
        self.fs.close()
