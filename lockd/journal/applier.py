"""Applying change-log records to a journal database: the checkpoint, the replay when a
journal is opened, and the offline readers' in-memory copy. What each record kind does
is in lockd.journal.records; this is the transaction around them and the state they
share (file ids, the wait queue's order, files whose removal waits for the leases)."""

from __future__ import annotations

import sqlite3

from lockd.journal.records import BY_CODE, to_signed, to_unsigned
from lockd.journal.schema import JournalError


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
                kind = BY_CODE.get(r[0])
                if kind is None:
                    raise JournalError(f"unknown log record kind {r[0]!r}")
                rec = kind.layout._make(r[1:])
                if kind.collect is not None:
                    kind.collect(self, rows, rec)
                else:
                    self._write_rows(c, rows)
                    kind.apply(self, c, rec)
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

    def file_id(self, dev: int, ino: int, path: str = "?", handle: bytes | None = None,
                htype: int | None = None, update: bool = False) -> int:
        """The files-table id of (dev, ino), inserting the file (or, with `update`,
        refreshing its path and handle) when needed."""
        fid = self._file_ids.get((dev, ino))
        if fid is None or update:
            cur = self.conn.execute(
                "INSERT INTO files (dev, ino, path, handle, handle_type) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT(dev, ino) DO UPDATE SET path = excluded.path, "
                "handle = excluded.handle, handle_type = excluded.handle_type RETURNING id",
                (dev, to_signed(ino), path, handle, htype))
            fid = cur.fetchone()[0]
            self._file_ids[(dev, ino)] = fid
        return fid

    def next_seq(self) -> int:
        """The queue position of the next wait added."""
        self._seq += 1
        return self._seq

    def forget_file(self, c: sqlite3.Connection, dev: int, ino: int) -> None:
        """Nobody has anything on the file: drop its row, or once no lease names it."""
        fid = self._file_ids.pop((dev, ino), None)
        if fid is not None and not self._forget(c, fid):
            self._forget_later.add(fid)

    def forget_deferred(self, c: sqlite3.Connection) -> None:
        """The leases ended: drop the files only a lease still named."""
        for fid in self._forget_later:
            self._forget(c, fid)
        self._forget_later.clear()

    @staticmethod
    def _write_rows(c: sqlite3.Connection, rows: dict) -> None:
        if not rows:
            return
        c.executemany("DELETE FROM locks WHERE guest = ? AND kind = ? AND owner = ? AND "
                      "file_id = ? AND start = ?", [k for k, v in rows.items() if v is None])
        c.executemany("INSERT OR REPLACE INTO locks VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                      [k + v for k, v in rows.items() if v is not None])
        rows.clear()

    @staticmethod
    def _forget(c: sqlite3.Connection, fid: int) -> bool:
        """Delete a file row nothing refers to any more; False when something still does."""
        return c.execute(
            "DELETE FROM files WHERE id = ? AND id NOT IN (SELECT file_id FROM locks) AND id "
            "NOT IN (SELECT file_id FROM waits) AND id NOT IN (SELECT file_id FROM lost) AND "
            "id NOT IN (SELECT file_id FROM leases)", (fid,)).rowcount > 0
