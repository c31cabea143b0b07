"""Admin verbs talking to a running `vfs-lockd serve`: locks, status, evict, cancel."""

from __future__ import annotations

import errno
import importlib
import json
import sys

import click

from lockd.api import OFFSET_MAX
from lockd.daemon import wire

COLUMNS = ("GUEST", "PID", "OWNER", "KIND", "TYPE", "START", "END", "PATH", "WAITING-FOR")


def _admin(socket_path: str):  # -> AdminClient
    from lockd.daemon.client import AdminClient

    try:
        return AdminClient(socket_path)
    except OSError as exc:
        raise click.ClickException(
            f"cannot reach vfs-lockd at {socket_path}: {exc.strerror or exc}") from None


def _ask(socket_path: str, type_: int, body: bytes = b"") -> tuple[int, bytes]:
    from lockd.daemon.client import DaemonError

    admin = _admin(socket_path)
    try:
        return admin.request(type_, body)
    except DaemonError as exc:
        raise click.ClickException(f"vfs-lockd: {exc.strerror}") from None
    except OSError as exc:
        raise click.ClickException(f"vfs-lockd at {socket_path}: {exc}") from None
    finally:
        admin.close()


def _ask_json(socket_path: str, type_: int) -> dict:
    status, payload = _ask(socket_path, type_)
    if status < 0:
        raise click.ClickException(payload.decode("utf-8", "replace") or f"errno {-status}")
    return json.loads(payload)


def rows(snap: dict) -> list[tuple[str, ...]]:
    """lslocks-style rows: held locks, then waiters (with what they wait for), then lost."""
    def end(v: int) -> str:
        return "EOF" if v >= OFFSET_MAX else str(v)

    def owner(r: dict) -> str:
        o = r.get("owner", r.get("fh", ""))
        return f"{o:#x}" if isinstance(o, int) else str(o)

    out = []
    for r in snap.get("locks", []):
        out.append((r["guest"], str(r.get("pid", "")), owner(r), r["kind"], r["type"],
                    str(r["start"]), end(r["end"]), r.get("path", "?"), ""))
    for r in snap.get("waiters", []):
        waits = ",".join(r.get("waiting_for") or []) or "-"
        out.append((r["guest"], str(r.get("pid", "")), owner(r), r["kind"], r["type"],
                    str(r["start"]), end(r["end"]), r.get("path", "?"),
                    f"{waits} (wait {r['id']})"))
    for r in snap.get("lost", []):
        out.append((str(r.get("guest", "?")), str(r.get("pid", "")), owner(r),
                    str(r.get("kind", "?")), f"LOST-{r.get('type', '?')}",
                    str(r.get("start", "")), end(r.get("end", 0)), str(r.get("path", "?")), ""))
    return out


def format_table(table: list[tuple[str, ...]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in table)) if table else len(h)
              for i, h in enumerate(COLUMNS)]
    lines = []
    for r in [COLUMNS, *table]:
        cells = [c.ljust(w) for c, w in zip(r, widths, strict=True)]
        lines.append(" ".join(cells).rstrip())
    return "\n".join(lines)


@click.command("locks")
@click.option("--socket", "socket_path", type=click.Path(dir_okay=False),
              help="Socket of a running daemon.")
@click.option("--journal", "journal_path", type=click.Path(dir_okay=False),
              help="Read a journal offline instead (no daemon needed).")
@click.option("--json", "as_json", is_flag=True, help="JSON output.")
def locks_cmd(socket_path: str | None, journal_path: str | None, as_json: bool) -> None:
    """List held locks and waiters (like lslocks)."""
    if bool(socket_path) == bool(journal_path):
        raise click.UsageError("give exactly one of --socket or --journal")
    if journal_path:
        try:
            offline = importlib.import_module("lockd.journal.store").offline_snapshot
        except (ImportError, AttributeError):
            raise click.ClickException("--journal: this build has no journal support") from None
        snap = offline(journal_path)
    else:
        snap = _ask_json(socket_path, wire.T_LIST)
    if as_json:
        click.echo(json.dumps(snap, indent=2, sort_keys=True))
    else:
        click.echo(format_table(rows(snap)))


@click.command("status")
@click.option("--socket", "socket_path", required=True, type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="JSON output.")
def status_cmd(socket_path: str, as_json: bool) -> None:
    """Guests, counts, uptime and journal of a running daemon."""
    st = _ask_json(socket_path, wire.T_STATUS)
    if as_json:
        click.echo(json.dumps(st, indent=2, sort_keys=True))
        return
    stats = st.get("stats", {})
    journal = st.get("journal") or "-"
    if st.get("journal") and not st.get("journal_active"):
        journal += " (not active)"
    click.echo(f"pid:        {st['pid']}")
    click.echo(f"socket:     {st['socket']}")
    click.echo(f"uptime:     {st['uptime']:.1f} s")
    click.echo(f"journal:    {journal}")
    click.echo(f"locks:      {stats.get('held_locks', 0)} held, {stats.get('waiters', 0)} "
               f"waiting, {stats.get('lost', 0)} lost")
    click.echo("counters:   " + ", ".join(
        f"{k}={stats[k]}" for k in ("locks_granted", "locks_denied", "waits_started",
                                    "waits_granted", "waits_cancelled", "deadlocks",
                                    "evictions") if k in stats))
    click.echo(f"guests:     {len(st['guests'])}")
    for g in st["guests"]:
        state = (f"connected pid={g.get('pid')} uid={g.get('uid')}" if g["connected"]
                 else f"disconnected, grace {g.get('grace_left', 0):.1f} s left")
        click.echo(f"  {g['guest']}: {state}, {g['files']} files, {g['waits']} waits")


@click.command("evict")
@click.option("--socket", "socket_path", required=True, type=click.Path(dir_okay=False))
@click.option("--guest", required=True, help="Guest whose locks and waits are dropped.")
def evict_cmd(socket_path: str, guest: str) -> None:
    """Drop a guest: its connection, locks and waits."""
    status, payload = _ask(socket_path, wire.T_EVICT, guest.encode())
    if status < 0:
        raise click.ClickException(payload.decode("utf-8", "replace") or f"errno {-status}")
    click.echo(f"evicted {guest}")


@click.command("cancel")
@click.option("--socket", "socket_path", required=True, type=click.Path(dir_okay=False))
@click.option("--wait", "wait_id", required=True, type=click.IntRange(min=0),
              help="Wait id (from `vfs-lockd locks`).")
def cancel_cmd(socket_path: str, wait_id: int) -> None:
    """Cancel a queued wait (the waiter gets EINTR)."""
    status, _ = _ask(socket_path, wire.T_CANCEL_WAIT, wire.U64.pack(wait_id))
    if status == -errno.ENOENT:
        click.echo(f"no wait {wait_id}", err=True)
        sys.exit(1)
    if status < 0:
        raise click.ClickException(f"cancel failed: errno {-status}")
    click.echo(f"cancelled wait {wait_id}")
