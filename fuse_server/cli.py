"""`vfs-lockd mount SOURCE MOUNTPOINT --guest NAME`: one FUSE mount standing for one guest."""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Callable

import click

# (in their own module: the virtio-fs back-end uses them without click)
from fuse_server.lockservice import close_service, lock_service  # noqa: F401

log = logging.getLogger("vfs-lockd.fuse")


def setup_logging(verbose: int) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s vfs-lockd[%(process)d] %(levelname)s %(message)s",
        stream=sys.stderr,
    )


def open_lock_service(lockd_socket: str | None, journal: str | None, guest: str,
                      patience: float | None = None):  # noqa: ANN201
    """lock_service() for a command: set the umask FUSE expects, and turn a failure into
    a clear command-line error."""
    os.umask(0)  # modes arrive with the caller's umask already applied (DONT_MASK)
    # Every file the guest opens costs this process descriptors: take all we may have,
    # so that a guest holding many files open exhausts nobody's limit but its own.
    from lockd.engine.descriptions import raise_fd_limit

    raise_fd_limit()
    try:
        return lock_service(lockd_socket, journal, guest, patience)
    except Exception as exc:
        raise click.ClickException(f"lock service: {exc}") from None


def guest_options(fn: Callable) -> Callable:
    """--guest, --lockd and --journal: who the server stands for and where its locks go
    (shared by every transport's command)."""
    for opt in reversed((
        click.option("--guest", required=True, help="Name of the guest this server stands for."),
        click.option("--lockd", "lockd_socket", default=None, type=click.Path(dir_okay=False),
                     help="Send locks to the central daemon on this socket (default: embedded)."),
        click.option("--journal", default=None, type=click.Path(dir_okay=False),
                     help="SQLite lock journal for the embedded manager."),
    )):
        fn = opt(fn)
    return fn


@click.command("mount")
@click.argument("source", type=click.Path(exists=True, file_okay=False))
@click.argument("mountpoint", type=click.Path(file_okay=False))
@guest_options
@click.option("--cache", type=click.Choice(["none", "auto", "always"]), default="auto",
              show_default=True,
              help="none: direct I/O; auto: page cache dropped on every lock grant "
                   "(coherent under locks); always: long caches (not coherent).")
@click.option("--threads", type=click.IntRange(1, 256), default=4, show_default=True,
              help="Request worker threads.")
@click.option("--posix-acl/--no-posix-acl", default=True, show_default=True,
              help="The kernel enforces the share's POSIX ACLs, as on the host.")
@click.option("--killpriv-v2/--no-killpriv-v2", "killpriv_v2", default=True,
              show_default=True,
              help="FUSE_HANDLE_KILLPRIV_V2: the kernel says which writes, truncations "
                   "and O_TRUNC opens clear setuid/setgid (we clear them) and stops asking "
                   "for security.capability before each cached write.")
@click.option("--passthrough/--no-passthrough", default=True, show_default=True,
              help="The kernel reads and writes open files' host files itself (FUSE "
                   "passthrough, Linux 6.9+; falls back where the kernel refuses).")
@click.option("--native/--no-native", "native_path", default=True, show_default=True,
              help="Answer attribute, read, write and statfs requests of known files in "
                   "C without Python (native/vl_serve.c); --no-native: every request "
                   "through the Python session (for comparison and diagnosis).")
@click.option("--io-uring/--no-io-uring", "io_uring", default=False, show_default=True,
              help="Experimental: take requests over io_uring, a queue per CPU, when the "
                   "kernel offers it (Linux 6.14+, /sys/module/fuse/parameters/"
                   "enable_uring=Y). Off by default: a request stuck in a host call holds "
                   "its CPU's queue (see README, Performance).")
@click.option("--max-opens-per-uid", type=click.IntRange(0), default=None,
              help="Files and directories one guest uid other than root may hold open "
                   "(EMFILE beyond); 0: no per-uid bound. Default: a quarter of the "
                   "descriptor limit.")
