"""Delegation recalls interleaved with every lock message, against the kernel.

A file only one guest uses is decided by that guest's server; a second guest's first
request on it, or an admin's LIST, recalls it while the first guest's messages keep
coming (lockd/daemon/delegation.py). Every such message can race the recall: SETLK,
SETLKW and its INTERRUPT, GETLK, the FLUSH of a close, the RELEASE of a last close, a
process's exit. Hypothesis generates step lists over two guests (two mounts of one
`vfs-lockd serve`, default options: delegations on) and runs each twice: on the host
directory itself, the reference, where the kernel decides everything, and through the
mounts. Every step's answer must be the same, and after every step a host process must
see the same locks on both files. After the last step every process has exited, and
the kernel's /proc/locks must list nothing on the file: a lock held by nobody forever is
what a recall answered by neither side, or applied by both, would leave.

`test_478_as_478_runs_it` is xfstests generic/478's pattern, in its own layout: every
combination on ONE file, the setter through mount A (with `dup` + `close` of the locked
descriptor and with a child closing its copy), the getter through mount B.
"""

from __future__ import annotations

import itertools
import os
import time
from pathlib import Path

import pytest
from daemonutil import DaemonProc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lockscenario import Driver, probe
from procutil import wait_until

from lockd.daemon import wire
from lockd.daemon.client import AdminClient

pytestmark = pytest.mark.fuse

WORKERS = ["a0", "a1", "b0", "b1"]  # a*: processes of guest A (mount A), b*: guest B
FDS = ["x", "y"]
RANGES = [(0, 10), (5, 10), (20, 5), (0, 0)]  # (start, length); 0: to end of file
PROBES = [(0, 5), (5, 5), (10, 10), (20, 5), (30, 0)]


def _lock_steps(w: str, f: str) -> st.SearchStrategy:
    rng = st.sampled_from(RANGES)
    return st.one_of(
        st.tuples(st.sampled_from(["ofd", "posix"]), st.sampled_from("rwu"), rng).map(
            lambda t: [w, t[0], f, t[1], *t[2]]),
        st.tuples(st.sampled_from("rw"), rng).map(lambda t: [w, "ofdw", f, t[0], *t[1]]),
        st.tuples(st.sampled_from("rw"), rng).map(lambda t: [w, "getlk", f, t[0], *t[1]]),
        st.sampled_from(["sh", "ex", "un"]).map(lambda k: [w, "flock", f, k]),
    )


@st.composite
def step(draw: st.DrawFn) -> list:
    w, f = draw(st.sampled_from(WORKERS)), draw(st.sampled_from(FDS))
    kind = draw(st.sampled_from(["open", "open", "lock", "lock", "lock", "lock", "close",
                                 "dup", "exit", "list"]))
    if kind == "open":
        return [w, "open", f]
    if kind == "close":
        return [w, "close", f]
    if kind == "dup":
        return [w, "dup", f, "y" if f == "x" else "x"]
    if kind == "exit":
        return [w, "exit"]
    if kind == "list":
        return ["list"]
    return draw(_lock_steps(w, f))


def host_view(path: str) -> list[str]:
    return [probe(path, s, n) for s, n in PROBES]


def held_on(path: str) -> list[str]:
    """The kernel's /proc/locks lines for the file's inode."""
    st_ = os.stat(path)
    key = f"{os.major(st_.st_dev):02x}:{os.minor(st_.st_dev):02x}:{st_.st_ino} "
    with open("/proc/locks") as f:
        return [line for line in f if key in line]


def holders_of(path: str) -> list[tuple[str, str, str]]:
    """(pid, command, fd) of every process holding `path` open: who keeps a lock."""
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    if os.readlink(f"/proc/{pid}/fd/{fd}") == path:
                        out.append((pid, open(f"/proc/{pid}/cmdline").read().replace("\0", " ")[:80], fd))
                except OSError:
                    pass
        except OSError:
            pass
    return out


