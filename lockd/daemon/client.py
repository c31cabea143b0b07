"""Clients of `vfs-lockd serve`.

`LockClient` is one guest's connection to the daemon. A guest's FUSE server forwards the
guest's lock messages through it unchanged (`forward`): the daemon's `LockDispatcher`
answers them, and the reply (a FUSE reply) comes back through the request's callback on
the reader thread. Files are registered per inode (`register`, a FILE frame carrying a
descriptor) at the guest's first lock request on them. `LockClient` also implements
`lockd.api.LockService` on top of the same frames, for tools and tests that drive the
daemon without a FUSE guest (made with `holder_names=True`, its GETLK names the holder's
guest; a FUSE server's never does: the reply goes to the guest kernel as it is).

Answers are final. A request that was sent may have been applied by the daemon, so it is
never answered here: after a lost connection the client reconnects with backoff,
presents its session token (the daemon keeps the guest's locks and waits for its
--guest-grace, or restores them from its journal after a restart), registers its files
again when the daemon lost them, and sends every unanswered request again (lock requests
are idempotent: setting a range to a type twice is setting it once; a re-sent wait is
recognised by its id). A request that could not be sent within `reconnect_timeout` is
answered here: lock requests ENOLCK (the daemon never saw them, so nothing is held),
FLUSH 0 with the release itself kept and sent once the daemon is back.

Live migration (central mode): two back-ends are one guest for the length of it. On the
source, `migration_state()` gives what a destination needs to continue (plain JSON-able
data); on the destination, `LockClient.takeover(socket, state, files)` makes a client
that connects to nothing until `take_over()`, which moves the guest's session to it
(a HELLO with "takeover": nothing is released, queued waits keep their places and are
answered here, to callbacks attached with `attach_waits`). The source's connection is
then superseded: the daemon closes it, and this client neither reconnects nor releases
anything (its `close()` and the FUSE server's end wait for the takeover while a
migration's state is out; `cancel_migration()` when the source runs on instead).

`AdminClient` is the blocking one-request-at-a-time client used by the admin verbs.
"""

from __future__ import annotations

import array
import errno
import json
import logging
import os
import queue
import socket
import threading
import time
from collections.abc import Callable
from itertools import count

from lockd.api import F_UNLCK, FUSE_LK_FLOCK, NO_CONFLICT, QUEUED, Conflict, WaitCallback
from lockd.daemon import delegation, wire
from lockd.fuse import abi

log = logging.getLogger("lockd.client")

_SCM = socket.SCM_RIGHTS
_ANY = socket.SOL_SOCKET
# Ids of the client's own requests; forwarded FUSE messages keep their FUSE unique (the
# kernel's counter never gets near this).
_OWN_IDS = 1 << 62

# A connection that drops within STABLE_AFTER seconds of being made is dialled again
# only after a delay, doubling from REDIAL_MIN to REDIAL_MAX: whatever makes it drop
# (a frame the daemon refuses, an eviction loop) must not become a reconnect storm.
REDIAL_MIN = 0.02
REDIAL_MAX = 5.0
STABLE_AFTER = 10.0
# How long a source back-end whose state went to a destination keeps the guest's session
# when it ends before the destination took it over (QEMU closes the source as the guest
# starts on the destination): the destination's takeover then finds everything held.
HANDOFF_TIMEOUT = 30.0
MIGRATION_STATE_VERSION = 1

# on_reply(id, status, payload): status 0, -errno (never QUEUED: that only marks the
# request as waiting). A request submitted `whole` gets the whole reply frame instead of
# its payload: a forwarded FUSE message's answer, a FUSE reply passed on as it came.
ReplyCallback = Callable[[int, int, bytes], None]
_HDR = wire.REPLY_SIZE


class DaemonError(OSError):
    """The daemon refused or failed a request; `.errno` and the daemon's message."""


class ClientFile:
    """A file registered with the daemon: its inode number on the wire (`handle`), host
    (dev, ino) as the daemon saw them, whether the daemon delegated it (delegation.py),
    and a duplicate of the caller's descriptor kept to register it again after a daemon
    restart."""

    __slots__ = ("handle", "dev", "ino", "fd", "path", "delegated")

    def __init__(self, handle: int, fd: int, path: str | None) -> None:
        self.handle = handle
        self.dev = self.ino = 0
        self.fd = fd
        self.path = path
        self.delegated = False

    def __repr__(self) -> str:
        return f"ClientFile(handle={self.handle}, dev={self.dev}, ino={self.ino})"


class _Early:
    """The callback of a wait adopted from a migration's state: passes its answer to the
    callback `attach_waits` gives, keeping it until then if it comes first."""

    __slots__ = ("answer", "target", "mu")

    def __init__(self) -> None:
        self.answer: tuple[int, int, bytes] | None = None
        self.target: ReplyCallback | None = None
        self.mu = threading.Lock()

    def __call__(self, rid: int, status: int, payload: bytes) -> None:
        with self.mu:
            target = self.target
            if target is None:
                self.answer = (rid, status, payload)
                return
        target(rid, status, payload)

    def attach(self, target: ReplyCallback) -> None:
        with self.mu:
            self.target, answer, self.answer = target, self.answer, None
        if answer is not None:
            target(*answer)


