"""Journaled before the reply: the one place that makes a change durable and decides
what its requester hears.

Changes made in the critical section are collected (journal records, keeper puts and
drops). After it, `_after` writes them (journal first, then the descriptor keeper),
then answers: the request's own return value and the callbacks of waits it finished.
A grant is answered "granted" only once its change is in the journal. When a journal
write fails (disk full, read-only, I/O error) `_rollback` takes back every grant the
journal does not hold, and every answer given after that rollback is checked against
what is still held: a grant that was taken back answers ENOLCK instead.

Part of LockManager (a mixin: it works on the manager's state under its mutex).
"""

from __future__ import annotations

import errno
import logging
import os
import threading

from lockd.api import F_UNLCK, OFFSET_MAX
from lockd.engine import ofd
from lockd.engine.ranges import LockRange, apply, overlapping
from lockd.engine.state import FLOCK, POSIX, FileState, Wait, keeper_key
from lockd.journal import ops as J

log = logging.getLogger("lockd.manager")

_NO_LOCKS: tuple = ()


class Durability:
    """Journal and keeper writes, rollback, and the final answer of every request."""

    def _init_durability(self, journal: object | None) -> None:
        self._journal = journal
        self._jlock = threading.Lock()  # one journal write at a time
        self._jops: list = []  # journal records not yet written
        self._kops: list[tuple[str, str, int]] = []  # ("put", key, dup fd) | ("drop", key, -1)
        self._klock = threading.Lock()
        self._rollbacks = 0  # journal batches that failed and were rolled back
        self.journal_error: str | None = None
        # The descriptor keeper (lockd.journal.keeper) holds duplicates of every lock
        # description so that a crash of this process drops no host lock.
        self.keeper: object | None = None
        self._keeper_lost = False

    @property
    def journaled(self) -> bool:
        return self._journal is not None

    @property
    def journal_failures(self) -> int:
        """Journal batches that failed and were rolled back since start."""
        return self._rollbacks

    @property
    def nonblocking(self) -> bool:
        """True when no call blocks its caller for long: without a journal or descriptor
        keeper, a request is answered from memory and non-blocking lock calls. A
        transport may then answer on the reading thread."""
        return self._journal is None and self.keeper is None

    def _jlog(self, op: tuple) -> None:
        if self._journal is not None:
            self._jops.append(op)

    # ------------------------------------------------------------ after the critical section
    def _after(self, done: list, closing: list, gen: int) -> None:
        """Make the changes durable, then close descriptors, start host-wait threads and
        answer finished waits. `gen` is _rollbacks as seen inside the critical section:
        if a rollback happened since, a grant may have been taken back."""
        # Always, with a journal or keeper: another thread may have taken this request's
        # changes and still be writing them; the flush waits for it (its lock), so
        # nobody is answered before their change is durable.
        if self._journal is not None or self.keeper is not None or self._kops:
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

    def flush_durable(self) -> None:
        """Make every change so far survive a crash: keeper, then journal. In this order
        a crash between the two leaves a kept description the journal does not know,
        which recovery reads back from the kernel (exact), rather than a journaled lock
        whose description died with us (which recovery would report lost, to an owner
        that was never told it held it)."""
        if self.keeper is not None or self._kops:
            self._flush_keeper()
        if self._journal is not None:
            self._flush_journal()

    def _flush_journal(self) -> None:
        with self._jlock:
            with self._mu:
                ops, self._jops = self._jops, []
            if not ops:
                return
            try:
                self._journal.write(ops)  # type: ignore[union-attr]
            except Exception as exc:
                # Until a write succeeds again new locks answer ENOLCK: a grant we cannot
                # journal could be lost by a crash without anyone being told.
                if self.journal_error is None:
                    log.error("journal write failed, refusing new locks: %s", exc)
                self.journal_error = str(exc)
                done, closing = self._rollback(ops)
            else:
                if self.journal_error is not None:
                    log.warning("journal writable again, granting locks again")
                    self.journal_error = None
                return
        # Waiters the rollback answered (ENOLCK); outside _jlock, as _after does.
        self._fire(done, closing, self._rollbacks)

    def _rollback(self, ops: list) -> tuple[list, list]:
        """A journal batch failed: take back every grant it (or anything not journaled
        since) made, so that no lock is held that the journal does not hold.

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
            log.error("journal batch of %d changes failed: %d owner(s) and %d flock(s) "
                      "rolled back", len(ops), len(posix), len(flocks))
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
        section: queued, sent by _flush_keeper before the answer)."""
        kkey = keeper_key(dkey, f)
        # A pooled description that goes back to its last owner (the usual lock,
        # unlock, lock again) is already kept under the right key.
        if d.kept_as != kkey:  # type: ignore[attr-defined]
            if d.kept_as is not None:  # type: ignore[attr-defined]
                self._kops.append(("drop", d.kept_as, -1))  # type: ignore[attr-defined]
            self._kops.append(("put", kkey, os.dup(d.fd)))  # type: ignore[attr-defined]
            d.kept_as = kkey  # type: ignore[attr-defined]
            # The owner's previous description may sit in the spare pool, still named
            # by this key in our books: the put replaces it in the keeper, and whoever
            # takes that spare next must not drop the key, which is ours now.
            for sd in f.spare:
                if sd.kept_as == kkey:
                    sd.kept_as = None

    def _unkeep(self, d: object) -> None:
        if d.kept_as is not None:  # type: ignore[attr-defined]
            self._kops.append(("drop", d.kept_as, -1))  # type: ignore[attr-defined]
            d.kept_as = None  # type: ignore[attr-defined]

    def _flush_keeper(self) -> None:
        with self._klock:
            with self._mu:
                ops, self._kops = self._kops, []
                if self._keeper_lost and self.keeper is not None:
                    # The keeper died: a new one gets every description we hold. The
                    # host locks never left (our own descriptors hold them meanwhile).
                    for fd in (fd for op, _k, fd in ops if fd >= 0):
                        os.close(fd)
                    ops = [("put", d.kept_as, os.dup(d.fd)) for f in self._files.values()
                           for d in (*f.descs.values(), *f.spare) if d.kept_as is not None]
                    restart = True
                else:
                    restart = False
            try:
                if restart:
                    self.keeper.restart()  # type: ignore[union-attr]
                    log.warning("descriptor keeper restarted: handing it %d descriptions",
                                len(ops))
                    self._keeper_lost = False
                for op, key, fd in ops:
                    if op == "put":
                        self.keeper.put(key, fd)  # type: ignore[union-attr]
                    else:
                        self.keeper.drop(key)  # type: ignore[union-attr]
            except (OSError, AttributeError) as exc:
                if not self._keeper_lost:
                    log.error("descriptor keeper unreachable (%s): restarting it", exc)
                self._keeper_lost = True
            finally:
                for _op, _key, fd in ops:
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
