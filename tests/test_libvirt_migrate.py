"""`virsh migrate --live` of a running guest whose <filesystem> is served by
`vfs-lockd-virtiofsd`, between two real libvirtd instances on this host (issue 27).

Each instance is a "host" of its own: its own libvirtd.conf (a distinct `host_uuid`, or
libvirt refuses "migrate to the same host"), and, in a private mount namespace, its own
/run/libvirt, /var/lib/libvirt, /var/cache/libvirt and /var/log/libvirt (bind mounts of
directories under this test's tmp; the libvirt socket is reached from outside through
the bind source: `qemu:///system?socket=.../run/libvirt-sock`) and its own virtlogd.
/etc/libvirt/qemu.conf is this test's (`user = "root"`, as in test_libvirt). Everything
else -- /run/vfs-lockd/migration, where the back-ends hand over descriptors -- is the
host's, shared by both: the one-host path of a live migration. The QEMU is one that
migrates vhost-user-fs (scripts/qemu-migratable): the host's on Debian 13; on Debian 12
bookworm-backports' 10.0, bind-mounted over the host's 7.2 in both namespaces (7.2 lists
the device as a migration blocker, and libvirt 9.0 would refuse for QEMU's reason, not
its own).

libvirt launches the back-end for the source domain and, when it prepares the incoming
domain, for the destination; both with their embedded lock managers, or both on one
`vfs-lockd serve` (VFS_LOCKD_SOCKET in libvirtd's environment: the destination takes the
guest's daemon session over). libvirt 9.0 runs QEMU 10 only for a domain with
<features><acpi/></features> (else it passes -no-acpi, gone in QEMU 10). The guest
holds a POSIX lock, an OFD lock and a flock on a file of the share and has a fourth
process blocked in F_SETLKW behind the POSIX lock; a host thread probes the three locks
all along (F_OFD_GETLK, a non-blocking flock: test_migration.Prober). Then the client
drives the migration, non-p2p: `virsh -c SRC migrate --live DOMAIN DSTURI --migrateuri
tcp://127.0.0.1:PORT`.

Which outcome is right depends on libvirt (`libvirtd --version`):
- libvirt >= 10.6 (Debian 13: 11.3, QEMU 10.0) migrates a virtiofs device whose
  back-end lists "migrate-precopy": the guest runs on the destination, the destination's
  back-end collected the source's descriptors (SCM_RIGHTS) and says so, no probe ever
  saw a lock free, a descriptor opened before the migration reads and writes, the
  holder's unlock there grants the blocked process, and the last unlocks free the file
  for the host. `virsh domjobinfo --completed` is printed (-s).
- older libvirt (Debian 12: 9.0) refuses every virtiofs migration with "migration with
  virtiofs device is not supported": that exact refusal, the domain still running on
  the source only, its locks held throughout (no probe saw one free) and its wait still
  queued; its unlocks then work as before.
Not a skip either way. Skipped without root, libvirt or QEMU; under CI=true those fail.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemonutil import DaemonProc
from fuse_oracle import host_can_lock
from procutil import kill_keepers, wait_until
from test_libvirt import (
    PREFIX,
    LibvirtGuest,
    _backends,
    _fail_or_skip,
    _pid_alive,
    _read_pid,
    _stop_pid,
    require_libvirt,
    virsh,
)
from test_migration import Prober, probe_once

from rig.vm import REPO, VmError, VmGuest, ensure_image

pytestmark = pytest.mark.vm

QEMU_MIGRATABLE = REPO / "scripts" / "qemu-migratable"
QEMU_MODULES = REPO / "build/qemu-migratable/root/usr/lib/x86_64-linux-gnu/qemu"
GRANT_S = 60.0  # an answer that must come (TCG on 2 loaded cores): not a speed bound
REFUSAL = "migration with virtiofs device is not supported"
# the directories each instance has to itself (bind-mounted in its mount namespace)
PRIVATE = {"run": "/run/libvirt", "lib": "/var/lib/libvirt", "cache": "/var/cache/libvirt",
           "log": "/var/log/libvirt"}


def libvirt_version() -> tuple[int, int, int]:
    out = subprocess.run(["libvirtd", "--version"], capture_output=True, text=True,
                         timeout=30).stdout
    m = re.search(r"(\d+)\.(\d+)\.(\d+)", out)
    assert m, f"libvirtd --version: {out!r}"
    return int(m[1]), int(m[2]), int(m[3])


def migrates_virtiofs(version: tuple[int, int, int]) -> bool:
    """libvirt 10.6 first allowed migrating a virtiofs device (when the back-end's
    --print-capabilities lists "migrate-precopy"); before, it refused every one."""
    return version >= (10, 6, 0)


def _modes() -> list[str]:
    """Both lock topologies where libvirt migrates; where it refuses (before 10.6) it
    does so before any back-end is involved, so one topology says all there is."""
    try:
        version = libvirt_version()
    except (OSError, AssertionError, subprocess.SubprocessError):
        return ["embedded", "central"]  # no libvirtd: the fixture fails (CI) or skips
    return ["embedded", "central"] if migrates_virtiofs(version) else ["embedded"]


class Host:
    """One libvirtd (+ its virtlogd) with private state directories: a "host"."""

    def __init__(self, work: Path, share: Path, name: str) -> None:
        self.work, self.share, self.name = work, share, name
        self.root = work / name
        self.sock = self.root / "run" / "libvirt-sock"
        self.uri = f"qemu:///system?socket={self.sock}"
        self.logs = self.root / "log" / "qemu"
        self.host_uuid = str(uuid.uuid4())
        self.emulator: str | None = None  # a QEMU put in the host's one's place (None: none)
        self.daemon: DaemonProc | None = None  # the back-ends' lock daemon (None: embedded)
        self.pids: list[int] = []

    def start(self, lockd: str | None = None) -> None:
        """lockd: the lock daemon's socket the back-ends use (VFS_LOCKD_SOCKET in
        libvirtd's environment, which libvirt passes on); None: their embedded managers."""
        for sub, target in PRIVATE.items():
            (self.root / sub).mkdir(parents=True)
            # (the mount point: on a host where libvirtd never ran, /run/libvirt is not
            # there until something makes it)
            Path(target).mkdir(parents=True, exist_ok=True)
        # libvirt's one-time autostart of networks, domains and pools: already done
        for driver in ("network", "qemu", "storage"):
            (self.root / "run" / driver).mkdir()
            (self.root / "run" / driver / "autostarted").touch()
        caps = Path("/var/cache/libvirt/qemu/capabilities")
        if caps.is_dir():  # saves each instance probing QEMU again (libvirt checks them)
            shutil.copytree(caps, self.root / "cache" / "qemu" / "capabilities")
        conf = self.root / "libvirtd.conf"
        conf.write_text(f'host_uuid = "{self.host_uuid}"\n')
        qemu_conf = self.root / "qemu.conf"
        qemu_conf.write_text('user = "root"\ngroup = "root"\n')
        mounts = {str(self.root / sub): target for sub, target in PRIVATE.items()}
        if self.emulator is not None:
            # In this libvirtd's namespace the QEMU is one that migrates vhost-user-fs, with
            # its modules: QEMU looks in QEMU_MODULE_DIR and then in its build's module
            # directory, and finding the host's (7.2) modules there the backported QEMU
            # aborts when libvirt's capability probe loads them all (qom-list-types).
            mounts[self.emulator] = "/usr/bin/qemu-system-x86_64"
            mounts[str(QEMU_MODULES)] = "/usr/lib/x86_64-linux-gnu/qemu"
        binds = " && ".join(f'mount --bind "{src}" {target}' for src, target in mounts.items())
        script = (f'{binds} && mount --bind "{qemu_conf}" /etc/libvirt/qemu.conf'
                  f' && virtlogd -d -p "{self.root / "virtlogd.pid"}"'
                  f' && exec libvirtd -d -f "{conf}" -p "{self.root / "libvirtd.pid"}"')
        env = {k: v for k, v in os.environ.items() if k != "VFS_LOCKD_SOCKET"}
        if lockd is not None:
            env["VFS_LOCKD_SOCKET"] = lockd
        r = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                            script], capture_output=True, text=True, env=env, timeout=60)
        for daemon in ("virtlogd", "libvirtd"):  # (virtlogd may run though libvirtd failed)
            pidfile = self.root / f"{daemon}.pid"
            if r.returncode == 0 or pidfile.exists():
                self.pids.append(_read_pid(pidfile))
        if r.returncode != 0:
            raise VmError(f"libvirtd {self.name} could not be started: {r.stderr.strip()}")
        if not wait_until(lambda: subprocess.run(["virsh", "-c", self.uri, "version"],
                                                 capture_output=True, timeout=60
                                                 ).returncode == 0, 60, interval=0.2):
            raise VmError(f"libvirtd {self.name} did not come up")

    def domains(self) -> list[str]:
        out = virsh("list", "--name", check=False, uri=self.uri)
        return [n for n in out.split() if n.startswith(PREFIX)]

    def backend_log(self, domain: str) -> str:
        with contextlib.suppress(OSError):
            return (self.logs / f"{domain}-fs0-virtiofsd.log").read_text(errors="replace")
        return ""

    def stop(self) -> None:
        """Our domains destroyed, libvirtd and virtlogd stopped by pid. Never raises."""
        with contextlib.suppress(Exception):
            for name in self.domains():
                virsh("destroy", name, check=False, uri=self.uri)
        for pid in reversed(self.pids):
            _stop_pid(pid)


