"""Isolation (issue part 8): a guest cannot release, cancel or see another guest's locks
except through GETLK's conflict report, and paths never leave the export, also while the
host renames directories and swaps them for symlinks under the guests' lookups.

What tests/test_daemon.py already covers: a second connection for a live guest (EBUSY),
a wrong session token (EACCES), admin-only cancel and evict, the socket's permissions.
tests/test_fuse_session.py::test_containment covers '..', '/' in names and symlinks.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

from conftest import Mount
from daemonutil import F_RDLCK, F_UNLCK, F_WRLCK, DaemonProc, Raw, admin, host_can_lock

from lockd.api import OFFSET_MAX
from lockd.daemon import wire
from lockd.fuse import abi


def table(d: DaemonProc) -> tuple[set, list]:
    snap = admin(d, wire.T_LIST)
    return ({(lk["guest"], lk["kind"], lk["owner"], lk["start"], lk["end"], lk["type"])
             for lk in snap["locks"]}, [(w["guest"], w["id"]) for w in snap["waiters"]])


def test_guest_cannot_touch_another_guests_locks(tmp_path):
    d = DaemonProc(str(tmp_path)).start()
    path = str(tmp_path / "f")
    try:
        a, b = Raw(d.sock, "g-a"), Raw(d.sock, "g-b", holder_names=True)
        ha, hb = a.file(path), b.file(path)
        assert a.expect(a.lk(wire.T_SETLK, ha, F_WRLCK, 0, 9, owner=1, pid=11))[0] == 0
        assert a.expect(a.lk(wire.T_SETLK, ha, F_WRLCK, 0, OFFSET_MAX, owner=0, fh=7,
                             flags=wire.FUSE_LK_FLOCK))[0] == 0
        assert b.expect(b.lk(wire.T_SETLK, hb, F_WRLCK, 100, 109, owner=9))[0] == 0
        # a's owner 2 waits for b's lock
        assert a.expect(a.lk(wire.T_SETLKW, ha, F_WRLCK, 100, 109, owner=2, rid=900)
                        )[0] == wire.STATUS_QUEUED
        locks0, waits0 = table(d)
        assert [g for g, _ in waits0] == ["g-a"]
        a_wait = waits0[0][1]
        # b uses a's owner number, fh and wait ids: each names b's own (absent) things
        assert b.expect(b.lk(wire.T_SETLK, hb, F_UNLCK, 0, OFFSET_MAX, owner=1))[0] == 0
        b.send(wire.flush(5001, hb, 1))
        assert b.expect(5001)[0] == 0
        b.send(wire.release_flock(5002, 7))
        assert b.expect(5002)[0] == 0
        assert b.expect(b.lk(wire.T_SETLK, hb, F_UNLCK, 0, OFFSET_MAX, owner=0, fh=7,
                             flags=wire.FUSE_LK_FLOCK))[0] == 0
        b.send(wire.interrupt(5003, 900))  # a's wait's id: not b's
        assert b.expect(5003)[0] == -errno.EAGAIN  # unknown to b, as FUSE answers an INTERRUPT it cannot match
        b.send(wire.frame(wire.T_CANCEL_WAIT, 5004, wire.U64.pack(a_wait)))
        assert b.expect(5004)[0] == -errno.ENOENT
        # nor can it reach a's handle numbers, or the admin verbs
        assert b.expect(b.lk(wire.T_SETLK, ha + hb + 1, F_UNLCK, 0, OFFSET_MAX, owner=1)
                        )[0] == -errno.EINVAL
        for t, body in ((wire.T_LIST, b""), (wire.T_STATUS, b""), (wire.T_EVICT, b"g-a")):
            st, msg = b.call(t, body)
            assert st == -errno.EPERM, (t, msg)
        assert (table(d)) == (locks0, waits0)
        assert not host_can_lock(path, 0, 10) and not host_can_lock(path, mode="flock")
        # what b may see: GETLK's conflict report (type, range, pid, guest name)
        b.send(wire.lk(wire.T_GETLK, 5005, hb, 0, 9, F_RDLCK, 5, 5, 1))
        st, payload = b.expect(5005)
        s, e, t, pid = abi.LK_OUT.unpack_from(payload)
        assert (st, s, e, t, pid, payload[abi.LK_OUT.size:]) == (0, 0, 9, F_WRLCK, 11, b"g-a")
        # DESTROY from b releases b's only: a's wait behind b's lock is granted
        b.send(wire.frame(wire.T_DESTROY, 5006))
        assert b.expect(5006)[0] == 0
        assert a.expect(900)[0] == 0
        locks1, waits1 = table(d)
        assert {lk for lk in locks1 if lk[0] == "g-b"} == set() and not waits1
        assert locks0 - {("g-b", "posix", 9, 100, 109, "WRITE")} <= locks1
        a.close()
        b.close()
    finally:
        d.stop()


# ------------------------------------------------------------------ rename races
IN_OPEN, IN_ACCESS, IN_NONBLOCK = 0x20, 0x01, 0o4000

GUEST = r"""
import os, sys, time
mnt, seconds = sys.argv[1], float(sys.argv[2])
t_end = time.monotonic() + seconds
stats = {"reads": 0, "secret": 0, "errors": 0}
paths = ["d/secret", "p/q/secret", "r1/secret", "r2/secret", "d/e/secret"]
while time.monotonic() < t_end:
    for rel in paths:
        p = os.path.join(mnt, rel)
        try:
            with open(p, "rb") as f:
                data = f.read()
            stats["reads"] += 1
            if b"SECRET" in data:
                stats["secret"] += 1
        except OSError:
            stats["errors"] += 1
    for rel in ("d", "p", "p/q", "r1", "r2", "d/e"):
        try:
            os.listdir(os.path.join(mnt, rel))
            os.stat(os.path.join(mnt, rel, "secret"))
        except OSError:
            stats["errors"] += 1
