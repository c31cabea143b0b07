"""Files and the open file descriptions that carry the guests' locks on the host.

Every POSIX owner (guest, owner) gets its own description of a file, and every flock
handle (guest, fh) too, so that the host kernel sees each as a separate OFD lock owner
and conflicts with host processes both ways. A description is opened read-write where
the host allows it, else read-only (read locks on read-only files work). It is given up
as soon as its owner holds nothing on the file; up to SPARE_DESCRIPTIONS lock-free ones
per file are kept for the next owner (opening one costs ~10 us). Descriptors are bounded
per guest (Limits.max_descriptors) and in total (the process's file limit minus a
reserve): beyond either, ENOLCK for that request only.

A part the LockManager holds (`mgr.descs`), one object per manager. It owns the files
table and every description's life: `file`/`put_file` (refcounted files), `take` (the
owner's description, from the spare pool or from one opened outside the mutex with
`open_fd`), `take_now`, `install` (a given descriptor: adopted or kept), `release`
(given up once its owner holds nothing), `retire` (never reused), `close_spares`,
`forget_file`. Everything but `file`, `put_file` and `open_fd` runs under the manager's
mutex (`mu`, shared). It reads the guests' tallies and the files' lock tables, writes
no lock, and reaches the journal and keeper only through the durability part it is
given (`record`, `keep`, `unkeep`).
"""

from __future__ import annotations

import errno
import os
import resource
import threading

from lockd import procfd
from lockd.api import Limits
from lockd.engine import ofd
from lockd.engine.durability import Durability
from lockd.engine.state import (
    POSIX,
    Denied,
    Description,
    FileState,
    GuestState,
    NeedDescription,
    keeper_key,
)
from lockd.journal import ops as J

# Descriptors kept free for everything else the process opens (sockets, FUSE, journal).
FD_RESERVE_MIN = 128
# Lock-free descriptions kept open per file for reuse (bounded; closed with the file).
SPARE_DESCRIPTIONS = 4


