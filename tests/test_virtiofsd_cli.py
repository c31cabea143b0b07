"""`vfs-lockd-virtiofsd` (and `vfs-lockd virtiofs`) as a drop-in for virtiofsd, without a
VM: the option parser (every option, unknown ones, `,,`), guest names, the choice of lock
service, the Session switches the options turn on (no_posix_lock, readonly, xattr), and
real back-end processes driven by the Python vhost-user front-end (tests/vhost_frontend):
inherited --fd, PATH.pid, --socket-group, the chroot and namespace sandboxes (confinement
checked from outside, locks through them: embedded manager with journal, and the central
daemon across a restart), stop signals, the installed QEMU descriptor.

The VM tests with real launch paths are tests/test_kata.py (QEMU) and tests/test_libvirt.py.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import grp
import json
import logging
import os
import resource
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO
from daemonutil import DaemonProc
from fuse_oracle import LK_IN, host_can_lock
from procutil import stop as stop_process
from test_vhost_user import REQ, init, lookup, open_file
from vhost_frontend import Frontend

from fuse_server import protocol as P
from fuse_server.launch import (
    READY_LINE,
    Backend,
    choose_lock_daemon,
    derive_guest_name,
)
from fuse_server.passthrough import Passthrough
from fuse_server.qemu_descriptor import DESCRIPTION
from fuse_server.session import Session
from fuse_server.virtiofsd_options import (
    DROPIN,
    LEGACY,
    OptionError,
    Options,
    capabilities,
    check,
    parse,
    split_o,
)
from lockd import native
from lockd.api import F_UNLCK, F_WRLCK, OFFSET_MAX
from lockd.engine.manager import LockManager

BIN = Path(sys.executable).parent / "vfs-lockd-virtiofsd"
VFS_LOCKD = Path(sys.executable).parent / "vfs-lockd"


def _root_only() -> None:
    if os.geteuid() != 0:
        if os.environ.get("CI") == "true":
            pytest.fail("back-end process tests need root (CI=true)")
        pytest.skip("back-end process tests need root")


# ============================================================== the option parser
def test_libvirt_command_line() -> None:
    """What libvirt 9.0 runs (src/qemu/qemu_virtiofs.c), `,,` in the path included."""
    o = parse(["--fd=33", "-o",
               "source=/srv/a,,b,cache=none,sandbox=chroot,xattr,flock,posix_lock",
               "--thread-pool-size=2", "-d"])
    check(o)
    assert (o.fd, o.shared_dir, o.cache, o.sandbox) == (33, "/srv/a,b", "none", "chroot")
    assert (o.xattr, o.flock, o.posix_lock, o.threads) == (True, True, True, 2)
    assert o.log_level == logging.DEBUG and o.socket_path is None


def test_kata_command_lines() -> None:
    o = parse(["--syslog", "--cache=auto", "--shared-dir=/d", "--fd=3",
               "--thread-pool-size=1", "-o", "announce_submounts"])
    check(o)
    assert (o.syslog, o.cache, o.shared_dir, o.fd, o.threads) == (True, "auto", "/d", 3, 1)
    assert o.sandbox == "namespace"  # virtiofsd's default
    assert o.ignored == ["-o announce_submounts"]
    o = parse(["--socket-path=/s", "--shared-dir=/d", "--cache=auto", "--sandbox=none",
               "--seccomp=none"])
    check(o)
    assert (o.socket_path, o.sandbox, o.seccomp, o.ignored) == ("/s", "none", "none", [])


@pytest.mark.parametrize("args, expect", [
    (["--socket-path", "/s"], {"socket_path": "/s"}),
    (["--socket=/s"], {"socket_path": "/s"}),
    (["--socket-group=kvm"], {"socket_group": "kvm"}),
    (["--shared-dir", "/d"], {"shared_dir": "/d"}),
    (["--tag=myfs"], {"tag": "myfs"}),
    (["--thread-pool-size=0"], {"threads": 1}),
    (["--thread-pool-size", "7"], {"threads": 7}),
    (["--cache=never"], {"cache": "none", "cache_given": "never"}),
    (["--cache=metadata"], {"cache": "none", "cache_given": "metadata"}),
    (["--cache=always"], {"cache": "always"}),
    (["--sandbox=chroot"], {"sandbox": "chroot", "sandbox_given": True}),
    (["--seccomp=log"], {"seccomp": "log", "ignored": []}),
    (["--seccomp", "trap"], {"seccomp": "trap"}),
    (["--xattr"], {"xattr": True}),
    (["--announce-submounts"],
     {"ignored": ["--announce-submounts (submounts are not announced)"]}),
    (["--inode-file-handles=mandatory"],
     {"ignored": ["--inode-file-handles=mandatory (inodes are always O_PATH descriptors)"]}),
    (["--readonly"], {"readonly": True}),
    (["--log-level=warn"], {"log_level": logging.WARNING}),
    (["--log-level", "trace"], {"log_level": logging.DEBUG}),
    (["--syslog"], {"syslog": True}),
    (["--rlimit-nofile=4096"], {"rlimit_nofile": 4096}),
    (["-d"], {"log_level": logging.DEBUG}),
    (["-f"], {"log_level": logging.INFO}),
    (["-V"], {"version": True}),
    (["--version"], {"version": True}),
    (["-h"], {"help": True}),
    (["--print-capabilities"], {"print_capabilities": True}),
    (["--migration-mode=find-paths", "--migration-verify-handles"],
     {"migration_mode": "find-paths", "migration_verify_handles": True}),
    (["--migration-mode", "find-paths", "--migration-confirm-paths"],
     {"migration_mode": "find-paths", "migration_confirm_paths": True}),
    (["--migration-on-error=guest-error"], {"migration_on_error": "guest-error"}),
    ([], {"migration_mode": "find-paths", "migration_on_error": "abort",
          "migration_verify_handles": False, "migration_confirm_paths": False}),
    (["--guest=g1", "--lockd", "/l.sock"], {"guest": "g1", "lockd": "/l.sock"}),
    (["--journal=/j.db", "--persist", "--threads=9", "-vv"],
     {"journal": "/j.db", "persist": True, "threads": 9, "log_level": logging.DEBUG}),
    (["--no-native"], {"native": False}),
    (["--no-native", "--native"], {"native": True}),
])
def test_every_option(args: list[str], expect: dict) -> None:
    o = parse(args)
    for attr, value in expect.items():
        assert getattr(o, attr) == value, (args, attr)


@pytest.mark.parametrize("item, expect", [
    ("source=/srv/share", {"shared_dir": "/srv/share"}),
    ("cache=none", {"cache": "none"}),
    ("cache=auto", {"cache": "auto"}),
    ("cache=always", {"cache": "always"}),
    ("sandbox=namespace", {"sandbox": "namespace"}),
    ("sandbox=chroot", {"sandbox": "chroot"}),
    ("xattr", {"xattr": True}),
    ("no_xattr", {"xattr": False}),
    ("flock", {"flock": True}),
    ("no_flock", {"flock": False}),
    ("posix_lock", {"posix_lock": True}),
    ("no_posix_lock", {"posix_lock": False}),
    ("loglevel=debug", {"log_level": logging.DEBUG}),
    ("log_level=err", {"log_level": logging.ERROR}),
    ("debug", {"log_level": logging.DEBUG}),
])
def test_o_items(item: str, expect: dict) -> None:
    for argv in (["-o", item], ["-o" + item]):
        o = parse(argv, LEGACY)
        for attr, value in expect.items():
            assert getattr(o, attr) == value, (argv, attr)


@pytest.mark.parametrize("item", ["announce_submounts", "writeback", "no_writeback",
                                  "readdirplus", "no_readdirplus"])
def test_o_items_without_effect_are_logged_once(item: str) -> None:
    o = parse(["-o", f"{item},{item}", "-o", item])
    assert o.ignored == [f"-o {item}"]


def test_later_options_win_and_lists_accumulate() -> None:
    o = parse(["-o", "no_flock,xattr", "-o", "flock", "--cache=auto", "-o", "cache=none"])
    assert (o.flock, o.xattr, o.cache) == (True, True, "none")


def test_comma_escaping() -> None:
    assert split_o("a,b") == ["a", "b"]
    assert split_o("source=/x,,y,cache=auto") == ["source=/x,y", "cache=auto"]
    assert split_o("source=/a,,,,b,,") == ["source=/a,,b,"]
    assert split_o("source=,,,xattr") == ["source=,", "xattr"]
    assert split_o(",,") == [","]
    assert split_o("a,,,b,") == ["a,", "b"]
    o = parse(["-o", "source=/srv/my,,share,,,,x,flock"])
    assert o.shared_dir == "/srv/my,share,,x" and o.flock


@pytest.mark.parametrize("argv, named", [
    (["--bogus"], "'--bogus'"),
    (["--bogus=1"], "'--bogus'"),
    (["-x"], "'-x'"),
    (["-o", "bogus"], "'bogus'"),
    (["-o", "xattr,bogus=1"], "'bogus'"),
    (["-o", "timeout=5"], "'timeout'"),
    (["stray"], "'stray'"),
    (["--fd"], "'--fd'"),
    (["-o"], "'-o'"),
    (["--xattr=yes"], "'--xattr'"),
    (["--cache=bogus"], "--cache"),
    (["-o", "cache=metadata,cache=x"], "-o cache"),
    (["--sandbox=jail"], "--sandbox"),
    (["-o", "sandbox=jail"], "-o sandbox"),
    (["--seccomp=allowall"], "--seccomp"),
    (["--log-level=loud"], "--log-level"),
    (["--inode-file-handles=sometimes"], "--inode-file-handles"),
    (["--fd=three"], "--fd"),
    (["--fd=-1"], "--fd"),
    (["--thread-pool-size=-1"], "--thread-pool-size"),
    (["--thread-pool-size=100000"], "--thread-pool-size"),
    (["--threads=0"], "--threads"),
    (["--rlimit-nofile=lots"], "--rlimit-nofile"),
    (["--shared-dir="], "--shared-dir"),
    (["-o", "source="], "-o source"),
    (["--migration-mode=copy"], "--migration-mode"),
    (["--migration-on-error=ignore"], "--migration-on-error"),
    (["--migration-confirm-paths=yes"], "--migration-confirm-paths"),
])
def test_bad_options_name_the_option(argv: list[str], named: str) -> None:
    with pytest.raises(OptionError) as ei:
        parse(argv)
    msg = str(ei.value)
    assert named in msg and "\n" not in msg


@pytest.mark.parametrize("argv, named", [
    ([], "--socket-path"),
    (["--shared-dir=/d"], "--socket-path or --fd"),
    (["--fd=3", "--socket-path=/s", "--shared-dir=/d"], "exclude"),
    (["--fd=3"], "--shared-dir"),
    (["--fd=3", "--socket-group=kvm", "--shared-dir=/d"], "--socket-group"),
    (["--fd=3", "--shared-dir=/d", "--lockd=/l", "--journal=/j"], "--journal"),
    (["--fd=3", "--shared-dir=/d", "--migration-mode=file-handles",
      "--migration-verify-handles"], "--migration-verify-handles"),
    (["--fd=3", "--shared-dir=/d", "--migration-mode=file-handles",
      "--migration-confirm-paths"], "--migration-confirm-paths"),
])
def test_incomplete_command_lines(argv: list[str], named: str) -> None:
    with pytest.raises(OptionError, match=named.replace("-", r"\-")):
        check(parse(argv))


def test_defaults_of_the_two_entry_points() -> None:
    d, leg = parse([], DROPIN), parse([], LEGACY)
    assert (d.sandbox, d.xattr, d.cache, d.posix_lock, d.flock) == (
        "namespace", False, "none", True, True)
    assert (leg.sandbox, leg.xattr, leg.cache, leg.posix_lock, leg.flock) == (
        "namespace", True, "none", True, True)
    assert (d.seccomp, leg.seccomp) == ("kill", "kill")  # virtiofsd's default
    assert not d.sandbox_given and not leg.sandbox_given  # namespace where it works
    assert d.discover_daemon and not leg.discover_daemon
    assert d.native and leg.native  # the native fast path unless told --no-native


def test_capabilities_advertise_only_what_is_true() -> None:
    caps = json.loads(capabilities())
    assert caps["type"] == "fs"
    # the device state migrates (libvirt offers migration only then); and the -o form
    # stays libvirt's way to pass <lock posix flock>
    assert "separate-options" not in caps["features"]
    assert "migrate-precopy" in caps["features"]


# ============================================================== names and lock service
def test_guest_names() -> None:
    lv = "/var/lib/libvirt/qemu/domain-12-web-1/fs0-fs.sock"
    assert derive_guest_name(None, lv, 77) == "web-1/fs0@77"
    kata = "/run/vc/vm/0123abcd/vhost-fs.sock"
    assert derive_guest_name(None, kata, 5) == "0123abcd/vhost-fs@5"
    assert derive_guest_name("myfs", lv, 5) == "myfs@5"  # --tag first
    assert derive_guest_name(None, None, 5) == "virtiofs@5"  # unnamed --fd socket
    assert derive_guest_name(None, "\0abstract", 5) == "virtiofs@5"
    assert derive_guest_name("a b\tc\x01", None, 5) == "a_b_c_@5"
    assert len(derive_guest_name("x" * 1000, None, 5)) <= 255
    # two back-ends of one tag never share a name (the daemon would refuse the second)
    assert derive_guest_name("t", None, 1) != derive_guest_name("t", None, 2)


def test_lock_service_choice(tmp_path: Path) -> None:
    default = str(tmp_path / "default.sock")
    o = parse(["--fd=3", "--shared-dir=/d"])
    assert choose_lock_daemon(o, {}, default)[0] is None  # nothing listens: embedded
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(default)
    listener.listen(8)
    try:
        path, why = choose_lock_daemon(o, {}, default)
        assert path == default and "default" in why
        assert choose_lock_daemon(o, {"VFS_LOCKD_SOCKET": "/e.sock"}, default)[0] == "/e.sock"
        o2 = parse(["--lockd=/l.sock"])
        assert choose_lock_daemon(o2, {"VFS_LOCKD_SOCKET": "/e.sock"}, default)[0] == "/l.sock"
        assert choose_lock_daemon(parse(["--journal=/j"]), {}, default)[0] is None
        # the historical verb does not look for a daemon by itself
        assert choose_lock_daemon(parse([], LEGACY), {"VFS_LOCKD_SOCKET": "/e"}, default)[0] \
            is None
    finally:
        listener.close()


# ============================================================== Session switches
class _Session:
    def __init__(self, root: Path, **kw) -> None:  # noqa: ANN003
        self.manager = LockManager()
        self.session = Session(Passthrough(str(root)), self.manager, "g", lambda b: None,
                               "none", **kw)
        self.unique = 0

    def req(self, opcode: int, body: bytes = b"", nodeid: int = 1) -> tuple[int, bytes]:
        self.unique += 2
        hdr = P.IN_HEADER.pack(P.IN_HEADER.size + len(body), opcode, self.unique, nodeid, 0, 0,
                               4242, 0, 0)
        reply = self.session.handle(hdr + body)
        _, error, _ = P.OUT_HEADER.unpack_from(reply)
        return -error, reply[16:]

    def init(self) -> int:
        err, out = self.req(P.INIT, P.INIT_IN.pack(7, 38, 65536, 0xFFFFFFFF) + bytes(48))
        assert err == 0
        return P.INIT_OUT.unpack_from(out)[3]

    def lookup(self, name: bytes) -> int:
        err, out = self.req(P.LOOKUP, name + b"\0")
        assert err == 0, os.strerror(err)
        return P.ENTRY_OUT.unpack_from(out)[0]


@pytest.mark.parametrize("posix, flock", [(False, True), (True, False), (False, False)])
def test_no_posix_lock_no_flock_leave_locks_in_the_guest(tmp_path: Path, posix: bool,
                                                         flock: bool) -> None:
    flags = _Session(tmp_path, posix_locks=posix, flock_locks=flock).init()
    assert bool(flags & P.POSIX_LOCKS) == posix
    assert bool(flags & P.FLOCK_LOCKS) == flock
    both = _Session(tmp_path).init()
    assert both & P.POSIX_LOCKS and both & P.FLOCK_LOCKS


def test_readonly_refuses_changes(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"data")
    s = _Session(tmp_path, readonly=True)
    s.init()
    node = s.lookup(b"f")
    assert s.req(P.OPEN, P.OPEN_IN.pack(os.O_RDWR, 0), node)[0] == errno.EROFS
    assert s.req(P.OPEN, P.OPEN_IN.pack(os.O_RDONLY | os.O_TRUNC, 0), node)[0] == errno.EROFS
    err, out = s.req(P.OPEN, P.OPEN_IN.pack(os.O_RDONLY, 0), node)
    assert err == 0
    fh = P.OPEN_OUT.unpack_from(out)[0]
    assert s.req(P.READ, P.READ_IN.pack(fh, 0, 4, 0, 0, 0, 0), node) == (0, b"data")
    assert s.req(P.WRITE, P.WRITE_IN.pack(fh, 0, 1, 0, 0, 0, 0) + b"x", node)[0] == errno.EROFS
    assert s.req(P.MKDIR, P.MKDIR_IN.pack(0o755, 0) + b"d\0")[0] == errno.EROFS
    assert s.req(P.CREATE, P.CREATE_IN.pack(os.O_RDWR, 0o644, 0, 0) + b"n\0")[0] == errno.EROFS
    assert s.req(P.UNLINK, b"f\0")[0] == errno.EROFS
    assert s.req(P.SETXATTR, P.SETXATTR_IN.pack(1, 0) + b"user.a\0x", node)[0] == errno.EROFS
    # a read lock on a read-only file is still a real lock
    lk = LK_IN.pack(fh, 1, 0, OFFSET_MAX, 0, 4242, 0)  # F_RDLCK
    assert s.req(P.SETLK, lk, node)[0] == 0
    assert (tmp_path / "f").read_bytes() == b"data" and sorted(os.listdir(tmp_path)) == ["f"]


def test_xattr_switch(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"")
    off = _Session(tmp_path, xattr=False, posix_acl=False)
    off.init()
    node = off.lookup(b"f")
    for op, body in ((P.GETXATTR, P.GETXATTR_IN.pack(0, 0) + b"user.a\0"),
                     (P.LISTXATTR, P.GETXATTR_IN.pack(0, 0)),
                     (P.SETXATTR, P.SETXATTR_IN.pack(1, 0) + b"user.a\0x"),
                     (P.REMOVEXATTR, b"user.a\0")):
        assert off.req(op, body, node)[0] == errno.ENOSYS  # the kernel stops asking
    # With POSIX ACLs (the default) the opcodes stay: only the ACL names pass.
    acl_only = _Session(tmp_path, xattr=False)
    acl_only.init()
    node = acl_only.lookup(b"f")
    assert acl_only.req(P.GETXATTR, P.GETXATTR_IN.pack(0, 0) + b"user.a\0", node)[0] \
        == errno.EOPNOTSUPP
    on = _Session(tmp_path)
    on.init()
    node = on.lookup(b"f")
    assert on.req(P.LISTXATTR, P.GETXATTR_IN.pack(0, 0), node)[0] == 0


@pytest.mark.parametrize("defaults", [DROPIN, LEGACY], ids=["dropin", "legacy"])
@pytest.mark.parametrize("argv, native_on", [([], True), (["--no-native"], False),
                                             (["--no-native", "--native"], True)])
def test_native_option_reaches_the_session(tmp_path: Path, defaults: Options,
                                           argv: list[str], native_on: bool) -> None:
    """--no-native reaches the Session the back-end makes for a front-end: a GETATTR of
    a known file, which the virtqueue workers offer the native table first
    (vhost_user._run), is then left to the session; without it the table answers it,
    with the session's bytes."""
    if not native.HAVE_NATIVE and os.environ.get("CI") != "true":
        pytest.skip("the native extension is not built")
    (tmp_path / "f").write_bytes(b"data")
    o = parse(["--socket-path=/unused", f"--shared-dir={tmp_path}", *argv], defaults)
    check(o)
    backend = Backend(o, type("L", (), {"dir_fd": -1})(), "g", None, str(tmp_path),
                      LockManager(), False, None)
    session = backend.new_session(lambda b: None)
    try:
        hdr = P.IN_HEADER.pack
        init = P.INIT_IN.pack(7, 38, 65536, 0xFFFFFFFF) + bytes(48)
        reply = session.handle(hdr(40 + len(init), P.INIT, 2, 1, 0, 0, 1, 0, 0) + init)
        assert P.OUT_HEADER.unpack_from(reply)[1] == 0
        reply = session.handle(hdr(42, P.LOOKUP, 4, 1, 0, 0, 1, 0, 0) + b"f\0")
        assert P.OUT_HEADER.unpack_from(reply)[1] == 0
        node = P.ENTRY_OUT.unpack_from(reply, 16)[0]
        body = P.GETATTR_IN.pack(0, 0, 0)
        buf = hdr(40 + len(body), P.GETATTR, 6, node, 0, 0, 1, 0, 0) + body
        fast = session.fs.table.serve(buf, None)
        fast = None if fast is None else bytes(fast)  # the thread's buffer, reused
        assert (fast is not None) == native_on
        assert session.fs.table.served(P.GETATTR) == (1 if native_on else 0)
        reference = session.handle(buf)
        assert P.OUT_HEADER.unpack_from(reference)[1] == 0
        if fast is not None:
            assert fast == reference
    finally:
        session.end()


