"""Journaled before the reply: the one place that makes a change durable and decides
what its requester hears.

Changes made in the critical section are collected (journal records, keeper puts and
drops), each counted in `_dseq` when its reply must wait for it. After the section,
`_after` writes them (`flush_durable`: the descriptor keeper first, then the journal)
unless another thread already has, then answers: the request's own return value and
the callbacks of waits it finished. When a journal write fails (disk full, read-only,
I/O error) `_rollback` takes back every grant whose reply was waiting for that write,
and every answer given after that rollback is checked against what is still held: a
grant that was taken back answers ENOLCK instead.

Leases (`lease_s` > 0, used with the descriptor keeper and by embedded servers). While
the keeper lives, the kernel already records every range a description holds
(/proc/PID/fdinfo), so a reply need not wait for the journal to learn of a range that
only changes an existing owner's locks. The first change to an owner's locks on a file
writes a Lease record with it (before the reply, as any change); later changes to that
owner's locks on that file are answered at once; every `lease_s` seconds the lease
flusher writes the owners' current ranges (OwnerRows) and ends every lease
(LeasesEnd). What each crash keeps:

* the daemon alone: exact (recovery reads each kept description's locks from the
  kernel; a leased owner with no kept description had released everything);
* the keeper alone: exact (the daemon still holds every description and hands a new
  keeper all of them);
* both within `lease_s` of a change: an owner whose lease was open is re-taken as last
  journaled and told EIO once (its locks are uncertain); every other owner is exact.

Every entry point goes through one `Txn` (the manager's `_txn()`): it takes the mutex,
notes the rollback generation, collects what the critical section finished, and on the
way out makes the changes durable before anyone is answered (`Txn.end`), then gives the
request's own answer (`Txn.answer`). No entry point types those steps out itself.

Part of LockManager (a mixin: it works on the manager's state under its mutex).
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time

from lockd.api import F_UNLCK, OFFSET_MAX
from lockd.engine import ofd
from lockd.engine.ranges import LockRange, apply, overlapping
from lockd.engine.state import FLOCK, POSIX, FileState, Wait, keeper_key
from lockd.journal import ops as J

log = logging.getLogger("lockd.manager")

_NO_LOCKS: tuple = ()

# How long a lease lasts (seconds): the window in which a crash of both the daemon and
# its keeper leaves an owner's locks uncertain, and how often leased changes are written.
LEASE_S = 0.02


def lease_key(op: tuple) -> tuple | None:
    """(kind, guest, owner, file key) of a change a lease may cover, else None."""
    t = type(op)
    if t is J.LockRows:
        return (POSIX, op.guest, op.owner, op.file.key)
    if t is J.FlockRow:
        return (FLOCK, op.guest, op.fh, op.file.key)
    return None


class Txn:
    """One request's passage through the manager: "journaled before the reply".

    Made, it holds the mutex and has noted the rollback generation (`gen`). The critical
    section appends to `done` (finished waits, host-wait threads to start) and `closing`
    (descriptors to close once the mutex is free); a description opened outside the
    mutex (`leave`, open, `begin`) waits in `spare`. `end` leaves the mutex, then makes
    what the section queued durable (keeper, then journal) unless that has been done
    already, and only then answers `done`. `answer` is the request's own reply: a grant
    that a failed journal write took back meanwhile (the generation moved) is ENOLCK.

    Explicit calls rather than only a context manager: the uncontended setlk pays for
    every call it makes, and `with` costs about as much again as the mutex itself. The
    cold entry points write `with self._txn() as t:`, which ends it however the section
    is left. Recovery would do the same: `with mgr._txn() as t: ...
    mgr._grant_waiters(f, t.done, t.closing)` in place of taking `_mu` and calling
    `_after` itself."""

    __slots__ = ("_mgr", "gen", "spare", "done", "closing")

    def __init__(self, mgr: Durability) -> None:
        mgr._mu.acquire()
        self._mgr = mgr
        self.gen = mgr._rollbacks
        self.spare: list | tuple = ()  # [(fd, writable)] opened outside the mutex
        self.done: list = []
        self.closing: list = []

    def leave(self) -> None:
        """Leave the mutex for a while (to open a description); `begin` takes it again."""
        self._mgr._mu.release()

    def begin(self) -> None:
        mgr = self._mgr
        mgr._mu.acquire()
        self.gen = mgr._rollbacks  # what this section sees is as of now

    def end(self) -> bool:
        """Leave the mutex; then durable first, answers second (`Durability._after`).
        True when a rollback happened since `begin`: only then can `answer` differ from
        the section's own return value (the hot path asks it only then)."""
        mgr = self._mgr
        mgr._mu.release()
        closing = self.closing
        if self.spare:  # opened, then not needed
            closing.extend(fd for fd, _writable in self.spare)
        # _after's own first test, asked here first: the uncontended request that
        # queued nothing to write and finished no wait skips the call altogether.
        if (self.done or closing or mgr._dseq != mgr._ddone
                or mgr.journal_error is not None):
            mgr._after(self.done, closing, self.gen)
        return self.gen != mgr._rollbacks

    def answer(self, rc: int, kind: str, guest: str, owner: int, f: FileState, type_: int,
               start: int = 0, end: int = OFFSET_MAX) -> int:
        """The reply to a request answered at once (after `end`)."""
        if self.gen == self._mgr._rollbacks:
            return rc
        return self._mgr._confirm(rc, self.gen, kind, (guest, owner), f, type_, start, end)

    def __enter__(self) -> Txn:
        return self

    def __exit__(self, *exc: object) -> None:
        self.end()  # a section run for its effects: nothing to answer


