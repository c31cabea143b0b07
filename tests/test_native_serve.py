"""The native fast path (native/vl_serve.c) against the Python session, its reference:
the same requests through both give the same bytes; a real mount is served by it; the
descriptor table it reads holds exactly the file system's inodes and handles, and closes
what it is told to close. (scripts/fuzz_session.py runs the same comparison on hostile
request streams, under ASan/UBSan in tests/test_fuzz.py.)"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import stat
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import own_tmpfs
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from procutil import wait_until

from fuse_server import protocol as P
from fuse_server.fdtable import DescriptorTable, PyDescriptorTable
from fuse_server.passthrough import Passthrough
from fuse_server.session import HOLD_MARGIN, MAX_WRITE, Session
from lockd import native
from lockd.engine.manager import LockManager

pytestmark = pytest.mark.skipif(not native.HAVE_NATIVE and not os.environ.get("CI"),
                                reason="the native extension is not built")
FAST = (P.LOOKUP, P.GETATTR, P.READ, P.WRITE, P.STATFS, P.GETXATTR, P.READDIR,
        P.READDIRPLUS)
XATTRS = [b"user.x", b"security.capability", b"system.posix_acl_access",
          b"system.posix_acl_default", b"trusted.nope", b"", b"x" * 300]
NAMES = [b"f", b"s", b"d", b"l", b"h", b"g", b"d/g", b"missing", b".", b"..", b"", b"x" * 256]


class Share:
    """A session over a share with a file, a setuid file, a directory and a symlink, and
    handles open on them: what the requests below name."""

    def __init__(self, root: Path, cache: str = "none", readonly: bool = False,
                 minor: int = 38, xattr: bool = True, notify: bool = True,
                 killpriv: bool = True, native: bool = True,
                 timeout: float | None = None) -> None:
        root.mkdir(exist_ok=True)
        self.root = root
        (root / "f").write_bytes(bytes(range(256)) * 40)
        (root / "s").write_bytes(b"setuid")
        os.chmod(root / "s", 0o6755)
        (root / "d").mkdir(exist_ok=True)
        (root / "d" / "g").write_bytes(b"g")
        (root / "h").write_bytes(b"not looked up before the test")
        if not (root / "l").is_symlink():
            os.symlink("f", root / "l")
        os.setxattr(root / "f", "user.x", b"value of x" * 20)
        self.session = Session(Passthrough(str(root)), LockManager(), "g", lambda b: None,
                               cache, readonly=readonly, xattr=xattr, notify=notify,
                               native=native)
        self.fs = self.session.fs
        if timeout is not None:  # (the attribute timeout, and the names' with auto)
            self.session.attr_timeout = timeout
        self.unique = 10
        # (killpriv=False: a guest that does not offer HANDLE_KILLPRIV_V2)
        offered = 0xFFFFFFFF & ~(0 if killpriv else P.HANDLE_KILLPRIV_V2)
        init = P.INIT_IN.pack(7, minor, 65536, offered) + bytes(48)
        assert self.req(P.INIT, init)[4:8] == b"\0\0\0\0"
        self.nodes = {n: self.lookup(n) for n in (b"f", b"s", b"d", b"l")}
        rw = os.O_RDONLY if readonly else os.O_RDWR
        self.fhs = [self.open(self.nodes[b"f"], os.O_RDONLY),
                    self.open(self.nodes[b"f"], rw | os.O_APPEND),
                    self.open(self.nodes[b"s"], rw)]
        self.fhs.append(P.OPEN_OUT.unpack_from(
            self.req(P.OPENDIR, P.OPEN_IN.pack(0, 0), self.nodes[b"d"]), 16)[0])

    def header(self, opcode: int, body: bytes, nodeid: int = 1, uid: int = 0,
               gid: int = 0) -> bytes:
        self.unique += 2
        return P.IN_HEADER.pack(40 + len(body), opcode, self.unique, nodeid, uid, gid, 7, 0,
                                0) + body

    def req(self, opcode: int, body: bytes, nodeid: int = 1) -> bytes:
        return self.session.handle(self.header(opcode, body, nodeid))

    def lookup(self, name: bytes) -> int:
        return P.ENTRY_OUT.unpack_from(self.req(P.LOOKUP, name + b"\0"), 16)[0]

    def open(self, nodeid: int, flags: int) -> int:
        return P.OPEN_OUT.unpack_from(self.req(P.OPEN, P.OPEN_IN.pack(flags, 0), nodeid), 16)[0]


def _request(share: Share, draw) -> tuple[bytes, int | None]:  # noqa: ANN001
    """One GETATTR/READ/WRITE/STATFS (or another opcode: the session's), with ids known
    and unknown, offsets at the edges, bodies cut short, any caller."""
    op = draw(st.sampled_from([*FAST, *FAST, P.FLUSH, P.SETATTR]))
    nodeid = draw(st.sampled_from([1, *share.nodes.values(), 0, 99999]))
    fh = draw(st.sampled_from([*share.fhs, 0, 4242]))
    offset = draw(st.sampled_from([0, 1, 4095, 10240, 1 << 40, (1 << 63) - 1, 1 << 63,
                                   (1 << 64) - 1]))
    if op == P.GETATTR:
        body = P.GETATTR_IN.pack(draw(st.integers(0, 3)), 0, fh)
    elif op == P.READ:
        size = draw(st.sampled_from([0, 1, 100, 4096, MAX_WRITE, MAX_WRITE + 1, 0xFFFFFFFF]))
        body = P.READ_IN.pack(fh, offset, size, 0, 0, 0, 0)
    elif op == P.GETXATTR:
        size = draw(st.sampled_from([0, 1, 10, 199, 200, 4096, 65536, 0xFFFFFFFF]))
        body = P.GETXATTR_IN.pack(size, 0) + draw(st.sampled_from([b"user.x", *XATTRS])) + b"\0"
        f = share.nodes[b"f"]
        nodeid = draw(st.sampled_from([f, f, f, share.nodes[b"d"], share.nodes[b"l"], 1, 99999]))
    elif op in (P.READDIR, P.READDIRPLUS):  # (READDIR past offset 0: from the snapshot
        # the last offset 0 of either took)
        size = draw(st.sampled_from([0, 1, 24, 31, 32, 100, 4096, 0xFFFFFFFF]))
        at = draw(st.sampled_from([0, 0, 1, 2, 3, 4, 1 << 40, (1 << 64) - 1]))
        fh = draw(st.sampled_from([share.fhs[3]] * 4 + [fh]))  # mostly the directory's
        body = P.READ_IN.pack(fh, at, size, 0, 0, 0, 0)
        nodeid = draw(st.sampled_from([share.nodes[b"d"], share.nodes[b"d"], 1, 99999]))
    elif op == P.LOOKUP:
        body = draw(st.sampled_from(NAMES)) + b"\0"
        nodeid = draw(st.sampled_from([1, 1, share.nodes[b"d"], share.nodes[b"f"], 0, 99999]))
    elif op == P.WRITE:
        data = draw(st.binary(max_size=64))
        size = len(data) if draw(st.booleans()) else draw(st.integers(0, 100))
        # write_flags: none, FUSE_WRITE_KILL_SUIDGID (decides with HANDLE_KILLPRIV_V2),
        # or anything
        wflags = draw(st.sampled_from([0, P.WRITE_KILL_SUIDGID, P.WRITE_KILL_SUIDGID | 3,
                                       0xFFFFFFFF, 0xFFFFFFFB]))
        body = P.WRITE_IN.pack(fh, offset % (1 << 20) if draw(st.booleans()) else offset,
                               size, wflags, 0, 0, 0) + data
    else:
        body = draw(st.binary(max_size=48))
    if draw(st.integers(0, 7)) == 0:
        body = body[: draw(st.integers(0, len(body)))]
    buf = share.header(op, body, nodeid, *draw(st.sampled_from([(0, 0), (1000, 1000),
                                                                (1000, 0)])))
    if draw(st.integers(0, 15)) == 0:  # a header length that lies
        buf = draw(st.sampled_from([39, len(buf) + 8])).to_bytes(4, "little") + buf[4:]
    # (24, 96, 120, 144: a WRITE's, STATFS's, GETATTR's and LOOKUP's reply exactly, the
    # room a Linux guest's chain has for them)
    return buf, draw(st.sampled_from([None, None, 0, 24, 40, 96, 120, 144, 200, 4096,
                                      1 << 21]))


@pytest.fixture(scope="module")
def shares(tmp_path_factory: pytest.TempPathFactory):
    """On a tmpfs of their own: nothing else changes its free space between the two
    answers to one STATFS."""
    from test_hostile_guest import need_root

    need_root()
    with own_tmpfs(tmp_path_factory.mktemp("shares")) as base:
        yield from _shares(base)


def _shares(base: Path):
    made: dict[str, Share] = {}
    try:
        for c in ("none", "auto"):
            made[c] = Share(base / c, c)
        # a 7.45 kernel: names cached, and remembered for the grants' sweeps; given for
        # an hour, so that a name held when the fast path answers still is when the
        # session does (a READDIRPLUS leaves those to the kernel)
        made["names"] = Share(base / "names", "auto", minor=45, timeout=3600.0)
        made["readonly"] = Share(base / "ro", readonly=True, xattr=False)
        # virtio-fs's cache auto: no notifications, the deadlines are tracked
        made["tracking"] = Share(base / "tracking", "auto", notify=False)
        # a guest without HANDLE_KILLPRIV_V2 (the others negotiate it)
        made["nokillpriv"] = Share(base / "nokillpriv", "auto", killpriv=False)
        for share in made.values():  # a snapshot for the READDIRs past offset 0
            share.req(P.READDIR, P.READ_IN.pack(share.fhs[3], 0, 4096, 0, 0, 0, 0),
                      share.nodes[b"d"])
        yield made
    finally:
        for s in made.values():
            s.session.end()


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data(),
       which=st.sampled_from(["none", "auto", "readonly", "names", "tracking",
                              "nokillpriv"]))
def test_the_fast_path_answers_what_the_session_answers(shares, data, which: str) -> None:
    share = shares[which]
    if which == "tracking" and data.draw(st.integers(0, 9)) == 0:  # a first lock request
        share.fs.table.first_lock(data.draw(st.sampled_from(list(share.nodes.values()))),
                                  time.monotonic_ns(), 0)
    if which == "names" and data.draw(st.integers(0, 9)) == 0:
        share.fs.table.take_names()  # a grant's sweep (a new epoch)
    if data.draw(st.integers(0, 7)) == 0:  # the directory changes: the next snapshot too
        extra = share.root / "d" / f"e{data.draw(st.integers(0, 3))}"
        if extra.exists():
            extra.unlink()
        else:
            extra.write_bytes(b"")
    buf, room = _request(share, data.draw)
    fast = share.fs.table.serve(buf, room)
    reference = share.session.handle(buf, room)
    if fast is not None:
        assert fast == reference


@pytest.mark.parametrize("xattr", [True, False])
def test_getxattr_answers_what_the_session_answers(tmp_path: Path, xattr: bool) -> None:
    """Every name, size at the edges of the value's, inode kind and buffer (the guest
    asks GETXATTR before every buffered write: security.capability)."""
    share = Share(tmp_path / "root", xattr=xattr)
    try:
        served = 0
        nodes = [share.nodes[n] for n in (b"f", b"d", b"l", b"s")] + [1, 99999]
        for name in XATTRS:
            for size in (0, 1, 199, 200, 201, 65536):
                for nodeid in nodes:
                    for room in (None, 120, 215, 216, 4096):
                        buf = share.header(P.GETXATTR, P.GETXATTR_IN.pack(size, 0) + name
                                           + b"\0", nodeid)
                        fast = share.fs.table.serve(buf, room)
                        if fast is not None:
                            served += 1
                            assert fast == share.session.handle(buf, room), (name, size, room)
        assert served > 1000
    finally:
        share.session.end()


def test_an_ended_sessions_table_answers_nothing(tmp_path: Path) -> None:
    """A transport's native loop may hold a session's table after the session ended (a
    new INIT on the same rings); a request still running keeps its inodes in the table
    (Session.end), but the table answers nothing more: the next session numbers its
    inodes from the start, and its guest must not get answers about the old ones."""
    share = Share(tmp_path / "root")
    buf = share.header(P.GETATTR, P.GETATTR_IN.pack(0, 0, 0), share.nodes[b"f"])
    assert share.fs.table.serve(buf, None) is not None
    share.session._start_running()  # a request stuck in a host call
    share.session.end()
    assert share.fs.table.nlookup(share.nodes[b"f"]) > 0  # still there...
    assert share.fs.table.serve(buf, None) is None  # ...and not answered from
    share.session._stop_running()


def test_each_fast_opcode_is_served_natively(tmp_path: Path) -> None:
    """One ordinary request of each kind: answered natively, as the session answers it
    (the random comparison above may, by chance, leave one out). On a tmpfs of its own,
    as the shares above."""
    from test_hostile_guest import need_root

    need_root()
    with own_tmpfs(tmp_path / "fs") as base:
        _each_fast_opcode(Share(base / "root"))


def _each_fast_opcode(share: Share) -> None:
    try:
        f, fh, d = share.nodes[b"f"], share.fhs[0], share.nodes[b"d"]
        requests = {P.LOOKUP: (b"f\0", 1), P.GETATTR: (P.GETATTR_IN.pack(0, 0, 0), f),
                    P.GETXATTR: (P.GETXATTR_IN.pack(4096, 0) + b"user.x\0", f),
                    -P.GETXATTR: (P.GETXATTR_IN.pack(0, 0) + b"user.x\0", f),  # its size
                    P.READ: (P.READ_IN.pack(fh, 0, 100, 0, 0, 0, 0), f),
                    P.WRITE: (P.WRITE_IN.pack(share.fhs[2], 0, 2, 0, 0, 0, 0) + b"ab",
                              share.nodes[b"s"]),
                    P.STATFS: (b"", 1),
                    # (past offset 0: the snapshot the one at 0 took)
                    P.READDIR: (P.READ_IN.pack(share.fhs[3], 0, 4096, 0, 0, 0, 0), d),
                    -P.READDIR: (P.READ_IN.pack(share.fhs[3], 1, 4096, 0, 0, 0, 0), d),
                    # (one entry, d/g, looked up: served counts entries)
                    P.READDIRPLUS: (P.READ_IN.pack(share.fhs[3], 0, 4096, 0, 0, 0, 0), d),
                    -P.READDIRPLUS: (P.READ_IN.pack(share.fhs[3], 1, 4096, 0, 0, 0, 0), d)}
        share.req(P.LOOKUP, b"g\0", d)  # (READDIRPLUS: an inode the guest knows)
        for key, (body, nodeid) in requests.items():
            op = abs(key)
            buf = share.header(op, body, nodeid)
            # (served: counted before the session answers, whose READDIRPLUS has its
            # entries looked up by the table too)
            before = share.fs.table.served(op)
            fast = share.fs.table.serve(buf, None)
            assert share.fs.table.served(op) == before + 1, op
            assert fast is not None and fast == share.session.handle(buf), op
            # a virtqueue chain has room for exactly the reply the guest expects
            buf = share.header(op, body, nodeid)
            before = share.fs.table.served(op)
            exact = share.fs.table.serve(buf, len(fast))
            assert share.fs.table.served(op) == before + 1, op
            assert exact is not None and exact == share.session.handle(buf, len(fast)), op
            # never more than the buffer it is given: a reply that does not fit is the
            # session's (which answers what fits, or the transport an error), or what the
            # session answers in that room (a shorter READ; ERANGE for a guest-sized
            # GETXATTR)
            buf = share.header(op, body, nodeid)
            cap = len(fast) - 1
            out = native.ffi.new("uint8_t[]", cap)
            n = native.lib.vl_serve(share.fs.table.native, buf, len(buf), out, cap)
            assert n == 0 or (n <= cap and native.ffi.buffer(out, n)[:] ==
                              share.session.handle(buf, cap)), op
            assert n in (0, 16) or op in (P.READ, P.READDIR, P.READDIRPLUS), op  # (fewer
            # bytes, entries)
    finally:
        share.session.end()


def test_names_looked_up_natively_are_swept_at_the_next_grant(tmp_path: Path) -> None:
    """With names cached (a 7.44+ kernel), a name the native path hands out is remembered
    for the next grant's sweep as the session's are; once the set is full the session
    answers (and asks its invalidator for a sweep at once)."""
    share = Share(tmp_path / "root", "auto", minor=45)
    try:
        t = share.fs.table
        t.take_names()
        d = share.nodes[b"d"]
        g = P.ENTRY_OUT.unpack_from(share.req(P.LOOKUP, b"g\0", d), 16)[0]
        assert set(t.take_names()) == {(d, b"g")}
        for name, parent in ((b"f", 1), (b"g", d)):
            reply = t.serve(share.header(P.LOOKUP, name + b"\0", parent), None)
            assert reply is not None
            assert P.ENTRY_OUT.unpack_from(reply, 16)[2:4] == (1, 1)  # cached 1 s
        assert set(t.take_names()) == {(1, b"f"), (d, b"g")}
        t.names_config(True, 2)
        for name in (b"f", b"s"):
            assert t.serve(share.header(P.LOOKUP, name + b"\0"), None) is not None
        assert t.serve(share.header(P.LOOKUP, b"d\0"), None) is None  # full: the session's
        assert g
    finally:
        share.session.end()


def _twin_shares(root: Path, dirname: str, names: list[str]) -> tuple[Share, Share]:
    """Two sessions on `root`, the second without the fast path, and `dirname` in it
    holding a file per name and a directory `sub`."""
    (root / dirname / "sub").mkdir(parents=True)
    for i, name in enumerate(names):
        (root / dirname / name).write_bytes(b"%d" % i)
    return Share(root), Share(root, native=False)


def test_readdirplus_entries_looked_up_natively_are_the_sessions(tmp_path: Path) -> None:
    """READDIRPLUS looks each entry up; for inodes the guest knows the table does it
    natively. Two sessions on one share, one without the fast path, asked the same
    things, answer the same bytes and count the same lookups."""
    a, b = _twin_shares(tmp_path / "root", "many", [f"n{i}" for i in range(40)])
    try:
        replies = []
        for share in (a, b):
            many = share.lookup(b"many")
            fh = P.OPEN_OUT.unpack_from(share.req(P.OPENDIR, P.OPEN_IN.pack(0, 0), many), 16)[0]
            read = P.READ_IN.pack(fh, 0, 65536, 0, 0, 0, 0)
            first = share.req(P.READDIRPLUS, read, many)  # new inodes: the session's
            before = share.fs.table.served(P.READDIRPLUS)
            again = share.req(P.READDIRPLUS, read, many)  # known now
            replies.append((first, again, share.fs.table.served(P.READDIRPLUS) - before,
                            sorted(share.fs.table.nlookup(n) for n in share.fs._inodes)))
        (a1, a2, a_native, a_counts), (b1, b2, b_native, b_counts) = replies
        assert a1 == b1 and a2 == b2 and a_counts == b_counts
        assert (a_native, b_native) == (41, 0)  # 40 files and a directory, natively
    finally:
        a.session.end()
        b.session.end()


def test_a_native_readdirplus_that_meets_a_new_inode_leaves_it_all_to_the_session(
        tmp_path: Path) -> None:
    """vl_serve answers a READDIRPLUS whole or not at all: one that meets an entry the
    session must look up (a new inode) after entries it looked up itself gives those
    lookups back, so the session's answer, and the lookup counts after it, are a session
    without the fast path's. Shown failing with the give-back left out."""
    names = [f"k{i}" for i in range(6)]
    a, b = _twin_shares(tmp_path / "root", "half", names)
    try:
        counts, replies = [], []
        for share in (a, b):
            half = share.lookup(b"half")
            for name in os.listdir(share.root / "half")[:3]:  # listed before new ones
                share.req(P.LOOKUP, f"{name}\0".encode(), half)
            fh = P.OPEN_OUT.unpack_from(share.req(P.OPENDIR, P.OPEN_IN.pack(0, 0), half), 16)[0]
            buf = share.header(P.READDIRPLUS, P.READ_IN.pack(fh, 0, 65536, 0, 0, 0, 0), half)
            before = share.fs.table.served(P.READDIRPLUS)
            known = {n: share.fs.table.nlookup(n) for n in share.fs._inodes}
            assert share.fs.table.serve(buf, None) is None
            assert share.fs.table.served(P.READDIRPLUS) == before
            assert {n: share.fs.table.nlookup(n) for n in share.fs._inodes} == known
            replies.append(share.session.handle(buf)[16:])
            counts.append(sorted(share.fs.table.nlookup(n) for n in share.fs._inodes))
            # every entry known now: the next one is answered here, as the session would
            buf = share.header(P.READDIRPLUS, P.READ_IN.pack(fh, 0, 65536, 0, 0, 0, 0), half)
            fast = share.fs.table.serve(buf, None)
            if share is a:
                assert fast is not None and fast[16:] == replies[0]
            else:
                assert fast is None  # (no fast path)
        assert replies[0] == replies[1] and counts[0] == counts[1]
    finally:
        a.session.end()
        b.session.end()


