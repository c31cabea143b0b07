"""mmap on a `--cache none` share (issue 23 item 4c; cthon04 lock test 13 maps a locked
file). Files are opened with FOPEN_DIRECT_IO there, and the guest kernel refuses a
MAP_SHARED mapping of such a file (ENODEV) unless INIT granted
FUSE_DIRECT_IO_ALLOW_MMAP (Linux 6.6+). Passthrough is off in the mount test: a virtio-fs
guest has none, and a passthrough file is not a direct-I/O file."""

from __future__ import annotations

import fcntl
import mmap
import os
import struct
from pathlib import Path

from sessionrig import Sent

from fuse_server import protocol as P
from fuse_server.passthrough import Passthrough
from fuse_server.session import Session
from lockd.engine.manager import LockManager


def test_shared_mmap_on_a_cache_none_mount(mounts) -> None:
    source, (m,) = mounts(1, ["--cache", "none", "--no-passthrough"])
    (source / "f").write_bytes(b"a" * 8192)
    fd = os.open(m.path / "f", os.O_RDWR)
    try:
        # a read lock over the file while it is mapped, as cthon's test 13 does
        fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB, 8192, 0)
        with mmap.mmap(fd, 8192, mmap.MAP_SHARED, mmap.PROT_READ) as ro:
            assert ro[:4] == b"aaaa"
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 8192, 0)
        with mmap.mmap(fd, 8192, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE) as rw:
            rw[4096:4100] = b"bbbb"
            rw.flush()  # msync: written back through the server to the host file
        assert (source / "f").read_bytes()[4096:4100] == b"bbbb"
        assert os.pread(fd, 4, 4096) == b"bbbb"  # a direct read sees it too
        fcntl.lockf(fd, fcntl.LOCK_UN, 0, 0)
    finally:
        os.close(fd)


def _init_flags(share: Path, cache: str, offered: int) -> int:
    """The flags a Session grants in INIT when the kernel offers `offered`."""
    s = Session(Passthrough(str(share)), LockManager(), "g", Sent(), cache)
    try:
        body = (P.INIT_IN.pack(7, 39, 65536, (offered & 0xFFFFFFFF) | P.INIT_EXT)
                + struct.pack("<I", offered >> 32) + bytes(44))
        hdr = P.IN_HEADER.pack(P.IN_HEADER.size + len(body), P.INIT, 2, 1, 0, 0, 1, 0, 0)
        fields = P.INIT_OUT.unpack_from(s.handle(hdr + body), 16)
        return fields[3] | fields[10] << 32  # flags, flags2
    finally:
        s.end()


def test_init_grants_direct_io_mmap_for_cache_none_only(tmp_path: Path) -> None:
    offered = 0xFFFFFFFF | P.DIRECT_IO_ALLOW_MMAP
    assert _init_flags(tmp_path, "none", offered) & P.DIRECT_IO_ALLOW_MMAP
    assert not _init_flags(tmp_path, "none", offered & ~P.DIRECT_IO_ALLOW_MMAP) \
        & P.DIRECT_IO_ALLOW_MMAP
    # with the page cache, files are not direct I/O: nothing to ask
    assert not _init_flags(tmp_path, "auto", offered) & P.DIRECT_IO_ALLOW_MMAP
