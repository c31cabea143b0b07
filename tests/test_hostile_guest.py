"""A share a hostile guest cannot break out of (issue 15, the FUSE server's half).

The guest kernel is not trusted: it may send any FUSE request with any header. Here it
is played by a Session fed crafted buffers, or by the Python vhost-user front-end talking
to a real `vfs-lockd virtiofs` back-end. What must hold: special files are never opened on
the host (device nodes, FIFOs, sockets), no request can keep the guest's locks alive after
it is gone, a reply never outgrows the buffer the guest gave, new objects belong to their
creator from the instant they exist, and POSIX ACLs mean through a mount what they mean on
the host (real /dev/fuse mounts, checked as an unprivileged user).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from conftest import Mount
from sessionrig import Sent
from test_vhost_user import (  # noqa: F401 - rig and share are fixtures
    REQ,
    host_can_lock,
    init,
    lk,
    lookup,
    open_file,
    rig,
    share,
)

from fuse_server import protocol as P
from fuse_server.passthrough import Passthrough
from fuse_server.session import MAX_WRITE, Session
from lockd.api import F_WRLCK
from lockd.engine.manager import LockManager

NOBODY = 65534
GROUP = 65533  # a supplementary group of the unprivileged test user
ACL = "system.posix_acl_access"
ACL_DEFAULT = "system.posix_acl_default"


def need_root() -> None:
    if os.geteuid() != 0:
        if os.environ.get("CI") == "true":
            pytest.fail("needs root (CI=true)")
        pytest.skip("needs root")


# ---- a guest played by crafted requests to a Session ----
class Guest:
    def __init__(self, root: Path, **session_args) -> None:
        self.sent = Sent()
        self.session = Session(Passthrough(str(root)), LockManager(), "hostile", self.sent,
                               "none", **session_args)
        self.unique = 0

    def req(self, opcode: int, body: bytes = b"", nodeid: int = 1, uid: int = 0,
            gid: int = 0, room: int | None = None) -> bytes:
        self.unique += 2
        hdr = P.IN_HEADER.pack(P.IN_HEADER.size + len(body), opcode, self.unique, nodeid,
                               uid, gid, 4242, 0, 0)
        reply = self.session.handle(hdr + body, *(() if room is None else (room,)))
        assert reply is not None
        length, _, unique = P.OUT_HEADER.unpack_from(reply)
        assert (length, unique) == (len(reply), self.unique)
        return reply

    def init(self, flags: int = 0xFFFFFFFF) -> int:
        out = ok(self.req(P.INIT, P.INIT_IN.pack(7, 38, 65536, flags) + bytes(48)))
        return P.INIT_OUT.unpack(out)[3]

    def lookup(self, name: bytes, parent: int = 1) -> int:
        return P.ENTRY_OUT.unpack_from(ok(self.req(P.LOOKUP, name + b"\0", parent)))[0]

    def open(self, nodeid: int, flags: int = os.O_RDONLY) -> bytes:
        return self.req(P.OPEN, P.OPEN_IN.pack(flags, 0), nodeid)


def err(reply: bytes) -> int:
    return -P.OUT_HEADER.unpack_from(reply)[1]


def ok(reply: bytes) -> bytes:
    assert err(reply) == 0, os.strerror(err(reply))
    return reply[16:]


@pytest.fixture
def guest(tmp_path: Path):
    root = tmp_path / "share"
    root.mkdir()
    g = Guest(root)
    g.init()
    try:
        yield g, root
    finally:
        g.session.end()


def make_special(path: Path, kind: str) -> None:
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "socket":
        os.mknod(path, stat.S_IFSOCK | 0o666)
    else:  # the host's /dev/zero: 1:5
        os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(1, 5))


# ---- 1. special files ----
@pytest.mark.parametrize("kind", ["chardev", "fifo", "socket"])
def test_special_files_are_never_opened(guest, kind: str) -> None:
    """OPEN, CREATE of an existing name, truncating SETATTR, OPENDIR: an errno a user
    understands (a device node or FIFO: EACCES, as a nodev mount answers for a device; a
    socket: ENXIO, as open(2) of a socket does), and no open(2) of the node on the host
    (O_NONBLOCK: an open of the FIFO would succeed)."""
    need_root()
    g, root = guest
    make_special(root / "node", kind)
    node = g.lookup(b"node")
    refused = errno.ENXIO if kind == "socket" else errno.EACCES
    for flags in (os.O_RDONLY | os.O_NONBLOCK, os.O_RDWR, os.O_WRONLY | os.O_NONBLOCK):
        assert err(g.open(node, flags)) == refused, flags
    create = P.CREATE_IN.pack(os.O_RDWR | os.O_CREAT | os.O_NONBLOCK, 0o644, 0, 0) + b"node\0"
    assert err(g.req(P.CREATE, create)) == refused
    setattr_ = bytearray(P.SETATTR_IN.size)
    struct.pack_into("<I", setattr_, 0, P.FATTR_SIZE)
    assert err(g.req(P.SETATTR, bytes(setattr_), node)) == errno.EINVAL
    assert err(g.req(P.OPENDIR, P.OPEN_IN.pack(0, 0), node)) == errno.ENOTDIR
    # Names and attributes still work: the guest kernel handles its special files itself.
    assert stat.S_IFMT(P.ATTR.unpack_from(ok(g.req(P.GETATTR, bytes(16), node)), 16)[9]) \
        == stat.S_IFMT(os.lstat(root / "node").st_mode)
    assert not [fd for fd in os.listdir("/proc/self/fd") if _is_open_special(int(fd))]


def _is_open_special(fd: int) -> bool:
    """An fd of this process that is a special file really opened (not O_PATH)."""
    try:
        st = os.fstat(fd)
        with open(f"/proc/self/fdinfo/{fd}") as f:
            flags = int(f.read().split("flags:")[1].split()[0], 8)
    except (OSError, IndexError):
        return False
    return stat.S_IFMT(st.st_mode) in (stat.S_IFCHR, stat.S_IFBLK, stat.S_IFIFO) \
        and not flags & os.O_PATH and os.path.realpath(f"/proc/self/fd/{fd}").startswith("/tmp")


@contextlib.contextmanager
def tmpfs(where: Path, options: str):
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size=1m,{options}", "tmpfs", str(where)],
                   check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_mknod_of_device_nodes_only_where_the_host_ignores_them(guest) -> None:
    """A guest's device node could be opened by a host process: refused (EPERM) unless
    the file system is mounted nodev. FIFOs, sockets and overlayfs whiteouts (0:0) are
    made anywhere; nothing made is ever opened through us."""
    need_root()
    g, root = guest

    def mknod(parent: int, name: bytes, mode: int, major: int = 0, minor: int = 0) -> bytes:
        rdev = P.new_encode_dev(os.makedev(major, minor))
        return g.req(P.MKNOD, P.MKNOD_IN.pack(mode, rdev, 0, 0) + name + b"\0", parent)

    with tmpfs(root / "dev", "dev") as dev, tmpfs(root / "nodev", "nodev"):
        d, nd = g.lookup(b"dev"), g.lookup(b"nodev")
        for kind in (stat.S_IFCHR, stat.S_IFBLK):
            assert err(mknod(d, b"disk", kind | 0o666, 7, 0)) == errno.EPERM
        assert not (dev / "disk").exists()
        out = ok(mknod(nd, b"disk", stat.S_IFBLK | 0o666, 7, 0))
        assert os.major(os.lstat(root / "nodev" / "disk").st_rdev) == 7
        assert err(g.open(P.ENTRY_OUT.unpack_from(out)[0], os.O_RDWR)) == errno.EACCES
        ok(mknod(d, b"fifo", stat.S_IFIFO | 0o644))
        ok(mknod(d, b"sock", stat.S_IFSOCK | 0o644))
        ok(mknod(d, b"whiteout", stat.S_IFCHR))
        assert os.lstat(dev / "whiteout").st_rdev == 0


def test_fifo_and_device_opens_do_not_wedge_the_backend(rig, share: Path) -> None:  # noqa: F811
    """The reproduction through a real back-end: two OPENs of a FIFO (as many as worker
    threads) and READ/WRITE on the host's /dev/zero, from a hostile guest."""
    need_root()
    os.mkfifo(share / "fifo")
    make_special(share / "zero", "chardev")
    b = rig.backend("--threads", "2")
    fe = rig.frontend(b)
    init(fe)
    fifo, zero = lookup(fe, b"fifo"), lookup(fe, b"zero")
    heads = [fe.fuse_post(REQ, P.OPEN, P.OPEN_IN.pack(os.O_RDONLY, 0), fifo) for _ in range(2)]
    for h in heads:
        assert fe.queue(REQ).wait(h, timeout=10).error == errno.EACCES
    assert fe.fuse(REQ, P.GETATTR, P.GETATTR_IN.pack(0, 0, 0), fifo).error == 0
    assert fe.fuse(REQ, P.OPEN, P.OPEN_IN.pack(os.O_RDWR, 0), zero).error == errno.EACCES
    for fh in range(1, 4):  # whatever handle numbers the guest guesses
        read = P.READ_IN.pack(fh, 0, 4096, 0, 0, 0, 0)
        assert fe.fuse(REQ, P.READ, read, zero).error == errno.EBADF
    assert "Traceback" not in b.output()


