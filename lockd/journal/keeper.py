"""The descriptor keeper: a tiny process that holds a duplicate of every lock description.

An OFD lock belongs to the open file description, not to a process, so while the keeper
holds a duplicate, a kill -9 of the daemon drops no host lock: no host process or other
guest can take a range a guest was told it holds. The restarted daemon takes the
descriptions back (`take_all`) and continues on them.

Protocol: SOCK_SEQPACKET on a Unix socket (mode 0600), one message per operation:
  b"P" key  + 1 fd (SCM_RIGHTS)   keep this description under key (replacing any)
  b"D" key                        close and forget key
  b"L"                            send every entry back: b"E" key + fd ..., then b"Z"
  b"Q"                            exit (only when the daemon shuts down holding nothing)
The keeper serves one daemon at a time and exits by itself when it holds nothing and no
daemon is connected, or when its journal file disappears.
"""

from __future__ import annotations

import array
import hashlib
import logging
import os
import select
import socket
import struct
import subprocess
import sys
import time

log = logging.getLogger("lockd.journal.keeper")
MAX_MSG = 4096


def _send(sock: socket.socket, data: bytes, fd: int = -1) -> None:
    if fd >= 0:
        sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])
    else:
        sock.send(data)


def _recv(sock: socket.socket) -> tuple[bytes, list[int]]:
    fds = array.array("i")
    msg, anc, _flags, _addr = sock.recvmsg(MAX_MSG, socket.CMSG_SPACE(4 * 8))
    for level, typ, data in anc:
        if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - len(data) % 4])
    return msg, list(fds)


def keeper_address(journal: str) -> str:
    """The keeper's socket for a journal: in the abstract namespace (no path length limit,
    nothing to clean up), named after the journal's real path; the keeper checks its
    peers' uid since abstract sockets have no file permissions."""
    digest = hashlib.sha256(os.path.realpath(journal).encode()).hexdigest()[:24]
    return "\0vfs-lockd-keeper-" + digest


class KeeperClient:
    """The daemon's side."""

    def __init__(self, path: str, timeout: float = 5.0) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        self.sock.settimeout(timeout)
        self.sock.connect(path)

    def put(self, key: str, fd: int) -> None:
        _send(self.sock, b"P" + key.encode(), fd)

    def drop(self, key: str) -> None:
        _send(self.sock, b"D" + key.encode())

    def take_all(self) -> dict[str, int]:
        """Duplicates of every kept description (the keeper keeps its own)."""
        _send(self.sock, b"L")
        out: dict[str, int] = {}
        while True:
            msg, fds = _recv(self.sock)
            if msg[:1] == b"Z" or not msg:
                for fd in fds:
                    os.close(fd)
                return out
            if msg[:1] == b"E" and fds:
                out[msg[1:].decode()] = fds[0]
                for fd in fds[1:]:
                    os.close(fd)

    def quit(self) -> None:
        try:
            _send(self.sock, b"Q")
        except OSError:
            pass

    def close(self) -> None:
        self.sock.close()


def ensure_keeper(path: str, journal: str, timeout: float = 5.0) -> KeeperClient:
    """Connect to the keeper at `path`, starting one (in its own session, so it outlives
    the daemon and its process group) when none answers."""
    try:
        return KeeperClient(path, timeout)
    except (FileNotFoundError, ConnectionRefusedError):
        pass
    if not path.startswith("\0"):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
    proc = subprocess.Popen(
        [sys.executable, "-m", "lockd.journal.keeper", path.replace("\0", "@", 1), journal],
        start_new_session=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, close_fds=True,
    )
    deadline = time.monotonic() + timeout
    while True:
        try:
            return KeeperClient(path, timeout)
        except (FileNotFoundError, ConnectionRefusedError):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise OSError(f"descriptor keeper did not start at {path}") from None
            time.sleep(0.01)


def serve(path: str, journal: str) -> None:
    """The keeper process itself."""
    kept: dict[str, int] = {}
    if path.startswith("@"):
        path = "\0" + path[1:]
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    old = os.umask(0o177)
    try:
        srv.bind(path)
    finally:
        os.umask(old)
    srv.listen(4)
    client: socket.socket | None = None
    idle_since = time.monotonic()
    try:
        while True:
            socks = [srv] + ([client] if client else [])
            ready, _, _ = select.select(socks, [], [], 1.0)
            if srv in ready:
                conn, _ = srv.accept()
                cred = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                       struct.calcsize("3i"))
                _pid, uid, _gid = struct.unpack("3i", cred)
                if uid != os.getuid():  # only the daemon's own user may have the locks
                    conn.close()
                    continue
                if client is not None:  # a new daemon replaces a dead one
                    client.close()
                client = conn
            if client is not None and client in ready:
                try:
                    msg, fds = _recv(client)
                except OSError:
                    msg, fds = b"", []
                if not msg:
                    client.close()
                    client = None
                    idle_since = time.monotonic()
                    continue
                op, key = msg[:1], msg[1:].decode(errors="replace")
                if op == b"P" and fds:
                    if key in kept:
                        os.close(kept[key])
                    kept[key] = fds.pop(0)
                elif op == b"D":
                    fd = kept.pop(key, None)
                    if fd is not None:
                        os.close(fd)
                elif op == b"L":
                    for k, fd in kept.items():
                        _send(client, b"E" + k.encode(), fd)
                    _send(client, b"Z")
                elif op == b"Q":
                    return
                for fd in fds:
                    os.close(fd)
            if client is None:
                if not kept and time.monotonic() - idle_since > 1.0:
                    return
                if not os.path.exists(journal):
                    return
    finally:
        for fd in kept.values():
            os.close(fd)
        if not path.startswith("\0"):
            try:
                os.unlink(path)
            except OSError:
                pass


if __name__ == "__main__":
    serve(sys.argv[1], sys.argv[2])
