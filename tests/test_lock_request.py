"""One lock request from the session to the endpoint, and GETLK's holder name only for
whoever asks (issue 24 item 4, its last two parts).

* A FUSE server's GETLK reply is the daemon's frame as it came: the daemon names the
  holder's guest only to a client whose HELLO asked ("holder_names", a tool), so nothing
  is appended for a FUSE server and nothing is cut off again on its way to the guest
  kernel (which takes fuse_lk_out and nothing more). A version-2 client, which got the
  name without asking, still gets it.
* The session makes each lock message one `lockd.dispatch.LockRequest`, and that object
  is what the endpoint and the dispatcher get; in central mode its `frame` is the
  message's own bytes (cut to its length from the transport's buffer), which are what
  goes to the daemon (a RELEASE under an id of the server's, byte for byte otherwise).
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import threading
from pathlib import Path

import pytest
import test_lock_messages
from daemonutil import Raw
from sessionrig import Sent
from test_lock_messages import PID, SessionPath, lk_body

from fuse_server import protocol as P
from fuse_server.locks import LocalLocks, RemoteLocks
from fuse_server.passthrough import Passthrough
from lockd import dispatch
from lockd.api import F_RDLCK, F_WRLCK
from lockd.daemon import wire
from lockd.daemon.client import DaemonError, LockClient
from lockd.fuse import abi

GETLK_REPLY = abi.OUT_HEADER.size + abi.LK_OUT.size  # 40: what the guest kernel takes
share = test_lock_messages.share  # the fixture: a directory with one file, "f"


def _holder(sock: str, path: str, guest: str = "holder") -> Raw:
    """Another guest holding a write lock on 0..9 of `path` (the daemon decides the file)."""
    r = Raw(sock, guest)
    h = r.file(path)
    assert r.expect(r.lk(wire.T_SETLK, h, F_WRLCK, 0, 9, pid=PID))[0] == 0
    return r


def test_getlk_names_the_holder_only_to_a_client_that_asks(daemon, share: Path) -> None:
    path = str(share / "f")
    holder = _holder(daemon.sock, path)
    plain = Raw(daemon.sock, "plain")
    asking = Raw(daemon.sock, "asking", holder_names=True)
    old = Raw(daemon.sock, "old", version=2)  # a version-2 client got it unasked
    try:
        assert (plain.info["holder_names"], asking.info["holder_names"],
                old.info["holder_names"]) == (False, True, True)
        got = {}
        for r in (plain, asking, old):
            h = r.file(path)
            status, payload = r.expect(r.lk(wire.T_GETLK, h, F_RDLCK, 5, 20))
            assert status == 0
            assert abi.LK_OUT.unpack_from(payload) == (0, 9, F_WRLCK, PID)
            got[r] = payload[abi.LK_OUT.size:]
        assert got[plain] == b""  # the FUSE reply, exactly
        assert got[asking] == got[old] == b"holder"
    finally:
        for r in (holder, plain, asking, old):
            r.close()


def test_a_fuse_servers_getlk_reply_is_the_daemons_frame_as_it_came(daemon,
                                                                   share: Path) -> None:
    """The daemon's frame to a FUSE server's client is the 40-byte FUSE reply, and the
    session passes it to the guest as it is (no strip on the way)."""
    holder = _holder(daemon.sock, str(share / "f"))
    client = LockClient(daemon.sock, "g", delegation=True)
    path = SessionPath(share, client)
    try:
        # what the daemon sends this client, seen on the client's reader thread
        frames: list[bytes] = []
        done = threading.Event()

        def got(rid: int, status: int, frame: bytes) -> None:
            frames.append(frame)
            done.set()

        client.register(path.node, path.session.fs.fd_of(path.fhs[1], path.node))
        client.submit(wire.lk(wire.T_GETLK, 8001, path.node, path.fhs[1], 1, F_RDLCK, 5,
                              20, PID), 8001, got, whole=True)
        assert done.wait(10), "no GETLK reply from the daemon"
        assert len(frames[0]) == GETLK_REPLY, frames
        # and through the session (a guest's GETLK), the same bytes
        path.post(P.GETLK, lk_body(path.fhs[1], 1, F_RDLCK, 5, 20, 0), path.node, 8003)
        reply = path.reply(8003)
        assert reply == abi.OUT_HEADER.pack(GETLK_REPLY, 0, 8003) + abi.LK_OUT.pack(
            0, 9, F_WRLCK, PID)
    finally:
        path.close()
        client.close()
        holder.close()


def test_a_tool_still_names_the_holder(daemon, share: Path) -> None:
    """LockClient as a LockService (tools, tests): with holder_names its GETLK says
    which guest holds the lock, as the in-process manager does; without, None."""
    path = str(share / "f")
    holder = _holder(daemon.sock, path, "g-holder")
    tool = LockClient(daemon.sock, "tool", holder_names=True)
    server = LockClient(daemon.sock, "server")
    try:
        named = []
        for c in (tool, server):
            fd = os.open(path, os.O_RDWR)
            try:
                ref = c.file(fd, path)
            finally:
                os.close(fd)
            conflict = c.getlk(c.guest, 1, ref, F_RDLCK, 0, 9)
            assert (conflict.type, conflict.start, conflict.end) == (F_WRLCK, 0, 9)
            named.append(conflict.guest)
        assert named == ["g-holder", None]
    finally:
        tool.close()
        server.close()
        holder.close()


def test_a_fuse_server_refuses_a_client_that_asks_for_names(daemon, share: Path) -> None:
    """Its GETLK replies would not be FUSE replies: refused at once, like LocalLocks
    refuses a daemon client."""
    from fuse_server.session import Session

    client = LockClient(daemon.sock, "g", holder_names=True)
    try:
        with pytest.raises(TypeError, match="holder names"):
            Session(Passthrough(str(share)), client, "g", Sent(), "none", locks=RemoteLocks)
    finally:
        client.close()


def test_a_fuse_servers_client_refuses_a_daemon_that_names_holders_unasked(
        tmp_path: Path) -> None:
    """A version-2 daemon named every holder; its replies must not reach a guest kernel.
    The peer here answers HELLO as that daemon did (version 2, no "holder_names")."""
    path = str(tmp_path / "v2.sock")
    lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lsock.bind(path)
    lsock.listen(4)
    served: list[int] = []

    def serve() -> None:
        for _ in range(2):
            conn, _ = lsock.accept()
            with conn:
                buf = b""
                while len(buf) < wire.HEADER_SIZE or len(buf) < struct.unpack_from(
                        "<I", buf)[0]:
                    buf += conn.recv(65536)
                _ln, _typ, rid, _h = wire.PEEK.unpack_from(buf)
                served.append(rid)
                conn.sendall(wire.json_reply(rid, {"version": 2, "session": "t",
                                                   "resumed": False}))
                conn.recv(1)  # until the client closes

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        with pytest.raises(DaemonError) as exc:
            LockClient(path, "g", delegation=True, reconnect_timeout=1)
        assert exc.value.errno == errno.EPROTONOSUPPORT
        tool = LockClient(path, "tool", holder_names=True)  # a tool takes the names
        tool.close()
        t.join(10)
        assert len(served) == 2
    finally:
        lsock.close()


# ---------------------------------------------------------------- one LockRequest
class Seen:
    """Records the objects the endpoint and the dispatcher are given (real ones)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.endpoint: list[object] = []
        self.dispatcher: list[object] = []
        for cls in (LocalLocks, RemoteLocks):
            for name in ("handle", "interrupt", "released"):
                monkeypatch.setattr(cls, name, self._wrap(getattr(cls, name), self.endpoint))
        for name in ("handle", "setlk", "interrupt", "release"):
            monkeypatch.setattr(dispatch.LockDispatcher, name,
                                self._wrap(getattr(dispatch.LockDispatcher, name),
                                           self.dispatcher))

    @staticmethod
    def _wrap(fn, into: list):  # noqa: ANN001, ANN205
        def wrapped(self, req, *a, **kw):  # noqa: ANN001, ANN002, ANN003, ANN202
            into.append(req)
            return fn(self, req, *a, **kw)
        return wrapped