@pytest.mark.parametrize("size", [65536, 4096, 700, 168])
def test_readdirplus_in_pieces_is_the_sessions(tmp_path: Path, size: int) -> None:
    """READDIRPLUS read in buffers of `size` bytes from each offset the last one ended
    at, over known and new inodes mixed (the table builds runs of known ones, the
    session each new one) and an entry removed after the listing was taken: the same
    bytes, offsets and lookup counts as a session without the fast path asked the same
    things at the same moments."""
    root = tmp_path / "root"
    a, b = _twin_shares(root, "mix", [f"{'n' * (i % 7 + 1)}{i}" for i in range(30)])
    try:
        fhs = []
        for share in (a, b):
            mix = share.lookup(b"mix")
            for i in range(0, 30, 3):  # every third one known before the listing
                share.req(P.LOOKUP, f"{'n' * (i % 7 + 1)}{i}\0".encode(), mix)
            fhs.append(P.OPEN_OUT.unpack_from(share.req(P.OPENDIR, P.OPEN_IN.pack(0, 0), mix),
                                              16)[0])
        offset, pieces = 0, 0
        while True:
            ra, rb = (share.req(P.READDIRPLUS, P.READ_IN.pack(fh, offset, size, 0, 0, 0, 0),
                                mix) for share, fh in zip((a, b), fhs, strict=True))
            assert ra[8:] == rb[8:] and P.OUT_HEADER.unpack_from(ra)[1] == 0, (offset, pieces)
            body = ra[16:]
            if pieces == 0:
                (root / "mix" / "nn1").unlink()  # listed (both snapshots), then gone
            if not body:
                break
            pieces += 1
            at = 0
            while at < len(body):  # the last entry's offset is where to go on
                namelen = struct.unpack_from("<I", body, at + P.ENTRY_OUT_SIZE + 16)[0]
                offset = struct.unpack_from("<Q", body, at + P.ENTRY_OUT_SIZE + 8)[0]
                at += P.align8(P.DIRENTPLUS_BASE + namelen)
        assert pieces >= {65536: 1, 4096: 2, 700: 8, 168: 30}[size]
        assert sorted(a.fs.table.nlookup(n) for n in a.fs._inodes) == \
            sorted(b.fs.table.nlookup(n) for n in b.fs._inodes)
        assert a.fs.table.served(P.READDIRPLUS) >= 10
    finally:
        a.session.end()
        b.session.end()


