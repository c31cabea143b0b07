"""`vfs-lockd journal check|repair PATH`: inspect and recover a damaged lock journal."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import time

import click

from lockd.journal.store import (
    TYPE_NAMES,
    JournalError,
    check_file,
    encode_batch,
    log_files,
    offline_snapshot,
    open_db,
    read_log,
    remnants,
)


@click.group("journal")
def journal_group() -> None:
    """Inspect or repair a lock journal (the SQLite lock table) offline."""


@journal_group.command("check")
@click.argument("path", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="machine-readable output")
def check_cmd(path: str, as_json: bool) -> None:
    """Say whether the journal at PATH is sound (exit 0) or what is wrong (exit 1)."""
    if not os.path.exists(path):
        raise click.ClickException(f"{path}: no such journal")
    problem = check_file(path)
    counts = None
    if problem is None:
        snap = offline_snapshot(path)
        counts = {k: len(v) for k, v in snap.items()}
    if as_json:
        click.echo(json.dumps({"path": path, "ok": problem is None, "problem": problem,
                               "counts": counts}))
    elif problem is None:
        click.echo(f"{path}: ok ({counts['locks']} locks, {counts['waiters']} waits, "
                   f"{counts['lost']} lost)")
    else:
        click.echo(f"{path}: DAMAGED: {problem}")
    raise SystemExit(0 if problem is None else 1)


def _cut_damaged_logs(path: str, stamp: int) -> None:
    """A change log with a bad record in the middle: keep its sound prefix (replayed at
    the next open), the whole damaged file beside it."""
    for _gen, log_path in log_files(path):
        batches, bad = read_log(log_path)
        if bad is None:
            continue
        shutil.copyfile(log_path, f"{log_path}.damaged-{stamp}")
        good = b"".join(encode_batch(b) for b in batches)
        with open(log_path, "wb") as f:
            f.write(good)
        click.echo(f"  {log_path}: {bad}; kept its first {len(batches)} batches, the "
                   f"damaged file at {log_path}.damaged-{stamp}")


def _salvage_rows(path: str) -> tuple[dict[str, list[tuple]], list[str]]:
    """Read what can be read, table by table and row by row."""
    out: dict[str, list[tuple]] = {}
    notes: list[str] = []
    source = path
    recovered = None
    if shutil.which("sqlite3"):
        # The sqlite3 shell's .recover reads pages the library itself refuses.
        recovered = path + f".recovered-{int(time.time())}"
        sql = subprocess.run(["sqlite3", path, ".recover"], capture_output=True, text=True,
                             timeout=120)
        if sql.returncode == 0 and sql.stdout.strip():
            conn = sqlite3.connect(recovered)
            try:
                conn.executescript(sql.stdout)
                source = recovered
            except sqlite3.DatabaseError as exc:
                notes.append(f".recover output did not load: {exc}")
            finally:
                conn.close()
    try:
        conn = sqlite3.connect(f"file:{source}?mode=ro", uri=True)
        for table in ("files", "locks", "waits", "lost", "guests", "meta", "leases"):
            try:
                out[table] = conn.execute(f"SELECT * FROM {table}").fetchall()
            except sqlite3.DatabaseError as exc:
                if table != "leases":  # schema version 1 had none
                    notes.append(f"table {table}: unreadable ({exc})")
        conn.close()
    except sqlite3.DatabaseError as exc:
        notes.append(f"unreadable as SQLite: {exc}")
    if recovered and os.path.exists(recovered):
        os.unlink(recovered)
    return out, notes


@journal_group.command("repair")
@click.argument("path", type=click.Path(dir_okay=False))
def repair_cmd(path: str) -> None:
    """Rebuild the journal from what is consistent; keep the damaged file beside it and
    list every lock that could not be kept, so none is dropped silently."""
    problem = check_file(path)
    if problem is None:
        click.echo(f"{path}: ok, nothing to repair")
        return
    click.echo(f"{path}: {problem}")
    stamp = int(time.time())
    left = remnants(path)
    if left:
        # Only the tail of the history is there (changes since the last checkpoint):
        # kept aside for inspection. The locks the descriptor keeper still holds are
        # recovered from it (and the kernel) when the daemon starts.
        for p in left:
            os.replace(p, f"{p}.damaged-{stamp}")
            click.echo(f"  kept aside: {p}.damaged-{stamp}")
        click.echo("  the next start recovers every lock the descriptor keeper still holds")
        return
    _cut_damaged_logs(path, stamp)
    problem = check_file(path)
    if problem is None:
        click.echo(f"{path}: repaired")
        return
    rows, notes = _salvage_rows(path)
    for n in notes:
        click.echo(f"  {n}")
    files = {r[0]: r for r in rows.get("files", [])}
    keep_locks, dropped = [], []
    for r in rows.get("locks", []):
        guest, kind, owner, fid, start, end, typ, pid = r
        ok = fid in files and 0 <= start <= end and typ in (0, 1)
        (keep_locks if ok else dropped).append(r)
    damaged = f"{path}.damaged-{stamp}"
    os.replace(path, damaged)
    for suffix in ("-wal", "-shm"):
        if os.path.exists(path + suffix):
            os.replace(path + suffix, damaged + suffix)
    try:
        c = open_db(path)
    except JournalError as exc:
        raise click.ClickException(str(exc)) from exc
    c.execute("BEGIN")
    c.executemany("INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?, ?)", files.values())
    c.executemany("INSERT OR REPLACE INTO locks VALUES (?, ?, ?, ?, ?, ?, ?, ?)", keep_locks)
    waits = [w for w in rows.get("waits", []) if w[4] in files]
    c.executemany("INSERT OR REPLACE INTO waits VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", waits)
    lost = [x for x in rows.get("lost", []) if len(x) == 12]
    c.executemany("INSERT OR REPLACE INTO lost VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", lost)
    c.executemany("INSERT OR REPLACE INTO leases VALUES (?, ?, ?, ?)",
                  [x for x in rows.get("leases", []) if len(x) == 4 and x[3] in files])
    # Locks that cannot be kept are recorded as lost: their owners get EIO once.
    for guest, kind, owner, fid, start, end, typ, pid in dropped:
        c.execute("INSERT INTO lost (guest, kind, owner, file_id, start, end, type, pid, path, "
                  "at, reported) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0)",
                  (guest, kind, owner, fid, start, end, typ if typ in (0, 1) else 1, pid,
                   "?", time.time()))
    c.execute("COMMIT")
    c.close()
    click.echo(f"  kept {len(keep_locks)} locks, {len(waits)} waits, {len(files)} files")
    for guest, kind, owner, fid, start, end, typ, pid in dropped:
        click.echo(f"  NOT KEPT (recorded as lost): guest={guest} kind={kind} owner={owner} "
                   f"file_id={fid} {TYPE_NAMES.get(typ, typ)} {start}-{end} pid={pid}")
    click.echo(f"  damaged copy kept at {damaged}")
    if not rows.get("locks") and any("unreadable" in n for n in notes):
        click.echo("  the lock table could not be read at all: check the damaged copy by hand")
        raise SystemExit(1)
