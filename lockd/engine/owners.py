"""The owner table: who holds which lock on each file, written in one place.

A file's lock state is three maps on its FileState and two tallies on each GuestState:

- `f.locks`   (guest, owner) -> its POSIX ranges (ranges.FileLocks)
- `f.flocks`  (guest, fh) -> the flock type it holds
- `f.pids`    owner/fh key -> the pid the holder last locked with (GETLK, snapshot)
- `g.nlocks`  POSIX ranges plus flocks the guest holds (Limits.max_locks)
- `g.flock_files`  (guest, fh) -> the file it holds a flock on (release_flock)

OwnerTable is the only code that writes any of the five. Each of its calls changes all
of them together and queues the journal record that says the same, so a lock cannot be
taken, converted, dropped, handed over or restored without being counted and journaled
alike. Everybody else reads them freely (under the manager's mutex).

Contract, for every method (in the manner of fs/locks.c's comments):
- the caller holds the manager's mutex;
- the host lock is already what the call records: the table never calls the kernel, it
  records what the caller did there (or, for restore and hand_off, what the kernel or
  a duplicate description holds anyway);
- limits are the caller's to check before it takes the host lock (`g.nlocks` says how
  many the guest holds);
- the change is queued for the journal through `record` (the durability part's `record`)
  unless the method says otherwise; nothing is written before the caller's transaction
  ends.
"""

from __future__ import annotations

from collections.abc import Callable

from lockd.api import F_UNLCK, OFFSET_MAX
from lockd.engine.ranges import LockRange, apply
from lockd.engine.state import FLOCK, POSIX, FileState, GuestState
from lockd.journal import ops as J

_NO_LOCKS: tuple = ()


