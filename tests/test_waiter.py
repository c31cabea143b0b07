"""The namespace sandbox's waiting parent: lockd/vl-waiter (native/vl_waiter.c), which the
parent of `--sandbox=namespace` execs after the fork instead of staying a Python process
(issue 26: memory per guest). Two parts:

- the program alone, as the child of a harness that forks a child and execs the waiter
  the way fuse_server/sandbox.py does: signals forwarded (also those sent before the
  exec, and those the launcher left ignored), the exit status (code, 128 + signal), the
  files removed only while they are the inodes the back-end made, SIGCHLD left ignored;
- real back-ends (`vfs-lockd-virtiofsd`, default namespace sandbox), each test run twice:
  `waiter` (the installed tree) and `python` (a copy of the package without the program:
  a broken install, which falls back to the Python parent with a warning). The behaviour
  a launcher sees must be the same in both: stop signals, exit statuses, files removed,
  the child dying with a SIGKILLed parent. What differs: /proc/PID/exe, and the waiter
  keeps no socket open.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO
from procutil import stop as stop_process
from procutil import wait_until

from fuse_server import sandbox
from fuse_server.launch import READY_LINE

WAITER = Path(sandbox.waiter_program())
DROPIN = "from fuse_server.virtiofs_cli import main; main()"
STOPS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def _root_only() -> None:
    if os.geteuid() != 0:
        if os.environ.get("CI") == "true":
            pytest.fail("the namespace sandbox needs root (CI=true)")
        pytest.skip("the namespace sandbox needs root")


def test_the_waiter_is_built() -> None:
    """setup.sh / pip builds it beside the cffi module; the sandbox finds it there."""
    assert WAITER.parent == REPO / "lockd"
    assert os.access(WAITER, os.X_OK), f"{WAITER} not built (pip install -e . builds it)"


# ============================================================== the program alone
# argv: WAITER CASE LOG DIR [INO/NAME]... Blocks the forwarded signals, forks a child that
# logs each forwarded signal it gets (SIGTERM: exit 7), then execs the waiter as
# sandbox._exec_waiter does (the parameters in VFS_LOCKD_WAITER).
HARNESS = r"""
import os, signal, sys
waiter, case, log, directory, *files = sys.argv[1:]
FORWARDED = [int(s) for s in os.environ["FORWARDED"].split(",")]
signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED)
if case == "running":  # what a careless launcher may leave ignored
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    signal.signal(signal.SIGQUIT, signal.SIG_IGN)
child = os.fork()
if child == 0:
    import ctypes
    ctypes.CDLL(None).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG: no stray child
    def got(signo, frame):
        with open(log, "a") as f:
            f.write(f"{signo}\n")
        if signo == signal.SIGTERM:
            os._exit(7)
    for s in FORWARDED:
        signal.signal(s, got)
    if case == "killed":
        os.kill(os.getpid(), signal.SIGKILL)
    if case == "files":
        os._exit(3)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, FORWARDED)
    while True:
        signal.pause()
dir_fd = -1
if directory != "-":
    dir_fd = os.open(directory, os.O_PATH | os.O_DIRECTORY)
    os.set_inheritable(dir_fd, True)
if case == "pending":  # sent to the parent before the exec: pending across it
    for s in FORWARDED:
        os.kill(os.getpid(), s)
