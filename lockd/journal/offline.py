"""Reading a journal without a daemon (`vfs-lockd locks --journal`, the tests)."""

from __future__ import annotations

import os
import sqlite3

from lockd.api import TYPE_NAMES
from lockd.journal.applier import LogApplier
from lockd.journal.changelog import _applied, applied_log, iter_log_records
from lockd.journal.records import to_unsigned
from lockd.journal.schema import JournalError, check_file, create_schema, table_names


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
    create_schema(mem)
    if records:
        LogApplier(mem).apply_batch(records, 0)
    mem.row_factory = sqlite3.Row
    tables = table_names(mem)

    def query(sql: str) -> list[dict]:
        return [dict(r) for r in mem.execute(sql)]

    files = {r["id"]: r for r in query("SELECT * FROM files")} if "files" in tables else {}

    def rows(table: str, order: str) -> list[dict]:
        if table not in tables:
            return []
        out = []
        for r in query(f"SELECT * FROM {table} ORDER BY {order}"):
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
    mem.close()
    return snap