class OwnerTable:
    """The only writer of the files' `locks`, `flocks`, `pids` and the guests' `nlocks`,
    `flock_files` (see the module docstring)."""

    __slots__ = ("_record", "_counters", "_journaled")

    def __init__(self, record: Callable[[tuple], None], counters: dict,
                 journaled: bool) -> None:
        """`record` queues a journal record; `counters` is the manager's counter dict
        (locks_granted); `journaled`: there is a journal (else no record is built)."""
        self._record = record
        self._counters = counters
        self._journaled = journaled

    # ------------------------------------------------------------ POSIX
    def set_posix(self, g: GuestState, key: tuple, f: FileState, new: list, removed: list,
                  added: list, start: int, end: int, type_: int, pid: int) -> None:
        """Record one lock or unlock of [start, end] that `ranges.apply` computed from the
        owner's current list (`new`, `removed`, `added`). A lock counts as granted and
        sets the holder's pid; an unlock that leaves nothing forgets the pid. Journaled
        when it changed anything."""
        f.locks.update(key, new, start, end, type_, removed)
        g.nlocks += len(added) - len(removed)
        if type_ != F_UNLCK:
            f.pids[key] = pid
            self._counters["locks_granted"] += 1
        elif not new:
            f.pids.pop(key, None)
        if self._journaled and (removed or added):
            self._record(J.LockRows(key[0], key[1], f, removed, added, pid))

    def drop_posix(self, g: GuestState, key: tuple, f: FileState) -> list[LockRange]:
        """Forget every range the owner holds on the file (journaled as removed); the
        ranges it held."""
        held = list(f.locks.owners.get(key, _NO_LOCKS))
        if held:
            self.set_posix(g, key, f, [], held, [], 0, OFFSET_MAX, F_UNLCK, 0)
        return held

    def merge_posix(self, g: GuestState, key: tuple, f: FileState,
                    ranges: list[tuple[int, int, int]], pid: int) -> None:
        """Add ranges the owner's description already holds on the host (an adopted
        description): each is applied over what the owner has, journaled one record
        per range; `pid` becomes the holder's."""
        new = list(f.locks.owners.get(key, _NO_LOCKS))
        for s, e, t in ranges:
            new, removed, added = apply(new, s, e, t)
            f.locks.update(key, new, s, e, t, removed)
            g.nlocks += len(added) - len(removed)
            if self._journaled:
                self._record(J.LockRows(key[0], key[1], f, tuple(removed), tuple(added),
                                        pid))
        f.pids[key] = pid

    def take_back_posix(self, g: GuestState, key: tuple, f: FileState,
                        steps: list[tuple[int, int, int]]) -> None:
        """Apply unlock/downgrade steps the caller made on the host (a rollback), each
        journaled with the owner's pid; an owner left with nothing loses its pid."""
        pid = f.pids.get(key, 0)
        for s, e, t in steps:
            cur = f.locks.owners.get(key, _NO_LOCKS)
            new, removed, added = apply(cur, s, e, t)
            f.locks.update(key, new, s, e, t, removed)
            g.nlocks += len(added) - len(removed)
            if self._journaled:
                self._record(J.LockRows(key[0], key[1], f, tuple(removed), tuple(added),
                                        pid))
        if key not in f.locks.owners:
            f.pids.pop(key, None)

    def restore_posix(self, g: GuestState, key: tuple, f: FileState,
                      held: list[LockRange], pid: int) -> None:
        """Install an owner's whole list at recovery (sorted, disjoint, merged: as the
        journal or the kernel lists them). Not journaled: the journal holds them, or
        recovery writes its own record. Refused (ValueError) when the owner already
        holds ranges on the file: FileLocks.restore replaces a list, and the guest's
        count would then be off by the old one."""
        if not held:
            return
        if f.locks.owners.get(key):
            raise ValueError(f"restore over held locks of {key} on {f.key}")
        f.locks.restore(key, held)
        g.nlocks += len(held)
        f.pids[key] = pid

    # ------------------------------------------------------------ flock
    def set_flock(self, g: GuestState, key: tuple, f: FileState, type_: int, pid: int,
                  counted: bool = True) -> None:
        """Record a flock the owner's description now holds (granted, or converted: one
        flock per handle). `counted`: a grant (locks_granted); an adopted one is not."""
        if key not in f.flocks:
            g.nlocks += 1
        f.flocks[key] = type_
        g.flock_files[key] = f
        g.files[f.key] = f
        f.pids[key] = pid
        if counted:
            self._counters["locks_granted"] += 1
        if self._journaled:
            self._record(J.FlockRow(key[0], key[1], f, type_, pid))

    def drop_flock(self, g: GuestState, key: tuple, f: FileState) -> int | None:
        """Forget the owner's flock (journaled as an unlock); the type it held, None
        (and nothing written) when it held none."""
        t = f.flocks.pop(key, None)
        if t is None:
            return None
        g.nlocks -= 1
        g.flock_files.pop(key, None)
        f.pids.pop(key, None)
        if self._journaled:
            self._record(J.FlockRow(key[0], key[1], f, F_UNLCK, 0))
        return t

    def restore_flock(self, g: GuestState, key: tuple, f: FileState, type_: int,
                      pid: int) -> None:
        """Install a flock at recovery (not journaled: recovery writes its own record).
        Refused (ValueError) when the handle already holds one."""
        if key in f.flocks:
            raise ValueError(f"restore over a held flock of {key} on {f.key}")
        f.flocks[key] = type_
        g.nlocks += 1
        g.flock_files[key] = f
        f.pids[key] = pid

    # ------------------------------------------------------------ either kind
    def hand_off(self, g: GuestState, kind: str, key: tuple, f: FileState) -> None:
        """Forget the owner's locks without journaling or touching the host: they went
        with a duplicate of its description to whoever adopts them."""
        if kind == POSIX:
            held = f.locks.owners.get(key)
            if held:
                f.locks.update(key, [], 0, OFFSET_MAX, F_UNLCK, list(held))
                g.nlocks -= len(held)
        elif f.flocks.pop(key, None) is not None:
            g.nlocks -= 1
            g.flock_files.pop(key, None)
        f.pids.pop(key, None)

    def set_pid(self, f: FileState, key: tuple, pid: int) -> None:
        """The holder's pid as an adopted description's sender said it."""
        f.pids[key] = pid

    # ------------------------------------------------------------ checking
    @staticmethod
    def audit(guests: dict[str, GuestState], files: dict[tuple, FileState]) -> list[str]:
        """What disagrees between the tallies and the files' tables (empty when the
        table is consistent): each guest's `nlocks` against the ranges and flocks it
        holds on the known files, and its `flock_files` against its flocks."""
        want: dict[str, int] = {}
        fl: dict[str, dict] = {}
        for f in files.values():
            for key, ranges in f.locks.owners.items():
                want[key[0]] = want.get(key[0], 0) + len(ranges)
            for key in f.flocks:
                want[key[0]] = want.get(key[0], 0) + 1
                fl.setdefault(key[0], {})[key] = f
        out = []
        for name in sorted(set(want) | set(guests)):
            g = guests.get(name)
            if g is None:
                out.append(f"guest {name!r} holds locks but has no state")
                continue
            if g.nlocks != want.get(name, 0):
                out.append(f"guest {name!r}: nlocks {g.nlocks}, holds {want.get(name, 0)}")
            if g.flock_files != fl.get(name, {}):
                out.append(f"guest {name!r}: flock_files disagree with the files' flocks")
        return out



def holds(kind: str, key: tuple, f: FileState, type_: int, start: int, end: int) -> bool:
    """Does the owner/fh `key` hold [start, end] at least as strongly as `type_`? (A
    reader of the table, under the manager's mutex.)"""
    if kind == FLOCK:
        t = f.flocks.get(key)
        return t is not None and t >= type_
    pos = start
    for r in f.locks.owners.get(key, ()):
        if r.end < pos:
            continue
        if r.start > pos or r.type < type_:
            return False
        if r.end >= end:
            return True
        pos = r.end + 1
    return False
