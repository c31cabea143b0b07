"""The change log's record kinds, one table entry each: the record's on-disk layout
(a NamedTuple, the only place its field order is written), how an engine change
(lockd.journal.ops) becomes one, and how one is applied to the database.

On disk a record is the plain tuple (kind, *fields), marshalled by
lockd.journal.changelog.encode_batch; a layout must therefore never be reordered (logs
written by an older daemon are replayed by a newer one).
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from lockd.api import F_UNLCK, OFFSET_MAX
from lockd.journal import ops as J

if TYPE_CHECKING:
    from lockd.journal.applier import LogApplier

# Log record kinds (the first field of each change tuple).
(R_FILE, R_POSIX, R_FLOCK, R_WAIT_ADD, R_WAIT_DEL, R_LOST, R_LOST_REPORTED, R_GUEST,
 R_FORGET, R_OWNER_ROWS, R_LEASE, R_LEASES_END) = range(1, 13)


def to_signed(x: int) -> int:
    """FUSE owners are u64; SQLite integers are signed 64-bit."""
    return x - (1 << 64) if x >= 1 << 63 else x


def to_unsigned(x: int) -> int:
    return x + (1 << 64) if x < 0 else x


def _ranges(rs: Any) -> tuple:
    return tuple(map(tuple, rs))


class FileKey(Protocol):
    """The encoder's view of the log being written: a file's (dev, ino), announcing the
    file with an R_FILE record the first time the log names it."""

    def __call__(self, f: object) -> tuple[int, int]: ...


# ------------------------------------------------------------------ layouts
class File(NamedTuple):
    dev: int
    ino: int
    path: str
    handle: bytes | None
    handle_type: int | None


class Posix(NamedTuple):
    guest: str
    owner: int
    dev: int
    ino: int
    removed: tuple
    added: tuple
    pid: int


class Flock(NamedTuple):
    guest: str
    fh: int
    dev: int
    ino: int
    type: int
    pid: int


class WaitAdd(NamedTuple):
    id: int
    guest: str
    kind: str
    owner: int
    dev: int
    ino: int
    type: int
    start: int
    end: int
    pid: int
    tag: int | None


class WaitDel(NamedTuple):
    id: int


class Lost(NamedTuple):
    guest: str
    kind: str
    owner: int
    dev: int | None
    ino: int | None
    file_id: int | None
    start: int
    end: int
    type: int
    pid: int
    path: str
    at: float
    reported: int


class LostReported(NamedTuple):
    guest: str
    owner: int
    dev: int | None
    ino: int | None
    file_id: int | None


class Guest(NamedTuple):
    name: str
    session: str | None
    seen: float


class Forget(NamedTuple):
    dev: int
    ino: int


class OwnerRows(NamedTuple):
    guest: str
    owner: int
    dev: int
    ino: int
    ranges: tuple
    pid: int


class Lease(NamedTuple):
    kind: str
    guest: str
    owner: int
    dev: int
    ino: int


class LeasesEnd(NamedTuple):
    pass


# ------------------------------------------------------------------ encode
def file_record(f: object) -> tuple:
    """The R_FILE record announcing `f` (an object with dev, ino, path[, handle...])."""
    return (R_FILE, *File(dev=f.dev, ino=f.ino, path=f.path,  # type: ignore[attr-defined]
                          handle=getattr(f, "handle", None),
                          handle_type=getattr(f, "handle_type", None)))


def _maybe_key(key: FileKey, f: object | None) -> tuple[int | None, int | None]:
    return key(f) if f is not None else (None, None)


def _enc_posix(op: J.LockRows, key: FileKey) -> NamedTuple:
    dev, ino = key(op.file)
    return Posix(guest=op.guest, owner=op.owner, dev=dev, ino=ino,
                 removed=_ranges(op.removed), added=_ranges(op.added), pid=op.pid)


def _enc_flock(op: J.FlockRow, key: FileKey) -> NamedTuple:
    dev, ino = key(op.file)
    return Flock(guest=op.guest, fh=op.fh, dev=dev, ino=ino, type=op.type, pid=op.pid)


def _enc_wait_add(op: J.WaitAdded, key: FileKey) -> NamedTuple:
    dev, ino = key(op.file)
    return WaitAdd(id=op.id, guest=op.guest, kind=op.kind, owner=op.owner, dev=dev, ino=ino,
                   type=op.type, start=op.start, end=op.end, pid=op.pid, tag=op.tag)


def _enc_wait_del(op: J.WaitRemoved, key: FileKey) -> NamedTuple:
    return WaitDel(id=op.id)


def _enc_lost(op: J.LostLock, key: FileKey) -> NamedTuple:
    dev, ino = _maybe_key(key, op.file)
    return Lost(guest=op.guest, kind=op.kind, owner=op.owner, dev=dev, ino=ino,
                file_id=op.file_id, start=op.start, end=op.end, type=op.type, pid=op.pid,
                path=op.path, at=op.at, reported=int(op.reported))


def _enc_lost_reported(op: J.LostReported, key: FileKey) -> NamedTuple:
    dev, ino = _maybe_key(key, op.file)
    return LostReported(guest=op.guest, owner=op.owner, dev=dev, ino=ino, file_id=op.file_id)


def _enc_guest(op: J.GuestSession, key: FileKey) -> NamedTuple:
    return Guest(name=op.name, session=op.token, seen=time.time())  # a date, shown


def _enc_owner_rows(op: J.OwnerRows, key: FileKey) -> NamedTuple:
    dev, ino = key(op.file)
    return OwnerRows(guest=op.guest, owner=op.owner, dev=dev, ino=ino,
                     ranges=_ranges(op.ranges), pid=op.pid)


def _enc_lease(op: J.Lease, key: FileKey) -> NamedTuple:
    dev, ino = key(op.file)
    return Lease(kind=op.kind, guest=op.guest, owner=op.owner, dev=dev, ino=ino)


def _enc_leases_end(op: J.LeasesEnd, key: FileKey) -> NamedTuple:
    return LeasesEnd()


def _enc_forget(op: J.FileForgotten, key: FileKey) -> NamedTuple:
    return Forget(dev=op.dev, ino=op.ino)


# ------------------------------------------------------------------ apply
# POSIX and flock rows are not applied one by one: the applier collects their net effect
# per lock-table key (`collect`) and writes it before any other kind of record.
def collect_posix(a: LogApplier, rows: dict, r: Posix) -> None:
    fid = a.file_id(r.dev, r.ino)
    o = to_signed(r.owner)
    for s, _e, _t in r.removed:
        rows[(r.guest, "posix", o, fid, s)] = None
    for s, e, t in r.added:
        rows[(r.guest, "posix", o, fid, s)] = (e, t, r.pid)


def collect_flock(a: LogApplier, rows: dict, r: Flock) -> None:
    k = (r.guest, "flock", to_signed(r.fh), a.file_id(r.dev, r.ino), 0)
    rows[k] = None if r.type == F_UNLCK else (OFFSET_MAX, r.type, r.pid)


def _apply_file(a: LogApplier, c: sqlite3.Connection, r: File) -> None:
    a.file_id(r.dev, r.ino, r.path, r.handle, r.handle_type, update=True)


def _apply_wait_add(a: LogApplier, c: sqlite3.Connection, r: WaitAdd) -> None:
    c.execute("INSERT OR REPLACE INTO waits VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
              (r.id, r.guest, r.kind, to_signed(r.owner), a.file_id(r.dev, r.ino), r.type,
               r.start, r.end, r.pid, None if r.tag is None else to_signed(r.tag),
               a.next_seq()))


def _apply_wait_del(a: LogApplier, c: sqlite3.Connection, r: WaitDel) -> None:
    c.execute("DELETE FROM waits WHERE id = ?", (r.id,))


def _apply_lost(a: LogApplier, c: sqlite3.Connection, r: Lost) -> None:
    fid = r.file_id if r.file_id is not None else a.file_id(r.dev, r.ino)
    owner = to_signed(r.owner)
    c.execute(
        "INSERT INTO lost (guest, kind, owner, file_id, start, end, type, pid, path, "
        "at, reported) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (r.guest, r.kind, owner, fid, r.start, r.end, r.type, r.pid, r.path, r.at,
         r.reported))
    if r.type != F_UNLCK:  # UNLCK: a notice that the owner's locks were uncertain
        c.execute("DELETE FROM locks WHERE guest = ? AND kind = ? AND owner = ? AND "
                  "file_id = ? AND start = ?", (r.guest, r.kind, owner, fid, r.start))


def _apply_lost_reported(a: LogApplier, c: sqlite3.Connection, r: LostReported) -> None:
    fid = r.file_id if r.file_id is not None else a.file_id(r.dev, r.ino)
    c.execute("UPDATE lost SET reported = 1 WHERE guest = ? AND owner = ? AND "
              "file_id = ?", (r.guest, to_signed(r.owner), fid))


def _apply_guest(a: LogApplier, c: sqlite3.Connection, r: Guest) -> None:
    if r.session is None:
        c.execute("DELETE FROM guests WHERE name = ?", (r.name,))
    else:
        c.execute("INSERT OR REPLACE INTO guests VALUES (?, ?, ?)", (r.name, r.session, r.seen))


def _apply_owner_rows(a: LogApplier, c: sqlite3.Connection, r: OwnerRows) -> None:
    fid, o = a.file_id(r.dev, r.ino), to_signed(r.owner)
    c.execute("DELETE FROM locks WHERE guest = ? AND kind = 'posix' AND owner = ? AND "
              "file_id = ?", (r.guest, o, fid))
    c.executemany("INSERT OR REPLACE INTO locks VALUES (?, 'posix', ?, ?, ?, ?, ?, ?)",
                  [(r.guest, o, fid, s, e, t, r.pid) for s, e, t in r.ranges])


def _apply_lease(a: LogApplier, c: sqlite3.Connection, r: Lease) -> None:
    c.execute("INSERT OR IGNORE INTO leases VALUES (?, ?, ?, ?)",
              (r.guest, r.kind, to_signed(r.owner), a.file_id(r.dev, r.ino)))


def _apply_leases_end(a: LogApplier, c: sqlite3.Connection, r: LeasesEnd) -> None:
    c.execute("DELETE FROM leases")
    a.forget_deferred(c)


def _apply_forget(a: LogApplier, c: sqlite3.Connection, r: Forget) -> None:
    a.forget_file(c, r.dev, r.ino)


# ------------------------------------------------------------------ the table
class Kind(NamedTuple):
    """One record kind: its code, its layout, and its two directions. `encode` is None
    for R_FILE (written by the log writer itself, see file_record); exactly one of
    `apply` (one record at a time) and `collect` (net effect per lock row) is set."""

    code: int
    layout: type
    op: type | None
    encode: Callable[[Any, FileKey], NamedTuple] | None
    apply: Callable[[LogApplier, sqlite3.Connection, Any], None] | None = None
    collect: Callable[[LogApplier, dict, Any], None] | None = None


KINDS: tuple[Kind, ...] = (
    Kind(R_FILE, File, None, None, _apply_file),
    Kind(R_POSIX, Posix, J.LockRows, _enc_posix, collect=collect_posix),
    Kind(R_FLOCK, Flock, J.FlockRow, _enc_flock, collect=collect_flock),
    Kind(R_WAIT_ADD, WaitAdd, J.WaitAdded, _enc_wait_add, _apply_wait_add),
    Kind(R_WAIT_DEL, WaitDel, J.WaitRemoved, _enc_wait_del, _apply_wait_del),
    Kind(R_LOST, Lost, J.LostLock, _enc_lost, _apply_lost),
    Kind(R_LOST_REPORTED, LostReported, J.LostReported, _enc_lost_reported,
         _apply_lost_reported),
    Kind(R_GUEST, Guest, J.GuestSession, _enc_guest, _apply_guest),
    Kind(R_FORGET, Forget, J.FileForgotten, _enc_forget, _apply_forget),
    Kind(R_OWNER_ROWS, OwnerRows, J.OwnerRows, _enc_owner_rows, _apply_owner_rows),
    Kind(R_LEASE, Lease, J.Lease, _enc_lease, _apply_lease),
    Kind(R_LEASES_END, LeasesEnd, J.LeasesEnd, _enc_leases_end, _apply_leases_end),
)
BY_CODE: dict[int, Kind] = {k.code: k for k in KINDS}
BY_OP: dict[type, Kind] = {k.op: k for k in KINDS if k.op is not None}
