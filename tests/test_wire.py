"""The wire protocol against a real daemon: pipelining, async waits, malformed and hostile
frames (each answered by an error frame; the daemon keeps serving everyone else)."""

from __future__ import annotations

import errno
import json
import os
import struct

import pytest
from daemonutil import F_RDLCK, F_UNLCK, F_WRLCK, DaemonProc, Raw, host_can_lock
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lockd.daemon import wire
from lockd.fuse import abi


@pytest.fixture(scope="module")
def shared_daemon(tmp_path_factory):
    d = DaemonProc(str(tmp_path_factory.mktemp("wire"))).start()
    try:
        yield d
    finally:
        assert d.stop() == 0


@pytest.fixture
def d(shared_daemon):
    yield shared_daemon
    assert shared_daemon.proc.poll() is None, "daemon died"


def test_pipelined_requests_replied_by_id(d, tmp_path):
    r = Raw(d.sock, "pipe", holder_names=True)  # GETLK replies name the holder's guest
    h = r.file(str(tmp_path / "f"))
    frames = []
    for i in range(200):
        frames.append(wire.lk(wire.T_SETLK, 1000 + 2 * i, h, 0, 1, F_WRLCK, i * 10, i * 10 + 4,
                              7))
        frames.append(wire.lk(wire.T_GETLK, 1001 + 2 * i, h, 0, 2, F_RDLCK, i * 10, i * 10, 7))
    r.send(b"".join(frames))  # one write, 400 requests in flight
    got = {}
    for _ in range(400):
        rid, status, payload = r.read()
        got[rid] = (status, payload)
    assert all(got[1000 + 2 * i][0] == 0 for i in range(200))
    for i in range(200):
        status, payload = got[1001 + 2 * i]
        assert status == 0
        start, end, typ, pid = abi.LK_OUT.unpack_from(payload)
        assert (start, end, typ, pid) == (i * 10, i * 10 + 4, F_WRLCK, 7)
        assert payload[abi.LK_OUT.size:] == b"pipe"
    r.close()


def test_wait_interim_and_final_reply_and_cancel(d, tmp_path):
    a, b = Raw(d.sock, "wa"), Raw(d.sock, "wb")
    ha, hb = a.file(str(tmp_path / "f")), b.file(str(tmp_path / "f"))
    assert a.expect(a.lk(wire.T_SETLK, ha, F_WRLCK))[0] == 0
    w1 = b.lk(wire.T_SETLKW, hb, F_WRLCK, rid=50)
    assert b.expect(w1)[0] == wire.STATUS_QUEUED
    w2 = b.lk(wire.T_SETLKW, hb, F_RDLCK, owner=2, rid=51)
    assert b.expect(w2)[0] == wire.STATUS_QUEUED
    # the same wait sent again is not queued twice
    b.lk(wire.T_SETLKW, hb, F_RDLCK, owner=2, rid=51)
    assert b.expect(51)[0] == wire.STATUS_QUEUED
    # CANCEL (FUSE_INTERRUPT) for wait 51: the wait answers EINTR, the cancel 0 (done)
    b.send(wire.interrupt(52, 51))
    replies = {b.read()[0:2] for _ in range(2)}
    assert replies == {(51, -errno.EINTR), (52, 0)}
    # again: no such wait (any more): EAGAIN, as FUSE answers an unknown INTERRUPT
    b.send(wire.interrupt(53, 51))
    assert b.expect(53)[0] == -errno.EAGAIN
    assert a.expect(a.lk(wire.T_SETLK, ha, F_UNLCK))[0] == 0
    assert b.expect(50)[0] == 0  # asynchronous final reply
    assert not host_can_lock(str(tmp_path / "f"))
    # RELEASE_OWNER (FUSE_FLUSH) drops it
    b.send(wire.flush(54, hb, 1))
    assert b.expect(54)[0] == 0
    assert host_can_lock(str(tmp_path / "f"))
    # flock through SETLK + FUSE_LK_FLOCK, RELEASE with FLOCK_UNLOCK
    assert a.expect(a.lk(wire.T_SETLK, ha, F_WRLCK, fh=9, flags=wire.FUSE_LK_FLOCK))[0] == 0
    assert b.expect(b.lk(wire.T_SETLK, hb, F_RDLCK, fh=9, flags=wire.FUSE_LK_FLOCK))[0] \
        == -errno.EAGAIN
    a.send(wire.release_flock(60, 9))
    assert a.expect(60)[0] == 0
    assert b.expect(b.lk(wire.T_SETLK, hb, F_RDLCK, fh=9, flags=wire.FUSE_LK_FLOCK))[0] == 0
    # PUT_FILE drops the handle; later lock frames on it answer EINVAL (a bad argument)
    assert a.call(wire.T_PUT_FILE, handle=ha)[0] == 0
    assert a.expect(a.lk(wire.T_SETLK, ha, F_WRLCK))[0] == -errno.EINVAL
    a.close()
    b.close()


