"""Live migration of a vhost-user-fs guest between two back-ends on one host.

QEMU (8.2+, VHOST_USER_PROTOCOL_F_DEVICE_STATE) stops the source's rings, reads our
state through a pipe (SET_DEVICE_STATE_FD, direction save) and asks CHECK_DEVICE_STATE;
the destination is given the same bytes (direction load) before its rings start. Nobody
tells a back-end that the migration committed: the source learns it when QEMU closes
the connection without having started the rings again; a source whose rings start
again (failed or cancelled migration) simply runs on.

What moves (each part saved and loaded by its owner; `State` only carries them):
  device   the SETLKW chains popped from the rings and still unanswered (queue, head,
           writable segments as guest-physical addresses, FUSE unique, the request
           bytes) and replies parked on stopped rings (transports/vhost_user.py);
  session  the negotiated FUSE INIT and the per-uid open budget (session.py);
  fs       the inodes the guest knows and its open handles (passthrough.py);
  locks    embedded: each registered file's lock descriptions with their ranges, and
           the OFD bookkeeping; central (--lockd): what the destination's client needs
           to take the guest's daemon session over, locks and queued waits staying in
           the daemon (fuse_server/locks.py, lockd/daemon/client.py).

The pipe from QEMU carries bytes only. The descriptors (inodes, handles, the open file
descriptions that carry the host locks) go AS THEY ARE over a side Unix socket with
SCM_RIGHTS, so a host lock never leaves: from the save until the destination runs both
back-ends hold references, and the lock belongs to the description, not to a process.

The rendezvous socket: the source binds a fresh, random name in the migration directory
(launch.open_migration_dir: /run/vfs-lockd/migration for root, 0700, or
$VFS_LOCKD_MIGRATION_DIR; the same for every back-end of the host, whatever its socket)
and the destination connects to that name. Both reach the directory through a descriptor
opened before the sandbox ("./DIRFD/NAME" through the kept /proc/self/fd directory, like
the lock daemon's reconnects): inside the sandbox (mount + net namespace, chroot into
the share) neither a host path nor an abstract socket of the host's network namespace is
reachable, and a name inside the share would be visible to the guest. The state names
the directory by (dev, ino), so a destination with another directory (or on another
host) knows at once that it cannot collect, and takes the descriptor-free path (the end
of this module) or refuses. Whoever
connects must be our uid (SO_PEERCRED) and present the one-time secret written only
into the state (which only QEMU reads); the socket is created 0600 (by the back-end when
the migration begins, before the switch-over: it offers nothing until the save arms it)
and removed once the descriptors were collected, or the source runs again, or the
migration ends without a save, or the back-end goes away.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import errno
import fcntl
import json
import logging
import os
import socket
import struct
import threading

# hmac's constant-time comparison itself, without hmac's import of OpenSSL (hashlib): every
# back-end (one per guest) would map libcrypto and its modules for this one comparison.
from _operator import _compare_digest
from collections.abc import Callable

from lockd import procfd
from lockd.api import F_RDLCK, F_UNLCK, F_WRLCK
from lockd.structs import NamedTuple

TYPE_CHECKING = False  # `typing` stays out of the back-end (lockd/structs.py)
if TYPE_CHECKING:
    from typing import Any

log = logging.getLogger("vfs-lockd.migration")

MAGIC = b"vfs-lockd device state\n"
FORMAT = 1
SECRET_BYTES = 32
FDS_PER_MESSAGE = 200  # below the kernel's SCM_MAX_FD (253)
CHUNK = struct.Struct("<I")  # descriptors in this message; 0 ends the list
MAX_STATE = 256 << 20  # a guest decides how much state there is: bounded on load
COLLECT_TIMEOUT = 30.0  # seconds a connected destination may take per step


class MigrationError(Exception):
    """The state cannot be saved or loaded: QEMU fails the migration (the source runs on)."""


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def unb64(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"), validate=True)


class FdTable:
    """The descriptors of a saved state: each distinct fd number once (a lent inode
    descriptor is its handle's too), referred to by index in the JSON."""

    def __init__(self) -> None:
        self.fds: list[int] = []
        self._index: dict[int, int] = {}
        self.owned: set[int] = set()  # duplicates made for the state: closed with it

    def add(self, fd: int, owned: bool = False) -> int:
        i = self._index.get(fd)
        if i is None:
            i = self._index[fd] = len(self.fds)
            self.fds.append(fd)
        if owned:
            self.owned.add(fd)
        return i

    def close_owned(self) -> None:
        for fd in self.owned:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.owned.clear()


class Received:
    """The descriptors the destination collected, by index; every one not taken by a
    part's load is closed at the end (`close_rest`)."""

    def __init__(self, fds: list[int]) -> None:
        self.fds = fds
        self.taken: set[int] = set()

    def get(self, i: int) -> int:
        """The descriptor at index i (shared: several parts may use one)."""
        if not 0 <= i < len(self.fds):
            raise MigrationError(f"descriptor index {i} out of range ({len(self.fds)})")
        return self.fds[i]

    def take(self, i: int) -> int:
        """The descriptor at index i, now the caller's to keep or close."""
        fd = self.get(i)
        self.taken.add(i)
        return fd

    def dup(self, i: int) -> int:
        return os.dup(self.get(i))

    def close_rest(self) -> None:
        for i, fd in enumerate(self.fds):
            if i not in self.taken:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.taken = set(range(len(self.fds)))


def encode(state: dict[str, Any]) -> bytes:
    return MAGIC + json.dumps(state, separators=(",", ":")).encode()


def decode(data: bytes) -> dict[str, Any]:
    if not data.startswith(MAGIC):
        raise MigrationError("not a vfs-lockd device state (QEMU's source back-end is "
                             "another kind: cross-back-end migration is not supported)")
    try:
        state = json.loads(data[len(MAGIC):])
    except ValueError as exc:
        raise MigrationError(f"device state unreadable: {exc}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise MigrationError(f"device state format {state.get('format')!r}, "
                             f"this back-end reads {FORMAT}")
    return state


# ------------------------------------------------------------------ the rendezvous
class Offer:
    """The source's side: a listening socket handing `fds` to the one peer of our uid
    that presents the secret. The fds are the offer's (closed with it). It may be made
    before the state is saved (bound and listening while QEMU still copies RAM, off the
    switch-over) and armed with the descriptors by the save (`arm`); until then it
    gives nothing to anyone."""

    def __init__(self, dir_fd: int, fds: list[int] | None = None, owned: set[int] | None = None,
                 on_collected: Callable[[], None] | None = None,
                 run: Callable[[Callable[[], None]], threading.Event] | None = None) -> None:
        """`run`: runs the accepting loop on a thread and returns the event set when it
        ends (the back-end's parked threads: no thread start in the switch-over);
        default, a thread of its own."""
        if dir_fd < 0:
            raise MigrationError("no directory for the descriptor hand-over (no migration "
                                 "directory and no socket path)")
        self.dir_fd = dir_fd
        self.fds: list[int] = []
        self.owned: set[int] = set()
        self.armed = False
        self.secret = os.urandom(SECRET_BYTES)
        self.name = f".vfs-lockd-migration-{os.getpid()}-{os.urandom(8).hex()}"
        self.collected = threading.Event()
        self._on_collected = on_collected
        self._closed = False
        self._mu = threading.Lock()
        st = os.fstat(dir_fd)
        self.dir_key = (st.st_dev, st.st_ino)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        old = os.umask(0o177)
        try:
            self.sock.bind(f"{procfd.path(dir_fd)}/{self.name}")
        except OSError as exc:
            self.sock.close()
            raise MigrationError(f"binding the hand-over socket: {exc}") from None
        finally:
            os.umask(old)
        self.ino = os.stat(self.name, dir_fd=dir_fd, follow_symlinks=False).st_ino
        self.sock.listen(4)
        self._server: threading.Thread | None = None
        if fds is not None:
            self.arm(fds, owned if owned is not None else set())
        try:
            if run is not None:
                self._done = run(self._serve)
            else:
                self._done = threading.Event()
                threading.Thread(target=self._serve_own, name="migration-offer",
                                 daemon=True).start()
        except BaseException:
            self._done = threading.Event()
            self._done.set()  # no loop to wait for
            self.owned = set()  # a failed construction leaves the fds the caller's
            self.close()
            raise

    def arm(self, fds: list[int], owned: set[int]) -> None:
        """Offer `fds` from now on (they are the offer's then: closed with it). Raises
        MigrationError if the offer was closed or armed already (the caller keeps them)."""
        with self._mu:
            if self._closed or self.armed:
                raise MigrationError("the descriptor hand-over socket is " + (
                    "closed" if self._closed else "already offering descriptors"))
            self.fds, self.owned, self.armed = fds, owned, True

    def describe(self) -> dict[str, Any]:
        return {"dir": list(self.dir_key), "name": self.name, "secret": self.secret.hex(),
                "nfds": len(self.fds)}

    def _serve_own(self) -> None:
        try:
            self._serve()
        finally:
            self._done.set()

    def _serve(self) -> None:
        self._server = threading.current_thread()
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return  # closed
            try:
                with conn:
                    if self._give(conn):
                        self.collected.set()
                        if self._on_collected is not None:
                            self._on_collected()
                        self._unlink()
                        return
            except OSError as exc:
                log.warning("descriptor hand-over: %s", exc)

    def _give(self, conn: socket.socket) -> bool:
        conn.settimeout(COLLECT_TIMEOUT)
        pid, uid, _ = struct.unpack("3i", conn.getsockopt(
            socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
        if uid != os.geteuid():
            log.warning("descriptor hand-over: refused pid %d of uid %d (not ours)", pid, uid)
            return False
        got = _recv_exact(conn, SECRET_BYTES)
        if not _compare_digest(got, self.secret):
            log.warning("descriptor hand-over: pid %d presented a wrong secret", pid)
            return False
        with self._mu:
            if self._closed or not self.armed:
                log.warning("descriptor hand-over: pid %d came before the state was saved", pid)
                return False
            n = len(self.fds)
            for at in range(0, max(n, 1), FDS_PER_MESSAGE):
                part = self.fds[at:at + FDS_PER_MESSAGE]
                # The list's end (a 0 count) rides with the last part: the destination
                # reads it without waiting for another send of ours.
                last = at + FDS_PER_MESSAGE >= n
                data = CHUNK.pack(len(part)) + (CHUNK.pack(0) if last and part else b"")
                if part:
                    conn.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                           struct.pack(f"{len(part)}i", *part))])
                else:
                    conn.sendall(data)
        if _recv_exact(conn, 1) != b"K":  # the destination holds them now
            return False
        # (debug: the source is still busy in QEMU's switch-over; the destination logs it)
        log.debug("descriptor hand-over: %d descriptors collected by pid %d", n, pid)
        return True

    def _unlink(self) -> None:
        with contextlib.suppress(OSError):
            if os.stat(self.name, dir_fd=self.dir_fd, follow_symlinks=False).st_ino == self.ino:
                os.unlink(self.name, dir_fd=self.dir_fd)

    def close(self) -> None:
        """Withdraw the offer (collected or not) and close our duplicates."""
        with self._mu:
            if self._closed:
                return
            self._closed = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self._unlink()
        if self._server is not threading.current_thread():
            self._done.wait(COLLECT_TIMEOUT)
        for fd in self.owned:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.owned = set()


