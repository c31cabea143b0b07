"""Clients of `vfs-lockd serve`.

`LockClient` implements lockd.api.LockService over the daemon socket for a guest's FUSE
server: any number of threads call it at once; one reader thread matches replies to
requests by id; wait callbacks run on a separate callback thread (so a callback may call
the client again). When the daemon goes away the reader reconnects with backoff, presents
the session token (resuming the session within the daemon's --guest-grace), re-registers
its files from the descriptors it keeps (when the session is new) and re-sends every
request still unanswered, queued waits included. Calls made while disconnected wait for
the reconnection up to `reconnect_timeout`, then answer ENOLCK.

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
from itertools import count

from lockd.api import FUSE_LK_FLOCK, NO_CONFLICT, QUEUED, Conflict, WaitCallback
from lockd.daemon import wire

log = logging.getLogger("lockd.daemon.client")

_SCM = socket.SCM_RIGHTS
_ANY = socket.SOL_SOCKET


class DaemonError(OSError):
    """The daemon refused or failed a request; `.errno` and the daemon's message."""


class ClientFile:
    """The client's FileRef: host (dev, ino) as the daemon saw them, the daemon's handle,
    and a duplicate of the caller's fd kept to register the file again after a restart."""

    __slots__ = ("dev", "ino", "handle", "fd", "path", "gen", "live")

    def __init__(self, fd: int, path: str | None) -> None:
        self.dev = self.ino = 0
        self.handle = 0
        self.fd = fd
        self.path = path
        self.gen = -1  # connection generation the handle belongs to
        self.live = False

    def __repr__(self) -> str:
        return f"ClientFile(dev={self.dev}, ino={self.ino}, handle={self.handle})"


class _Req:
    __slots__ = ("kind", "ref", "a", "done", "status", "payload", "callback", "tag", "queued",
                 "answered")

    def __init__(self, kind: int, ref: ClientFile | None = None, a: tuple = (),
                 callback: WaitCallback | None = None, tag: int | None = None) -> None:
        self.kind = kind
        self.ref = ref
        self.a = a
        self.callback = callback
        self.tag = tag
        self.done = threading.Lock()
        self.done.acquire()
        self.status = 0
        self.payload = b""
        self.queued = False
        self.answered = False

    def encode(self, rid: int) -> bytes:
        k, a, ref = self.kind, self.a, self.ref
        if k in (wire.T_SETLK, wire.T_SETLKW, wire.T_GETLK):
            return wire.lk(k, rid, ref.handle, *a)
        if k == wire.T_FLUSH:
            return wire.flush(rid, ref.handle, a[0])
        if k == wire.T_RELEASE:
            return wire.release_flock(rid, a[0])
        if k == wire.T_INTERRUPT:
            return wire.interrupt(rid, a[0])
        if k == wire.T_FILE:
            return wire.file_frame(rid, ref.path)
        if k == wire.T_PUT_FILE:
            return wire.frame(k, rid, handle=ref.handle)
        if k == wire.T_CANCEL_WAIT:
            return wire.frame(k, rid, wire.U64.pack(a[0]))
        return wire.frame(k, rid)


def _connect(path: str, timeout: float) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
    except OSError:
        sock.close()
        raise
    return sock


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
        data = sock.recv(1 << 20)
        if not data:
            raise ConnectionResetError(errno.ECONNRESET, "daemon closed the connection")
        buf += data


def hello_exchange(sock: socket.socket, guest: str | None, role: str,
                   session: str | None) -> tuple[dict, bytearray]:
    """Send HELLO and read its reply: (info, bytes already received after it)."""
    sock.sendall(wire.hello(1, guest, role, session, pid=os.getpid()))
    buf = bytearray()
    rid, status, payload = _read_reply(sock, buf)
    if status < 0:
        msg = payload.decode("utf-8", "replace") or os.strerror(-status)
        raise DaemonError(-status, msg)
    return json.loads(payload), buf


