"""The data path on real mounts: FUSE passthrough (the kernel reads and writes the host
file itself) and its fallbacks, and the /dev/fuse transport's workers."""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import signal
import threading
from pathlib import Path

import procutil
import pytest
from conftest import Mount

pytestmark = pytest.mark.fuse


def _log(m: Mount) -> str:
    return m.output()


@pytest.mark.parametrize("cache", ["none", "auto", "always"])
def test_passthrough_reads_and_writes_the_host_file(mounts, cache: str) -> None:
    """Bytes written through the mount are the host file's and the other way round, at
    once, whatever the cache mode: with --cache always (60 s attribute cache, kept pages)
    a host write is seen through the mount only because the kernel reads the host file
    itself (without passthrough the kept pages would be read)."""
    src, (m,) = mounts(1, ["--cache", cache])
    data = os.urandom(3 << 20)
    with open(m.path / "f", "wb") as f:
        f.write(data)
    assert (src / "f").read_bytes() == data
    assert (m.path / "f").read_bytes() == data  # pages now cached, if anything caches
    with open(src / "f", "r+b") as f:  # the host changes the middle, size unchanged
        f.seek(1 << 20)
        f.write(b"H" * 4096)
    want = data[: 1 << 20] + b"H" * 4096 + data[(1 << 20) + 4096:]
    assert (m.path / "f").read_bytes() == want
    with open(m.path / "f", "r+b") as f:  # an open file sees a host write at once
        with open(src / "f", "r+b") as h:
            h.write(b"first")
        assert f.read(5) == b"first"
        f.seek(0, os.SEEK_END)
        f.write(b"tail")  # O_APPEND-free write at the end, through the mount
    assert (src / "f").read_bytes()[-4:] == b"tail"
    assert "backing file" not in _log(m)  # no refusal logged: every open passed through


def test_without_passthrough_always_keeps_stale_pages(mounts) -> None:
    """The contrast that shows the test above measures passthrough: --no-passthrough
    --cache always reads the pages it kept (not coherent, as documented)."""
    src, (m,) = mounts(1, ["--cache", "always", "--no-passthrough"])
    (src / "f").write_bytes(b"old!")
    assert (m.path / "f").read_bytes() == b"old!"
    with open(src / "f", "r+b") as h:
        h.write(b"new!")
    assert (m.path / "f").read_bytes() == b"old!"


