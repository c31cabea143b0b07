"""Helpers for the daemon tests: a real `vfs-lockd serve` process, guest agents (LockClient
in their own processes, driven by JSON lines), raw protocol connections, host lockers.

Run as a script (`python daemonutil.py agent SOCKET GUEST`) it is the guest agent.
"""

from __future__ import annotations

import array
import contextlib
import fcntl
import json
import os
import select
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from fuse_oracle import flock, host_can_lock, unflock  # noqa: E402, F401 - host_can_lock: re-exported
from procutil import stop as stop_process  # noqa: E402
from procutil import wait_until  # noqa: E402

from lockd.daemon import wire  # noqa: E402

VFS_LOCKD = os.path.join(os.path.dirname(sys.executable), "vfs-lockd")
F_RDLCK, F_WRLCK, F_UNLCK = 0, 1, 2


# ------------------------------------------------------------------ the daemon
class DaemonProc:
    def __init__(self, tmp: str, *extra: str, env: dict | None = None,
                 socket_path: str | None = None, prefix: tuple[str, ...] = ()) -> None:
        self.tmp = tmp
        self.prefix = prefix  # e.g. ("prlimit", "--nofile=64:64", "--")
        self.sock = socket_path or os.path.join(tmp, "lockd.sock")
        self.extra = extra
        self.env = env
        self.log_path = os.path.join(tmp, f"daemon-{time.monotonic_ns()}.log")
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 10.0) -> DaemonProc:
        self.logf = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [*self.prefix, VFS_LOCKD, "serve", "--socket", self.sock, "--journal",
             os.path.join(self.tmp, "journal.db"), *self.extra],
            stderr=self.logf, env={**os.environ, **(self.env or {})})
        wait_until(lambda: self.proc.poll() is not None or "\"serving\"" in self.log(), timeout)
        if "\"serving\"" in self.log():
            return self
        if self.proc.poll() is not None:
            raise RuntimeError(f"daemon exited {self.proc.returncode}: {self.log()}")
        self.proc.kill()  # never leave a half-started daemon behind
        self.proc.wait()
        raise RuntimeError("daemon did not start: " + self.log())

    def log(self) -> str:
        with open(self.log_path) as f:
            return f.read()

    def events(self, name: str) -> list[dict]:
        out = []
        for line in self.log().splitlines():
            with contextlib.suppress(ValueError):
                rec = json.loads(line)
                if rec.get("event") == name:
                    out.append(rec)
        return out

    def kill9(self) -> None:
        self.proc.kill()
        self.proc.wait(10)

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        rc = stop_process(self.proc)
        self.logf.close()
        return rc


def cli(*args: str, timeout: float = 20) -> subprocess.CompletedProcess:
    return subprocess.run([VFS_LOCKD, *args], capture_output=True, text=True, timeout=timeout)


