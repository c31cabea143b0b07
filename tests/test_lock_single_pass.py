"""A lock message is checked once on its way (issue 24 item 4).

The rule that a lock message's file handle must be one of the inode it names
(lockd.dispatch.handle_fd, EINVAL otherwise) is asked once per message, whatever the path:
by the dispatcher in embedded mode, by the guest's server in central mode (the daemon does
not know the guest's handles), and not again by the dispatcher deciding a delegated file.
It used to be asked two or three times per message (session, RemoteLocks, dispatcher),
which is how the paths' answers drifted apart before. The answers themselves are
test_lock_messages.py's and test_lock_handles.py's; here, how often the server's handle
table is asked: once per GETLK, SETLK, SETLKW and FLUSH, never for INTERRUPT and RELEASE.

What the guest's server still answers itself in central mode is what the daemon cannot:
an INTERRUPT of a request that is not (yet) in the client's queue gets EAGAIN at once,
and one of a request never sent (the daemon away) withdraws it, EINTR. Forwarded while
the daemon is away, such an INTERRUPT would wait for it, and so would its target.
"""

from __future__ import annotations

import os
import struct
import threading
from pathlib import Path

import pytest
import test_lock_messages as tlm
from daemonutil import Raw, admin
from procutil import wait_until
from sessionrig import Sent
from test_lock_messages import SessionPath, lk_body

from fuse_server import protocol as P
from fuse_server.passthrough import Passthrough
from lockd.api import F_UNLCK, F_WRLCK, OFFSET_MAX
from lockd.daemon import wire


class Counting(Passthrough):
    """The real host directory, counting the lookups of a handle's descriptor."""

    asked = 0

    def fd_of(self, fh: int, nodeid: int | None = None) -> int | None:
        self.asked += 1
        return super().fd_of(fh, nodeid)


def lookups_per_message(path: SessionPath) -> list[tuple[str, int]]:
    """Each message of a short script with the number of handle lookups it cost."""
    fs = path.session.fs
    assert isinstance(fs, Counting)
    out = []
    unique = 3000

    def send(name: str, opcode: int, body: bytes, nodeid: int, want: int | None) -> None:
        nonlocal unique
        unique += 2
        before = fs.asked
        path.post(opcode, body, nodeid, unique)
        if want is not None:
            _, err, _ = P.OUT_HEADER.unpack_from(path.reply(unique))
            assert -err == want, (name, -err)
        out.append((name, fs.asked - before))

    fh1, fh2 = path.fhs[1], path.fhs[2]
    send("first SETLK", P.SETLK, lk_body(fh1, 1, F_WRLCK, 0, 9, 0), path.node, 0)
    send("SETLK", P.SETLK, lk_body(fh1, 1, F_WRLCK, 20, 29, 0), path.node, 0)
    send("GETLK", P.GETLK, lk_body(fh2, 2, F_WRLCK, 0, 9, 0), path.node, 0)
    send("SETLKW", P.SETLKW, lk_body(fh2, 2, F_WRLCK, 50, 59, 0), path.node, 0)
    send("flock", P.SETLK, lk_body(fh2, 9, F_WRLCK, 0, OFFSET_MAX, P.LK_FLOCK), path.node, 0)
    send("INTERRUPT", P.INTERRUPT, struct.pack("<Q", 7777), 0, 11)  # EAGAIN: unknown
    send("unlock", P.SETLK, lk_body(fh1, 1, F_UNLCK, 0, OFFSET_MAX, 0), path.node, 0)
    send("FLUSH", P.FLUSH, struct.pack("<QIIQ", fh2, 0, 0, 2), path.node, 0)
    send("RELEASE", P.RELEASE, struct.pack("<QIIQ", fh2, os.O_RDWR, P.RELEASE_FLOCK_UNLOCK, 9),
         path.node, 0)
    return out


EXPECTED = [("first SETLK", 1), ("SETLK", 1), ("GETLK", 1), ("SETLKW", 1), ("flock", 1),
            ("INTERRUPT", 0), ("unlock", 1), ("FLUSH", 1), ("RELEASE", 0)]


