"""What one user, or one guest, can cost everyone else (issue 23 items 6 and 7).

Item 6: on a mount whose server has 2048 descriptors, real unprivileged users (children
that setuid to 65534 and 65533) open files through the mount until they are refused;
root must still open and list. Each open must cost the server one descriptor, not two.

Item 7: a real `vfs-lockd serve` with a small descriptor budget; several guests fill it
with locks; another guest's first lock is still granted.
"""

from __future__ import annotations

import errno
import json
import os
import resource
import shutil
import tempfile
from pathlib import Path

import conftest
import pytest
from conftest import Mount

LIMIT = 2048  # the mount's RLIMIT_NOFILE
NFILES = 1100


@pytest.fixture
def small_mount(fuse_ok, monkeypatch):
    """mount(*args) -> Mount of a fresh share with NFILES files, its server limited to
    LIMIT descriptors, in a directory other users may traverse."""
    monkeypatch.setattr(conftest, "VFS_LOCKD",
                        ["prlimit", f"--nofile={LIMIT}:{LIMIT}", "--", *conftest.VFS_LOCKD])
    base = Path(tempfile.mkdtemp(prefix="vfs-lockd-limits-", dir="/tmp"))
    base.chmod(0o755)
    started: list[Mount] = []

    def mount(*args: str) -> Mount:
        src, mnt = base / "src", base / "mnt"
        src.mkdir(mode=0o755)
        mnt.mkdir()
        for i in range(NFILES):
            (src / f"f{i}").write_bytes(b"x")
        m = Mount(src, mnt, "g", ["--cache", "none", *args], base / "log")
        started.append(m)
        return m

    try:
        yield mount
    finally:
        for m in started:
            m.stop()
        shutil.rmtree(base, ignore_errors=True)


_GO: list[int] = []  # the parent's ends of every Opener's barrier (children close them)


class Opener:
    """A child running as `uid` that opens mnt/f0, f1, ... until refused, reports how
    many it opened and the errno, and keeps them open until told to exit."""

    def __init__(self, mnt: Path, uid: int) -> None:
        r, w = os.pipe()
        go_r, self._go = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:  # pragma: no cover - the child
            try:
                os.close(r)
                for fd in (self._go, *_GO):  # else another child's barrier never opens
                    os.close(fd)
                resource.setrlimit(resource.RLIMIT_NOFILE, (4 * LIMIT, 4 * LIMIT))
                os.setgroups([])
                os.setgid(uid)
                os.setuid(uid)
                fds, err = [], 0
                for i in range(NFILES):
                    try:
                        fds.append(os.open(mnt / f"f{i}", os.O_RDONLY))
                    except OSError as exc:
                        err = exc.errno
                        break
                os.write(w, json.dumps({"n": len(fds), "errno": err}).encode() + b"\n")
                os.read(go_r, 1)  # the parent's barrier: hold the files until then
            finally:
                os._exit(0)
        os.close(w)
        os.close(go_r)
        _GO.append(self._go)
        with os.fdopen(r, "rb") as f:
            self.result = json.loads(f.readline())

    def finish(self) -> None:
        _GO.remove(self._go)
        os.close(self._go)
        os.waitpid(self.pid, 0)


def server_fds(m: Mount) -> int:
    return len(os.listdir(f"/proc/{m.proc.pid}/fd"))