# ---- 2. a stuck worker and the guest's locks ----
def _fuse_minor(mountpoint: Path) -> int:
    """The FUSE connection number of a mount, from mountinfo (a stat would ask its server)."""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            parts = line.split()
            if parts[4] == str(mountpoint):
                return int(parts[2].split(":")[1])
    raise AssertionError(f"{mountpoint} is not mounted")


def _wait_for(cond, what: str, timeout: float = 15.0) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def _all_stopped(pid: int) -> bool:
    """Has every thread of `pid` entered the stopped state (SIGSTOP is asynchronous)?"""
    states = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/stat") as f:
            states.append(f.read().rsplit(")", 1)[1].split()[0])
    return all(s == "T" for s in states)


class HungMount:
    """A FUSE mount at `where` (inside a share) whose server can be stopped: every host
    call into it then waits, as on a hung NFS or FUSE file system."""

    def __init__(self, where: Path, tmp: Path) -> None:
        inner = tmp / "inner"
        inner.mkdir()
        where.mkdir()
        self.mount = Mount(inner, where, "hung", ["--cache", "none"], tmp / "hung.log")
        self.stopped = False
        # (fusectl is mounted for the whole run: conftest.py)
        self.waiting = Path(f"/sys/fs/fuse/connections/{_fuse_minor(where)}/waiting")

    def stop(self) -> None:
        os.kill(self.mount.proc.pid, signal.SIGSTOP)
        self.stopped = True
        # Stopped before anything reads a request: a wait for it stays killable, so a
        # process stuck on it can still exit.
        _wait_for(lambda: _all_stopped(self.mount.proc.pid), "the hung server did not stop")

    def wait_stuck(self) -> None:
        """Until a request waits for the stopped server."""
        _wait_for(lambda: int(self.waiting.read_text()) >= 1, "nothing reached the hung mount")

    def close(self) -> None:
        if self.stopped:
            os.kill(self.mount.proc.pid, signal.SIGCONT)
        self.mount.stop()


