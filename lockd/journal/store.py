"""The SQLite lock table: every grant and release is here before the guest hears of it.

Schema creation, migrations and offline inspection go through sqlite-utils; the hot path
uses prepared statements (sqlite3's statement cache) on the same connection, one
transaction per batch of changes (group commit: the manager replies after the batch that
holds its change has committed).

Durability: WAL mode with synchronous=NORMAL. A commit is written to the WAL file with
write(2) before COMMIT returns, so it lives in the kernel's page cache and survives the
daemon being killed at any instant; only a host crash can lose the last commits, and a
host crash takes every guest (and every lock) down with it. NORMAL, unlike OFF, also
keeps the database uncorrupted across a power loss, at no per-commit fsync cost in WAL.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import sqlite_utils

log = logging.getLogger("lockd.journal.store")

SCHEMA_VERSION = 1
TYPE_NAMES = {0: "READ", 1: "WRITE", 2: "UNLCK"}


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
        db["meta"].upsert({"key": "schema_version", "value": str(SCHEMA_VERSION)}, pk="key")
        db["meta"].upsert({"key": "created", "value": str(time.time())}, pk="key")
    # future migrations: `if int(version) < 2: ...` then bump schema_version


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


def check_file(path: str) -> str | None:
    """What is wrong with the journal at `path`, or None when it is sound."""
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


class Journal:
    """The lock table of one daemon (or one embedded manager)."""

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)
        self.db = open_db(self.path)
        self.conn = self.db.conn
        self._file_ids: dict[tuple, int] = {}
        self._lock = threading.Lock()
        self._seq = 0
        self.commits = 0
        self.failed: str | None = None

    def close(self) -> None:
        with self._lock:
            self.conn.close()

    # ---------------------------------------------------------------- reading
    def load(self) -> JournalState:
        st = JournalState()
        c = self.conn
        for fid, dev, ino, path, handle, htype in c.execute(
                "SELECT id, dev, ino, path, handle, handle_type FROM files"):
            ino = to_unsigned(ino)  # stored signed: cluster file systems use all 64 bits
            st.files[fid] = JournaledFile(fid, dev, ino, path, handle, htype)
            self._file_ids[(dev, ino)] = fid
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
            self._seq = max(self._seq, seq or 0)
        for row in c.execute(
                "SELECT id, guest, kind, owner, file_id, start, end, type, pid, path, at, "
                "reported FROM lost"):
            keys = ("id", "guest", "kind", "owner", "file_id", "start", "end", "type", "pid",
                    "path", "at", "reported")
            d = dict(zip(keys, row, strict=True))
            d["owner"] = to_unsigned(d["owner"])
            st.lost.append(d)
        st.guests = self.guests()
        return st

    def guests(self) -> dict[str, dict]:
        """The journaled guest sessions: name -> {session, seen}."""
        return {name: {"session": session, "seen": seen} for name, session, seen in
                self.conn.execute("SELECT name, session, seen FROM guests")}

    # ---------------------------------------------------------------- writing
    def _file_id(self, f: object) -> int:
        key = (f.dev, f.ino)  # type: ignore[attr-defined]
        fid = self._file_ids.get(key)
        if fid is None:
            handle = getattr(f, "handle", None)
            htype = getattr(f, "handle_type", None)
            cur = self.conn.execute(
                "INSERT INTO files (dev, ino, path, handle, handle_type) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT(dev, ino) DO UPDATE SET path = excluded.path, "
                "handle = excluded.handle, handle_type = excluded.handle_type RETURNING id",
                (key[0], to_signed(key[1]), f.path, handle,  # type: ignore[attr-defined]
                 htype),
            )
            fid = cur.fetchone()[0]
            self._file_ids[key] = fid
        return fid

    def write(self, ops: Iterable[tuple]) -> None:
        """Apply a batch of manager changes in one transaction."""
        with self._lock:
            c = self.conn
            try:
                c.execute("BEGIN IMMEDIATE")
                rows: dict[tuple, tuple | None] = {}
                for op in ops:
                    if op[0] == "posix" or op[0] == "flock":
                        self._collect(rows, op)
                    else:
                        self._write_rows(c, rows)
                        self._apply(c, op)
                self._write_rows(c, rows)
                c.execute("COMMIT")
                self.commits += 1
            except sqlite3.Error as exc:
                try:
                    c.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
                self._file_ids.clear()  # ids inserted in the rolled-back batch are void
                self.failed = str(exc)
                raise JournalError(f"{self.path}: journal write failed: {exc}") from exc

    def _collect(self, rows: dict, op: tuple) -> None:
        """Net effect of lock-row changes, by primary key: the last change wins, so a lock
        taken and released within one batch costs one DELETE instead of two statements."""
        if op[0] == "posix":
            _, guest, owner, f, removed, added, pid = op
            fid = self._file_id(f)
            o = to_signed(owner)
            for r in removed:
                rows[(guest, "posix", o, fid, r.start)] = None
            for r in added:
                rows[(guest, "posix", o, fid, r.start)] = (r.end, r.type, pid)
        else:
            _, guest, fh, f, type_, pid = op
            key = (guest, "flock", to_signed(fh), self._file_id(f), 0)
            rows[key] = None if type_ == 2 else (0x7FFFFFFFFFFFFFFF, type_, pid)

    @staticmethod
    def _write_rows(c: sqlite3.Connection, rows: dict) -> None:
        if not rows:
            return
        c.executemany("DELETE FROM locks WHERE guest = ? AND kind = ? AND owner = ? AND "
                      "file_id = ? AND start = ?", [k for k, v in rows.items() if v is None])
        c.executemany("INSERT OR REPLACE INTO locks VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                      [k + v for k, v in rows.items() if v is not None])
        rows.clear()

    def _apply(self, c: sqlite3.Connection, op: tuple) -> None:
        kind = op[0]
        if kind == "wait+":
            w = op[1]
            self._seq += 1
            c.execute(
                "INSERT OR REPLACE INTO waits VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (w.id, w.guest, w.kind, to_signed(w.key[1]), self._file_id(w.file), w.type,
                 w.start, w.end, w.pid, None if w.tag is None else to_signed(w.tag), self._seq),
            )
        elif kind == "wait-":
            c.execute("DELETE FROM waits WHERE id = ?", (op[1].id,))
        elif kind == "lost":
            _, rec = op
            # A lock lost at run time (manager._revoked) names its file, not its row id.
            fid = rec["file_id"] if "file_id" in rec else self._file_id(rec["file"])
            c.execute(
                "INSERT INTO lost (guest, kind, owner, file_id, start, end, type, pid, path, "
                "at, reported) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (rec["guest"], rec["kind"], to_signed(rec["owner"]), fid,
                 rec["start"], rec["end"], rec["type"], rec["pid"], rec["path"], rec["at"],
                 rec.get("reported", 0)),
            )
            c.execute("DELETE FROM locks WHERE guest = ? AND kind = ? AND owner = ? AND "
                      "file_id = ? AND start = ?", (rec["guest"], rec["kind"],
                                                    to_signed(rec["owner"]), fid,
                                                    rec["start"]))
        elif kind == "lost-reported":
            _, guest, owner, fid = op
            c.execute("UPDATE lost SET reported = 1 WHERE guest = ? AND owner = ? AND "
                      "file_id = ?", (guest, to_signed(owner), fid))
        elif kind == "guest":
            _, name, session = op
            if session is None:
                c.execute("DELETE FROM guests WHERE name = ?", (name,))
            else:
                c.execute("INSERT OR REPLACE INTO guests VALUES (?, ?, ?)",
                          (name, session, time.time()))
        elif kind == "forget-file":
            _, dev, ino = op
            fid = self._file_ids.pop((dev, ino), None)
            if fid is not None:
                c.execute("DELETE FROM files WHERE id = ? AND id NOT IN (SELECT file_id FROM "
                          "locks) AND id NOT IN (SELECT file_id FROM waits) AND id NOT IN "
                          "(SELECT file_id FROM lost)", (fid,))
        else:
            raise JournalError(f"unknown journal operation {kind!r}")

    def file_id(self, f: object) -> int:
        with self._lock:
            return self._file_id(f)


# -------------------------------------------------------------------- offline
def offline_snapshot(path: str) -> dict:
    """The journal's locks, waits and lost locks, without a daemon (read-only)."""
    problem = check_file(path) if os.path.exists(path) else f"{path}: no such journal"
    if problem:
        raise JournalError(f"{path}: {problem}")
    db = sqlite_utils.Database(sqlite3.connect(f"file:{path}?mode=ro", uri=True))
    files = {r["id"]: r for r in db["files"].rows} if "files" in db.table_names() else {}

    def rows(table: str, order: str) -> list[dict]:
        if table not in db.table_names():
            return []
        out = []
        for r in db.query(f"SELECT * FROM {table} ORDER BY {order}"):
            f = files.get(r["file_id"], {})
            r["owner"] = to_unsigned(r["owner"])
            r["type"] = TYPE_NAMES.get(r["type"], str(r["type"]))
            r.setdefault("path", f.get("path", "?"))
            r["path"] = r["path"] or f.get("path", "?")
            ino = f.get("ino")
            r["dev"], r["ino"] = f.get("dev"), None if ino is None else to_unsigned(ino)
            out.append(r)
        return out

    snap = {"locks": rows("locks", "file_id, start"), "waiters": rows("waits", "seq, id"),
            "lost": rows("lost", "id")}
    db.conn.close()
    return snap