# ------------------------------------------------------------------ raw connections
class Raw:
    """A raw protocol connection (in the test process)."""

    def __init__(self, sock_path: str, guest: str | None = "raw", role: str = "guest",
                 session: str | None = None, hello: bool = True, timeout: float = 5.0,
                 **hello_fields: object) -> None:
        self.timeout = timeout  # how long a reply may take (a daemon under load: longer)
        self.s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.s.settimeout(timeout)
        self.s.connect(sock_path)
        self.buf = bytearray()
        self.rid = 100
        self.info: dict = {}
        if hello:
            self.s.sendall(wire.hello(1, guest, role, session, **hello_fields))
            rid, status, payload = self.read()
            assert status == 0, payload
            self.info = json.loads(payload)

    def send(self, data: bytes, fds: list[int] | None = None) -> None:
        if fds:
            self.s.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                     array.array("i", fds).tobytes())])
        else:
            self.s.sendall(data)

    def read(self, timeout: float | None = None) -> tuple[int, int, bytes]:
        """One reply frame; raises EOFError on close, TimeoutError when nothing comes."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            frames = wire.split_replies(self.buf) if len(self.buf) >= 16 else []
            if frames:
                first = frames[0]
                # put back the rest
                rest = b"".join(wire.reply(r, s, p) for r, s, p in frames[1:])
                self.buf[:0] = rest
                return first
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no reply")
            self.s.settimeout(left)
            try:
                data = self.s.recv(65536)
            except TimeoutError:
                raise TimeoutError("no reply") from None
            except ConnectionResetError:
                data = b""
            if not data:
                raise EOFError("closed")
            self.buf += data

    def call(self, type_: int, body: bytes = b"", handle: int = 0) -> tuple[int, bytes]:
        self.rid += 1
        self.send(wire.frame(type_, self.rid, body, handle))
        return self.expect(self.rid)

    def expect(self, rid: int, timeout: float | None = None) -> tuple[int, bytes]:
        while True:
            got, status, payload = self.read(timeout)
            if got == rid:
                return status, payload

    def file(self, path: str) -> int:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            self.rid += 1
            self.send(wire.file_frame(self.rid, path), [fd])
            status, payload = self.expect(self.rid)
        finally:
            os.close(fd)
        assert status == 0, payload
        return wire.FILE_OUT.unpack_from(payload)[0]

    def lk(self, type_: int, handle: int, lk_type: int, start: int = 0, end: int = 9,
           owner: int = 1, pid: int = 4242, fh: int = 0, flags: int = 0,
           rid: int | None = None) -> int:
        if rid is None:
            self.rid += 1
            rid = self.rid
        self.send(wire.lk(type_, rid, handle, fh, owner, lk_type, start, end, pid, flags))
        return rid

    def closed(self, timeout: float = 5.0) -> bool:
        try:
            while True:
                self.read(timeout)
        except EOFError:
            return True
        except TimeoutError:
            return False

    def close(self) -> None:
        self.s.close()


# ------------------------------------------------------------------ host lockers
HOLDER = r"""
import fcntl, os, sys, struct
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
start, length, mode = int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
try:
    if mode == "flock":
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    else:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, length, start)
    print("locked", flush=True)
except OSError as e:
    print("denied", e.errno, flush=True)
