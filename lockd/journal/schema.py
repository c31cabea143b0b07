"""The journal database: its schema and migrations, opening it, and the checks that
refuse a damaged journal (`vfs-lockd journal check` and the daemon's start)."""

from __future__ import annotations

import glob
import os
import sqlite3
import time

import sqlite_utils

from lockd.journal.changelog import log_files, read_log

SCHEMA_VERSION = 2


class JournalError(Exception):
    """The journal cannot be used; the message names the file and what is wrong."""


def create_schema(db: sqlite_utils.Database) -> None:
    """Create the tables (idempotent) and run migrations up to SCHEMA_VERSION."""
    if "meta" not in db.table_names():
        db["meta"].create({"key": str, "value": str}, pk="key")
    version = meta(db, "schema_version")
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


def meta(db: sqlite_utils.Database, key: str) -> str | None:
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