def test_frames_split_across_writes(d, tmp_path):
    r = Raw(d.sock, "split")
    h = r.file(str(tmp_path / "f"))
    data = wire.lk(wire.T_SETLK, 9, h, 0, 1, F_WRLCK, 0, 9, 1) + wire.frame(wire.T_PING, 10)
    for i in range(len(data)):
        r.send(data[i:i + 1])
    assert r.expect(9)[0] == 0 and r.expect(10)[0] == 0
    r.close()


def ping_ok(sock: str) -> None:
    c = Raw(sock, None, role="admin")
    assert c.call(wire.T_PING)[0] == 0
    c.close()


@pytest.mark.parametrize("name,data,rid,err,closes", [
    ("short length", struct.pack("<IIQQIIII", 12, wire.T_PING, 5, 0, 0, 0, 0, 0), 0,
     errno.EPROTO, True),
    # Refused, its body skipped: the length says where the next frame starts.
    ("oversize", wire.frame(wire.T_PING, 5, b"\0" * wire.MAX_FRAME), 5, errno.EMSGSIZE,
     False),
    ("unknown type", wire.frame(4242, 7), 7, errno.EOPNOTSUPP, False),
    ("truncated lock body", wire.frame(wire.T_SETLK, 8, b"\0" * 20, handle=1), 8,
     errno.EINVAL, False),
    ("truncated interrupt", wire.frame(wire.T_INTERRUPT, 9, b"\0" * 4), 9, errno.EINVAL, False),
    ("request id 0", wire.frame(wire.T_PING, 0), 0, errno.EINVAL, False),
    ("hello twice", wire.hello(11, "x"), 11, errno.EPROTO, False),
    ("admin frame from guest", wire.frame(wire.T_LIST, 12), 12, errno.EPERM, False),
    ("FILE without fd", wire.file_frame(13, "x"), 13, errno.EBADF, False),
    ("bad lock type", wire.lk(wire.T_SETLK, 14, 1, 0, 1, 77, 0, 9, 1), 14, errno.EINVAL, False),
    ("start > end", wire.lk(wire.T_SETLK, 15, 1, 0, 1, F_WRLCK, 9, 0, 1), 15, errno.EINVAL,
     False),
    ("unknown handle", wire.lk(wire.T_SETLK, 16, 999, 0, 1, F_WRLCK, 0, 9, 1), 16, errno.EINVAL,
     False),
    ("unknown lk_flags", wire.lk(wire.T_SETLK, 17, 1, 0, 1, F_WRLCK, 0, 9, 1, lk_flags=6), 17,
     errno.EINVAL, False),
])
def test_malformed_frames(d, tmp_path, name, data, rid, err, closes):
    r = Raw(d.sock, f"bad-{name.replace(' ', '-')}")
    r.file(str(tmp_path / "f"))  # handle 1
    r.send(data)
    got_rid, status, payload = r.read()
    assert (got_rid, status) == (rid, -err), payload
    assert r.closed(0.3) == closes
    if not closes:
        assert r.call(wire.T_PING)[0] == 0  # the connection still works
    r.close()
    ping_ok(d.sock)


def test_hello_errors(d):
    for hello, err in [
        (wire.frame(wire.T_PING, 1), errno.EPROTO),  # not a hello first
        (wire.frame(wire.T_HELLO, 1, b"NOTMAGIC" + b"\0" * 8 + b"{}"), errno.EPROTO),
        (wire.frame(wire.T_HELLO, 1, wire.HELLO_PREFIX.pack(wire.MAGIC, 1, 0) + b"{bad"),
         errno.EPROTO),
        (wire.hello(1, "x", version=0), errno.EPROTONOSUPPORT),
        (wire.hello(1, "x", role="root"), errno.EINVAL),
        (wire.hello(1, ""), errno.EINVAL),
        (wire.hello(1, "host"), errno.EINVAL),
    ]:
        r = Raw(d.sock, hello=False)
        r.send(hello)
        assert r.read()[1] == -err, hello
        assert r.closed()
        r.close()
    # a newer client version is answered with ours
    r = Raw(d.sock, hello=False)
    r.send(wire.hello(1, "future", version=99))
    rid, status, payload = r.read()
    assert status == 0 and json.loads(payload)["version"] == wire.VERSION
    r.close()
    ping_ok(d.sock)


