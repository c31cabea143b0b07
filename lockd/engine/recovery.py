"""Recovery after a crash: re-take every journaled lock before any request is served.

Where the locks come from, in order of trust:

1. The descriptor keeper: descriptions that survived the crash in it never lost their
   locks (OFD locks belong to the description). Each is kept under a key that names its
   (kind, file, owner, guest), and the kernel lists the description's exact locks in
   /proc/self/fdinfo/FD. So a kept description whose journal rows are missing (a
   journal deleted, truncated or restored from a backup while the keeper lived) is
   still recovered, from the key and the kernel's list.
2. The journal: every other journaled lock is opened again (by path when it is still the
   same (dev, ino), else by file handle) and locked range by range. A range that another
   process took meanwhile becomes a *lost lock*: recorded, and the owner's next lock
   request on that file answers EIO once.

Journaled waits go back into their queues in their old order, waiting for their guest's
server to send them again (adopted by tag).

All of it runs in one transaction (`durable.recovery_txn()`), as every request does:
the table's restore calls queue no journal record (the journal holds what they restore),
the corrections (ranges the kernel holds otherwise, lost locks, waits whose file is
gone, leases settled) are queued in it, and leaving it writes them (keeper, then
journal) before the first wait is granted. A journal that refuses that write fails the
recovery: nothing is taken back from owners answered before the crash.

Recovery rebuilds the manager only through public calls: the manager's recovery calls
(`guest_state`, `requeue`, `restore_lost`, `mark_lost`, `retake_flock`, `wake`,
`resume_wait_ids`), its parts' (`descs.take`/`install`/`open_fd`/`release`,
`table.restore_posix`/`restore_flock`, `durable.journal`/`recovery_txn`/`txn`/
`drop_kept`) and the LockService's (`file`, `put_file`).
"""

from __future__ import annotations

import errno
import logging
import os
import re
import time
from collections.abc import Callable

from lockd.api import F_RDLCK, F_UNLCK, F_WRLCK, OFFSET_MAX, TYPE_NAMES
from lockd.engine import ofd
from lockd.engine.durability import RecoveryTxn
from lockd.engine.ranges import LockRange
from lockd.engine.state import (
    FLOCK,
    POSIX,
    Denied,
    FileState,
    NeedDescription,
    Wait,
    keeper_key,
    parse_keeper_key,
)
from lockd.journal import ops as J

log = logging.getLogger("lockd.manager")

# /proc/PID/fdinfo/FD: "lock:\t1: OFDLCK ADVISORY  WRITE -1 fe:00:1234 0 9" (fs/locks.c)
_FDINFO_LOCK = re.compile(
    r"^lock:\s+\d+:\s+(OFDLCK|FLOCK|POSIX)\s+\S+\s+(READ|WRITE)\s+-?\d+\s+\S+\s+(\d+)\s+(\d+|EOF)\s*$",
    re.M)


def kernel_locks(fd: int) -> list[tuple[str, int, int, int]]:
    """The locks the kernel records for the description `fd`: [(kind, start, end, type)]
    with kind "posix" (OFD) or "flock". Empty where the kernel keeps none locally (a FUSE
    file system that handles locks itself)."""
    try:
        with open(f"/proc/self/fdinfo/{fd}") as f:
            text = f.read()
    except OSError:
        return []
    out = []
    for kind, type_, start, end in _FDINFO_LOCK.findall(text):
        if kind == "POSIX":
            continue  # a classic lock of this process, not the description's
        out.append((POSIX if kind == "OFDLCK" else FLOCK, int(start),
                    OFFSET_MAX if end == "EOF" else int(end),
                    F_WRLCK if type_ == "WRITE" else F_RDLCK))
    return out


def reopen(jf: object) -> tuple[int, bool]:
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


