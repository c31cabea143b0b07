"""No guest request reaches outside the share when the host moves a directory out (issue
23 item 2).

The guest looks up a directory; on the host that directory is renamed outside the shared
directory, next to a root-only file. Then the guest asks for ".." of it (again and again,
and of a subdirectory it knew), for names under it, and to create, link, rename, remove
and list there. Nothing outside the share may be read or written: every such request is
ENOENT (as for a directory that was removed), and once the host moves the directory back,
everything works again. Driven through a Session (both ways the passthrough tells where a
directory is) and through a real back-end in each sandbox mode with the raw vhost-user
front-end.
"""

from __future__ import annotations

import errno
import os
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import REPO, own_tmpfs
from procutil import stop, wait_until
from test_hostile_guest import Guest, err, need_root
from test_vhost_user import REQ, Backend, init
from vhost_frontend import Frontend

from fuse_server import protocol as P
from fuse_server.passthrough import Passthrough

SECRET = b"root-only secret outside the share\n"
# (errno, payload) of one FUSE request: (opcode, body, nodeid)
Ask = Callable[[int, bytes, int], tuple[int, bytes]]


def _layout(tmp: Path) -> tuple[Path, Path]:
    """tmp/host (the host's tree: a 0600 secret) holding host/share/d/sub."""
    host = tmp / "host"
    share = host / "share"
    (share / "d" / "sub").mkdir(parents=True)
    (share / "d" / "f").write_bytes(b"inside\n")
    secret = host / "secret"
    secret.write_bytes(SECRET)
    secret.chmod(0o600)
    return host, share


def _entry(ask: Ask, name: bytes, parent: int) -> int:
    e, out = ask(P.LOOKUP, name + b"\0", parent)
    assert e == 0, (name, os.strerror(e))
    return P.ENTRY_OUT.unpack_from(out)[0]


def _read_all(ask: Ask, nodeid: int) -> bytes | None:
    """Open and read a file the guest found (None if it cannot)."""
    e, out = ask(P.OPEN, P.OPEN_IN.pack(os.O_RDONLY, 0), nodeid)
    if e:
        return None
    fh = P.OPEN_OUT.unpack_from(out)[0]
    e, data = ask(P.READ, P.READ_IN.pack(fh, 0, 4096, 0, 0, 0, 0), nodeid)
    ask(P.RELEASE, P.RELEASE_IN.pack(fh, 0, 0, 0), nodeid)
    return None if e else data