def test_too_many_fds_closes(d, tmp_path):
    r = Raw(d.sock, "fdflood")
    fds = [os.open(str(tmp_path), os.O_RDONLY) for _ in range(8)]
    try:
        for _ in range(10):
            try:
                r.send(wire.frame(wire.T_PING, 3), fds)  # fds without FILE frames
            except BrokenPipeError:
                break
        assert r.closed()
    finally:
        for fd in fds:
            os.close(fd)
    ping_ok(d.sock)


@settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.one_of(
    st.binary(min_size=1, max_size=300),
    # plausible headers with random types, lengths and bodies
    st.builds(lambda ln, t, rid, h, body: struct.pack("<IIQQIIII", ln, t, rid, h, 0, 0, 0, 0)
              + body,
              st.integers(0, 200), st.sampled_from(sorted(wire.TYPE_NAMES) + [0, 99, 4242]),
              st.integers(0, 2**64 - 1), st.integers(0, 3), st.binary(max_size=120)),
))
def test_hostile_frames(shared_daemon, data):
    d = shared_daemon
    r = Raw(d.sock, "hostile", role="guest")
    try:
        r.send(data)
        # every reply is well formed; what cannot be framed ends the connection
        try:
            while True:
                rid, status, payload = r.read(0.05)
                assert status in (0, wire.STATUS_QUEUED) or -150 < status < 0
        except (EOFError, TimeoutError):
            pass
    finally:
        r.close()
    assert d.proc.poll() is None
    ping_ok(d.sock)


def test_hostile_error_frames_have_messages(d):
    r = Raw(d.sock, "msg")
    r.send(wire.frame(31337, 5))
    rid, status, payload = r.read()
    assert rid == 5 and status == -errno.EOPNOTSUPP and b"unknown frame type" in payload
    r.send(struct.pack("<IIQQIIII", 3, 0, 0, 0, 0, 0, 0, 0))
    rid, status, payload = r.read()
    assert rid == 0 and status == -errno.EPROTO and b"bad frame length" in payload
    assert r.closed()
    r.close()


