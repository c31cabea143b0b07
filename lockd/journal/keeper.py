"""The descriptor keeper: a tiny process that holds a duplicate of every lock description.

An OFD lock belongs to the open file description, not to a process, so while the keeper
holds a duplicate, a kill -9 of the daemon drops no host lock: no host process or other
guest can take a range a guest was told it holds. The restarted daemon takes the
descriptions back (`take_all`) and continues on them.

Who talks to whom. The keeper listens on a path socket (`keeper_address`) in a directory
beside the journal that only the daemon's user may enter (0700, refused when it is
anyone else's or wider), so no other local user can bind the name first or connect to
it. Both sides also check the other's credentials (SO_PEERCRED): the keeper serves only
peers of its own uid; the daemon hands descriptions only to a keeper of its own uid (or
root), and to the very process it started when it started one. A daemon that finds
anything else there refuses (`KeeperRefused`) instead of handing over what would give
its holder read/write access to guests' files and the power to drop their locks.

Protocol: SOCK_SEQPACKET on that socket (mode 0600), one message per operation:
  b"P" key  + 1 fd (SCM_RIGHTS)   keep this description under key (replacing any)
  b"D" key                        close and forget key
  b"L"                            send every entry back: b"E" key + fd ..., then b"Z"
                                  and b"1" when complete (see b"C"), else b"0"
  b"C"                            complete: the keeper holds every description the
                                  daemon has handed to an owner (sent after recovery and
                                  after handing a restarted keeper everything)
  b"Q"                            exit (only when the daemon shuts down holding nothing)
The keeper serves one daemon at a time. It never outlives its daemon for long:

* it exits as soon as no daemon is connected and no kept description holds a lock (a
  daemon that stopped holding nothing; descriptions kept only for reuse protect nothing),
  leaving `JOURNAL-keeper-released` beside the journal when it held every description
  handed out (see b"C"), so that the next daemon knows nobody held anything;
* with locks, it waits for the daemon's restart at most `linger` seconds after the
  daemon went away (default LINGER_S, `vfs-lockd serve --keeper-linger`), then exits,
  which releases the locks (the restarted daemon, if it ever comes, reports them lost
  where someone else took them meanwhile). It does so even when the journal file is
  gone: a daemon restarted on a lost journal recovers the locks from the keeper.

Whether a description holds a lock is read from the kernel (/proc/self/fdinfo). A file
on a FUSE file system (a cluster mount) keeps its locks in the file system, not in the
kernel's list: such a description counts as holding.
"""

from __future__ import annotations

import array
import logging
import os
import select
import socket
import stat
import struct
import subprocess
import sys
import time

from lockd.engine.ofd import on_fuse

log = logging.getLogger("lockd.keeper")
MAX_MSG = 4096
LINGER_S = 300.0  # how long locks wait for a killed daemon's restart
FIRST_CONNECT_S = 30.0  # how long a new keeper waits for the daemon that started it


def _send(sock: socket.socket, data: bytes, fd: int = -1) -> None:
    if fd >= 0:
        sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])
    else:
        sock.send(data)


def _recv_one(sock: socket.socket) -> tuple[bytes, list[int]]:
    """One message; b"" at the end of the connection (also when it broke)."""
    try:
        return _recv(sock)
    except OSError:
        return b"", []


def _recv(sock: socket.socket) -> tuple[bytes, list[int]]:
    fds = array.array("i")
    msg, anc, _flags, _addr = sock.recvmsg(MAX_MSG, socket.CMSG_SPACE(4 * 8))
    for level, typ, data in anc:
        if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - len(data) % 4])
    return msg, list(fds)


class KeeperRefused(PermissionError):
    """What answers at the keeper's address is not our keeper (or its directory is not
    ours): nothing is handed to it."""


def keeper_address(journal: str) -> str:
    """The keeper's socket for a journal: `sock` in the private directory
    `.NAME.keeper` beside the journal NAME (see the module docstring)."""
    real = os.path.realpath(journal)
    head, name = os.path.split(real)
    return os.path.join(head, f".{name}.keeper", "sock")


