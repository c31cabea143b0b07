"""Hypothesis stateful test: LockManager against the byte-level model, with several owners
in several guests on several real files. After every step the locked bytes of every
owner, every GETLK answer and the host's own view of the files match the model."""

import os
import tempfile

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule
from model import LIMIT, OFFSET_MAX, ByteModel, cells

from lockd.api import F_RDLCK, F_UNLCK, F_WRLCK, Conflict
from lockd.engine import ofd
from lockd.engine.manager import LockManager

OWNERS = [("g1", 1), ("g1", 2), ("g2", 1), ("g3", 7)]
FILES = 2

owners = st.sampled_from(OWNERS)
files = st.integers(0, FILES - 1)
types = st.sampled_from([F_RDLCK, F_WRLCK, F_UNLCK])
starts = st.integers(0, LIMIT)
ends = st.integers(0, LIMIT)


def norm(s, e):
    return s, (OFFSET_MAX if e >= LIMIT - 1 or s >= LIMIT else max(s, e))


class ManagerVsModel(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.dir = tempfile.TemporaryDirectory()
        self.mgr = LockManager()
        self.model = ByteModel()
        self.fds = []
        self.refs = []
        self.probes = []
        for i in range(FILES):
            p = os.path.join(self.dir.name, f"f{i}")
            with open(p, "wb") as fh:
                fh.write(b"\0" * 64)
            fd = os.open(p, os.O_RDWR)
            self.fds.append(fd)
            self.refs.append(self.mgr.file(fd))
            self.probes.append(os.open(p, os.O_RDWR))  # a host description of our own

    def teardown(self):
        for g in {o[0] for o in OWNERS}:
            self.mgr.release_guest(g)
        for r in self.refs:
            self.mgr.put_file(r)
        for fd in self.fds + self.probes:
            os.close(fd)
        assert self.mgr.stats()["descriptors"] == 0
        self.dir.cleanup()

    @rule(o=owners, f=files, t=types, s=starts, e=ends)
    def setlk(self, o, f, t, s, e):
        s, e = norm(s, e)
        rc = self.mgr.setlk(o[0], o[1], self.refs[f], t, s, e, pid=hash(o) & 0xFFFF)
        ok = self.model.setlk(o, f, t, s, e)
        assert (rc == 0) == ok, (rc, ok)
        if not ok:
            assert rc == 11  # EAGAIN

    @rule(o=owners, f=files)
    def flush(self, o, f):
        self.mgr.release_owner(o[0], o[1], self.refs[f])
        self.model.release(o, f)

    @rule(g=st.sampled_from(["g1", "g2", "g3"]))
    def guest_gone(self, g):
        self.mgr.release_guest(g)
        for key in [k for k in self.model.held if k[0][0] == g]:
            del self.model.held[key]

    @rule(o=owners, f=files, t=st.sampled_from([F_RDLCK, F_WRLCK]), s=starts, e=ends)
    def getlk(self, o, f, t, s, e):
        s, e = norm(s, e)
        got = self.mgr.getlk(o[0], o[1], self.refs[f], t, s, e)
        want = self.model.getlk(o, f, t, s, e)
        assert isinstance(got, Conflict)
        if want is None:
            assert got.type == F_UNLCK
        else:
            wt, ws, we, wo = want
            assert (got.type, got.start, got.end, got.guest) == (wt, ws, we, wo[0])
            assert got.pid == hash(wo) & 0xFFFF

    @invariant()
    def bytes_match(self):
        snap = self.mgr.snapshot()
        held: dict = {}
        for row in snap["locks"]:
            f = next(i for i, r in enumerate(self.refs) if r.ino == row["ino"])
            m = held.setdefault(((row["guest"], row["owner"]), f), {})
            for c in cells(row["start"], row["end"]):
                assert c not in m
                m[c] = F_WRLCK if row["type"] == "WRITE" else F_RDLCK
        assert held == self.model.held

    @invariant()
    def host_matches(self):
        # The kernel, asked from an unrelated description, sees exactly the model's bytes.
        for f in range(FILES):
            for c in range(LIMIT + 1):
                end = OFFSET_MAX if c == LIMIT else c
                t, *_ = ofd.getlk(self.probes[f], F_WRLCK, c, end)
                types = {m[c] for (o, ff), m in self.model.held.items() if ff == f and c in m}
                if not types:
                    assert t == F_UNLCK, (f, c)
                else:
                    assert t in types, (f, c, t, types)


ManagerVsModel.TestCase.settings = settings(max_examples=150, stateful_step_count=50,
                                            deadline=None)
TestManagerVsModel = ManagerVsModel.TestCase