sys.stdin.read()
"""


class HostHolder:
    """A host process holding a classic POSIX (or flock) lock until released."""

    def __init__(self, path: str, start: int = 0, length: int = 10, mode: str = "posix"):
        self.p = subprocess.Popen([sys.executable, "-c", HOLDER, path, str(start), str(length),
                                   mode], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  text=True)
        self.state = self.p.stdout.readline().strip()

    @property
    def locked(self) -> bool:
        return self.state == "locked"

    def release(self) -> None:
        if self.p.poll() is None:
            self.p.stdin.close()
            self.p.wait(10)


def host_getlk_pid(path: str, start: int = 0, length: int = 10) -> int:
    """pid the kernel reports for a conflicting lock (0 when none; -1 for OFD holders)."""
    fd = os.open(path, os.O_RDWR)
    try:
        res = fcntl.fcntl(fd, fcntl.F_GETLK, flock(fcntl.F_WRLCK, start, length))
        typ, _, _, _, pid = unflock(res)
        return 0 if typ == fcntl.F_UNLCK else (pid or -1)
    finally:
        os.close(fd)


# ------------------------------------------------------------------ guest agents
def admin(d: DaemonProc, type_: int) -> dict:
    """One admin request (T_LIST, T_STATUS...) to the daemon: its JSON answer."""
    a = Raw(d.sock, None, role="admin")
    try:
        st, payload = a.call(type_)
        assert st == 0, payload
        return json.loads(payload)
    finally:
        a.close()


class Agent:
    """A guest server stand-in: LockClient in its own process, driven by JSON lines."""

    def __init__(self, sock_path: str, guest: str, *opts: str) -> None:
        self.p = subprocess.Popen([sys.executable, __file__, "agent", sock_path, guest, *opts],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.events: list[dict] = []
        self.buf = ""
        msg = self._line(10)
        assert msg.get("ready"), msg

    def _line(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        fd = self.p.stdout.fileno()
        while "\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise TimeoutError("agent did not answer")
            chunk = os.read(fd, 65536).decode()
            if not chunk:
                raise EOFError("agent exited")
            self.buf += chunk
        line, self.buf = self.buf.split("\n", 1)
        return json.loads(line)

    def do(self, op: str, timeout: float = 10.0, **kw: object) -> object:
        self.p.stdin.write(json.dumps({"op": op, **kw}) + "\n")
        self.p.stdin.flush()
        while True:
            msg = self._line(timeout)
            if "event" in msg:
                self.events.append(msg)
            else:
                return msg["result"]

    def event(self, timeout: float = 10.0) -> dict:
        if self.events:
            return self.events.pop(0)
        msg = self._line(timeout)
        assert "event" in msg, msg
        return msg

    def kill(self) -> None:
        if self.p.poll() is None:
            self.p.kill()
        self.p.wait(10)

    def close(self) -> None:
        if self.p.poll() is None:
            try:
                self.p.stdin.close()
                self.p.wait(10)
            except (OSError, subprocess.TimeoutExpired):
                self.p.kill()
                self.p.wait(10)


def _agent_main(sock_path: str, guest: str, *opts: str) -> None:
    import threading

    from lockd.daemon.client import LockClient

    out_mu = threading.Lock()

    def emit(obj: dict) -> None:
        with out_mu:
            sys.stdout.write(json.dumps(obj) + "\n")
            sys.stdout.flush()

    kw = {}
    for o in opts:
        k, _, v = o.partition("=")
        kw[k] = float(v)
    c = LockClient(sock_path, guest, holder_names=True, **kw)  # GETLK names the holder
    refs: dict[int, object] = {}
    emit({"ready": True})
    for line in sys.stdin:
        req = json.loads(line)
        op = req.pop("op")
        if op == "file":
            fd = os.open(req["path"], os.O_RDWR | os.O_CREAT, 0o644)
            ref = c.file(fd, req["path"])
            os.close(fd)
            refs[len(refs)] = ref
            res: object = len(refs) - 1
        elif op in ("setlk", "getlk", "setlkw"):
            ref = refs[req.get("f", 0)]
            args = (guest, req.get("owner", 1), ref, req["type"], req.get("start", 0),
                    req.get("end", 9))
            if op == "getlk":
                r = c.getlk(*args)
                res = r if isinstance(r, int) else {"type": r.type, "start": r.start,
                                                     "end": r.end, "pid": r.pid,
                                                     "guest": r.guest}
            elif op == "setlk":
                res = c.setlk(*args, req.get("pid", os.getpid()))
            else:
                tag = req.get("tag")
                res = c.setlkw(*args, req.get("pid", os.getpid()),
                               lambda err, tag=tag: emit({"event": "wait", "tag": tag,
                                                          "err": err}), tag)
        elif op == "flock":
            tag = req.get("tag")
            res = c.flock(guest, req.get("fh", 1), refs[req.get("f", 0)], req["type"],
                          os.getpid(), req.get("wait", False),
                          lambda err, tag=tag: emit({"event": "wait", "tag": tag, "err": err}),
                          tag)
        elif op == "cancel_tag":
            res = c.cancel_tag(guest, req["tag"])
        elif op == "release_owner":
            c.release_owner(guest, req.get("owner", 1), refs[req.get("f", 0)])
            res = 0
        elif op == "reconnects":
            res = c.reconnects
        else:
            res = f"unknown op {op}"
        emit({"result": res})
    c.close()


if __name__ == "__main__":
    if sys.argv[1] == "agent":
        _agent_main(*sys.argv[2:])
