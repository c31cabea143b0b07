"""libvirt launches `vfs-lockd-virtiofsd` as it launches virtiofsd: real libvirtd 9.0
(Debian's libvirt-daemon-system), transient TCG domains booting the image of
scripts/guest-image with memfd shared memory and

    <filesystem type='mount'><driver type='virtiofs'/>
      <binary path='.../vfs-lockd-virtiofsd'><lock posix='on' flock='on'/></binary>

libvirt creates and listens on the socket itself and runs the binary with `--fd=N -o
source=...,cache=none,sandbox=...,flock,posix_lock --thread-pool-size=N`. The guests' lock
probe (scripts/guest/vlprobe.c) talks over a virtio-serial `<channel type='unix'>`, driven
with rig.vm's probe client.

There is no systemd here: the module fixture starts `virtlogd -d` and `libvirtd -d` with
their own pid files and stops them by pid; libvirtd gets VFS_LOCKD_SOCKET in its
environment (libvirt passes it on to the back-ends), naming this module's `vfs-lockd
serve`. QEMU runs as root: libvirtd runs in a private mount namespace in which this test's
qemu.conf (`user = "root"`) is bind-mounted over /etc/libvirt/qemu.conf (the host's file
is not touched), and each domain says `<seclabel model='dac' relabel='no'>`. libvirt's
one-time autostart of networks and domains is kept from happening by its own marker files
in /run/libvirt/*/autostarted (created here if missing, removed after).

Two domains serve the whole module (two boots): A names the binary (<binary path>) and
asks for the chroot sandbox; B has no <binary path> -- libvirt finds the back-end through
the installed vhost-user descriptor, as it finds virtiofsd -- and gets virtiofsd's
default sandbox (namespace).
Skipped without root, libvirt or QEMU; under CI=true those fail instead.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemonutil import DaemonProc
from fuse_oracle import host_can_lock
from procutil import fail_or_skip, kill_keepers, wait_until
from test_virtiofsd_cli import BIN, VFS_LOCKD

from fuse_server import qemu_descriptor
from rig.vm import FAST_BOOT, PROBE_CMD, QBOOT, VmError, VmGuest, ensure_image, errno_of

pytestmark = pytest.mark.vm

URI = "qemu:///system"
PREFIX = "vfslk-test-"
EAGAIN = 11
LIBVIRT_LOGS = Path("/var/log/libvirt/qemu")
DESCRIPTOR_DIR = "/etc"  # /etc/qemu/vhost-user: what a root libvirtd reads


def _fail_or_skip(why: str) -> None:
    fail_or_skip(why, "libvirt and QEMU must be available")


def require_libvirt(*more: str) -> None:
    """Root, libvirt, QEMU (and the programs `more`) and our installed back-end, or the
    test fails (CI) or skips."""
    if os.geteuid() != 0:
        _fail_or_skip("libvirt tests need root")
    for prog in ("libvirtd", "virtlogd", "virsh", "qemu-system-x86_64", *more):
        if shutil.which(prog) is None:
            _fail_or_skip(f"{prog} not installed (scripts/setup.sh)")
    if not BIN.exists():
        _fail_or_skip(f"{BIN} not installed (pip install -e .)")


def virsh(*args: str, check: bool = True, timeout: float = 120, uri: str = URI) -> str:
    r = subprocess.run(["virsh", "-c", uri, *args], capture_output=True, text=True,
                       timeout=timeout)
    if check and r.returncode != 0:
        raise VmError(f"virsh {' '.join(args)}: {r.stderr.strip()}")
    return r.stdout


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _stop_pid(pid: int, timeout: float = 20.0) -> None:
    """SIGTERM, wait (it is not our child: poll), then SIGKILL."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    if not wait_until(lambda: not _pid_alive(pid), timeout):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _read_pid(path: Path, timeout: float = 20.0) -> int:
    def pid() -> int | None:
        with contextlib.suppress(OSError, ValueError):
            return int(path.read_text().strip())
        return None

    if not wait_until(lambda: pid() is not None, timeout):
        raise VmError(f"no pid in {path}")
    return pid()