def collect(info: dict[str, Any], dir_fd: int) -> list[int]:
    """The destination's side: the source's descriptors, in order."""
    if dir_fd < 0:
        raise MigrationError("no directory for the descriptor hand-over (no migration "
                             "directory and no socket path)")
    st = os.fstat(dir_fd)
    if [st.st_dev, st.st_ino] != list(info["dir"]):
        raise MigrationError("the source's hand-over socket is in another directory (another "
                             "host, or another $VFS_LOCKD_MIGRATION_DIR): descriptors cannot "
                             "move")
    name = str(info["name"])
    if "/" in name or not name.startswith(".vfs-lockd-migration-"):
        raise MigrationError(f"bad hand-over socket name {name!r}")
    want = int(info["nfds"])
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    fds: list[int] = []
    try:
        sock.settimeout(COLLECT_TIMEOUT)
        try:
            sock.connect(f"{procfd.path(dir_fd)}/{name}")
        except OSError as exc:
            raise MigrationError(f"the source's hand-over socket: {exc.strerror or exc} (is "
                                 "the source on this host and still waiting?)") from None
        sock.sendall(bytes.fromhex(info["secret"]))
        while True:
            data, anc, flags, _ = sock.recvmsg(CHUNK.size, socket.CMSG_SPACE(FDS_PER_MESSAGE * 4),
                                               socket.MSG_CMSG_CLOEXEC)
            for level, type_, cdata in anc:
                if level == socket.SOL_SOCKET and type_ == socket.SCM_RIGHTS:
                    n = len(cdata) // 4
                    fds.extend(struct.unpack(f"{n}i", cdata[:4 * n]))
            if len(data) < CHUNK.size:
                data += _recv_exact(sock, CHUNK.size - len(data))
            if flags & socket.MSG_CTRUNC:
                raise MigrationError("descriptor hand-over truncated (descriptor limit?)")
            if CHUNK.unpack(data)[0] == 0:
                break
        if len(fds) != want:
            raise MigrationError(f"descriptor hand-over: {len(fds)} received, {want} expected")
        sock.sendall(b"K")
    except BaseException:
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        raise
    finally:
        sock.close()
    return fds


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        b = sock.recv(n - len(out))
        if not b:
            raise OSError(errno.ECONNRESET, "peer closed the hand-over connection")
        out += b
    return out