def _dir_request(draw, nodes: list[int], fhs: list[int]) -> tuple[int, bytes, int, int]:  # noqa: ANN001
    """One request about directory handles: (opcode, body, nodeid, uid)."""
    op = draw(st.sampled_from([P.OPENDIR] * 3 + [P.RELEASEDIR] * 2 + [
        P.READDIR, P.READDIRPLUS, P.FSYNCDIR, P.GETATTR]))
    nodeid = draw(st.sampled_from(nodes + [99999]))
    fh = draw(st.sampled_from(fhs + [0, 4242])) if fhs else 0
    if op == P.OPENDIR:
        body = P.OPEN_IN.pack(os.O_RDONLY | os.O_DIRECTORY, 0)
    elif op == P.RELEASEDIR:
        body = P.RELEASE_IN.pack(fh, 0, 0, 0)
    elif op in (P.READDIR, P.READDIRPLUS):
        body = P.READ_IN.pack(fh, draw(st.sampled_from([0, 0, 1, 2])), 4096, 0, 0, 0, 0)
    elif op == P.FSYNCDIR:
        body = P.FSYNC_IN.pack(fh, 0, 0)
    else:
        body = P.GETATTR_IN.pack(P.GETATTR_FH, 0, fh)
    if draw(st.integers(0, 9)) == 0:
        body = body[: draw(st.integers(0, len(body)))]
    return op, body, nodeid, draw(st.sampled_from([0, 0, 1000, 1001]))


@settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_directory_handles_opened_natively_are_the_sessions(tmp_path_factory, data) -> None:
    """OPENDIR and RELEASEDIR answered natively (the handle stays the table's until the
    session first needs it: then Passthrough adopts it) against a session without the
    fast path, asked the same things: every reply byte, the handles each holds and what
    each user is charged (an open budget of 1 per uid and 2 in all, reached), and, once
    both end, no descriptor left open."""
    root = tmp_path_factory.mktemp("dirs")
    Passthrough(str(root)).close()  # (the process's watch of the filesystem: moves.py)
    fds = len(os.listdir("/proc/self/fd"))
    a, b = _twin_shares(root, "many", ["x", "y"])
    try:
        nodes = []
        for share in (a, b):
            share.fs.table.budget_config(1, 2)
            many = share.lookup(b"many")
            sub = P.ENTRY_OUT.unpack_from(share.req(P.LOOKUP, b"sub\0", many), 16)[0]
            x = P.ENTRY_OUT.unpack_from(share.req(P.LOOKUP, b"x\0", many), 16)[0]
            nodes.append([1, many, sub, x])
        assert nodes[0] == nodes[1]
        fhs: list[int] = list(a.fhs)
        for _ in range(data.draw(st.integers(1, 25))):
            op, body, nodeid, uid = _dir_request(data.draw, nodes[0], fhs)
            buf = a.header(op, body, nodeid, uid, uid)
            fast = a.fs.table.serve(buf, None)
            ra = bytes(fast) if fast is not None else a.session.handle(buf)
            rb = b.session.handle(buf)
            assert ra == rb, (op, ra, rb)
            if op == P.OPENDIR and len(ra) == 32:
                fhs.append(P.OPEN_OUT.unpack_from(ra, 16)[0])
        for share in (a, b):
            share.fs._adopt_all()
        assert sorted(a.fs._handles) == sorted(b.fs._handles)
        assert sorted(a.fs.table.charges()) == sorted(b.fs.table.charges())
        table_matches(a.fs)
    finally:
        a.session.end()
        b.session.end()
    assert len(os.listdir("/proc/self/fd")) == fds


NAME_CHOICES = [b"a", b"b", b"c", b"d1", b"d2", b"s", b"x", b"", b".", b"..", b"x" * 256,
                b"a/b"]


def _tree(root: Path) -> list[tuple[str, bool]]:
    return sorted((str(p.relative_to(root)), p.is_dir() and not p.is_symlink())
                  for p in root.rglob("*"))


@settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_names_removed_and_moved_natively_are_the_sessions(tmp_path_factory, data) -> None:
    """UNLINK, RMDIR, RENAME and RENAME2 answered natively against a session without the
    fast path on a twin share (the same tree, the same requests): every reply, and the
    trees after. Directories known and unknown, names bad and good, every RENAME2 flag,
    names made again meanwhile (MKDIR, SYMLINK: the session's), and a directory moved
    out of the share on the host, in which nothing may be removed or moved any more."""
    base = tmp_path_factory.mktemp("names")
    roots = [base / "A", base / "B"]
    shares = []
    for root in roots:
        (root / "d1" / "s").mkdir(parents=True)
        (root / "d2").mkdir()
        for name in ("a", "b"):
            (root / name).write_bytes(b"x")
        (root / "d1" / "c").write_bytes(b"c")
        shares.append(Share(root, native=root.name == "A"))
    a, b = shares
    try:
        nodes = []
        for share in shares:
            d1, d2 = share.lookup(b"d1"), share.lookup(b"d2")
            s_ = P.ENTRY_OUT.unpack_from(share.req(P.LOOKUP, b"s\0", d1), 16)[0]
            nodes.append([1, d1, d2, s_, share.nodes[b"f"], 99999])
        assert nodes[0] == nodes[1]
        dirs = nodes[0]
        for step in range(data.draw(st.integers(1, 30))):
            if data.draw(st.integers(0, 29)) == 0:  # d2 leaves the share (on the host)
                for root in roots:
                    if (root / "d2").exists():
                        (root / "d2").rename(root.parent / f"out-{root.name}-{step}")
            op = data.draw(st.sampled_from([P.UNLINK, P.RMDIR, P.RENAME, P.RENAME2,
                                            P.MKDIR, P.SYMLINK]))
            nodeid = data.draw(st.sampled_from(dirs))
            name = data.draw(st.sampled_from(NAME_CHOICES)) + b"\0"
            if op in (P.RENAME, P.RENAME2):
                head = P.RENAME_IN.pack(data.draw(st.sampled_from(dirs))) if op == P.RENAME \
                    else P.RENAME2_IN.pack(data.draw(st.sampled_from(dirs)),
                                           data.draw(st.sampled_from([0, 0, 1, 2, 4, 7])), 0)
                body = head + name + data.draw(st.sampled_from(NAME_CHOICES)) + b"\0"
            elif op == P.MKDIR:
                body = P.MKDIR_IN.pack(0o755, 0o022) + name
            elif op == P.SYMLINK:
                body = name + b"a\0"
            else:
                body = name
            if data.draw(st.integers(0, 9)) == 0:
                body = body[: data.draw(st.integers(0, len(body)))]
            buf = a.header(op, body, nodeid)
            fast = a.fs.table.serve(buf, None)
            ra = bytes(fast) if fast is not None else a.session.handle(buf)
            rb = b.session.handle(buf)
            if op in (P.MKDIR, P.SYMLINK):  # (an entry: attributes differ between trees)
                ra, rb = ra[:16], rb[:16]
            assert ra == rb, (op, ra, rb)
        assert _tree(roots[0]) == _tree(roots[1])
    finally:
        a.session.end()
        b.session.end()


