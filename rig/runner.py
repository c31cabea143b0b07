"""The rig's orchestration: one central daemon, N guest mounts, worker processes, faults,
teardown, and the analysis of what the workers logged.

Layout of a run (a temp dir, removed at the end unless kept):
  WORK/share/            the shared directory (unless --share)
  WORK/mnt/gI            guest I's mount of the share
  WORK/logs/             daemon, mount and worker logs (kept on the host: a dead mount
                         must not take the evidence with it)
  WORK/lockd.sock, WORK/journal.sqlite
The workers' files live in SHARE/.vfs-lockd-rig-PID/ so that a user's --share is not
touched outside that directory.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import platform
import random
import shutil
import signal
import sqlite3
import struct
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from rig import checks, worker
from rig.checks import Section

# `vfs-lockd` without depending on the console script being on PATH.
VFS_LOCKD = [sys.executable, "-c", "import sys; from lockd.cli import main; sys.exit(main())"]
PKG_ROOT = str(Path(__file__).resolve().parent.parent)
# The same with the engine's lock path broken from outside (rig/faults.py).
FAULTY_VFS_LOCKD = [sys.executable, "-m", "rig.faults", "grant-everything"]

# The prober: one process of guest 0 that holds a write lock across each daemon kill, so
# the rig can ask the host kernel whether that lock survived (a deterministic lost-lock
# detector, independent of the daemon's own bookkeeping).
PROBER = r"""
import errno, fcntl, os, struct, sys
fd = os.open(sys.argv[1], os.O_RDWR)
lk = lambda t: struct.pack("hhqqi4x", t, 0, 0, 1, 0)
try:
    fcntl.fcntl(fd, fcntl.F_SETLKW, lk(fcntl.F_WRLCK)); print("locked 0", flush=True)
except OSError as e:
    print(f"locked {e.errno}", flush=True)
sys.stdin.readline()
try:
    fcntl.fcntl(fd, fcntl.F_SETLK, lk(fcntl.F_UNLCK)); print("unlocked 0", flush=True)
except OSError as e:
    print(f"unlocked {e.errno}", flush=True)
"""
PROBE_FILE = "probe.dat"

# Blocking lock syscalls by architecture, to find workers blocked in a wait
# (/proc/PID/syscall): (fcntl nr, flock nr).
_SYSCALLS = {"x86_64": (72, 73), "aarch64": (25, 32), "riscv64": (25, 32)}
F_SETLKW, F_OFD_SETLKW, LOCK_NB = 7, 38, 4


@dataclass
class RigConfig:
    guests: int = 3
    procs: int = 2
    seconds: float = 30.0
    host_procs: int = 2
    share: str | None = None
    workloads: tuple[str, ...] = worker.WORKLOADS
    kill_lockd_every: float = 0.0
    kill_guest_every: float = 0.0
    signal_every: float = 0.2
    unsafe_no_locks: bool = False
    skip_host_lock: bool = False
    vm_guests: int = 0  # QEMU guests on `vfs-lockd virtiofs` (rig/vm.py)
    cache: str = "auto"
    threads: int = 4
    seed: int | None = None
    keep: bool = False
    hosts: int = 1  # > 1: cluster hosts (rig/cluster.py), guests spread over them
    cluster: str = "gluster"  # their file system: "gluster" (rig/hosts.py), "ceph" (rig/ceph.py)
    journal_dir: str | None = None  # where the daemon's journal lives (default: work dir)


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log: Path


@dataclass
class WorkerProc(Proc):
    guest: str = ""  # "" for a host worker
    slot: int = 0


@dataclass
class Fault:
    kind: str  # "kill-lockd" | "kill-guest" | "lockd-crash" | "guest-crash"
    target: str
    t_ns: int  # when the process was killed
    restart_ns: int = 0
    ready_ns: int = 0
    first_lock_ns: int = 0
    probe: dict = field(default_factory=dict)


class RigError(Exception):
    pass


class Stats:
    """Everything read back from the workers' logs, accumulated incrementally."""

    def __init__(self) -> None:
        self.ops: Counter[str] = Counter()
        self.latencies: list[tuple[int, int, str, str]] = []  # (t, lat_ns, workload, worker)
        self.sections: list[Section] = []
        self.deadlocks = 0
        self.eintr = 0
        self.mount_gone = 0
        self.lost_eio: list[str] = []
        self.violations: list[str] = []
        self.flock_markers: list[tuple[int, str, str, str]] = []  # (t, holder, msg, seer)
        self.errors: Counter[str] = Counter()
        self.error_samples: list[str] = []
        self.counter_intents = 0
        self.counter_done = 0
        self.sqlite_intent: dict[str, set[int]] = defaultdict(set)
        self.sqlite_done: dict[str, set[int]] = defaultdict(set)

    def add(self, wid: str, r: list) -> None:
        kind = r[0]
        if kind == "L":
            self.latencies.append((r[1], r[2], r[3], wid))
        elif kind == "O":
            self.ops[r[2]] += 1
        elif kind == "S":
            self.sections.append(Section(wid, r[1], r[2], r[3], r[4], r[5], r[6], r[7]))
        elif kind == "CI":
            self.counter_intents += 1
        elif kind == "CD":
            self.counter_done += 1
        elif kind == "QI":
            self.sqlite_intent[wid].add(r[1])
        elif kind == "QD":
            self.sqlite_done[wid].add(r[1])
        elif kind == "D":
            self.deadlocks += 1
        elif kind == "X":
            self.eintr += 1
        elif kind == "LOST":
            self.lost_eio.append(f"{wid}: {r[3]}")
        elif kind == "V":
            self.violations.append(f"{wid} ({r[2]}): {r[3]}")
        elif kind == "FV":
            self.flock_markers.append((r[1], r[2], r[3], wid))
        elif kind == "E" and r[2] == "mount":
            self.mount_gone += 1  # expected after a guest kill: the worker leaves
        elif kind == "E":
            self.errors[f"{r[2]}:{r[3]}"] += 1
            if len(self.error_samples) < 20:
                self.error_samples.append(f"{wid} ({r[2]}): {r[3]} {r[4]}")