# ------------------------------------------------ the state without descriptors
# A destination that cannot collect the source's descriptors (another host: its
# migration directory is another directory; a snapshot; descriptor passing switched
# off) opens the guest's inodes again itself: by the path relative to the share
# (find-paths) or by file handle (file-handles), and reopens the open handles with their
# flags. A host lock belongs to an open file description, and a description cannot cross
# hosts: a lock can only be taken again there. Shared locks (POSIX/OFD read locks,
# flock LOCK_SH) are compatible with the source's own, so the destination takes the same
# ones on its own mount while the source still holds them (`retake_shared`, before the
# load is answered): the two hosts hold them together for a moment, and the source lets
# go only when it ends after the migration. A write lock, a LOCK_EX or a queued wait
# cannot be held by both hosts at once: such a guest is refused (the destination refuses,
# QEMU fails the migration, and the source runs on with everything).

DESCRIPTORS_ENV = "VFS_LOCKD_MIGRATION_DESCRIPTORS"  # "off": a test/admin switch
MAX_HANDLE_SZ = 128
_AT_EMPTY_PATH = 0x1000


class PortableOptions(NamedTuple):
    """virtiofsd's migration options, as this back-end uses them. (No dataclasses in the
    back-end's modules: that import costs each back-end ~1 MiB.)"""

    mode: str = "find-paths"  # or "file-handles" (source side)
    on_error: str = "abort"  # or "guest-error" (destination side)
    verify_handles: bool = False  # find-paths: file handles attached and compared
    confirm_paths: bool = False  # find-paths: each path checked at the switch-over

    @classmethod
    def of(cls, o: Any) -> PortableOptions:  # noqa: ANN401 - a virtiofsd_options.Options
        return cls(o.migration_mode, o.migration_on_error, o.migration_verify_handles,
                   o.migration_confirm_paths)


