"""The rig's checks, as pure functions over the workers' records (so they can be tested
without mounts): critical-section overlap (sweep line), locks the daemon forgot across a
restart, latency percentiles."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from lockd.api import OFFSET_MAX


@dataclass(frozen=True)
class Section:
    """One critical section of one worker: held from t0 to t1 (ns, monotonic)."""

    worker: str
    t0: int
    t1: int
    file: str
    lo: int
    hi: int  # exclusive; -1 = to end of file
    type: str  # "r" or "w"
    kind: str  # "posix" or "flock"

    @property
    def end(self) -> float:
        return math.inf if self.hi < 0 else self.hi


def conflicts(a: Section, b: Section) -> bool:
    """Would the two holds conflict if held at once? POSIX and flock locks are separate
    spaces on Linux; one worker's own locks never conflict with each other."""
    if a.worker == b.worker or a.file != b.file or a.kind != b.kind:
        return False
    if a.type == "r" and b.type == "r":
        return False
    return a.lo < b.end and b.lo < a.end


def overlaps(sections: Iterable[Section], limit: int = 1000) -> list[tuple[Section, Section]]:
    """Pairs of conflicting sections whose times overlapped: a sweep over start/end events;
    each start is compared with the sections active at that moment (few: one or two per
    worker). Touching intervals (t1 == t0) do not overlap."""
    events: list[tuple[int, int, int]] = []  # (time, 0=end before 1=start, index)
    secs = list(sections)
    for i, s in enumerate(secs):
        events.append((s.t0, 1, i))
        events.append((s.t1, 0, i))
    events.sort()
    active: dict[str, set[int]] = {}
    found: list[tuple[Section, Section]] = []
    for _, is_start, i in events:
        s = secs[i]
        act = active.setdefault(s.file, set())
        if not is_start:
            act.discard(i)
            continue
        for j in act:
            if conflicts(s, secs[j]):
                found.append((secs[j], s))
                if len(found) >= limit:
                    return found
        act.add(i)
    return found


def percentile(sorted_values: list[int], p: float) -> int:
    """Nearest-rank percentile of an already sorted list (0 for an empty one)."""
    if not sorted_values:
        return 0
    k = max(0, min(len(sorted_values) - 1, math.ceil(p / 100 * len(sorted_values)) - 1))
    return sorted_values[k]


def covered(rows: list[dict], lo: int, hi: int, want: str) -> bool:
    """Do these lock rows (one owner's, from `vfs-lockd locks --json`) cover [lo, hi) with
    a strong enough type? Adjacent rows count together (the manager may split/merge)."""
    end = OFFSET_MAX if hi < 0 else hi - 1
    spans = sorted((r["start"], r["end"]) for r in rows
                   if want == "r" or str(r.get("type", "")).upper().startswith("W"))
    pos = lo
    for s, e in spans:
        if s > pos:
            break
        pos = max(pos, e + 1 if e < OFFSET_MAX else OFFSET_MAX + 1)
        if pos > end:
            return True
    return pos > end


def forgotten_locks(sections: Iterable[Section], kill_ns: int, snap_done_ns: int,
                    snapshot: dict, who: dict[str, tuple[str, int]],
                    file_ids: dict[str, tuple[int, int]]) -> list[Section]:
    """Sections a guest worker held from before a daemon kill until after the restarted
    daemon's lock table was read, but which that table does not show: the guest still
    believes it holds the lock, the daemon does not (a lost lock, silent). `who` maps a
    worker to (guest, pid); host workers are absent (the host kernel keeps their locks)."""
    held = snapshot.get("locks", [])
    out = []
    for s in sections:
        if not (s.t0 < kill_ns and s.t1 > snap_done_ns) or s.worker not in who:
            continue
        guest, pid = who[s.worker]
        dev_ino = file_ids.get(s.file)
        rows = [r for r in held if r.get("guest") == guest and r.get("kind") == s.kind
                and (dev_ino is None or (r.get("dev"), r.get("ino")) == dev_ino)
                and r.get("pid") in (pid, 0, None)]
        if not covered(rows, s.lo, s.hi, s.type):
            out.append(s)
    return out