def raise_fd_limit() -> int:
    """Raise RLIMIT_NOFILE to its hard limit; the descriptors the manager may use."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    reserve = max(FD_RESERVE_MIN, soft // 16)
    return max(soft - reserve, 16)


class Descriptions:
    """Files and their lock descriptions, within the descriptor budget."""

    def __init__(self, mu: threading.Lock, limits: Limits, counters: dict,
                 files: dict[tuple, FileState], guests: dict[str, GuestState],
                 durable: Durability) -> None:
        """`mu`: the manager's mutex; `counters`: its counter dict (enolck); `files`:
        the files table this part fills (the manager reads it); `guests`: the
        manager's guests (read: what each is charged); `durable`: where journal records
        and keeper puts and drops are queued."""
        self._mu = mu
        self.limits = limits
        self.counters = counters
        self.durable = durable
        self._guests = guests
        self.files = files
        self.open_count = 0  # descriptors open: files' O_PATH ones, descriptions, spares
        self.fd_budget = raise_fd_limit()
        # The part of the budget kept for guests under their guarantee (_room), and the
        # files each guest registered first (charged to it until the file is forgotten).
        self._fd_reserve = min(self.limits.reserved_descriptors, self.fd_budget // 4)
        self._reserve_off = False  # recovery re-takes held locks within the whole budget
        self._file_charged: dict[tuple, str] = {}
        self._guest_files: dict[str, int] = {}
        # Descriptions never reused (`retire`: revoked by a cluster file system, or handed
        # over with their locks): closed when given up.
        self._revoked_descs: set[Description] = set()

    # ------------------------------------------------------------ the shared budget
    def _used_by(self, guest: str) -> int:
        """The descriptors charged to a guest: its lock descriptions and the files it
        registered first."""
        g = self._guests.get(guest)
        return (g.ndescs if g is not None else 0) + self._guest_files.get(guest, 0)

    def _room(self, guest: str | None) -> bool:
        """May `guest` have one more descriptor of the budget every guest shares? While
        more than the reserve is free, yes; the reserve only to a guest that has fewer
        than its guarantee (so no guest, nor many driven by one user, can leave another
        without its first locks); never past the budget. Recovery, which re-takes locks
        guests were told they hold, and registrations for no guest may use it all."""
        free = self.fd_budget - self.open_count
        if free <= 0:
            return False
        if free > self._fd_reserve or self._reserve_off or guest is None:
            return True
        return self._used_by(guest) < self.limits.guaranteed_descriptors

    # ------------------------------------------------------------ files
    def file(self, fd: int, path: str | None = None, guest: str | None = None) -> FileState:
        """Register the file open at `fd` (the caller keeps its fd); refcounted. A new
        file's descriptor is charged to `guest` (see _room) until it is forgotten."""
        st = os.fstat(fd)
        key = (st.st_dev, st.st_ino)
        with self._mu:
            f = self.files.get(key)
            if f is not None:
                f.refs += 1
                return f
            if not self._room(guest):
                self.counters["enolck"] += 1
                raise OSError(errno.ENOLCK, "lock manager out of descriptors")
        if path is None:
            try:
                path = os.readlink(procfd.path(fd))
            except OSError:
                path = "?"
        path_fd = os.open(procfd.path(fd), os.O_PATH | os.O_CLOEXEC)
        handle = ofd.name_to_handle(fd)
        with self._mu:
            f = self.files.get(key)
            if f is None:
                f = FileState(key[0], key[1], path, path_fd)
                if handle:
                    f.handle_type, f.handle = handle
                self.files[key] = f
                self.open_count += 1
                path_fd = -1
                if guest is not None:
                    self._file_charged[key] = guest
                    self._guest_files[guest] = self._guest_files.get(guest, 0) + 1
            f.refs += 1
        if path_fd >= 0:
            os.close(path_fd)
        return f

    def put_file(self, ref: FileState) -> None:
        with self._mu:
            ref.refs -= 1
            self.forget_file(ref)

    def forget_file(self, f: FileState) -> None:
        """Close and forget the file once nothing refers to it, nobody holds or waits
        for anything there and it has no description in use."""
        if f.idle() and self.files.get(f.key) is f:
            del self.files[f.key]
            self.durable.record(J.FileForgotten(f.dev, f.ino))
            for d in f.spare:
                os.close(d.fd)
                self.durable.unkeep(d)
            self.open_count -= 1 + len(f.spare)
            f.spare.clear()
            os.close(f.path_fd)
            charged = self._file_charged.pop(f.key, None)
            if charged is not None:
                n = self._guest_files[charged] - 1
                if n:
                    self._guest_files[charged] = n
                else:
                    del self._guest_files[charged]

    # ------------------------------------------------------------ descriptions
    def open_fd(self, f: FileState) -> tuple[int, bool]:
        """Open a fresh description of the file, read-write when the host allows it so
        that both lock types work; read-only files still get read locks."""
        path = procfd.path(f.path_fd)
        flags = os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK
        try:
            return os.open(path, os.O_RDWR | flags), True
        except OSError as exc:
            if exc.errno not in (errno.EACCES, errno.EROFS, errno.ETXTBSY, errno.EPERM):
                raise Denied(exc.errno or errno.EIO) from exc
        try:
            return os.open(path, os.O_RDONLY | flags), False
        except OSError as exc:
            raise Denied(exc.errno or errno.EIO) from exc

    def take(self, f: FileState, dkey: tuple, g: GuestState, okey: tuple,
             spare: list) -> Description:
        """The owner's description: its own, a spare of the file, or a new one made of
        `spare` ([(fd, writable)] opened outside the mutex; NeedDescription when it is
        needed and empty). Denied(ENOLCK) beyond the guest's owners or descriptors, or
        the shared budget."""
        d = f.descs.get(dkey)
        if d is not None:
            return d
        limits = self.limits
        if okey not in g.owner_descs and len(g.owner_descs) >= limits.max_owners:
            raise Denied(errno.ENOLCK)
        if g.ndescs >= limits.max_descriptors:
            self.counters["enolck"] += 1
            raise Denied(errno.ENOLCK)
        i = self._spare_index(f, dkey, bool(spare)) if f.spare else None
        if i is not None:
            d = f.spare.pop(i)
        else:
            if not spare:
                raise NeedDescription
            if not self._room(g.name):
                self.counters["enolck"] += 1
                raise Denied(errno.ENOLCK)
            d = Description(*spare.pop())
            self.open_count += 1
        if self.durable.keeper is not None:
            self.durable.keep(dkey, f, d)
        f.descs[dkey] = d
        f.gdescs[g.name] = f.gdescs.get(g.name, 0) + 1
        g.owner_descs[okey] = g.owner_descs.get(okey, 0) + 1
        g.ndescs += 1
        g.files[f.key] = f
        return d

    def _spare_index(self, f: FileState, dkey: tuple, have_new: bool) -> int | None:
        """Which spare description the owner gets (None: a new one, when `have_new`).

        With a descriptor keeper, every spare is kept under the key of its last owner,
        and giving it to another owner costs two keeper messages (drop, put: the keeper
        process wakes twice). So an owner gets back its own spare, else one kept under
        no key, else - while the file has room for more spares and descriptors are
        plentiful - a new description of its own (two guests taking turns on a file
        then never trade one), else the last spare."""
        if self.durable.keeper is None:
            return -1
        kkey = keeper_key(dkey, f)
        free = None
        for i, sd in enumerate(f.spare):
            if sd.kept_as == kkey:
                return i
            if sd.kept_as is None:
                free = i
        if free is not None:
            return free
        if len(f.spare) < SPARE_DESCRIPTIONS and self.open_count < self.fd_budget // 2:
            if have_new:
                return None
            raise NeedDescription
        return -1

    def take_now(self, f: FileState, dkey: tuple, g: GuestState, okey: tuple
                 ) -> Description | int:
        """`take`, opening a description inside the critical section when needed: an
        errno instead of Denied. Only waits being granted need this (their owner had
        none yet); opening a local file does not block."""
        d = f.descs.get(dkey)
        if d is not None:
            return d
        spare: list = []
        try:
            spare.append(self.open_fd(f))
            return self.take(f, dkey, g, okey, spare)
        except Denied as exc:
            return exc.err
        finally:
            for fd, _w in spare:
                os.close(fd)

    def install(self, f: FileState, dkey: tuple, g: GuestState, okey: tuple, fd: int,
                writable: bool) -> Description:
        """`take` with this descriptor (adopted, or back from the keeper), never a spare
        of the file: the locks are the descriptor's. Raises as `take` does; the fd is
        then still the caller's."""
        f.spare, pool = [], f.spare
        try:
            return self.take(f, dkey, g, okey, [(fd, writable)])
        finally:
            f.spare = pool

    def retire(self, d: Description) -> None:
        """Never reuse `d`: `release` closes it (a cluster file system revoked its
        locks, or a duplicate of it went elsewhere with them)."""
        self._revoked_descs.add(d)

    def release(self, f: FileState, dkey: tuple, g: GuestState, okey: tuple,
                closing: list) -> None:
        """Give up the owner's description once it holds nothing on the file (and no
        host wait uses it): to the spare pool, or to `closing`. The file is forgotten
        for the guest, and altogether, when nothing is left there."""
        d = f.descs.get(dkey)
        if d is None or d.busy:
            return
        # F_RDLCK is 0: test flock membership, not the held type's truth value.
        if (f.locks.owners.get(okey) if dkey[0] == POSIX else okey in f.flocks):
            return
        del f.descs[dkey]
        if (len(f.spare) < SPARE_DESCRIPTIONS and self.open_count < self.fd_budget // 2
                and not (self._revoked_descs and d in self._revoked_descs)):
            # Holds no lock: reusable by anyone. The keeper may keep its copy meanwhile
            # (a description without locks protects nothing and costs one fd there).
            f.spare.append(d)
        else:
            self.durable.unkeep(d)
            closing.append(d.fd)
            self.open_count -= 1
            self._revoked_descs.discard(d)
        g.ndescs -= 1
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
                    self.forget_file(f)

    def close_spares(self, f: FileState, closing: list) -> None:
        """Close the file's spare descriptions (they may be revoked too)."""
        for sd in f.spare:
            self.durable.unkeep(sd)
            closing.append(sd.fd)
            self.open_count -= 1
        f.spare.clear()
