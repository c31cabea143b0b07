"""Confining a virtio-fs back-end to its shared directory, as virtiofsd does.

- `namespace`: new PID, mount and network namespaces (the process forks: the parent,
  whose pid launchers know, waits, forwards signals and exits with the child's status;
  the child dies with it, PR_SET_PDEATHSIG). The parent execs lockd/vl-waiter
  (native/vl_waiter.c) for that, so that it is not a Python interpreter whose pages the
  child's writes have made private; without the program (a broken install) it stays
  Python, with a warning. In the child a fresh /proc is mounted, the
  shared directory is bind-mounted onto itself and made the root with pivot_root(2),
  and the old root is detached. Nothing of the host's file system stays reachable by name.
- `chroot`: chroot(2) into the shared directory (for containers, whose runtime has set
  up the namespaces already).
- `none`: no confinement.

Either way /proc is no longer reachable by name, yet the passthrough and the lock manager
reopen descriptors through /proc/self/fd. Like virtiofsd, the sandbox opens the
/proc/self/fd directory first and keeps it; it becomes the working directory and
`lockd.procfd` forms paths relative to it ("./N"). Everything else the back-end needs
(listening socket, pid file, journal, syslog socket, the lock daemon's directory) is
opened by the caller before `enter()`, and every module is imported before it.

A sandbox that is asked for and cannot be set up raises SandboxError: never skipped.
`probe()` tries one in a throw-away child, for a launcher choosing the strongest that
works here when none was asked for.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import select
import signal
import sys
import threading
from collections.abc import Callable

import lockd
from lockd import procfd
from lockd.structs import NamedTuple  # typing's, without importing typing

CLONE_NEWNS = 0x00020000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_NOSUID, MS_NODEV, MS_NOEXEC = 0x2, 0x4, 0x8
MS_BIND, MS_REC, MS_SLAVE = 0x1000, 0x4000, 0x80000
MNT_DETACH = 2
PR_SET_PDEATHSIG = 1
SANDBOX_MODES = ("namespace", "chroot", "none")
SYS_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41, "ppc64le": 203, "s390x": 217}
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1,
             signal.SIGUSR2)  # native/vl_waiter.c forwards the same
WAITER = "vl-waiter"
WAITER_ENV = "VFS_LOCKD_WAITER"

log = logging.getLogger(__name__)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                        ctypes.c_void_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_libc.unshare.argtypes = [ctypes.c_int]
_libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                        ctypes.c_ulong]


class SandboxError(Exception):
    """The requested sandbox could not be set up."""


class ExitCleanup(NamedTuple):
    """What the namespace sandbox's parent does once the child has ended, as data the
    native waiter can act on: unlink each (name, inode) of `files` in the directory
    `dir_fd` if the name is still that inode. `hold`: descriptors it keeps open until then
    (PATH.pid, whose flock must outlast the removal)."""
    dir_fd: int = -1
    files: tuple[tuple[str, int], ...] = ()
    hold: tuple[int, ...] = ()


def waiter_program() -> str:
    """lockd/vl-waiter: built and installed beside the cffi module."""
    return os.path.join(os.path.dirname(os.path.abspath(lockd.__file__)), WAITER)


def _call(what: str, ret: int) -> None:
    if ret != 0:
        e = ctypes.get_errno()
        raise SandboxError(f"{what}: {os.strerror(e)}")


def _enc(s: str | None) -> bytes | None:
    return s.encode() if s is not None else None


def _mount(src: str | None, target: str, fstype: str | None, flags: int) -> None:
    _call(f"mount {src or ''} on {target}",
          _libc.mount(_enc(src), _enc(target), _enc(fstype), flags, None))


def _pivot_root(new_root: str, put_old: str) -> None:
    nr = SYS_PIVOT_ROOT.get(os.uname().machine)
    if nr is None:
        raise SandboxError(f"pivot_root: unknown syscall number on {os.uname().machine}")
    _call("pivot_root", _libc.syscall(ctypes.c_long(nr), new_root.encode(), put_old.encode()))


def _use_proc_dir(proc_dir: int) -> None:
    """Make the kept /proc/self/fd directory the working directory (see the module doc),
    and check that descriptors reopen through it."""
    os.fchdir(proc_dir)
    procfd.use_cwd()
    if not os.path.isdir(procfd.path(proc_dir)):
        raise SandboxError("/proc/self/fd is not usable inside the sandbox")


def _chroot(root: str) -> None:
    proc_dir = os.open("/proc/self/fd", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.chroot(root)
    except OSError as exc:
        os.close(proc_dir)
        raise SandboxError(f"chroot {root}: {exc.strerror}") from None
    _use_proc_dir(proc_dir)  # kept open for the life of the process


def _namespace_child(root: str) -> None:
    """In the forked child: new mount and network namespaces, fresh /proc, pivot_root."""
    _call("unshare(CLONE_NEWNS|CLONE_NEWNET)", _libc.unshare(CLONE_NEWNS | CLONE_NEWNET))
    # Our mounts must not propagate to the host; the host's still propagate to us.
    _mount(None, "/", None, MS_REC | MS_SLAVE)
    _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)  # this PID namespace's
    proc_dir = os.open("/proc/self/fd", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    _mount(root, root, None, MS_BIND | MS_REC)  # pivot_root needs a mount point
    os.chdir(root)
    _pivot_root(".", ".")  # the old root ends up stacked on "/": detach it
    _call("umount2 of the old root", _libc.umount2(b".", MNT_DETACH))
    os.chdir("/")
    _use_proc_dir(proc_dir)


def _comm() -> bytes:
    """This process's name (/proc/self/comm), which the waiter keeps: `pgrep` finds
    processes by it."""
    try:
        with open("/proc/self/comm", "rb") as f:
            return f.read().strip().replace(b"/", b"")
    except OSError:
        return b""


def _exec_waiter(program: str, child: int, cleanup: ExitCleanup) -> None:
    """Become `program` (native/vl_waiter.c), keeping the pid, the command line, the
    process name and the descriptors of `cleanup`; every other descriptor we opened is
    close-on-exec. Returns only if the exec failed (then nothing has changed)."""
    fields = [str(child).encode(), str(cleanup.dir_fd).encode(), _comm()]
    for name, ino in cleanup.files:
        fields += [str(ino).encode(), os.fsencode(name)]
    env = dict(os.environb)
    env[WAITER_ENV.encode()] = b"/".join(fields)
    keep = [fd for fd in (cleanup.dir_fd, *cleanup.hold) if fd >= 0]
    for fd in keep:
        os.set_inheritable(fd, True)
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(program, sys.orig_argv or [program], env)
    except OSError as exc:
        for fd in keep:
            os.set_inheritable(fd, False)
        log.warning("namespace sandbox: cannot run %s (%s): the waiting parent stays a "
                    "Python process", program, exc.strerror or exc)


def _wait_child(child: int, at_exit: Callable[[int], None] | None,
                mask: set[signal.Signals]) -> None:
    """The parent of a namespace sandbox: forward signals, wait, exit as the child did.
    FORWARDED arrive blocked (see _namespace); `mask` is the mask to restore."""
    def forward(signo: int, frame: object) -> None:
        try:
            os.kill(child, signo)
        except ProcessLookupError:
            pass

    signal.set_wakeup_fd(-1)  # the caller's, for the child's signal thread
    for s in FORWARDED:
        signal.signal(s, forward)
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)  # what came meanwhile is forwarded now
    try:
        _, status = os.waitpid(child, 0)
        code = os.waitstatus_to_exitcode(status)
    except ChildProcessError:
        code = 1
    if code < 0:
        code = 128 - code  # killed by a signal: the shell's convention
    if at_exit is not None:
        try:
            at_exit(code)
        except Exception as exc:  # noqa: BLE001 - cleanup must not change the exit status
            print(f"vfs-lockd: cleanup after the sandboxed child: {exc}", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _namespace(root: str, prepare: Callable[[], None] | None,
               in_parent: Callable[[], None] | None,
               at_exit: Callable[[int], None] | None,
               cleanup: ExitCleanup | None) -> None:
    if threading.active_count() > 1:
        raise SandboxError("namespace sandbox: threads already running (cannot fork)")
    waiter = None
    if cleanup is not None or at_exit is None:  # else at_exit only Python can run
        waiter = waiter_program()
        if not os.access(waiter, os.X_OK):
            log.warning("namespace sandbox: %s is missing (a broken install?): the waiting "
                        "parent stays a Python process", waiter)
            waiter = None
    _call("unshare(CLONE_NEWPID)", _libc.unshare(CLONE_NEWPID))
    parent = os.pidfd_open(os.getpid())
    sys.stdout.flush()
    sys.stderr.flush()
    # Blocked from before the fork until the parent forwards them (the waiter takes them
    # pending across its exec): a stop signal sent meanwhile is not lost.
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED)
    try:
        child = os.fork()
    except OSError:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        os.close(parent)
        raise
    if child:
        os.close(parent)
        if in_parent is not None:
            in_parent()
        if waiter is not None:
            _exec_waiter(waiter, child, cleanup or ExitCleanup())  # returns if it failed
        _wait_child(child, at_exit, mask)  # never returns
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)
    # The child: die with the parent (a SIGKILL of the pid launchers know ends us too).
    try:
        _call("prctl(PR_SET_PDEATHSIG)", _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0))
        p = select.poll()
        p.register(parent, select.POLLIN)
        if p.poll(0):
            os._exit(1)  # the parent died before the prctl: nobody waits for us
        os.close(parent)
        if prepare is not None:
            prepare()
        _namespace_child(root)
    except Exception as exc:  # noqa: BLE001 - whatever it is, the child cannot serve
        what = "namespace sandbox: " if isinstance(exc, (SandboxError, OSError)) else ""
        print(f"vfs-lockd: {what}{exc}", file=sys.stderr)
        sys.stderr.flush()
        os._exit(1)


def probe(mode: str, root: str) -> str | None:
    """Can sandbox `mode` be set up here? None if so, else why not. Tried for real in a
    throw-away child (single-threaded callers only): its namespaces and its chroot die
    with it."""
    if mode == "none":
        return None
    if os.geteuid() != 0:
        return f"--sandbox={mode} needs root"
    r, w = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child exits
        try:
            os.close(r)
            if mode == "namespace":
                _call("unshare(CLONE_NEWPID|CLONE_NEWNS|CLONE_NEWNET)",
                      _libc.unshare(CLONE_NEWPID | CLONE_NEWNS | CLONE_NEWNET))
                _mount(None, "/", None, MS_REC | MS_SLAVE)
                _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
                _mount(root, root, None, MS_BIND | MS_REC)
            else:
                os.chroot(root)
            os._exit(0)
        except BaseException as exc:  # noqa: BLE001 - reported to the parent
            with contextlib.suppress(OSError):
                os.write(w, str(exc).encode()[:512])
            os._exit(1)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        why = f.read().decode(errors="replace")
    _, status = os.waitpid(child, 0)
    if os.waitstatus_to_exitcode(status) == 0:
        return None
    return why or f"--sandbox={mode}: the trial failed"


def enter(mode: str, root: str, prepare: Callable[[], None] | None = None,
          in_parent: Callable[[], None] | None = None,
          at_exit: Callable[[int], None] | None = None,
          cleanup: ExitCleanup | None = None) -> str:
    """Confine this process to `root` (an absolute, resolved directory); returns the path
    under which the shared directory is now reachable ("/" when confined).

    `prepare()` runs in the process that will serve, just before it is confined (open
    what must be opened there: with `namespace` that is the forked child).
    namespace: returns in the child only; the parent runs `in_parent()` (close what it
    does not need), becomes lockd/vl-waiter, which waits for the child, does `cleanup`
    (it is still outside the sandbox: remove socket and pid file) and exits with the
    child's status. `at_exit(status)` is the same cleanup in Python, for a parent that
    stays Python (no waiter program; or `at_exit` without `cleanup`)."""
    if mode not in SANDBOX_MODES:
        raise SandboxError(f"unknown sandbox mode {mode!r}")
    if mode != "none" and os.geteuid() != 0:
        raise SandboxError(f"--sandbox={mode} needs root (--sandbox=none runs without)")
    if mode == "namespace":
        _namespace(root, prepare, in_parent, at_exit, cleanup)
        return "/"
    if prepare is not None:
        prepare()
    if mode == "none":
        return root
    _chroot(root)
    return "/"
