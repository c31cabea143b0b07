"""Where a node id or a file handle becomes a host descriptor (native/vl_serve.c).

`Passthrough` owns the guest's inodes and handles; it publishes each one here when it
exists and retires it here when it goes, and the descriptors it published are closed
here, never directly: a request the native fast path is serving may be using one, and
then its last user closes it. The table also owns what native requests change, so that
each has one owner: an inode's lookup count and its index by host (dev, ino) (the
session makes inodes; a native LOOKUP counts one it finds), the invalidator's per-inode
"uncached" mark, the names handed out since the last grant with the sweeps' epoch
(fuse_server/invalidate.py has the rules), and, under cache auto, the lock flags that
make a locked file's attributes uncached (Session.locked_uncached) with, for a guest
without notifications, the deadlines that date what it was given (Session._first_lock).

`DescriptorTable` is the native one; `PyDescriptorTable` the same contract without the
extension (no fast path then: `native` is None).
"""

from __future__ import annotations

import errno
import os
import struct
import threading
import time

from fuse_server import protocol as P
from lockd import native, procfd
from lockd.fuse import abi

LOST, DIR, UNCACHED, LOCKED, LOCKDIR = 1, 2, 4, 8, 16
# What the fast path may answer (the session says which, per session: vl_tab_config).
NATIVE_OPCODES = frozenset((abi.LOOKUP, abi.GETATTR, abi.READ, abi.WRITE, abi.STATFS,
                            abi.GETXATTR, abi.OPENDIR, abi.READDIR, abi.READDIRPLUS,
                            abi.RELEASEDIR, abi.UNLINK, abi.RMDIR, abi.RENAME, abi.RENAME2))
MAX_REPLY_DATA = 1 << 20  # what a READ may return (INIT's max_write: session.MAX_WRITE)
MAX_RELEASING = 64  # RELEASEs registered at once (native: VL_MAX_RELEASING)


def budget_refused(err: int, uid: int) -> OSError:
    """The open budget's refusal: EMFILE (uid's own limit) or ENFILE (all users')."""
    if err == errno.EMFILE:
        return OSError(err, f"uid {uid} has as many files open on this mount as it may")
    return OSError(err, "users other than root have half the server's descriptors open")


def reply_cap(room: int | None) -> int:
    """The bytes a reply may take: the 16-byte header and at most MAX_REPLY_DATA, within
    the guest's `room` (a virtqueue chain's writable part; None: /dev/fuse's buffers)."""
    if room is None:
        return 16 + MAX_REPLY_DATA
    return 16 + max(0, min(MAX_REPLY_DATA, room - 16))


class _PyInode:
    __slots__ = ("flags", "nlookup", "key", "parent", "cached_until", "settle_until")

    def __init__(self, flags: int, nlookup: int, key: tuple[int, int] | None) -> None:
        self.flags, self.nlookup, self.key = flags, nlookup, key
        self.parent = self.cached_until = self.settle_until = 0


