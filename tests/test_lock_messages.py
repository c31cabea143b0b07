"""One answer per lock message, whatever carries it.

The same script of raw FUSE lock messages (fuse_lk_in, INTERRUPT, FLUSH, RELEASE) goes
through every path a message can take to the lock service, and every path must give
the answer written next to each message - the one the Linux FUSE client and virtiofsd's
protocol expect - byte for byte:

* the session with the embedded manager (what `vfs-lockd mount` runs behind /dev/fuse);
* the session with the central daemon, the file delegated to the guest's server;
* the session with the central daemon deciding (no delegation: another guest has the
  file registered too);
* the virtio-fs back-end (`vfs-lockd virtiofs`, vhost-user, virtqueues), embedded.

Virtio-fs guests never send INTERRUPT (a virtio-fs request cannot be interrupted), so
the INTERRUPT lines run on the session paths only.
"""

from __future__ import annotations

import errno
import os
import struct
import threading
from pathlib import Path

import pytest
from daemonutil import Raw
from fuse_oracle import LK_IN, LK_OUT
from sessionrig import Sent
from test_vhost_user import REQ, Backend, init, lookup, open_file
from vhost_frontend import Frontend

from fuse_server import protocol as P
from fuse_server.locks import LocalLocks, RemoteLocks
from fuse_server.passthrough import Passthrough
from fuse_server.session import Session
from lockd.api import F_RDLCK, F_UNLCK, F_WRLCK, OFFSET_MAX

PID = 4242
W, R, U = F_WRLCK, F_RDLCK, F_UNLCK
FL = P.LK_FLOCK
EAGAIN, EINVAL, EINTR, EDEADLK = errno.EAGAIN, errno.EINVAL, errno.EINTR, errno.EDEADLK

# ("lk", opcode, handle 1..3, owner, type, start, end, flags, unique, answer): answer is
#     an errno, ("conflict", type, start, end) for GETLK, or None: answered later;
# ("answer", unique, errno): the later answer of that request;
# ("interrupt", unique of the target, answer): None = no reply (the target answers EINTR);
# ("sessions only", step): a step the virtio-fs path skips;
# ("flush", handle, owner) and ("release", handle, release flags, lock owner): 0.
SCRIPT = [
    ("lk", P.SETLK, 1, 1, W, 0, 99, 0, 0, 0),
    ("lk", P.GETLK, 2, 2, R, 50, 60, 0, 0, ("conflict", W, 0, 99)),
    ("lk", P.GETLK, 1, 1, W, 0, 99, 0, 0, ("conflict", U, 0, 0)),  # its own lock: none
    ("lk", P.SETLK, 2, 2, R, 50, 60, 0, 0, EAGAIN),
    ("lk", P.SETLK, 2, 2, W, 10, 5, 0, 0, EINVAL),  # start after end
    ("lk", P.SETLK, 2, 2, W, 0, 1 << 63, 0, 0, EINVAL),  # past OFFSET_MAX
    ("lk", P.SETLK, 2, 2, 7, 0, 0, 0, 0, EINVAL),  # no such type
    # GETLK of F_UNLCK: Linux 6.7's F_OFD_GETLK query of the owner's own lock (a classic
    # F_GETLK of F_UNLCK never leaves the guest kernel: EINVAL there)
    ("lk", P.GETLK, 1, 1, U, 50, 60, 0, 0, ("conflict", W, 0, 99)),
    ("lk", P.GETLK, 2, 2, U, 0, 0, 0, 0, ("conflict", U, 0, 0)),
    ("lk", P.GETLK, 2, 2, W, 0, OFFSET_MAX, FL, 0, EINVAL),  # GETLK of a flock
    ("lk", P.SETLKW, 2, 2, R, 50, 60, 0, 5001, None),  # queued behind owner 1
    ("sessions only", ("interrupt", 7777, EAGAIN)),  # unknown: the kernel asks again
    ("lk", P.SETLK, 1, 1, U, 0, OFFSET_MAX, 0, 0, 0),
    ("answer", 5001, 0),  # granted by that unlock
    # INTERRUPT (never sent by virtio-fs guests: a virtio-fs request cannot be interrupted)
    ("sessions only", ("lk", P.SETLKW, 1, 1, W, 55, 55, 0, 5002, None)),  # behind owner 2
    ("sessions only", ("interrupt", 5002, None)),
    ("sessions only", ("answer", 5002, EINTR)),
    ("lk", P.SETLK, 1, 1, W, 200, 200, 0, 0, 0),
    ("lk", P.SETLK, 2, 2, W, 300, 300, 0, 0, 0),
    ("lk", P.SETLKW, 1, 1, W, 300, 300, 0, 5003, None),  # 1 waits for 2
    ("lk", P.SETLKW, 2, 2, W, 200, 200, 0, 0, EDEADLK),  # 2 would wait for 1
    ("lk", P.SETLK, 2, 2, U, 300, 300, 0, 0, 0),
    ("answer", 5003, 0),
    ("lk", P.SETLK, 2, 9, W, 0, OFFSET_MAX, FL, 0, 0),  # flock on handle 2
    ("lk", P.SETLK, 3, 9, R, 0, OFFSET_MAX, FL, 0, EAGAIN),  # another handle: conflict
    ("lk", P.SETLK, 2, 9, R, 0, OFFSET_MAX, FL, 0, 0),  # converted to shared
    ("lk", P.SETLK, 3, 9, R, 0, OFFSET_MAX, FL, 0, 0),
    ("lk", P.SETLKW, 3, 9, W, 0, OFFSET_MAX, FL, 5004, None),  # waits for handle 2
    ("flush", 2, 2),  # owner 2's POSIX locks go; the flock stays
    ("lk", P.GETLK, 3, 5, W, 50, 60, 0, 0, ("conflict", U, 0, 0)),
    ("release", 2, P.RELEASE_FLOCK_UNLOCK, 9),  # handle 2's flock goes with it
    ("answer", 5004, 0),
    ("lk", P.GETLK, 3, 5, W, 0, OFFSET_MAX, 0, 0, ("conflict", W, 200, 200)),
    ("flush", 1, 1),
    ("lk", P.GETLK, 3, 5, W, 0, OFFSET_MAX, 0, 0, ("conflict", U, 0, 0)),
    ("release", 3, P.RELEASE_FLOCK_UNLOCK, 9),
    ("release", 1, 0, 0),
]


