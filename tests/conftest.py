"""Shared fixtures. FUSE: `fuse_ok` decides skip/fail once; `mounts` starts real
`vfs-lockd mount` processes and always tears them down (a stale FUSE mount would hang
later runs)."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from procutil import kill_keepers, wait_until
from procutil import stop as stop_process

REPO = Path(__file__).resolve().parent.parent
# `vfs-lockd` without depending on the console script being installed.
VFS_LOCKD = [sys.executable, "-c", "import sys; from lockd.cli import main; sys.exit(main())"]


@pytest.fixture(scope="session")
def fuse_ok() -> None:
    """Skip FUSE tests where /dev/fuse or root is missing; under CI=true, fail instead."""
    why = None
    if os.geteuid() != 0:
        why = "FUSE tests need root"
    else:
        try:
            os.close(os.open("/dev/fuse", os.O_RDWR))
        except OSError as exc:
            why = f"/dev/fuse unusable: {exc}"
    if why:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{why} (CI=true: FUSE must be available)")
        pytest.skip(why)


class Mount:
    def __init__(self, source: Path, path: Path, guest: str, args: list[str], log: Path) -> None:
        self.source, self.path, self.guest, self.log = source, path, guest, log
        self._logf = open(log, "wb")  # noqa: SIM115 - closed in stop()
        env = dict(os.environ, PYTHONPATH=str(REPO))
        self.proc = subprocess.Popen(
            [*VFS_LOCKD, "mount", str(source), str(path), "--guest", guest, *args],
            stdout=self._logf, stderr=subprocess.STDOUT, env=env, cwd=REPO,
        )
        if not wait_until(lambda: self.live() or self.proc.poll() is not None, 15) \
                or not self.live():
            self.stop()
            raise RuntimeError(f"mount of {path} did not come up:\n{self.output()}")

    def live(self) -> bool:
        """Mounted and answering (statfs always goes to the server; a dead server's
        stale mount answers ENOTCONN)."""
        try:
            return os.path.ismount(self.path) and os.statvfs(self.path) is not None
        except OSError:
            return False

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> int | None:
        rc = stop_process(self.proc)
        force_unmount(self.path)
        self._logf.close()
        return rc


@contextlib.contextmanager
def own_tmpfs(base: Path):
    """`base` on a tmpfs of its own (root): nothing else there (another test, another
    xdist worker) renames a directory or changes the free space while a test looks."""
    base.mkdir(exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(base)], check=True)
    try:
        yield base
    finally:
        subprocess.run(["umount", "-l", str(base)], check=False)


def force_unmount(path: Path) -> None:
    """Detach whatever is still mounted at path (after a kill -9 or a failed stop)."""
    for _ in range(3):
        r = subprocess.run(["umount", "-l", str(path)], capture_output=True)
        if r.returncode != 0:
            return


@pytest.fixture
def mounts(fuse_ok, tmp_path: Path):
    """mounts(n=1, args=[...]) -> (source, [Mount, ...]) on one shared source dir."""
    started: list[Mount] = []
    source = tmp_path / "src"
    source.mkdir()

    def start(n: int = 1, args: list[str] | None = None, guests: list[str] | None = None):
        for i in range(n):
            mp = tmp_path / f"mnt{len(started)}"
            mp.mkdir(exist_ok=True)
            guest = guests[i] if guests else f"guest{len(started)}"
            started.append(Mount(source, mp, guest, list(args or []), tmp_path / f"{guest}.log"))
        return source, started[-n:]

    try:
        yield start
    finally:
        for m in started:
            m.stop()


@pytest.fixture
def lockers():
    """lockers(path) -> a test_fuse_locks.Locker process on path; all killed at the end."""
    from test_fuse_locks import Locker

    made: list[Locker] = []

    def make(path: Path) -> Locker:
        made.append(Locker(path))
        return made[-1]

    yield make
    for lk in made:
        lk.close()


@pytest.fixture
def stack(cluster, request):  # noqa: ANN001 - `cluster`: a cluster test module's own
    """Two cluster hosts' daemons and guests for one test (tests/cluster_stack.py)."""
    from cluster_stack import stack_of

    yield from stack_of(cluster, request)


FUSECTL = Path("/sys/fs/fuse/connections")


def _fusectl_mounted() -> bool:
    """At FUSECTL itself (another root's fusectl, e.g. scripts/debian-root's, is not it)."""
    with open("/proc/self/mounts") as f:
        return any(line.split()[1:3] == [str(FUSECTL), "fusectl"] for line in f)


def _is_xdist_worker(config: pytest.Config) -> bool:
    return hasattr(config, "workerinput")


BASETEMP_PREFIX = "vlt-"  # /tmp/vlt-XXXXXXXX: this run's temporary directories
BASETEMP_KEEP = 3  # the last runs' directories are kept for a look after a failure