class Channel(VmGuest):
    """The probe's control channel as the migrated guest's destination QEMU connects it:
    the domain's <channel> names the same Unix socket path, so a new listener is bound
    there before the migration (the source's connection stays as it is) and accepts in
    a thread; requests sent before the migration are answered here
    (VmGuest.carry_channel_to)."""

    def __init__(self, src: LibvirtGuest) -> None:
        self.name, self.tag, self.backend, self.qemu = src.name, "share", None, None
        self.workdir, self.log, self.ctl_path = src.workdir, src.log, src.ctl_path
        self.probe = True
        self._probe_client_state()
        with contextlib.suppress(FileNotFoundError):
            self.ctl_path.unlink()
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(self.ctl_path))
        self._listener.listen(1)
        self._listener.settimeout(0.2)
        self._accepter = threading.Thread(target=self._accept, daemon=True)
        self._accepter.start()

    def _accept(self) -> None:
        while not self._closed and self._conn is None:
            with contextlib.suppress(TimeoutError, OSError):
                conn, _ = self._listener.accept()
                self._reader = threading.Thread(target=self._read, daemon=True)
                self._conn = conn
                self._reader.start()

    def connected(self) -> bool:
        return self._conn is not None

    def close(self, grace: float = 0) -> None:
        if self._closed:
            return
        self._closed = True
        self._accepter.join(2)
        self._listener.close()
        if self._conn is not None:
            with contextlib.suppress(OSError):
                self._conn.close()
        if self._reader is not None:
            self._reader.join(2)


