"""POSIX byte-range lock semantics as pure functions (no I/O).

An owner's locks on one file are a sorted list of disjoint `LockRange`s in which no two
neighbours of the same type touch (Linux merges them). `apply` computes the list after a
lock or unlock request, exactly as fs/locks.c posix_lock_inode() does for one owner.
`Coverage` answers "who holds which type on these bytes" for all owners of a file, so a
conflict check costs O(log n + overlapping segments) however many locks the file has.
"""

from __future__ import annotations

from bisect import bisect_right

from lockd.api import F_RDLCK, F_UNLCK, F_WRLCK, OFFSET_MAX  # noqa: F401 - re-exported
from lockd.structs import NamedTuple  # typing's, without importing typing


class LockRange(NamedTuple):
    start: int
    end: int  # inclusive
    type: int  # F_RDLCK or F_WRLCK


def conflicts(a: int, b: int) -> bool:
    """Two lock types conflict unless both are read locks."""
    return a == F_WRLCK or b == F_WRLCK


def apply(
    locks: list[LockRange], start: int, end: int, type_: int
) -> tuple[list[LockRange], list[LockRange], list[LockRange]]:
    """The owner's lock list after locking [start, end] with type_ (F_UNLCK unlocks).

    Returns (new_locks, removed, added): removed/added are the entries that left/joined
    the list, for journalling and for the coverage map. `locks` is not modified.
    """
    # The two cases of an uncontended lock+unlock, answered without the general walk:
    # an owner's first lock on the file, and unlocking all of its only range.
    if not locks:
        if type_ == F_UNLCK:
            return locks, [], []
        r = LockRange(start, end, type_)
        return [r], [], [r]
    if type_ == F_UNLCK and len(locks) == 1:
        r = locks[0]
        if start <= r.start and r.end <= end:
            return [], [r], []
    # Entries that touch [start-1, end+1] can merge with or be cut by the request.
    lo = start - 1
    hi = end + 1
    i = bisect_right(locks, (lo,)) - 1  # first entry that may reach lo
    if i < 0 or locks[i].end < lo:
        i += 1
    j = i
    n = len(locks)
    while j < n and locks[j].start <= hi:
        j += 1
    affected = locks[i:j]
    if not affected and type_ == F_UNLCK:
        return locks, [], []
    new_start, new_end = start, end
    middle: list[LockRange] = []
    for r in affected:
        if r.type == type_:
            # Same type, overlapping or adjacent: absorb into the new lock.
            if r.start < new_start:
                new_start = r.start
            if r.end > new_end:
                new_end = r.end
        else:
            # Different type (or unlock): keep only the parts outside [start, end].
            if r.start < start:
                middle.append(LockRange(r.start, start - 1, r.type))
            if r.end > end:
                middle.append(LockRange(end + 1, r.end, r.type))
    if type_ != F_UNLCK:
        middle.append(LockRange(new_start, new_end, type_))
        middle.sort()
    if middle == affected:
        return locks, [], []
    new_locks = locks[:i] + middle + locks[j:]
    removed = [r for r in affected if r not in middle]
    added = [r for r in middle if r not in affected]
    return new_locks, removed, added


def find(locks: list[LockRange], offset: int) -> LockRange | None:
    """The owner's lock covering `offset`, if any."""
    i = bisect_right(locks, (offset, OFFSET_MAX + 1)) - 1
    if i >= 0 and locks[i].end >= offset:
        return locks[i]
    return None


def overlapping(locks: list[LockRange], start: int, end: int) -> list[LockRange]:
    """The owner's locks that overlap [start, end]."""
    i = bisect_right(locks, (start,)) - 1
    if i < 0 or locks[i].end < start:
        i += 1
    out = []
    while i < len(locks) and locks[i].start <= end:
        out.append(locks[i])
        i += 1
    return out


