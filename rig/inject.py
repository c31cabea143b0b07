"""The faults the rig injects into a run: killing the daemon (with a prober holding a
lock across the kill), killing a guest's mount, and interrupting blocked waiters.
(Not to be confused with rig/faults.py, a deliberately broken lock manager.)

Each action records what it did on the Rig (its `faults`, `snapshots`, `rig_errors`
and counters), which rig.analysis reads afterwards.
"""

from __future__ import annotations

import errno
import fcntl
import os
import select
import signal
import struct
import subprocess
import sys
import time
from typing import TYPE_CHECKING

from rig.analysis import Fault

if TYPE_CHECKING:
    from rig.runner import Rig

# The prober: one process of guest 0 that holds a write lock across each daemon kill, so
# the rig can ask the host kernel whether that lock survived (a deterministic lost-lock
# detector, independent of the daemon's own bookkeeping).
PROBER = r"""
import errno, fcntl, os, struct, sys
fd = os.open(sys.argv[1], os.O_RDWR)
lk = lambda t: struct.pack("hhqqi4x", t, 0, 0, 1, 0)
try:
    fcntl.fcntl(fd, fcntl.F_SETLKW, lk(fcntl.F_WRLCK)); print("locked 0", flush=True)
except OSError as e:
    print(f"locked {e.errno}", flush=True)
sys.stdin.readline()
try:
    fcntl.fcntl(fd, fcntl.F_SETLK, lk(fcntl.F_UNLCK)); print("unlocked 0", flush=True)
except OSError as e:
    print(f"unlocked {e.errno}", flush=True)
"""
PROBE_FILE = "probe.dat"

# Blocking lock syscalls by architecture, to find workers blocked in a wait
# (/proc/PID/syscall): (fcntl nr, flock nr).
SYSCALLS = {"x86_64": (72, 73), "aarch64": (25, 32), "riscv64": (25, 32)}
F_SETLKW, F_OFD_SETLKW, LOCK_NB = 7, 38, 4


def blocked_in_lock_wait(pid: int, nrs: tuple[int, int] | None) -> bool:
    """Is the process sleeping in F_SETLKW/F_OFD_SETLKW or a blocking flock?"""
    if nrs is None:
        return False
    try:
        with open(f"/proc/{pid}/syscall") as f:
            parts = f.read().split()
    except OSError:
        return False
    if len(parts) < 3 or not parts[0].isdigit():
        return False
    nr, arg1 = int(parts[0]), int(parts[2], 16)
    if nr == nrs[0]:
        return arg1 in (F_SETLKW, F_OFD_SETLKW)
    return nr == nrs[1] and not arg1 & LOCK_NB


# ------------------------------------------------------------------ the daemon
def kill_lockd(rig: Rig) -> None:
    """kill -9 the daemon and restart it; with a prober, ask the host whether guest 0's
    lock was protected while it was down and after the restart."""
    assert rig.daemon is not None
    probe = _probe_start(rig)
    f = Fault("kill-lockd", "lockd", 0)
    rig.daemon.popen.kill()
    rig.daemon.popen.wait()
    f.t_ns = time.monotonic_ns()
    if probe:
        f.probe["taken_while_down"] = _host_probe(rig)
    rig.faults.append(f)
    f.restart_ns = time.monotonic_ns()
    f.ready_ns = rig.start_daemon()
    if probe:
        f.probe["taken_after_restart"] = _host_probe(rig)
    try:
        snap = rig._admin("T_LIST")
        rig.snapshots.append((f.t_ns, time.monotonic_ns(), snap))
        rig._note_daemon_lost(len(snap.get("lost", [])))
    except Exception as exc:
        rig.rig_errors.append(f"lock table after restart: {exc}")
    if probe:
        f.probe["prober_unlock_errno"] = _probe_finish(rig)


