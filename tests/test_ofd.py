"""lockd.engine.ofd against the real kernel: OFD locks vs other processes' classic locks and
flock, GETLK holders, waking a blocked wait with WAKE_SIGNAL, file handles."""

from __future__ import annotations

import errno
import fcntl
import importlib.util
import os
import platform
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from procutil import SYS_FCNTL, SYS_FLOCK, wait_until

from lockd.api import F_RDLCK, F_UNLCK, F_WRLCK, OFFSET_MAX
from lockd.engine import ofd


def _load_fallback() -> ModuleType:
    """A second copy of lockd.engine.ofd that sees no native module."""
    stub = ModuleType("lockd.native")
    stub.HAVE_NATIVE, stub.ffi, stub.lib = False, None, None  # type: ignore[attr-defined]
    saved = sys.modules["lockd.native"]
    sys.modules["lockd.native"] = stub
    try:
        spec = importlib.util.spec_from_file_location("_ofd_fallback", ofd.__file__)
        assert spec and spec.loader
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        sys.modules["lockd.native"] = saved
    assert not mod.HAVE_NATIVE
    return mod


IMPLS = ["native", "fallback"]


@pytest.fixture(params=IMPLS)
def impl(request: pytest.FixtureRequest) -> ModuleType:
    if request.param == "native":
        if not ofd.HAVE_NATIVE:
            pytest.skip("lockd._native not built")
        return ofd
    return _load_fallback()


@pytest.fixture
def path(tmp_path: Path) -> Path:
    p = tmp_path / "f"
    p.write_bytes(b"x" * 4096)
    return p


@pytest.fixture
def fds(path: Path) -> Iterator[list[int]]:
    """Two independent open file descriptions of the same file."""
    opened = [os.open(path, os.O_RDWR) for _ in range(2)]
    yield opened
    for fd in opened:
        os.close(fd)


class Holder:
    """Another process that takes a lock with `code` (fd is open on `path`), then waits
    for stdin to close."""

    def __init__(self, path: Path, code: str) -> None:
        script = textwrap.dedent(
            f"""
            import fcntl, os, sys
            fd = os.open({str(path)!r}, os.O_RDWR)
            {code}
            print("ready", flush=True)
            sys.stdin.read()
            """
        )
        self.proc = subprocess.Popen(
            [sys.executable, "-c", script],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline().strip() == "ready"
        self.pid = self.proc.pid

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=10)


def try_lockf_in_child(path: Path, start: int, length: int) -> bool:
    """True when another process can take a classic write lock on the range now."""
    code = textwrap.dedent(
        f"""
        import fcntl, os, sys
        fd = os.open({str(path)!r}, os.O_RDWR)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, {length}, {start})
        except OSError:
            sys.exit(1)
        """
    )
    return subprocess.run([sys.executable, "-c", code], timeout=30).returncode == 0


def test_ofd_conflicts_with_classic_holder(impl: ModuleType, path: Path, fds: list[int]) -> None:
    holder = Holder(path, "fcntl.lockf(fd, fcntl.LOCK_EX, 100, 10)")  # bytes [10, 109]
    try:
        fd = fds[0]
        assert impl.setlk(fd, F_WRLCK, 0, 10) == errno.EAGAIN
        assert impl.setlk(fd, F_RDLCK, 109, OFFSET_MAX) == errno.EAGAIN
        assert impl.setlk(fd, F_WRLCK, 0, 9) == 0
        assert impl.setlk(fd, F_WRLCK, 110, OFFSET_MAX) == 0
        # GETLK names the classic holder and its pid; inclusive end.
        assert impl.posix_getlk(fds[1], F_RDLCK, 0, OFFSET_MAX) == (F_WRLCK, 10, 109, holder.pid)
        typ, start, end, pid = impl.getlk(fds[1], F_RDLCK, 50, 60)
        assert (typ, start, end) == (F_WRLCK, 10, 109)
        assert pid == holder.pid
    finally:
        holder.close()
    # Holder gone: the range is free, our own OFD locks remain.
    assert impl.setlk(fds[0], F_WRLCK, 10, 109) == 0
    assert impl.getlk(fds[1], F_WRLCK, 200, 300) == (F_WRLCK, 0, OFFSET_MAX, -1)


def test_classic_locker_sees_ofd_lock(impl: ModuleType, path: Path, fds: list[int]) -> None:
    assert impl.setlk(fds[0], F_WRLCK, 1000, 1999) == 0
    assert not try_lockf_in_child(path, 1500, 1)
    assert try_lockf_in_child(path, 2000, 10)
    assert impl.setlk(fds[0], F_UNLCK, 0, OFFSET_MAX) == 0
    assert try_lockf_in_child(path, 1500, 1)