@pytest.fixture(scope="module")
def image() -> tuple[Path, Path]:
    require_libvirt("unshare")
    try:
        return ensure_image()
    except VmError as exc:
        _fail_or_skip(f"guest image could not be built: {exc}")
        raise


def emulator(work: Path) -> str | None:
    """A QEMU that migrates vhost-user-fs (scripts/qemu-migratable; on Debian 12
    bookworm-backports' 10.0, run through a wrapper in `work`), put in place of the host's
    qemu-system-x86_64 in the libvirtd namespaces, so that what decides is libvirt, not a
    QEMU that lists the device as a migration blocker (7.2 does: libvirt 9.0 then refuses
    with "non-migratable device" before its own check). None: the host's QEMU is one."""
    r = subprocess.run([str(QEMU_MIGRATABLE), "--where"], capture_output=True, text=True,
                       timeout=600)
    if r.returncode != 0:
        _fail_or_skip(f"no QEMU 8.2+ (scripts/qemu-migratable): {r.stderr.strip()}")
    cmd = r.stdout.split()
    if len(cmd) == 1:
        return None
    wrapper = work / "qemu-system-x86_64"
    wrapper.write_text("#!/bin/sh\nexec " + " ".join(cmd) + ' "$@"\n')
    wrapper.chmod(0o755)
    return str(wrapper)


