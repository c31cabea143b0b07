"""A real host process that takes locks on command, for coherence tests.

HostProc(path) starts `python hostproc.py PATH`; each call sends one JSON line and reads
the answer: 0 or an errno. Kinds: "posix" (fcntl F_SETLK/F_SETLKW on the process's fd),
"ofd" (F_OFD_SETLK/W on its own description), "lockf", "flock".
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time


class HostProc:
    def __init__(self, path: str, mode: str = "rw") -> None:
        self.proc = subprocess.Popen(
            [sys.executable, __file__, path, mode],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1,
        )
        assert self.proc.stdout.readline().strip() == "ready"

    def send(self, *cmd: object) -> None:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()

    def result(self, timeout: float = 10.0) -> int:
        import select

        r, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not r:
            raise TimeoutError("host process did not answer")
        return int(self.proc.stdout.readline())

    def call(self, *cmd: object) -> int:
        self.send(*cmd)
        return self.result()

    def lock(self, kind: str, type_: str, start: int = 0, length: int = 0,
             wait: bool = False) -> int:
        return self.call(kind, type_, start, length, wait)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for s in (self.proc.stdin, self.proc.stdout):
            try:
                s.close()
            except OSError:
                pass

    def __enter__(self) -> HostProc:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _serve(path: str, mode: str) -> None:
    import fcntl
    import struct

    flags = {"rw": os.O_RDWR, "r": os.O_RDONLY}[mode]
    fd = os.open(path, flags)
    types = {"r": fcntl.F_RDLCK, "w": fcntl.F_WRLCK, "u": fcntl.F_UNLCK}
    print("ready", flush=True)
    for line in sys.stdin:
        kind, t, start, length, wait = json.loads(line)
        try:
            if kind == "posix":
                cmd = fcntl.F_SETLKW if wait else fcntl.F_SETLK
                fcntl.fcntl(fd, cmd, struct.pack("hhqqi4x", types[t], 0, start, length, 0))
            elif kind == "ofd":
                cmd = fcntl.F_OFD_SETLKW if wait else fcntl.F_OFD_SETLK
                fcntl.fcntl(fd, cmd, struct.pack("hhqqi4x", types[t], 0, start, length, 0))
            elif kind == "lockf":
                op = {"w": fcntl.LOCK_EX, "r": fcntl.LOCK_SH, "u": fcntl.LOCK_UN}[t]
                fcntl.lockf(fd, op | (0 if wait or t == "u" else fcntl.LOCK_NB), length, start)
            elif kind == "flock":
                op = {"w": fcntl.LOCK_EX, "r": fcntl.LOCK_SH, "u": fcntl.LOCK_UN}[t]
                fcntl.flock(fd, op | (0 if wait or t == "u" else fcntl.LOCK_NB))
            elif kind == "sleep":
                time.sleep(start)
            print(0, flush=True)
        except OSError as e:
            print(e.errno, flush=True)


if __name__ == "__main__":
    _serve(sys.argv[1], sys.argv[2])
