"""Coherent page caches under locks: before a guest hears that it holds a lock, its cached
pages and attributes of the file are dropped (FUSE_NOTIFY_INVAL_INODE), so that its next
read sees what other guests wrote under the lock (`--cache auto`).

Why a thread of its own: writing NOTIFY_INVAL_INODE to /dev/fuse runs
invalidate_inode_pages2_range in the writing thread, which waits for every page lock of
the file. A page is locked while a guest READ (or a page fault) for it waits for our
reply. If a thread that serves requests wrote the notification, and the threads that
could answer that READ were all doing the same, nobody would answer: the mount hangs
with its processes in D state. So notifications are written only by the `Invalidator`
thread, which serves no requests and holds no lock any request path takes; the grant's
reply is written by that same thread right after its notification returned. Request
threads only hand it work and go on, so a READ is always served and every invalidation
finishes.

Which grants need one: the guest's pages and attributes of an inode only ever come from
our replies. The session marks an inode "uncached" when it sends the notification and
"cached" again at every other request naming it (READ, GETATTR, LOOKUP, ...); a grant on
an inode still uncached needs no notification, unless another grant is still queued here
or being answered (its notifications have not returned yet: `hold`). The mark is kept with
the inode in the descriptor table (fuse_server/fdtable.py), where the native fast path
clears it too. Another guest's or the host's writes do not matter: they can only be seen
through a later request, answered with current data. The notification is not enough for
attributes, though: a stat racing the guest's application of another process's reply
can read old ones as valid, so a locked file's are never cached (Session.locked_uncached).

Names (`--cache auto` caches them 1 s, as Rust virtiofsd does): a grant also makes stale
every name the session handed out with a timeout since the previous grant, so that after
a lock call returns, a walk of any path in the share sees the host's names as of the grant,
and the attributes of what it reaches (the LOOKUP carries them): a SQLite journal another
guest deleted under its lock is not found again through a stale name. Two notifications
do it, because the guest kernel applies a LOOKUP reply in two ways:
- a first lookup of a name, and a READDIRPLUS that links names, hold the directory's lock
  while they apply the reply; FUSE_NOTIFY_INVAL_ENTRY with FUSE_EXPIRE_ONLY (7.38) takes
  that lock too, so it expires the name after the reply that brought it;
- a revalidation (a LOOKUP of a name whose time ran out) holds no lock: its reply, written
  before the grant's notifications, can be applied after them, and would make the name
  valid for another second past the grant (the trace of the last SQLite failure, a
  journal deleted meanwhile taken for a hot one). FUSE_NOTIFY_INC_EPOCH (7.44, Linux
  6.16) covers it: a dentry remembers the epoch read before its first lookup, and a
  revalidation first checks it against the current one, so every name looked up before
  the grant is asked again, whenever a late reply set its time.
The session caches names only for a kernel that handles both (op_init); an older one gets
every name with timeout 0. The names are remembered from the reply that gave them until
the next grant; past `MAX_NAMES` the thread expires them all at once, so the set stays
bounded even on a share nobody locks.

A name read from the host before a grant and handed out after it would escape the grant's
sweep, and the grant's taker would walk a name older than its lock (a SQLite reader then
takes a journal deleted meanwhile for a hot one and rolls committed pages back). So a
request reads the epoch before it reads the host, every grant begins a new epoch (a sweep,
or `hold` when there is nothing to sweep), and a request's names are remembered only if
no grant came since (`named` answers False otherwise: the reply gives them timeout 0).
"""

from __future__ import annotations

import errno
import logging
import queue
import struct
import threading
from collections.abc import Callable

from fuse_server import protocol as P
from fuse_server.fdtable import UNCACHED, PyDescriptorTable

log = logging.getLogger("vfs-lockd.fuse")

# fuse_out_header + fuse_notify_inval_entry_out (parent, namelen, flags); the name and its
# NUL follow.
_INVAL_ENTRY = struct.Struct("<IiQQII")
EXPIRE_ONLY = 1  # FUSE_EXPIRE_ONLY (7.38): mark the dentry stale, do not unhash it
# Names remembered for the next grant; beyond this many they are expired at once.
MAX_NAMES = 16384


def notify_inval_entry(parent: int, name: bytes, flags: int = EXPIRE_ONLY) -> bytes:
    """FUSE_NOTIFY_INVAL_ENTRY: the guest's dentry `name` in directory `parent` is stale."""
    return _INVAL_ENTRY.pack(_INVAL_ENTRY.size + len(name) + 1, P.NOTIFY_INVAL_ENTRY, 0,
                             parent, len(name), flags) + name + b"\0"


