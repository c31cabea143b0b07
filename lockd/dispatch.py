"""The one place where a guest's FUSE lock messages become lock-service calls.

`LockDispatcher` takes one guest's decoded GETLK / SETLK / SETLKW / INTERRUPT / FLUSH /
RELEASE / DESTROY messages (`LockRequest`, below) and answers them with encoded
FUSE replies, like `fuse_lk_fill` and its callers in Linux fs/fuse/file.c on the other
side. The FUSE session runs one in-process (embedded mode); the central daemon runs one
per guest session and the guest's server forwards the messages unchanged (central
mode), so both modes give the same answers.

What it knows about the guest (and the service does not):

* Files are registered with the service per inode (the message's nodeid), lazily, at
  the guest's first lock request on the inode: opening, reading and writing never cost
  the service anything. A registration is given back when the guest's last handle of
  the inode is released (`forget`); the guest holds nothing there by then.
* A lock owner is (guest, owner): FUSE scrambles `owner` per connection. flock is owned
  by the file handle `fh`.
* OFD locks: the guest kernel sends them as ordinary SETLK/SETLKW whose owner is its
  `struct file`, and sends no unlock when that file goes away; FLUSH carries the
  closing process's owner and RELEASE none. So at RELEASE of handle F the locks of every
  owner that locked the inode through F alone are dropped. A POSIX owner's locks on the
  inode were already dropped by the FLUSH of its first close (which precedes RELEASE); one
  that locks again through another handle meanwhile is seen through that handle too and
  keeps its locks. An OFD shared by dup/fork/SCM_RIGHTS keeps its locks until its last
  close, which is when the kernel sends RELEASE.
* A SETLKW never parks a thread: the service queues it and a callback answers it later
  through `send`, keyed by the request's `unique` so that INTERRUPT can cancel it.

A message travels as one `LockRequest`, built once where it arrives (the FUSE session,
or the daemon's handler for a frame a guest's server forwarded) and passed as it is to
each layer: the endpoint (fuse_server/locks.py), then this dispatcher.
"""

from __future__ import annotations

import errno
import threading
from collections.abc import Callable

from lockd.api import F_UNLCK, QUEUED, Conflict, FileRef, LockService, valid_lock
from lockd.fuse import abi
from lockd.fuse.codec import CODEC, FuseMsg
from lockd.structs import NamedTuple  # typing's, without importing typing

_STARTING, _QUEUED = 1, 2
_NOT_FLOCK = ~abi.LK_FLOCK  # lk_flags other than FUSE_LK_FLOCK: none exist
_encode = CODEC.encode_reply
_encode_lk = CODEC.encode_lk_reply


# The codec's fields (FuseMsg's, in its order), then the buffer the message came in.
_Fields = NamedTuple("_Fields", [*((name, int) for name in FuseMsg._fields),
                                 ("buf", "bytes | bytearray | memoryview | None")])


class LockRequest(_Fields):
    """One guest lock message (GETLK, SETLK, SETLKW, INTERRUPT, FLUSH, RELEASE, DESTROY):
    the fields the codec decoded (`FuseMsg`'s: `opcode`, `unique`, `nodeid`, `fh`,
    `owner`, `lk_*`, `release_flags`, `target`...) and `buf`, the transport's buffer it
    came in (None in the daemon, which never forwards), from which `frame` copies the
    message as it came for the one endpoint that forwards it (RemoteLocks). `buf` is the
    transport's to reuse once the session has handled the message: only `frame`'s copy
    may outlive that. Built once, by `lock_request`, where the message arrives; every
    layer reads what it decides from it (nothing is decoded twice, no header is packed
    again, and nothing is copied where nothing is forwarded)."""

    __slots__ = ()

    @property
    def frame(self) -> bytes:
        """The message as it came, to forward it as is: a copy of the frame its header's
        length says (a transport's buffer may hold more)."""
        return bytes(self.buf[:self.len])

    @property
    def waits(self) -> bool:
        """A SETLKW that may wait (one that unlocks never does): answered later."""
        return self.opcode == _SETLKW and self.lk_type != F_UNLCK


