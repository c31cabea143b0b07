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
an inode still uncached needs no notification. Another guest's or the host's writes do
not matter: they can only be seen through a later request, answered with current data.
"""

from __future__ import annotations

import errno
import logging
import queue
import threading
from collections.abc import Callable

from fuse_server import protocol as P

log = logging.getLogger("vfs-lockd.fuse")


class Invalidator:
    def __init__(self, send: Callable[[bytes], None]) -> None:
        self.send = send
        self.uncached: set[int] = set()
        # Requests whose reply is queued here, not written yet: an INTERRUPT for one of
        # them needs no reply (the answer is on its way). Answering it EAGAIN instead
        # would make the kernel resend it at once, and the kernel reads interrupts before
        # anything else: the READ or WRITE holding the page lock the notification waits
        # for would never be read.
        self.answering: set[int] = set()
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="fuse-invalidate", daemon=True)
        self._thread.start()

    def cached(self, nodeid: int) -> None:
        """A request may put pages or attributes of the inode into the guest's caches."""
        self.uncached.discard(nodeid)

    def needed(self, nodeid: int) -> bool:
        return nodeid not in self.uncached

    def submit(self, nodeid: int, reply: bytes) -> None:
        """Drop the guest's caches of the inode, then send `reply` (a lock grant)."""
        self.answering.add(P.OUT_HEADER.unpack_from(reply)[2])
        self._q.put((nodeid, reply))

    def _run(self) -> None:
        while True:
            item = self._q.get()
            if item is None:
                return
            nodeid, reply = item
            # Marked before the notification: a request that caches something meanwhile
            # unmarks it, and what it cached before is dropped by this notification.
            self.uncached.add(nodeid)
            try:
                self.send(P.notify_inval_inode(nodeid))
            except OSError as exc:
                if exc.errno != errno.ENOENT:  # ENOENT: the guest has no such inode cached
                    self.uncached.discard(nodeid)
                    log.warning("inval_inode(%d) failed: %s", nodeid, exc)
            try:
                self.send(reply)
            except OSError as exc:  # ENOENT: the request is gone (interrupted)
                log.debug("lock reply after invalidation not delivered: %s", exc)
            self.answering.discard(P.OUT_HEADER.unpack_from(reply)[2])

    def close(self) -> None:
        self._q.put(None)
        self._thread.join(10)
