"""Live migration of a real guest (QEMU 10, TCG) between two `vfs-lockd virtiofs`
back-ends on this host, embedded lock mode (fuse_server/migration.py).

One guest holds a POSIX lock, an OFD lock and a flock and has a fourth process blocked
in F_SETLKW behind the POSIX lock; a second guest (its own back-end) is blocked in
F_SETLKW on the OFD range and refused the flock; a host thread probes all three locks
continuously (F_OFD_GETLK, which changes nothing; a non-blocking flock attempt, which
only succeeds when the guest's flock is gone) and records every probe. In turn:
a migration whose destination refuses the state (another rendezvous directory, as on
another host: the descriptors cannot reach it; QEMU fails it, the source runs on); a
migrate_cancel while RAM is still copied (bandwidth throttled), with guest I/O under
dirty logging; a migration with QMP `migrate` to a second QEMU (`-incoming defer`, its
own back-end); and a second one on to a third. No probe may see a lock free, the second
guest is granted nothing; each source's end unlocks nothing; on the last destination the
holder's unlock grants the blocked process, the OFD holder's the second guest, and the
files opened before the migrations read and write. downtime and total-time of
`query-migrate` are printed (-s)."""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import struct
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from procutil import fail_or_skip, kill_keepers, wait_until
from procutil import stop as stop_process

from rig.vm import REPO, VFS_LOCKD, Backend, VmError, VmGuest, ensure_image, errno_of, qemu_missing

pytestmark = pytest.mark.vm

QEMU_MIGRATABLE = REPO / "scripts" / "qemu-migratable"
F_OFD_GETLK = 36
MEM_MB = 256
GRANT_S = 30.0  # an answer that must come (TCG on 2 loaded cores): not a speed bound


def _fail_or_skip(why: str) -> None:
    fail_or_skip(why, "live migration must be testable")


@pytest.fixture(scope="module")
def qemu() -> list[str]:
    """A QEMU that migrates vhost-user-fs (8.2+), as a command."""
    why = qemu_missing()
    if why:
        _fail_or_skip(why)
    r = subprocess.run([str(QEMU_MIGRATABLE), "--where"], capture_output=True, text=True)
    if r.returncode != 0:
        _fail_or_skip(f"no QEMU 8.2+ (scripts/qemu-migratable): {r.stderr.strip()}")
    return r.stdout.split()


class Prober:
    """The host's view of the guest's three locks on `path`, probed without pause from a
    thread: (posix range held, OFD range held, flock held) per probe."""

    def __init__(self, path: Path) -> None:
        self.results: list[tuple[bool, bool, bool]] = []
        self._stop = threading.Event()
        self._fd = os.open(path, os.O_RDWR)
        self._ffd = os.open(path, os.O_RDWR)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _held(self, start: int, length: int) -> bool:
        arg = struct.pack("hhqqi4x", fcntl.F_WRLCK, 0, start, length, 0)
        typ = struct.unpack("hhqqi4x", fcntl.fcntl(self._fd, F_OFD_GETLK, arg))[0]
        return typ != fcntl.F_UNLCK

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                fcntl.flock(self._ffd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(self._ffd, fcntl.LOCK_UN)
                flocked = False
            except BlockingIOError:
                flocked = True
            self.results.append((self._held(0, 10), self._held(20, 10), flocked))

    def stop(self) -> list[tuple[bool, bool, bool]]:
        if not self._stop.is_set():
            self._stop.set()
            self._thread.join()
            os.close(self._fd)
            os.close(self._ffd)
        return self.results


class Pair:
    """Guests and back-ends of this module, all stopped at the end."""

    def __init__(self, work: Path, share: Path, qemu: list[str],
                 lockd: Path | None = None) -> None:
        self.work, self.share, self.qemu, self.lockd = work, share, qemu, lockd
        self.guests: list[VmGuest] = []
        self.image = ensure_image()
        self.n = 0

    def guest(self, incoming: bool = False, migration_dir: Path | None = None) -> VmGuest:
        self.n += 1
        name = f"m{self.n}"
        env = dict(os.environ)
        try:
            # the back-ends' rendezvous directory: the default unless told (launch.py)
            if migration_dir is not None:
                os.environ["VFS_LOCKD_MIGRATION_DIR"] = str(migration_dir)
            b = Backend("vfs-lockd", self.work / f"{name}.vhost.sock", self.share, name,
                        self.work / f"{name}.backend.log", lockd=self.lockd)
        finally:
            os.environ.clear()
            os.environ.update(env)
        try:
            g = VmGuest(name, b.socket_path, self.work, backend=b, kernel=self.image[0],
                        initrd=self.image[1], mem_mb=MEM_MB, qemu=self.qemu,
                        incoming=incoming)
        except BaseException:
            b.stop()
            raise
        self.guests.append(g)
        return g

    def close(self) -> None:
        for g in self.guests:
            g.close()


@pytest.fixture(params=["embedded", "central"])
def pair(request: pytest.FixtureRequest, qemu: list[str]) -> Iterator[Pair]:
    """The guests' rig: back-ends with their embedded lock managers, or all on one
    `vfs-lockd serve` (--lockd: the daemon holds the locks and the queued waits, the
    destination's back-end takes the guest's daemon session over)."""
    work = Path(tempfile.mkdtemp(prefix="vlmig-"))  # short: socket paths
    share = work / "share"
    share.mkdir()
    daemon = log = None
    sock = work / "lockd.sock" if request.param == "central" else None
    p = Pair(work, share, qemu, sock)
    try:
        if sock is not None:
            log = open(work / "lockd.log", "wb")  # noqa: SIM115 - closed below
            daemon = subprocess.Popen(
                [*VFS_LOCKD, "serve", "--socket", str(sock), "--journal",
                 str(work / "journal.sqlite")], stdout=log, stderr=subprocess.STDOUT,
                cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), start_new_session=True)
            assert wait_until(lambda: sock.exists() or daemon.poll() is not None, 20)
            assert sock.exists(), (work / "lockd.log").read_text()
        yield p
    finally:
        p.close()
        if daemon is not None:
            stop_process(daemon)
            kill_keepers(str(work).encode())
        if log is not None:
            log.close()
        shutil.rmtree(work, ignore_errors=True)


