"""`vfs-lockd serve`: run the central lock daemon in the foreground."""

from __future__ import annotations

import contextlib
import os
import signal
import sys

import click

from lockd.api import Limits


def _limits(ctx: click.Context, param: click.Parameter, value: str | None) -> Limits:
    if not value:
        return Limits()
    try:
        return Limits.parse(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _socket_dir(socket_path: str) -> None:
    """Create the socket's directory when it is missing, as systemd's RuntimeDirectory=
    does for the unit (root's, 0755); only that last level: a missing parent is more
    likely a mistyped path, and is named."""
    d = os.path.dirname(os.path.abspath(socket_path))
    if os.path.isdir(d):
        return
    try:
        os.mkdir(d, 0o755)
        os.chmod(d, 0o755)  # whatever the umask
    except FileExistsError:
        if not os.path.isdir(d):
            raise click.ClickException(
                f"cannot listen on {socket_path}: {d} is not a directory") from None
    except OSError as exc:
        raise click.ClickException(
            f"cannot listen on {socket_path}: cannot create its directory {d}: "
            f"{exc.strerror or exc}") from None


@click.command("serve")
@click.option("--socket", "socket_path", required=True, type=click.Path(dir_okay=False),
              help="Unix socket to listen on (its directory is made, 0755, when only "
                   "that last level is missing).")
@click.option("--journal", "journal_path", required=True, type=click.Path(dir_okay=False),
              help="Lock journal: SQLite database PATH plus its change logs PATH-log.N.")
@click.option("--group", default=None, help="Group allowed to connect (socket mode 0660).")
@click.option("--limits", callback=_limits, default=None,
              help="Per-guest limits: owners=N,locks=N,waiters=N,descriptors=N,files=N; "
                   "and reserve=R,guaranteed=G: R of the daemon's descriptors are kept "
                   "for guests holding fewer than G (defaults 1024, 16).")
@click.option("--metrics", "metrics_addr", default=None, metavar="HOST:PORT",
              help="Serve Prometheus metrics here.")
@click.option("--guest-grace", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="Seconds a disconnected guest's locks and waits are kept for its "
                   "server to reconnect with its session token.")
@click.option("--out-cap", type=click.IntRange(min=4096), default=None,
              help="Bytes of unsent replies after which a connection is dropped "
                   "(default 16 MiB).")
@click.option("--keeper/--no-keeper", default=True, show_default=True,
              help="Keep duplicates of every lock description in a keeper process, so "
                   "that a crash of the daemon drops no host lock.")
@click.option("--hello-timeout", type=click.FloatRange(min=0.1), default=10.0,
              show_default=True,
              help="Seconds a new connection has to say HELLO before it is closed.")
@click.option("--max-unauthenticated", type=click.IntRange(min=1), default=64,
              show_default=True,
              help="Connections accepted at once before their HELLO (more wait in the "
                   "listen backlog).")
@click.option("--delegation/--no-delegation", default=True, show_default=True,
              help="Let the server of a guest that is the only one using a file decide that "
                   "file's locks itself (lockd/daemon/delegation.py); off with --guest-grace.")
@click.option("--keeper-linger", type=click.FloatRange(min=0), default=None,
              help="Seconds the descriptor keeper of a killed daemon keeps its locks "
                   "while waiting for the daemon's restart (default 300).")
@click.option("--journal-lease", type=click.FloatRange(min=0), default=None,
              help="Seconds an owner's lock changes may go unjournaled once the first is "
                   "journaled (lockd/engine/durability.py; the descriptor keeper and the "
                   "kernel hold them meanwhile). 0: journal every change before its reply. "
                   "Default 0.02 with the keeper, 0 without.")
@click.option("--no-journal", is_flag=True,
              help="Journal nothing: no crash recovery (for benchmarks that compare).")
def serve_cmd(socket_path: str, journal_path: str, group: str | None, limits: Limits,
              metrics_addr: str | None, guest_grace: float, out_cap: int | None,
              keeper: bool, delegation: bool, hello_timeout: float, max_unauthenticated: int,
              keeper_linger: float | None, journal_lease: float | None,
              no_journal: bool) -> None:
    """Serve lock requests of many guest servers on SOCKET."""
    from lockd.daemon.server import Daemon, log
    from lockd.engine.durability import LEASE_S
    from lockd.engine.manager import LockManager
    from lockd.journal.keeper import KeeperRefused
    from lockd.journal.store import Journal

    try:
        journal = None if no_journal else Journal(journal_path)
    except Exception as exc:  # a damaged journal must stop the start, with its name
        log("journal_failed", level="error", journal=journal_path, error=str(exc))
        raise click.ClickException(f"cannot open journal {journal_path}: {exc}") from None
    if journal_lease is None:
        journal_lease = LEASE_S if keeper else 0.0
    manager = LockManager(limits, journal=journal, lease_s=journal_lease)
    hooks = None
    if journal is not None:
        from lockd.daemon.recovery import RecoveryHooks

        hooks = RecoveryHooks(journal, use_keeper=keeper, keeper_linger=keeper_linger)
    _socket_dir(socket_path)
    try:
        daemon = Daemon(manager, socket_path, group=group, guest_grace=guest_grace,
                        journal_path=journal_path, hooks=hooks, hello_timeout=hello_timeout,
                        max_unauthenticated=max_unauthenticated, delegations=delegation)
        if out_cap:
            daemon.out_cap = out_cap
        daemon.bind()
    except OSError as exc:  # bind(2)'s errors name no file: name the socket
        raise click.ClickException(f"cannot listen on {socket_path}: "
                                   f"{exc.strerror or exc}") from None
    except (RuntimeError, KeyError) as exc:
        raise click.ClickException(str(exc)) from None
    if metrics_addr:
        from lockd.daemon.metrics import Metrics

        daemon.metrics = Metrics(manager.stats, daemon.daemon_stats)
        try:
            host, port = daemon.metrics.start(metrics_addr)
        except (OSError, ValueError) as exc:
            raise click.ClickException(f"--metrics {metrics_addr}: {exc}") from None
        log("metrics", address=f"{host}:{port}")

    def on_signal(signo: int, frame: object) -> None:
        daemon.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        daemon.serve_forever()
    except KeeperRefused as exc:
        # Something else answers at the keeper's address: nothing was handed to it, and
        # a daemon without its keeper would lose every lock at a crash. Stop, loudly.
        log("keeper_refused", level="error", error=str(exc))
        if getattr(daemon, "_sock_ino", None) is not None:
            with contextlib.suppress(OSError):
                os.unlink(socket_path)
        raise click.ClickException(
            f"{exc} (--no-keeper runs without a descriptor keeper; under systemd its "
            "file descriptor store still keeps the lock descriptions)") from None
    finally:
        if daemon.metrics is not None:
            daemon.metrics.stop()
    sys.exit(0)
