"""`vfs-lockd virtiofs --socket-path PATH --shared-dir DIR --guest NAME`: a vhost-user
back-end for QEMU's vhost-user-fs-pci device, standing for one guest."""

from __future__ import annotations

import logging
import os
import signal
import sys

import click

from fuse_server.cli import close_service, guest_options, open_lock_service, setup_logging

log = logging.getLogger("vfs-lockd.virtio")


@click.command("virtiofs")
@click.option("--socket-path", required=True, type=click.Path(dir_okay=False),
              help="Unix socket to listen on; QEMU's -chardev socket,path=... connects to it.")
@click.option("--shared-dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="Host directory shared with the guest.")
@guest_options
@click.option("--cache", type=click.Choice(["none", "auto", "always"]), default="none",
              show_default=True,
              help="none: direct I/O, coherent under locks (the default here: virtio-fs has "
                   "no notification queue, so a lock grant cannot drop the guest's caches); "
                   "auto: page cache, revalidated at open and after 1 s; always: long caches.")
@click.option("--persist", is_flag=True,
              help="After the front-end disconnects, listen again for a new one.")
@click.option("--threads", type=click.IntRange(1, 256), default=4, show_default=True,
              help="Worker threads for requests that may block (I/O).")
@click.option("-v", "--verbose", count=True, help="Debug logging.")
def virtiofs_cmd(socket_path: str, shared_dir: str, guest: str, lockd_socket: str | None,
                 journal: str | None, cache: str, persist: bool, threads: int,
                 verbose: int) -> None:
    """Serve DIR to a QEMU guest over vhost-user until the guest goes away (or signalled)."""
    setup_logging(verbose)
    if lockd_socket and journal:
        raise click.UsageError("--journal is for the embedded manager; the daemon keeps its own")
    from fuse_server.passthrough import Passthrough
    from fuse_server.session import Session
    from fuse_server.transports.vhost_user import listen, serve
    from fuse_server.transports.virtqueue import require_native

    try:
        require_native()
    except RuntimeError as exc:
        raise click.ClickException(str(exc)) from None
    service = open_lock_service(lockd_socket, journal, guest)
    source = os.path.realpath(shared_dir)

    def new_session(send):  # noqa: ANN001, ANN202 - one FUSE session per device start
        return Session(Passthrough(source), service, guest, send, cache=cache)

    def on_signal(signo: int, frame: object) -> None:
        raise SystemExit(0)  # unwinds through the device's teardown: the guest is released

    try:
        sock = listen(socket_path)
    except OSError as exc:
        close_service(service)
        raise click.ClickException(f"listen on {socket_path}: {exc}") from None
    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(s, on_signal)
    log.info("serving %s on %s as guest %r (cache=%s, threads=%d, locks=%s%s)", source,
             socket_path, guest, cache, threads, lockd_socket or "embedded",
             ", persist" if persist else "")
    try:
        serve(sock, new_session, threads, persist)
    finally:
        sock.close()
        try:
            os.unlink(socket_path)
        except OSError:
            pass
        close_service(service)
        log.info("virtiofs back-end for guest %r stopped", guest)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