# ============================================================== back-end processes
class Proc:
    """A back-end process started with `argv`; stderr (the log) goes to a file."""

    def __init__(self, argv: list[str], log: Path, env: dict | None = None,
                 pass_fds: tuple[int, ...] = (), wait_ready: bool = True) -> None:
        self.log = log
        self._logf = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(argv, stdout=self._logf, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, pass_fds=pass_fds, cwd=REPO,
                                     env={**os.environ, **(env or {})})
        if wait_ready:
            self.wait_for(READY_LINE)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, text: str, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.output():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"no {text!r} from the back-end:\n{self.output()}")
            time.sleep(0.02)

    def stop(self) -> int | None:
        rc = stop_process(self.proc)
        self._logf.close()
        return rc


@pytest.fixture
def procs(tmp_path: Path):
    started: list[Proc] = []

    def start(*args: str, **kw) -> Proc:  # noqa: ANN003
        p = Proc([str(BIN), *args], tmp_path / f"backend{len(started)}.log", **kw)
        started.append(p)
        return p

    try:
        yield start
    finally:
        for p in started:
            p.stop()


@pytest.fixture
def share(tmp_path: Path) -> Path:
    d = tmp_path / "share"
    d.mkdir()
    (d / "f").write_bytes(b"hello world\n")
    return d