def test_each_name_change_is_served_natively(tmp_path: Path) -> None:
    """One ordinary UNLINK, RMDIR, RENAME and RENAME2 (exchange): each answered natively
    as a session without the fast path answers it on a twin tree, whose tree ends the
    same; and in a directory moved out of the share on the host, none is answered here
    (the session's ENOENT: nothing may be removed outside the share)."""
    roots, shares = [tmp_path / "A", tmp_path / "B"], []
    for root in roots:
        (root / "d1" / "s").mkdir(parents=True)
        (root / "d2" / "k").mkdir(parents=True)
        (root / "a").write_bytes(b"a")
        (root / "b").write_bytes(b"b")
        shares.append(Share(root, native=root.name == "A"))
    a, b = shares
    try:
        d1, d2 = a.lookup(b"d1"), a.lookup(b"d2")
        assert (d1, d2) == (b.lookup(b"d1"), b.lookup(b"d2"))
        steps = [(P.UNLINK, b"a\0", 1), (P.RMDIR, b"s\0", d1),
                 (P.RENAME, P.RENAME_IN.pack(d1) + b"b\0z\0", 1),
                 (P.RENAME2, P.RENAME2_IN.pack(1, 2, 0) + b"z\0d2\0", d1)]  # (exchange)
        for op, body, nodeid in steps:
            buf = a.header(op, body, nodeid)
            before = a.fs.table.served(op)
            fast = a.fs.table.serve(buf, 16)  # (a virtqueue chain's room: the header)
            assert fast is not None and a.fs.table.served(op) == before + 1, op
            assert bytes(fast) == b.session.handle(buf), op
        assert _tree(roots[0]) == _tree(roots[1])
        assert (roots[0] / "d2").is_file() and (roots[0] / "d1" / "z" / "k").is_dir()
        for root in roots:  # d2 of the start, now d1/z, leaves the share
            (root / "d1" / "z").rename(tmp_path / f"out-{root.name}")
        buf = a.header(P.RMDIR, b"k\0", d2)  # (node d2: that directory, wherever it is)
        assert a.fs.table.serve(buf, None) is None
        assert a.session.handle(buf)[4:8] == (-errno.ENOENT).to_bytes(4, "little", signed=True)
        assert (tmp_path / "out-A" / "k").is_dir()
    finally:
        a.session.end()
        b.session.end()


def test_without_notifications_native_replies_keep_the_deadlines(tmp_path: Path) -> None:
    """virtio-fs with cache auto: what the guest is given is dated (its first lock
    request waits for it to run out: Session._first_lock). A native GETATTR or LOOKUP
    sets the inode's deadline as the session's does, and gives timeout 0 for a locked
    file and entry timeout 0 for a name in a directory holding one."""
    share = Share(tmp_path / "root", "auto", notify=False)
    try:
        t, f, d = share.fs.table, share.nodes[b"f"], share.nodes[b"d"]
        g = P.ENTRY_OUT.unpack_from(share.req(P.LOOKUP, b"g\0", d), 16)[0]
        getattr_f = share.header(P.GETATTR, P.GETATTR_IN.pack(0, 0, 0), f)
        hold = int((share.session.attr_timeout + HOLD_MARGIN) * 1e9)
        before = time.monotonic_ns()
        reply = t.serve(getattr_f, None)
        assert reply is not None and P.ATTR_OUT.unpack_from(reply, 16)[0] == 1
        assert t.tracked(f)[3] >= before + hold  # dated from this reply
        lookup_g = share.header(P.LOOKUP, b"g\0", d)
        reply = t.serve(lookup_g, None)
        assert P.ENTRY_OUT.unpack_from(reply, 16)[2:4] == (1, 1)
        assert t.tracked(g)[0] == d and t.tracked(d)[3] >= before + hold
        settle = t.first_lock(g, time.monotonic_ns(), 0)  # g is locked; d holds it
        assert settle >= t.tracked(g)[3] - 1
        reply = t.serve(lookup_g, None)
        assert P.ENTRY_OUT.unpack_from(reply, 16)[2:4] == (0, 0)  # the locked file
        reply = t.serve(share.header(P.LOOKUP, b"f\0"), None)
        assert P.ENTRY_OUT.unpack_from(reply, 16)[2:4] == (1, 1)  # f's directory: no lock
        t.first_lock(f, time.monotonic_ns(), 0)
        assert P.ATTR_OUT.unpack_from(t.serve(getattr_f, None), 16)[0] == 0
        for buf in (getattr_f, lookup_g):  # and the session answers the same
            assert t.serve(buf, None) == share.session.handle(buf)
    finally:
        share.session.end()


def test_no_name_is_resolved_in_a_directory_moved_out_of_the_share(tmp_path: Path) -> None:
    """A directory the guest knows, moved outside the share on the host: a name in it,
    even of an inode the guest knows, is not found natively (the session answers
    ENOENT, as for any lookup there)."""
    share = Share(tmp_path / "root")
    try:
        d = share.nodes[b"d"]
        g = P.ENTRY_OUT.unpack_from(share.req(P.LOOKUP, b"g\0", d), 16)[0]
        buf = share.header(P.LOOKUP, b"g\0", d)
        assert share.fs.table.serve(buf, None) is not None  # inside: native
        fh = P.OPEN_OUT.unpack_from(share.req(P.OPENDIR, P.OPEN_IN.pack(0, 0), d), 16)[0]
        listing = share.req(P.READDIRPLUS, P.READ_IN.pack(fh, 0, 65536, 0, 0, 0, 0), d)
        assert b"g" in listing and share.fs.table.served(P.READDIRPLUS) == 1
        os.rename(tmp_path / "root" / "d", tmp_path / "elsewhere")
        buf = share.header(P.LOOKUP, b"g\0", d)
        assert share.fs.table.serve(buf, None) is None
        assert P.OUT_HEADER.unpack_from(share.session.handle(buf))[1] == -errno.ENOENT
        # the rest of a listing taken before the move: its entries are not looked up
        rest = share.req(P.READDIRPLUS, P.READ_IN.pack(fh, 2, 65536, 0, 0, 0, 0), d)
        assert P.OUT_HEADER.unpack_from(rest)[:2] == (16, 0)  # g skipped, nothing else
        assert share.fs.table.served(P.READDIRPLUS) == 1 and g
    finally:
        share.session.end()


@pytest.mark.parametrize("killpriv,uid,wflags,kept", [
    (False, 1000, 0, False),  # uid != 0 clears them
    (False, 0, P.WRITE_KILL_SUIDGID, True),  # root keeps them (the flag means nothing)
    (True, 1000, P.WRITE_KILL_SUIDGID, False),  # the guest's word: no CAP_FSETID
    (True, 1000, 0, True),  # a user with CAP_FSETID
    (True, 0, P.WRITE_KILL_SUIDGID, False),  # root without CAP_FSETID
])
def test_a_write_by_a_user_drops_setuid_as_the_session_does(
        tmp_path: Path, killpriv: bool, uid: int, wflags: int, kept: bool) -> None:
    modes = []
    for path in ("native", "session"):
        share = Share(tmp_path / path, killpriv=killpriv)
        try:
            assert share.session.killpriv == killpriv
            s = share.nodes[b"s"]
            os.chmod(tmp_path / path / "s", 0o6755)
            buf = share.header(P.WRITE, P.WRITE_IN.pack(share.fhs[2], 0, 2, wflags, 0, 0, 0)
                               + b"ab", s, uid=uid, gid=uid)
            reply = share.fs.table.serve(buf, None) if path == "native" else \
                share.session.handle(buf)
            assert reply is not None and P.OUT_HEADER.unpack_from(reply)[1] == 0
            modes.append(stat.S_IMODE(os.stat(tmp_path / path / "s").st_mode))
        finally:
            share.session.end()
    assert modes == [0o6755 if kept else 0o755] * 2


