"""The journal database: its schema and migrations, opening it, and the checks that
refuse a damaged journal (`vfs-lockd journal check` and the daemon's start)."""

from __future__ import annotations

import glob
import os
import sqlite3
import time

from lockd.journal.changelog import log_files, read_log

SCHEMA_VERSION = 2


class JournalError(Exception):
    """The journal cannot be used; the message names the file and what is wrong."""


# The tables as the first versions made them through sqlite-utils (same columns, types and
# keys), in plain SQL: sqlite-utils cost each process that opens a journal 0.25 s of imports
# (numpy among them) and a back-end with --journal about 6 MiB; sqlite3 alone about 2.5 MiB.
_TABLES = (
    "CREATE TABLE IF NOT EXISTS [files] ([id] INTEGER PRIMARY KEY, [dev] INTEGER, "
    "[ino] INTEGER, [path] TEXT, [handle] BLOB, [handle_type] INTEGER)",
    "CREATE UNIQUE INDEX IF NOT EXISTS [idx_files_dev_ino] ON [files] ([dev], [ino])",
    "CREATE TABLE IF NOT EXISTS [locks] ([guest] TEXT, [kind] TEXT, [owner] INTEGER, "
    "[file_id] INTEGER, [start] INTEGER, [end] INTEGER, [type] INTEGER, [pid] INTEGER, "
    "PRIMARY KEY ([guest], [kind], [owner], [file_id], [start]))",
    "CREATE TABLE IF NOT EXISTS [waits] ([id] INTEGER PRIMARY KEY, [guest] TEXT, "
    "[kind] TEXT, [owner] INTEGER, [file_id] INTEGER, [type] INTEGER, [start] INTEGER, "
    "[end] INTEGER, [pid] INTEGER, [tag] INTEGER, [seq] INTEGER)",
    "CREATE TABLE IF NOT EXISTS [guests] ([name] TEXT PRIMARY KEY, [session] TEXT, "
    "[seen] REAL)",
    "CREATE TABLE IF NOT EXISTS [lost] ([id] INTEGER PRIMARY KEY, [guest] TEXT, "
    "[kind] TEXT, [owner] INTEGER, [file_id] INTEGER, [start] INTEGER, [end] INTEGER, "
    "[type] INTEGER, [pid] INTEGER, [path] TEXT, [at] REAL, [reported] INTEGER)",
)
_LEASES = ("CREATE TABLE IF NOT EXISTS [leases] ([guest] TEXT, [kind] TEXT, "
           "[owner] INTEGER, [file_id] INTEGER, PRIMARY KEY ([guest], [kind], [owner], "
           "[file_id]))")


def table_names(conn: sqlite3.Connection) -> set[str]:
    return {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


def _set_meta(conn: sqlite3.Connection, key: str, value: str) -> None:
    conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))


def create_schema(conn: sqlite3.Connection) -> None:
    """Create the tables (idempotent) and run migrations up to SCHEMA_VERSION."""
    conn.execute("CREATE TABLE IF NOT EXISTS [meta] ([key] TEXT PRIMARY KEY, [value] TEXT)")
    version = meta(conn, "schema_version")
    if version is not None and int(version) > SCHEMA_VERSION:
        raise JournalError(
            f"{conn.execute('PRAGMA database_list').fetchone()[2]}: schema version "
            f"{version} is newer than this vfs-lockd understands ({SCHEMA_VERSION})"
        )
    if version is None:
        for sql in _TABLES:
            conn.execute(sql)
        _set_meta(conn, "created", str(time.time()))
    if version is None or int(version) < 2:
        conn.execute(_LEASES)
    if version is None or int(version) < SCHEMA_VERSION:
        _set_meta(conn, "schema_version", str(SCHEMA_VERSION))


def meta(conn: sqlite3.Connection, key: str) -> str | None:
    row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    return row[0] if row else None


def open_db(path: str, create: bool = True) -> sqlite3.Connection:
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
        create_schema(conn)
    except sqlite3.DatabaseError as exc:
        raise JournalError(f"{path}: cannot open the journal: {exc}") from exc
    return conn


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
