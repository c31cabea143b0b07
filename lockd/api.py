"""The lock service interface shared by the embedded manager and the daemon client.

Both `lockd.engine.manager.LockManager` (in-process) and `lockd.daemon.client.LockClient` (talks to
`vfs-lockd serve`) implement `LockService`, so the FUSE server does not care which one it
has; `LocalLockService` adds what callers use of the in-process manager only (delegation,
admin, restart). Public methods answer errnos (0 = success); exceptions stay inside.
"""

from __future__ import annotations

import errno
from collections.abc import Callable

from lockd.fuse import abi
from lockd.structs import NamedTuple

TYPE_CHECKING = False  # `typing` stays out of the back-end (lockd/structs.py)
if TYPE_CHECKING:
    from typing import Protocol
else:
    Protocol = object  # the interfaces below are documentation at run time

# Lock types as Linux defines them (asm-generic/fcntl.h) and FUSE carries them.
F_RDLCK = 0
F_WRLCK = 1
F_UNLCK = 2
LOCK_TYPES = (F_RDLCK, F_WRLCK, F_UNLCK)
TYPE_NAMES = {F_RDLCK: "READ", F_WRLCK: "WRITE", F_UNLCK: "UNLCK"}

# Largest file offset; an inclusive end of OFFSET_MAX means "to end of file".
OFFSET_MAX = 0x7FFFFFFFFFFFFFFF

# setlkw/flock(wait=True) answer this when the request was queued: the callback fires later.
QUEUED = -1

# FUSE_LK_FLOCK in fuse_lk_in.lk_flags, FUSE_RELEASE_FLOCK_UNLOCK in release_flags: the
# ABI's, under the names lock callers know them by.
FUSE_LK_FLOCK = abi.LK_FLOCK
FUSE_RELEASE_FLOCK_UNLOCK = abi.RELEASE_FLOCK_UNLOCK

# A wait's callback gets one errno: 0 granted, EINTR cancelled, else the failure.
WaitCallback = Callable[[int], None]


# The records below are NamedTuples, not dataclasses: `dataclasses` pulls in inspect, ast
# and dis (~1 MiB of heap in every back-end that imports this module).
class Limits(NamedTuple):
    """Per-guest limits; exceeding any of them answers ENOLCK to that guest only.

    `descriptors` bounds the host descriptors the manager holds for one guest's lock
    descriptions, and `files` the files one guest may have registered with the lock
    service at once (a file is registered at the guest's first lock on it, not when it
    is opened), so that no guest can take the descriptors every other guest needs.

    The process's descriptors are shared by every guest, and several guests (one user
    may drive many) can together take them all whatever each one's limits are. So
    `reserved_descriptors` of them (at most a quarter) are kept for guests that have
    fewer than `guaranteed_descriptors` (lock descriptions plus files it registered):
    a guest past its guarantee gets ENOLCK once only the reserve is left, and any
    other guest still gets its first locks. Immutable; `_fields` and `_asdict()` name and
    carry the limits (the daemon's HELLO)."""

    max_owners: int = 10_000
    max_locks: int = 100_000
    max_waiters: int = 1_000
    max_descriptors: int = 16_384
    max_files: int = 16_384
    guaranteed_descriptors: int = 16
    reserved_descriptors: int = 1_024

    _NAMES = {"owners": "max_owners", "locks": "max_locks", "waiters": "max_waiters",
              "descriptors": "max_descriptors", "files": "max_files",
              "guaranteed": "guaranteed_descriptors", "reserve": "reserved_descriptors"}

    @classmethod
    def parse(cls, text: str) -> Limits:
        """Parse 'owners=N,locks=N,waiters=N,descriptors=N,files=N,guaranteed=N,
        reserve=N' (any subset)."""
        values: dict[str, int] = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            key, _, val = part.partition("=")
            field = cls._NAMES.get(key.strip())
            if field is None or not val.strip().isdigit():
                raise ValueError(f"bad limit {part!r}: expected " +
                                 ", ".join(f"{k}=N" for k in cls._NAMES))
            values[field] = int(val)
        return cls(**values)


class Conflict(NamedTuple):
    """GETLK's answer: the first conflicting lock, or type F_UNLCK when there is none."""

    type: int
    start: int = 0
    end: int = 0
    pid: int = 0
    guest: str | None = None  # the holder's guest when it is a managed owner


NO_CONFLICT = Conflict(F_UNLCK)


def valid_lock(type_: int, start: int, end: int) -> int:
    """0 when (type, start, end) is a well-formed lock request, else EINVAL."""
    if type_ not in LOCK_TYPES or start < 0 or end > OFFSET_MAX or start > end:
        return errno.EINVAL
    return 0


class FileRef(Protocol):
    """A file registered with the service (by host (dev, ino))."""

    dev: int
    ino: int


