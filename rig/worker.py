"""One rig worker process: runs the selected workloads in turn on one view of the share
(a guest's mount, or the share itself for a host worker) and logs every event.

Run as `python -m rig.worker ...` by the rig. It imports nothing heavy: workers
start often (a killed guest's workers are restarted).

The log is one JSON array per line, written with a single write(2) each so that a worker
killed with SIGKILL leaves only whole records behind (or one partial last line, which the
reader drops). Records (t = time.monotonic_ns(), system-wide on Linux, so the rig can
compare times across processes):

  ["R", t]                              started
  ["L", t_acquired, latency_ns, wl]     a lock was acquired (wl = workload)
  ["S", t0, t1, file, lo, hi, type, kind]
                                        a critical section: t0 taken after acquiring,
                                        t1 before releasing; hi exclusive (-1 = EOF);
                                        logged only once the release succeeded
  ["O", t, wl]                          an operation completed
  ["CI"] / ["CD"]                       counter: about to write / written (a worker
                                        killed in between leaves an ambiguous increment)
  ["QI", seq] / ["QD", seq]             sqlite: about to commit row seq / committed
  ["D", t, wl]                          EDEADLK answered (not a violation)
  ["X", t, wl]                          EINTR from a blocking lock call (a signal)
  ["LOST", t, wl, msg]                  EIO from a lock call: the lock was lost
  ["V", t, wl, msg]                     a violation seen by the worker
  ["FV", t, holder, msg]                flock marker of another holder seen (the rig
                                        decides: violation, or stale marker of a killed one)
  ["E", t, wl, errno_name, msg]         any other error
  ["F", t]                              finished normally
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import json
import os
import random
import signal
import sqlite3
import struct
import sys
import time

# Files of the share, created by the rig (runner.prepare_share).
COUNTER = "counter"
RANGES = "ranges.dat"
FLOCK = "flock.dat"
SQLITE = "rig.sqlite"
SQLITE_RESERVED = 0x40000001  # SQLite's RESERVED_BYTE (PENDING_BYTE + 1)

CELL = 64  # ranges.dat is made of 64-byte cells, each written with one pwrite
RANGES_CELLS = 1024
RANGES_SIZE = CELL * RANGES_CELLS
CELL_MAGIC = 0x5249_4743  # "RIGC"
HOT_BLOCKS, HOT_BLOCK = 6, 512  # the first 3 KiB of ranges.dat: deadlock material
MARKER_SIZE = 32
MARKER_FREE = b"-" * MARKER_SIZE
COUNTER_WIDTH = 20

WORKLOADS = ("counter", "ranges", "sqlite", "flock")

F_RDLCK, F_WRLCK, F_UNLCK = 0, 1, 2
F_SETLK, F_SETLKW = 6, 7
LOCK_SH, LOCK_EX, LOCK_UN = 1, 2, 8
FLOCK_STRUCT = struct.Struct("hhqqi4x")  # struct flock on 64-bit Linux

# Errnos that mean "the mount under us is gone" (its server was killed): exit, the rig
# restarts this guest's workers with a fresh mount.
GONE = {errno.ENOTCONN, errno.ECONNABORTED, errno.ENODEV, errno.ESTALE}
EXIT_GONE = 3

_libc = ctypes.CDLL(None, use_errno=True)


class MountGone(Exception):
    pass


def cell_bytes(wnum: int, seq: int, idx: int) -> bytes:
    """A self-checking cell: header (magic, writer, seq, index) then the header reversed
    three times, so a cell mixing two writes (torn) does not decode."""
    head = struct.pack("<IIII", CELL_MAGIC, wnum & 0xFFFFFFFF, seq & 0xFFFFFFFF, idx)
    return head + head[::-1] * 3


def cell_ok(data: bytes, idx: int) -> bool:
    head = data[:16]
    magic, _, _, i = struct.unpack("<IIII", head)
    return magic == CELL_MAGIC and i == idx and data[16:] == head[::-1] * 3


def initial_ranges() -> bytes:
    return b"".join(cell_bytes(0, 0, i) for i in range(RANGES_CELLS))


def counter_bytes(value: int) -> bytes:
    return str(value).rjust(COUNTER_WIDTH).encode() + b"\n"


class Worker:
    def __init__(self, args: argparse.Namespace) -> None:
        self.wid: str = args.id
        self.wnum: int = args.num
        self.dir: str = args.dir
        self.until: int = args.until
        self.host: bool = args.host
        self.unsafe: bool = args.unsafe_no_locks
        self.workloads: list[str] = args.workloads.split(",")
        self.rng = random.Random(args.seed)
        # O_APPEND + one os.write per record: whole records even under SIGKILL.
        self.log_fd = os.open(args.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self.fds: dict[str, int] = {}
        self.db: sqlite3.Connection | None = None
        self.seq = 0
        self.qseq = 0

    # ------------------------------------------------------------------ logging
    def rec(self, *fields: object) -> None:
        os.write(self.log_fd, (json.dumps(fields, separators=(",", ":")) + "\n").encode())

    def fd(self, name: str) -> int:
        # One descriptor per file for the whole life of the worker: closing any fd of a
        # file would drop this process's POSIX locks on it.
        fd = self.fds.get(name)
        if fd is None:
            fd = self.fds[name] = os.open(os.path.join(self.dir, name), os.O_RDWR)
        return fd

    # ------------------------------------------------------------------ lock calls
    def _lock_call(self, wl: str, call, what: str) -> bool:  # noqa: ANN001
        """Run a blocking lock call (ctypes, so a signal gives a real EINTR instead of
        CPython's silent retry) until it succeeds. False: EDEADLK or lost (op abandoned)."""
        t = time.monotonic_ns()
        while True:
            if call() == 0:
                now = time.monotonic_ns()
                self.rec("L", now, now - t, wl)
                return True
            err = ctypes.get_errno()
            now = time.monotonic_ns()
            if err == errno.EINTR:
                self.rec("X", now, wl)
                continue  # a signalled waiter retries; the wait time keeps counting
            if err == errno.EDEADLK:
                self.rec("D", now, wl)
                return False
            if err == errno.EIO:
                self.rec("LOST", now, wl, f"EIO from {what}")
                return False
            if err in GONE:
                raise MountGone(err)
            self.rec("E", now, wl, errno.errorcode.get(err, str(err)), f"{what}: {os.strerror(err)}")
            if err == errno.ENOLCK:
                time.sleep(0.05)
                return False
            time.sleep(0.01)
            return False

    def _unlock_call(self, call, what: str) -> bool:  # noqa: ANN001
        if call() == 0:
            return True
        err = ctypes.get_errno()
        if err in GONE:
            raise MountGone(err)
        self.rec("E", time.monotonic_ns(), "unlock", errno.errorcode.get(err, str(err)),
                 f"{what}: {os.strerror(err)}")
        return False

    def posix_lock(self, wl: str, fd: int, type_: int, start: int, length: int) -> bool:
        if self.unsafe:
            now = time.monotonic_ns()
            self.rec("L", now, 0, wl)
            return True
        buf = ctypes.create_string_buffer(FLOCK_STRUCT.pack(type_, 0, start, length, 0))
        return self._lock_call(wl, lambda: _libc.fcntl(fd, F_SETLKW, buf),
                               f"F_SETLKW {'rw'[type_]} {start}+{length}")

    def posix_unlock(self, fd: int, start: int, length: int) -> bool:
        if self.unsafe:
            return True
        buf = ctypes.create_string_buffer(FLOCK_STRUCT.pack(F_UNLCK, 0, start, length, 0))
        return self._unlock_call(lambda: _libc.fcntl(fd, F_SETLK, buf), "F_UNLCK")

    # ------------------------------------------------------------------ workloads
    def op_counter(self) -> None:
        fd = self.fd(COUNTER)
        if not self.posix_lock("counter", fd, F_WRLCK, 0, 0):
            return
        t0 = time.monotonic_ns()
        raw = os.pread(fd, COUNTER_WIDTH + 1, 0)
        try:
            value = int(raw)
        except ValueError:
            self.rec("V", time.monotonic_ns(), "counter", f"counter unreadable: {raw!r}")
            value = None
        if value is not None:
            if self.rng.random() < 0.1:
                time.sleep(0.0002)  # now and then widen the read-modify-write window
            self.rec("CI")
            os.pwrite(fd, counter_bytes(value + 1), 0)
            self.rec("CD")
        t1 = time.monotonic_ns()
        if self.posix_unlock(fd, 0, 0):
            self.rec("S", t0, t1, COUNTER, 0, -1, "w", "posix")
        self.rec("O", time.monotonic_ns(), "counter")

    def _pick_range(self) -> tuple[int, int]:
        lo = self.rng.randrange(RANGES_SIZE - 1)
        return lo, min(RANGES_SIZE, lo + self.rng.randint(1, 4096))

    def _check_cells(self, fd: int, lo: int, hi: int, write: bool, hold: float) -> None:
        """The data check of one held range: cells fully inside [lo, hi)."""
        c0, c1 = -(-lo // CELL), hi // CELL
        if write:
            self.seq += 1
            mine = [cell_bytes(self.wnum, self.seq, i) for i in range(c0, c1)]
            for i, data in zip(range(c0, c1), mine, strict=True):
                os.pwrite(fd, data, i * CELL)
            time.sleep(hold)
            if c1 > c0:
                got = os.pread(fd, (c1 - c0) * CELL, c0 * CELL)
                if got != b"".join(mine):
                    self.rec("V", time.monotonic_ns(), "ranges",
                             f"write lock {lo}-{hi}: another writer changed the range")
            return
        if c1 <= c0:
            time.sleep(hold)
            return
        first = os.pread(fd, (c1 - c0) * CELL, c0 * CELL)
        for k, i in enumerate(range(c0, c1)):
            if not cell_ok(first[k * CELL:(k + 1) * CELL], i):
                self.rec("V", time.monotonic_ns(), "ranges",
                         f"read lock {lo}-{hi}: torn cell {i}")
                break
        time.sleep(hold)
        again = os.pread(fd, (c1 - c0) * CELL, c0 * CELL)
        if again != first:
            self.rec("V", time.monotonic_ns(), "ranges",
                     f"read lock {lo}-{hi}: data changed under the read lock")

    def op_ranges(self) -> None:
        fd = self.fd(RANGES)
        # Guest workers sometimes hold one range while waiting for a second: that makes
        # real deadlocks for the manager to detect. Host workers never hold-and-wait (the
        # manager cannot see a host waiter, so a cycle through one would hang for good).
        n = 2 if not self.host and self.rng.random() < 0.3 else 1
        held: list[tuple[int, int, int, int]] = []  # lo, hi, type, t0
        # Two-range operations take two of a few hot blocks, in random order, for write:
        # the classic lock-order inversion, so deadlocks actually happen.
        hot = self.rng.sample(range(HOT_BLOCKS), 2) if n == 2 else []
        try:
            for k in range(n):
                if hot:
                    lo = hot[k] * HOT_BLOCK
                    hi, type_ = lo + HOT_BLOCK, F_WRLCK
                else:
                    lo, hi = self._pick_range()
                    type_ = F_WRLCK if self.rng.random() < 0.5 else F_RDLCK
                if not self.posix_lock("ranges", fd, type_, lo, hi - lo):
                    return  # EDEADLK/lost: the finally below releases what is held
                held.append((lo, hi, type_, time.monotonic_ns()))
                if hot and k == 0:
                    time.sleep(self.rng.uniform(0.002, 0.01))  # widen the inversion window
                # 1 in 50 sections is long, so some are held across a daemon restart.
                hold = self.rng.uniform(0.02, 0.08) if self.rng.random() < 0.02 else \
                    self.rng.uniform(0, 0.0005)
                self._check_cells(fd, lo, hi, type_ == F_WRLCK, hold)
            self.rec("O", time.monotonic_ns(), "ranges")
        finally:
            for lo, hi, type_, t0 in reversed(held):
                t1 = time.monotonic_ns()
                if self.posix_unlock(fd, lo, hi - lo):
                    self.rec("S", t0, t1, RANGES, lo, hi, "rw"[type_], "posix")

    def op_flock(self) -> None:
        fd = self.fd(FLOCK)
        excl = self.rng.random() < 0.5
        if self.unsafe:
            self.rec("L", time.monotonic_ns(), 0, "flock")
        elif not self._lock_call("flock", lambda: _libc.flock(fd, LOCK_EX if excl else LOCK_SH),
                                 "flock " + ("EX" if excl else "SH")):
            return
        t0 = time.monotonic_ns()
        me = self.wid.encode().ljust(MARKER_SIZE, b"-")[:MARKER_SIZE]
        marker = os.pread(fd, MARKER_SIZE, 0)
        if marker != MARKER_FREE:
            self.rec("FV", time.monotonic_ns(), marker.rstrip(b"-").decode("ascii", "replace"),
                     f"flock {'EX' if excl else 'SH'}: marker of another exclusive holder")
        if excl:
            os.pwrite(fd, me, 0)
            time.sleep(self.rng.uniform(0.0002, 0.001))
            marker = os.pread(fd, MARKER_SIZE, 0)
            if marker != me:
                self.rec("FV", time.monotonic_ns(), marker.rstrip(b"-").decode("ascii", "replace"),
                         "flock EX: marker changed while held exclusively")
            os.pwrite(fd, MARKER_FREE, 0)
        t1 = time.monotonic_ns()
        if self.unsafe or self._unlock_call(lambda: _libc.flock(fd, LOCK_UN), "flock UN"):
            self.rec("S", t0, t1, FLOCK, 0, -1, "w" if excl else "r", "flock")
        self.rec("O", time.monotonic_ns(), "flock")

    def op_sqlite(self) -> None:
        if self.db is None:
            path = os.path.join(self.dir, SQLITE)
            # nolock=1 is SQLite's own switch for "take no locks": the unsafe mode.
            uri = f"file:{path}?nolock=1" if self.unsafe else f"file:{path}"
            self.db = sqlite3.connect(uri, uri=True, timeout=20, isolation_level=None)
            self.db.execute("PRAGMA journal_mode=DELETE")
        db = self.db
        t = time.monotonic_ns()
        try:
            db.execute("BEGIN IMMEDIATE")  # the write lock up front: no upgrade deadlock
        except sqlite3.OperationalError as exc:
            self._sqlite_error(exc)
            return
        now = time.monotonic_ns()
        self.rec("L", now, now - t, "sqlite")
        self.qseq += 1
        try:
            db.execute("INSERT INTO rows(worker, seq, guest) VALUES (?, ?, ?)",
                       (self.wid, self.qseq, self.wid.split(".")[0]))
            self.rec("QI", self.qseq)
            t1 = time.monotonic_ns()
            db.execute("COMMIT")
        except sqlite3.DatabaseError as exc:
            try:
                db.execute("ROLLBACK")
            except sqlite3.DatabaseError:
                pass
            self._sqlite_error(exc)
            return
        self.rec("QD", self.qseq)
        # The write transaction, from BEGIN IMMEDIATE's return to COMMIT's call, holds
        # SQLite's RESERVED byte: no two writers may overlap (SQLite's own lock protocol,
        # checked like the other workloads' sections).
        self.rec("S", now, t1, SQLITE, SQLITE_RESERVED, SQLITE_RESERVED + 1, "w", "posix")
        self.rec("O", time.monotonic_ns(), "sqlite")

    def _sqlite_error(self, exc: Exception) -> None:
        # The extended code says which call failed (e.g. SQLITE_IOERR_CHECKRESERVEDLOCK:
        # F_GETLK; SQLITE_IOERR_DELETE_NOENT: a journal gone under a stale name).
        msg = f"{exc} ({getattr(exc, 'sqlite_errorname', '?')})"
        # (a journal's open on a mount that just died fails as CANTOPEN, not IOERR; a
        # write whose check stat(2)s the database's path there, as READONLY_DBMOVED)
        if (("disk I/O error" in msg or "unable to open" in msg or "DBMOVED" in msg)
                and not os.path.exists(self.dir + "/" + SQLITE)):
            raise MountGone(errno.ENOTCONN)
        if "malformed" in msg or "not a database" in msg:
            self.rec("V", time.monotonic_ns(), "sqlite", f"sqlite: {msg}")
        else:
            self.rec("E", time.monotonic_ns(), "sqlite", type(exc).__name__, msg)
        time.sleep(0.01)

    # ------------------------------------------------------------------ main loop
    def run(self) -> int:
        ops = {"counter": self.op_counter, "ranges": self.op_ranges, "sqlite": self.op_sqlite,
               "flock": self.op_flock}
        self.rec("R", time.monotonic_ns())
        i = self.rng.randrange(len(self.workloads))
        try:
            while time.monotonic_ns() < self.until:
                wl = self.workloads[i % len(self.workloads)]
                i += 1
                try:
                    ops[wl]()
                except MountGone:
                    raise
                except sqlite3.Error as exc:
                    self._sqlite_error(exc)
                except OSError as exc:
                    if exc.errno in GONE:
                        raise MountGone(exc.errno) from None
                    self.rec("E", time.monotonic_ns(), wl,
                             errno.errorcode.get(exc.errno or 0, "?"), str(exc))
                    time.sleep(0.01)
        except MountGone as exc:
            self.rec("E", time.monotonic_ns(), "mount", errno.errorcode.get(exc.args[0], "?"),
                     "mount gone")
            return EXIT_GONE
        self.rec("F", time.monotonic_ns())
        return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="rig.worker")
    ap.add_argument("--id", required=True, help="worker name, GUEST.wN.rK")
    ap.add_argument("--num", type=int, required=True, help="unique number (cell tags)")
    ap.add_argument("--dir", required=True, help="the view of the share to work in")
    ap.add_argument("--log", required=True)
    ap.add_argument("--until", type=int, required=True, help="stop at this monotonic_ns")
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--host", action="store_true", help="a host process (no hold-and-wait)")
    ap.add_argument("--unsafe-no-locks", action="store_true")
    args = ap.parse_args(argv)
    # A no-op handler without SA_RESTART: a signal makes a blocked F_SETLKW/flock return
    # EINTR (the rig's "signal to a blocked waiter" fault), which the worker counts.
    signal.signal(signal.SIGUSR1, lambda signo, frame: None)
    signal.siginterrupt(signal.SIGUSR1, True)
    signal.signal(signal.SIGTERM, lambda signo, frame: sys.exit(0))
    return Worker(args).run()


if __name__ == "__main__":
    sys.exit(main())