class Coverage:
    """Per-file map from byte segments to {owner: type}, for conflict queries.

    Segment k covers [bounds[k], bounds[k+1]-1] (the last one to OFFSET_MAX); its holders
    dict is None when nobody holds those bytes. Neighbouring segments with equal holders
    are merged, so the map stays as small as the lock layout allows.
    """

    __slots__ = ("bounds", "holders")

    def __init__(self) -> None:
        self.bounds: list[int] = [0]
        self.holders: list[dict | None] = [None]

    def __len__(self) -> int:
        return len(self.bounds)

    def _split(self, x: int) -> int:
        bounds = self.bounds
        k = bisect_right(bounds, x) - 1
        if bounds[k] == x:
            return k
        h = self.holders[k]
        bounds.insert(k + 1, x)
        self.holders.insert(k + 1, None if h is None else dict(h))
        return k + 1

    def set(self, owner: object, start: int, end: int, type_: int) -> None:
        """Record that `owner` holds [start, end] with type_ (F_UNLCK: holds nothing)."""
        i = self._split(start)
        j = self._split(end + 1) if end < OFFSET_MAX else len(self.bounds)
        holders = self.holders
        for k in range(i, j):
            h = holders[k]
            if type_ == F_UNLCK:
                if h is not None and owner in h:
                    if len(h) == 1:
                        holders[k] = None
                    else:
                        del h[owner]
            elif h is None:
                holders[k] = {owner: type_}
            else:
                h[owner] = type_
        self._coalesce(max(i - 1, 0), min(j + 1, len(self.bounds)))

    def _coalesce(self, lo: int, hi: int) -> None:
        bounds, holders = self.bounds, self.holders
        k = hi - 1
        while k > lo:
            if holders[k] == holders[k - 1]:
                del bounds[k]
                del holders[k]
            k -= 1

    def conflicting(self, owner: object, start: int, end: int, type_: int) -> dict:
        """{other_owner: [(seg_start, seg_end, type), ...]} holding bytes of [start, end]
        in a type that conflicts with type_."""
        bounds, holders = self.bounds, self.holders
        k = bisect_right(bounds, start) - 1
        n = len(bounds)
        found: dict = {}
        while k < n and bounds[k] <= end:
            h = holders[k]
            if h is not None:
                for o, t in h.items():
                    if o != owner and (t == F_WRLCK or type_ == F_WRLCK):
                        seg_end = bounds[k + 1] - 1 if k + 1 < n else OFFSET_MAX
                        found.setdefault(o, []).append(
                            (max(bounds[k], start), min(seg_end, end), t)
                        )
            k += 1
        return found

    def has_conflict(self, owner: object, start: int, end: int, type_: int) -> bool:
        bounds, holders = self.bounds, self.holders
        k = bisect_right(bounds, start) - 1
        n = len(bounds)
        write = type_ == F_WRLCK
        while k < n and bounds[k] <= end:
            h = holders[k]
            if h is not None:
                for o, t in h.items():
                    if o != owner and (write or t == F_WRLCK):
                        return True
            k += 1
        return False

    def is_empty(self) -> bool:
        return len(self.bounds) == 1 and self.holders[0] is None


# Owners checked one by one from their own lists before they are folded into the map.
FRESH_MAX = 8