def _run(*args: str, **kw) -> subprocess.CompletedProcess:  # noqa: ANN003
    return subprocess.run([*args], capture_output=True, text=True, timeout=60, cwd=REPO, **kw)


@pytest.mark.parametrize("cmd", [[str(BIN)], [str(VFS_LOCKD), "virtiofs"]])
@pytest.mark.parametrize("argv, named", [
    (["--fd=3", "--shared-dir=/", "--frobnicate"], "'--frobnicate'"),
    (["--fd=3", "-o", "source=/,frobnicate"], "'frobnicate'"),
    (["--fd=3"], "--shared-dir"),
    (["--socket-path=/x", "--shared-dir=/", "--cache=sometimes"], "--cache"),
])
def test_command_errors_exit_1_with_one_line(cmd: list[str], argv: list[str],
                                             named: str) -> None:
    r = _run(*cmd, *argv)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and named in lines[0], r.stderr


def test_capabilities_version_help_commands() -> None:
    r = _run(str(BIN), "--print-capabilities")
    assert r.returncode == 0 and json.loads(r.stdout)["type"] == "fs"
    r = _run(str(BIN), "-V")
    assert r.returncode == 0 and "vfs-lockd-virtiofsd" in r.stdout
    r = _run(str(VFS_LOCKD), "virtiofs", "--help")
    assert r.returncode == 0 and "--socket-path" in r.stdout and "-o LIST" in r.stdout


