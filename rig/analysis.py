"""The rig's verdict, pure over what a run left behind: the workers' logs (parsed into
`Stats`), the rig's record of the daemon (its lock tables after each restart, the lost
locks it counted) and of the faults it injected, and the end state of the shared files
as the runner read it. No process, clock or file is touched here, so the checks can be
tested with synthetic logs (tests/test_rig.py), as rig/checks.py is.
"""

from __future__ import annotations

import errno
import json
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from rig import checks
from rig.checks import Section


@dataclass
class Fault:
    kind: str  # "kill-lockd" | "kill-guest" | "lockd-crash" | "guest-crash"
    target: str
    t_ns: int  # when the process was killed
    restart_ns: int = 0
    ready_ns: int = 0
    first_lock_ns: int = 0
    probe: dict = field(default_factory=dict)


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


@dataclass
class SqliteFile:
    """The workload's database as the runner found it at the end."""

    integrity: str | None = None
    rows: dict[str, set[int]] = field(default_factory=dict)  # worker -> seqs in the table
    error: str | None = None  # unreadable: why


@dataclass
class RunLog:
    """What a run left for its verdict (gathered by rig.runner.Rig.run_log)."""

    config: dict  # RigConfig as a dict (reported as is)
    stats: Stats
    t_start: int = 0  # monotonic ns; 0: the run never started
    t_stop: int = 0  # when it stopped (at most its planned end)
    who: dict[str, tuple[str, int]] = field(default_factory=dict)  # guest worker -> (guest, pid)
    killed_at: dict[str, int] = field(default_factory=dict)  # worker -> its guest's kill
    faults: list[Fault] = field(default_factory=list)
    snapshots: list[tuple[int, int, dict]] = field(default_factory=list)  # daemon lock tables
    daemon_lost: dict[int, int] = field(default_factory=dict)  # incarnation -> lost locks
    signals_sent: int = 0
    worker_restarts: int = 0
    rig_errors: list[str] = field(default_factory=list)
    counter_value: int | None = None  # the counter file's final value (None: unreadable)
    sqlite: SqliteFile | None = None
    file_ids: dict[str, tuple[int, int]] = field(default_factory=dict)  # name -> (dev, ino)
    workdir: str | None = None
    vm_summary: dict | None = None

    @property
    def workloads(self) -> tuple[str, ...]:
        return tuple(self.config.get("workloads", ()))


def pcts(sorted_ns: list[int]) -> dict:
    us = 1000.0
    return {"p50": round(checks.percentile(sorted_ns, 50) / us, 1),
            "p99": round(checks.percentile(sorted_ns, 99) / us, 1),
            "max": round((sorted_ns[-1] if sorted_ns else 0) / us, 1),
            "count": len(sorted_ns)}


def first_locks(faults: list[Fault], stats: Stats, who: dict) -> list[int]:
    """For each fault, the first lock granted to a guest worker after its restart (for a
    guest kill: to that guest's workers); 0 when none was."""
    lats = sorted((t, wid) for t, _, wl, wid in stats.latencies)
    out = []
    for f in faults:
        first = f.first_lock_ns
        if not first:
            for t, wid in lats:
                if t <= f.ready_ns:
                    continue
                g = who.get(wid, ("",))[0]
                if g and (f.target == "lockd" or g == f.target):
                    first = t
                    break
        out.append(first)
    return out


def check_sqlite(stats: Stats, db: SqliteFile) -> dict:
    """Every committed row present, none that was never attempted, integrity ok."""
    committed = sum(len(v) for v in stats.sqlite_done.values())
    res: dict = {"commits": committed, "rows": None, "integrity": None, "ok": False}
    if db.error is not None:
        res["integrity"] = db.integrity
        res["problem"] = f"database unreadable: {db.error}"
        return res
    res["integrity"] = db.integrity
    rows = db.rows
    res["rows"] = sum(len(v) for v in rows.values())
    missing = sum(len(stats.sqlite_done[w] - rows.get(w, set())) for w in stats.sqlite_done)
    phantom = sum(len(rows[w] - stats.sqlite_intent.get(w, set())) for w in rows)
    res.update(missing=missing, phantom=phantom,
               ambiguous=sum(len(stats.sqlite_intent[w] - stats.sqlite_done.get(w, set()))
                             for w in stats.sqlite_intent))
    if res["integrity"] != "ok":
        res["problem"] = f"integrity_check: {res['integrity']}"
    elif missing or phantom:
        res["problem"] = (f"{res['rows']} rows for {committed} commits: {missing} "
                          f"committed rows missing, {phantom} never committed")
    else:
        res["ok"] = True
    return res