def descriptors_disabled() -> bool:
    """$VFS_LOCKD_MIGRATION_DESCRIPTORS=off: a destination never collects descriptors
    (what a destination on another host sees; for tests and for admins who want a
    migration to behave as across hosts)."""
    return os.environ.get(DESCRIPTORS_ENV, "").lower() in ("off", "0", "no")


def _exclusive(desc: list) -> bool:
    """Does a saved lock description ([kind, owner, fd index, ranges, pid]) hold a write
    lock (POSIX/OFD F_WRLCK, flock LOCK_EX)? Anything but a read lock counts."""
    return any(int(r[2]) != F_RDLCK for r in desc[3])


def shared_locks(state: dict[str, Any]) -> int:
    """How many lock descriptions (each an owner's on a file, or a handle's flock) an
    embedded source's guest holds, all shared (portable_refusal refuses the rest)."""
    locks = state.get("locks", {})
    return 0 if "client" in locks else sum(len(f.get("descs", ()))
                                           for f in locks.get("files", ()))


def portable_refusal(state: dict[str, Any]) -> str | None:
    """Why the source's guest cannot move without its descriptors (None: it can): it
    holds a write lock or LOCK_EX, or has waits queued, or (central) has any lock at the
    daemon. From the saved parts themselves."""
    locks, why = state.get("locks", {}), []
    if "client" in locks:  # central: the daemon holds them; the client knows its files
        c = locks["client"]
        if c.get("files"):
            why.append(f"{len(c['files'])} file(s) registered with the lock daemon (locked "
                       "through this guest and still open; with --lockd only a guest "
                       "holding no lock moves)")
        if c.get("waits"):
            why.append(f"{len(c['waits'])} queued wait(s) at the lock daemon")
    else:
        n = sum(_exclusive(d) for f in locks.get("files", ()) for d in f.get("descs", ()))
        if n:
            why.append(f"{n} lock description(s) held with a write lock or LOCK_EX (only "
                       "read locks and LOCK_SH flocks can be held by both hosts at once)")
    waits = len(state.get("device", {}).get("waits", ()))
    if waits and "client" not in locks:
        why.append(f"{waits} queued wait(s)")
    return "; ".join(why) or None