def _script(path: SessionPath) -> None:
    """SETLK, GETLK, SETLKW (free: granted), INTERRUPT (unknown), FLUSH, RELEASE; each
    buffer longer than its message (a transport's buffer holds more)."""
    fh = path.fhs[1]
    tail = b"\xee" * 13

    def post(opcode: int, body: bytes, nodeid: int, unique: int) -> None:
        hdr = P.IN_HEADER.pack(P.IN_HEADER.size + len(body), opcode, unique, nodeid, 0, 0,
                               PID, 0, 0)
        out = path.session.handle(hdr + body + tail)
        if out is not None:
            path.sent(out)

    post(P.SETLK, lk_body(fh, 1, F_WRLCK, 0, 9, 0), path.node, 9001)
    post(P.GETLK, lk_body(fh, 2, F_WRLCK, 0, 9, 0), path.node, 9003)
    post(P.SETLKW, lk_body(fh, 1, F_WRLCK, 20, 29, 0), path.node, 9005)
    post(P.INTERRUPT, struct.pack("<Q", 7777), 0, 9007)
    post(P.FLUSH, struct.pack("<QIIQ", fh, 0, 0, 1), path.node, 9009)
    post(P.RELEASE, struct.pack("<QIIQ", fh, os.O_RDWR, 0, 0), path.node, 9011)
    for u in (9001, 9003, 9005, 9007, 9009, 9011):
        path.reply(u)


