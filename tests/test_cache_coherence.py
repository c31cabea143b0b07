"""`--cache auto`: names and attributes are cached (a stat asks the server nothing for a
second, as with Rust virtiofsd), and still a process that takes a lock sees what the
previous holder wrote: the data, the size, and the names (fuse_server/invalidate.py).

Two mounts of one source are two guests with caches of their own. Every coherence test
warms the taker's caches first (a stat, a read through a descriptor it keeps open, as
SQLite keeps its database open), within the 1 s the caches last, so that only the grant's
invalidation can make the taker's reads right.
"""

from __future__ import annotations

import fcntl
import os
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from procutil import wait_until

pytestmark = pytest.mark.fuse

LOOKUP, GETATTR, READDIRPLUS = 1, 3, 44
# struct flock for F_OFD_SETLK on the whole file: a read lock, and its release.
READ_WHOLE = struct.pack("hhqqi4x", fcntl.F_RDLCK, os.SEEK_SET, 0, 0, 0)
UNLOCK_WHOLE = struct.pack("hhqqi4x", fcntl.F_UNLCK, os.SEEK_SET, 0, 0, 0)


class CountingMount:
    """A real mount served by a Session in this process, counting requests by opcode
    (the server's own process has no counters to ask)."""

    def __init__(self, source: Path, path: Path, cache: str, notify: bool = True,
                 native: bool = True, timeout: float | None = None) -> None:
        from fuse_server.cli import close_service, lock_service
        from fuse_server.passthrough import Passthrough
        from fuse_server.session import MAX_WRITE, Session
        from fuse_server.transports.devfuse import DevFuse

        self.path = path
        self.counts: Counter[int] = Counter()
        self._mu = threading.Lock()
        self._close_service = close_service
        self.service = lock_service(None, None, "counted")
        self.dev = DevFuse(str(path), MAX_WRITE + 4096)
        self.session = Session(Passthrough(str(source)), self.service, "counted",
                               self.dev.send, cache=cache, notify=notify, native=native)
        if timeout is not None:  # (attributes', and names' with auto; before INIT)
            self.session.attr_timeout = timeout
        handle = self.session.handle

        def counted(buf: memoryview) -> bytes | None:
            opcode = struct.unpack_from("<I", buf, 4)[0]
            with self._mu:
                self.counts[opcode] += 1
            return handle(buf)

        self.dev.mount()
        self.dev.start(counted, 2)
        assert wait_until(lambda: self.session.initialized, 10)

    def taken(self) -> Counter[int]:
        """The counts so far, and start again from zero."""
        with self._mu:
            c, self.counts = self.counts, Counter()
        return c

    def stop(self) -> None:
        self.dev.stopped.set()
        self.dev.unmount()
        self.session.close()
        self._close_service(self.service)
        os.close(self.dev.fd)


@pytest.fixture
def counting(fuse_ok, tmp_path: Path):
    made: list[CountingMount] = []

    def start(cache: str, notify: bool = True, src: Path | None = None,
              native: bool = True, timeout: float | None = None) -> tuple[Path, CountingMount]:
        if src is None:
            src = tmp_path / "src"
            src.mkdir()
        mp = tmp_path / f"counted{len(made)}"
        mp.mkdir()
        made.append(CountingMount(src, mp, cache, notify, native, timeout))
        return src, made[-1]

    try:
        yield start
    finally:
        for m in made:
            m.stop()


def _assert_cached_stats(m: CountingMount, path: Path, size: int) -> None:
    """300 stats of `path` (two components below the mount) are answered by the guest's
    caches: each component revalidated at most once per second of the loop."""
    assert os.stat(path).st_size == size
    m.taken()
    t0 = time.monotonic()
    for _ in range(300):
        assert os.stat(path).st_size == size
    elapsed = time.monotonic() - t0
    c = m.taken()
    assert c[LOOKUP] + c[GETATTR] <= 2 * (int(elapsed) + 1), (c, elapsed)