class PyDescriptorTable:
    """The contract, in Python (no native fast path)."""

    native = None

    def __init__(self) -> None:
        self._inodes: dict[int, _PyInode] = {}
        self._keys: dict[tuple[int, int], int] = {}
        self._mu = threading.Lock()
        # (parent, name) -> until when the guest holds the entry it was last given
        # (time.monotonic_ns(); 0: timeout 0)
        self._names: dict[tuple[int, bytes], int] = {}
        self._remember = False
        self._epoch = 0
        self._max_names = 0
        self._sweeping = False
        self._hold = 0
        self._dirnames = False
        self._listings: dict[int, tuple[int, bytes, int]] = {}  # fh -> (serial, packed, count)
        self._releasing: dict[int, tuple[int, int]] = {}  # unique -> (nodeid, since)
        self._snapshots = 0
        self._last_fh = 0
        # the open budget: uid -> handles charged, fh -> its uid, the limits, the total
        self._by_uid: dict[int, int] = {}
        self._charges: dict[int, int] = {}
        self._per_uid = self._users = self._charged = 0

    def put_inode(self, nodeid: int, fd: int, dev: int, ino: int, fmt: int, nlookup: int,
                  lost: bool = False) -> None:
        """An inode the guest has looked up `nlookup` times, found by (dev, ino) from now
        on unless lost or another inode has that identity (a migration's load)."""
        with self._mu:
            if nodeid in self._inodes:
                raise OSError(errno.EEXIST, f"inode {nodeid} is in the table")
            key = (dev, ino) if not lost and (dev, ino) not in self._keys else None
            self._inodes[nodeid] = _PyInode(LOST if lost else 0, nlookup, key)
            if key is not None:
                self._keys[key] = nodeid

    def put_handle(self, fh: int, fd: int, nodeid: int, is_dir: bool, lost: bool) -> None:
        pass

    def ref_key(self, dev: int, ino: int) -> int:
        """One more lookup of the inode with that identity: its node id, or 0."""
        with self._mu:
            nodeid = self._keys.get((dev, ino), 0)
            if nodeid:
                self._inodes[nodeid].nlookup += 1
            return nodeid

    def ref(self, nodeid: int, delta: int) -> int:
        """The lookup count changed by `delta` (FORGET: negative): the new count (at 0
        the inode is no longer found by identity), or -ENOENT."""
        with self._mu:
            e = self._inodes.get(nodeid)
            if e is None:
                return -errno.ENOENT
            e.nlookup = max(0, e.nlookup + delta)
            if not e.nlookup and e.key is not None and nodeid != 1:  # (the root stays)
                del self._keys[e.key]
                e.key = None
            return e.nlookup

    def nlookup(self, nodeid: int) -> int:
        return max(0, self.ref(nodeid, 0))

    def drop_inode(self, nodeid: int, fd: int, close: bool) -> None:
        with self._mu:
            e = self._inodes.pop(nodeid, None)
            if e is not None and e.key is not None:
                del self._keys[e.key]
        if close:
            os.close(fd)

    def drop_handle(self, fh: int, fd: int, close: bool) -> None:
        """Handle fh is gone: its descriptor closed if `close`, its charge given back."""
        with self._mu:
            self._listings.pop(fh, None)
            uid = self._charges.pop(fh, 0)
            if uid:
                self._give(uid)
        if close:
            os.close(fd)

    # ---- file handle ids and the open budget ----
    def new_fh(self) -> int:
        """The next file handle id (the session's opens and a native OPENDIR alike)."""
        with self._mu:
            self._last_fh += 1
            return self._last_fh

    def set_next_fh(self, fh: int) -> None:
        """Ids go on from fh (a migration's load), never back."""
        with self._mu:
            self._last_fh = max(self._last_fh, fh - 1)

    def adopt(self, fh: int) -> tuple[int, int] | None:
        """A handle a native OPENDIR made, taken over by the caller (Passthrough) the
        first time it needs it: (its descriptor, its inode's node id); None for any other
        (the caller's own already, being released natively, or unknown)."""
        return None

    def native_handles(self) -> list[int]:
        """The handles a native OPENDIR made that nobody adopted yet."""
        return []

    def opendir_config(self, open_flags: int) -> None:
        """The fuse_open_out flags of a native OPENDIR's reply."""

    def budget_config(self, per_uid: int, users: int) -> None:
        """Each uid but root may hold per_uid handles, all of them together `users` (0:
        unbounded; the Session's open budget)."""
        with self._mu:
            self._per_uid, self._users = per_uid, users

    def budget_take(self, uid: int, force: bool = False) -> None:
        """One more handle for uid, or EMFILE/ENFILE (nothing counted); `force`: counted
        whatever the limits (a migration's load)."""
        if uid == 0:
            return
        with self._mu:
            n = self._by_uid.get(uid, 0)
            if not force and self._per_uid and n >= self._per_uid:
                raise budget_refused(errno.EMFILE, uid)
            if not force and self._users and self._charged >= self._users:
                raise budget_refused(errno.ENFILE, uid)
            self._by_uid[uid] = n + 1
            self._charged += 1

    def budget_give(self, uid: int) -> None:
        """One of uid's back (an open that failed after budget_take)."""
        with self._mu:
            self._give(uid)

    def _give(self, uid: int) -> None:
        n = self._by_uid.get(uid, 0)
        if n <= 0:
            return
        self._charged -= 1
        if n > 1:
            self._by_uid[uid] = n - 1
        else:
            del self._by_uid[uid]

    def charge(self, fh: int, uid: int) -> None:
        """Handle fh holds one of uid's (taken): given back when it is dropped."""
        if uid:
            with self._mu:
                self._charges[fh] = uid

    def charges(self) -> list[tuple[int, int]]:
        """Every charged handle and its uid."""
        with self._mu:
            return list(self._charges.items())

    def flags(self, nodeid: int, set_: int = 0, clear: int = 0) -> int:
        """The inode's flags before the change; -ENOENT for an unknown one."""
        with self._mu:
            e = self._inodes.get(nodeid)
            if e is None:
                return -errno.ENOENT
            old, e.flags = e.flags, (e.flags | set_) & ~clear
            return old

    def config(self, ops: frozenset[int], attr: tuple[int, int],
               entry: tuple[int, int]) -> None:
        """Which opcodes the fast path answers from now on, and the (seconds,
        nanoseconds) of the attribute and entry timeouts its replies give."""

    def set_share(self, top: bytes) -> None:
        """The share's path as /proc names it, ending in '/' (LOOKUP's check that a
        directory is still below it)."""

    def set_moves(self, moves: object | None) -> None:
        """The share's count of directory renames (fuse_server/moves.py)."""

    def beneath(self, nodeid: int) -> tuple[bool, int]:
        """(True, _) if directory nodeid is known below the share; else (False, count)
        for `beneath_seen` after a check within the share's mount (0: nothing kept)."""
        return False, 0

    def beneath_seen(self, nodeid: int, count: int) -> None:
        """Directory nodeid was found below the share within its mount at `count`."""

    def xattr_config(self, acl_names_only: bool, acl: bool) -> None:
        """GETXATTR: only the POSIX ACL names pass (extended attributes off), and
        whether INIT granted POSIX ACLs."""

    def killpriv_config(self, on: bool) -> None:
        """WRITE: INIT granted HANDLE_KILLPRIV_V2 (the guest's write_flags say whether
        setuid/setgid go), or not (every caller but uid 0 clears them)."""

    # Cache auto (Session.locked_uncached; without notifications Session._first_lock):
    # per inode, until when the guest may hold what it was given, the directory it was
    # last named in, LOCKED/LOCKDIR, and when its grants may answer; times in
    # CLOCK_MONOTONIC ns (time.monotonic_ns). Deadlines are set and flags read together.
    def tracking(self, mode: int, hold_ns: int) -> None:
        """0 off; 1 a locked file's attributes and name uncached; 2 also the names in its
        directory (no notifications); and how long the guest may hold what it is given
        (ns)."""
        self._hold = hold_ns
        self._dirnames = mode > 1

    def attr_time(self, nodeid: int, now: int) -> int:
        """An attribute reply's deadline set: 1 if the inode is locked (timeout 0), 0,
        or -ENOENT."""
        with self._mu:
            e = self._inodes.get(nodeid)
            if e is None:
                return -errno.ENOENT
            e.cached_until = now + self._hold
            return int(bool(e.flags & LOCKED))

    def entry_times(self, parent: int, nodeid: int, now: int) -> int:
        """An entry reply's deadlines set: bit 1 the inode is locked, bit 2 its
        directory holds a locked file; -ENOENT."""
        with self._mu:
            e = self._inodes.get(nodeid)
            if e is None:
                return -errno.ENOENT
            e.cached_until, e.parent = now + self._hold, parent
            d = self._inodes.get(parent)
            if d is not None:
                d.cached_until = e.cached_until
            return int(bool(e.flags & LOCKED)) | (
                2 if self._dirnames and d is not None and d.flags & LOCKDIR else 0)

    def first_lock(self, nodeid: int, now: int, late: int) -> int:
        """A lock request on the inode: marked locked (and its directory) the first
        time; when its grants may answer (fixed then); -ENOENT."""
        with self._mu:
            e = self._inodes.get(nodeid)
            if e is None:
                return -errno.ENOENT
            if not e.flags & LOCKED:
                e.flags |= LOCKED
                p = self._inodes.get(e.parent) if e.parent else None
                if p is not None:
                    p.flags |= LOCKDIR
                e.settle_until = max(e.cached_until, p.cached_until if p is not None else 0)
                if e.settle_until + late > now:
                    e.settle_until = max(e.settle_until, now + self._hold)
            return e.settle_until

    def tracked(self, nodeid: int) -> tuple[int, bool, bool, int]:
        """(parent, locked, lockdir, cached_until) of an inode, for a migration's state."""
        with self._mu:
            e = self._inodes.get(nodeid)
            if e is None:
                return 0, False, False, 0
            return e.parent, bool(e.flags & LOCKED), bool(e.flags & LOCKDIR), e.cached_until

    def set_tracked(self, nodeid: int, parent: int, locked: bool, lockdir: bool,
                    cached_until: int) -> None:
        with self._mu:
            e = self._inodes.get(nodeid)
            if e is not None:
                e.parent, e.cached_until = parent, cached_until
                e.flags |= (LOCKED if locked else 0) | (LOCKDIR if lockdir else 0)

    # Names handed out with an entry timeout since the last sweep, for the next lock
    # grant's sweep (the rule is fuse_server/invalidate.py's; the set lives here, where
    # native LOOKUPs add to it too).
    def names_config(self, remember: bool, max_names: int) -> None:
        """Remember names (else LOOKUP replies are fresh without it), at most
        `max_names` before a sweep is asked for."""
        self._remember = remember
        self._max_names = max_names

    def names_epoch(self) -> int:
        """Sweeps begun so far: read before the host names are."""
        return self._epoch

    def named(self, parent: int, name: bytes, since: int, until: int) -> int:
        """(parent, name) read from the host after names_epoch() answered `since`, given
        to the guest with an entry it holds until `until` (time.monotonic_ns(); 0:
        timeout 0): 0 not to be cached (a sweep began since), 1 remembered, 2 remembered
        and the set is full (sweep it now)."""
        with self._mu:
            if since != self._epoch:
                return 0
            self._names[parent, name] = until
            if len(self._names) >= self._max_names and not self._sweeping:
                self._sweeping = True
                return 2
            return 1

    def names_held(self, parent: int, name: bytes, now: int) -> bool:
        """Was (parent, name) given since the last sweep with an entry the guest still
        holds at `now` (a READDIRPLUS then leaves it as it is)?"""
        with self._mu:
            return self._remember and self._names.get((parent, name), 0) > now

    def names_needed(self, nodeid: int) -> bool:
        """Does a grant of `nodeid` need notifications (the guest may have cached some
        of it, or names wait)? False also begins an epoch."""
        with self._mu:
            e = self._inodes.get(nodeid)
            if e is None or not e.flags & UNCACHED or self._names:
                return True
            self._epoch += 1
            return False

    def take_names(self) -> list[tuple[int, bytes]]:
        """Every remembered name, taken: a sweep begins."""
        with self._mu:
            names, self._names = self._names, {}
            self._epoch += 1
            self._sweeping = False
        return list(names)

    # RELEASEs read and not yet answered (Session._after_releases): the native fast path
    # registers those it reads, the session those other transports read (once each).
    def releasing_add(self, unique: int, nodeid: int) -> None:
        with self._mu:
            if unique not in self._releasing and len(self._releasing) < MAX_RELEASING:
                self._releasing[unique] = (nodeid, time.monotonic_ns())

    def releasing_done(self, unique: int) -> None:
        with self._mu:
            self._releasing.pop(unique, None)

    def releasing_before(self, unique: int, nodeid: int, since: int) -> bool:
        """Is a RELEASE of `nodeid` registered since `since` (time.monotonic_ns()) with
        a lower unique (sent before) still being answered? (With order_reads on, the
        requests just before `unique` are first waited for, 50 ms at most.)"""
        with self._mu:
            return any(u < unique and n == nodeid and t >= since
                       for u, (n, t) in self._releasing.items())

    def order_reads(self, on: bool) -> bool:
        """Every request is read by the native /dev/fuse loop (vl_fuse_serve), which
        notes each one's unique: releasing_before may wait for those just before its
        own. Returns what it was. Nothing to note without the loop."""
        return False

    def served(self, opcode: int) -> int:
        """Requests of `opcode` the native fast path has answered."""
        return 0

    def direntplus(self, parent: int, packed: bytes, first: int, since: int, checked: bool,
                   limit: int) -> tuple[bytes, int]:
        """READDIRPLUS: entries from index `first` of a listing (`packed`: pack_entries),
        each looked up as a native LOOKUP would be (the names epoch `since` read before
        the listing; `checked`: the directory was found below the share for this
        request), built as the session builds them while they
        fit in `limit` bytes; stops before one the session must look up. (the entries'
        bytes, the index to go on from)"""
        return b"", first

    def set_listing(self, fh: int, packed: bytes, count: int) -> int:
        """Directory handle fh's snapshot is now this listing (`packed`: pack_entries, of
        `count` entries). The table owns it: the fast path's READDIRs read it, the
        session with listing(). Its serial, or 0 when not kept (an unknown handle, no
        memory: the session takes another one when it next needs it)."""
        with self._mu:
            self._snapshots += 1
            self._listings[fh] = (self._snapshots, packed, count)
            return self._snapshots

    def listing(self, fh: int, have: int) -> tuple[int, tuple[bytes, int] | None]:
        """Handle fh's snapshot: (its serial, 0 for none; and (packed, count), or None
        when the serial is `have`: the caller holds that one already)."""
        with self._mu:
            got = self._listings.get(fh)
        if got is None:
            return 0, None
        return got[0], (None if got[0] == have else got[1:])

    def dirents(self, packed: bytes, first: int, limit: int) -> tuple[bytes, int]:
        """READDIR: the fuse_dirents of a listing (`packed`: pack_entries) from index
        `first` while they fit in `limit` bytes (the bytes, the index to go on from)."""
        out: list[bytes] = []
        total, nxt = 0, first
        for i, (name, ino, dtype) in enumerate(unpack_entries(packed)):
            if i < first:
                continue
            rec = P.pack_dirent(ino, i + 1, dtype, name)
            if total + len(rec) > limit:
                break
            out.append(rec)
            total += len(rec)
            nxt = i + 1
        return b"".join(out), nxt

    def serve(self, buf: bytes | bytearray | memoryview, room: int | None) -> memoryview | None:
        """The fast path's reply to one request (valid until this thread's next call),
        or None when the session must answer it. `room` as for Session.handle (None:
        /dev/fuse)."""
        return None


