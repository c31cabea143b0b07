"""Lock delegation: FUSE lock opcodes -> a LockService, with owner = (guest, lock_owner).

The guest's `lock_owner` is scrambled per connection, so it only names an owner together
with the guest. flock (lk_flags & FUSE_LK_FLOCK) is owned by the guest's file handle.
SETLKW never parks a thread here: a queued wait is answered later by its callback, keyed
by the request's `unique` so FUSE_INTERRUPT can cancel it.
"""

from __future__ import annotations

import errno
import logging
import threading
from collections.abc import Callable

from fuse_server import protocol as P
from lockd.api import F_UNLCK, QUEUED, Conflict, FileRef, LockService, valid_lock
from lockd.fuse.codec import (
    FH,
    LK_END,
    LK_FLAGS,
    LK_PID,
    LK_START,
    LK_TYPE,
    NODEID,
    OWNER,
    TARGET,
    UNIQUE,
)

log = logging.getLogger("vfs-lockd.fuse.locks")

_STARTING, _QUEUED = 1, 2


class LockDelegate:
    def __init__(
        self,
        service: LockService,
        guest: str,
        send: Callable[[bytes], None],
        codec,  # noqa: ANN001 - lockd.fuse.codec CODEC (PyCodec | NativeCodec)
        invalidate_on_grant: bool,
    ) -> None:
        self.service = service
        self.guest = guest
        self.send = send
        self.codec = codec
        self.invalidate_on_grant = invalidate_on_grant
        self._refs: dict[int, FileRef] = {}  # fh -> registered file
        self._pending: dict[int, int] = {}  # unique -> _STARTING | _QUEUED (blocking waits)
        self._lock = threading.Lock()
        # Nodeids the guest has cached nothing of since our last FUSE_NOTIFY_INVAL_INODE
        # for them: the guest's pages and attributes of an inode only ever come from our
        # replies, so until a request for that inode (READ, WRITE, GETATTR, LOOKUP, ...;
        # the Session discards it before handling) there is nothing stale to drop and a
        # grant needs no notification (a syscall that may also hand the lead over).
        # Another guest's or the host's writes do not matter: they can only be seen
        # through a later request, which the host answers with current data.
        self.uncached: set[int] = set()

    # ---- file registration ----
    def opened(self, fh: int, fd: int) -> None:
        # path=None: the service reads it from /proc only for a file it does not know yet.
        self._refs[fh] = self.service.file(fd, None)

    def released(self, fh: int, release_flags: int, lock_owner: int) -> None:
        ref = self._refs.pop(fh, None)
        if ref is None:
            return
        if release_flags & P.RELEASE_FLOCK_UNLOCK:
            self.service.release_flock(self.guest, fh)
        if release_flags & P.RELEASE_FLUSH:
            self.service.release_owner(self.guest, lock_owner, ref)
        self.service.put_file(ref)

    def forget_files(self) -> None:
        """Give every registered file back to the lock service (the session is over)."""
        refs, self._refs = self._refs, {}
        for ref in refs.values():
            self.service.put_file(ref)

    def flush(self, msg: tuple[int, ...]) -> None:
        """close(2) of any fd drops that process's POSIX locks on the file."""
        ref = self._refs.get(msg[FH])
        if ref is not None:
            self.service.release_owner(self.guest, msg[OWNER], ref)

    def _ref(self, fh: int) -> FileRef:
        ref = self._refs.get(fh)
        if ref is None:
            # A handle this guest never opened (or released): a bad lock argument.
            raise OSError(errno.EINVAL, "lock on an unknown file handle")
        return ref

    # ---- requests ----
    def getlk(self, msg: tuple[int, ...]) -> bytes:
        unique = msg[UNIQUE]
        ref = self._ref(msg[FH])
        type_, start, end = msg[LK_TYPE], msg[LK_START], msg[LK_END]
        if type_ == F_UNLCK or valid_lock(type_, start, end) or msg[LK_FLAGS] & ~P.LK_FLOCK:
            return self.codec.encode_reply(unique, -errno.EINVAL)
        if msg[LK_FLAGS] & P.LK_FLOCK:
            # The kernel never asks GETLK for flock; answer "no conflict" if it does.
            return self.codec.encode_lk_reply(unique, F_UNLCK, 0, 0, 0)
        res = self.service.getlk(self.guest, msg[OWNER], ref, type_, start, end)
        if isinstance(res, int):
            return self.codec.encode_reply(unique, -res)
        c: Conflict = res
        if c.type == F_UNLCK:
            return self.codec.encode_lk_reply(unique, F_UNLCK, 0, 0, 0)
        return self.codec.encode_lk_reply(unique, c.type, c.start, c.end, max(c.pid, 0))

    def setlkw(self, msg: tuple[int, ...]) -> bytes | None:
        return self.setlk(msg, True)

    def setlk(self, msg: tuple[int, ...], wait: bool = False) -> bytes | None:
        unique, nodeid = msg[UNIQUE], msg[NODEID]
        ref = self._refs.get(msg[FH])
        if ref is None:
            ref = self._ref(msg[FH])  # raises EINVAL
        type_, start, end, pid = msg[LK_TYPE], msg[LK_START], msg[LK_END], msg[LK_PID]
        if msg[LK_FLAGS] & ~P.LK_FLOCK:  # no other lk_flags exist
            return self.codec.encode_reply(unique, -errno.EINVAL)
        if msg[LK_FLAGS] & P.LK_FLOCK:
            if type_ not in (0, 1, 2):
                return self.codec.encode_reply(unique, -errno.EINVAL)
            if wait and type_ != F_UNLCK:
                return self._wait(
                    unique,
                    nodeid,
                    type_,
                    lambda cb: self.service.flock(
                        self.guest, msg[FH], ref, type_, pid, True, cb, tag=unique
                    ),
                )
            err = self.service.flock(self.guest, msg[FH], ref, type_, pid, False)
            return self._answer(unique, nodeid, type_, err)
        if valid_lock(type_, start, end):
            return self.codec.encode_reply(unique, -errno.EINVAL)
        owner = msg[OWNER]
        if wait and type_ != F_UNLCK:
            return self._wait(
                unique,
                nodeid,
                type_,
                lambda cb: self.service.setlkw(
                    self.guest, owner, ref, type_, start, end, pid, cb, tag=unique
                ),
            )
        err = self.service.setlk(self.guest, owner, ref, type_, start, end, pid)
        return self._answer(unique, nodeid, type_, err)

    def _answer(self, unique: int, nodeid: int, type_: int, err: int,
                waited: bool = False) -> bytes:
        # A grant after a wait always invalidates: someone else held the lock meanwhile
        # (and it is a slow path anyway); an immediate one only when something may be
        # cached (see `uncached`).
        if (err == 0 and type_ != F_UNLCK and self.invalidate_on_grant
                and (waited or nodeid not in self.uncached)):
            self._invalidate(nodeid)
        return self.codec.encode_reply(unique, -err if err else 0)

    def _invalidate(self, nodeid: int) -> None:
        """Before the guest learns it holds the lock, drop its cached pages and attributes
        of the file, so its next read sees what other guests wrote under the lock."""
        # Marked before the notification: a request that caches something meanwhile
        # unmarks it, and what it cached before is dropped by this notification.
        self.uncached.add(nodeid)
        try:
            self.send(P.notify_inval_inode(nodeid))
        except OSError as exc:
            if exc.errno != errno.ENOENT:  # ENOENT: the guest has no such inode cached
                self.uncached.discard(nodeid)
                log.warning("inval_inode(%d) failed: %s", nodeid, exc)

    def _wait(self, unique: int, nodeid: int, type_: int, start_wait) -> bytes | None:  # noqa: ANN001
        def callback(err: int) -> None:
            with self._lock:
                self._pending.pop(unique, None)
            try:
                self.send(self._answer(unique, nodeid, type_, err, waited=True))
            except OSError as exc:  # ENOENT: the request is gone (interrupted)
                log.debug("deferred lock reply %d not delivered: %s", unique, exc)

        with self._lock:
            self._pending[unique] = _STARTING
        try:
            err = start_wait(callback)
        except BaseException:
            with self._lock:
                self._pending.pop(unique, None)
            raise
        with self._lock:
            if err == QUEUED:
                if unique in self._pending:  # the callback may already have answered
                    self._pending[unique] = _QUEUED
                return None
            self._pending.pop(unique, None)
        return self._answer(unique, nodeid, type_, err)

    def interrupt(self, msg: tuple[int, ...], int_unique: int) -> bytes | None:
        """FUSE_INTERRUPT: cancel a queued wait (its callback then replies EINTR). No reply
        when it is being answered anyway; EAGAIN (the kernel resends the interrupt) when
        the wait is not queued yet or the request is unknown to us."""
        target = msg[TARGET]
        if self.service.cancel_tag(self.guest, target):
            return None
        with self._lock:
            state = self._pending.get(target)
        if state == _QUEUED:
            return None  # cancel lost the race with a grant: the grant answers it
        return self.codec.encode_reply(int_unique, -errno.EAGAIN)

    def release_all(self) -> None:
        self.service.release_guest(self.guest)
