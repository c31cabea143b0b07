"""A FUSE session, independent of its transport.

`Session.handle(buf)` takes one request and returns its reply (None when there is none
now: FORGET, a queued SETLKW, a forwarded lock request, an INTERRUPT that needs no
answer). Replies produced later (a granted or cancelled SETLKW, the central daemon's
answers) and notifications (cache invalidation) go out through the `send` callable.
/dev/fuse (transports/devfuse.py) and a virtqueue (transports/vhost_user.py) feed the
same Session. Lock messages go to one of fuse_server/locks.py's endpoints, and from there
to the one lockd.dispatch.LockDispatcher (in this process or in the central daemon).

Like fs/fuse and virtiofsd: each request is decoded into a typed request, handled by one
method per opcode, and answered through one reply path; errors become -errno replies.
"""

from __future__ import annotations

import errno
import logging
import os
import resource
import stat
import struct
import threading
import time
from collections.abc import Callable

from fuse_server import backing as B
from fuse_server import protocol as P
from fuse_server.backing import BackingFiles
from fuse_server.fdtable import MAX_REPLY_DATA, reply_cap
from fuse_server.invalidate import Invalidator
from fuse_server.locks import LocalLocks, RemoteLocks
from fuse_server.passthrough import ACL_NAMES, UTIME_NOW, Passthrough
from fuse_server.transports.fuse_uring import OVER_IO_URING
from lockd.api import F_UNLCK
from lockd.dispatch import LockRequest, lock_request
from lockd.fuse.codec import CODEC, FuseMsg

log = logging.getLogger("vfs-lockd.fuse")

CACHE_MODES = ("none", "auto", "always")
# Requests that never get a reply; every other request whose handle() returns None is
# answered later through `send` (a queued wait, a forwarded lock request).
NO_REPLY = frozenset((P.FORGET, P.BATCH_FORGET, P.NOTIFY_REPLY))
MAX_WRITE = MAX_REPLY_DATA
MAX_PAGES = MAX_WRITE // 4096
# Without notifications (virtio-fs, cache auto): how much longer than a timeout we gave
# the first grant of a file waits, for the guest to have processed the reply that set it.
HOLD_MARGIN = 0.25
# ... and how late after we sent it a guest may apply a reply (a TCG guest on a loaded
# host took longer than HOLD_MARGIN): a first lock request that comes within this much
# of the deadline of what the guest was given waits a whole timeout from its arrival
# (see _first_lock).
LATE_APPLY = 2.0

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
# Replies whose size the guest chooses: bounded by its buffer and by MAX_WRITE (handle()).
_SIZED_OPS = frozenset((P.READ, P.READDIR, P.READDIRPLUS, P.GETXATTR, P.LISTXATTR))


