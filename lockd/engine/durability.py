"""Journaled before the reply: the one place that makes a change durable and decides
what its requester hears.

Changes made in the critical section are collected (journal records, keeper puts and
drops), each counted in `_dseq` when its reply must wait for it. After the section,
`_after` writes them (`flush_durable`: the descriptor keeper first, then the journal)
unless another thread already has, then answers: the request's own return value and
the callbacks of waits it finished. When a journal write fails (disk full, read-only,
I/O error) `_rollback` has the manager take back every grant whose reply was waiting
for that write (`take_back`), and every answer given after that rollback is checked
against what is still held: a grant that was taken back answers ENOLCK instead.

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

Every entry point goes through one `Txn` (`Durability.txn()`): it takes the mutex,
notes the rollback generation, collects what the critical section finished, and on the
way out makes the changes durable before anyone is answered (`Txn.end`), then gives the
request's own answer (`Txn.answer`). No entry point types those steps out itself;
recovery too goes through one (`RecoveryTxn`, which commits its corrections at once).

A part the LockManager holds (`mgr.durable`). It shares the manager's mutex and reads
the files' tables (the keeper's restart, leases, the answers' check), but changes no
lock itself: the one thing it asks of its owner is `take_back`, given at construction,
which undoes the grants of a journal write that failed (the manager's policy, see
LockManager._take_back). Its public calls: `txn`, `recovery_txn`, `record`, `keep`,
`unkeep`, `drop_kept`, `flush_durable`, and the attributes `journal`,
`keeper`, `journal_error`, `lease_s`, `rollbacks`.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import time
from collections.abc import Callable

from lockd.api import F_UNLCK, OFFSET_MAX
from lockd.engine.owners import holds
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
    cold entry points write `with mgr.durable.txn() as t:` (the manager's `_txn()`),
    which ends it however the section is left."""

    __slots__ = ("_dur", "gen", "spare", "done", "closing")

    def __init__(self, dur: Durability) -> None:
        dur.mu.acquire()
        self._dur = dur
        self.gen = dur.rollbacks
        self.spare: list | tuple = ()  # [(fd, writable)] opened outside the mutex
        self.done: list = []
        self.closing: list = []

    def leave(self) -> None:
        """Leave the mutex for a while (to open a description); `begin` takes it again."""
        self._dur.mu.release()

    def begin(self) -> None:
        dur = self._dur
        dur.mu.acquire()
        self.gen = dur.rollbacks  # what this section sees is as of now

    def end(self) -> bool:
        """Leave the mutex; then durable first, answers second (`Durability._after`).
        True when a rollback happened since `begin`: only then can `answer` differ from
        the section's own return value (the hot path asks it only then)."""
        dur = self._dur
        dur.mu.release()
        closing = self.closing
        if self.spare:  # opened, then not needed
            closing.extend(fd for fd, _writable in self.spare)
        # _after's own first test, asked here first: the uncontended request that
        # queued nothing to write and finished no wait skips the call altogether.
        if (self.done or closing or dur._dseq != dur._ddone
                or dur.journal_error is not None):
            dur._after(self.done, closing, self.gen)
        return self.gen != dur.rollbacks

    def answer(self, rc: int, kind: str, guest: str, owner: int, f: FileState, type_: int,
               start: int = 0, end: int = OFFSET_MAX) -> int:
        """The reply to a request answered at once (after `end`)."""
        if self.gen == self._dur.rollbacks:
            return rc
        return self._dur._confirm(rc, self.gen, kind, (guest, owner), f, type_, start, end)

    def __enter__(self) -> Txn:
        return self

    def __exit__(self, *exc: object) -> None:
        self.end()  # a section run for its effects: nothing to answer


class RecoveryTxn(Txn):
    """Recovery's transaction (`Durability.recovery_txn`), the one that runs before any
    request is served. What its section records states what already holds: the locks
    it re-took, the ones lost, waits and leases settled. So `record` queues a record
    plainly (never folded into a lease), the table's restore calls queue none (the
    journal holds them already), and leaving commits: the keeper, then the journal,
    written at once. Nobody waits for an answer and nothing may be taken back from
    owners answered before the crash, so a journal that refuses the write raises (the
    records stay queued) rather than rolling back; a section that raises is not
    committed."""

    __slots__ = ()

    def record(self, op: tuple) -> None:
        dur = self._dur
        dur._jops.append(op)
        dur._dseq += 1

    def __exit__(self, exc_type: object, *exc: object) -> None:
        dur = self._dur
        dur.mu.release()
        if exc_type is not None:
            dur._fire([], self.closing, self.gen)  # descriptors only
            return
        try:
            dur.flush_durable(strict=True)
        except BaseException:
            dur._fire([], self.closing, self.gen)
            raise
        dur._fire(self.done, self.closing, self.gen)


TakeBack = Callable[[list, dict], "tuple[list, list]"]


