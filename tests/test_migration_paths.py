"""Live migration without descriptor passing (issue 27, across hosts): a destination that
cannot collect the source's descriptors opens the guest's inodes again by path
(--migration-mode=find-paths) or file handle (file-handles) and reopens its handles with
their flags -- only for a guest that holds no lock and waits for none; any other is
refused, and the source runs on with everything.

One host stands in for two: the destination is given another migration directory (what
a back-end on another host has: it cannot reach the source's hand-over socket) or the
switch VFS_LOCKD_MIGRATION_DESCRIPTORS=off. The back-ends are real processes driven by
tests/vhost_frontend.py (a vhost-user front-end speaking QEMU's migration messages)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import test_vhost_user as tvu
from fuse_oracle import LK_IN, host_can_lock
from test_vhost_user import (
    MIGRATABLE,
    REQ,
    Prober,
    init,
    lk,
    load_state,
    migrate,
    save_state,
    stop_source,
    switch_over,
)

from fuse_server import protocol as P
from lockd.api import F_UNLCK, F_WRLCK, OFFSET_MAX
from lockd.fuse import abi

# test_vhost_user's fixtures: the back-ends and front-ends of a test, its share, a daemon
rig, share, lock_daemon = tvu.rig, tvu.share, tvu.lock_daemon


def backend(rig, monkeypatch, tmp_path: Path, host: str, *args: str):  # noqa: ANN001, ANN201
    """A back-end of "host" `host`: its own migration directory, or the switch that
    keeps a destination from collecting descriptors. "A" is the source's host."""
    with monkeypatch.context() as m:
        where = tmp_path / f"migration-{'A' if host == 'A' else 'B'}"
        where.mkdir(mode=0o700, exist_ok=True)
        m.setenv("VFS_LOCKD_MIGRATION_DIR", str(where))
        if host == "descriptors-off":
            m.setenv("VFS_LOCKD_MIGRATION_DIR", str(tmp_path / "migration-A"))
            m.setenv("VFS_LOCKD_MIGRATION_DESCRIPTORS", "off")
        return rig.backend(*args)


def lookup_in(fe, parent: int, name: bytes) -> int:  # noqa: ANN001 - a Frontend
    out = fe.fuse(REQ, P.LOOKUP, name + b"\0", nodeid=parent).payload
    return P.ENTRY_OUT.unpack_from(out)[0]


def open_(fe, nodeid: int, flags: int, op: int = P.OPEN) -> int:  # noqa: ANN001
    return P.OPEN_OUT.unpack_from(fe.fuse(REQ, op, P.OPEN_IN.pack(flags, 0), nodeid).payload)[0]


def read(fe, nodeid: int, fh: int, n: int = 100, offset: int = 0):  # noqa: ANN001, ANN201
    return fe.fuse(REQ, P.READ, P.READ_IN.pack(fh, offset, n, 0, 0, 0, 0), nodeid, out=16 + n)


def write(fe, nodeid: int, fh: int, data: bytes, offset: int = 0):  # noqa: ANN001, ANN201
    return fe.fuse(REQ, P.WRITE, P.WRITE_IN.pack(fh, offset, len(data), 0, 0, 0, 0) + data,
                   nodeid)


def getattr_(fe, nodeid: int):  # noqa: ANN001, ANN201
    return fe.fuse(REQ, P.GETATTR, P.GETATTR_IN.pack(0, 0, 0), nodeid)


def size_of(reply) -> int:  # noqa: ANN001 - a GETATTR Reply
    return abi.ATTR.unpack_from(reply.payload, abi.ATTR_OUT.size)[1]


class Guest:
    """A guest on the source with known inodes and open handles: f (O_RDWR, twice), sub/ (an
    open directory), sub/g (O_WRONLY|O_APPEND and O_RDONLY)."""

    def __init__(self, rig, b0, share: Path) -> None:  # noqa: ANN001
        (share / "sub").mkdir()
        (share / "sub" / "g").write_bytes(b"gg\n")
        self.fe = fe = rig.frontend(b0, nqueues=3, protocol_features=MIGRATABLE)
        init(fe)
        self.f = lookup_in(fe, 1, b"f")
        self.sub = lookup_in(fe, 1, b"sub")
        self.g = lookup_in(fe, self.sub, b"g")
        self.fh = open_(fe, self.f, os.O_RDWR)
        self.fh2 = open_(fe, self.f, os.O_RDWR)  # a second open file of f
        self.dirh = open_(fe, self.sub, os.O_RDONLY | os.O_DIRECTORY, P.OPENDIR)
        self.gapp = open_(fe, self.g, os.O_WRONLY | os.O_APPEND)
        self.grd = open_(fe, self.g, os.O_RDONLY)