def _private_dir(path: str) -> int:
    """An O_PATH descriptor of directory `path` (created 0700 when missing), checked to
    be ours and closed to everyone else. The socket inside is then reached through this
    descriptor (/proc/self/fd/N/NAME), so a name swapped after the check changes nothing,
    and no path length limit applies."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    try:
        fd = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except NotADirectoryError:
        raise KeeperRefused(
            f"descriptor keeper directory {path} is not a directory (a symbolic link "
            "or a file someone put there): refusing to use it; remove it") from None
    st = os.fstat(fd)
    if st.st_uid != os.geteuid() or st.st_mode & 0o077:
        os.close(fd)
        raise KeeperRefused(
            f"descriptor keeper directory {path} belongs to uid {st.st_uid} with mode "
            f"{stat.S_IMODE(st.st_mode):04o}; it must be uid {os.geteuid()}'s and 0700 "
            "(another user may have made it to receive lock descriptions): refusing to "
            "use it; remove it")
    return fd


def peer_cred(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the peer of a connected Unix socket."""
    return struct.unpack("3i", sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                               struct.calcsize("3i")))


class KeeperClient:
    """The daemon's side."""

    def __init__(self, path: str, timeout: float = 5.0, journal: str | None = None,
                 linger: float | None = None, expect_pid: int | None = None) -> None:
        """Connect to the keeper at `path`; `expect_pid`: the keeper we just started.
        Raises KeeperRefused when what answers is not a keeper we may trust."""
        self.path = path
        self.journal = journal
        self.linger = linger
        self.timeout = timeout
        dfd = _private_dir(os.path.dirname(path))
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            self.sock.settimeout(timeout)
            self.sock.connect(f"/proc/self/fd/{dfd}/{os.path.basename(path)}")
            pid, uid, _gid = peer_cred(self.sock)
            if uid not in (0, os.geteuid()) or expect_pid not in (None, pid):
                raise KeeperRefused(
                    f"the process listening at {path} (pid {pid}, uid {uid}) is not our "
                    "descriptor keeper"
                    + (f" (we started pid {expect_pid})" if expect_pid is not None else "")
                    + ": refusing to hand it lock descriptions")
        except BaseException:
            self.sock.close()
            raise
        finally:
            os.close(dfd)
        self.complete = False  # what the last take_all said (see b"C")

    def restart(self) -> None:
        """Connect again, to a new keeper if this one died (the caller hands it every
        description it holds)."""
        self.sock.close()
        if self.journal is None:
            raise OSError(f"descriptor keeper at {self.path} is gone")
        new = ensure_keeper(self.path, self.journal, self.timeout, self.linger)
        self.sock = new.sock

    def put(self, key: str, fd: int) -> None:
        _send(self.sock, b"P" + key.encode(), fd)

    def drop(self, key: str) -> None:
        _send(self.sock, b"D" + key.encode())

    def take_all(self) -> dict[str, int]:
        """Duplicates of every kept description (the keeper keeps its own); sets
        `complete`: they are every description the last daemon had handed out."""
        _send(self.sock, b"L")
        out: dict[str, int] = {}
        while True:
            msg, fds = _recv(self.sock)
            if msg[:1] == b"Z" or not msg:
                for fd in fds:
                    os.close(fd)
                self.complete = msg == b"Z1"
                return out
            if msg[:1] == b"E" and fds:
                out[msg[1:].decode()] = fds[0]
                for fd in fds[1:]:
                    os.close(fd)

    def seal(self) -> None:
        """Tell the keeper it now holds every description handed out (see b"C")."""
        _send(self.sock, b"C")

    def quit(self) -> None:
        try:
            _send(self.sock, b"Q")
        except OSError:
            pass

    def close(self) -> None:
        self.sock.close()


def ensure_keeper(path: str, journal: str, timeout: float = 5.0,
                  linger: float | None = None) -> KeeperClient:
    """Connect to the keeper at `path`, starting one (in its own session, so it outlives
    the daemon and its process group) when none answers."""
    linger = LINGER_S if linger is None else linger
    try:
        return KeeperClient(path, timeout, journal, linger)
    except (FileNotFoundError, ConnectionRefusedError):
        pass
    dfd = _private_dir(os.path.dirname(path))
    try:
        os.unlink(os.path.basename(path), dir_fd=dfd)  # a dead keeper's socket
    except FileNotFoundError:
        pass
    finally:
        os.close(dfd)
    proc = subprocess.Popen(
        [sys.executable, "-m", "lockd.journal.keeper", path, journal, str(linger)],
        start_new_session=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, close_fds=True,
    )
    deadline = time.monotonic() + timeout
    while True:
        try:
            return KeeperClient(path, timeout, journal, linger, expect_pid=proc.pid)
        except (FileNotFoundError, ConnectionRefusedError):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise OSError(f"descriptor keeper did not start at {path}") from None
            time.sleep(0.01)  # the child is binding its socket: poll for it