@pytest.mark.parametrize("notify", [True, False], ids=["notify", "no-notify"])
def test_auto_stat_is_answered_by_the_guest_until_a_lock_grant(counting, notify: bool) -> None:
    """cache=auto: 300 stats of a path within the cache's lifetime cost at most one
    LOOKUP per component per second elapsed (none at all on a fast machine; before, one
    LOOKUP per component per stat); a lock grant expires the names (notify), or the file
    is served uncached once locked (no notification channel, as virtio-fs), so the next
    stat asks again; cache=none still asks every time."""
    src, m = counting("auto", notify)
    (src / "d").mkdir()
    (src / "d" / "f").write_bytes(b"x" * 10)
    path = m.path / "d" / "f"
    _assert_cached_stats(m, path, 10)

    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX)
        fcntl.lockf(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
    m.taken()
    for _ in range(10):
        assert os.stat(path).st_size == 10
    c = m.taken()
    # notify: the grant expired the names; without: the file is uncached from now on
    assert c[LOOKUP] + c[GETATTR] >= (1 if notify else 10), c


@pytest.mark.parametrize("native", [True, False], ids=["native", "python"])
def test_a_locked_files_attributes_are_never_cached(counting, native: bool) -> None:
    """cache=auto with notifications: once a file has had a lock request, every fstat
    of it asks us (attributes with timeout 0), where before the first one after a
    grant's notification was cached for a second. The guest kernel applies a GETATTR
    reply by marking the attributes valid before it writes the new size, and a stat by
    another process in between, which reads without the inode's lock, returned the
    size from before the grant: two SQLite readers of one guest took a lock together,
    one got the new header with the old size ("database disk image is malformed")."""
    src, m = counting("auto", native=native)
    (src / "db").write_bytes(b"x" * 4096)
    fd = os.open(m.path / "db", os.O_RDWR)
    try:
        m.taken()
        for _ in range(10):
            assert os.fstat(fd).st_size == 4096
        assert m.taken()[GETATTR] <= 2  # cached: the count can tell the difference
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, READ_WHOLE)
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, UNLOCK_WHOLE)
        m.taken()
        for _ in range(10):
            assert os.fstat(fd).st_size == 4096
        assert m.taken()[GETATTR] >= 10
    finally:
        os.close(fd)


@pytest.mark.parametrize("native", [True, False], ids=["native", "python"])
def test_a_locked_files_neighbours_stay_cached(counting, native: bool) -> None:
    """With notifications, only the locked file itself is served uncached: the other
    names of its directory stay cached until the next grant's sweep (without
    notifications they are uncached too: test below)."""
    src, m = counting("auto", native=native)
    (src / "d").mkdir()
    (src / "d" / "locked").write_bytes(b"x")
    (src / "d" / "other").write_bytes(b"y")
    fd = os.open(m.path / "d" / "locked", os.O_RDWR)
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, READ_WHOLE)
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, UNLOCK_WHOLE)
    finally:
        os.close(fd)
    _assert_cached_stats(m, m.path / "d" / "other", 1)