def migrate(src: VmGuest, dst: VmGuest, work: Path) -> dict:
    """Migrate src -> dst over a Unix socket (VmGuest.migrate_to); the final
    query-migrate of the source."""
    assert wait_until(dst.qmp_ready, 60), dst.diagnostics()
    src.migrate_to(dst, f"unix:{work}/{dst.name}.migrate")
    info: dict = {}

    def finished() -> bool:
        info.update(src.migration())
        return info.get("status") in ("completed", "failed", "cancelled")

    assert wait_until(finished, 120), info
    return info


def test_migration_keeps_locks_waits_and_files(pair: Pair) -> None:
    share = pair.share
    (share / "f").write_bytes(b"0123456789" * 10)
    a = pair.guest()
    for owner, kind, start in (("h", "posix", 0), ("o", "ofd", 20), ("fl", "flock", 0)):
        assert a.do(owner, "open 0 /mnt/f rw") == "ok"
        assert a.do(owner, f"lock 0 {kind} w {start} 10") == "ok"
    assert a.do("w", "open 0 /mnt/f rw") == "ok"
    waiting = a.send("w", "lock 0 posix w 0 10 wait")
    # The guest blocks in F_SETLKW: its request reached the back-end and is queued there
    # (the back-end logs nothing per request; a GETLK of another owner after it is
    # answered in order on the same ring).
    assert a.do("x", "open 0 /mnt/f rw") == "ok"
    assert a.do("x", "getlk 0 posix w 0 10").startswith("ok w 0 10")
    assert a.pending(waiting, wait=0)
    # A second guest (its own back-end, never migrated) contends for the OFD range and
    # the flock: refused now, and its blocked F_SETLKW must not be granted before the
    # migrated guest lets go on its last destination.
    other_guest = pair.guest()
    assert other_guest.do("k", "open 0 /mnt/f rw") == "ok"
    assert errno_of(other_guest.do("k", "lock 0 flock w 0 0")) == errno.EWOULDBLOCK
    contender = other_guest.send("k", "lock 0 posix w 20 10 wait")
    assert other_guest.do("y", "open 0 /mnt/f rw") == "ok"
    prober = Prober(share / "f")
    try:
        # 1. A destination that refuses the state: its rendezvous directory is another
        # (as on another host), so the source's descriptors cannot reach it. QEMU fails
        # the migration and the source runs on with everything.
        other = Path(tempfile.mkdtemp(prefix="vlmig-x-"))
        try:
            bad = pair.guest(incoming=True, migration_dir=other)
            info = migrate(a, bad, pair.work)
            assert info["status"] == "failed", info
            assert "another directory" in bad.backend.output()
            assert wait_until(lambda: a.qmp("query-status")["status"] == "running", 60)
            bad.kill()
            bad.close()
        finally:
            shutil.rmtree(other, ignore_errors=True)
        assert "keeps the guest" in a.backend.output()
        assert a.pending(waiting, wait=0)
        # 2. migrate_cancel while RAM is still being copied (the bandwidth is throttled so
        # that the copy cannot finish first): the guest does I/O meanwhile (the back-end
        # marks what it writes in the dirty log) and runs on at the source.
        slow = pair.guest(incoming=True)
        assert wait_until(slow.qmp_ready, 60), slow.diagnostics()
        uri = f"unix:{pair.work}/{slow.name}.migrate"
        slow.qmp("migrate-incoming", uri=uri)
        a.qmp("migrate-set-parameters", **{"max-bandwidth": 1 << 20})
        a.qmp("migrate", uri=uri)
        assert wait_until(lambda: a.qmp("query-migrate").get("status") == "active", 60)
        assert a.do("x", "read 0 0 10") == "ok 0123456789"
        assert a.do("x", "getlk 0 posix w 0 10").startswith("ok w 0 10")
        a.qmp("migrate_cancel")
        assert wait_until(lambda: a.qmp("query-migrate").get("status") == "cancelled", 60)
        a.qmp("migrate-set-parameters", **{"max-bandwidth": 1 << 40})
        slow.kill()
        slow.close()
        assert a.qmp("query-status")["status"] == "running"
        assert a.pending(waiting, wait=0)
        assert a.do("o", "read 0 0 10") == "ok 0123456789"
        assert a.do("x", "getlk 0 ofd w 20 10").startswith("ok w 20 10")
        # 3. Migrated for real.
        b = pair.guest(incoming=True)
        info = migrate(a, b, pair.work)
        assert info["status"] == "completed", info
        print(f"\nmigration 1: downtime {info.get('downtime')} ms, total "
              f"{info.get('total-time')} ms, setup {info.get('setup-time')} ms")
        a.carry_channel_to(b)
        for line in (a.backend.output() + b.backend.output()).splitlines():
            if "migration:" in line or "stopped at" in line or "started:" in line:
                print(line[11:200])  # the switch-over as the back-ends saw it (-s)
        assert wait_until(lambda: b.qmp("query-status")["status"] == "running", 60)
        a.kill()  # the source QEMU quits: its back-end ends and unlocks nothing
        assert a.backend.wait(30) == 0, a.backend.output()
        assert all(probe_once(share / "f")), "the source's end released a lock"
        assert "stay with the other back-end" in a.backend.output()
        assert b.do("x", "getlk 0 posix w 0 10").startswith("ok w 0 10")
        # the files opened before the migration work
        assert b.do("h", "write 0 0 ABCDE") == "ok 5"
        assert b.do("o", "read 0 0 10") == "ok ABCDE56789"
        # 4. Again, with the wait still queued.
        c = pair.guest(incoming=True)
        info = migrate(b, c, pair.work)
        assert info["status"] == "completed", info
        print(f"migration 2: downtime {info.get('downtime')} ms, total "
              f"{info.get('total-time')} ms")
        b.carry_channel_to(c)
        assert wait_until(lambda: c.qmp("query-status")["status"] == "running", 60)
        b.kill()
        assert b.backend.wait(30) == 0, b.backend.output()
        assert all(probe_once(share / "f")), "the source's end released a lock"
        assert "stay with the other back-end" in b.backend.output()
        assert other_guest.pending(contender, wait=0)
        assert errno_of(other_guest.do("y", "lock 0 posix r 25 1")) == errno.EAGAIN
        results = prober.stop()
        free = [r for r in results if not all(r)]
        assert results and not free, f"{len(free)} of {len(results)} probes saw a lock free"
        print(f"{len(results)} host probes, none saw a lock free")
        # the holder unlocks on the destination: the blocked process is granted there
        assert c.do("h", "lock 0 posix u 0 10") == "ok"
        assert c.result(waiting, GRANT_S) == "ok"
        assert c.do("x", "getlk 0 posix w 0 10").startswith("ok w 0 10")
        assert other_guest.pending(contender, wait=0)
        assert c.do("o", "lock 0 ofd u 20 10") == "ok"
        assert other_guest.result(contender, GRANT_S) == "ok"  # now, and only now
        assert other_guest.do("k", "lock 0 posix u 20 10") == "ok"
        assert c.do("fl", "lock 0 flock u 0 0") == "ok"
        assert c.do("w", "lock 0 posix u 0 10") == "ok"
        assert wait_until(lambda: not any(probe_once(share / "f")), 10)
    except (AssertionError, VmError, OSError):
        for g in pair.guests:
            print(g.diagnostics())
        raise
    finally:
        prober.stop()


def probe_once(path: Path) -> tuple[bool, bool, bool]:
    """One probe, as Prober's."""
    p = Prober.__new__(Prober)
    p._fd, p._ffd = os.open(path, os.O_RDWR), os.open(path, os.O_RDWR)
    try:
        try:
            fcntl.flock(p._ffd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            flocked = False
        except BlockingIOError:
            flocked = True
        return p._held(0, 10), p._held(20, 10), flocked
    finally:
        os.close(p._fd)
        os.close(p._ffd)
