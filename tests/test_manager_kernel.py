"""Differential test against the kernel: one random sequence of lock requests is applied
by separate host processes with classic POSIX locks (one process per owner) on one file
and through the LockManager (one owner per process) on another. Every grant/deny answer
must agree, and so must the kernel's own F_GETLK view of both files."""

from __future__ import annotations

import errno
import os

import pytest
from hostproc import HostProc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lockd.api import F_RDLCK, F_UNLCK, F_WRLCK, OFFSET_MAX
from lockd.engine import ofd
from lockd.engine.manager import LockManager

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