def test_embedded_one_request(share: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lockd.engine.manager import LockManager

    seen = Seen(monkeypatch)
    path = SessionPath(share, LockManager())
    try:
        _script(path)
    finally:
        path.close()
    assert [r.opcode for r in seen.endpoint] == [P.SETLK, P.GETLK, P.SETLKW, P.INTERRUPT,
                                                 P.FLUSH, P.RELEASE]
    assert all(type(r) is dispatch.LockRequest for r in seen.endpoint)
    # the dispatcher is given the very objects the session made (SETLKW: handle, then
    # its setlk), none made again on the way
    ids = {id(r) for r in seen.endpoint}
    assert seen.dispatcher and all(id(r) in ids for r in seen.dispatcher)


class Forwarded(LockClient):
    """The real daemon client, keeping a copy of each frame it is given to send."""

    def __init__(self, *a, **kw) -> None:  # noqa: ANN002, ANN003
        self.frames: list[bytes] = []
        super().__init__(*a, **kw)

    def submit(self, frame: bytes, rid: int, *a, **kw) -> None:  # noqa: ANN002, ANN003
        self.frames.append(frame)
        super().submit(frame, rid, *a, **kw)


@pytest.mark.parametrize("delegated", [False, True], ids=["central", "delegated"])
def test_central_one_request_with_the_message_as_it_came(
        share: Path, daemon, monkeypatch: pytest.MonkeyPatch, delegated: bool) -> None:
    other = None
    if not delegated:
        other = Raw(daemon.sock, "other")  # the file is shared: the daemon decides
        other.file(str(share / "f"))
    seen = Seen(monkeypatch)
    client = Forwarded(daemon.sock, "g", delegation=True)
    path = SessionPath(share, client)
    sent = []
    real_handle = path.session.handle

    def keep(buf: bytes) -> bytes | None:  # the bytes each message came in
        sent.append(bytes(buf))
        return real_handle(buf)

    path.session.handle = keep  # type: ignore[method-assign]
    try:
        _script(path)
        assert client.delegated(path.node) is delegated
    finally:
        path.close()
        client.close()
        if other is not None:
            other.close()
    messages = {P.IN_HEADER.unpack_from(b)[2]: b[:P.IN_HEADER.unpack_from(b)[0]]
                for b in sent}
    reqs = [r for r in seen.endpoint if r.unique in messages]
    assert [r.opcode for r in reqs] == [P.SETLK, P.GETLK, P.SETLKW, P.INTERRUPT, P.FLUSH,
                                        P.RELEASE]
    # each request keeps its message's bytes, cut to its length, once
    assert all(r.frame == messages[r.unique] for r in reqs)
    ids = {id(r) for r in reqs}
    assert all(id(r) in ids for r in seen.dispatcher if r.unique in messages)
    release = reqs[5].frame
    again = [f for f in client.frames if wire.PEEK.unpack_from(f)[1] == P.RELEASE]
    if delegated:  # decided here, by the dispatcher given the session's objects (the
        # INTERRUPT of a request not in the client's queue is answered EAGAIN before it)
        assert {id(r) for r in seen.dispatcher} == ids - {id(reqs[3])}
        assert again == []  # not the inode's last handle: nothing for the daemon
        return
    # decided there: the very bytes went, but the INTERRUPT's, answered here (EAGAIN)
    for r in reqs[:3] + reqs[4:5]:
        assert r.frame in client.frames, r.opcode
    assert reqs[3].frame not in client.frames
    # RELEASE goes under an id of the server's (the session answered the guest): the
    # same bytes otherwise
    assert len(again) == 1
    assert wire.PEEK.unpack_from(again[0])[2] != reqs[5].unique
    assert again[0][:8] == release[:8] and again[0][16:] == release[16:]