def test_table_closes_what_it_is_told_to_and_nothing_else(tmp_path: Path) -> None:
    t = DescriptorTable()
    a, b = (os.open(tmp_path, os.O_PATH) for _ in range(2))
    t.put_inode(5, a, 1, 2, stat.S_IFDIR, 1)
    t.put_handle(7, b, 5, False, False)
    with pytest.raises(OSError) as exc:
        t.put_inode(5, a, 1, 3, stat.S_IFDIR, 1)
    assert exc.value.errno == errno.EEXIST
    t.drop_handle(7, b, close=False)
    os.fstat(b)  # still open: not the table's to close
    t.drop_inode(5, a, close=True)
    with pytest.raises(OSError):
        os.fstat(a)
    t.drop_handle(8, b, close=True)  # never published: closed all the same
    with pytest.raises(OSError):
        os.fstat(b)
    # a hundred thousand entries in, half out: the rest still found
    for i in range(1, 100001):
        t.put_inode(i, 3, 9, i, stat.S_IFREG, 1)
    for i in range(1, 100001, 2):
        t.drop_inode(i, 3, close=False)
    assert native.lib.vl_tab_count(t.native, 0) == 50000
    e = native.ffi.new("vl_tab_entry *")
    assert all(native.lib.vl_tab_get(t.native, 0, i, e) == (0 if i % 2 == 0 else -errno.ENOENT)
               for i in range(1, 100001))
    assert all(t.ref_key(9, i) == (i if i % 2 == 0 else 0) for i in range(1, 100001))


def test_lookups_counted_natively_are_forgotten_by_the_session(tmp_path: Path) -> None:
    """The lookup count is the table's: native LOOKUPs add to it, the session's FORGETs
    take from it, and the inode goes (from both sides) when it reaches 0, not before."""
    share = Share(tmp_path / "root")
    try:
        f = share.nodes[b"f"]  # looked up once by the session
        for _ in range(3):
            reply = share.fs.table.serve(share.header(P.LOOKUP, b"f\0"), None)
            assert reply is not None and P.ENTRY_OUT.unpack_from(reply, 16)[0] == f
        assert share.fs.table.nlookup(f) == 4
        assert share.session.handle(share.header(P.FORGET, P.FORGET_IN.pack(3), f)) is None
        assert f in share.fs._inodes and share.fs.table.nlookup(f) == 1
        share.session.handle(share.header(P.FORGET, P.FORGET_IN.pack(1), f))
        assert f not in share.fs._inodes
        # a new inode now, made by the session (the native path declines, then counts it)
        assert share.fs.table.serve(share.header(P.LOOKUP, b"f\0"), None) is None
        g = share.lookup(b"f")
        assert g != f and share.fs.table.nlookup(g) == 1
        assert share.fs.table.serve(share.header(P.LOOKUP, b"f\0"), None) is not None
        assert share.fs.table.nlookup(g) == 2
    finally:
        share.session.end()


def table_matches(fs: Passthrough) -> None:
    """The table holds exactly the file system's inodes and handles, with their
    descriptors, and the handles a native OPENDIR made that it has not adopted."""
    lib, ffi = native.lib, native.ffi
    e = ffi.new("vl_tab_entry *")
    with fs._lock:
        inodes, handles = dict(fs._inodes), dict(fs._handles)
        natives = fs.table.native_handles()
    assert lib.vl_tab_count(fs.table.native, 0) == len(inodes)
    assert lib.vl_tab_count(fs.table.native, 1) == len(handles) + len(natives)
    assert not set(natives) & set(handles)
    for nodeid, node in inodes.items():
        assert lib.vl_tab_get(fs.table.native, 0, nodeid, e) == 0 and e.fd == node.fd
        assert e.nlookup > 0 and e.indexed  # known to the guest, found by identity
    for fh, h in handles.items():
        assert lib.vl_tab_get(fs.table.native, 1, fh, e) == 0
        assert (e.fd, e.nodeid) == (h.fd, h.inode.nodeid)


@pytest.mark.parametrize("cache", ["none", "auto"])
def test_a_real_mount_is_served_natively(fuse_ok, tmp_path: Path, cache: str) -> None:
    from fuse_server.transports.devfuse import DevFuse

    src, mnt = tmp_path / "src", tmp_path / "mnt"
    src.mkdir()
    mnt.mkdir()
    (src / "a").write_bytes(b"x" * 10000)
    dev = DevFuse(str(mnt), MAX_WRITE + 4096)
    fs = Passthrough(str(src))
    session = Session(fs, LockManager(), "g", dev.send, cache=cache)
    dev.mount()
    try:
        dev.start(session.handle, 2, table=fs.table)
        assert wait_until(lambda: session.initialized, 10)
        with open(mnt / "a", "rb") as f:  # written on the host: the guest has no pages
            assert f.read() == b"x" * 10000
        for i in range(20):
            with open(mnt / f"n{i}", "wb") as f:
                f.write(b"%d" % i * 1000)
            assert os.stat(mnt / f"n{i}").st_size == len(b"%d" % i) * 1000
            with open(mnt / f"n{i}", "rb") as f:
                assert f.read() == b"%d" % i * 1000
            if i % 3 == 0:
                os.unlink(mnt / f"n{i}")
        assert os.statvfs(mnt).f_blocks == os.statvfs(src).f_blocks
        with open(mnt / "a", "r+b") as f:
            f.seek(5000)
            f.write(b"yy")
            f.flush()
            os.fsync(f.fileno())
        assert (src / "a").read_bytes()[4999:5003] == b"xyyx"
        (src / "sub").mkdir()
        (src / "sub" / "s").write_bytes(b"s")
        for _ in range(3):  # (the first listing of sub makes its entries' inodes)
            assert sorted(os.listdir(mnt / "sub")) == ["s"]
            assert len(os.listdir(mnt)) == 15
        # (auto on this kernel: names cached and swept at grants, LOOKUP is the session's)
        for op in (P.READ, P.WRITE, P.STATFS, P.OPENDIR, P.RELEASEDIR) if cache == "auto" else \
                (P.LOOKUP, P.GETATTR, P.READ, P.WRITE, P.STATFS, P.OPENDIR, P.RELEASEDIR,
                 P.READDIRPLUS):
            assert fs.table.served(op) > 0, op
        assert wait_until(lambda: _settled(fs), 10)
        table_matches(fs)
    finally:
        dev.stopped.set()
        dev.unmount()
        session.end()
        os.close(dev.fd)
    assert native.lib.vl_tab_count(fs.table.native, 0) == 0
    assert native.lib.vl_tab_count(fs.table.native, 1) == 0


def _settled(fs: Passthrough) -> bool:
    """No handle open any more (the kernel's RELEASEs run in the background)."""
    with fs._lock:
        return not fs._handles and not fs.table.native_handles()