@click.option("--lockd-patience", type=click.FloatRange(0.1), default=None,
              help="Seconds a lock request waits for an unreachable --lockd daemon before "
                   "it is answered ENOLCK. Default: 10.")
@click.option("-v", "--verbose", count=True, help="Debug logging.")
def mount_cmd(source: str, mountpoint: str, guest: str, lockd_socket: str | None,
              journal: str | None, cache: str, threads: int, posix_acl: bool,
              killpriv_v2: bool, passthrough: bool, native_path: bool, io_uring: bool,
              max_opens_per_uid: int | None, lockd_patience: float | None,
              verbose: int) -> None:
    """Serve SOURCE at MOUNTPOINT as guest NAME until unmounted or signalled."""
    setup_logging(verbose)
    if lockd_socket and journal:
        raise click.UsageError("--journal is for the embedded manager; the daemon keeps its own")
    if lockd_patience is not None and not lockd_socket:
        raise click.UsageError("--lockd-patience is for --lockd (the embedded manager never waits)")
    from fuse_server.backing import BackingFiles, stack_depth_for
    from fuse_server.locks import LocalLocks, RemoteLocks
    from fuse_server.passthrough import Passthrough
    from fuse_server.session import MAX_WRITE, Session
    from fuse_server.transports.devfuse import DevFuse, clean_stale
    from fuse_server.transports.fuse_uring import uring_enabled

    if os.geteuid() != 0:
        raise click.ClickException("mount needs root (mount(2) of /dev/fuse)")
    try:
        clean_stale(mountpoint)
    except (OSError, RuntimeError) as exc:
        raise click.ClickException(str(exc)) from None
    service = open_lock_service(lockd_socket, journal, guest, lockd_patience)
    fs = Passthrough(source)
    dev = DevFuse(mountpoint, MAX_WRITE + 4096)
    backing = BackingFiles(dev.fd, stack_depth_for(fs.source)) if passthrough else None
    uring = None
    if io_uring and uring_enabled():
        from fuse_server.transports.fuse_uring import UringQueues

        # (the rings exist before the mount: INIT asks for io_uring only if they do)
        cpus = max(1, len(os.sched_getaffinity(0)))
        uring = UringQueues(dev.fd, MAX_WRITE, threads_per_cpu=max(1, threads // cpus))
        if not uring.ok:
            uring = None
    session = Session(fs, service, guest, dev.send, cache=cache, posix_acl=posix_acl,
                      killpriv_v2=killpriv_v2,
                      backing=backing, uring=uring is not None,
                      max_opens_per_uid=max_opens_per_uid,
                      locks=RemoteLocks if lockd_socket else LocalLocks, native=native_path)
    if uring is not None:
        uring.handle = session.handle
        dev.uring = uring

        def start_uring() -> None:
            if session.uring:  # requests come through io_uring too: not all read in order
                session.fs.table.order_reads(False)
                uring.start()

        dev.after_init = start_uring

    def on_signal(signo: int, frame: object) -> None:
        dev.stopped.set()
        if uring is not None:
            uring.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    try:
        dev.mount()
    except OSError as exc:
        raise click.ClickException(str(exc)) from None
    log.info("serving %s at %s as guest %r (cache=%s, threads=%d, locks=%s, passthrough=%s, "
             "native=%s)", fs.source, dev.mountpoint, guest, cache, threads,
             lockd_socket or "embedded", "asked" if passthrough else "off",
             "on" if native_path and fs.table.native is not None else "off")
    dev.start(session.handle, threads, session.quick_ops(), table=fs.table)
    try:
        while not dev.stopped.wait(1.0):
            pass
    finally:
        dev.unmount()
        try:
            session.close()  # the guest's locks and waits go with it
        except Exception:
            log.exception("releasing guest %r", guest)
        close_service(service)
        log.info("unmounted %s", dev.mountpoint)
    # Worker threads may still sit in read(2) on /dev/fuse; exiting ends them.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
