"""`vfs-lockd serve` with real processes: guests (LockClient in separate processes), raw
protocol clients, host processes, the admin CLI, restarts and kills."""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import stat
import tempfile
import time

import pytest
from daemonutil import (
    F_RDLCK,
    F_UNLCK,
    F_WRLCK,
    Agent,
    DaemonProc,
    HostHolder,
    Raw,
    cli,
    host_can_lock,
    host_getlk_pid,
)
from procutil import wait_until

from lockd.daemon import wire

QUEUED = -1


@pytest.fixture
def agents():
    started: list[Agent] = []

    def make(sock: str, guest: str, *opts: str) -> Agent:
        a = Agent(sock, guest, *opts)
        started.append(a)
        return a

    try:
        yield make
    finally:
        for a in started:
            a.kill()


def snapshot(sock: str) -> dict:
    r = cli("locks", "--socket", sock, "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_socket_mode_and_cross_guest_conflicts(daemon, agents, tmp_path):
    assert stat.S_IMODE(os.stat(daemon.sock).st_mode) == 0o600
    path = str(tmp_path / "shared")
    a, b = agents(daemon.sock, "g-a"), agents(daemon.sock, "g-b")
    assert a.do("file", path=path) == 0 and b.do("file", path=path) == 0
    assert a.do("setlk", type=F_WRLCK, start=0, end=9, pid=111) == 0
    # the other guest conflicts, and GETLK names the holder's guest and pid
    assert b.do("setlk", type=F_RDLCK, start=5, end=20) == errno.EAGAIN
    assert b.do("getlk", type=F_WRLCK, start=5, end=20) == {
        "type": F_WRLCK, "start": 0, "end": 9, "pid": 111, "guest": "g-a"}
    assert b.do("setlk", type=F_WRLCK, start=10, end=20) == 0
    # host processes conflict with daemon-held locks (OFD locks: kernel reports pid -1)
    assert not host_can_lock(path, 0, 10)
    assert host_getlk_pid(path, 0, 10) == -1
    assert host_can_lock(path, 30, 10)
    # and guests conflict with host locks
    h = HostHolder(path, 40, 10)
    assert h.locked
    assert a.do("setlk", type=F_WRLCK, start=45, end=45) == errno.EAGAIN
    h.release()
    assert a.do("setlk", type=F_WRLCK, start=45, end=45) == 0
    # flock across guests
    assert a.do("flock", type=F_WRLCK, fh=7) == 0
    assert b.do("flock", type=F_WRLCK, fh=7) == errno.EAGAIN
    assert not host_can_lock(path, mode="flock")
    # release_owner (FLUSH) frees the owner's POSIX locks
    a.do("release_owner", owner=1)
    assert b.do("setlk", type=F_WRLCK, start=0, end=9) == 0


def test_wait_granted_across_connections(daemon, agents, tmp_path):
    path = str(tmp_path / "f")
    a, b = agents(daemon.sock, "g-a"), agents(daemon.sock, "g-b")
    a.do("file", path=path)
    b.do("file", path=path)
    assert a.do("setlk", type=F_WRLCK) == 0
    assert b.do("setlkw", type=F_WRLCK, tag=5) == QUEUED
    assert b.do("flock", type=F_WRLCK, fh=3) == 0
    assert a.do("flock", type=F_RDLCK, fh=4, wait=True, tag=6) == QUEUED
    # Both waits are in the daemon's queues, and neither was answered.
    assert len(snapshot(daemon.sock)["waiters"]) == 2
    assert not b.events and not a.events
    assert a.do("setlk", type=F_UNLCK) == 0
    assert b.event() == {"event": "wait", "tag": 5, "err": 0}
    assert not host_can_lock(path, 0, 10)
    # cancellation by tag (FUSE_INTERRUPT) answers EINTR
    assert a.do("setlkw", type=F_RDLCK, tag=9) == QUEUED
    assert a.do("cancel_tag", tag=9) is True
    assert a.event() == {"event": "wait", "tag": 9, "err": errno.EINTR}
    # deadlock across guests: a waits for b, then b would wait for a
    assert a.do("setlk", type=F_WRLCK, start=100, end=100) == 0
    assert a.do("setlkw", type=F_WRLCK, tag=10) == QUEUED
    assert b.do("setlkw", type=F_WRLCK, start=100, end=100, tag=11) == errno.EDEADLK
    # b releasing its flock grants a's queued flock wait
    b.do("flock", type=F_UNLCK, fh=3)
    assert a.event() == {"event": "wait", "tag": 6, "err": 0}


def test_client_dying_mid_wait(daemon, agents, tmp_path):
    path = str(tmp_path / "f")
    a, b, c = (agents(daemon.sock, g) for g in ("g-a", "g-b", "g-c"))
    for x in (a, b, c):
        x.do("file", path=path)
    assert a.do("setlk", type=F_WRLCK) == 0
    assert b.do("setlkw", type=F_WRLCK, tag=1) == QUEUED
    assert c.do("setlkw", type=F_WRLCK, tag=2) == QUEUED
    assert {w["guest"] for w in snapshot(daemon.sock)["waiters"]} == {"g-b", "g-c"}
    b.kill()
    assert wait_until(lambda: [w["guest"] for w in snapshot(daemon.sock)["waiters"]] == ["g-c"])
    assert a.do("setlk", type=F_UNLCK) == 0
    assert c.event() == {"event": "wait", "tag": 2, "err": 0}
    snap = snapshot(daemon.sock)
    assert [(lk["guest"], lk["type"]) for lk in snap["locks"]] == [("g-c", "WRITE")]
    assert not snap["waiters"]


def test_admin_verbs(daemon, agents, tmp_path):
    path = str(tmp_path / "f")
    a, b = agents(daemon.sock, "g-a"), agents(daemon.sock, "g-b")
    a.do("file", path=path)
    b.do("file", path=path)
    assert a.do("setlk", type=F_WRLCK, start=0, end=99, pid=321) == 0
    assert b.do("setlkw", type=F_RDLCK, start=50, end=60, tag=4) == QUEUED
    r = cli("locks", "--socket", daemon.sock)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["GUEST", "PID", "OWNER", "KIND", "TYPE", "START", "END",
                                "PATH", "WAITING-FOR"]
    assert any(ln.split()[:7] == ["g-a", "321", "0x1", "posix", "WRITE", "0", "99"]
               for ln in lines)
    waiter = [ln for ln in lines if ln.startswith("g-b")]
    assert waiter and "g-a" in waiter[0].split()[-3]
    st = json.loads(cli("status", "--socket", daemon.sock, "--json").stdout)
    assert sorted(g["guest"] for g in st["guests"]) == ["g-a", "g-b"]
    assert st["stats"]["held_locks"] == 1 and st["stats"]["waiters"] == 1
    assert st["journal"].endswith("journal.db") and st["uptime"] > 0
    assert "guests:     2" in cli("status", "--socket", daemon.sock).stdout
    # cancel the wait by id: the waiter gets EINTR
    wid = snapshot(daemon.sock)["waiters"][0]["id"]
    r = cli("cancel", "--socket", daemon.sock, "--wait", str(wid))
    assert r.returncode == 0, r.stderr
    assert b.event() == {"event": "wait", "tag": 4, "err": errno.EINTR}
    assert cli("cancel", "--socket", daemon.sock, "--wait", str(wid)).returncode == 1
    # evict: the guest's locks are gone, host processes can lock again
    assert not host_can_lock(path, 0, 10)
    r = cli("evict", "--socket", daemon.sock, "--guest", "g-a")
    assert r.returncode == 0, r.stderr
    assert host_can_lock(path, 0, 10)
    assert cli("evict", "--socket", daemon.sock, "--guest", "nobody").returncode == 1
    snap = snapshot(daemon.sock)
    assert not any(lk["guest"] == "g-a" for lk in snap["locks"])
    # unreachable daemon: clear error, exit 1
    for verb in (["locks"], ["status"], ["evict", "--guest", "x"], ["cancel", "--wait", "1"]):
        r = cli(*verb, "--socket", str(tmp_path / "nope.sock"))
        assert r.returncode == 1 and "cannot reach vfs-lockd" in r.stderr, r


def test_second_connection_for_live_guest_refused(daemon, agents, tmp_path):
    a = agents(daemon.sock, "g-a")
    a.do("file", path=str(tmp_path / "f"))
    r = Raw(daemon.sock, hello=False)
    r.send(wire.hello(1, "g-a"))
    rid, status, payload = r.read()
    assert (rid, status) == (1, -errno.EBUSY) and b"already connected" in payload
    assert r.closed()
    assert a.do("setlk", type=F_WRLCK) == 0  # the live one is untouched
    assert daemon.events("refused")[0]["guest"] == "g-a"


def test_socket_permissions(tmp_path):
    # The socket lives in a directory others can traverse, so only its mode protects it.
    sockdir = tempfile.mkdtemp(prefix="lockd-perm-")
    os.chmod(sockdir, 0o755)
    d = DaemonProc(str(tmp_path), socket_path=os.path.join(sockdir, "s")).start()
    try:
        assert stat.S_IMODE(os.stat(d.sock).st_mode) == 0o600

        def as_nobody(chmod_first: bool) -> str:
            r, w = os.pipe()
            pid = os.fork()
            if pid == 0:
                os.close(r)
                try:
                    os.setgid(65534)
                    os.setuid(65534)
                    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    s.settimeout(5)
                    try:
                        s.connect(d.sock)
                        try:  # the daemon may refuse before reading the hello
                            s.sendall(wire.hello(1, "intruder"))
                        except BrokenPipeError:
                            pass
                        data = s.recv(4096)
                        res = f"reply {wire.REPLY.unpack_from(data)[1]}" if data else "closed"
                    except OSError as exc:
                        res = f"oserror {exc.errno}"
                    os.write(w, res.encode())
                finally:
                    os._exit(0)
            os.close(w)
            out = os.read(r, 100).decode()
            os.close(r)
            os.waitpid(pid, 0)
            return out

        assert as_nobody(False) == f"oserror {errno.EACCES}"
        # even with the mode widened by hand, SO_PEERCRED refuses the uid
        os.chmod(d.sock, 0o666)
        assert as_nobody(True) == f"reply {-errno.EACCES}"
        assert d.events("refused")[0]["uid"] == 65534
    finally:
        assert d.stop() == 0
    assert not os.path.exists(d.sock)  # removed on SIGTERM
    os.rmdir(sockdir)


def test_daemon_restart_while_client_waits(tmp_path, agents):
    d = DaemonProc(str(tmp_path)).start()
    path = str(tmp_path / "f")
    try:
        a = agents(d.sock, "g-a", "reconnect_timeout=20")
        b = agents(d.sock, "g-b", "reconnect_timeout=20")
        a.do("file", path=path)
        b.do("file", path=path)
        h = HostHolder(path, 0, 10)  # a host process holds the range
        assert h.locked
        assert a.do("setlkw", type=F_WRLCK, tag=1) == QUEUED
        assert b.do("setlk", type=F_WRLCK, start=50, end=50) == 0
        d.kill9()
        d2 = DaemonProc(str(tmp_path)).start()
        d = d2
        assert wait_until(lambda: a.do("reconnects") >= 1 and b.do("reconnects") >= 1, 10)
        # the re-sent wait is queued in the new daemon, once
        assert wait_until(lambda: len(snapshot(d.sock)["waiters"]) == 1, 5)
        assert not a.events
        h.release()
        assert a.event() == {"event": "wait", "tag": 1, "err": 0}
        assert host_getlk_pid(path, 0, 10) == -1  # held by the new daemon
        # files were re-registered: new requests work on the same refs
        assert b.do("setlk", type=F_WRLCK, start=0, end=0) == errno.EAGAIN
        assert b.do("setlk", type=F_WRLCK, start=60, end=60) == 0
    finally:
        d.stop()


def test_guest_grace_resumes_session(tmp_path):
    d = DaemonProc(str(tmp_path), "--guest-grace", "10").start()
    path = str(tmp_path / "f")
    try:
        r1 = Raw(d.sock, "g-a")
        token = r1.info["session"]
        h = r1.file(path)
        other = Raw(d.sock, "g-b")
        h2 = other.file(path)
        assert other.expect(other.lk(wire.T_SETLK, h2, F_WRLCK, 0, 9))[0] == 0
        assert r1.expect(r1.lk(wire.T_SETLK, h, F_WRLCK, 20, 29))[0] == 0
        wid = r1.lk(wire.T_SETLKW, h, F_WRLCK, 0, 9, rid=777)
        assert r1.expect(wid)[0] == wire.STATUS_QUEUED
        r1.close()
        assert wait_until(lambda: any(e.get("guest") == "g-a" for e in d.events("disconnect")))
        # locks are kept while the guest is away; its wait is granted meanwhile
        assert not host_can_lock(path, 20, 10)
        assert other.expect(other.lk(wire.T_SETLK, h2, F_UNLCK, 0, 9))[0] == 0
        assert wait_until(lambda: not snapshot(d.sock)["waiters"])
        assert not host_can_lock(path, 0, 10)  # granted to the absent guest
        # a stranger cannot take the session
        bad = Raw(d.sock, hello=False)
        bad.send(wire.hello(1, "g-a", session="0" * 32))
        assert bad.read()[1] == -errno.EACCES
        r2 = Raw(d.sock, "g-a", session=token)
        assert r2.info["resumed"] is True and r2.info["session"] == token
        assert r2.expect(777)[0] == 0  # the grant made while away
        # re-sending the wait with the same tag does not queue a second one
        r2.lk(wire.T_SETLKW, h, F_WRLCK, 0, 9, rid=777)
        assert r2.expect(777)[0] == 0
        snap = snapshot(d.sock)
        assert not snap["waiters"]
        assert sorted((lk["start"], lk["end"]) for lk in snap["locks"] if lk["guest"] == "g-a"
                      ) == [(0, 9), (20, 29)]
        # the handle is still valid in the resumed session
        assert r2.expect(r2.lk(wire.T_SETLK, h, F_UNLCK, 0, 29))[0] == 0
        assert host_can_lock(path, 0, 30)
        r2.close()
        other.close()
    finally:
        d.stop()


def test_grace_expiry_releases(tmp_path):
    d = DaemonProc(str(tmp_path), "--guest-grace", "2").start()
    path = str(tmp_path / "f")
    try:
        r = Raw(d.sock, "g-a")
        h = r.file(path)
        assert r.expect(r.lk(wire.T_SETLK, h, F_WRLCK))[0] == 0
        r.close()
        assert wait_until(lambda: any(e.get("guest") == "g-a" for e in d.events("disconnect")))
        assert not host_can_lock(path)  # kept while the grace runs
        assert wait_until(lambda: host_can_lock(path), 15)
        assert d.events("grace_expired")
    finally:
        d.stop()


def test_stuck_client_is_dropped_not_blocking(tmp_path):
    d = DaemonProc(str(tmp_path), "--out-cap", "65536").start()
    try:
        stuck = Raw(d.sock, "stuck")
        stuck.s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        good = Raw(d.sock, "good")
        ping = b"".join(wire.frame(wire.T_PING, i + 1) for i in range(5000))
        stuck.s.setblocking(False)
        sent = 0
        t0 = time.monotonic()
        while sent < 40 * len(ping) and time.monotonic() - t0 < 10:
            try:
                sent += stuck.s.send(ping)
            except BlockingIOError:
                time.sleep(0.01)
            except OSError:
                break  # dropped
            # the daemon keeps serving the other client meanwhile
            assert good.call(wire.T_PING)[0] == 0
        assert wait_until(lambda: any("not reading" in e["reason"]
                                      for e in d.events("disconnect")), 5)
        assert good.call(wire.T_PING)[0] == 0
    finally:
        d.stop()


def test_sd_notify_and_metrics(tmp_path):
    ns = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    ns.bind(str(tmp_path / "notify"))
    ns.settimeout(10)
    d = DaemonProc(str(tmp_path), "--metrics", "127.0.0.1:0",
                   env={"NOTIFY_SOCKET": str(tmp_path / "notify")}).start()
    try:
        msg = ns.recv(4096).decode()
        assert "READY=1" in msg.split("\n")
        port = int(d.events("metrics")[0]["address"].rsplit(":", 1)[1])
        r = Raw(d.sock, "g-a")
        h = r.file(str(tmp_path / "f"))
        assert r.expect(r.lk(wire.T_SETLK, h, F_WRLCK))[0] == 0
        import urllib.request

        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read()
        text = body.decode()
        assert "vfs_lockd_locks_granted_total 1.0" in text
        assert "vfs_lockd_held_locks 1.0" in text
        assert "vfs_lockd_guests 1.0" in text
        assert "vfs_lockd_wait_seconds_bucket" in text
        d.proc.send_signal(signal.SIGINT)
        assert d.proc.wait(10) == 0
        # FDSTORE=1 messages (the lock descriptions mirrored into systemd's store) come
        # first; STOPPING=1 is among the last.
        msgs = []
        while not any("STOPPING=1" in m for m in msgs):
            msgs.append(ns.recv(4096).decode())
        assert any(m.startswith("FDSTORE=1") for m in msgs)
    finally:
        d.stop()
        ns.close()


def test_group_socket_admits_group_members(tmp_path):
    sockdir = tempfile.mkdtemp(prefix="lockd-grp-")
    os.chmod(sockdir, 0o755)
    d = DaemonProc(str(tmp_path), "--group", "65534",
                   socket_path=os.path.join(sockdir, "s")).start()
    try:
        st = os.stat(d.sock)
        assert stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == 65534
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                os.setgid(65534)
                os.setuid(65534)
                c = Raw(d.sock, "nobody-guest")
                os.write(w, str(c.call(wire.T_PING)[0]).encode())
            except BaseException as exc:  # report anything to the parent
                os.write(w, repr(exc).encode())
            finally:
                os._exit(0)
        os.close(w)
        out = os.read(r, 200).decode()
        os.close(r)
        os.waitpid(pid, 0)
        assert out == "0"
    finally:
        d.stop()
        os.rmdir(sockdir)


def test_lockclient_calls_wait_for_reconnect_then_enolck(tmp_path, agents):
    d = DaemonProc(str(tmp_path)).start()
    try:
        a = agents(d.sock, "g-a", "reconnect_timeout=1")
        a.do("file", path=str(tmp_path / "f"))
        d.kill9()
        t0 = time.monotonic()
        assert a.do("setlk", type=F_WRLCK) == errno.ENOLCK
        assert time.monotonic() - t0 >= 0.8  # not before reconnect_timeout (a lower bound)
        d = DaemonProc(str(tmp_path)).start()
        assert wait_until(lambda: a.do("setlk", type=F_WRLCK) == 0, 10)
        assert not host_can_lock(str(tmp_path / "f"))
    finally:
        d.stop()


def test_lockclient_many_threads(daemon, tmp_path):
    """Many request threads share one LockClient; replies go to the right caller."""
    import threading

    from lockd.daemon.client import LockClient

    c = LockClient(daemon.sock, "threads")
    fd = os.open(str(tmp_path / "f"), os.O_RDWR | os.O_CREAT, 0o644)
    errors: list = []
    try:
        ref = c.file(fd, str(tmp_path / "f"))

        def work(i: int) -> None:
            for k in range(100):
                if c.setlk("threads", i, ref, F_WRLCK, i * 10, i * 10 + 9, i) != 0:
                    errors.append((i, k, "lock"))
                got = c.getlk("threads", 999, ref, F_WRLCK, i * 10, i * 10)
                if getattr(got, "pid", None) != i:
                    errors.append((i, k, got))
                if c.setlk("threads", i, ref, F_UNLCK, i * 10, i * 10 + 9, i) != 0:
                    errors.append((i, k, "unlock"))

        threads = [threading.Thread(target=work, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors
        c.put_file(ref)
    finally:
        c.close()
        os.close(fd)