def _backends(marker: str) -> list[int]:
    """pids of vfs-lockd-virtiofsd processes whose command line names `marker`."""
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            if b"vfs-lockd-virtiofsd" in cmd and marker.encode() in cmd:
                out.append(int(pid))
    return out


class Libvirt:
    """This module's virtlogd + libvirtd + `vfs-lockd serve`."""

    # where LibvirtGuest reaches this libvirtd and finds its logs (another instance, as
    # in test_libvirt_migrate, has its own)
    uri = URI
    logs = LIBVIRT_LOGS

    def __init__(self, work: Path) -> None:
        self.work = work
        self.share = work / "share"
        self.share.mkdir()
        self.daemon: DaemonProc | None = None
        self.pids: list[int] = []
        self.markers: list[Path] = []

    def start(self) -> None:
        self.daemon = DaemonProc(str(self.work), "--guest-grace", "30").start()
        for driver in ("network", "qemu", "storage"):
            marker = Path("/run/libvirt") / driver / "autostarted"
            marker.parent.mkdir(parents=True, exist_ok=True)
            if not marker.exists():
                marker.touch()
                self.markers.append(marker)
        env = dict(os.environ, VFS_LOCKD_SOCKET=self.daemon.sock)
        pidfile = self.work / "virtlogd.pid"
        subprocess.run(["virtlogd", "-d", "-p", str(pidfile)], check=True, env=env, timeout=60)
        self.pids.append(_read_pid(pidfile))
        # libvirtd in a mount namespace of its own, where /etc/libvirt/qemu.conf is this
        # test's (the host's file is not touched): QEMU, and libvirt's probes of it, run as
        # root. As libvirt-qemu, the probes find /dev/kvm (mode 0600 here) unusable,
        # declare the cached capabilities stale and probe again, for a minute per domain.
        conf = self.work / "qemu.conf"
        conf.write_text('user = "root"\ngroup = "root"\n')
        pidfile = self.work / "libvirtd.pid"
        subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                        'mount --bind "$0" /etc/libvirt/qemu.conf && exec libvirtd -d -p "$1"',
                        str(conf), str(pidfile)], check=True, env=env, timeout=60)
        self.pids.append(_read_pid(pidfile))
        if not wait_until(lambda: subprocess.run(["virsh", "-c", URI, "version"],
                                                 capture_output=True, timeout=60
                                                 ).returncode == 0, 60, interval=0.2):
            raise VmError("libvirtd did not come up")

    def domains(self) -> list[str]:
        out = virsh("list", "--name", check=False)
        return [n for n in out.split() if n.startswith(PREFIX)]

    def stop(self) -> None:
        """Every domain of ours destroyed, libvirtd and virtlogd stopped by pid, the
        markers we made removed, the daemon stopped. Never raises."""
        with contextlib.suppress(Exception):
            for name in self.domains():
                virsh("destroy", name, check=False)
        for pid in reversed(self.pids):
            _stop_pid(pid)
        for pid in _backends(str(self.share)):
            _stop_pid(pid, 5)
        for m in self.markers:
            with contextlib.suppress(OSError):
                m.unlink()
        if self.daemon is not None:
            self.daemon.stop()
        kill_keepers(str(self.work).encode())  # a keeper outlives a daemon holding locks