def escape_attempts(ask: Ask, host: Path, share: Path) -> None:
    """The whole scenario, for any way of asking."""
    d = _entry(ask, b"d", 1)
    sub = _entry(ask, b"sub", d)
    # Both found below the share, as a name resolved in each finds them (a verdict the
    # server may keep until a directory is moved: fuse_server/moves.py).
    assert ask(P.LOOKUP, b"absent\0", sub)[0] == errno.ENOENT
    assert _entry(ask, b"f", d)
    moved = host / "moved"
    os.rename(share / "d", moved)  # the host moves the directory out of the share
    (moved / "planted").write_bytes(b"the host's, not shared\n")

    # '..' of the moved directory (or of its subdirectory) never leads anywhere.
    for node in (d, sub):
        for _ in range(8):
            e, out = ask(P.LOOKUP, b"..\0", node)
            assert e == errno.ENOENT, f"'..' answered {os.strerror(e)}"
    # Names under it are not resolved, nothing is made, moved, linked or listed there.
    assert ask(P.LOOKUP, b"planted\0", d)[0] == errno.ENOENT
    assert ask(P.LOOKUP, b"f\0", d)[0] == errno.ENOENT
    assert ask(P.LOOKUP, b"..\0", d)[0] == errno.ENOENT
    create = P.CREATE_IN.pack(os.O_RDWR | os.O_CREAT, 0o644, 0, 0) + b"new\0"
    assert ask(P.CREATE, create, d)[0] == errno.ENOENT
    assert ask(P.MKDIR, P.MKDIR_IN.pack(0o755, 0) + b"newdir\0", d)[0] == errno.ENOENT
    mknod = P.MKNOD_IN.pack(stat.S_IFREG | 0o644, 0, 0, 0) + b"node\0"
    assert ask(P.MKNOD, mknod, d)[0] == errno.ENOENT
    assert ask(P.SYMLINK, b"link\0/etc/shadow\0", d)[0] == errno.ENOENT
    assert ask(P.UNLINK, b"planted\0", d)[0] == errno.ENOENT
    assert ask(P.RMDIR, b"sub\0", d)[0] == errno.ENOENT
    assert ask(P.RENAME, P.RENAME_IN.pack(1) + b"planted\0stolen\0", d)[0] == errno.ENOENT
    assert ask(P.RENAME, P.RENAME_IN.pack(d) + b"d2\0x\0", 1)[0] in (errno.ENOENT,)
    assert ask(P.OPENDIR, P.OPEN_IN.pack(0, 0), d)[0] == errno.ENOENT
    assert ask(P.OPENDIR, P.OPEN_IN.pack(0, 0), sub)[0] == errno.ENOENT
    (share / "inside").write_bytes(b"x")
    inside = _entry(ask, b"inside", 1)
    assert ask(P.LINK, P.LINK_IN.pack(inside) + b"linked\0", d)[0] == errno.ENOENT
    # The host's tree is as it was: nothing read, nothing written.
    assert sorted(p.name for p in moved.iterdir()) == ["f", "planted", "sub"]
    assert sorted(p.name for p in host.iterdir()) == ["moved", "secret", "share"]
    assert (host / "secret").read_bytes() == SECRET
    # What the guest holds stays its own: the moved directory's attributes.
    assert ask(P.GETATTR, P.GETATTR_IN.pack(0, 0, 0), d)[0] == 0

    # Moved back under the share: served again, nothing was refused for good.
    os.rename(moved, share / "d")
    assert _read_all(ask, _entry(ask, b"planted", d)) == b"the host's, not shared\n"
    assert _entry(ask, b"..", sub) == d
    assert _entry(ask, b"..", d) == 1
    assert _entry(ask, b"..", 1) == 1  # the root is its own parent


def _session_ask(g: Guest) -> Ask:
    def ask(opcode: int, body: bytes, nodeid: int) -> tuple[int, bytes]:
        reply = g.req(opcode, body, nodeid)
        return err(reply), reply[16:]
    return ask


@pytest.mark.parametrize("by_path", [True, False], ids=["kernel-path", "walk"])
def test_session_refuses_everything_under_a_directory_moved_out(tmp_path: Path,
                                                                by_path: bool) -> None:
    """Both ways the server tells: the kernel's path resolved beneath the share
    (openat2), and the walk up '..' used on kernels without openat2."""
    need_root()
    if by_path:
        assert Passthrough.by_path, "this kernel has openat2 (5.6+)"
    host, share = _layout(tmp_path)
    g = Guest(share)
    g.session.fs.by_path = by_path
    g.init()
    try:
        escape_attempts(_session_ask(g), host, share)
    finally:
        g.session.end()


def _attempts_through(sock: str, host: Path, share: Path) -> None:
    """escape_attempts() from a raw vhost-user front-end on the back-end at `sock`."""
    fe = Frontend(sock)
    try:
        init(fe)

        def ask(opcode: int, body: bytes, nodeid: int) -> tuple[int, bytes]:
            r = fe.fuse(REQ, opcode, body, nodeid)
            return r.error, (r.payload if r.error == 0 else b"")

        escape_attempts(ask, host, share)
    finally:
        fe.close()


@pytest.mark.parametrize("mode", ["none", "chroot", "namespace"])
def test_backend_refuses_everything_under_a_directory_moved_out(tmp_path: Path,
                                                                mode: str) -> None:
    """A real `vfs-lockd virtiofs --sandbox MODE` and a raw vhost-user front-end."""
    need_root()
    host, share = _layout(tmp_path)
    b = Backend(tmp_path, share, 0, ["--sandbox", mode])
    try:
        _attempts_through(str(b.sock), host, share)
    finally:
        b.stop()
    assert "Traceback" not in b.output()


# ---- the default sandbox: the strongest that can be set up where the back-end runs ----
@pytest.mark.parametrize("cmd", ["vfs-lockd-virtiofsd", "vfs-lockd virtiofs"])
@pytest.mark.parametrize("dropped, chosen", [
    ("", "namespace"), ("-sys_admin", "chroot"), ("-sys_admin,-sys_chroot", "none")])
