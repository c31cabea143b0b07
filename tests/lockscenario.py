"""Run a lock scenario in a directory and report what another process sees, so that the
same scenario can be run on the host file system (the reference) and through a mount.

    python lockscenario.py DIR FILE SCENARIO_JSON [EXPECTED_JSON|- [PROBE_DIR ...]]

A scenario is a list of steps. Processes are forked workers named by the steps ("a",
"b", ...), each driven over a pipe; every descriptor lives in a worker:

    ["a", "open", "x"]                 worker a opens FILE as its descriptor x
    ["a", "dup", "x", "y"]             y = dup(x)
    ["a", "close", "x"]
    ["a", "ofd", "x", "w", 0, 10]      F_OFD_SETLK  (type r|w|u, start, length)
    ["a", "posix", "x", "w", 0, 10]    F_SETLK
    ["a", "ofdw", "x", "w", 0, 10]     F_OFD_SETLKW, interrupted by a signal if it waits
                                       (the answer is then EINTR)
    ["a", "getlk", "x", "w", 0, 10]    F_OFD_GETLK: "free" or "TYPE START LEN"
    ["a", "flock", "x", "sh"]          flock(LOCK_SH|LOCK_NB) (sh|ex|un)
    ["a", "fork", "c"]                 a forks worker c, which inherits a's descriptors
    ["a", "send", "x", "b", "z"]       a passes x to worker b (SCM_RIGHTS) as z
    ["a", "exit"]                      the worker exits (its descriptors close)
    ["probe", 0, 10]                   a separate process asks F_OFD_GETLK for a write
                                       lock on [0, 10): "free" or "TYPE START LEN", in
                                       DIR and in every PROBE_DIR (other mounts of the
                                       same files, the host): all must see the same

The output is one JSON list: the result of every step ("ok", an errno name, or the
probe's answer). With EXPECTED (the reference run's output) a probe that differs is asked
again until it matches or 5 s pass: a FUSE RELEASE is sent after close(2) returns, so
what a close releases shows up a moment later through a mount.
"""

from __future__ import annotations

import array
import errno
import fcntl
import json
import os
import signal
import socket
import struct
import sys
import time

F_OFD_GETLK, F_OFD_SETLK = 36, 37
TYPES = {"r": fcntl.F_RDLCK, "w": fcntl.F_WRLCK, "u": fcntl.F_UNLCK}
NAMES = {fcntl.F_RDLCK: "READ", fcntl.F_WRLCK: "WRITE"}
FLOCK = struct.Struct("hhqqi4x")  # struct flock on x86-64: type, whence, start, len, pid


def lock(fd: int, cmd: int, type_: str, start: int, length: int) -> str:
    try:
        fcntl.fcntl(fd, cmd, FLOCK.pack(TYPES[type_], 0, start, length, 0))
        return "ok"
    except OSError as exc:
        return errno.errorcode.get(exc.errno, str(exc.errno))


FLOCKS = {"sh": fcntl.LOCK_SH, "ex": fcntl.LOCK_EX, "un": fcntl.LOCK_UN}
F_OFD_SETLKW = 38
WAIT_S = 0.2  # how long a blocking request may wait before its signal comes


class _Interrupted(Exception):
    pass


def _interrupt(signum: int, frame: object) -> None:
    raise _Interrupted  # a handler that returns would make Python retry the call


def interrupted_wait(fd: int, type_: str, start: int, length: int) -> str:
    """F_OFD_SETLKW that a signal ends if it is still waiting after WAIT_S: "ok", or
    "EINTR" (the timer repeats, so a signal that came too early still ends the wait)."""
    old = signal.signal(signal.SIGALRM, _interrupt)
    signal.setitimer(signal.ITIMER_REAL, WAIT_S, WAIT_S)
    try:
        return lock(fd, F_OFD_SETLKW, type_, start, length)
    except _Interrupted:
        return "EINTR"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def getlk(fd: int, type_: str, start: int, length: int) -> str:
    out = fcntl.fcntl(fd, F_OFD_GETLK, FLOCK.pack(TYPES[type_], 0, start, length, 0))
    t, _, s, n, _ = FLOCK.unpack(out)
    return "free" if t == fcntl.F_UNLCK else f"{NAMES[t]} {s} {n}"


def probe(path: str, start: int, length: int) -> str:
    fd = os.open(path, os.O_RDWR)
    try:
        return getlk(fd, "w", start, length)
    finally:
        os.close(fd)