spec = "/".join([str(child), str(dir_fd), "harness", *files])
os.execve(waiter, [waiter], {**os.environ, "VFS_LOCKD_WAITER": spec})
"""


def _harness(tmp_path: Path, case: str, directory: str = "-",
             files: tuple[str, ...] = ()) -> tuple[subprocess.Popen, Path]:
    log = tmp_path / f"{case}.log"
    env = {**os.environ, "FORWARDED": ",".join(str(int(s)) for s in sandbox.FORWARDED)}
    p = subprocess.Popen([sys.executable, "-c", HARNESS, str(WAITER), case, str(log),
                          directory, *files], env=env, stdin=subprocess.DEVNULL)
    return p, log


def _is_waiter(pid: int) -> bool:
    with contextlib.suppress(OSError):
        return os.path.samefile(f"/proc/{pid}/exe", WAITER)
    return False


def _got(log: Path) -> list[int]:
    return [int(x) for x in log.read_text().split()] if log.exists() else []


def test_signals_sent_before_the_exec_are_forwarded(tmp_path: Path) -> None:
    """Every forwarded signal, pending in the parent across its exec, reaches the child
    (in signal order: SIGTERM, the highest, last); the waiter exits with the child's
    code."""
    p, log = _harness(tmp_path, "pending")
    try:
        assert p.wait(20) == 7
    finally:
        stop_process(p)
    assert _got(log) == sorted(int(s) for s in sandbox.FORWARDED)


def test_signals_to_the_running_waiter_are_forwarded(tmp_path: Path) -> None:
    """Sent once it runs, with SIGQUIT and SIGCHLD left ignored by the launcher: every
    signal is forwarded, and the child's status is still collected (an ignored SIGCHLD
    would have the kernel reap it: exit 1)."""
    p, log = _harness(tmp_path, "running")
    try:
        assert wait_until(lambda: _is_waiter(p.pid), 20), "the harness did not exec the waiter"
        for s in sandbox.FORWARDED:  # SIGTERM first in FORWARDED: the child would exit
            if s != signal.SIGTERM:
                p.send_signal(s)
        others = sorted(int(s) for s in sandbox.FORWARDED if s != signal.SIGTERM)
        assert wait_until(lambda: sorted(_got(log)) == others, 20), _got(log)
        p.send_signal(signal.SIGTERM)
        assert p.wait(20) == 7
    finally:
        stop_process(p)
    got = _got(log)  # (in the order they came: the child may take them in any order)
    assert sorted(got[:-1]) == others and got[-1] == int(signal.SIGTERM), got


def test_a_killed_child_is_128_plus_the_signal(tmp_path: Path) -> None:
    p, log = _harness(tmp_path, "killed")
    try:
        assert p.wait(20) == 128 + signal.SIGKILL
    finally:
        stop_process(p)
    assert _got(log) == []


def test_only_the_files_still_ours_are_removed(tmp_path: Path) -> None:
    """As Listener.remove(): a name is unlinked only if it is still the inode the back-end
    created (another back-end may have replaced it); a missing one is no error."""
    d = tmp_path / "d"
    d.mkdir()
    for name in ("ours", "replaced", "other"):
        (d / name).write_text(name)
    stale = (d / "other").stat().st_ino  # "replaced" now has another inode than this one
    files = (f"{(d / 'ours').stat().st_ino}/ours", f"{stale}/replaced", "12345/missing")
    p, _ = _harness(tmp_path, "files", str(d), files)
    try:
        assert p.wait(20) == 3
    finally:
        stop_process(p)
    assert sorted(os.listdir(d)) == ["other", "replaced"]


def test_started_by_hand_it_says_so() -> None:
    r = subprocess.run([str(WAITER)], capture_output=True, text=True, timeout=30,
                       env={k: v for k, v in os.environ.items() if k != sandbox.WAITER_ENV})
    assert r.returncode == 2 and "VFS_LOCKD_WAITER" in r.stderr


# ============================================================== real back-ends
@pytest.fixture(scope="module")
def broken_install(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the packages without lockd/vl-waiter."""
    root = tmp_path_factory.mktemp("broken-install")
    for pkg in ("lockd", "fuse_server"):
        shutil.copytree(REPO / pkg, root / pkg,
                        ignore=shutil.ignore_patterns("__pycache__", sandbox.WAITER, "*.o",
                                                      "*.c"))
    assert not (root / "lockd" / sandbox.WAITER).exists()
    return root


class Backend:
    """`vfs-lockd-virtiofsd` with the default (namespace) sandbox, from the tree `tree`."""

    def __init__(self, tree: Path, log: Path, *args: str,
                 pass_fds: tuple[int, ...] = ()) -> None:
        self.argv = [sys.executable, "-c", DROPIN, *args]
        self.log = log
        self._logf = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(self.argv, stdout=self._logf, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, pass_fds=pass_fds, cwd=tree,
                                     env={**os.environ, "PYTHONPATH": str(tree)})
        if not wait_until(lambda: READY_LINE in self.output() or self.proc.poll() is not None,
                          30) or self.proc.poll() is not None:
            self.stop()
            raise AssertionError(f"the back-end did not start:\n{self.output()}")
        self.child = self._child()

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def _child(self) -> int:
        path = f"/proc/{self.proc.pid}/task/{self.proc.pid}/children"
        assert wait_until(lambda: Path(path).read_text().split() != [], 20)
        return int(Path(path).read_text().split()[0])

    def stop(self) -> int | None:
        rc = stop_process(self.proc)
        self._logf.close()
        return rc