def receive(state: dict[str, Any], dir_fd: int) -> tuple[Received | None, str]:
    """The source's descriptors, or (None, why they cannot come)."""
    if descriptors_disabled():
        return None, f"descriptor passing is switched off (${DESCRIPTORS_ENV})"
    try:
        return Received(collect(state["rendezvous"], dir_fd)), ""
    except (MigrationError, OSError) as exc:
        return None, str(exc)


def check_portable(state: dict[str, Any], why_no_fds: str) -> dict[str, Any]:
    """The descriptor-free part of `state`, if the guest may move that way; else
    MigrationError naming both reasons (the source runs on with everything)."""
    port = state.get("portable")
    refused = port.get("refused") if isinstance(port, dict) else \
        "the source saved no descriptor-free state"
    if refused:
        raise MigrationError(
            f"the source's descriptors cannot be collected ({why_no_fds}), and without "
            f"them only a guest that holds no lock, or only shared ones, and waits for "
            f"none may move; this one has {refused}: its locks would be free between the "
            "source's release and this host's re-take. Refused: the migration fails and "
            "the source runs on with everything")
    return port


def save_portable(state: dict[str, Any], fs: Any, opts: PortableOptions) -> dict[str, Any]:  # noqa: ANN401
    """The source's descriptor-free part: the refusal reason, or the inodes by path or
    handle (`fs`: the Passthrough). Computed only when the guest could use it."""
    refused = portable_refusal(state)
    if refused:
        return {"refused": refused}
    try:
        port = {"refused": None, "fs": fs.save_portable(opts)}
        if shared_locks(state):
            port["locked"] = _identities(state, fs)
        return port
    except OSError as exc:  # the descriptor hand-over may still work: no failure here
        return {"refused": f"inodes that could not be described ({exc})"}


def _identity(fd: int) -> dict[str, Any]:
    """What tells a file apart on any host of a cluster file system: its file handle
    where the file system gives one (CephFS, NFS, GlusterFS), and its inode number."""
    try:
        handle: str | None = file_handle(fd)
    except OSError:
        handle = None
    return {"handle": handle, "ino": os.fstat(fd).st_ino}