def domain_xml(name: str, share: Path, ctl: Path, console: Path, kernel: Path, initrd: Path,
               binary: str | None, sandbox: str | None, acpi: bool = False) -> str:
    # acpi: libvirt 9.0 passes -no-acpi for a domain without it, which QEMU 10 refuses
    cmdline = (f"{FAST_BOOT} vfs.tag=share vfs.ports=ctl vfs.cmd="
               + base64.b64encode(PROBE_CMD.encode()).decode())
    path = f" path='{binary}'" if binary else ""
    sandbox_el = f"<sandbox mode='{sandbox}'/>" if sandbox else ""
    loader = (f"<loader type='rom' readonly='yes'>{QBOOT}</loader>"
              if os.path.exists(QBOOT) else "")
    return f"""<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>512</memory>
  <vcpu>1</vcpu>
  <memoryBacking><source type='memfd'/><access mode='shared'/></memoryBacking>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    {loader}
    <kernel>{kernel}</kernel>
    <initrd>{initrd}</initrd>
    <cmdline>{cmdline}</cmdline>
  </os>
  {"<features><acpi/></features>" if acpi else ""}
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <filesystem type='mount' accessmode='passthrough'>
      <driver type='virtiofs'/>
      <binary{path}>
        <cache mode='none'/>
        {sandbox_el}
        <lock posix='on' flock='on'/>
        <thread_pool size='2'/>
      </binary>
      <source dir='{share}'/>
      <target dir='share'/>
    </filesystem>
    <serial type='file'><source path='{console}'/><target port='0'/></serial>
    <channel type='unix'>
      <source mode='connect' path='{ctl}'/>
      <target type='virtio' name='ctl'/>
    </channel>
    <memballoon model='none'/>
  </devices>
  <seclabel type='static' model='dac' relabel='no'><label>+0:+0</label></seclabel>
</domain>
"""


class LibvirtGuest(VmGuest):
    """A transient libvirt domain running the probe; rig.vm.VmGuest's probe client
    (send/result/do/pending) over the domain's virtio-serial channel. QEMU is libvirt's,
    so starting and stopping go through virsh."""

    def __init__(self, lv: Libvirt, name: str, image: tuple[Path, Path],
                 binary: str | None = str(BIN), sandbox: str | None = None,
                 boot_timeout: float = 120.0, acpi: bool = False) -> None:
        self.name, self.tag, self.backend, self.qemu = PREFIX + name, "share", None, None
        self.uri, self.logs = lv.uri, lv.logs
        self.workdir = lv.work
        self.log = lv.work / f"{name}.console.log"
        self.sockdir = lv.work
        self.ctl_path = lv.work / f"{name}.ctl"
        self._probe_client_state()
        self.probe = True
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(str(self.ctl_path))
            listener.listen(1)
            listener.settimeout(0.2)
            xml = lv.work / f"{name}.xml"
            xml.write_text(domain_xml(self.name, lv.share, self.ctl_path, self.log, *image,
                                      binary, sandbox, acpi))
            virsh("create", str(xml), uri=self.uri)
            deadline = time.monotonic() + boot_timeout
            while self._conn is None:
                if time.monotonic() > deadline or self.name not in virsh("list", "--name",
                                                                           uri=self.uri):
                    raise VmError(f"domain {self.name} did not connect its channel:\n"
                                  + self.diagnostics())
                with contextlib.suppress(TimeoutError):
                    self._conn, _ = listener.accept()
            self._reader = threading.Thread(target=self._read, daemon=True)
            self._reader.start()
            self._wait_event("* ready", deadline)
        except BaseException:
            self.close()
            raise
        finally:
            listener.close()

    def backend_log(self) -> str:
        with contextlib.suppress(OSError):
            return (self.logs / f"{self.name}-fs0-virtiofsd.log").read_text(errors="replace")
        return ""

    def backend_pid(self) -> int:
        """The back-end the log names last: libvirt appends each start's log to the same
        file, so older runs' pids are in it too (and pids are reused)."""
        pids = _backends(f"source={self.workdir}/share")
        named = re.findall(rf"{re.escape(self.name)}/fs0@(\d+)", self.backend_log())
        assert named and int(named[-1]) in pids, (pids, self.backend_log()[-3000:])
        return int(named[-1])

    def diagnostics(self) -> str:
        out = [f"--- console ({self.log}):", self.console()[-3000:],
               "--- backend:", self.backend_log()[-3000:]]
        with contextlib.suppress(OSError):
            out += ["--- qemu:", (self.logs / f"{self.name}.log").read_text()[-2000:]]
        return "\n".join(out)

    def destroy(self) -> None:
        virsh("destroy", self.name, check=False, uri=self.uri)

    def close(self, grace: float = 0) -> None:
        if self._closed:
            return
        self._closed = True
        self.destroy()
        if self._conn is not None:
            with contextlib.suppress(OSError):
                self._conn.close()
        if self._reader is not None:
            self._reader.join(2)
        with contextlib.suppress(FileNotFoundError):
            self.ctl_path.unlink()


