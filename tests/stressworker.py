"""A lock-and-data worker for tests/test_invalidation.py.

    python stressworker.py PATH SECONDS SEED {rw|mmap}

rw: random blocking POSIX locks (read or write, one block of the file) and whole-file
flocks, with the data they protect read and written under them: a write-locked block is
checked (all its bytes equal) and rewritten with a new value; a read-locked one checked.
flock protects the file's last block only (flock and POSIX locks do not exclude each
other). mmap: the file mapped shared, read-locked blocks checked through the mapping.
Prints one JSON line at the end: operations, violations (a torn block under a lock).
"""

from __future__ import annotations

import fcntl
import json
import mmap
import os
import random
import struct
import sys
import time

BLOCK = 4096
BLOCKS = 8  # POSIX-protected blocks; block BLOCKS is the flock-protected one
FLOCK_STRUCT = struct.Struct("hhqqi4x")


def posix(fd: int, type_: int, block: int) -> None:
    fcntl.fcntl(fd, fcntl.F_SETLKW, FLOCK_STRUCT.pack(type_, 0, block * BLOCK, BLOCK, 0))


def torn(data: bytes) -> bool:
    return len(data) != BLOCK or data != data[:1] * BLOCK


def main(path: str, seconds: float, seed: int, mode: str) -> None:
    rng = random.Random(seed)
    fd = os.open(path, os.O_RDWR)
    m = mmap.mmap(fd, BLOCK * (BLOCKS + 1), mmap.MAP_SHARED, mmap.PROT_READ) \
        if mode == "mmap" else None
    ops = violations = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if m is not None or rng.random() < 0.8:
            block = rng.randrange(BLOCKS)
            write = m is None and rng.random() < 0.5
            posix(fd, fcntl.F_WRLCK if write else fcntl.F_RDLCK, block)
            data = (m[block * BLOCK:(block + 1) * BLOCK] if m is not None
                    else os.pread(fd, BLOCK, block * BLOCK))
            violations += torn(data)
            if write:
                os.pwrite(fd, bytes([rng.randrange(256)]) * BLOCK, block * BLOCK)
            posix(fd, fcntl.F_UNLCK, block)
        else:
            fcntl.flock(fd, fcntl.LOCK_EX)
            off = BLOCKS * BLOCK
            violations += torn(os.pread(fd, BLOCK, off))
            os.pwrite(fd, bytes([rng.randrange(256)]) * BLOCK, off)
            fcntl.flock(fd, fcntl.LOCK_UN)
        ops += 1
    print(json.dumps({"ops": ops, "violations": violations}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