@pytest.fixture
def share(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    d = tmp_path / "share"
    d.mkdir()
    (d / "f").write_bytes(b"x" * 4096)
    monkeypatch.setattr(tlm, "Passthrough", Counting)  # the sessions SessionPath builds
    return d


def test_embedded(share: Path) -> None:
    from lockd.engine.manager import LockManager

    path = SessionPath(share, LockManager())
    try:
        assert lookups_per_message(path) == EXPECTED
    finally:
        path.close()


@pytest.mark.parametrize("delegated", [True, False], ids=["delegated", "central"])
def test_with_the_daemon(share: Path, daemon, delegated: bool) -> None:
    from lockd.daemon.client import LockClient

    other = None
    if not delegated:
        other = Raw(daemon.sock, "other")  # the file is shared: the daemon decides
        other.file(str(share / "f"))
    client = LockClient(daemon.sock, "g", delegation=True)
    path = SessionPath(share, client)
    try:
        got = lookups_per_message(path)
        assert client._files[path.node].delegated is delegated
        assert got == EXPECTED
    finally:
        path.close()
        client.close()
        if other is not None:
            other.close()


def test_interrupts_answered_by_the_server_while_the_daemon_is_away(share: Path,
                                                                   daemon) -> None:
    from lockd.daemon.client import LockClient

    other = Raw(daemon.sock, "other")  # the file is shared: its requests go to the daemon
    other.file(str(share / "f"))
    client = LockClient(daemon.sock, "g", delegation=True)
    path = SessionPath(share, client)
    try:
        fh = path.fhs[1]
        path.post(P.SETLK, lk_body(fh, 1, F_WRLCK, 0, 9, 0), path.node, 4000)  # registers
        assert P.OUT_HEADER.unpack_from(path.reply(4000))[1] == 0
        other.close()
        daemon.stop()
        assert wait_until(lambda: client._sock is None, 10), "the client saw no disconnect"
        # Not in the client's queue: EAGAIN, answered by handle() itself.
        path.post(P.INTERRUPT, struct.pack("<Q", 7777), 0, 4003)
        assert path.replied(4003)
        assert P.OUT_HEADER.unpack_from(path.reply(4003))[1] == -11
        # A wait that could not be sent: withdrawn, EINTR; its INTERRUPT gets no reply.
        path.post(P.SETLKW, lk_body(fh, 1, F_WRLCK, 20, 29, 0), path.node, 4004)
        assert not path.replied(4004)
        path.post(P.INTERRUPT, struct.pack("<Q", 4004), 0, 4005)
        assert path.replied(4004) and not path.replied(4005)
        assert P.OUT_HEADER.unpack_from(path.reply(4004))[1] == -4
    finally:
        path.close()
        client.close()


class Gated(Sent):
    """A session's own sends, with every notification held at a gate until `opened`
    is set: a grant queued behind its notifications (cache auto, fuse_server/
    invalidate.py) stays undelivered, however slow the machine, until the test says."""

    def __init__(self) -> None:
        super().__init__()
        self.blocked = threading.Event()  # a notification waits at the gate
        self.opened = threading.Event()

    def __call__(self, data: bytes) -> None:
        if P.OUT_HEADER.unpack_from(data)[2] == 0:  # unique 0: a notification
            self.blocked.set()
            self.opened.wait()
        super().__call__(data)


@pytest.mark.parametrize("mode", ["embedded", "central"])
def test_interrupt_of_a_grant_held_back_by_the_session_gets_no_reply(
        share: Path, request: pytest.FixtureRequest, mode: str) -> None:
    """The session's fact goes into the one INTERRUPT rule (lockd.dispatch.
    interrupt_reply): a granted SETLKW whose reply waits behind the guest's cache
    notifications is on its way, so its INTERRUPT gets no reply, in both modes. By the
    other facts alone it would get EAGAIN (no wait is left to cancel), and the guest
    kernel, which reads interrupts before anything else, would resend it at once."""
    from lockd.daemon.client import LockClient
    from lockd.engine.manager import LockManager

    other = None
    if mode == "central":
        sock = request.getfixturevalue("daemon").sock
        other = Raw(sock, "other")  # the file is shared: the daemon decides
        other.file(str(share / "f"))
        service = LockClient(sock, "g", delegation=True)
    else:
        service = LockManager()
    sent = Gated()
    path = SessionPath(share, service, cache="auto", sent=sent)  # notifications on
    try:
        fh = path.fhs[1]
        path.post(P.SETLKW, lk_body(fh, 1, F_WRLCK, 0, 9, 0), path.node, 6001)  # granted
        assert sent.blocked.wait(10), "the grant was not queued behind a notification"
        path.post(P.INTERRUPT, struct.pack("<Q", 6001), 0, 6003)
        assert not path.replied(6003)  # answered at once if at all: handle() returned
        sent.opened.set()
        assert P.OUT_HEADER.unpack_from(path.reply(6001))[1] == 0
        assert not path.replied(6003)
    finally:
        sent.opened.set()
        path.close()
        if other is not None:
            service.close()
            other.close()


def test_the_session_serves_locks_through_the_endpoint_its_maker_passes(share: Path,
                                                                        daemon) -> None:
    """The endpoint is passed into the session (item 4), not guessed by probing the
    service's `forwards` through whatever wraps it: a daemon client behind a wrapper that
    does not pass `forwards` on is still served by RemoteLocks, its lock messages
    forwarded to the daemon as they came. And LocalLocks refuses a daemon client rather
    than serve it as if the lock service lived in this process."""
    from fuse_server.locks import LocalLocks, RemoteLocks
    from fuse_server.session import Session
    from lockd.daemon.client import LockClient

    class Opaque:
        """Everything of the client but what it is (as a proxy may forget to say)."""

        def __init__(self, client: LockClient) -> None:
            object.__setattr__(self, "_c", client)

        def __getattr__(self, name: str):  # noqa: ANN204
            if name == "forwards":
                raise AttributeError(name)
            return getattr(self._c, name)

        def __setattr__(self, name: str, value: object) -> None:
            setattr(self._c, name, value)

    other = Raw(daemon.sock, "other")  # the file is shared: the daemon decides
    other.file(str(share / "f"))
    client = LockClient(daemon.sock, "g", delegation=True)
    with pytest.raises(TypeError, match="RemoteLocks"):
        Session(Passthrough(str(share)), client, "g", Sent(), "none", locks=LocalLocks)
    path = SessionPath(share, Opaque(client), locks=RemoteLocks)
    try:
        assert isinstance(path.session.locks, RemoteLocks)
        path.post(P.SETLK, lk_body(path.fhs[1], 1, F_WRLCK, 0, 9, 0), path.node, 7001)
        assert P.OUT_HEADER.unpack_from(path.reply(7001))[1] == 0
        held = [(r["start"], r["end"]) for r in admin(daemon, wire.T_LIST)["locks"]
                if r["guest"] == "g"]
        assert held == [(0, 9)]  # the daemon decided it: the message was forwarded
    finally:
        path.close()
        client.close()
        other.close()