def _short_basetemp(config: pytest.Config) -> None:
    """A short base for tmp_path: pytest's own (/tmp/pytest-of-root/pytest-N, and
    popen-gwN under it with xdist) leaves too little of AF_UNIX's 108 bytes for the
    sockets tests make in deep directories (the rig's daemon, the bench's)."""
    if config.option.basetemp or _is_xdist_worker(config):
        return
    root = Path(tempfile.gettempdir())
    old = sorted((p for p in root.glob(BASETEMP_PREFIX + "*") if p.is_dir()), key=lambda p: p.stat().st_mtime)
    for d in old[:max(0, len(old) - BASETEMP_KEEP + 1)]:
        if not _run_alive(d):  # another run still working in it
            shutil.rmtree(d, ignore_errors=True)
    base = tempfile.mkdtemp(prefix=BASETEMP_PREFIX, dir=root)
    config.option.basetemp = base
    # pytest empties basetemp when it takes it: the run's pid lives beside it
    Path(base + ".pid").write_text(str(os.getpid()))


def _run_alive(d: Path) -> bool:
    try:
        os.kill(int(Path(str(d) + ".pid").read_text()), 0)
    except (OSError, ValueError):
        Path(str(d) + ".pid").unlink(missing_ok=True)
        return False
    return True


@pytest.hookimpl(tryfirst=True)  # before pytest's tmp_path plugin reads the option
def pytest_configure(config: pytest.Config) -> None:
    _short_basetemp(config)
    _mount_fusectl(config)
    _keep_longest_first(config)


def _keep_longest_first(config: pytest.Config) -> None:
    """pytest-xdist (3.6+) hands out --dist loadfile modules by their number of tests,
    most first, unless told not to: that would undo LONGEST_FIRST (the Ceph module, 7
    tests and the longest, went out after a third of the run, the migration one near
    the end). Read by the controller's scheduler."""
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def _mount_fusectl(config: pytest.Config) -> None:
    """fusectl at /sys/fs/fuse/connections for the whole run (tests read a connection's
    `waiting` count and abort hung mounts through it). Mounted by the run's main process
    (with xdist: the controller, before any worker starts), unmounted by it at the end
    when it mounted it: nothing of a test run stays mounted."""
    config._fusectl_mounted_here = False  # type: ignore[attr-defined]
    if _is_xdist_worker(config):
        return
    if os.geteuid() == 0 and FUSECTL.is_dir() and not _fusectl_mounted():
        config._fusectl_mounted_here = subprocess.run(  # type: ignore[attr-defined]
            ["mount", "-t", "fusectl", "none", str(FUSECTL)], capture_output=True).returncode == 0


def pytest_unconfigure(config: pytest.Config) -> None:
    if getattr(config, "_fusectl_mounted_here", False):
        subprocess.run(["umount", str(FUSECTL)], capture_output=True)


# The modules that take longest, longest first (totals of their tests' --durations on
# Debian 12; see README "Tests"). `make test` runs xdist workers that take whole modules
# (--dist loadfile: a module's clusters and VMs are set up once, in one worker); handing
# out the long ones first keeps the workers busy to the end, and the Ceph module's wait
# for the MDS to evict a silent host (30 s, a third of the module, no CPU) is spent while
# the other workers compute.
LONGEST_FIRST = (
    "test_ceph.py", "test_cache_coherence.py", "test_vm.py", "test_migration.py",
    "test_libvirt_migrate.py", "test_abuse.py", "test_rig.py", "test_fuzz.py", "test_invalidation.py",
    "test_delegation.py", "test_gluster.py", "test_bench.py", "test_libvirt.py",
    "test_fuse_locks.py", "test_daemon.py", "test_codec.py", "test_wire.py",
    "test_ceph_migration.py", "test_session_recovery.py", "test_daemon_guard.py",
    "test_kata.py", "test_downgrade.py", "test_migration_paths.py",
    "test_keeper.py", "test_vhost_user.py", "test_outage.py", "test_package.py",
    "test_daemon_takeover.py", "test_virtiofsd_cli.py", "test_delegation_model.py",
    "test_hostile_guest.py", "test_faults.py",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    # A stable sort: within a module, and among the other modules, the order stays.
    items.sort(key=lambda it: rank.get(it.path.name, len(rank)))


@pytest.fixture(scope="session", autouse=True)
def fusectl():
    """The fusectl directory (mounted for the run by pytest_configure)."""
    return FUSECTL


@pytest.fixture(autouse=True)
def no_stray_keepers(tmp_path_factory):
    """A daemon stopped while guests still hold locks leaves its descriptor keeper holding
    them (by design, for the next start). Tests end it: no process outlives the test."""
    yield
    kill_keepers(str(tmp_path_factory.getbasetemp()).encode())


@pytest.fixture
def daemon(tmp_path):
    """A real `vfs-lockd serve` (journal and keeper) in the test's directory."""
    from daemonutil import DaemonProc

    d = DaemonProc(str(tmp_path)).start()
    try:
        yield d
    finally:
        d.stop()
