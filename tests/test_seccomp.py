"""The back-end's system call allowlist (issue 23 item 4b; fuse_server/seccomp.py).

A real `vfs-lockd virtiofs` in each sandbox mode carries the filter on every thread of
the process that serves (/proc/PID/status: Seccomp 2, one filter), by default and with
each --seccomp mode, none with --seccomp=none, and serves a guest (lookup, read, a lock)
with it. What a call outside the list gets is checked in a child process that installs
the same filter through the module's public function and then calls personality(2),
which the back-end never needs: kill ends it by SIGSYS before a handler can run, trap
delivers a SIGSYS its handler catches, log lets the call through and the kernel writes
an audit record naming the pid and the call, none does nothing.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO
from procutil import wait_until
from test_hostile_guest import need_root
from test_vhost_user import REQ, Backend, init, lk, lookup, open_file, share  # noqa: F401

from fuse_server import protocol as P
from fuse_server import seccomp
from lockd.api import F_WRLCK

SYS_PERSONALITY = {"x86_64": 135, "aarch64": 92}[os.uname().machine]


def _status(pid: int, tid: int | None = None) -> dict[str, str]:
    path = f"/proc/{pid}/status" if tid is None else f"/proc/{pid}/task/{tid}/status"
    out = {}
    for line in Path(path).read_text().splitlines():
        k, _, v = line.partition(":")
        out[k] = v.strip()
    return out


def _serving_pid(b: Backend, mode: str) -> int:
    """The process that serves: the launcher's pid, or its child in a namespace."""
    if mode != "namespace":
        return b.proc.pid
    children: list[str] = []

    def forked() -> bool:
        children[:] = Path(f"/proc/{b.proc.pid}/task/{b.proc.pid}/children").read_text().split()
        return bool(children)

    assert wait_until(forked, timeout=15), "the namespace sandbox forked no child"
    return int(children[0])


@pytest.mark.parametrize("sandbox, mode", [
    ("none", None), ("chroot", None), ("namespace", None),  # the default: kill
    ("none", "kill"), ("none", "log"), ("none", "trap"), ("none", "none"),
    ("namespace", "trap"), ("namespace", "none")])
def test_backend_serves_under_its_filter(tmp_path: Path, share: Path, sandbox: str,  # noqa: F811
                                         mode: str | None) -> None:
    need_root()
    args = ["--sandbox", sandbox] + ([] if mode is None else ["--seccomp", mode])
    b = Backend(tmp_path, share, 0, args)
    fe = None
    try:
        from vhost_frontend import Frontend

        fe = Frontend(str(b.sock))
        init(fe)  # the device runs: the filter is in place by now
        pid = _serving_pid(b, sandbox)
        tids = os.listdir(f"/proc/{pid}/task")
        filtered = (mode or seccomp.DEFAULT) != "none"
        for tid in tids:  # every thread (SECCOMP_FILTER_FLAG_TSYNC)
            st = _status(pid, int(tid))
            assert st["Seccomp"] == ("2" if filtered else "0"), (tid, st["Seccomp"])
            assert st["Seccomp_filters"] == ("1" if filtered else "0")
        assert len(tids) > 1  # worker threads too
        node = lookup(fe, b"f")
        fh = open_file(fe, node)
        read = fe.fuse(REQ, P.READ, P.READ_IN.pack(fh, 0, 100, 0, 0, 0, 0), node)
        assert read.error == 0 and read.payload == b"hello world\n"
        assert fe.fuse(REQ, P.SETLK, lk(fh, 1, F_WRLCK), node).error == 0
        assert fe.fuse(REQ, P.LOOKUP, b"nothing\0").error == errno.ENOENT
    finally:
        try:
            if fe is not None:
                fe.close()
        finally:
            b.stop()
    out = b.output()
    assert "Traceback" not in out
    assert f"seccomp={mode or seccomp.DEFAULT}" in out


CHILD = r"""
import ctypes, os, signal, sys, threading
from fuse_server import seccomp
def caught(signo, frame):
    os.write(1, b"caught SIGSYS\n")
    os._exit(3)
signal.signal(signal.SIGSYS, caught)
seccomp.install(sys.argv[1])
t = threading.Thread(target=lambda: None)  # threads, files: what the list allows
t.start(); t.join()
with open("/proc/self/status") as f:
    print([l.split()[1] for l in f if l.startswith("Seccomp:")][0], flush=True)
libc = ctypes.CDLL(None, use_errno=True)
r = libc.syscall(ctypes.c_long(int(sys.argv[2])), ctypes.c_ulong(0xFFFFFFFF))
print("returned", r, flush=True)
"""


def _kmsg_tail() -> int:
    fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
    os.lseek(fd, 0, os.SEEK_END)
    return fd


def _kmsg_read(fd: int) -> str:
    lines = []
    while True:
        try:
            lines.append(os.read(fd, 8192).decode(errors="replace"))
        except BlockingIOError:
            return "".join(lines)
        except OSError as exc:  # EPIPE: records overwritten meanwhile; go on
            if exc.errno != errno.EPIPE:
                raise


@pytest.mark.parametrize("mode", ["kill", "trap", "log", "none"])
def test_a_call_outside_the_list_gets_what_the_mode_says(mode: str) -> None:
    need_root()
    kmsg = _kmsg_tail()
    try:
        p = subprocess.run([sys.executable, "-c", CHILD, mode, str(SYS_PERSONALITY)],
                           capture_output=True, text=True, cwd=REPO, timeout=60,
                           env=dict(os.environ, PYTHONPATH=str(REPO)))
        out = p.stdout.split("\n")
        assert out[0] == ("0" if mode == "none" else "2"), (p.stdout, p.stderr)
        if mode == "kill":  # the process dies at once: no handler runs
            assert p.returncode == -signal.SIGSYS, (p.returncode, p.stdout, p.stderr)
            assert "caught" not in p.stdout and "returned" not in p.stdout
        elif mode == "trap":  # a SIGSYS the process can catch
            assert p.returncode == 3 and "caught SIGSYS" in p.stdout, (p.stdout, p.stderr)
            assert "returned" not in p.stdout
        else:  # made: personality(0xffffffff) answers the current persona
            assert p.returncode == 0 and "returned 0" in p.stdout, (p.stdout, p.stderr)
        logged = f"syscall={SYS_PERSONALITY} "
        records = [r for r in _kmsg_read(kmsg).splitlines()
                   if "type=1326" in r and logged in r]
        if mode == "log":
            assert any("code=0x7ffc0000" in r for r in records), records
        if mode == "none":
            assert not records, records
    finally:
        os.close(kmsg)


def test_the_list_refuses_what_a_compromised_back_end_would_want() -> None:
    names = seccomp.ALLOWED
    for never in ("execve", "execveat", "mount", "umount2", "pivot_root", "chroot", "ptrace",
                  "personality", "init_module", "finit_module", "kexec_load", "bpf",
                  "setns", "unshare", "keyctl", "add_key", "perf_event_open", "setuid",
                  "setresuid", "process_vm_writev", "open_tree", "move_mount"):
        assert never not in names, never
    prog = seccomp.program("kill", "x86_64")
    assert len(prog) % 8 == 0 and len(prog) // 8 < 4096  # BPF_MAXINSNS
    with pytest.raises(seccomp.SeccompError):
        seccomp.program("allowall")
