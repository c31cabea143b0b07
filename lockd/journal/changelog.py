"""The change log's file format: each `PATH-log.N` is a sequence of records, one per
batch of changes: a length, a CRC32 and the batch (a list of plain tuples, see
lockd.journal.records) marshalled. N counts up; the database records the last N it has
applied (meta `log_applied`)."""

from __future__ import annotations

import glob
import marshal
import os
import sqlite3
import struct
import zlib
from collections.abc import Iterator

_RECORD = struct.Struct("<II")  # payload length, CRC32 of the payload


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
