"""A connection of the daemon and its socket I/O: reads (with the descriptors passed
along), the output buffer each connection has, and the ways a connection ends. The event
loop (server.py) owns the epoll set and decides what the bytes mean."""

from __future__ import annotations

import array
import errno
import os
import select
import socket
import time
from collections import deque
from typing import TYPE_CHECKING

from lockd.daemon import wire
from lockd.daemon.logs import log

if TYPE_CHECKING:
    from lockd.daemon.server import Daemon, GuestSession

RECV_SIZE = 256 * 1024
MAX_FDS_PER_MSG = 16
MAX_PENDING_FDS = 64  # fds received ahead of their FILE frames
IN = select.EPOLLIN | select.EPOLLRDHUP
OUT = int(select.EPOLLOUT)  # plain ints: enum flag arithmetic costs ~1 us per event
_CTRUNC = int(socket.MSG_CTRUNC)
_CMSG_ROOM = socket.CMSG_SPACE(MAX_FDS_PER_MSG * 4)
_CLOEXEC = int(socket.MSG_CMSG_CLOEXEC)


class Conn:
    __slots__ = ("sock", "fd", "inbuf", "out", "outlen", "session", "role", "pid", "uid",
                 "gid", "fds", "hello", "writing", "closed", "since", "cid", "opened",
                 "skip", "allow")

    def __init__(self, sock: socket.socket, cid: int) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.inbuf = bytearray()
        self.out: list[bytes] = []
        self.outlen = 0
        self.session: GuestSession | None = None
        self.role = ""
        self.pid = self.uid = self.gid = -1
        self.fds: deque[int] = deque()
        self.hello = False
        self.writing = False
        self.closed = False
        self.since = time.time()
        self.opened = time.monotonic()  # for the HELLO deadline
        self.cid = cid
        self.skip = 0  # bytes still to discard of a refused frame
        self.allow = 0  # out_cap is exceeded by this much for an admin's big answer


class Connections:
    """The daemon's connections by fd, and their I/O. Replies are buffered per connection
    (`send`) and written once per loop iteration (`flush` of the `dirty` ones); a
    connection that leaves more than out_cap unread is dropped."""

    def __init__(self, daemon: Daemon, ep: select.epoll) -> None:
        self._d = daemon
        self._ep = ep
        self.conns: dict[int, Conn] = {}
        self.dirty: dict[int, Conn] = {}  # connections with replies to write
        rbuf = bytearray(RECV_SIZE)  # every connection's reads land here (one loop thread)
        self._rbufs = [rbuf]
        self._rview = memoryview(rbuf)

    def send(self, c: Conn, data: bytes) -> None:
        c.out.append(data)
        c.outlen += len(data)
        self.dirty[c.fd] = c

    def send_big(self, c: Conn, data: bytes) -> None:
        """An admin's answer whose size the guests decide (a LIST of every lock): one of
        them may pass out_cap; the cap still bounds what a client leaves unread."""
        c.allow = max(c.allow, len(data))
        self.send(c, data)

    def flush(self, c: Conn) -> None:
        if not c.out:
            return
        data = c.out[0] if len(c.out) == 1 else b"".join(c.out)
        try:
            n = c.sock.send(data)
        except (BlockingIOError, InterruptedError):
            n = 0
        except OSError:
            self.drop(c, "send failed")
            return
        if n == len(data):
            c.out.clear()
            c.outlen = 0
            c.allow = 0
            if c.writing:
                c.writing = False
                self._ep.modify(c.fd, IN)
            return
        rest = data[n:]
        c.out = [rest]
        c.outlen = len(rest)
        if c.outlen > self._d.out_cap + c.allow:
            # The client does not read its replies: it must not make us hold unbounded
            # memory, and the loop must not wait for it.
            self.drop(c, f"output buffer over {self._d.out_cap} bytes (client not reading)")
            return
        if not c.writing:
            c.writing = True
            self._ep.modify(c.fd, IN | OUT)

    def fatal(self, c: Conn, rid: int, err: int, message: str) -> None:
        """Error frame, then close: framing is lost or the peer is not acceptable."""
        self._d.counters["protocol_errors"] += 1
        try:
            c.sock.send(b"".join(c.out) + wire.error_frame(rid, err, message))
        except OSError:
            pass
        c.out.clear()
        self.drop(c, message)

    def supersede(self, c: Conn, message: str) -> None:
        """c's session was taken over by another connection: detach it first (nothing c
        sent or sends can touch the session now), then what c is owed, the notice
        (STATUS_SUPERSEDED) and the close. The session does not end."""
        c.session = None
        log("superseded", conn=c.cid, pid=c.pid, reason=message)
        try:
            c.sock.send(b"".join(c.out) + wire.reply(0, wire.STATUS_SUPERSEDED,
                                                     message.encode("utf-8", "replace")))
        except OSError:
            pass  # its client learns it at its next HELLO (ESTALE)
        c.out.clear()
        self.close(c)

    def drop(self, c: Conn, reason: str) -> None:
        if c.closed:
            return
        self._d.counters["connections_dropped"] += 1
        s = c.session
        log("disconnect", conn=c.cid, guest=s.guest if s else None, role=c.role, pid=c.pid,
            reason=reason)
        self.close(c)
        if s is not None and s.conn is c:
            s.conn = None
            self._d._guest_away(s)

    def close(self, c: Conn) -> None:
        c.closed = True
        self.conns.pop(c.fd, None)
        self._d._authenticated(c)  # gone: room for another unauthenticated connection
        self.dirty.pop(c.fd, None)
        try:
            self._ep.unregister(c.fd)
        except (OSError, ValueError):
            pass
        c.sock.close()
        while c.fds:
            os.close(c.fds.popleft())

    def read(self, c: Conn) -> None:
        try:
            # Into one preallocated buffer: recvmsg(RECV_SIZE) would allocate (and
            # fault in) 256 KiB per call, ~13 us of every request on a quiet loop.
            n, anc, flags, _ = c.sock.recvmsg_into(self._rbufs, _CMSG_ROOM, _CLOEXEC)
            data = self._rview[:n].tobytes()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.drop(c, f"recv failed: {exc}")
            return
        for level, kind, payload in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
                c.fds.extend(fds)
        if flags & _CTRUNC or len(c.fds) > MAX_PENDING_FDS:
            self.fatal(c, 0, errno.EPROTO, "too many file descriptors in flight")
            return
        if not data:
            self.drop(c, "closed by peer")
            return
        if c.skip:  # the rest of a refused frame (its length was known: still in sync)
            k = min(c.skip, len(data))
            c.skip -= k
            data = data[k:]
            if not data:
                return
        if c.inbuf:
            c.inbuf += data
            buf = c.inbuf
        else:
            buf = data
        rest = self._d._process(c, buf)
        if c.closed:
            return
        if rest < len(buf):
            if buf is data:
                c.inbuf = bytearray(data[rest:])
            else:
                del buf[:rest]
        elif c.inbuf:
            c.inbuf = bytearray()