def resume_source(fe, bases: list[int]) -> None:  # noqa: ANN001
    """QEMU after a failed migration: logging off, the source's rings run again."""
    assert fe.acked(2, fe.features.to_bytes(8, "little")) == 0
    for q, base in zip(fe.queues, bases, strict=True):
        fe.start_queue(q, base)


# ---------------------------------------------------------------- lock-free guests move
@pytest.mark.parametrize("mode, host", [("find-paths", "other-migration-dir"),
                                        ("file-handles", "descriptors-off")])
def test_lock_free_guest_moves_without_descriptors(rig, share: Path, tmp_path: Path,
                                                   monkeypatch, mode: str, host: str) -> None:
    """A guest holding no lock moves to a destination that cannot collect descriptors:
    its inodes and handles are opened there again, with their flags (O_APPEND appends,
    O_RDONLY refuses writes), and read and write as before; new names resolve in a
    directory it knew. By file handle, a file renamed after the save is still found."""
    b0 = backend(rig, monkeypatch, tmp_path, "A", f"--migration-mode={mode}")
    gst = Guest(rig, b0, share)
    b1 = backend(rig, monkeypatch, tmp_path, host)
    bases = stop_source(gst.fe)
    status, data = save_state(gst.fe)
    assert status == 0
    if mode == "file-handles":
        (share / "sub" / "g").rename(share / "sub" / "g-renamed")
    dst = rig.frontend(b1, protocol_features=MIGRATABLE, mem=gst.fe.mem, queues=gst.fe.queues)
    assert load_state(dst, data) == 0, b1.output()
    switch_over(gst.fe, dst, bases)
    gst.fe.close()  # the source QEMU quits
    assert b0.proc.wait(10) == 0, b0.output()
    assert "WITHOUT the source's descriptors" in b1.output()
    # the handles opened on the source work here
    assert read(dst, gst.f, gst.fh).payload == b"hello world\n"
    assert P.WRITE_OUT.unpack_from(write(dst, gst.f, gst.fh, b"HELLO").payload)[0] == 5
    assert (share / "f").read_bytes() == b"HELLO world\n"
    g = share / "sub" / ("g-renamed" if mode == "file-handles" else "g")
    assert write(dst, gst.g, gst.gapp, b"appended\n", offset=0).error == 0  # O_APPEND kept
    assert g.read_bytes() == b"gg\nappended\n"
    assert write(dst, gst.g, gst.grd, b"x").error == errno.EBADF  # O_RDONLY kept
    assert read(dst, gst.g, gst.grd).payload == b"gg\nappended\n"
    assert size_of(getattr_(dst, gst.g)) == len(b"gg\nappended\n")
    # the directory it knew resolves new names, its open handle lists them
    (share / "sub" / "new").write_bytes(b"n")
    assert lookup_in(dst, gst.sub, b"new") > 0
    r = dst.fuse(REQ, P.READDIR, P.READ_IN.pack(gst.dirh, 0, 4096, 0, 0, 0, 0), gst.sub)
    assert r.error == 0 and b"new" in r.payload
    # and locks work on the destination from scratch (its own lock session)
    assert dst.fuse(REQ, P.SETLK, lk(gst.fh, 1, F_WRLCK, 0, 9), gst.f).error == 0
    assert not host_can_lock(share / "f", 0, 10)
    assert dst.fuse(REQ, P.SETLK, lk(gst.fh, 1, F_UNLCK, 0, 9), gst.f).error == 0
    assert "Traceback" not in b1.output() + b0.output()


