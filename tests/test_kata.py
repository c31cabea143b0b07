"""`vfs-lockd-virtiofsd` started with the two command lines Kata Containers uses for
virtiofsd, each serving a real QEMU guest (TCG, the image of scripts/guest-image):

1. runtime (Go) style: `--syslog --cache=auto --shared-dir=D --fd=3 --thread-pool-size=1
   -o announce_submounts` -- the listening socket inherited as fd 3, the default
   (namespace) sandbox, the central daemon found through $VFS_LOCKD_SOCKET;
2. runtime-rs style: `--socket-path=S --shared-dir=D --cache=auto --sandbox=none
   --seccomp=none` -- PATH.pid, embedded lock manager.

Both: the launcher's readiness line on stderr, guest locks that conflict with host
processes (POSIX and flock), and the back-end exiting by itself when QEMU goes, its
guest's locks released. Skipped without root or QEMU; under CI=true those fail instead.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest
from daemonutil import DaemonProc
from fuse_oracle import host_can_lock
from procutil import fail_or_skip, wait_until
from test_virtiofsd_cli import BIN, VFS_LOCKD, Proc

from fuse_server.launch import DEFAULT_LOCKD_SOCKET, READY_LINE, daemon_listening
from rig.vm import VmError, VmGuest, ensure_image, errno_of, qemu_missing

pytestmark = pytest.mark.vm


def _fail_or_skip(why: str) -> None:
    fail_or_skip(why, "VM guests must be available")


@pytest.fixture(scope="module")
def image() -> tuple[Path, Path]:
    why = qemu_missing()
    if why:
        _fail_or_skip(why)
    if not BIN.exists():
        _fail_or_skip(f"{BIN} is not installed (pip install -e .)")
    try:
        return ensure_image()
    except VmError as exc:
        _fail_or_skip(f"guest image could not be built: {exc}")
        raise


@pytest.fixture
def workdir():
    """Short paths (sun_path is 108 bytes), Kata's layout: /run/vc/vm/SANDBOX/."""
    d = Path(tempfile.mkdtemp(prefix="vlkata-"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _guest_checks(g: VmGuest, share: Path) -> None:
    """The guest's POSIX and flock locks are host locks, both ways."""
    assert g.do("a", "open 0 /mnt/f create") == "ok"
    assert g.do("a", "lock 0 posix w 0 10") == "ok"
    assert not host_can_lock(str(share / "f"), 0, 10)
    assert host_can_lock(str(share / "f"), 10, 10)
    assert g.do("a", "lock 0 posix u 0 10") == "ok"
    assert host_can_lock(str(share / "f"), 0, 10)
    assert g.do("a", "lock 0 flock w 0 0") == "ok"
    assert not host_can_lock(str(share / "f"), mode="flock")
    assert g.do("a", "lock 0 flock u 0 0") == "ok"
    # a host process's lock stops the guest
    fd = os.open(share / "f", os.O_RDWR)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 5, 40)
        assert errno_of(g.do("a", "lock 0 posix w 40 5")) in (11, 13)  # EAGAIN/EACCES
    finally:
        os.close(fd)
    assert g.do("a", "lock 0 posix w 40 5") == "ok"  # held until the guest goes


def _wait_gone(g: VmGuest, b: Proc, share: Path) -> None:
    g.close()
    assert b.proc.wait(15) == 0, b.output()
    assert host_can_lock(str(share / "f"), 40, 5)  # released with the guest


def test_kata_go_runtime_command_line(image, workdir: Path, tmp_path: Path) -> None:
    share = workdir / "shared"
    share.mkdir()
    vmdir = workdir / "vc" / "vm" / "5b3f0c9a"
    vmdir.mkdir(parents=True)
    path = vmdir / "vhost-fs.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)
    high = fcntl.fcntl(listener.fileno(), fcntl.F_DUPFD_CLOEXEC, 10)
    d = DaemonProc(str(tmp_path), "--guest-grace", "30").start()
    b = g = None
    try:
        # What Kata does: the socket becomes fd 3 of the child (ExtraFiles).
        argv = ["bash", "-c", f'exec "$0" "$@" 3<&{high} {high}<&-', str(BIN), "--syslog",
                "--cache=auto", f"--shared-dir={share}", "--fd=3", "--thread-pool-size=1",
                "-o", "announce_submounts"]
        b = Proc(argv, tmp_path / "backend.log", env={"VFS_LOCKD_SOCKET": d.sock},
                 pass_fds=(high,))
        os.close(high)
        listener.close()
        out = b.output()
        assert f"{READY_LINE}\n" in out
        assert f"lock daemon {d.sock} ($VFS_LOCKD_SOCKET)" in out
        g = VmGuest("kata1", path, workdir, kernel=image[0], initrd=image[1])
        _guest_checks(g, share)
        r = subprocess.run([str(VFS_LOCKD), "locks", "--socket", d.sock], capture_output=True,
                           text=True, timeout=30)
        assert f"5b3f0c9a/vhost-fs@{b.proc.pid}" in r.stdout, r.stdout
        _wait_gone(g, b, share)
    finally:
        if g is not None:
            g.close()
        if b is not None:
            b.stop()
        listener.close()
        d.stop()


def test_kata_runtime_rs_command_line(image, workdir: Path, tmp_path: Path) -> None:
    share = workdir / "shared"
    share.mkdir()
    path = workdir / "vhost-fs.sock"
    b = Proc([str(BIN), f"--socket-path={path}", f"--shared-dir={share}", "--cache=auto",
              "--sandbox=none", "--seccomp=none"], tmp_path / "backend.log",
             env={"VFS_LOCKD_SOCKET": ""})
    g = None
    try:
        assert Path(f"{path}.pid").read_text() == f"{b.proc.pid}\n"
        # no daemon named: the default socket's, if one listens there, else embedded
        expect = ("lock daemon " + DEFAULT_LOCKD_SOCKET if daemon_listening(DEFAULT_LOCKD_SOCKET)
                  else "locks: embedded lock manager")
        assert expect in b.output()
        assert wait_until(path.exists)
        g = VmGuest("kata2", path, workdir, kernel=image[0], initrd=image[1])
        _guest_checks(g, share)
        _wait_gone(g, b, share)
        assert not path.exists() and not Path(f"{path}.pid").exists()
    finally:
        if g is not None:
            g.close()
        b.stop()
