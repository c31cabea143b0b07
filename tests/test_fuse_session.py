"""The transport-independent Session fed crafted buffers: INIT negotiation, malformed and
hostile requests (errno replies, never a crash), containment in SOURCE, and the lock
opcodes against the real LockManager (deferred SETLKW replies, INTERRUPT)."""

from __future__ import annotations

import errno
import os
import struct
import threading
import time
from pathlib import Path

import pytest
from fuse_oracle import LK_IN
from sessionrig import Sent

from fuse_server import protocol as P
from fuse_server.passthrough import Passthrough
from fuse_server.session import Session
from lockd.api import F_RDLCK, F_UNLCK, F_WRLCK, OFFSET_MAX
from lockd.engine.manager import LockManager


class Rig:
    def __init__(self, root: Path, cache: str = "auto") -> None:
        self.sent = Sent()
        self.manager = LockManager()
        self.session = Session(Passthrough(str(root)), self.manager, "g", self.sent, cache)
        self.unique = 100

    def req(self, opcode: int, body: bytes = b"", nodeid: int = 1, unique: int | None = None) -> bytes | None:
        if unique is None:
            self.unique += 2
            unique = self.unique
        hdr = P.IN_HEADER.pack(P.IN_HEADER.size + len(body), opcode, unique, nodeid, 0, 0, 4242, 0, 0)
        return self.session.handle(hdr + body)

    def init(self, minor: int = 45, flags: int = 0xFFFFFFFF) -> bytes:
        body = P.INIT_IN.pack(7, minor, 65536, flags) + (bytes(48) if minor >= 36 else b"")
        return self.req(P.INIT, body)


def err(reply: bytes | None) -> int:
    assert reply is not None and len(reply) >= 16
    length, error, _ = P.OUT_HEADER.unpack_from(reply)
    assert length == len(reply)
    return -error


def payload(reply: bytes) -> bytes:
    assert err(reply) == 0, os.strerror(err(reply))
    return reply[16:]


@pytest.fixture
def rig(tmp_path: Path) -> Rig:
    root = tmp_path / "root"
    root.mkdir()
    (root / "f").write_bytes(b"data")
    r = Rig(root)
    payload(r.init())
    return r


@pytest.mark.parametrize("minor", [31, 33, 36, 38, 45])
def test_init_versions(tmp_path: Path, minor: int) -> None:
    r = Rig(tmp_path)
    out = payload(r.init(minor, flags=P.POSIX_LOCKS | P.FLOCK_LOCKS | P.ASYNC_READ | P.INIT_EXT))
    assert len(out) == P.INIT_OUT.size
    major, got_minor, _, flags, *_ = P.INIT_OUT.unpack(out)
    assert (major, got_minor) == (7, min(minor, 38))
    assert flags & P.POSIX_LOCKS and flags & P.FLOCK_LOCKS
    assert not flags & P.WRITEBACK_CACHE  # never offered by us: writes must go through
    assert bool(flags & P.INIT_EXT) == (minor >= 36)


def test_init_too_old_and_before_init(tmp_path: Path) -> None:
    r = Rig(tmp_path)
    assert err(r.req(P.GETATTR, bytes(16))) == errno.EIO  # nothing before INIT
    assert err(r.init(30)) == errno.EPROTO
    assert err(r.req(P.INIT, b"\x07\x00")) == errno.EINVAL  # short INIT body