def test_oversize_frame_fails_its_request_and_the_connection_goes_on(d, tmp_path):
    """A frame over the daemon's limit gets an error reply for its id; the connection
    keeps its framing (the body is skipped however it arrives) and answers what follows,
    and the descriptors sent with the refused frame are not taken for a later FILE."""
    r = Raw(d.sock, "oversize")
    assert r.info["max_frame"] == wire.MAX_FRAME
    big = wire.frame(wire.T_RETURN, 21, b"{" + b" " * (wire.MAX_FRAME + 20_000) + b"}",
                     handle=1)
    # 1. whole, followed by a PING in the same write
    r.send(big + wire.frame(wire.T_PING, 22))
    status, payload = r.expect(21)
    assert status == -errno.EMSGSIZE and b"over" in payload
    assert r.expect(22)[0] == 0
    # 2. in small pieces over many reads, a PING right behind its last byte
    data = wire.frame(wire.T_PING, 23, b"x" * (3 * wire.MAX_FRAME)) + wire.frame(wire.T_PING, 24)
    for i in range(0, len(data), 4000):
        r.send(data[i:i + 4000])
    assert r.expect(23)[0] == -errno.EMSGSIZE
    assert r.expect(24)[0] == 0
    # 3. with descriptors: they go with the refused frame, a later FILE gets its own
    fd = os.open(str(tmp_path / "other"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        r.send(wire.frame(wire.T_RETURN, 25, b"x" * (wire.MAX_FRAME + 1), handle=1), [fd, fd])
    finally:
        os.close(fd)
    assert r.expect(25)[0] == -errno.EMSGSIZE
    assert r.call(wire.T_FILE, b"f")[0] == -errno.EBADF  # no stray descriptor taken
    h = r.file(str(tmp_path / "f"))
    rid = r.lk(wire.T_SETLK, h, F_WRLCK)
    assert r.expect(rid)[0] == 0
    assert not host_can_lock(str(tmp_path / "f"), 0, 10)  # the FILE got its own file
    assert r.call(wire.T_PING)[0] == 0
    r.close()
    refused = d.events("frame_refused")
    assert refused and all(e["max_frame"] == wire.MAX_FRAME for e in refused)
    assert not [e for e in d.events("disconnect") if e.get("guest") == "oversize"
                and e.get("reason") != "closed by peer"]


def test_a_connection_that_keeps_dropping_is_redialled_with_backoff(d):
    """A pending request the daemon cannot frame drops the connection each time it is
    re-sent: the client dials again after a doubling delay, not at once (the gaps
    between its connects are at least the delays: a lower bound, whatever the load)."""
    from procutil import wait_until

    from lockd.daemon.client import REDIAL_MIN, LockClient

    c = LockClient(d.sock, "redial")
    answers = []
    try:
        # Length 12 < the header: the daemon cannot find the next frame and closes.
        c.submit(struct.pack("<IIQQIIII", 12, wire.T_PING, 77, 0, 0, 0, 0, 0), 77,
                 lambda rid, status, payload: answers.append(status), local=None)

        def connects() -> list[float]:
            return [e["ts"] for e in d.events("connect") if e.get("guest") == "redial"]

        assert wait_until(lambda: len(connects()) >= 6, 20)
    finally:
        c.close()
    ts = connects()
    gaps = [b - a for a, b in zip(ts, ts[1:], strict=False)][:5]
    for i, gap in enumerate(gaps):
        assert gap >= REDIAL_MIN * 2 ** i - 0.002, (i, gaps)  # ts has ms resolution
    assert answers == [-errno.ENOLCK]  # closed: the request ends here


def test_a_listing_larger_than_the_output_cap_is_answered(tmp_path):
    """How large a LIST answer is, guests decide (every lock is a row): one answer may
    pass the daemon's output cap; the admin gets it whole and is not dropped."""
    from daemonutil import cli

    d = DaemonProc(str(tmp_path), "--out-cap", "65536").start()
    try:
        r = Raw(d.sock, "many")
        h = r.file(str(tmp_path / "f"))
        n = 5000
        r.send(b"".join(wire.lk(wire.T_SETLK, 1000 + i, h, 0, 1, F_WRLCK, 2 * i, 2 * i, 7)
                        for i in range(n)))
        assert all(r.expect(1000 + i)[0] == 0 for i in range(n))
        out = cli("locks", "--socket", d.sock, "--json")
        assert out.returncode == 0, out.stderr
        rows = json.loads(out.stdout)["locks"]
        assert len(out.stdout) > 4 * 65536
        assert {(x["guest"], x["start"]) for x in rows} == {("many", 2 * i) for i in range(n)}
        assert r.call(wire.T_PING)[0] == 0
        r.close()
    finally:
        assert d.stop() == 0


def test_return_frames_fit_whatever_the_guest_holds():
    """Hand-back frames stay within MAX_FRAME and 16 descriptors however many ranges,
    descriptions and owners there are, and decode to exactly what was handed back."""
    from itertools import count

    from lockd.daemon import delegation

    top = 2**64 - 1
    entries = ([("posix", top, [(2 * i, 2 * i, F_WRLCK) for i in range(9000)], 2**31 - 1)]
               + [("posix", i, [(i, 2**63 - 1, F_RDLCK)], i) for i in range(40)]
               + [("flock", top - 1, [(0, 2**63 - 1, F_WRLCK)], 5)]
               + [("posix", 7 + 2**40, [(3 * i, 3 * i + 1, F_RDLCK) for i in range(3000)], 3)])
    owners = [(top - i, i) for i in range(4000)]
    frames = delegation.return_frames(count(500).__next__, 9, entries, owners)
    got: dict[tuple, list] = {}
    fds = []
    got_owners = []
    for i, (rid, frame, nfds) in enumerate(frames):
        assert rid == 500 + i and len(frame) <= wire.MAX_FRAME and nfds <= 16
        ln, typ, fid, handle = wire.PEEK.unpack_from(frame)
        assert (ln, typ, fid, handle) == (len(frame), wire.T_RETURN, rid, 9)
        locks, more, pairs, final = delegation.parse_return(frame[wire.HEADER_SIZE:])
        assert final == (i == len(frames) - 1) and len(locks) == nfds
        for k, o, rs, p in locks:
            assert (k, o) not in got  # one descriptor per (kind, owner)
            got[(k, o)] = [p, *rs]
            fds.append((k, o))
        for k, o, rs, _pid in more:
            assert (k, o) in got  # continues a description adopted before
            got[(k, o)].extend(rs)
        got_owners += pairs
    assert fds == [(k, o) for k, o, _, _ in entries]  # descriptors in entries order
    assert got == {(k, o): [p, *rs] for k, o, rs, p in entries}
    assert got_owners == owners
    assert len(frames) > 4