def test_fd_must_be_a_listening_unix_socket(tmp_path: Path, share: Path) -> None:
    _root_only()
    with open(tmp_path / "plain", "w") as f:
        r = _run(str(BIN), f"--fd={f.fileno()}", f"--shared-dir={share}", "--sandbox=none",
                 pass_fds=(f.fileno(),))
    assert r.returncode == 1 and "is not a socket" in r.stderr
    s = socket.socket(socket.AF_UNIX)
    try:
        r = _run(str(BIN), f"--fd={s.fileno()}", f"--shared-dir={share}", "--sandbox=none",
                 pass_fds=(s.fileno(),))
    finally:
        s.close()
    assert r.returncode == 1 and "not a listening socket" in r.stderr
    r = _run(str(BIN), "--fd=99", f"--shared-dir={share}", "--sandbox=none")
    assert r.returncode == 1 and "--fd=99" in r.stderr


def test_inherited_fd_serves_and_exits_when_the_front_end_leaves(tmp_path: Path, share: Path,
                                                                 procs) -> None:
    """libvirt's way: it binds and listens, the back-end gets the descriptor. Chroot
    sandbox, embedded manager with a journal (opened before the sandbox)."""
    _root_only()
    path = tmp_path / "domain-3-web/fs0-fs.sock"
    path.parent.mkdir()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)
    try:
        b = procs(f"--fd={listener.fileno()}", "-o",
                  f"source={share},sandbox=chroot,cache=none,flock,posix_lock",
                  f"--journal={tmp_path / 'j.db'}", pass_fds=(listener.fileno(),))
    finally:
        listener.close()  # the back-end has its own copy
    assert "guest 'web/fs0@" in b.output()
    assert os.stat(f"/proc/{b.proc.pid}/root").st_ino == share.stat().st_ino  # chrooted
    fe = Frontend(str(path))
    try:
        init(fe)
        node = lookup(fe, b"f")
        fh = open_file(fe, node)
        assert fe.fuse(REQ, P.SETLK, LK_IN.pack(fh, 1, 0, 99, F_WRLCK, 4242, 0), node).error == 0
        assert not host_can_lock(share / "f", 0, 0)
    finally:
        fe.close()
    assert b.proc.wait(10) == 0, b.output()
    assert host_can_lock(share / "f", 0, 0)
    assert path.exists()  # libvirt's socket: not ours to remove