def test_malformed_messages(rig: Rig) -> None:
    s = rig.session
    assert s.handle(b"") is None  # no header: nothing to answer
    assert s.handle(b"\x00" * 39) is None
    # header len beyond the buffer / below the header size
    hdr = P.IN_HEADER.pack(400, P.GETATTR, 7, 1, 0, 0, 0, 0, 0)
    assert P.OUT_HEADER.unpack_from(s.handle(hdr)) == (16, -errno.EINVAL, 7)
    hdr = P.IN_HEADER.pack(12, P.GETATTR, 9, 1, 0, 0, 0, 0, 0)
    assert err(s.handle(hdr)) == errno.EINVAL
    assert err(rig.req(9999)) == errno.ENOSYS
    assert err(rig.req(P.IOCTL, bytes(32))) == errno.ENOSYS
    assert err(rig.req(P.LOOKUP, b"noterminator")) == errno.EINVAL
    assert err(rig.req(P.SETATTR, bytes(10))) == errno.EINVAL
    assert err(rig.req(P.WRITE, P.WRITE_IN.pack(1, 0, 100, 0, 0, 0, 0) + b"short")) == errno.EINVAL
    assert err(rig.req(P.GETLK, bytes(20))) == errno.EINVAL
    assert err(rig.req(P.SETLK, bytes(47))) == errno.EINVAL
    assert err(rig.req(P.INTERRUPT, bytes(4))) == errno.EINVAL
    assert err(rig.req(P.RELEASE, bytes(8))) == errno.EINVAL
    assert err(rig.req(P.GETATTR, bytes(16), nodeid=987654)) == errno.ESTALE
    assert err(rig.req(P.READ, P.READ_IN.pack(555, 0, 10, 0, 0, 0, 0))) == errno.EBADF
    assert rig.req(P.FORGET, b"\x01", nodeid=12345) is None  # never answered
    assert rig.req(P.BATCH_FORGET, P.BATCH_FORGET_IN.pack(1000, 0)) is None
    count = P.BATCH_FORGET_IN.pack(2, 0) + P.FORGET_ONE.pack(5, 1)
    assert rig.req(P.BATCH_FORGET, count) is None
    # still serving
    assert len(payload(rig.req(P.GETATTR, bytes(16)))) == P.ATTR_OUT.size + P.ATTR.size


def lookup(rig: Rig, name: bytes, parent: int = 1) -> int:
    out = payload(rig.req(P.LOOKUP, name + b"\0", nodeid=parent))
    return P.ENTRY_OUT.unpack_from(out)[0]


def test_containment(rig: Rig, tmp_path: Path) -> None:
    root = tmp_path / "root"
    (tmp_path / "outside").write_text("secret")
    os.symlink("../outside", root / "rel")
    os.symlink(str(tmp_path), root / "dirlink")
    assert lookup(rig, b"..") == 1  # the root is its own parent
    assert lookup(rig, b".") == 1
    assert err(rig.req(P.LOOKUP, b"../outside\0")) == errno.EINVAL
    assert err(rig.req(P.LOOKUP, b"a/b\0")) == errno.EINVAL
    assert err(rig.req(P.LOOKUP, b"\0")) == errno.EINVAL
    link = lookup(rig, b"rel")
    assert payload(rig.req(P.READLINK, nodeid=link)) == b"../outside"
    assert err(rig.req(P.OPEN, P.OPEN_IN.pack(os.O_RDONLY, 0), nodeid=link)) == errno.ELOOP
    # a symlink to a directory is not a directory to look names up in
    d = lookup(rig, b"dirlink")
    assert err(rig.req(P.LOOKUP, b"outside\0", nodeid=d)) == errno.ENOTDIR
    # creating or removing '..' / '.' is refused
    assert err(rig.req(P.MKDIR, P.MKDIR_IN.pack(0o755, 0) + b"..\0")) == errno.EINVAL
    assert err(rig.req(P.UNLINK, b"..\0")) == errno.EINVAL
    ren = P.RENAME_IN.pack(1) + b"..\0x\0"
    assert err(rig.req(P.RENAME, ren)) == errno.EINVAL
    assert (tmp_path / "outside").read_text() == "secret"


def open_file(rig: Rig, name: bytes = b"f") -> tuple[int, int]:
    node = lookup(rig, name)
    fh = P.OPEN_OUT.unpack(payload(rig.req(P.OPEN, P.OPEN_IN.pack(os.O_RDWR, 0), nodeid=node)))[0]
    return node, fh