class _Req:
    __slots__ = ("frame", "on_reply", "on_queued", "seq", "sent", "queued", "local", "keep",
                 "fds", "whole")

    def __init__(self, frame: bytes, on_reply: ReplyCallback, seq: int, local: int | None,
                 keep: bool, fds: tuple[int, ...] = (),
                 on_queued: ReplyCallback | None = None, whole: bool = False) -> None:
        self.frame = frame
        self.on_reply = on_reply
        self.on_queued = on_queued
        self.seq = seq
        self.sent = False  # on a connection at least once: only the daemon may answer
        self.queued = False  # the daemon said QUEUED (a wait)
        self.local = local  # the answer given here if never sent in time (None: wait)
        self.keep = keep  # still deliver it after that local answer (a release)
        self.fds = fds  # sent with the frame (FILE, RETURN)
        self.whole = whole  # answered with the whole reply frame (ReplyCallback)

    def answer_here(self, rid: int, status: int) -> None:
        """An answer decided by this client (the daemon out of reach, the client closed
        or superseded), in the form the callback takes."""
        self.on_reply(rid, status, wire.reply(rid, status) if self.whole else b"")


class _Sync:
    """A caller blocked on one reply."""

    __slots__ = ("done", "status", "payload")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.status = 0
        self.payload = b""

    def __call__(self, rid: int, status: int, payload: bytes) -> None:
        self.status, self.payload = status, payload
        self.done.set()


class _WaitReply:
    """The final answer of a LockService wait: to the caller when it comes at once, to
    the wait's callback (on the callback thread) when it comes after QUEUED."""

    __slots__ = ("sync", "callback", "cbq")

    def __init__(self, sync: _Sync, callback: WaitCallback, cbq: queue.SimpleQueue) -> None:
        self.sync, self.callback, self.cbq = sync, callback, cbq

    def __call__(self, rid: int, status: int, payload: bytes) -> None:
        if self.sync.done.is_set():
            self.cbq.put((self.callback, -status if status < 0 else 0))
        else:
            self.sync(rid, status, payload)


def _connect(path: str, timeout: float) -> socket.socket:
    """Connect to the daemon's socket. A full listen backlog (a busy or paused daemon:
    connect() on a Unix socket answers EAGAIN at once) is waited out, with backoff,
    for up to `timeout` seconds; no daemon at all (ENOENT, ECONNREFUSED) fails at once."""
    deadline = time.monotonic() + timeout
    delay = 0.01
    told = False
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.settimeout(max(0.001, deadline - time.monotonic()))
        try:
            sock.connect(path)
            sock.settimeout(timeout)
            return sock
        except BlockingIOError:
            sock.close()
            left = deadline - time.monotonic()
            if left <= 0:
                raise
            if not told:
                told = True
                log.warning("the daemon at %s does not accept connections now (listen "
                            "backlog full); retrying for up to %.1f s", path, left)
            time.sleep(min(delay, left))  # backoff: the backlog drains at the daemon's pace
            delay = min(delay * 2, 0.25)
        except OSError:
            sock.close()
            raise


def _read_reply(sock: socket.socket, buf: bytearray) -> tuple[int, int, bytes]:
    """Block until one reply frame is in buf; remove and return it."""
    while True:
        if len(buf) >= wire.REPLY_SIZE:
            ln, status, rid = wire.REPLY.unpack_from(buf)
            if ln < wire.REPLY_SIZE:
                raise DaemonError(errno.EPROTO, "bad reply length from daemon")
            if len(buf) >= ln:
                payload = bytes(buf[wire.REPLY_SIZE:ln])
                del buf[:ln]
                return rid, status, payload
        data = sock.recv(65536)  # a fresh allocation per call: keep it modest
        if not data:
            raise ConnectionResetError(errno.ECONNRESET, "daemon closed the connection")
        buf += data


def hello_exchange(sock: socket.socket, guest: str | None, role: str,
                   session: str | None, **extra: object) -> tuple[dict, bytearray]:
    """Send HELLO and read its reply: (info, bytes already received after it)."""
    sock.sendall(wire.hello(1, guest, role, session, pid=os.getpid(), **extra))
    buf = bytearray()
    rid, status, payload = _read_reply(sock, buf)
    if status < 0:
        msg = payload.decode("utf-8", "replace") or os.strerror(-status)
        raise DaemonError(-status, msg)
    return json.loads(payload), buf