def test_pid_file_group_and_second_instance(tmp_path: Path, share: Path, procs) -> None:
    _root_only()
    sock = tmp_path / "vfs.sock"
    group = grp.getgrgid(1).gr_name  # "daemon" on Debian
    b = procs(f"--socket-path={sock}", f"--shared-dir={share}", "--sandbox=none",
              f"--socket-group={group}")
    pid_file = Path(f"{sock}.pid")
    assert pid_file.read_text() == f"{b.proc.pid}\n"
    assert stat.S_IMODE(pid_file.stat().st_mode) == 0o600
    with open(pid_file) as f, pytest.raises(BlockingIOError):
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held while serving
    st = sock.stat()
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == 1
    second = procs(f"--socket-path={sock}", f"--shared-dir={share}", "--sandbox=none",
                   wait_ready=False)
    assert second.proc.wait(20) == 1
    assert f"{sock}.pid is locked" in second.output() and str(b.proc.pid) in second.output()
    assert sock.exists()  # the first one's socket was left alone
    assert b.stop() == 0
    assert not sock.exists() and not pid_file.exists()


def _nofile(pid: int) -> tuple[int, int]:
    """(soft, hard) RLIMIT_NOFILE of a process, from /proc/PID/limits."""
    with open(f"/proc/{pid}/limits") as f:
        line = next(x for x in f if x.startswith("Max open files"))
    soft, hard = (resource.RLIM_INFINITY if x == "unlimited" else int(x)
                  for x in line.split()[3:5])
    return soft, hard