class Durability:
    """Journal and keeper writes, leases, rollback, and the final answer of every request."""

    def _txn(self) -> Txn:
        """Take the mutex in a new transaction (see Txn): the only door to _after and
        _confirm."""
        return Txn(self)

    def _init_durability(self, journal: object | None, lease_s: float = 0.0) -> None:
        self._journal = journal
        self._dlock = threading.Lock()  # one flush at a time: keeper, then journal
        self._jops: list = []  # journal records not yet written
        self._kops: list[tuple[str, str, int]] = []  # ("put", key, dup fd) | ("drop", key, -1)
        self._dseq = 0  # changes whose replies wait for a flush, counted ...
        self._ddone = 0  # ... and the count flushed (written, or rolled back)
        self._rollbacks = 0  # journal batches that failed and were rolled back
        self.journal_error: str | None = None
        # The descriptor keeper (lockd.journal.keeper) holds duplicates of every lock
        # description so that a crash of this process drops no host lock.
        self.keeper: object | None = None
        self._keeper_lost = False
        self._keeper_refused = False
        self.lease_s = lease_s if journal is not None else 0.0
        # lease key -> (file, changes since the Lease record was written)
        self._leased: dict[tuple, tuple[FileState, list]] = {}
        self._leasing: dict[tuple, FileState] = {}  # Lease queued, not yet written
        self._lease_wake = threading.Event()
        self._lease_armed = False
        self._lease_thread: threading.Thread | None = None

    @property
    def journaled(self) -> bool:
        return self._journal is not None

    @property
    def journal_failures(self) -> int:
        """Journal batches that failed and were rolled back since start."""
        return self._rollbacks

    @property
    def nonblocking(self) -> bool:
        """True when no call blocks its caller for long, so a transport may answer lock
        requests on its reading thread. Every request is answered from memory and
        non-blocking host lock calls; durability adds an append to the change log (a
        page-cache write, no fsync) and a datagram to the keeper, both short."""
        return True

    def _jlog(self, op: tuple) -> None:
        """Queue a journal record (in the critical section)."""
        if self._journal is None:
            return
        if self.lease_s:
            lk = lease_key(op)
            if lk is not None:
                lease = self._leased.get(lk)
                if lease is not None:  # written when the lease ends
                    changes = lease[1]
                    if changes and (lk[0] == FLOCK or (changes[-1].added == op.removed and
                                                       changes[-1].removed == op.added)):
                        changes.pop()  # a lock undone at once, or a flock's older state
                        if lk[0] == FLOCK:
                            changes.append(op)
                    else:
                        changes.append(op)
                    return
                if lk not in self._leasing:
                    self._leasing[lk] = op.file
                    self._jops.append(J.Lease(lk[0], lk[1], lk[2], op.file))
                    self._arm_lease_end()
            elif type(op) is J.FileForgotten:
                self._end_file_leases(op.dev, op.ino)
        self._jops.append(op)
        self._dseq += 1

    def _kop(self, op: str, key: str, fd: int = -1) -> None:
        """Queue a keeper put or drop (in the critical section)."""
        self._kops.append((op, key, fd))
        self._dseq += 1

    # ------------------------------------------------------------ after the critical section
    def _after(self, done: list, closing: list, gen: int) -> None:
        """Make the changes durable, then close descriptors, start host-wait threads and
        answer finished waits. `gen` is _rollbacks as seen inside the critical section:
        if a rollback happened since, a grant may have been taken back."""
        # A change counted in _dseq may have been taken by another thread that is still
        # writing it: the flush waits for that thread (its lock), so nobody is answered
        # before their change is durable. While the journal fails, every request retries.
        if self._dseq != self._ddone or (self.journal_error is not None and self._jops):
            self.flush_durable()
        if done or closing:
            self._fire(done, closing, gen)

    def _fire(self, done: list, closing: list, gen: int) -> None:
        for fd in closing:
            try:
                os.close(fd)
            except OSError:
                pass
        for item in done:
            if isinstance(item, threading.Thread):
                item.start()
                continue
            w, err = item
            if err == 0 and gen != self._rollbacks and not self._wait_holds(w):
                err = errno.ENOLCK  # granted, then taken back: the journal lacks it
            if w.callback is not None:
                try:
                    w.callback(err)
                except Exception:  # a broken caller must not break the manager
                    log.exception("wait callback failed")

    def _confirm(self, rc: int, gen: int, kind: str, key: tuple, f: FileState, type_: int,
                 start: int = 0, end: int = OFFSET_MAX) -> int:
        """The answer of a request that returns at once: a grant made before a rollback
        that took it back is ENOLCK."""
        if rc or type_ == F_UNLCK or gen == self._rollbacks:
            return rc
        with self._mu:
            return 0 if self._holds(kind, key, f, type_, start, end) else errno.ENOLCK

    def flush_durable(self, end_leases: bool = False) -> None:
        """Make every change so far survive a crash: keeper, then journal. In this order
        a crash between the two leaves a kept description the journal does not know,
        which recovery reads back from the kernel (exact), rather than a journaled lock
        whose description died with us (which recovery would report lost, to an owner
        that was never told it held it). `end_leases`: also write the leased owners'
        ranges and end every lease."""
        done: list = []
        closing: list = []
        with self._dlock:
            with self._mu:
                target = self._dseq
                kops, self._kops = self._kops, []
                restart = self._keeper_lost and self.keeper is not None
                if restart:
                    # The keeper died: a new one gets every description we hold. The
                    # host locks never left (our own descriptors hold them meanwhile).
                    for fd in (fd for _op, _k, fd in kops if fd >= 0):
                        os.close(fd)
                    kops = [("put", d.kept_as, os.dup(d.fd)) for f in self._files.values()
                            for d in (*f.descs.values(), *f.spare) if d.kept_as is not None]
                leased = self._leased
                if end_leases:
                    leasing = self._leasing
                    self._cut_leases()
                jops, self._jops = self._jops, []
            if kops or restart:
                self._write_keeper(kops, restart)
            if jops:
                try:
                    self._journal.write(jops)  # type: ignore[union-attr]
                except Exception as exc:
                    # Until a write succeeds again new locks answer ENOLCK: a grant we
                    # cannot journal could be lost by a crash without anyone being told.
                    if self.journal_error is None:
                        log.error("journal write failed, refusing new locks: %s", exc)
                    self.journal_error = str(exc)
                    if end_leases:
                        with self._mu:  # the leases did not end: they go on
                            self._leased.update(leased)
                            self._leasing.update(leasing)
                        jops = [op for op in jops if type(op) is not J.LeasesEnd]
                    # Leased owners were answered already; their lease stays in force.
                    done, closing = self._rollback(jops, skip=leased)
                else:
                    if self.journal_error is not None:
                        log.warning("journal writable again, granting locks again")
                        self.journal_error = None
                    if self._leasing and not end_leases:
                        self._promote_leases(jops)
            self._ddone = target
        if done or closing:
            # Waiters the rollback answered (ENOLCK); outside _dlock, as _after does.
            self._fire(done, closing, self._rollbacks)

    # ------------------------------------------------------------ leases
    def _promote_leases(self, written: list) -> None:
        """Leases whose Lease record was just written are in force."""
        with self._mu:
            for op in written:
                if type(op) is J.Lease:
                    lk = (op.kind, op.guest, op.owner, op.file.key)
                    f = self._leasing.pop(lk, None)
                    if f is not None and self._files.get(lk[3]) is f:
                        self._leased[lk] = (f, [])

    def _cut_leases(self) -> None:
        """Under the mutex: queue what changed under the leases, and LeasesEnd."""
        for lk, lease in self._leased.items():
            self._queue_leased(lk, lease)
        if self._leased or self._leasing:
            self._jops.append(J.LeasesEnd())
        self._leased = {}
        self._leasing = {}
        self._lease_armed = False

    def _queue_leased(self, lk: tuple, lease: tuple[FileState, list]) -> None:
        """Queue the changes made under a lease: as they were, or the owner's ranges as
        they are now, whichever is shorter (an owner holding many ranges that changes
        a few, or one changing the same range many times)."""
        f, changes = lease
        if not changes:
            return
        kind, guest, owner, _fkey = lk
        key = (guest, owner)
        if kind == FLOCK:
            self._jops.append(changes[-1])  # a flock record is the whole state
        else:
            ranges = f.locks.owners.get(key, _NO_LOCKS)
            if len(changes) <= len(ranges) + 1:
                self._jops.extend(changes)
            else:
                self._jops.append(J.OwnerRows(guest, owner, f, tuple(ranges),
                                              f.pids.get(key, 0)))
        changes.clear()

    def _end_file_leases(self, dev: int, ino: int) -> None:
        """A file is forgotten: what changed under its leases is queued before the
        record that forgets it."""
        for lk in [lk for lk in self._leased if lk[3] == (dev, ino)]:
            self._queue_leased(lk, self._leased.pop(lk))

    def _arm_lease_end(self) -> None:
        """Under the mutex: a lease began; the flusher ends it within lease_s."""
        if self._lease_armed:
            return
        self._lease_armed = True
        if self._lease_thread is None:
            self._lease_thread = threading.Thread(target=self._lease_flusher, daemon=True,
                                                  name="lease-flusher")
            self._lease_thread.start()
        self._lease_wake.set()

    def _lease_flusher(self) -> None:
        while True:
            self._lease_wake.wait()
            self._lease_wake.clear()
            time.sleep(self.lease_s)  # the lease's length: changes batch up meanwhile
            try:
                self.flush_durable(end_leases=True)
            except Exception:  # the next lease retries; a flusher must not die
                log.exception("lease flush failed")
            if self.journal_error is not None and self._jops:
                with self._mu:  # keep retrying the write while it fails
                    self._arm_lease_end()

    def _rollback(self, ops: list, skip: dict) -> tuple[list, list]:
        """A journal batch failed: take back every grant it (or anything not journaled
        since) made, so that no lock is held that the journal does not hold - except
        the owners in `skip` (leases in force: their replies went out before the write,
        and their Lease record already tells recovery their locks are uncertain).

        Per POSIX owner the kept state is, byte by byte, the weaker of what the journal
        holds (the state before the batch, got by undoing its ops) and what is held now:
        an unjournaled grant or upgrade is undone, while an unjournaled unlock or
        downgrade stays done (the journal then holds more than the host, which recovery
        only re-takes). Every step is an unlock or a downgrade, so none can fail on the
        host. A flock granted in the batch is dropped (Linux too drops the old lock
        first when converting). The ops are queued again, followed by the undo ops, so
        the next successful write brings the journal to exactly the state kept."""
        done: list = []
        closing: list = []
        with self._mu:
            self._rollbacks += 1
            ops = ops + self._jops
            posix: dict[tuple, list] = {}
            flocks: dict[tuple, FileState] = {}
            for op in ops:
                if lease_key(op) in skip:
                    continue
                if isinstance(op, J.LockRows):
                    posix.setdefault((op.guest, op.owner, op.file), []).append(op)
                elif isinstance(op, J.FlockRow) and op.type != F_UNLCK:
                    flocks[(op.guest, op.fh, op.file.key)] = op.file
            self._jops = ops
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
                for s, e, t in _weaker(now, sorted(before)):
                    cur = f.locks.owners.get(key, _NO_LOCKS)
                    new, removed, added = apply(cur, s, e, t)
                    ofd.setlk(d.fd, t, s, e)
                    f.locks.update(key, new, s, e, t, removed)
                    g.nlocks += len(added) - len(removed)
                    self._jlog(J.LockRows(guest, owner, f, tuple(removed), tuple(added),
                                          f.pids.get(key, 0)))
                    files[f.key] = f
                if key not in f.locks.owners:
                    f.pids.pop(key, None)
                    self._maybe_close_desc(f, (POSIX, guest, owner), g, key, closing)
            for (guest, fh, _fk), f in flocks.items():
                g = self._guests.get(guest)
                if g is not None and (guest, fh) in f.flocks:
                    self._drop_flock(g, (guest, fh), f)
                    self._maybe_close_desc(f, (FLOCK, guest, fh), g, (guest, fh), closing)
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

    def holds(self, guest: str, kind: str, owner: int, ref: FileState, type_: int,
              start: int = 0, end: int = OFFSET_MAX) -> bool:
        """Does (guest, owner|fh) hold [start, end] at least as strongly as type_?"""
        with self._mu:
            return self._holds(kind, (guest, owner), ref, type_, start, end)

    def _holds(self, kind: str, key: tuple, f: FileState, type_: int, start: int,
               end: int) -> bool:
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

    def _wait_holds(self, w: Wait) -> bool:
        with self._mu:
            return self._holds(w.kind, w.key, w.file, w.type, w.start, w.end)

    # ------------------------------------------------------------ descriptor keeper
    def _keep(self, dkey: tuple, f: FileState, d: object) -> None:
        """Mirror a description handed to an owner into the keeper (in the critical
        section: queued, sent by flush_durable before the answer)."""
        kkey = keeper_key(dkey, f)
        # A pooled description that goes back to its last owner (the usual lock,
        # unlock, lock again) is already kept under the right key.
        if d.kept_as != kkey:  # type: ignore[attr-defined]
            if d.kept_as is not None:  # type: ignore[attr-defined]
                self._kop("drop", d.kept_as)  # type: ignore[attr-defined]
            self._kop("put", kkey, os.dup(d.fd))  # type: ignore[attr-defined]
            d.kept_as = kkey  # type: ignore[attr-defined]
            # The owner's previous description may sit in the spare pool, still named
            # by this key in our books: the put replaces it in the keeper, and whoever
            # takes that spare next must not drop the key, which is ours now.
            for sd in f.spare:
                if sd.kept_as == kkey:
                    sd.kept_as = None

    def _unkeep(self, d: object) -> None:
        if d.kept_as is not None:  # type: ignore[attr-defined]
            self._kop("drop", d.kept_as)  # type: ignore[attr-defined]
            d.kept_as = None  # type: ignore[attr-defined]

    def _write_keeper(self, kops: list, restart: bool) -> None:
        """Send the keeper its puts and drops (all of them to a new keeper on restart)."""
        try:
            if restart:
                self.keeper.restart()  # type: ignore[union-attr]
                log.warning("descriptor keeper restarted: handing it %d descriptions",
                            len(kops))
                self._keeper_lost = self._keeper_refused = False
            for op, key, fd in kops:
                if op == "put":
                    self.keeper.put(key, fd)  # type: ignore[union-attr]
                else:
                    self.keeper.drop(key)  # type: ignore[union-attr]
            if restart:
                self.keeper.seal()  # type: ignore[union-attr]
        except (OSError, AttributeError) as exc:
            # lockd.journal.keeper.KeeperRefused: something else answers where our keeper
            # should; it was handed nothing, and is said once however often it recurs.
            refused = isinstance(exc, PermissionError)
            if refused and not self._keeper_refused:
                log.error("descriptor keeper refused: %s; until our own keeper is back a "
                          "crash of the daemon drops its locks (retried at every change)",
                          exc)
            elif not refused and not self._keeper_lost:
                log.error("descriptor keeper unreachable (%s): restarting it", exc)
            self._keeper_refused = refused
            self._keeper_lost = True
        finally:
            for _op, _key, fd in kops:
                if fd >= 0:
                    os.close(fd)


def _weaker(now: list[LockRange], journaled: list[LockRange]) -> list[tuple[int, int, int]]:
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