class Durability:
    """Journal and keeper writes, leases, rollback, and the final answer of every request."""

    def __init__(self, mu: threading.Lock, files: dict[tuple, FileState],
                 journal: object | None, lease_s: float, take_back: TakeBack) -> None:
        """`mu`: the manager's mutex (every critical section's); `files`: the
        manager's files by (dev, ino), read for the keeper's restart and for leases;
        `take_back(ops, skip)`, called under `mu` after a failed journal write, undoes
        the grants `ops` carried except the owners in `skip` and returns (done,
        closing) for the waits it answered and descriptors to close."""
        self.mu = mu
        self._files = files
        self._take_back = take_back
        self.journal = journal
        self._dlock = threading.Lock()  # one flush at a time: keeper, then journal
        self._jops: list = []  # journal records not yet written
        self._kops: list[tuple[str, str, int]] = []  # ("put", key, dup fd) | ("drop", key, -1)
        self._dseq = 0  # changes whose replies wait for a flush, counted ...
        self._ddone = 0  # ... and the count flushed (written, or rolled back)
        self.rollbacks = 0  # journal batches that failed and were rolled back
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

    def txn(self) -> Txn:
        """Take the mutex in a new transaction (see Txn): the only door to _after and
        _confirm."""
        return Txn(self)

    def recovery_txn(self) -> RecoveryTxn:
        """Recovery's transaction (see RecoveryTxn): corrections committed at once."""
        return RecoveryTxn(self)

    @property
    def leased(self) -> int:
        """Owners whose changes are answered under a lease in force now."""
        return len(self._leased)

    def record(self, op: tuple) -> None:
        """Queue a journal record (in the critical section)."""
        if self.journal is None:
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

    def drop_kept(self, key: str) -> None:
        """Queue the keeper's drop of `key` (in the critical section, or before any
        request is served)."""
        self._kop("drop", key)

    # ------------------------------------------------------------ after the critical section
    def _after(self, done: list, closing: list, gen: int) -> None:
        """Make the changes durable, then close descriptors, start host-wait threads and
        answer finished waits. `gen` is `rollbacks` as seen inside the critical section:
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
            if err == 0 and gen != self.rollbacks and not self._wait_holds(w):
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
        if rc or type_ == F_UNLCK or gen == self.rollbacks:
            return rc
        with self.mu:
            return 0 if holds(kind, key, f, type_, start, end) else errno.ENOLCK

    def flush_durable(self, end_leases: bool = False, strict: bool = False) -> None:
        """Make every change so far survive a crash: keeper, then journal. In this order
        a crash between the two leaves a kept description the journal does not know,
        which recovery reads back from the kernel (exact), rather than a journaled lock
        whose description died with us (which recovery would report lost, to an owner
        that was never told it held it). `end_leases`: also write the leased owners'
        ranges and end every lease. `strict` (recovery's commit): a failed journal write
        raises, its records queued again, instead of rolling back."""
        done: list = []
        closing: list = []
        with self._dlock:
            with self.mu:
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
                    self.journal.write(jops)  # type: ignore[union-attr]
                except Exception as exc:
                    if strict:
                        with self.mu:
                            self._jops[:0] = jops
                        raise
                    # Until a write succeeds again new locks answer ENOLCK: a grant we
                    # cannot journal could be lost by a crash without anyone being told.
                    if self.journal_error is None:
                        log.error("journal write failed, refusing new locks: %s", exc)
                    self.journal_error = str(exc)
                    if end_leases:
                        with self.mu:  # the leases did not end: they go on
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
            self._fire(done, closing, self.rollbacks)

    # ------------------------------------------------------------ leases
    def _promote_leases(self, written: list) -> None:
        """Leases whose Lease record was just written are in force."""
        with self.mu:
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
                with self.mu:  # keep retrying the write while it fails
                    self._arm_lease_end()

    def _rollback(self, ops: list, skip: dict) -> tuple[list, list]:
        """A journal batch failed: count a rollback (every answer given from now on is
        checked, see `_fire` and `_confirm`), queue the batch again, and have the owner
        take back every grant it (or anything queued since) made, so that no lock is
        held that the journal does not hold - except the owners in `skip` (leases in
        force: their replies went out before the write, and their Lease record already
        tells recovery their locks are uncertain). What take_back records follows the
        batch, so the next successful write brings the journal to exactly the state
        kept."""
        with self.mu:
            self.rollbacks += 1
            ops = ops + self._jops
            self._jops = ops  # take_back's records follow them
            return self._take_back(ops, skip)

    def _wait_holds(self, w: Wait) -> bool:
        with self.mu:
            return holds(w.kind, w.key, w.file, w.type, w.start, w.end)

    # ------------------------------------------------------------ descriptor keeper
    def keep(self, dkey: tuple, f: FileState, d: object) -> None:
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

    def unkeep(self, d: object) -> None:
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