def recover(mgr: object, keeper_fds: dict[str, int] | None = None,
            keeper_survived: bool = False) -> dict:
    """Re-take every journaled (or kept) lock in `mgr`, a LockManager with a journal that
    has not served anything yet. `keeper_survived`: `keeper_fds` come from a keeper that
    lived through the crash (it holds every description the dead daemon had handed to
    an owner), not from one started afresh. Returns a report."""
    t0 = time.monotonic()
    keeper_fds = dict(keeper_fds or {})
    durable = mgr.durable
    st = durable.journal.load()
    mgr.resume_wait_ids(st.max_wait_id + 1)
    report = {"files": 0, "locks": 0, "lost": 0, "waits": 0, "from_keeper": 0,
              "from_keeper_only": 0, "reopened_by_handle": 0, "uncertain": 0,
              "keeper_survived": keeper_survived, "kept": len(keeper_fds)}
    refs: dict[int, FileState] = {}
    for fid, jf in st.files.items():
        fd, by_handle = reopen(jf)
        if fd < 0:
            log.warning("journaled file %s (dev %s ino %s) is gone", jf.path, jf.dev, jf.ino)
            continue
        try:
            refs[fid] = mgr.file(fd, jf.path)
        finally:
            os.close(fd)
        report["files"] += 1
        report["reopened_by_handle"] += by_handle
    with durable.recovery_txn() as t:
        # Owners under a lease at the crash have no rows when the lease began with an
        # unlock: they are looked at all the same.
        owners = dict(st.locks)
        for lk in st.leases:
            owners.setdefault(lk, [])
        for (guest, kind, owner, fid), ranges in owners.items():
            f = refs.get(fid)
            _restore_owner(mgr, t, guest, kind, owner, f, fid, st, ranges, keeper_fds,
                           report, (guest, kind, owner, fid) in st.leases, keeper_survived)
        for rec in st.lost:
            if not rec.get("reported"):
                jf = st.files.get(rec["file_id"])
                if jf is not None:
                    mgr.restore_lost(rec["guest"], (rec["guest"], rec["owner"]),
                                     (jf.dev, jf.ino),
                                     dict(rec, type=TYPE_NAMES.get(rec["type"], rec["type"])))
        for wrec in st.waits:
            _restore_wait(mgr, t, wrec, refs.get(wrec["file_id"]), report)
        # Descriptions the journal does not know: rebuilt from their key and the kernel.
        for kkey, kfd in keeper_fds.items():
            if not _adopt_kept(mgr, t, kkey, kfd, refs, report):
                t.closing.append(kfd)
                if durable.keeper is not None:
                    durable.drop_kept(kkey)
        if st.leases:
            t.record(J.LeasesEnd())  # every lease is settled now
    mgr.wake(refs.values())
    for f in refs.values():
        mgr.put_file(f)
    report["seconds"] = time.monotonic() - t0
    log.info("recovered %s", report)
    return report