# ---------------------------------------- files changed between the save and the load
@pytest.mark.parametrize("on_error", ["abort", "guest-error"])
def test_files_changed_after_the_save(rig, share: Path, tmp_path: Path, monkeypatch,
                                      on_error: str) -> None:
    """Between the save and the load, on the host: sub/g is renamed away, f2 deleted and
    f3 replaced by another file (found by --migration-verify-handles, which the source
    was given). abort: the destination refuses, QEMU fails the migration, the source runs
    on with every handle. guest-error: the migration completes; those inodes and their
    handles answer EIO, everything else works."""
    for name in ("f2", "f3"):
        (share / name).write_bytes(name.encode())
    b0 = backend(rig, monkeypatch, tmp_path, "A", "--migration-verify-handles")
    gst = Guest(rig, b0, share)
    fe = gst.fe
    f2, f3 = lookup_in(fe, 1, b"f2"), lookup_in(fe, 1, b"f3")
    fh2, fh3 = open_(fe, f2, os.O_RDWR), open_(fe, f3, os.O_RDWR)
    b1 = backend(rig, monkeypatch, tmp_path, "other-migration-dir",
                 f"--migration-on-error={on_error}")
    bases = stop_source(fe)
    status, data = save_state(fe)
    assert status == 0
    (share / "sub" / "g").rename(share / "sub" / "g-away")
    (share / "f2").unlink()
    (share / "f3-new").write_bytes(b"impostor")
    (share / "f3-new").rename(share / "f3")
    dst = rig.frontend(b1, protocol_features=MIGRATABLE, mem=fe.mem, queues=fe.queues)
    if on_error == "abort":
        assert load_state(dst, data) != 0
        out = b1.output()
        assert "--migration-on-error=abort" in out and "sub/g" in out, out
        resume_source(fe, bases)
        assert "keeps the guest" in b0.output()
        # the source still has every inode and handle
        assert read(fe, f2, fh2).payload == b"f2"
        assert read(fe, f3, fh3).payload == b"f3"
        assert read(fe, gst.g, gst.grd).payload == b"gg\n"
        assert read(fe, gst.f, gst.fh).payload == b"hello world\n"
        return
    assert load_state(dst, data) == 0, b1.output()
    switch_over(fe, dst, bases)
    fe.close()
    assert b0.proc.wait(10) == 0, b0.output()
    out = b1.output()
    assert "answer EIO" in out, out
    for nodeid, fh in ((gst.g, gst.grd), (gst.g, gst.gapp), (f2, fh2), (f3, fh3)):
        assert getattr_(dst, nodeid).error == errno.EIO
        assert read(dst, nodeid, fh).error == errno.EIO
        assert write(dst, nodeid, fh, b"no").error == errno.EIO
    assert (share / "f3").read_bytes() == b"impostor"  # never written by the guest
    assert read(dst, gst.f, gst.fh).payload == b"hello world\n"
    assert lookup_in(dst, gst.sub, b"g-away") > 0  # the directory itself was found
    # the guest lets go of a lost inode as of any other
    assert dst.fuse(REQ, P.RELEASE, P.RELEASE_IN.pack(fh2, 0, 0, 0), f2).error == 0
    assert "Traceback" not in out


@pytest.mark.parametrize("confirm", [False, True])
def test_confirm_paths(rig, share: Path, tmp_path: Path, monkeypatch, confirm: bool) -> None:
    """A file the guest knows is deleted on the host before the save and another file
    appears under the name the kernel gives the deleted one ("x (deleted)"). The path
    from /proc/self/fd is then that name: without --migration-confirm-paths the
    destination opens the other file (virtiofsd's documented risk); with it the source
    finds that the path no longer leads to the inode, and the destination answers EIO
    for it (--migration-on-error=guest-error)."""
    (share / "x").write_bytes(b"mine")
    b0 = backend(rig, monkeypatch, tmp_path, "A",
                 *(["--migration-confirm-paths"] if confirm else []))
    gst = Guest(rig, b0, share)
    fe = gst.fe
    x = lookup_in(fe, 1, b"x")
    fhx = open_(fe, x, os.O_RDONLY)
    (share / "x").unlink()
    (share / "x (deleted)").write_bytes(b"impostor")
    b1 = backend(rig, monkeypatch, tmp_path, "other-migration-dir",
                 "--migration-on-error=guest-error")
    bases = stop_source(fe)
    status, data = save_state(fe)
    assert status == 0
    dst = rig.frontend(b1, protocol_features=MIGRATABLE, mem=fe.mem, queues=fe.queues)
    assert load_state(dst, data) == 0, b1.output()
    switch_over(fe, dst, bases)
    if confirm:
        assert read(dst, x, fhx).error == errno.EIO
        assert "its path leads to another file" in b1.output(), b1.output()
    else:
        assert read(dst, x, fhx).payload == b"impostor"
    assert read(dst, gst.f, gst.fh).payload == b"hello world\n"