def lk_body(fh: int, owner: int, type_: int, start: int, end: int, flags: int) -> bytes:
    return LK_IN.pack(fh, owner, start, end, type_, PID, flags)


class SessionPath:
    """A Session fed buffers directly: its replies come back from handle() or, when
    deferred, through its send callback (the invalidator, the lock service's threads)."""

    interrupts = True  # plays the "sessions only" steps

    def __init__(self, root: Path, service: object, cache: str = "none",
                 sent: Sent | None = None, locks: type | None = None) -> None:
        from lockd.daemon.client import LockClient

        self.sent = Sent() if sent is None else sent
        if locks is None:  # the endpoint the service's maker would pass
            locks = RemoteLocks if isinstance(service, LockClient) else LocalLocks
        self.session = Session(Passthrough(str(root)), service, "g", self.sent, cache,
                               locks=locks)
        self.replies: dict[int, bytes] = {}
        self.cv = threading.Condition()
        self.unique = 10
        self._call(P.INIT, P.INIT_IN.pack(7, 38, 65536, 0xFFFFFFFF) + bytes(48))
        ent = self._call(P.LOOKUP, b"f\0")
        self.node = P.ENTRY_OUT.unpack_from(ent, 16)[0]
        self.fhs = [0] + [P.OPEN_OUT.unpack_from(self._call(P.OPEN, P.OPEN_IN.pack(
            os.O_RDWR, 0), self.node), 16)[0] for _ in range(3)]

    def _call(self, opcode: int, body: bytes, nodeid: int = 1) -> bytes:
        self.unique += 2
        self.post(opcode, body, nodeid, self.unique)
        return self.reply(self.unique)

    def post(self, opcode: int, body: bytes, nodeid: int, unique: int) -> None:
        hdr = P.IN_HEADER.pack(P.IN_HEADER.size + len(body), opcode, unique, nodeid, 0, 0,
                               PID, 0, 0)
        out = self.session.handle(hdr + body)
        if out is not None:
            self.sent(out)

    def reply(self, unique: int, timeout: float = 10.0) -> bytes:
        return self.sent.reply_to(unique, timeout)

    def replied(self, unique: int) -> bool:
        return any(P.OUT_HEADER.unpack_from(b)[2] == unique for b in self.sent.items)

    def close(self) -> None:
        self.session.end()