def open_budget(per_uid: int | None = None, limit: int | None = None) -> tuple[int, int]:
    """What one user of the guest may cost the server in open files (issue 23 item 6):
    (handles per uid, handles of all users but root together), for the table that
    counts them (fdtable: `budget_take`, `charge`; a native OPENDIR charges there too).

    Each open file or directory holds a host descriptor in this process for as long as
    the guest keeps it open, and every user of the mount shares the one descriptor
    table. Unbounded, one unprivileged user opening files until EMFILE leaves root
    unable to open or list anything. So, by the caller's uid (the guest's): each uid
    but root may hold `per_uid` handles (default a quarter of RLIMIT_NOFILE) and gets
    EMFILE beyond it; all of them together may hold half the table and get ENFILE
    beyond that, whoever they are. Root is bounded only by the table itself: the other
    half stays for it, for the inodes the guest looks up and for the lock service."""
    if limit is None:
        limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if limit == resource.RLIM_INFINITY:
            limit = 1 << 20
    per = max(16, limit // 4) if per_uid is None else per_uid  # 0: unbounded
    return per, max(16, limit // 2)


class Session:
    def __init__(
        self,
        fs: Passthrough,
        service,  # noqa: ANN001 - a lockd.api.LockService
        guest: str,
        send: Callable[[bytes], None],
        cache: str = "auto",
        notify: bool = True,
        posix_locks: bool = True,
        flock_locks: bool = True,
        xattr: bool = True,
        readonly: bool = False,
        posix_acl: bool = True,
        killpriv_v2: bool = True,
        backing: BackingFiles | None = None,
        uring: bool = False,
        max_opens_per_uid: int | None = None,
        locks: type[LocalLocks] | type[RemoteLocks] = LocalLocks,
        native: bool = True,
    ) -> None:
        """`service`: the lock service; `locks`: the lock endpoint the caller made it
        for, LocalLocks (a service in this process, the default) or RemoteLocks (the
        central daemon's client): chosen by whoever made the service, never guessed
        from it. `native`: False keeps every request in this session (the native fast
        path, native/vl_serve.c, answers none: for comparison and diagnosis)."""
        if cache not in CACHE_MODES:
            raise ValueError(f"cache must be one of {CACHE_MODES}")
        self.fs = fs
        # Lock kinds not asked for in INIT stay guest-local (virtiofsd's no_posix_lock /
        # no_flock); xattr=False answers the xattr opcodes ENOSYS (the kernel stops asking);
        # readonly answers every modifying request EROFS.
        self.posix_locks, self.flock_locks = posix_locks, flock_locks
        self.xattr, self.readonly = xattr, readonly
        # POSIX ACLs (FUSE_POSIX_ACL): the guest kernel enforces the share's ACLs, read
        # with GETXATTR, as the host does; asked for only where the share keeps ACLs.
        # `acl` says whether INIT granted it (it changes how the umask applies).
        self.posix_acl = posix_acl and fs.acl_supported()
        if posix_acl and not self.posix_acl:
            log.info("the shared directory's file system keeps no POSIX ACLs: none to enforce")
        self.acl = False
        # FUSE_HANDLE_KILLPRIV_V2 (asked for unless told not to, and not on a read-only
        # share, where nothing is written): the guest then tells us in each WRITE,
        # truncating SETATTR and O_TRUNC OPEN/CREATE whether the caller lacks CAP_FSETID
        # (so setuid/setgid must go, _writer_gid) and stops asking for
        # security.capability before every buffered write. `killpriv`: granted.
        self.killpriv_v2 = killpriv_v2 and not readonly
        self.killpriv = False
        # Passthrough (fuse_server/backing.py): given by a transport that can hand the
        # kernel backing files (/dev/fuse); switched on when INIT grants it.
        self.backing = backing
        fs.backing = backing
        # FUSE over io_uring: asked for when the transport can serve it (its rings
        # exist); `uring` then says whether INIT granted it.
        self.uring_wanted = uring
        self.uring = False
        # File system requests running now: end() closes the descriptors only once none
        # is (a request stuck in a host call must not later use a descriptor number that
        # was closed and handed to something else).
        self._running = 0
        self._running_lock = threading.Lock()
        self._release_mu = threading.Lock()  # op_release: one close at a time
        # Notified as each RELEASE is answered (_after_releases)
        self._released = threading.Condition()
        self._ended = False
        self.guest = guest
        self.send = send
        self.cache = cache
        self.native = native
        # Open handles per uid: counted, and charged to each handle, by the table.
        fs.table.budget_config(*open_budget(max_opens_per_uid))
        # none: every byte and every name goes to the host. auto: page cache, but no
        # writeback (writes go through); names and attributes are cached 1 s (Rust
        # virtiofsd's auto), and every lock grant first drops the guest's pages and
        # attributes of the file and every name it was given since the last grant
        # (invalidate.py; names only with FUSE 7.44's epochs, see op_init: an older
        # kernel's names are revalidated on every walk, since a stale name could
        # resurrect a SQLite journal another guest deleted). Without a notification
        # channel, see `tracking` below. always: long-lived caches, not coherent between
        # guests.
        self.entry_timeout, self.attr_timeout = {"none": (0.0, 0.0), "auto": (0.0, 1.0), "always": (60.0, 60.0)}[cache]
        self.open_flags = {"none": P.FOPEN_DIRECT_IO, "auto": 0, "always": P.FOPEN_KEEP_CACHE}[cache]
        # Lock replies that say "granted" first drop the guest's cached pages of the file
        # (cache auto; see fuse_server/invalidate.py). Without a notification channel
        # (virtio-fs has none) there is nothing to send.
        self.invalidator = Invalidator(send, fs.table) if cache == "auto" and notify else None
        # invalidator.named/epoch once names are cached (op_init)
        self._named, self._names_epoch = _always_named, _no_epoch
        # Without notifications (virtio-fs) auto still caches names and attributes 1 s,
        # but a file named by a lock request is served uncached from then on (attributes
        # and its directory's names with timeout 0: with AUTO_INVAL_DATA each read then
        # checks size and mtime first), and the first grant on it is answered only once
        # what the guest cached of it and of its directory has run out (_first_lock).
        self.tracking = cache == "auto" and self.invalidator is None
        if self.tracking:
            self.entry_timeout = self.attr_timeout
        # With notifications too, a file named by a lock request has its attributes
        # (and its name; not the other names in its directory, which a grant's sweep
        # expires) served with timeout 0 from then on: the guest kernel applies a
        # GETATTR reply by clearing its "stale" mask and dating the attributes before
        # it writes the new size, and a stat of the file by another process in that
        # instant, reading without the inode's lock, takes the cached attributes as
        # valid and returns the size from before. Right after a grant's
        # notification, two SQLite readers of one guest did exactly that: one got the
        # old size with the new header, "database disk image is malformed". Timeout 0
        # leaves such a stat nothing valid to read: every stat asks us. (The first
        # grant is not held until older attributes run out, as it is without
        # notifications: the notification already made those stale, and the instant
        # left is between two stores, only within a timeout of the first lock request.)
        self.locked_uncached = cache == "auto"
        fs.table.tracking(2 if self.tracking else int(self.locked_uncached),
                          int((self.attr_timeout + HOLD_MARGIN) * 1e9))
        self._held: dict[int, float] = {}  # unique of a first lock request -> deadline
        self._late: set[int] = set()  # grants whose reply waits for that deadline
        self._cached = self.invalidator.cached if self.invalidator else _nothing
        self._grants: dict[int, int] = {}  # unique of a request taking a lock -> nodeid
        self.locks: LocalLocks | RemoteLocks = locks(service, guest, fs.fd_of, self._deferred)
        self.proto_minor = 0
        self.kernel_minor = 0  # what the kernel offered at INIT (notifications it handles)
        self.initialized = False
        self.destroyed = False
        self._encode = CODEC.encode_reply
        self._ops: dict[int, Callable[[tuple[int, ...], memoryview], bytes | None]] = {
            P.INIT: self.op_init,
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
        }
        # Without xattr the xattr opcodes are unknown (ENOSYS: the kernel stops asking),
        # except that POSIX ACLs, kept in xattrs, still need their two names.
        self._xattr_names = None if xattr else ACL_NAMES if self.posix_acl else frozenset()
        if not xattr and not self.posix_acl:
            for op in (P.GETXATTR, P.LISTXATTR, P.SETXATTR, P.REMOVEXATTR):
                del self._ops[op]
        if readonly:
            def erofs(msg: FuseMsg, body: memoryview) -> bytes:
                return self._encode(msg.unique, -errno.EROFS)

            for op in (P.SETATTR, P.SYMLINK, P.MKNOD, P.MKDIR, P.UNLINK, P.RMDIR, P.RENAME,
                       P.RENAME2, P.LINK, P.CREATE, P.WRITE, P.FALLOCATE, P.SETXATTR,
                       P.REMOVEXATTR):
                if op in self._ops:
                    self._ops[op] = erofs

    def quick_ops(self) -> frozenset[int]:
        """Opcodes whose handling never blocks (no filesystem call, no journal write, no
        wait for the daemon): a transport may handle them on the thread that read them."""
        if not self.locks.nonblocking:
            return frozenset()
        # (FLUSH: the owner's POSIX locks go, as an unlock does)
        return frozenset((P.GETLK, P.SETLK, P.SETLKW, P.INTERRUPT, P.FLUSH, P.FORGET,
                          P.BATCH_FORGET))

    def inline_ops(self) -> frozenset[int]:
        """Opcodes a transport may handle on the thread that read them although they make
        host calls: a few, on one inode or directory, that wait only for a file system
        that hangs (which a transport survives anyway: vhost_user's _Reader); as Rust
        virtiofsd answers everything by default. Not what waits for a disk (FSYNC,
        FALLOCATE, COPY_FILE_RANGE, ...), INIT or DESTROY, nor anything when a lock
        daemon may be waited for (RELEASE reaches the lock service)."""
        if not self.locks.nonblocking:
            return frozenset()
        return frozenset((P.LOOKUP, P.GETATTR, P.SETATTR, P.READLINK, P.SYMLINK, P.MKNOD,
                          P.MKDIR, P.UNLINK, P.RMDIR, P.RENAME, P.RENAME2, P.LINK, P.OPEN,
                          P.CREATE, P.READ, P.WRITE, P.STATFS, P.RELEASE, P.GETXATTR,
                          P.LISTXATTR, P.SETXATTR, P.REMOVEXATTR, P.OPENDIR, P.READDIR,
                          P.READDIRPLUS, P.RELEASEDIR, P.ACCESS, P.LSEEK))

    # ---- the one entry point ----
    def handle(self, buf: bytes | bytearray | memoryview, room: int | None = None) -> bytes | None:
        """The reply to one request. `room`: the bytes the guest gave for the reply (a
        virtqueue chain's writable part); /dev/fuse's kernel buffers are always big enough."""
        if len(buf) < 24 or _OPCODE.unpack_from(buf, 4)[0] != _RELEASE:
            return self._handle(buf, room)
        # Registered before anything here lets another thread go on (the native path
        # registered it already as it read it: counted once); see _after_releases.
        unique, nodeid = _UNIQUE_NODEID.unpack_from(buf, 8)
        table = self.fs.table
        table.releasing_add(unique, nodeid)
        try:
            return self._handle(buf, room)
        finally:
            with self._released:
                table.releasing_done(unique)
                self._released.notify_all()

    def _handle(self, buf: bytes | bytearray | memoryview, room: int | None) -> bytes | None:
        msg = CODEC.decode(buf)
        opcode = msg.opcode
        if opcode in _LOCK_OPS and not msg.status and self.initialized:
            try:
                return self._lock_request(msg, buf)
            except Exception as exc:  # noqa: BLE001 - the same errno mapping as below
                return self._failed(msg, exc)
        unique = msg.unique
        no_reply = opcode in NO_REPLY
        if msg.status:
            if len(buf) < P.IN_HEADER.size or no_reply:
                log.warning("dropping malformed message (%d bytes)", len(buf))
                return None  # no header, no request to answer
            return self._encode(unique, -msg.status)
        if not self.initialized and opcode != P.INIT:
            return None if no_reply else self._encode(unique, -errno.EIO)
        op = self._ops.get(opcode)
        if op is None:
            return None if no_reply else self._encode(unique, -errno.ENOSYS)
        body = memoryview(buf)[P.IN_HEADER.size : msg.len]
        self._cached(msg.nodeid)  # before the request runs (see fuse_server/invalidate.py)
        self._start_running()
        try:
            if opcode in _SIZED_OPS:
                # The guest names the size: never more than its buffer (less the 16-byte
                # reply header), nor than INIT's maximum (a 1 GiB READ must not make us
                # allocate 1 GiB).
                reply = op(msg, body, reply_cap(room) - 16)
            else:
                reply = op(msg, body)
        except Exception as exc:  # noqa: BLE001 - mapped to an errno reply
            reply = self._failed(msg, exc)
        finally:
            self._stop_running()
        return None if no_reply else reply

    def _start_running(self) -> None:
        with self._running_lock:
            self._running += 1

    def _stop_running(self) -> None:
        with self._running_lock:
            self._running -= 1
            last = self._ended and self._running == 0
        if last:
            self.fs.close()  # the session ended while this one ran (see end())

    # ---- locks ----
    def _lock_request(self, msg: FuseMsg, buf: bytes | bytearray | memoryview) -> bytes | None:
        """A lock message, made the one LockRequest (with the buffer it came in, which
        central mode forwards) that the endpoint and the dispatcher read: every decision
        about it is the dispatcher's. What stays here is the session's own part: the
        replies it holds back (invalidation, caches running out) and RELEASE's closing
        of the handle."""
        req = lock_request(msg, buf)
        opcode = req.opcode
        if opcode == _INTERRUPT:
            return self._answer_now(self.locks.interrupt(req, self._held_back))
        if opcode == _FLUSH:
            # close(2) of any descriptor drops that process's POSIX locks on the inode.
            return self.locks.handle(req)
        if opcode == _RELEASE:
            return self._release(req)
        if opcode == _DESTROY:
            self.destroyed = True
            return self.locks.handle(req)
        unique = req.unique
        self._after_releases(req)
        if self.locked_uncached and opcode != P.GETLK and req.lk_type != F_UNLCK:
            if self.invalidator is not None:
                self._grants[unique] = req.nodeid  # its "granted" may need invalidation
            self._first_lock(req)
        try:
            reply = self.locks.handle(req)
        except BaseException:  # refused (e.g. EINVAL for its handle): nothing to hold
            self._grants.pop(unique, None)
            self._held.pop(unique, None)
            raise
        return self._answer_now(reply)

    def _after_releases(self, req: LockRequest) -> None:
        """A lock request waits for the RELEASEs of its inode that the guest sent before
        it and that are being answered now. The guest kernel drops an OFD lock or flock
        with the open file description's RELEASE, which it queues (and numbers) before
        close(2) returns but does not wait for (fs/fuse/file.c); a request sent after
        that close (a higher unique) must find the lock gone, but another thread of ours
        may take it while the RELEASE is still being answered (xfstests generic/478: a
        getter's F_OFD_GETLK right after the setter's last close found the lock in one
        run in eight on one mount). Only what is already being answered is waited
        for (and, over /dev/fuse, the few requests just before this one still being
        read: vl_tab_order_reads), for a second at most (one the session was never
        given, or that hangs, is not waited for after that); a RELEASE never waits for
        a lock request."""
        table, unique, nodeid = self.fs.table, req.unique, req.nodeid
        since = time.monotonic_ns() - RELEASE_PATIENCE_NS
        # (the first look, which may wait for the reads just before, holds no lock: the
        # RELEASEs that end meanwhile need it to say so)
        if not table.releasing_before(unique, nodeid, since):
            return
        with self._released:
            while table.releasing_before(unique, nodeid, since):
                left = since + 2 * RELEASE_PATIENCE_NS - time.monotonic_ns()
                if left <= 0:
                    break
                self._released.wait(left / 1e9)

    def _held_back(self, target: int) -> bool:
        """The session's fact for an INTERRUPT (lockd.dispatch.interrupt_reply): the
        target is granted and its reply held back here, behind its notifications
        (invalidate.py) or until the guest's caches run out (_late)."""
        return ((self.invalidator is not None and target in self.invalidator.answering)
                or target in self._late)

    def _answer_now(self, reply: bytes | None) -> bytes | None:
        return None if reply is None else self._lock_answer(reply, True)

    def _lock_answer(self, reply: bytes, now: bool) -> bytes | None:
        """A lock reply, answered now (returned) or later (sent): a grant of an inode the
        guest may have cached goes out through the invalidator, after its notification."""
        if self._grants:
            _, error, unique = P.OUT_HEADER.unpack_from(reply)
            nodeid = self._grants.pop(unique, None)
            if nodeid is not None and error == 0 and self.invalidator.hold(nodeid, reply):
                return None
        if self._held:
            _, error, unique = P.OUT_HEADER.unpack_from(reply)
            deadline = self._held.pop(unique, None)
            wait = 0.0 if deadline is None or error else deadline - time.monotonic()
            if wait > 0:
                self._late.add(unique)
                t = threading.Timer(wait, self._send_late, (unique, reply))
                t.daemon = True
                t.start()
                return None
        if now:
            return reply
        try:
            self.send(reply)
        except OSError as exc:  # ENOENT: the request is gone (interrupted)
            log.debug("deferred lock reply not delivered: %s", exc)
        return None

    def _send_late(self, unique: int, reply: bytes) -> None:
        try:
            self.send(reply)
        except OSError as exc:
            log.debug("held lock reply not delivered: %s", exc)
        self._late.discard(unique)

    # ---- a locked file uncached (cache auto; without notifications, virtio-fs) ----
    def _first_lock(self, msg: FuseMsg) -> None:
        """A lock request names the inode: from now on its attributes and name (without
        notifications, the names in its directory too) are not cached by the guest.
        With notifications that is all: the grant's notification drops what it cached
        before. Without, that cannot be dropped, so if it may still hold some, grants
        are answered once all of it has run out (`_held`): the taker's next stat and
        read then ask us.
        That deadline is the inode's (`settle_until`), fixed by its first lock request
        and waited for by every grant asked before it passed, not only the first: another
        process of the guest locking the file meanwhile reads through the same caches.
        The flag is set before the deadlines are read, and replies set their deadline
        before they read the flag (_uncached_times): a reply racing with this either
        sees the flag or leaves a deadline that is waited for."""
        now = time.monotonic_ns()
        # (the table's, atomically with the replies' deadlines: vl_tab_first_lock)
        settle = self.fs.table.first_lock(msg.nodeid, now, int(LATE_APPLY * 1e9))
        if self.tracking and settle > now:
            self._held[msg.unique] = settle / 1e9

    def _uncached_times(self, parent_id: int, node) -> tuple[float, float]:  # noqa: ANN001
        """(entry, attr) timeouts of an entry reply (locked_uncached, _first_lock): the
        deadlines are set before the flags are read, in the table (native LOOKUPs do the
        same there)."""
        r = self.fs.table.entry_times(parent_id, node.nodeid, time.monotonic_ns())
        if r < 0 or r & 1:  # (unknown: forgotten meanwhile, nothing to cache)
            return 0.0, 0.0
        return (0.0 if r & 2 else self.entry_timeout, self.attr_timeout)

    def _attr_time(self, nodeid: int) -> float:
        """The attribute timeout of a GETATTR/SETATTR reply."""
        if not self.locked_uncached:
            return self.attr_timeout
        r = self.fs.table.attr_time(nodeid, time.monotonic_ns())
        return 0.0 if r != 0 else self.attr_timeout

    def _entry_out(self, parent_id: int, name: bytes, node, st: os.stat_result,  # noqa: ANN001
                   since: int) -> bytes:
        """The entry for `name` in `parent_id`, read from the host after the names'
        epoch was `since`. The guest caches the attributes it gets and the name, until
        the next grant expires it; not at all if a grant's sweep began since the host
        was read (see fuse_server/invalidate.py)."""
        self._cached(node.nodeid)
        entry_t, attr_t = (self._uncached_times(parent_id, node) if self.locked_uncached
                           else (self.entry_timeout, self.attr_timeout))
        until = time.monotonic_ns() + int(entry_t * 1e9) if entry_t else 0
        if not self._named(parent_id, name, since, until):
            entry_t = attr_t = 0.0
        return P.pack_entry(node.nodeid, st, entry_t, attr_t)

    def _deferred(self, reply: bytes) -> None:
        """Lock replies produced later: queued waits, the daemon's answers."""
        self._lock_answer(reply, False)

    def _failed(self, msg: FuseMsg, exc: Exception) -> bytes:
        """The errno reply for a request whose handler raised."""
        opcode, unique = msg.opcode, msg.unique
        if isinstance(exc, OSError):
            return self._encode(unique, -(exc.errno or errno.EIO))
        if isinstance(exc, (struct.error, ValueError, IndexError, TypeError, OverflowError)):
            log.info("bad request opcode=%d unique=%d: %s", opcode, unique, exc)
            return self._encode(unique, -errno.EINVAL)
        # a bug must cost one request, not the server
        log.error("opcode %d failed", opcode, exc_info=exc)
        return self._encode(unique, -errno.EIO)

    def _ok(self, msg: FuseMsg, payload: bytes = b"") -> bytes:
        return self._encode(msg.unique, 0, payload)

    def _entry(self, msg: FuseMsg, node, st: os.stat_result, name: bytes,  # noqa: ANN001
               since: int) -> bytes:
        """An entry reply for `name` in the request's directory, read from the host after
        the names' epoch was `since`."""
        return self._ok(msg, self._entry_out(msg.nodeid, name, node, st, since))

    # ---- session ----
    def op_init(self, msg: FuseMsg, body: memoryview) -> bytes:
        r = P.p_init(body)
        if r.major < P.KERNEL_VERSION:
            return self._encode(msg.unique, -errno.EPROTO)
        if r.major > P.KERNEL_VERSION:
            # Tell the kernel our major; it will send INIT again with 7.x.
            return self._ok(msg, P.INIT_OUT.pack(P.KERNEL_VERSION, P.MAX_MINOR, *(0,) * 10))
        if r.minor < P.MIN_MINOR:
            log.error("guest kernel speaks FUSE 7.%d; 7.%d or newer is needed", r.minor, P.MIN_MINOR)
            return self._encode(msg.unique, -errno.EPROTO)
        minor = min(r.minor, P.MAX_MINOR)
        want = WANT_FLAGS | (P.AUTO_INVAL_DATA if self.cache == "auto" else 0)
        if self.cache == "none":
            # Files are opened FOPEN_DIRECT_IO: without this a shared mmap of one fails
            # (ENODEV); with it the mapping's pages are the guest's page cache, dropped at
            # each mmap and by the guest's own direct writes (fs/fuse/file.c).
            want |= P.DIRECT_IO_ALLOW_MMAP
        if self.posix_acl:
            want |= P.POSIX_ACL
        if self.killpriv_v2:
            want |= P.HANDLE_KILLPRIV_V2
        if self.backing is not None:
            want |= B.PASSTHROUGH
        if self.uring_wanted:
            want |= OVER_IO_URING
        if not self.posix_locks:
            want &= ~P.POSIX_LOCKS
        if not self.flock_locks:
            want &= ~P.FLOCK_LOCKS
        granted = want & r.flags
        for need, name in ((P.POSIX_LOCKS, "POSIX_LOCKS"), (P.FLOCK_LOCKS, "FLOCK_LOCKS")):
            if not want & need:
                log.info("%s not requested: those locks stay guest-local", name)
            elif not granted & need:
                log.warning("guest kernel does not offer %s: those locks stay guest-local", name)
        if r.flags & P.INIT_EXT:
            granted |= P.INIT_EXT
        self.acl = bool(granted & P.POSIX_ACL)
        self.killpriv = bool(granted & P.HANDLE_KILLPRIV_V2)
        if self.posix_acl and not self.acl:
            log.warning("guest kernel does not offer POSIX_ACL: it checks mode bits only")
        if self.cache == "none" and not granted & P.DIRECT_IO_ALLOW_MMAP:
            log.info("guest kernel does not offer DIRECT_IO_ALLOW_MMAP (Linux 6.6+): a "
                     "shared mmap of a file fails with ENODEV (cache none)")
        self.uring = bool(granted & OVER_IO_URING)
        if self.uring_wanted and not self.uring:
            log.info("guest kernel does not offer FUSE over io_uring (Linux 6.14+ with "
                     "/sys/module/fuse/parameters/enable_uring=Y): requests come "
                     "through /dev/fuse")
        if self.backing is not None:
            self.backing.enabled = bool(granted & B.PASSTHROUGH)
            if not self.backing.enabled:
                log.info("guest kernel does not offer FUSE_PASSTHROUGH: reads and writes "
                         "go through the server")
        if self.cache == "auto" and self.invalidator is not None:
            # Expire-only needs the spoken minor; the epoch notification is the kernel's.
            if minor >= 38 and r.minor >= P.INC_EPOCH_MINOR:
                self.entry_timeout = self.attr_timeout
                self.invalidator.remember_names()
                self._named = self.invalidator.named
                self._names_epoch = self.invalidator.epoch
            else:
                log.info("guest kernel speaks FUSE 7.%d: names are not cached (making them "
                         "stale at a lock grant needs 7.%d, Linux 6.16)", r.minor,
                         P.INC_EPOCH_MINOR)
        self.proto_minor, self.kernel_minor = minor, r.minor
        self.initialized = True
        self._configure_fast_path()
        log.info("INIT: kernel 7.%d, speaking 7.%d, flags %#x", r.minor, minor, granted)
        out = B.INIT_OUT.pack(
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
            self.backing.stack_depth if granted & B.PASSTHROUGH else 0,  # max_stack_depth
        )
        return self._ok(msg, out)

    def _configure_fast_path(self) -> None:
        """What the native fast path (native/vl_serve.c) may answer for this session:
        the requests whose handlers here are host calls on known descriptors and do
        nothing else (WRITE not on a read-only share; GETXATTR where the session answers
        it; what tracking dates, the table keeps)."""
        if not self.native:
            return
        self.fs.table.killpriv_config(self.killpriv)  # (WRITE: whose flag decides)
        fast = {P.READ, P.STATFS, P.GETATTR, P.READDIR}
        if not self.readonly:
            fast.add(P.WRITE)
        # LOOKUP of an inode the guest knows (the table remembers the names for a grant's
        # sweep where names are cached, and keeps the deadlines when tracking), where the
        # directory check is the table's too.
        # (READDIRPLUS: its entries are lookups; OPENDIR: the same check that the
        # directory is below the share)
        if self.fs.native_lookups():
            fast |= {P.LOOKUP, P.READDIRPLUS, P.OPENDIR, P.RELEASEDIR}
            self.fs.table.opendir_config(self._opendir_flags())
            if not self.readonly:  # (names removed or moved in such directories)
                fast |= {P.UNLINK, P.RMDIR, P.RENAME, P.RENAME2}
        if P.GETXATTR in self._ops and self._ops[P.GETXATTR] == self.op_getxattr:
            # (asked before every buffered write, security.capability, unless
            # HANDLE_KILLPRIV_V2 was granted)
            fast.add(P.GETXATTR)
            self.fs.table.xattr_config(self._xattr_names is not None, self.acl)
        self.fs.table.config(frozenset(fast), P.split_timeout(self.attr_timeout),
                             P.split_timeout(self.entry_timeout))

    # ---- inodes and attributes ----
    def op_lookup(self, msg: FuseMsg, body: memoryview) -> bytes:
        name = P.p_name(body).name
        since = self._names_epoch()  # before the host is read (invalidate.py)
        node, st = self.fs.lookup(msg.nodeid, name)
        return self._entry(msg, node, st, name, since)

    def op_forget(self, msg: FuseMsg, body: memoryview) -> None:
        self.fs.forget(msg.nodeid, P.p_forget(body).nlookup)

    def op_batch_forget(self, msg: FuseMsg, body: memoryview) -> None:
        for nodeid, n in P.p_batch_forget(body).items:
            self.fs.forget(nodeid, n)

    def op_getattr(self, msg: FuseMsg, body: memoryview) -> bytes:
        r = P.p_getattr(body)
        st = self.fs.getattr(msg.nodeid, r.fh if r.flags & P.GETATTR_FH else None)
        return self._ok(msg, P.pack_attr_out(st, self._attr_time(msg.nodeid)))

    def op_setattr(self, msg: FuseMsg, body: memoryview) -> bytes:
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
            msg.nodeid,
            fh=r.fh if v & P.FATTR_FH else None,
            mode=r.mode if v & P.FATTR_MODE else None,
            uid=r.uid if v & P.FATTR_UID else None,
            gid=r.gid if v & P.FATTR_GID else None,
            size=r.size if v & P.FATTR_SIZE else None,
            atime=atime,
            mtime=mtime,
            writer_gid=self._setattr_kill(msg, v),
        )
        return self._ok(msg, P.pack_attr_out(st, self._attr_time(msg.nodeid)))

    def _setattr_kill(self, msg: FuseMsg, valid: int) -> int | None:
        """Passthrough.setattr's `writer_gid`. With HANDLE_KILLPRIV_V2 the bits are ours
        to clear: on a truncation when the guest says the caller lacks CAP_FSETID
        (FATTR_KILL_SUIDGID), and on every chown, where the host's own chown (ours, as
        root) clears setuid, and setgid with group execute, and we add what it would
        have cleared for a user: setgid where the user is not in the file's group
        (uid 0 stands for CAP_FSETID there: the flag is set for every chown). Without
        it the guest sends the new mode itself (FATTR_MODE)."""
        if not self.killpriv:
            return None
        if valid & (P.FATTR_UID | P.FATTR_GID) and msg.uid != 0:
            return msg.gid
        if valid & P.FATTR_SIZE and valid & P.FATTR_KILL_SUIDGID:
            return msg.gid
        return None

    def op_readlink(self, msg: FuseMsg, body: memoryview) -> bytes:
        return self._ok(msg, self.fs.readlink(msg.nodeid))

    def op_symlink(self, msg: FuseMsg, body: memoryview) -> bytes:
        r = P.p_symlink(body)
        since = self._names_epoch()
        node, st = self.fs.symlink(msg.nodeid, r.name, r.target, msg.uid, msg.gid)
        return self._entry(msg, node, st, r.name, since)

    def op_mknod(self, msg: FuseMsg, body: memoryview) -> bytes:
        r = P.p_mknod(body)
        mode = stat.S_IFMT(r.mode) | self._new_mode(msg.nodeid, stat.S_IMODE(r.mode), r.umask)
        rdev = os.makedev((r.rdev >> 8) & 0xFFF, (r.rdev & 0xFF) | ((r.rdev >> 12) & 0xFFF00))
        since = self._names_epoch()
        node, st = self.fs.mknod(msg.nodeid, r.name, mode, rdev, msg.uid, msg.gid)
        return self._entry(msg, node, st, r.name, since)

    def op_mkdir(self, msg: FuseMsg, body: memoryview) -> bytes:
        r = P.p_mkdir(body)
        mode = self._new_mode(msg.nodeid, r.mode & 0o7777, r.umask)
        since = self._names_epoch()
        node, st = self.fs.mkdir(msg.nodeid, r.name, mode, msg.uid, msg.gid)
        return self._entry(msg, node, st, r.name, since)

    def _new_mode(self, parent: int, mode: int, umask: int) -> int:
        """The permission bits of a new object (DONT_MASK: the umask is ours to apply).
        Under a default ACL the umask does not apply: the host applies the ACL itself when
        the object is created (our own umask is 0), as POSIX ACLs want."""
        if self.acl and self.fs.has_default_acl(parent):
            return mode
        return mode & ~umask

    def op_unlink(self, msg: FuseMsg, body: memoryview) -> bytes:
        self.fs.unlink(msg.nodeid, P.p_name(body).name)
        return self._ok(msg)

    def op_rmdir(self, msg: FuseMsg, body: memoryview) -> bytes:
        self.fs.rmdir(msg.nodeid, P.p_name(body).name)
        return self._ok(msg)

    def op_rename(self, msg: FuseMsg, body: memoryview) -> bytes:
        r = P.p_rename2(body) if msg.opcode == P.RENAME2 else P.p_rename(body)
        self.fs.rename(msg.nodeid, r.oldname, r.newdir, r.newname, r.flags)
        return self._ok(msg)

    def op_link(self, msg: FuseMsg, body: memoryview) -> bytes:
        r = P.p_link(body)
        since = self._names_epoch()
        node, st = self.fs.link(r.oldnodeid, msg.nodeid, r.name)
        return self._entry(msg, node, st, r.name, since)

    # ---- files ----
    def op_open(self, msg: FuseMsg, body: memoryview) -> bytes:
        r = P.p_open(body)
        if self.readonly and (r.flags & os.O_ACCMODE != os.O_RDONLY or r.flags & os.O_TRUNC):
            return self._encode(msg.unique, -errno.EROFS)
        self.fs.table.budget_take(msg.uid)
        try:
            kill = P.OPEN_IN.unpack_from(body)[1] & P.OPEN_KILL_SUIDGID
            fh, h = self.fs.open(msg.nodeid, r.flags, writer_gid=self._writer_gid(msg, kill))
        except BaseException:
            self.fs.table.budget_give(msg.uid)
            raise
        self.fs.table.charge(fh, msg.uid)
        return self._ok(msg, self._open_out(fh, h.backing_id))

    def _open_out(self, fh: int, backing_id: int) -> bytes:
        """fuse_open_out: a passthrough handle names its backing file (and takes no other
        flag: DIRECT_IO would override it, KEEP_CACHE is refused with it)."""
        if backing_id:
            return P.OPEN_OUT.pack(fh, B.FOPEN_PASSTHROUGH, backing_id)
        return P.OPEN_OUT.pack(fh, self.open_flags, 0)

    def op_create(self, msg: FuseMsg, body: memoryview) -> bytes:
        r = P.p_create(body)
        mode = self._new_mode(msg.nodeid, stat.S_IMODE(r.mode), r.umask)
        self.fs.table.budget_take(msg.uid)
        since = self._names_epoch()
        try:
            kill = P.CREATE_IN.unpack_from(body)[3] & P.OPEN_KILL_SUIDGID
            node, st, fh, h = self.fs.create(msg.nodeid, r.name, r.flags, mode, msg.uid,
                                             msg.gid, writer_gid=self._writer_gid(msg, kill))
        except BaseException:
            self.fs.table.budget_give(msg.uid)
            raise
        self.fs.table.charge(fh, msg.uid)
        entry = self._entry_out(msg.nodeid, r.name, node, st, since)
        return self._ok(msg, entry + self._open_out(fh, h.backing_id))

    def op_read(self, msg: FuseMsg, body: memoryview, cap: int) -> bytes:
        r = P.p_read(body)
        return self._ok(msg, self.fs.read(r.fh, r.offset, min(r.size, cap)))

    def op_write(self, msg: FuseMsg, body: memoryview) -> bytes:
        r = P.p_write(body)
        kill = P.WRITE_IN.unpack_from(body)[3] & P.WRITE_KILL_SUIDGID
        n = self.fs.write(r.fh, r.offset, r.data, writer_gid=self._writer_gid(msg, kill))
        return self._ok(msg, P.WRITE_OUT.pack(n, 0))

    def _writer_gid(self, msg: FuseMsg, kill: int) -> int | None:
        """A write or truncation by a caller without CAP_FSETID clears setuid/setgid as
        on the host (Passthrough.drop_setid): the caller's gid, or None when they stay.
        With HANDLE_KILLPRIV_V2 the guest's flag (`kill`) says it lacks CAP_FSETID;
        without, CAP_FSETID is not sent and uid 0 stands for it (native/vl_serve.c's
        WRITE is the twin of this rule)."""
        if self.killpriv:
            return msg.gid if kill else None
        return None if msg.uid == 0 else msg.gid

    def _release(self, msg: LockRequest) -> bytes:
        """RELEASE (a lock message too: _lock_request): the handle closes here, and what
        it held goes at the endpoint, given the same request."""
        self._cached(msg.nodeid)
        self._start_running()
        try:
            self._own_handle(msg)
            # One release at a time: closing the handle (the inode's count of open
            # handles) and dropping what it held happen together, so the release that
            # finds the inode closed is the last to drop anything, and only then is the
            # inode's registration with the lock service given back. Concurrent last
            # closes of one inode otherwise gave it back before the others had dropped
            # their flock and OFD locks.
            with self._release_mu:
                h = self.fs.release(msg.fh)  # (its charge given back)
                if h is not None:
                    # The last close of the handle: its flock and OFD locks go (dispatch.py).
                    self.locks.released(msg, h.inode)
            return self._ok(msg)
        finally:
            self._stop_running()

    def _own_handle(self, msg: FuseMsg) -> None:
        """RELEASE/RELEASEDIR of a handle of another inode than the message names: EINVAL,
        and the handle stays open (lockd.dispatch.handle_fd's rule; a handle already gone
        is answered as before, 0)."""
        nodeid = self.fs.nodeid_of(msg.fh)
        if nodeid is not None and nodeid != msg.nodeid:
            raise OSError(errno.EINVAL, "release of a file handle of another inode")

    def op_fsync(self, msg: FuseMsg, body: memoryview) -> bytes:
        r = P.p_fsync(body)
        self.fs.fsync(r.fh, r.datasync)
        return self._ok(msg)

    def op_fallocate(self, msg: FuseMsg, body: memoryview) -> bytes:
        r = P.p_fallocate(body)
        self.fs.fallocate(r.fh, r.offset, r.length, r.mode)
        return self._ok(msg)

    def op_lseek(self, msg: FuseMsg, body: memoryview) -> bytes:
        r = P.p_lseek(body)
        return self._ok(msg, P.LSEEK_OUT.pack(self.fs.lseek(r.fh, r.offset, r.whence)))

    # ---- directories ----
    def op_opendir(self, msg: FuseMsg, body: memoryview) -> bytes:
        self.fs.table.budget_take(msg.uid)
        try:
            fh = self.fs.opendir(msg.nodeid)
        except BaseException:
            self.fs.table.budget_give(msg.uid)
            raise
        self.fs.table.charge(fh, msg.uid)
        return self._ok(msg, P.OPEN_OUT.pack(fh, self._opendir_flags(), 0))

    def _opendir_flags(self) -> int:
        """OPENDIR's reply flags (the native OPENDIR's too): the listing is cached only
        with --cache always."""
        return P.FOPEN_CACHE_DIR | P.FOPEN_KEEP_CACHE if self.cache == "always" else 0

    def _readdir(self, msg: FuseMsg, body: memoryview, plus: bool, cap: int) -> bytes:
        r = P.p_read(body)
        limit = min(r.size, cap)
        h = self.fs.handle(r.fh)
        since = self._names_epoch()  # before the host is read (invalidate.py)
        listing = self.fs.dir_entries(r.fh, r.offset)
        table = self.fs.table
        if not plus:
            return self._ok(msg, table.dirents(listing.packed, r.offset, limit)[0])
        # The entries of inodes the guest knows are looked up natively, with the
        # directory found below the share once for the request (the session's own
        # lookups check it for each). The table builds them in one call; the loop below
        # takes the one it leaves (a new inode), then it goes on.
        checked = self.fs.below_share(h.inode)
        native = table.native is not None
        now = time.monotonic_ns()
        out: list[bytes] = []
        total = 0
        i = r.offset
        while i < listing.count:
            if native:
                chunk, i = table.direntplus(h.inode.nodeid, listing.packed, i, since, checked,
                                            limit - total)
                out.append(chunk)
                total += len(chunk)
                if i >= listing.count:
                    break
            name, ino, dtype = listing.entries()[i]
            i += 1  # (this entry's offset: the next one's index)
            size = P.align8(P.DIRENTPLUS_BASE + len(name))
            if total + size > limit:
                break
            # nodeid 0: the kernel links nothing. So for '.' and '..', and for a name the
            # guest still holds as it was given since the last sweep: it keeps what it
            # has, which spares a host lookup and the kernel's refresh per entry.
            if name in (b".", b"..") or table.names_held(h.inode.nodeid, name, now):
                entry = bytes(P.ENTRY_OUT_SIZE)
            else:
                try:
                    node, st = self.fs.lookup(h.inode.nodeid, name)
                except OSError:
                    continue  # gone since the snapshot
                entry = self._entry_out(h.inode.nodeid, name, node, st, since)
                ino = st.st_ino
            out.append(entry)
            out.append(P.pack_dirent(ino, i, dtype, name))
            total += size
        return self._ok(msg, b"".join(out))

    def op_readdir(self, msg: FuseMsg, body: memoryview, cap: int) -> bytes:
        return self._readdir(msg, body, False, cap)

    def op_readdirplus(self, msg: FuseMsg, body: memoryview, cap: int) -> bytes:
        return self._readdir(msg, body, True, cap)

    def op_releasedir(self, msg: FuseMsg, body: memoryview) -> bytes:
        self._own_handle(msg)
        self.fs.release(msg.fh)  # (its charge given back)
        return self._ok(msg)

    def op_fsyncdir(self, msg: FuseMsg, body: memoryview) -> bytes:
        r = P.p_fsync(body)
        self.fs.fsyncdir(r.fh, r.datasync)
        return self._ok(msg)

    def op_statfs(self, msg: FuseMsg, body: memoryview) -> bytes:
        s = self.fs.statfs(msg.nodeid)
        out = P.KSTATFS.pack(
            s.f_blocks, s.f_bfree, s.f_bavail, s.f_files, s.f_ffree, s.f_bsize, s.f_namemax, s.f_frsize, 0
        )
        return self._ok(msg, out)

    def op_access(self, msg: FuseMsg, body: memoryview) -> bytes:
        self.fs.access(msg.nodeid, P.p_access(body).mask, msg.uid, msg.gid)
        return self._ok(msg)

    # ---- xattrs ----
    def _sized(self, msg: FuseMsg, data: bytes, size: int, cap: int) -> bytes:
        """getxattr/listxattr: size 0 asks for the length; a short buffer is ERANGE."""
        if size == 0:
            return self._ok(msg, P.GETXATTR_OUT.pack(len(data), 0))
        if len(data) > min(size, cap):
            return self._encode(msg.unique, -errno.ERANGE)
        return self._ok(msg, data)

    def _xattr_name(self, name: bytes) -> bytes:
        """Without --xattr only the POSIX ACL names pass (when ACLs are on)."""
        if self._xattr_names is not None and name not in self._xattr_names:
            raise OSError(errno.EOPNOTSUPP, "extended attributes are off")
        return name

    def op_getxattr(self, msg: FuseMsg, body: memoryview, cap: int) -> bytes:
        r = P.p_getxattr(body)
        try:
            value = self.fs.getxattr(msg.nodeid, self._xattr_name(r.name))
        except OSError as exc:
            if self.acl and r.name in ACL_NAMES and exc.errno in (errno.EOPNOTSUPP,
                                                                  errno.ENOTSUP):
                # A guest kernel enforcing ACLs fails every permission check on an error
                # here: a file system (a submount) without ACLs has none.
                raise OSError(errno.ENODATA, "no ACL") from None
            raise
        return self._sized(msg, value, r.size, cap)

    def op_listxattr(self, msg: FuseMsg, body: memoryview, cap: int) -> bytes:
        names = self.fs.listxattr(msg.nodeid)
        if self._xattr_names is not None:
            names = b"".join(n + b"\0" for n in names.split(b"\0") if n in self._xattr_names)
        return self._sized(msg, names, P.p_listxattr(body).size, cap)

    def op_setxattr(self, msg: FuseMsg, body: memoryview) -> bytes:
        r = P.p_setxattr(body)
        self.fs.setxattr(msg.nodeid, self._xattr_name(r.name), r.value, r.flags)
        return self._ok(msg)

    def op_removexattr(self, msg: FuseMsg, body: memoryview) -> bytes:
        self.fs.removexattr(msg.nodeid, self._xattr_name(P.p_name(body).name))
        return self._ok(msg)

    # ---- live migration (fuse_server/migration.py) ----
    def save_state(self) -> dict:
        """What INIT negotiated and what the guest's handles are charged to."""
        if self.backing is not None and self.backing.enabled or self.uring:
            raise OSError(errno.EOPNOTSUPP, "passthrough and io_uring sessions do not migrate")
        return {"minor": self.proto_minor, "initialized": self.initialized, "acl": self.acl,
                "killpriv": self.killpriv, "destroyed": self.destroyed,
                "entry_timeout": self.entry_timeout, "attr_timeout": self.attr_timeout,
                "fh_uid": self.fs.table.charges()}

    def load_state(self, st: dict) -> None:
        self.proto_minor, self.initialized = int(st["minor"]), bool(st["initialized"])
        self.acl, self.destroyed = bool(st["acl"]), bool(st["destroyed"])
        # (what the guest was granted, whatever this side's option says; a source from
        # before HANDLE_KILLPRIV_V2 never granted it)
        self.killpriv = bool(st.get("killpriv", False))
        self.entry_timeout = float(st["entry_timeout"])
        self.attr_timeout = float(st["attr_timeout"])
        if self.initialized:
            self._configure_fast_path()
        for fh, uid in st["fh_uid"]:
            # counted as they were on the source, whatever our own limit says
            self.fs.table.budget_take(int(uid), force=True)
            self.fs.table.charge(int(fh), int(uid))

    def close(self) -> None:
        """The guest is gone (unmount, exit): release every lock and wait it had, and
        give the lock service its files back."""
        self.locks.end()
        if self.invalidator is not None:
            self.invalidator.close()

    def end(self) -> None:
        """close(), and this Session will not be used again (a virtio-fs device reset or
        re-INIT starts a new one): give the lock service back its file references and
        close every descriptor, so a guest rebooting many times leaks nothing. The
        guest's locks go now; descriptors that requests still running (stuck in a host
        call) may use close when the last of them returns."""
        # A transport's native loop may still hold this session's table: from now on
        # it answers nothing there, so its requests come to the session that follows.
        self.fs.table.config(frozenset(), (0, 0), (0, 0))
        self.close()
        with self._running_lock:
            self._ended = True
            running = self._running
        if running:
            log.warning("guest %r: %d requests still running; its descriptors are closed "
                        "when they return", self.guest, running)
        else:
            self.fs.close()


# Lock messages: decoded once and handed, with the bytes as they came, to the lock endpoint
# (_lock_request), never through the opcode table.
_LOCK_OPS = frozenset((P.GETLK, P.SETLK, P.SETLKW, P.INTERRUPT, P.FLUSH, P.RELEASE,
                       P.DESTROY))
_INTERRUPT, _FLUSH, _RELEASE, _DESTROY = P.INTERRUPT, P.FLUSH, P.RELEASE, P.DESTROY
_OPCODE, _UNIQUE_NODEID = struct.Struct("<I"), struct.Struct("<QQ")
RELEASE_PATIENCE_NS = 1_000_000_000  # _after_releases


def _nothing(nodeid: int) -> None:
    pass


def _always_named(parent: int, name: bytes, since: int, until: int) -> bool:
    return True


def _no_epoch() -> int:
    return 0
