"""A byte-level reference model of POSIX locks, for tests: every byte of a small file is
tracked on its own, so nothing here shares logic with lockd.engine.ranges.

Offsets 0..LIMIT-1 are single bytes; byte LIMIT stands for every offset from LIMIT to
OFFSET_MAX (requests never start beyond LIMIT, so those bytes always move together).
"""

from __future__ import annotations

from lockd.api import F_RDLCK, F_UNLCK, F_WRLCK, OFFSET_MAX

LIMIT = 16


def cells(start: int, end: int) -> range:
    return range(start, (LIMIT if end >= LIMIT else end) + 1)


def cell_end(c: int) -> int:
    return OFFSET_MAX if c == LIMIT else c


class ByteModel:
    def __init__(self) -> None:
        self.held: dict[tuple, dict[int, int]] = {}  # (owner, file) -> {cell: type}

    def owners_on(self, file: object) -> list:
        return [o for (o, f) in self.held if f == file]

    def conflicting_owners(self, owner, file, type_, start, end) -> set:
        out = set()
        for (o, f), m in self.held.items():
            if f != file or o == owner:
                continue
            for c in cells(start, end):
                t = m.get(c)
                if t is not None and (t == F_WRLCK or type_ == F_WRLCK):
                    out.add(o)
        return out

    def setlk(self, owner, file, type_, start, end) -> bool:
        if type_ != F_UNLCK and self.conflicting_owners(owner, file, type_, start, end):
            return False
        m = self.held.setdefault((owner, file), {})
        for c in cells(start, end):
            if type_ == F_UNLCK:
                m.pop(c, None)
            else:
                m[c] = type_
        if not m:
            del self.held[(owner, file)]
        return True

    def release(self, owner, file) -> None:
        self.held.pop((owner, file), None)

    def runs(self, owner, file) -> list[tuple[int, int, int]]:
        """The owner's locks as maximal runs of equal type: (start, end, type)."""
        m = self.held.get((owner, file), {})
        out: list[list[int]] = []
        for c in sorted(m):
            if out and out[-1][1] == c - 1 and out[-1][2] == m[c]:
                out[-1][1] = c
            else:
                out.append([c, c, m[c]])
        return [(s, cell_end(e), t) for s, e, t in out]

    def getlk(self, owner, file, type_, start, end):
        """(type, start, end, owner) of the first conflicting lock: lowest start, then
        lowest owner; None when nothing conflicts."""
        best = None
        for o in self.conflicting_owners(owner, file, type_, start, end):
            for s, e, t in self.runs(o, file):
                if s <= end and start <= e and (t == F_WRLCK or type_ == F_WRLCK):
                    cand = (s, o, t, e)
                    if best is None or cand[:2] < best[:2]:
                        best = cand
        if best is None:
            return None
        s, o, t, e = best
        return (t, s, e, o)


LOCK_TYPES = (F_RDLCK, F_WRLCK, F_UNLCK)
