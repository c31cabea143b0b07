"""Live migration in central mode, the daemon's side: two back-ends are one guest for the
length of a migration. The source's LockClient hands its state out
(`migration_state()`), a destination LockClient built from it (`LockClient.takeover`)
takes the guest's session over (a HELLO with "takeover"), and the source is superseded.

Real `vfs-lockd serve` (journal and keeper), real host OFD locks and flocks, real
LockClients as the two back-ends of one guest (no VM: QEMU's part is the other side's),
a host process probing the range the whole time, a third guest probing through the
daemon, a contender of another guest."""

from __future__ import annotations

import array
import contextlib
import errno
import json
import mmap
import os
import socket
import struct
import subprocess
import sys
import threading

import pytest
from daemonutil import DaemonProc, Raw, admin, host_can_lock
from procutil import wait_until

from fuse_server.locks import RemoteLocks
from lockd.api import QUEUED
from lockd.daemon import wire
from lockd.daemon.client import DaemonError, LockClient
from lockd.dispatch import lock_request
from lockd.fuse.codec import CODEC

F_RDLCK, F_WRLCK, F_UNLCK = 0, 1, 2
PID = 4242

# A host process probing the guest's range and its flock: F_OFD_GETLK on its own
# description, and a non-blocking flock on another one, as fast as it can, counting
# every probe and every probe that found the lock free (in a shared page).
PROBER = r"""
import fcntl, mmap, os, struct, sys, threading
F_OFD_GETLK = 36
path, counters = sys.argv[1], sys.argv[2]
cfd = os.open(counters, os.O_RDWR)
page = mmap.mmap(cfd, 24)
stop = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
fd = os.open(path, os.O_RDWR)
ffd = os.open(path, os.O_RDWR)
probes = posix_free = flock_free = 0
while not stop.is_set():
    arg = struct.pack("hhqqi4x", fcntl.F_WRLCK, 0, 0, 10, 0)
    typ = struct.unpack_from("h", fcntl.fcntl(fd, F_OFD_GETLK, arg))[0]
    posix_free += typ == fcntl.F_UNLCK
    try:
        fcntl.flock(ffd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        flock_free += 1
        fcntl.flock(ffd, fcntl.LOCK_UN)
    except BlockingIOError:
        pass
    probes += 1
    struct.pack_into("QQQ", page, 0, probes, posix_free, flock_free)
"""


class Prober:
    """The host prober above, in its own process; `counts()` = (probes, posix free,
    flock free)."""

    def __init__(self, tmp: str, path: str) -> None:
        self.counters = os.path.join(tmp, f"probe-{os.getpid()}-{id(self)}")
        with open(self.counters, "wb") as f:
            f.write(b"\0" * 24)
        self.p = subprocess.Popen([sys.executable, "-c", PROBER, path, self.counters],
                                  stdin=subprocess.PIPE)
        fd = os.open(self.counters, os.O_RDONLY)
        self.page = mmap.mmap(fd, 24, prot=mmap.PROT_READ)
        os.close(fd)

    def counts(self) -> tuple[int, int, int]:
        return struct.unpack_from("QQQ", self.page, 0)

    def more(self, n: int) -> bool:
        """Wait for n more probes than now (the prober runs across what happens)."""
        target = self.counts()[0] + n
        return wait_until(lambda: self.counts()[0] >= target or self.p.poll() is not None, 20)

    def stop(self) -> tuple[int, int, int]:
        if self.p.poll() is None:
            self.p.stdin.close()
            self.p.wait(10)
        return self.counts()


class GuestProber:
    """A third guest asking the daemon (GETLK) over and over; every answer recorded."""

    def __init__(self, sock: str, guest: str, path: str) -> None:
        self.client = LockClient(sock, guest, holder_names=True)  # answers name the holder
        fd = os.open(path, os.O_RDWR)
        try:
            self.ref = self.client.file(fd, path)
        finally:
            os.close(fd)
        self.answers: list[object] = []
        self._stop = threading.Event()
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            r = self.client.getlk(self.client.guest, 1, self.ref, F_WRLCK, 0, 9)
            self.answers.append(r if isinstance(r, int) else r.guest)

    def more(self, n: int) -> bool:
        target = len(self.answers) + n
        return wait_until(lambda: len(self.answers) >= target, 20)

    def stop(self) -> list[object]:
        self._stop.set()
        self.t.join(10)
        self.client.close()
        return self.answers