class Run:
    """One step list on one file: the reference's drivers or the guests'."""

    def __init__(self, paths: dict[str, str]) -> None:
        self.drivers = {p: Driver(p) for p in set(paths.values())}
        self.of = {w: self.drivers[paths[w]] for w in WORKERS}

    def do(self, s: list) -> object:
        w = s[0]
        d = self.of[w]
        if s[1] == "exit" and w not in d.workers:
            return "ok"  # never started: nothing to end
        return d.do(*s)

    def end(self) -> None:
        for d in self.drivers.values():
            for w in list(d.workers):
                d.do(w, "exit")


@pytest.fixture
def two_guests(mounts, tmp_path):
    d = DaemonProc(str(tmp_path)).start()
    try:
        source, (ma, mb) = mounts(2, ["--lockd", d.sock], guests=["ga", "gb"])
        ref = tmp_path / "ref"
        ref.mkdir()
        yield d, source, ma.path, mb.path, ref
    finally:
        d.stop()


def _settled(want: list[str], path: str) -> list[str]:
    """What a host process sees on path, asked again until it is `want` or 5 s pass: a
    FUSE RELEASE is sent after close(2) has returned, so what a close frees shows up a
    moment later through a mount."""
    got = host_view(path)
    deadline = time.monotonic() + 5
    while got != want and time.monotonic() < deadline:
        time.sleep(0.002)
        got = host_view(path)
    return got


_names = itertools.count()