class LockService(Protocol):
    """What a FUSE server needs of a lock service, wherever the service runs: one
    contract, each call with the reason it exists (as virtiofsd's FileSystem trait).

    Implemented by `lockd.engine.manager.LockManager` (in process) and by
    `lockd.daemon.client.LockClient` (the daemon over its socket, for tools and tests; a
    FUSE session with a central daemon forwards the raw lock messages instead, see
    fuse_server.locks.RemoteLocks). What only the in-process manager offers is
    `LocalLockService`."""

    def file(self, fd: int, path: str | None = None, guest: str | None = None) -> FileRef:
        """Register the file open at `fd` (the caller keeps its fd); refcounted by (dev, ino).
        `guest`: who registers it (charged for its descriptor in a shared budget).
        Why: locks belong to the host file, whichever guest handle names it; the service
        keeps its own reference so a lock outlives the handle it came through."""

    def put_file(self, ref: FileRef) -> None:
        """Drop one reference taken by `file`. Why: the last one lets the service forget
        the file (and close its descriptor) once nothing is held or waited for there."""

    def getlk(
        self, guest: str, owner: int, ref: FileRef, type_: int, start: int, end: int
    ) -> Conflict | int:
        """The first lock conflicting with the request, NO_CONFLICT, or an errno.
        Why: F_GETLK / F_OFD_GETLK in the guest (FUSE GETLK), answered across guests and
        host holders alike."""

    def setlk(
        self, guest: str, owner: int, ref: FileRef, type_: int, start: int, end: int, pid: int
    ) -> int:
        """Take/convert/unlock without waiting: 0, EAGAIN, EINVAL, ENOLCK, EIO (lost lock).
        Why: F_SETLK (FUSE SETLK); also every unlock."""

    def setlkw(
        self,
        guest: str,
        owner: int,
        ref: FileRef,
        type_: int,
        start: int,
        end: int,
        pid: int,
        callback: WaitCallback,
        tag: int | None = None,
    ) -> int:
        """Like setlk but waits: 0 granted now, QUEUED (callback fires later), or an errno
        (EDEADLK when waiting would close a cycle). `tag` names the wait for cancel_tag.
        Why: F_SETLKW (FUSE SETLKW); the caller's thread never blocks on it."""

    def flock(
        self,
        guest: str,
        fh: int,
        ref: FileRef,
        type_: int,
        pid: int,
        wait: bool,
        callback: WaitCallback | None = None,
        tag: int | None = None,
    ) -> int:
        """flock(2) semantics on a description dedicated to (guest, fh). Why: FUSE sends
        flock(2) as SETLK/SETLKW with FUSE_LK_FLOCK, owned by the open file, not a pid."""

    def cancel(self, wait_id: int, err: int = errno.EINTR) -> bool:
        """Cancel a queued wait by its id; its callback gets `err`. Why: the administrator
        (`vfs-lockd cancel`) ends a wait that would otherwise never end."""

    def cancel_tag(self, guest: str, tag: int, err: int = errno.EINTR) -> bool:
        """Cancel the guest's wait that was queued with `tag`. Why: FUSE INTERRUPT (a
        signal reached the guest process blocked in F_SETLKW)."""

    def release_owner(self, guest: str, owner: int, ref: FileRef) -> None:
        """Every POSIX lock and wait of (guest, owner) on the file. Why: FLUSH (close(2)
        drops the process's POSIX locks on the file, whichever descriptor took them)."""

    def release_flock(self, guest: str, fh: int) -> None:
        """The flock of (guest, fh). Why: RELEASE with FUSE_RELEASE_FLOCK_UNLOCK (the
        last close of the open file drops its flock)."""

    def release_guest(self, guest: str) -> None:
        """All the guest's locks and waits. Why: DESTROY, an unmount, or a guest whose
        server went away."""


class LocalLockService(LockService, Protocol):
    """What callers rely on beyond LockService when the service lives in their process
    (lockd.engine.manager.LockManager): the lock dispatcher, the daemon, its admin
    requests and restart, and a guest's server that decides a delegated file itself."""

    limits: Limits  # why: the daemon tells each guest its limits (HELLO) and sizes its tables

    @property
    def nonblocking(self) -> bool:
        """True when no call blocks its caller for long. Why: a transport may then answer
        lock requests on its reading thread (fuse_server.locks.LocalLocks)."""

    @property
    def journaled(self) -> bool:
        """Does a journal keep the locks across a restart? Why: `vfs-lockd status`."""

    def owners(self, guest: str, ref: FileRef) -> set[int]:
        """The guest's POSIX lock owners that hold or wait for something on the file.
        Why: the dispatcher forgets which handles an owner used (FLUSH and RELEASE
        routing) once the owner holds and waits for nothing."""

    def hand_over(self, guest: str, ref: FileRef) -> list[tuple]:
        """Give up the guest's locks on the file without releasing them on the host:
        [(kind, owner|fh, duplicate fd of its description, [(start, end, type)], pid)].
        Why: a guest's server that decided a delegated file itself hands it back to the
        daemon (recall) with its host locks still held."""

    def adopt(self, guest: str, ref: FileRef, kind: str, owner: int, fd: int | None,
              ranges: list[tuple[int, int, int]], pid: int) -> int:
        """Take over a handed-back description and its locks, journaled; 0 or an errno.
        Why: the daemon's side of hand_over (a RETURN frame)."""

    def evict(self, guest: str) -> None:
        """release_guest, counted as an eviction. Why: `vfs-lockd evict` (admin)."""

    def snapshot(self) -> dict:
        """{"locks", "waiters", "lost"} as rows. Why: `vfs-lockd list` (admin)."""

    def stats(self) -> dict:
        """Counters and sizes, and the guests known. Why: `vfs-lockd status`, and the
        daemon's restart (which guests to wait for)."""

    def flush_durable(self, end_leases: bool = False) -> None:
        """Make every change so far survive a crash. Why: the daemon writes its own
        session records after the locks they refer to, and at shutdown."""

    def recover(self, keeper_fds: dict[str, int] | None = None,
                keeper_survived: bool = False) -> dict:
        """Re-take every journaled (or kept) lock before any request is served. Why: the
        daemon's start after a crash or restart."""
