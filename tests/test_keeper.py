"""The descriptor keeper never outlives its daemon for long (lockd/journal/keeper.py).

A daemon that stops holding nothing takes its keeper with it, also when the keeper holds
lock-free descriptions kept for reuse; a daemon stopped or killed while guests hold
locks leaves the keeper holding them for its restart, for at most --keeper-linger
seconds; a restart within that time takes the locks back. The keeper and the daemon
give nothing to a peer of another uid (issue 23), whichever side it plays.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import procutil
import pytest
from daemonutil import F_UNLCK, F_WRLCK, DaemonProc, Raw, host_can_lock
from procutil import wait_until

from lockd.daemon import wire
from lockd.journal.keeper import keeper_address


def keeper_pids(tag: str) -> list[int]:
    return procutil.keeper_pids(tag.encode())


def gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1].startswith("Z")  # a zombie is gone too
    except FileNotFoundError:
        return True


def wait_gone(pids: list[int], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not all(gone(p) for p in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)  # polling /proc: the keeper is not our child
    return True


def stopped(pid: int) -> bool:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(") ", 1)[1].startswith("T")


def lock_and_unlock(d: DaemonProc, path: str, keep: bool) -> Raw:
    """A guest takes a lock (and with keep=False gives it back: its description then
    stays in the file's spare pool, and in the keeper)."""
    r = Raw(d.sock, "g1")
    h = r.file(path)
    assert r.expect(r.lk(wire.T_SETLK, h, F_WRLCK, 0, 9))[0] == 0
    if not keep:
        assert r.expect(r.lk(wire.T_SETLK, h, F_UNLCK, 0, 9))[0] == 0
    return r


def test_sigterm_holding_nothing_ends_the_keeper(tmp_path) -> None:
    d = DaemonProc(str(tmp_path)).start()
    try:
        r = lock_and_unlock(d, str(tmp_path / "f"), keep=False)
        pids = keeper_pids(str(tmp_path))
        assert len(pids) == 1
        r.close()
    finally:
        assert d.stop() == 0
    assert wait_gone(pids, 10), "keeper outlived a daemon that held nothing"


def test_kill9_holding_nothing_ends_the_keeper(tmp_path) -> None:
    d = DaemonProc(str(tmp_path)).start()
    try:
        guest = lock_and_unlock(d, str(tmp_path / "f"), keep=False)  # noqa: F841
        pids = keeper_pids(str(tmp_path))
        assert len(pids) == 1
        d.kill9()
    finally:
        d.stop()
    # It keeps only a lock-free spare: nothing to protect, nothing to wait for.
    assert wait_gone(pids, 10), "keeper of a killed daemon that held nothing lingered"


def test_kill9_holding_locks_keeps_them_for_linger_seconds(tmp_path) -> None:
    path = str(tmp_path / "f")
    d = DaemonProc(str(tmp_path), "--keeper-linger", "3").start()
    try:
        guest = lock_and_unlock(d, path, keep=True)  # noqa: F841 - its connection holds
        pids = keeper_pids(str(tmp_path))
        t0 = time.monotonic()
        d.kill9()
        # the keeper holds the lock for the daemon's restart...
        assert not gone(pids[0]) and not host_can_lock(path, 0, 10)
        # ...and gives up after --keeper-linger seconds: the lock is released.
        assert wait_gone(pids, 30), "keeper outlived its linger time"
        waited = time.monotonic() - t0
        assert waited >= 2.5, waited  # not before the linger time (a lower bound only)
        assert host_can_lock(path, 0, 10)
    finally:
        d.stop()


def test_restart_within_linger_takes_the_locks_back(tmp_path) -> None:
    path = str(tmp_path / "f")
    d = DaemonProc(str(tmp_path), "--keeper-linger", "60").start()
    try:
        guest = lock_and_unlock(d, path, keep=True)  # noqa: F841 - its connection holds
        pids = keeper_pids(str(tmp_path))
        d.proc.send_signal(signal.SIGTERM)  # a clean stop keeps guests' locks too
        assert d.proc.wait(10) == 0
        assert not gone(pids[0]) and not host_can_lock(path, 0, 10)
        d = DaemonProc(str(tmp_path), "--keeper-linger", "60").start()
        assert keeper_pids(str(tmp_path)) == pids  # the same keeper, taken back
        assert not host_can_lock(path, 0, 10)
        # the guest does not come back: after its grace the lock goes, and the daemon,
        # stopped holding nothing now, takes the keeper with it
        r = Raw(d.sock, None, "admin")
        assert r.call(wire.T_EVICT, b"g1")[0] == 0
        assert host_can_lock(path, 0, 10)
        r.close()
    finally:
        assert d.stop() == 0
    assert wait_gone(pids, 10)


def test_spare_description_reuse_keeps_the_owners_key(tmp_path) -> None:
    """A lock description goes back to the file's spare pool when its owner holds
    nothing; the owner may then get another description from the pool while its old one
    still sits there. Whoever takes that old one next must not make the keeper forget
    the owner's current description: after a kill -9 its lock must still be held."""
    path = str(tmp_path / "f")
    d = DaemonProc(str(tmp_path)).start()
    try:
        r = Raw(d.sock, "g1")
        h = r.file(path)

        def lk(owner: int, type_: int, start: int) -> int:
            return r.expect(r.lk(wire.T_SETLK, h, type_, start, start, owner=owner))[0]

        assert lk(1, F_WRLCK, 0) == 0 and lk(2, F_WRLCK, 1) == 0  # descriptions D1, D2
        assert lk(1, F_UNLCK, 0) == 0 and lk(2, F_UNLCK, 1) == 0  # spare pool [D1, D2]
        assert lk(1, F_WRLCK, 0) == 0  # owner 1 now on D2; D1 still names owner 1
        assert lk(3, F_WRLCK, 2) == 0  # owner 3 takes D1
        d.kill9()
        # Owner 1's lock survives in the keeper: no host process can take it...
        assert not host_can_lock(path, 0, 1)
        d = DaemonProc(str(tmp_path)).start()
        # ...and the restarted daemon has it, lost nothing.
        st = Raw(d.sock, None, "admin")
        status, payload = st.call(wire.T_STATUS)
        assert status == 0 and b'"lost":0' in payload, payload
        assert not host_can_lock(path, 0, 1) and not host_can_lock(path, 2, 1)
    finally:
        d.stop()


def test_keeper_that_ended_holding_nothing_settles_open_leases(tmp_path) -> None:
    """Lock and unlock under a lease (never journaled one by one), then kill -9: the
    keeper ends (it holds nothing) and says so beside the journal, so the restarted
    daemon knows the owner held nothing - no lock comes back, nobody hears EIO."""
    path = str(tmp_path / "f")
    d = DaemonProc(str(tmp_path), "--journal-lease", "3600").start()
    try:
        r = lock_and_unlock(d, path, keep=False)
        h = r.file(path)
        assert r.expect(r.lk(wire.T_SETLK, h, F_WRLCK, 20, 29))[0] == 0  # under the lease
        assert r.expect(r.lk(wire.T_SETLK, h, F_UNLCK, 20, 29))[0] == 0
        pids = keeper_pids(str(tmp_path))
        d.kill9()
        r.close()
        assert wait_gone(pids, 10)
        assert os.path.exists(str(tmp_path / "journal.db-keeper-released"))
    finally:
        d.stop()
    d = DaemonProc(str(tmp_path), "--journal-lease", "3600").start()
    try:
        rec = d.events("recovered")[0]
        assert rec["keeper_survived"] and rec["uncertain"] == 0 and rec["lost"] == 0, rec
        assert not os.path.exists(str(tmp_path / "journal.db-keeper-released"))
        r = Raw(d.sock, "g1")
        h = r.file(path)
        assert r.expect(r.lk(wire.T_SETLK, h, F_WRLCK, 0, 29))[0] == 0  # no EIO
        assert host_can_lock(path, 30, 10) and not host_can_lock(path, 0, 10)
        r.close()
    finally:
        d.stop()


def test_messages_of_a_replaced_daemon_are_applied_first(tmp_path) -> None:
    """A daemon's last D (queued while the keeper was not running) still counts when a
    new daemon connects in the same instant: the keeper never keeps a description its
    daemon let go (that would be a lock nobody holds)."""
    import fcntl
    import struct

    from lockd.journal.keeper import ensure_keeper, keeper_address

    journal = str(tmp_path / "locks.db")
    path = str(tmp_path / "f")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.fcntl(fd, 37, struct.pack("hhqqi4x", fcntl.F_WRLCK, 0, 0, 10, 0))  # F_OFD_SETLK
    old = ensure_keeper(keeper_address(journal), journal)
    pid = keeper_pids(str(tmp_path))[0]
    new = None
    try:
        old.put("k1", fd)
        os.close(fd)
        taken = old.take_all()  # a round trip: the keeper holds k1
        assert list(taken) == ["k1"]
        os.close(taken["k1"])
        os.kill(pid, signal.SIGSTOP)
        try:
            assert procutil.wait_until(lambda: stopped(pid), 10)  # out of its select()
            old.drop("k1")      # queued while the keeper is stopped ...
            new = ensure_keeper(keeper_address(journal), journal)  # ... and so is this
        finally:
            os.kill(pid, signal.SIGCONT)
        assert keeper_pids(str(tmp_path)) == [pid]
        assert new.take_all() == {}
        assert host_can_lock(path, 0, 10)
    finally:
        old.close()
        if new is not None:
            new.quit()
            new.close()
        assert wait_gone([pid], 10)


# ------------------------------------------------------------------ who is the keeper
# A local user of another uid (65534) squatting the keeper's endpoint. It binds where it
# is told, answers a daemon's b"L" as a keeper would, and, given a description, uses it
# as the attacker of issue 23 did: reads it and unlocks it (F_OFD_SETLK F_UNLCK). It
# reports on stdin's "report" (one JSON line). Modes:
#   abstract @NAME bind the abstract socket NAME (the keeper's name before this check),
#                  retrying while the old keeper still holds it (any address "@NAME"
#                  below is an abstract one too)
#   dir DIR        in the daemon's world-writable DIR (fd opened before dropping root):
#                  move the real keeper's directory away, make its own, bind there
#   capdac PATH    bind PATH inside root's keeper directory, with CAP_DAC_OVERRIDE kept
#                  across the uid change (so only the credential check stands in its way)
#   peer PATH      (CAP_DAC_OVERRIDE too) connect to the real keeper at PATH: ask for
#                  every description, drop each key it learns, tell the keeper to quit
SQUATTER = r"""
import array, ctypes, fcntl, json, os, select, socket, struct, sys, time
mode, target = sys.argv[1], sys.argv[2]
addr = "\0" + target[1:] if target.startswith("@") else target  # "@": abstract
dfd = os.open(target, os.O_PATH | os.O_DIRECTORY) if mode == "dir" else -1
libc = ctypes.CDLL(None, use_errno=True)
if mode in ("capdac", "peer"):
    assert libc.prctl(8, 1, 0, 0, 0) == 0  # PR_SET_KEEPCAPS
os.setgroups([]); os.setgid(65534); os.setuid(65534)
assert os.getuid() == os.geteuid() == 65534
if mode in ("capdac", "peer"):
    caps = (1 << 1) | (1 << 2)  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
    hdr = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this pid
    data = (ctypes.c_uint32 * 6)(caps, caps, 0, 0, 0, 0)  # effective, permitted, inh. x2
    assert libc.capset(hdr, data) == 0, ctypes.get_errno()

def recv(s):
    fds = array.array("i")
    msg, anc, _f, _a = s.recvmsg(4096, socket.CMSG_SPACE(4 * 8))
    for level, typ, d in anc:
        if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
            fds.frombytes(d[: len(d) - len(d) % 4])
    return msg, list(fds)

if mode == "peer":
    out = {"connected": False, "msgs": 0, "fds": 0, "sent": 0}
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.settimeout(10)
    try:
        s.connect(addr)
        out["connected"] = True
        keys = []
        s.send(b"L")
        out["sent"] += 1
        while True:
            msg, fds = recv(s)
            if not msg:
                break
            out["msgs"] += 1
            out["fds"] += len(fds)
            if msg[:1] == b"E":
                keys.append(msg[1:])
            if msg[:1] == b"Z":
                break
        for k in keys:
            s.send(b"D" + k)
            out["sent"] += 1
        s.send(b"Q")
        out["sent"] += 1
    except OSError as exc:
        out["error"] = exc.strerror
    print(json.dumps(out), flush=True)
    sys.exit(0)

srv = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
if mode == "abstract":
    deadline = time.monotonic() + 30
    while True:  # the attacker's loop: the old keeper may still hold the name
        try:
            srv.bind(addr)
            break
        except OSError:
            assert time.monotonic() < deadline, "the name stayed taken"
            time.sleep(0.01)
elif mode == "dir":
    name = ".journal.db.keeper"
    try:
        os.rename(name, name + ".moved", src_dir_fd=dfd, dst_dir_fd=dfd)
    except FileNotFoundError:
        pass
    os.mkdir(name, 0o700, dir_fd=dfd)
    srv.bind(f"/proc/self/fd/{dfd}/{name}/sock")
else:
    if not target.startswith("@"):
        try:
            os.unlink(addr)  # a killed keeper's socket
        except FileNotFoundError:
            pass
    srv.bind(addr)
srv.listen(8)
print("bound", flush=True)
conns, got = [], {"conns": 0, "msgs": 0, "fds": 0, "read": 0, "unlocked": 0}
while True:
    ready, _, _ = select.select([srv, sys.stdin, *conns], [], [])
    if srv in ready:
        conns.append(srv.accept()[0])
        got["conns"] += 1
    for c in [c for c in conns if c in ready]:
        try:
            msg, fds = recv(c)
        except OSError:
            msg, fds = b"", []
        if not msg:
            conns.remove(c)
            c.close()
            continue
        got["msgs"] += 1
        if msg[:1] == b"L":
            c.send(b"Z1")
        for fd in fds:
            got["fds"] += 1
            try:
                got["read"] += len(os.pread(fd, 16, 0)) > 0
                fcntl.fcntl(fd, 37, struct.pack("hhqqi4x", fcntl.F_UNLCK, 0, 0, 0, 0))
                got["unlocked"] += 1
            except OSError:
                pass
            os.close(fd)
    if sys.stdin in ready:
        if not sys.stdin.readline():
            break
        print(json.dumps(got), flush=True)
"""


class Squatter:
    """A process of uid 65534 squatting the keeper's endpoint (see SQUATTER)."""

    def __init__(self, mode: str, target: str) -> None:
        target = "@" + target[1:] if target.startswith("\0") else target
        self.p = subprocess.Popen([sys.executable, "-c", SQUATTER, mode, target],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        if mode != "peer":
            line = self.p.stdout.readline()
            assert line == "bound\n", f"squatter did not bind: {line!r}"

    def report(self) -> dict:
        self.p.stdin.write("report\n")
        self.p.stdin.flush()
        return json.loads(self.p.stdout.readline())

    def result(self) -> dict:
        """What a `peer` did (it exits when done)."""
        out = json.loads(self.p.stdout.readline())
        self.p.wait(10)
        return out

    def close(self) -> None:
        if self.p.poll() is None:
            self.p.stdin.close()
            procutil.stop(self.p)


def legacy_keeper_name(journal: str) -> str:
    """The abstract socket name keepers used before their directory (issue 23)."""
    return "@vfs-lockd-keeper-" + hashlib.sha256(
        os.path.realpath(journal).encode()).hexdigest()[:24]


def root_only_file(path: str) -> str:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    os.write(fd, b"root's secret")
    os.close(fd)
    return path


def test_squatter_of_the_old_abstract_name_gets_nothing(tmp_path) -> None:
    """Issue 23 item 3, as reported: uid 65534 binds the keeper's predictable abstract
    name while the daemon restarts (cleanly, holding nothing: its keeper ends). The
    restarted daemon must not hand a guest's description to it: the squatter gets no
    connection, and the guest's lock on a root-only file stays held on the host."""
    journal = str(tmp_path / "journal.db")
    path = root_only_file(str(tmp_path / "secret"))
    d = DaemonProc(str(tmp_path)).start()
    assert d.stop() == 0
    sq = Squatter("abstract", legacy_keeper_name(journal))
    try:
        d = DaemonProc(str(tmp_path)).start()
        r = Raw(d.sock, "g1")
        h = r.file(path)
        assert r.expect(r.lk(wire.T_SETLK, h, F_WRLCK, 0, 9))[0] == 0
        got = sq.report()
        assert got["conns"] == 0 and got["fds"] == 0, got
        assert not host_can_lock(path, 0, 10)  # the guest's lock stands
        r.close()
    finally:
        sq.close()
        d.stop()


def test_daemon_refuses_a_keeper_directory_made_by_another_user(tmp_path) -> None:
    """The journal's directory is writable by everyone (a mistake, but the squatter's
    way in): while a stopped daemon's keeper holds a guest's lock, uid 65534 moves the
    keeper's directory away and puts its own, with its own socket, in its place. The
    restarted daemon must refuse it and say so, hand it nothing, and the lock stays
    held (by the real keeper)."""
    state = tmp_path / "state"
    state.mkdir()
    os.chmod(state, 0o777)
    path = root_only_file(str(tmp_path / "secret"))
    d = DaemonProc(str(state), "--keeper-linger", "60").start()
    sq = None
    pids: list[int] = []
    try:
        r = lock_and_unlock(d, path, keep=True)
        pids = keeper_pids(str(state))
        assert len(pids) == 1
        d.proc.send_signal(signal.SIGTERM)  # stopped with a lock held: the keeper keeps it
        assert d.proc.wait(10) == 0
        r.close()
        sq = Squatter("dir", str(state))
        with pytest.raises(RuntimeError) as exc:
            DaemonProc(str(state), "--keeper-linger", "60").start()
        said = str(exc.value)
        assert "daemon exited 1" in said, said
        assert ".journal.db.keeper belongs to uid 65534" in said and "refusing" in said, said
        got = sq.report()
        assert got["conns"] == 0 and got["fds"] == 0, got
        assert not gone(pids[0]) and not host_can_lock(path, 0, 10)
    finally:
        if sq is not None:
            sq.close()
        d.stop()
        for pid in pids:  # the real keeper would linger for 60 s
            if not gone(pid):
                os.kill(pid, signal.SIGKILL)
        assert wait_gone(pids, 10)


def test_daemon_refuses_a_keeper_of_another_uid(tmp_path) -> None:
    """Even at the right address (uid 65534 given CAP_DAC_OVERRIDE binds the socket in
    the keeper's directory after the keeper left), the daemon checks who listens
    (SO_PEERCRED): not its uid, not the pid it started: it refuses, says so, and sends
    not a single message."""
    journal = str(tmp_path / "journal.db")
    d = DaemonProc(str(tmp_path)).start()
    pids = keeper_pids(str(tmp_path))
    assert d.stop() == 0
    assert wait_gone(pids, 10)
    sq = Squatter("capdac", keeper_address(journal))
    try:
        with pytest.raises(RuntimeError) as exc:
            DaemonProc(str(tmp_path)).start()
        said = str(exc.value)
        assert f"(pid {sq.p.pid}, uid 65534) is not our descriptor keeper" in said, said
        assert "refusing to hand it lock descriptions" in said, said
        got = sq.report()
        assert got["msgs"] == 0 and got["fds"] == 0, got
    finally:
        sq.close()


def test_keeper_gives_a_peer_of_another_uid_nothing(tmp_path) -> None:
    """The reverse: a peer that is not the daemon's uid reaches the real keeper (uid
    65534 with CAP_DAC_OVERRIDE, so file modes do not stop it) and asks for every
    description, drops every key it learns and tells the keeper to quit. It gets
    nothing and changes nothing: after a kill -9 of the daemon the keeper still holds
    the guest's lock, and the restarted daemon takes it back with nothing lost."""
    journal = str(tmp_path / "journal.db")
    path = root_only_file(str(tmp_path / "secret"))
    d = DaemonProc(str(tmp_path)).start()
    try:
        r = lock_and_unlock(d, path, keep=True)
        pids = keeper_pids(str(tmp_path))
        peer = Squatter("peer", keeper_address(journal))
        got = peer.result()
        assert got["connected"] and got["msgs"] == 0 and got["fds"] == 0, got
        d.kill9()
        r.close()
        assert not gone(pids[0]) and not host_can_lock(path, 0, 10)
        d = DaemonProc(str(tmp_path)).start()
        rec = d.events("recovered")[0]
        assert rec["lost"] == 0 and keeper_pids(str(tmp_path)) == pids, rec
        assert not host_can_lock(path, 0, 10)
        admin = Raw(d.sock, None, "admin")  # the guest is not coming back
        assert admin.call(wire.T_EVICT, b"g1")[0] == 0
        admin.close()
    finally:
        d.stop()
    assert wait_gone(pids, 10)


def test_daemon_hands_a_restarted_keeper_of_another_uid_nothing(tmp_path) -> None:
    """While the daemon serves, its keeper is killed and uid 65534 (CAP_DAC_OVERRIDE)
    takes its socket's place. The daemon's keeper restart finds it, refuses it, logs
    so, and hands it nothing; the guest's locks stay held on the host (by the daemon)."""
    journal = str(tmp_path / "journal.db")
    path = root_only_file(str(tmp_path / "secret"))
    d = DaemonProc(str(tmp_path)).start()
    sq = None
    try:
        r = lock_and_unlock(d, path, keep=True)
        pids = keeper_pids(str(tmp_path))
        os.kill(pids[0], signal.SIGKILL)
        assert wait_gone(pids, 10)
        sq = Squatter("capdac", keeper_address(journal))
        h = r.file(path)
        # New owners, so new descriptions for the keeper: the first put finds the keeper
        # gone, the next changes restart it
        for owner, start in ((2, 20), (3, 40), (4, 60)):
            assert r.expect(r.lk(wire.T_SETLK, h, F_WRLCK, start, start + 9,
                                 owner=owner))[0] == 0
        said = f"(pid {sq.p.pid}, uid 65534) is not our descriptor keeper"
        assert wait_until(lambda: said in d.log(), 10), d.log()[-2000:]
        assert d.log().count(said) == 1  # said once, not at every change
        got = sq.report()
        assert got["msgs"] == 0 and got["fds"] == 0, got
        assert not host_can_lock(path, 0, 70)
        r.close()
    finally:
        if sq is not None:
            sq.close()
        d.stop()