class Calls:
    """A wait callback recording its answers (either signature)."""

    def __init__(self) -> None:
        self.got: list[tuple] = []
        self.ev = threading.Event()

    def __call__(self, *args: object) -> None:
        self.got.append(args)
        self.ev.set()


@pytest.fixture
def rig(tmp_path):
    """A daemon, the clients and processes a test starts: all stopped at the end."""
    things: dict = {"daemons": [], "clients": [], "procs": [], "fds": []}

    def daemon(*extra: str) -> DaemonProc:
        d = DaemonProc(str(tmp_path), *extra).start()
        things["daemons"].append(d)
        return d

    def client(c: object) -> object:
        things["clients"].append(c)
        return c

    def fd(path: str) -> int:
        f = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        things["fds"].append(f)
        return f

    def each(items: list, *calls: str) -> None:
        for x in items:  # one failing teardown must not leave the others running
            for name in calls:
                with contextlib.suppress(Exception):
                    getattr(x, name, lambda: None)()

    try:
        yield daemon, client, fd, things
    finally:
        each(things["procs"], "stop")
        each(things["clients"], "cancel_migration", "close")
        each(things["daemons"], "stop")
        for f in things["fds"]:
            os.close(f)


def _gb_holds(d: DaemonProc, client, fd, path: str) -> tuple:  # noqa: ANN001 - rig's
    """Another guest, gb, holding a write lock on [0, 9] of path: the contender."""
    gb = client(LockClient(d.sock, "gb"))
    refb = gb.file(fd(path), path)
    assert gb.setlk("gb", 1, refb, F_WRLCK, 0, 9, PID) == 0
    return gb, refb


def _listed(d: DaemonProc) -> tuple[set, list]:
    """The daemon's table: ({(guest, owner, start, end)} held, [waiting guest, ...])."""
    snap = admin(d, wire.T_LIST)
    held = {(lk["guest"], lk["owner"], lk["start"], lk["end"]) for lk in snap["locks"]
            if lk.get("kind", "posix") == "posix"}
    return held, [w["guest"] for w in snap["waiters"]]


def _connects(d: DaemonProc, guest: str) -> list[dict]:
    return [e for e in d.events("connect") if e.get("guest") == guest]