def _restore_owner(mgr: object, t: RecoveryTxn, guest: str, kind: str, owner: int,
                   f: FileState | None, fid: int, st: object, ranges: list,
                   keeper_fds: dict[str, int], report: dict, leased: bool,
                   keeper_survived: bool) -> None:
    """Re-take one owner's locks on one file (in recovery's transaction `t`). `leased`:
    its locks may have changed after the journal's rows (lockd.engine.durability,
    leases)."""
    key = (guest, owner)
    g = mgr.guest_state(guest)
    descs = mgr.descs
    d = None
    kfd = None
    if f is not None:
        dkey = (kind, guest, owner)
        kfd = keeper_fds.pop(keeper_key(dkey, f), None)
        try:
            if kfd is not None:  # the keeper's fd, not a spare
                d = descs.install(f, dkey, g, key, kfd, True)
                report["from_keeper"] += 1
            else:
                try:
                    d = descs.take(f, dkey, g, key, [])
                except NeedDescription:
                    d = descs.take(f, dkey, g, key, [descs.open_fd(f)])
        except (Denied, NeedDescription):
            d = None
    # A description back from the keeper still holds its locks: nothing to re-take.
    # The kernel's own list of them is the truth (the journal may lag a crash by one
    # change); a FUSE file system keeps its locks itself, and there the journal is.
    # Descriptions that did not survive are locked again range by range.
    kept = d is not None and kfd is not None
    uncertain = False
    journaled = [(s, e, t) for s, e, t, _pid in ranges]
    pid = ranges[0][3] if ranges else 0
    if kept and not ofd.on_fuse(d.fd):
        truth = sorted((s, e, typ) for k, s, e, typ in kernel_locks(d.fd) if k == kind)
        if truth != journaled:
            t.record(_rewrite(guest, kind, owner, f, journaled, truth, pid))
            ranges = [(s, e, typ, pid) for s, e, typ in truth]
    elif leased and keeper_survived and kfd is None:
        # Every description handed to an owner is in the keeper before the reply, and
        # leaves it only when the owner holds nothing more: it released everything.
        if journaled:
            t.record(_rewrite(guest, kind, owner, f or st.files[fid], journaled, [], pid))
        ranges = []
    elif leased:
        # Both the daemon and its keeper died under the lease: the journal may lag the
        # owner's last changes. Re-take what it holds, and tell the owner (EIO once).
        uncertain = True
    kept = kept and kind == POSIX
    held: list[LockRange] = []
    held_pid = 0
    lost = 0
    for s, e, typ, pid in ranges:
        if d is None:
            rc = errno.ENOENT
        elif kind == FLOCK:
            rc = mgr.retake_flock(g, key, f, d, typ, pid)
        elif typ == F_WRLCK and not d.writable:
            rc = errno.EBADF
        else:
            rc = 0 if kept else ofd.setlk(d.fd, typ, s, e)
            if rc == 0:
                held.append(LockRange(s, e, typ))
                held_pid = pid
        if rc == 0:
            report["locks"] += 1
            continue
        _lost(mgr, guest, kind, owner, f, fid, st, t.record, s, e, typ, pid, rc)
        report["lost"] += 1
        lost += 1
    if uncertain:
        report["uncertain"] += 1
        if not lost:  # one EIO tells the owner either way
            _lost(mgr, guest, kind, owner, f, fid, st, t.record, 0, OFFSET_MAX, F_UNLCK, pid,
                  errno.EIO)
    if held:  # journaled lists are sorted and merged
        mgr.table.restore_posix(g, key, f, held, held_pid)
    if f is not None and d is not None:
        descs.release(f, (kind, guest, owner), g, key, t.closing)


def _lost(mgr: object, guest: str, kind: str, owner: int, f: FileState | None,
          fid: int | None, st: object, emit: Callable, s: int, e: int, t: int, pid: int,
          err: int, why: str = "") -> None:
    """Record a lock that could not be kept; the owner's next request on the file answers
    EIO once. `f`: the file when it is open now, else `fid` names it in the journal
    snapshot `st`. Type UNLCK over the whole file: the owner's locks there were uncertain
    (changed under a lease when both the daemon and its keeper died). `emit` takes the
    journal record."""
    path = f.path if f is not None else st.files[fid].path
    rec = {"guest": guest, "kind": kind, "owner": owner, "file_id": fid, "start": s,
           "end": e, "type": TYPE_NAMES[t], "pid": pid, "path": path, "at": time.time(),
           "errno": err}
    emit(J.LostLock(guest, kind, owner, f if fid is None else None, fid, s, e, t, pid, path,
                    rec["at"], False))
    fkey = f.key if f is not None else (st.files[fid].dev, st.files[fid].ino)
    mgr.mark_lost(guest, key=(guest, owner), fkey=fkey, record=rec)
    log.warning("lost lock%s %s", why, rec)