class VirtioPath:
    """The virtio-fs back-end over vhost-user: requests on a virtqueue."""

    interrupts = False

    def __init__(self, backend: Backend) -> None:
        self.fe = Frontend(str(backend.sock))
        self.q = self.fe.queue(REQ)
        self.heads: dict[int, int] = {}
        init(self.fe)
        self.node = lookup(self.fe, b"f")
        self.fhs = [0] + [open_file(self.fe, self.node) for _ in range(3)]

    def post(self, opcode: int, body: bytes, nodeid: int, unique: int) -> None:
        self.heads[unique] = self.fe.fuse_post(REQ, opcode, body, nodeid, unique=unique)

    def reply(self, unique: int, timeout: float = 10.0) -> bytes:
        r = self.q.wait(self.heads[unique], timeout)
        return r.data[:r.used_len]

    def replied(self, unique: int) -> bool:
        return self.q.is_done(self.heads[unique])

    def close(self) -> None:
        self.fe.close()


def run_script(path: SessionPath | VirtioPath, after_first=None) -> list:  # noqa: ANN001
    """Play SCRIPT; the transcript of what was answered (errno, GETLK's conflict).
    `after_first()` runs once the first lock is held."""
    got: list = []
    unique = 1000
    for i, step in enumerate(SCRIPT):
        if i == 1 and after_first is not None:
            after_first()
        if step[0] == "sessions only":
            if not path.interrupts:
                got.append(answer_of(step[1]))
                continue
            step = step[1]
        kind = step[0]
        if kind == "lk":
            _, op, h, owner, type_, start, end, flags, u, want = step
            if not u:
                unique += 2
                u = unique
            path.post(op, lk_body(path.fhs[h], owner, type_, start, end, flags), path.node, u)
            if want is None:
                got.append(("queued", u))
                continue
            got.append(decode(path.reply(u), op))
        elif kind == "answer":
            got.append(decode(path.reply(step[1]), P.SETLKW))
        elif kind == "interrupt":
            unique += 2
            path.post(P.INTERRUPT, struct.pack("<Q", step[1]), 0, unique)
            if step[2] is None:
                got.append(None if not path.replied(unique) else "replied")
            else:
                got.append(decode(path.reply(unique), P.INTERRUPT))
        elif kind == "flush":
            unique += 2
            path.post(P.FLUSH, struct.pack("<QIIQ", path.fhs[step[1]], 0, 0, step[2]),
                      path.node, unique)
            got.append(decode(path.reply(unique), P.FLUSH))
        elif kind == "release":
            unique += 2
            path.post(P.RELEASE, struct.pack("<QIIQ", path.fhs[step[1]], os.O_RDWR, step[2],
                                              step[3]), path.node, unique)
            got.append(decode(path.reply(unique), P.RELEASE))
    return got


def decode(reply: bytes, opcode: int) -> object:
    length, err, _unique = P.OUT_HEADER.unpack_from(reply)
    assert length == len(reply), (length, len(reply))
    if err or opcode != P.GETLK:
        assert err or length == 16, reply
        return -err
    start, end, type_, pid = LK_OUT.unpack_from(reply, 16)
    # the holder's pid where there is a holder (PID: every request here carries it)
    assert pid == (PID if type_ != U else 0) or type_ == U, (type_, pid)
    return ("conflict", type_, start, end)


def answer_of(step: tuple) -> object:
    if step[0] == "sessions only":
        return answer_of(step[1])
    if step[0] == "lk":
        return ("queued", step[8]) if step[9] is None else step[9]
    if step[0] in ("answer", "interrupt"):
        return step[2]
    return 0


def expected() -> list:
    return [answer_of(step) for step in SCRIPT]


