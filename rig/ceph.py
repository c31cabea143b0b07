"""Several "hosts" sharing one CephFS, on one machine (issue 20).

The hosts (network namespaces, veths, one client mount each, daemons and guests per host,
partition/heal, teardown) are rig/cluster.py's; this module adds a one-node Ceph cluster
bootstrapped by hand from Debian's packages (Ceph 16, no cephadm, no containers) in host
0's namespace, every daemon on SUBNET.0.1:

    ns vlc-h0:  lo 10.217.0.1/32 (ceph-mon a, ceph-mgr x, ceph-osd 0, ceph-mds a)
                vlc0-1 10.217.1.1/24 ...
    ns vlc-hI:  vlc-I 10.217.I.2/24, route 10.217.0.1 via 10.217.I.1

- one monitor, one manager, one OSD on `memstore` (objects in the OSD's memory: nothing
  to format, fast, and 1 GiB at most), one MDS, pools of size 1 and the file system
  FS_NAME; each host mounts it with ceph-fuse (this kernel has no CephFS client) as
  client.vfslockd;
- everything under BASE (default /var/tmp/vfs-lockd-ceph): our own ceph.conf (a fresh
  fsid), keyrings, daemon data, run directory (pid files, admin sockets), logs, crash
  directory, so a system Ceph (/etc/ceph, /var/lib/ceph, /var/run/ceph) is never
  touched. Every daemon's command line names BASE/ceph.conf: that is how teardown finds
  them.

How a cut-off host loses its locks (see the README, "Several hosts (CephFS)"): the MDS
evicts a client that has not renewed its session for `session_autoclose` seconds
(`evict_after`; Ceph refuses less than 30), drops its locks (a waiter on another host is
granted) and, with `mds_session_blocklist_on_timeout`, blocklists it on the OSDs. When
the link comes back, the blocklisted ceph-fuse fails every call: lock calls on its
open descriptions answer EIO (ESHUTDOWN for those that were in flight), everything else
ESHUTDOWN. Ceph never lets that client back: `heal` remounts the host (a new ceph-fuse),
and the host's guests must be restarted on the new mount.

Used by scripts/ceph-hosts, tests/test_ceph.py, `vfs-lockd rig --cluster ceph` and
scripts/bench_ceph.py. Needs root, iproute2, nsenter and the Debian packages ceph-mon,
ceph-mgr, ceph-osd, ceph-mds, ceph-fuse, ceph-common.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path

from rig.cluster import (
    ClusterHosts,
    Host,
    HostsError,
    alive,
    cmdline,
    is_mount,
    kill,
    run,
    umount_lazy,
)

DEFAULT_BASE = "/var/tmp/vfs-lockd-ceph"
NS_PREFIX = "vlc"
SUBNET = "10.217"
FS_NAME = "vfslockd"
CLIENT = "vfslockd"  # the hosts mount as client.vfslockd
MON, MGR, MDS = "a", "x", "a"
TOOLS = ("ceph", "ceph-mon", "ceph-mgr", "ceph-osd", "ceph-mds", "ceph-fuse", "ceph-authtool",
         "monmaptool")
MIN_EVICT = 30  # seconds: Ceph refuses a session_timeout or session_autoclose below this
DEFAULT_EVICT = 300  # Ceph's own session_autoclose

# What a cut-off host must be told, and data protected by a lock must see (README):
# - the MDS blocklists a client it evicts (timeout or by hand), so a cut-off host can
#   never write after its locks went to another host, and it learns of the loss: every
#   call on its descriptions fails (EIO, ESHUTDOWN) instead of succeeding;
# - a stale session is never silently reopened: measured with client_reconnect_stale on
#   and blocklisting off, lock requests that were in flight during the partition were
#   granted on the new session (answer 0) while the locks held before were gone;
# - no kernel page cache under ceph-fuse: Ceph revokes a client's cache capability when
#   another client writes, but cannot reach the kernel's copy of the pages in time.
MDS_OPTIONS = {"mds_session_blocklist_on_timeout": "true",
               "mds_session_blocklist_on_evict": "true"}
CLIENT_OPTIONS = {"client_reconnect_stale": "false", "fuse_disable_pagecache": "true"}


def missing_tools() -> list[str]:
    """What this machine lacks to run CephFS hosts (empty when everything is there)."""
    return CephCluster.missing_tools()


class CephCluster(ClusterHosts):
    """N hosts on one CephFS under `base`. See the module docstring."""

    KIND = "CephFS"
    DEFAULT_BASE = DEFAULT_BASE
    NS_PREFIX = NS_PREFIX
    SUBNET = SUBNET
    TOOLS = TOOLS

    def __init__(self, base: str | os.PathLike | None = None, hosts: int = 2,
                 evict_after: int = DEFAULT_EVICT, prefix: str | None = None,
                 subnet: str | None = None) -> None:
        super().__init__(base, hosts, prefix, subnet)
        if evict_after < MIN_EVICT:
            raise HostsError(f"evict_after: Ceph refuses less than {MIN_EVICT} s")
        self.evict_after = evict_after
        self.conf = self.base / "ceph.conf"
        self.data = self.base / "data"

    def params(self) -> dict:
        return dict(super().params(), evict_after=self.evict_after, fs=FS_NAME)

    @classmethod
    def _params_from(cls, st: dict) -> dict:
        return dict(super()._params_from(st),
                    evict_after=int(st.get("evict_after", DEFAULT_EVICT)))

    # ------------------------------------------------------------ the ceph CLI
    def ceph(self, *args: str, check: bool = True, timeout: float = 60.0
             ) -> subprocess.CompletedProcess:
        """The ceph CLI as client.admin of our cluster (from host 0's namespace, where
        the monitor listens)."""
        return run(self.in_ns(self.hosts[0], "ceph", "-c", str(self.conf), "--connect-timeout",
                              str(int(min(timeout, 30))), *args), check=check, timeout=timeout)

    def ceph_json(self, *args: str, timeout: float = 60.0) -> object:
        return json.loads(self.ceph(*args, "--format", "json", timeout=timeout).stdout)

    # ------------------------------------------------------------ servers
    def _dirs(self) -> list[Path]:
        return [self.data, self.base / "crash"]

    def _conf_text(self, fsid: str) -> str:
        b = self.base
        session_timeout = min(60, self.evict_after)
        lines = [
            "# vfs-lockd's CephFS hosts (rig/ceph.py): everything under this directory.",
            "[global]",
            f"fsid = {fsid}",
            f"mon_host = {self.server_addr}",
            "auth_cluster_required = cephx", "auth_service_required = cephx",
            "auth_client_required = cephx",
            f"keyring = {b}/$name.keyring",
            f"run_dir = {b}/run",
            f"admin_socket = {b}/run/$name.asok",
            f"pid_file = {b}/run/$name.pid",
            f"log_file = {b}/log/$name.log",
            f"crash_dir = {b}/crash",
            f"mon_data = {self.data}/mon-$id",
            f"osd_data = {self.data}/osd-$id",
            f"mgr_data = {self.data}/mgr-$id",
            f"mds_data = {self.data}/mds-$id",
            # One OSD on memstore; pools of one copy on it.
            "osd_objectstore = memstore",
            "memstore_device_bytes = 1073741824",
            "osd_pool_default_size = 1", "osd_pool_default_min_size = 1",
            "mon_allow_pool_size_one = true",
            "osd_pool_default_pg_num = 8", "osd_pool_default_pgp_num = 8",
            "osd_pool_default_pg_autoscale_mode = off",
            "osd_crush_chooseleaf_type = 0",
            "mon_warn_on_pool_no_redundancy = false",
            "auth_allow_insecure_global_id_reclaim = false",
            f"# (fs settings, not options: session_timeout {session_timeout}, "
            f"session_autoclose {self.evict_after})",
            "[mon]", f"public_addr = {self.server_addr}", "keyring = $mon_data/keyring",
            "mgr_initial_modules = iostat",
            "[osd]", f"public_addr = {self.server_addr}", f"cluster_addr = {self.server_addr}",
            "keyring = $osd_data/keyring",
            "[mgr]", f"public_addr = {self.server_addr}", "keyring = $mgr_data/keyring",
            "[mds]", f"public_addr = {self.server_addr}", "keyring = $mds_data/keyring",
            "mds_cache_memory_limit = 134217728",
            *(f"{k} = {v}" for k, v in MDS_OPTIONS.items()),
            "[client]", *(f"{k} = {v}" for k, v in CLIENT_OPTIONS.items()),
        ]
        return "\n".join(lines) + "\n"

    def _start_servers(self) -> None:
        if self._pid("mon", MON) and self._pid("osd", "0") and self._fs_exists():
            # A working cluster: keep it; restart a manager or MDS that died (their state
            # is in RADOS).
            if not self._pid("mgr", MGR):
                self._daemon("mgr", MGR)
            if not self._pid("mds", MDS):
                self._daemon("mds", MDS)
        else:
            # No usable cluster (never made, or its OSD's memory is gone): a fresh one.
            for h in self.hosts:
                umount_lazy(h.mount)
            self._stop_servers()
            shutil.rmtree(self.data, ignore_errors=True)
            self.data.mkdir()
            self._bootstrap()
        self._fs_settings()
        self._wait_mds_active(60)

    def _bootstrap(self) -> None:
        fsid = str(uuid.uuid4())
        self.conf.write_text(self._conf_text(fsid))
        self._save(fsid=fsid)
        c = ["-c", str(self.conf)]
        b = self.base
        mon_key, admin_key = self.data / "mon.keyring", b / "client.admin.keyring"
        run(["ceph-authtool", "--create-keyring", str(mon_key), "--gen-key", "-n", "mon.",
             "--cap", "mon", "allow *"])
        run(["ceph-authtool", "--create-keyring", str(admin_key), "--gen-key", "-n",
             "client.admin", "--cap", "mon", "allow *", "--cap", "osd", "allow *", "--cap",
             "mds", "allow *", "--cap", "mgr", "allow *"])
        run(["ceph-authtool", str(mon_key), "--import-keyring", str(admin_key)])
        monmap = self.data / "monmap"
        a = self.server_addr
        run(["monmaptool", "--create", "--addv", MON, f"[v2:{a}:3300,v1:{a}:6789]",
             "--fsid", fsid, str(monmap)])
        run(["ceph-mon", *c, "--mkfs", "-i", MON, "--monmap", str(monmap), "--keyring",
             str(mon_key)])
        mon_key.unlink()  # the monitor keeps its own copy in its data directory
        self._daemon("mon", MON)
        deadline = time.monotonic() + 30
        while self.ceph("mon", "stat", check=False, timeout=15).returncode != 0:
            if time.monotonic() > deadline:
                raise HostsError(f"ceph-mon did not answer within 30 s; see {b}/log/mon.a.log")
            time.sleep(0.2)
        # The OSD: registered, formatted (memstore: a few files), its key, started.
        osd_uuid = str(uuid.uuid4())
        osd_id = self.ceph("osd", "new", osd_uuid).stdout.strip()
        if osd_id != "0":
            raise HostsError(f"expected osd.0, the monitor made osd.{osd_id}")
        osd_dir = self.data / "osd-0"
        osd_dir.mkdir()
        run(["ceph-osd", *c, "-i", "0", "--mkfs", "--no-mon-config", "--osd-uuid", osd_uuid,
             "--mkkey"], timeout=120)
        self.ceph("auth", "add", "osd.0", "osd", "allow *", "mon", "allow profile osd", "mgr",
                  "allow profile osd", "-i", str(osd_dir / "keyring"))
        self._daemon("osd", "0")
        for kind, name, caps in (
                ("mgr", MGR, ["mon", "allow profile mgr", "osd", "allow *", "mds", "allow *"]),
                ("mds", MDS, ["mon", "allow profile mds", "mgr", "allow profile mds", "mds",
                              "allow *", "osd", "allow *"])):
            d = self.data / f"{kind}-{name}"
            d.mkdir()
            self.ceph("auth", "get-or-create", f"{kind}.{name}", *caps, "-o",
                      str(d / "keyring"))
            self._daemon(kind, name)
        self.ceph("osd", "pool", "create", f"{FS_NAME}_meta", "8")
        self.ceph("osd", "pool", "create", f"{FS_NAME}_data", "8")
        self.ceph("fs", "new", FS_NAME, f"{FS_NAME}_meta", f"{FS_NAME}_data")
        # The hosts' identity: read-write on this file system only.
        self.ceph("fs", "authorize", FS_NAME, f"client.{CLIENT}", "/", "rw", "-o",
                  str(b / f"client.{CLIENT}.keyring"))

    def _daemon(self, kind: str, name: str) -> None:
        """Start ceph-KIND -i NAME in host 0's namespace (it daemonizes itself)."""
        run(self.in_ns(self.hosts[0], f"ceph-{kind}", "-c", str(self.conf), "-i", name),
            timeout=120)
        deadline = time.monotonic() + 30
        while not self._pid(kind, name):
            if time.monotonic() > deadline:
                raise HostsError(f"ceph-{kind} {name} did not start; see "
                                 f"{self.log_dir}/{kind}.{name}.log")
            time.sleep(0.05)

    def _pid(self, kind: str, name: str) -> int | None:
        """The running daemon's pid, from its pid file (None when it is not running)."""
        try:
            pid = int((self.run_dir / f"{kind}.{name}.pid").read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if self._tag() in cmdline(pid) else None

    def _fs_exists(self) -> bool:
        return self.ceph("fs", "get", FS_NAME, check=False, timeout=20).returncode == 0

    def _fs_settings(self) -> None:
        """How long a silent client keeps its session (and locks): see the README."""
        self.ceph("fs", "set", FS_NAME, "session_timeout", str(min(60, self.evict_after)))
        self.ceph("fs", "set", FS_NAME, "session_autoclose", str(self.evict_after))

    def _mds_states(self) -> dict[int, str]:
        """The file system's MDS daemons (per the monitor): gid -> state."""
        fs = self.ceph_json("fs", "get", FS_NAME)
        return {int(i["gid"]): str(i.get("state")) for i in fs["mdsmap"]["info"].values()}

    def _active_mds(self) -> list[int]:
        return [g for g, st in self._mds_states().items() if st == "up:active"]

    def _wait_mds_active(self, timeout: float, not_gid: int | None = None) -> None:
        """Until an MDS (other than `not_gid`) is active."""
        deadline = time.monotonic() + timeout
        while True:
            states = self._mds_states()
            if any(st == "up:active" and g != not_gid for g, st in states.items()):
                return
            if time.monotonic() > deadline:
                raise HostsError(f"no active MDS within {timeout:.0f} s ({states}); "
                                 f"see {self.log_dir}/mds.{MDS}.log")
            time.sleep(0.2)

    # ------------------------------------------------------------ client mounts
    def _fuse_files(self, h: Host, gen: int | None = None) -> dict[str, Path]:
        """pid file, admin socket and log of host h's ceph-fuse (generation `gen`: a
        remount gets new ones, the old client may still serve open descriptions)."""
        if gen is None:
            gen = int(self._state().get("fuse_gen", {}).get(h.name, 0))
        stem = f"fuse-{h.name}" + (f".{gen}" if gen else "")
        return {"pid": self.run_dir / f"{stem}.pid", "asok": self.run_dir / f"{stem}.asok",
                "log": self.log_dir / f"{stem}.log"}

    def _mount_command(self, h: Host) -> list[str]:
        f = self._fuse_files(h)
        return ["ceph-fuse", "-c", str(self.conf), "--id", CLIENT, "--pid-file", str(f["pid"]),
                "--admin-socket", str(f["asok"]), "--log-file", str(f["log"]),
                "--client_metadata", f"vfs_lockd_host={h.name}", str(h.mount)]

    def live(self, h: Host) -> bool:
        # In a child with a deadline: on a cut-off host, statfs waits for the MDS, and a
        # FUSE request that ceph-fuse has taken cannot be killed, so the child is left
        # behind (it ends when ceph-fuse answers, or is killed with it by teardown).
        p = subprocess.Popen(["stat", "-f", str(h.mount)], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
        try:
            rc = p.wait(5)
        except subprocess.TimeoutExpired:
            p.kill()
            return False
        return rc == 0 and is_mount(h.mount)

    def client_status(self, h: Host, timeout: float = 5.0) -> dict:
        """What host h's ceph-fuse says of itself (admin socket `status`): its client id,
        address, whether it knows it is blocklisted. {} when it does not answer."""
        try:
            r = run(["ceph", "-c", str(self.conf), "--admin-daemon",
                     str(self._fuse_files(h)["asok"]), "status"], check=False, timeout=timeout)
            return json.loads(r.stdout) if r.returncode == 0 else {}
        except (subprocess.TimeoutExpired, ValueError):
            return {}

    def blocklisted(self, h: Host) -> bool:
        """Is host h's client on the OSD blocklist (evicted by the MDS)? Asks the client
        (it knows once it has seen the new OSD map) and the monitor."""
        cs = self.client_status(h)
        if cs.get("blocklisted"):
            return True
        addr = cs.get("addr_str", "")
        if not addr:
            return False
        out = self.ceph("osd", "blocklist", "ls", check=False, timeout=20).stdout
        return any(line.split(" ", 1)[0] == addr for line in out.splitlines())

    def heal(self, index: int, remount: bool = True, timeout: float = 30.0) -> str:
        """Bring host `index`'s link back. If the MDS evicted its client meanwhile, Ceph
        never lets that client back: with `remount`, mount the file system again (a new
        ceph-fuse; the old one keeps answering EIO on the descriptions still open on it,
        which is how vfs-lockd learns of the loss). Returns "reconnected" (the MDS had
        kept the session, and with it the host's locks), "remounted" or "blocklisted"
        (evicted, not remounted)."""
        super().heal(index)
        if index == 0:
            return "reconnected"
        h = self.hosts[index]
        cid = self.client_status(h).get("id")
        deadline = time.monotonic() + timeout
        while True:
            if self.blocklisted(h):
                if not remount:
                    return "blocklisted"
                self.remount(h)
                return "remounted"
            # The MDS's word, not the client's: a session it still has is not evicted,
            # and once the client has renewed it, it is open.
            if cid is not None and self.mds_sessions().get(cid) == "open":
                return "reconnected"
            if time.monotonic() > deadline:
                raise HostsError(f"{h.name}'s client neither reconnected nor was found "
                                 f"blocklisted within {timeout:.0f} s")
            time.sleep(0.2)

    def mds_sessions(self) -> dict[int, str]:
        """The MDS's client sessions: client id -> state (open, stale, ...)."""
        try:
            out = self.ceph_json("tell", f"mds.{MDS}", "session", "ls", timeout=20)
        except (HostsError, subprocess.TimeoutExpired, ValueError):
            return {}
        return {int(x["id"]): str(x.get("state")) for x in out if isinstance(x, dict)}

    def _client_sessions(self, h: Host) -> list[str]:
        """Host h's client's sessions with MDSs, as the client sees them."""
        try:
            r = run(["ceph", "-c", str(self.conf), "--admin-daemon",
                     str(self._fuse_files(h)["asok"]), "mds_sessions"], check=False,
                    timeout=5)
            return [s.get("state", "?") for s in json.loads(r.stdout).get("sessions", [])]
        except (subprocess.TimeoutExpired, ValueError, AttributeError):
            return []

    def remount(self, h: Host) -> None:
        """A new ceph-fuse for host h (detaching the old mount, whose client goes away
        once nothing holds it open)."""
        umount_lazy(h.mount)
        st = self._state()
        gens = st.get("fuse_gen", {})
        gens[h.name] = int(gens.get(h.name, 0)) + 1
        self._save(fuse_gen=gens)
        self.mount(h)

    def restart_mds(self, timeout: float = 120.0) -> None:
        """kill -9 the MDS and start it again; returns when the new one is active (it
        replays its journal, and the clients reconnect and resend their locks)."""
        old = self._active_mds()
        pid = self._pid("mds", MDS)
        if pid:
            kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
        # The monitor marks the dead MDS failed once the new one starts with its name.
        self._daemon("mds", MDS)
        self._wait_mds_active(timeout, not_gid=old[0] if old else None)

    # ------------------------------------------------------------ teardown, status
    def _stop_servers(self) -> None:
        """Stop every Ceph daemon and client of this cluster (TERM, then KILL)."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            pids = [int(p) for p in self.our_pids()
                    if os.path.basename(cmdline(p).split(b"\0")[0]).startswith(b"ceph-")]
            for pid in pids:
                kill(pid, sig)
            deadline = time.monotonic() + 5
            while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
                time.sleep(0.05)

    def status(self) -> dict:
        st = super().status()
        st.update(fs=FS_NAME, fsid=self._state().get("fsid"), evict_after=self.evict_after,
                  daemons={f"{k}.{n}": self._pid(k, n) for k, n in
                           (("mon", MON), ("mgr", MGR), ("osd", "0"), ("mds", MDS))})
        for hs, h in zip(st["hosts"], self.hosts, strict=True):
            cs = self.client_status(h)
            hs["client"] = cs.get("inst_str", "")
            hs["sessions"] = self._client_sessions(h)
        return st