@pytest.fixture(scope="module")
def image() -> tuple[Path, Path]:
    require_libvirt()
    if os.path.exists("/run/libvirt/libvirt-sock") and subprocess.run(
            ["virsh", "-c", URI, "version"], capture_output=True, timeout=30).returncode == 0:
        _fail_or_skip("a libvirtd already runs here; these tests start their own")
    try:
        return ensure_image()
    except VmError as exc:
        _fail_or_skip(f"guest image could not be built: {exc}")
        raise


@pytest.fixture(scope="module")
def lv(image) -> Iterator[Libvirt]:
    work = Path(tempfile.mkdtemp(prefix="vllv-"))  # short: socket paths
    os.chmod(work, 0o755)
    lv = Libvirt(work)
    try:
        lv.start()
        yield lv
    finally:
        lv.stop()
        shutil.rmtree(work, ignore_errors=True)


@pytest.fixture(scope="module")
def descriptor(lv: Libvirt) -> Iterator[Path]:
    """Our descriptor in /etc/qemu/vhost-user (a file of that name kept aside and put
    back afterwards)."""
    path = Path(qemu_descriptor.descriptor_path(DESCRIPTOR_DIR, 40))
    saved = path.read_bytes() if path.exists() else None
    r = subprocess.run([str(VFS_LOCKD), "install-qemu-descriptor", "--prefix", DESCRIPTOR_DIR],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    try:
        yield path
    finally:
        if saved is None:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            with contextlib.suppress(OSError):
                path.parent.rmdir()  # only if we left it empty
                path.parent.parent.rmdir()
        else:
            path.write_bytes(saved)


@pytest.fixture(scope="module")
def pair(lv: Libvirt, image, descriptor: Path) -> Iterator[tuple[LibvirtGuest, LibvirtGuest]]:
    guests: list[LibvirtGuest] = []
    try:
        guests.append(LibvirtGuest(lv, "a", image, sandbox="chroot"))
        guests.append(LibvirtGuest(lv, "b", image, binary=None))  # found via the descriptor
        yield guests[0], guests[1]
    finally:
        for g in guests:
            g.close()


def test_libvirt_launches_it_like_virtiofsd(lv: Libvirt, pair) -> None:
    a, b = pair
    for g, sandbox in ((a, "chroot"), (b, "namespace")):
        cmd = Path(f"/proc/{g.backend_pid()}/cmdline").read_bytes().split(b"\0")
        assert cmd[1] == str(BIN).encode() and cmd[2].startswith(b"--fd=")
        assert b"-o" in cmd and b"--thread-pool-size=2" in cmd
        opts = cmd[cmd.index(b"-o") + 1].decode()
        assert opts.startswith(f"source={lv.share},cache=none") and "flock,posix_lock" in opts
        log = g.backend_log()
        assert "Waiting for vhost-user socket connection..." in log
        assert f"lock daemon {lv.daemon.sock} ($VFS_LOCKD_SOCKET)" in log
        assert f"sandbox={sandbox}" in log and "(confined)" in log


def test_guest_lock_conflicts_with_host_process(lv: Libvirt, pair) -> None:
    a, _ = pair
    f = str(lv.share / "host.dat")
    assert a.do("h", "open 0 /mnt/host.dat create") == "ok"
    assert a.do("h", "lock 0 posix w 0 10") == "ok"
    assert not host_can_lock(f, 0, 10)
    assert host_can_lock(f, 10, 10)
    fd = os.open(f, os.O_RDWR)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 10, 20)
        assert errno_of(a.do("h", "lock 0 posix w 20 5")) in (EAGAIN, 13)
        assert a.do("h", "lock 0 flock w 0 0") == "ok"
        assert not host_can_lock(f, mode="flock")
    finally:
        os.close(fd)
    assert a.do("h", "lock 0 posix w 20 5") == "ok"
    assert a.do("h", "close 0") == "ok"  # its locks go with the close (RELEASE: async)
    assert wait_until(lambda: host_can_lock(f, 0, 30) and host_can_lock(f, mode="flock"),
                      10), "locks outlived the guest's close"


