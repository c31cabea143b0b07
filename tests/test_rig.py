"""`vfs-lockd rig`: its checks on synthetic logs, and short real runs (a daemon, guest
mounts, workers) with every workload and each fault; a rig that cannot fail proves nothing,
so broken lock paths must make it report violations (exit 1).

Every run uses TMPDIR=tmp_path so the test can verify that nothing is left behind (no
mount, no process, no work directory), and kills/unmounts whatever is left in finally."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import REPO, VFS_LOCKD
from procutil import wait_until

from rig import analysis, checks
from rig.analysis import Fault, LogReader, RunLog, SqliteFile, Stats
from rig.checks import Section
from rig.runner import force_unmount, mounts_under


# ---------------------------------------------------------------------------- checks
def sec(w: str, t0: int, t1: int, lo: int = 0, hi: int = 10, type_: str = "w",
        kind: str = "posix", file: str = "f") -> Section:
    return Section(w, t0, t1, file, lo, hi, type_, kind)


def test_overlap_sweep() -> None:
    ok = [sec("a", 0, 10), sec("b", 10, 20), sec("c", 5, 15, lo=10, hi=20),  # touching / disjoint
          sec("d", 0, 30, type_="r"), sec("e", 1, 29, type_="r"),  # readers share
          sec("f", 0, 30, kind="flock", hi=-1), sec("a", 11, 12, lo=50, hi=60),
          sec("g", 0, 30, file="other")]
    assert checks.overlaps(ok[:3] + ok[6:]) == []
    assert checks.overlaps([ok[3], ok[4]]) == []
    bad = checks.overlaps([sec("a", 0, 10), sec("b", 9, 20, lo=9, hi=-1)])
    assert len(bad) == 1 and {bad[0][0].worker, bad[0][1].worker} == {"a", "b"}
    assert len(checks.overlaps([sec("a", 0, 10, type_="r"), sec("b", 5, 6)])) == 1
    assert checks.overlaps([sec("a", 0, 10), sec("a", 5, 6)]) == []  # one owner


def test_covered_and_forgotten() -> None:
    rows = [{"guest": "g0", "kind": "posix", "type": "WRITE", "start": 0, "end": 4, "pid": 7},
            {"guest": "g0", "kind": "posix", "type": "READ", "start": 5, "end": 9, "pid": 7}]
    assert checks.covered(rows, 0, 10, "r")
    assert not checks.covered(rows, 0, 10, "w")
    assert checks.covered(rows, 0, 5, "w")
    assert not checks.covered(rows, 0, -1, "r")
    held = [sec("g0.w0.r0", 0, 100, lo=0, hi=5), sec("g0.w0.r0", 0, 100, lo=0, hi=10),
            sec("g0.w0.r0", 0, 40, lo=20, hi=30), sec("host.w0.r0", 0, 100, lo=50, hi=60)]
    who = {"g0.w0.r0": ("g0", 7)}
    lost = checks.forgotten_locks(held, kill_ns=10, snap_done_ns=50, snapshot={"locks": rows},
                                  who=who, file_ids={})
    assert lost == [held[1]]  # [0,10) write is not covered; [20,30) ended before the snapshot


def test_percentile() -> None:
    vals = list(range(1, 101))
    assert checks.percentile(vals, 50) == 50
    assert checks.percentile(vals, 99) == 99
    assert checks.percentile([], 99) == 0


# ---------------------------------------------------------------------------- analysis
def _verdict(tmp: Path, logs: dict[str, list[list]], **run: object) -> dict:
    """rig.analysis over synthetic worker logs (JSON lines, as rig/worker.py writes them,
    read back by the rig's own LogReader)."""
    stats = Stats()
    for wid, records in logs.items():
        path = tmp / f"w-{wid}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
        LogReader(wid, path).poll(stats)
    base: dict = dict(config={"workloads": ["ranges", "counter", "sqlite", "flock"]},
                      t_start=1, t_stop=10_000, who={"g0.w0.r0": ("g0", 7), "g1.w0.r0": ("g1", 8)},
                      counter_value=2, sqlite=SqliteFile("ok", {"g0.w0.r0": {1}}))
    base.update(run)
    return analysis.analyze(RunLog(stats=stats, **base))


# Two guests taking turns on the ranges file, two counter increments, one SQLite commit.
_CLEAN = {
    "g0.w0.r0": [["L", 100, 50, "ranges"], ["O", 0, "ranges"],
                 ["S", 100, 200, "ranges", 0, 10, "w", "posix"], ["CI"], ["CD"],
                 ["QI", 1], ["QD", 1], ["L", 400, 10, "sqlite"]],
    "g1.w0.r0": [["L", 200, 80, "ranges"], ["O", 0, "ranges"],
                 ["S", 200, 300, "ranges", 5, 20, "w", "posix"], ["CI"], ["CD"],
                 ["S", 300, 400, "flock", 0, -1, "w", "flock"]],
    "host.w0.r0": [["S", 300, 350, "ranges", 0, 4, "r", "posix"]],
}


def test_analysis_of_a_clean_run(tmp_path: Path) -> None:
    r = _verdict(tmp_path, _CLEAN)
    assert (r["violations"], r["lost_locks"], r["exit_status"]) == (0, 0, 0), r
    assert r["checks"]["overlaps"] == 0 and r["checks"]["sections"] == 4
    assert r["checks"]["counter"]["ok"] and r["checks"]["sqlite"]["ok"]
    assert r["operations"] == 2 and r["latency_us"]["count"] == 2


def test_analysis_reports_each_violation(tmp_path: Path) -> None:
    """Every kind of breach in the logs or the shared files makes the verdict fail."""
    def verdict(extra: dict[str, list[list]] | None = None, **run: object) -> dict:
        logs = {w: list(rs) for w, rs in _CLEAN.items()}
        for w, rs in (extra or {}).items():
            logs.setdefault(w, []).extend(rs)
        return _verdict(tmp_path, logs, **run)

    # Two writers inside overlapping ranges at the same time (here: a host process).
    r = verdict({"host.w0.r0": [["S", 150, 250, "ranges", 8, 12, "w", "posix"]]})
    assert r["checks"]["overlaps"] >= 1 and r["exit_status"] == 1
    assert any("overlap on ranges" in v for v in r["violation_samples"])
    # A worker saw another holder's flock marker inside its own flock section...
    r = verdict({"g0.w0.r0": [["FV", 350, "g1.w0.r0", "exclusive flock held by"]]})
    assert r["violations"] == 1 and r["exit_status"] == 1
    # ... unless that holder's guest had been killed: a stale marker, not a breach.
    r = verdict({"g0.w0.r0": [["FV", 350, "g1.w0.r0", "exclusive flock held by"]]},
                killed_at={"g1.w0.r0": 340})
    assert (r["violations"], r["checks"]["flock_stale_markers"], r["exit_status"]) == (0, 1, 0)
    # A worker's own check failed (a torn read, say).
    assert verdict({"g1.w0.r0": [["V", 0, "ranges", "torn read"]]})["exit_status"] == 1
    # The counter lost an increment; the database lost a committed row.
    r = verdict(counter_value=1)
    assert not r["checks"]["counter"]["ok"] and r["exit_status"] == 1
    r = verdict(sqlite=SqliteFile("ok", {}))
    assert r["checks"]["sqlite"]["missing"] == 1 and r["exit_status"] == 1
    # A section held across a daemon kill, missing from the restarted daemon's table.
    r = verdict(snapshots=[(150, 180, {"locks": []})],
                faults=[Fault("kill-lockd", "lockd", 150, 160, 170)])
    assert r["lost_locks"] == 1 and r["lost_detail"]["forgotten_sections"] == 1
    assert r["exit_status"] == 1
    # ... and present in it: nothing lost.
    row = {"guest": "g0", "kind": "posix", "type": "WRITE", "start": 0, "end": 9, "pid": 7}
    r = verdict(snapshots=[(150, 180, {"locks": [row]})])
    assert (r["lost_locks"], r["exit_status"]) == (0, 0)
    # A rig error alone (a worker that hung) fails the run too.
    assert verdict(rig_errors=["worker g0.w0.r0 did not stop in time"])["exit_status"] == 1


# ---------------------------------------------------------------------------- real runs
def _leftovers(tmp: Path) -> list[str]:
    """Processes still running with tmp in their command line."""
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if str(tmp) in cmd:
            out.append(f"{pid}: {cmd}")
    return out


def _kill_leftovers(tmp: Path) -> None:
    for line in _leftovers(tmp):
        try:
            os.kill(int(line.split(":")[0]), signal.SIGKILL)
        except ProcessLookupError:
            pass
    for mp in sorted(mounts_under(tmp), key=len, reverse=True):
        force_unmount(Path(mp))


def run_rig(tmp: Path, *args: str, timeout: float = 60,
            interrupt_when: Callable[[Path], bool] | None = None
            ) -> tuple[int, dict | None, str]:
    """Run `vfs-lockd rig` with TMPDIR=tmp; returns (exit status, JSON report, output)
    and checks that it left nothing behind. `interrupt_when(work dir)`: Ctrl-C (SIGINT)
    as soon as it is true."""
    report = tmp / "report.json"
    work = tmp / "t"
    work.mkdir(exist_ok=True)
    env = dict(os.environ, PYTHONPATH=str(REPO), TMPDIR=str(work))
    proc = subprocess.Popen([*VFS_LOCKD, "rig", "--json", str(report), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                            cwd=REPO, start_new_session=True)
    try:
        if interrupt_when is not None:
            assert wait_until(lambda: interrupt_when(work) or proc.poll() is not None, 60)
            assert proc.poll() is None, "the rig ended before it was interrupted"
            proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=timeout)
        text = out.decode(errors="replace")
        # Nothing left: no process, no mount, no work directory.
        assert _leftovers(work) == [], text
        assert mounts_under(work) == [], text
        assert list(work.iterdir()) == [], text
        data = json.loads(report.read_text()) if report.exists() else None
        return proc.returncode, data, text
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        _kill_leftovers(work)


REQUIRED_KEYS = {"operations", "violations", "lost_locks", "deadlocks", "faults", "latency_us",
                 "max_wait_us"}


@pytest.mark.fuse
@pytest.mark.slow
def test_rig_all_workloads_guest_kill_and_signals(fuse_ok, tmp_path: Path) -> None:
    rc, r, out = run_rig(tmp_path, "--guests", "2", "--procs", "2", "--host-procs", "1",
                         "--seconds", "5.6", "--kill-guest-every", "1.8", "--signal-every", "0.1",
                         "--plot", str(tmp_path / "lat.png"))
    assert r is not None, out
    assert REQUIRED_KEYS <= r.keys()
    assert set(r["latency_us"]) >= {"p50", "p99", "max"}
    assert r["violations"] == 0, out
    assert r["lost_locks"] == 0, out
    assert rc == 0, out
    for wl in ("counter", "ranges", "sqlite", "flock"):
        assert r["workloads"][wl]["operations"] > 0, wl
    assert r["checks"]["counter"]["ok"] and r["checks"]["sqlite"]["integrity"] == "ok"
    kills = [f for f in r["faults"] if f["kind"] == "kill-guest"]
    assert [f["target"] for f in kills] == ["g0", "g1"]
    assert all(f["recovery_s"] is not None and f["recovery_s"] < 5 for f in kills), kills
    assert r["worker_restarts"] >= 4
    assert (tmp_path / "lat.png").stat().st_size > 1000
    assert "vfs-lockd rig" in out and "PASS" in out


@pytest.mark.fuse
@pytest.mark.slow
def test_rig_deadlocks_and_eintr_are_counted(fuse_ok, tmp_path: Path) -> None:
    """Guests only, ranges only: lock-order inversions give EDEADLK (not violations) and
    signals to blocked waiters give EINTR, retried."""
    rc, r, out = run_rig(tmp_path, "--guests", "3", "--procs", "2", "--host-procs", "0",
                         "--seconds", "3", "--workload", "ranges", "--signal-every", "0.05")
    assert r is not None, out
    assert r["violations"] == 0 and rc == 0, out
    assert r["deadlocks"] > 0, out
    assert r["signals_sent"] > 0 and r["eintr_seen"] > 0, out


@pytest.fixture(scope="module")
def daemon_kill_run(fuse_ok, tmp_path_factory: pytest.TempPathFactory) -> tuple[int, dict, str]:
    tmp = tmp_path_factory.mktemp("rig-kill")
    rc, r, out = run_rig(tmp, "--guests", "2", "--procs", "2", "--host-procs", "1",
                         "--seconds", "7", "--kill-lockd-every", "2.5")
    assert r is not None, out
    return rc, r, out


@pytest.mark.fuse
@pytest.mark.slow
def test_rig_daemon_kill_is_measured(fuse_ok, daemon_kill_run) -> None:
    rc, r, out = daemon_kill_run
    kills = [f for f in r["faults"] if f["kind"] == "kill-lockd"]
    assert len(kills) == 2, out
    for f in kills:
        assert f["ready_s"] > 0 and f["recovery_s"] is not None, f
        assert "taken_after_restart" in f["probe"], f
    assert r["operations"] > 0
    # The verdict follows the findings.
    assert rc == (1 if r["violations"] or r["lost_locks"] else 0), out


@pytest.mark.fuse
@pytest.mark.slow
def test_rig_daemon_kill_loses_nothing(fuse_ok, daemon_kill_run) -> None:
    rc, r, out = daemon_kill_run
    assert r["lost_locks"] == 0, r["lost_detail"]
    assert r["violations"] == 0, r["violation_samples"]
    assert rc == 0, out


@pytest.mark.fuse
@pytest.mark.slow
def test_rig_fails_without_locks(fuse_ok, tmp_path: Path) -> None:
    rc, r, out = run_rig(tmp_path, "--guests", "2", "--procs", "2", "--host-procs", "1",
                         "--seconds", "2", "--unsafe-no-locks")
    assert r is not None, out
    assert r["violations"] > 0, out
    assert rc == 1, out
    assert "FAIL" in out


@pytest.mark.fuse
@pytest.mark.slow
def test_rig_fails_when_the_manager_skips_locks(fuse_ok, tmp_path: Path) -> None:
    rc, r, out = run_rig(tmp_path, "--guests", "3", "--procs", "2", "--host-procs", "0",
                         "--seconds", "3", "--test-skip-host-lock")
    assert r is not None, out
    assert r["violations"] > 0, out
    assert rc == 1, out


@pytest.mark.fuse
@pytest.mark.slow
def test_rig_interrupted_tears_everything_down(fuse_ok, tmp_path: Path) -> None:
    # Interrupted in the run: its three workers (one per guest, one on the host) have
    # started writing their logs. (Not while it starts a worker: a Ctrl-C between the
    # worker's spawn and the rig noting it leaves that worker running.)
    rc, r, out = run_rig(tmp_path, "--guests", "2", "--procs", "1", "--host-procs", "1",
                         "--seconds", "30",
                         interrupt_when=lambda w: len(list(w.glob("*/logs/w-*.jsonl"))) == 3)
    assert rc == 130, out
    assert r is None


def test_rig_plot_without_matplotlib_says_how_to_install(tmp_path: Path) -> None:
    hide = tmp_path / "hide"
    hide.mkdir()
    (hide / "matplotlib.py").write_text("raise ImportError('hidden for the test')\n")
    env = dict(os.environ, PYTHONPATH=f"{hide}{os.pathsep}{REPO}")
    p = subprocess.run([*VFS_LOCKD, "rig", "--guests", "0", "--host-procs", "1", "--seconds",
                        "1", "--plot", str(tmp_path / "x.png")], capture_output=True,
                       text=True, env=env, cwd=REPO, timeout=60)
    assert p.returncode != 0
    assert "[plot]" in p.stderr and "matplotlib" in p.stderr


@pytest.mark.slow
def test_rig_host_only_runs_without_fuse(tmp_path: Path) -> None:
    rc, r, out = run_rig(tmp_path, "--guests", "0", "--host-procs", "3", "--seconds", "1")
    assert r is not None, out
    assert rc == 0 and r["violations"] == 0 and r["operations"] > 0, out