@pytest.mark.parametrize("native", [True, False], ids=["native", "python"])
def test_a_listing_leaves_the_guests_names_and_a_grant_still_expires_them(
        counting, native: bool) -> None:
    """A listing (READDIRPLUS) leaves the names the guest was given since the last
    grant as the guest holds them (no host lookup, nothing refreshed): a file replaced
    on the host is still the old one after a listing, as after a stat, until a lock
    grant's sweep; then a listing and a stat both see the new one. (Names held for an
    hour here, so that none runs out during the test.)"""
    src, m = counting("auto", native=native, timeout=3600.0)
    (src / "d").mkdir()
    for name in ("x", "y", "lockme"):
        (src / "d" / name).write_bytes(name.encode())
    old = {name: os.stat(m.path / "d" / name).st_ino for name in ("x", "y", "lockme")}
    (src / "d" / "x.new").write_bytes(b"new x")
    os.rename(src / "d" / "x.new", src / "d" / "x")
    new = os.stat(src / "d" / "x").st_ino
    assert new != old["x"]
    fs, looked_up = m.session.fs, []
    lookup = fs.lookup
    fs.lookup = lambda parent, name: looked_up.append(name) or lookup(parent, name)
    natively = fs.table.served(READDIRPLUS)
    with os.scandir(m.path / "d") as it:
        assert {e.name: e.inode() for e in it} == {**old, "x": new}  # (the host's d_ino)
    assert (looked_up, fs.table.served(READDIRPLUS) - natively) == ([], 0)
    assert os.stat(m.path / "d" / "x").st_ino == old["x"]  # the guest's name, as it was
    fd = os.open(m.path / "d" / "lockme", os.O_RDWR)
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, READ_WHOLE)  # the grant sweeps the names
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, UNLOCK_WHOLE)
    finally:
        os.close(fd)
    with os.scandir(m.path / "d") as it:
        inos = {e.name: e.inode() for e in it}
    assert inos["x"] == new
    assert os.stat(m.path / "d" / "x").st_ino == new
    assert (m.path / "d" / "x").read_bytes() == b"new x"


def test_none_stat_asks_every_time(counting) -> None:
    src, m = counting("none")
    (src / "f").write_bytes(b"x")
    path = m.path / "f"
    os.stat(path)
    m.taken()
    for _ in range(50):
        os.stat(path)
    c = m.taken()
    assert c[LOOKUP] + c[GETATTR] >= 50, c


def _args(mode: str, passthrough: bool, request: pytest.FixtureRequest) -> list[str]:
    """A central daemon (`vfs-lockd serve`) only for `lockd`."""
    lockd = ["--lockd", request.getfixturevalue("daemon").sock] if mode == "lockd" else []
    return ["--cache", "auto"] + ([] if passthrough else ["--no-passthrough"]) + lockd


def _lock(fd: int, kind: str, exclusive: bool) -> None:
    if kind == "flock":
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
    else:
        fcntl.lockf(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)


def _unlock(fd: int, kind: str) -> None:
    (fcntl.flock if kind == "flock" else fcntl.lockf)(fd, fcntl.LOCK_UN)


@pytest.mark.parametrize("passthrough", [False, True], ids=["served", "passthrough"])
@pytest.mark.parametrize("kind", ["fcntl", "flock"])
@pytest.mark.parametrize("mode", ["embedded", "lockd"])
def test_lock_taker_reads_what_the_holder_wrote(mounts, request, mode: str, kind: str,
                                                passthrough: bool) -> None:
    """Guest A appends and rewrites under the lock; guest B, whose caches of the file are
    warm (a stat, a read through the descriptor it keeps open), takes the lock and must
    see the new size (fstat and stat) and every byte. Rounds alternate a growing write
    with an in-place rewrite of the same size (only the data differs: nothing in the
    attributes would tell the guest)."""
    src, (a, b) = mounts(2, _args(mode, passthrough, request))
    (src / "f").write_bytes(b"x" * 100)
    fb = os.open(b.path / "f", os.O_RDWR)
    try:
        expect = b"x" * 100
        for rnd in range(4):
            # B: warm caches, under its lock, as a reader would
            _lock(fb, kind, False)
            assert os.pread(fb, 1 << 16, 0) == expect
            assert os.stat(b.path / "f").st_size == len(expect)
            _unlock(fb, kind)
            # A: the next holder changes the file
            fa = os.open(a.path / "f", os.O_RDWR)
            try:
                _lock(fa, kind, True)
                assert os.pread(fa, 1 << 16, 0) == expect
                fill = bytes([65 + rnd])
                if rnd % 2 == 0:
                    expect = fill * len(expect) + fill * 3000
                else:
                    expect = fill * len(expect)
                os.pwrite(fa, expect, 0)
                _unlock(fa, kind)
            finally:
                os.close(fa)
            # B takes the lock: it must see all of it
            _lock(fb, kind, False)
            try:
                assert os.fstat(fb).st_size == len(expect), rnd
                assert os.stat(b.path / "f").st_size == len(expect), rnd
                assert os.pread(fb, 1 << 16, 0) == expect, rnd
            finally:
                _unlock(fb, kind)
    finally:
        os.close(fb)