class LogReader:
    """Reads one worker's log as it grows; a partial last line waits for its end."""

    def __init__(self, wid: str, path: Path) -> None:
        self.wid, self.path, self.offset, self.partial = wid, path, 0, b""

    def poll(self, stats: Stats) -> None:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return
        self.offset += len(data)
        lines = (self.partial + data).split(b"\n")
        self.partial = lines.pop()
        for line in lines:
            if line:
                try:
                    stats.add(self.wid, json.loads(line))
                except (ValueError, IndexError):
                    stats.errors["rig:bad-record"] += 1


def _env(cfg: RigConfig) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = PKG_ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def force_unmount(path: Path) -> None:
    """Detach whatever is mounted at path (a killed server leaves a stale mount)."""
    for _ in range(3):
        r = subprocess.run(["umount", "-l", str(path)], capture_output=True)
        if r.returncode != 0:
            return


def mounts_under(path: Path) -> list[str]:
    """Mount points at or below path (from /proc/self/mountinfo)."""
    prefix = str(path.resolve())
    out = []
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                mp = line.split()[4].replace("\\040", " ")
                if mp == prefix or mp.startswith(prefix + "/"):
                    out.append(mp)
    except OSError:
        pass
    return out


def blocked_in_lock_wait(pid: int, nrs: tuple[int, int] | None) -> bool:
    """Is the process sleeping in F_SETLKW/F_OFD_SETLKW or a blocking flock?"""
    if nrs is None:
        return False
    try:
        with open(f"/proc/{pid}/syscall") as f:
            parts = f.read().split()
    except OSError:
        return False
    if len(parts) < 3 or not parts[0].isdigit():
        return False
    nr, arg1 = int(parts[0]), int(parts[2], 16)
    if nr == nrs[0]:
        return arg1 in (F_SETLKW, F_OFD_SETLKW)
    return nr == nrs[1] and not arg1 & LOCK_NB