def _identities(state: dict[str, Any], fs: Any) -> dict[str, Any]:  # noqa: ANN401
    """Per locked inode, its identity: the destination takes the locks again only on
    the very file the source locked (a file replaced under its path since is refused,
    whatever --migration-verify-handles says)."""
    out = {}
    for f in state["locks"]["files"]:
        if not f.get("descs"):
            continue
        fd = fs.any_fd(int(f["nodeid"]))
        if fd is None:
            raise OSError(errno.EBADF, f"locked inode {f['nodeid']} has no open handle")
        out[str(f["nodeid"])] = _identity(fd)
    return out


class Retaken:
    """One lock description taken again on this host: the source's (kind, owner) on
    inode `nodeid`, now on our own description `fd` (open until adopted or closed)."""

    __slots__ = ("nodeid", "kind", "owner", "fd", "ranges", "pid")

    def __init__(self, nodeid: int, kind: str, owner: int, fd: int,
                 ranges: list[tuple[int, int, int]], pid: int) -> None:
        self.nodeid = nodeid
        self.kind = kind  # lockd.engine.state POSIX or FLOCK
        self.owner = owner  # the POSIX/OFD lock owner, or the flock's file handle
        self.fd = fd
        self.ranges = ranges
        self.pid = pid

    def __repr__(self) -> str:
        return (f"Retaken(nodeid={self.nodeid}, kind={self.kind!r}, owner={self.owner:#x}, "
                f"fd={self.fd}, ranges={self.ranges!r}, pid={self.pid})")


def close_retaken(taken: list[Retaken]) -> None:
    """Close descriptions not adopted: their host locks go with them (only we had them)."""
    for t in taken:
        if t.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(t.fd)
            t.fd = -1


def retake_shared(locks: dict[str, Any], port: dict[str, Any], fs: Any) -> list[Retaken]:  # noqa: ANN401
    """The destination's side: the source's shared locks, taken again on this host's own
    mount, each on a fresh description of the file, without waiting (F_OFD_SETLK,
    LOCK_SH|LOCK_NB). They are compatible with the source's, which still holds them, so
    at no instant are the ranges free. Any failure (the file is not the one locked there,
    not found here, a conflicting lock: EAGAIN) closes what was taken (releasing it) and
    raises MigrationError: the migration fails and the source runs on with its locks."""
    from lockd.engine import ofd
    from lockd.engine.state import FLOCK, POSIX

    idents = port.get("locked") or {}
    taken: list[Retaken] = []
    try:
        for f in locks.get("files", ()):
            descs = f.get("descs") or ()
            if not descs:
                continue
            nodeid = int(f["nodeid"])
            fd = fs.any_fd(nodeid)
            if fd is None:
                raise MigrationError(f"the guest holds locks on inode {nodeid}, which was "
                                     "not found again here")
            _same_file(nodeid, idents.get(str(nodeid)), fd)
            for kind, owner, _i, ranges, pid in descs:
                rs = sorted((int(s), int(e), int(t)) for s, e, t in ranges)
                if kind not in (POSIX, FLOCK) or not rs or \
                        any(t != F_RDLCK or not 0 <= s <= e for s, e, t in rs):
                    raise MigrationError(f"inode {nodeid}: a {kind} lock description of "
                                         f"owner {int(owner):#x} that is not shared: {rs}")
                t = Retaken(nodeid, kind, int(owner), _open_description(fd), rs, int(pid))
                taken.append(t)
                for s, e, _t in rs if kind == POSIX else ():
                    # In a live migration the source holds the range now: a write lock
                    # must conflict. Free means nobody holds it (a state restored after
                    # its source ended, a source that lost it): it was free meanwhile.
                    held = ofd.getlk(t.fd, F_WRLCK, s, e)
                    if isinstance(held, int) or held[0] == F_UNLCK:
                        raise MigrationError(
                            f"the guest's read lock [{s}, {e}] of owner {t.owner:#x} on inode "
                            f"{nodeid} is held by no one (" + (
                                os.strerror(held) if isinstance(held, int) else
                                "the source does not hold it any more: a state restored "
                                "after its source ended?") + "): it was free meanwhile")
                    err = ofd.setlk(t.fd, F_RDLCK, s, e)
                    if err:
                        raise MigrationError(
                            f"taking the guest's read lock [{s}, {e}] of owner {t.owner:#x} "
                            f"on inode {nodeid} again on this host: {errno.errorcode.get(err, err)} "
                            f"({os.strerror(err)}: another host's conflicting lock)")
                if kind == FLOCK:
                    err = ofd.flock(t.fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                    if err:
                        raise MigrationError(
                            f"taking the guest's LOCK_SH flock of handle {t.owner} on inode "
                            f"{nodeid} again on this host: {errno.errorcode.get(err, err)} "
                            f"({os.strerror(err)})")
    except BaseException as exc:
        close_retaken(taken)
        if isinstance(exc, OSError):
            raise MigrationError(f"taking the guest's shared locks again here: {exc}") from None
        raise
    return taken


def _same_file(nodeid: int, ident: dict[str, Any] | None, fd: int) -> None:
    """MigrationError unless `fd` is the file the source locked (same file handle, or
    without handles on either side, same inode number)."""
    if ident is None:
        raise MigrationError(f"the source did not say which file inode {nodeid} is")
    here = _identity(fd)
    if ident.get("handle") and here["handle"]:
        same = here["handle"] == ident["handle"]
    else:
        same = here["ino"] == int(ident["ino"])
    if not same:
        raise MigrationError(f"inode {nodeid} is not the file the guest locked on the source "
                             "(replaced or moved since the save): its locks cannot be taken "
                             "again here")


def _open_description(fd: int) -> int:
    """A description of our own of the file open at `fd`: read-write where the host
    allows it (a later upgrade to a write lock needs it), else read-only."""
    path = procfd.path(fd)
    flags = os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK
    try:
        return os.open(path, os.O_RDWR | flags)
    except OSError as exc:
        if exc.errno not in (errno.EACCES, errno.EROFS, errno.ETXTBSY, errno.EPERM):
            raise
    return os.open(path, os.O_RDONLY | flags)


# file handles (name_to_handle_at(2), open_by_handle_at(2)); ctypes, as passthrough.py
_libc = ctypes.CDLL(None, use_errno=True)
_libc.name_to_handle_at.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p,
                                    ctypes.POINTER(ctypes.c_int), ctypes.c_int]