def lk(rig: Rig, op: int, node: int, fh: int, owner: int, type_: int, start: int = 0,
       end: int = OFFSET_MAX, flags: int = 0, unique: int | None = None) -> bytes | None:
    """A lock request's reply; a grant in cache mode auto comes from the invalidator
    thread (after its notification), so a SETLK's reply is waited for there."""
    if unique is None:
        rig.unique += 2
        unique = rig.unique
    reply = rig.req(op, LK_IN.pack(fh, owner, start, end, type_, 4242, flags), nodeid=node,
                    unique=unique)
    if reply is None and op == P.SETLK:
        return rig.sent.reply_to(unique)
    return reply


def test_lock_arguments(rig: Rig) -> None:
    node, fh = open_file(rig)
    assert err(lk(rig, P.SETLK, node, fh, 1, F_WRLCK, 10, 5)) == errno.EINVAL  # start > end
    assert err(lk(rig, P.SETLK, node, fh, 1, F_WRLCK, 0, 1 << 63)) == errno.EINVAL  # > OFFSET_MAX
    assert err(lk(rig, P.SETLK, node, fh, 1, F_WRLCK, 0, (1 << 64) - 1)) == errno.EINVAL
    assert err(lk(rig, P.SETLK, node, fh, 1, 7)) == errno.EINVAL  # no such type
    assert err(lk(rig, P.GETLK, node, fh, 1, 7)) == errno.EINVAL
    assert err(lk(rig, P.SETLK, node, 999, 1, F_WRLCK)) == errno.EINVAL  # never opened
    assert err(lk(rig, P.SETLK, node, fh, 1, F_WRLCK)) == 0


def test_locks_and_deferred_replies(rig: Rig) -> None:
    node, fh = open_file(rig)
    _, fh2 = open_file(rig)
    assert err(lk(rig, P.SETLK, node, fh, 1, F_WRLCK, 0, 99)) == 0
    # GETLK shows the holder
    out = payload(lk(rig, P.GETLK, node, fh2, 2, F_RDLCK, 50, 60))
    start, end, type_, pid = struct.unpack("<QQII", out)
    assert (type_, start, end, pid) == (F_WRLCK, 0, 99, 4242)
    assert err(lk(rig, P.SETLK, node, fh2, 2, F_RDLCK, 50, 60)) == errno.EAGAIN
    # SETLKW queues: no reply now, the grant replies later through send(), after the
    # cache invalidation notification for the inode
    rig.sent.clear()
    assert lk(rig, P.SETLKW, node, fh2, 2, F_RDLCK, 50, 60, unique=5000) is None
    assert rig.sent.items == []
    # the guest caches the file's attributes: the grant must drop them first
    payload(rig.req(P.GETATTR, P.GETATTR_IN.pack(0, 0, 0), nodeid=node))
    assert err(lk(rig, P.SETLK, node, fh, 1, F_UNLCK, 0, OFFSET_MAX)) == 0
    notify, reply = rig.sent.wait(2)
    assert P.OUT_HEADER.unpack_from(notify) == (40, P.NOTIFY_INVAL_INODE, 0)
    assert P.NOTIFY_INVAL_INODE_OUT.unpack_from(notify, 16) == (node, 0, -1)
    assert P.OUT_HEADER.unpack_from(reply) == (16, 0, 5000)
    # INTERRUPT of a queued wait: the wait answers -EINTR, the INTERRUPT nothing
    rig.sent.clear()
    assert lk(rig, P.SETLKW, node, fh, 1, F_WRLCK, 55, 55, unique=6000) is None
    assert rig.req(P.INTERRUPT, struct.pack("<Q", 6000), unique=6001) is None
    assert [P.OUT_HEADER.unpack_from(b) for b in rig.sent.wait(1)] == [(16, -errno.EINTR, 6000)]
    # INTERRUPT of something unknown: EAGAIN so the kernel asks again later
    assert P.OUT_HEADER.unpack_from(rig.req(P.INTERRUPT, struct.pack("<Q", 7000), unique=7001)) == (
        16, -errno.EAGAIN, 7001)
    # FLUSH drops the owner's POSIX locks
    assert err(rig.req(P.FLUSH, struct.pack("<QIIQ", fh2, 0, 0, 2), nodeid=node)) == 0
    assert err(lk(rig, P.SETLK, node, fh, 1, F_WRLCK)) == 0
    # flock on a handle, released by RELEASE with FLOCK_UNLOCK
    assert err(lk(rig, P.SETLK, node, fh2, 9, F_WRLCK, flags=P.LK_FLOCK)) == 0
    _, fh3 = open_file(rig)
    assert err(lk(rig, P.SETLK, node, fh3, 9, F_RDLCK, flags=P.LK_FLOCK)) == errno.EAGAIN
    rel = struct.pack("<QIIQ", fh2, os.O_RDWR, P.RELEASE_FLOCK_UNLOCK, 0)
    assert err(rig.req(P.RELEASE, rel, nodeid=node)) == 0
    assert err(lk(rig, P.SETLK, node, fh3, 9, F_RDLCK, flags=P.LK_FLOCK)) == 0
    # DESTROY releases everything of the guest
    assert err(rig.req(P.DESTROY)) == 0
    assert rig.manager.stats()["held_locks"] == 0


