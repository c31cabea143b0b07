"""Guest sessions: a guest's state in the daemon (its dispatcher, its queued waits, the
answers kept while its server is away), its HELLO, and its end: at once when its
connection goes, or after --guest-grace (kept for a server that reconnects), or after
the restart grace for a session restored from the journal. A session never ends by
moving: a HELLO with "takeover" and its token moves it to another connection of the
guest (live migration: Sessions.take_over)."""

from __future__ import annotations

import errno
import heapq
import os
import secrets
import time
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING

from lockd.daemon import wire
from lockd.daemon.logs import log
from lockd.dispatch import LockDispatcher

if TYPE_CHECKING:
    from lockd.daemon.conn import Conn
    from lockd.daemon.server import Daemon

_OWN_NODEIDS = 1 << 48  # inode numbers the daemon picks for FILE frames that name none
# Answers of queued waits kept per session (the newest), for a takeover: a wait answered
# on the old connection after the guest's state was copied for a migration is answered
# again on the new one. Only waits of that copy are answered in between (the guest is
# stopped: it queues no new ones), so a session's waiter limit is always enough.
RECENT_WAIT_ANSWERS = 1024
SUPERSEDED_TOKENS = 8  # old tokens of a session remembered (ESTALE instead of EACCES)


class GuestSession:
    """A guest's state in the daemon; outlives its connection during --guest-grace.

    `locks` is the guest's LockDispatcher: every lock frame of the guest goes through it,
    exactly as in an embedded FUSE server. Its deferred replies (granted or cancelled
    waits) are posted to the event loop, which sends them on the guest's connection, or
    keeps them in `outbox` while the guest is away."""

    __slots__ = ("guest", "token", "conn", "locks", "waits", "offline", "outbox",
                 "expires", "dead", "created", "restored", "next_nodeid", "delegable",
                 "orphan", "recent", "recent_cap", "superseded")

    def __init__(self, guest: str, token: str, manager: object,
                 post: Callable[[GuestSession, bytes], None], max_files: int) -> None:
        self.guest = guest
        self.token = token
        self.conn: Conn | None = None
        # Its GETLK replies name the holder only if its connection's HELLO asked (hello).
        self.locks = LockDispatcher(manager, guest, partial(post, self),  # type: ignore[arg-type]
                                    max_files=max_files)
        self.waits: dict[int, float] = {}  # request id of a queued wait -> queued at
        # Answers produced while the guest's server was away: a re-sent request must get
        # the same answer, not run again (a cancelled wait must not be queued anew).
        self.offline: dict[int, bytes] = {}
        self.outbox: list[bytes] = []
        self.expires = 0.0
        self.dead = False
        self.created = time.time()
        self.restored = False  # restored from the journal: the client's files are gone
        self.next_nodeid = _OWN_NODEIDS
        self.delegable = False  # its server decides delegated files itself (HELLO)
        # Restored for locks recovered after a restart whose journal had lost the
        # guest's session (a damaged WAL): its token is unknown (see Sessions.hello).
        self.orphan = False
        self.recent: dict[int, bytes] = {}  # request id of a wait -> its answer (sent)
        limits = getattr(manager, "limits", None)
        self.recent_cap = max(RECENT_WAIT_ANSWERS, getattr(limits, "max_waiters", 0))
        self.superseded: list[str] = []  # tokens of the connections taken over

    def answered_wait(self, rid: int, reply: bytes) -> None:
        """The answer of queued wait `rid` went to the connection (see
        RECENT_WAIT_ANSWERS)."""
        recent = self.recent
        recent[rid] = reply
        if len(recent) > self.recent_cap:
            del recent[next(iter(recent))]  # the oldest


