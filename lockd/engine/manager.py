"""LockManager: guests' POSIX and flock locks mapped onto host open-file-description locks.

One mutex guards all state; nothing inside it blocks (only non-blocking F_OFD_SETLK /
flock(LOCK_NB) calls, dict and list work). Opening a new description happens before the
critical section, journal writes and callbacks after it. A request that conflicts with a
managed holder waits in the file's FIFO queue; one that conflicts only with a host holder
waits in a thread blocked in F_OFD_SETLKW on the owner's own description, which the kernel
wakes as soon as the host lock goes, and which a signal interrupts to cancel it.
"""

from __future__ import annotations

import errno
import logging
import os
import resource
import signal
import threading
import time
from bisect import bisect_right
from collections.abc import Callable
from dataclasses import dataclass, field
from fcntl import LOCK_EX, LOCK_NB, LOCK_SH, LOCK_UN
from itertools import count

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
from lockd.engine import ofd
from lockd.engine.ranges import (
    FileLocks,
    LockRange,
    apply,
    conflicts,
    find,
    overlapping,
    restore_steps,
)

log = logging.getLogger("lockd.engine.manager")

POSIX = "posix"
FLOCK = "flock"

# Descriptors kept free for everything else the process opens (sockets, FUSE, journal).
FD_RESERVE_MIN = 128

# Lock-free descriptions kept open per file for reuse (bounded; closed with the file).
SPARE_DESCRIPTIONS = 4


class _Denied(Exception):
    """Inside the manager: a request fails with this errno."""

    def __init__(self, err: int) -> None:
        super().__init__(err)
        self.err = err


class Description:
    """An open file description dedicated to one (guest, owner, file) or (guest, fh)."""

    __slots__ = ("fd", "busy", "writable", "kept_as")

    def __init__(self, fd: int, writable: bool) -> None:
        self.fd = fd
        self.busy = 0  # host-wait threads blocked on this fd: it must not be closed
        self.writable = writable
        self.kept_as: str | None = None  # the key the descriptor keeper holds it under


class FileState:
    """Everything the manager knows about one host file, keyed by (dev, ino).

    It is also the FileRef the callers hold."""

    __slots__ = (
        "dev", "ino", "key", "path", "path_fd", "refs", "locks",
        "flocks", "queue", "descs", "handle", "handle_type", "gdescs", "spare", "pids",
    )

    def __init__(self, dev: int, ino: int, path: str, path_fd: int) -> None:
        self.dev = dev
        self.ino = ino
        self.key = (dev, ino)
        self.path = path
        self.path_fd = path_fd  # O_PATH reference used to open lock descriptions
        self.refs = 0
        self.locks = FileLocks()  # (guest, owner) -> its POSIX locks
        self.flocks: dict[tuple, int] = {}  # (guest, fh) -> F_RDLCK / F_WRLCK
        self.queue: list[Wait] = []  # FIFO of waits (POSIX and flock)
        self.descs: dict[tuple, Description] = {}  # (kind, guest, owner|fh) -> description
        self.handle: bytes | None = None  # file handle for reopening after a restart
        self.handle_type: int | None = None
        self.gdescs: dict[str, int] = {}  # guest -> descriptions it has on this file
        # Lock-free descriptions kept for the next owner: opening one costs ~10 us. The
        # objects themselves are reused, so taking one allocates nothing.
        self.spare: list[Description] = []
        # Holder pids by owner/fh key, kept out of LockRange so that equal ranges compare
        # equal; per file, so the hot path hashes a flat key.
        self.pids: dict[tuple, int] = {}

    def idle(self) -> bool:
        return not (self.refs or self.locks or self.flocks or self.queue or self.descs)


@dataclass(eq=False)
class Wait:
    id: int
    guest: str
    key: tuple  # (guest, owner) or (guest, fh)
    kind: str
    file: FileState
    type: int
    start: int
    end: int
    pid: int
    callback: WaitCallback | None
    tag: int | None
    since: float = field(default_factory=time.monotonic)
    state: str = "queued"  # queued -> host (thread in the kernel) -> done
    cancel_err: int | None = None
    thread: threading.Thread | None = None


class GuestState:
    __slots__ = ("name", "locks", "waits", "owner_descs", "files", "flock_files", "tags")

    def __init__(self, name: str) -> None:
        self.name = name
        self.locks = 0  # lock ranges held (POSIX ranges + flocks)
        self.waits: dict[int, Wait] = {}
        self.owner_descs: dict[tuple, int] = {}  # owner/fh key -> descriptions it has
        self.files: dict[tuple, FileState] = {}  # files where the guest has anything
        self.flock_files: dict[tuple, FileState] = {}  # (guest, fh) -> its file
        self.tags: dict[int, Wait] = {}


