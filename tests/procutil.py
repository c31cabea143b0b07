"""Stopping the processes tests start."""

from __future__ import annotations

import os
import signal
import subprocess


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


def kill_keepers(tag: bytes) -> None:
    """SIGKILL every descriptor keeper whose command line names `tag` (a test's temp
    directory): a daemon stopped while guests hold locks leaves its keeper running by
    design, and no process may outlive its test."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:
            continue
        if b"lockd.journal.keeper" in cmd and tag in cmd:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