def test_takeover_keeps_locks_and_the_wait_in_its_place(tmp_path, rig):
    daemon, client, fd, things = rig
    path = str(tmp_path / "data")
    d = daemon()
    src = client(LockClient(d.sock, "ga"))
    ref = src.file(fd(path), path)
    assert src.setlk("ga", 1, ref, F_WRLCK, 0, 9, PID) == 0
    assert src.flock("ga", 7, ref, F_WRLCK, PID, False) == 0
    src_cb = Calls()
    assert src.setlkw("ga", 2, ref, F_WRLCK, 0, 9, PID, src_cb) == QUEUED
    gb = client(LockClient(d.sock, "gb"))
    refb = gb.file(fd(path), path)
    b_cb = Calls()
    assert gb.setlkw("gb", 1, refb, F_WRLCK, 0, 9, PID, b_cb) == QUEUED  # behind ga's wait
    assert _listed(d)[1] == ["ga", "gb"]
    host = Prober(str(tmp_path), path)
    things["procs"].append(host)
    third = GuestProber(d.sock, "gc", path)
    things["procs"].append(third)
    assert host.more(50) and third.more(5)

    state = json.loads(json.dumps(src.migration_state()))  # plain data, as it travels
    assert state["guest"] == "ga" and len(state["waits"]) == 1
    wait = state["waits"][0]
    assert (wait["nodeid"], wait["owner"], wait["start"], wait["end"], wait["type"]) == \
        (ref.handle, 2, 0, 9, F_WRLCK)
    # The destination, with descriptors of its own, connects only when told to.
    dst = client(LockClient.takeover(d.sock, state, {ref.handle: fd(path)}))
    dst_cb = Calls()
    dst.attach_waits(dst_cb)
    assert len(_connects(d, "ga")) == 1 and not src.superseded
    assert src.ping() == 0
    assert host.more(50)

    info = dst.take_over()
    assert info["resumed"] and info["takeover"] and info["pending"] == [wait["id"]]
    assert info["session"] != state["session"]  # the source's token is spent
    assert wait_until(lambda: src.superseded, 10)
    assert host.more(50) and third.more(5)
    # Never free, never granted, at any probe, across the switch.
    probes, posix_free, flock_free = host.counts()
    assert probes >= 150 and posix_free == 0 and flock_free == 0
    assert third.answers and all(a == "ga" for a in third.answers), set(third.answers)
    assert not b_cb.got and not src_cb.got and not dst_cb.got
    held, waiting = _listed(d)
    assert ("ga", 1, 0, 9) in held and waiting == ["ga", "gb"]

    # Until the guest unlocks, the host never saw the range or the flock free.
    assert host.stop()[1:] == (0, 0)
    # The holder unlocks at the destination: the wait queued at the source is granted
    # there, ahead of gb's.
    dref = dst.register(ref.handle, fd(path))  # registered already: the same file
    assert dref.handle == ref.handle
    assert dst.setlk("ga", 1, dref, F_UNLCK, 0, 9, PID) == 0
    assert dst_cb.ev.wait(10)
    assert dst_cb.got == [(wait["id"], 0, b"")]
    assert not b_cb.got and not src_cb.got
    assert third.more(3) and all(a == "ga" for a in third.answers)
    assert dst.setlk("ga", 2, dref, F_UNLCK, 0, 9, PID) == 0
    assert b_cb.ev.wait(10) and b_cb.got == [(0,)]
    third.stop()
    assert not host_can_lock(path, 0, 0, mode="flock")  # ga's flock moved too
    dst.release_flock("ga", 7)
    assert host_can_lock(path, 0, 0, mode="flock")


def test_superseded_source_changes_nothing(tmp_path, rig):
    daemon, client, fd, things = rig
    path = str(tmp_path / "data")
    d = daemon()
    src = client(LockClient(d.sock, "ga"))
    token = src.info["session"]
    ref = src.file(fd(path), path)
    assert src.setlk("ga", 1, ref, F_WRLCK, 0, 9, PID) == 0
    locks = RemoteLocks(src, "ga", lambda fh: None, lambda b: None)  # its FUSE side
    state = src.migration_state()
    dst = client(LockClient.takeover(d.sock, state, {ref.handle: fd(path)}))
    dst.take_over()
    assert wait_until(lambda: src.superseded, 10)
    # Its requests are refused here, its session end and its close release nothing.
    with pytest.raises(OSError) as e:
        src.setlk("ga", 1, ref, F_UNLCK, 0, 9, PID)
    assert e.value.errno == errno.ESTALE
    locks.end()
    src.close()
    assert src.reconnects == 0
    # Its token takes nothing back, with or without "takeover".
    for extra in ({}, {"takeover": True}):
        r = Raw(d.sock, hello=False)
        r.send(wire.hello(1, "ga", "guest", token, **extra))
        rid, status, payload = r.read()
        assert status == -errno.ESTALE, payload
        assert r.closed()
        r.close()
    # Without a token: refused while the destination is connected (as before).
    r = Raw(d.sock, hello=False)
    r.send(wire.hello(1, "ga", "guest", None))
    assert r.read()[1] == -errno.EBUSY
    r.close()
    assert not host_can_lock(path, 0, 10)
    assert ("ga", 1, 0, 9) in _listed(d)[0]
    assert len(_connects(d, "ga")) == 2  # the source's and the destination's, no more
    dref = dst.register(ref.handle, fd(path))
    assert dst.setlk("ga", 1, dref, F_UNLCK, 0, 9, PID) == 0
    assert host_can_lock(path, 0, 10)


