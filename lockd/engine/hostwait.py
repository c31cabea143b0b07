"""Waiting for a host holder: a process outside the manager holds the range.

The wait runs in a thread blocked in F_OFD_SETLKW (or flock) on the owner's own
description: the kernel grants it the moment the host lock goes, atomically. A
real-time signal (ofd.WAKE_SIGNAL, installed without SA_RESTART) interrupts the thread
to cancel the wait. The thread then records the outcome under the manager's mutex.

Part of LockManager (a mixin: it works on the manager's state under its mutex).
"""

from __future__ import annotations

import errno
import signal
import threading
import time
from fcntl import LOCK_EX, LOCK_NB, LOCK_SH, LOCK_UN

from lockd.api import F_WRLCK
from lockd.engine import ofd
from lockd.engine.ranges import apply, restore_steps
from lockd.engine.state import FLOCK, POSIX, Description, GuestState, Wait
from lockd.journal import ops as J

# How long a cancelled host wait may take to leave the kernel before we stop kicking it.
KICK_FOR_S = 5.0


class HostWaits:
    def _start_host_wait(self, w: Wait, done: list) -> None:
        """Queue the host-wait thread for w (started by _fire, after the critical
        section) on the owner's own description."""
        d = self._wait_desc(w, self._guests[w.guest], done)
        if d is None:
            return
        d.busy += 1
        w.state = "host"
        t = threading.Thread(target=self._host_wait, args=(w, d), name=f"hostwait-{w.id}",
                             daemon=True)
        w.thread = t
        done.append(t)

    def _host_wait(self, w: Wait, d: Description) -> None:
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
        with self._txn() as t:
            done, closing = t.done, t.closing
            d.busy -= 1
            f = w.file
            g = self._guests.get(w.guest)
            if w.state == "done" or g is None:
                outcome = w.cancel_err or errno.EINTR
                if rc == 0:
                    self._undo_host_grant(w, d)
            elif w.cancel_err is not None:
                if rc == 0:
                    self._undo_host_grant(w, d)
                outcome = w.cancel_err
            elif rc == 0:
                outcome = self._record_host_grant(g, w, d)
            elif rc in ofd.REVOKED:  # a cluster file system gave the owner's locks away
                outcome = self._revoked(g, w.key, w.kind, f, d, closing)
            else:
                outcome = rc
                if rc == errno.EDEADLK:  # a cluster file system's own deadlock detection
                    self.counters["deadlocks"] += 1
            if w.state != "done":
                self._finish(w, outcome, done)
            if g is not None:
                self._maybe_close_desc(f, (w.kind, w.key[0], w.key[1]), g, w.key, closing)
            self._grant_waiters(f, done, closing)
            self._maybe_forget_guest(w.guest)

    def _record_host_grant(self, g: GuestState, w: Wait, d: Description) -> int:
        f = w.file
        if self.journal_error is not None:  # the grant could not be journaled
            self._undo_host_grant(w, d)
            self.counters["enolck"] += 1
            return errno.ENOLCK
        if w.kind == FLOCK:
            if w.key not in f.flocks:
                g.nlocks += 1
            f.flocks[w.key] = w.type
            g.flock_files[w.key] = f
            f.pids[w.key] = w.pid
            self.counters["locks_granted"] += 1
            self._jlog(J.FlockRow(w.key[0], w.key[1], f, w.type, w.pid))
            return 0
        locks = f.locks.owners.get(w.key, [])
        new, removed, added = apply(locks, w.start, w.end, w.type)
        if g.nlocks + len(added) - len(removed) > self.limits.max_locks:
            self._undo_host_grant(w, d)
            self.counters["enolck"] += 1
            return errno.ENOLCK
        self._record_posix(g, w.key, f, new, removed, added, w.start, w.end, w.type, w.pid)
        return 0

    def _undo_host_grant(self, w: Wait, d: Description) -> None:
        """The kernel granted a wait that was cancelled meanwhile: put the host back."""
        if w.kind == FLOCK:
            held = w.file.flocks.get(w.key)
            if held is None:
                ofd.flock(d.fd, LOCK_UN)
            else:
                ofd.flock(d.fd, (LOCK_EX if held == F_WRLCK else LOCK_SH) | LOCK_NB)
            return
        for s, e, t in restore_steps(w.file.locks.owners.get(w.key, []), w.start, w.end):
            ofd.setlk(d.fd, t, s, e)

    @staticmethod
    def _kick(waits: list[Wait]) -> None:
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