print(stats)
"""


def _swapper(src: Path, stop: threading.Event, counts: dict) -> None:
    """Host side: swap directories for symlinks that point outside the export (through
    '..'), and rename directories around, as fast as it can."""
    # Relative links only: an absolute one would be resolved by the kernel of this
    # machine (the "guest" here) straight to the host path, not through the server.
    links = {"d": "../outside/d", "p": "../outside"}
    while not stop.is_set():
        for name, target in links.items():
            real, tmp = src / f"{name}.real", src / f"{name}.tmp"
            try:
                os.rename(src / name, real)
                os.symlink(target, tmp)
                os.rename(tmp, src / name)  # now a symlink out of the export
                os.unlink(src / name)
                os.rename(real, src / name)  # and the directory again
                counts["swaps"] += 1
            except OSError:
                counts["errors"] += 1
        try:
            os.rename(src / "r1", src / "r2")
            os.rename(src / "r2", src / "r1")
            counts["renames"] += 1
        except OSError:
            counts["errors"] += 1


def test_rename_races_never_leave_the_export(fuse_ok, tmp_path):
    src = tmp_path / "src"
    outside = tmp_path / "outside"
    for base, content in ((src, b"public"), (outside, b"SECRET")):
        for rel in ("d", "p/q", "r1", "d/e", "q"):
            (base / rel).mkdir(parents=True, exist_ok=True)
            (base / rel / "secret").write_bytes(content)
    # The mount point sits deeper than the source, so a relative symlink that escapes
    # the source ("../outside/d") resolves, in the mount, to a path that does not exist:
    # reading the secret through the mount could only be the server's doing.
    mp = tmp_path / "m" / "n" / "mnt"
    mp.mkdir(parents=True)
    libc = ctypes.CDLL(None, use_errno=True)
    ino = libc.inotify_init1(IN_NONBLOCK)
    assert ino >= 0
    for rel in ("d", "p/q", "q", "r1", "d/e", ""):
        assert libc.inotify_add_watch(ino, str(outside / rel).encode(), IN_OPEN | IN_ACCESS) >= 0
    m = Mount(src, mp, "racer", [], tmp_path / "racer.log")
    stop = threading.Event()
    counts = {"swaps": 0, "renames": 0, "errors": 0}
    seen_fds: set[str] = set()
    try:
        t = threading.Thread(target=_swapper, args=(src, stop, counts), daemon=True)
        t.start()
        guests = [subprocess.Popen([sys.executable, "-c", GUEST, str(mp), "4"],
                                   stdout=subprocess.PIPE, text=True) for _ in range(3)]
        deadline = time.monotonic() + 30
        while any(g.poll() is None for g in guests) and time.monotonic() < deadline:
            for fd in os.listdir(f"/proc/{m.proc.pid}/fd"):  # what the server holds open
                try:
                    seen_fds.add(os.readlink(f"/proc/{m.proc.pid}/fd/{fd}"))
                except OSError:
                    pass
            time.sleep(0.002)
        results = [eval(g.communicate(timeout=30)[0]) for g in guests]  # noqa: S307
        stop.set()
        t.join(10)
        events = b""
        try:
            events = os.read(ino, 65536)
        except BlockingIOError:
            pass
    finally:
        stop.set()
        m.stop()
        os.close(ino)
    print("\nrename race:", counts, results, f"{len(seen_fds)} server fds seen")
    assert counts["swaps"] > 50 and counts["renames"] > 50, counts
    assert sum(r["reads"] for r in results) > 100, results  # the guests did read
    assert all(r["secret"] == 0 for r in results), results
    escaped = sorted(p for p in seen_fds if p.startswith(str(outside)))
    assert not escaped, escaped
    assert events == b"", [struct.unpack_from("iIII", events, 0)]  # nobody opened outside


def test_inotify_detector_works(tmp_path):
    """The detector of the race test: opening a watched file is reported."""
    (tmp_path / "x").write_bytes(b"SECRET")
    libc = ctypes.CDLL(None, use_errno=True)
    ino = libc.inotify_init1(IN_NONBLOCK)
    try:
        assert libc.inotify_add_watch(ino, str(tmp_path).encode(), IN_OPEN | IN_ACCESS) >= 0
        (tmp_path / "x").read_bytes()
        assert len(os.read(ino, 65536)) >= 16
    finally:
        os.close(ino)