def test_default_sandbox_is_the_strongest_that_works(tmp_path: Path, cmd: str, dropped: str,
                                                     chosen: str) -> None:
    """No --sandbox: namespace as virtiofsd; where it cannot be set up (capabilities
    taken away, as in a container), the next one, said on stderr, and the guest is
    served confined to the share all the same."""
    need_root()
    host, share = _layout(tmp_path)
    sock = tmp_path / "vu.sock"
    exe = Path(sys.executable).parent / cmd.split()[0]
    argv = [str(exe), *cmd.split()[1:], f"--socket-path={sock}", f"--shared-dir={share}"]
    if dropped:
        argv = ["setpriv", f"--bounding-set={dropped}", "--", *argv]
    log = tmp_path / "backend.log"
    with open(log, "wb") as logf:
        proc = subprocess.Popen(argv, stdout=logf, stderr=subprocess.STDOUT, cwd=REPO)
    try:
        assert wait_until(lambda: sock.exists() or proc.poll() is not None, timeout=30)
        assert proc.poll() is None, log.read_text()
        _attempts_through(str(sock), host, share)
    finally:
        stop(proc)
    out = log.read_text()
    assert f"sandbox={chosen}," in out, out
    fell_back = f"vfs-lockd: sandbox {chosen} (virtiofsd's namespace sandbox cannot be set up"
    assert (fell_back in out) == (chosen != "namespace"), out
    assert "Traceback" not in out


# ---- the check itself: native (lockd._native) and its Python reference agree ----
def _both(link: bytes, root_fd: int, top: bytes, key: tuple[int, int]) -> int:
    from fuse_server.passthrough import _dir_under_root_py
    from lockd import native

    py = _dir_under_root_py(link, root_fd, top, len(top), *key)
    c = native.lib.vl_dir_under_root(link, root_fd, top, len(top), *key)
    assert c == py, (link, top, c, py)
    return c


def test_native_dir_check_agrees_with_its_reference(tmp_path: Path) -> None:
    """vl_dir_under_root (C, used by LOOKUP and every name resolved in a directory) and
    `_dir_under_root_py` give the same verdict for a directory inside the share, deep
    inside, named with any bytes, moved out, deleted, replaced by a symlink, under a
    stale path of the share, with the sandbox's relative links, a path of a page or
    more (-ENAMETOOLONG, then the caller walks '..') and a link that names nothing."""
    from lockd import native

    if os.environ.get("CI") == "true":
        assert native.HAVE_NATIVE, native.IMPORT_ERROR
    elif not native.HAVE_NATIVE:
        pytest.skip("lockd._native not built")
    host = tmp_path / "host"
    share = host / "share"
    (share / "a" / "b" / "c").mkdir(parents=True)
    odd = share / "a" / "\n odd \xff".encode("utf-8", "surrogateescape").decode(
        "utf-8", "surrogateescape")
    odd.mkdir()
    root = os.open(share, os.O_PATH | os.O_DIRECTORY)
    fds: list[int] = [root]

    def opened(p: Path | bytes) -> tuple[bytes, tuple[int, int]]:
        fd = os.open(p, os.O_PATH | os.O_DIRECTORY)
        fds.append(fd)
        st = os.fstat(fd)
        return f"/proc/self/fd/{fd}".encode(), (st.st_dev, st.st_ino)

    top = str(share).encode() + b"/"
    try:
        for d in (share / "a", share / "a" / "b" / "c", odd):
            link, key = opened(d)
            assert _both(link, root, top, key) == 2  # (within the share's mount)
            assert _both(link, root, b"/", key) == 0  # "/" + the host path: not beneath
            assert _both(link, root, str(host).encode() + b"/elsewhere/", key) == 0
            other = os.stat(share)
            assert _both(link, root, top, (other.st_dev, other.st_ino)) == 0
        link, key = opened(share / "a" / "b")
        os.rename(share / "a" / "b", host / "b")  # moved out of the share
        assert _both(link, root, top, key) == 0
        os.symlink(host / "b", share / "a" / "b")  # the old path, now a symlink out
        assert _both(link, root, top, key) == 0
        os.unlink(share / "a" / "b")
        os.rename(host / "b", share / "a" / "b")
        assert _both(link, root, top, key) == 2
        link, key = opened(share / "a" / "b" / "c")
        os.rmdir(share / "a" / "b" / "c")  # " (deleted)"
        assert _both(link, root, top, key) == 0
        # The sandbox's form of the link: relative to a /proc/self/fd working directory.
        link, key = opened(share / "a")
        cwd = os.open(".", os.O_PATH | os.O_DIRECTORY)
        try:
            os.chdir("/proc/self/fd")
            assert _both(b"./" + link.rsplit(b"/", 1)[1], root, top, key) == 2
        finally:
            os.fchdir(cwd)
            os.close(cwd)
        # Below a mount inside the share: below it, but across a mount (1).
        (share / "m").mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "vlt-escape", str(share / "m")], check=True)
        try:
            (share / "m" / "d").mkdir()
            for d in (share / "m", share / "m" / "d"):
                link, key = opened(d)
                assert _both(link, root, top, key) == 1
        finally:
            for fd in fds[1:]:
                os.close(fd)
            del fds[1:]
            subprocess.run(["umount", "-l", str(share / "m")], check=True)
        # A path of a page or more: the kernel refuses to name it.
        deep = os.open(share, os.O_PATH | os.O_DIRECTORY)
        try:
            for _ in range(17):
                os.mkdir(b"n" * 250, dir_fd=deep)
                nxt = os.open(b"n" * 250, os.O_PATH | os.O_DIRECTORY, dir_fd=deep)
                os.close(deep)
                deep = nxt
            st = os.fstat(deep)
            assert _both(f"/proc/self/fd/{deep}".encode(), root, top,
                         (st.st_dev, st.st_ino)) == -errno.ENAMETOOLONG
        finally:
            os.close(deep)
        assert _both(b"/proc/self/fd/999999", root, top, (0, 0)) == -errno.ENOENT
    finally:
        for fd in fds:
            os.close(fd)


