"""`vfs-lockd serve`: one event-loop thread owns every connection and calls the manager.

The loop reads everything a connection has sent, decodes the complete frames in one
batch (CODEC.decode_batch), runs them against the LockManager, and writes all replies of
the iteration with one send per connection. Wait callbacks arrive from manager threads
(or from this thread, inside a manager call); they are queued and answered by the loop,
which an eventfd wakes. Nothing here blocks: sockets are non-blocking, each connection has
its own output buffer, and a connection whose buffer passes `out_cap` is dropped.

Hooks for crash recovery (Part 4) are the `DaemonHooks` methods.

This file is the loop, the listener and the handler table; the jobs the handlers hand
on have their own modules: conn.py (a connection's I/O), sessions.py (guest sessions,
HELLO, grace), delegation.py (`Delegations`: grants, recalls, hand-backs), admin.py
(LIST, STATUS, EVICT, CANCEL_WAIT), logs.py.
"""

from __future__ import annotations

import errno
import grp
import os
import pwd
import resource
import select
import socket
import stat
import struct
import threading
import time
from collections import deque

from lockd.daemon import delegation, sdnotify, wire
from lockd.daemon.admin import Admin
from lockd.daemon.conn import IN, OUT, Conn, Connections
from lockd.daemon.logs import Repeats, log
from lockd.daemon.sessions import GuestSession, Sessions
from lockd.dispatch import lock_request
from lockd.fuse import abi
from lockd.fuse.codec import CODEC, FuseMsg
from lockd.unixsock import listen_at

OUT_CAP = 16 * 1024 * 1024
# Connections that have not said HELLO: at most this many at once (more wait in the
# listen backlog), each closed after HELLO_TIMEOUT seconds.
MAX_UNAUTHENTICATED = 64
HELLO_TIMEOUT = 10.0
# accept() failing for want of descriptors: retry after this long, doubling up to 1 s
# (the error does not go away by itself; retrying at once would spin).
ACCEPT_BACKOFF = 0.05
# Descriptors accept() leaves free for everything else: the journal's checkpoints (a new
# change log, SQLite's files), the keeper's socket, the locks of connected guests.
FD_RESERVE = 16
_PEERCRED = struct.Struct("3i")
_NOT_OUT = ~OUT


def _fds_left() -> int:
    """Descriptors this process may still open (RLIMIT_NOFILE less those open)."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY:
        return 1 << 30
    used = os.stat("/proc/self/fd").st_size  # the open descriptors (Linux >= 6.2)
    return soft - (used or len(os.listdir("/proc/self/fd")))


class DaemonHooks:
    """Extension points for the journal / crash recovery (Part 4). All no-ops here."""

    report: dict | None = None  # what recovery found, shown by `vfs-lockd status`

    def before_serve(self, daemon: Daemon) -> None:
        """Called after the socket is bound and before any connection is accepted:
        re-take journaled locks here."""

    def session_opened(self, daemon: Daemon, session: GuestSession, resumed: bool) -> None:
        """A guest's hello was accepted (new session or resumed one)."""

    def session_closed(self, daemon: Daemon, session: GuestSession) -> None:
        """A session ended: its locks and waits were released."""

    def unknown_session(self, daemon: Daemon, guest: str, token: str) -> GuestSession | None:
        """A hello presents a token this process does not know (e.g. the daemon was
        restarted): return a restored GuestSession to resume it, or None for a fresh one."""
        return None

    def shutdown(self, daemon: Daemon) -> None:
        """Clean shutdown, after connections are closed."""


