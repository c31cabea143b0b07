"""Starting a virtio-fs back-end the way launchers start virtiofsd.

`run(argv, prog, defaults)` is `vfs-lockd-virtiofsd` and `vfs-lockd virtiofs`: parse
virtiofsd's command line (virtiofsd_options), take the listening socket (an inherited
`--fd`, or `--socket-path` with its PATH.pid), name the guest, pick the lock service,
open everything the sandbox will no longer reach, confine (sandbox; without --sandbox the
strongest that can be set up here), install the seccomp filter, print the line launchers
wait for, and serve front-ends until the one (or, with --persist, the last)
goes away.

Lifetime and signals: the back-end exits 0 when its front-end disconnects (the guest's
locks and waits are released). SIGTERM/SIGINT/SIGHUP stop it the same way, except when a
guest is still connected and its locks live in the central daemon: then the back-end
only disconnects from the daemon, which keeps the guest's locks for its --guest-grace
(a back-end stopping is no reason to hand a running guest's locks to someone else); a
front-end that is already gone (`virsh destroy` kills QEMU first) is released at once.
SIGKILL ends the process; the daemon's grace applies the same way. A stop signal may be
delivered to any thread (some set their own signal masks), and the main thread sits in
accept()/recv(): the signal's number reaches a dedicated thread through Python's wakeup
fd, and that thread does the stopping.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import resource
import select
import signal
import socket
import stat
import sys
import threading
from collections.abc import Mapping

from fuse_server import sandbox, seccomp
from fuse_server.virtiofsd_options import (
    OptionError,
    Options,
    capabilities,
    check,
    migration_summary,
    parse,
    usage,
)
from lockd import procfd

log = logging.getLogger("vfs-lockd.virtio")

READY_LINE = "Waiting for vhost-user socket connection..."  # what Kata waits for
DEFAULT_LOCKD_SOCKET = "/run/vfs-lockd/lockd.sock"  # debian/vfs-lockd.socket serves it
LOCKD_ENV = "VFS_LOCKD_SOCKET"
STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP}
_LIBVIRT_DOMAIN_DIR = re.compile(r"^domain-\d+-(.+)$")


class LaunchError(Exception):
    """The back-end cannot start: a one-line reason, exit status 1."""


# ---------------------------------------------------------------- naming and choosing
def derive_guest_name(tag: str | None, socket_path: str | None, pid: int) -> str:
    """The guest's name for the lock manager when --guest is not given: --tag, else
    from the socket's path (libvirt's /var/lib/libvirt/qemu/domain-ID-NAME/ALIAS-fs.sock
    gives NAME/ALIAS, any other DIR/FILE.sock gives DIR/FILE), plus "@PID" so that two
    back-ends never share a name (the daemon refuses a second connection of a name and
    ends a disconnected one's session when a new one comes)."""
    if tag:
        base = tag
    elif socket_path and not socket_path.startswith("\0"):
        directory, name = os.path.split(socket_path)
        parent = os.path.basename(directory)
        m = _LIBVIRT_DOMAIN_DIR.match(parent)
        suffix = "-fs.sock" if m else ".sock"  # libvirt names it ALIAS-fs.sock
        if name.endswith(suffix) and len(name) > len(suffix):
            name = name[: -len(suffix)]
        base = f"{m.group(1) if m else parent}/{name}" if parent else name
    else:
        base = "virtiofs"
    base = "".join(c if c.isprintable() and not c.isspace() else "_" for c in base)[:200]
    return f"{base}@{pid}"


def daemon_listening(path: str, timeout: float = 1.0) -> bool:
    """Whether something accepts connections on the Unix socket `path`."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    s.settimeout(timeout)
    try:
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()


def choose_lock_daemon(o: Options, environ: Mapping[str, str],
                       default: str = DEFAULT_LOCKD_SOCKET) -> tuple[str | None, str]:
    """(daemon socket or None for the embedded manager, why): --lockd, else (with
    discovery) $VFS_LOCKD_SOCKET, else the default socket when a daemon listens there,
    else embedded. --journal asks for the embedded manager."""
    if o.lockd:
        return o.lockd, f"lock daemon {o.lockd} (--lockd)"
    if o.journal:
        return None, f"embedded lock manager, journal {o.journal} (--journal)"
    if o.discover_daemon:
        env = environ.get(LOCKD_ENV)
        if env:
            return env, f"lock daemon {env} (${LOCKD_ENV})"
        if daemon_listening(default):
            return default, f"lock daemon {default} (the default socket; a daemon listens)"
        return None, f"embedded lock manager (no daemon listens on {default})"
    return None, "embedded lock manager"


# ---------------------------------------------------------------- the listening socket
class Listener:
    """(A plain class: no dataclasses in the back-end, whose import costs each ~1 MiB.)"""

    __slots__ = ("sock", "path", "dir_fd", "owned", "pid_fd")

    def __init__(self, sock: socket.socket | None, path: str | None, dir_fd: int = -1) -> None:
        self.sock = sock
        self.path = path  # the socket's file (for the guest's name), None if unnamed
        self.dir_fd = dir_fd  # the socket's directory: cleanup works from inside a sandbox too
        self.owned: list[tuple[str, int]] = []  # (name, inode) we made
        self.pid_fd = -1  # PATH.pid, flock()ed while we serve

    def remove(self) -> None:
        """Unlink the socket and pid file we created (if they are still ours)."""
        for name, ino in self.owned:
            with contextlib.suppress(OSError):
                if os.stat(name, dir_fd=self.dir_fd, follow_symlinks=False).st_ino == ino:
                    os.unlink(name, dir_fd=self.dir_fd)


def _inherited(fd: int) -> Listener:
    try:
        st = os.fstat(fd)
    except OSError as exc:
        raise LaunchError(f"--fd={fd}: {exc.strerror}") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise LaunchError(f"--fd={fd} is not a socket")
    sock = socket.socket(fileno=fd)
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        raise LaunchError(f"--fd={fd} is not a Unix stream socket")
    if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        raise LaunchError(f"--fd={fd} is not a listening socket")
    sock.set_inheritable(False)
    name = sock.getsockname()
    return Listener(sock, name if isinstance(name, str) and name else None)


def _lock_pid_file(dir_fd: int, name: str, shown: str) -> tuple[int, int]:
    """Create and flock PATH.pid as virtiofsd does (0600, exclusive, held while serving)
    and write our pid: (fd, inode). Another live back-end on the socket holds the lock."""
    while True:
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            try:
                with open(name, opener=lambda p, f: os.open(p, f, dir_fd=dir_fd)) as f:
                    other = f.read().strip()
            except OSError:
                other = "?"
            raise LaunchError(f"{shown} is locked: another back-end (pid {other}) serves "
                              "this socket") from None
        ino = os.fstat(fd).st_ino
        try:
            current = os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_ino
        except FileNotFoundError:
            current = -1
        if current == ino:
            break
        os.close(fd)  # removed or replaced meanwhile by the back-end that held it: again
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd, ino


def open_listener(o: Options) -> Listener:
    if o.fd is not None:
        return _inherited(o.fd)
    from fuse_server.transports.vhost_user import listen

    path = os.path.abspath(o.socket_path)
    directory, name = os.path.split(path)
    try:
        dir_fd = os.open(directory, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise LaunchError(f"--socket-path={path}: {directory}: {exc.strerror}") from None
    lst = Listener(None, path, dir_fd)
    try:
        lst.pid_fd, pid_ino = _lock_pid_file(dir_fd, name + ".pid", path + ".pid")
        lst.owned.append((name + ".pid", pid_ino))
        lst.sock = listen(path)
        lst.owned.append((name, os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_ino))
        if o.socket_group:
            import grp

            try:
                gid = grp.getgrnam(o.socket_group).gr_gid
            except KeyError:
                raise LaunchError(f"--socket-group: no group {o.socket_group!r}") from None
            os.chown(path, -1, gid)
            os.chmod(path, 0o660)
    except LaunchError:
        lst.remove()
        raise
    except OSError as exc:
        lst.remove()
        raise LaunchError(f"listen on {path}: {exc.strerror or exc}") from None
    return lst


# ---------------------------------------------------------------- setup
def setup_logging(o: Options, prog: str) -> None:
    handler: logging.Handler | None = None
    if o.syslog:
        from logging.handlers import SysLogHandler  # only here: few back-ends use syslog

        try:
            handler = SysLogHandler("/dev/log", facility=SysLogHandler.LOG_DAEMON)
            handler.setFormatter(logging.Formatter(
                f"{os.path.basename(prog.split()[0])}[%(process)d]: %(levelname)s %(message)s"))
        except OSError:
            handler = None
    if handler is None:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(
            "%(asctime)s vfs-lockd[%(process)d] %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(o.log_level)
    if o.syslog and isinstance(handler, logging.StreamHandler):
        log.warning("--syslog: /dev/log is not available; logging to stderr")


def _preload(central: bool, journal: bool) -> None:
    """Import now what serving needs: a sandbox cannot import anything later. Only what
    this configuration needs: every module costs each back-end (one per guest) its
    memory (the journal, with sqlite3, adds about 2.5 MiB of RSS to the engine)."""
    import grp  # noqa: F401
    import linecache  # noqa: F401 - tracebacks in the log
    import traceback  # noqa: F401

    import fuse_server.lockservice  # noqa: F401 - not fuse_server.cli: no click here
    import fuse_server.passthrough  # noqa: F401
    import fuse_server.session  # noqa: F401
    import fuse_server.transports.vhost_user  # noqa: F401
    import lockd.engine.manager  # noqa: F401
    from fuse_server.transports.virtqueue import require_native

    if central:  # the daemon's client (a migration's destination makes one too)
        import lockd.daemon.client  # noqa: F401
    if journal:  # the embedded manager's journal (--journal)
        import lockd.journal.store  # noqa: F401

    try:
        require_native()
    except RuntimeError as exc:
        raise LaunchError(str(exc)) from None


def _watch_moves(root: str) -> None:
    """Made here, before seccomp (the filter has no fanotify): the count of directory
    renames every session of the share reads (fuse_server/moves.py)."""
    from fuse_server import moves

    fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        moves.for_share(fd)
    finally:
        os.close(fd)


VIRTIOFSD_NOFILE = 1_000_000  # virtiofsd's default RLIMIT_NOFILE (capped by fs.nr_open)


def _set_rlimit(n: int | None) -> None:
    """--rlimit-nofile N: exactly N; 0: the hard limit it was started with (the soft
    one raised to it, as the lock manager does anyway); not given: virtiofsd's
    default, min(1,000,000, fs.nr_open), never lower than it is (raising the hard limit
    needs CAP_SYS_RESOURCE; without it, as for 0). Every file the guest opens costs
    this process a descriptor: a guest process that may open as many files as its own
    limit allows must not find ours lower."""
    if n is None:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        try:
            with open("/proc/sys/fs/nr_open") as f:
                target = min(VIRTIOFSD_NOFILE, int(f.read()))
        except (OSError, ValueError):
            target = VIRTIOFSD_NOFILE
        inf = resource.RLIM_INFINITY
        if soft == inf or soft >= target:
            return
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE,
                               (target, hard if hard == inf else max(target, hard)))
            return
        except (ValueError, OSError):
            n = 0
    if n == 0:
        from lockd.engine.descriptions import raise_fd_limit

        raise_fd_limit()
        return
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (n, n))
    except (ValueError, OSError) as exc:
        raise LaunchError(f"--rlimit-nofile={n}: {exc}") from None


def _frontend_connected(conn: socket.socket) -> bool:
    """Whether the front-end is still there (the peer has not closed its end)."""
    try:
        p = select.poll()
        p.register(conn, select.POLLRDHUP)
        events = p.poll(0)
    except (OSError, ValueError):
        return False
    return not any(ev & (select.POLLRDHUP | select.POLLHUP | select.POLLERR | select.POLLNVAL)
                   for _, ev in events)


class HostPaths:
    """A lock service told each file's host path. Inside a sandbox a descriptor's
    /proc link reads "/dir/file" (relative to the shared directory, or to a mount the
    lock daemon cannot see); the journal needs the host's path to reopen the file after
    a restart."""

    def __init__(self, service, source: str) -> None:  # noqa: ANN001 - a LockService
        self._service, self._source = service, source

    def _host_path(self, fd: int, path: str | None) -> str | None:
        if path is None:
            with contextlib.suppress(OSError):
                inside = os.readlink(procfd.path(fd))
                if inside.startswith("/"):
                    path = os.path.join(self._source, inside.lstrip("/"))
        return path

    def file(self, fd: int, path: str | None = None,  # noqa: ANN201 - the service's FileRef
             guest: str | None = None):
        return self._service.file(fd, self._host_path(fd, path), guest=guest)  # embedded

    def register(self, nodeid: int, fd: int, path: str | None = None):  # noqa: ANN201
        return self._service.register(nodeid, fd, self._host_path(fd, path))  # the daemon's

    def __getattr__(self, name: str):  # noqa: ANN204 - everything else is the service's
        return getattr(self._service, name)

    def __setattr__(self, name: str, value: object) -> None:
        # The session sets the daemon client's callbacks (on_recall, ...): on the client.
        if name.startswith("_"):
            object.__setattr__(self, name, value)
        else:
            setattr(self._service, name, value)


# ---------------------------------------------------------------- serving
class Backend:
    """The serving process: lock service, sessions, front-ends, stop signals."""

    def __init__(self, o: Options, listener: Listener, guest: str, daemon: str | None,
                 root: str, service, owns_files: bool,  # noqa: ANN001 - a LockService
                 wakeup: socket.socket) -> None:
        self.o, self.listener, self.guest, self.daemon = o, listener, guest, daemon
        self.root, self.service, self.owns_files = root, service, owns_files
        self.wakeup = wakeup
        self.device = None
        self.stopping = threading.Event()
        self.migration_dir = listener.dir_fd  # _start sets open_migration_dir's
        # A migration's destination in central mode connects its own client to the
        # daemon (this path works inside the sandbox) and wraps it as `service` is.
        self.migration_daemon: str | None = None
        self.migration_wrap = None

    def new_session(self, send):  # noqa: ANN001, ANN201 - one FUSE session per device start
        from fuse_server.locks import LocalLocks, RemoteLocks
        from fuse_server.passthrough import Passthrough
        from fuse_server.session import Session

        o = self.o
        # notify=False: a Linux virtio-fs guest has no notification queue.
        return Session(Passthrough(self.root), self.service, self.guest, send, cache=o.cache,
                       notify=False, posix_locks=o.posix_lock, flock_locks=o.flock,
                       xattr=o.xattr, readonly=o.readonly, posix_acl=o.posix_acl,
                       killpriv_v2=o.killpriv_v2,
                       locks=RemoteLocks if self.daemon else LocalLocks, native=o.native)

    def _signals(self) -> None:
        while True:
            data = self.wakeup.recv(64)  # a byte per signal: its number
            if not data:
                return
            stop = [n for n in data if n in STOP_SIGNALS]
            if stop:
                break
        signo = stop[0]
        self.stopping.set()
        name = signal.Signals(signo).name
        dev = self.device
        if self.daemon and dev is not None and _frontend_connected(dev.conn):
            log.warning("%s while guest %r is connected: its locks stay with the lock daemon "
                        "(released after the daemon's --guest-grace)", name, self.guest)
            from fuse_server.lockservice import close_service

            close_service(self.service)  # a disconnect, no release
            self.finish()
        log.info("%s: stopping; guest %r's locks are released", name, self.guest)
        for s in ([dev.conn] if dev is not None else []) + [self.listener.sock]:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)  # wakes recv()/accept() in the main thread

    def serve(self) -> None:
        from fuse_server.migration import PortableOptions
        from fuse_server.transports.vhost_user import Device, MigrationConfig

        # Live migration hands descriptors over through a directory opened before the
        # sandbox (fuse_server/migration.py, open_migration_dir).
        migration = MigrationConfig(dir_fd=self.migration_dir, central=bool(self.daemon),
                                    daemon=self.migration_daemon,
                                    wrap=self.migration_wrap,
                                    portable=PortableOptions.of(self.o))

        threading.Thread(target=self._signals, name="signals", daemon=True).start()
        sys.stderr.write(READY_LINE + "\n")
        sys.stderr.flush()
        while not self.stopping.is_set():
            try:
                conn, _ = self.listener.sock.accept()
            except OSError:
                if self.stopping.is_set():
                    break
                raise
            log.info("front-end connected")
            try:
                self.device = Device(conn, self.new_session, self.o.threads, migration)
            except Exception:  # a bug: say so and stop, do not serve half a device
                log.exception("setting up the device for guest %r", self.guest)
                conn.close()
                self.finish(1)
            if self.stopping.is_set():
                conn.shutdown(socket.SHUT_RDWR)
            self.device.run()  # until the front-end goes; releases the guest
            self.device = None
            if not self.o.persist:
                break
        self.finish()

    def finish(self, status: int = 0) -> None:
        from fuse_server.lockservice import close_service

        close_service(self.service)
        if self.owns_files:
            self.listener.remove()
        log.info("virtio-fs back-end for guest %r stopped", self.guest)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)  # worker threads may sit in blocking calls


MIGRATION_DIR_ENV = "VFS_LOCKD_MIGRATION_DIR"


def open_migration_dir(listener: Listener) -> int:
    """The directory where a live migration's source offers its descriptors and the
    destination collects them (fuse_server/migration.py): $VFS_LOCKD_MIGRATION_DIR, else
    /run/vfs-lockd/migration for root or $XDG_RUNTIME_DIR/vfs-lockd/migration (created
    0700: only our uid reaches it), else the socket's directory. Every back-end of one
    host and uid finds the same one, whatever its socket (libvirt passes --fd: no socket
    path at all). Opened now: the sandbox hides every path."""
    path = os.environ.get(MIGRATION_DIR_ENV)
    if not path:
        runtime = "/run" if os.geteuid() == 0 else os.environ.get("XDG_RUNTIME_DIR")
        path = os.path.join(runtime, "vfs-lockd", "migration") if runtime else None
    if path:
        try:
            # /run/vfs-lockd as vfs-lockd.socket makes it (DirectoryMode=0750), if first
            os.makedirs(os.path.dirname(path), mode=0o750, exist_ok=True)
            os.makedirs(path, mode=0o700, exist_ok=True)
            fd = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            st = os.fstat(fd)
            if st.st_uid == os.geteuid() and not st.st_mode & 0o022:
                return fd
            os.close(fd)
            log.warning("migration directory %s: not ours alone (owner %d, mode %o): "
                        "using the socket's directory", path, st.st_uid, st.st_mode & 0o7777)
        except OSError as exc:
            log.warning("migration directory %s: %s: using the socket's directory", path,
                        exc.strerror or exc)
    return listener.dir_fd


def choose_sandbox(o: Options, source: str) -> None:
    """The sandbox when none was asked for: the strongest that can be set up here
    (namespace, chroot, none, as virtiofsd prefers them), saying so on stderr when it is
    not the namespace. One asked for is never replaced (it fails, exit 1, if it cannot)."""
    if o.sandbox_given:
        return
    reasons = []
    for mode in sandbox.SANDBOX_MODES:
        why = sandbox.probe(mode, source)
        if why is None:
            break
        reasons.append(f"{mode}: {why}")
    if reasons:
        msg = (f"sandbox {mode} (virtiofsd's namespace sandbox cannot be set up here: "
               f"{'; '.join(reasons)}; --sandbox chooses)")
        print(f"vfs-lockd: {msg}", file=sys.stderr, flush=True)
        if not isinstance(logging.getLogger().handlers[0], logging.StreamHandler):
            log.warning("%s", msg)
    o.sandbox = mode


def _start(o: Options, prog: str) -> None:
    source = os.path.realpath(o.shared_dir)
    if not os.path.isdir(source):
        raise LaunchError(f"shared directory {o.shared_dir}: not a directory")
    choose_sandbox(o, source)
    for what in o.ignored:
        log.info("accepted, no effect here: %s", what)
    log.info("%s", migration_summary(o))
    if o.cache_given and o.cache_given != o.cache:
        log.info("cache=%s is served as cache=%s", o.cache_given, o.cache)
    daemon, why = choose_lock_daemon(o, os.environ)
    _preload(central=daemon is not None, journal=daemon is None and bool(o.journal))
    _set_rlimit(o.rlimit_nofile)
    # From here on the stop signals go to the signal thread (see the module doc). A
    # handler (not SIG_DFL) also makes them reach a PID namespace's init.
    for s in STOP_SIGNALS:
        signal.signal(s, lambda signo, frame: None)
    wakeup, wakeup_w = socket.socketpair()
    wakeup_w.setblocking(False)
    signal.set_wakeup_fd(wakeup_w.fileno(), warn_on_full_buffer=False)
    listener = open_listener(o)
    guest = o.guest or derive_guest_name(o.tag, listener.path, os.getpid())
    log.info("locks: %s", why)
    daemon_dir = -1
    if daemon:
        if not daemon_listening(daemon, timeout=5.0):
            listener.remove()
            raise LaunchError(f"lock daemon {daemon}: nothing accepts connections there")
        # Reconnects after a daemon restart go through this directory: inside the sandbox
        # its path is gone (AF_UNIX connect resolves "./FD/NAME" through /proc/self/fd).
        daemon_dir = os.open(os.path.dirname(os.path.abspath(daemon)),
                             os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    service = None

    def prepare() -> None:
        nonlocal service
        if daemon is None:
            from fuse_server.lockservice import lock_service

            try:
                service = lock_service(None, o.journal, guest)
            except Exception as exc:  # noqa: BLE001 - a clear line, exit 1
                raise LaunchError(f"lock service: {exc}") from None

    migration_dir = open_migration_dir(listener)
    owns_files = o.sandbox != "namespace"  # else the parent, outside, removes them
    try:
        # With `namespace` the parent removes them: vl-waiter does what remove() does,
        # holding PATH.pid (flock()ed) until the files are gone.
        root = sandbox.enter(o.sandbox, source, prepare=prepare,
                             in_parent=listener.sock.close,
                             at_exit=lambda code: listener.remove(),
                             cleanup=sandbox.ExitCleanup(listener.dir_fd,
                                                         tuple(listener.owned),
                                                         (listener.pid_fd,)))
    except sandbox.SandboxError as exc:
        listener.remove()
        raise LaunchError(f"sandbox {o.sandbox}: {exc}") from None
    if daemon:
        from lockd.daemon.client import LockClient

        path = daemon if o.sandbox == "none" else \
            f"{procfd.path(daemon_dir)}/{os.path.basename(daemon)}"
        try:
            service = LockClient(path, guest, delegation=True)
        except OSError as exc:
            if owns_files:
                listener.remove()
            raise LaunchError(f"lock daemon {daemon}: {exc}") from None
    if root != source:
        service = HostPaths(service, source)
    os.umask(0)  # modes arrive with the guest's umask applied (FUSE DONT_MASK)
    _watch_moves(root)  # (fanotify: not in the seccomp filter's list)
    if o.seccomp != "none" and not o.seccomp_given and not seccomp.supported():
        log.warning("no seccomp filter: no system call table for %s (--seccomp=none "
                    "says so)", os.uname().machine)
        o.seccomp = "none"
    try:
        seccomp.install(o.seccomp)  # last: everything that needs more is done
    except seccomp.SeccompError as exc:
        if owns_files:
            listener.remove()
        raise LaunchError(f"seccomp {o.seccomp}: {exc}") from None
    log.info("serving %s%s to guest %r on %s (cache=%s, sandbox=%s, threads=%d, xattr=%s, "
             "readonly=%s, posix_lock=%s, flock=%s, posix_acl=%s%s, seccomp=%s, native=%s)",
             source,
             "" if root == source else " (confined)", guest,
             listener.path or f"fd {o.fd}", o.cache, o.sandbox, o.threads, o.xattr,
             o.readonly, o.posix_lock, o.flock, o.posix_acl, ", persist" if o.persist else "",
             o.seccomp, "on" if o.native else "off")
    backend = Backend(o, listener, guest, daemon, root, service, owns_files, wakeup)
    backend.migration_dir = migration_dir
    if daemon:
        backend.migration_daemon = path
        if root != source:
            backend.migration_wrap = lambda client: HostPaths(client, source)
    backend.serve()


def run(argv: list[str], prog: str, defaults: Options) -> int:
    """The command: exit status 0 (served, or --help/-V/--print-capabilities) or 1."""
    try:
        o = parse(argv, defaults)
        if o.help:
            print(usage(prog, defaults))
            return 0
        if o.version:
            from importlib.metadata import PackageNotFoundError, version

            try:
                v = version("vfs-lockd")
            except PackageNotFoundError:
                v = "unknown"
            print(f"{prog} {v} (vfs-lockd: a virtiofsd-compatible virtio-fs back-end)")
            return 0
        if o.print_capabilities:
            print(capabilities())
            return 0
        check(o)
    except OptionError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 1
    setup_logging(o, prog)
    try:
        _start(o, prog)  # serves, then exits the process itself
    except LaunchError as exc:
        log.error("%s", exc)
        return 1
    return 0