def test_a_directory_stays_known_below_the_share_until_a_directory_moves(
        tmp_path: Path) -> None:
    """fuse_server/moves.py: a directory found below the share within its mount is not
    checked again until a directory of the filesystem is moved (anywhere: here one far
    from the share); a file's rename keeps the verdict; across a mount nothing is kept;
    a filesystem whose renames this kernel may not see (procfs here) is not watched."""
    from fuse_server import moves
    from lockd import native

    need_root()
    if os.environ.get("CI") == "true":
        assert native.HAVE_NATIVE, native.IMPORT_ERROR
    elif not native.HAVE_NATIVE:
        pytest.skip("lockd._native not built")
    # (a filesystem of its own: on a shared one any test's directory rename counts)
    with own_tmpfs(tmp_path / "fs") as base:
        _kept_until_a_directory_moves(base, moves)


def _kept_until_a_directory_moves(tmp_path: Path, moves) -> None:  # noqa: ANN001
    host, share = _layout(tmp_path)
    (tmp_path / "far").mkdir()
    fs = Passthrough(str(share))
    assert fs.by_path
    d = fs.lookup(1, b"d")[0]
    assert fs.table.beneath(d.nodeid)[0] is False  # (not yet checked)
    fs.lookup(d.nodeid, b"f")
    assert fs.table.beneath(d.nodeid)[0] is True
    os.rename(share / "d" / "f", share / "d" / "g")
    assert fs.table.beneath(d.nodeid)[0] is True
    os.rename(tmp_path / "far", tmp_path / "far2")
    known, count = fs.table.beneath(d.nodeid)
    assert not known and count
    fs.lookup(d.nodeid, b"g")
    assert fs.table.beneath(d.nodeid)[0] is True

    (share / "m").mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "vlt-moves", str(share / "m")], check=True)
    try:
        m = fs.lookup(1, b"m")[0]
        with pytest.raises(FileNotFoundError):
            fs.lookup(m.nodeid, b"absent")
        assert fs.table.beneath(m.nodeid)[0] is False
    finally:
        subprocess.run(["umount", "-l", str(share / "m")], check=True)
    proc = os.open("/proc", os.O_PATH | os.O_DIRECTORY)
    try:
        assert moves.for_share(proc) is None
    finally:
        os.close(proc)
