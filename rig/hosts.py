"""Several "hosts" sharing one GlusterFS volume, on one machine (Part 9).

The hosts (network namespaces, veths, one client mount each, daemons and guests per host,
partition/heal, teardown) are rig/cluster.py's; this module adds GlusterFS: glusterd and
the volume's one brick in host 0's namespace, on SUBNET.0.1 (gluster refuses 127.0.0.1),
and a GlusterFS client mount per host:

    ns vlg-h0:  lo 10.213.0.1/32 (glusterd, brick)   vlg0-1 10.213.1.1/24 ...
    ns vlg-hI:  vlg-I 10.213.I.2/24, route 10.213.0.1 via 10.213.I.1

Everything lives under BASE (default /var/tmp/vfs-lockd-gluster: a brick needs a file
system with xattrs, which /tmp may not have): glusterd's own working, run and log
directories and CLI socket (so a system glusterd is never touched), the brick, the
mounts, and `state.json`.

Used by scripts/gluster-hosts, tests/test_gluster.py, `vfs-lockd rig --hosts N` and
scripts/bench_gluster.py. Needs root, iproute2, nsenter and glusterfs-server/-client.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from rig.cluster import (  # noqa: F401 - re-exported: the names users of rig.hosts know
    MAX_HOSTS,
    PKG_ROOT,
    VFS_LOCKD,
    ClusterHosts,
    Host,
    HostsError,
    alive,
    cmdline,
    lockd_answers,
    run,
)
from rig.cluster import missing_tools as _missing_tools

DEFAULT_BASE = "/var/tmp/vfs-lockd-gluster"
VOLUME = "vfslockd"
NS_PREFIX = "vlg"
SUBNET = "10.213"  # host I's link: SUBNET.I.0/24; the server: SUBNET.0.1 on host 0's lo
TOOLS = ("glusterd", "gluster", "glusterfsd", "glusterfs", "mount.glusterfs")

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


def missing_tools() -> list[str]:
    """What this machine lacks to run GlusterFS hosts (empty when everything is there)."""
    return _missing_tools(TOOLS)


class GlusterCluster(ClusterHosts):
    """N hosts on one GlusterFS volume under `base`. See the module docstring."""

    KIND = "GlusterFS"
    DEFAULT_BASE = DEFAULT_BASE
    NS_PREFIX = NS_PREFIX
    SUBNET = SUBNET
    TOOLS = TOOLS

    def __init__(self, base: str | os.PathLike | None = None, hosts: int = 2,
                 ping_timeout: int = 42, prefix: str | None = None,
                 subnet: str | None = None) -> None:
        super().__init__(base, hosts, prefix, subnet)
        self.ping_timeout = ping_timeout
        self.wd = self.base / "glusterd"
        self.brick = self.base / "brick"
        self.cli_sock = self.run_dir / "cli.socket"

    def params(self) -> dict:
        return dict(super().params(), ping_timeout=self.ping_timeout, volume=VOLUME)

    @classmethod
    def _params_from(cls, st: dict) -> dict:
        return dict(super()._params_from(st), ping_timeout=int(st.get("ping_timeout", 42)))

    # ------------------------------------------------------------ servers
    def gluster(self, *args: str, check: bool = True, timeout: float = 120.0
                ) -> subprocess.CompletedProcess:
        """The gluster CLI, talking to our glusterd only (its own socket)."""
        return run(["gluster", f"--glusterd-sock={self.cli_sock}", "--mode=script", *args],
                   check=check, timeout=timeout)

    def _dirs(self) -> list[Path]:
        return [self.wd, self.brick]

    def _start_servers(self) -> None:
        self._glusterd()
        self._volume()

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
        run(self.in_ns(self.hosts[0], "glusterd", "-f", str(vol), "-p",
                       str(self.run_dir / "glusterd.pid"), "-l",
                       str(self.log_dir / "glusterd.log")))
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
                self.umount(h)
            self.gluster("volume", "stop", VOLUME, "force")
            started = False
        if not started:
            self.gluster("volume", "start", VOLUME, "force")
        self._save(brick_socket=self._brick_socket())

    def _brick_socket(self) -> str | None:
        """The brick's control socket, which glusterd puts in /var/run/gluster."""
        for pid in self.our_pids():
            args = cmdline(pid).split(b"\0")
            if args and args[0].endswith(b"glusterfsd") and b"-S" in args:
                return args[args.index(b"-S") + 1].decode()
        return None

    def _mount_command(self, h: Host) -> list[str]:
        return ["mount", "-t", "glusterfs", "-o",
                f"{MOUNT_OPTIONS},log-file={self.log_dir / (h.name + '.log')}",
                f"{self.server_addr}:/{VOLUME}", str(h.mount)]

    # ------------------------------------------------------------ teardown
    def _glusterd_pid(self) -> int | None:
        try:
            pid = int((self.run_dir / "glusterd.pid").read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if alive(pid) and self._tag() in cmdline(pid) else None

    def _teardown_extra(self, st: dict) -> list[str]:
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
        return []

    def status(self) -> dict:
        return dict(super().status(), volume=VOLUME, glusterd_pid=self._glusterd_pid())


# The name this module had before CephFS hosts existed (scripts and tests use it).
Cluster = GlusterCluster