@pytest.mark.parametrize("stuck_in", ["native", "session"])
def test_stuck_worker_does_not_keep_the_guests_locks(rig, share: Path, tmp_path: Path,  # noqa: F811
                                                     stuck_in: str) -> None:
    """The thread answering a request is stuck in a host call that does not return (a
    hung file system inside the share: a FUSE mount whose server is stopped): the ring's
    reader in the native LOOKUP, or in the session's OPENDIR (answered on the reader
    too); the front-end then disconnects. The guest's lock must be released on the host
    at once, not when the host call returns, and the back-end exits."""
    need_root()
    hung = HungMount(share / "hung", tmp_path)
    try:
        b = rig.backend("--threads", "1")
        fe = rig.frontend(b)
        init(fe)
        node = lookup(fe, b"f")
        fh = open_file(fe, node)
        assert fe.fuse(REQ, P.SETLK, lk(fh, 1, F_WRLCK), node).error == 0
        assert not host_can_lock(share / "f")
        hung_dir = lookup(fe, b"hung") if stuck_in == "session" else 0
        hung.stop()
        if stuck_in == "native":
            stuck = fe.fuse_post(REQ, P.LOOKUP, b"hung\0")  # its fstatat never returns
        else:
            stuck = fe.fuse_post(REQ, P.OPENDIR, P.OPEN_IN.pack(0, 0), hung_dir)
        hung.wait_stuck()
        assert not fe.queue(REQ).is_done(stuck)
        fe.close()  # the VM is gone
        _wait_for(lambda: host_can_lock(share / "f"),
                  "the guest's lock outlived its front-end while a worker was stuck")
        assert b.proc.wait(15) == 0, b.output()
    finally:
        hung.close()


