"""Shared fixtures. FUSE: `fuse_ok` decides skip/fail once; `mounts` starts real
`vfs-lockd mount` processes and always tears them down (a stale FUSE mount would hang
later runs)."""

from __future__ import annotations

import os
import subprocess
import sys
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
    with open("/proc/self/mounts") as f:
        return any(line.split()[2] == "fusectl" for line in f)


@pytest.fixture(scope="session", autouse=True)
def fusectl():
    """fusectl at /sys/fs/fuse/connections for the whole run (tests read a connection's
    `waiting` count and abort hung mounts through it), unmounted at the end when the run
    mounted it: nothing of a test run stays mounted."""
    mounted_here = False
    if os.geteuid() == 0 and FUSECTL.is_dir() and not _fusectl_mounted():
        mounted_here = subprocess.run(["mount", "-t", "fusectl", "none", str(FUSECTL)],
                                      capture_output=True).returncode == 0
    yield FUSECTL
    if mounted_here:
        subprocess.run(["umount", str(FUSECTL)], capture_output=True)


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