def test_two_domains_on_one_daemon_exclude_each_other(lv: Libvirt, pair) -> None:
    a, b = pair
    for g in (a, b):
        assert g.do("x", "open 0 /mnt/shared.dat create") == "ok"
    assert a.do("x", "lock 0 posix w 0 0") == "ok"
    assert errno_of(b.do("x", "lock 0 posix w 0 0")) == EAGAIN
    tag = b.send("x", "lock 0 posix w 0 0 wait")

    def b_waits() -> bool:  # B's wait is queued in the daemon
        r = subprocess.run([str(VFS_LOCKD), "locks", "--socket", lv.daemon.sock, "--json"],
                           capture_output=True, text=True, timeout=30)
        return any(w["guest"].startswith(f"{PREFIX}b/fs0@")
                   for w in json.loads(r.stdout)["waiters"])

    assert wait_until(b_waits, 30, interval=0.1)
    assert b.pending(tag, 0)
    r = subprocess.run([str(VFS_LOCKD), "locks", "--socket", lv.daemon.sock],
                       capture_output=True, text=True, timeout=30)
    assert f"{PREFIX}a/fs0@" in r.stdout and f"{PREFIX}b/fs0@" in r.stdout, r.stdout
    assert a.do("x", "lock 0 posix u 0 0") == "ok"
    assert b.result(tag, timeout=30) == "ok"  # granted when A unlocked
    assert errno_of(a.do("x", "lock 0 posix w 0 0")) == EAGAIN
    assert b.do("x", "lock 0 posix u 0 0") == "ok"


def test_found_through_the_installed_descriptor(lv: Libvirt, pair) -> None:
    """B's domain names no binary: libvirt ran ours, found through the descriptor."""
    _, b = pair
    assert "<binary>" in (lv.work / "b.xml").read_text()  # (no path attribute)
    cmd = Path(f"/proc/{b.backend_pid()}/cmdline").read_bytes().split(b"\0")
    assert cmd[1] == str(BIN).encode()
    f = str(lv.share / "descr.dat")
    assert b.do("c", "open 0 /mnt/descr.dat create") == "ok"
    assert b.do("c", "lock 0 posix w 0 0") == "ok"
    assert not host_can_lock(f)
    assert b.do("c", "lock 0 posix u 0 0") == "ok"
    assert host_can_lock(f)


def test_virsh_destroy_frees_the_guests_locks(lv: Libvirt, pair) -> None:
    _, b = pair  # runs last with this pair: B is destroyed here
    f = str(lv.share / "destroy.dat")
    assert b.do("d", "open 0 /mnt/destroy.dat create") == "ok"
    assert b.do("d", "lock 0 posix w 0 0") == "ok"
    assert b.do("d", "lock 0 flock w 0 0") == "ok"
    assert not host_can_lock(f) and not host_can_lock(f, mode="flock")
    pid = b.backend_pid()
    b.destroy()
    assert wait_until(lambda: not _pid_alive(pid) and host_can_lock(f)
                      and host_can_lock(f, mode="flock"), 30), \
        "the destroyed guest's locks were kept"
    assert "front-end closed the connection" in b.backend_log()