def test_a_new_init_is_not_answered_from_the_ended_sessions_table(rig, share: Path,  # noqa: F811
                                                                  tmp_path: Path) -> None:
    """The ring's native loop answers from the session's descriptor table. A new INIT (a
    new kernel on the same rings) ends the session while a request of it is stuck in a
    host call, so its table still has its inodes, and the loop may still hold it: the
    new session's guest must not get answers about inodes it never looked up."""
    need_root()
    hung = HungMount(share / "hung", tmp_path)
    try:
        (share / "hung" / "x").write_text("x")
        b = rig.backend()
        fe = rig.frontend(b)
        init(fe)
        node = lookup(fe, b"f")
        getattr_ = P.GETATTR_IN.pack(0, 0, 0)
        assert fe.fuse(REQ, P.GETATTR, getattr_, node).error == 0
        hung_dir = lookup(fe, b"hung")
        x = P.ENTRY_OUT.unpack_from(fe.fuse(REQ, P.LOOKUP, b"x\0", hung_dir).payload)[0]
        fh = open_file(fe, x)
        hung.stop()
        # the session's (and holding no lock of the session's): never returns
        stuck = fe.fuse_post(REQ, P.FSYNC, P.FSYNC_IN.pack(fh, 0, 0), x)
        hung.wait_stuck()
        init(fe)  # INIT again: the old session ends, its inodes stay until `stuck` returns
        assert not fe.queue(REQ).is_done(stuck)
        for _ in range(3):
            assert fe.fuse(REQ, P.GETATTR, getattr_, node).error != 0
        assert lookup(fe, b"f")  # the new session serves
    finally:
        hung.close()


def test_ended_session_keeps_descriptors_until_stuck_requests_return(guest, tmp_path: Path) -> None:
    """Session.end() while a request is stuck in a host call: the guest's locks go at
    once, but the descriptors stay open until the request returns (closing them earlier
    would let it use a number by then given to another file)."""
    need_root()
    g, root = guest
    (root / "f").write_text("x")
    node = g.lookup(b"f")
    fh = P.OPEN_OUT.unpack_from(ok(g.open(node, os.O_RDWR)))[0]
    assert err(g.req(P.SETLK, lk(fh, 1, F_WRLCK), node)) == 0
    assert not host_can_lock(root / "f")
    hung = HungMount(root / "hung", tmp_path)
    try:
        hung.stop()
        replies: list[bytes] = []
        t = threading.Thread(target=lambda: replies.append(g.req(P.LOOKUP, b"hung\0")))
        t.start()
        hung.wait_stuck()
        root_fd = g.session.fs.root.fd
        g.session.end()
        assert host_can_lock(root / "f")
        assert os.readlink(f"/proc/self/fd/{root_fd}") == str(root)  # still open
        os.kill(hung.mount.proc.pid, signal.SIGCONT)
        hung.stopped = False
        t.join(15)
        assert not t.is_alive() and replies
        with contextlib.suppress(OSError):  # closed now (or the number reused elsewhere)
            assert os.readlink(f"/proc/self/fd/{root_fd}") != str(root)
    finally:
        hung.close()


