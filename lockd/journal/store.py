"""The lock journal: every grant and release is written before the guest hears of it.

Two files. The change log (`PATH-log.N`) is what the hot path writes: one record per
batch of changes (a length, a CRC32 and the batch's changes as plain tuples, marshalled),
appended with a single write(2) - about 2 us, against ~20 us for an SQLite commit. The
SQLite database (`PATH`, the lock table, schema and offline tools through sqlite-utils)
is brought up to date from the log by a checkpoint thread, behind the replies: it applies
log N in one transaction, records "applied through N" in the same transaction, and only
then deletes log N (writes have moved on to N+1). Opening a journal applies whatever
logs are newer than the database, so the database plus its logs always hold every
change that was written; `load()`, `vfs-lockd locks --journal`, `journal check` and
`journal repair` all read both.

Durability: a record reaches the log file through write(2) before write() returns, so it
is in the kernel's page cache and survives the daemon being killed at any instant; only
a host crash can lose the last records (and a host crash takes every guest and every
lock with it). A torn last record (power loss) fails its CRC and ends the replay there.
The database runs in WAL mode with synchronous=NORMAL, which also survives a kill -9 and
stays uncorrupted across a power loss. A failed or short log write is cut off again
(ftruncate to the last good record) and raised: the engine then takes the batch's
grants back (see lockd.engine.durability).
"""

from __future__ import annotations

import glob
import logging
import marshal
import os
import sqlite3
import struct
import threading
import time
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import sqlite_utils

from lockd.api import F_UNLCK, OFFSET_MAX, TYPE_NAMES
from lockd.journal import ops as J

log = logging.getLogger("lockd.journal")

SCHEMA_VERSION = 2
# A checkpoint runs this often while changes are pending, or sooner past CHECKPOINT_RECORDS.
CHECKPOINT_S = 0.5
CHECKPOINT_RECORDS = 20_000
_RECORD = struct.Struct("<II")  # payload length, CRC32 of the payload

# Log record kinds (the first field of each change tuple).
(R_FILE, R_POSIX, R_FLOCK, R_WAIT_ADD, R_WAIT_DEL, R_LOST, R_LOST_REPORTED, R_GUEST,
 R_FORGET, R_OWNER_ROWS, R_LEASE, R_LEASES_END) = range(1, 13)


class JournalError(Exception):
    """The journal cannot be used; the message names the file and what is wrong."""


def to_signed(x: int) -> int:
    """FUSE owners are u64; SQLite integers are signed 64-bit."""
    return x - (1 << 64) if x >= 1 << 63 else x


def to_unsigned(x: int) -> int:
    return x + (1 << 64) if x < 0 else x


@dataclass
class JournaledFile:
    id: int
    dev: int
    ino: int
    path: str
    handle: bytes | None
    handle_type: int | None


@dataclass
class JournalState:
    """Everything a restarted daemon needs, as read from the journal."""

    files: dict[int, JournaledFile] = field(default_factory=dict)
    # (guest, kind, owner, file_id) -> [(start, end, type, pid), ...]
    locks: dict[tuple, list[tuple[int, int, int, int]]] = field(default_factory=dict)
    waits: list[dict] = field(default_factory=list)  # in queue order
    lost: list[dict] = field(default_factory=list)
    guests: dict[str, dict] = field(default_factory=dict)
    max_wait_id: int = 0
    # (guest, kind, owner, file_id) whose locks may have changed unjournaled (ops.Lease)
    leases: set[tuple] = field(default_factory=set)


