"""Several "hosts" sharing one GlusterFS volume, on one machine (Part 9).

A host is a network namespace with its own GlusterFS client mount (mounted into the root
mount namespace with `nsenter --net`, so every process here sees it at BASE/hostI) plus,
optionally, its own `vfs-lockd serve` and FUSE guests on top of that mount. Host 0's
namespace also runs glusterd and the volume's one brick; hosts 1..N-1 reach it over a
veth pair each, so cutting host I's link (`partition`) cuts exactly that host off:

    ns vlg-h0:  lo 10.213.0.1/32 (glusterd, brick: reachable while any one link is
                down)   vlg0-1 10.213.1.1/24 ...
    ns vlg-hI:  vlg-I 10.213.I.2/24, route 10.213.0.1 via 10.213.I.1

(names and addresses from `prefix` and `subnet`).

Everything lives under BASE (default /var/tmp/vfs-lockd-gluster: a brick needs a file
system with xattrs, which /tmp may not have): glusterd's own working, run and log
directories and CLI socket (so a system glusterd is never touched), the brick, the
mounts, and `state.json`, which lets `teardown` from another process find what `setup`
started. Setup is idempotent; teardown kills only processes whose command line names
BASE (or whose pid it recorded), unmounts, deletes the namespaces (and with them the
veths) and BASE, and never raises.

Used by scripts/gluster-hosts, tests/test_gluster.py, `vfs-lockd rig --hosts N` and
scripts/bench_gluster.py. Needs root, iproute2, nsenter and glusterfs-server/-client.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

DEFAULT_BASE = "/var/tmp/vfs-lockd-gluster"
VOLUME = "vfslockd"
NS_PREFIX = "vlg"
SUBNET = "10.213"  # host I's link: SUBNET.I.0/24; the server: SUBNET.0.1 on host 0's lo
MAX_HOSTS = 32
VFS_LOCKD = [sys.executable, "-c", "import sys; from lockd.cli import main; sys.exit(main())"]
PKG_ROOT = str(Path(__file__).resolve().parent.parent)

# Volume options. strict-locks: a client cut off long enough for the brick to drop its
# locks must not silently reopen the descriptions that held them; their next operation
# fails with EBADFD, which vfs-lockd turns into a lost lock. The performance translators
# cache data and metadata per client, which would make data protected by a lock stale on
# the other hosts: off.
STRICT_OPTIONS = {"client.strict-locks": "on"}
NO_CACHE_OPTIONS = {
    "performance.write-behind": "off", "performance.io-cache": "off",
    "performance.read-ahead": "off", "performance.quick-read": "off",
    "performance.stat-prefetch": "off", "performance.open-behind": "off",
    "performance.readdir-ahead": "off", "performance.nl-cache": "off",
}
# Kernel-side caching of the client mounts off too (page cache, attributes, names).
MOUNT_OPTIONS = "direct-io-mode=enable,attribute-timeout=0,entry-timeout=0,negative-timeout=0"


class HostsError(Exception):
    pass


def missing_tools() -> list[str]:
    """What this machine lacks to run hosts (empty when everything is there)."""
    need = ["glusterd", "gluster", "glusterfsd", "glusterfs", "mount.glusterfs", "ip",
            "nsenter", "mount", "umount"]
    out = [t for t in need if shutil.which(t) is None
           and not os.path.exists(f"/usr/sbin/{t}") and not os.path.exists(f"/sbin/{t}")]
    if os.geteuid() != 0:
        out.append("root")
    if not os.path.exists("/dev/fuse"):
        out.append("/dev/fuse")
    return out


def _run(args: list[str], check: bool = True, timeout: float = 60.0
         ) -> subprocess.CompletedProcess:
    r = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise HostsError(f"{' '.join(args)} failed ({r.returncode}): "
                         f"{(r.stderr or r.stdout).strip()}")
    return r


def _is_mount(path: Path) -> bool:
    try:
        with open("/proc/self/mountinfo") as f:
            return any(line.split()[4] == str(path) for line in f)
    except OSError:
        return False


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _cmdline(pid: str) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


@dataclass
class Host:
    index: int
    netns: str
    mount: Path  # this host's GlusterFS client mount
    link: str  # the interface inside the host's namespace that partition() downs
    addr: str

    @property
    def name(self) -> str:
        return f"host{self.index}"


class Cluster:
    """N hosts on one GlusterFS volume under `base`. See the module docstring."""

    def __init__(self, base: str | os.PathLike = DEFAULT_BASE, hosts: int = 2,
                 ping_timeout: int = 42, prefix: str = NS_PREFIX, subnet: str = SUBNET
                 ) -> None:
        if not 1 <= hosts <= MAX_HOSTS:
            raise HostsError(f"hosts must be 1..{MAX_HOSTS}")
        if not (prefix.isalnum() and len(prefix) <= 6):
            raise HostsError("prefix: up to 6 letters or digits (interface names are short)")
        # Namespaces, veths and addresses are named by prefix and subnet, so clusters with
        # different ones (the tests' and a manual one) can run side by side.
        self.prefix = prefix
        self.subnet = subnet
        self.server_addr = f"{subnet}.0.1"
        self.base = Path(base).resolve()
        self.n = hosts
        self.ping_timeout = ping_timeout
        self.wd = self.base / "glusterd"
        self.run_dir = self.base / "run"
        self.log_dir = self.base / "log"
        self.brick = self.base / "brick"
        self.cli_sock = self.run_dir / "cli.socket"
        self.state_path = self.base / "state.json"
        self.hosts = [self._host(i) for i in range(hosts)]

    def _host(self, i: int) -> Host:
        ns = f"{self.prefix}-h{i}"
        if i == 0:
            return Host(0, ns, self.base / "host0", "lo", self.server_addr)
        return Host(i, ns, self.base / f"host{i}", f"{self.prefix}-{i}",
                    f"{self.subnet}.{i}.2")

    def _peer(self, i: int) -> str:
        """Host i's veth end in host 0's namespace."""
        return f"{self.prefix}0-{i}"

    @classmethod
    def load(cls, base: str | os.PathLike = DEFAULT_BASE) -> Cluster:
        """The cluster a previous setup (maybe another process) recorded under base."""
        p = Path(base).resolve() / "state.json"
        try:
            st = json.loads(p.read_text())
        except (OSError, ValueError):
            return cls(base, 1)
        return cls(base, int(st.get("hosts", 1)), int(st.get("ping_timeout", 42)),
                   st.get("prefix", NS_PREFIX), st.get("subnet", SUBNET))

    # ------------------------------------------------------------ setup
    def gluster(self, *args: str, check: bool = True, timeout: float = 120.0
                ) -> subprocess.CompletedProcess:
        """The gluster CLI, talking to our glusterd only (its own socket)."""
        return _run(["gluster", f"--glusterd-sock={self.cli_sock}", "--mode=script", *args],
                    check=check, timeout=timeout)

    def setup(self) -> Cluster:
        """Namespaces, links, glusterd, the volume, one client mount per host. Whatever
        exists and works already is kept (idempotent); on failure, torn down."""
        missing = missing_tools()
        if missing:
            raise HostsError("cannot run GlusterFS hosts here, missing: " + ", ".join(missing))
        try:
            for d in (self.wd, self.run_dir, self.log_dir, self.brick):
                d.mkdir(parents=True, exist_ok=True)
            self._save()
            self._network()
            self._glusterd()
            self._volume()
            for h in self.hosts:
                self._mount(h)
        except BaseException:
            self.teardown()
            raise
        return self

    def _save(self, **extra: object) -> None:
        st = self._state()
        st.update(extra)
        st.update(hosts=self.n, ping_timeout=self.ping_timeout, volume=VOLUME,
                  prefix=self.prefix, subnet=self.subnet)
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(st, indent=1))
        tmp.replace(self.state_path)

    def _state(self) -> dict:
        try:
            return json.loads(self.state_path.read_text())
        except (OSError, ValueError):
            return {}

    def _network(self) -> None:
        have = set(_run(["ip", "netns", "list"]).stdout.split())
        for h in self.hosts:
            if h.netns not in have:
                _run(["ip", "netns", "add", h.netns])
            _run(["ip", "-n", h.netns, "link", "set", "lo", "up"])
        h0 = self.hosts[0].netns
        addrs = _run(["ip", "-n", h0, "-o", "addr", "show", "dev", "lo"]).stdout
        if f"{self.server_addr}/32" not in addrs:
            _run(["ip", "-n", h0, "addr", "add", f"{self.server_addr}/32", "dev", "lo"])
        for h in self.hosts[1:]:
            if _run(["ip", "-n", h.netns, "link", "show", h.link], check=False).returncode:
                peer = self._peer(h.index)
                # Created in the root namespace, then moved: names are unique per run.
                _run(["ip", "link", "del", peer], check=False)
                _run(["ip", "link", "add", peer, "type", "veth", "peer", "name", h.link])
                _run(["ip", "link", "set", peer, "netns", h0])
                _run(["ip", "link", "set", h.link, "netns", h.netns])
                _run(["ip", "-n", h0, "addr", "add", f"{self.subnet}.{h.index}.1/24", "dev",
                      peer])
                _run(["ip", "-n", h.netns, "addr", "add", f"{h.addr}/24", "dev", h.link])
                _run(["ip", "-n", h0, "link", "set", peer, "up"])
            self.heal(h.index)

    def _glusterd(self) -> None:
        if self._glusterd_pid() and self.gluster("volume", "list", check=False).returncode == 0:
            return
        # glusterd creates /var/run/gluster/snaps; teardown removes it if we made it.
        self._save(made_snaps_dir=not os.path.exists("/var/run/gluster/snaps"))
        vol = self.base / "glusterd.vol"
        # Our own working/run/log directories and CLI socket: a system glusterd (or a
        # second copy of this cluster elsewhere) never sees this one.
        vol.write_text(
            "volume management\n"
            "    type mgmt/glusterd\n"
            f"    option working-directory {self.wd}\n"
            f"    option run-directory {self.run_dir}\n"
            f"    option logging-directory {self.log_dir}\n"
            f"    option glusterd-sockfile {self.cli_sock}\n"
            "    option transport-type socket\n"
            f"    option transport.socket.bind-address {self.server_addr}\n"
            "    option transport.socket.listen-port 24007\n"
            "    option ping-timeout 0\n"
            "    option event-threads 1\n"
            "    option max-port 60999\n"
            "end-volume\n")
        _run(["nsenter", f"--net=/run/netns/{self.hosts[0].netns}", "glusterd", "-f",
              str(vol), "-p", str(self.run_dir / "glusterd.pid"), "-l",
              str(self.log_dir / "glusterd.log")])
        deadline = time.monotonic() + 30
        while self.gluster("volume", "list", check=False).returncode != 0:
            if time.monotonic() > deadline:
                raise HostsError("glusterd did not answer within 30 s; see "
                                 f"{self.log_dir / 'glusterd.log'}")
            time.sleep(0.1)

    def volume_options(self) -> dict[str, str]:
        """What setup sets on the volume (see the README's operator notes)."""
        t = str(self.ping_timeout)
        opts = dict(STRICT_OPTIONS, **NO_CACHE_OPTIONS)
        # The client gives up on the brick after network.ping-timeout; the brick drops a
        # silent client's connection (and its locks) after the TCP user timeout, helped
        # by keepalives on an idle connection. Both follow the one setting.
        keep = max(1, self.ping_timeout // 3)
        opts.update({"network.ping-timeout": t, "server.tcp-user-timeout": t,
                     "server.keepalive-time": str(keep), "server.keepalive-interval": "1",
                     "server.keepalive-count": str(max(1, self.ping_timeout - keep))})
        return opts

    def _volume(self) -> None:
        info = self.gluster("volume", "info", VOLUME, check=False)
        if info.returncode != 0:
            # A brick address that is not 127.0.0.1/localhost (refused by gluster); the
            # brick is on the root file system, which needs `force`.
            self.gluster("volume", "create", VOLUME, f"{self.server_addr}:{self.brick}",
                         "force")
            info = self.gluster("volume", "info", VOLUME)
        current = {}
        for line in info.stdout.splitlines():
            k, sep, v = line.partition(": ")
            if sep:
                current[k.strip()] = v.strip()
        changed = False
        for k, v in self.volume_options().items():
            if current.get(k) != v:
                self.gluster("volume", "set", VOLUME, k, v)
                changed = True
        started = current.get("Status") == "Started"
        if started and changed:
            # Server socket options apply to new connections only: restart the brick.
            for h in self.hosts:
                self._umount(h)
            self.gluster("volume", "stop", VOLUME, "force")
            started = False
        if not started:
            self.gluster("volume", "start", VOLUME, "force")
        self._save(brick_socket=self._brick_socket())

    def _brick_socket(self) -> str | None:
        """The brick's control socket, which glusterd puts in /var/run/gluster."""
        for pid in self._our_pids():
            args = _cmdline(pid).split(b"\0")
            if args and args[0].endswith(b"glusterfsd") and b"-S" in args:
                return args[args.index(b"-S") + 1].decode()
        return None

    def _mount(self, h: Host) -> None:
        h.mount.mkdir(exist_ok=True)
        if _is_mount(h.mount):
            if self.live(h):
                return
            self._umount(h)
        _run(["nsenter", f"--net=/run/netns/{h.netns}", "mount", "-t", "glusterfs", "-o",
              f"{MOUNT_OPTIONS},log-file={self.log_dir / (h.name + '.log')}",
              f"{self.server_addr}:/{VOLUME}", str(h.mount)], timeout=60)
        deadline = time.monotonic() + 30
        while not self.live(h):
            if time.monotonic() > deadline:
                raise HostsError(f"GlusterFS mount of {h.name} at {h.mount} is not usable")
            time.sleep(0.1)

    def live(self, h: Host) -> bool:
        try:
            os.statvfs(h.mount)
            return _is_mount(h.mount)
        except OSError:
            return False

    # ------------------------------------------------------------ faults
    def partition(self, index: int) -> None:
        """Cut host `index` off the network (its link down)."""
        if index == 0:
            raise HostsError("host 0 holds the brick: partition another host")
        h = self.hosts[index]
        _run(["ip", "-n", h.netns, "link", "set", h.link, "down"])

    def heal(self, index: int) -> None:
        """Bring host `index`'s link back (and its route to the server)."""
        if index == 0:
            return
        h = self.hosts[index]
        _run(["ip", "-n", h.netns, "link", "set", h.link, "up"])
        _run(["ip", "-n", h.netns, "route", "replace", f"{self.server_addr}/32", "via",
              f"{self.subnet}.{index}.1", "dev", h.link])

    # ------------------------------------------------------------ teardown
    def _glusterd_pid(self) -> int | None:
        try:
            pid = int((self.run_dir / "glusterd.pid").read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if _alive(pid) and str(self.base).encode() in _cmdline(str(pid)) else None

    def _our_pids(self) -> list[str]:
        """Processes whose command line names our base directory: our glusterd, brick and
        clients, and anything started on the mounts by our scripts."""
        tag = str(self.base).encode()
        me = str(os.getpid())
        return [p for p in os.listdir("/proc") if p.isdigit() and p != me
                and tag in _cmdline(p)]

    def _umount(self, h: Host) -> None:
        for _ in range(3):
            if not _is_mount(h.mount):
                return
            if _run(["umount", str(h.mount)], check=False).returncode != 0:
                _run(["umount", "-l", str(h.mount)], check=False)

    def teardown(self, keep_data: bool = False) -> list[str]:
        """Stop everything setup (and start_lockd/start_guest) started; never raises.
        Returns what could not be cleaned up."""
        problems: list[str] = []
        st = self._state()
        # Processes recorded by the script (daemons, guests), then everything naming
        # BASE: guests first (they sit on the mounts), then clients, brick, glusterd.
        for pid in st.get("pids", []):
            if _alive(pid) and str(self.base).encode() in _cmdline(str(pid)):
                _kill(pid, signal.SIGTERM)
        for mp in sorted(_mounts_under(self.base / "guests"), key=len, reverse=True):
            _run(["umount", "-l", mp], check=False)
        for h in self.hosts:
            self._umount(h)
        for mp in sorted(_mounts_under(self.base), key=len, reverse=True):
            _run(["umount", "-l", mp], check=False)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            pids = self._our_pids()
            for p in pids:
                _kill(int(p), sig)
            deadline = time.monotonic() + 5
            while any(_alive(int(p)) for p in pids) and time.monotonic() < deadline:
                time.sleep(0.05)
        left = [p for p in self._our_pids() if _alive(int(p))]
        if left:
            problems.append(f"processes still alive: {left}")
        sock = st.get("brick_socket")
        if sock and sock.startswith(("/var/run/gluster/", "/run/gluster/")):
            try:
                os.unlink(sock)
            except OSError:
                pass
        if st.get("made_snaps_dir"):
            try:
                os.rmdir("/var/run/gluster/snaps")
            except OSError:
                pass
        have = set(_run(["ip", "netns", "list"], check=False).stdout.split())
        for i in range(MAX_HOSTS):
            ns = f"{self.prefix}-h{i}"
            if ns in have:
                r = _run(["ip", "netns", "del", ns], check=False)
                if r.returncode:
                    problems.append(f"netns {ns}: {r.stderr.strip()}")
            for link in (self._peer(i), f"{self.prefix}-{i}"):  # left in the root ns?
                if _run(["ip", "link", "show", link], check=False).returncode == 0:
                    _run(["ip", "link", "del", link], check=False)
        still = _mounts_under(self.base)
        if still:
            problems.append(f"still mounted: {still}")
        elif not keep_data:
            shutil.rmtree(self.base, ignore_errors=True)
        return problems

    def status(self) -> dict:
        st = self._state()
        return {
            "base": str(self.base), "volume": VOLUME, "server": self.server_addr,
            "glusterd_pid": self._glusterd_pid(),
            "hosts": [{"name": h.name, "netns": h.netns, "mount": str(h.mount),
                       "mounted": _is_mount(h.mount), "live": self.live(h),
                       "link": h.link} for h in self.hosts],
            "processes": len(self._our_pids()),
            "lockd": st.get("lockd", {}), "guests": st.get("guests", {}),
        }

    # ------------------------------------------------------------ vfs-lockd per host
    def lockd_paths(self, h: Host) -> tuple[Path, Path]:
        """(socket, journal) of host h's daemon. Both on the host's local disk, never on
        the cluster volume: the journal describes this host's locks only."""
        d = self.base / "lockd" / h.name
        d.mkdir(parents=True, exist_ok=True)
        return d / "lockd.sock", d / "journal.sqlite"

    def start_lockd(self, h: Host, *extra: str) -> subprocess.Popen:
        """`vfs-lockd serve` for host h (detached; recorded for teardown)."""
        sock, journal = self.lockd_paths(h)
        if lockd_answers(sock):
            raise HostsError(f"a vfs-lockd serve already answers on {sock}")
        log = open(self.log_dir / f"lockd-{h.name}.log", "ab")  # noqa: SIM115
        p = subprocess.Popen([*VFS_LOCKD, "serve", "--socket", str(sock), "--journal",
                              str(journal), *extra], stdout=log, stderr=subprocess.STDOUT,
                             cwd=PKG_ROOT, env=_env(), start_new_session=True)
        log.close()
        _wait_for(lambda: sock.exists() and lockd_answers(sock), 20, p,
                  f"vfs-lockd serve for {h.name}")
        self._record(p.pid, "lockd", h.name, str(sock))
        return p

    def start_guest(self, h: Host, guest: str, subdir: str = "", *extra: str
                    ) -> tuple[subprocess.Popen, Path]:
        """`vfs-lockd mount` of host h's GlusterFS mount (or a subdirectory) for a guest,
        on host h's daemon; returns the process and its mount point."""
        sock, _ = self.lockd_paths(h)
        src = h.mount / subdir if subdir else h.mount
        mp = self.base / "guests" / h.name / guest
        mp.mkdir(parents=True, exist_ok=True)
        log = open(self.log_dir / f"guest-{h.name}-{guest}.log", "ab")  # noqa: SIM115
        p = subprocess.Popen([*VFS_LOCKD, "mount", str(src), str(mp), "--guest", guest,
                              "--lockd", str(sock), *extra], stdout=log,
                             stderr=subprocess.STDOUT, cwd=PKG_ROOT, env=_env(),
                             start_new_session=True)
        log.close()
        _wait_for(lambda: _is_mount(mp) and os.statvfs(mp) is not None, 20, p,
                  f"guest {guest} on {h.name}")
        self._record(p.pid, "guests", guest, str(mp))
        return p, mp

    def _record(self, pid: int, kind: str, name: str, where: str) -> None:
        st = self._state()
        st.setdefault("pids", []).append(pid)
        st.setdefault(kind, {})[name] = {"pid": pid, "path": where}
        self._save(**st)


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _mounts_under(base: Path) -> list[str]:
    prefix = str(base)
    out = []
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                mp = line.split()[4]
                if mp == prefix or mp.startswith(prefix + "/"):
                    out.append(mp)
    except OSError:
        pass
    return out


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = PKG_ROOT + (os.pathsep + env["PYTHONPATH"]
                                    if env.get("PYTHONPATH") else "")
    return env


def lockd_answers(sock: Path) -> bool:
    """Does a vfs-lockd serve answer STATUS on this socket?"""
    try:
        from lockd.daemon import wire
        from lockd.daemon.client import AdminClient

        with AdminClient(str(sock), timeout=1.0) as admin:
            admin.json(wire.T_STATUS)
        return True
    except Exception:
        return False


def _wait_for(cond, timeout: float, proc: subprocess.Popen, what: str) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while True:
        try:
            if cond():
                return
        except OSError:
            pass
        if proc.poll() is not None:
            raise HostsError(f"{what} exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise HostsError(f"{what} did not come up within {timeout:.0f} s")
        time.sleep(0.05)