# ---- 3. POSIX ACLs ----
def acl_xattr(*entries: tuple[int, int, int]) -> bytes:
    """A system.posix_acl_* value: version 2, then (tag, perm, id) sorted by tag and id."""
    body = b"".join(struct.pack("<HHI", t, p, i) for t, p, i in sorted(entries))
    return struct.pack("<I", 2) + body


ANY = 0xFFFFFFFF
USER_OBJ, USER, GROUP_OBJ, MASK, OTHER = 0x01, 0x02, 0x04, 0x10, 0x20


def as_user(fn, uid: int = NOBODY, gid: int = NOBODY, groups: tuple[int, ...] = ()):  # noqa: ANN001, ANN201
    """fn() run by a forked child as uid:gid (its result must be JSON)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.setgroups(list(groups))
            os.setgid(gid)
            os.setuid(uid)
            out = {"ok": fn()}
        except BaseException as exc:  # noqa: BLE001 - reported to the parent
            out = {"error": repr(exc)}
        os.write(w, json.dumps(out).encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    out = json.loads(data)
    assert "ok" in out, out["error"]
    return out["ok"]


@pytest.fixture
def public_mount(fuse_ok):
    """mount(*args) -> (source, mountpoint) in a directory anyone may traverse (pytest's
    own is 0700), so that an unprivileged user can use the mount."""
    base = Path(tempfile.mkdtemp(prefix="vfs-lockd-sec-", dir="/tmp"))
    base.chmod(0o755)
    started: list[Mount] = []

    def mount(*args: str) -> tuple[Path, Path]:
        src, mnt = base / f"src{len(started)}", base / f"mnt{len(started)}"
        src.mkdir(mode=0o755)
        mnt.mkdir()
        src.chmod(0o755)
        started.append(Mount(src, mnt, f"g{len(started)}", ["--cache", "none", *args],
                             base / f"log{len(started)}"))
        return src, mnt

    try:
        yield mount
    finally:
        for m in started:
            m.stop()
        shutil.rmtree(base, ignore_errors=True)


def _acl_share(src: Path) -> None:
    (src / "deny").write_text("secret")
    (src / "deny").chmod(0o644)
    os.setxattr(src / "deny", ACL, acl_xattr((USER_OBJ, 6, ANY), (USER, 0, NOBODY),
                                            (GROUP_OBJ, 4, ANY), (MASK, 4, ANY), (OTHER, 4, ANY)))
    (src / "grant").write_text("x")
    (src / "grant").chmod(0o644)
    os.setxattr(src / "grant", ACL, acl_xattr((USER_OBJ, 6, ANY), (USER, 6, NOBODY),
                                             (GROUP_OBJ, 4, ANY), (MASK, 6, ANY), (OTHER, 4, ANY)))
    for d in ("inherit", "plain"):
        (src / d).mkdir()
        (src / d).chmod(0o777)
    os.setxattr(src / "inherit", ACL_DEFAULT, acl_xattr(
        (USER_OBJ, 7, ANY), (USER, 7, NOBODY), (GROUP_OBJ, 5, ANY), (MASK, 7, ANY), (OTHER, 0, ANY)))


def _acl_probe(base: str):  # noqa: ANN202
    def probe() -> dict:
        seen = {}
        for name, flags in (("deny", os.O_RDONLY), ("grant", os.O_WRONLY)):
            try:
                os.close(os.open(f"{base}/{name}", flags))
                seen[name] = 0
            except OSError as exc:
                seen[name] = exc.errno
        os.umask(0o077)
        for d in ("inherit", "plain"):
            os.close(os.open(f"{base}/{d}/file", os.O_CREAT | os.O_WRONLY, 0o666))
            os.mkdir(f"{base}/{d}/dir", 0o777)
        return seen
    return probe


def _made(src: Path) -> dict:
    out = {}
    for d in ("inherit", "plain"):
        for n in ("file", "dir"):
            p = src / d / n
            out[f"{d}/{n}"] = (stat.S_IMODE(p.stat().st_mode), sorted(os.listxattr(p)))
            shutil.rmtree(p) if p.is_dir() else p.unlink()
    return out


def test_posix_acls_mean_what_they_mean_on_the_host(public_mount) -> None:
    """A deny entry denies, a grant entry grants, a default ACL is inherited (and the
    umask then does not apply): through the mount exactly as on the host directory."""
    src, mnt = public_mount()
    _acl_share(src)
    on_host = as_user(_acl_probe(str(src)))
    made_on_host = _made(src)
    assert on_host == {"deny": errno.EACCES, "grant": 0}
    assert made_on_host["inherit/file"][0] == 0o660 and made_on_host["plain/file"][0] == 0o600
    assert as_user(_acl_probe(str(mnt))) == on_host
    assert _made(src) == made_on_host
    # The ACL itself reads the same through the mount.
    assert os.getxattr(mnt / "deny", ACL) == os.getxattr(src / "deny", ACL)


def test_no_posix_acl_leaves_mode_bits_only(public_mount) -> None:
    """--no-posix-acl: the old behaviour, mode bits only (what the option turns off)."""
    src, mnt = public_mount("--no-posix-acl")
    _acl_share(src)
    assert as_user(_acl_probe(str(mnt))) == {"deny": 0, "grant": errno.EACCES}


def test_acl_negotiation_and_names_without_xattr(tmp_path: Path) -> None:
    root = tmp_path / "share"
    root.mkdir()
    (root / "f").write_text("x")
    os.setxattr(root / "f", ACL, acl_xattr((USER_OBJ, 6, ANY), (USER, 4, NOBODY),
                                          (GROUP_OBJ, 4, ANY), (MASK, 4, ANY), (OTHER, 4, ANY)))
    os.setxattr(root / "f", "user.note", b"hello")
    for args, offered, want in (({}, True, True), ({"posix_acl": False}, True, False),
                                ({}, False, False)):
        g = Guest(root, **args)
        try:
            flags = g.init(0xFFFFFFFF if offered else 0xFFFFFFFF & ~P.POSIX_ACL)
            assert bool(flags & P.POSIX_ACL) == want == g.session.acl
        finally:
            g.session.end()
    # xattr off (the drop-in's default): the ACL names still pass, nothing else does.
    g = Guest(root, xattr=False)
    try:
        g.init()
        f = g.lookup(b"f")
        get = P.GETXATTR_IN.pack(4096, 0)
        assert ok(g.req(P.GETXATTR, get + ACL.encode() + b"\0", f)) == os.getxattr(root / "f", ACL)
        assert err(g.req(P.GETXATTR, get + b"user.note\0", f)) == errno.EOPNOTSUPP
        assert ok(g.req(P.LISTXATTR, P.GETXATTR_IN.pack(4096, 0), f)) == ACL.encode() + b"\0"
        setx = P.SETXATTR_IN.pack(1, 0) + b"user.note\0x"
        assert err(g.req(P.SETXATTR, setx, f)) == errno.EOPNOTSUPP
        assert os.getxattr(root / "f", "user.note") == b"hello"
    finally:
        g.session.end()
    # With ACLs off and xattr off, the xattr opcodes are unknown, as before.
    g = Guest(root, xattr=False, posix_acl=False)
    try:
        g.init()
        f = g.lookup(b"f")
        assert err(g.req(P.GETXATTR, P.GETXATTR_IN.pack(4096, 0) + ACL.encode() + b"\0", f)) \
            == errno.ENOSYS
    finally:
        g.session.end()


@pytest.mark.parametrize("args, acl", [((), True), (("-o", "no_posix_acl"), False),
                                        (("--no-posix-acl",), False)])
def test_backend_negotiates_posix_acl(rig, args: tuple[str, ...], acl: bool) -> None:  # noqa: F811
    b = rig.backend(*args)
    fe = rig.frontend(b)
    assert bool(init(fe) & P.POSIX_ACL) == acl


# ---- 7. reply sizes ----
def _peak_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(next(line for line in f if line.startswith("VmHWM:")).split()[1])


def test_read_is_bounded_by_the_guests_buffer(rig, share: Path) -> None:  # noqa: F811
    """A 1 GiB READ into a 4 KiB buffer: 4080 bytes come back (the buffer less the reply
    header) and the back-end never holds more than a request's worth; READDIR and
    GETXATTR sizes likewise."""
    with open(share / "big", "wb") as f:
        f.truncate(2 << 30)  # sparse: reading it yields zeros
        f.seek(1 << 20)
        f.write(b"marker")
    b = rig.backend()
    fe = rig.frontend(b)
    init(fe)
    node = lookup(fe, b"big")
    fh = open_file(fe, node, os.O_RDONLY)
    before = _peak_rss_kib(b.proc.pid)
    for _ in range(3):
        r = fe.fuse(REQ, P.READ, P.READ_IN.pack(fh, (1 << 20) - 10, 1 << 30, 0, 0, 0, 0), node,
                    out=4096)
        assert r.used_len == 4096
        assert r.payload[:16] == bytes(10) + b"marker"
    grown = _peak_rss_kib(b.proc.pid) - before
    assert grown < 64 * 1024, f"the back-end grew by {grown} KiB for 4 KiB reads"
    # A guest buffer bigger than INIT's maximum still gets at most MAX_WRITE bytes.
    r = fe.fuse(REQ, P.READ, P.READ_IN.pack(fh, 0, 1 << 30, 0, 0, 0, 0), node,
                out=MAX_WRITE + 8192)
    assert len(r.payload) == MAX_WRITE
    for i in range(50):
        (share / f"entry-{i:03}").touch()
    dh = P.OPEN_OUT.unpack_from(fe.fuse(REQ, P.OPENDIR, P.OPEN_IN.pack(0, 0)).payload)[0]
    r = fe.fuse(REQ, P.READDIR, P.READ_IN.pack(dh, 0, 1 << 20, 0, 0, 0, 0), out=16 + 100)
    assert 0 < len(r.payload) <= 100
    os.setxattr(share / "big", "user.big", b"v" * 3000)
    get = P.GETXATTR_IN.pack(65536, 0) + b"user.big\0"
    assert fe.fuse(REQ, P.GETXATTR, get, node, out=1024).error == errno.ERANGE
    assert fe.fuse(REQ, P.GETXATTR, get, node, out=4096).payload == b"v" * 3000
    assert "does not fit" not in b.output()


def test_session_bounds_read_by_the_request_maximum(guest) -> None:
    g, root = guest
    (root / "f").write_bytes(os.urandom(3 << 20))
    node = g.lookup(b"f")
    fh = P.OPEN_OUT.unpack_from(ok(g.open(node)))[0]
    read = P.READ_IN.pack(fh, 0, 1 << 30, 0, 0, 0, 0)
    assert len(ok(g.req(P.READ, read, node))) == MAX_WRITE
    assert len(ok(g.req(P.READ, read, node, room=4096))) == 4096 - 16
    assert len(ok(g.req(P.READ, read, node, room=10))) == 0  # no room at all


# ---- 9. ownership of new objects ----
@pytest.mark.parametrize("op", ["mkdir", "mknod", "symlink"])
def test_new_object_is_the_creators_even_if_renamed_at_once(guest, op: str) -> None:
    """A rename right after the object is created (here: the instant the creating call
    returns) puts another file under its name. That file must keep its owner; the new
    object must belong to its creator."""
    need_root()
    g, root = guest
    victim = root / "victim"
    victim.write_text("root's")
    victim.chmod(0o600)
    body = {
        "mkdir": (P.MKDIR, P.MKDIR_IN.pack(0o755, 0) + b"new\0"),
        "mknod": (P.MKNOD, P.MKNOD_IN.pack(stat.S_IFIFO | 0o644, 0, 0, 0) + b"new\0"),
        "symlink": (P.SYMLINK, b"new\0target\0"),
    }[op]
    target = getattr(os, op)
    swapped: list[bool] = []

    def swap(frame, event, arg) -> None:  # noqa: ANN001 - a profile hook
        if event == "c_return" and arg is target and not swapped:
            swapped.append(True)
            os.rename(root / "new", root / "made")
            os.rename(victim, root / "new")

    sys.setprofile(swap)
    try:
        g.req(body[0], body[1], uid=NOBODY, gid=NOBODY)
    finally:
        sys.setprofile(None)
    assert swapped
    assert (os.lstat(root / "new").st_uid, os.lstat(root / "new").st_gid) == (0, 0)
    assert (os.lstat(root / "made").st_uid, os.lstat(root / "made").st_gid) == (NOBODY, NOBODY)


def test_creators_own_what_they_make_through_a_mount(public_mount) -> None:
    """Owner uid:gid from the caller, group from a setgid parent, and a directory the
    caller may write through a supplementary group only (the guest kernel checked it)."""
    src, mnt = public_mount()
    (src / "team").mkdir()
    os.chown(src / "team", 0, GROUP)
    (src / "team").chmod(0o2770)

    def make() -> None:
        os.mkdir(f"{mnt}/team/d")
        os.close(os.open(f"{mnt}/team/f", os.O_CREAT | os.O_WRONLY, 0o644))
        os.symlink("f", f"{mnt}/team/l")
        os.mkfifo(f"{mnt}/team/p")

    as_user(make, groups=(GROUP,))
    for n in ("d", "f", "l", "p"):
        st = os.lstat(src / "team" / n)
        assert (st.st_uid, st.st_gid) == (NOBODY, GROUP), n
    assert os.stat(src / "team" / "d").st_mode & stat.S_ISGID


# ---- setuid/setgid on writes (found with issue 15: direct I/O kept them) ----
def test_writes_clear_setid_bits_as_on_the_host(public_mount) -> None:
    """A write or an O_TRUNC open by a user clears setuid (and setgid with group
    execute), as the host does; root's keep them. Through the mount with direct I/O the
    guest kernel clears nothing itself, and the server writes as root."""
    src, mnt = public_mount()
    modes = {"w": 0o6777, "t": 0o6777, "g": 0o2766, "r": 0o6777}

    def reset() -> None:
        for name, mode in modes.items():
            (src / name).write_bytes(b"x")
            (src / name).chmod(mode)

    def user(base: Path):  # noqa: ANN202
        def run() -> None:
            for name in ("w", "g"):
                fd = os.open(f"{base}/{name}", os.O_WRONLY)
                os.pwrite(fd, b"y", 0)
                os.close(fd)
            os.close(os.open(f"{base}/t", os.O_WRONLY | os.O_TRUNC))
        return run

    def root(base: Path) -> None:
        fd = os.open(base / "r", os.O_WRONLY)
        os.pwrite(fd, b"y", 0)
        os.close(fd)

    results = []
    for base in (src, mnt):
        reset()
        as_user(user(base))
        root(base)
        results.append({n: oct(stat.S_IMODE((src / n).stat().st_mode)) for n in modes})
    on_host, through_mount = results
    # (setgid without group execute: older kernels keep it, newer ones clear it for a
    # caller outside the file's group; the mount must do what this host does.)
    assert (on_host["w"], on_host["t"], on_host["r"]) == ("0o777", "0o777", "0o6777")
    assert through_mount == on_host
