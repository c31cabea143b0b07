"""Differential test against the kernel: one random sequence of lock requests is applied
by separate host processes with classic POSIX locks (one process per owner) on one file
and through the LockManager (one owner per process) on another. Every grant/deny answer
must agree, and so must the kernel's own F_GETLK view of both files. A second test does
the same with blocking requests: the waits granted after every step must be the ones the
kernel grants."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import tempfile
import threading

import pytest
from hostproc import HostProc
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from model import LIMIT, ByteModel, cell_end

from lockd.api import F_RDLCK, F_UNLCK, F_WRLCK, OFFSET_MAX, QUEUED
from lockd.engine import ofd
from lockd.engine.manager import POSIX, LockManager

OWNERS = 3
TYPES = {"r": F_RDLCK, "w": F_WRLCK, "u": F_UNLCK}


@pytest.fixture(scope="module")
def rig(tmp_path_factory):
    d = tmp_path_factory.mktemp("kdiff")
    kfile, mfile = d / "kernel", d / "managed"
    for p in (kfile, mfile):
        p.write_bytes(b"\0" * 128)
    procs = [HostProc(str(kfile)) for _ in range(OWNERS)]
    mgr = LockManager()
    fd = os.open(mfile, os.O_RDWR)
    ref = mgr.file(fd)
    kprobe = os.open(kfile, os.O_RDWR)
    mprobe = os.open(mfile, os.O_RDWR)
    try:
        yield procs, mgr, ref, kprobe, mprobe
    finally:
        for p in procs:
            p.close()
        mgr.release_guest("diff")
        mgr.put_file(ref)
        for x in (fd, kprobe, mprobe):
            os.close(x)


step = st.tuples(
    st.integers(0, OWNERS - 1), st.sampled_from("rwu"), st.integers(0, 40), st.integers(0, 12)
)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(step, min_size=1, max_size=25))
def test_same_answers_as_kernel(rig, steps):
    procs, mgr, ref, kprobe, mprobe = rig
    try:
        for owner, t, start, length in steps:
            end = OFFSET_MAX if length == 0 else start + length - 1
            k = procs[owner].lock("posix", t, start, length)
            m = mgr.setlk("diff", owner, ref, TYPES[t], start, end, procs[owner].pid)
            assert (k == 0) == (m == 0), (owner, t, start, length, k, m)
            if m:
                assert m == errno.EAGAIN and k in (errno.EAGAIN, errno.EACCES)
        # the host sees the same lock layout on both files
        for off in range(0, 60, 3):
            for typ in (F_RDLCK, F_WRLCK):
                kt = ofd.getlk(kprobe, typ, off, off)[0]
                mt = ofd.getlk(mprobe, typ, off, off)[0]
                assert kt == mt, (off, typ)
    finally:
        for i, p in enumerate(procs):
            p.lock("posix", "u", 0, 0)
            mgr.release_owner("diff", i, ref)


# ---------------------------------------------------------------- waiters vs the kernel
# The same random requests, some of them blocking, by three owners: on one file as real
# OFD locks (one description per owner; a blocking request is a thread in F_OFD_SETLKW),
# and through a LockManager on another (a blocking request is setlkw with a callback).
# After every step the waits granted must be the same, and so must every owner's own
# locks (F_OFD_GETLK with F_UNLCK, Linux 6.7+) and every GETLK answer. Whatever changes
# a holder's locks (unlock, downgrade, split, merge, a waiter's own grant converting its
# locks) has to wake exactly the waits the kernel wakes.
#
# Where the manager differs from the kernel by design, the step is left out on both
# sides: a request in the way of an earlier wait that does not wait for its owner (the
# manager queues it behind that wait, fairness; the kernel lets it through), and a
# blocking request that would close a wait-for cycle (the manager answers EDEADLK, OFD
# locks would hang).

WOWNERS = [("g1", 1), ("g1", 2), ("g2", 1)]
CELLS = LIMIT + 1  # byte LIMIT stands for [LIMIT, OFFSET_MAX]


class KernelWait:
    """A blocking request in the host kernel: a thread in F_OFD_SETLKW."""

    def __init__(self, owner: int, fd: int, type_: int, start: int, end: int) -> None:
        self.owner, self.fd, self.req = owner, fd, (type_, start, end)
        self.rc: int | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        self.rc = ofd.setlkw(self.fd, *self.req)

    def grantable(self) -> bool:
        """The kernel would grant it now (nothing conflicts): its thread returns."""
        return not self.thread.is_alive() or ofd.getlk(self.fd, *self.req)[0] == F_UNLCK


def _reaches(model: ByteModel, waits: dict, sources: set, target: int) -> bool:
    """Does an owner in `sources` wait (transitively) for `target`?"""
    seen: set = set()
    stack = list(sources)
    while stack:
        o = stack.pop()
        if o == target:
            return True
        if o in seen or o not in waits:
            continue
        seen.add(o)
        t, s, e = waits[o]
        stack.extend(model.conflicting_owners(o, 0, t, s, e))
    return False


class WaitRig:
    def __init__(self, kpath: str, mpath: str) -> None:
        self.kfds = [os.open(kpath, os.O_RDWR) for _ in WOWNERS]
        self.kprobe = os.open(kpath, os.O_RDWR)
        self.mfd = os.open(mpath, os.O_RDWR)
        self.mprobe = os.open(mpath, os.O_RDWR)
        self.mgr = LockManager()
        self.ref = self.mgr.file(self.mfd)
        self.model = ByteModel()  # what the kernel granted: the rules above need it
        self.kwaits: dict[int, KernelWait] = {}
        self.mwaits: dict[int, tuple] = {}  # owner -> request, while the manager queues it
        self.mgranted: list[tuple[int, int]] = []

    def excluded(self, o: int, t: int, s: int, e: int, wait: bool) -> bool:
        if o in self.kwaits or o in self.mwaits:
            return True  # the owner is blocked: it sends nothing
        if t == F_UNLCK:
            return False
        for w, (wt, ws, we) in self.mwaits.items():
            if (ws <= e and s <= we and (t == F_WRLCK or wt == F_WRLCK)
                    and o not in self.model.conflicting_owners(w, 0, wt, ws, we)):
                return True  # fairness: the manager queues it behind w
        blockers = self.model.conflicting_owners(o, 0, t, s, e)
        return wait and bool(blockers) and _reaches(self.model, self.mwaits, blockers, o)

    def step(self, o: int, t: int, s: int, e: int, wait: bool) -> None:
        g, own = WOWNERS[o]
        pid = 1000 + o
        if not wait or t == F_UNLCK:
            k = ofd.setlk(self.kfds[o], t, s, e)
            m = self.mgr.setlk(g, own, self.ref, t, s, e, pid)
            assert (k == 0) == (m == 0), ("setlk", o, t, s, e, k, m)
            assert m in (0, errno.EAGAIN), m
            if k == 0:
                assert self.model.setlk(o, 0, t, s, e)
            mnow: list[int] = []
        else:
            self.kwaits[o] = KernelWait(o, self.kfds[o], t, s, e)
            m = self.mgr.setlkw(g, own, self.ref, t, s, e, pid,
                                lambda rc, o=o: self.mgranted.append((o, rc)))
            assert m in (0, QUEUED), ("setlkw", o, t, s, e, m)
            mnow = [o] if m == 0 else []
            if m == QUEUED:
                self.mwaits[o] = (t, s, e)
        kgot = self.settle()
        mgot = mnow + [w for w, _rc in self.mgranted]
        assert all(rc == 0 for _w, rc in self.mgranted), self.mgranted
        for w, _rc in self.mgranted:
            del self.mwaits[w]
        self.mgranted.clear()
        assert sorted(kgot) == sorted(mgot), ("granted", o, t, s, e, kgot, mgot)
        self.compare()

    def settle(self) -> list[int]:
        """Every kernel wait the kernel grants now: joined, recorded."""
        got: list[KernelWait] = []
        progress = True
        while progress:  # a grant that converts its owner's locks may free another
            progress = False
            for o, w in list(self.kwaits.items()):
                if w.grantable():
                    w.thread.join(10)
                    assert not w.thread.is_alive(), "the kernel did not grant a free wait"
                    assert w.rc == 0, w.rc
                    del self.kwaits[o]
                    got.append(w)
                    progress = True
        # Into the model in an order the kernel could have granted them in (a grant
        # that converted its owner's locks came before the one it freed).
        left = list(got)
        while left:
            ok = [w for w in left if self.model.setlk(w.owner, 0, *w.req)]
            assert ok, [w.req for w in left]
            left = [w for w in left if w not in ok]
        return [w.owner for w in got]

    def compare(self) -> None:
        mgr, ref = self.mgr, self.ref
        for o, (g, own) in enumerate(WOWNERS):
            d = ref.descs.get((POSIX, g, own))
            for c in range(CELLS):
                e = cell_end(c)
                k = ofd.getlk(self.kfds[o], F_UNLCK, c, e)[:3]
                mine = mgr.getlk(g, own, ref, F_UNLCK, c, e)
                m = (mine.type, mine.start, mine.end) if mine.type != F_UNLCK else (F_UNLCK, 0, 0)
                h = ofd.getlk(d.fd, F_UNLCK, c, e)[:3] if d is not None else (F_UNLCK, 0, 0)
                assert k == m == h, ("own lock", o, c, k, m, h)
                # What GETLK for a write lock answers the owner (the own locks of all
                # owners, compared above, already say what a read lock would meet).
                kc = ofd.getlk(self.kfds[o], F_WRLCK, c, e)
                mc = mgr.getlk(g, own, ref, F_WRLCK, c, e)
                assert kc[0] == mc.type, ("getlk", o, c, kc, mc)
                if kc[0] == F_WRLCK:  # one holder: its lock is the answer
                    assert kc[1:3] == (mc.start, mc.end), ("getlk", o, c, kc, mc)
        for c in range(CELLS):
            e = cell_end(c)
            assert (ofd.getlk(self.kprobe, F_WRLCK, c, e)[0]
                    == ofd.getlk(self.mprobe, F_WRLCK, c, e)[0]), ("host view", c)

    def close(self) -> None:
        try:
            # Kick the kernel waits out (the manager's own wake signal, which
            # LockManager installed without SA_RESTART), as the manager cancels its own.
            for w in self.kwaits.values():
                while w.thread.is_alive():
                    signal.pthread_kill(w.thread.ident, ofd.WAKE_SIGNAL)
                    w.thread.join(0.01)  # a kill before it entered the kernel is lost
            for g in {g for g, _ in WOWNERS}:
                self.mgr.release_guest(g)
            self.mgr.put_file(self.ref)
            assert self.mgr.stats()["descriptors"] == 0
        finally:
            for fd in [*self.kfds, self.kprobe, self.mfd, self.mprobe]:
                os.close(fd)


def _norm(s: int, e: int) -> tuple[int, int]:
    s, e = min(s, e), max(s, e)
    return s, (OFFSET_MAX if e >= LIMIT else e)


wstep = st.tuples(st.integers(0, len(WOWNERS) - 1), st.sampled_from("rrwu"),
                  st.integers(0, 12), st.integers(0, LIMIT), st.sampled_from([True, False, False]))


@pytest.fixture(scope="module")
def wdir(tmp_path_factory):
    return tmp_path_factory.mktemp("kwait")


@settings(max_examples=100, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(wstep, min_size=8, max_size=30))
# A write lock downgraded under a blocked reader (issue 23, 1b).
@example([(0, "w", 0, 9, False), (1, "r", 0, 9, True), (0, "r", 0, 9, False)])
# A split: the middle of a write lock becomes a read lock.
@example([(0, "w", 0, 19, False), (1, "r", 5, 9, True), (0, "r", 5, 9, False)])
# A merge: a read lock next to the waited range absorbs the downgraded part.
@example([(0, "w", 0, 9, False), (0, "r", 10, 19, False), (1, "r", 5, 12, True),
          (0, "r", 0, 9, False)])
# A waiter's own grant converts its write lock, which frees an earlier waiter.
@example([(0, "w", 0, 9, False), (1, "w", 10, 15, False), (2, "r", 10, 15, True),
          (1, "r", 0, 15, True), (0, "u", 0, 9, False)])
def test_waiters_granted_as_the_kernel_grants_them(wdir, steps):
    # Files of its own for every example: nothing one leaves can decide another.
    d = tempfile.mkdtemp(dir=wdir)
    paths = (os.path.join(d, "kernel"), os.path.join(d, "managed"))
    for p in paths:
        with open(p, "wb") as fh:
            fh.write(b"\0" * 64)
    rig = WaitRig(*paths)
    try:
        for pick, t, s, e, wait in steps:
            # An owner that is not waiting (a waiting one sends nothing).
            free = [o for o in range(len(WOWNERS)) if o not in rig.kwaits]
            o = free[pick % len(free)]
            s, e = _norm(s, e)
            if not rig.excluded(o, TYPES[t], s, e, wait):
                rig.step(o, TYPES[t], s, e, wait)
    finally:
        rig.close()
        shutil.rmtree(d)