def test_a_descriptor_in_use_is_closed_by_its_last_user(tmp_path: Path) -> None:
    """A handle released while a native request on it waits in the host (a hung file
    system inside the share): its descriptor stays open until that request returns, then
    closes (closing it at the release would let the request use a number given to
    another file)."""
    from test_hostile_guest import HungMount, need_root

    need_root()
    root = tmp_path / "root"
    root.mkdir()
    hung = HungMount(root / "hung", tmp_path)
    share = None
    try:
        (root / "hung" / "x").write_bytes(b"x" * 100)
        share = Share(root)
        x = P.ENTRY_OUT.unpack_from(share.req(P.LOOKUP, b"x\0", share.lookup(b"hung")), 16)[0]
        share.open(x, os.O_RDONLY)  # (the first handle's descriptor is the inode's too)
        fh = share.open(x, os.O_RDONLY)
        fd = share.fs.handle(fh).fd
        hung.stop()
        replies: list = []
        # (a GETATTR on the handle: the hung mount passes reads through to its file)
        getattr_fh = share.header(P.GETATTR, P.GETATTR_IN.pack(P.GETATTR_FH, 0, fh), x)
        reader = threading.Thread(target=lambda: replies.append(share.fs.table.serve(
            getattr_fh, None)))
        reader.start()
        hung.wait_stuck()
        # The release returns at once (a close now would wait for the hung mount too).
        released: list = []
        release = share.header(P.RELEASE, P.RELEASE_IN.pack(fh, 0, 0, 0), x)
        releaser = threading.Thread(target=lambda: released.append(
            share.session.handle(release)), daemon=True)
        releaser.start()
        releaser.join(30)
        assert released, "the release waited for the request stuck in the host"
        assert os.readlink(f"/proc/self/fd/{fd}") == str(root / "hung" / "x")  # still open
        os.kill(hung.mount.proc.pid, signal.SIGCONT)
        hung.stopped = False
        reader.join(15)
        assert not reader.is_alive()
        assert P.ATTR.unpack_from(replies[0], 32)[1] == 100  # the file's size
        with contextlib.suppress(OSError):  # closed now (or the number reused elsewhere)
            assert os.readlink(f"/proc/self/fd/{fd}") != str(root / "hung" / "x")
    finally:
        hung.close()  # (first: a close of a file in the stopped mount would wait for it)
        if share is not None:
            share.session.end()


