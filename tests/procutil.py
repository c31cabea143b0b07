"""Stopping the processes tests start, and looking at them from /proc."""

from __future__ import annotations

import os
import platform
import signal
import subprocess
import time

F_OFD_SETLKW = 38
SYS_FCNTL = {"x86_64": 72, "aarch64": 25, "riscv64": 25}.get(platform.machine())


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


def threads_in_setlkw(pid: int, cmd: int = F_OFD_SETLKW) -> int:
    """How many threads of process `pid` sit in fcntl(F_OFD_SETLKW) (or `cmd`) in the
    kernel now: a wait that the kernel will answer itself when the holder lets go."""
    found = 0
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return 0
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/syscall") as f:
                parts = f.read().split()
        except OSError:
            continue
        if (len(parts) > 2 and parts[0].isdigit() and int(parts[0]) == SYS_FCNTL
                and int(parts[2], 16) == cmd):
            found += 1
    return found


def until_threads_in_setlkw(pid: int, n: int, timeout: float = 10.0,
                            cmd: int = F_OFD_SETLKW) -> None:
    """Wait until `n` threads of `pid` are blocked in F_OFD_SETLKW (or `cmd`)."""
    deadline = time.monotonic() + timeout
    while threads_in_setlkw(pid, cmd) != n:
        assert time.monotonic() < deadline, f"pid {pid}: not {n} threads in F_OFD_SETLKW"
        time.sleep(0.01)  # polling /proc


def wait_until(pred, timeout: float = 5.0) -> bool:  # noqa: ANN001
    """Poll `pred` until it is true (True) or `timeout` seconds pass (its last value)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.02)  # polling
    return bool(pred())
