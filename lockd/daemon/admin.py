"""The daemon's admin frames: LIST, STATUS, EVICT and CANCEL_WAIT (`vfs-lockd locks`,
`status`, `evict`, `cancel`; lockd/daemon/admin_cli.py is the other end). CANCEL_WAIT
is also a guest's, for its own waits."""

from __future__ import annotations

import errno
import os
import time
from typing import TYPE_CHECKING

from lockd.daemon import wire
from lockd.daemon.logs import log

if TYPE_CHECKING:
    from lockd.daemon.server import Conn, Daemon


class Admin:
    """Answers the admin frames of the daemon's connections (the handlers of its table)."""

    def __init__(self, daemon: Daemon) -> None:
        self._d = daemon

    def _allowed(self, c: Conn, rid: int) -> bool:
        if c.role != "admin":
            self._d._send(c, wire.error_frame(rid, errno.EPERM,
                                              "admin frame on a guest connection"))
            return False
        return True

    def h_list(self, c: Conn, m: tuple, buf: bytes, pos: int) -> None:
        if self._allowed(c, m.unique):
            # Answered once the delegations are back (Delegations.answer_lists).
            self._d.delegations.list_requested(c, m.unique)

    def status(self) -> dict:
        d = self._d
        stats = d.manager.stats()
        now = time.monotonic()
        guests = []
        for s in d.sessions.values():
            g = {"guest": s.guest, "connected": s.conn is not None, "waits": len(s.waits),
                 "files": s.locks.files_registered()}
            if s.conn is not None:
                g.update(pid=s.conn.pid, uid=s.conn.uid, since=s.conn.since)
            else:
                g["grace_left"] = round(max(0.0, s.expires - now), 3)
            guests.append(g)
        return {
            "pid": os.getpid(), "socket": d.socket_path, "journal": d.journal_path,
            "journal_active": d.manager.journaled,
            "uptime": round(now - d._t0, 3), "started": d.started,
            "version": wire.VERSION, "grace": d.grace, "guests": guests,
            "connections": len(d.conns), "stats": stats, "daemon": dict(d.counters),
            "recovery": d.hooks.report,
        }

    def h_status(self, c: Conn, m: tuple, buf: bytes, pos: int) -> None:
        if self._allowed(c, m.unique):
            self._d._send_big(c, wire.json_reply(m.unique, self.status()))

    def h_evict(self, c: Conn, m: tuple, buf: bytes, pos: int) -> None:
        d = self._d
        rid = m.unique
        if not self._allowed(c, rid):
            return
        guest = bytes(buf[pos + wire.HEADER_SIZE:pos + m.len]).decode("utf-8", "replace")
        s = d.sessions.get(guest)
        known = s is not None or guest in d.manager.stats().get("guests", ())
        if not known:
            d._send(c, wire.error_frame(rid, errno.ENOENT, f"no guest {guest!r}"))
            return
        log("evict", guest=guest, by_pid=c.pid)
        if s is not None:
            gc = s.conn
            if gc is not None:
                # Tell the guest why before closing; an evicted guest gets no grace.
                d._send(gc, wire.error_frame(0, errno.ECONNRESET, "evicted by admin"))
                d._flush(gc)
                s.conn = None
                d._drop(gc, "evicted")
        d.manager.evict(guest)
        if s is not None:
            d._end_session(s)
        d._send(c, wire.reply(rid, 0))

    def h_cancel_wait(self, c: Conn, m: tuple, buf: bytes, pos: int) -> None:
        d = self._d
        rid = m.unique
        if m.len < wire.HEADER_SIZE + 8:
            d._send(c, wire.error_frame(rid, errno.EINVAL, "truncated frame body"))
            return
        (wid,) = wire.U64.unpack_from(buf, pos + wire.HEADER_SIZE)
        # A guest may cancel its own waits only; an admin any.
        ok = d.manager.cancel(wid, guest=None if c.role == "admin" else c.session.guest)
        d._send(c, wire.reply(rid, 0 if ok else -errno.ENOENT))