class LockClient:
    """lockd.api.LockService backed by the daemon (one guest, one connection)."""

    def __init__(self, socket_path: str, guest: str, *, reconnect_timeout: float = 10.0,
                 request_timeout: float = 60.0, connect_timeout: float = 5.0) -> None:
        self.socket_path = socket_path
        self.guest = guest
        self.reconnect_timeout = reconnect_timeout
        self.request_timeout = request_timeout
        self.connect_timeout = connect_timeout
        self._mu = threading.Lock()
        self._cond = threading.Condition(self._mu)
        self._send_mu = threading.Lock()
        self._sock: socket.socket | None = None
        self._gen = 0
        self._pending: dict[int, _Req] = {}
        self._tags: dict[int, int] = {}  # caller's wait tag -> request id
        self._files: set[ClientFile] = set()
        self._ids = count(1)
        self._session: str | None = None
        self._closed = False
        self._down_since: float | None = None
        self.info: dict = {}
        self.reconnects = 0
        self._cbq: queue.SimpleQueue = queue.SimpleQueue()
        sock, info, buf = self._dial()  # fail fast when the daemon is not there at all
        self._publish(sock, info)
        self._reader = threading.Thread(target=self._read_loop, args=(buf,),
                                        name=f"lockd-client-{guest}", daemon=True)
        self._callbacks = threading.Thread(target=self._callback_loop,
                                           name=f"lockd-callbacks-{guest}", daemon=True)
        self._reader.start()
        self._callbacks.start()

    # ------------------------------------------------------------ connection
    def _dial(self) -> tuple[socket.socket, dict, bytearray]:
        sock = _connect(self.socket_path, self.connect_timeout)
        try:
            try:
                info, buf = hello_exchange(sock, self.guest, "guest", self._session)
            except DaemonError as exc:
                if exc.errno != errno.EACCES or not self._session:
                    raise
                # Our session is gone and someone else owns the name's new one: start over.
                sock.close()
                sock = _connect(self.socket_path, self.connect_timeout)
                self._session = None
                info, buf = hello_exchange(sock, self.guest, "guest", None)
        except BaseException:
            sock.close()
            raise
        sock.settimeout(None)
        return sock, info, buf

    def _publish(self, sock: socket.socket, info: dict) -> None:
        with self._mu:
            self._sock = sock
            self._gen += 1
            self._session = info.get("session")
            self.info = info
            self._down_since = None
            pending = sorted(self._pending.items())
            self._cond.notify_all()
        with self._send_mu:
            for rid, req in pending:
                data = self._encode_live(
                    rid, req, info.get("resumed", False) and not info.get("files_lost"))
                if data is not None:
                    self._sendmsg(sock, data, req)

    def _encode_live(self, rid: int, req: _Req, resumed: bool) -> bytes | None:
        """Re-encode a request for the current connection, or finish it here when its file
        no longer exists on the daemon's side."""
        ref = req.ref
        if ref is not None and req.kind != wire.T_FILE and ref.gen != self._gen and not resumed:
            # The daemon restarted and this file was not registered again (put_file raced
            # with the reconnect): nothing to do there.
            self._finish(rid, 0 if req.kind == wire.T_PUT_FILE else -errno.EBADF, b"")
            return None
        return req.encode(rid)

    def _sendmsg(self, sock: socket.socket, data: bytes, req: _Req) -> None:
        try:
            if req.kind == wire.T_FILE:
                sock.sendmsg([data], [(_ANY, _SCM, array.array("i", [req.ref.fd]).tobytes())])
            else:
                sock.sendall(data)
        except OSError:
            # The reader sees the connection fail and re-sends everything pending.
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _reconnect(self) -> tuple[socket.socket, bytearray] | None:
        delay = 0.02
        while not self._closed:
            try:
                sock, info, buf = self._dial()
            except OSError as exc:
                self._fail_if_overdue()
                log.debug("reconnect to %s failed: %s", self.socket_path, exc)
                time.sleep(delay)
                delay = min(delay * 2, 0.5)
                continue
            try:
                # A session restored from the journal after a daemon restart is resumed
                # (locks and waits kept) but its file handles are gone.
                if not info.get("resumed") or info.get("files_lost"):
                    self._register_again(sock, buf)
            except OSError:
                sock.close()
                continue
            self.reconnects += 1
            self._publish(sock, info)
            return sock, buf
        return None

    def _register_again(self, sock: socket.socket, buf: bytearray) -> None:
        """A new session: register every live file again (before anything else is sent,
        so no request carries a stale handle)."""
        with self._mu:
            files = [f for f in self._files if f.live]
            gen = self._gen + 1  # the generation _publish is about to start
        for i, f in enumerate(files, start=1):
            req = _Req(wire.T_FILE, f)
            sock.sendmsg([wire.file_frame(i, f.path)],
                         [(_ANY, _SCM, array.array("i", [f.fd]).tobytes())])
            while True:
                rid, status, payload = _read_reply(sock, buf)
                if rid == i:
                    break
            if status == 0 and len(payload) >= wire.FILE_OUT.size:
                f.handle, f.dev, f.ino = wire.FILE_OUT.unpack_from(payload)
                f.gen = gen
            else:
                log.warning("re-registering %s failed: %s", f.path, -status)
            del req

    def _fail_if_overdue(self) -> None:
        """Disconnected for longer than reconnect_timeout: everything pending gets ENOLCK."""
        with self._mu:
            since = self._down_since
            if since is None or time.monotonic() - since < self.reconnect_timeout:
                return
            failed = list(self._pending)
        for rid in failed:
            self._finish(rid, -errno.ENOLCK, b"")

    def _read_loop(self, buf: bytearray) -> None:
        while not self._closed:
            sock = self._sock
            data = b""
            if sock is not None:
                try:
                    data = sock.recv(1 << 18)
                except OSError:
                    data = b""
            if not data:
                if self._closed:
                    return
                with self._mu:
                    if self._sock is sock:
                        self._sock = None
                        self._down_since = time.monotonic()
                if sock is not None:
                    sock.close()
                log.info("lost connection to %s; reconnecting", self.socket_path)
                got = self._reconnect()
                if got is None:
                    return
                buf = got[1]
                frames = wire.split_replies(buf)
                for rid, status, payload in frames:
                    self._dispatch(rid, status, payload)
                continue
            buf += data
            try:
                frames = wire.split_replies(buf)
            except wire.ProtocolError:
                sock.shutdown(socket.SHUT_RDWR)
                buf.clear()
                continue
            for rid, status, payload in frames:
                self._dispatch(rid, status, payload)

    def _dispatch(self, rid: int, status: int, payload: bytes) -> None:
        if rid == 0:
            log.warning("daemon notice: %s (%s)", payload.decode("utf-8", "replace"),
                        os.strerror(-status) if status < 0 else status)
            return
        if status == wire.STATUS_QUEUED:
            with self._mu:
                req = self._pending.get(rid)
                if req is None or req.queued or req.answered:
                    return
                req.queued = True
                req.status = status
                req.answered = True
            req.done.release()
            return
        self._finish(rid, status, payload)

    def _finish(self, rid: int, status: int, payload: bytes) -> None:
        with self._mu:
            req = self._pending.pop(rid, None)
            if req is None:
                return
            if req.tag is not None and self._tags.get(req.tag) == rid:
                del self._tags[req.tag]
            if req.queued:
                self._cbq.put((req.callback, -status if status < 0 else 0))
                return
            req.status, req.payload = status, payload
            req.answered = True
        req.done.release()

    def _callback_loop(self) -> None:
        while True:
            item = self._cbq.get()
            if item is None:
                return
            cb, err = item
            if cb is not None:
                try:
                    cb(err)
                except Exception:  # a broken callback must not stop the others
                    log.exception("wait callback failed")

    # ------------------------------------------------------------ requests
    def _call(self, req: _Req) -> int:
        """Send req and wait for its (first) reply: the status (0, -errno or QUEUED)."""
        deadline = time.monotonic() + self.reconnect_timeout
        with self._mu:
            while self._sock is None:
                left = deadline - time.monotonic()
                if self._closed or left <= 0:
                    return -errno.ENOLCK
                self._cond.wait(left)
            rid = next(self._ids)
            if req.tag is not None:
                self._tags[req.tag] = rid
            self._pending[rid] = req
            sock, gen = self._sock, self._gen
            data = self._encode_live(rid, req, True) if req.ref is not None else req.encode(rid)
        if data is not None:
            with self._send_mu:
                if self._sock is sock and self._gen == gen:
                    self._sendmsg(sock, data, req)
        if not req.done.acquire(timeout=self.request_timeout + self.reconnect_timeout):
            with self._mu:
                if self._pending.pop(rid, None) is None:  # answered meanwhile
                    return req.status
                if req.tag is not None:
                    self._tags.pop(req.tag, None)
            return -errno.ENOLCK
        return req.status

    def ping(self) -> int:
        return -self._call(_Req(wire.T_PING))

    def file(self, fd: int, path: str | None = None) -> ClientFile:
        ref = ClientFile(os.dup(fd), path)
        req = _Req(wire.T_FILE, ref)
        status = self._call(req)
        if status < 0 or len(req.payload) < wire.FILE_OUT.size:
            os.close(ref.fd)
            err = -status if status < 0 else errno.EPROTO
            raise DaemonError(err, f"registering file with vfs-lockd: {os.strerror(err)}")
        with self._mu:
            ref.handle, ref.dev, ref.ino = wire.FILE_OUT.unpack_from(req.payload)
            ref.gen = self._gen
            ref.live = True
            self._files.add(ref)
        return ref

    def put_file(self, ref: ClientFile) -> None:
        with self._mu:
            if not ref.live:
                return
            ref.live = False
            self._files.discard(ref)
        self._call(_Req(wire.T_PUT_FILE, ref))
        os.close(ref.fd)

    def getlk(self, guest: str, owner: int, ref: ClientFile, type_: int, start: int,
              end: int) -> Conflict | int:
        req = _Req(wire.T_GETLK, ref, (0, owner, type_, start, end, 0, 0))
        status = self._call(req)
        if status < 0:
            return -status
        p = req.payload
        if len(p) < wire.LK_OUT.size:
            return errno.EPROTO
        start_, end_, t, pid = wire.LK_OUT.unpack_from(p)
        if t == 2:
            return NO_CONFLICT
        holder = p[wire.LK_OUT.size:].decode("utf-8", "replace") or None
        if pid >= 1 << 31:
            pid -= 1 << 32  # OFD holders report -1
        return Conflict(t, start_, end_, pid, holder)

    def setlk(self, guest: str, owner: int, ref: ClientFile, type_: int, start: int,
              end: int, pid: int) -> int:
        return -self._call(_Req(wire.T_SETLK, ref, (0, owner, type_, start, end, pid, 0)))

    def setlkw(self, guest: str, owner: int, ref: ClientFile, type_: int, start: int,
               end: int, pid: int, callback: WaitCallback, tag: int | None = None) -> int:
        req = _Req(wire.T_SETLKW, ref, (0, owner, type_, start, end, pid, 0), callback, tag)
        status = self._call(req)
        return QUEUED if status == wire.STATUS_QUEUED else -status

    def flock(self, guest: str, fh: int, ref: ClientFile, type_: int, pid: int, wait: bool,
              callback: WaitCallback | None = None, tag: int | None = None) -> int:
        kind = wire.T_SETLKW if wait else wire.T_SETLK
        req = _Req(kind, ref, (fh, 0, type_, 0, 0, pid, FUSE_LK_FLOCK), callback, tag)
        status = self._call(req)
        return QUEUED if status == wire.STATUS_QUEUED else -status

    def cancel(self, wait_id: int, err: int = errno.EINTR) -> bool:
        return self._call(_Req(wire.T_CANCEL_WAIT, None, (wait_id,))) == 0

    def cancel_tag(self, guest: str, tag: int, err: int = errno.EINTR) -> bool:
        with self._mu:
            rid = self._tags.get(tag)
        if rid is None:
            return False
        return self._call(_Req(wire.T_INTERRUPT, None, (rid,))) == 0

    def release_owner(self, guest: str, owner: int, ref: ClientFile) -> None:
        self._call(_Req(wire.T_FLUSH, ref, (owner,)))

    def release_flock(self, guest: str, fh: int) -> None:
        self._call(_Req(wire.T_RELEASE, None, (fh,)))

    def release_guest(self, guest: str) -> None:
        self._call(_Req(wire.T_DESTROY))

    def close(self) -> None:
        """Disconnect (the daemon releases the guest unless --guest-grace) and free fds."""
        with self._mu:
            if self._closed:
                return
            self._closed = True
            sock, self._sock = self._sock, None
            pending = list(self._pending)
            self._cond.notify_all()
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._reader.join(5)
        if sock is not None:
            sock.close()
        for rid in pending:
            self._finish(rid, -errno.ENOLCK, b"")
        self._cbq.put(None)
        with self._mu:
            files, self._files = self._files, set()
        for f in files:
            f.live = False
            os.close(f.fd)

    def __enter__(self) -> LockClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


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