def test_ofd_descriptions_conflict_within_process(impl: ModuleType, fds: list[int]) -> None:
    a, b = fds
    assert impl.setlk(a, F_RDLCK, 0, OFFSET_MAX) == 0
    assert impl.setlk(b, F_RDLCK, 0, 10) == 0  # readers share
    assert impl.setlk(b, F_WRLCK, 5, 5) == errno.EAGAIN
    assert impl.getlk(b, F_WRLCK, 5, 5) == (F_RDLCK, 0, OFFSET_MAX, -1)
    assert impl.setlk(a, F_UNLCK, 0, OFFSET_MAX) == 0
    assert impl.getlk(a, F_WRLCK, 0, OFFSET_MAX) == (F_RDLCK, 0, 10, -1)
    assert impl.setlk(b, F_WRLCK, 5, 5) == 0  # upgrade within its own lock
    assert impl.getlk(a, F_RDLCK, 0, OFFSET_MAX) == (F_WRLCK, 5, 5, -1)
    assert impl.getlk(b, F_WRLCK, 0, OFFSET_MAX) == (F_UNLCK, 0, 0, 0)
    assert impl.setlkw(a, F_WRLCK, 100, 200) == 0  # no conflict: does not block


def test_bad_ranges_and_fds(impl: ModuleType, fds: list[int]) -> None:
    assert impl.setlk(fds[0], F_WRLCK, 10, 9) == errno.EINVAL
    assert impl.setlk(fds[0], F_WRLCK, 0, OFFSET_MAX + 1) == errno.EINVAL
    assert impl.getlk(fds[0], F_WRLCK, 10, 9) == errno.EINVAL
    assert impl.setlk(fds[0], 7, 0, 1) == errno.EINVAL
    assert impl.setlk(-1, F_WRLCK, 0, 1) == errno.EBADF
    assert impl.getlk(10_000, F_WRLCK, 0, 1) == errno.EBADF
    assert impl.flock(10_000, fcntl.LOCK_EX) == errno.EBADF
    ro = os.open(os.devnull, os.O_RDONLY)
    try:
        assert impl.setlk(ro, F_WRLCK, 0, 1) == errno.EBADF  # write lock needs FMODE_WRITE
    finally:
        os.close(ro)


def test_flock_conflicts_with_other_process(impl: ModuleType, path: Path, fds: list[int]) -> None:
    holder = Holder(path, "fcntl.flock(fd, fcntl.LOCK_EX)")
    try:
        assert impl.flock(fds[0], fcntl.LOCK_SH | fcntl.LOCK_NB) == errno.EWOULDBLOCK
        assert impl.flock(fds[0], fcntl.LOCK_EX | fcntl.LOCK_NB) == errno.EWOULDBLOCK
    finally:
        holder.close()
    assert impl.flock(fds[0], fcntl.LOCK_SH | fcntl.LOCK_NB) == 0
    assert impl.flock(fds[1], fcntl.LOCK_SH | fcntl.LOCK_NB) == 0
    assert impl.flock(fds[1], fcntl.LOCK_EX | fcntl.LOCK_NB) == errno.EWOULDBLOCK
    assert impl.flock(fds[0], fcntl.LOCK_UN) == 0
    assert impl.flock(fds[1], fcntl.LOCK_EX | fcntl.LOCK_NB) == 0


def _wait_blocked(native_id: int, nr: int | None = SYS_FCNTL, timeout: float = 5.0) -> None:
    """Until the thread sleeps inside syscall `nr` (fcntl or flock: the lock wait).

    /proc/.../syscall names the syscall only while the thread is blocked in it; a signal
    sent from then on interrupts the wait (and one sent before the wait sleeps is seen
    by it), so nothing needs to settle."""
    syscall = f"/proc/self/task/{native_id}/syscall"

    def blocked() -> bool:
        try:
            parts = Path(syscall).read_text().split()
        except FileNotFoundError:  # the thread ended: it never blocked
            return False
        return bool(parts) and parts[0].isdigit() and int(parts[0]) == nr

    assert nr is not None, f"no syscall numbers for {platform.machine()}"
    assert wait_until(blocked, timeout), "thread never blocked"