class DescriptorTable(PyDescriptorTable):
    def __init__(self) -> None:
        lib, ffi = native.lib, native.ffi
        self._lib = lib
        self.native = ffi.gc(lib.vl_tab_new(), lib.vl_tab_free)
        if self.native == ffi.NULL:
            raise MemoryError("descriptor table")
        self._replies = threading.local()

    def _check(self, ret: int) -> None:
        if ret < 0:
            raise OSError(-ret, os.strerror(-ret))

    def put_inode(self, nodeid: int, fd: int, dev: int, ino: int, fmt: int, nlookup: int,
                  lost: bool = False) -> None:
        self._check(self._lib.vl_tab_put_inode(self.native, nodeid, fd, dev, ino, fmt,
                                               nlookup, LOST if lost else 0))

    def put_handle(self, fh: int, fd: int, nodeid: int, is_dir: bool, lost: bool) -> None:
        flags = (DIR if is_dir else 0) | (LOST if lost else 0)
        self._check(self._lib.vl_tab_put_handle(self.native, fh, fd, nodeid, flags))

    def ref_key(self, dev: int, ino: int) -> int:
        return self._lib.vl_tab_ref_key(self.native, dev, ino)

    def ref(self, nodeid: int, delta: int) -> int:
        return self._lib.vl_tab_ref(self.native, nodeid, delta)

    def drop_inode(self, nodeid: int, fd: int, close: bool) -> None:
        if self._lib.vl_tab_drop_inode(self.native, nodeid, int(close)) < 0 and close:
            os.close(fd)  # never published (a load that failed half-way)

    def drop_handle(self, fh: int, fd: int, close: bool) -> None:
        if self._lib.vl_tab_drop_handle(self.native, fh, int(close)) < 0 and close:
            os.close(fd)

    def new_fh(self) -> int:
        return self._lib.vl_tab_new_fh(self.native)

    def set_next_fh(self, fh: int) -> None:
        self._lib.vl_tab_set_next_fh(self.native, fh)

    def adopt(self, fh: int) -> tuple[int, int] | None:
        e = native.ffi.new("vl_tab_entry *")
        if self._lib.vl_tab_adopt(self.native, fh, e) != 1:
            return None
        return e.fd, e.nodeid

    def _listed(self, lister, *ctypes: str) -> list[list[int]]:  # noqa: ANN001 - a C function
        """What a vl_tab_* lister holds, one list per array it fills: it answers its
        count, so it is asked again with room for that many until they fit."""
        ffi = native.ffi
        while True:
            n = lister(self.native, *(ffi.NULL for _ in ctypes), 0)
            arrays = [ffi.new(f"{c}[]", max(n, 1)) for c in ctypes]
            if lister(self.native, *arrays, n) <= n:
                return [list(a)[:n] for a in arrays]

    def native_handles(self) -> list[int]:
        return self._listed(self._lib.vl_tab_native_handles, "uint64_t")[0]

    def opendir_config(self, open_flags: int) -> None:
        self._lib.vl_tab_opendir_config(self.native, open_flags)

    def budget_config(self, per_uid: int, users: int) -> None:
        self._lib.vl_tab_budget_config(self.native, per_uid, users)

    def budget_take(self, uid: int, force: bool = False) -> None:
        err = -self._lib.vl_tab_budget_take(self.native, uid, int(force))
        if err in (errno.EMFILE, errno.ENFILE):
            raise budget_refused(err, uid)
        self._check(-err)

    def budget_give(self, uid: int) -> None:
        self._lib.vl_tab_budget_give(self.native, uid)

    def charge(self, fh: int, uid: int) -> None:
        self._check(self._lib.vl_tab_charge(self.native, fh, uid))

    def charges(self) -> list[tuple[int, int]]:
        fhs, uids = self._listed(self._lib.vl_tab_charges, "uint64_t", "uint32_t")
        return list(zip(fhs, uids, strict=True))

    def flags(self, nodeid: int, set_: int = 0, clear: int = 0) -> int:
        return self._lib.vl_tab_flags(self.native, nodeid, set_, clear)

    def config(self, ops: frozenset[int], attr: tuple[int, int],
               entry: tuple[int, int]) -> None:
        mask = 0
        for op in ops:
            mask |= 1 << op
        self._lib.vl_tab_config(self.native, mask, *attr, *entry)

    def set_share(self, top: bytes) -> None:
        self._check(self._lib.vl_tab_set_share(self.native, top, len(top),
                                               procfd.prefix().encode()))

    def set_moves(self, moves: object | None) -> None:
        if moves is not None:
            self._lib.vl_tab_set_moves(self.native, moves)

    def beneath(self, nodeid: int) -> tuple[bool, int]:
        count = native.ffi.new("uint64_t *")
        known = self._lib.vl_tab_beneath(self.native, nodeid, count)
        return bool(known), count[0]

    def beneath_seen(self, nodeid: int, count: int) -> None:
        self._lib.vl_tab_beneath_seen(self.native, nodeid, count)

    def xattr_config(self, acl_names_only: bool, acl: bool) -> None:
        self._lib.vl_tab_xattr_config(self.native, int(acl_names_only), int(acl))

    def killpriv_config(self, on: bool) -> None:
        self._lib.vl_tab_killpriv_config(self.native, int(on))

    def tracking(self, mode: int, hold_ns: int) -> None:
        self._lib.vl_tab_tracking(self.native, mode, hold_ns)

    def attr_time(self, nodeid: int, now: int) -> int:
        return self._lib.vl_tab_attr_time(self.native, nodeid, now)

    def entry_times(self, parent: int, nodeid: int, now: int) -> int:
        return self._lib.vl_tab_entry_times(self.native, parent, nodeid, now)

    def first_lock(self, nodeid: int, now: int, late: int) -> int:
        return self._lib.vl_tab_first_lock(self.native, nodeid, now, late)

    def tracked(self, nodeid: int) -> tuple[int, bool, bool, int]:
        e = native.ffi.new("vl_tab_entry *")
        if self._lib.vl_tab_get(self.native, 0, nodeid, e) < 0:
            return 0, False, False, 0
        return e.parent, bool(e.flags & LOCKED), bool(e.flags & LOCKDIR), e.cached_until

    def set_tracked(self, nodeid: int, parent: int, locked: bool, lockdir: bool,
                    cached_until: int) -> None:
        self._lib.vl_tab_set_tracked(self.native, nodeid, parent,
                                     (LOCKED if locked else 0) | (LOCKDIR if lockdir else 0),
                                     cached_until)

    def names_config(self, remember: bool, max_names: int) -> None:
        self._lib.vl_tab_names_config(self.native, int(remember), max_names)

    def names_epoch(self) -> int:
        return self._lib.vl_tab_names_epoch(self.native)

    def named(self, parent: int, name: bytes, since: int, until: int) -> int:
        return self._lib.vl_tab_names_add(self.native, parent, name, len(name), since, until)

    def names_held(self, parent: int, name: bytes, now: int) -> bool:
        return bool(self._lib.vl_tab_names_held(self.native, parent, name, len(name), now))

    def releasing_add(self, unique: int, nodeid: int) -> None:
        self._lib.vl_tab_releasing_add(self.native, unique, nodeid)

    def releasing_done(self, unique: int) -> None:
        self._lib.vl_tab_releasing_done(self.native, unique)

    def releasing_before(self, unique: int, nodeid: int, since: int) -> bool:
        return bool(self._lib.vl_tab_releasing_before(self.native, unique, nodeid, since))

    def order_reads(self, on: bool) -> bool:
        return bool(self._lib.vl_tab_order_reads(self.native, int(on)))

    def names_needed(self, nodeid: int) -> bool:
        return bool(self._lib.vl_tab_names_needed(self.native, nodeid))

    def take_names(self) -> list[tuple[int, bytes]]:
        lib, ffi = self._lib, native.ffi
        ns = lib.vl_tab_names_take(self.native)
        if ns == ffi.NULL:
            return []
        try:
            parent, s = ffi.new("uint64_t *"), ffi.new("const char **")
            out = []
            for i in range(lib.vl_names_count(ns)):
                n = lib.vl_names_get(ns, i, parent, s)
                out.append((parent[0], ffi.unpack(s[0], n)))
            return out
        finally:
            lib.vl_names_free(ns)

    def served(self, opcode: int) -> int:
        return self._lib.vl_tab_served(self.native, opcode)

    def direntplus(self, parent: int, packed: bytes, first: int, since: int, checked: bool,
                   limit: int) -> tuple[bytes, int]:
        ffi = native.ffi
        out, nxt = ffi.new("uint8_t[]", max(limit, 1)), ffi.new("uint64_t *")
        n = self._lib.vl_tab_direntplus(self.native, parent, packed, len(packed), first, since,
                                        int(checked), out, limit, nxt)
        self._check(n)
        return ffi.buffer(out, n)[:], nxt[0]

    def set_listing(self, fh: int, packed: bytes, count: int) -> int:
        return max(0, self._lib.vl_tab_set_listing(self.native, fh, packed, len(packed), count))

    def listing(self, fh: int, have: int) -> tuple[int, tuple[bytes, int] | None]:
        ffi = native.ffi
        out, n, count = ffi.new("uint8_t **"), ffi.new("size_t *"), ffi.new("uint64_t *")
        serial = self._lib.vl_tab_listing(self.native, fh, have, out, n, count)
        if out[0] == ffi.NULL:
            return max(0, serial), None
        try:
            return serial, (ffi.buffer(out[0], n[0])[:], count[0])
        finally:
            self._lib.vl_free(out[0])

    def dirents(self, packed: bytes, first: int, limit: int) -> tuple[bytes, int]:
        ffi = native.ffi
        out, nxt = ffi.new("uint8_t[]", max(limit, 1)), ffi.new("uint64_t *")
        n = self._lib.vl_dirents(packed, len(packed), first, out, limit, nxt)
        self._check(n)
        return ffi.buffer(out, n)[:], nxt[0]

    def serve(self, buf: bytes | bytearray | memoryview, room: int | None) -> memoryview | None:
        out = getattr(self._replies, "out", None)
        if out is None:  # this thread's, for READs up to 1 MiB; never cleared (untouched
            out = self._replies.out = _uncleared("uint8_t[]", reply_cap(None))  # pages)
        n = self._lib.vl_serve(self.native, native.ffi.from_buffer(buf), len(buf), out,
                               reply_cap(room))
        return memoryview(native.ffi.buffer(out, n)) if n else None


