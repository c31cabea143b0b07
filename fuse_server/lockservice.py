"""The lock service a FUSE server stands on: the embedded LockManager (with or without a
journal) or the central daemon's client. Shared by `vfs-lockd mount` (fuse_server/cli.py)
and the virtio-fs back-end (fuse_server/launch.py), which imports it without click: every
module a back-end imports costs each guest its memory."""

from __future__ import annotations

import logging

log = logging.getLogger("vfs-lockd.fuse")


def close_service(service) -> None:  # noqa: ANN001 - a LockService
    """Close the daemon client (the embedded manager has nothing to close)."""
    closer = getattr(service, "close", None)
    if callable(closer):
        try:
            closer()
        except Exception:
            log.exception("closing the lock service")


def lock_service(lockd_socket: str | None, journal: str | None, guest: str,
                 patience: float | None = None):  # noqa: ANN201
    """The LockService: embedded LockManager, or the central daemon's client (shared by
    `vfs-lockd mount` and `vfs-lockd virtiofs`). patience: seconds a request waits for
    an unreachable daemon before it is answered ENOLCK (None: the client's default)."""
    if lockd_socket:
        from lockd.daemon.client import LockClient

        if patience is None:
            return LockClient(lockd_socket, guest, delegation=True)
        return LockClient(lockd_socket, guest, delegation=True, reconnect_timeout=patience)
    from lockd.api import Limits
    from lockd.engine.manager import LockManager

    if not journal:
        return LockManager(limits=Limits())
    from lockd.engine.durability import LEASE_S
    from lockd.journal.store import Journal

    # This server's locks end with it (its descriptions close, and so does the guest's
    # connection): its journal is a live record, never recovered, so changes under a
    # lease need not be written before their replies, and what a previous run left
    # there is gone from the host.
    j = Journal(journal)
    stale = j.discard_locks(guest)
    if stale:
        log.warning("journal %s: forgot %d lock(s) of a previous run (they ended with it)",
                    journal, stale)
    return LockManager(limits=Limits(), journal=j, lease_s=LEASE_S)
