"""Several "hosts" sharing one cluster file system, on one machine: what GlusterFS
(rig/hosts.py) and CephFS (rig/ceph.py) have in common.

A host is a network namespace with its own client mount of the cluster file system
(mounted into the root mount namespace with `nsenter --net`, so every process here sees
it at BASE/hostI) plus, optionally, its own `vfs-lockd serve` and FUSE guests on top of
that mount. Host 0's namespace also runs the file system's servers; hosts 1..N-1 reach
them over a veth pair each, so cutting host I's link (`partition`) cuts exactly that host
off:

    ns P-h0:  lo S.0.1/32 (the servers: reachable while any one link is down)
              P0-1 S.1.1/24 ...
    ns P-hI:  P-I S.I.2/24, route S.0.1 via S.I.1

(P and S are the `prefix` and `subnet` a cluster is made with, so that clusters made by
different users -- a manual one, the tests', the rig's, the benchmark's -- run side by
side.) Everything lives under BASE, with `state.json` letting `teardown` from another
process find what `setup` started. Setup is idempotent; teardown kills only processes
whose command line names a path under BASE (or whose pid it recorded), unmounts, deletes
the namespaces (and with them the veths) and BASE, and never raises.

A subclass says how to start the servers (`_start_servers`), how a host mounts the file
system (`_mount_command`) and which tools it needs (`TOOLS`).
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

MAX_HOSTS = 32
VFS_LOCKD = [sys.executable, "-c", "import sys; from lockd.cli import main; sys.exit(main())"]
PKG_ROOT = str(Path(__file__).resolve().parent.parent)
# Tools every kind of cluster needs (a subclass adds its file system's).
BASE_TOOLS = ("ip", "nsenter", "mount", "umount")


class HostsError(Exception):
    pass


def missing_tools(tools: tuple[str, ...]) -> list[str]:
    """Which of these tools (plus root and /dev/fuse) this machine lacks."""
    out = [t for t in (*BASE_TOOLS, *tools) if shutil.which(t) is None
           and not os.path.exists(f"/usr/sbin/{t}") and not os.path.exists(f"/sbin/{t}")]
    if os.geteuid() != 0:
        out.append("root")
    if not os.path.exists("/dev/fuse"):
        out.append("/dev/fuse")
    return out


def run(args: list[str], check: bool = True, timeout: float = 60.0
        ) -> subprocess.CompletedProcess:
    r = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise HostsError(f"{' '.join(args)} failed ({r.returncode}): "
                         f"{(r.stderr or r.stdout).strip()}")
    return r


def is_mount(path: Path) -> bool:
    try:
        with open("/proc/self/mountinfo") as f:
            return any(line.split()[4] == str(path) for line in f)
    except OSError:
        return False


def mounts_under(base: Path) -> list[str]:
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


def umount_lazy(path: Path) -> None:
    """Detach whatever is mounted at path (lazily: users of it keep it until they let go)."""
    for _ in range(3):
        if not is_mount(path):
            return
        run(["umount", "-l", str(path)], check=False)


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def cmdline(pid: str | int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def rss_kib(pid: int) -> int:
    """Resident set size of a process in KiB (0 when it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def child_env() -> dict[str, str]:
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


def wait_for(cond, timeout: float, proc: subprocess.Popen | None, what: str,  # noqa: ANN001
             step: float = 0.05) -> None:
    """Poll cond() until it is true; HostsError when proc exits or the time is up."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if cond():
                return
        except OSError:
            pass
        if proc is not None and proc.poll() is not None:
            raise HostsError(f"{what} exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise HostsError(f"{what} did not come up within {timeout:.0f} s")
        time.sleep(step)


@dataclass
class Host:
    index: int
    netns: str
    mount: Path  # this host's client mount of the cluster file system
    link: str  # the interface inside the host's namespace that partition() downs
    addr: str

    @property
    def name(self) -> str:
        return f"host{self.index}"


class ClusterHosts:
    """N hosts on one cluster file system under `base`. See the module docstring."""

    KIND = "cluster"  # the file system's name, for messages
    DEFAULT_BASE = "/var/tmp/vfs-lockd-cluster"
    NS_PREFIX = "vlh"
    SUBNET = "10.212"
    TOOLS: tuple[str, ...] = ()

    def __init__(self, base: str | os.PathLike | None = None, hosts: int = 2,
                 prefix: str | None = None, subnet: str | None = None) -> None:
        if not 1 <= hosts <= MAX_HOSTS:
            raise HostsError(f"hosts must be 1..{MAX_HOSTS}")
        prefix = prefix or self.NS_PREFIX
        if not (prefix.isalnum() and len(prefix) <= 6):
            raise HostsError("prefix: up to 6 letters or digits (interface names are short)")
        self.prefix = prefix
        self.subnet = subnet or self.SUBNET
        self.server_addr = f"{self.subnet}.0.1"
        self.base = Path(base or self.DEFAULT_BASE).resolve()
        self.n = hosts
        self.run_dir = self.base / "run"
        self.log_dir = self.base / "log"
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

    def params(self) -> dict:
        """The constructor's arguments, as recorded in state.json for load()."""
        return {"hosts": self.n, "prefix": self.prefix, "subnet": self.subnet}

    @classmethod
    def load(cls, base: str | os.PathLike | None = None) -> ClusterHosts:
        """The cluster a previous setup (maybe another process) recorded under base."""
        p = Path(base or cls.DEFAULT_BASE).resolve() / "state.json"
        try:
            st = json.loads(p.read_text())
        except (OSError, ValueError):
            return cls(base, 1)
        return cls(base, **cls._params_from(st))

    @classmethod
    def _params_from(cls, st: dict) -> dict:
        return {"hosts": int(st.get("hosts", 1)), "prefix": st.get("prefix", cls.NS_PREFIX),
                "subnet": st.get("subnet", cls.SUBNET)}

    @classmethod
    def missing_tools(cls) -> list[str]:
        return missing_tools(cls.TOOLS)

    def in_ns(self, h: Host, *args: str) -> list[str]:
        """A command line that runs args in host h's network namespace."""
        return ["nsenter", f"--net=/run/netns/{h.netns}", *args]

    # ------------------------------------------------------------ setup
    def setup(self) -> ClusterHosts:
        """Namespaces, links, the servers, one client mount per host. Whatever exists and
        works already is kept (idempotent); on failure, torn down."""
        missing = self.missing_tools()
        if missing:
            raise HostsError(f"cannot run {self.KIND} hosts here, missing: "
                             + ", ".join(missing))
        t0 = time.monotonic()
        try:
            for d in (self.run_dir, self.log_dir, *self._dirs()):
                d.mkdir(parents=True, exist_ok=True)
            self._save()
            self._network()
            self._start_servers()
            for h in self.hosts:
                self.mount(h)
        except BaseException:
            self.teardown()
            raise
        self._save(setup_seconds=round(time.monotonic() - t0, 1))
        return self

    def _dirs(self) -> list[Path]:
        """Directories the servers need (created by setup)."""
        return []

    def _start_servers(self) -> None:
        raise NotImplementedError

    def _mount_command(self, h: Host) -> list[str]:
        """The command (run in h's namespace) that mounts the file system at h.mount."""
        raise NotImplementedError

    def _save(self, **extra: object) -> None:
        st = self._state()
        st.update(extra)
        st.update(kind=self.KIND, **self.params())
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(st, indent=1))
        tmp.replace(self.state_path)

    def _state(self) -> dict:
        try:
            return json.loads(self.state_path.read_text())
        except (OSError, ValueError):
            return {}

    def _network(self) -> None:
        have = set(run(["ip", "netns", "list"]).stdout.split())
        for h in self.hosts:
            if h.netns not in have:
                run(["ip", "netns", "add", h.netns])
            run(["ip", "-n", h.netns, "link", "set", "lo", "up"])
        h0 = self.hosts[0].netns
        addrs = run(["ip", "-n", h0, "-o", "addr", "show", "dev", "lo"]).stdout
        if f"{self.server_addr}/32" not in addrs:
            run(["ip", "-n", h0, "addr", "add", f"{self.server_addr}/32", "dev", "lo"])
        for h in self.hosts[1:]:
            if run(["ip", "-n", h.netns, "link", "show", h.link], check=False).returncode:
                peer = self._peer(h.index)
                # Created in the root namespace, then moved: names are unique per run.
                run(["ip", "link", "del", peer], check=False)
                run(["ip", "link", "add", peer, "type", "veth", "peer", "name", h.link])
                run(["ip", "link", "set", peer, "netns", h0])
                run(["ip", "link", "set", h.link, "netns", h.netns])
                run(["ip", "-n", h0, "addr", "add", f"{self.subnet}.{h.index}.1/24", "dev",
                     peer])
                run(["ip", "-n", h.netns, "addr", "add", f"{h.addr}/24", "dev", h.link])
                run(["ip", "-n", h0, "link", "set", peer, "up"])
            self._link_up(h.index)

    def mount(self, h: Host) -> None:
        """Mount the file system on host h (kept when it is mounted and answers)."""
        h.mount.mkdir(exist_ok=True)
        if is_mount(h.mount):
            if self.live(h):
                return
            self.umount(h)
        run(self.in_ns(h, *self._mount_command(h)), timeout=120)
        deadline = time.monotonic() + 60
        while not self.live(h):
            if time.monotonic() > deadline:
                raise HostsError(f"{self.KIND} mount of {h.name} at {h.mount} is not usable")
            time.sleep(0.1)

    def live(self, h: Host) -> bool:
        try:
            os.statvfs(h.mount)
            return is_mount(h.mount)
        except OSError:
            return False

    def umount(self, h: Host) -> None:
        for _ in range(3):
            if not is_mount(h.mount):
                return
            if run(["umount", str(h.mount)], check=False).returncode != 0:
                run(["umount", "-l", str(h.mount)], check=False)

    # ------------------------------------------------------------ faults
    def partition(self, index: int) -> None:
        """Cut host `index` off the network (its link down)."""
        if index == 0:
            raise HostsError(f"host 0 runs the {self.KIND} servers: partition another host")
        h = self.hosts[index]
        run(["ip", "-n", h.netns, "link", "set", h.link, "down"])

    def heal(self, index: int) -> None:
        """Bring host `index`'s link back."""
        self._link_up(index)

    def _link_up(self, index: int) -> None:
        """Host `index`'s link up, with its route to the servers."""
        if index == 0:
            return
        h = self.hosts[index]
        run(["ip", "-n", h.netns, "link", "set", h.link, "up"])
        run(["ip", "-n", h.netns, "route", "replace", f"{self.server_addr}/32", "via",
             f"{self.subnet}.{index}.1", "dev", h.link])

    # ------------------------------------------------------------ teardown
    def _tag(self) -> bytes:
        """What the command line of every process of ours contains: a path under BASE.
        (BASE plus the slash, so that BASE-test's processes are not BASE's.)"""
        return (str(self.base) + "/").encode()

    def our_pids(self) -> list[str]:
        """Processes whose command line names a path under our base directory: our servers
        and clients, and anything started on the mounts by our scripts."""
        tag = self._tag()
        me = str(os.getpid())
        return [p for p in os.listdir("/proc") if p.isdigit() and p != me
                and tag in cmdline(p)]

    def _stop_servers(self) -> None:
        """Stop the servers gently before everything naming BASE is killed (optional)."""

    def _teardown_extra(self, st: dict) -> list[str]:
        """What else the servers left outside BASE; returns problems."""
        return []

    def teardown(self, keep_data: bool = False) -> list[str]:
        """Stop everything setup (and start_lockd/start_guest) started; never raises.
        Returns what could not be cleaned up."""
        problems: list[str] = []
        try:
            st = self._state()
            # Processes recorded by the scripts (daemons, guests), then everything naming
            # BASE: guests first (they sit on the mounts), then clients and servers.
            for pid in st.get("pids", []):
                if alive(pid) and self._tag() in cmdline(pid):
                    kill(pid, signal.SIGTERM)
            for mp in sorted(mounts_under(self.base / "guests"), key=len, reverse=True):
                run(["umount", "-l", mp], check=False)
            for h in self.hosts:
                self.umount(h)
            for mp in sorted(mounts_under(self.base), key=len, reverse=True):
                run(["umount", "-l", mp], check=False)
            try:
                self._stop_servers()
            except Exception as exc:  # noqa: BLE001 - teardown never raises
                problems.append(f"stopping the servers: {exc}")
            for sig in (signal.SIGTERM, signal.SIGKILL):
                pids = self.our_pids()
                for p in pids:
                    kill(int(p), sig)
                deadline = time.monotonic() + 5
                while any(alive(int(p)) for p in pids) and time.monotonic() < deadline:
                    time.sleep(0.05)
            left = [p for p in self.our_pids() if alive(int(p))]
            if left:
                problems.append(f"processes still alive: {left}")
            problems += self._teardown_extra(st)
            have = set(run(["ip", "netns", "list"], check=False).stdout.split())
            for i in range(MAX_HOSTS):
                ns = f"{self.prefix}-h{i}"
                if ns in have:
                    r = run(["ip", "netns", "del", ns], check=False)
                    if r.returncode:
                        problems.append(f"netns {ns}: {r.stderr.strip()}")
                for link in (self._peer(i), f"{self.prefix}-{i}"):  # left in the root ns?
                    if run(["ip", "link", "show", link], check=False).returncode == 0:
                        run(["ip", "link", "del", link], check=False)
            still = mounts_under(self.base)
            if still:
                problems.append(f"still mounted: {still}")
            elif not keep_data:
                shutil.rmtree(self.base, ignore_errors=True)
        except Exception as exc:  # noqa: BLE001 - teardown never raises
            problems.append(f"teardown: {exc!r}")
        return problems

    def memory(self) -> dict[str, int]:
        """RSS in KiB of the file system's processes (servers and clients; not vfs-lockd's
        daemons and guests), by name: the program, its `-i ID`, or the host it mounts."""
        out: dict[str, int] = {}
        mounts = {str(h.mount): h.name for h in self.hosts}
        for pid in self.our_pids():
            args = [a.decode(errors="replace") for a in cmdline(pid).split(b"\0") if a]
            exe = os.path.basename(args[0]) if args else ""
            if not exe or exe.startswith("python") or exe in ("nsenter", "mount"):
                continue
            name = exe
            if "-i" in args[:-1]:
                name += "." + args[args.index("-i") + 1]
            elif args[-1] in mounts:
                name += "." + mounts[args[-1]]
            while name in out:
                name += "'"
            out[name] = rss_kib(int(pid))
        return out

    def status(self) -> dict:
        st = self._state()
        return {
            "kind": self.KIND, "base": str(self.base), "server": self.server_addr,
            "setup_seconds": st.get("setup_seconds"),
            "hosts": [{"name": h.name, "netns": h.netns, "mount": str(h.mount),
                       "mounted": is_mount(h.mount), "live": self.live(h),
                       "link": h.link} for h in self.hosts],
            "processes": len(self.our_pids()), "memory_kib": self.memory(),
            "lockd": st.get("lockd", {}), "guests": st.get("guests", {}),
        }

    # ------------------------------------------------------------ vfs-lockd per host
    def lockd_paths(self, h: Host) -> tuple[Path, Path]:
        """(socket, journal) of host h's daemon. Both on the host's local disk, never on
        the cluster file system: the journal describes this host's locks only."""
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
                             cwd=PKG_ROOT, env=child_env(), start_new_session=True)
        log.close()
        self._record(p.pid, "lockd", h.name, str(sock))
        _started(p, lambda: sock.exists() and lockd_answers(sock),
                 f"vfs-lockd serve for {h.name}")
        return p

    def start_guest(self, h: Host, guest: str, subdir: str = "", *extra: str,
                    source: Path | None = None) -> tuple[subprocess.Popen, Path]:
        """`vfs-lockd mount` of host h's mount (or a subdirectory of it; or `source`, a
        local directory, for comparisons) for a guest, on host h's daemon; returns the
        process and its mount point."""
        sock, _ = self.lockd_paths(h)
        src = source or (h.mount / subdir if subdir else h.mount)
        mp = self.base / "guests" / h.name / guest
        mp.mkdir(parents=True, exist_ok=True)
        log = open(self.log_dir / f"guest-{h.name}-{guest}.log", "ab")  # noqa: SIM115
        p = subprocess.Popen([*VFS_LOCKD, "mount", str(src), str(mp), "--guest", guest,
                              "--lockd", str(sock), *extra], stdout=log,
                             stderr=subprocess.STDOUT, cwd=PKG_ROOT, env=child_env(),
                             start_new_session=True)
        log.close()
        self._record(p.pid, "guests", guest, str(mp))
        _started(p, lambda: is_mount(mp) and os.stat(mp) is not None,
                 f"guest {guest} on {h.name}")
        return p, mp

    def _record(self, pid: int, kind: str, name: str, where: str) -> None:
        st = self._state()
        st.setdefault("pids", []).append(pid)
        st.setdefault(kind, {})[name] = {"pid": pid, "path": where}
        self._save(**st)


def _started(p: subprocess.Popen, ready, what: str) -> None:  # noqa: ANN001
    """Wait until a process we started is ready; if it does not get there, stop it."""
    try:
        wait_for(ready, 20, p, what)
    except BaseException:
        if p.poll() is None:
            p.kill()
            p.wait()
        raise


def cluster_class(kind: str) -> type[ClusterHosts]:
    """The ClusterHosts subclass of a file system: "gluster" or "ceph"."""
    if kind == "gluster":
        from rig.hosts import GlusterCluster

        return GlusterCluster
    if kind == "ceph":
        from rig.ceph import CephCluster

        return CephCluster
    raise HostsError(f"unknown cluster file system {kind!r} (gluster or ceph)")