@pytest.mark.parametrize("mode", ["embedded", "lockd"])
def test_lock_taker_sees_the_names_the_holder_changed(mounts, request, mode: str) -> None:
    """SQLite's rollback journal: B has looked up `t.db-journal` (and read it); A, under
    the database's lock, deletes the journal and replaces another file by a rename; B takes
    the lock and must not find the journal (a stale name would make it roll back a
    committed transaction) and must open the new file, not the replaced one."""
    src, (a, b) = mounts(2, _args(mode, False, request))
    (src / "t.db").write_bytes(b"db")
    (src / "t.db-journal").write_bytes(b"old journal")
    (src / "cfg").write_bytes(b"old")
    fb = os.open(b.path / "t.db", os.O_RDWR)
    try:
        _lock(fb, "fcntl", False)
        assert (b.path / "t.db-journal").read_bytes() == b"old journal"
        assert (b.path / "cfg").read_bytes() == b"old"
        _unlock(fb, "fcntl")
        fa = os.open(a.path / "t.db", os.O_RDWR)
        try:
            _lock(fa, "fcntl", True)
            os.unlink(a.path / "t.db-journal")
            (a.path / "cfg.new").write_bytes(b"new!")
            os.rename(a.path / "cfg.new", a.path / "cfg")
            _unlock(fa, "fcntl")
        finally:
            os.close(fa)
        _lock(fb, "fcntl", False)
        assert not os.path.exists(b.path / "t.db-journal")
        assert os.stat(b.path / "cfg").st_size == 4
        assert (b.path / "cfg").read_bytes() == b"new!"
        _unlock(fb, "fcntl")
    finally:
        os.close(fb)