# ---------------------------------------------- a guest with locks or waits is refused
@pytest.mark.parametrize("what", ["posix", "flock", "wait"])
def test_guest_with_locks_or_waits_is_refused(rig, share: Path, tmp_path: Path,
                                             monkeypatch, what: str) -> None:
    """A guest holding a POSIX lock or a flock, or with a SETLKW queued behind a host
    process's lock, cannot move without descriptors: the destination refuses with the
    reason, QEMU fails the migration, the source runs on. A host process probing the
    whole time never sees the guest's lock free, another owner still conflicts, and the
    queued wait is granted on the source when the host lets go."""
    from daemonutil import HostHolder

    b0 = backend(rig, monkeypatch, tmp_path, "A")
    gst = Guest(rig, b0, share)
    fe, q = gst.fe, gst.fe.queue(REQ)
    holder = prober = None
    waiter = None
    try:
        if what == "posix":
            assert fe.fuse(REQ, P.SETLK, lk(gst.fh, 1, F_WRLCK, 0, 99), gst.f).error == 0
        elif what == "flock":
            flock = LK_IN.pack(gst.fh, 7, 0, OFFSET_MAX, F_WRLCK, 4242, 1)  # FUSE_LK_FLOCK
            assert fe.fuse(REQ, P.SETLK, flock, gst.f).error == 0
        else:
            holder = HostHolder(str(share / "f"), 0, 100)
            assert holder.locked
            waiter = fe.fuse_post(REQ, P.SETLKW, lk(gst.fh, 2, F_WRLCK, 0, 99), gst.f)
            assert getattr_(fe, gst.f).error == 0  # the queue is served meanwhile
            assert not q.is_done(waiter)
        if what != "wait":
            prober = Prober(share / "f", flock_too=what == "flock")
        b1 = backend(rig, monkeypatch, tmp_path, "descriptors-off")
        bases = stop_source(fe)
        status, data = save_state(fe)
        assert status == 0
        dst = rig.frontend(b1, protocol_features=MIGRATABLE, mem=fe.mem, queues=fe.queues)
        assert load_state(dst, data) != 0
        out = b1.output()
        reason = "queued wait" if what == "wait" else "lock description(s) held"
        assert "holds no lock" in out and reason in out and "source runs on" in out, out
        resume_source(fe, bases)
        assert "keeps the guest" in b0.output()
        if what == "wait":
            assert not q.is_done(waiter)
            holder.release()
            assert q.wait(waiter).error == 0  # granted on the source
            assert not host_can_lock(share / "f", 0, 100)
            return
        other = LK_IN.pack(gst.fh2, 8, 0, OFFSET_MAX, F_WRLCK, 4242, 1 if what == "flock" else 0)
        assert fe.fuse(REQ, P.SETLK, other, gst.f).error == errno.EAGAIN
        results = prober.stop()
        prober = None
        held = [fl for _, fl in results] if what == "flock" else [p for p, _ in results]
        assert results and all(held), f"{held.count(False)} of {len(results)} probes saw it free"
        # it is still the guest's: its disconnect releases it
        fe.close()
        assert b0.proc.wait(10) == 0, b0.output()
        assert host_can_lock(share / "f", 0, 100)
        assert host_can_lock(share / "f", mode="flock")
    finally:
        if prober is not None:
            prober.stop()
        if holder is not None:
            holder.release()