def create_schema(db: sqlite_utils.Database) -> None:
    """Create the tables (idempotent) and run migrations up to SCHEMA_VERSION."""
    if "meta" not in db.table_names():
        db["meta"].create({"key": str, "value": str}, pk="key")
    version = _meta(db, "schema_version")
    if version is not None and int(version) > SCHEMA_VERSION:
        raise JournalError(
            f"{db.conn.execute('PRAGMA database_list').fetchone()[2]}: schema version "
            f"{version} is newer than this vfs-lockd understands ({SCHEMA_VERSION})"
        )
    if version is None:
        db["files"].create(
            {"id": int, "dev": int, "ino": int, "path": str, "handle": bytes,
             "handle_type": int},
            pk="id", if_not_exists=True,
        )
        db["files"].create_index(["dev", "ino"], unique=True, if_not_exists=True)
        db["locks"].create(
            {"guest": str, "kind": str, "owner": int, "file_id": int, "start": int,
             "end": int, "type": int, "pid": int},
            pk=("guest", "kind", "owner", "file_id", "start"), if_not_exists=True,
        )
        db["waits"].create(
            {"id": int, "guest": str, "kind": str, "owner": int, "file_id": int,
             "type": int, "start": int, "end": int, "pid": int, "tag": int, "seq": int},
            pk="id", if_not_exists=True,
        )
        db["guests"].create({"name": str, "session": str, "seen": float}, pk="name",
                            if_not_exists=True)
        db["lost"].create(
            {"id": int, "guest": str, "kind": str, "owner": int, "file_id": int,
             "start": int, "end": int, "type": int, "pid": int, "path": str, "at": float,
             "reported": int},
            pk="id", if_not_exists=True,
        )
        db["meta"].upsert({"key": "created", "value": str(time.time())}, pk="key")
    if version is None or int(version) < 2:
        db["leases"].create({"guest": str, "kind": str, "owner": int, "file_id": int},
                            pk=("guest", "kind", "owner", "file_id"), if_not_exists=True)
    if version is None or int(version) < SCHEMA_VERSION:
        db["meta"].upsert({"key": "schema_version", "value": str(SCHEMA_VERSION)}, pk="key")


def _meta(db: sqlite_utils.Database, key: str) -> str | None:
    row = db.conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    return row[0] if row else None


def open_db(path: str, create: bool = True) -> sqlite_utils.Database:
    """Open (or create) a journal, refusing a damaged one with a clear message."""
    exists = os.path.exists(path)
    if not exists and not create:
        raise JournalError(f"{path}: no such journal")
    if exists:
        problem = check_file(path)
        if problem:
            raise JournalError(
                f"{path}: the journal is damaged ({problem}); refusing to start so that no "
                f"held lock is silently dropped. Inspect with `vfs-lockd journal check "
                f"{path}` and recover with `vfs-lockd journal repair {path}`."
            )
    try:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False,
                               cached_statements=256)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        db = sqlite_utils.Database(conn)
        create_schema(db)
    except sqlite3.DatabaseError as exc:
        raise JournalError(f"{path}: cannot open the journal: {exc}") from exc
    return db


def remnants(path: str) -> list[str]:
    """Files that hold journal state although the database at `path` is missing or
    empty: its WAL or change logs with something in them."""
    if os.path.exists(path) and os.path.getsize(path) > 0:
        return []
    found = [p for p in glob.glob(glob.escape(path) + "-log.*")
             if p.rsplit(".", 1)[1].isdigit()]
    found += [p for p in (path + "-wal",) if os.path.exists(p)]
    return sorted(p for p in found if os.path.getsize(p) > 0)


def refuse_remnants(path: str) -> None:
    """A database that is gone or empty while its WAL or change log still holds changes
    was damaged (truncated, deleted, restored from elsewhere): starting on it would drop
    the locks those changes describe without a word."""
    left = remnants(path)
    if left:
        what = "missing" if not os.path.exists(path) else "empty"
        raise JournalError(
            f"{path}: the journal's database is {what} but {', '.join(left)} still hold "
            f"changes; refusing to start so that no held lock is silently dropped. Run "
            f"`vfs-lockd journal repair {path}` (it keeps the remnants aside; the locks "
            f"the descriptor keeper still holds are recovered at the next start).")


def check_file(path: str) -> str | None:
    """What is wrong with the journal at `path` (database and change logs), or None when
    it is sound."""
    left = remnants(path)
    if left:
        return f"the database is missing or empty but {', '.join(left)} still hold changes"
    problem = _check_db(path)
    if problem is not None:
        return problem
    for _gen, log_path in log_files(path):
        try:
            _records, bad = read_log(log_path)
        except OSError as exc:
            return f"change log {log_path}: cannot read: {exc.strerror}"
        if bad is not None:
            return f"change log {log_path}: {bad}"
    return None