@settings(max_examples=40, deadline=None, suppress_health_check=[
    HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(steps=st.lists(step(), min_size=4, max_size=18))
def test_recalls_interleaved_with_every_message(two_guests, steps) -> None:
    d, source, ma, mb, ref = two_guests
    name = f"f{next(_names)}"
    for base in (ref, source):
        (base / name).write_bytes(b"x" * 64)
    reference = Run({w: str(ref / name) for w in WORKERS})
    guests = Run({w: str((ma if w[0] == "a" else mb) / name) for w in WORKERS})
    admin = AdminClient(d.sock)
    try:
        for i, s in enumerate(steps):
            if s[0] == "list":  # recalls every delegation (a no-op on the host)
                admin.json(wire.T_LIST)
                continue
            want = reference.do(s)
            got = guests.do(s)
            assert got == want, (i, s, steps[:i + 1])
            seen = host_view(str(ref / name))
            assert _settled(seen, str(source / name)) == seen, (i, s, steps[:i + 1])
    finally:
        reference.end()
        guests.end()
        admin.close()
    assert held_on(str(ref / name)) == []
    # Every process has exited: nothing may stay held on the host, nor in the table.
    assert wait_until(lambda: held_on(str(source / name)) == [], timeout=5), \
        (held_on(str(source / name)), steps, holders_of(str(source / name)))
    with AdminClient(d.sock) as a:
        assert [lk for lk in a.json(wire.T_LIST)["locks"] if lk["path"].endswith(name)] == []


COMBOS = [  # (setter's type, start, len, getter's type, start, len): 478's table
    ("w", 0, 10, "w", 0, 10), ("w", 0, 10, "w", 5, 20), ("w", 0, 10, "w", 20, 10),
    ("w", 0, 10, "r", 0, 10), ("w", 0, 10, "r", 5, 20), ("w", 0, 10, "r", 20, 10),
    ("r", 0, 10, "w", 0, 10), ("r", 0, 10, "w", 5, 20), ("r", 0, 10, "w", 20, 10),
    ("r", 0, 10, "r", 0, 10), ("r", 0, 10, "r", 20, 10),
]


def test_478_as_478_runs_it(two_guests) -> None:
    """Each combination three ways (plain, a child closing its copy, dup + close), all
    on one file, one after the other as 478 runs them: the getter must see the setter's
    lock, and once the setter has exited nothing may stay locked."""
    d, source, ma, mb, ref = two_guests
    (source / "testfile").write_bytes(b"\xff" * 4096)
    path = str(source / "testfile")
    n = 0
    for st_, ss, sl, gt, gs, gl in COMBOS:
        for how in ("plain", "child", "dup"):
            setter, getter = Driver(str(ma / "testfile")), Driver(str(mb / "testfile"))
            getter.do("g", "open", "x")
            setter.do("s", "open", "x")
            assert setter.do("s", "ofd", "x", st_, ss, sl) == "ok"
            if how == "child":
                setter.do("s", "fork", "c")
                setter.do("c", "exit")  # the child's copy closes: a FLUSH, no RELEASE
            elif how == "dup":
                setter.do("s", "dup", "x", "y")
                setter.do("s", "close", "y")  # a FLUSH of the setter's own owner
            overlap = ss < gs + gl and gs < ss + sl
            want = f"{'WRITE' if st_ == 'w' else 'READ'} {ss} {sl}" \
                if overlap and "w" in (st_, gt) else "free"
            assert getter.do("g", "getlk", "x", gt, gs, gl) == want, (st_, ss, sl, how)
            setter.do("s", "exit")
            getter.do("g", "exit")
            n += 1
            assert wait_until(lambda: held_on(path) == [], timeout=5), (n, held_on(path))
    assert n == 3 * len(COMBOS)
    with AdminClient(d.sock) as a:
        assert a.json(wire.T_LIST)["locks"] == []


def test_reference_side_answers(tmp_path: Path) -> None:
    """The model's reference side: the host kernel's answers are what the steps expect
    (a reader and a writer of one description; an interrupted wait holds nothing)."""
    f = tmp_path / "f"
    f.write_bytes(b"x" * 64)
    run = Run({w: str(f) for w in WORKERS})
    try:
        assert run.do(["a0", "open", "x"]) == "ok"
        assert run.do(["b0", "open", "x"]) == "ok"
        assert run.do(["a0", "ofd", "x", "w", 0, 10]) == "ok"
        assert run.do(["b0", "getlk", "x", "r", 5, 1]) == "WRITE 0 10"
        assert run.do(["b0", "ofdw", "x", "r", 0, 10]) == "EINTR"
        assert run.do(["a0", "ofd", "x", "u", 0, 10]) == "ok"
        assert run.do(["b0", "ofdw", "x", "r", 0, 10]) == "ok"
        assert host_view(str(f))[0] == "READ 0 10"
    finally:
        run.end()
    assert held_on(str(f)) == []


@pytest.mark.parametrize("delegated", [True, False], ids=["delegated", "central"])
def test_concurrent_last_closes_drop_everything(two_guests, delegated) -> None:
    """A process exiting with several handles of one file open: the kernel sends their
    RELEASEs at once, and the server's workers take them in parallel. Each handle's
    flock and OFD locks must go, whichever RELEASE finds the inode closed first (that
    one gives the file's registration back to the lock service)."""
    d, source, ma, mb, ref = two_guests
    for i in range(12):
        name = f"c{i}"
        (source / name).write_bytes(b"x" * 64)
        a = Driver(str(ma / name))
        for fd in ("p", "q", "r", "s"):
            a.do("a", "open", fd)
        if not delegated:
            b = Driver(str(mb / name))  # a second guest's lock request: central
            b.do("b", "open", "x")
            assert b.do("b", "getlk", "x", "w", 40, 1) == "free"
        assert a.do("a", "flock", "p", "ex") == "ok"
        assert a.do("a", "ofd", "q", "w", 0, 10) == "ok"
        assert a.do("a", "ofd", "r", "r", 20, 5) == "ok"
        assert a.do("a", "flock", "s", "ex") == "EAGAIN"  # another description's flock
        a.do("a", "exit")
        if not delegated:
            b.do("b", "exit")
        path = str(source / name)
        assert wait_until(lambda p=path: held_on(p) == [], timeout=5), (i, held_on(path))