def test_raw_source_frames_after_takeover_change_nothing(tmp_path, rig):
    """A source speaking the wire protocol itself: after the takeover its connection is
    told (STATUS_SUPERSEDED) and closed; an unlock it sends then does nothing."""
    daemon, client, fd, things = rig
    path = str(tmp_path / "data")
    d = daemon()
    r = Raw(d.sock, "gr")
    h = r.file(path)
    assert r.expect(r.lk(wire.T_SETLK, h, F_WRLCK, 0, 9))[0] == 0
    st = os.stat(path)
    state = {"version": 1, "guest": "gr", "session": r.info["session"], "limits": {},
             "files": [{"nodeid": h, "dev": st.st_dev, "ino": st.st_ino, "path": path}],
             "waits": [], "next_id": 1 << 62}
    dst = client(LockClient.takeover(d.sock, state, {h: fd(path)}))
    dst.take_over()
    rid, status, payload = r.read()
    assert (rid, status) == (0, wire.STATUS_SUPERSEDED), payload
    try:
        r.send(wire.lk(wire.T_SETLK, 900, h, 0, 1, F_UNLCK, 0, 9, PID))
        r.send(wire.frame(wire.T_DESTROY, 901))
    except OSError:
        pass  # closed already
    assert r.closed()
    r.close()
    assert not host_can_lock(path, 0, 10)
    assert ("gr", 1, 0, 9) in _listed(d)[0]


def test_wait_answered_during_the_switch_reaches_the_destination(tmp_path, rig):
    """Granted on the source's connection after its state went out, before the
    takeover: the daemon answers it again on the destination's."""
    daemon, client, fd, things = rig
    path = str(tmp_path / "data")
    d = daemon()
    gb, refb = _gb_holds(d, client, fd, path)
    src = client(LockClient(d.sock, "ga"))
    ref = src.file(fd(path), path)
    src_cb = Calls()
    assert src.setlkw("ga", 1, ref, F_WRLCK, 0, 9, PID, src_cb) == QUEUED
    state = src.migration_state()
    assert gb.setlk("gb", 1, refb, F_UNLCK, 0, 9, PID) == 0
    assert src_cb.ev.wait(10)  # the source got it (its guest is stopped: never sees it)
    dst = client(LockClient.takeover(d.sock, state, {ref.handle: fd(path)}))
    dst_cb = Calls()
    dst.attach_waits(dst_cb)
    info = dst.take_over()
    assert info["replayed"] == [state["waits"][0]["id"]] and info["pending"] == []
    assert dst_cb.ev.wait(10) and dst_cb.got == [(state["waits"][0]["id"], 0, b"")]
    assert not host_can_lock(path, 0, 10)
    assert _listed(d)[0] == {("ga", 1, 0, 9)}


DESTINATION = r"""
import json, os, sys
sys.path.insert(0, sys.argv[3])
from lockd.daemon.client import LockClient
state = json.loads(sys.argv[2])
fds = {f["nodeid"]: os.open(f["path"], os.O_RDWR) for f in state["files"]}
c = LockClient.takeover(sys.argv[1], state, fds)
print("prepared", flush=True)
sys.stdin.read()
"""