class LockClient:
    """One guest's connection to the daemon (see the module docstring)."""

    # A FUSE session forwards its lock messages to it (fuse_server/locks.py's RemoteLocks,
    # which its maker passes to the Session); LocalLocks refuses a service that says this.
    forwards = True

    def __init__(self, socket_path: str, guest: str, *, reconnect_timeout: float = 10.0,
                 connect_timeout: float = 5.0, delegation: bool = False,
                 handoff_timeout: float = HANDOFF_TIMEOUT, dial: bool = True,
                 holder_names: bool = False) -> None:
        """dial=False: connect to nothing until connect(), or take_over() after
        adopt_migration() (a back-end that may be a migration's destination).
        holder_names: GETLK answers name the holder's guest (`getlk`'s Conflict.guest;
        for tools: a FUSE server's forwarded GETLK reply must stay the FUSE reply)."""
        self.socket_path = socket_path
        self.guest = guest
        self.holder_names = holder_names
        # Whether this client takes delegations (a FUSE server that can decide a file's
        # locks itself: fuse_server/locks.py); the hooks below are then set by it.
        self.delegation = delegation
        self.on_recall: Callable[[int], None] | None = None  # (inode) hand it back
        self.on_registered: Callable[[int, bool], None] | None = None  # after a restart
        self.on_evicted: Callable[[], None] | None = None
        # The session was taken over by another connection (a migration committed).
        self.on_superseded: Callable[[], None] | None = None
        self.handoff_timeout = handoff_timeout
        self.reconnect_timeout = reconnect_timeout
        self.connect_timeout = connect_timeout
        self._mu = threading.Lock()
        self._cond = threading.Condition(self._mu)
        self._send_mu = threading.Lock()
        self._register_mu = threading.Lock()
        self._sock: socket.socket | None = None
        self._pending: dict[int, _Req] = {}
        self._files: dict[int, ClientFile] = {}  # inode number on the wire -> file
        self._ids = count(_OWN_IDS)
        self._seq = count()
        self._tags: dict[int, int] = {}  # LockService wait tag -> request id
        self._session: str | None = None
        self._session_lost = False  # refused: say so at the next HELLO (see _dial)
        self._closed = False
        self._down_since: float | None = None
        self.info: dict = {}
        self.reconnects = 0
        self._connected_at = 0.0
        self._redial_delay = 0.0
        self._cbq: queue.SimpleQueue = queue.SimpleQueue()  # LockService wait callbacks
        self._migrating = False  # migration_state() went out: a destination may take over
        self._superseded = False  # it did: this client is done with the session
        self._adopted: list[int] = []  # waits taken from a migration's state (takeover)
        self._draining = False  # migration_state() waits for answers in flight
        self._early: dict[int, _Early] = {}  # adopted wait -> its callback until attached
        self._reader: threading.Thread | None = None
        if dial:
            sock, info, buf = self._dial()  # fail fast when the daemon is not there at all
            self._publish(sock, info)
            self._start(buf)

    def _start(self, buf: bytearray) -> None:
        self._reader = threading.Thread(target=self._read_loop, args=(buf,),
                                        name=f"lockd-client-{self.guest}", daemon=True)
        self._callbacks = threading.Thread(target=self._callback_loop,
                                           name=f"lockd-callbacks-{self.guest}", daemon=True)
        self._reader.start()
        self._callbacks.start()

    # ------------------------------------------------------------ connection
    def _dial(self, takeover: bool = False) -> tuple[socket.socket, dict, bytearray]:
        sock = _connect(self.socket_path, self.connect_timeout)
        presented = self._session
        extra: dict = {"lost_session": True} if self._session_lost else {}
        if self.holder_names:
            extra["holder_names"] = True
        if takeover:
            extra.update(takeover=True, waits=list(self._adopted))
        try:
            try:
                info, buf = hello_exchange(sock, self.guest, "guest", self._session,
                                           delegation=self.delegation, **extra)
            except DaemonError as exc:
                # Refused while our state is out for a migration (or in a takeover): the
                # session is someone else's now, never ours to start over.
                if (exc.errno != errno.EACCES or not self._session or takeover
                        or self._migrating):
                    raise
                # Our session is gone and the daemon keeps another under our name: start
                # over, saying so (until a HELLO saying it succeeds), so that what the
                # old one held is reported lost to its owners (EIO at their next
                # request) instead of dropped in silence.
                sock.close()
                presented = self._session = None
                self._session_lost = True
                log.warning("the daemon refused our session (%s); starting a new one: "
                            "locks held under the old one are reported lost", exc)
                sock = _connect(self.socket_path, self.connect_timeout)
                extra["lost_session"] = True
                info, buf = hello_exchange(sock, self.guest, "guest", None,
                                           delegation=self.delegation, **extra)
            if info.get("holder_names", True) and not self.holder_names:
                # A version-2 daemon names every holder: its GETLK replies are not the
                # FUSE replies a server forwards to its guest kernel.
                raise DaemonError(errno.EPROTONOSUPPORT, "the daemon names GETLK holders "
                                  f"unasked (wire protocol {info.get('version')}): restart "
                                  "it with this version")
        except BaseException:
            sock.close()
            raise
        self._session_lost = False
        if presented and not info.get("resumed"):
            log.warning("the daemon no longer knows our session (evicted, expired, or "
                        "its state lost): locks held under it are gone")
        sock.settimeout(None)
        return sock, info, buf

    def _publish(self, sock: socket.socket, info: dict, known: frozenset = frozenset()) -> None:
        """Make `sock` the connection and (re)send everything unanswered, in order
        (but `known`: waits the daemon has queued for this connection, or answers)."""
        with self._send_mu:
            with self._mu:
                self._sock = sock
                self._session = info.get("session")
                self.info = info
                self._down_since = None
                self._connected_at = time.monotonic()
                pending = sorted(((rid, req) for rid, req in self._pending.items()
                                  if rid not in known), key=lambda kv: kv[1].seq)
                for _, req in pending:
                    req.sent = True
                self._cond.notify_all()
            for i, (_, req) in enumerate(pending):
                if not self._sendmsg(sock, req):
                    with self._mu:  # never sent: they may still be answered here
                        for _, later in pending[i:]:
                            later.sent = False
                    break

    def _sendmsg(self, sock: socket.socket, req: _Req) -> bool:
        """Send one request; False (and req.sent cleared: a frame the daemon did not get
        whole is never applied) when the connection failed."""
        try:
            if req.fds:
                n = sock.sendmsg([req.frame],
                                 [(_ANY, _SCM, array.array("i", req.fds).tobytes())])
                if n < len(req.frame):
                    sock.sendall(req.frame[n:])
            else:
                sock.sendall(req.frame)
            return True
        except OSError:
            with self._mu:
                req.sent = False
            # The reader sees the connection fail and sends everything pending again.
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return False

    def _reconnect(self) -> bytearray | None:
        delay = 0.02
        while not self._closed and not self._superseded:
            try:
                sock, info, buf = self._dial()
            except OSError as exc:
                if isinstance(exc, DaemonError) and (
                        exc.errno == errno.ESTALE
                        or (exc.errno == errno.EACCES and self._migrating)):
                    # Taken over (the notice was lost): never take the session back.
                    self._mark_superseded(str(exc))
                    return None
                self._answer_overdue()
                log.debug("reconnect to %s failed: %s", self.socket_path, exc)
                time.sleep(delay)  # backoff between connection attempts
                delay = min(delay * 2, 0.5)
                continue
            try:
                # A session restored from the journal after a daemon restart is resumed
                # (locks and waits kept) but its file registrations are gone.
                if not info.get("resumed") or info.get("files_lost"):
                    self._register_again(sock, buf)
            except OSError:
                sock.close()
                continue
            self.reconnects += 1
            self._publish(sock, info)
            return buf
        return None

    def _back_off(self) -> None:
        """Before dialling again after a lost connection: at once after a stable one,
        after a growing delay after one that dropped soon (see REDIAL_MIN)."""
        if time.monotonic() - self._connected_at >= STABLE_AFTER:
            self._redial_delay = 0.0
            return
        self._redial_delay = min(max(self._redial_delay * 2, REDIAL_MIN), REDIAL_MAX)
        log.warning("connection to %s dropped within %.0f s of being made; redialling "
                    "in %.2f s", self.socket_path, STABLE_AFTER, self._redial_delay)
        with self._cond:  # close() wakes it
            self._cond.wait_for(lambda: self._closed, self._redial_delay)

    def _register_again(self, sock: socket.socket, buf: bytearray) -> None:
        """A new session on the daemon's side: register every file again, before any
        other request is sent, so that no request names an inode the daemon lacks."""
        with self._mu:
            files = list(self._files.values())
        for i, f in enumerate(files, start=1):
            sock.sendmsg([wire.file_frame(i, f.path, f.handle)],
                         [(_ANY, _SCM, array.array("i", [f.fd]).tobytes())])
            while True:
                rid, status, payload = _read_reply(sock, buf)
                if rid == i:
                    break
            if status < 0:
                log.warning("registering %s again failed: %s", f.path, os.strerror(-status))
            elif self.on_registered is not None:
                self.on_registered(f.handle, _delegated(payload))

    def _answer_overdue(self) -> None:
        """Disconnected for longer than reconnect_timeout: requests never sent get their
        local answer (see the module docstring); sent ones keep waiting for the daemon."""
        with self._mu:
            since = self._down_since
            if since is None or time.monotonic() - since < self.reconnect_timeout:
                return
            due = []
            for rid, req in list(self._pending.items()):
                if req.sent or req.local is None:
                    continue
                due.append((rid, req, req.local))
                if req.keep:
                    req.local = None  # answered once; still delivered later
                else:
                    del self._pending[rid]
        for rid, req, status in due:
            req.answer_here(rid, status)

    def _read_loop(self, buf: bytearray) -> None:
        rbuf = bytearray(1 << 18)  # recv(256 KiB) would allocate that much per call
        rview = memoryview(rbuf)
        # Frames that came right behind the HELLO answer (a takeover's replayed answers)
        # are handled before waiting for more.
        unread = bool(buf)
        while not self._closed:
            sock = self._sock
            n = 0
            if unread:
                unread, n = False, -1
            elif sock is not None:
                try:
                    n = sock.recv_into(rbuf)
                except OSError:
                    n = 0
            if not n:
                if self._closed or self._superseded:
                    return
                with self._mu:
                    if self._sock is sock:
                        self._sock = None
                        self._down_since = time.monotonic()
                if sock is not None:
                    sock.close()
                log.info("lost connection to %s; reconnecting", self.socket_path)
                self._back_off()
                got = self._reconnect()
                if got is None:
                    return
                buf = got
            elif n > 0:
                buf += rview[:n]
            try:
                frames = wire.split_replies(buf, whole=True)
            except wire.ProtocolError:
                if self._sock is not None:
                    self._sock.shutdown(socket.SHUT_RDWR)
                buf.clear()
                continue
            for rid, status, frame in frames:
                try:
                    self._dispatch(rid, status, frame)
                except Exception:
                    # One broken handler must not end the reader: every later answer
                    # of this guest (and its recalls) comes through this thread.
                    log.exception("handling the daemon's answer to request %d failed", rid)

    def _dispatch(self, rid: int, status: int, frame: bytes) -> None:
        """One reply frame of the daemon, header included."""
        if rid == 0:
            payload = frame[_HDR:]
            if status == wire.STATUS_SUPERSEDED:
                self._mark_superseded(payload.decode("utf-8", "replace"))
                return
            if status == delegation.STATUS_RECALL and len(payload) >= delegation.RECALL.size:
                if self.on_recall is not None:
                    self.on_recall(delegation.RECALL.unpack_from(payload)[0])
                return
            log.warning("daemon notice: %s (%s)", payload.decode("utf-8", "replace"),
                        os.strerror(-status) if status < 0 else status)
            if status == -errno.ECONNRESET and self.on_evicted is not None:
                self.on_evicted()  # evicted: whatever this guest held is gone
            return
        with self._mu:
            if status == wire.STATUS_QUEUED:
                req = self._pending.get(rid)
                if req is None or req.queued:
                    return
                req.queued = True
                on_queued = req.on_queued
            else:
                req = self._pending.pop(rid, None)
                on_queued = None
            if self._migrating or self._draining:
                self._cond.notify_all()  # migration_state() waits for these
        if on_queued is not None:
            on_queued(rid, status, frame[_HDR:])
        elif req is not None and status != wire.STATUS_QUEUED:
            req.on_reply(rid, status, frame if req.whole else frame[_HDR:])

    def _callback_loop(self) -> None:
        while True:
            item = self._cbq.get()
            if item is None:
                return
            cb, err = item
            try:
                cb(err)
            except Exception:  # a broken callback must not stop the others
                log.exception("wait callback failed")

    # ------------------------------------------------------------ requests
    def submit(self, frame: bytes, rid: int, on_reply: ReplyCallback, *,
               local: int | None = -errno.ENOLCK, keep: bool = False,
               fds: tuple[int, ...] = (), on_queued: ReplyCallback | None = None,
               whole: bool = False) -> None:
        """Send a request frame whose id is `rid`; `on_reply(rid, status, payload)` gets
        its answer (on the reader thread; QUEUED only marks it waiting), with `whole`
        the reply frame in place of the payload. `local`: the answer given here if it
        cannot be sent within reconnect_timeout (None: it waits for the daemon however
        long); `keep`: send it anyway once the daemon is back."""
        with self._mu:
            if self._closed:
                raise OSError(errno.ESHUTDOWN, "lock client closed")
            if self._superseded:
                raise OSError(errno.ESTALE, "the guest's lock session was taken over by "
                              "another connection (migrated)")
            req = _Req(frame, on_reply, next(self._seq), local, keep, fds, on_queued, whole)
            self._pending[rid] = req
            sock = self._sock
            req.sent = sock is not None
        if sock is not None:
            with self._send_mu:
                if self._sock is sock:
                    self._sendmsg(sock, req)
                # else: _publish of the new connection sends it

    def withdraw(self, rid: int) -> bool:
        """Drop a request that was never sent (it cannot have been applied): True when
        it was withdrawn, False when it was sent or answered already."""
        with self._mu:
            req = self._pending.get(rid)
            if req is None or req.sent:
                return False
            del self._pending[rid]
            return True

    def pending(self, rid: int) -> bool:
        return rid in self._pending

    def new_id(self) -> int:
        return next(self._ids)

    def _call(self, frame_of: Callable[[int], bytes], fds: tuple[int, ...] = (),
              queued_cb: Callable[[int], None] | None = None) -> tuple[int, bytes]:
        """Send a request and block for its answer: (status, payload). With queued_cb,
        an answer QUEUED returns at once and the final status goes to queued_cb."""
        rid = next(self._ids)
        sync = _Sync()
        if queued_cb is None:
            self.submit(frame_of(rid), rid, sync, fds=fds)
        else:
            self.submit(frame_of(rid), rid, _WaitReply(sync, queued_cb, self._cbq), fds=fds,
                        on_queued=sync)
        sync.done.wait()
        return sync.status, sync.payload

    # ------------------------------------------------------------ files
    def register(self, nodeid: int, fd: int, path: str | None = None) -> ClientFile:
        """Register the inode open at `fd` under `nodeid` (idempotent). Raises OSError
        (ENOLCK when the daemon is away, or the daemon's errno)."""
        with self._register_mu:
            f = self._files.get(nodeid)
            if f is not None:
                return f
            f = ClientFile(nodeid, os.dup(fd), path)
            sync = _Sync()

            def answered(rid: int, status: int, payload: bytes) -> None:
                # On the reader thread, before it reads the next frame: a RECALL of this
                # file may follow at once, and must find it registered and delegated.
                if status >= 0 and len(payload) >= wire.FILE_OUT.size:
                    _, f.dev, f.ino = wire.FILE_OUT.unpack_from(payload)
                    f.delegated = self.delegation and _delegated(payload)
                    with self._mu:
                        self._files[nodeid] = f
                sync(rid, status, payload)

            rid = next(self._ids)
            self.submit(wire.file_frame(rid, path, nodeid), rid, answered, fds=(f.fd,))
            sync.done.wait()
            status, payload = sync.status, sync.payload
            if status < 0 or len(payload) < wire.FILE_OUT.size:
                os.close(f.fd)
                err = -status if status < 0 else errno.EPROTO
                raise DaemonError(err, f"registering a file with vfs-lockd: {os.strerror(err)}")
            return f

    def delegated(self, nodeid: int) -> bool:
        """Is the inode's delegation ours (decided by our server)? The one record of it:
        set when the daemon's FILE reply grants it, cleared by `end_delegation`."""
        f = self._files.get(nodeid)
        return f is not None and f.delegated

    def end_delegation(self, nodeid: int) -> bool:
        """Mark the inode's delegation given up; True when it was ours until now."""
        f = self._files.get(nodeid)
        if f is None or not f.delegated:
            return False
        f.delegated = False
        return True

    def registered(self, nodeid: int) -> bool:
        return nodeid in self._files

    def registered_nodes(self) -> list[int]:
        with self._mu:
            return list(self._files)

    def unregister(self, nodeid: int) -> None:
        """The guest released its last handle of the inode (sent in the background;
        delivered even after a daemon outage)."""
        with self._mu:
            f = self._files.pop(nodeid, None)
        if f is None:
            return
        os.close(f.fd)
        rid = next(self._ids)
        self.submit(wire.frame(wire.T_PUT_FILE, rid, handle=nodeid), rid, _ignore, local=None)

    # ------------------------------------------------------------ LockService
    def ping(self) -> int:
        return -self._call(lambda rid: wire.frame(wire.T_PING, rid))[0]

    def file(self, fd: int, path: str | None = None, guest: str | None = None) -> ClientFile:
        return self.register(next(self._ids), fd, path)  # the daemon knows our guest

    def put_file(self, ref: ClientFile) -> None:
        self.unregister(ref.handle)

    def getlk(self, guest: str, owner: int, ref: ClientFile, type_: int, start: int,
              end: int) -> Conflict | int:
        """The conflict; its `guest` is the holder's only for a client made with
        holder_names (None otherwise, and for a holder on the host)."""
        status, p = self._call(lambda rid: wire.lk(wire.T_GETLK, rid, ref.handle, 0, owner,
                                                   type_, start, end, 0))
        if status < 0:
            return -status
        if len(p) < abi.LK_OUT.size:
            return errno.EPROTO
        start_, end_, t, pid = abi.LK_OUT.unpack_from(p)
        if t == F_UNLCK:
            return NO_CONFLICT
        holder = p[abi.LK_OUT.size:].decode("utf-8", "replace") or None
        return Conflict(t, start_, end_, pid, holder)

    def setlk(self, guest: str, owner: int, ref: ClientFile, type_: int, start: int,
              end: int, pid: int) -> int:
        return -self._call(lambda rid: wire.lk(wire.T_SETLK, rid, ref.handle, 0, owner,
                                               type_, start, end, pid))[0]

    def setlkw(self, guest: str, owner: int, ref: ClientFile, type_: int, start: int,
               end: int, pid: int, callback: WaitCallback, tag: int | None = None) -> int:
        return self._wait(lambda rid: wire.lk(wire.T_SETLKW, rid, ref.handle, 0, owner,
                                              type_, start, end, pid), callback, tag)

    def flock(self, guest: str, fh: int, ref: ClientFile, type_: int, pid: int, wait: bool,
              callback: WaitCallback | None = None, tag: int | None = None) -> int:
        kind = wire.T_SETLKW if wait else wire.T_SETLK

        def frame_of(rid: int) -> bytes:
            return wire.lk(kind, rid, ref.handle, fh, 0, type_, 0, 0, pid, FUSE_LK_FLOCK)

        if not wait:
            return -self._call(frame_of)[0]
        return self._wait(frame_of, callback, tag)

    def _wait(self, frame_of: Callable[[int], bytes], callback: WaitCallback | None,
              tag: int | None) -> int:
        def framed(rid: int) -> bytes:
            if tag is not None:
                with self._mu:
                    self._tags[tag] = rid
            return frame_of(rid)

        status, _ = self._call(framed, queued_cb=callback or _ignore_err)
        if status != wire.STATUS_QUEUED and tag is not None:
            with self._mu:
                self._tags.pop(tag, None)
        return QUEUED if status == wire.STATUS_QUEUED else -status

    def cancel(self, wait_id: int, err: int = errno.EINTR) -> bool:
        return self._call(lambda rid: wire.frame(wire.T_CANCEL_WAIT, rid,
                                                 wire.U64.pack(wait_id)))[0] == 0

    def cancel_tag(self, guest: str, tag: int, err: int = errno.EINTR) -> bool:
        with self._mu:
            target = self._tags.pop(tag, None)
        if target is None:
            return False
        # The daemon answers 0 (cancelled, or being answered anyway) or EAGAIN.
        return self._call(lambda rid: wire.interrupt(rid, target))[0] == 0

    def release_owner(self, guest: str, owner: int, ref: ClientFile) -> None:
        self._call(lambda rid: wire.flush(rid, ref.handle, owner))

    def release_flock(self, guest: str, fh: int) -> None:
        self._call(lambda rid: wire.release_flock(rid, fh))

    def release_guest(self, guest: str) -> None:
        self._call(lambda rid: wire.frame(wire.T_DESTROY, rid))

    def close(self) -> None:
        """Disconnect (the daemon releases the guest unless --guest-grace) and free fds.
        Whatever is still unanswered gets ENOLCK: the guest's session is over. While a
        migration's state is out, first waits (up to handoff_timeout) for the
        destination to take the session over: then nothing is released."""
        if self._migrating:
            self.wait_taken_over(self.handoff_timeout)
        with self._mu:
            if self._closed:
                return
            self._closed = True
            sock, self._sock = self._sock, None
            pending, self._pending = self._pending, {}
            if self._superseded:
                pending = {}  # their answers are the destination's
            files, self._files = self._files, {}
            self._cond.notify_all()
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._reader is not None and self._reader is not threading.current_thread():
            self._reader.join(5)
        if sock is not None:
            sock.close()
        for rid, req in pending.items():
            req.answer_here(rid, -errno.ENOLCK)
        self._cbq.put(None)
        for f in files.values():
            os.close(f.fd)

    # ------------------------------------------------------------ live migration
    @property
    def migrating(self) -> bool:
        """migration_state() went out and no takeover happened yet."""
        return self._migrating and not self._superseded

    @property
    def superseded(self) -> bool:
        """The guest's session was taken over by another connection (it migrated)."""
        return self._superseded

    def migration_state(self, timeout: float = 5.0) -> dict:
        """On a migration's source, once the guest is stopped (it sends nothing new):
        what a destination needs to continue this guest's lock session, as plain
        JSON-able data. Waits until every request in flight is answered but queued
        waits (OSError EBUSY after `timeout`). Changes nothing: if the migration fails,
        this client goes on (`cancel_migration()`); if it succeeds, the destination's
        take_over() supersedes it."""
        with self._cond:
            if self._closed or self._superseded:
                raise OSError(errno.ESHUTDOWN, "lock client closed or superseded")
            self._draining = True
            try:
                drained = self._cond.wait_for(
                    lambda: all(r.queued for r in self._pending.values()), timeout)
            finally:
                self._draining = False
            if not drained:
                n = sum(not r.queued for r in self._pending.values())
                raise OSError(errno.EBUSY, f"{n} lock request(s) still unanswered")
            waits = [_wait_of(rid, req.frame) for rid, req in
                     sorted(self._pending.items(), key=lambda kv: kv[1].seq)]
            files = [{"nodeid": f.handle, "dev": f.dev, "ino": f.ino, "path": f.path,
                      "delegated": f.delegated} for f in self._files.values()]
            self._migrating = True
            return {
                "version": MIGRATION_STATE_VERSION, "guest": self.guest,
                "session": self._session, "delegation": self.delegation,
                "limits": dict(self.info.get("limits", {})), "files": files,
                "waits": waits, "next_id": next(self._ids),
            }

    def cancel_migration(self) -> None:
        """The migration failed or was cancelled and the source runs on: its end and
        close() release again as always."""
        with self._cond:
            self._migrating = False
            self._cond.notify_all()

    def wait_taken_over(self, timeout: float) -> bool:
        """Wait (up to `timeout` s) while a migration's state is out: True when a
        destination took the session over, False when not (or no longer migrating)."""
        with self._cond:
            self._cond.wait_for(lambda: self._superseded or self._closed
                                or not self._migrating, timeout)
            return self._superseded

    def end_unless_taken_over(self, end: Callable[[], None]) -> None:
        """A source's session ends (QEMU closed it) with its state out for a migration:
        in the background, wait for the takeover up to handoff_timeout; run `end` (the
        release of everything) only if none came and this client is still open."""
        def run() -> None:
            if not self.wait_taken_over(self.handoff_timeout) and not self._closed:
                end()

        threading.Thread(target=run, name=f"lockd-handoff-{self.guest}", daemon=True).start()

    def _mark_superseded(self, why: str) -> None:
        with self._cond:
            if self._superseded:
                return
            self._superseded = True
            # Queued waits moved with the session: their answers go to the connection
            # that took it over. Anything else unanswered (nothing, once the source
            # stopped its guest) fails here rather than hang its caller.
            pending, self._pending = self._pending, {}
            sock = self._sock
            self._cond.notify_all()
        log.warning("guest %s: lock session taken over by another connection (%s)",
                    self.guest, why)
        for rid, req in pending.items():
            if not req.queued:
                req.answer_here(rid, -errno.ESTALE)
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self.on_superseded is not None:
            self.on_superseded()

    @classmethod
    def takeover(cls, socket_path: str, state: dict, files: dict[int, int],
                 **kw: object) -> LockClient:
        """On a migration's destination: a client for the guest of `state` (from the
        source's migration_state()) that connects to nothing until take_over(), so the
        source is not disturbed while the migration may still fail (see
        adopt_migration for `files`)."""
        c = cls(socket_path, state["guest"], delegation=bool(state.get("delegation")),
                dial=False, **kw)  # type: ignore[arg-type]
        try:
            c.adopt_migration(state, files)
        except BaseException:
            c.close()
            raise
        return c

    def connect(self) -> None:
        """Connect a client made with dial=False, as the constructor would have (a
        back-end that did not become a migration's destination after all)."""
        if self._reader is not None or self._adopted:
            raise RuntimeError("connected already, or a migration's destination "
                               "(take_over())")
        sock, info, buf = self._dial()
        self._publish(sock, info)
        self._start(buf)

    def adopt_migration(self, state: dict, files: dict[int, int]) -> None:
        """Make this client (dial=False, nothing registered yet) the continuation of
        the guest session in `state`, to be taken over with take_over(). `files`:
        inode number -> a descriptor of this back-end for every file of the state
        (duplicated; the caller keeps its own); each must be the file the source
        registered (same host dev and inode: OSError ESTALE otherwise). Checked
        before anything changes."""
        if state.get("version") != MIGRATION_STATE_VERSION:
            raise ValueError(f"migration state version {state.get('version')!r}")
        if state.get("guest") != self.guest:
            raise ValueError(f"migration state of guest {state.get('guest')!r}, "
                             f"not {self.guest!r}")
        if self._reader is not None or self._files or self._adopted:
            raise RuntimeError("only a client that has not connected nor registered "
                               "anything can adopt a migration's state")
        chosen = []
        for fi in state["files"]:
            nodeid = int(fi["nodeid"])
            if nodeid not in files:
                raise ValueError(f"no descriptor for inode {nodeid} ({fi.get('path')})")
            st = os.fstat(files[nodeid])
            if (st.st_dev, st.st_ino) != (fi["dev"], fi["ino"]):
                raise OSError(errno.ESTALE, f"inode {nodeid}: descriptor is not the "
                              f"file the source registered ({fi.get('path')})")
            chosen.append((nodeid, fi))
        waits = [(int(w["id"]), bytes.fromhex(w["frame"])) for w in state["waits"]]
        next_id = int(state["next_id"])
        with self._mu:
            self._session = state["session"]
            self.info = {"limits": state.get("limits", {})}
            self._ids = count(next_id)
            for nodeid, fi in chosen:
                f = ClientFile(nodeid, os.dup(files[nodeid]), fi.get("path"))
                f.dev, f.ino = fi["dev"], fi["ino"]
                self._files[nodeid] = f  # delegations all come back before a takeover
            for rid, frame in waits:
                early = self._early[rid] = _Early()
                req = _Req(frame, early, next(self._seq), None, False)
                req.sent = req.queued = True
                self._pending[rid] = req
                self._adopted.append(rid)

    def attach_waits(self, on_reply: ReplyCallback, ids: list[int] | None = None) -> None:
        """Give the waits adopted from a migration's state (all, or `ids`) the callback
        of their answers here (`on_reply(id, status, payload)`, the FUSE reply's
        status); an answer that came before is passed on at once."""
        with self._mu:
            early = [self._early[rid] for rid in (self._adopted if ids is None else ids)
                     if rid in self._early]
        for e in early:
            e.attach(on_reply)

    def take_over(self, timeout: float = 10.0) -> dict:
        """Move the guest's session to this client (built by takeover()): from now on
        the daemon answers here and the source is superseded. Retries while the daemon
        recalls delegations from the source (EAGAIN), up to `timeout` s. Returns the
        daemon's HELLO answer ("resumed" false: the daemon no longer had the session,
        e.g. the source ended it: its locks are gone)."""
        if self._reader is not None:
            raise RuntimeError("this client is connected already")
        deadline = time.monotonic() + timeout
        delay = 0.005
        while True:
            try:
                sock, info, buf = self._dial(takeover=True)
                break
            except DaemonError as exc:
                left = deadline - time.monotonic()
                if exc.errno != errno.EAGAIN or left <= 0:
                    raise
                time.sleep(min(delay, left))  # the source hands its delegations back
                delay = min(delay * 2, 0.1)
        try:
            if info.get("files_lost") or not info.get("resumed"):
                self._register_again(sock, buf)
        except OSError:
            sock.close()
            raise
        if not info.get("resumed"):
            log.warning("takeover of guest %s: the daemon no longer had its session; "
                        "locks held under it are gone", self.guest)
        known = frozenset(info.get("pending", ())) | frozenset(info.get("replayed", ()))
        if info.get("files_lost") or not info.get("resumed"):
            known = frozenset()  # a restored (or new) session: every wait is sent again
        self._publish(sock, info, known & frozenset(self._adopted))
        self._start(buf)
        return info

    def __enter__(self) -> LockClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _wait_of(rid: int, frame: bytes) -> dict:
    """A queued wait in a migration's state: its id, its frame (sent again after a
    daemon restart), and what it is (for the destination and for people)."""
    w: dict = {"id": rid, "frame": frame.hex()}
    if len(frame) >= wire.LK_FRAME.size:
        h = wire.HEADER.unpack_from(frame)
        fh, owner, start, end, typ, pid, flags = abi.LK_IN.unpack_from(frame, wire.HEADER_SIZE)
        w.update(nodeid=h[3], fh=fh, owner=owner, start=start, end=end, type=typ, pid=pid,
                 flock=bool(flags & FUSE_LK_FLOCK))
    return w


