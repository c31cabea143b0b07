"""A lock message's file handle must be a handle of the inode the message names
(issue 23 item 8; the rule is lockd.dispatch.handle_fd).

The guest kernel sends fh and nodeid from one open file; a hostile guest may pair its
handle of file g with the nodeid of file f. Before the rule, SETLK registered f's nodeid
with g's descriptor: the lock "on f" was taken on g's host inode (a host process could
no longer lock g, and f was not locked at all), FLUSH and GETLK were answered as if the
pair were fine, and RELEASE closed g's handle while naming f. Each path a lock message
can take is driven with raw FUSE messages (tests/test_lock_messages.py's paths).
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
from pathlib import Path

import pytest
from daemonutil import Raw
from test_lock_messages import LK_IN, PID, SessionPath, VirtioPath, decode
from test_vhost_user import Backend, lookup, open_file

from fuse_server import protocol as P
from lockd.api import F_WRLCK, OFFSET_MAX

EINVAL = errno.EINVAL


def lk_body(fh: int, owner: int, type_: int = F_WRLCK, flags: int = 0) -> bytes:
    return LK_IN.pack(fh, owner, 0, OFFSET_MAX, type_, PID, flags)


def host_can_lock(path: Path) -> bool:
    """Can a host process take a write OFD lock on the whole file now?"""
    fd = os.open(path, os.O_RDWR)
    try:
        try:
            fcntl.fcntl(fd, 37, struct.pack("hhqqi4x", fcntl.F_WRLCK, 0, 0, 0, 0))  # F_OFD_SETLK
        except OSError as exc:
            assert exc.errno in (errno.EAGAIN, errno.EACCES)
            return False
        return True
    finally:
        os.close(fd)


class Files:
    """Nodeids and handles of f and g on one path."""

    def __init__(self, path: SessionPath | VirtioPath) -> None:
        self.path = path
        self.unique = 5000
        if isinstance(path, SessionPath):
            self.f = path.node
            self.g = P.ENTRY_OUT.unpack_from(path._call(P.LOOKUP, b"g\0"), 16)[0]
            self.gfh = P.OPEN_OUT.unpack_from(
                path._call(P.OPEN, P.OPEN_IN.pack(os.O_RDWR, 0), self.g), 16)[0]
        else:
            self.f = path.node
            self.g = lookup(path.fe, b"g")
            self.gfh = open_file(path.fe, self.g)
        self.ffh = path.fhs[1]

    def ask(self, opcode: int, body: bytes, nodeid: int) -> object:
        self.unique += 2
        self.path.post(opcode, body, nodeid, self.unique)
        return decode(self.path.reply(self.unique), opcode)


def play(files: Files, share: Path) -> None:
    f, g, ffh, gfh = files.f, files.g, files.ffh, files.gfh
    ask = files.ask
    # g's handle with f's nodeid: refused, whatever the opcode, and nothing is taken
    assert ask(P.SETLK, lk_body(gfh, 1), f) == EINVAL
    assert host_can_lock(share / "g") and host_can_lock(share / "f")
    assert ask(P.SETLK, lk_body(gfh, 2, flags=P.LK_FLOCK), f) == EINVAL  # flock too
    assert ask(P.SETLKW, lk_body(gfh, 1), f) == EINVAL
    assert host_can_lock(share / "g")
    assert ask(P.GETLK, lk_body(gfh, 1), f) == EINVAL
    assert ask(P.FLUSH, struct.pack("<QIIQ", gfh, 0, 0, 1), f) == EINVAL
    # f's handle with g's nodeid, once f is locked properly: refused as well
    assert ask(P.SETLK, lk_body(ffh, 1), f) == 0
    assert not host_can_lock(share / "f")
    assert ask(P.SETLK, lk_body(ffh, 3), g) == EINVAL
    assert host_can_lock(share / "g")
    # RELEASE of g's handle naming f: refused, and the handle stays open
    assert ask(P.RELEASE, struct.pack("<QIIQ", gfh, os.O_RDWR, 0, 0), f) == EINVAL
    assert ask(P.SETLK, lk_body(gfh, 4), g) == 0  # the right pair still works
    assert not host_can_lock(share / "g")
    assert ask(P.FLUSH, struct.pack("<QIIQ", gfh, 0, 0, 4), g) == 0
    assert host_can_lock(share / "g")
    assert ask(P.FLUSH, struct.pack("<QIIQ", ffh, 0, 0, 1), f) == 0
    assert host_can_lock(share / "f")


@pytest.fixture
def share(tmp_path: Path) -> Path:
    d = tmp_path / "share"
    d.mkdir()
    (d / "f").write_bytes(b"x" * 4096)
    (d / "g").write_bytes(b"y" * 4096)
    return d


def test_embedded_session(share: Path) -> None:
    from lockd.engine.manager import LockManager

    path = SessionPath(share, LockManager())
    try:
        play(Files(path), share)
    finally:
        path.close()


@pytest.mark.parametrize("delegated", [True, False], ids=["delegated", "central"])
def test_session_with_the_daemon(share: Path, daemon, delegated: bool) -> None:
    from lockd.daemon.client import LockClient

    others = []
    if not delegated:
        # Another guest has both files registered: the daemon decides every request.
        other = Raw(daemon.sock, "other")
        others.append(other)
        other.file(str(share / "f"))
        other.file(str(share / "g"))
    client = LockClient(daemon.sock, "g", delegation=True)
    path = SessionPath(share, client)
    try:
        play(Files(path), share)
    finally:
        path.close()
        client.close()
        for o in others:
            o.close()


def test_virtiofs_backend(share: Path, tmp_path: Path) -> None:
    b = Backend(tmp_path, share, 0, ["--cache", "none"])
    path = None
    try:
        path = VirtioPath(b)
        play(Files(path), share)
    finally:
        if path is not None:
            path.close()
        b.stop()