_uncleared = native.ffi.new_allocator(should_clear_after_alloc=False) if native.HAVE_NATIVE \
    else None


_ENTRY_REC = struct.Struct("<QII")  # ino, d_type, name length; then the name


def pack_entries(ents: list[tuple[bytes, int, int]]) -> bytes:
    """A directory listing [(name, ino, d_type)] as vl_tab_direntplus reads it."""
    return b"".join(_ENTRY_REC.pack(ino, dtype, len(name)) + name for name, ino, dtype in ents)


def unpack_entries(packed: bytes) -> list[tuple[bytes, int, int]]:
    """pack_entries, undone (EINVAL for a truncated record)."""
    ents = []
    at, view = 0, memoryview(packed)
    while at < len(packed):
        if at + _ENTRY_REC.size > len(packed):
            raise OSError(errno.EINVAL, "truncated listing")
        ino, dtype, n = _ENTRY_REC.unpack_from(packed, at)
        at += _ENTRY_REC.size
        if at + n > len(packed):
            raise OSError(errno.EINVAL, "truncated listing")
        ents.append((bytes(view[at:at + n]), ino, dtype))
        at += n
    return ents


def new_table() -> PyDescriptorTable:
    return DescriptorTable() if native.HAVE_NATIVE else PyDescriptorTable()