_SETLKW = abi.SETLKW
_new = tuple.__new__  # a LockRequest from a decoded tuple without _make's checks


def lock_request(msg: FuseMsg, buf: bytes | bytearray | memoryview | None = None
                 ) -> LockRequest:
    """The request of a decoded lock message; `buf`: the buffer it came in (kept by
    reference, copied only by whoever forwards the message: `LockRequest.frame`)."""
    return _new(LockRequest, msg + (buf,))


# (fh, nodeid) -> the descriptor of the guest's handle fh when it is an open regular file
# of inode nodeid, else None (the guest's server knows its handles; the daemon does not).
FdOf = Callable[[int, int], "int | None"]


def handle_fd(fd_of: FdOf, req: LockRequest) -> int:
    """The descriptor of a lock message's file handle (GETLK, SETLK, SETLKW, FLUSH,
    RELEASE), under the one rule for it: the handle is one this guest opened, not yet
    released, of a regular file, and of the very inode the message names. The guest
    kernel always sends both from one open file (fs/fuse/file.c); a message that does
    not is a bad argument, EINVAL, and touches nothing: otherwise a lock "on" one inode
    would be taken on another file's host inode and recorded under the first."""
    fd = fd_of(req.fh, req.nodeid)
    if fd is None:
        raise OSError(errno.EINVAL, "lock message names a file handle not of its inode")
    return fd


def _never(target: int) -> bool:
    return False


def interrupt_reply(req: LockRequest, cancel: Callable[[int], bool],
                    on_its_way: Callable[[int], bool] = _never,
                    elsewhere: Callable[[int], bool] = _never) -> bytes | None:
    """The one rule for a FUSE INTERRUPT of request `req.target`: the guest kernel sends
    it for a request whose caller gave up (a signal), and sends it again after EAGAIN
    until the target is answered (fs/fuse/dev.c). Whoever knows something about the
    target gives that fact, asked in this order, and the first that holds ends it with
    no reply:

    * `cancel(target)`: it was a wait that could still be cancelled, and now is: its own
      reply says EINTR;
    * `on_its_way(target)`: its reply is decided and on its way (a grant that beat the
      cancel, or one the guest's server holds back): interrupting changes nothing, and
      EAGAIN would only have the kernel ask again at once;
    * `elsewhere(target)`: whoever decides it (the daemon) has it, and has been handed
      the INTERRUPT, which it answers by this same rule.

    None of them: EAGAIN, the target is not (yet) a wait here, so the kernel asks again
    later, and drops the INTERRUPT once the target is answered."""
    target = req.target
    if cancel(target) or on_its_way(target) or elsewhere(target):
        return None
    return _encode(req.unique, -errno.EAGAIN)


# Owner-handle associations kept per guest before the ones whose owner holds nothing any
# more are pruned (a guest may lock and unlock with a fresh owner every time).
PRUNE_AT = 4096