class Sessions:
    """The daemon's guest sessions by guest name, and the heap of those kept without a
    connection until they expire."""

    def __init__(self, daemon: Daemon) -> None:
        self._d = daemon
        self.by_guest: dict[str, GuestSession] = {}
        self.expiry: list = []  # heap of (expires, id, session) kept without a connection

    def new(self, guest: str, token: str) -> GuestSession:
        d = self._d
        s = GuestSession(guest, token, d.manager, d._post, d.manager.limits.max_files)
        self.by_guest[guest] = s
        return s

    def restore(self, guest: str, token: str, keep_for: float) -> GuestSession:
        """A session known from the journal after a restart: its guest server may resume
        it with its token within `keep_for` seconds, else its locks are released."""
        s = self.new(guest, token)
        s.restored = True
        s.expires = time.monotonic() + keep_for
        self.by_guest[guest] = s
        heapq.heappush(self.expiry, (s.expires, id(s), s))
        return s

    def away(self, s: GuestSession) -> None:
        """s's connection is gone: keep the session for --guest-grace, or end it."""
        if self._d.grace > 0:
            s.expires = time.monotonic() + self._d.grace
            heapq.heappush(self.expiry, (s.expires, id(s), s))
            s.offline.clear()
        else:
            self.end(s)

    def end(self, s: GuestSession) -> None:
        """The guest is gone: release every lock and wait, then its files."""
        if s.dead:
            return
        s.dead = True
        if self.by_guest.get(s.guest) is s:
            del self.by_guest[s.guest]
        self._d.delegations.on_session_end(s)
        try:
            s.locks.end()
        except Exception as exc:
            log("release_failed", level="error", guest=s.guest, error=repr(exc))
        s.waits.clear()
        try:
            self._d.hooks.session_closed(self._d, s)
        except Exception as exc:
            log("hook_failed", level="error", hook="session_closed", error=repr(exc))
        log("session_end", guest=s.guest)

    def expire(self) -> None:
        now = time.monotonic()
        while self.expiry and self.expiry[0][0] <= now:
            expires, _, s = heapq.heappop(self.expiry)
            if s.conn is None and not s.dead and s.expires == expires:
                log("grace_expired", guest=s.guest)
                self.end(s)

    def hello(self, c: Conn, rid: int, body: bytes) -> None:
        """A connection's HELLO: an admin's, or a guest's (a new session, a resumed one,
        or a new incarnation of the guest's server ending the old one)."""
        version, f = wire.parse_hello(body)
        if version < wire.MIN_VERSION:
            raise wire.ProtocolError(errno.EPROTONOSUPPORT,
                                     f"protocol version {version} < {wire.MIN_VERSION}")
        version = min(version, wire.VERSION)
        role = f.get("role", "guest")
        if role not in wire.ROLES:
            raise wire.ProtocolError(errno.EINVAL, f"unknown role {role!r}")
        info = {"version": version, "role": role, "max_frame": self._d.max_frame,
                "daemon_pid": os.getpid(), "grace": self._d.grace}
        if role == "admin":
            c.hello, c.role = True, role
            self._d._authenticated(c)
            log("connect", conn=c.cid, role=role, pid=c.pid, uid=c.uid)
            self._d._send(c, wire.json_reply(rid, info))
            return
        guest = f.get("guest")
        if (not isinstance(guest, str) or not 0 < len(guest) <= 255 or guest == "host"
                or not guest.isprintable()):
            raise wire.ProtocolError(errno.EINVAL, "hello: bad guest name")
        token = f.get("session")
        if token is not None and not isinstance(token, str):
            raise wire.ProtocolError(errno.EINVAL, "hello: bad session token")
        s = self.by_guest.get(guest)
        resumed = False
        # A takeover needs the session's token; without one, the old behaviour.
        takeover = bool(f.get("takeover")) and bool(token)
        replay: list[bytes] = []
        if s is not None:
            if token and any(secrets.compare_digest(token, t) for t in s.superseded):
                # The connection this token was given to was taken over (migrated
                # away): its server must not take the session back, nor start anew.
                raise wire.ProtocolError(errno.ESTALE, f"the session of {guest!r} was "
                                         "taken over by another connection")
            if (s.conn is not None and token and not s.orphan
                    and not secrets.compare_digest(token, s.token)):
                # Never this session's, whoever is connected (e.g. a source taken over
                # before a daemon restart, which forgot the old tokens).
                raise wire.ProtocolError(errno.EACCES, f"wrong session token for {guest!r}")
            if s.conn is not None and not takeover:
                self._d.counters["connections_refused"] += 1
                log("refused", level="warning", conn=c.cid, guest=guest, pid=c.pid, uid=c.uid,
                    reason="guest already connected", holder_pid=s.conn.pid)
                raise wire.ProtocolError(errno.EBUSY, f"guest {guest!r} is already connected")
            if token and (s.orphan or secrets.compare_digest(token, s.token)):
                # An orphan's token was lost with the journal's record of it: a server
                # that presents one had a session before the restart, and the guest's
                # name is what its locks were recovered under. (Taking it over grants
                # nothing new: a HELLO without a token could end it.)
                if s.orphan:
                    log("session_adopted", level="warning", guest=guest, pid=c.pid,
                        reason="session record lost by the journal; resumed by name")
                    s.orphan = False
                    s.token = token
                resumed = True
                if takeover:
                    replay = self.take_over(s, c, f.get("waits"))
            elif token:
                raise wire.ProtocolError(errno.EACCES, f"wrong session token for {guest!r}")
            else:
                if f.get("lost_session"):
                    # Its server had a session it could not resume (refused token):
                    # its owners still believe they hold these locks, so each learns
                    # EIO at its next request on the file instead of nothing.
                    from lockd.engine.recovery import mark_guest_lost

                    n = mark_guest_lost(self._d.manager, guest)
                    log("session_lost", level="warning", guest=guest, pid=c.pid,
                        locks_lost=n)
                self.end(s)  # a new incarnation of the guest's server
                s = None
        elif token:
            s = self._d.hooks.unknown_session(self._d, guest, token)
            resumed = s is not None
        if s is None:
            s = self.new(guest, secrets.token_hex(16))
        s.conn = c
        c.session, c.hello, c.role = s, True, role
        self._d._authenticated(c)
        s.delegable = bool(f.get("delegation")) and self._d.delegations.enabled
        # Asked for by a tool; never by a FUSE server, which forwards the reply to its
        # guest kernel as it is (a version-2 client got names without asking).
        s.locks.name_holders = f.get("holder_names") is True or version < wire.NAMES_ASKED
        info.update(session=s.token, resumed=resumed, pending=sorted(s.waits),
                    holder_names=s.locks.name_holders,
                    limits=self._d.manager.limits._asdict(),
                    files_lost=s.restored)
        if takeover and resumed:
            info.update(takeover=True, replayed=[_unique_of(r) for r in replay])
        s.restored = False
        log("connect", conn=c.cid, role=role, guest=guest, pid=c.pid, uid=c.uid, gid=c.gid,
            resumed=resumed)
        self._d._send(c, wire.json_reply(rid, info))
        if resumed and s.outbox:
            for data in s.outbox:
                self._d._send(c, data)
                s.answered_wait(_unique_of(data), data)
            s.outbox = []
        for data in replay:
            self._d._send(c, data)
        try:
            self._d.hooks.session_opened(self._d, s, resumed)
        except Exception as exc:  # e.g. the journal's disk is full: keep serving
            log("hook_failed", level="error", hook="session_opened", error=repr(exc))

    def take_over(self, s: GuestSession, c: Conn, waits: object) -> list[bytes]:
        """Move s to connection c (a HELLO with "takeover" and s's token): s does not
        end; its locks, queued waits (their places and ids) and files stay, and what
        is answered from now on goes to c. The connection that had it is told it was
        superseded and closed; its token is replaced (the old one gets ESTALE), so that
        neither it nor its server's reconnects can take s back. `waits`: the ids of the
        waits c's server expects answers to; those answered on the old connection since
        (s.recent) are returned, to be sent again on c.

        A file delegated to the guest is decided in the old connection's server:
        refused (EAGAIN) until it has handed every such file back (recalled here), so
        that no lock is left behind in a server that is going away."""
        d = self._d
        if not isinstance(waits, list) or not all(isinstance(w, int) for w in waits):
            waits = []
        delegated = [ref for _n, ref in s.locks.files()
                     if d.delegations.holder(ref) == s.guest]
        if delegated:
            for ref in delegated:
                d.delegations.recall(ref)
            if any(d.delegations.holder(ref) == s.guest for ref in delegated):
                log("takeover_delayed", guest=s.guest, conn=c.cid, pid=c.pid,
                    delegated=len(delegated))
                raise wire.ProtocolError(errno.EAGAIN, f"{len(delegated)} file(s) of "
                                         f"{s.guest!r} delegated: recalled, retry")
        old = s.conn
        s.superseded = [*s.superseded, s.token][-SUPERSEDED_TOKENS:]
        s.token = secrets.token_hex(16)
        replay = []
        for rid in waits:
            if rid not in s.waits and rid in s.recent:
                replay.append(s.recent.pop(rid))
        d.counters["takeovers"] += 1
        log("takeover", guest=s.guest, conn=c.cid, pid=c.pid, uid=c.uid,
            old_conn=old.cid if old is not None else None,
            old_pid=old.pid if old is not None else None, waits=len(s.waits),
            replayed=len(replay))
        if old is not None:
            s.conn = None
            d.io.supersede(old, f"session of {s.guest!r} taken over by pid {c.pid}")
        return replay


def _unique_of(reply: bytes) -> int:
    return wire.REPLY.unpack_from(reply)[2]