def analyze(run: RunLog) -> dict:
    """The report of `vfs-lockd rig` (exit_status 1: a violation, a lost lock or a rig
    error)."""
    st = run.stats
    sec = 1e9
    duration = max((run.t_stop - run.t_start) / sec, 1e-9) if run.t_start else 0.0
    violations = list(st.violations)
    checks_out: dict = {}

    # Critical sections: no two conflicting holders at once, in any file.
    pairs = checks.overlaps(st.sections)
    for a, b in pairs[:20]:
        violations.append(
            f"overlap on {a.file} ({a.kind}): {a.worker} {a.type} {a.lo}-{a.hi} "
            f"[{(a.t0 - run.t_start) / sec:.6f}, {(a.t1 - run.t_start) / sec:.6f}] and "
            f"{b.worker} {b.type} {b.lo}-{b.hi} [{(b.t0 - run.t_start) / sec:.6f}, "
            f"{(b.t1 - run.t_start) / sec:.6f}]")
    n_viol = len(st.violations) + len(pairs)
    checks_out["sections"] = len(st.sections)
    checks_out["overlaps"] = len(pairs)

    # flock markers: a marker of a holder killed with its guest is stale, not a breach.
    stale = 0
    for t, holder, msg, seer in st.flock_markers:
        if holder in run.killed_at and run.killed_at[holder] <= t:
            stale += 1
        else:
            n_viol += 1
            if len(violations) < 60:
                violations.append(f"{seer} (flock): {msg}: {holder!r}")
    checks_out["flock_stale_markers"] = stale

    # counter: final value within [done, intents] (a write cut by a kill may or may
    # not have landed).
    if "counter" in run.workloads:
        value = run.counter_value
        ok = value is not None and st.counter_done <= value <= st.counter_intents
        checks_out["counter"] = {"value": value, "increments": st.counter_done,
                                 "ambiguous": st.counter_intents - st.counter_done,
                                 "ok": ok}
        if not ok:
            n_viol += 1
            violations.append(f"counter: final value {value}, but {st.counter_done} "
                              f"increments were made "
                              f"(+{st.counter_intents - st.counter_done} ambiguous)")

    if "sqlite" in run.workloads:
        checks_out["sqlite"] = sq = check_sqlite(st, run.sqlite or SqliteFile(error="not read"))
        if not sq["ok"]:
            n_viol += 1
            violations.append(f"sqlite: {sq['problem']}")

    # Lost locks: what the daemon says, what the workers were told (EIO), and what
    # the rig saw itself (the prober's range free on the host after a restart; guest
    # sections held across a restart missing from the new lock table).
    forgotten = []
    for kill_ns, done_ns, snap in run.snapshots:
        forgotten += checks.forgotten_locks(st.sections, kill_ns, done_ns, snap, run.who,
                                            run.file_ids)
    probe_lost = sum(1 for f in run.faults if f.probe.get("taken_after_restart"))
    daemon_reported = sum(run.daemon_lost.values())
    eio = len(st.lost_eio) + sum(1 for f in run.faults
                                 if f.probe.get("prober_unlock_errno") == errno.EIO)
    silent = 0 if daemon_reported else probe_lost + len(forgotten)
    lost = max(daemon_reported, eio) + silent
    lost_detail = {"daemon_reported": daemon_reported, "eio_seen": eio,
                   "probe_free_after_restart": probe_lost,
                   "forgotten_sections": len(forgotten),
                   "window_open_while_down": sum(1 for f in run.faults
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
    lat_guest = sorted(lat for lat, wid in fcntl_lats if wid in run.who) or lat_all
    per_wl = {}
    for wl in run.workloads:
        vals = sorted(lat for _, lat, w, _ in st.latencies if w == wl)
        per_wl[wl] = {"operations": st.ops[wl], "locks": len(vals),
                      "latency_us": pcts(vals)}
    by_origin = {
        origin: pcts(sorted(lat for _, lat, wl, wid in st.latencies
                            if wl != "sqlite" and (wid in run.who) == (origin == "guest")))
        for origin in ("guest", "host")}
    first = first_locks(run.faults, st, run.who)
    windows = [(f.t_ns, max(fl, f.ready_ns)) for f, fl in zip(run.faults, first, strict=True)]
    calm = sorted(lat for t, lat, wl, _ in st.latencies if wl != "sqlite"
                  and not any(a <= t and t - lat <= b for a, b in windows))
    ops = sum(st.ops.values())
    faults = [{
        "kind": f.kind, "target": f.target,
        "at": round((f.t_ns - run.t_start) / sec, 3),
        "recovery_s": round((fl - f.restart_ns) / sec, 4) if fl else None,
        "ready_s": round((f.ready_ns - f.restart_ns) / sec, 4),
        "outage_s": round((fl - f.t_ns) / sec, 4) if fl else None,
        **({"probe": f.probe} if f.probe else {}),
    } for f, fl in zip(run.faults, first, strict=True)]
    out = {
        "config": run.config,
        "seconds": round(duration, 3),
        "operations": ops,
        "ops_per_s": round(ops / duration, 1) if duration else 0.0,
        "workloads": per_wl,
        "latency_us": pcts(lat_guest),
        "latency_by_origin_us": by_origin,
        "max_wait_us": round(lat_all[-1] / 1000, 1) if lat_all else 0.0,
        "max_wait_no_fault_us": round(calm[-1] / 1000, 1) if calm else 0.0,
        "deadlocks": st.deadlocks,
        "violations": n_viol,
        "violation_samples": violations[:30],
        "lost_locks": lost,
        "lost_detail": lost_detail,
        "faults": faults,
        "signals_sent": run.signals_sent,
        "eintr_seen": st.eintr,
        "worker_restarts": run.worker_restarts,
        "workers_left_dead_mount": st.mount_gone,
        "errors": sum(st.errors.values()) + len(run.rig_errors),
        "error_kinds": dict(st.errors),
        "error_samples": run.rig_errors[:10] + st.error_samples[:10],
        "checks": checks_out,
        "workdir": run.workdir,
    }
    if run.vm_summary is not None:
        out["vm_guests"] = run.vm_summary
    # A rig error (a worker that hung, a server that died by itself) is a failure
    # too: a lock manager that stops granting is as broken as one that grants wrongly.
    out["exit_status"] = 1 if (n_viol or lost or run.rig_errors) else 0
    return out