class LockDispatcher:
    """One guest's lock messages -> `service` (a LockService living in this process)."""

    def __init__(self, service: LockService, guest: str, send: Callable[[bytes], None], *,
                 fd_of: FdOf | None = None,
                 max_files: int | None = None, name_holders: bool = False) -> None:
        self.service = service
        self.guest = guest
        self.send = send  # deferred replies (granted or cancelled waits)
        # Checks each message's handle (handle_fd: the one place it is checked on the
        # embedded path) and registers its inode lazily; None in the daemon, where the
        # guest's server has checked the handle already (it alone knows the handles).
        self._fd_of = fd_of
        self.max_files = max_files
        # GETLK replies end with the holder's guest name: only for a daemon client that
        # asked for it in its HELLO (a tool; lockd/daemon/wire.py), never for a FUSE
        # server, whose guest kernel takes the reply as it is (no room for a name).
        self.name_holders = name_holders
        self._lock = threading.Lock()
        self._files: dict[int, FileRef] = {}  # nodeid -> registered file
        self._pending: dict[int, int] = {}  # unique -> _STARTING | _QUEUED (blocking waits)
        # OFD bookkeeping: (owner, nodeid) -> handles it locked through, fh -> owners.
        self._owner_fhs: dict[tuple[int, int], set[int]] = {}
        self._fh_owners: dict[int, set[int]] = {}
        self._prune_at = PRUNE_AT
        self._ops: dict[int, Callable[[LockRequest, int | None], bytes | None]] = {
            abi.GETLK: self.getlk,
            abi.SETLK: self.setlk,
            abi.SETLKW: self.setlk,
            abi.INTERRUPT: self.interrupt,
            abi.FLUSH: self.flush,
            abi.RELEASE: self.release,
            abi.DESTROY: self.destroy,
        }

    # ------------------------------------------------------------ entry point
    def handle(self, req: LockRequest, fd: int | None = None) -> bytes | None:
        """Answer one lock message: the reply, or None when it comes later (a queued
        wait) or never (an INTERRUPT that needs none). Raises OSError for an errno the
        caller's generic error path turns into the reply. `fd`: the descriptor of the
        message's handle when the caller checked it already (handle_fd; a guest's server
        deciding a delegated file): it is not looked up again."""
        return self._ops[req.opcode](req, fd)

    # ------------------------------------------------------------ files
    def register(self, nodeid: int, fd: int, path: str | None = None) -> FileRef:
        """Register the inode open at `fd` for `nodeid` (idempotent)."""
        with self._lock:
            ref = self._files.get(nodeid)
            if ref is not None:
                return ref
            if self.max_files is not None and len(self._files) >= self.max_files:
                raise OSError(errno.ENOLCK, f"guest {self.guest!r} has {self.max_files} "
                                            "files registered with the lock service")
            # charged to this guest in the service's shared descriptor budget
            ref = self._files[nodeid] = self.service.file(fd, path, guest=self.guest)
            return ref

    def registered(self, nodeid: int) -> bool:
        return nodeid in self._files

    def files_registered(self) -> int:
        return len(self._files)

    def files(self) -> list[tuple[int, FileRef]]:
        with self._lock:
            return list(self._files.items())

    def file_of(self, nodeid: int) -> FileRef | None:
        return self._files.get(nodeid)

    def nodeid_of(self, ref: FileRef) -> int | None:
        with self._lock:
            return next((n for n, r in self._files.items() if r is ref), None)

    def waiting(self, unique: int) -> bool:
        """Is the SETLKW `unique` queued (its answer still to come)?"""
        return self._pending.get(unique) == _QUEUED

    def forget(self, nodeid: int, unless: Callable[[], bool] | None = None) -> None:
        """The guest released its last handle of the inode: give the file back (not if
        `unless()`, asked under the lock registering takes: the guest opened it again)."""
        with self._lock:
            if unless is not None and unless():
                return
            ref = self._files.pop(nodeid, None)
            self._drop_owners_locked(nodeid)  # they live as long as the registration
        if ref is not None:
            self.service.put_file(ref)

    def _ref(self, req: LockRequest, fd: int | None) -> FileRef:
        if fd is None and self._fd_of is not None:
            fd = handle_fd(self._fd_of, req)  # EINVAL for a handle not of the inode
        ref = self._files.get(req.nodeid)
        if ref is not None:
            return ref
        if fd is None:
            # The daemon has no registration for the inode: nothing was locked there.
            raise OSError(errno.EINVAL, "lock on an unknown file")
        return self.register(req.nodeid, fd)

    # ------------------------------------------------------------ requests
    def getlk(self, req: LockRequest, fd: int | None = None) -> bytes:
        unique, type_, start, end = req.unique, req.lk_type, req.lk_start, req.lk_end
        # flock has no F_GETLK; no other lk_flags exist. F_UNLCK is Linux 6.7's
        # F_OFD_GETLK query of the owner's own lock (a classic F_GETLK of F_UNLCK is
        # refused by the guest kernel itself).
        if req.lk_flags or valid_lock(type_, start, end):
            return _encode(unique, -errno.EINVAL)
        res = self.service.getlk(self.guest, req.owner, self._ref(req, fd), type_, start, end)
        if isinstance(res, int):
            return _encode(unique, -res)
        c: Conflict = res
        if c.type == F_UNLCK:
            return _encode_lk(unique, F_UNLCK, 0, 0, 0)
        reply = _encode_lk(unique, c.type, c.start, c.end, max(c.pid, 0))
        if self.name_holders and c.guest:
            return _with_payload(reply, c.guest.encode("utf-8", "replace"))
        return reply

    def setlk(self, req: LockRequest, fd: int | None = None, queue: bool = True
              ) -> bytes | None:
        """SETLK, SETLKW; `queue=False`: a SETLKW answered at once as a SETLK would be
        (a delegated file's, which waits only at the daemon)."""
        unique, type_, flags = req.unique, req.lk_type, req.lk_flags
        wait = queue and req.waits
        if flags & _NOT_FLOCK:
            return _encode(unique, -errno.EINVAL)
        ref = self._ref(req, fd)
        guest, pid = self.guest, req.lk_pid
        if flags:  # flock, owned by the file handle
            fh = req.fh
            if type_ not in (0, 1, 2):
                return _encode(unique, -errno.EINVAL)
            if wait:
                return self._wait(unique, lambda cb: self.service.flock(
                    guest, fh, ref, type_, pid, True, cb, tag=unique))
            return _encode(unique, -self.service.flock(guest, fh, ref, type_, pid, False))
        start, end, owner = req.lk_start, req.lk_end, req.owner
        if valid_lock(type_, start, end):
            return _encode(unique, -errno.EINVAL)
        if type_ != F_UNLCK:
            self._associate(owner, req.nodeid, req.fh)
        if wait:
            return self._wait(unique, lambda cb: self.service.setlkw(
                guest, owner, ref, type_, start, end, pid, cb, tag=unique))
        return _encode(unique, -self.service.setlk(guest, owner, ref, type_, start, end, pid))

    def _wait(self, unique: int, start_wait: Callable) -> bytes | None:
        def callback(err: int) -> None:
            with self._lock:
                self._pending.pop(unique, None)
            self.send(_encode(unique, -err))

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
        return _encode(unique, -err)

    def interrupt(self, req: LockRequest, fd: int | None = None,
                  held: Callable[[int], bool] = _never) -> bytes | None:
        """An INTERRUPT, answered by `interrupt_reply` with what this dispatcher knows:
        the guest's queued waits (cancelled through the service), and a grant that beat
        the cancel (still marked queued until its callback answers). `held`: the guest's
        server holds the target's reply back (the session's fact; the daemon's
        dispatcher has none: a server asks its own first)."""
        def on_its_way(target: int) -> bool:
            if held(target):
                return True
            with self._lock:
                return self._pending.get(target) == _QUEUED

        return interrupt_reply(req, self._cancel, on_its_way)

    def _cancel(self, target: int) -> bool:
        return self.service.cancel_tag(self.guest, target)

    def flush(self, req: LockRequest, fd: int | None = None) -> bytes:
        """close(2) of any descriptor drops that process's POSIX locks on the inode."""
        if fd is None and self._fd_of is not None:
            handle_fd(self._fd_of, req)
        ref = self._files.get(req.nodeid)
        if ref is not None:
            self.service.release_owner(self.guest, req.owner, ref)
            self._dissociate(req.owner, req.nodeid)
        return _encode(req.unique, 0)

    def release(self, req: LockRequest, fd: int | None = None) -> bytes:
        """The last close of a file handle: its flock, the locks of owners that locked
        through it alone (OFD locks), and with RELEASE_FLUSH the releasing owner's."""
        fh, guest = req.fh, self.guest
        if req.release_flags & abi.RELEASE_FLOCK_UNLOCK:
            self.service.release_flock(guest, fh)
        ref = self._files.get(req.nodeid)
        if ref is not None:
            if req.release_flags & abi.RELEASE_FLUSH:
                self.service.release_owner(guest, req.owner, ref)
            for owner in self._handle_closed(fh, req.nodeid):
                self.service.release_owner(guest, owner, ref)
        return _encode(req.unique, 0)

    def destroy(self, req: LockRequest, fd: int | None = None) -> bytes:
        self.service.release_guest(self.guest)
        return _encode(req.unique, 0)

    def end(self) -> None:
        """The guest is gone: every lock and wait, then every registration."""
        self.service.release_guest(self.guest)
        with self._lock:
            files, self._files = self._files, {}
            self._owner_fhs.clear()
            self._fh_owners.clear()
        for ref in files.values():
            self.service.put_file(ref)

    # ------------------------------------------------------------ delegation
    def take_owners(self, nodeid: int) -> list[tuple[int, int]]:
        """Remove and return the (owner, fh) pairs of the inode's OFD bookkeeping: they
        move with a delegation's locks, so that RELEASE keeps dropping what it must
        wherever it is decided. Moved, never copied: a pair left behind here outlives
        its handle's RELEASE (decided elsewhere), and the kernel reuses owner values
        (`struct file` addresses), so a later OFD owner with the same value would keep
        its locks past its own RELEASE."""
        with self._lock:
            return self._drop_owners_locked(nodeid)

    def adopt_owners(self, nodeid: int, pairs: list[tuple[int, int]]) -> None:
        for owner, fh in pairs:
            self._associate(owner, nodeid, fh)

    # ------------------------------------------------------------ OFD bookkeeping
    def _associate(self, owner: int, nodeid: int, fh: int) -> None:
        key = (owner, nodeid)
        fhs = self._owner_fhs.get(key)
        if fhs is not None and fh in fhs:
            return  # the usual case: the same owner through the same handle again
        with self._lock:
            self._owner_fhs.setdefault(key, set()).add(fh)
            self._fh_owners.setdefault(fh, set()).add(owner)
            if len(self._owner_fhs) >= self._prune_at:
                self._prune()

    def _dissociate(self, owner: int, nodeid: int) -> None:
        with self._lock:
            self._drop_key_locked((owner, nodeid))

    def _drop_owners_locked(self, nodeid: int) -> list[tuple[int, int]]:
        return [(key[0], fh) for key in [k for k in self._owner_fhs if k[1] == nodeid]
                for fh in self._drop_key_locked(key)]

    def _drop_key_locked(self, key: tuple[int, int]) -> set[int]:
        """Forget owner key[0]'s association with inode key[1]; the handles it had."""
        fhs = self._owner_fhs.pop(key, set())
        for fh in fhs:
            owners = self._fh_owners.get(fh)
            if owners is not None:
                owners.discard(key[0])
                if not owners:
                    del self._fh_owners[fh]
        return fhs

    def _handle_closed(self, fh: int, nodeid: int) -> list[int]:
        """Forget handle fh; the owners that locked the inode through it alone."""
        gone = []
        with self._lock:
            for owner in self._fh_owners.pop(fh, ()):
                key = (owner, nodeid)
                fhs = self._owner_fhs.get(key)
                if fhs is None:
                    continue
                fhs.discard(fh)
                if not fhs:
                    del self._owner_fhs[key]
                    gone.append(owner)
        return gone

    def _prune(self) -> None:
        """Keep only the associations of owners that still hold or wait for something
        (called with the lock held; the service's answer is a snapshot, which is fine:
        an owner that locks again right after is associated again by that request)."""
        active: dict[int, set[int]] = {}
        for nodeid, ref in self._files.items():
            active[nodeid] = self.service.owners(self.guest, ref)
        for key in [k for k in self._owner_fhs if k[0] not in active.get(k[1], ())]:
            self._drop_key_locked(key)
        self._prune_at = max(PRUNE_AT, 2 * len(self._owner_fhs))


def _with_payload(reply: bytes, extra: bytes) -> bytes:
    """A reply with `extra` appended (its length field grown to match)."""
    n = len(reply) + len(extra)
    return n.to_bytes(4, "little") + reply[4:] + extra