def test_destination_that_never_takes_over_leaves_the_source_untouched(tmp_path, rig):
    daemon, client, fd, things = rig
    path = str(tmp_path / "data")
    d = daemon()
    src = client(LockClient(d.sock, "ga"))
    ref = src.file(fd(path), path)
    assert src.setlk("ga", 1, ref, F_WRLCK, 0, 9, PID) == 0
    src_cb = Calls()
    assert src.setlkw("ga", 2, ref, F_WRLCK, 0, 9, PID, src_cb) == QUEUED
    state = src.migration_state()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    dest = subprocess.Popen([sys.executable, "-c", DESTINATION, d.sock, json.dumps(state),
                             root], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert dest.stdout.readline().strip() == "prepared"
    finally:
        dest.kill()  # the migration fails: the destination dies before taking over
        dest.wait(10)
    src.cancel_migration()  # the source runs on
    assert not src.superseded and src.ping() == 0
    assert not any(e.get("pid") == dest.pid for e in d.events("connect"))
    assert not host_can_lock(path, 0, 10)
    assert src.setlk("ga", 1, ref, F_UNLCK, 0, 9, PID) == 0
    assert src_cb.ev.wait(10) and src_cb.got == [(0,)]  # granted at the source
    assert src.setlk("ga", 3, ref, F_WRLCK, 20, 29, PID) == 0
    src.close()  # its end releases as always
    assert wait_until(lambda: host_can_lock(path, 0, 30), 10)


def test_wrong_token_is_refused_and_takeover_needs_one(tmp_path, rig):
    daemon, client, fd, things = rig
    path = str(tmp_path / "data")
    d = daemon()
    src = client(LockClient(d.sock, "ga"))
    ref = src.file(fd(path), path)
    assert src.setlk("ga", 1, ref, F_WRLCK, 0, 9, PID) == 0
    state = src.migration_state()
    bad = dict(state, session="0" * 32)
    dst = client(LockClient.takeover(d.sock, bad, {ref.handle: fd(path)}))
    with pytest.raises(DaemonError) as e:
        dst.take_over()
    assert e.value.errno == errno.EACCES
    r = Raw(d.sock, hello=False)  # "takeover" without a token: the old refusal
    r.send(wire.hello(1, "ga", "guest", None, takeover=True))
    assert r.read()[1] == -errno.EBUSY
    r.close()
    assert not src.superseded and src.ping() == 0
    assert not host_can_lock(path, 0, 10)
    # A descriptor of another file is not taken for the source's.
    other = str(tmp_path / "other")
    with pytest.raises(OSError) as e:
        LockClient.takeover(d.sock, state, {ref.handle: fd(other)})
    assert e.value.errno == errno.ESTALE
    src.cancel_migration()


def test_there_and_back_again(tmp_path, rig):
    daemon, client, fd, things = rig
    path = str(tmp_path / "data")
    d = daemon()
    gb, refb = _gb_holds(d, client, fd, path)
    a1 = client(LockClient(d.sock, "ga"))
    ref = a1.file(fd(path), path)
    assert a1.setlk("ga", 1, ref, F_WRLCK, 20, 29, PID) == 0
    assert a1.setlkw("ga", 2, ref, F_WRLCK, 0, 9, PID, Calls()) == QUEUED
    host = Prober(str(tmp_path), str(tmp_path / "data"))
    things["procs"].append(host)
    a2 = client(LockClient.takeover(d.sock, a1.migration_state(), {ref.handle: fd(path)}))
    a2.attach_waits(Calls())
    a2.take_over()
    assert wait_until(lambda: a1.superseded, 10)
    state2 = json.loads(json.dumps(a2.migration_state()))
    assert [w["id"] for w in state2["waits"]] == a2.info["pending"]
    a3 = client(LockClient.takeover(d.sock, state2, {ref.handle: fd(path)}))
    back = Calls()
    a3.attach_waits(back)
    a3.take_over()
    assert wait_until(lambda: a2.superseded, 10)
    a1.close()
    a2.close()
    assert host.more(50)
    assert host.stop()[1] == 0
    assert not host_can_lock(path, 20, 10)
    assert gb.setlk("gb", 1, refb, F_UNLCK, 0, 9, PID) == 0
    assert back.ev.wait(10) and back.got == [(state2["waits"][0]["id"], 0, b"")]
    assert _listed(d)[0] == {("ga", 1, 20, 29), ("ga", 2, 0, 9)}


def test_daemon_restart_after_takeover(tmp_path, rig):
    daemon, client, fd, things = rig
    path = str(tmp_path / "data")
    d = daemon()
    gb = client(LockClient(d.sock, "gb", reconnect_timeout=30))
    refb = gb.file(fd(path), path)
    assert gb.setlk("gb", 1, refb, F_WRLCK, 0, 9, PID) == 0
    src = client(LockClient(d.sock, "ga"))
    ref = src.file(fd(path), path)
    assert src.setlk("ga", 1, ref, F_WRLCK, 20, 29, PID) == 0
    assert src.setlkw("ga", 2, ref, F_WRLCK, 0, 9, PID, Calls()) == QUEUED
    dst = client(LockClient.takeover(d.sock, src.migration_state(), {ref.handle: fd(path)},
                                     reconnect_timeout=30))
    dst_cb = Calls()
    dst.attach_waits(dst_cb)
    dst.take_over()
    assert wait_until(lambda: src.superseded, 10)
    d.kill9()
    assert not host_can_lock(path, 20, 10)  # the keeper holds it meanwhile
    d = daemon()
    assert wait_until(lambda: dst.reconnects >= 1 and gb.reconnects >= 1, 20)
    assert not host_can_lock(path, 20, 10)
    assert wait_until(lambda: _listed(d)[1] == ["ga"], 10)  # the wait, sent again, once
    assert not dst_cb.got
    assert gb.setlk("gb", 1, refb, F_UNLCK, 0, 9, PID) == 0
    assert dst_cb.ev.wait(10) and dst_cb.got[0][1:] == (0, b"")
    assert _listed(d)[0] == {("ga", 1, 20, 29), ("ga", 2, 0, 9)}
    assert src.reconnects == 0


def test_takeover_recalls_a_delegation_first(tmp_path, rig):
    """A file decided in the source's server (delegated) comes back to the daemon, its
    lock with it, before the session moves."""
    daemon, client, fd, things = rig
    path = str(tmp_path / "data")
    d = daemon()
    src = client(LockClient(d.sock, "ga", delegation=True))
    f = fd(path)
    replies: list[bytes] = []
    locks = RemoteLocks(src, "ga", lambda fh, nodeid=None: f, replies.append)
    frame = wire.lk(wire.T_SETLK, 11, 5, 3, 77, F_WRLCK, 0, 9, PID)
    reply = locks.handle(lock_request(CODEC.decode(frame), frame))
    assert reply is not None and wire.REPLY.unpack_from(reply)[1] == 0
    assert src.delegated(5)  # decided in the source's server
    host = Prober(str(tmp_path), path)
    things["procs"].append(host)
    state = src.migration_state()
    assert state["files"][0]["delegated"]
    dst = client(LockClient.takeover(d.sock, state, {5: fd(path)}))
    dst.take_over()
    assert wait_until(lambda: src.superseded, 10)
    assert not src.delegated(5)
    assert host.more(50)
    assert host.stop()[1] == 0
    held, _ = _listed(d)
    assert ("ga", 77, 0, 9) in held  # the daemon's now
    assert any(e.get("guest") == "ga" for e in d.events("takeover_delayed"))
    locks.end()  # the source's end: nothing released
    assert not host_can_lock(path, 0, 10)
    dref = dst.register(5, fd(path))
    assert dst.setlk("ga", 77, dref, F_UNLCK, 0, 9, PID) == 0
    assert host_can_lock(path, 0, 10)


def test_source_ending_first_waits_for_the_takeover(tmp_path, rig):
    """QEMU may close the source before the destination takes over: the source's end
    and close wait for the takeover instead of releasing the guest's locks."""
    daemon, client, fd, things = rig
    path = str(tmp_path / "data")
    d = daemon()
    src = client(LockClient(d.sock, "ga"))
    ref = src.file(fd(path), path)
    assert src.setlk("ga", 1, ref, F_WRLCK, 0, 9, PID) == 0
    locks = RemoteLocks(src, "ga", lambda fh, nodeid=None: None, lambda b: None)
    host = Prober(str(tmp_path), path)
    things["procs"].append(host)
    state = src.migration_state()
    locks.end()  # the source's FUSE session ends (QEMU closed it)
    closer = threading.Thread(target=src.close)  # and its process goes away
    closer.start()
    assert host.more(50)
    assert closer.is_alive() and not host_can_lock(path, 0, 10)
    dst = client(LockClient.takeover(d.sock, state, {ref.handle: fd(path)}))
    dst.take_over()
    closer.join(10)
    assert not closer.is_alive() and src.superseded
    assert host.more(50)
    assert host.stop()[1] == 0
    assert _listed(d)[0] == {("ga", 1, 0, 9)}


def test_source_ending_without_takeover_releases_after_the_handoff_time(tmp_path, rig):
    daemon, client, fd, things = rig
    path = str(tmp_path / "data")
    d = daemon()
    src = client(LockClient(d.sock, "ga", handoff_timeout=0.5))
    ref = src.file(fd(path), path)
    assert src.setlk("ga", 1, ref, F_WRLCK, 0, 9, PID) == 0
    locks = RemoteLocks(src, "ga", lambda fh, nodeid=None: None, lambda b: None)
    src.migration_state()
    locks.end()  # nobody takes over: after handoff_timeout, the end goes through
    assert wait_until(lambda: host_can_lock(path, 0, 10), 10)
    assert not src.superseded


def test_fuse_wait_is_answered_by_the_destination_session(tmp_path, rig):
    """As a FUSE server uses it: the guest's SETLKW forwarded by the source's
    RemoteLocks, answered (its FUSE unique) through the destination's RemoteLocks."""
    daemon, client, fd, things = rig
    path = str(tmp_path / "data")
    d = daemon()
    gb, refb = _gb_holds(d, client, fd, path)
    src = client(LockClient(d.sock, "ga"))
    f = fd(path)
    src_replies: list[bytes] = []
    src_locks = RemoteLocks(src, "ga", lambda fh, nodeid=None: f, src_replies.append)
    frame = wire.lk(wire.T_SETLKW, 21, 9, 3, 77, F_WRLCK, 0, 9, PID)
    assert src_locks.handle(lock_request(CODEC.decode(frame), frame)) is None  # answered later
    assert wait_until(lambda: _listed(d)[1] == ["ga"], 10)
    state = src.migration_state()
    assert [(w["id"], w["nodeid"], w["owner"]) for w in state["waits"]] == [(21, 9, 77)]
    # A back-end made before it knew it would be a migration's destination.
    dst = client(LockClient(d.sock, "ga", dial=False))
    with pytest.raises(ValueError):
        dst.adopt_migration(dict(state, guest="gz"), {9: fd(path)})
    dst.adopt_migration(state, {9: fd(path)})
    dst_replies: list[bytes] = []
    dst_locks = RemoteLocks(dst, "ga", lambda fh, nodeid=None: f, dst_replies.append)
    dst_locks.resume_waits()
    dst.take_over()
    src_locks.end()
    assert gb.setlk("gb", 1, refb, F_UNLCK, 0, 9, PID) == 0
    assert wait_until(lambda: dst_replies, 10)
    assert [wire.REPLY.unpack_from(r)[1:] for r in dst_replies] == [(0, 21)]
    assert not src_replies
    assert _listed(d)[0] == {("ga", 77, 0, 9)}


def test_a_backend_that_was_no_destination_connects_as_usual(tmp_path, rig):
    daemon, client, fd, things = rig
    path = str(tmp_path / "data")
    d = daemon()
    c = client(LockClient(d.sock, "ga", dial=False))
    assert not _connects(d, "ga")  # nothing until told
    c.connect()
    ref = c.file(fd(path), path)
    assert c.setlk("ga", 1, ref, F_WRLCK, 0, 9, PID) == 0
    assert not host_can_lock(path, 0, 10)
    assert len(_connects(d, "ga")) == 1


def test_takeover_of_a_session_kept_by_guest_grace(tmp_path, rig):
    """The source's connection went first (a crash of its back-end) and --guest-grace
    keeps the session: the destination takes it over all the same, a wait granted
    meanwhile included."""
    daemon, client, fd, things = rig
    path = str(tmp_path / "data")
    d = daemon("--guest-grace", "60")
    gb, refb = _gb_holds(d, client, fd, path)
    src = client(LockClient(d.sock, "ga"))
    ref = src.file(fd(path), path)
    assert src.setlk("ga", 1, ref, F_WRLCK, 20, 29, PID) == 0
    assert src.setlkw("ga", 2, ref, F_WRLCK, 0, 9, PID, Calls()) == QUEUED
    state = src.migration_state()
    src.cancel_migration()
    src.close()  # gone without a takeover: the daemon keeps the session (grace)
    assert wait_until(lambda: any(e.get("guest") == "ga" for e in d.events("disconnect")))
    assert gb.setlk("gb", 1, refb, F_UNLCK, 0, 9, PID) == 0  # granted while away
    assert wait_until(lambda: ("ga", 2, 0, 9) in _listed(d)[0], 10)
    dst = client(LockClient.takeover(d.sock, state, {ref.handle: fd(path)}))
    got = Calls()
    dst.attach_waits(got)
    info = dst.take_over()
    assert info["resumed"] and info["takeover"]
    assert got.ev.wait(10) and got.got == [(state["waits"][0]["id"], 0, b"")]
    assert _listed(d)[0] == {("ga", 1, 20, 29), ("ga", 2, 0, 9)}
    assert not host_can_lock(path, 0, 30)


class Relay:
    """A Unix socket relay between a client and the daemon that can lose what the daemon
    sends (`mute`) and turn new connections away (`refuse`): the source's notice lost,
    as when its back-end did not read it before the daemon went."""

    def __init__(self, path: str, upstream: str) -> None:
        self.path, self.upstream = path, upstream
        self.muted = threading.Event()
        self.refusing = threading.Event()
        self.ended = threading.Event()  # a relayed connection ended
        self.ls = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.ls.bind(path)
        self.ls.listen(8)
        self.socks: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                c, _ = self.ls.accept()
            except OSError:
                return
            self.socks.append(c)
            if self.refusing.is_set():
                c.close()
                continue
            u = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                u.connect(self.upstream)
            except OSError:
                c.close()
                continue
            self.socks.append(u)
            threading.Thread(target=self._pump, args=(c, u, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(u, c, True), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, down: bool) -> None:
        while True:
            try:
                fds: list[int] = []
                data, anc, _, _ = src.recvmsg(65536, socket.CMSG_SPACE(64 * 4))
                for level, kind, payload in anc:
                    if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                        fds += array.array("i", payload[:len(payload) - len(payload) % 4])
            except OSError:
                data = b""
            if not data:
                break
            try:
                if down and self.muted.is_set():
                    continue
                if fds:
                    dst.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                          array.array("i", fds).tobytes())])
                else:
                    dst.sendall(data)
            except OSError:
                break
            finally:
                for f in fds:
                    os.close(f)
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
        self.ended.set()

    def stop(self) -> None:
        self.ls.close()
        for s in self.socks:
            with contextlib.suppress(OSError):
                s.close()