def test_same_host_still_hands_descriptors_over(rig, share: Path, tmp_path: Path,
                                               monkeypatch) -> None:
    """With the rendezvous reachable (one host, one migration directory) the descriptors
    move as before, locks and all: the descriptor-free path is not taken."""
    b0 = backend(rig, monkeypatch, tmp_path, "A")
    gst = Guest(rig, b0, share)
    assert gst.fe.fuse(REQ, P.SETLK, lk(gst.fh, 1, F_WRLCK, 0, 99), gst.f).error == 0
    b1 = backend(rig, monkeypatch, tmp_path, "A")
    dst = migrate(rig, gst.fe, b1)
    gst.fe.close()
    assert b0.proc.wait(10) == 0, b0.output()
    assert "WITHOUT" not in b1.output() and "descriptors collected" in b1.output()
    assert not host_can_lock(share / "f", 0, 100)
    assert dst.fuse(REQ, P.SETLK, lk(gst.fh, 1, F_UNLCK, 0, 99), gst.f).error == 0
    assert host_can_lock(share / "f", 0, 100)


@pytest.fixture
def second_daemon(tmp_path: Path):
    """Another host's `vfs-lockd serve` (the destination's): its socket."""
    from daemonutil import DaemonProc

    (tmp_path / "hostB").mkdir()
    d = DaemonProc(str(tmp_path / "hostB")).start()
    try:
        yield Path(d.sock)
    finally:
        d.stop()


@pytest.mark.parametrize("locked", [False, True])
def test_central_mode_without_descriptors(rig, share: Path, tmp_path: Path, monkeypatch,
                                          lock_daemon: Path, second_daemon: Path,
                                          locked: bool) -> None:
    """--lockd, each "host" with its own lock daemon: a guest that registered no file
    with its daemon (it locked nothing it still has open) moves and locks through the
    destination's daemon from scratch; one holding a lock there is refused and the
    source runs on, its lock held all along."""
    b0 = backend(rig, monkeypatch, tmp_path, "A", "--lockd", str(lock_daemon))
    gst = Guest(rig, b0, share)
    fe = gst.fe
    prober = None
    try:
        if locked:
            assert fe.fuse(REQ, P.SETLK, lk(gst.fh, 1, F_WRLCK, 0, 99), gst.f).error == 0
            prober = Prober(share / "f", flock_too=False)
        b1 = backend(rig, monkeypatch, tmp_path, "other-migration-dir", "--lockd",
                     str(second_daemon))
        bases = stop_source(fe)
        status, data = save_state(fe)
        assert status == 0
        dst = rig.frontend(b1, protocol_features=MIGRATABLE, mem=fe.mem, queues=fe.queues)
        if locked:
            assert load_state(dst, data) != 0
            assert "registered with the lock daemon" in b1.output(), b1.output()
            resume_source(fe, bases)
            other = lk(gst.fh2, 8, F_WRLCK, 0, 0)
            assert fe.fuse(REQ, P.SETLK, other, gst.f).error == errno.EAGAIN
            results = prober.stop()
            prober = None
            assert results and all(p for p, _ in results), \
                f"{sum(1 for p, _ in results if not p)} of {len(results)} probes saw it free"
            assert fe.fuse(REQ, P.SETLK, lk(gst.fh, 1, F_UNLCK, 0, 99), gst.f).error == 0
            assert host_can_lock(share / "f", 0, 100)
            return
        assert load_state(dst, data) == 0, b1.output()
        switch_over(fe, dst, bases)
        fe.close()
        assert b0.proc.wait(15) == 0, b0.output()
        assert read(dst, gst.f, gst.fh).payload == b"hello world\n"
        assert dst.fuse(REQ, P.SETLK, lk(gst.fh, 1, F_WRLCK, 0, 99), gst.f).error == 0
        assert not host_can_lock(share / "f", 0, 100)
        assert dst.fuse(REQ, P.SETLK, lk(gst.fh2, 2, F_WRLCK, 0, 0), gst.f).error == errno.EAGAIN
        assert dst.fuse(REQ, P.SETLK, lk(gst.fh, 1, F_UNLCK, 0, 99), gst.f).error == 0
        assert host_can_lock(share / "f", 0, 100)
        assert "Traceback" not in b1.output()
    finally:
        if prober is not None:
            prober.stop()
        for f in rig.frontends:  # back-ends before the daemons (the fixtures' finally)
            f.close()
        for b in rig.backends:
            b.stop()