class LockManager:
    """The lock manager (implements lockd.api.LockService)."""

    def __init__(self, limits: Limits | None = None, journal: object | None = None) -> None:
        self.limits = limits or Limits()
        self._mu = threading.Lock()
        self._files: dict[tuple, FileState] = {}
        self._guests: dict[str, GuestState] = {}
        self._waits: dict[int, Wait] = {}
        self._owner_waits: dict[tuple, list[Wait]] = {}
        self._ids = count(1)
        self._lost: dict[tuple, dict] = {}  # (guest, key, file key) -> lost lock record
        self._journal = journal
        self._jlock = threading.Lock()
        self._jops: list[tuple] = []
        self._fds_open = 0
        self._fd_budget = self._raise_fd_limit()
        self._started = time.monotonic()
        self.counters = dict.fromkeys(
            (
                "locks_granted", "locks_denied", "waits_started", "waits_granted",
                "waits_cancelled", "deadlocks", "evictions", "enolck", "lost_locks",
            ),
            0,
        )
        self.on_wait_done: Callable[[Wait, int], None] | None = None  # metrics hook
        # The descriptor keeper (lockd.journal.keeper) holds duplicates of every lock description
        # so that a crash of this process drops no host lock.
        self.keeper: object | None = None
        self.journal_error: str | None = None
        # Descriptions a cluster file system revoked (see _revoked): closed, never reused.
        self._revoked_descs: set[Description] = set()
        self._jfails = 0  # journal batches that failed (and were rolled back)
        # Set by a caller that commits once per batch (the daemon's loop calls
        # flush_journal() before it sends any reply); else every call commits itself.
        self.defer_journal = False
        self._kops: list[tuple] = []
        self._klock = threading.Lock()
        ofd.install_wake_signal(ofd.WAKE_SIGNAL)

    @property
    def journal_failures(self) -> int:
        """Journal batches that failed and were rolled back since start."""
        return self._jfails

    @property
    def nonblocking(self) -> bool:
        """True when no call blocks its caller for long: without a journal (SQLite
        commit) or descriptor keeper (socket), a request is answered from memory and
        non-blocking lock calls. A transport may then answer on the reading thread."""
        return self._journal is None and self.keeper is None

    # ------------------------------------------------------------------ files
    @staticmethod
    def _raise_fd_limit() -> int:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard != resource.RLIM_INFINITY and soft < hard:
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
                soft = hard
            except (ValueError, OSError):
                pass
        reserve = max(FD_RESERVE_MIN, soft // 16)
        return max(soft - reserve, 16)

    def file(self, fd: int, path: str | None = None) -> FileState:
        st = os.fstat(fd)
        key = (st.st_dev, st.st_ino)
        with self._mu:
            f = self._files.get(key)
            if f is not None:
                f.refs += 1
                return f
        if path is None:
            try:
                path = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:
                path = "?"
        path_fd = os.open(f"/proc/self/fd/{fd}", os.O_PATH | os.O_CLOEXEC)
        handle = ofd.name_to_handle(fd)
        with self._mu:
            f = self._files.get(key)
            if f is None:
                f = FileState(key[0], key[1], path, path_fd)
                if handle:
                    f.handle_type, f.handle = handle
                self._files[key] = f
                self._fds_open += 1
                path_fd = -1
            f.refs += 1
        if path_fd >= 0:
            os.close(path_fd)
        return f

    def put_file(self, ref: FileState) -> None:
        with self._mu:
            ref.refs -= 1
            self._maybe_forget_file(ref)

    def _maybe_forget_file(self, f: FileState) -> None:
        if f.idle() and self._files.get(f.key) is f:
            del self._files[f.key]
            self._jlog("forget-file", f.dev, f.ino)
            for d in f.spare:
                os.close(d.fd)
                if d.kept_as is not None:
                    self._kops.append(("drop", d.kept_as, -1))
            self._fds_open -= 1 + len(f.spare)
            f.spare.clear()
            os.close(f.path_fd)

    def _open_desc_fd(self, f: FileState) -> tuple[int, bool]:
        """Open a fresh description of the file, read-write when the host allows it so
        that both lock types work; read-only files still get read locks."""
        path = f"/proc/self/fd/{f.path_fd}"
        flags = os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK
        try:
            return os.open(path, os.O_RDWR | flags), True
        except OSError as exc:
            if exc.errno not in (errno.EACCES, errno.EROFS, errno.ETXTBSY, errno.EPERM):
                raise _Denied(exc.errno or errno.EIO) from exc
        try:
            return os.open(path, os.O_RDONLY | flags), False
        except OSError as exc:
            raise _Denied(exc.errno or errno.EIO) from exc

    # ------------------------------------------------------------------ helpers
    def _guest(self, name: str) -> GuestState:
        g = self._guests.get(name)
        if g is None:
            g = self._guests[name] = GuestState(name)
        return g

    def _desc(self, f: FileState, dkey: tuple, g: GuestState, okey: tuple,
              spare: list) -> Description:
        """The owner's description, installed from `spare` (opened outside the lock)."""
        d = f.descs.get(dkey)
        if d is not None:
            return d
        if okey not in g.owner_descs and len(g.owner_descs) >= self.limits.max_owners:
            raise _Denied(errno.ENOLCK)
        if f.spare:
            d = f.spare.pop()
        else:
            if not spare:
                raise _NeedDescription
            if self._fds_open >= self._fd_budget:
                raise _Denied(errno.ENOLCK)
            d = Description(*spare.pop())
            self._fds_open += 1
        if self.keeper is not None:
            kkey = _keeper_key(dkey, f)
            # A pooled description that goes back to its last owner (the usual lock,
            # unlock, lock again) is already kept under the right key.
            if d.kept_as != kkey:
                if d.kept_as is not None:
                    self._kops.append(("drop", d.kept_as, -1))
                self._kops.append(("put", kkey, os.dup(d.fd)))
                d.kept_as = kkey
        f.descs[dkey] = d
        f.gdescs[g.name] = f.gdescs.get(g.name, 0) + 1
        g.owner_descs[okey] = g.owner_descs.get(okey, 0) + 1
        g.files[f.key] = f
        return d

    def _maybe_close_desc(self, f: FileState, dkey: tuple, g: GuestState, okey: tuple,
                          closing: list) -> None:
        d = f.descs.get(dkey)
        if d is None or d.busy:
            return
        # F_RDLCK is 0: test flock membership, not the held type's truth value.
        if (f.locks.owners.get(okey) if dkey[0] == POSIX else okey in f.flocks):
            return
        del f.descs[dkey]
        if (len(f.spare) < SPARE_DESCRIPTIONS and self._fds_open < self._fd_budget // 2
                and not (self._revoked_descs and d in self._revoked_descs)):
            # Holds no lock: reusable by anyone. The keeper may keep its copy meanwhile
            # (a description without locks protects nothing and costs one fd there).
            f.spare.append(d)
        else:
            if d.kept_as is not None:
                self._kops.append(("drop", d.kept_as, -1))
            closing.append(d.fd)
            self._fds_open -= 1
            self._revoked_descs.discard(d)
        n = g.owner_descs.get(okey, 0) - 1
        if n > 0:
            g.owner_descs[okey] = n
        else:
            g.owner_descs.pop(okey, None)
        # Forget the file for this guest once it has nothing left there.
        guest = g.name
        left = f.gdescs[guest] - 1
        if left:
            f.gdescs[guest] = left
        else:
            del f.gdescs[guest]
            if not f.queue or not any(w.guest == guest for w in f.queue):
                g.files.pop(f.key, None)
                if not f.refs:  # a referenced file is never idle: skip the call
                    self._maybe_forget_file(f)

    def _run(self, fn: Callable, *args) -> int:
        """Run fn(*args, spare, done) under the mutex, opening a description outside it
        when fn asks for one; then journal, close fds and fire callbacks, in that order."""
        spare: list = []
        done: list = []
        closing: list = []
        try:
            while True:
                try:
                    with self._mu:
                        rc = fn(*args, spare, done, closing)
                    break
                except _NeedDescription:
                    spare.append(self._open_desc_fd(args[2]))
        except _Denied as exc:
            rc = exc.err
        finally:
            for fd, _w in spare:
                closing.append(fd)
            self._after(done, closing)
        if self._jfails and rc == 0 and args[3] != F_UNLCK:
            if fn == self._flock_locked:
                return self._recheck(FLOCK, args[0], args[1], args[2], args[3], 0, OFFSET_MAX)
            return self._recheck(POSIX, *args[:6])
        return rc

    def _after(self, done: list, closing: list) -> None:
        # With a journal or keeper, always flush: another thread may have taken this
        # request's ops from _jops/_kops and still be writing them, and flush waits for
        # it (its lock), so the caller never replies before its change is durable.
        if not self.defer_journal:
            self.flush_durable()
        if done or closing:
            self._fire(done, closing)

    def _fire(self, done: list, closing: list) -> None:
        """Close descriptors, start host-wait threads, run wait callbacks."""
        if self._jfails and not self.defer_journal:
            # A journal write failed at some point: a grant in `done` may have been
            # taken back by its batch's rollback; its waiter hears ENOLCK, not success.
            done = [item if isinstance(item, threading.Thread) or item[1]
                    or self._wait_holds(item[0]) else (item[0], errno.ENOLCK)
                    for item in done]
        for fd in closing:
            try:
                os.close(fd)
            except OSError:
                pass
        for item in done:
            if isinstance(item, threading.Thread):
                item.start()
            else:
                w, err = item
                if self.on_wait_done is not None:
                    self.on_wait_done(w, err)
                if w.callback is not None:
                    try:
                        w.callback(err)
                    except Exception:  # a broken caller must not break the manager
                        log.exception("wait callback failed")

    def flush_durable(self) -> None:
        """Make every change so far survive a crash: journal and keeper."""
        if self._journal is not None:
            self.flush_journal()
        if self.keeper is not None or self._kops:
            self._flush_keeper()

    def flush_journal(self) -> None:
        """Write every pending change to the journal (group commit). With defer_journal
        the caller (the daemon's loop) calls this once per batch, before replying."""
        if self.defer_journal and (self.keeper is not None or self._kops):
            self._flush_keeper()
        if self._journal is None:
            return
        with self._jlock:
            with self._mu:
                ops, self._jops = self._jops, []
            if not ops:
                return
            try:
                self._journal.write(ops)  # type: ignore[union-attr]
            except Exception as exc:
                # Until a write succeeds again new locks answer ENOLCK: a grant we cannot
                # journal could be lost by a crash without anyone being told. The grants
                # of the failed batch are taken back (see _rollback).
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
        self._fire(done, closing)

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
            self._jfails += 1
            ops = ops + self._jops
            posix: dict[tuple, list] = {}
            flocks: dict[tuple, FileState] = {}
            for op in ops:
                if op[0] == "posix":
                    posix.setdefault((op[1], op[2], op[3]), []).append(op)
                elif op[0] == "flock" and op[4] != F_UNLCK:
                    flocks[(op[1], op[2], op[3].key)] = op[3]
            self._jops = ops
            files: dict[tuple, FileState] = {}
            for (guest, owner, f), fops in posix.items():
                key = (guest, owner)
                now = f.locks.owners.get(key, [])
                before = set(now)
                for op in reversed(fops):  # undo the ops: the journal's state
                    before.difference_update(op[5])
                    before.update(op[4])
                g = self._guests.get(guest)
                d = f.descs.get((POSIX, guest, owner))
                if g is None or d is None:
                    continue
                for s, e, t in _weaker(now, sorted(before)):
                    cur = f.locks.owners.get(key, _NO_LOCKS)
                    new, removed, added = apply(cur, s, e, t)
                    ofd.setlk(d.fd, t, s, e)
                    f.locks.update(key, new, s, e, t, removed)
                    g.locks += len(added) - len(removed)
                    self._jlog("posix", guest, owner, f, removed, added, f.pids.get(key, 0))
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
        """Does (guest, owner|fh) hold [start, end] at least as strongly as type_? Used
        to re-check a grant after a journal failure (it may have been rolled back)."""
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

    def _flush_keeper(self) -> None:
        with self._klock:
            with self._mu:
                ops, self._kops = self._kops, []
            for op, key, fd in ops:
                try:
                    if op == "put":
                        self.keeper.put(key, fd)  # type: ignore[union-attr]
                    else:
                        self.keeper.drop(key)  # type: ignore[union-attr]
                except OSError as exc:
                    log.warning("descriptor keeper unreachable: %s", exc)
                finally:
                    if fd >= 0:
                        os.close(fd)

    def _jlog(self, *op: object) -> None:
        if self._journal is not None:
            self._jops.append(op)

    # ------------------------------------------------------------------ queries
    def getlk(self, guest: str, owner: int, ref: FileState, type_: int, start: int,
              end: int) -> Conflict | int:
        if type_ not in (F_RDLCK, F_WRLCK) or not 0 <= start <= end <= OFFSET_MAX:
            return errno.EINVAL
        key = (guest, owner)
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
                fd = os.open(f"/proc/self/fd/{f.path_fd}", os.O_RDONLY | os.O_CLOEXEC
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
        # The hot path: the same locked body as _run without its retry loop and argument
        # packing. Only when a description has to be opened first (the file's spare pool
        # is empty) does it go round _run, which opens one outside the mutex.
        done: list = []
        closing: list = []
        mu = self._mu
        mu.acquire()  # not `with`: that costs twice as much here (~0.2 us)
        try:
            rc = self._setlk_locked(guest, owner, ref, type_, start, end, pid, None, None,
                                    _NO_SPARE, done, closing)
        except _NeedDescription:  # raised before any state changed: safe to redo
            rc = None
        except _Denied as exc:
            rc = exc.err
        finally:
            mu.release()
            if done or closing or self._journal is not None or self.keeper is not None:
                self._after(done, closing)  # the same test _after starts with, inlined
        if rc is None:
            return self._run(self._setlk_locked, guest, owner, ref, type_, start, end, pid,
                             None, None)
        if self._jfails and rc == 0:
            return self._recheck(POSIX, guest, owner, ref, type_, start, end)
        return rc

    def _recheck(self, kind: str, guest: str, owner: int, ref: FileState, type_: int,
                 start: int, end: int) -> int:
        """A grant after a journal failure: answer ENOLCK if the batch's rollback took it
        back (when this caller's flush has run, i.e. without defer_journal)."""
        if type_ == F_UNLCK or self.defer_journal:
            return 0
        with self._mu:
            ok = self._holds(kind, (guest, owner), ref, type_, start, end)
        return 0 if ok else errno.ENOLCK

    def setlkw(self, guest: str, owner: int, ref: FileState, type_: int, start: int, end: int,
               pid: int, callback: WaitCallback, tag: int | None = None) -> int:
        if type_ not in _LOCK_TYPES or not 0 <= start <= end <= OFFSET_MAX:
            return errno.EINVAL
        return self._run(self._setlk_locked, guest, owner, ref, type_, start, end, pid,
                         callback, tag)

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
        if self.journal_error is not None:
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
        d = f.descs.get(dkey) or self._desc(f, dkey, g, key, spare)
        rc = self._grant_posix(g, key, f, d, type_, start, end, pid)
        if rc in ofd.REVOKED:  # revoked by a cluster file system: see _revoked
            return self._revoked(g, key, POSIX, f, d, closing)
        if rc == errno.EAGAIN:
            if callback is None:
                self.counters["locks_denied"] += 1
                self._maybe_close_desc(f, dkey, g, key, closing)
                return rc
            return self._queue(g, key, POSIX, f, type_, start, end, pid, callback, tag, done,
                               host=True)
        if rc:
            self._maybe_close_desc(f, dkey, g, key, closing)
        return rc

    def _grant_posix(self, g: GuestState, key: tuple, f: FileState, d: Description,
                     type_: int, start: int, end: int, pid: int) -> int:
        """Take the lock on the host and record it; EAGAIN when a host holder has it."""
        locks = f.locks.owners.get(key, _NO_LOCKS)
        new, removed, added = apply(locks, start, end, type_)
        if g.locks + len(added) - len(removed) > self.limits.max_locks:
            self.counters["enolck"] += 1
            return errno.ENOLCK
        if type_ == F_WRLCK and not d.writable:
            return errno.EBADF
        rc = ofd.setlk(d.fd, type_, start, end)
        if rc:
            return rc
        self._record_posix(g, key, f, new, removed, added, start, end, type_, pid)
        return 0

    def _record_posix(self, g: GuestState, key: tuple, f: FileState, new: list,
                      removed: list, added: list, start: int, end: int, type_: int,
                      pid: int) -> None:
        f.locks.update(key, new, start, end, type_, removed)
        g.locks += len(added) - len(removed)
        if type_ != F_UNLCK:
            f.pids[key] = pid
            self.counters["locks_granted"] += 1
        elif not new:
            f.pids.pop(key, None)
        if self._journal is not None and (removed or added):
            self._jlog("posix", key[0], key[1], f, removed, added, pid)

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
            self._record_posix(g, key, f, new, removed, added, start, end, F_UNLCK, 0)
        if not new:
            self._maybe_close_desc(f, dkey, g, key, closing)
        return False

    def _revoked(self, g: GuestState, key: tuple, kind: str, f: FileState, d: Description,
                 closing: list | None) -> int:
        """A host lock call on the owner's description failed with EBADFD: a cluster file
        system (GlusterFS with client.strict-locks) gave the description's locks to
        another host while this one was cut off, and fails every later call on it.

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
            rec = {"guest": key[0], "kind": kind, "owner": key[1], "start": r.start,
                   "end": r.end, "type": TYPE_NAMES[r.type], "pid": pid, "path": f.path,
                   "at": time.time(), "errno": errno.EBADFD}  # see ofd.REVOKED
            self._jlog("lost", dict(rec, type=r.type, file=f, reported=1))
            self.counters["lost_locks"] += 1
            log.warning("lost lock (revoked by the cluster file system) %s", rec)
        self._revoked_descs.add(d)  # _maybe_close_desc closes it instead of keeping it
        if kind == POSIX:
            if held:
                self._record_posix(g, key, f, [], held, [], 0, OFFSET_MAX, F_UNLCK, 0)
        elif held:
            del f.flocks[key]
            g.locks -= 1
            g.flock_files.pop(key, None)
            f.pids.pop(key, None)
            self._jlog("flock", key[0], key[1], f, F_UNLCK, 0)
        if closing is not None:
            self._maybe_close_desc(f, (kind, key[0], key[1]), g, key, closing)
            for sd in f.spare:
                if sd.kept_as is not None:
                    self._kops.append(("drop", sd.kept_as, -1))
                closing.append(sd.fd)
                self._fds_open -= 1
            f.spare.clear()
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
        self._jlog("wait+", w)
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
        self._jlog("wait-", w)
        done.append((w, err))

    def _grant_waiters(self, f: FileState, done: list, closing: list) -> None:
        """Grant, in FIFO order, every queued wait of the file that nothing blocks now."""
        if not f.queue:
            return
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
            if self.journal_error is not None:
                # Its turn, but the grant could not be journaled: answer, do not grant.
                self.counters["enolck"] += 1
                self._finish(w, errno.ENOLCK, done)
                continue
            if w.kind == POSIX:
                dkey = (POSIX, w.key[0], w.key[1])
                d = f.descs.get(dkey)
                if d is None:
                    d = self._desc_now(f, dkey, g, w.key)
                    if isinstance(d, int):
                        self._finish(w, d, done)
                        continue
                rc = self._grant_posix(g, w.key, f, d, w.type, w.start, w.end, w.pid)
            else:
                dkey = (FLOCK, w.key[0], w.key[1])
                d = f.descs.get(dkey)
                if d is None:
                    d = self._desc_now(f, dkey, g, w.key)
                    if isinstance(d, int):
                        self._finish(w, d, done)
                        continue
                rc = self._grant_flock(g, w.key, f, d, w.type, w.pid)
            if rc == errno.EAGAIN:
                self._start_host_wait(w, done)
            else:
                self._finish(w, rc, done)
                if rc:
                    self._maybe_close_desc(f, dkey, g, w.key, closing)

    def _desc_now(self, f: FileState, dkey: tuple, g: GuestState, okey: tuple
                  ) -> Description | int:
        """Open a description inside the critical section. Only waits being granted need
        this (their owner had none yet); opening a local file does not block."""
        spare: list = []
        try:
            spare.append(self._open_desc_fd(f))
            return self._desc(f, dkey, g, okey, spare)
        except _Denied as exc:
            return exc.err
        finally:
            for fd, _w in spare:
                os.close(fd)

    def _start_host_wait(self, w: Wait, done: list) -> None:
        """Wait for a host holder in a thread blocked in the kernel on the owner's own
        description: the kernel grants it the moment the host lock goes."""
        f = w.file
        g = self._guests[w.guest]
        dkey = (w.kind, w.key[0], w.key[1])
        d = f.descs.get(dkey)
        if d is None:
            d = self._desc_now(f, dkey, g, w.key)
            if isinstance(d, int):
                self._finish(w, d, done)
                return
        d.busy += 1
        w.state = "host"
        before = list(f.locks.owners.get(w.key, ())) if w.kind == POSIX else f.flocks.get(w.key)
        t = threading.Thread(target=self._host_wait, args=(w, d, before),
                             name=f"hostwait-{w.id}", daemon=True)
        w.thread = t
        done.append(t)

    def _host_wait(self, w: Wait, d: Description, before: object) -> None:
        while True:
            if w.cancel_err is not None:
                rc = errno.EINTR
                break
            if w.kind == POSIX:
                rc = ofd.setlkw(d.fd, w.type, w.start, w.end)
            else:
                rc = ofd.flock(d.fd, LOCK_EX if w.type == F_WRLCK else LOCK_SH)
            if rc != errno.EINTR:
                break
        done: list = []
        closing: list = []
        with self._mu:
            d.busy -= 1
            f = w.file
            g = self._guests.get(w.guest)
            if w.state == "done" or g is None:
                rc2 = w.cancel_err or errno.EINTR
                if rc == 0:
                    self._undo_host_grant(w, d)
            elif w.cancel_err is not None:
                if rc == 0:
                    self._undo_host_grant(w, d)
                rc2 = w.cancel_err
            elif rc == 0:
                rc2 = self._record_host_grant(g, w, d)
            else:
                rc2 = rc
            if w.state != "done":
                self._finish(w, rc2, done)
            if g is not None:
                self._maybe_close_desc(f, (w.kind, w.key[0], w.key[1]), g, w.key, closing)
            self._grant_waiters(f, done, closing)
            self._maybe_forget_guest(w.guest)
        self._after(done, closing)

    def _record_host_grant(self, g: GuestState, w: Wait, d: Description) -> int:
        f = w.file
        if self.journal_error is not None:  # the grant could not be journaled
            self._undo_host_grant(w, d)
            self.counters["enolck"] += 1
            return errno.ENOLCK
        if w.kind == FLOCK:
            if w.key not in f.flocks:
                g.locks += 1
            f.flocks[w.key] = w.type
            g.flock_files[w.key] = f
            f.pids[w.key] = w.pid
            self.counters["locks_granted"] += 1
            self._jlog("flock", w.key[0], w.key[1], f, w.type, w.pid)
            return 0
        locks = f.locks.owners.get(w.key, [])
        new, removed, added = apply(locks, w.start, w.end, w.type)
        if g.locks + len(added) - len(removed) > self.limits.max_locks:
            self._undo_host_grant(w, d)
            self.counters["enolck"] += 1
            return errno.ENOLCK
        self._record_posix(g, w.key, f, new, removed, added, w.start, w.end, w.type, w.pid)
        return 0

    def _undo_host_grant(self, w: Wait, d: Description) -> None:
        """The kernel granted a wait that was cancelled meanwhile: put the host back."""
        if w.kind == FLOCK:
            held = w.file.flocks.get(w.key)
            if held is None:
                ofd.flock(d.fd, LOCK_UN)
            else:
                ofd.flock(d.fd, (LOCK_EX if held == F_WRLCK else LOCK_SH) | LOCK_NB)
            return
        for s, e, t in restore_steps(w.file.locks.owners.get(w.key, []), w.start, w.end):
            ofd.setlk(d.fd, t, s, e)

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

    def _interrupt(self, waits: list) -> None:
        """Kick host-wait threads out of the kernel; a signal can arrive just before the
        thread enters the syscall, so repeat until the thread has left."""
        for w in waits:
            t = w.thread
            deadline = time.monotonic() + 5.0
            while t is not None and t.ident is None and time.monotonic() < deadline:
                time.sleep(0.0005)  # not started yet: it checks the flag first anyway
            while t is not None and t.is_alive() and time.monotonic() < deadline:
                try:
                    signal.pthread_kill(t.ident, ofd.WAKE_SIGNAL)
                except (ProcessLookupError, TypeError):
                    break
                t.join(0.002)

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
        done: list = []
        closing: list = []
        signals: list = []
        with self._mu:
            w = find_wait()
            ok = w is not None and self._cancel_locked(w, err, done, closing, signals)
        self._after(done, closing)
        self._interrupt(signals)
        return ok

    # ------------------------------------------------------------------ flock
    def flock(self, guest: str, fh: int, ref: FileState, type_: int, pid: int, wait: bool,
              callback: WaitCallback | None = None, tag: int | None = None) -> int:
        if type_ not in (F_RDLCK, F_WRLCK, F_UNLCK):
            return errno.EINVAL
        return self._run(self._flock_locked, guest, fh, ref, type_, pid,
                         callback if wait else None, tag)

    def _flock_blocked(self, key: tuple, f: FileState, type_: int, upto: Wait | None = None
                       ) -> bool:
        for k, t in f.flocks.items():
            if k != key and conflicts(t, type_):
                return True
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
        if type_ != F_UNLCK and self.journal_error is not None:
            self.counters["enolck"] += 1
            return errno.ENOLCK
        if held is not None:
            # Linux converts a flock by dropping the old lock first (not atomically).
            if self._drop_flock(g, key, f):  # revoked by a cluster file system
                self._maybe_close_desc(f, dkey, g, key, closing)
                self._grant_waiters(f, done, closing)
                return errno.EIO
        if type_ == F_UNLCK:
            self._maybe_close_desc(f, dkey, g, key, closing)
            self._grant_waiters(f, done, closing)
            return 0
        if self._flock_blocked(key, f, type_):
            if held is not None:
                self._grant_waiters(f, done, closing)
            return self._block(g, key, FLOCK, f, type_, 0, OFFSET_MAX, pid, callback, tag,
                               set(), [], done)
        d = self._desc(f, dkey, g, key, spare)
        rc = self._grant_flock(g, key, f, d, type_, pid)
        if rc in ofd.REVOKED:  # revoked by a cluster file system: see _revoked
            return self._revoked(g, key, FLOCK, f, d, closing)
        if rc == errno.EAGAIN and callback is not None:
            return self._queue(g, key, FLOCK, f, type_, 0, OFFSET_MAX, pid, callback, tag,
                               done, host=True)
        if rc:
            if rc == errno.EAGAIN:
                self.counters["locks_denied"] += 1
            self._maybe_close_desc(f, dkey, g, key, closing)
        return rc

    def _grant_flock(self, g: GuestState, key: tuple, f: FileState, d: Description,
                     type_: int, pid: int) -> int:
        if key not in f.flocks and g.locks + 1 > self.limits.max_locks:
            self.counters["enolck"] += 1
            return errno.ENOLCK
        op = (LOCK_EX if type_ == F_WRLCK else LOCK_SH) | LOCK_NB
        rc = ofd.flock(d.fd, op)
        if rc == errno.EWOULDBLOCK:
            return errno.EAGAIN
        if rc:
            return rc
        if key not in f.flocks:
            g.locks += 1
        f.flocks[key] = type_
        g.flock_files[key] = f
        g.files[f.key] = f
        f.pids[key] = pid
        self.counters["locks_granted"] += 1
        self._jlog("flock", key[0], key[1], f, type_, pid)
        return 0

    def _drop_flock(self, g: GuestState, key: tuple, f: FileState) -> bool:
        """Drop the flock on the host and in the table; True when it was lost."""
        t = f.flocks.pop(key, None)
        if t is None:
            return False
        g.locks -= 1
        g.flock_files.pop(key, None)
        d = f.descs.get((FLOCK, key[0], key[1]))
        if d is not None and ofd.flock(d.fd, LOCK_UN) in ofd.REVOKED:
            f.flocks[key] = t  # _revoked records it lost and drops it
            g.locks += 1
            return self._revoked(g, key, FLOCK, f, d, None) == errno.EIO
        f.pids.pop(key, None)
        self._jlog("flock", key[0], key[1], f, F_UNLCK, 0)
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
            self._maybe_close_desc(f, (FLOCK, guest, fh), g, key, closing)
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
                    self._maybe_close_desc(f, (FLOCK, guest, okey[1]), g, okey, closing)
            for f in files:
                self._grant_waiters(f, done, closing)
            self._maybe_forget_guest(guest)
            return 0

        self._run_simple(locked)
        self._interrupt(signals)
        # Host-wait threads finish their own cleanup; wait for it so the guest is gone.
        for w in signals:
            if w.thread is not None:
                w.thread.join(5.0)

    def evict(self, guest: str) -> None:
        self.counters["evictions"] += 1
        self.release_guest(guest)

    def _run_simple(self, fn: Callable[[list, list, list], int]) -> None:
        done: list = []
        closing: list = []
        try:
            with self._mu:
                fn([], done, closing)
        finally:
            self._after(done, closing)

    def _maybe_forget_guest(self, guest: str) -> None:
        g = self._guests.get(guest)
        if g is None:
            return
        for fk, f in list(g.files.items()):
            if guest not in f.gdescs and not any(w.guest == guest for w in f.queue):
                del g.files[fk]
                self._maybe_forget_file(f)
        if not g.files and not g.waits and not g.locks and not g.owner_descs:
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
        self._jlog("lost-reported", guest, key[1], rec.get("file_id"))
        return True

    def mark_lost(self, guest: str, key: tuple, f: FileState, record: dict) -> None:
        """A lock could not be kept: the owner's next request on the file answers EIO."""
        with self._mu:
            self._mark_lost(guest, key, f.key, record)

    def _mark_lost(self, guest: str, key: tuple, fkey: tuple, record: dict) -> None:
        self._lost[(guest, key, fkey)] = record
        self.counters["lost_locks"] += 1

    def recover(self, keeper_fds: dict[str, int] | None = None) -> dict:
        """Re-take every journaled lock on the host before any request is served.

        `keeper_fds` maps keeper keys to descriptions that survived the crash in the
        descriptor keeper: their locks never left the host. Everything else is opened
        again (by path, checked against (dev, ino), else by file handle) and locked; a
        range someone else took meanwhile becomes a lost lock. Journaled waits go back
        into their queues in their old order, waiting for their guest to re-send them."""
        assert self._journal is not None, "recover() needs a journal"
        t0 = time.monotonic()
        keeper_fds = dict(keeper_fds or {})
        st = self._journal.load()  # type: ignore[attr-defined]
        self._ids = count(st.max_wait_id + 1)
        report = {"files": 0, "locks": 0, "lost": 0, "waits": 0, "from_keeper": 0,
                  "reopened_by_handle": 0}
        refs: dict[int, FileState] = {}
        for fid, jf in st.files.items():
            fd, by_handle = _reopen(jf)
            if fd < 0:
                log.warning("journaled file %s (dev %s ino %s) is gone", jf.path, jf.dev,
                            jf.ino)
                continue
            try:
                refs[fid] = self.file(fd, jf.path)
            finally:
                os.close(fd)
            report["files"] += 1
            report["reopened_by_handle"] += by_handle
        jops: list[tuple] = []
        with self._mu:
            for (guest, kind, owner, fid), ranges in st.locks.items():
                f = refs.get(fid)
                key = (guest, owner)
                g = self._guest(guest)
                d = None
                if f is not None:
                    dkey = (kind, guest, owner)
                    kfd = keeper_fds.pop(_keeper_key(dkey, f), None)
                    try:
                        if kfd is not None:
                            spare = [(kfd, True)]
                            f.spare, pool = [], f.spare  # take the keeper's fd, not a spare
                        else:
                            spare, pool = ([] if f.spare else [self._open_desc_fd(f)]), None
                        d = self._desc(f, dkey, g, key, spare)
                        if pool is not None:
                            f.spare = pool
                        report["from_keeper"] += kfd is not None
                    except (_Denied, _NeedDescription):
                        d = None
                # A description back from the keeper still holds its locks: nothing to
                # re-take. Others are locked again range by range.
                kept = d is not None and kfd is not None and kind == POSIX
                held: list[LockRange] = []
                for s, e, t, pid in ranges:
                    if d is None:
                        rc = errno.ENOENT
                    elif kind == FLOCK:
                        rc = self._grant_flock(g, key, f, d, t, pid)
                    elif t == F_WRLCK and not d.writable:
                        rc = errno.EBADF
                    else:
                        rc = 0 if kept else ofd.setlk(d.fd, t, s, e)
                        if rc == 0:
                            held.append(LockRange(s, e, t))
                            f.pids[key] = pid
                    if rc == 0:
                        report["locks"] += 1
                        continue
                    path = f.path if f is not None else st.files[fid].path
                    rec = {"guest": guest, "kind": kind, "owner": owner, "file_id": fid,
                           "start": s, "end": e, "type": TYPE_NAMES[t], "pid": pid,
                           "path": path, "at": time.time(), "errno": rc}
                    jops.append(("lost", dict(rec, type=t)))
                    fkey = f.key if f is not None else (st.files[fid].dev, st.files[fid].ino)
                    self._mark_lost(guest, key, fkey, rec)
                    report["lost"] += 1
                    log.warning("lost lock %s", rec)
                if held:
                    f.locks.restore(key, held)  # journaled lists are sorted and merged
                    g.locks += len(held)
                if f is not None and d is not None:
                    closing: list = []
                    self._maybe_close_desc(f, (kind, guest, owner), g, key, closing)
                    for fd in closing:
                        os.close(fd)
            for rec in st.lost:
                if not rec.get("reported"):
                    jf = st.files.get(rec["file_id"])
                    if jf is not None:
                        self._lost[(rec["guest"], (rec["guest"], rec["owner"]),
                                    (jf.dev, jf.ino))] = dict(rec, type=TYPE_NAMES.get(
                                        rec["type"], rec["type"]))
            for wrec in st.waits:
                f = refs.get(wrec["file_id"])
                g = self._guest(wrec["guest"])
                w = Wait(wrec["id"], wrec["guest"], (wrec["guest"], wrec["owner"]),
                         wrec["kind"], f, wrec["type"], wrec["start"], wrec["end"],
                         wrec["pid"], None, wrec["tag"])  # type: ignore[arg-type]
                if f is None:
                    jops.append(("wait-", w))
                    continue
                f.queue.append(w)
                g.waits[w.id] = w
                g.files[f.key] = f
                if w.tag is not None:
                    g.tags[w.tag] = w
                self._waits[w.id] = w
                self._owner_waits.setdefault(w.key, []).append(w)
                report["waits"] += 1
        for kkey, kfd in keeper_fds.items():  # descriptions the journal no longer knows
            os.close(kfd)
            if self.keeper is not None:
                self._kops.append(("drop", kkey, -1))
        if jops:
            self._journal.write(jops)  # type: ignore[attr-defined]
        self._jops.clear()  # recovery re-took what the journal already holds
        done: list = []
        closing: list = []
        with self._mu:
            for f in refs.values():
                self._grant_waiters(f, done, closing)
        self._after(done, closing)
        for f in refs.values():
            self.put_file(f)
        report["seconds"] = time.monotonic() - t0
        log.info("recovered %s", report)
        return report

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
                held_locks=sum(g.locks for g in self._guests.values()),
                waiters=len(self._waits),
                owners=sum(len(g.owner_descs) for g in self._guests.values()),
                descriptions=sum(len(f.descs) for f in self._files.values()),
                spare_descriptions=sum(len(f.spare) for f in self._files.values()),
                descriptors=self._fds_open,
                files=len(self._files),
                guests=sorted(self._guests),
                lost=len(self._lost),
                journal_failures=self._jfails,
                journal_error=self.journal_error,
                uptime=time.monotonic() - self._started,
            )
        return out

    def guest_counts(self, guest: str) -> dict:
        with self._mu:
            g = self._guests.get(guest)
            if g is None:
                return {"locks": 0, "waits": 0, "owners": 0}
            return {"locks": g.locks, "waits": len(g.waits), "owners": len(g.owner_descs)}


class _NeedDescription(Exception):
    """Inside the critical section: the owner needs a description opened outside it."""


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


def _keeper_key(dkey: tuple, f: FileState) -> str:
    # Also systemd's FDNAME: printable, no ':' (the guest name is hex-encoded).
    kind, guest, owner = dkey
    return f"{kind}-{f.dev}-{f.ino}-{owner}-{guest.encode().hex()}"


def _reopen(jf: object) -> tuple[int, bool]:
    """Open a journaled file again: by path when it still is the same (dev, ino), else
    by its file handle relative to the nearest existing directory of its old path."""
    flags = os.O_PATH | os.O_CLOEXEC
    try:
        fd = os.open(jf.path, flags | os.O_NOFOLLOW)  # type: ignore[attr-defined]
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) == (jf.dev, jf.ino):  # type: ignore[attr-defined]
            return fd, False
        os.close(fd)
    except OSError:
        pass
    if jf.handle is None:  # type: ignore[attr-defined]
        return -1, False
    d = os.path.dirname(jf.path)  # type: ignore[attr-defined]
    while d and d != "/":
        try:
            mfd = os.open(d, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            d = os.path.dirname(d)
            continue
        try:
            fd = ofd.open_by_handle(mfd, jf.handle_type, jf.handle, os.O_PATH | os.O_CLOEXEC)
        finally:
            os.close(mfd)
        return (fd, True) if fd >= 0 else (-1, False)
    return -1, False