def test_one_user_cannot_lock_root_out_of_a_mount(small_mount) -> None:
    m = small_mount("--max-opens-per-uid", "700")
    before = server_fds(m)
    a = Opener(m.path, 65534)
    b = None
    try:
        # the per-uid budget: EMFILE to that uid at 700, however many it tries
        assert a.result == {"n": 700, "errno": errno.EMFILE}
        # one descriptor per open file (the inode's O_PATH gives way to it), not two
        assert server_fds(m) - before <= 700 + 16
        # all users but root together: half the table, then ENFILE, whoever asks
        b = Opener(m.path, 65533)
        assert b.result == {"n": LIMIT // 2 - 700, "errno": errno.ENFILE}
        # root still opens (more than either user may) and lists
        fds = [os.open(m.path / f"f{i}", os.O_RDONLY) for i in range(NFILES - 800, NFILES)]
        try:
            assert len(os.listdir(m.path)) == NFILES
            assert os.pread(fds[-1], 1, 0) == b"x"
        finally:
            for fd in fds:
                os.close(fd)
    finally:
        a.finish()
        if b is not None:
            b.finish()
    # closing gives the budget back: the first user opens again
    c = Opener(m.path, 65534)
    c.finish()
    assert c.result == {"n": 700, "errno": errno.EMFILE}


def test_the_default_per_uid_budget_is_a_quarter_of_the_table(small_mount) -> None:
    m = small_mount()
    a = Opener(m.path, 65534)
    try:
        assert a.result == {"n": LIMIT // 4, "errno": errno.EMFILE}
        fd = os.open(m.path / "f0", os.O_RDONLY)  # root
        os.close(fd)
    finally:
        a.finish()


# ---- item 7: the daemon's shared descriptor budget ----
DAEMON_NOFILE = 1024  # budget: 1024 - 128 (kept for the daemon's own), reserve: a quarter


def _fill(hog, handle: int, owner: int) -> int:
    """One more lock description for `hog` (a new owner): the SETLK's status."""
    from daemonutil import F_RDLCK

    from lockd.daemon import wire

    return hog.expect(hog.lk(wire.T_SETLK, handle, F_RDLCK, 0, 0, owner=owner))[0]


def _register(raw, path: Path) -> int:
    """Register a file; its status (negative errno) or the handle."""
    from lockd.daemon import wire

    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        raw.rid += 1
        raw.send(wire.file_frame(raw.rid, str(path)), [fd])
        status, payload = raw.expect(raw.rid)
    finally:
        os.close(fd)
    return status if status < 0 else wire.FILE_OUT.unpack_from(payload)[0]


def test_guests_filling_the_daemon_leave_another_its_first_lock(tmp_path: Path) -> None:
    from daemonutil import F_WRLCK, DaemonProc, Raw

    from lockd.daemon import wire

    d = DaemonProc(str(tmp_path), prefix=("prlimit", f"--nofile={DAEMON_NOFILE}:"
                                          f"{DAEMON_NOFILE}", "--")).start()
    conns: list = []
    try:
        hogs = [Raw(d.sock, f"hog{i}") for i in range(5)]  # one user's five mounts
        conns += hogs
        handles = [_register(h, tmp_path / f"hog{i}") for i, h in enumerate(hogs)]
        # round-robin, a new lock owner (a new description) at a time, until refused
        granted = 0
        full: set[int] = set()
        owner = 1
        while len(full) < len(hogs):
            for i, h in enumerate(hogs):
                if i in full:
                    continue
                rc = _fill(h, handles[i], owner)
                assert rc in (0, -errno.ENOLCK), rc
                if rc:
                    full.add(i)
                else:
                    granted += 1
            owner += 1
        assert granted > 400  # they did take most of the budget
        # nor can they take the rest by registering files that they never lock
        for i, h in enumerate(hogs):
            assert _register(h, tmp_path / f"more{i}") == -errno.ENOLCK
        # a sixth guest: its first locks (a new file, a description each) are granted
        victim = Raw(d.sock, "victim")
        conns.append(victim)
        vh = _register(victim, tmp_path / "victim")
        assert vh > 0
        assert victim.expect(victim.lk(wire.T_SETLK, vh, F_WRLCK, 0, 9, owner=1))[0] == 0
        assert victim.expect(victim.lk(wire.T_SETLK, vh, F_WRLCK, 10, 19, owner=2))[0] == 0
        # and so does a seventh (the reserve is for every guest under its guarantee)
        other = Raw(d.sock, "other")
        conns.append(other)
        oh = _register(other, tmp_path / "other")
        assert other.expect(other.lk(wire.T_SETLK, oh, F_WRLCK, 0, 9, owner=1))[0] == 0
    finally:
        for c in conns:
            c.close()
        d.stop()


def test_the_reserve_is_configurable() -> None:
    from lockd.api import Limits

    lim = Limits.parse("guaranteed=2,reserve=10,descriptors=99")
    assert (lim.guaranteed_descriptors, lim.reserved_descriptors, lim.max_descriptors) \
        == (2, 10, 99)
    assert (Limits().guaranteed_descriptors, Limits().reserved_descriptors) == (16, 1024)