def _delegated(file_reply: bytes) -> bool:
    """Whether a FILE reply says the daemon delegated the file (delegation.py)."""
    need = wire.FILE_OUT.size + delegation.FILE_FLAGS.size
    return len(file_reply) >= need and bool(
        delegation.FILE_FLAGS.unpack_from(file_reply, wire.FILE_OUT.size)[0]
        & delegation.DELEGATED)


def _ignore(rid: int, status: int, payload: bytes) -> None:
    if status < 0:
        log.debug("background request %d: %s", rid, os.strerror(-status))


def _ignore_err(err: int) -> None:
    pass


class AdminClient:
    """One admin connection: request(type, body) -> (status, payload), blocking."""

    def __init__(self, socket_path: str, timeout: float = 10.0) -> None:
        self.sock = _connect(socket_path, timeout)
        try:
            self.info, self._buf = hello_exchange(self.sock, None, "admin", None)
        except BaseException:
            self.sock.close()
            raise
        self._ids = count(2)

    def request(self, type_: int, body: bytes = b"") -> tuple[int, bytes]:
        rid = next(self._ids)
        self.sock.sendall(wire.frame(type_, rid, body))
        while True:
            got, status, payload = _read_reply(self.sock, self._buf)
            if got == rid:
                return status, payload
            if got == 0 and status < 0:
                raise DaemonError(-status, payload.decode("utf-8", "replace"))

    def json(self, type_: int, body: bytes = b"") -> dict:
        status, payload = self.request(type_, body)
        if status < 0:
            raise DaemonError(-status, payload.decode("utf-8", "replace") or os.strerror(-status))
        return json.loads(payload)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