def _check_db(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            head = f.read(16)
        if os.path.getsize(path) == 0:
            return None  # created but never written: an empty journal
        if head != b"SQLite format 3\0":
            return "not an SQLite database (bad header)"
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            rows = [r[0] for r in conn.execute("PRAGMA integrity_check").fetchall()]
            if rows != ["ok"]:
                return "integrity_check: " + "; ".join(rows[:5])
            tables = {r[0] for r in conn.execute(
                "SELECT name FROM sqlite_master WHERE type = 'table'")}
            if tables and "meta" not in tables:
                return "not a vfs-lockd journal (no meta table)"
            for t in ("files", "locks", "waits", "lost"):
                if "meta" in tables and t not in tables:
                    return f"table {t} is missing"
            if "locks" in tables and "files" in tables:
                n = conn.execute(
                    "SELECT COUNT(*) FROM locks WHERE file_id NOT IN (SELECT id FROM files)"
                ).fetchone()[0]
                if n:
                    return f"{n} lock(s) refer to files that are not in the files table"
                n = conn.execute(
                    "SELECT COUNT(*) FROM locks WHERE start < 0 OR end < start "
                    "OR type NOT IN (0, 1)").fetchone()[0]
                if n:
                    return f"{n} lock(s) have an impossible range or type"
        finally:
            conn.close()
    except sqlite3.DatabaseError as exc:
        return str(exc)
    except OSError as exc:
        return f"cannot read: {exc.strerror}"
    return None


class LogApplier:
    """Applies change-log records to a journal database (the checkpoint, the replay at
    open, and the offline readers' in-memory copy)."""

    def __init__(self, conn: sqlite3.Connection, path: str = "journal") -> None:
        self.conn = conn
        self.path = path  # named in errors
        self._file_ids: dict[tuple, int] = {}
        self._seq = conn.execute("SELECT COALESCE(MAX(seq), 0) FROM waits").fetchone()[0]
        self._forget_later: set[int] = set()
        self.commits = 0
        self._load_file_ids()

    def apply_batch(self, records: list[tuple], gen: int) -> None:
        """Apply log records to the database in one transaction that also records that
        log `gen` is applied."""
        c = self.conn
        try:
            c.execute("BEGIN IMMEDIATE")
            rows: dict[tuple, tuple | None] = {}
            for r in records:
                kind = r[0]
                if kind == R_POSIX or kind == R_FLOCK:
                    self._collect(rows, r)
                else:
                    self._write_rows(c, rows)
                    self._apply(c, r)
            self._write_rows(c, rows)
            c.execute("INSERT OR REPLACE INTO meta VALUES ('log_applied', ?)", (str(gen),))
            c.execute("COMMIT")
            self.commits += 1
        except sqlite3.Error as exc:
            try:
                c.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            self._load_file_ids()  # ids inserted in the rolled-back batch are void
            raise JournalError(f"{self.path}: checkpoint failed: {exc}") from exc

    def _load_file_ids(self) -> None:
        self._file_ids = {(dev, to_unsigned(ino)): fid for fid, dev, ino in
                          self.conn.execute("SELECT id, dev, ino FROM files")}

    def _file_id(self, c: sqlite3.Connection, dev: int, ino: int, path: str = "?",
                 handle: bytes | None = None, htype: int | None = None,
                 update: bool = False) -> int:
        fid = self._file_ids.get((dev, ino))
        if fid is None or update:
            cur = c.execute(
                "INSERT INTO files (dev, ino, path, handle, handle_type) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT(dev, ino) DO UPDATE SET path = excluded.path, "
                "handle = excluded.handle, handle_type = excluded.handle_type RETURNING id",
                (dev, to_signed(ino), path, handle, htype))
            fid = cur.fetchone()[0]
            self._file_ids[(dev, ino)] = fid
        return fid

    def _collect(self, rows: dict, r: tuple) -> None:
        """Net effect of lock-row changes, by primary key: the last change wins, so a lock
        taken and released within one batch costs one DELETE instead of two statements."""
        c = self.conn
        if r[0] == R_POSIX:
            _, guest, owner, dev, ino, removed, added, pid = r
            fid = self._file_id(c, dev, ino)
            o = to_signed(owner)
            for s, _e, _t in removed:
                rows[(guest, "posix", o, fid, s)] = None
            for s, e, t in added:
                rows[(guest, "posix", o, fid, s)] = (e, t, pid)
        else:
            _, guest, fh, dev, ino, type_, pid = r
            k = (guest, "flock", to_signed(fh), self._file_id(c, dev, ino), 0)
            rows[k] = None if type_ == F_UNLCK else (OFFSET_MAX, type_, pid)

    @staticmethod
    def _write_rows(c: sqlite3.Connection, rows: dict) -> None:
        if not rows:
            return
        c.executemany("DELETE FROM locks WHERE guest = ? AND kind = ? AND owner = ? AND "
                      "file_id = ? AND start = ?", [k for k, v in rows.items() if v is None])
        c.executemany("INSERT OR REPLACE INTO locks VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                      [k + v for k, v in rows.items() if v is not None])
        rows.clear()

    def _apply(self, c: sqlite3.Connection, r: tuple) -> None:
        kind = r[0]
        if kind == R_FILE:
            _, dev, ino, path, handle, htype = r
            self._file_id(c, dev, ino, path, handle, htype, update=True)
        elif kind == R_WAIT_ADD:
            _, wid, guest, wkind, owner, dev, ino, t, s, e, pid, tag = r
            self._seq += 1
            c.execute("INSERT OR REPLACE INTO waits VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                      (wid, guest, wkind, to_signed(owner), self._file_id(c, dev, ino), t, s, e,
                       pid, None if tag is None else to_signed(tag), self._seq))
        elif kind == R_WAIT_DEL:
            c.execute("DELETE FROM waits WHERE id = ?", (r[1],))
        elif kind == R_LOST:
            _, guest, lkind, owner, dev, ino, fid, s, e, t, pid, path, at, reported = r
            if fid is None:
                fid = self._file_id(c, dev, ino)
            c.execute(
                "INSERT INTO lost (guest, kind, owner, file_id, start, end, type, pid, path, "
                "at, reported) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (guest, lkind, to_signed(owner), fid, s, e, t, pid, path, at, reported))
            if t != F_UNLCK:  # UNLCK: a notice that the owner's locks were uncertain
                c.execute("DELETE FROM locks WHERE guest = ? AND kind = ? AND owner = ? AND "
                          "file_id = ? AND start = ?", (guest, lkind, to_signed(owner), fid, s))
        elif kind == R_LOST_REPORTED:
            _, guest, owner, dev, ino, fid = r
            if fid is None:
                fid = self._file_id(c, dev, ino)
            c.execute("UPDATE lost SET reported = 1 WHERE guest = ? AND owner = ? AND "
                      "file_id = ?", (guest, to_signed(owner), fid))
        elif kind == R_GUEST:
            _, name, session, seen = r
            if session is None:
                c.execute("DELETE FROM guests WHERE name = ?", (name,))
            else:
                c.execute("INSERT OR REPLACE INTO guests VALUES (?, ?, ?)", (name, session, seen))
        elif kind == R_OWNER_ROWS:
            _, guest, owner, dev, ino, ranges, pid = r
            fid, o = self._file_id(c, dev, ino), to_signed(owner)
            c.execute("DELETE FROM locks WHERE guest = ? AND kind = 'posix' AND owner = ? AND "
                      "file_id = ?", (guest, o, fid))
            c.executemany("INSERT OR REPLACE INTO locks VALUES (?, 'posix', ?, ?, ?, ?, ?, ?)",
                          [(guest, o, fid, s, e, t, pid) for s, e, t in ranges])
        elif kind == R_LEASE:
            _, lkind, guest, owner, dev, ino = r
            c.execute("INSERT OR IGNORE INTO leases VALUES (?, ?, ?, ?)",
                      (guest, lkind, to_signed(owner), self._file_id(c, dev, ino)))
        elif kind == R_LEASES_END:
            c.execute("DELETE FROM leases")
            for fid in self._forget_later:  # files only a lease still named
                self._forget(c, fid)
            self._forget_later.clear()
        elif kind == R_FORGET:
            _, dev, ino = r
            fid = self._file_ids.pop((dev, ino), None)
            if fid is not None and not self._forget(c, fid):
                self._forget_later.add(fid)
        else:
            raise JournalError(f"unknown log record kind {kind!r}")

    @staticmethod
    def _forget(c: sqlite3.Connection, fid: int) -> bool:
        """Delete a file row nothing refers to any more; False when something still does."""
        return c.execute(
            "DELETE FROM files WHERE id = ? AND id NOT IN (SELECT file_id FROM locks) AND id "
            "NOT IN (SELECT file_id FROM waits) AND id NOT IN (SELECT file_id FROM lost) AND "
            "id NOT IN (SELECT file_id FROM leases)", (fid,)).rowcount > 0


class Journal:
    """The lock journal of one daemon (or one embedded manager)."""

    def __init__(self, path: str, checkpoint_s: float = CHECKPOINT_S) -> None:
        self.path = os.path.abspath(path)
        refuse_remnants(self.path)
        self.db = open_db(self.path)
        self.conn = self.db.conn
        self._db_lock = threading.Lock()  # the SQLite connection
        self._log_lock = threading.Lock()  # the current log file and pending records
        self.applier = LogApplier(self.conn, self.path)
        self.writes = 0  # log records written
        self.failed: str | None = None
        applied = int(_meta(self.db, "log_applied") or 0)
        self._gen = applied
        for p in glob.glob(glob.escape(self.path) + "-log.*"):  # applied, not yet deleted
            suffix = p.rsplit(".", 1)[1]
            if suffix.isdigit() and int(suffix) <= applied:
                os.unlink(p)
        for gen, log_path in log_files(self.path):  # written after the last checkpoint
            records, _bad = read_log(log_path)
            self.applier.apply_batch([r for batch in records for r in batch], gen)
            os.unlink(log_path)
            self._gen = max(self._gen, gen)
        self._logged_files: set[tuple] = set()  # (dev, ino) with an R_FILE in this log
        self._pending: list[tuple] = []  # records of the current log not yet applied
        self._retry: list[tuple[int, list[tuple]]] = []  # failed checkpoints, oldest first
        self._log_fd = -1
        self._log_size = 0
        self._open_log(self._gen + 1)
        self._checkpoint_s = checkpoint_s
        self._wake = threading.Event()
        self._closing = False
        self._thread: threading.Thread | None = None

    # ---------------------------------------------------------------- the change log
    def _log_path(self, gen: int) -> str:
        return f"{self.path}-log.{gen}"

    def _open_log(self, gen: int) -> None:
        fd = os.open(self._log_path(gen), os.O_WRONLY | os.O_CREAT | os.O_APPEND
                     | os.O_CLOEXEC, 0o600)
        if self._log_fd >= 0:
            os.close(self._log_fd)
        self._log_fd, self._gen, self._log_size = fd, gen, os.fstat(fd).st_size
        self._logged_files = set()

    def write(self, ops: Iterable[tuple]) -> None:
        """Append a batch of engine changes (lockd.journal.ops) to the log: durable
        against a kill -9 when this returns. Raises JournalError when it cannot be
        written (then nothing of the batch is in the journal)."""
        with self._log_lock:
            records = self._encode(ops)
            if not records:
                return
            data = encode_batch(records)
            try:
                n = os.write(self._log_fd, data)
                if n != len(data):
                    raise OSError(28, f"short write to the change log ({n} of {len(data)})")
            except OSError as exc:
                self._cut_back()
                self.failed = str(exc)
                raise JournalError(f"{self._log_path(self._gen)}: journal write failed: "
                                   f"{exc}") from exc
            self._log_size += n
            self.writes += 1
            self._pending.extend(records)
            if len(self._pending) >= CHECKPOINT_RECORDS:
                self._wake.set()
        self._ensure_thread()

    def _cut_back(self) -> None:
        """Remove a partial record so that the log stays readable to its end."""
        try:
            os.ftruncate(self._log_fd, self._log_size)
        except OSError:
            # Cannot even truncate: continue in a fresh log (the old one ends in a torn
            # record, which replay treats as its end).
            try:
                self._open_log(self._gen + 1)
            except OSError:
                pass
        # A file announced in the failed record must be announced again.
        self._logged_files = set()

    def _encode(self, ops: Iterable[tuple]) -> list[tuple]:
        """Engine changes -> plain tuples (ints, strings, bytes, None)."""
        out: list[tuple] = []

        def key(f: object) -> tuple[int, int]:
            k = (f.dev, f.ino)  # type: ignore[attr-defined]
            if k not in self._logged_files:
                self._logged_files.add(k)
                out.append((R_FILE, k[0], k[1], f.path,  # type: ignore[attr-defined]
                            getattr(f, "handle", None), getattr(f, "handle_type", None)))
            return k

        for op in ops:
            if isinstance(op, J.LockRows):
                d, i = key(op.file)
                out.append((R_POSIX, op.guest, op.owner, d, i, tuple(map(tuple, op.removed)),
                            tuple(map(tuple, op.added)), op.pid))
            elif isinstance(op, J.FlockRow):
                d, i = key(op.file)
                out.append((R_FLOCK, op.guest, op.fh, d, i, op.type, op.pid))
            elif isinstance(op, J.WaitAdded):
                d, i = key(op.file)
                out.append((R_WAIT_ADD, op.id, op.guest, op.kind, op.owner, d, i, op.type,
                            op.start, op.end, op.pid, op.tag))
            elif isinstance(op, J.WaitRemoved):
                out.append((R_WAIT_DEL, op.id))
            elif isinstance(op, J.LostLock):
                d, i = key(op.file) if op.file is not None else (None, None)
                out.append((R_LOST, op.guest, op.kind, op.owner, d, i, op.file_id, op.start,
                            op.end, op.type, op.pid, op.path, op.at, int(op.reported)))
            elif isinstance(op, J.LostReported):
                d, i = key(op.file) if op.file is not None else (None, None)
                out.append((R_LOST_REPORTED, op.guest, op.owner, d, i, op.file_id))
            elif isinstance(op, J.GuestSession):
                out.append((R_GUEST, op.name, op.token, time.time()))
            elif isinstance(op, J.OwnerRows):
                d, i = key(op.file)
                out.append((R_OWNER_ROWS, op.guest, op.owner, d, i, tuple(map(tuple, op.ranges)),
                            op.pid))
            elif isinstance(op, J.Lease):
                d, i = key(op.file)
                out.append((R_LEASE, op.kind, op.guest, op.owner, d, i))
            elif isinstance(op, J.LeasesEnd):
                out.append((R_LEASES_END,))
            elif isinstance(op, J.FileForgotten):
                out.append((R_FORGET, op.dev, op.ino))
                self._logged_files.discard((op.dev, op.ino))
            else:
                raise JournalError(f"unknown journal operation {op!r}")
        return out

    # ---------------------------------------------------------------- checkpoints
    def _ensure_thread(self) -> None:
        if self._thread is None and not self._closing:
            self._thread = threading.Thread(target=self._checkpointer, daemon=True,
                                            name="journal-checkpoint")
            self._thread.start()

    def _checkpointer(self) -> None:
        while not self._closing:
            self._wake.wait(self._checkpoint_s)
            self._wake.clear()
            try:
                self.checkpoint()
            except Exception as exc:  # retried at the next round; the log keeps it all
                log.warning("journal checkpoint failed: %s", exc)

    def checkpoint(self) -> None:
        """Bring the database up to date with the logs and delete the applied logs."""
        failed_open: OSError | None = None
        with self._log_lock:
            if self._pending:
                # The next log first: if it cannot be opened (EMFILE), the records stay
                # pending in this log, which is applied and deleted only when every
                # record written to it has been (two batches under one number would
                # let the first apply delete the second's log).
                gen = self._gen
                try:
                    self._open_log(gen + 1)  # later writes go to the next log
                except OSError as exc:
                    failed_open = exc
                else:
                    self._retry.append((gen, self._pending))
                    self._pending = []
        with self._db_lock:
            while self._retry:
                gen, records = self._retry[0]
                self.applier.apply_batch(records, gen)  # raises: kept for the next round
                self._retry.pop(0)
                try:
                    os.unlink(self._log_path(gen))
                except FileNotFoundError:
                    pass
        if failed_open is not None:
            raise JournalError(f"{self._log_path(self._gen + 1)}: cannot start the next "
                               f"change log ({failed_open.strerror}); the current one keeps "
                               "its records until a checkpoint can")

    @property
    def commits(self) -> int:
        """Checkpoints committed."""
        return self.applier.commits

    def close(self) -> None:
        """Checkpoint what is pending and close (a checkpoint that fails leaves the log,
        which the next open applies)."""
        self._closing = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(10)
        try:
            self.checkpoint()
        except JournalError as exc:
            log.warning("final checkpoint failed (the change log keeps it): %s", exc)
        with self._log_lock:
            if self._log_fd >= 0:
                os.close(self._log_fd)
                self._log_fd = -1
            if self._log_size == 0:  # nothing was written to the current log
                try:
                    os.unlink(self._log_path(self._gen))
                except FileNotFoundError:
                    pass
        with self._db_lock:
            self.conn.close()

    def discard_locks(self, guest: str) -> int:
        """Forget the guest's journaled locks, waits and leases (for an embedded server
        whose locks ended with its previous run); the number of locks forgotten."""
        self.checkpoint()
        with self._db_lock:
            c = self.conn
            n = c.execute("SELECT COUNT(*) FROM locks WHERE guest = ?", (guest,)).fetchone()[0]
            c.execute("BEGIN IMMEDIATE")
            for table in ("locks", "waits", "leases"):
                c.execute(f"DELETE FROM {table} WHERE guest = ?", (guest,))
            c.execute("COMMIT")
        return n

    # ---------------------------------------------------------------- reading
    def load(self) -> JournalState:
        self.checkpoint()
        st = JournalState()
        with self._db_lock:
            c = self.conn
            for fid, dev, ino, path, handle, htype in c.execute(
                    "SELECT id, dev, ino, path, handle, handle_type FROM files"):
                ino = to_unsigned(ino)  # stored signed: cluster file systems use all 64 bits
                st.files[fid] = JournaledFile(fid, dev, ino, path, handle, htype)
            for guest, kind, owner, fid, s, e, t, pid in c.execute(
                    "SELECT guest, kind, owner, file_id, start, end, type, pid FROM locks "
                    "ORDER BY guest, kind, owner, file_id, start"):
                st.locks.setdefault((guest, kind, to_unsigned(owner), fid), []).append(
                    (s, e, t, pid))
            for row in c.execute(
                    "SELECT id, guest, kind, owner, file_id, type, start, end, pid, tag, seq "
                    "FROM waits ORDER BY seq, id"):
                wid, guest, kind, owner, fid, t, s, e, pid, tag, seq = row
                st.waits.append(dict(id=wid, guest=guest, kind=kind, owner=to_unsigned(owner),
                                     file_id=fid, type=t, start=s, end=e, pid=pid,
                                     tag=None if tag is None else to_unsigned(tag)))
                st.max_wait_id = max(st.max_wait_id, wid)
            for row in c.execute(
                    "SELECT id, guest, kind, owner, file_id, start, end, type, pid, path, at, "
                    "reported FROM lost"):
                keys = ("id", "guest", "kind", "owner", "file_id", "start", "end", "type", "pid",
                        "path", "at", "reported")
                d = dict(zip(keys, row, strict=True))
                d["owner"] = to_unsigned(d["owner"])
                st.lost.append(d)
            st.leases = {(guest, kind, to_unsigned(owner), fid) for guest, kind, owner, fid in
                         c.execute("SELECT guest, kind, owner, file_id FROM leases")}
        st.guests = self.guests()
        return st

    def guests(self) -> dict[str, dict]:
        """The journaled guest sessions: name -> {session, seen}."""
        self.checkpoint()
        with self._db_lock:
            return {name: {"session": session, "seen": seen} for name, session, seen in
                    self.conn.execute("SELECT name, session, seen FROM guests")}


# -------------------------------------------------------------------- change logs
def _applied(conn: sqlite3.Connection) -> int:
    try:
        row = conn.execute("SELECT value FROM meta WHERE key = 'log_applied'").fetchone()
        return int(row[0]) if row else 0
    except (sqlite3.DatabaseError, ValueError):
        return 0


def applied_log(path: str) -> int:
    """The generation of the last change log applied to the database at `path`."""
    if not os.path.exists(path) or os.path.getsize(path) == 0:
        return 0
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    except sqlite3.DatabaseError:
        return 0
    try:
        return _applied(conn)
    finally:
        conn.close()


def log_files(path: str, applied: int | None = None) -> list[tuple[int, str]]:
    """The change logs of the journal at `path` newer than its last checkpoint (or than
    `applied`), oldest first: [(generation, path)]."""
    if applied is None:
        applied = applied_log(path)
    out = []
    for p in glob.glob(glob.escape(path) + "-log.*"):
        suffix = p.rsplit(".", 1)[1]
        if suffix.isdigit() and int(suffix) > applied:
            out.append((int(suffix), p))
    return sorted(out)


def encode_batch(records: list[tuple]) -> bytes:
    """One change-log record: length, CRC32 and the batch's changes, marshalled."""
    payload = marshal.dumps(records)
    return _RECORD.pack(len(payload), zlib.crc32(payload)) + payload


def read_log(path: str) -> tuple[list[list[tuple]], str | None]:
    """The batches of a change log, and what is wrong with it (None: sound). A torn last
    record (a write cut short by a crash) ends the log without being a fault; a bad
    record followed by more data is damage."""
    with open(path, "rb") as f:
        data = f.read()
    out: list[list[tuple]] = []
    pos, n = 0, len(data)
    while pos < n:
        if n - pos < _RECORD.size:
            return out, None  # torn header at the end
        ln, crc = _RECORD.unpack_from(data, pos)
        body = data[pos + _RECORD.size:pos + _RECORD.size + ln]
        if len(body) < ln:
            return out, None  # torn payload at the end
        if zlib.crc32(body) != crc:
            end = pos + _RECORD.size + ln
            if end >= n:
                return out, None  # a torn last record
            return out, f"bad record at offset {pos} followed by {n - end} more bytes"
        try:
            batch = marshal.loads(body)
        except (ValueError, EOFError, TypeError) as exc:
            return out, f"undecodable record at offset {pos}: {exc}"
        out.append(batch)
        pos += _RECORD.size + ln
    return out, None


def iter_log_records(path: str, applied: int | None = None) -> Iterator[tuple]:
    for _gen, log_path in log_files(path, applied):
        try:
            batches, _bad = read_log(log_path)
        except FileNotFoundError:  # applied and deleted meanwhile
            continue
        for batch in batches:
            yield from batch


# -------------------------------------------------------------------- offline
def offline_snapshot(path: str) -> dict:
    """The journal's locks, waits and lost locks, without a daemon: the database with
    its change logs applied to an in-memory copy (nothing on disk is changed)."""
    problem = check_file(path) if os.path.exists(path) else f"{path}: no such journal"
    if problem:
        raise JournalError(f"{path}: {problem}")
    for _attempt in range(10):  # a live daemon may checkpoint while we read
        mem = sqlite3.connect(":memory:", isolation_level=None)
        if os.path.getsize(path) > 0:
            src = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
            try:
                src.backup(mem)
            finally:
                src.close()
        applied = _applied(mem)
        records = list(iter_log_records(path, applied))
        if applied_log(path) == applied:
            break
        mem.close()
    db = sqlite_utils.Database(mem)
    create_schema(db)
    if records:
        LogApplier(mem).apply_batch(records, 0)
    files = {r["id"]: r for r in db["files"].rows} if "files" in db.table_names() else {}

    def rows(table: str, order: str) -> list[dict]:
        if table not in db.table_names():
            return []
        out = []
        for r in db.query(f"SELECT * FROM {table} ORDER BY {order}"):
            f = files.get(r["file_id"], {})
            r["owner"] = to_unsigned(r["owner"])
            if "type" in r:
                r["type"] = TYPE_NAMES.get(r["type"], str(r["type"]))
            r.setdefault("path", f.get("path", "?"))
            r["path"] = r["path"] or f.get("path", "?")
            ino = f.get("ino")
            r["dev"], r["ino"] = f.get("dev"), None if ino is None else to_unsigned(ino)
            out.append(r)
        return out

    snap = {"locks": rows("locks", "file_id, start"), "waiters": rows("waits", "seq, id"),
            "lost": rows("lost", "id"), "leases": rows("leases", "file_id, guest, owner")}
    db.conn.close()
    return snap
