"""LockManager: guests' POSIX and flock locks mapped onto host open-file-description locks.

One mutex guards all state; nothing inside it blocks (only non-blocking F_OFD_SETLK /
flock(LOCK_NB) calls, dict and list work). Opening a new description happens before the
critical section; journal writes and answers after it. A request that conflicts with a
managed holder waits in the file's FIFO queue; one that conflicts only with a host holder
waits in a thread blocked in F_OFD_SETLKW on the owner's own description, which the kernel
wakes as soon as the host lock goes, and which a signal interrupts to cancel it.

The engine is split by job. This module is the conflict, queue and deadlock engine and
the public LockService API. It holds three parts, one object each, made with what they
need; a part never reaches into the manager, and calls it only through the one function
it was given (the arrows are every call between them):

    LockManager -> OwnerTable   -> Durability.record
                -> Descriptions -> Durability (record, keep, unkeep)
                -> Durability   -> take_back, given by the manager (undo the grants of a
                                   failed journal write: the manager's policy)
                -> hostwait     -> the function each wait thread was started with

- lockd/engine/state.py         the state: files, descriptions, guests, waits
- lockd/engine/owners.py        OwnerTable: the only writer of who holds what (locks,
                                flocks, pids, the guests' counts), with its journal record
- lockd/engine/descriptions.py  Descriptions: files and the descriptions that carry locks;
                                the fd budget
- lockd/engine/durability.py    Durability and Txn: journaled before the reply, keeper,
                                leases, rollback, final answers
- lockd/engine/hostwait.py      waiting for host holders (threads in the kernel)
- lockd/engine/recovery.py      re-taking every lock after a crash, through public calls
- lockd/engine/ranges.py        pure byte-range semantics
- lockd/engine/ofd.py           the host lock calls
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import threading
import time
from bisect import bisect_right
from collections.abc import Callable, Iterable
from fcntl import LOCK_EX, LOCK_NB, LOCK_SH, LOCK_UN
from itertools import count

from lockd import procfd
from lockd.api import (
    F_RDLCK,
    F_UNLCK,
    F_WRLCK,
    NO_CONFLICT,
    OFFSET_MAX,
    QUEUED,
    TYPE_NAMES,
    Conflict,
    Limits,
    WaitCallback,
)
from lockd.engine import hostwait, ofd
from lockd.engine.descriptions import SPARE_DESCRIPTIONS, Descriptions
from lockd.engine.durability import Durability, Txn, lease_key
from lockd.engine.owners import OwnerTable, holds
from lockd.engine.ranges import FileLocks, LockRange, apply, conflicts, find, weaker
from lockd.engine.state import (
    FLOCK,
    POSIX,
    Denied,
    Description,
    FileState,
    GuestState,
    NeedDescription,
    Wait,
)
from lockd.journal import ops as J

__all__ = ["LockManager", "SPARE_DESCRIPTIONS", "POSIX", "FLOCK"]

log = logging.getLogger("lockd.manager")


class LockManager:
    """The lock manager (implements lockd.api.LocalLockService).

    It holds three parts, each with its own job and public calls, none of which
    reaches into the manager (what a part needs is given to it when it is made; the
    one call back is Durability's `take_back`, see `_take_back`):
    `durable` (Durability: the transaction, journal and keeper), `descs`
    (Descriptions: files, descriptions, the descriptor budget) and `table`
    (OwnerTable: the only writer of who holds what). The manager itself decides:
    conflicts, queues, deadlocks, limits, release, delegation, lost locks."""

    def __init__(self, limits: Limits | None = None, journal: object | None = None,
                 lease_s: float = 0.0) -> None:
        """`lease_s` > 0: changes to an owner's locks under a lease are journaled behind
        the replies (see lockd.engine.durability; for a manager with a descriptor
        keeper, or one whose journal is never recovered)."""
        self.limits = limits or Limits()
        self._mu = mu = threading.Lock()  # the one mutex, shared with the parts
        self._guests: dict[str, GuestState] = {}
        self._files: dict[tuple, FileState] = {}  # filled by descs, read here
        self._waits: dict[int, Wait] = {}
        self._owner_waits: dict[tuple, list[Wait]] = {}
        self._ids = count(1)
        self._lost: dict[tuple, dict] = {}  # (guest, key, file key) -> lost lock record
        self._started = time.monotonic()
        self.counters = dict.fromkeys(
            (
                "locks_granted", "locks_denied", "waits_started", "waits_granted",
                "waits_cancelled", "deadlocks", "evictions", "enolck", "lost_locks",
            ),
            0,
        )
        self.durable = Durability(mu, self._files, journal, lease_s, self._take_back)
        self.descs = Descriptions(mu, self.limits, self.counters, self._files, self._guests,
                                  self.durable)
        # The only writer of the files' locks, flocks and pids and the guests' counts.
        self.table = OwnerTable(self.durable.record, self.counters, journal is not None)
        ofd.install_wake_signal(ofd.WAKE_SIGNAL)

    # ------------------------------------------------------------------ the parts' doors
    def file(self, fd: int, path: str | None = None, guest: str | None = None) -> FileState:
        """Register the file open at `fd` (see Descriptions.file)."""
        return self.descs.file(fd, path, guest)

    def put_file(self, ref: FileState) -> None:
        self.descs.put_file(ref)

    @property
    def keeper(self) -> object | None:
        """The descriptor keeper every description is mirrored into (None: none)."""
        return self.durable.keeper

    @keeper.setter
    def keeper(self, keeper: object | None) -> None:
        self.durable.keeper = keeper

    @property
    def journal_error(self) -> str | None:
        """Why the last journal write failed while it still fails (new locks: ENOLCK)."""
        return self.durable.journal_error

    @property
    def journaled(self) -> bool:
        return self.durable.journal is not None

    @property
    def journal_failures(self) -> int:
        """Journal batches that failed and were rolled back since start."""
        return self.durable.rollbacks

    @property
    def lease_s(self) -> float:
        return self.durable.lease_s

    @property
    def nonblocking(self) -> bool:
        """True when no call blocks its caller for long, so a transport may answer lock
        requests on its reading thread. Every request is answered from memory and
        non-blocking host lock calls; durability adds an append to the change log (a
        page-cache write, no fsync) and a datagram to the keeper, both short."""
        return True

    def flush_durable(self, end_leases: bool = False) -> None:
        """Make every change so far survive a crash (see Durability.flush_durable)."""
        self.durable.flush_durable(end_leases)

    def holds(self, guest: str, kind: str, owner: int, ref: FileState, type_: int,
              start: int = 0, end: int = OFFSET_MAX) -> bool:
        """Does (guest, owner|fh) hold [start, end] at least as strongly as type_?"""
        with self._mu:
            return holds(kind, (guest, owner), ref, type_, start, end)

    def _txn(self) -> Txn:
        return self.durable.txn()

    # ------------------------------------------------------------------ helpers
    def _guest(self, name: str) -> GuestState:
        g = self._guests.get(name)
        if g is None:
            g = self._guests[name] = GuestState(name)
        return g

    def _run(self, t: Txn, fn: Callable, *args) -> int:
        """Run fn(*args, spare, done, closing) in transaction t, opening a description
        outside the mutex when fn asks for one (args[2] is the file). t ends here; the
        caller's reply is t.answer(rc, ...)."""
        t.spare = spare = []
        try:
            while True:
                try:
                    return fn(*args, spare, t.done, t.closing)
                except NeedDescription:  # raised before any state changed: safe to redo
                    pass
                t.leave()
                try:
                    spare.append(self.descs.open_fd(args[2]))
                finally:
                    t.begin()
        except Denied as exc:
            return exc.err
        finally:
            t.end()

    # ------------------------------------------------------------------ queries
    def getlk(self, guest: str, owner: int, ref: FileState, type_: int, start: int,
              end: int) -> Conflict | int:
        """The first lock in the way of `type_` on [start, end]; for F_UNLCK (Linux 6.7's
        F_OFD_GETLK extension) the owner's own first lock overlapping it."""
        if type_ not in _LOCK_TYPES or not 0 <= start <= end <= OFFSET_MAX:
            return errno.EINVAL
        key = (guest, owner)
        if type_ == F_UNLCK:
            with self._mu:
                r = next((r for r in ref.locks.owners.get(key, ()) if r.end >= start
                          and r.start <= end), None)
                if r is None:
                    return NO_CONFLICT
                return Conflict(r.type, r.start, r.end, ref.pids.get(key, 0), guest)
        with self._mu:
            first = _first_conflict(ref.locks, key, start, end, type_)
            if first is not None:
                r, o = first
                holder = self._holder_pid(o, ref)
                return Conflict(r.type, r.start, r.end, holder, o[0])
            d = ref.descs.get((POSIX, guest, owner))
            fd = d.fd if d is not None else ref.path_fd
        # No managed holder: ask the kernel about host holders.
        return self._host_getlk(fd, ref, type_, start, end)

    def _holder_pid(self, okey: tuple, f: FileState) -> int:
        return f.pids.get(okey, 0)

    def _host_getlk(self, fd: int, f: FileState, type_: int, start: int, end: int
                    ) -> Conflict | int:
        own = fd == f.path_fd
        if own:  # an O_PATH fd cannot ask the kernel: borrow a plain one
            try:
                fd = os.open(procfd.path(f.path_fd), os.O_RDONLY | os.O_CLOEXEC
                             | os.O_NONBLOCK)
            except OSError as exc:
                return exc.errno or errno.EIO
        try:
            res = ofd.getlk(fd, type_, start, end)
            if isinstance(res, int):
                return res
            t, s, e, pid = res
            if t == F_UNLCK:
                return NO_CONFLICT
            if pid <= 0:
                # An OFD holder has no pid; a classic POSIX holder's pid is worth asking.
                res2 = ofd.posix_getlk(fd, type_, start, end)
                if not isinstance(res2, int) and res2[0] != F_UNLCK and res2[3] > 0:
                    t, s, e, pid = res2
                pid = max(pid, 0)
            return Conflict(t, s, e, pid, None)
        finally:
            if own:
                os.close(fd)

    # ------------------------------------------------------------------ POSIX locks
    def setlk(self, guest: str, owner: int, ref: FileState, type_: int, start: int, end: int,
              pid: int) -> int:
        if type_ not in _LOCK_TYPES or not 0 <= start <= end <= OFFSET_MAX:
            return errno.EINVAL
        # The hot path: the same locked body as _run without its retry loop. Only when a
        # description has to be opened first (the file's spare pool is empty) does it go
        # round _run, which opens one outside the mutex. Txn(self.durable) takes the mutex and
        # t.end() leaves it (not `with`: that costs as much again as the mutex here).
        t = Txn(self.durable)
        try:
            rc = self._setlk_locked(guest, owner, ref, type_, start, end, pid, None, None,
                                    _NO_SPARE, t.done, t.closing)
        except NeedDescription:  # raised before any state changed: safe to redo
            rc = None
        except Denied as exc:
            rc = exc.err
        finally:
            moved = t.end()
        if rc is None:
            t = Txn(self.durable)
            rc = self._run(t, self._setlk_locked, guest, owner, ref, type_, start, end, pid,
                           None, None)
            moved = True  # t.answer compares the generation itself
        return t.answer(rc, POSIX, guest, owner, ref, type_, start, end) if moved else rc

    def setlkw(self, guest: str, owner: int, ref: FileState, type_: int, start: int, end: int,
               pid: int, callback: WaitCallback, tag: int | None = None) -> int:
        if type_ not in _LOCK_TYPES or not 0 <= start <= end <= OFFSET_MAX:
            return errno.EINVAL
        t = Txn(self.durable)
        rc = self._run(t, self._setlk_locked, guest, owner, ref, type_, start, end, pid,
                       callback, tag)
        return t.answer(rc, POSIX, guest, owner, ref, type_, start, end)

    def _setlk_locked(self, guest: str, owner: int, f: FileState, type_: int, start: int,
                      end: int, pid: int, callback: WaitCallback | None, tag: int | None,
                      spare: list, done: list, closing: list) -> int:
        key = (guest, owner)
        g = self._guests.get(guest) or self._guest(guest)
        if tag is not None or self._lost:
            rc = self._answered_early(g, key, f, type_, callback, tag)
            if rc is not None:
                return rc
        if type_ == F_UNLCK:
            lost = self._unlock_posix(g, key, f, start, end, closing)
            if f.queue:
                self._grant_waiters(f, done, closing)
            return errno.EIO if lost else 0
        if self.durable.journal_error is not None:
            self.counters["enolck"] += 1
            return errno.ENOLCK
        # Cheap pre-check (no other owner, or none in the way, and no queue) before
        # collecting the blockers and earlier waits that a conflict needs.
        locks = f.locks
        if f.queue or (locks.owners and locks.has_conflict(key, start, end, type_)):
            if (callback is not None and len(g.waits) >= self.limits.max_waiters
                    and locks.has_conflict(key, start, end, type_)):
                # It would have to wait and the guest is at its waiter limit: answer now,
                # before the deadlock walk (as costly as the guest has waits).
                self.counters["enolck"] += 1
                return errno.ENOLCK
            blockers, queued = self._posix_blockers(key, f, type_, start, end)
            if blockers or queued:
                return self._block(g, key, POSIX, f, type_, start, end, pid, callback, tag,
                                   blockers, queued, done)
        dkey = (POSIX, guest, owner)
        d = f.descs.get(dkey) or self.descs.take(f, dkey, g, key, spare)
        converts = bool(f.queue) and key in locks.owners
        rc = self._grant_posix(g, key, f, d, type_, start, end, pid)
        if rc == 0 and converts:
            # The owner changed locks it held (a downgrade, split, merge or upgrade):
            # what it gave up may be what a waiter waits for (fs/locks.c wakes the
            # waiters of every lock a request modifies).
            self._grant_waiters(f, done, closing)
        if rc in ofd.REVOKED:  # revoked by a cluster file system: see _revoked
            return self._revoked(g, key, POSIX, f, d, closing)
        if rc == errno.EAGAIN:
            if callback is None:
                self.counters["locks_denied"] += 1
                self.descs.release(f, dkey, g, key, closing)
                return rc
            return self._queue(g, key, POSIX, f, type_, start, end, pid, callback, tag, done,
                               host=True)
        if rc:
            self.descs.release(f, dkey, g, key, closing)
        return rc

    def _grant_posix(self, g: GuestState, key: tuple, f: FileState, d: Description,
                     type_: int, start: int, end: int, pid: int) -> int:
        """Take the lock on the host and record it; EAGAIN when a host holder has it."""
        locks = f.locks.owners.get(key, _NO_LOCKS)
        new, removed, added = apply(locks, start, end, type_)
        if g.nlocks + len(added) - len(removed) > self.limits.max_locks:
            self.counters["enolck"] += 1
            return errno.ENOLCK
        if type_ == F_WRLCK and not d.writable:
            return errno.EBADF
        rc = ofd.setlk(d.fd, type_, start, end)
        if rc:
            return rc
        self.table.set_posix(g, key, f, new, removed, added, start, end, type_, pid)
        return 0

    def _unlock_posix(self, g: GuestState, key: tuple, f: FileState, start: int, end: int,
                      closing: list) -> bool:
        """Unlock on the host and in the table; True when the owner's locks on the file
        turned out to be lost (see _revoked): then all of them are dropped."""
        locks = f.locks.owners.get(key)
        if not locks:
            return False
        new, removed, added = apply(locks, start, end, F_UNLCK)
        dkey = (POSIX, key[0], key[1])
        if removed or added:
            d = f.descs.get(dkey)
            if d is not None and ofd.setlk(d.fd, F_UNLCK, start, end) in ofd.REVOKED:
                return self._revoked(g, key, POSIX, f, d, closing) == errno.EIO
            self.table.set_posix(g, key, f, new, removed, added, start, end, F_UNLCK, 0)
        if not new:
            self.descs.release(f, dkey, g, key, closing)
        return False

    def _revoked(self, g: GuestState, key: tuple, kind: str, f: FileState, d: Description,
                 closing: list | None) -> int:
        """A host lock call on the owner's description failed with an errno of
        ofd.REVOKED: a cluster file system gave the description's locks to another host
        while this one was cut off (GlusterFS with client.strict-locks fails every later
        call on it with EBADFD).

        Every lock the owner held on the file is recorded lost (journal `lost` table as
        already reported, counter, log) and dropped from the table; the caller tells the
        owner EIO now, once. The description is closed, never reused, and so are the
        file's spare ones (they may be revoked too): GlusterFS refuses every new open of
        the file on this host while a revoked description of it is open. Returns EIO
        when something was lost, else ENOLCK (a stale spare: the next request opens a
        fresh description)."""
        if kind == POSIX:
            held = list(f.locks.owners.get(key, ()))
        else:
            t = f.flocks.get(key)
            held = [] if t is None else [LockRange(0, OFFSET_MAX, t)]
        pid = f.pids.get(key, 0)
        for r in held:
            at = time.time()
            self.durable.record(J.LostLock(key[0], kind, key[1], f, None, r.start, r.end,
                                           r.type, pid, f.path, at, True))
            self.counters["lost_locks"] += 1
            log.warning("lost lock (revoked by the cluster file system) %s", {
                "guest": key[0], "kind": kind, "owner": key[1], "start": r.start,
                "end": r.end, "type": TYPE_NAMES[r.type], "pid": pid, "path": f.path})
        self.descs.retire(d)  # release() closes it instead of keeping it
        if kind == POSIX:
            self.table.drop_posix(g, key, f)
        else:
            self.table.drop_flock(g, key, f)
        if closing is not None:
            self.descs.release(f, (kind, key[0], key[1]), g, key, closing)
            self.descs.close_spares(f, closing)
        return errno.EIO if held else errno.ENOLCK

    def _posix_blockers(self, key: tuple, f: FileState, type_: int, start: int, end: int,
                        upto: Wait | None = None) -> tuple[set, list]:
        """Managed holders in the way, and the earlier waits this request queues behind
        (fairness), leaving out waits that themselves wait for this owner (that would be
        a deadlock of our own making)."""
        found = f.locks.conflicting(key, start, end, type_) if f.locks else {}
        queued: list[Wait] = []
        for w in f.queue:
            if w is upto:
                break
            if (w.kind == POSIX and w.key != key and w.start <= end and start <= w.end
                    and conflicts(w.type, type_) and not self._reaches({w.key}, key)):
                queued.append(w)
        return set(found), queued

    # ------------------------------------------------------------------ waiting
    def _block(self, g: GuestState, key: tuple, kind: str, f: FileState, type_: int,
               start: int, end: int, pid: int, callback: WaitCallback | None,
               tag: int | None, blockers: set, queued: list, done: list) -> int:
        if callback is None:
            self.counters["locks_denied"] += 1
            return errno.EAGAIN
        if kind == POSIX and blockers and self._reaches(blockers, key):
            self.counters["deadlocks"] += 1
            return errno.EDEADLK
        return self._queue(g, key, kind, f, type_, start, end, pid, callback, tag, done)

    def _queue(self, g: GuestState, key: tuple, kind: str, f: FileState, type_: int,
               start: int, end: int, pid: int, callback: WaitCallback, tag: int | None,
               done: list, host: bool = False) -> int:
        if len(g.waits) >= self.limits.max_waiters:
            self.counters["enolck"] += 1
            return errno.ENOLCK
        w = Wait(next(self._ids), g.name, key, kind, f, type_, start, end, pid, callback, tag)
        f.queue.append(w)
        g.waits[w.id] = w
        g.files[f.key] = f
        if tag is not None:
            g.tags[tag] = w
        self._waits[w.id] = w
        self._owner_waits.setdefault(key, []).append(w)
        self.counters["waits_started"] += 1
        self.durable.record(J.WaitAdded(w.id, w.guest, kind, key[1], f, type_, start, end,
                                        pid, tag))
        if host:
            self._start_host_wait(w, done)
        return QUEUED

    def _reaches(self, sources: set, target: tuple) -> bool:
        """Does any owner in `sources` wait, directly or transitively, for `target`?"""
        seen = set()
        stack = list(sources)
        while stack:
            o = stack.pop()
            if o == target:
                return True
            if o in seen:
                continue
            seen.add(o)
            for w in self._owner_waits.get(o, ()):
                if w.kind != POSIX or w.state == "done":
                    continue
                f = w.file
                stack.extend(f.locks.conflicting(w.key, w.start, w.end, w.type))
                for e in f.queue:
                    if e is w:
                        break
                    if (e.kind == POSIX and e.key != w.key and e.start <= w.end
                            and w.start <= e.end and conflicts(e.type, w.type)):
                        stack.append(e.key)
        return False

    def _finish(self, w: Wait, err: int, done: list) -> None:
        """Take a wait out of every table and schedule its callback."""
        if w.state == "done":
            return
        w.state = "done"
        f = w.file
        try:
            f.queue.remove(w)
        except ValueError:
            pass
        g = self._guests.get(w.guest)
        if g is not None:
            g.waits.pop(w.id, None)
            if w.tag is not None and g.tags.get(w.tag) is w:
                del g.tags[w.tag]
        self._waits.pop(w.id, None)
        ws = self._owner_waits.get(w.key)
        if ws is not None:
            ws.remove(w)
            if not ws:
                del self._owner_waits[w.key]
        if err == 0:
            self.counters["waits_granted"] += 1
        elif err == errno.EINTR:
            self.counters["waits_cancelled"] += 1
        self.durable.record(J.WaitRemoved(w.id))
        done.append((w, err))

    # ------------------------------------------------------------------ host holders
    def _start_host_wait(self, w: Wait, done: list) -> None:
        """Queue the host-wait thread for w (started after the critical section) on the
        owner's own description (lockd.engine.hostwait)."""
        d = self._wait_desc(w, self._guests[w.guest], done)
        if d is None:
            return
        d.busy += 1
        w.state = "host"
        done.append(hostwait.thread(w, d, self._host_wait_done))

    def _host_wait_done(self, w: Wait, d: Description, rc: int) -> None:
        """The kernel answered a host wait (its thread, outside the mutex): record the
        outcome and answer the wait."""
        with self._txn() as t:
            done, closing = t.done, t.closing
            d.busy -= 1
            f = w.file
            g = self._guests.get(w.guest)
            if w.state == "done" or g is None:
                outcome = w.cancel_err or errno.EINTR
                if rc == 0:
                    hostwait.undo_grant(w, d)
            elif w.cancel_err is not None:
                if rc == 0:
                    hostwait.undo_grant(w, d)
                outcome = w.cancel_err
            elif rc == 0:
                outcome = self._record_host_grant(g, w, d)
            elif rc in ofd.REVOKED:  # a cluster file system gave the owner's locks away
                outcome = self._revoked(g, w.key, w.kind, f, d, closing)
            else:
                outcome = rc
                if rc == errno.EDEADLK:  # a cluster file system's own deadlock detection
                    self.counters["deadlocks"] += 1
            if w.state != "done":
                self._finish(w, outcome, done)
            if g is not None:
                self.descs.release(f, (w.kind, w.key[0], w.key[1]), g, w.key, closing)
            self._grant_waiters(f, done, closing)
            self._maybe_forget_guest(w.guest)

    def _record_host_grant(self, g: GuestState, w: Wait, d: Description) -> int:
        f = w.file
        if self.durable.journal_error is not None:  # the grant could not be journaled
            hostwait.undo_grant(w, d)
            self.counters["enolck"] += 1
            return errno.ENOLCK
        if w.kind == FLOCK:
            self.table.set_flock(g, w.key, f, w.type, w.pid)
            return 0
        locks = f.locks.owners.get(w.key, _NO_LOCKS)
        new, removed, added = apply(locks, w.start, w.end, w.type)
        if g.nlocks + len(added) - len(removed) > self.limits.max_locks:
            hostwait.undo_grant(w, d)
            self.counters["enolck"] += 1
            return errno.ENOLCK
        self.table.set_posix(g, w.key, f, new, removed, added, w.start, w.end, w.type, w.pid)
        return 0

    def _wait_desc(self, w: Wait, g: GuestState, done: list) -> Description | None:
        """The description a wait's owner locks with (opened now if it has none yet);
        None when there is none to be had: the wait is then finished with the errno."""
        d = self.descs.take_now(w.file, (w.kind, w.key[0], w.key[1]), g, w.key)
        if isinstance(d, int):
            self._finish(w, d, done)
            return None
        return d

    def _grant_waiters(self, f: FileState, done: list, closing: list) -> None:
        """Grant, in FIFO order, every queued wait of the file that nothing blocks now.

        A grant to an owner that already held locks on the file converts them (e.g. its
        write lock becomes the read lock it waited for): that may free a wait examined
        earlier in the pass, so the pass is repeated until it grants no such wait."""
        again = bool(f.queue)
        while again:
            again = self._grant_pass(f, done, closing)

    def _grant_pass(self, f: FileState, done: list, closing: list) -> bool:
        """One FIFO pass of _grant_waiters; True when it granted a conversion."""
        converted = False
        for w in list(f.queue):
            if w.state != "queued":
                continue
            g = self._guests[w.guest]
            if w.kind == POSIX:
                blockers, queued = self._posix_blockers(w.key, f, w.type, w.start, w.end, w)
                if blockers or queued:
                    continue
            elif self._flock_blocked(w.key, f, w.type, w):
                continue
            if self.durable.journal_error is not None:
                # Its turn, but the grant could not be journaled: answer, do not grant.
                self.counters["enolck"] += 1
                self._finish(w, errno.ENOLCK, done)
                continue
            d = self._wait_desc(w, g, done)
            if d is None:
                continue
            if w.kind == POSIX:
                held = w.key in f.locks.owners
                rc = self._grant_posix(g, w.key, f, d, w.type, w.start, w.end, w.pid)
            else:
                held = w.key in f.flocks
                rc = self._grant_flock(g, w.key, f, d, w.type, w.pid)
            if rc == errno.EAGAIN:
                self._start_host_wait(w, done)
            else:
                self._finish(w, rc, done)
                if rc:
                    self.descs.release(f, (w.kind, w.key[0], w.key[1]), g, w.key, closing)
                elif held:
                    converted = True
        return converted

    def _cancel_locked(self, w: Wait, err: int, done: list, closing: list,
                       signals: list) -> bool:
        if w.state == "done":
            return False
        if w.state == "host":
            if w.cancel_err is None:
                w.cancel_err = err
                signals.append(w)
            return True
        self._finish(w, err, done)
        self._grant_waiters(w.file, done, closing)
        return True

    def cancel(self, wait_id: int, err: int = errno.EINTR, guest: str | None = None) -> bool:
        """Cancel a wait by id; with `guest`, only a wait of that guest (its own)."""
        def find_wait() -> Wait | None:
            w = self._waits.get(wait_id)
            return w if w is not None and (guest is None or w.guest == guest) else None

        return self._cancel_where(find_wait, err)

    def cancel_tag(self, guest: str, tag: int, err: int = errno.EINTR) -> bool:
        def find_wait() -> Wait | None:
            g = self._guests.get(guest)
            return g.tags.get(tag) if g is not None else None

        return self._cancel_where(find_wait, err)

    def _cancel_where(self, find_wait: Callable[[], Wait | None], err: int) -> bool:
        signals: list = []
        with self._txn() as t:
            w = find_wait()
            ok = w is not None and self._cancel_locked(w, err, t.done, t.closing, signals)
        hostwait.kick(signals)
        return ok

    # ------------------------------------------------------------------ flock
    def flock(self, guest: str, fh: int, ref: FileState, type_: int, pid: int, wait: bool,
              callback: WaitCallback | None = None, tag: int | None = None) -> int:
        if type_ not in (F_RDLCK, F_WRLCK, F_UNLCK):
            return errno.EINVAL
        t = Txn(self.durable)
        rc = self._run(t, self._flock_locked, guest, fh, ref, type_, pid,
                       callback if wait else None, tag)
        return t.answer(rc, FLOCK, guest, fh, ref, type_)

    def _flock_blocked(self, key: tuple, f: FileState, type_: int, upto: Wait | None = None,
                       queued: bool = True) -> bool:
        """A holder in the way, or (`queued`) an earlier wait (fairness)."""
        for k, t in f.flocks.items():
            if k != key and conflicts(t, type_):
                return True
        if not queued:
            return False
        for w in f.queue:
            if w is upto:
                break
            if w.kind == FLOCK and w.key != key and conflicts(w.type, type_):
                return True
        return False

    def _flock_locked(self, guest: str, fh: int, f: FileState, type_: int, pid: int,
                      callback: WaitCallback | None, tag: int | None, spare: list,
                      done: list, closing: list) -> int:
        key = (guest, fh)
        g = self._guest(guest)
        rc = self._answered_early(g, key, f, type_, callback, tag)
        if rc is not None:
            return rc
        dkey = (FLOCK, guest, fh)
        held = f.flocks.get(key)
        if held is not None and held == type_:
            return 0
        if type_ != F_UNLCK and self.durable.journal_error is not None:
            self.counters["enolck"] += 1
            return errno.ENOLCK
        if held is not None:
            # Linux converts a flock by dropping the old lock first (not atomically).
            if self._drop_flock(g, key, f):  # revoked by a cluster file system
                self.descs.release(f, dkey, g, key, closing)
                self._grant_waiters(f, done, closing)
                return errno.EIO
        if type_ == F_UNLCK:
            self.descs.release(f, dkey, g, key, closing)
            self._grant_waiters(f, done, closing)
            return 0
        # A conversion is decided against the holders only, as Linux decides it (it
        # drops the old lock and takes the new one in one critical section: the waiters
        # it woke find the new lock taken), never queued behind waiters.
        if self._flock_blocked(key, f, type_, queued=held is None):
            if held is not None:
                self._grant_waiters(f, done, closing)
            return self._block(g, key, FLOCK, f, type_, 0, OFFSET_MAX, pid, callback, tag,
                               set(), [], done)
        d = self.descs.take(f, dkey, g, key, spare)
        rc = self._grant_flock(g, key, f, d, type_, pid)
        if held is not None:
            # The old lock is gone (and the new one may be weaker): wake whom it held.
            self._grant_waiters(f, done, closing)
        if rc in ofd.REVOKED:  # revoked by a cluster file system: see _revoked
            return self._revoked(g, key, FLOCK, f, d, closing)
        if rc == errno.EAGAIN and callback is not None:
            return self._queue(g, key, FLOCK, f, type_, 0, OFFSET_MAX, pid, callback, tag,
                               done, host=True)
        if rc:
            if rc == errno.EAGAIN:
                self.counters["locks_denied"] += 1
            self.descs.release(f, dkey, g, key, closing)
        return rc

    def _grant_flock(self, g: GuestState, key: tuple, f: FileState, d: Description,
                     type_: int, pid: int) -> int:
        rc = self._host_flock(g, key, f, d, type_)
        if rc == 0:
            self.table.set_flock(g, key, f, type_, pid)
        return rc

    def _host_flock(self, g: GuestState, key: tuple, f: FileState, d: Description,
                    type_: int) -> int:
        """The host side of a flock grant: the guest's lock limit, then the flock on the
        owner's description (never blocking); 0 or the errno."""
        if key not in f.flocks and g.nlocks + 1 > self.limits.max_locks:
            self.counters["enolck"] += 1
            return errno.ENOLCK
        op = (LOCK_EX if type_ == F_WRLCK else LOCK_SH) | LOCK_NB
        rc = ofd.flock(d.fd, op)
        if rc == errno.EWOULDBLOCK:
            return errno.EAGAIN
        return rc

    def _drop_flock(self, g: GuestState, key: tuple, f: FileState) -> bool:
        """Drop the flock on the host and in the table; True when it was lost."""
        if key not in f.flocks:
            return False
        d = f.descs.get((FLOCK, key[0], key[1]))
        if d is not None and ofd.flock(d.fd, LOCK_UN) in ofd.REVOKED:
            return self._revoked(g, key, FLOCK, f, d, None) == errno.EIO  # drops it
        self.table.drop_flock(g, key, f)
        return False

    # ------------------------------------------------------------------ release
    def release_owner(self, guest: str, owner: int, ref: FileState) -> None:
        def locked(spare: list, done: list, closing: list) -> int:
            g = self._guests.get(guest)
            if g is not None:
                self._unlock_posix(g, (guest, owner), ref, 0, OFFSET_MAX, closing)
                self._grant_waiters(ref, done, closing)
                self._maybe_forget_guest(guest)
            return 0

        self._run_simple(locked)

    def release_flock(self, guest: str, fh: int) -> None:
        def locked(spare: list, done: list, closing: list) -> int:
            g = self._guests.get(guest)
            if g is None:
                return 0
            key = (guest, fh)
            f = g.flock_files.get(key)
            if f is None:
                return 0
            self._drop_flock(g, key, f)
            self.descs.release(f, (FLOCK, guest, fh), g, key, closing)
            self._grant_waiters(f, done, closing)
            self._maybe_forget_guest(guest)
            return 0

        self._run_simple(locked)

    def release_guest(self, guest: str) -> None:
        signals: list = []

        def locked(spare: list, done: list, closing: list) -> int:
            g = self._guests.get(guest)
            if g is None:
                return 0
            for w in list(g.waits.values()):
                self._cancel_locked(w, errno.EINTR, done, closing, signals)
            files = list(g.files.values())
            for f in files:
                for okey in [k for k in f.locks.owners if k[0] == guest]:
                    self._unlock_posix(g, okey, f, 0, OFFSET_MAX, closing)
                for okey in [k for k in f.flocks if k[0] == guest]:
                    self._drop_flock(g, okey, f)
                    self.descs.release(f, (FLOCK, guest, okey[1]), g, okey, closing)
            for f in files:
                self._grant_waiters(f, done, closing)
            self._maybe_forget_guest(guest)
            return 0

        self._run_simple(locked)
        hostwait.kick(signals)
        # Host-wait threads finish their own cleanup; wait for it so the guest is gone.
        for w in signals:
            if w.thread is not None:
                w.thread.join(5.0)

    # ------------------------------------------------------------------ journal failure
    def _take_back(self, ops: list, skip: dict) -> tuple[list, list]:
        """Durability's `take_back` (under the mutex): a journal batch `ops` failed. Take
        back every grant it made, so that no lock is held that the journal does not
        hold, except the owners in `skip` (leases in force).

        Per POSIX owner the kept state is, byte by byte, the weaker of what the journal
        holds (the state before the batch, got by undoing its ops) and what is held now:
        an unjournaled grant or upgrade is undone, while an unjournaled unlock or
        downgrade stays done (the journal then holds more than the host, which recovery
        only re-takes). Every step is an unlock or a downgrade, so none can fail on the
        host. A flock granted in the batch is dropped (Linux too drops the old lock
        first when converting). Returns (done, closing) for Durability to finish."""
        done: list = []
        closing: list = []
        posix: dict[tuple, list] = {}
        flocks: dict[tuple, FileState] = {}
        for op in ops:
            if lease_key(op) in skip:
                continue
            if isinstance(op, J.LockRows):
                posix.setdefault((op.guest, op.owner, op.file), []).append(op)
            elif isinstance(op, J.FlockRow) and op.type != F_UNLCK:
                flocks[(op.guest, op.fh, op.file.key)] = op.file
        files: dict[tuple, FileState] = {}
        for (guest, owner, f), fops in posix.items():
            key = (guest, owner)
            now = f.locks.owners.get(key, [])
            before = set(now)
            for op in reversed(fops):  # undo the ops: the journal's state
                before.difference_update(op.added)
                before.update(op.removed)
            g = self._guests.get(guest)
            d = f.descs.get((POSIX, guest, owner))
            if g is None or d is None:
                continue
            steps = weaker(now, sorted(before))
            for s, e, t in steps:  # unlocks and downgrades: none can fail
                ofd.setlk(d.fd, t, s, e)
            self.table.take_back_posix(g, key, f, steps)
            if steps:
                files[f.key] = f
            if key not in f.locks.owners:
                self.descs.release(f, (POSIX, guest, owner), g, key, closing)
        for (guest, fh, _fk), f in flocks.items():
            g = self._guests.get(guest)
            if g is not None and (guest, fh) in f.flocks:
                self._drop_flock(g, (guest, fh), f)
                self.descs.release(f, (FLOCK, guest, fh), g, (guest, fh), closing)
                files[f.key] = f
        for f in files.values():
            self._grant_waiters(f, done, closing)  # journal_error: they hear ENOLCK
        for guest in {k[0] for k in posix} | {k[0] for k in flocks}:
            self._maybe_forget_guest(guest)
        # Retries of the same batch (every lease period while the disk stays full)
        # find nothing more to take back: they are not worth an error line each.
        log.log(logging.ERROR if files else logging.DEBUG,
                "journal batch of %d changes failed: %d file(s) had grants taken back",
                len(ops), len(files))
        return done, closing

    # ------------------------------------------------------------------ delegation
    def hand_over(self, guest: str, ref: FileState) -> list[tuple]:
        """Give up the guest's locks on the file without releasing them on the host:
        [(kind, owner|fh, duplicate of its description, [(start, end, type)], pid)]. The
        duplicates keep the locks (they belong to the description) until whoever
        receives them adopts them. Refused (ValueError) while the guest waits there."""
        out: list[tuple] = []
        with self._txn() as t:
            if any(w.guest == guest for w in ref.queue):
                raise ValueError("the guest waits on the file")
            g = self._guests.get(guest)
            if g is None:
                return out
            closing = t.closing
            for (kind, dg, owner), d in list(ref.descs.items()):
                if dg != guest:
                    continue
                key = (guest, owner)
                ranges = _ranges_of(ref, kind, key)
                if not ranges:
                    continue
                out.append((kind, owner, os.dup(d.fd), ranges, ref.pids.get(key, 0)))
                # Forget them here, the host locks stay with the duplicate.
                self.table.hand_off(g, kind, key, ref)
                # Its descriptor is not reused: closing it drops nothing (the duplicate
                # holds the description).
                self.descs.retire(d)
                self.descs.release(ref, (kind, guest, owner), g, key, closing)
            self._maybe_forget_guest(guest)
        return out

    def held(self, guest: str, ref: FileState) -> list[tuple]:
        """What hand_over would give, without giving anything up: [(kind, owner|fh,
        duplicate of its description, [(start, end, type)], pid)]. Live migration: the
        source keeps holding (and owning) until the destination runs."""
        out: list[tuple] = []
        with self._txn():
            for (kind, dg, owner), d in list(ref.descs.items()):
                if dg != guest:
                    continue
                key = (guest, owner)
                ranges = _ranges_of(ref, kind, key)
                if ranges:
                    out.append((kind, owner, os.dup(d.fd), ranges, ref.pids.get(key, 0)))
        return out

    def adopt(self, guest: str, ref: FileState, kind: str, owner: int, fd: int | None,
              ranges: list[tuple[int, int, int]], pid: int) -> int:
        """Take over a description holding locks (handed over by a guest's server that
        decided them itself): its locks become this manager's, journaled. The fd is
        consumed. 0, or an errno (then the locks are released: nothing holds them).
        fd None: more ranges of the description adopted for (kind, owner) just before
        (a hand-back too large for one frame); ENOENT when there is none."""
        ranges = sorted(tuple(r) for r in ranges)
        if kind not in (POSIX, FLOCK) or any(not (t in (F_RDLCK, F_WRLCK) and
                                                  0 <= s <= e <= OFFSET_MAX)
                                             for s, e, t in ranges):
            if fd is not None:
                os.close(fd)
            return errno.EINVAL
        if fd is None:
            return self._adopt_more(guest, ref, kind, owner, ranges, pid)
        try:
            st = os.fstat(fd)
        except OSError as exc:
            os.close(fd)
            return exc.errno or errno.EBADF
        if (st.st_dev, st.st_ino) != ref.key:
            os.close(fd)
            return errno.EINVAL
        writable = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDWR
        with self._txn() as t:
            closing = t.closing
            g = self._guest(guest)
            key = (guest, owner)
            dkey = (kind, guest, owner)
            if dkey in ref.descs:
                closing.append(fd)
                rc = errno.EEXIST
            else:
                try:
                    self.descs.install(ref, dkey, g, key, fd, writable)
                    rc = 0
                except (Denied, NeedDescription) as exc:
                    closing.append(fd)
                    rc = exc.err if isinstance(exc, Denied) else errno.ENOLCK
            if rc == 0:
                if kind == POSIX:
                    self.table.merge_posix(g, key, ref, ranges, pid)
                elif ranges:
                    self.table.set_flock(g, key, ref, ranges[0][2], pid, counted=False)
                else:
                    self.table.set_pid(ref, key, pid)
        return rc

    def _adopt_more(self, guest: str, ref: FileState, kind: str, owner: int,
                    ranges: list[tuple[int, int, int]], pid: int) -> int:
        """The rest of an adopted description's ranges: recorded as its (the host locks
        are the description's already)."""
        with self._txn():  # journaled before the RETURN is answered
            key = (guest, owner)
            if kind != POSIX or (kind, guest, owner) not in ref.descs:
                return errno.ENOENT
            self.table.merge_posix(self._guest(guest), key, ref, ranges, pid)
        return 0

    def evict(self, guest: str) -> None:
        self.counters["evictions"] += 1
        self.release_guest(guest)

    def _run_simple(self, fn: Callable[[list, list, list], int]) -> None:
        with self._txn() as t:
            fn([], t.done, t.closing)

    def _maybe_forget_guest(self, guest: str) -> None:
        g = self._guests.get(guest)
        if g is None:
            return
        for fk, f in list(g.files.items()):
            if guest not in f.gdescs and not any(w.guest == guest for w in f.queue):
                del g.files[fk]
                self.descs.forget_file(f)
        if not g.files and not g.waits and not g.nlocks and not g.owner_descs:
            del self._guests[guest]

    # ------------------------------------------------------------------ recovery
    def _adopt(self, g: GuestState, tag: int, callback: WaitCallback) -> bool:
        """A reconnected guest re-sends a wait that survived a restart: it keeps its
        place in the queue and gets the new callback."""
        w = g.tags.get(tag)
        if w is None or w.callback is not None or w.state == "done":
            return False
        w.callback = callback
        return True

    def _answered_early(self, g: GuestState, key: tuple, f: FileState, type_: int,
                        callback: WaitCallback | None, tag: int | None) -> int | None:
        """The answer some requests get before any conflict is looked at."""
        if tag is not None and callback is not None and self._adopt(g, tag, callback):
            return QUEUED
        if self._lost and self._take_lost(g.name, key, f):
            return errno.EIO
        return None

    def _take_lost(self, guest: str, key: tuple, f: FileState) -> bool:
        """The owner's first request on a file where it lost a lock answers EIO once."""
        rec = self._lost.pop((guest, key, f.key), None)
        if rec is None:
            return False
        self.durable.record(J.LostReported(guest, key[1], rec.get("file_id"), f))
        return True

    def mark_lost(self, guest: str, key: tuple, fkey: tuple, record: dict) -> None:
        """A lock could not be kept: the owner's next request on the file answers EIO
        (under the mutex; the caller journals the LostLock)."""
        self._lost[(guest, key, fkey)] = record
        self.counters["lost_locks"] += 1

    # The calls below are recovery's (lockd.engine.recovery): it runs before any request
    # is served, inside its transaction (durable.recovery_txn) while it rebuilds the
    # tables through them.
    def guest_state(self, name: str, create: bool = True) -> GuestState | None:
        """The guest's state (made when missing, unless not `create`)."""
        return self._guest(name) if create else self._guests.get(name)

    def resume_wait_ids(self, first: int) -> None:
        """New waits are numbered from `first` (after every journaled one)."""
        self._ids = count(first)

    def restore_lost(self, guest: str, key: tuple, fkey: tuple, record: dict) -> None:
        """A journaled lost lock not yet reported: the owner's next request on the file
        answers EIO (not counted again: it was counted when it was lost)."""
        self._lost[(guest, key, fkey)] = record

    def requeue(self, w: Wait) -> None:
        """Put a journaled wait back at the end of its file's queue (recovery restores
        them in their old order); it waits for its guest to send it again (`_adopt`)."""
        g = self._guest(w.guest)
        w.file.queue.append(w)
        g.waits[w.id] = w
        g.files[w.file.key] = w.file
        if w.tag is not None:
            g.tags[w.tag] = w
        self._waits[w.id] = w
        self._owner_waits.setdefault(w.key, []).append(w)

    def retake_flock(self, g: GuestState, key: tuple, f: FileState, d: Description,
                     type_: int, pid: int) -> int:
        """Take a journaled flock on the owner's description again (the guest's limit
        applies, as to a grant) and restore it in the table, not journaled: the journal
        holds it already. 0 or the errno."""
        rc = self._host_flock(g, key, f, d, type_)
        if rc == 0:
            self.table.restore_flock(g, key, f, type_, pid)
        return rc

    def wake(self, files: Iterable[FileState]) -> None:
        """Grant, in one transaction, every wait on these files that nothing blocks."""
        with self._txn() as t:
            for f in files:
                self._grant_waiters(f, t.done, t.closing)

    def recover(self, keeper_fds: dict[str, int] | None = None,
                keeper_survived: bool = False) -> dict:
        """Re-take every journaled (or kept) lock before any request is served; see
        lockd.engine.recovery. `keeper_fds` maps keeper keys to descriptions that
        survived the crash in the descriptor keeper; `keeper_survived`: that keeper
        lived through the crash (was not started afresh)."""
        assert self.durable.journal is not None, "recover() needs a journal"
        from lockd.engine.recovery import recover

        return recover(self, keeper_fds, keeper_survived)

    # ------------------------------------------------------------------ inspection
    def snapshot(self) -> dict:
        with self._mu:
            locks = []
            waiters = []
            for f in self._files.values():
                for okey, ranges in f.locks.owners.items():
                    for r in ranges:
                        locks.append(self._row(POSIX, okey, f, r.type, r.start, r.end))
                for okey, t in f.flocks.items():
                    locks.append(self._row(FLOCK, okey, f, t, 0, OFFSET_MAX))
                for w in f.queue:
                    row = self._row(w.kind, w.key, f, w.type, w.start, w.end)
                    row.update(id=w.id, pid=w.pid, since=w.since, state=w.state,
                               waiting_for=self._waiting_for(w))
                    waiters.append(row)
            lost = [dict(rec) for rec in self._lost.values()]
        return {"locks": locks, "waiters": waiters, "lost": lost}

    def _row(self, kind: str, okey: tuple, f: FileState, t: int, s: int, e: int) -> dict:
        row = {
            "guest": okey[0], "kind": kind, "type": TYPE_NAMES[t], "start": s, "end": e,
            "path": f.path, "dev": f.dev, "ino": f.ino,
            "pid": f.pids.get(okey, 0),
        }
        if kind == POSIX:
            row["owner"] = okey[1]
        else:
            row["fh"] = okey[1]
            row["owner"] = okey[1]
        return row

    def _waiting_for(self, w: Wait) -> list[str]:
        if w.state == "host":
            return ["host"]
        if w.kind == POSIX:
            holders = set(w.file.locks.conflicting(w.key, w.start, w.end, w.type))
        else:
            holders = {k for k, t in w.file.flocks.items() if k != w.key
                       and conflicts(t, w.type)}
        names = sorted({h[0] for h in holders})
        if not names:
            names = sorted({e.guest for e in w.file.queue[: w.file.queue.index(w)]})
        return names

    def stats(self) -> dict:
        with self._mu:
            out = dict(self.counters)
            out.update(
                held_locks=sum(g.nlocks for g in self._guests.values()),
                waiters=len(self._waits),
                owners=sum(len(g.owner_descs) for g in self._guests.values()),
                descriptions=sum(len(f.descs) for f in self._files.values()),
                spare_descriptions=sum(len(f.spare) for f in self._files.values()),
                descriptors=self.descs.open_count,
                files=len(self._files),
                guests=sorted(self._guests),
                lost=len(self._lost),
                journal_failures=self.durable.rollbacks,
                journal_error=self.durable.journal_error,
                uptime=time.monotonic() - self._started,
            )
        return out

    def audit(self) -> list[str]:
        """Where the guests' lock counts disagree with the files' lock tables (empty:
        consistent; see OwnerTable.audit). For tests and diagnostics: it walks every
        lock."""
        with self._mu:
            return self.table.audit(self._guests, self._files)

    def owners(self, guest: str, ref: FileState) -> set[int]:
        """The guest's POSIX owners that hold or wait for something on the file."""
        with self._mu:
            held = {k[1] for k in ref.locks.owners if k[0] == guest}
            held.update(w.key[1] for w in ref.queue if w.guest == guest and w.kind == POSIX)
            return held


_LOCK_TYPES = frozenset((F_RDLCK, F_WRLCK, F_UNLCK))
_NO_SPARE: tuple = ()  # the hot path brings no pre-opened description
_NO_LOCKS: tuple = ()  # an owner without locks (apply never modifies its input)


def _first_conflict(fl: FileLocks, key: tuple, start: int, end: int, type_: int
                    ) -> tuple[LockRange, tuple] | None:
    """GETLK's answer among managed owners: the conflicting lock with the lowest start,
    then the lowest owner key. The owner with the lowest start always conflicts at the
    first conflicting byte, so the walk stops there: a GETLK over a file where another
    guest holds 100,000 locks costs what the first conflict costs, not a full scan."""
    if fl.unsettled:
        fl.has_conflict(key, start, start, type_)  # folds restored owners into the map
    write = type_ == F_WRLCK
    cands: list[tuple[LockRange, tuple]] = []
    cov = fl.cov
    if cov is not None:
        bounds, holders = cov.bounds, cov.holders
        k = bisect_right(bounds, start) - 1
        n = len(bounds)
        while k < n and bounds[k] <= end:
            h = holders[k]
            if h is not None:
                hit = [o for o, t in h.items() if o != key and (write or t == F_WRLCK)]
                if hit:
                    x = max(bounds[k], start)
                    cands.extend((find(fl.owners[o], x), o) for o in hit)
                    break
            k += 1
    for o in fl.fresh:
        if o == key:
            continue
        locks = fl.owners[o]
        i = bisect_right(locks, (start,)) - 1
        if i < 0 or locks[i].end < start:
            i += 1
        while i < len(locks) and locks[i].start <= end:
            if write or locks[i].type == F_WRLCK:
                cands.append((locks[i], o))
                break
            i += 1
    if not cands:
        return None
    return min(cands, key=lambda c: (c[0].start, c[1]))


def _ranges_of(ref: FileState, kind: str, key: tuple) -> list[tuple[int, int, int]]:
    """An owner's locks on the file as [(start, end, type)] (a flock: the whole file)."""
    if kind == POSIX:
        return [tuple(r) for r in ref.locks.owners.get(key, ())]
    held = ref.flocks.get(key)
    return [] if held is None else [(0, OFFSET_MAX, held)]
