"""Crash recovery for `vfs-lockd serve` (the daemon's DaemonHooks for the journal).

Before the daemon accepts a connection it takes back the lock descriptions held by the
descriptor keeper (and by systemd's file descriptor store when it runs under systemd),
re-takes every journaled lock, and restores the journaled guest sessions, so that a guest
server reconnecting with its session token finds its locks and queued waits as they
were. Sessions nobody resumes within the grace time are ended and their locks released.
Every change is in the journal before its requester is answered (lockd.engine.durability).
"""

from __future__ import annotations

import os
import stat
import time

from lockd.daemon import sdnotify
from lockd.daemon.server import Daemon, DaemonHooks, GuestSession, log
from lockd.journal import ops as J
from lockd.journal.keeper import (
    KeeperClient,
    ensure_keeper,
    keeper_address,
    take_released_mark,
)
from lockd.journal.store import Journal

# How long a guest server has to come back after a daemon restart (at least).
RESTART_GRACE = 30.0
SD_LISTEN_FDS_START = 3


def systemd_fds() -> dict[str, int]:
    """Descriptors systemd handed back from its store (LISTEN_FDS + LISTEN_FDNAMES)."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return {}
    n = int(os.environ.get("LISTEN_FDS", "0") or 0)
    names = os.environ.get("LISTEN_FDNAMES", "").split(":")
    out = {}
    for i in range(n):
        fd = SD_LISTEN_FDS_START + i
        # Lock descriptions are files; a socket here is the socket unit's listener.
        if i < len(names) and names[i] and not _is_socket(fd):
            out[names[i]] = fd
    return out


def _is_socket(fd: int) -> bool:
    try:
        return stat.S_ISSOCK(os.fstat(fd).st_mode)
    except OSError:
        return True  # not open: nothing to take


class SystemdFdStore:
    """Mirrors the keeper into systemd's file descriptor store (FDSTORE=1)."""

    def put(self, key: str, fd: int) -> None:
        sdnotify.notify(fds=[fd], FDSTORE="1", FDNAME=key)

    def drop(self, key: str) -> None:
        sdnotify.notify(FDSTOREREMOVE="1", FDNAME=key)

    def restart(self) -> None:
        """Nothing to reconnect: systemd keeps the store for the service."""

    def seal(self) -> None:
        """systemd's store carries no completeness mark (only the keeper's does)."""


class Keepers:
    """Every place a lock description is kept outside the daemon."""

    def __init__(self, *keepers: KeeperClient | SystemdFdStore | None) -> None:
        self.keepers = [k for k in keepers if k is not None]

    def put(self, key: str, fd: int) -> None:
        for k in self.keepers:
            k.put(key, fd)

    def drop(self, key: str) -> None:
        for k in self.keepers:
            k.drop(key)

    def restart(self) -> None:
        """A keeper died: connect to a new one (the manager then hands it everything)."""
        for k in self.keepers:
            k.restart()

    def seal(self) -> None:
        """Every description handed out has been sent (lockd.journal.keeper, b"C")."""
        for k in self.keepers:
            k.seal()


class RecoveryHooks(DaemonHooks):
    def __init__(self, journal: Journal, use_keeper: bool = True,
                 restart_grace: float = RESTART_GRACE,
                 keeper_linger: float | None = None) -> None:
        self.journal = journal
        self.use_keeper = use_keeper
        self.keeper_linger = keeper_linger
        self.restart_grace = restart_grace
        self.keeper = None
        self.report: dict | None = None

    def before_serve(self, daemon: Daemon) -> None:
        mgr = daemon.manager
        t0 = time.monotonic()
        fds: dict[str, int] = {}
        if self.use_keeper:
            self.keeper = ensure_keeper(keeper_address(self.journal.path), self.journal.path,
                                        linger=self.keeper_linger)
            fds = self.keeper.take_all()
        for key, fd in systemd_fds().items():
            if key in fds:
                os.close(fd)
            else:
                fds[key] = fd
        store = SystemdFdStore() if os.environ.get("NOTIFY_SOCKET") else None
        if self.keeper is not None or store is not None:
            mgr.keeper = Keepers(self.keeper, store)
        # A keeper that lived through the crash, or one that ended (complete) holding
        # no lock: either way every owner's state at the end is known.
        released = take_released_mark(self.journal.path)  # consumed in any case
        survived = self.keeper is not None and (self.keeper.complete or released)
        report = mgr.recover(fds, keeper_survived=survived)
        if mgr.keeper is not None:
            mgr.keeper.seal()
        keep_for = max(daemon.grace, self.restart_grace)
        guests = self.journal.guests()  # not load(): recover() has read the locks already
        for guest, info in guests.items():
            daemon.restore_session(guest, info["session"], keep_for)
        # Guests holding locks with no journaled session (the journal lost its record:
        # a damaged WAL, a repaired or deleted journal while the keeper kept the
        # descriptions): their token is unknown. The guest's server resumes such an
        # orphan with whatever token it presents (Daemon._hello); a new incarnation of
        # it (no token) ends it. Nobody within the grace time: the locks go.
        for guest in mgr.stats()["guests"]:
            if guest not in daemon.sessions:
                daemon.restore_session(guest, os.urandom(16).hex(), keep_for).orphan = True
                report["orphan_sessions"] = report.get("orphan_sessions", 0) + 1
        report["sessions"] = len(daemon.sessions)
        report["total_seconds"] = time.monotonic() - t0
        self.report = report
        log("recovered", **report)

    def session_opened(self, daemon: Daemon, session: GuestSession, resumed: bool) -> None:
        self.journal.write([J.GuestSession(session.guest, session.token)])

    def session_closed(self, daemon: Daemon, session: GuestSession) -> None:
        daemon.manager.flush_durable()
        self.journal.write([J.GuestSession(session.guest, None)])

    def shutdown(self, daemon: Daemon) -> None:
        daemon.manager.flush_durable(end_leases=True)
        if self.keeper is not None:
            # With nothing held the keeper has nothing to keep: it ends with us.
            # Otherwise it keeps the locks for the next start of the daemon (for at most
            # its linger time).
            if not daemon.manager.stats()["held_locks"]:
                self.keeper.quit()
            self.keeper.close()
        self.journal.close()