def test_a_name_the_grants_expiry_missed_is_asked_again(counting) -> None:
    """The revalidation race: the guest revalidates `j` (a LOOKUP of a name whose time ran
    out; it holds no directory lock), our reply is written before a grant's notifications
    but applied after them, so the grant's expiry of `j` is undone by the reply's 1 s. Its
    effect is simulated here by dropping the grant's FUSE_NOTIFY_INVAL_ENTRY: the epoch
    notification alone must still make the taker ask for `j` (a kernel without it, before
    Linux 6.16, is given no cached names at all). Without the epoch the taker finds the
    replaced `j` through the stale name."""
    src, m = counting("auto")
    (src / "d").mkdir()
    (src / "d" / "db").write_bytes(b"db")
    (src / "d" / "j").write_bytes(b"old journal")
    inv = m.session.invalidator
    send = inv.send

    def without_entry_expiry(buf: bytes) -> None:
        if struct.unpack_from("<Ii", buf)[1] != 3:  # NOTIFY_INVAL_ENTRY
            send(buf)

    inv.send = without_entry_expiry
    j = m.path / "d" / "j"
    old_ino = os.stat(j).st_ino
    m.taken()
    assert os.stat(j).st_ino == old_ino
    names_cached = m.session.kernel_minor >= 44
    assert (m.taken()[LOOKUP] == 0) == names_cached
    (src / "d" / "j.new").write_bytes(b"new journal!")
    os.rename(src / "d" / "j.new", src / "d" / "j")
    new_ino = os.stat(src / "d" / "j").st_ino
    assert new_ino != old_ino
    fd = os.open(m.path / "d" / "db", os.O_RDWR)
    try:
        fcntl.lockf(fd, fcntl.LOCK_SH)
        assert os.stat(j).st_ino == new_ino
        assert j.read_bytes() == b"new journal!"
        fcntl.lockf(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def test_a_grant_waits_for_the_notification_of_the_grant_before_it(counting) -> None:
    """Two owners of one guest granted read locks on a file together (SQLite readers
    after a wait): the first grant's notification drops the size the guest cached, and
    the second grant must not reach its taker before that notification has returned.
    The first notification is held here until the second grant is decided: the second
    reply must wait behind it, and its taker's fstat then shows the host's size. It used
    to go out at once (the thread writing the notification had marked the inode uncached
    already), its taker read the size cached before the lock, and SQLite found its
    database "malformed" (`vfs-lockd rig --workload sqlite,counter`, 3 runs in 7)."""
    src, m = counting("auto")
    (src / "db").write_bytes(bytes(4096))
    first = os.open(m.path / "db", os.O_RDWR)
    second = os.open(m.path / "db", os.O_RDWR)
    seen: list[int] = []

    def second_taker() -> None:
        fcntl.fcntl(second, fcntl.F_OFD_SETLK, READ_WHOLE)
        seen.append(os.fstat(second).st_size)

    takers = [threading.Thread(target=fcntl.fcntl, args=(first, fcntl.F_OFD_SETLK, READ_WHOLE)),
              threading.Thread(target=second_taker)]
    inv = m.session.invalidator
    send = inv.send
    writing, release = threading.Event(), threading.Event()

    def held_inval_inode(buf: bytes) -> None:
        if struct.unpack_from("<Ii", buf)[1] == 2:  # NOTIFY_INVAL_INODE
            writing.set()
            release.wait(30)
        send(buf)

    try:
        # A grant sweeps the names handed out so far (the opens'): with a name waiting,
        # any grant would need notifications anyway.
        fcntl.fcntl(first, fcntl.F_OFD_SETLK, READ_WHOLE)
        fcntl.fcntl(first, fcntl.F_OFD_SETLK, UNLOCK_WHOLE)
        assert os.fstat(second).st_size == 4096  # cached for a second
        with open(src / "db", "ab") as f:  # the last writer's commit, on the host
            f.write(bytes(4096))
        inv.send = held_inval_inode
        takers[0].start()
        assert writing.wait(10)
        takers[1].start()
        # Decided: waiting behind the notification, or (the bug) answered already.
        assert wait_until(lambda: seen or len(inv.answering) == 2, 10)
        assert not seen, "the second grant reached its taker before the notification returned"
        release.set()
        for t in takers:
            t.join(10)
        assert seen == [8192]
    finally:
        release.set()
        for t in takers:
            if t.ident is not None:
                t.join(10)
        os.close(first)
        os.close(second)


class _Marks:
    """The invalidator's marks, with a pause in the sweep's taking of the names."""

    def __init__(self, table: object, before_take: Callable[[], None]) -> None:
        self._table, self._before_take = table, before_take

    def __getattr__(self, name: str) -> object:
        return getattr(self._table, name)

    def take_names(self) -> list:
        self._before_take()
        return self._table.take_names()


def test_a_lookup_that_read_the_host_before_a_grant_leaves_no_old_size(counting) -> None:
    """A LOOKUP reads the host, then marks its inode cached and remembers its name. If
    it does that while the notification thread answers a grant, between its look at the
    inode's mark and its taking of the names, the grant sent no FUSE_NOTIFY_INVAL_INODE
    (the mark still said uncached) and its sweep only expired the name: the attributes
    the LOOKUP read before the last writer's commit stayed cached for a second, and the
    taker's fstat of a descriptor it had open before showed the old size. The thread
    now takes the names (a new epoch) before it looks at the mark. The LOOKUP (Python's,
    `native=False`) is paused after its host read; the sweep lets it go on and waits for
    it to be remembered."""
    src, m = counting("auto", native=False)
    if m.session.kernel_minor < 44:
        pytest.skip("names are not cached without FUSE_NOTIFY_INC_EPOCH (Linux 6.16)")
    (src / "d").mkdir()
    (src / "d" / "db").write_bytes(bytes(4096))
    (src / "d" / "other").write_bytes(b"x")
    first = os.open(m.path / "d" / "db", os.O_RDWR)
    inv, fs = m.session.invalidator, m.session.fs
    lookup, named = fs.lookup, m.session._named
    host_read, go, remembered = threading.Event(), threading.Event(), threading.Event()

    def paused_lookup(parent: int, name: bytes):  # noqa: ANN202
        got = lookup(parent, name)
        if name == b"db" and not host_read.is_set():
            host_read.set()
            go.wait(30)
        return got

    def signalling_named(parent: int, name: bytes, since: int, until: int) -> bool:
        r = named(parent, name, since, until)
        if name == b"db" and go.is_set():
            remembered.set()
        return r

    def before_take() -> None:
        if host_read.is_set() and not go.is_set():
            go.set()
            remembered.wait(30)

    walker = threading.Thread(target=os.stat, args=(m.path / "d" / "db",))
    try:
        # A grant sweeps what the open handed out: db is marked uncached, no name waits.
        fcntl.fcntl(first, fcntl.F_OFD_SETLK, READ_WHOLE)
        fcntl.fcntl(first, fcntl.F_OFD_SETLK, UNLOCK_WHOLE)
        fs.lookup, m.session._named = paused_lookup, signalling_named
        inv._marks = _Marks(inv._marks, before_take)
        walker.start()  # revalidates db (its name was expired): a LOOKUP, paused
        assert host_read.wait(10)
        with open(src / "d" / "db", "ab") as f:  # the last writer's commit, on the host
            f.write(bytes(4096))
        os.stat(m.path / "d" / "other")  # a name waits: the grant needs a sweep
        fcntl.fcntl(first, fcntl.F_OFD_SETLK, READ_WHOLE)
        walker.join(10)
        assert remembered.is_set()
        assert os.fstat(first).st_size == 8192
    finally:
        go.set()
        remembered.set()
        if walker.ident is not None:
            walker.join(10)
        os.close(first)


def test_without_notifications_the_first_grant_outlasts_the_guests_caches(counting,
                                                                          mounts) -> None:
    """No notification channel (a virtio-fs guest: Session(notify=False), here over
    /dev/fuse, the same guest kernel code): guest B has stat'ed and read the file and
    looked up the journal within the caches' second; guest A changes them under the lock;
    B's first grant is answered only once its caches ran out, and from then on the file
    and its directory's names are not cached: every later round is seen at once."""
    src, (a,) = mounts(1, ["--cache", "auto", "--no-passthrough"])
    _, b = counting("auto", notify=False, src=src)
    (src / "t.db").write_bytes(b"x" * 100)
    (src / "t.db-journal").write_bytes(b"old journal")
    fb = os.open(b.path / "t.db", os.O_RDWR)
    try:
        expect = b"x" * 100
        for rnd in range(4):
            assert os.pread(fb, 1 << 16, 0) == expect
            assert os.stat(b.path / "t.db").st_size == len(expect)
            if rnd == 0:
                assert (b.path / "t.db-journal").read_bytes() == b"old journal"
            fa = os.open(a.path / "t.db", os.O_RDWR)
            try:
                _lock(fa, "fcntl", True)
                fill = bytes([65 + rnd])
                expect = fill * (len(expect) + (3000 if rnd % 2 == 0 else 0))
                os.pwrite(fa, expect, 0)
                if rnd == 0:
                    os.unlink(a.path / "t.db-journal")
                elif rnd == 2:
                    (a.path / "t.db-journal").write_bytes(b"new journal")
                _unlock(fa, "fcntl")
            finally:
                os.close(fa)
            _lock(fb, "fcntl", False)
            try:
                assert os.fstat(fb).st_size == len(expect), rnd
                assert os.stat(b.path / "t.db").st_size == len(expect), rnd
                assert os.pread(fb, 1 << 16, 0) == expect, rnd
                assert os.path.exists(b.path / "t.db-journal") == (rnd >= 2), rnd
            finally:
                _unlock(fb, "fcntl")
    finally:
        os.close(fb)


def test_sqlite_two_guests_without_notifications(counting) -> None:
    """SQLite writers in two guests without a notification channel (as virtio-fs) and on
    the host, cache=auto: no update is lost, the database stays whole, no journal is
    left (test_fuse_locks.py runs the same over /dev/fuse with notifications)."""
    from test_fuse_locks import sqlite_across

    src, a = counting("auto", notify=False)
    _, b = counting("auto", notify=False, src=src)
    sqlite_across(src, [src, a.path, b.path], 2, 40, 300)


@pytest.mark.vm
@pytest.mark.parametrize("mode", ["embedded", "lockd"])
def test_virtio_fs_guests_cache_auto(tmp_path: Path, request: pytest.FixtureRequest,
                                     mode: str) -> None:
    """Two QEMU guests on `vfs-lockd virtiofs --cache auto` (no notification channel in a
    Linux guest): guest B reads and stats the file (warm pages, size, name), guest A
    appends or rewrites it in place under the lock, B takes the lock and reads all of it
    (a page-cache read stops at the size B's kernel believes); then two processes in each
    guest increment a counter under the lock at once, and no increment is lost."""
    import tempfile

    from rig.vm import VmError, VmGuest, ensure_image, qemu_missing

    def fail_or_skip(why: str) -> None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{why} (CI=true: VM guests must be available)")
        pytest.skip(why)

    why = qemu_missing()
    if why:
        fail_or_skip(why)
    try:
        kernel, initrd = ensure_image()
    except VmError as exc:
        fail_or_skip(f"guest image could not be built: {exc}")
        raise
    lockd = request.getfixturevalue("daemon").sock if mode == "lockd" else None
    # Short paths for the sockets (sun_path); removed at the end.
    work = Path(tempfile.mkdtemp(prefix="vl-cc-"))
    share = work / "share"
    share.mkdir()
    (share / "f").write_bytes(b"x" * 32)
    (share / "counter").write_bytes(b"0".rjust(20) + b"\n")
    guests: list[VmGuest] = []
    try:
        for name in ("vmA", "vmB"):
            guests.append(VmGuest.start(name, share, work, backend="vfs-lockd", lockd=lockd,
                                        cache="auto", kernel=kernel, initrd=initrd))
        a, b = guests
        assert b.do("b", "open 0 /mnt/f rw") == "ok"
        assert a.do("a", "open 0 /mnt/f rw") == "ok"
        expect = "x" * 32
        for rnd, (fill, grow) in enumerate((("A", True), ("B", False), ("C", True))):
            assert b.do("b", "read 0 0 256") == f"ok {expect}", rnd  # warm pages and size
            assert b.do("b", "dstat /mnt/f 1").startswith("ok 1 "), rnd  # warm name, attrs
            assert a.do("a", "lock 0 posix w 0 0 wait") == "ok"
            expect = fill * (len(expect) + (32 if grow else 0))
            assert a.do("a", f"write 0 0 {expect}") == f"ok {len(expect)}"
            assert a.do("a", "lock 0 posix u 0 0") == "ok"
            assert b.do("b", "lock 0 posix r 0 0 wait", timeout=30) == "ok"
            assert b.do("b", "read 0 0 256") == f"ok {expect}", rnd
            assert b.do("b", "lock 0 posix u 0 0") == "ok"
        n = 40
        for g in guests:
            for o in ("c1", "c2"):
                assert g.do(o, "open 0 /mnt/counter rw") == "ok"
        tags = [(g, g.send(o, f"counter 0 posix {n}")) for g in guests for o in ("c1", "c2")]
        for g, tag in tags:
            ans = g.result(tag, 300).split()
            assert ans[0] == "ok" and ans[1] == str(n) and ans[3:] == ["0", "0"], ans
        assert int((share / "counter").read_bytes()) == n * len(tags)
    finally:
        for g in guests:
            g.close()
        import shutil

        shutil.rmtree(work, ignore_errors=True)
