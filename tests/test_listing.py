"""A directory handle's listing in C (issue 26: READDIR and READDIRPLUS without a Python
object per entry): native vl_dir_list against its reference `_list_dir_py` (os.scandir),
and native vl_dirents (READDIR's fuse_dirents) against PyDescriptorTable.dirents, byte
for byte, on real directories: every file type, names with any byte, listings long
enough to take many getdents64 calls, a listing taken twice from one descriptor."""

from __future__ import annotations

import errno
import os
import socket
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fuse_server import protocol as P
from fuse_server.fdtable import DescriptorTable, PyDescriptorTable, pack_entries, unpack_entries
from fuse_server.passthrough import _list_dir_native, _list_dir_py
from lockd import native


@pytest.fixture(autouse=True)
def _native() -> None:
    if os.environ.get("CI") == "true":
        assert native.HAVE_NATIVE, native.IMPORT_ERROR
    elif not native.HAVE_NATIVE:
        pytest.skip("lockd._native not built")


def _both(d: Path) -> bytes:
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        ino = os.fstat(fd).st_ino
        ref = _list_dir_py(fd, ino)
        for _ in range(2):  # (again from the same descriptor: from its start each time)
            got = _list_dir_native(fd, ino)
            assert (got.count, got.packed) == (ref.count, ref.packed)
        assert got.entries() == ref.entries()
        return ref.packed
    finally:
        os.close(fd)


def test_every_kind_of_entry(tmp_path: Path) -> None:
    d = tmp_path / "d"
    d.mkdir()
    (d / "file").write_bytes(b"x")
    (d / "dir").mkdir()
    os.symlink("file", d / "link")
    os.symlink("/nowhere", d / "dangling")
    os.mkfifo(d / "fifo")
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(d / "sock"))
    os.mknod(d / "null", 0o600 | 0o020000, os.makedev(1, 3))
    odd = b"\n odd \xff name"
    (d / os.fsdecode(odd)).write_bytes(b"")
    (d / ("n" * 255)).write_bytes(b"")
    ents = unpack_entries(_both(d))
    ino = os.stat(d).st_ino
    assert ents[:2] == [(b".", ino, 4), (b"..", ino, 4)]
    types = {name: t for name, _, t in ents[2:]}
    assert types == {b"file": 8, b"dir": 4, b"link": 10, b"dangling": 10, b"fifo": 0,
                     b"sock": 0, b"null": 0, odd: 8, b"n" * 255: 8}


def test_a_listing_of_many_getdents_calls(tmp_path: Path) -> None:
    """5,000 entries of ~200 bytes each: about 1 MB, some thirty 32 KiB getdents64 calls."""
    d = tmp_path / "big"
    d.mkdir()
    for i in range(5000):
        (d / f"{i:05d}{'x' * 190}").write_bytes(b"")
    assert len(unpack_entries(_both(d))) == 5002


def test_an_empty_directory_and_a_removed_one(tmp_path: Path) -> None:
    d = tmp_path / "empty"
    d.mkdir()
    assert [n for n, _, _ in unpack_entries(_both(d))] == [b".", b".."]
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.rmdir(d)
        assert _list_dir_native(fd, 7).count == _list_dir_py(fd, 7).count == 2
    finally:
        os.close(fd)


def test_a_file_is_not_listed(tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_bytes(b"")
    fd = os.open(f, os.O_RDONLY)
    try:
        with pytest.raises(NotADirectoryError):
            _list_dir_native(fd, 1)
        with pytest.raises(NotADirectoryError):
            _list_dir_py(fd, 1)
    finally:
        os.close(fd)


_entry = st.tuples(st.binary(min_size=1, max_size=255), st.integers(0, 2**64 - 1),
                   st.sampled_from([0, 4, 8, 10]))


@settings(max_examples=300, deadline=None)
@given(st.lists(_entry, max_size=40), st.integers(0, 45), st.integers(0, 4096))
def test_dirents_is_the_reference(ents: list[tuple[bytes, int, int]], first: int,
                                  limit: int) -> None:
    """READDIR's records from any index into any room: the same bytes and the same next
    index as the Python reference, which the session's earlier loop built."""
    packed = pack_entries(ents)
    got = DescriptorTable().dirents(packed, first, limit)
    assert got == PyDescriptorTable().dirents(packed, first, limit)
    chunk, nxt = got
    expect, total = [], 0
    for i in range(first, len(ents)):
        name, ino, dtype = ents[i]
        rec = P.pack_dirent(ino, i + 1, dtype, name)
        if total + len(rec) > limit:
            break
        expect.append(rec)
        total += len(rec)
    assert chunk == b"".join(expect)
    assert nxt == first + len(expect) if expect else nxt == first


def test_a_truncated_listing_is_einval() -> None:
    packed = pack_entries([(b"a", 1, 8), (b"bb", 2, 8)])
    for cut in (packed[:-1], packed[:5] + b"", packed + b"\0" * 3):
        for table in (DescriptorTable(), PyDescriptorTable()):
            with pytest.raises(OSError) as exc:
                table.dirents(cut, 0, 4096)
            assert exc.value.errno == errno.EINVAL