def worker(path: str, cmd_r: int, res_w: int, chan: socket.socket, fds: dict[str, int]) -> None:
    """A forked worker: read one JSON command per line, answer one JSON line."""
    inp = os.fdopen(cmd_r, "r")
    out = os.fdopen(res_w, "w")
    for line in inp:
        op, *a = json.loads(line)
        res: object = "ok"
        try:
            if op == "open":
                fds[a[0]] = os.open(path, os.O_RDWR)
            elif op == "dup":
                fds[a[1]] = os.dup(fds[a[0]])
            elif op == "close":
                os.close(fds.pop(a[0]))
            elif op in ("ofd", "posix"):
                res = lock(fds[a[0]], F_OFD_SETLK if op == "ofd" else fcntl.F_SETLK, *a[1:])
            elif op == "ofdw":
                res = interrupted_wait(fds[a[0]], *a[1:])
            elif op == "getlk":
                res = getlk(fds[a[0]], *a[1:])
            elif op == "flock":
                fcntl.flock(fds[a[0]], FLOCKS[a[1]] | fcntl.LOCK_NB)
            elif op == "send":
                chan.sendmsg([b"x"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                       array.array("i", [fds[a[0]]]))])
            elif op == "recv":
                _, anc, _, _ = chan.recvmsg(1, socket.CMSG_SPACE(4))
                fds[a[0]] = array.array("i", anc[0][2])[0]
            elif op == "fork":
                res = _fork(path, fds, chan, (cmd_r, res_w))
            elif op == "exit":
                out.write(json.dumps("ok") + "\n")
                out.flush()
                os._exit(0)
        except OSError as exc:
            res = errno.errorcode.get(exc.errno, str(exc.errno))
        except KeyError:
            res = "no such descriptor"
        out.write(json.dumps(res) + "\n")
        out.flush()
    os._exit(0)


def _fork(path: str, fds: dict[str, int], chan: socket.socket,
          own_pipes: tuple[int, int]) -> int:
    """Fork a worker that inherits `fds`; its command and result pipes for the driver
    (passed back over the channel as descriptors). Returns its pid."""
    cmd_r, cmd_w = os.pipe()
    res_r, res_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(cmd_w)
        os.close(res_r)
        for fd in own_pipes:  # the parent's: its driver must see them close with it
            os.close(fd)
        worker(path, cmd_r, res_w, chan, dict(fds))
    os.close(cmd_r)
    os.close(res_w)
    chan.sendmsg([b"p"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                           array.array("i", [cmd_w, res_r]))])
    os.close(cmd_w)
    os.close(res_r)
    return pid


class Driver:
    def __init__(self, path: str) -> None:
        self.path = path
        self.workers: dict[str, tuple] = {}
        self.chan, self.wchan = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)

    def spawn(self, name: str) -> None:
        cmd_r, cmd_w = os.pipe()
        res_r, res_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            for w, r, _p in self.workers.values():  # other workers' pipes are not ours
                os.close(w.fileno())
                os.close(r.fileno())
            os.close(cmd_w)
            os.close(res_r)
            worker(self.path, cmd_r, res_w, self.wchan, {})
        os.close(cmd_r)
        os.close(res_w)
        self.workers[name] = (os.fdopen(cmd_w, "w"), os.fdopen(res_r, "r"), pid)

    def do(self, name: str, op: str, *a: object) -> object:
        if name not in self.workers:
            self.spawn(name)
        w, r, pid = self.workers[name]
        if op == "send":  # relayed: workers share one end of the channel, we hold the other
            fd_name, dest, as_name = a
            w.write(json.dumps(["send", fd_name]) + "\n")
            w.flush()
            res = json.loads(r.readline())
            _, anc, _, _ = self.chan.recvmsg(1, socket.CMSG_SPACE(4))
            fd = array.array("i", anc[0][2])[0]
            self.chan.sendmsg([b"x"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                        array.array("i", [fd]))])
            os.close(fd)  # in flight to the receiver, which holds it once received
            self.do(dest, "recv", as_name)
            return res
        w.write(json.dumps([op, *a]) + "\n")
        w.flush()
        res = json.loads(r.readline())
        if op == "fork":  # adopt the new worker's pipes
            _, anc, _, _ = self.chan.recvmsg(1, socket.CMSG_SPACE(8))
            cmd_w, res_r = array.array("i", anc[0][2])
            self.workers[a[0]] = (os.fdopen(cmd_w, "w"), os.fdopen(res_r, "r"), res)
            return "ok"
        if op == "exit":  # answered before it exits: wait until its files are closed
            del self.workers[name]
            w.close()
            r.close()
            _wait_exited(pid)
        return res


def probe_all(paths: list[str], start: int, length: int) -> str:
    seen = [probe(p, start, length) for p in paths]
    return seen[0] if len(set(seen)) == 1 else "differ: " + " | ".join(seen)


def _wait_exited(pid: int) -> None:
    """Until the process has exited (a zombie has closed its files)."""
    try:
        if os.waitpid(pid, 0)[0] == pid:
            return
    except ChildProcessError:  # a grandchild: its parent worker reaps it
        pass
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return
        except FileNotFoundError:
            return
        time.sleep(0.001)  # polling /proc: not our child


def run(path: str, steps: list[list], expected: list | None,
        probe_paths: list[str] = ()) -> list:
    d = Driver(path)
    paths = [path, *probe_paths]
    out: list = []
    for i, step in enumerate(steps):
        if step[0] == "probe":
            got = probe_all(paths, *step[1:])
            want = expected[i] if expected else None
            deadline = time.monotonic() + 5.0
            while want is not None and got != want and time.monotonic() < deadline:
                time.sleep(0.002)  # the async RELEASE of a close through FUSE: ask again
                got = probe_all(paths, *step[1:])
            out.append(got)
        else:
            out.append(d.do(*step))
    for name in list(d.workers):
        d.do(name, "exit")
    return out


if __name__ == "__main__":
    d, f, scenario = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    exp = json.loads(sys.argv[4]) if len(sys.argv) > 4 and sys.argv[4] != "-" else None
    others = [os.path.join(x, f) for x in sys.argv[5:]]
    print(json.dumps(run(os.path.join(d, f), scenario, exp, others)))