def test_descriptor_limit_as_virtiofsd(tmp_path: Path, share: Path, procs) -> None:
    """Not given, RLIMIT_NOFILE becomes virtiofsd's default, min(1,000,000,
    fs.nr_open), both limits (with CAP_SYS_RESOURCE; without, the soft limit goes up
    to the hard one); --rlimit-nofile=0 keeps the hard limit the launcher gave (the soft
    one raised to it); N sets N."""
    _root_only()
    with open("/proc/sys/fs/nr_open") as f:
        target = min(1_000_000, int(f.read()))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    low = min(1024, soft)
    resource.setrlimit(resource.RLIMIT_NOFILE, (low, hard))  # what the children inherit
    try:
        got = []
        for i, extra in enumerate(([], ["--rlimit-nofile=0"], ["--rlimit-nofile=3000"])):
            b = procs(f"--socket-path={tmp_path}/{i}.sock", f"--shared-dir={share}",
                      "--sandbox=none", *extra)
            got.append(_nofile(b.proc.pid))
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    if hard == resource.RLIM_INFINITY or hard >= target:
        default = (target, hard)
    elif _capable(24):  # CAP_SYS_RESOURCE: the hard limit raised too
        default = (target, target)
    else:  # (a container without it: as far as the hard limit goes)
        default = (hard, hard)
    zero = (low, hard) if hard == resource.RLIM_INFINITY else (hard, hard)
    assert got == [default, zero, (3000, 3000)]


def _capable(cap: int) -> bool:
    with open("/proc/self/status") as f:
        eff = next(int(x.split()[1], 16) for x in f if x.startswith("CapEff:"))
    return bool(eff >> cap & 1)


