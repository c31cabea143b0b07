"""The rig's orchestration: one central daemon, N guest mounts, worker processes, the
run loop and teardown. The faults it injects are in rig/inject.py; the verdict on what
the run logged is rig/analysis.py (pure over the logs).

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

import os
import platform
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rig import analysis, inject, worker
from rig.analysis import Fault, LogReader, RunLog, SqliteFile, Stats  # noqa: F401

# `vfs-lockd` without depending on the console script being on PATH.
VFS_LOCKD = [sys.executable, "-c", "import sys; from lockd.cli import main; sys.exit(main())"]
PKG_ROOT = str(Path(__file__).resolve().parent.parent)
# The same with the engine's lock path broken from outside (rig/faults.py).
FAULTY_VFS_LOCKD = [sys.executable, "-m", "rig.faults", "grant-everything"]


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


class RigError(Exception):
    pass


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
        self.nrs = inject.SYSCALLS.get(platform.machine())
        self.prober: subprocess.Popen | None = None
        self.vms = None  # RigVms when cfg.vm_guests

    # ------------------------------------------------------------------ setup
    def prepare_share(self) -> None:
        self.rigdir.mkdir()
        (self.rigdir / worker.COUNTER).write_bytes(worker.counter_bytes(0))
        (self.rigdir / worker.RANGES).write_bytes(worker.initial_ranges())
        (self.rigdir / worker.FLOCK).write_bytes(worker.MARKER_FREE)
        (self.rigdir / inject.PROBE_FILE).write_bytes(b"\0" * 16)
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
        p = None
        try:
            with open(self.logs / f"w-{wid}.err", "ab") as errf:
                p = subprocess.Popen(args, stdout=errf, stderr=subprocess.STDOUT,
                                     env=self.env, cwd=str(view), start_new_session=True)
            w = WorkerProc(wid, p, log, guest=guest, slot=slot)
            self.workers.append(w)
        except BaseException:
            # A Ctrl-C between the spawn and the registration: the worker runs in a
            # session of its own, and nobody else would stop it.
            if p is not None and all(x.popen is not p for x in self.workers):
                p.kill()
                p.wait()
            raise
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
        inject.kill_lockd(self)

    def kill_guest(self, guest: str, kind: str = "kill-guest") -> None:
        inject.kill_guest(self, guest, kind)

    def signal_waiters(self) -> None:
        inject.signal_waiters(self)

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
        inject.probe_kill(self)
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
        return analysis.analyze(self.run_log())

    def run_log(self) -> RunLog:
        """What the run left for its verdict: the rig's records and the shared files' end
        state (read here, so that rig.analysis stays pure)."""
        workloads = self.cfg.workloads
        counter: int | None = None
        if "counter" in workloads:
            try:
                counter = int((self.rigdir / worker.COUNTER).read_bytes())
            except (OSError, ValueError):
                counter = None
        file_ids = {}
        for name in (worker.COUNTER, worker.RANGES, worker.FLOCK):
            try:
                s = os.stat(self.rigdir / name)
                file_ids[name] = (s.st_dev, s.st_ino)
            except OSError:
                pass
        return RunLog(
            config={k: (list(v) if isinstance(v, tuple) else v)
                    for k, v in vars(self.cfg).items()},
            stats=self.stats, t_start=self.t_start,
            t_stop=min(time.monotonic_ns(), self.t_end) if self.t_start else 0,
            who=self.who, killed_at=self.killed_at, faults=self.faults,
            snapshots=self.snapshots, daemon_lost=self.daemon_lost,
            signals_sent=self.signals_sent, worker_restarts=self.worker_restarts,
            rig_errors=self.rig_errors, counter_value=counter,
            sqlite=self._read_sqlite() if "sqlite" in workloads else None,
            file_ids=file_ids, workdir=str(self.work) if self.cfg.keep else None,
            vm_summary=self.vms.summary() if self.vms is not None else None)

    def _read_sqlite(self) -> SqliteFile:
        res = SqliteFile()
        try:
            db = sqlite3.connect(f"file:{self.rigdir / worker.SQLITE}?mode=ro", uri=True)
            try:
                res.integrity = db.execute("PRAGMA integrity_check").fetchone()[0]
                rows: dict[str, set[int]] = defaultdict(set)
                for w, s in db.execute("SELECT worker, seq FROM rows"):
                    rows[w].add(s)
            finally:
                db.close()
        except sqlite3.DatabaseError as exc:
            res.error = str(exc)
            return res
        res.rows = rows
        return res