def mark_guest_lost(mgr: object, guest: str) -> int:
    """Record every lock the guest holds as lost, before its session ends and releases
    them: its server could not resume the session, so the guest's owners still believe
    they hold them. Each owner's next request on each such file answers EIO once;
    journaled (`lost` table), counted (lost_locks) and logged. Returns the number of
    ranges recorded."""
    n = 0
    with mgr.durable.txn():  # journaled before the session's end releases them
        g = mgr.guest_state(guest, create=False)
        if g is None:
            return 0
        for f in list(g.files.values()):
            held = [(POSIX, key, list(ranges)) for key, ranges in f.locks.owners.items()
                    if key[0] == guest and ranges]
            held += [(FLOCK, key, [LockRange(0, OFFSET_MAX, t)])
                     for key, t in f.flocks.items() if key[0] == guest]
            for kind, key, ranges in held:
                for r in ranges:
                    _lost(mgr, guest, kind, key[1], f, None, None, mgr.durable.record, r.start,
                          r.end, r.type, f.pids.get(key, 0), errno.EIO,
                          " (its guest's session could not be resumed)")
                    n += 1
    return n


def _rewrite(guest: str, kind: str, owner: int, f: object, old: list, new: list,
             pid: int) -> tuple:
    """The journal change that makes the owner's journaled locks `new` instead of `old`."""
    if kind == FLOCK:
        return J.FlockRow(guest, owner, f, new[0][2] if new else F_UNLCK, pid)
    return J.LockRows(guest, owner, f, tuple(LockRange(*r) for r in old),
                      tuple(LockRange(*r) for r in new), pid)


def _restore_wait(mgr: object, t: RecoveryTxn, wrec: dict, f: FileState | None,
                  report: dict) -> None:
    mgr.guest_state(wrec["guest"])  # known to stats() even if its file is gone
    w = Wait(wrec["id"], wrec["guest"], (wrec["guest"], wrec["owner"]), wrec["kind"], f,
             wrec["type"], wrec["start"], wrec["end"], wrec["pid"], None, wrec["tag"])
    if f is None:
        t.record(J.WaitRemoved(w.id))
        return
    mgr.requeue(w)
    report["waits"] += 1


def _adopt_kept(mgr: object, t: RecoveryTxn, kkey: str, kfd: int,
                refs: dict[int, FileState], report: dict) -> bool:
    """A kept description the journal has no rows for: take over the locks the kernel
    lists for it (journaled by `t`), under the owner its key names. False when it holds
    nothing (a spare) or cannot be understood."""
    parsed = parse_keeper_key(kkey)
    held = kernel_locks(kfd)
    if parsed is None or not held:
        return False
    kind, dev, ino, owner, guest = parsed
    try:
        st = os.fstat(kfd)
    except OSError:
        return False
    if (st.st_dev, st.st_ino) != (dev, ino):
        return False
    t.leave()  # registering the file takes the mutex
    try:
        f = mgr.file(kfd)
    finally:
        t.begin()
    refs[-len(refs) - 1] = f  # released with the journaled files at the end
    mode = os.O_ACCMODE & int(_fdinfo_flags(kfd), 8)
    g = mgr.guest_state(guest)
    key = (guest, owner)
    dkey = (kind, guest, owner)
    if dkey in f.descs:
        return False
    try:
        mgr.descs.install(f, dkey, g, key, kfd, mode == os.O_RDWR)
    except (Denied, NeedDescription):
        return False
    if kind == FLOCK:
        typ = held[0][3]
        mgr.table.restore_flock(g, key, f, typ, 0)
        t.record(J.FlockRow(guest, owner, f, typ, 0))
    else:
        ranges = [LockRange(s, e, typ) for k, s, e, typ in sorted(held, key=lambda x: x[1])
                  if k == POSIX]
        mgr.table.restore_posix(g, key, f, ranges, 0)
        t.record(J.LockRows(guest, owner, f, (), tuple(ranges), 0))
    report["from_keeper_only"] += 1
    report["locks"] += len(held)
    log.warning("recovered %d lock(s) of guest %r owner %d on %s from the descriptor keeper "
                "alone (the journal had no record of them)", len(held), guest, owner, f.path)
    return True


def _fdinfo_flags(fd: int) -> str:
    try:
        with open(f"/proc/self/fdinfo/{fd}") as f:
            for line in f:
                if line.startswith("flags:"):
                    return line.split()[1]
    except OSError:
        pass
    return "0"