@pytest.fixture
def share(tmp_path: Path) -> Path:
    d = tmp_path / "share"
    d.mkdir()
    (d / "f").write_bytes(b"x" * 4096)
    return d


def test_embedded_session(share: Path) -> None:
    from lockd.engine.manager import LockManager

    path = SessionPath(share, LockManager())
    try:
        assert run_script(path) == expected()
    finally:
        path.close()


@pytest.mark.parametrize("delegated", [True, False], ids=["delegated", "central"])
def test_session_with_the_daemon(share: Path, daemon, delegated: bool) -> None:
    from lockd.daemon.client import LockClient

    other = None
    if not delegated:
        # Another guest has the file registered: the daemon decides every request.
        other = Raw(daemon.sock, "other")
        other.file(str(share / "f"))
    client = LockClient(daemon.sock, "g", delegation=True)
    path = SessionPath(share, client)
    try:
        seen: dict = {}
        got = run_script(path, lambda: seen.update(delegated=client._files[path.node].delegated))
        assert got == expected()
        # the daemon granted the delegation, or did not, as meant (a delegated file goes
        # back to the daemon at its first wait: that half of the script runs centrally)
        assert seen["delegated"] is delegated
    finally:
        path.close()
        client.close()
        if other is not None:
            other.close()


def test_virtiofs_backend(share: Path, tmp_path: Path) -> None:
    b = Backend(tmp_path, share, 0, ["--cache", "none"])
    path = None
    try:
        path = VirtioPath(b)
        assert run_script(path) == expected()
    finally:
        if path is not None:
            path.close()
        b.stop()


def test_the_answers_are_the_kernels(share: Path) -> None:
    """The script's answers are what Linux gives for the same calls on a local file
    (F_OFD_* on descriptions standing for the owners): the table itself is right."""
    import fcntl

    from lockd.engine import ofd

    fds = {o: os.open(share / "f", os.O_RDWR) for o in (1, 2)}
    try:
        assert ofd.setlk(fds[1], W, 0, 99) == 0
        assert ofd.getlk(fds[2], R, 50, 60)[:3] == (W, 0, 99)
        assert ofd.getlk(fds[1], W, 0, 99)[0] == U  # its own lock is no conflict
        assert ofd.setlk(fds[2], R, 50, 60) == EAGAIN
        assert ofd.setlk(fds[2], W, 10, 5) == EINVAL
        assert ofd.setlk(fds[2], 7, 0, 0) == EINVAL
        assert ofd.getlk(fds[1], U, 50, 60)[:3] == (W, 0, 99)  # F_OFD_GETLK of F_UNLCK
        assert ofd.getlk(fds[2], U, 0, 0)[0] == U
        with pytest.raises(OSError) as exc:  # flock has no GETLK: fcntl's EINVAL
            fcntl.fcntl(fds[2], fcntl.F_GETLK, struct.pack("hhqqi4x", 3, 0, 0, 0, 0))
        assert exc.value.errno == EINVAL
    finally:
        for fd in fds.values():
            os.close(fd)


@pytest.mark.fuse
@pytest.mark.parametrize("mode", ["embedded", "lockd"])
def test_ofd_getlk_of_unlck_through_a_mount(mounts, daemon, mode: str) -> None:
    """The guest kernel passes F_OFD_GETLK of F_UNLCK on as a GETLK: through a real mount
    it answers as on the host file system (the description's own lock)."""
    from lockd.engine import ofd

    source, (m,) = mounts(1, ["--lockd", daemon.sock] if mode == "lockd" else [])
    (source / "f").write_bytes(b"x" * 100)
    answers = []
    for where in (source / "f", m.path / "f"):
        a, b = os.open(where, os.O_RDWR), os.open(where, os.O_RDWR)
        try:
            assert ofd.setlk(a, W, 0, 99) == 0
            answers.append((ofd.getlk(a, U, 50, 60)[:3], ofd.getlk(b, U, 50, 60)[:3],
                            ofd.getlk(b, W, 50, 60)[:3]))
        finally:
            os.close(a)
            os.close(b)
    assert answers[0] == ((W, 0, 99), (U, 0, 0), (W, 0, 99)), answers
    assert answers[1] == answers[0]