class Rig:
    def __init__(self, cfg: RigConfig, progress: Callable[[Rig, float], None] | None = None
                 ) -> None:
        if cfg.guests < 1 and cfg.host_procs < 1 and cfg.vm_guests < 1:
            raise RigError("nothing to run: no guests and no host workers")
        for wl in cfg.workloads:
            if wl not in worker.WORKLOADS:
                raise RigError(f"unknown workload {wl!r} (choose from {', '.join(worker.WORKLOADS)})")
        self.cfg = cfg
        self.progress = progress
        self.rng = random.Random(cfg.seed)
        self.env = _env(cfg)
        self.vfs_lockd = FAULTY_VFS_LOCKD if cfg.skip_host_lock else VFS_LOCKD
        self.work = Path(tempfile.mkdtemp(prefix="vfs-lockd-rig-"))
        self.logs = self.work / "logs"
        self.logs.mkdir()
        self.cluster = None  # rig.cluster.ClusterHosts when cfg.hosts > 1
        self.host_daemons: dict[int, tuple[Proc, str]] = {}  # host index -> (daemon, socket)
        if cfg.hosts > 1:
            self._setup_hosts()
        self.share = (self.cluster.hosts[0].mount if self.cluster else
                      Path(cfg.share).resolve() if cfg.share else self.work / "share")
        self.share.mkdir(exist_ok=True)
        self.sub = f".vfs-lockd-rig-{os.getpid()}"
        self.rigdir = self.share / self.sub
        self.sock = str(self.work / "lockd.sock")
        self.journal = str(Path(cfg.journal_dir or self.work) / "journal.sqlite")
        self.daemon: Proc | None = None
        self.daemon_gen = 0
        self.mounts: dict[str, Proc] = {}
        self.workers: list[WorkerProc] = []
        self.readers: list[LogReader] = []
        self.who: dict[str, tuple[str, int]] = {}  # guest worker -> (guest, pid)
        self.killed_at: dict[str, int] = {}  # worker -> when its guest was killed
        self.faults: list[Fault] = []
        self.snapshots: list[tuple[int, int, dict]] = []  # (kill_ns, done_ns, lock table)
        self.daemon_lost: dict[int, int] = {}  # daemon incarnation -> lost locks it saw
        self.reaped: set[str] = set()  # workers whose exit was handled
        self.signals_sent = 0
        self.worker_restarts = 0
        self.rig_errors: list[str] = []
        self.stats = Stats()
        self.t_start = self.t_end = 0
        self.wnum = 0
        self.nrs = _SYSCALLS.get(platform.machine())
        self.prober: subprocess.Popen | None = None
        self.vms = None  # RigVms when cfg.vm_guests

    # ------------------------------------------------------------------ setup
    def prepare_share(self) -> None:
        self.rigdir.mkdir()
        (self.rigdir / worker.COUNTER).write_bytes(worker.counter_bytes(0))
        (self.rigdir / worker.RANGES).write_bytes(worker.initial_ranges())
        (self.rigdir / worker.FLOCK).write_bytes(worker.MARKER_FREE)
        (self.rigdir / PROBE_FILE).write_bytes(b"\0" * 16)
        db = sqlite3.connect(self.rigdir / worker.SQLITE)
        db.execute("PRAGMA journal_mode=DELETE")  # rollback journal, not WAL
        db.execute("CREATE TABLE rows(worker TEXT NOT NULL, seq INTEGER NOT NULL, "
                   "guest TEXT, PRIMARY KEY(worker, seq))")
        db.commit()
        db.close()

    def _popen(self, name: str, args: list[str], cwd: str | None = None) -> Proc:
        log = self.logs / f"{name}.log"
        with open(log, "ab") as logf:
            # Own session: a Ctrl-C reaches the rig only, which then tears down in order.
            p = subprocess.Popen(args, stdout=logf, stderr=subprocess.STDOUT, env=self.env,
                                 cwd=cwd or PKG_ROOT, start_new_session=True)
        return Proc(name, p, log)

    def _admin(self, type_name: str, timeout: float = 2.0) -> dict:
        from lockd.daemon import wire
        from lockd.daemon.client import AdminClient

        with AdminClient(self.sock, timeout=timeout) as admin:
            return admin.json(getattr(wire, type_name))

    def start_daemon(self) -> int:
        """Start `vfs-lockd serve`; returns when it answers status (monotonic ns)."""
        self.daemon_gen += 1
        self.daemon = self._popen(f"lockd.{self.daemon_gen}", [
            *self.vfs_lockd, "serve", "--socket", self.sock, "--journal", self.journal])
        deadline = time.monotonic() + 20
        while True:
            if self.daemon.popen.poll() is not None:
                raise RigError(f"vfs-lockd serve exited ({self.daemon.popen.returncode}):\n"
                               + self.daemon.log.read_text(errors="replace")[-2000:])
            try:
                self._admin("T_STATUS", timeout=1.0)
                return time.monotonic_ns()
            except Exception:
                if time.monotonic() > deadline:
                    raise RigError("vfs-lockd serve did not answer within 20 s") from None
                time.sleep(0.01)

    def _mountpoint(self, guest: str) -> Path:
        return self.work / "mnt" / guest

    def start_mount(self, guest: str) -> int:
        mp = self._mountpoint(guest)
        mp.mkdir(parents=True, exist_ok=True)
        gen = sum(1 for f in self.faults if f.target == guest) + 1
        src, sock = self._guest_host(guest)
        proc = self._popen(f"mount.{guest}.{gen}", [
            *self.vfs_lockd, "mount", str(src), str(mp), "--guest", guest,
            "--lockd", sock, "--cache", self.cfg.cache, "--threads", str(self.cfg.threads)])
        self.mounts[guest] = proc
        deadline = time.monotonic() + 20
        while True:
            try:
                if os.path.ismount(mp) and os.statvfs(mp) and (mp / self.sub).exists():
                    return time.monotonic_ns()
            except OSError:
                pass
            if proc.popen.poll() is not None or time.monotonic() > deadline:
                raise RigError(f"mount of guest {guest} did not come up:\n"
                               + proc.log.read_text(errors="replace")[-2000:])
            time.sleep(0.02)

    def start_worker(self, guest: str, slot: int) -> WorkerProc:
        gen = sum(1 for w in self.workers if w.guest == guest and w.slot == slot)
        wid = f"{guest or 'host'}.w{slot}.r{gen}"
        self.wnum += 1
        view = (self._mountpoint(guest) if guest else self.share) / self.sub
        log = self.logs / f"w-{wid}.jsonl"
        args = [sys.executable, "-m", "rig.worker", "--id", wid, "--num", str(self.wnum),
                "--dir", str(view), "--log", str(log), "--until", str(self.t_end),
                "--workloads", ",".join(self.cfg.workloads),
                "--seed", str(self.rng.randrange(1 << 30))]
        if not guest:
            args.append("--host")
        if self.cfg.unsafe_no_locks:
            args.append("--unsafe-no-locks")
        with open(self.logs / f"w-{wid}.err", "ab") as errf:
            p = subprocess.Popen(args, stdout=errf, stderr=subprocess.STDOUT, env=self.env,
                                 cwd=str(view), start_new_session=True)
        w = WorkerProc(wid, p, log, guest=guest, slot=slot)
        self.workers.append(w)
        self.readers.append(LogReader(wid, log))
        if guest:
            self.who[wid] = (guest, p.pid)
        return w

    # ------------------------------------------------------------------ hosts (Part 9)
    def _setup_hosts(self) -> None:
        """Cluster hosts (GlusterFS or CephFS): the share is host 0's mount of the cluster
        file system; host I > 0 gets its own `vfs-lockd serve` on its own mount, guest gK
        lives on host K mod N. The faults (--kill-lockd-every) hit host 0's daemon."""
        from rig.cluster import HostsError, cluster_class

        kind = self.cfg.cluster
        try:
            cls = cluster_class(kind)
            if self.cfg.share:
                raise RigError(f"--hosts uses a {cls.KIND} as the share: no --share")
            # Own names per file system, so a GlusterFS and a CephFS rig can run together.
            net = {"gluster": ("vlr", "10.215"), "ceph": ("vlrc", "10.219")}[kind]
            self.cluster = cls(f"/var/tmp/vfs-lockd-rig-{kind}-{os.getpid()}", self.cfg.hosts,
                               prefix=net[0], subnet=net[1]).setup()
        except HostsError as exc:
            raise RigError(f"{kind} hosts: {exc}") from exc

    def _start_host_daemons(self) -> None:
        from rig.hosts import lockd_answers

        for i in range(1, self.cfg.hosts):
            sock = str(self.work / f"lockd-host{i}.sock")
            p = self._popen(f"lockd.host{i}", [*self.vfs_lockd, "serve", "--socket", sock,
                                               "--journal", str(self.work / f"host{i}.sqlite")])
            self.host_daemons[i] = (p, sock)
            deadline = time.monotonic() + 20
            while not lockd_answers(Path(sock)):
                if p.popen.poll() is not None or time.monotonic() > deadline:
                    raise RigError(f"vfs-lockd serve of host {i} did not come up:\n"
                                   + p.log.read_text(errors="replace")[-2000:])
                time.sleep(0.05)

    def _guest_host(self, guest: str) -> tuple[Path, str]:
        """(share, daemon socket) of the host a guest lives on."""
        i = int(guest[1:]) % self.cfg.hosts if self.cluster else 0
        if i == 0:
            return self.share, self.sock
        return self.cluster.hosts[i].mount, self.host_daemons[i][1]

    def _teardown_hosts(self) -> None:
        for p, _sock in self.host_daemons.values():
            if p.popen.poll() is None:
                p.popen.send_signal(signal.SIGTERM)
                try:
                    p.popen.wait(10)
                except subprocess.TimeoutExpired:
                    p.popen.kill()
                    p.popen.wait()
        self.host_daemons.clear()
        if self.cluster is not None:
            for left in self.cluster.teardown():
                self.rig_errors.append(f"{self.cluster.KIND} teardown: {left}")
            self.cluster = None

    def guests(self) -> list[str]:
        return [f"g{i}" for i in range(self.cfg.guests)]

    def live_workers(self, guest: str | None = None) -> list[WorkerProc]:
        return [w for w in self.workers if w.popen.poll() is None
                and (guest is None or w.guest == guest)]

    # ------------------------------------------------------------------ faults
    def kill_lockd(self) -> None:
        assert self.daemon is not None
        probe = self._probe_start()
        f = Fault("kill-lockd", "lockd", 0)
        self.daemon.popen.kill()
        self.daemon.popen.wait()
        f.t_ns = time.monotonic_ns()
        if probe:
            f.probe["taken_while_down"] = self._host_probe()
        self.faults.append(f)
        f.restart_ns = time.monotonic_ns()
        f.ready_ns = self.start_daemon()
        if probe:
            f.probe["taken_after_restart"] = self._host_probe()
        try:
            snap = self._admin("T_LIST")
            self.snapshots.append((f.t_ns, time.monotonic_ns(), snap))
            self._note_daemon_lost(len(snap.get("lost", [])))
        except Exception as exc:
            self.rig_errors.append(f"lock table after restart: {exc}")
        if probe:
            f.probe["prober_unlock_errno"] = self._probe_finish()

    def _probe_start(self) -> bool:
        """Have guest 0's prober take a write lock to hold across the kill."""
        if not self.cfg.guests or self.cfg.unsafe_no_locks:
            return False
        path = self._mountpoint("g0") / self.sub / PROBE_FILE
        self.prober = subprocess.Popen(
            [sys.executable, "-c", PROBER, str(path)], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=self.env,
            start_new_session=True)
        line = self._probe_line(5.0)
        if line != "locked 0":
            self.rig_errors.append(f"prober did not get its lock: {line!r}")
            self._probe_kill()
            return False
        return True

    def _probe_line(self, timeout: float) -> str | None:
        import select

        assert self.prober is not None and self.prober.stdout is not None
        r, _, _ = select.select([self.prober.stdout], [], [], timeout)
        return self.prober.stdout.readline().strip() if r else None

    def _probe_finish(self) -> int | None:
        assert self.prober is not None and self.prober.stdin is not None
        try:
            self.prober.stdin.write("go\n")
            self.prober.stdin.flush()
            line = self._probe_line(15.0)
        except OSError:
            line = None
        self._probe_kill()
        if line and line.startswith("unlocked "):
            return int(line.split()[1])
        self.rig_errors.append(f"prober did not unlock: {line!r}")
        return None

    def _probe_kill(self) -> None:
        p, self.prober = self.prober, None
        if p is None:
            return
        if p.poll() is None:
            p.kill()
        p.wait()
        for s in (p.stdin, p.stdout):
            try:
                if s:
                    s.close()
            except OSError:
                pass

    def _host_probe(self) -> bool:
        """Can a host process take the range the prober holds? True means the guest's
        lock is not protected on the host (lost, or the daemon-down window is open)."""
        fd = os.open(self.rigdir / PROBE_FILE, os.O_RDWR)
        try:
            fcntl.fcntl(fd, fcntl.F_OFD_SETLK, struct.pack("hhqqi4x", fcntl.F_WRLCK, 0, 0, 1, 0))
            return True
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            return False
        finally:
            os.close(fd)  # drops the probe lock if it was taken

    def kill_guest(self, guest: str, kind: str = "kill-guest") -> None:
        proc = self.mounts[guest]
        # Its workers, taken before the kill: one that sees ENOTCONN and leaves at once
        # is a victim of this fault, not a worker that died by itself.
        victims = self.live_workers(guest)
        if proc.popen.poll() is None:
            proc.popen.kill()
        proc.popen.wait()
        f = Fault(kind, guest, time.monotonic_ns())
        self.faults.append(f)
        for w in [w for w in self.workers if w.guest == guest]:
            self.killed_at.setdefault(w.name, f.t_ns)
        # Its workers see ENOTCONN and leave by themselves; stragglers are killed.
        deadline = time.monotonic() + 3
        while any(w.popen.poll() is None for w in victims) and time.monotonic() < deadline:
            time.sleep(0.02)
        for w in victims:
            if w.popen.poll() is None:
                w.popen.kill()
            w.popen.wait()
            self.reaped.add(w.name)
        force_unmount(self._mountpoint(guest))
        f.restart_ns = time.monotonic_ns()
        f.ready_ns = self.start_mount(guest)
        if time.monotonic_ns() < self.t_end - 500_000_000:
            for w in victims:
                self.start_worker(guest, w.slot)
                self.worker_restarts += 1

    def signal_waiters(self) -> None:
        for w in self.live_workers():
            if blocked_in_lock_wait(w.popen.pid, self.nrs):
                try:
                    os.kill(w.popen.pid, signal.SIGUSR1)
                    self.signals_sent += 1
                except ProcessLookupError:
                    pass

    def _check_children(self) -> None:
        """A process that died by itself is a finding (and is restarted so the run goes
        on); a worker leaving before the end is logged as an error."""
        if self.daemon is not None and self.daemon.popen.poll() is not None:
            rc = self.daemon.popen.returncode
            self.rig_errors.append(f"vfs-lockd serve died by itself (exit {rc})")
            f = Fault("lockd-crash", "lockd", time.monotonic_ns())
            self.faults.append(f)
            f.restart_ns = f.t_ns
            f.ready_ns = self.start_daemon()
        for guest, proc in list(self.mounts.items()):
            if proc.popen.poll() is not None:
                self.rig_errors.append(f"mount of {guest} died by itself "
                                       f"(exit {proc.popen.returncode})")
                self.kill_guest(guest, kind="guest-crash")
        now = time.monotonic_ns()
        for w in list(self.workers):
            rc = w.popen.poll()
            if rc is None or w.name in self.reaped:
                continue
            self.reaped.add(w.name)
            if rc != 0 and now < self.t_end:
                self.rig_errors.append(f"worker {w.name} exited with {rc} before the end")
                if now < self.t_end - 500_000_000:
                    self.start_worker(w.guest, w.slot)
                    self.worker_restarts += 1

    # ------------------------------------------------------------------ the run
    def poll_logs(self) -> None:
        for r in self.readers:
            r.poll(self.stats)

    def run(self) -> None:
        """Start everything, run for cfg.seconds with the faults, stop. Everything started
        is torn down whatever happens (see teardown)."""
        cfg = self.cfg
        try:
            self.prepare_share()
            self.start_daemon()
            self._start_host_daemons()
            for g in self.guests():
                self.start_mount(g)
            if cfg.vm_guests:
                from rig.vm import RigVms

                self.vms = RigVms(cfg.vm_guests, max(cfg.procs, 1), self.share, self.sub,
                                  self.logs, self.sock, cfg.workloads)
                try:
                    self.vms.start()
                except Exception as exc:  # VmError, a missing image, QEMU failing
                    raise RigError(f"VM guests did not start: {exc}") from exc
            self.t_start = time.monotonic_ns()
            self.t_end = self.t_start + int(cfg.seconds * 1e9)
            if self.vms is not None:
                self.vms.run_until(self.t_end)
            for g in self.guests():
                for j in range(cfg.procs):
                    self.start_worker(g, j)
            for j in range(cfg.host_procs):
                self.start_worker("", j)
            sec = 1_000_000_000
            next_lockd = self.t_start + int(cfg.kill_lockd_every * sec) if cfg.kill_lockd_every else 0
            next_guest = self.t_start + int(cfg.kill_guest_every * sec) if cfg.kill_guest_every else 0
            next_signal = self.t_start + int(cfg.signal_every * sec) if cfg.signal_every else 0
            next_poll = 0
            victim = 0
            last_fault_ok = self.t_end - sec  # leave a second to see the recovery
            while (now := time.monotonic_ns()) < self.t_end:
                if next_lockd and now >= next_lockd:
                    if now < last_fault_ok:
                        self.kill_lockd()
                    next_lockd = now + int(cfg.kill_lockd_every * sec)
                if next_guest and now >= next_guest and cfg.guests:
                    if now < last_fault_ok:
                        self.kill_guest(self.guests()[victim % cfg.guests])
                        victim += 1
                    next_guest = now + int(cfg.kill_guest_every * sec)
                if next_signal and now >= next_signal:
                    self.signal_waiters()
                    next_signal = now + int(cfg.signal_every * sec)
                if now >= next_poll:
                    self._check_children()
                    self.poll_logs()
                    if self.progress:
                        self.progress(self, (now - self.t_start) / 1e9)
                    next_poll = now + sec // 4
                time.sleep(0.02)
            self._finish_workers()
            if self.vms is not None:
                self.vms.join()
                self.vms.merge(self.stats)
            self._read_daemon_lost()
        finally:
            self.teardown()
        self.poll_logs()

    def _finish_workers(self) -> None:
        """Workers stop by themselves at the deadline; a waiter still queued then gets its
        lock as the others leave. Whoever is still there after 15 s is killed."""
        deadline = time.monotonic() + 15
        while self.live_workers() and time.monotonic() < deadline:
            self.poll_logs()
            time.sleep(0.05)
        for w in self.live_workers():
            self.rig_errors.append(f"worker {w.name} did not stop in time (killed)")
            w.popen.kill()
            w.popen.wait()

    def _read_daemon_lost(self) -> None:
        try:
            st = self._admin("T_STATUS")
            stats = st.get("stats", {})
            self._note_daemon_lost(max(int(stats.get("lost_locks", 0)),
                                       int(stats.get("lost", 0))))
        except Exception as exc:
            self.rig_errors.append(f"final status: {exc}")

    def _note_daemon_lost(self, n: int) -> None:
        # Counters restart with each daemon: keep the largest count seen per incarnation.
        self.daemon_lost[self.daemon_gen] = max(n, self.daemon_lost.get(self.daemon_gen, 0))

    def teardown(self) -> None:
        """Workers, prober, mounts (SIGTERM, then kill and lazy unmount), daemon. Never
        raises: it runs in finally blocks."""
        self._probe_kill()
        if self.vms is not None:  # QEMU and backends before the daemon they talk to
            self.vms.close()
        for w in self.workers:
            if w.popen.poll() is None:
                w.popen.kill()
        for w in self.workers:
            try:
                w.popen.wait(5)
            except subprocess.TimeoutExpired:
                self.rig_errors.append(f"worker {w.name} (pid {w.popen.pid}) did not die")
        for proc in self.mounts.values():
            if proc.popen.poll() is None:
                proc.popen.send_signal(signal.SIGTERM)
        for guest, proc in self.mounts.items():
            try:
                proc.popen.wait(10)
            except subprocess.TimeoutExpired:
                proc.popen.kill()
                try:
                    proc.popen.wait(5)
                except subprocess.TimeoutExpired:
                    pass
            force_unmount(self._mountpoint(guest))
        if self.daemon is not None and self.daemon.popen.poll() is None:
            self.daemon.popen.send_signal(signal.SIGTERM)
            try:
                self.daemon.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.daemon.popen.kill()
                self.daemon.popen.wait()

    def cleanup(self) -> None:
        """Remove the run's files (never while anything is still mounted there)."""
        self._teardown_hosts()
        if self.cfg.keep:
            return
        left = mounts_under(self.work)
        if left:
            self.rig_errors.append(f"not removing {self.work}: still mounted: {left}")
            return
        if self.cfg.share:
            shutil.rmtree(self.rigdir, ignore_errors=True)
        shutil.rmtree(self.work, ignore_errors=True)

    # ------------------------------------------------------------------ analysis
    def analyze(self) -> dict:
        st = self.stats
        sec = 1e9
        duration = max((min(time.monotonic_ns(), self.t_end) - self.t_start) / sec, 1e-9) \
            if self.t_start else 0.0
        violations = list(st.violations)
        checks_out: dict = {}

        # Critical sections: no two conflicting holders at once, in any file.
        pairs = checks.overlaps(st.sections)
        for a, b in pairs[:20]:
            violations.append(
                f"overlap on {a.file} ({a.kind}): {a.worker} {a.type} {a.lo}-{a.hi} "
                f"[{(a.t0 - self.t_start) / sec:.6f}, {(a.t1 - self.t_start) / sec:.6f}] and "
                f"{b.worker} {b.type} {b.lo}-{b.hi} [{(b.t0 - self.t_start) / sec:.6f}, "
                f"{(b.t1 - self.t_start) / sec:.6f}]")
        n_viol = len(st.violations) + len(pairs)
        checks_out["sections"] = len(st.sections)
        checks_out["overlaps"] = len(pairs)

        # flock markers: a marker of a holder killed with its guest is stale, not a breach.
        stale = 0
        for t, holder, msg, seer in st.flock_markers:
            if holder in self.killed_at and self.killed_at[holder] <= t:
                stale += 1
            else:
                n_viol += 1
                if len(violations) < 60:
                    violations.append(f"{seer} (flock): {msg}: {holder!r}")
        checks_out["flock_stale_markers"] = stale

        # counter: final value within [done, intents] (a write cut by a kill may or may
        # not have landed).
        if "counter" in self.cfg.workloads:
            try:
                value: int | None = int((self.rigdir / worker.COUNTER).read_bytes())
            except (OSError, ValueError):
                value = None
            ok = value is not None and st.counter_done <= value <= st.counter_intents
            checks_out["counter"] = {"value": value, "increments": st.counter_done,
                                     "ambiguous": st.counter_intents - st.counter_done,
                                     "ok": ok}
            if not ok:
                n_viol += 1
                violations.append(f"counter: final value {value}, but {st.counter_done} "
                                  f"increments were made "
                                  f"(+{st.counter_intents - st.counter_done} ambiguous)")

        if "sqlite" in self.cfg.workloads:
            checks_out["sqlite"] = sq = self._check_sqlite()
            if not sq["ok"]:
                n_viol += 1
                violations.append(f"sqlite: {sq['problem']}")

        # Lost locks: what the daemon says, what the workers were told (EIO), and what
        # the rig saw itself (the prober's range free on the host after a restart; guest
        # sections held across a restart missing from the new lock table).
        file_ids = {}
        for name in (worker.COUNTER, worker.RANGES, worker.FLOCK):
            try:
                s = os.stat(self.rigdir / name)
                file_ids[name] = (s.st_dev, s.st_ino)
            except OSError:
                pass
        forgotten = []
        for kill_ns, done_ns, snap in self.snapshots:
            forgotten += checks.forgotten_locks(st.sections, kill_ns, done_ns, snap, self.who,
                                                file_ids)
        probe_lost = sum(1 for f in self.faults if f.probe.get("taken_after_restart"))
        daemon_reported = sum(self.daemon_lost.values())
        eio = len(st.lost_eio) + sum(1 for f in self.faults
                                     if f.probe.get("prober_unlock_errno") == errno.EIO)
        silent = 0 if daemon_reported else probe_lost + len(forgotten)
        lost = max(daemon_reported, eio) + silent
        lost_detail = {"daemon_reported": daemon_reported, "eio_seen": eio,
                       "probe_free_after_restart": probe_lost,
                       "forgotten_sections": len(forgotten),
                       "window_open_while_down": sum(1 for f in self.faults
                                                     if f.probe.get("taken_while_down")),
                       "samples": st.lost_eio[:10] + [
                           f"{s.worker} {s.type} {s.file} {s.lo}-{s.hi} not in the lock "
                           "table after the restart" for s in forgotten[:10]]}

        # Latency: the guests' fcntl/flock acquisitions, i.e. what vfs-lockd serves (host
        # processes lock in their kernel; they are reported by origin, and count for the
        # longest wait). SQLite's BEGIN IMMEDIATE (its own polling busy handler) is
        # reported per workload only.
        fcntl_lats = [(lat, wid) for _, lat, wl, wid in st.latencies if wl != "sqlite"]
        lat_all = sorted(lat for lat, _ in fcntl_lats)
        lat_guest = sorted(lat for lat, wid in fcntl_lats if wid in self.who) or lat_all
        per_wl = {}
        for wl in self.cfg.workloads:
            vals = sorted(lat for _, lat, w, _ in st.latencies if w == wl)
            per_wl[wl] = {"operations": st.ops[wl], "locks": len(vals),
                          "latency_us": _pcts(vals)}
        by_origin = {
            origin: _pcts(sorted(lat for _, lat, wl, wid in st.latencies
                                 if wl != "sqlite" and (wid in self.who) == (origin == "guest")))
            for origin in ("guest", "host")}
        windows = [(f.t_ns, max(f.first_lock_ns, f.ready_ns)) for f in self._fault_recovery()]
        calm = sorted(lat for t, lat, wl, _ in st.latencies if wl != "sqlite"
                      and not any(a <= t and t - lat <= b for a, b in windows))
        ops = sum(st.ops.values())
        faults = [{
            "kind": f.kind, "target": f.target,
            "at": round((f.t_ns - self.t_start) / sec, 3),
            "recovery_s": round((f.first_lock_ns - f.restart_ns) / sec, 4)
            if f.first_lock_ns else None,
            "ready_s": round((f.ready_ns - f.restart_ns) / sec, 4),
            "outage_s": round((f.first_lock_ns - f.t_ns) / sec, 4) if f.first_lock_ns else None,
            **({"probe": f.probe} if f.probe else {}),
        } for f in self.faults]
        out = {
            "config": {k: (list(v) if isinstance(v, tuple) else v)
                       for k, v in vars(self.cfg).items()},
            "seconds": round(duration, 3),
            "operations": ops,
            "ops_per_s": round(ops / duration, 1) if duration else 0.0,
            "workloads": per_wl,
            "latency_us": _pcts(lat_guest),
            "latency_by_origin_us": by_origin,
            "max_wait_us": round(lat_all[-1] / 1000, 1) if lat_all else 0.0,
            "max_wait_no_fault_us": round(calm[-1] / 1000, 1) if calm else 0.0,
            "deadlocks": st.deadlocks,
            "violations": n_viol,
            "violation_samples": violations[:30],
            "lost_locks": lost,
            "lost_detail": lost_detail,
            "faults": faults,
            "signals_sent": self.signals_sent,
            "eintr_seen": st.eintr,
            "worker_restarts": self.worker_restarts,
            "workers_left_dead_mount": st.mount_gone,
            "errors": sum(st.errors.values()) + len(self.rig_errors),
            "error_kinds": dict(st.errors),
            "error_samples": self.rig_errors[:10] + st.error_samples[:10],
            "checks": checks_out,
            "workdir": str(self.work) if self.cfg.keep else None,
        }
        if self.vms is not None:
            out["vm_guests"] = self.vms.summary()
        # A rig error (a worker that hung, a server that died by itself) is a failure
        # too: a lock manager that stops granting is as broken as one that grants wrongly.
        out["exit_status"] = 1 if (n_viol or lost or self.rig_errors) else 0
        return out

    def _fault_recovery(self) -> list[Fault]:
        """First lock granted to a guest worker after each restart (for a guest kill: to
        that guest's workers)."""
        lats = sorted((t, wid) for t, _, wl, wid in self.stats.latencies)
        for f in self.faults:
            if f.first_lock_ns:
                continue
            for t, wid in lats:
                if t <= f.ready_ns:
                    continue
                g = self.who.get(wid, ("",))[0]
                if g and (f.target == "lockd" or g == f.target):
                    f.first_lock_ns = t
                    break
        return self.faults

    def _check_sqlite(self) -> dict:
        st = self.stats
        committed = sum(len(v) for v in st.sqlite_done.values())
        res: dict = {"commits": committed, "rows": None, "integrity": None, "ok": False}
        try:
            db = sqlite3.connect(f"file:{self.rigdir / worker.SQLITE}?mode=ro", uri=True)
            try:
                res["integrity"] = db.execute("PRAGMA integrity_check").fetchone()[0]
                rows: dict[str, set[int]] = defaultdict(set)
                for w, s in db.execute("SELECT worker, seq FROM rows"):
                    rows[w].add(s)
            finally:
                db.close()
        except sqlite3.DatabaseError as exc:
            res["problem"] = f"database unreadable: {exc}"
            return res
        res["rows"] = sum(len(v) for v in rows.values())
        missing = sum(len(st.sqlite_done[w] - rows.get(w, set())) for w in st.sqlite_done)
        phantom = sum(len(rows[w] - st.sqlite_intent.get(w, set())) for w in rows)
        res.update(missing=missing, phantom=phantom,
                   ambiguous=sum(len(st.sqlite_intent[w] - st.sqlite_done.get(w, set()))
                                 for w in st.sqlite_intent))
        if res["integrity"] != "ok":
            res["problem"] = f"integrity_check: {res['integrity']}"
        elif missing or phantom:
            res["problem"] = (f"{res['rows']} rows for {committed} commits: {missing} "
                              f"committed rows missing, {phantom} never committed")
        else:
            res["ok"] = True
        return res


def _pcts(sorted_ns: list[int]) -> dict:
    us = 1000.0
    return {"p50": round(checks.percentile(sorted_ns, 50) / us, 1),
            "p99": round(checks.percentile(sorted_ns, 99) / us, 1),
            "max": round((sorted_ns[-1] if sorted_ns else 0) / us, 1),
            "count": len(sorted_ns)}