@pytest.fixture(params=["waiter", "python"])
def backends(request: pytest.FixtureRequest, tmp_path: Path):
    _root_only()
    tree = REPO if request.param == "waiter" else request.getfixturevalue("broken_install")
    share = tmp_path / "share"
    share.mkdir()
    (share / "f").write_text("hello\n")
    started: list[Backend] = []

    def start(*args: str, **kw) -> Backend:  # noqa: ANN003
        b = Backend(tree, tmp_path / f"backend{len(started)}.log", f"--shared-dir={share}",
                    *args, **kw)
        started.append(b)
        _check_parent(request.param, b)
        return b

    start.mode = request.param  # type: ignore[attr-defined]
    try:
        yield start
    finally:
        for b in started:
            b.stop()
            with contextlib.suppress(ProcessLookupError):
                os.kill(b.child, signal.SIGKILL)  # (dies with its parent; never outlives)


def _fds(pid: int) -> list[str]:
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            out.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
    return out


def _check_parent(mode: str, b: Backend) -> None:
    """The pid the launcher knows: the waiter (or, without it, Python with a warning),
    with the launcher's command line and process name either way."""
    pid = b.proc.pid
    if mode == "waiter":
        # (the exec may still be under way: while it swaps the memory, cmdline reads empty)
        assert wait_until(lambda: _is_waiter(pid), 20), os.readlink(f"/proc/{pid}/exe")
    cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:-1]
    assert cmd == [os.fsencode(a) for a in b.argv]
    comm = Path(sys.executable).name[:15]  # (the waiter sets it again just after its exec)
    assert wait_until(lambda: Path(f"/proc/{pid}/comm").read_text().strip() == comm, 20)
    if mode == "waiter":
        assert "stays a Python process" not in b.output()
        # Nothing of the guest's: no socket (the listener closed, the connection is the
        # child's); stdio, the socket's directory and PATH.pid (if named) only.
        assert not [f for f in _fds(pid) if f.startswith("socket:")], _fds(pid)
    else:
        assert os.path.samefile(f"/proc/{pid}/exe", sys.executable)
        assert f"{sandbox.WAITER} is missing" in b.output()
        assert "stays a Python process" in b.output()


@pytest.mark.parametrize("stop", STOPS, ids=lambda s: s.name)
def test_stop_signal_ends_the_child_and_cleans_up(backends, tmp_path: Path,
                                                  stop: signal.Signals) -> None:
    """SIGQUIT, SIGUSR1, SIGUSR2 are forwarded (the child, its PID namespace's init,
    ignores them) and end neither process; a stop signal ends both, exit 0, and the
    socket and PATH.pid are removed."""
    sock = tmp_path / "vfs.sock"
    b = backends(f"--socket-path={sock}")
    pid_file = Path(f"{sock}.pid")
    assert pid_file.read_text() == f"{b.proc.pid}\n"
    assert str(pid_file) in _fds(b.proc.pid)  # held (flock()ed) until the files are gone
    with open(pid_file) as f, pytest.raises(BlockingIOError):
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    for s in (signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2, stop):
        b.proc.send_signal(s)
    assert b.proc.wait(20) == 0, b.output()
    assert wait_until(lambda: not os.path.exists(f"/proc/{b.child}"), 20)
    assert not sock.exists() and not pid_file.exists()


def test_a_killed_child_gives_137_and_cleans_up(backends, tmp_path: Path) -> None:
    sock = tmp_path / "vfs.sock"
    b = backends(f"--socket-path={sock}")
    os.kill(b.child, signal.SIGKILL)
    assert b.proc.wait(20) == 128 + signal.SIGKILL
    assert not sock.exists() and not Path(f"{sock}.pid").exists()


def test_the_child_dies_with_a_killed_parent(backends, tmp_path: Path) -> None:
    """SIGKILL of the pid launchers know: the child follows (PR_SET_PDEATHSIG); nobody is
    left to remove the files, and the pid file's lock is gone with both."""
    sock = tmp_path / "vfs.sock"
    b = backends(f"--socket-path={sock}")
    b.proc.kill()
    assert b.proc.wait(20) == -signal.SIGKILL
    assert wait_until(lambda: not os.path.exists(f"/proc/{b.child}"), 20), \
        "the sandboxed child outlived its parent"
    assert sock.exists()
    with open(f"{sock}.pid") as f:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_an_inherited_listening_socket_is_not_kept_by_the_parent(backends,
                                                                 tmp_path: Path) -> None:
    """libvirt's and Kata's --fd=N: the parent keeps no copy of it (checked in
    _check_parent for the waiter); the socket's file is the launcher's, left alone."""
    path = tmp_path / "libvirt.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))
        s.listen()
        b = backends(f"--fd={s.fileno()}", pass_fds=(s.fileno(),))
    b.proc.send_signal(signal.SIGTERM)
    assert b.proc.wait(20) == 0, b.output()
    assert path.exists()
