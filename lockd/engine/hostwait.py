"""Waiting for a host holder: a process outside the manager holds the range.

The wait runs in a thread blocked in F_OFD_SETLKW (or flock) on the owner's own
description: the kernel grants it the moment the host lock goes, atomically. A
real-time signal (ofd.WAKE_SIGNAL, installed without SA_RESTART) interrupts the thread
to cancel the wait. The thread then hands the kernel's answer to the function it was
started with (the manager records the outcome under its mutex).

This module is the kernel side only: `thread` (made in the critical section, started
after it), `undo_grant` (put the host back when a cancelled wait was granted anyway),
`kick` (interrupt cancelled waits). It knows nothing of the manager.
"""

from __future__ import annotations

import errno
import signal
import threading
import time
from collections.abc import Callable
from fcntl import LOCK_EX, LOCK_NB, LOCK_SH, LOCK_UN

from lockd.api import F_WRLCK
from lockd.engine import ofd
from lockd.engine.ranges import restore_steps
from lockd.engine.state import FLOCK, POSIX, Description, Wait

# How long a cancelled host wait may take to leave the kernel before we stop kicking it.
KICK_FOR_S = 5.0


def thread(w: Wait, d: Description, then: Callable[[Wait, Description, int], None]
           ) -> threading.Thread:
    """The (unstarted) thread that waits in the kernel for w on the owner's description
    `d`, then calls then(w, d, errno). The caller marks `d` busy meanwhile."""
    t = threading.Thread(target=_wait, args=(w, d, then), name=f"hostwait-{w.id}",
                         daemon=True)
    w.thread = t
    return t


def _wait(w: Wait, d: Description, then: Callable[[Wait, Description, int], None]) -> None:
    while True:
        if w.cancel_err is not None:
            rc = errno.EINTR
            break
        if w.kind == POSIX:
            rc = ofd.setlkw(d.fd, w.type, w.start, w.end)
        else:
            rc = ofd.flock(d.fd, LOCK_EX if w.type == F_WRLCK else LOCK_SH)
        if rc != errno.EINTR:
            break
    then(w, d, rc)


def undo_grant(w: Wait, d: Description) -> None:
    """The kernel granted a wait that was cancelled meanwhile: put the host back to what
    the owner holds in the table (under the manager's mutex)."""
    if w.kind == FLOCK:
        held = w.file.flocks.get(w.key)
        if held is None:
            ofd.flock(d.fd, LOCK_UN)
        else:
            ofd.flock(d.fd, (LOCK_EX if held == F_WRLCK else LOCK_SH) | LOCK_NB)
        return
    for s, e, t in restore_steps(w.file.locks.owners.get(w.key, []), w.start, w.end):
        ofd.setlk(d.fd, t, s, e)


def kick(waits: list[Wait]) -> None:
    """Kick cancelled host-wait threads out of the kernel; a signal can arrive just
    before the thread enters the syscall, so repeat until the thread has left."""
    for w in waits:
        t = w.thread
        deadline = time.monotonic() + KICK_FOR_S
        while t is not None and t.ident is None and time.monotonic() < deadline:
            time.sleep(0.0005)  # not started yet: it checks the flag first anyway
        while t is not None and t.is_alive() and time.monotonic() < deadline:
            try:
                signal.pthread_kill(t.ident, ofd.WAKE_SIGNAL)
            except (ProcessLookupError, TypeError):
                break
            t.join(0.002)