def _child_of(pid: int, timeout: float = 10.0) -> int:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(OSError):
            kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
            if kids:
                return int(kids[0])
        assert time.monotonic() < deadline, "the namespace sandbox forked no child"
        time.sleep(0.02)


def test_namespace_sandbox_confines_and_follows_the_parent(tmp_path: Path, share: Path,
                                                           procs) -> None:
    _root_only()
    (share / "escape").symlink_to("/etc/passwd")
    sock = tmp_path / "ns.sock"
    b = procs(f"--socket-path={sock}", f"--shared-dir={share}", "--sandbox=namespace",
              "--readonly")
    child = _child_of(b.proc.pid)
    # The serving child sees the share as its root, in its own mount, PID and network
    # namespaces; the host's tree is not there.
    root = Path(f"/proc/{child}/root")
    assert os.stat(root).st_ino == share.stat().st_ino
    assert sorted(os.listdir(root)) == ["escape", "f"]
    for ns in ("mnt", "pid", "net"):
        assert os.readlink(f"/proc/{child}/ns/{ns}") != os.readlink(f"/proc/self/ns/{ns}"), ns
    fe = Frontend(str(sock))
    try:
        init(fe)
        assert lookup(fe, b"..") == 1  # the root is its own parent
        node = lookup(fe, b"escape")
        assert fe.fuse(REQ, P.OPEN, P.OPEN_IN.pack(os.O_RDONLY, 0), node).error == errno.ELOOP
        node = lookup(fe, b"f")
        fh = open_file(fe, node, os.O_RDONLY)
        out = fe.fuse(REQ, P.READ, P.READ_IN.pack(fh, 0, 5, 0, 0, 0, 0), node).payload
        assert out == b"hello"
        assert fe.fuse(REQ, P.SETLK, LK_IN.pack(fh, 1, 0, 9, 0, 4242, 0), node).error == 0
        assert not host_can_lock(share / "f", 0, 0)  # the read lock is a host lock
        # SIGKILL of the pid launchers know: the sandboxed child dies with it.
        b.proc.kill()
        b.proc.wait(10)
        deadline = time.monotonic() + 10
        while os.path.exists(f"/proc/{child}"):
            assert time.monotonic() < deadline, "the sandboxed child outlived its parent"
            time.sleep(0.02)
        assert host_can_lock(share / "f", 0, 0)
    finally:
        fe.close()


def test_namespace_parent_forwards_sigterm_and_cleans_up(tmp_path: Path, share: Path,
                                                         procs) -> None:
    _root_only()
    sock = tmp_path / "ns2.sock"
    b = procs(f"--socket-path={sock}", f"--shared-dir={share}")  # namespace: the default
    child = _child_of(b.proc.pid)
    b.proc.send_signal(signal.SIGTERM)
    assert b.proc.wait(10) == 0, b.output()
    assert not os.path.exists(f"/proc/{child}")
    assert not sock.exists() and not Path(f"{sock}.pid").exists()


def test_a_sandbox_that_cannot_be_set_up_is_an_error(tmp_path: Path, share: Path) -> None:
    """Without CAP_SYS_CHROOT / CAP_SYS_ADMIN the sandbox fails: exit 1, never served
    unconfined."""
    _root_only()
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) not installed")
    for mode, what in (("chroot", "chroot"), ("namespace", "unshare")):
        sock = tmp_path / f"{mode}.sock"
        r = _run("setpriv", "--bounding-set=-sys_chroot,-sys_admin", "--", str(BIN),
                 f"--socket-path={sock}", f"--shared-dir={share}", f"--sandbox={mode}")
        assert r.returncode == 1, r.stderr
        assert f"sandbox {mode}" in r.stderr and what in r.stderr
        assert READY_LINE not in r.stderr
        assert not sock.exists() and not Path(f"{sock}.pid").exists()


@pytest.fixture
def daemon_grace(tmp_path: Path):
    d = DaemonProc(str(tmp_path), "--guest-grace", "60").start()
    try:
        yield d
    finally:
        d.stop()