class Invalidator:
    def __init__(self, send: Callable[[bytes], None], marks: PyDescriptorTable) -> None:
        self.send = send
        # The inodes' UNCACHED marks, and the names remembered for the next sweep with
        # the count of sweeps begun (the epoch): the table's, where native requests
        # mark and remember too.
        self._marks = marks
        marks.names_config(False, MAX_NAMES)
        # Requests whose reply is queued here, not written yet: an INTERRUPT for one of
        # them needs no reply (the answer is on its way). Answering it EAGAIN instead
        # would make the kernel resend it at once, and the kernel reads interrupts before
        # anything else: the READ or WRITE holding the page lock the notification waits
        # for would never be read.
        self.answering: set[int] = set()
        # Grants queued or being answered here (see hold); _mu orders a grant's check
        # against the queue.
        self._pending = 0
        self._mu = threading.Lock()
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="fuse-invalidate", daemon=True)
        self._thread.start()

    def cached(self, nodeid: int) -> None:
        """A request may put pages or attributes of the inode into the guest's caches."""
        self._marks.flags(nodeid, clear=UNCACHED)

    def uncached(self, nodeid: int) -> bool:
        """Has the guest nothing of the inode cached since its last notification? (An
        inode it has forgotten counts as cached: its notification finds nothing.)"""
        f = self._marks.flags(nodeid)
        return f >= 0 and bool(f & UNCACHED)

    def remember_names(self) -> None:
        """Names are cached from now on (op_init: the kernel handles epochs): each one
        handed out is remembered for the next sweep, native LOOKUPs' too."""
        self._marks.names_config(True, MAX_NAMES)

    def epoch(self) -> int:
        """Read by a request before it reads the host names it will hand out."""
        return self._marks.names_epoch()

    def named(self, parent: int, name: bytes, since: int, until: int) -> bool:
        """May the guest cache `name` in `parent` (an entry reply with a timeout, which
        it holds until `until`, time.monotonic_ns()), read from the host after `epoch()`
        answered `since`? Remembered for the next sweep if so; False if a sweep began
        since (the name must not be cached)."""
        r = self._marks.named(parent, name, since, until)
        if r == 2:  # the set is full: expire them all now (the thread, never a request's)
            with self._mu:
                self._pending += 1  # a grant meanwhile waits for the sweep (hold)
                self._q.put((0, None))
        return r > 0

    def hold(self, nodeid: int, reply: bytes) -> bool:
        """A grant of `nodeid`: True when its reply is taken, to be sent by the thread
        after the notifications it needs; False when it needs none (send it now).

        It needs them when the guest may have cached some of the inode since the last
        notification, or names wait for a sweep; and whenever another grant is still
        queued here or being answered, of any inode: the thread marks an inode uncached
        and takes the names as it begins their notifications, but the guest drops its
        caches only as each notification returns, so a grant that trusted the mark or
        the empty set meanwhile would reach its taker first. (Two processes of a guest
        granted read locks together: the second read a size cached before its lock, and
        SQLite found its database malformed.) A grant that needs none still begins a new
        epoch, atomically with the check: a name read from the host before it and not
        remembered yet (its request is between its host read and `named`) must not be
        cached past it either."""
        with self._mu:
            if not self._pending and not self._marks.names_needed(nodeid):
                return False
            self._pending += 1
            self.answering.add(P.OUT_HEADER.unpack_from(reply)[2])
            self._q.put((nodeid, reply))  # behind every grant it must follow
        return True

    def _answered(self) -> None:
        """A grant's reply (or a full set's sweep) is out: grants need not follow it."""
        with self._mu:
            self._pending -= 1

    def _run(self) -> None:
        while True:
            item = self._q.get()
            if item is None:
                return
            nodeid, reply = item
            # The names first: taking them begins a new epoch, so a LOOKUP that read
            # the host before this grant and marks its inode after it gives its
            # attributes no time. One that marked before is seen by the look at the mark
            # below, and its attributes are dropped by the notification. (Looking at the
            # mark first left a gap between the two: its attributes stayed cached.)
            names = self._marks.take_names()
            if reply is None:  # the set of names is full
                self._expire(names)
                self._answered()
                continue
            if not self.uncached(nodeid):
                # Marked before the notification: a request that caches something
                # meanwhile unmarks it, and what it cached before is dropped by this
                # notification.
                self._marks.flags(nodeid, set_=UNCACHED)
                try:
                    self.send(P.notify_inval_inode(nodeid))
                except OSError as exc:
                    if exc.errno != errno.ENOENT:  # ENOENT: the guest has no such inode
                        self._marks.flags(nodeid, clear=UNCACHED)
                        log.warning("inval_inode(%d) failed: %s", nodeid, exc)
            self._expire(names)
            try:
                self.send(reply)
            except OSError as exc:  # ENOENT: the request is gone (interrupted)
                log.debug("lock reply after invalidation not delivered: %s", exc)
            self.answering.discard(P.OUT_HEADER.unpack_from(reply)[2])
            self._answered()

    def _expire(self, names: list[tuple[int, bytes]]) -> None:
        """The names handed out before the sweep began (taken before the notifications:
        a name handed out meanwhile waits for the next grant): stale in the guest now."""
        if names:
            try:
                self.send(P.notify_inc_epoch())
            except OSError as exc:
                log.warning("inc_epoch failed: %s", exc)
        for parent, name in names:
            try:
                self.send(notify_inval_entry(parent, name))
            except OSError as exc:
                if exc.errno != errno.ENOENT:  # ENOENT: not cached (any more)
                    log.warning("inval_entry(%d, %r) failed: %s", parent, name, exc)

    def close(self) -> None:
        self._q.put(None)
        self._thread.join(10)