@pytest.mark.parametrize("restart", [False, True], ids=["daemon-up", "daemon-restarted"])
def test_source_that_missed_the_notice_never_takes_the_session_back(tmp_path, rig, restart):
    """The source's notice is lost and its connection drops: it dials again with its
    old token. The daemon says ESTALE; after a restart (the old token unknown) EACCES.
    Either way the source stops there: it neither resumes nor starts a new session
    (which would report the guest's locks lost and end the destination's session)."""
    daemon, client, fd, things = rig
    path = str(tmp_path / "data")
    d = daemon()
    relay = Relay(str(tmp_path / "relay.sock"), d.sock)
    things["procs"].append(relay)
    src = client(LockClient(relay.path, "ga", reconnect_timeout=30))
    ref = src.file(fd(path), path)
    assert src.setlk("ga", 1, ref, F_WRLCK, 0, 9, PID) == 0
    state = src.migration_state()
    relay.muted.set()  # the notice will not reach the source
    relay.refusing.set()  # nor will its next dials, for now
    dst = client(LockClient.takeover(d.sock, state, {ref.handle: fd(path)},
                                     reconnect_timeout=30))
    dst.take_over()
    assert relay.ended.wait(10)  # the daemon closed the source's connection
    if restart:
        d.kill9()
        d = daemon()
        assert wait_until(lambda: dst.reconnects >= 1, 20)
    relay.muted.clear()
    relay.refusing.clear()
    assert wait_until(lambda: src.superseded, 20)
    assert src.reconnects == 0
    assert not d.events("session_lost") and not d.events("session_end")
    assert ("ga", 1, 0, 9) in _listed(d)[0]
    assert not host_can_lock(path, 0, 10)
    dref = dst.register(ref.handle, fd(path))
    assert dst.setlk("ga", 1, dref, F_UNLCK, 0, 9, PID) == 0
    assert host_can_lock(path, 0, 10)