def _locks(d: DaemonProc) -> list[dict]:
    r = _run(str(VFS_LOCKD), "locks", "--socket", d.sock, "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    return doc["locks"] if isinstance(doc, dict) else doc


def test_sigterm_leaves_a_connected_guests_locks_with_the_daemon(tmp_path: Path, share: Path,
                                                                 procs, daemon_grace) -> None:
    """Central daemon, guest still connected: SIGTERM ends the back-end but not the locks
    (the guest still runs); a guest already gone is released at once."""
    _root_only()
    env = {"VFS_LOCKD_SOCKET": daemon_grace.sock}
    sock = tmp_path / "t.sock"
    b = procs(f"--socket-path={sock}", f"--shared-dir={share}", "--tag=vm1", env=env)
    assert f"lock daemon {daemon_grace.sock} ($VFS_LOCKD_SOCKET)" in b.output()
    fe = Frontend(str(sock))
    try:
        init(fe)
        node = lookup(fe, b"f")
        fh = open_file(fe, node)
        assert fe.fuse(REQ, P.SETLK, LK_IN.pack(fh, 1, 0, 9, F_WRLCK, 4242, 0), node).error == 0
        assert b.stop() == 0
        assert "its locks stay with the lock daemon" in b.output()
        assert not host_can_lock(share / "f", 0, 0)
        guests = {lk["guest"] for lk in _locks(daemon_grace)}
        assert guests == {f"vm1@{b.proc.pid}"}
    finally:
        fe.close()
    r = _run(str(VFS_LOCKD), "evict", "--socket", daemon_grace.sock, "--guest",
             f"vm1@{b.proc.pid}")
    assert r.returncode == 0, r.stderr
    assert host_can_lock(share / "f", 0, 0)
    # Now a front-end that has gone before the signal: released at once.
    sock2 = tmp_path / "t2.sock"
    b2 = procs(f"--socket-path={sock2}", f"--shared-dir={share}", "--tag=vm2", "--persist",
               env=env)
    fe = Frontend(str(sock2))
    init(fe)
    node = lookup(fe, b"f")
    fh = open_file(fe, node)
    assert fe.fuse(REQ, P.SETLK, LK_IN.pack(fh, 1, 0, 9, F_WRLCK, 4242, 0), node).error == 0
    fe.close()
    b2.wait_for("front-end closed the connection")
    assert b2.stop() == 0
    assert host_can_lock(share / "f", 0, 0)
    assert not any(lk["guest"].startswith("vm2@") for lk in _locks(daemon_grace))


@pytest.mark.parametrize("mode", ["namespace", "chroot"])
def test_sandboxed_back_end_follows_a_daemon_restart(tmp_path: Path, share: Path, procs,
                                                     mode: str) -> None:
    """Sandbox and central daemon: the daemon's path is outside the sandbox, yet after a
    kill -9 and restart the back-end reconnects (through its directory's fd) and the
    guest's lock is still held."""
    _root_only()
    d = DaemonProc(str(tmp_path), "--guest-grace", "30").start()
    try:
        sock = tmp_path / "r.sock"
        b = procs(f"--socket-path={sock}", f"--shared-dir={share}", f"--sandbox={mode}",
                  f"--lockd={d.sock}")
        fe = Frontend(str(sock))
        try:
            init(fe)
            node = lookup(fe, b"f")
            fh = open_file(fe, node)
            lk = LK_IN.pack(fh, 1, 0, 9, F_WRLCK, 4242, 0)
            assert fe.fuse(REQ, P.SETLK, lk, node).error == 0
            d.kill9()
            d = DaemonProc(str(tmp_path), "--guest-grace", "30").start()
            assert fe.fuse(REQ, P.SETLK, LK_IN.pack(fh, 2, 20, 29, F_WRLCK, 4242, 0),
                           node).error == 0  # served by the new daemon
            assert not host_can_lock(str(share / "f"), 0, 10)  # owner 1's survived
            assert host_can_lock(str(share / "f"), 10, 10)
            assert "reconnect" in b.output()
            assert fe.fuse(REQ, P.SETLK, LK_IN.pack(fh, 1, 0, OFFSET_MAX, F_UNLCK, 4242, 0),
                           node).error == 0
            assert fe.fuse(REQ, P.SETLK, LK_IN.pack(fh, 2, 0, OFFSET_MAX, F_UNLCK, 4242, 0),
                           node).error == 0
            assert host_can_lock(share / "f", 0, 0)
        finally:
            fe.close()
        assert b.proc.wait(15) == 0, b.output()
    finally:
        d.stop()


# ============================================================== the QEMU descriptor
def test_install_qemu_descriptor(tmp_path: Path) -> None:
    r = _run(str(VFS_LOCKD), "install-qemu-descriptor", "--prefix", str(tmp_path))
    assert r.returncode == 0, r.stderr
    path = tmp_path / "qemu" / "vhost-user" / "40-vfs-lockd.json"
    assert r.stdout.strip() == str(path)
    doc = json.loads(path.read_text())
    assert doc == {"description": DESCRIPTION, "type": "fs", "binary": str(BIN)}
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    # it sorts before the distribution's virtiofsd
    assert sorted([path.name, "50-qemu-virtiofsd.json"])[0] == path.name
    r = _run(str(VFS_LOCKD), "install-qemu-descriptor", "--prefix", str(tmp_path), "--remove")
    assert r.returncode == 0 and not path.exists()
    path.write_text('{"type": "fs", "binary": "/usr/libexec/virtiofsd"}')
    r = _run(str(VFS_LOCKD), "install-qemu-descriptor", "--prefix", str(tmp_path), "--remove")
    assert r.returncode == 1 and path.exists()  # not ours: left alone
    r = _run(str(VFS_LOCKD), "install-qemu-descriptor", "--prefix", str(tmp_path),
             "--binary", str(tmp_path / "nope"))
    assert r.returncode == 1 and "not executable" in r.stderr