@pytest.fixture(params=_modes())
def hosts(request: pytest.FixtureRequest, image) -> Iterator[tuple[Host, Host]]:
    """The two hosts; their back-ends use their embedded lock managers, or both one
    `vfs-lockd serve` (the destination's back-end then takes the guest's daemon session
    over, test_daemon_takeover)."""
    work = Path(tempfile.mkdtemp(prefix="vllm-"))  # short: socket paths
    os.chmod(work, 0o755)
    share = work / "share"
    share.mkdir()
    pair = (Host(work, share, "src"), Host(work, share, "dst"))
    wrapper = emulator(work)
    daemon: DaemonProc | None = None
    try:
        if request.param == "central":
            daemon = DaemonProc(str(work), "--guest-grace", "30").start()
        for h in pair:
            h.emulator = wrapper
            h.daemon = daemon
            h.start(daemon.sock if daemon else None)
        yield pair
    finally:
        for h in pair:
            h.stop()
        for pid in _backends(str(share)):
            _stop_pid(pid, 5)
        if daemon is not None:
            daemon.stop()
        kill_keepers(str(work).encode())  # a keeper outlives a daemon holding locks
        shutil.rmtree(work, ignore_errors=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _jobinfo(out: str) -> dict[str, str]:
    info = {}
    for line in out.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            info[key.strip()] = value.strip()
    return info


def test_virsh_migrate_live_keeps_the_guests_locks(hosts: tuple[Host, Host], image) -> None:
    src, dst = hosts
    share = src.share
    f = share / "f"
    f.write_bytes(b"0123456789" * 10)
    version = libvirt_version()
    g = LibvirtGuest(src, "m", image,  # type: ignore[arg-type]  # a Host is a Libvirt here
                     acpi=True)
    chan: Channel | None = None
    prober: Prober | None = None
    try:
        for owner, kind, start in (("h", "posix", 0), ("o", "ofd", 20), ("fl", "flock", 0)):
            assert g.do(owner, "open 0 /mnt/f rw") == "ok"
            assert g.do(owner, f"lock 0 {kind} w {start} 10") == "ok"
        assert g.do("w", "open 0 /mnt/f rw") == "ok"
        waiting = g.send("w", "lock 0 posix w 0 10 wait")
        assert g.do("x", "open 0 /mnt/f rw") == "ok"  # after the wait, on the same ring
        assert g.do("x", "getlk 0 posix w 0 10").startswith("ok w 0 10")
        assert g.pending(waiting, wait=0)
        assert probe_once(f) == (True, True, True)
        src_backend = g.backend_pid()
        prober = Prober(f)
        chan = Channel(g)  # the destination QEMU's end of the probe channel
        cmd = ["virsh", "-c", src.uri, "migrate", "--live", "--verbose", g.name, dst.uri,
               "--migrateuri", f"tcp://127.0.0.1:{_free_port()}"]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        print(f"\nlibvirt {'.'.join(map(str, version))}: {' '.join(cmd[3:])}: "
              f"rc {r.returncode} {r.stdout.strip()} {r.stderr.strip()}")
        if not migrates_virtiofs(version):
            # libvirt < 10.6 refuses before anything starts; the guest runs on untouched
            assert r.returncode != 0 and REFUSAL in r.stderr, (r.stdout, r.stderr)
            assert g.name in src.domains() and g.name not in dst.domains()
            assert virsh("domstate", g.name, uri=src.uri).strip() == "running"
            assert _pid_alive(src_backend)
            assert not dst.backend_log(g.name)  # no back-end was ever started there
            assert "migration: state saved" not in src.backend_log(g.name)
            assert g.do("x", "getlk 0 posix w 0 10").startswith("ok w 0 10")
            assert g.do("x", "getlk 0 ofd w 20 10").startswith("ok w 20 10")
            assert g.pending(waiting, wait=0)
            results = prober.stop()
            free = [p for p in results if not all(p)]
            assert results and not free, f"{len(free)} of {len(results)} probes saw a lock free"
            print(f"{len(results)} host probes, none saw a lock free")
            assert g.do("h", "write 0 0 ABCDE") == "ok 5"
            assert g.do("o", "read 0 0 10") == "ok ABCDE56789"
            assert g.do("h", "lock 0 posix u 0 10") == "ok"
            assert g.result(waiting, GRANT_S) == "ok"
            assert g.do("w", "lock 0 posix u 0 10") == "ok"
            assert g.do("o", "lock 0 ofd u 20 10") == "ok"
            assert g.do("fl", "lock 0 flock u 0 0") == "ok"
            assert wait_until(lambda: not any(probe_once(f)), 10)
            return
        assert r.returncode == 0, (r.stdout, r.stderr)
        assert g.name in dst.domains() and g.name not in src.domains()
        assert virsh("domstate", g.name, uri=dst.uri).strip() == "running"
        assert wait_until(chan.connected, 30)
        g.carry_channel_to(chan)
        # The source's QEMU quit: its back-end ends and unlocks nothing.
        assert wait_until(lambda: not _pid_alive(src_backend), 30), src.backend_log(g.name)
        assert all(probe_once(f)), "the source's end released a lock"
        src_log, dst_log = src.backend_log(g.name), dst.backend_log(g.name)
        for line in (src_log + dst_log).splitlines():
            if "migration:" in line:
                print(line[:200])  # the switch-over as the back-ends saw it (-s)
        assert "stay with the other back-end" in src_log, src_log
        # the one-host path: the source's open file descriptions (and their locks) moved
        m = re.search(r"migration: (\d+) descriptors collected from the source", dst_log)
        assert m and int(m[1]) > 0, dst_log
        assert "the guest runs here now" in dst_log, dst_log
        assert "WITHOUT the source's descriptors" not in dst_log
        if src.daemon is not None:  # central: the daemon session moved, never ended
            assert f"lock daemon {src.daemon.sock}" in dst_log, dst_log
            assert "the guest's lock session is ours" in dst_log, dst_log
        else:
            assert "locks: embedded lock manager" in dst_log, dst_log
        assert chan.do("x", "getlk 0 posix w 0 10").startswith("ok w 0 10")
        assert chan.pending(waiting, wait=0)
        # files opened before the migration read and write
        assert chan.do("h", "write 0 0 ABCDE") == "ok 5"
        assert chan.do("o", "read 0 0 10") == "ok ABCDE56789"
        assert f.read_bytes()[:10] == b"ABCDE56789"
        results = prober.stop()
        free = [p for p in results if not all(p)]
        assert results and not free, f"{len(free)} of {len(results)} probes saw a lock free"
        print(f"{len(results)} host probes, none saw a lock free")
        job = _jobinfo(virsh("domjobinfo", "--completed", g.name, uri=dst.uri, check=False))
        print("domjobinfo --completed (destination): " + ", ".join(
            f"{k}: {' '.join(job[k].split())}" for k in (
                "Time elapsed", "Time elapsed w/o network", "Total downtime",
                "Downtime w/o network", "Setup time", "Data processed") if k in job))
        # the holder unlocks on the destination: the blocked process is granted there
        assert chan.do("h", "lock 0 posix u 0 10") == "ok"
        assert chan.result(waiting, GRANT_S) == "ok"
        assert not host_can_lock(str(f), 0, 10)  # now the waiter's
        assert chan.do("w", "lock 0 posix u 0 10") == "ok"
        assert chan.do("o", "lock 0 ofd u 20 10") == "ok"
        assert chan.do("fl", "lock 0 flock u 0 0") == "ok"
        assert wait_until(lambda: not any(probe_once(f)), 10), probe_once(f)
    except (AssertionError, VmError, OSError, TimeoutError):
        print(g.diagnostics())
        for h in hosts:
            print(f"--- {h.name} backend:", h.backend_log(g.name)[-3000:])
            with contextlib.suppress(OSError):
                print(f"--- {h.name} qemu:", (h.logs / f"{g.name}.log").read_text()[-3000:])
        raise
    finally:
        if prober is not None:
            prober.stop()
        if chan is not None:
            chan.close()
        g.close()
        for h in hosts:
            virsh("destroy", g.name, check=False, uri=h.uri)