_libc.open_by_handle_at.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
_FH_HEAD = struct.Struct("=Ii")  # struct file_handle {u32 handle_bytes; int handle_type}


def file_handle(fd: int) -> str:
    """The file handle of what `fd` (O_PATH is fine) refers to, as hex: type + bytes."""
    buf = ctypes.create_string_buffer(_FH_HEAD.size + MAX_HANDLE_SZ)
    _FH_HEAD.pack_into(buf, 0, MAX_HANDLE_SZ, 0)
    mount_id = ctypes.c_int()
    if _libc.name_to_handle_at(fd, b"", buf, ctypes.byref(mount_id), _AT_EMPTY_PATH) < 0:
        e = ctypes.get_errno()
        raise OSError(e, f"name_to_handle_at: {os.strerror(e)}")
    n, kind = _FH_HEAD.unpack_from(buf, 0)
    return _FH_HEAD.pack(n, kind).hex() + buf.raw[_FH_HEAD.size:_FH_HEAD.size + n].hex()


def open_handle(mount_fd: int, handle: str, flags: int) -> int:
    """open_by_handle_at(mount_fd, handle, flags) (CAP_DAC_READ_SEARCH)."""
    raw = bytes.fromhex(handle)
    n, _ = _FH_HEAD.unpack_from(raw, 0)
    if n > MAX_HANDLE_SZ or len(raw) != _FH_HEAD.size + n:
        raise OSError(errno.EINVAL, "malformed file handle")
    buf = ctypes.create_string_buffer(raw, len(raw))
    fd = _libc.open_by_handle_at(mount_fd, buf, flags | os.O_CLOEXEC)
    if fd < 0:
        e = ctypes.get_errno()
        raise OSError(e, f"open_by_handle_at: {os.strerror(e)}")
    return fd