def _probe_start(rig: Rig) -> bool:
    """Have guest 0's prober take a write lock to hold across the kill."""
    if not rig.cfg.guests or rig.cfg.unsafe_no_locks:
        return False
    path = rig._mountpoint("g0") / rig.sub / PROBE_FILE
    rig.prober = subprocess.Popen(
        [sys.executable, "-c", PROBER, str(path)], stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=rig.env,
        start_new_session=True)
    line = _probe_line(rig, 5.0)
    if line != "locked 0":
        rig.rig_errors.append(f"prober did not get its lock: {line!r}")
        probe_kill(rig)
        return False
    return True


def _probe_line(rig: Rig, timeout: float) -> str | None:
    assert rig.prober is not None and rig.prober.stdout is not None
    r, _, _ = select.select([rig.prober.stdout], [], [], timeout)
    return rig.prober.stdout.readline().strip() if r else None


def _probe_finish(rig: Rig) -> int | None:
    assert rig.prober is not None and rig.prober.stdin is not None
    try:
        rig.prober.stdin.write("go\n")
        rig.prober.stdin.flush()
        line = _probe_line(rig, 15.0)
    except OSError:
        line = None
    probe_kill(rig)
    if line and line.startswith("unlocked "):
        return int(line.split()[1])
    rig.rig_errors.append(f"prober did not unlock: {line!r}")
    return None


def probe_kill(rig: Rig) -> None:
    """Stop the prober if one runs (also at teardown)."""
    p, rig.prober = rig.prober, None
    if p is None:
        return
    if p.poll() is None:
        p.kill()
    p.wait()
    for s in (p.stdin, p.stdout):
        try:
            if s:
                s.close()
        except OSError:
            pass


def _host_probe(rig: Rig) -> bool:
    """Can a host process take the range the prober holds? True means the guest's
    lock is not protected on the host (lost, or the daemon-down window is open)."""
    fd = os.open(rig.rigdir / PROBE_FILE, os.O_RDWR)
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, struct.pack("hhqqi4x", fcntl.F_WRLCK, 0, 0, 1, 0))
        return True
    except OSError as exc:
        if exc.errno not in (errno.EAGAIN, errno.EACCES):
            raise
        return False
    finally:
        os.close(fd)  # drops the probe lock if it was taken


# ------------------------------------------------------------------ guests
def kill_guest(rig: Rig, guest: str, kind: str = "kill-guest") -> None:
    """kill -9 a guest's mount, reap its workers, remount and restart them."""
    from rig.runner import force_unmount

    proc = rig.mounts[guest]
    # Its workers, taken before the kill: one that sees ENOTCONN and leaves at once
    # is a victim of this fault, not a worker that died by itself.
    victims = rig.live_workers(guest)
    if proc.popen.poll() is None:
        proc.popen.kill()
    proc.popen.wait()
    f = Fault(kind, guest, time.monotonic_ns())
    rig.faults.append(f)
    for w in [w for w in rig.workers if w.guest == guest]:
        rig.killed_at.setdefault(w.name, f.t_ns)
    # Its workers see ENOTCONN and leave by themselves; stragglers are killed.
    deadline = time.monotonic() + 3
    while any(w.popen.poll() is None for w in victims) and time.monotonic() < deadline:
        time.sleep(0.02)
    for w in victims:
        if w.popen.poll() is None:
            w.popen.kill()
        w.popen.wait()
        rig.reaped.add(w.name)
    force_unmount(rig._mountpoint(guest))
    f.restart_ns = time.monotonic_ns()
    f.ready_ns = rig.start_mount(guest)
    if time.monotonic_ns() < rig.t_end - 500_000_000:
        for w in victims:
            rig.start_worker(guest, w.slot)
            rig.worker_restarts += 1


# ------------------------------------------------------------------ waiters
def signal_waiters(rig: Rig) -> None:
    """SIGUSR1 every worker blocked in a lock wait: the wait is interrupted (EINTR)."""
    for w in rig.live_workers():
        if blocked_in_lock_wait(w.popen.pid, rig.nrs):
            try:
                os.kill(w.popen.pid, signal.SIGUSR1)
                rig.signals_sent += 1
            except ProcessLookupError:
                pass
