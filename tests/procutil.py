"""Stopping the processes tests start, looking at them from /proc, and what a test does
when the machine lacks something it needs."""

from __future__ import annotations

import os
import platform
import signal
import subprocess
import time

F_OFD_SETLKW = 38
SYS_FCNTL = {"x86_64": 72, "aarch64": 25, "riscv64": 25}.get(platform.machine())
SYS_FLOCK = {"x86_64": 73, "aarch64": 32, "riscv64": 32}.get(platform.machine())


def stop(proc: subprocess.Popen, timeout: float = 10.0) -> int | None:
    """SIGTERM, then SIGKILL if it does not exit in time; its exit status."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)
    return proc.returncode


def keeper_pids(tag: bytes) -> list[int]:
    """The descriptor keepers whose command line names `tag` (a test's directory)."""
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:
            continue
        if b"lockd.journal.keeper" in cmd and tag in cmd:
            out.append(int(pid))
    return out


def kill_keepers(tag: bytes) -> None:
    """SIGKILL every descriptor keeper whose command line names `tag` (a test's temp
    directory): a daemon stopped while guests hold locks leaves its keeper running by
    design, and no process may outlive its test."""
    for pid in keeper_pids(tag):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _blocked_syscalls(pid: int) -> list[list[str]]:
    """/proc/PID/task/*/syscall of every thread blocked in a syscall now: the number and
    the arguments (hex). A running thread says "running" and is left out."""
    out = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/syscall") as f:
                parts = f.read().split()
        except OSError:
            continue
        if parts and parts[0].isdigit():
            out.append(parts)
    return out


def threads_in_setlkw(pid: int, cmd: int = F_OFD_SETLKW) -> int:
    """How many threads of process `pid` sit in fcntl(F_OFD_SETLKW) (or `cmd`) in the
    kernel now: a wait that the kernel will answer itself when the holder lets go."""
    return sum(1 for p in _blocked_syscalls(pid)
               if int(p[0]) == SYS_FCNTL and len(p) > 2 and int(p[2], 16) == cmd)


def threads_in_flock(pid: int) -> int:
    """How many threads of process `pid` sit in flock(2) in the kernel now."""
    return sum(1 for p in _blocked_syscalls(pid) if int(p[0]) == SYS_FLOCK)


def until_threads_in_flock(pid: int, n: int, timeout: float = 10.0) -> None:
    """Wait until `n` threads of `pid` are blocked in flock(2)."""
    assert wait_until(lambda: threads_in_flock(pid) == n, timeout), \
        f"pid {pid}: not {n} threads in flock"


def until_threads_in_setlkw(pid: int, n: int, timeout: float = 10.0,
                            cmd: int = F_OFD_SETLKW) -> None:
    """Wait until `n` threads of `pid` are blocked in F_OFD_SETLKW (or `cmd`)."""
    assert wait_until(lambda: threads_in_setlkw(pid, cmd) == n, timeout), \
        f"pid {pid}: not {n} threads in F_OFD_SETLKW"


def _socket_inodes(pid: int) -> set[str]:
    out = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            out.add(link[8:-1])
    return out


def unread_from(pid: int, peer: int) -> bool:
    """Does process `pid` have bytes it has not read yet on a Unix stream socket connected
    to process `peer` (its Recv-Q, from `ss`)? E.g. a guest's request waiting for a
    stopped daemon."""
    theirs = _socket_inodes(peer)
    out = subprocess.run(["ss", "-xpH"], capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        # Netid State Recv-Q Send-Q local-address inode peer-address peer-inode users:(..)
        f = line.split()
        if (len(f) > 7 and f[0] == "u_str" and f[1] == "ESTAB" and f"pid={pid}," in line
                and int(f[2]) > 0 and f[7] in theirs):
            return True
    return False


def wait_until(pred, timeout: float = 5.0, interval: float = 0.02) -> bool:  # noqa: ANN001
    """Poll `pred` every `interval` seconds until it is true (True) or `timeout` seconds
    pass (its last value). A costly `pred` (one that starts a process, or sends a
    request that changes state) gets a longer interval."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(interval)  # polling
    return bool(pred())


def fail_or_skip(why: str, needed: str) -> None:
    """A prerequisite is missing: a skip on a developer's machine, a failure under
    CI=true (nothing skips there: `needed` says what CI must have)."""
    import pytest

    if os.environ.get("CI") == "true":
        pytest.fail(f"{why} (CI=true: {needed})")
    pytest.skip(why)