def test_shared_mmap_is_the_host_files(mounts) -> None:
    """A writable shared mapping through the mount maps the host file (passthrough mmap):
    with --cache none, which is direct I/O without passthrough (no shared mmap at all)."""
    src, (m,) = mounts(1, ["--cache", "none"])
    (src / "f").write_bytes(b"\0" * 8192)
    fd = os.open(m.path / "f", os.O_RDWR)
    try:
        mm = mmap.mmap(fd, 8192, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        mm[100:105] = b"hello"
        assert (src / "f").read_bytes()[100:105] == b"hello"  # no msync needed: one page
        with open(src / "f", "r+b") as h:
            h.seek(5000)
            h.write(b"host")
        assert mm[5000:5004] == b"host"
        mm.close()
    finally:
        os.close(fd)


def test_direct_io_and_passthrough_opens_of_one_file_mix(mounts) -> None:
    """The kernel refuses (EIO) an inode open for passthrough and in the page-cache mode
    at once: an O_DIRECT open (served by us) and a normal one (passed through) of the same
    file, in either order and overlapping, must all work."""
    src, (m,) = mounts(1)
    (src / "f").write_bytes(b"a" * 8192)
    direct = os.O_RDWR | os.O_DIRECT
    for first, second in ((os.O_RDWR, direct), (direct, os.O_RDWR)):
        a = os.open(m.path / "f", first)
        b = os.open(m.path / "f", second)
        buf = mmap.mmap(-1, 4096)  # page-aligned for O_DIRECT
        try:
            assert os.preadv(a, [buf], 0) == 4096
            assert os.preadv(b, [buf], 4096) == 4096
            assert buf[:1] == b"a"
        finally:
            os.close(a)
            os.close(b)
            buf.close()
    # Many opens and closes of both kinds from several threads: none fails.
    errors: list[BaseException] = []

    def churn(flags: int) -> None:
        try:
            for _ in range(200):
                fd = os.open(m.path / "f", flags)
                os.close(fd)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    ts = [threading.Thread(target=churn, args=(f,)) for f in (os.O_RDONLY, direct) * 2]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    assert not errors, errors


def test_passthrough_falls_back_when_the_share_is_stacked_too_deep(mounts, tmp_path) -> None:
    """A share that is itself a passthrough FUSE mount: the kernel refuses backing files
    there (the stacking depth), the server logs it once and serves those files itself;
    the bytes are right either way."""
    src, (lower,) = mounts(1)
    upper_mp = tmp_path / "upper"
    upper_mp.mkdir()
    upper = Mount(lower.path, upper_mp, "upper", [], tmp_path / "upper.log")
    try:
        data = os.urandom(1 << 20)
        (upper_mp / "f").write_bytes(data)
        assert (src / "f").read_bytes() == data
        (src / "g").write_bytes(b"from the host")
        assert (upper_mp / "g").read_bytes() == b"from the host"
        with open(upper_mp / "g", "r+b") as f:
            f.write(b"FROM")
        assert (src / "g").read_bytes() == b"FROM the host"
        assert "passthrough refused for some files" in upper.output()
        assert "backing file" not in lower.output()
    finally:
        upper.stop()


def test_setid_files_are_written_by_the_server(mounts) -> None:
    """A setuid file is served without passthrough, so the server sees its writes (and
    clears the bit for a writer who is not root, tests/test_hostile_guest.py); the data
    still lands."""
    src, (m,) = mounts(1)
    (src / "s").write_bytes(b"x" * 10)
    os.chmod(src / "s", 0o4755)
    with open(m.path / "s", "r+b") as f:
        f.write(b"yy")
    assert (src / "s").read_bytes() == b"yy" + b"x" * 8


def _waiting_file(mountpoint: Path) -> Path:
    """fusectl's count of the requests `mountpoint`'s connection sent and has not had
    answered (found while the mount still answers: a stat of a stopped one blocks)."""
    return Path("/sys/fs/fuse/connections") / str(os.minor(os.stat(mountpoint).st_dev)) / \
        "waiting"


def test_workers_survive_a_stuck_request(mounts, tmp_path) -> None:
    """Every /dev/fuse worker reads requests itself: one stuck in a host call (a stopped
    FUSE server under the share) holds its thread only; the other keeps answering."""
    src, (m,) = mounts(1, ["--threads", "2"])
    if not any(Path("/sys/fs/fuse/connections").glob("*/waiting")):
        if os.environ.get("CI") == "true":
            pytest.fail("fusectl is not mounted at /sys/fs/fuse/connections")
        pytest.skip("fusectl is not mounted at /sys/fs/fuse/connections")
    (src / "other").mkdir()  # (the root directory is locked by the stuck lookup)
    (src / "other" / "ok").write_bytes(b"fine")
    inner = tmp_path / "inner-src"
    inner.mkdir()
    stuck_mp = src / "stuck"
    stuck_mp.mkdir()
    stuck = Mount(inner, stuck_mp, "stuck", ["--cache", "none"], tmp_path / "stuck.log")
    done = threading.Event()
    try:
        waiting = _waiting_file(stuck_mp)
        base = int(waiting.read_text())
        os.kill(stuck.proc.pid, signal.SIGSTOP)  # its mount answers nothing now

        def walk() -> None:
            try:
                os.stat(m.path / "stuck" / "x")  # our worker blocks in the host's call
            except OSError:
                pass
            done.set()

        threading.Thread(target=walk, daemon=True).start()
        # our worker's request reached the stopped one (fusectl's count, polled)
        assert procutil.wait_until(lambda: int(waiting.read_text()) > base, 20), \
            "the walk never reached the stuck mount"
        for i in range(20):  # the other worker answers (fresh names: nothing cached)
            (m.path / "other" / f"n{i}").write_bytes(b"y")
            assert (m.path / "other" / "ok").read_bytes() == b"fine"
        assert not done.is_set()  # still stuck: the answers above came from the other
    finally:
        os.kill(stuck.proc.pid, signal.SIGCONT)
        stuck.stop()
    assert done.wait(30)


def test_bad_backing_ioctl_arguments_are_refused(mounts) -> None:
    """What the kernel answers the backing ioctls for bad input (the server relies on
    these errnos to fall back): a descriptor that is not a regular file, an unknown id."""
    from fuse_server.backing import BackingFiles

    _, (m,) = mounts(1)
    fuse = os.open("/dev/fuse", os.O_RDWR)
    try:
        b = BackingFiles(fuse)
        b.enabled = True
        d = os.open(m.path, os.O_RDONLY)
        try:
            assert b.open(d) == 0  # not attached to a connection: refused, no exception
        finally:
            os.close(d)
        assert not b.enabled  # refused for the whole connection: off, logged once
        b.close(12345)  # an unknown id: ignored
    finally:
        os.close(fuse)


@pytest.fixture
def uring_on():
    """FUSE over io_uring switched on for new mounts (an administrator's switch; set back
    afterwards)."""
    knob = Path("/sys/module/fuse/parameters/enable_uring")
    if not knob.exists():
        if os.environ.get("CI") == "true":
            pytest.fail(f"{knob} is missing: this kernel has no FUSE over io_uring")
        pytest.skip(f"{knob} is missing")
    old = knob.read_text().strip()
    knob.write_text("Y")
    try:
        yield
    finally:
        knob.write_text(old)


def test_io_uring_serves_files_and_answers_waits_later(mounts, uring_on) -> None:
    """--io-uring: requests come through the rings (the log says so), files read and
    write, and a lock wait is answered through its ring entry when granted later (the
    other guest's unlock), while the ring keeps serving the unlock itself."""
    from test_fuse_locks import Locker

    src, (a, b) = mounts(2, ["--io-uring", "--cache", "none"])
    assert "FUSE over io_uring" in a.output(), a.output()
    (a.path / "f").write_bytes(b"through the ring")
    assert (b.path / "f").read_bytes() == b"through the ring"
    assert (src / "f").read_bytes() == b"through the ring"
    assert sorted(os.listdir(b.path)) == ["f"]
    la, lb = Locker(a.path / "f"), Locker(b.path / "f")
    try:
        assert la.do("fcntl w 0 10 nowait") == "ok"
        assert lb.do("fcntl w 0 10 nowait") == str(errno.EAGAIN)
        lb.send("fcntl w 0 10 wait")
        procutil.until_threads_in_setlkw(lb.p.pid, 1, cmd=fcntl.F_SETLKW)  # in the call
        assert lb.pending(0.3)  # and not answered
        assert la.do("fcntl u 0 10 nowait") == "ok"
        assert lb.read(20) == "ok"
        assert la.do("fcntl w 0 10 nowait") == str(errno.EAGAIN)
    finally:
        la.close()
        lb.close()