def test_cache_none_sets_direct_io(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    r = Rig(tmp_path, cache="none")
    payload(r.init())
    node = lookup(r, b"f")
    out = P.OPEN_OUT.unpack(payload(r.req(P.OPEN, P.OPEN_IN.pack(os.O_RDONLY, 0), nodeid=node)))
    assert out[1] & P.FOPEN_DIRECT_IO
    entry = P.ENTRY_OUT.unpack_from(payload(r.req(P.LOOKUP, b"f\0")))
    assert entry[2:4] == (0, 0)  # entry_valid, attr_valid


@pytest.mark.parametrize("minor", [37, 38, 43, 44, 45])
def test_auto_caches_names_only_for_a_kernel_that_handles_epochs(tmp_path: Path,
                                                                 minor: int) -> None:
    """cache=auto caches a name (entry timeout > 0) only if the kernel handles
    FUSE_NOTIFY_INC_EPOCH (7.44): with expire-only notifications alone a revalidation's
    reply, applied after the grant's expiry, keeps the name past the grant
    (fuse_server/invalidate.py). Attributes are cached either way."""
    (tmp_path / "f").write_text("x")
    r = Rig(tmp_path, cache="auto")
    payload(r.init(minor))
    entry = P.ENTRY_OUT.unpack_from(payload(r.req(P.LOOKUP, b"f\0")))
    assert (entry[2] > 0) == (minor >= 44), entry
    assert entry[3] == 1  # attr_valid


@pytest.mark.parametrize("op", ["lookup", "readdirplus"])
def test_a_name_read_before_a_grant_is_not_cached_past_it(rig: Rig, tmp_path: Path,
                                                          op: str) -> None:
    """A LOOKUP (or READDIRPLUS) that read the host before a lock grant swept the guest's
    names, and answers after the grant, must not leave the name cached past the grant:
    its taker would walk a name older than its lock. (SQLite across guests lost committed
    rows that way: a reader took a journal deleted meanwhile for a hot one and rolled its
    pages back.) Either the reply carries timeout 0, or the sweep notified the name before
    the grant's reply."""
    root = tmp_path / "root"
    (root / "j").write_bytes(b"journal")
    node, fh = open_file(rig)
    dh = None
    if op == "readdirplus":
        dh = P.OPEN_OUT.unpack(payload(rig.req(P.OPENDIR, P.OPEN_IN.pack(0, 0))))[0]
    read_host, go_on = threading.Event(), threading.Event()
    real = rig.session.fs.lookup

    def lookup_then_wait(parent: int, name: bytes):  # noqa: ANN202
        got = real(parent, name)
        if name == b"j":  # the host was read; the answer is not built yet
            read_host.set()
            assert go_on.wait(10)
        return got

    rig.session.fs.lookup = lookup_then_wait
    answer: list[bytes | None] = []
    if op == "lookup":
        request = (P.LOOKUP, b"j\0", 1)
    else:
        request = (P.READDIRPLUS, P.READ_IN.pack(dh, 0, 4096, 0, 0, 0, 0), 1)
    t = threading.Thread(target=lambda: answer.append(rig.req(*request[:2], nodeid=request[2])))
    t.start()
    try:
        assert read_host.wait(10)
        rig.sent.clear()
        rig.unique += 2
        grant = rig.unique
        assert err(lk(rig, P.SETLK, node, fh, 1, F_WRLCK, unique=grant)) == 0
    finally:
        go_on.set()
        t.join(10)
    sent = rig.sent.items
    before = sent[:next(i for i, b in enumerate(sent) if P.OUT_HEADER.unpack_from(b)[2] == grant)]
    swept = any(P.OUT_HEADER.unpack_from(b)[1] == P.NOTIFY_INVAL_ENTRY
                and struct.unpack_from("<QII", b, 16)[:2] == (1, 1) and b[32:33] == b"j"
                for b in before)
    out = payload(answer[0])
    if op == "lookup":
        entry = P.ENTRY_OUT.unpack_from(out)
    else:  # the entries of ".", ".." come first (nodeid 0); then "j"'s
        entries = []
        pos = 0
        while pos < len(out):
            e = P.ENTRY_OUT.unpack_from(out, pos)
            namelen = struct.unpack_from("<QQII", out, pos + P.ENTRY_OUT_SIZE)[2]
            if e[0]:
                entries.append((e, out[pos + P.DIRENTPLUS_BASE:pos + P.DIRENTPLUS_BASE + namelen]))
            pos += P.align8(P.DIRENTPLUS_BASE + namelen)
        entry = dict((n, e) for e, n in entries)[b"j"]
    cached = entry[2] or entry[4] or entry[3] or entry[5]  # entry and attr valid (s, ns)
    assert swept or not cached, (entry, before)


def _rig_without_notifications(tmp_path: Path) -> Rig:
    """A cache=auto session without a notification channel (as virtio-fs), INITed,
    sharing tmp_path/root with one file `f`."""
    root = tmp_path / "root"
    root.mkdir()
    (root / "f").write_bytes(b"data")
    rig = Rig.__new__(Rig)
    rig.sent, rig.manager, rig.unique = Sent(), LockManager(), 100
    rig.session = Session(Passthrough(str(root)), rig.manager, "g", rig.sent, "auto",
                          notify=False)
    payload(rig.init())
    return rig


def test_without_notifications_every_grant_waits_for_what_the_guest_was_given(
        tmp_path: Path) -> None:
    """cache=auto without a notification channel (virtio-fs): the first grant on a file
    the guest was given attributes and names of waits until they ran out. A second grant
    on it (another process of the guest, no conflict) asked for while the first is held
    back must wait just as long: its taker would otherwise read the size, pages and names
    the guest cached before the lock. (SQLite lost rows across guests that way.)"""
    rig = _rig_without_notifications(tmp_path)
    sent = rig.sent
    node, fh = open_file(rig)  # the LOOKUP gave the name and attributes a timeout
    _, fh2 = open_file(rig)
    given_until = rig.session.fs.table.tracked(node)[3] / 1e9  # (monotonic ns)
    replies = []
    for owner, fhx in ((1, fh), (2, fh2)):  # the second asked while the first is held
        rig.unique += 2
        asked = time.monotonic()
        reply = rig.req(P.SETLK, LK_IN.pack(fhx, owner, 0, OFFSET_MAX, F_RDLCK, 4242, 0),
                        nodeid=node, unique=rig.unique)
        # Answered at once only if what was given had run out when it was asked.
        assert reply is None or asked >= given_until, (owner, asked, given_until)
        replies.append((rig.unique, reply))
    replies = [r or sent.reply_to(unique) for unique, r in replies]
    assert time.monotonic() >= given_until
    assert [err(r) for r in replies] == [0, 0]


def test_without_notifications_a_first_grant_waits_a_timeout_from_its_request(
        tmp_path: Path) -> None:
    """The guest dates a timeout from when it applies our reply, which on a loaded host
    (a TCG guest) came more than HOLD_MARGIN after we sent it: the virtio-fs test of two
    guests read a file's old size and pages after a grant. What the guest applied before
    it sent its lock request runs out within a timeout of the request's arrival, so a
    first lock request shortly before the deadline of what it was given is held a whole
    timeout from its arrival, not merely until that deadline."""
    from procutil import wait_until

    rig = _rig_without_notifications(tmp_path)
    sent = rig.sent
    node, fh = open_file(rig)  # the LOOKUP gave the name and attributes a timeout
    given_until = rig.session.fs.table.tracked(node)[3] / 1e9  # (monotonic ns)
    assert wait_until(lambda: time.monotonic() >= given_until - 0.2, 10)
    rig.unique += 2
    asked = time.monotonic()
    assert asked < given_until  # the guest was given something that has not run out
    reply = rig.req(P.SETLK, LK_IN.pack(fh, 1, 0, OFFSET_MAX, F_RDLCK, 4242, 0),
                    nodeid=node, unique=rig.unique)
    assert reply is None  # held back
    timeout = rig.session.attr_timeout
    assert wait_until(lambda: time.monotonic() >= asked + timeout - 0.1, 10)
    # Not answered before a whole timeout from the request (the old rule: at given_until).
    assert all(P.OUT_HEADER.unpack_from(b)[2] != rig.unique for b in sent.items)
    assert err(sent.reply_to(rig.unique)) == 0
    assert time.monotonic() >= asked + timeout


def test_a_name_read_before_a_grant_without_a_sweep_is_not_cached_past_it(
        rig: Rig, tmp_path: Path) -> None:
    """The same as above when the grant has nothing to sweep (the file's caches already
    dropped by the grant before, no name handed out since): it is answered at once, and a
    LOOKUP that read the host before it must still not leave its name cached past it."""
    (tmp_path / "root" / "j").write_bytes(b"journal")
    node, fh = open_file(rig)
    _, fh2 = open_file(rig)
    assert err(lk(rig, P.SETLK, node, fh, 1, F_RDLCK)) == 0  # swept; the file uncached
    read_host, go_on = threading.Event(), threading.Event()
    real = rig.session.fs.lookup

    def lookup_then_wait(parent: int, name: bytes):  # noqa: ANN202
        got = real(parent, name)
        if name == b"j":
            read_host.set()
            assert go_on.wait(10)
        return got

    rig.session.fs.lookup = lookup_then_wait
    answer: list[bytes | None] = []
    t = threading.Thread(target=lambda: answer.append(rig.req(P.LOOKUP, b"j\0")))
    t.start()
    try:
        assert read_host.wait(10)
        rig.sent.clear()
        assert err(lk(rig, P.SETLK, node, fh2, 2, F_RDLCK)) == 0  # nothing to sweep
    finally:
        go_on.set()
        t.join(10)
    swept = any(P.OUT_HEADER.unpack_from(b)[1] == P.NOTIFY_INVAL_ENTRY for b in rig.sent.items)
    entry = P.ENTRY_OUT.unpack_from(payload(answer[0]))
    assert swept or not (entry[2] or entry[4] or entry[3] or entry[5]), entry