def on_threads(worker: Callable[[int], None], n: int) -> None:
    """worker(0) .. worker(n - 1), each on a thread of its own, all at once."""
    threads = [threading.Thread(target=worker, args=(s,)) for s in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def test_lookups_and_forgets_racing_leave_both_sides_agreeing(tmp_path: Path) -> None:
    """The lookup count and the index by identity have one owner, the table: native
    LOOKUPs on several threads race the session's LOOKUPs, FORGETs and GETATTRs as a
    guest kernel sends them (it forgets only what it was answered). Every answer names
    an inode both sides know, and once the guest has forgotten everything, no inode but
    the root is left on either side."""
    root = tmp_path / "root"
    share = Share(root)
    names = [f"r{i}".encode() for i in range(6)]
    for n in names:
        (root / n.decode()).write_bytes(b"x")
    held: dict[int, int] = {}  # the "kernel": node id -> lookups answered, not forgotten
    mu = threading.Lock()
    errors: list[str] = []

    def lookup(name: bytes) -> None:
        buf = share.header(P.LOOKUP, name + b"\0")
        reply = share.fs.table.serve(buf, None)
        if reply is None:
            reply = share.session.handle(buf)
        if P.OUT_HEADER.unpack_from(reply)[1] != 0:
            errors.append(f"LOOKUP {name!r}: {P.OUT_HEADER.unpack_from(reply)[1]}")
            return
        nodeid = P.ENTRY_OUT.unpack_from(reply, 16)[0]
        # (used before the "kernel" may forget this lookup, as a kernel does)
        buf = share.header(P.GETATTR, P.GETATTR_IN.pack(0, 0, 0), nodeid)
        got = share.fs.table.serve(buf, None) if nodeid % 2 else share.session.handle(buf)
        if got is None or P.OUT_HEADER.unpack_from(got)[1] != 0:
            errors.append(f"GETATTR of {nodeid} just looked up: {got and bytes(got[:16])!r}")
        with mu:
            held[nodeid] = held.get(nodeid, 0) + 1

    def forget_some(k: int) -> None:
        with mu:
            items = list(held.items())[:k]
            for nodeid, _ in items:
                del held[nodeid]
        for nodeid, n in items:
            share.session.handle(share.header(P.FORGET, P.FORGET_IN.pack(n), nodeid))

    def worker(seed: int) -> None:
        for i in range(500):
            lookup(names[(seed * 7 + i) % len(names)])
            if i % 5 == seed % 5:
                forget_some(2)

    try:
        on_threads(worker, 4)
        assert not errors, errors[:5]
        table_matches(share.fs)  # (the Share's own inodes and handles still held)
        for nodeid, n in list(held.items()):
            assert share.fs.table.nlookup(nodeid) >= n
        forget_some(len(held))
        racing = {n for n in share.fs._inodes if n not in share.nodes.values() and n != 1}
        assert not racing, racing  # every inode the race made is gone
        assert share.fs.table.served(P.LOOKUP) > 100  # the race was native in part
    finally:
        share.session.end()


def test_directory_handles_raced_by_native_and_session_requests(tmp_path: Path) -> None:
    """A natively opened directory handle has two possible owners over its life: the
    table until the session first needs it, then Passthrough. Four threads race what a
    guest kernel sends about open directories: native OPENDIRs, RELEASEDIRs (native when
    the handle was never adopted), and FSYNCDIR, GETATTR through the handle and
    READDIR(PLUS) (each may adopt it), a kernel releasing each handle once, after its
    other requests. Every answer is 0; afterwards no handle is left in the table or in
    Passthrough, no charge is left, and once the session ends no descriptor is open."""
    root = tmp_path / "root"
    for i in range(4):
        (root / f"d{i}").mkdir(parents=True)
        (root / f"d{i}" / "e").write_bytes(b"e")
    Passthrough(str(tmp_path)).close()  # (the process's watch of the filesystem: moves.py)
    fds = len(os.listdir("/proc/self/fd"))
    share = Share(root)
    errors: list[str] = []
    try:
        dirs = [share.lookup(f"d{i}".encode()) for i in range(4)]
        for d in dirs:  # (entries known: a READDIRPLUS may be native too)
            share.req(P.LOOKUP, b"e\0", d)

        def ask(op: int, body: bytes, nodeid: int, native_first: bool = True) -> bytes:
            buf = share.header(op, body, nodeid, 1000, 1000)
            reply = share.fs.table.serve(buf, None) if native_first else None
            reply = bytes(reply) if reply is not None else share.session.handle(buf)
            if P.OUT_HEADER.unpack_from(reply)[1] != 0:
                errors.append(f"opcode {op} on {nodeid}: {P.OUT_HEADER.unpack_from(reply)[1]}")
            return reply

        def worker(seed: int) -> None:
            for i in range(150):
                d = dirs[(seed + i) % len(dirs)]
                fh = P.OPEN_OUT.unpack_from(ask(P.OPENDIR, P.OPEN_IN.pack(0, 0), d), 16)[0]
                for k in range((seed * 3 + i) % 4):  # what the session may adopt it for
                    op = (P.FSYNCDIR, P.GETATTR, P.READDIR, P.READDIRPLUS)[(i + k) % 4]
                    body = {P.FSYNCDIR: P.FSYNC_IN.pack(fh, 0, 0),
                            P.GETATTR: P.GETATTR_IN.pack(P.GETATTR_FH, 0, fh)}.get(
                        op, P.READ_IN.pack(fh, k % 2, 4096, 0, 0, 0, 0))
                    ask(op, body, d, native_first=op != P.FSYNCDIR)
                ask(P.RELEASEDIR, P.RELEASE_IN.pack(fh, 0, 0, 0), d)

        on_threads(worker, 4)
        assert not errors, errors[:5]
        own = set(share.fhs)  # (the Share's own, opened by the session)
        assert set(share.fs._handles) == own and not share.fs.table.native_handles()
        assert native.lib.vl_tab_count(share.fs.table.native, 1) == len(own)
        assert share.fs.table.charges() == []
        assert share.fs.table.served(P.OPENDIR) > 100 and share.fs.table.served(P.RELEASEDIR)
    finally:
        share.session.end()
    assert len(os.listdir("/proc/self/fd")) == fds


def test_names_handed_out_natively_never_escape_a_sweep(tmp_path: Path) -> None:
    """With names cached, every name a native LOOKUP hands out with a timeout is taken
    by a sweep (a lock grant's) begun after its request, however the lookups race the
    sweeps: a name read before a sweep and answered after it gets timeout 0."""
    root = tmp_path / "root"
    share = Share(root, "auto", minor=45)
    names = [f"m{i}".encode() for i in range(8)]
    for n in names:
        (root / n.decode()).write_bytes(b"x")
        share.lookup(n)  # known: the native path answers from now on
    t = share.fs.table
    t.take_names()
    sweeps: list[set[bytes]] = []  # what each sweep took, in order
    handed: list[tuple[bytes, int]] = []  # (name, sweeps before its request)
    done = threading.Event()

    def sweeper() -> None:
        while not done.is_set():
            sweeps.append({n for _p, n in t.take_names()})

    def looker(seed: int) -> None:
        for i in range(400):
            name = names[(seed + i) % len(names)]
            before = len(sweeps)
            reply = t.serve(share.header(P.LOOKUP, name + b"\0"), None)
            if reply is not None and P.ENTRY_OUT.unpack_from(reply, 16)[2]:
                handed.append((name, before))  # entry_valid: the guest caches it

    try:
        s = threading.Thread(target=sweeper)
        s.start()
        lookers = [threading.Thread(target=looker, args=(k,)) for k in range(3)]
        for th in lookers:
            th.start()
        for th in lookers:
            th.join()
        done.set()
        s.join()
        sweeps.append({n for _p, n in t.take_names()})
        escaped = [(n, b) for n, b in handed if not any(n in w for w in sweeps[b:])]
        assert len(handed) > 100 and not escaped, escaped[:5]
    finally:
        share.session.end()


def test_a_native_readdir_reads_the_latest_snapshot(tmp_path: Path) -> None:
    """The table's copy of a handle's listing (READDIR past offset 0) interleaved with
    everything that changes it: a READDIR or READDIRPLUS at offset 0 (the session's
    new snapshot) after the directory changed, another handle of the same directory,
    RELEASEDIR. Each native answer is the session's, byte for byte, at that moment."""
    share = Share(tmp_path / "root")
    try:
        d = share.nodes[b"d"]
        other = P.OPEN_OUT.unpack_from(share.req(P.OPENDIR, P.OPEN_IN.pack(0, 0), d), 16)[0]

        def both(fh: int, offset: int) -> bytes:
            buf = share.header(P.READDIR, P.READ_IN.pack(fh, offset, 4096, 0, 0, 0, 0), d)
            fast = share.fs.table.serve(buf, None)
            reference = share.session.handle(buf)
            assert fast == reference, (fh, offset)
            return reference

        def names(reply: bytes) -> list[bytes]:
            out, at = [], 16
            while at < len(reply):
                _, _, n, _ = struct.unpack_from("<QQII", reply, at)
                out.append(reply[at + 24:at + 24 + n])
                at += P.align8(24 + n)
            return out

        fh = share.fhs[3]
        for step in range(6):
            (tmp_path / "root" / "d" / f"new{step}").write_bytes(b"")
            if step == 3:
                (tmp_path / "root" / "d" / "new0").unlink()
            op = P.READDIRPLUS if step % 2 else P.READDIR
            share.req(op, P.READ_IN.pack(fh, 0, 65536, 0, 0, 0, 0), d)  # a new snapshot
            before = share.fs.table.served(P.READDIR)
            listed = names(both(fh, 1))
            assert share.fs.table.served(P.READDIR) == before + 1
            assert f"new{step}".encode() in listed and (b"new0" in listed) == (step < 3)
            # the other handle keeps its own (older) snapshot
            if step == 0:
                share.req(P.READDIR, P.READ_IN.pack(other, 0, 65536, 0, 0, 0, 0), d)
            assert b"new1" not in names(both(other, 1))
        share.req(P.RELEASEDIR, P.RELEASE_IN.pack(fh, 0, 0, 0), d)
        buf = share.header(P.READDIR, P.READ_IN.pack(fh, 1, 4096, 0, 0, 0, 0), d)
        assert share.fs.table.serve(buf, None) is None  # gone: the session's EBADF
        assert P.OUT_HEADER.unpack_from(share.session.handle(buf))[1] == -errno.EBADF
    finally:
        share.session.end()


@pytest.mark.parametrize("kind", ["native", "python"])
def test_a_name_is_held_until_its_entry_runs_out_or_a_sweep(kind: str) -> None:
    """What READDIRPLUS leaves to the kernel (fdtable's names_held), in both tables: a
    name remembered with a deadline is held before it, not at it; one given with
    timeout 0 or in an older epoch never is; a sweep (take_names) forgets them all, and
    nothing is held while names are not remembered."""
    t = DescriptorTable() if kind == "native" else PyDescriptorTable()
    t.names_config(True, 100)
    since = t.names_epoch()
    assert t.named(1, b"a", since, 5000) == 1
    assert t.named(1, b"zero", since, 0) == 1
    assert (t.names_held(1, b"a", 4999), t.names_held(1, b"a", 5000)) == (True, False)
    assert not t.names_held(2, b"a", 0) and not t.names_held(1, b"zero", 0)
    assert t.named(1, b"a", since, 0) == 1  # given again with timeout 0: not held now
    assert not t.names_held(1, b"a", 0)
    assert t.named(1, b"a", since, 9000) == 1
    assert set(t.take_names()) == {(1, b"a"), (1, b"zero")}
    assert not t.names_held(1, b"a", 0)
    assert t.named(1, b"old", since, 9000) == 0  # read before the sweep: not cached
    assert not t.names_held(1, b"old", 0)
    t.names_config(False, 100)
    assert t.named(1, b"b", t.names_epoch(), 9000) == 1
    assert not t.names_held(1, b"b", 0)


@pytest.mark.parametrize("native", [True, False], ids=["native", "python"])
def test_readdirplus_leaves_the_names_the_guest_holds(tmp_path: Path, native: bool) -> None:
    """A READDIRPLUS answers nodeid 0 (nothing to link) for a name the guest was given
    since the last sweep and still holds, and a full entry for the others, as a LOOKUP
    would; after a grant's sweep every name gets its entry again. Served by the fast
    path or by the session, the same bytes."""
    share = Share(tmp_path / "root", "auto", minor=45, timeout=3600.0, native=native)
    try:
        d = share.nodes[b"d"]
        for i in range(3):
            (share.root / "d" / f"n{i}").write_bytes(b"x")
        fh = P.OPEN_OUT.unpack_from(share.req(P.OPENDIR, P.OPEN_IN.pack(0, 0), d), 16)[0]
        read = P.READ_IN.pack(fh, 0, 65536, 0, 0, 0, 0)
        share.fs.table.take_names()  # (the names the setup was given)

        def linked() -> dict[bytes, int]:
            """name -> the nodeid its entry links (0: none)."""
            out, at = {}, 16
            reply = share.req(P.READDIRPLUS, read, d)
            while at < len(reply):
                nodeid = P.ENTRY_OUT.unpack_from(reply, at)[0]
                nlen = struct.unpack_from("<I", reply, at + P.ENTRY_OUT_SIZE + 16)[0]
                name = reply[at + P.ENTRY_OUT_SIZE + 24:at + P.ENTRY_OUT_SIZE + 24 + nlen]
                out[name] = nodeid
                at += P.align8(P.DIRENTPLUS_BASE + nlen)
            return out

        first = linked()
        assert first[b"."] == first[b".."] == 0
        assert all(first[n] for n in (b"g", b"n0", b"n1", b"n2")), first
        share.lookup(b"f")  # (another directory's name: no effect here)
        n0 = P.ENTRY_OUT.unpack_from(share.req(P.LOOKUP, b"n0\0", d), 16)[0]
        assert n0 == first[b"n0"]
        assert linked() == dict.fromkeys(first, 0)  # all given since the sweep, held
        share.fs.table.take_names()  # a grant's sweep: the guest holds none now
        again = linked()
        assert again == first
        assert linked() == dict.fromkeys(first, 0)
    finally:
        share.session.end()