def _interrupt(nr: int | None, call, *args) -> int:  # noqa: ANN001
    """Run call(*args) in a thread that blocks in syscall `nr`; wake it with
    WAKE_SIGNAL; its result. A wake that does not interrupt leaves the wait blocked
    (the 5 s timeout fails the test)."""
    assert ofd.install_wake_signal(ofd.WAKE_SIGNAL) == 0
    result: list[int] = []
    done = threading.Event()

    def waiter() -> None:
        result.append(call(*args))
        done.set()

    t = threading.Thread(target=waiter, daemon=True)
    t.start()
    assert t.native_id is not None  # set before start() returns
    _wait_blocked(t.native_id, nr)
    assert not done.is_set()
    signal.pthread_kill(t.ident, ofd.WAKE_SIGNAL)
    assert done.wait(5), "wait was not interrupted"
    t.join(5)
    return result[0]


@pytest.mark.skipif(not ofd.CAN_WAKE, reason="fallback waits cannot be woken")
def test_setlkw_woken_by_signal(fds: list[int]) -> None:
    a, b = fds
    assert ofd.setlk(a, F_WRLCK, 0, OFFSET_MAX) == 0
    # Every wake interrupts, three times over on the same description (how soon is not
    # asserted: a shared host's scheduling would be measured, not the wake).
    runs = [_interrupt(SYS_FCNTL, ofd.setlkw, b, F_WRLCK, 0, 0) for _ in range(3)]
    assert runs == [errno.EINTR] * 3
    # Python's signal machinery was not involved: no handler it knows of, nothing raised.
    assert signal.getsignal(ofd.WAKE_SIGNAL) in (signal.SIG_DFL, None)
    # The wait left no lock behind and the description still works.
    assert ofd.setlk(a, F_UNLCK, 0, OFFSET_MAX) == 0
    assert ofd.setlkw(b, F_WRLCK, 0, 0) == 0


@pytest.mark.skipif(not ofd.CAN_WAKE, reason="fallback waits cannot be woken")
def test_flock_woken_by_signal(fds: list[int]) -> None:
    a, b = fds
    assert ofd.flock(a, fcntl.LOCK_EX) == 0
    runs = [_interrupt(SYS_FLOCK, ofd.flock, b, fcntl.LOCK_EX) for _ in range(3)]
    assert runs == [errno.EINTR] * 3
    assert ofd.flock(b, fcntl.LOCK_EX | fcntl.LOCK_NB) == errno.EWOULDBLOCK


@pytest.mark.skipif(not ofd.CAN_WAKE, reason="fallback waits cannot be woken")
def test_setlkw_granted_when_holder_releases(fds: list[int]) -> None:
    a, b = fds
    assert ofd.setlk(a, F_WRLCK, 0, 99) == 0
    result: list[int] = []
    t = threading.Thread(target=lambda: result.append(ofd.setlkw(b, F_RDLCK, 50, 50)))
    t.start()
    assert t.native_id is not None  # set before start() returns
    _wait_blocked(t.native_id)
    assert ofd.setlk(a, F_UNLCK, 0, 99) == 0
    t.join(5)
    assert result == [0]
    assert ofd.getlk(a, F_WRLCK, 0, OFFSET_MAX) == (F_RDLCK, 50, 50, -1)


@pytest.mark.skipif(not ofd.HAVE_NATIVE, reason="file handles need lockd._native")
@pytest.mark.skipif(os.geteuid() != 0, reason="open_by_handle_at needs CAP_DAC_READ_SEARCH")
def test_file_handle_round_trip(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    mount_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        got = ofd.name_to_handle(fd)
        if got is None:
            pytest.skip("filesystem does not export file handles")
        htype, handle = got
        assert 0 < len(handle) <= ofd.MAX_HANDLE_SZ
        fd2 = ofd.open_by_handle(mount_fd, htype, handle, os.O_RDONLY)
        assert fd2 >= 0, os.strerror(-fd2)
        try:
            assert os.fstat(fd2).st_ino == os.fstat(fd).st_ino
            assert os.read(fd2, 4) == b"xxxx"
        finally:
            os.close(fd2)
        # A mangled handle answers -errno, never a crash.
        bad = ofd.open_by_handle(mount_fd, htype, b"\xff" * len(handle), os.O_RDONLY)
        assert bad < 0
        assert ofd.open_by_handle(mount_fd, htype, b"\0" * 1000, os.O_RDONLY) == -errno.EINVAL
        assert ofd.name_to_handle(10_000) is None
    finally:
        os.close(fd)
        os.close(mount_fd)


def test_fallback_flock_layout_matches_native() -> None:
    if not ofd.HAVE_NATIVE:
        pytest.skip("lockd._native not built")
    fb = _load_fallback()
    assert fb._FLOCK.size == ofd._lib.vl_sizeof_flock()
    assert fb.name_to_handle(0) is None
    assert fb.open_by_handle(0, 0, b"", 0) == -errno.ENOSYS