class FileLocks:
    """The POSIX locks of every owner on one file.

    Conflict queries look at the coverage map for long-standing owners and at the lists of
    "fresh" owners (at most FRESH_MAX, each an O(log n) bisect). An owner that appears
    starts fresh, so the common churn (take a lock, release it, owner gone) never touches
    the map, however many locks others hold on the file; fresh owners are folded into the
    map when there are too many of them. Invariant: the map holds exactly the owners that
    are not fresh (no map: every owner is fresh)."""

    __slots__ = ("owners", "cov", "fresh", "unsettled")

    def __init__(self) -> None:
        self.owners: dict[object, list[LockRange]] = {}
        self.cov: Coverage | None = None
        self.fresh: set = set()
        self.unsettled = False  # restore() added owners without folding them yet

    def restore(self, owner: object, locks: list[LockRange]) -> None:
        """Install an owner's whole (sorted, disjoint, merged) list at once, as recovery
        does for 100,000 journaled locks; folding into the map waits for the first query."""
        if locks:
            self.owners[owner] = locks
            self.fresh.add(owner)
            self.unsettled = True

    def _settle(self) -> None:
        self.unsettled = False
        if len(self.fresh) > FRESH_MAX:
            self._fold()

    def __bool__(self) -> bool:
        return bool(self.owners)

    def update(self, owner: object, new: list[LockRange], start: int, end: int, type_: int,
               removed: list[LockRange]) -> None:
        """Store the owner's list computed by `apply(old, start, end, type_)`."""
        if self.unsettled:
            self._settle()
        owners = self.owners
        fresh = self.fresh
        cov = self.cov
        if cov is not None and owner in owners and owner not in fresh:
            # An owner the map holds: keep the map exact.
            if new:
                owners[owner] = new
            else:
                del owners[owner]
            if len(owners) <= 1:
                self.cov = None  # one owner conflicts with nobody: drop the map
                fresh.clear()
                fresh.update(owners)
            elif type_ == F_UNLCK:
                # Only where the owner held something: a whole-file unlock stays cheap.
                for r in removed:
                    cov.set(owner, max(r.start, start), min(r.end, end), F_UNLCK)
            else:
                cov.set(owner, start, end, type_)
        elif new:
            owners[owner] = new
            fresh.add(owner)
            if len(fresh) > FRESH_MAX:
                self._fold()
        else:
            owners.pop(owner, None)
            fresh.discard(owner)

    def _fold(self) -> None:
        """Move every fresh owner into the coverage map."""
        cov = self.cov
        if cov is None:
            cov = self.cov = Coverage()
        for o in self.fresh:
            for r in self.owners[o]:
                cov.set(o, r.start, r.end, r.type)
        self.fresh.clear()

    def conflicting(self, owner: object, start: int, end: int, type_: int) -> dict:
        """{other_owner: [(start, end, type), ...]} of the parts of [start, end] that other
        owners hold in a type conflicting with type_."""
        if self.unsettled:
            self._settle()
        found = {} if self.cov is None else self.cov.conflicting(owner, start, end, type_)
        owners = self.owners
        for o in self.fresh:
            if o != owner:
                for r in overlapping(owners[o], start, end):
                    if r.type == F_WRLCK or type_ == F_WRLCK:
                        found.setdefault(o, []).append(
                            (max(r.start, start), min(r.end, end), r.type))
        return found

    def has_conflict(self, owner: object, start: int, end: int, type_: int) -> bool:
        if self.unsettled:
            self._settle()
        if self.cov is not None and self.cov.has_conflict(owner, start, end, type_):
            return True
        fresh = self.fresh
        if not fresh or (len(fresh) == 1 and owner in fresh):
            return False
        owners = self.owners
        write = type_ == F_WRLCK
        for o in fresh:
            if o != owner:
                # overlapping() without building its list
                locks = owners[o]
                i = bisect_right(locks, (start,)) - 1
                if i < 0 or locks[i].end < start:
                    i += 1
                n = len(locks)
                while i < n and locks[i].start <= end:
                    if write or locks[i].type == F_WRLCK:
                        return True
                    i += 1
        return False


def restore_steps(
    before: list[LockRange], start: int, end: int
) -> list[tuple[int, int, int]]:
    """Host calls that put [start, end] back to what `before` held there (used to undo a
    grant that lost a race with cancellation). Pieces held before are converted in place
    and only the gaps are unlocked, so no byte the owner held is ever let go."""
    steps: list[tuple[int, int, int]] = []
    pos = start
    for r in overlapping(before, start, end):
        s, e = max(r.start, start), min(r.end, end)
        if s > pos:
            steps.append((pos, s - 1, F_UNLCK))
        steps.append((s, e, r.type))
        pos = e + 1
    if pos <= end:
        steps.append((pos, end, F_UNLCK))
    return steps


def weaker(now: list[LockRange], journaled: list[LockRange]) -> list[tuple[int, int, int]]:
    """(start, end, type) steps that bring `now` down to the byte-wise weaker of `now`
    and `journaled` (unlocked < read < write); each step unlocks or downgrades."""
    steps: list[tuple[int, int, int]] = []
    for r in now:
        pos = r.start
        for j in overlapping(journaled, r.start, r.end):
            s, e = max(j.start, r.start), min(j.end, r.end)
            if s > pos:
                steps.append((pos, s - 1, F_UNLCK))
            if j.type < r.type:
                steps.append((s, e, j.type))
            pos = e + 1
        if pos <= r.end:
            steps.append((pos, r.end, F_UNLCK))
    return steps