class Daemon:
    def __init__(self, manager: object, socket_path: str, *, group: str | None = None,
                 guest_grace: float = 0.0, journal_path: str | None = None,
                 metrics: object | None = None, hooks: DaemonHooks | None = None,
                 out_cap: int = OUT_CAP, max_frame: int = wire.MAX_FRAME,
                 hello_timeout: float = HELLO_TIMEOUT,
                 max_unauthenticated: int = MAX_UNAUTHENTICATED,
                 delegations: bool = True) -> None:
        self.manager = manager
        self.socket_path = os.path.abspath(socket_path)
        self.group = group
        self.gid: int | None = None
        self.group_members: set[str] = set()
        if group is not None:
            g = grp.getgrnam(group) if not group.isdigit() else grp.getgrgid(int(group))
            self.gid, self.group_members = g.gr_gid, set(g.gr_mem)
        self.grace = guest_grace
        self.journal_path = journal_path
        self.metrics = metrics
        self.hooks = hooks or DaemonHooks()
        self.out_cap = out_cap
        self.max_frame = max_frame
        self.delegations = delegation.Delegations(self, delegations and guest_grace == 0)
        self.hello_timeout = hello_timeout
        self.max_unauthenticated = max_unauthenticated
        self._unauth: dict[int, Conn] = {}  # fd -> a connection before its HELLO
        self._accept_paused_until: float | None = None
        self._accept_backoff = ACCEPT_BACKOFF
        self.log_repeated = Repeats()  # log(), rate-limited per event
        # Guest sessions (sessions.py); its calls under the names the handlers use.
        self.guest_sessions = gs = Sessions(self)
        self.sessions = gs.by_guest
        self._hello, self._end_session, self._guest_away = gs.hello, gs.end, gs.away
        self.started = time.time()
        self._t0 = time.monotonic()
        self._posted: deque = deque()
        self._stop = False
        self._loop_ident = 0
        self._cids = 0
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._ep = select.epoll()
        # Connection I/O (conn.py); its calls under the names the handlers use.
        self.io = io = Connections(self, self._ep)
        self.conns = io.conns
        self._dirty = io.dirty
        self._read, self._flush, self._send, self._send_big = (io.read, io.flush, io.send,
                                                               io.send_big)
        self._fatal, self._drop, self._close_conn = io.fatal, io.drop, io.close
        self._lsock: socket.socket | None = None
        self._sock_ino: tuple[int, int] | None = None
        self.counters = dict.fromkeys(
            ("frames", "protocol_errors", "connections_total", "connections_refused",
             "connections_dropped", "takeovers"), 0)
        self.admin = Admin(self)
        self._handlers = {
            wire.T_GETLK: self._h_lock, wire.T_SETLK: self._h_lock,
            wire.T_SETLKW: self._h_lock, wire.T_INTERRUPT: self._h_lock,
            wire.T_FLUSH: self._h_lock, wire.T_RELEASE: self._h_lock,
            wire.T_DESTROY: self._h_lock,
            wire.T_FILE: self._h_file, wire.T_PUT_FILE: self._h_put_file,
            wire.T_PING: self._h_ping, wire.T_HELLO: self._h_hello_again,
            wire.T_LIST: self.admin.h_list, wire.T_STATUS: self.admin.h_status,
            wire.T_EVICT: self.admin.h_evict, wire.T_CANCEL_WAIT: self.admin.h_cancel_wait,
            wire.T_RETURN: self._h_return,
        }

    # ------------------------------------------------------------ lifecycle
    def bind(self) -> None:
        """Create the listening socket: mode 0600, or 0660 with the group; or take the one
        a socket unit passed (then its mode and group are the unit's, and it stays in
        place at exit: systemd queues connections there while the daemon restarts)."""
        path = self.socket_path
        inherited = sdnotify.listening_socket(path)
        if inherited is not None:
            inherited.setblocking(False)
            self._sock_ino = None  # not ours to remove
            self._lsock = inherited
            return
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            st = None
        if st is not None:
            if not stat.S_ISSOCK(st.st_mode):
                raise RuntimeError(f"{path} exists and is not a socket")
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(path)
                raise RuntimeError(f"another daemon is serving {path}")
            except (ConnectionRefusedError, FileNotFoundError):
                os.unlink(path)  # stale socket of a dead daemon
            finally:
                probe.close()
        # Never wider than `mode`, and listening before it appears at `path`.
        sock = listen_at(path, 0o660 if self.gid is not None else 0o600, 512, self.gid)
        st = os.stat(path)
        self._sock_ino = (st.st_dev, st.st_ino)
        sock.setblocking(False)
        self._lsock = sock

    def stop(self) -> None:
        """Thread- and signal-safe request to shut down."""
        self._stop = True
        try:
            os.eventfd_write(self._wake, 1)
        except OSError:
            pass

    def serve_forever(self) -> None:
        if self._lsock is None:
            self.bind()
        self._loop_ident = threading.get_ident()
        self.hooks.before_serve(self)
        ep = self._ep
        lfd = self._lsock.fileno()
        ep.register(lfd, select.EPOLLIN)
        ep.register(self._wake, select.EPOLLIN)
        log("serving", socket=self.socket_path, pid=os.getpid(), journal=self.journal_path,
            group=self.group, grace=self.grace)
        sdnotify.ready(f"serving {self.socket_path}")
        conns = self.conns
        try:
            while not self._stop:
                events = ep.poll(self._poll_timeout())
                for fd, ev in events:
                    c = conns.get(fd)
                    if c is not None:
                        if ev & OUT and not c.closed:
                            self._flush(c)
                        if ev & _NOT_OUT and not c.closed:
                            self._read(c)
                    elif fd == lfd:
                        self._accept()
                    elif fd == self._wake:
                        try:
                            os.eventfd_read(self._wake)
                        except BlockingIOError:
                            pass
                self._after_batch()
        finally:
            self._shutdown()

    def _poll_timeout(self) -> float:
        if self._posted:
            return 0
        wake = [1.0]
        now = time.monotonic()
        expiry = self.guest_sessions.expiry
        if expiry:
            wake.append(expiry[0][0] - now)
        if self._accept_paused_until is not None:
            wake.append(self._accept_paused_until - now)
        if self.delegations.lists_waiting:
            wake.append(0.05)
        if self._unauth:  # the first connection to run out of time for its HELLO
            wake.append(min(c.opened for c in self._unauth.values()) + self.hello_timeout - now)
        return max(0.0, min(wake))

    def _after_batch(self) -> None:
        if self._posted:
            self._drain_posted()
        now = time.monotonic()
        expiry = self.guest_sessions.expiry
        if expiry and expiry[0][0] <= now:
            self.guest_sessions.expire()
        if self._unauth:
            for c in [c for c in self._unauth.values() if now - c.opened > self.hello_timeout]:
                self._hello_timed_out(c)
        if self._accept_paused_until is not None and now >= self._accept_paused_until:
            self._resume_accept()
        if self.delegations.lists_waiting:
            self.delegations.answer_lists()
        if self._dirty:
            dirty = list(self._dirty.values())
            self._dirty.clear()
            for c in dirty:
                if not c.closed:
                    self._flush(c)

    def _shutdown(self) -> None:
        sdnotify.stopping("shutting down")
        for c in list(self.conns.values()):
            self._close_conn(c)
        try:
            self.hooks.shutdown(self)
        except Exception as exc:  # shutdown must finish: log and go on
            log("hook_failed", level="error", hook="shutdown", error=repr(exc))
        if self._lsock is not None:
            self._lsock.close()
            self._lsock = None
            try:  # remove the socket only if it is still ours
                st = os.stat(self.socket_path)
                if (st.st_dev, st.st_ino) == self._sock_ino:
                    os.unlink(self.socket_path)
            except OSError:
                pass
        self._ep.close()
        os.close(self._wake)
        log("stopped")

    # ------------------------------------------------------------ connections
    def _accept(self) -> None:
        while True:
            if len(self._unauth) >= self.max_unauthenticated:
                # Enough connections are yet to say who they are: the rest wait in the
                # listen backlog until one of these does or times out.
                self._pause_accept(None)
                return
            try:
                if _fds_left() <= FD_RESERVE:  # as EMFILE, before the table is full
                    raise OSError(errno.EMFILE, f"only {FD_RESERVE} descriptors left, "
                                  "kept for the journal and the keeper")
                sock, _ = self._lsock.accept()
            except (BlockingIOError, InterruptedError):
                self._accept_backoff = ACCEPT_BACKOFF
                return
            except OSError as exc:  # EMFILE etc.: keep serving the others, do not spin
                self.log_repeated("accept_failed", level="error", error=str(exc),
                                  retry_in=self._accept_backoff)
                self._pause_accept(self._accept_backoff)
                self._accept_backoff = min(1.0, self._accept_backoff * 2)
                return
            sock.setblocking(False)
            self._cids += 1
            self.counters["connections_total"] += 1
            c = Conn(sock, self._cids)
            self._unauth[c.fd] = c
            try:
                c.pid, c.uid, c.gid = _PEERCRED.unpack(
                    sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
            except OSError:
                pass
            self.conns[c.fd] = c
            self._ep.register(c.fd, IN)
            if not self._peer_allowed(c):
                self.counters["connections_refused"] += 1
                log("refused", level="warning", conn=c.cid, pid=c.pid, uid=c.uid, gid=c.gid,
                    reason="peer uid not allowed")
                self._fatal(c, 0, errno.EACCES, f"uid {c.uid} may not use this daemon")

    def _authenticated(self, c: Conn) -> None:
        if self._unauth.pop(c.fd, None) is not None and self._accept_paused_until == float("inf"):
            self._resume_accept()

    def _pause_accept(self, seconds: float | None) -> None:
        """Stop accepting for `seconds` (None: until an unauthenticated connection
        goes away)."""
        if self._accept_paused_until is None:
            try:
                self._ep.unregister(self._lsock.fileno())
            except (OSError, ValueError):
                pass
        self._accept_paused_until = (time.monotonic() + seconds if seconds is not None
                                     else float("inf"))

    def _resume_accept(self) -> None:
        if self._accept_paused_until is None or self._lsock is None:
            return
        self._accept_paused_until = None
        self._ep.register(self._lsock.fileno(), select.EPOLLIN)

    def _peer_allowed(self, c: Conn) -> bool:
        # The socket's mode is the first gate; this catches a mode widened by hand.
        if c.uid in (0, os.geteuid()):
            return True
        if self.gid is None:
            return False
        if c.gid == self.gid:
            return True
        try:
            return pwd.getpwuid(c.uid).pw_name in self.group_members
        except KeyError:
            return False

    # ------------------------------------------------------------ reading and dispatch
    def _process(self, c: Conn, buf: bytes | bytearray) -> int:
        """Run every complete frame in buf; the offset of the first byte not consumed."""
        n = len(buf)
        if n < wire.HEADER_SIZE:
            return 0
        if not c.hello:
            return self._process_hello(c, buf)
        msgs = CODEC.decode_batch(buf)
        pos = 0
        handlers = self._handlers
        max_frame = self.max_frame
        nframes = 0
        for m in msgs:
            avail = n - pos
            if avail < wire.HEADER_SIZE:
                break
            ln = m.len
            if ln < wire.HEADER_SIZE:  # no way to find the next frame: framing is lost
                self._fatal(c, 0, errno.EPROTO, f"bad frame length {ln}")
                return n
            if ln > max_frame:
                # Refused, but its length says where the next frame starts: that request
                # fails and the connection goes on.
                self._refuse(c, m, ln)
                if ln > avail:
                    c.skip = ln - avail
                    return n
                pos += ln
                continue
            if ln > avail:
                break  # partial frame: wait for the rest
            nframes += 1
            h = handlers.get(m.opcode)
            rid = m.unique
            if h is None:
                self.counters["protocol_errors"] += 1
                self._send(c, wire.error_frame(rid, errno.EOPNOTSUPP,
                                               f"unknown frame type {m.opcode}"))
            elif rid == 0:
                self.counters["protocol_errors"] += 1
                self._send(c, wire.error_frame(0, errno.EINVAL, "request id 0"))
            elif m.status:
                self.counters["protocol_errors"] += 1
                self._send(c, wire.error_frame(rid, errno.EINVAL, "truncated frame body"))
            else:
                try:
                    h(c, m, buf, pos)
                except Exception as exc:  # a bug must cost one request, not the daemon
                    log("handler_failed", level="error", type=m.opcode, error=repr(exc))
                    self._send(c, wire.error_frame(rid, errno.EIO, f"internal error: {exc}"))
                if c.closed:
                    return n
            pos += ln
        self.counters["frames"] += nframes
        return pos

    def _refuse(self, c: Conn, m: FuseMsg, ln: int) -> None:
        """An over-long frame: an error reply for its id, its descriptors closed."""
        self.counters["protocol_errors"] += 1
        self.log_repeated("frame_refused", conn=c.cid, type=m.opcode, length=ln,
                          max_frame=self.max_frame)
        if m.opcode == wire.T_FILE and c.fds:
            os.close(c.fds.popleft())
        elif m.opcode == wire.T_RETURN:
            # Its count is in the body, unread. A recvmsg returns at most one message
            # carrying descriptors, and that one last: those queued now are this
            # frame's (earlier frames took theirs).
            while c.fds:
                os.close(c.fds.popleft())
        self._send(c, wire.error_frame(m.unique, errno.EMSGSIZE,
                                       f"frame length {ln} over {self.max_frame}"))

    # ------------------------------------------------------------ hello and sessions
    def _process_hello(self, c: Conn, buf: bytes | bytearray) -> int:
        ln, typ, rid, _ = wire.PEEK.unpack_from(buf, 0)
        if typ != wire.T_HELLO:
            self._fatal(c, 0, errno.EPROTO, "the first frame must be HELLO")
            return len(buf)
        if ln < wire.HEADER_SIZE or ln > self.max_frame:
            self._fatal(c, 0, errno.EPROTO, f"bad frame length {ln}")
            return len(buf)
        if len(buf) < ln:
            return 0
        try:
            self._hello(c, rid, bytes(buf[wire.HEADER_SIZE:ln]))
        except wire.ProtocolError as exc:
            self._fatal(c, rid, exc.err, str(exc))
            return len(buf)
        if c.closed:
            return len(buf)
        return ln + self._process(c, buf[ln:]) if len(buf) > ln else ln

    def _hello_timed_out(self, c: Conn) -> None:
        """Close a connection that said nothing within --hello-timeout. Anyone who may
        connect can open such connections by the hundred: one log line per interval
        (with a count), not one each."""
        message = f"no HELLO within {self.hello_timeout} s"
        self.counters["protocol_errors"] += 1
        self.counters["connections_dropped"] += 1
        self.log_repeated("hello_timeout", conn=c.cid, pid=c.pid, uid=c.uid)
        try:
            c.sock.send(wire.error_frame(0, errno.ETIMEDOUT, message))
        except OSError:
            pass
        c.out.clear()
        self._close_conn(c)

    def _h_hello_again(self, c: Conn, m: tuple, buf: bytes, pos: int) -> None:
        self._send(c, wire.error_frame(m.unique, errno.EPROTO, "already said hello"))

    # ------------------------------------------------------------ guest sessions
    def new_session(self, guest: str, token: str) -> GuestSession:
        return self.guest_sessions.new(guest, token)

    def restore_session(self, guest: str, token: str, keep_for: float) -> GuestSession:
        """A session known from the journal after a restart (Sessions.restore)."""
        return self.guest_sessions.restore(guest, token, keep_for)

    def _post(self, s: GuestSession, reply: bytes) -> None:
        """A deferred reply of s's dispatcher (any thread, once per queued wait)."""
        self._posted.append((s, reply))
        if threading.get_ident() != self._loop_ident:
            try:
                os.eventfd_write(self._wake, 1)
            except OSError:
                pass

    def _drain_posted(self) -> None:
        posted = self._posted
        now = time.monotonic()
        while posted:
            s, reply = posted.popleft()
            rid = _unique_of(reply)
            t0 = s.waits.pop(rid, None)
            if s.dead:
                continue
            if t0 is not None and self.metrics is not None:
                self.metrics.observe_wait(now - t0)
            if s.conn is not None:
                self._send(s.conn, reply)
                if t0 is not None:
                    s.answered_wait(rid, reply)
            else:
                s.outbox.append(reply)
                s.offline[rid] = reply

    # ------------------------------------------------------------ guest frames
    def _guest_session(self, c: Conn, rid: int) -> GuestSession | None:
        s = c.session
        if s is None:
            self._send(c, wire.error_frame(rid, errno.EPERM, "not a guest connection"))
        return s

    def _h_lock(self, c: Conn, m: FuseMsg, buf: bytes, pos: int) -> None:
        """A guest's FUSE lock message: answered by its dispatcher."""
        rid = m.unique
        s = self._guest_session(c, rid)
        if s is None:
            return
        if rid in s.waits:  # re-sent after a reconnect: the wait is still queued
            self._send(c, wire.reply(rid, wire.STATUS_QUEUED))
            return
        answered = s.offline.pop(rid, None)
        if answered is not None:  # answered while the guest's server was away
            self._send(c, answered)
            s.answered_wait(rid, answered)
            return
        req = lock_request(m)  # the frame is not forwarded again: not kept
        try:
            reply = s.locks.handle(req)
        except OSError as exc:
            reply = CODEC.encode_reply(rid, -(exc.errno or errno.EIO))
        if reply is not None:
            self._send(c, reply)
        elif req.waits:
            if s.locks.waiting(rid):  # not answered by a callback meanwhile
                s.waits[rid] = time.monotonic()
                self._send(c, wire.reply(rid, wire.STATUS_QUEUED))
        else:  # an INTERRUPT that needs no FUSE reply: on the wire, "done"
            self._send(c, wire.reply(rid, 0))

    def _h_file(self, c: Conn, m: FuseMsg, buf: bytes, pos: int) -> None:
        rid = m.unique
        s = self._guest_session(c, rid)
        if s is None:
            return
        if not c.fds:
            self._send(c, wire.error_frame(rid, errno.EBADF, "FILE frame without a descriptor"))
            return
        fd = c.fds.popleft()
        try:
            nodeid = m.nodeid
            if nodeid == 0:  # a client without inode numbers of its own: pick one
                nodeid = s.next_nodeid
                s.next_nodeid += 1
            # A label only (shown by LIST, in every row of the file): kept short.
            body = bytes(buf[pos + wire.HEADER_SIZE:pos + min(m.len, wire.HEADER_SIZE
                                                              + wire.MAX_LABEL)])
            path = body.decode("utf-8", "surrogateescape") if body else None
            try:
                ref = s.locks.register(nodeid, fd, path)
            except OSError as exc:
                self._send(c, wire.reply(rid, -(exc.errno or errno.EIO)))
                return
        finally:
            os.close(fd)  # the manager keeps its own reference to the file
        flags = self.delegations.on_file(s, ref)
        self._send(c, wire.reply(rid, 0, wire.FILE_OUT.pack(nodeid, ref.dev, ref.ino)
                                 + delegation.FILE_FLAGS.pack(flags)))

    def _h_return(self, c: Conn, m: FuseMsg, buf: bytes, pos: int) -> None:
        """A server hands back (part of) a delegation (delegation.Delegations)."""
        s = self._guest_session(c, m.unique)
        if s is not None:
            self.delegations.on_return(c, s, m, buf, pos)

    def _h_put_file(self, c: Conn, m: FuseMsg, buf: bytes, pos: int) -> None:
        s = self._guest_session(c, m.unique)
        if s is None:
            return
        if not s.locks.registered(m.nodeid):
            self._send(c, wire.reply(m.unique, -errno.EBADF))
            return
        self.delegations.on_put_file(s, m.nodeid, s.locks.file_of(m.nodeid))
        s.locks.forget(m.nodeid)
        self._send(c, wire.reply(m.unique, 0))

    def _h_ping(self, c: Conn, m: tuple, buf: bytes, pos: int) -> None:
        self._send(c, wire.reply(m.unique, 0))

    # ------------------------------------------------------------ inspection
    def status(self) -> dict:
        """What `vfs-lockd status` shows (admin.Admin.status)."""
        return self.admin.status()

    def daemon_stats(self) -> dict:
        return {**self.counters, "guests": len(self.sessions), "connections": len(self.conns)}


def _unique_of(reply: bytes) -> int:
    return abi.OUT_HEADER.unpack_from(reply)[2]
