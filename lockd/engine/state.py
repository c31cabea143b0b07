"""What the lock engine knows: files, lock descriptions, guests and waits.

All of it belongs to one LockManager and is read and changed only under its mutex. Who
holds what (FileState.locks, .flocks, .pids; GuestState.nlocks, .flock_files) is written
by lockd.engine.owners.OwnerTable alone.
"""

from __future__ import annotations

import threading
import time

from lockd.api import WaitCallback
from lockd.engine.ranges import FileLocks

POSIX = "posix"
FLOCK = "flock"


class Denied(Exception):
    """Inside the engine: the request fails with this errno."""

    def __init__(self, err: int) -> None:
        super().__init__(err)
        self.err = err


class NeedDescription(Exception):
    """Inside the critical section: the owner needs a description opened outside it."""


class Description:
    """An open file description dedicated to one (guest, owner, file) or (guest, fh)."""

    __slots__ = ("fd", "busy", "writable", "kept_as")

    def __init__(self, fd: int, writable: bool) -> None:
        self.fd = fd
        self.busy = 0  # host-wait threads blocked on this fd: it must not be closed
        self.writable = writable
        self.kept_as: str | None = None  # the key the descriptor keeper holds it under


class FileState:
    """Everything the manager knows about one host file, keyed by (dev, ino).

    It is also the FileRef the callers hold, and the file the journal names (dev, ino,
    path, handle, handle_type)."""

    __slots__ = (
        "dev", "ino", "key", "path", "path_fd", "refs", "locks",
        "flocks", "queue", "descs", "handle", "handle_type", "gdescs", "spare", "pids",
    )

    def __init__(self, dev: int, ino: int, path: str, path_fd: int) -> None:
        self.dev = dev
        self.ino = ino
        self.key = (dev, ino)
        self.path = path
        self.path_fd = path_fd  # O_PATH reference used to open lock descriptions
        self.refs = 0
        self.locks = FileLocks()  # (guest, owner) -> its POSIX locks
        self.flocks: dict[tuple, int] = {}  # (guest, fh) -> F_RDLCK / F_WRLCK
        self.queue: list[Wait] = []  # FIFO of waits (POSIX and flock)
        self.descs: dict[tuple, Description] = {}  # (kind, guest, owner|fh) -> description
        self.handle: bytes | None = None  # file handle for reopening after a restart
        self.handle_type: int | None = None
        self.gdescs: dict[str, int] = {}  # guest -> descriptions it has on this file
        # Lock-free descriptions kept for the next owner: opening one costs ~10 us. The
        # objects themselves are reused, so taking one allocates nothing.
        self.spare: list[Description] = []
        # Holder pids by owner/fh key, kept out of LockRange so that equal ranges compare
        # equal; per file, so the hot path hashes a flat key.
        self.pids: dict[tuple, int] = {}

    def idle(self) -> bool:
        return not (self.refs or self.locks or self.flocks or self.queue or self.descs)


class Wait:
    """One queued lock request (POSIX or flock). A plain class, not a dataclass (whose
    import costs every back-end ~1 MiB); compared by identity."""

    __slots__ = ("id", "guest", "key", "kind", "file", "type", "start", "end", "pid",
                 "callback", "tag", "since", "state", "cancel_err", "thread")

    def __init__(self, id: int, guest: str, key: tuple, kind: str, file: FileState,
                 type: int, start: int, end: int, pid: int,
                 callback: WaitCallback | None, tag: int | None,
                 since: float | None = None, state: str = "queued",
                 cancel_err: int | None = None, thread: threading.Thread | None = None) -> None:
        self.id = id
        self.guest = guest
        self.key = key  # (guest, owner) or (guest, fh)
        self.kind = kind
        self.file = file
        self.type = type
        self.start = start
        self.end = end
        self.pid = pid
        self.callback = callback
        self.tag = tag
        self.since = time.monotonic() if since is None else since
        self.state = state  # queued -> host (thread in the kernel) -> done
        self.cancel_err = cancel_err
        self.thread = thread

    def __repr__(self) -> str:
        return (f"Wait(id={self.id}, guest={self.guest!r}, key={self.key!r}, kind={self.kind!r}, "
                f"type={self.type}, start={self.start}, end={self.end}, pid={self.pid}, "
                f"state={self.state!r})")

    @property
    def owner(self) -> int:
        return self.key[1]


class GuestState:
    __slots__ = ("name", "nlocks", "ndescs", "waits", "owner_descs", "files", "flock_files",
                 "tags")

    def __init__(self, name: str) -> None:
        self.name = name
        self.nlocks = 0  # lock ranges held (POSIX ranges + flocks)
        self.ndescs = 0  # lock descriptions (host descriptors) its owners have
        self.waits: dict[int, Wait] = {}
        self.owner_descs: dict[tuple, int] = {}  # owner/fh key -> descriptions it has
        self.files: dict[tuple, FileState] = {}  # files where the guest has anything
        self.flock_files: dict[tuple, FileState] = {}  # (guest, fh) -> its file
        self.tags: dict[int, Wait] = {}


def keeper_key(dkey: tuple, f: FileState) -> str:
    """The name a description is kept under by the descriptor keeper (and systemd's
    FDNAME): printable, no ':' (the guest name is hex-encoded). It says everything the
    description's locks belong to: recovery can rebuild them from the key and the
    kernel's own record of the description's locks."""
    kind, guest, owner = dkey
    return f"{kind}-{f.dev}-{f.ino}-{owner}-{guest.encode().hex()}"


def parse_keeper_key(key: str) -> tuple[str, int, int, int, str] | None:
    """(kind, dev, ino, owner, guest) of a keeper key, or None when it is not one."""
    parts = key.split("-")
    if len(parts) != 5 or parts[0] not in (POSIX, FLOCK):
        return None
    try:
        return (parts[0], int(parts[1]), int(parts[2]), int(parts[3]),
                bytes.fromhex(parts[4]).decode())
    except (ValueError, UnicodeDecodeError):
        return None
