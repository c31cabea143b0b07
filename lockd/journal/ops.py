"""The changes the lock engine journals, as the journal's own record types.

A `file` field is any object with `dev`, `ino`, `path`, `handle` and `handle_type`
attributes (the engine passes its FileState). Ranges are (start, end, type) tuples,
inclusive, end OFFSET_MAX meaning "to end of file".

These are the engine's side; how each one is laid out in the change log and applied to
the database is its entry in lockd.journal.records (fields are matched by name there,
so the order of the fields here is free).
"""

from __future__ import annotations

from lockd.structs import NamedTuple  # typing's, without importing typing

Range = tuple[int, int, int]


class LockRows(NamedTuple):
    """An owner's POSIX ranges on a file changed: `removed` went, `added` came."""

    guest: str
    owner: int
    file: object
    removed: tuple[Range, ...]
    added: tuple[Range, ...]
    pid: int


class FlockRow(NamedTuple):
    """(guest, fh)'s flock on a file is now `type` (F_UNLCK: none)."""

    guest: str
    fh: int
    file: object
    type: int
    pid: int


class WaitAdded(NamedTuple):
    id: int
    guest: str
    kind: str  # "posix" | "flock"
    owner: int
    file: object
    type: int
    start: int
    end: int
    pid: int
    tag: int | None


class WaitRemoved(NamedTuple):
    id: int


class LostLock(NamedTuple):
    """A lock that could not be kept (taken by another process during a restart, or
    revoked by a cluster file system): reported to its owner once."""

    guest: str
    kind: str
    owner: int
    file: object | None  # None: only file_id is known (recovery)
    file_id: int | None
    start: int
    end: int
    type: int
    pid: int
    path: str
    at: float  # wall-clock date, for display
    reported: bool


class LostReported(NamedTuple):
    """The owner has been told (EIO) about its lost locks on the file."""

    guest: str
    owner: int
    file_id: int | None
    file: object | None


class GuestSession(NamedTuple):
    """A guest's session token (None: the session ended)."""

    name: str
    token: str | None


class FileForgotten(NamedTuple):
    """Nobody has anything on the file any more."""

    dev: int
    ino: int


class OwnerRows(NamedTuple):
    """An owner's POSIX ranges on a file are now exactly `ranges` (written when a lease
    ends: the changes made under it were not journaled one by one)."""

    guest: str
    owner: int
    file: object
    ranges: tuple[Range, ...]
    pid: int


class Lease(NamedTuple):
    """From here until the next LeasesEnd, (kind, guest, owner)'s locks on the file may
    change without a journal write (lockd.engine.durability): after a crash that also
    took the descriptor keeper, its journaled locks are uncertain."""

    kind: str  # "posix" | "flock"
    guest: str
    owner: int  # POSIX owner, or the flock's file handle
    file: object


class LeasesEnd(NamedTuple):
    """Every lease ends: the journal holds every change made before this record."""
