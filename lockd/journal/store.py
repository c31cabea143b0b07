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

The parts, by job: lockd.journal.records (each record kind's layout, encoding and
applying), changelog (the log files' format), schema (the database, opening it, checks),
applier (applying records in one transaction), offline (reading without a daemon); this
module is the writer and its checkpointer, and re-exports the rest for its callers.
"""


from __future__ import annotations

import glob
import logging
import os
import threading
from collections.abc import Iterable

from lockd.api import TYPE_NAMES  # noqa: F401  (re-exported: lockd.journal.cli)
from lockd.journal.applier import LogApplier
from lockd.journal.changelog import (  # noqa: F401  (re-exported)
    applied_log,
    encode_batch,
    iter_log_records,
    log_files,
    read_log,
)
from lockd.journal.offline import offline_snapshot  # noqa: F401  (re-exported)
from lockd.journal.records import (  # noqa: F401  (R_*: re-exported for callers)
    BY_OP,
    R_FILE,
    R_FLOCK,
    R_FORGET,
    R_GUEST,
    R_LEASE,
    R_LEASES_END,
    R_LOST,
    R_LOST_REPORTED,
    R_OWNER_ROWS,
    R_POSIX,
    R_WAIT_ADD,
    R_WAIT_DEL,
    file_record,
    to_signed,
    to_unsigned,
)
from lockd.journal.schema import (  # noqa: F401  (re-exported)
    SCHEMA_VERSION,
    JournalError,
    check_file,
    create_schema,
    meta,
    open_db,
    refuse_remnants,
    remnants,
)

log = logging.getLogger("lockd.journal")

# A checkpoint runs this often while changes are pending, or sooner past CHECKPOINT_RECORDS.
CHECKPOINT_S = 0.5
CHECKPOINT_RECORDS = 20_000


class JournaledFile:
    """A file the journal names. (Plain classes here, not dataclasses: that import costs
    every process that loads it ~1 MiB.)"""

    __slots__ = ("id", "dev", "ino", "path", "handle", "handle_type")

    def __init__(self, id: int, dev: int, ino: int, path: str, handle: bytes | None,
                 handle_type: int | None) -> None:
        self.id = id
        self.dev = dev
        self.ino = ino
        self.path = path
        self.handle = handle
        self.handle_type = handle_type

    def __repr__(self) -> str:
        return (f"JournaledFile(id={self.id}, dev={self.dev}, ino={self.ino}, "
                f"path={self.path!r}, handle={self.handle!r}, handle_type={self.handle_type})")


class JournalState:
    """Everything a restarted daemon needs, as read from the journal."""

    __slots__ = ("files", "locks", "waits", "lost", "guests", "max_wait_id", "leases")

    def __init__(self) -> None:
        self.files: dict[int, JournaledFile] = {}
        # (guest, kind, owner, file_id) -> [(start, end, type, pid), ...]
        self.locks: dict[tuple, list[tuple[int, int, int, int]]] = {}
        self.waits: list[dict] = []  # in queue order
        self.lost: list[dict] = []
        self.guests: dict[str, dict] = {}
        self.max_wait_id = 0
        # (guest, kind, owner, file_id) whose locks may have changed unjournaled (ops.Lease)
        self.leases: set[tuple] = set()


class Journal:
    """The lock journal of one daemon (or one embedded manager)."""

    def __init__(self, path: str, checkpoint_s: float = CHECKPOINT_S) -> None:
        self.path = os.path.abspath(path)
        refuse_remnants(self.path)
        self.conn = open_db(self.path)
        self._db_lock = threading.Lock()  # the SQLite connection
        self._log_lock = threading.Lock()  # the current log file and pending records
        self.applier = LogApplier(self.conn, self.path)
        self.writes = 0  # log records written
        self.failed: str | None = None
        applied = int(meta(self.conn, "log_applied") or 0)
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
                out.append(file_record(f))
            return k

        for op in ops:
            kind = BY_OP.get(type(op)) or next(
                (k for t, k in BY_OP.items() if isinstance(op, t)), None)
            if kind is None:
                raise JournalError(f"unknown journal operation {op!r}")
            out.append((kind.code, *kind.encode(op, key)))  # plain tuples: marshal
            if kind.code == R_FORGET:
                self._logged_files.discard((op.dev, op.ino))  # type: ignore[attr-defined]
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
