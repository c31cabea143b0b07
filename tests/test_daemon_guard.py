"""The daemon under a local user's pressure, and on a damaged journal.

* At its descriptor limit it neither spins on accept() nor floods its log: it stops
  accepting for a while (backing off), logs the failure once per interval with a count,
  closes connections that never say HELLO after --hello-timeout, and serves again.
* A journal whose database is gone or empty while its change log or WAL still holds
  changes is refused with a message naming it; after `journal repair`, or when the
  whole journal is gone, the locks the descriptor keeper holds are recovered from it
  (and the kernel's list of each description's locks), never dropped silently.
"""

from __future__ import annotations

import glob
import json
import os
import socket
import time

import pytest
from daemonutil import F_WRLCK, DaemonProc, Raw, cli, host_can_lock
from procutil import wait_until

from lockd.daemon import wire


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_descriptor_limit_backs_off_and_recovers(tmp_path) -> None:
    d = DaemonProc(str(tmp_path), "--hello-timeout", "2", "--max-unauthenticated", "1000",
                   prefix=("prlimit", "--nofile=48:48", "--")).start()
    silent: list[socket.socket] = []
    try:
        for _ in range(80):  # more than the daemon has descriptors for; none says HELLO
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(d.sock)  # queued in the listen backlog when not accepted
            silent.append(s)
        assert wait_until(lambda: d.events("accept_failed"), 10), d.log()
        cpu0, t0 = cpu_seconds(d.proc.pid), time.monotonic()
        time.sleep(1.5)  # a window to measure what the daemon does at its limit
        busy = (cpu_seconds(d.proc.pid) - cpu0) / (time.monotonic() - t0)
        assert busy < 0.5, f"daemon busy {busy:.0%} of a core at its descriptor limit"
        assert len(d.events("accept_failed")) <= 2, d.events("accept_failed")
        # After the HELLO timeout the silent connections are closed and it serves again.
        assert wait_until(lambda: _hello_ok(d.sock), 20), d.log()[-2000:]
        r = Raw(d.sock, "after")
        h = r.file(str(tmp_path / "f"))
        assert r.expect(r.lk(wire.T_SETLK, h, F_WRLCK, 0, 9))[0] == 0
        r.close()
    finally:
        for s in silent:
            s.close()
        assert d.stop() == 0


def _hello_ok(sock: str) -> bool:
    try:
        Raw(sock, "probe").close()
        return True
    except (OSError, AssertionError):
        return False


def _locked_then_killed(tmp_path) -> tuple[str, Raw]:
    path = str(tmp_path / "f")
    d = DaemonProc(str(tmp_path)).start()
    r = Raw(d.sock, "g1")
    h = r.file(path)
    assert r.expect(r.lk(wire.T_SETLK, h, F_WRLCK, 0, 9))[0] == 0
    d.kill9()
    d.stop()
    assert not host_can_lock(path, 0, 10)  # the keeper holds it
    return path, r


def _recovered(tmp_path, path: str) -> None:
    d = DaemonProc(str(tmp_path)).start()
    try:
        locks = json.loads(cli("locks", "--socket", d.sock, "--json").stdout)["locks"]
        assert [(lk["guest"], lk["start"], lk["end"], lk["type"]) for lk in locks] == \
            [("g1", 0, 9, "WRITE")]
        assert not host_can_lock(path, 0, 10)
        rec = json.loads(cli("status", "--socket", d.sock, "--json").stdout)["recovery"]
        assert rec["from_keeper_only"] == 1, rec
    finally:
        d.stop()


@pytest.mark.parametrize("damage", ["truncate", "delete-db"])
def test_emptied_journal_is_refused_then_recovered_from_the_keeper(tmp_path, damage) -> None:
    path, guest = _locked_then_killed(tmp_path)
    journal = str(tmp_path / "journal.db")
    if damage == "truncate":
        os.truncate(journal, 0)
    else:
        os.unlink(journal)
    with pytest.raises(RuntimeError) as exc:
        DaemonProc(str(tmp_path)).start()
    assert journal in str(exc.value) and "refusing to start" in str(exc.value)
    assert not host_can_lock(path, 0, 10)  # still held by the keeper meanwhile
    r = cli("journal", "repair", journal)
    assert r.returncode == 0, r.stdout + r.stderr
    _recovered(tmp_path, path)
    guest.close()


def test_deleted_journal_recovers_from_the_keeper(tmp_path) -> None:
    path, guest = _locked_then_killed(tmp_path)
    for p in glob.glob(str(tmp_path / "journal.db*")):
        os.unlink(p)  # the whole journal is gone: nothing to refuse, nothing to replay
    _recovered(tmp_path, path)
    guest.close()


FLOODER = r"""
import fcntl, os, struct, sys
paths, n, lock = sys.argv[1:-2], int(sys.argv[-2]), int(sys.argv[-1])
# the mounts' directories, opened before dropping root (their parents are root's only)
dirs = [os.open(p, os.O_PATH | os.O_DIRECTORY) for p in paths]
os.setgid(65534); os.setuid(65534)
fds = [os.open(f"flood-{i}", os.O_RDWR | os.O_CREAT, 0o644, dir_fd=d)
       for d in dirs for i in range(n)]
ok = enolck = 0
for fd in fds[:lock]:  # lock the first files of the first mount
    try:
        fcntl.fcntl(fd, fcntl.F_SETLK, struct.pack("hhqqi4x", fcntl.F_WRLCK, 0, 0, 1, 0))
        ok += 1
    except OSError as exc:
        assert exc.errno == 37, exc  # ENOLCK
        enolck += 1
print(len(fds), ok, enolck, flush=True)
sys.stdin.read()  # hold everything open until told to go
"""


@pytest.mark.fuse
def test_opens_cost_the_daemon_nothing_and_limits_are_per_guest(mounts, tmp_path) -> None:
    """An unprivileged user holding thousands of files open through three guests' mounts
    costs the daemon no descriptor (files are registered at their first lock); a guest
    locking more files than its limit gets ENOLCK, while a fourth guest works on."""
    import subprocess
    import sys

    d = DaemonProc(str(tmp_path), "--limits", "files=40,descriptors=60").start()
    flooder = None
    try:
        source, (ma, mb, mc, md) = mounts(4, ["--lockd", d.sock])
        os.chmod(source, 0o777)
        fds_before = len(os.listdir(f"/proc/{d.proc.pid}/fd"))
        flooder = subprocess.Popen(
            [sys.executable, "-c", FLOODER, str(ma.path), str(mb.path), str(mc.path),
             "1500", "50"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        opened, ok, enolck = map(int, flooder.stdout.readline().split())
        assert (opened, ok, enolck) == (4500, 40, 10)
        fds_after = len(os.listdir(f"/proc/{d.proc.pid}/fd"))
        # 40 registered files and their 40 lock descriptions; the 4,500 opens: nothing
        assert fds_after - fds_before <= 40 + 40 + 8, (fds_before, fds_after)
        # the fourth guest opens, locks and reads as usual
        (source / "d").write_bytes(b"data")
        fd = os.open(md.path / "d", os.O_RDWR)
        try:
            import fcntl
            import struct
            fcntl.fcntl(fd, fcntl.F_SETLK, struct.pack("hhqqi4x", fcntl.F_WRLCK, 0, 0, 1, 0))
            assert os.pread(fd, 4, 0) == b"data"
        finally:
            os.close(fd)
        assert os.listdir(mb.path) and os.stat(mb.path / "flood-0")  # flooded mounts work
    finally:
        if flooder is not None:
            flooder.stdin.close()
            flooder.wait(30)
        d.stop()