def _released_path(journal: str) -> str:
    return journal + "-keeper-released"


def mark_released(journal: str) -> None:
    """Leave word beside the journal that this keeper, complete, ended holding no lock:
    the next daemon then knows that every owner held nothing at the end, although it
    finds a new keeper (lockd.engine.durability, leases)."""
    try:
        fd = os.open(_released_path(journal), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.close(fd)
    except OSError as exc:
        log.warning("cannot record that the keeper ended holding nothing: %s", exc)


def take_released_mark(journal: str) -> bool:
    """Did the last keeper end complete and holding no lock? (The mark is consumed.)"""
    try:
        os.unlink(_released_path(journal))
        return True
    except FileNotFoundError:
        return False


def holds_lock(fd: int) -> bool:
    """Does the description `fd` hold a lock (see the module docstring)?"""
    try:
        with open(f"/proc/self/fdinfo/{fd}") as f:
            if "\nlock:" in f.read():
                return True
    except OSError:
        return False
    return on_fuse(fd)


def _recv_queued(sock: socket.socket) -> list[tuple[bytes, list[int]]]:
    """Every message already queued on a connection, without waiting (b"" at its end)."""
    out = []
    sock.setblocking(False)
    try:
        while True:
            try:
                msg, fds = _recv(sock)
            except BlockingIOError:
                return out
            except OSError:
                msg, fds = b"", []
            out.append((msg, fds))
            if not msg:
                return out
    finally:
        sock.setblocking(True)


def serve(path: str, journal: str, linger: float = LINGER_S) -> None:
    """The keeper process itself."""
    kept: dict[str, int] = {}
    dfd = _private_dir(os.path.dirname(path))
    name = os.path.basename(path)
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    old = os.umask(0o177)
    try:
        srv.bind(f"/proc/self/fd/{dfd}/{name}")
    finally:
        os.umask(old)
    srv.listen(4)
    client: socket.socket | None = None
    served = False
    complete = False  # a new keeper holds nothing of what was handed out before it

    def apply(msg: bytes, fds: list[int], sock: socket.socket) -> bool:
        """One message from the daemon; True when the keeper is to exit."""
        nonlocal complete
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
                _send(sock, b"E" + k.encode(), fd)
            _send(sock, b"Z1" if complete else b"Z0")
        elif op == b"C":
            complete = True
        for fd in fds:
            os.close(fd)
        return op == b"Q"

    idle_since = time.monotonic()
    try:
        while True:
            socks = [srv] + ([client] if client else [])
            ready, _, _ = select.select(socks, [], [], 1.0)
            # The connected daemon's messages come first, and a daemon replaced by a new
            # one has its queued messages applied before it is dropped: a D or Q sent just
            # before it died (or before the new one connected) is never lost.
            queued: list[tuple[bytes, list[int]]] = []
            if client is not None and (client in ready or srv in ready):
                queued = _recv_queued(client) if srv in ready else [_recv_one(client)]
            for msg, fds in queued:
                if not msg:
                    client.close()
                    client = None
                    idle_since = time.monotonic()
                    break
                if apply(msg, fds, client):
                    return
            if client is None and queued and srv not in ready:
                if not any(holds_lock(fd) for fd in kept.values()):
                    if complete:
                        mark_released(journal)
                    return  # the daemon left holding nothing: nothing to keep
            if srv in ready:
                conn, _ = srv.accept()
                # Only the daemon's own user may have the descriptions or change them;
                # anyone else is closed before a message of theirs is read.
                if peer_cred(conn)[1] != os.geteuid():
                    conn.close()
                    continue
                if client is not None:  # a new daemon replaces a dead one
                    client.close()
                client = conn
                served = True
            if client is None:
                waited = time.monotonic() - idle_since
                if not served:
                    if waited > FIRST_CONNECT_S:
                        return  # the daemon that started us never came
                elif not kept:
                    if complete:
                        mark_released(journal)
                    return  # nothing to keep
                elif waited > linger:
                    return  # the daemon is not coming back: its locks go
    finally:
        for fd in kept.values():
            os.close(fd)
        try:  # the directory stays: only the daemon's user can make one there again
            os.unlink(name, dir_fd=dfd)
        except OSError:
            pass
        os.close(dfd)


if __name__ == "__main__":
    serve(sys.argv[1], sys.argv[2], float(sys.argv[3]) if len(sys.argv) > 3 else LINGER_S)
