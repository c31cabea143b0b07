#!/usr/bin/env python3
"""What the other virtio-fs back-ends do with a guest's locks, checked in a real QEMU guest
(the image of scripts/guest-image), for the record: what vfs-lockd exists to fix.

    .venv/bin/python scripts/virtiofsd_locks.py [--only legacy|rust]

- QEMU's legacy C virtiofsd with -o posix_lock -o flock (QEMU <= 7.2; Debian 12's
  qemu-system-common, gone from Debian 13): non-blocking locks reach the host, but
  F_SETLKW fails with EOPNOTSUPP (no waiting at all, even on a free range; flock's
  unlock too, so the host stays locked out until the guest closes the file), and F_GETLK
  reports no holder pid.
- Rust virtiofsd as shipped (Debian 13's package; scripts/rust-virtiofsd fetches it on
  Debian 12): no lock options at all; the guest kernel keeps every lock local, so the
  host never sees a guest's lock, while two processes of the one guest do exclude each
  other (and wait).

Each back-end that this host has is checked; one it lacks is reported as absent (the
legacy one exists only on Debian 12). Exit status 1 when a back-end behaves otherwise
than described. This lives here and not in the test suite because what it checks
depends on which Debian release the host runs.
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from rig.vm import (  # noqa: E402
    VmGuest,
    ensure_image,
    errno_of,
    legacy_virtiofsd_present,
    qemu_missing,
    rust_virtiofsd_missing,
)

EAGAIN, EOPNOTSUPP = errno.EAGAIN, errno.EOPNOTSUPP


def host_lock(path: Path, kind: str, exclusive: bool) -> int:
    """Try a lock on path from this (host) process on a fresh open file; 0 if granted
    (then released) or the errno. POSIX locks of this process conflict with the
    back-end's (another process); flock with any other open file description."""
    fd = os.open(path, os.O_RDWR)
    try:
        if kind == "posix":
            op = (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB
            fcntl.lockf(fd, op)
        else:
            fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        return 0
    except OSError as exc:
        return exc.errno
    finally:
        os.close(fd)  # releases whatever was taken


class Check:
    def __init__(self, backend: str) -> None:
        self.backend, self.failed = backend, 0

    def __call__(self, what: str, got: object, want: object) -> None:
        ok = got == want
        self.failed += not ok
        print(f"  {'ok  ' if ok else 'FAIL'} {what}: {got!r}" + ("" if ok else f" (expected "
                                                                      f"{want!r})"))


def legacy(g: VmGuest, share: Path, c: Check) -> None:
    f = share / "f"
    c("guest A opens", g.do("a", "open 0 /mnt/f"), "ok")
    c("guest B opens", g.do("b", "open 0 /mnt/f"), "ok")
    c("A: posix write lock", g.do("a", "lock 0 posix w 0 0"), "ok")
    c("host posix lock (reaches the host: refused)", host_lock(f, "posix", True), EAGAIN)
    c("B: posix write lock", errno_of(g.do("b", "lock 0 posix w 0 0")), EAGAIN)
    c("B: F_GETLK (holder pid 0: none reported)", g.do("b", "getlk 0 posix w 0 0").split(),
      ["ok", "w", "0", "0", "0"])
    c("B: F_SETLKW on A's range", errno_of(g.do("b", "lock 0 posix w 0 0 wait")), EOPNOTSUPP)
    c("A: unlock", g.do("a", "lock 0 posix u 0 0"), "ok")
    c("B: F_SETLKW on a free range", errno_of(g.do("b", "lock 0 posix w 0 0 wait")),
      EOPNOTSUPP)
    # flock(LOCK_UN) without LOCK_NB reaches the server as SETLKW: refused too.
    c("A: flock", g.do("a", "lock 0 flock w 0 0"), "ok")
    c("A: flock unlock", errno_of(g.do("a", "lock 0 flock u 0 0")), EOPNOTSUPP)
    c("host flock while the guest cannot unlock", host_lock(f, "flock", False), EAGAIN)
    c("A: close", g.do("a", "close 0"), "ok")
    c("host flock after the guest's close", host_lock(f, "flock", False), 0)


def rust(g: VmGuest, share: Path, c: Check) -> None:
    f = share / "f"
    c("guest A opens", g.do("a", "open 0 /mnt/f"), "ok")
    c("guest B opens", g.do("b", "open 0 /mnt/f"), "ok")
    c("A: posix write lock", g.do("a", "lock 0 posix w 0 0"), "ok")
    c("host posix lock (guest-local: granted)", host_lock(f, "posix", True), 0)
    c("B: posix write lock (same guest: refused)", errno_of(g.do("b", "lock 0 posix w 0 0")),
      EAGAIN)
    tag = g.send("b", "lock 0 posix w 0 0 wait")
    c("B: F_SETLKW waits", g.pending(tag, 0.5), True)
    c("A: unlock", g.do("a", "lock 0 posix u 0 0"), "ok")
    c("B: the wait is granted", g.result(tag, 20), "ok")
    c("B: unlock", g.do("b", "lock 0 posix u 0 0"), "ok")
    c("A: flock", g.do("a", "lock 0 flock w 0 0"), "ok")
    c("host flock (guest-local: granted)", host_lock(f, "flock", True), 0)
    c("A: flock unlock", g.do("a", "lock 0 flock u 0 0"), "ok")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", choices=["legacy", "rust"])
    args = ap.parse_args()
    why = qemu_missing()
    if why:
        raise SystemExit(f"virtiofsd_locks: {why}")
    kernel, initrd = ensure_image(quiet=False)
    runs: list[tuple[str, str, Callable[[VmGuest, Path, Check], None], str | None]] = [
        ("legacy", "virtiofsd", legacy, None if legacy_virtiofsd_present() else
         "not installed (QEMU's C virtiofsd is in Debian 12's qemu-system-common only)"),
        ("rust", "rust-virtiofsd", rust, rust_virtiofsd_missing()),
    ]
    failed = 0
    for key, backend, fn, absent in runs:
        if args.only and args.only != key:
            continue
        print(f"{backend}:")
        if absent:
            print(f"  absent: {absent}")
            continue
        work = Path(tempfile.mkdtemp(prefix="vfs-lockd-virtiofsd-locks-"))
        try:
            share = work / "share"
            share.mkdir()
            (share / "f").write_bytes(b"")
            c = Check(backend)
            with VmGuest.start(key, share, work, backend=backend, kernel=kernel,
                               initrd=initrd) as g:
                fn(g, share, c)
            failed += c.failed
        finally:
            shutil.rmtree(work, ignore_errors=True)
    print("all as described" if not failed else f"{failed} check(s) differ")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
