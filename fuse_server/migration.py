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
into the state (which only QEMU reads); the socket is created 0600 and removed once
the descriptors were collected, or the source runs again, or it goes away.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import errno
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
from dataclasses import dataclass
from typing import Any

from lockd import procfd

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
    that presents the secret. The fds are the offer's (closed with it)."""

    def __init__(self, dir_fd: int, fds: list[int], owned: set[int],
                 on_collected: Callable[[], None] | None = None,
                 run: Callable[[Callable[[], None]], threading.Event] | None = None) -> None:
        """`run`: runs the accepting loop on a thread and returns the event set when it
        ends (the back-end's parked threads: no thread start in the switch-over);
        default, a thread of its own."""
        if dir_fd < 0:
            raise MigrationError("no directory for the descriptor hand-over (no migration "
                                 "directory and no socket path)")
        self.dir_fd = dir_fd
        self.fds, self.owned = fds, owned
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
        if run is not None:
            self._done = run(self._serve)
        else:
            self._done = threading.Event()
            threading.Thread(target=self._serve_own, name="migration-offer",
                             daemon=True).start()

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
            if self._closed:
                return False
            for at in range(0, len(self.fds), FDS_PER_MESSAGE):
                part = self.fds[at:at + FDS_PER_MESSAGE]
                conn.sendmsg([CHUNK.pack(len(part))],
                             [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(part)}i", *part))])
            conn.sendall(CHUNK.pack(0))
        if _recv_exact(conn, 1) != b"K":  # the destination holds them now
            return False
        log.info("descriptor hand-over: %d descriptors collected by pid %d", len(self.fds), pid)
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
# flags. Only a guest that holds no lock and has no queued wait may move that way: a
# host lock belongs to an open file description, and a description cannot cross hosts,
# so the lock would be free between the source's release and the destination's re-take.
# Otherwise the destination refuses, QEMU fails the migration, and the source runs on.

DESCRIPTORS_ENV = "VFS_LOCKD_MIGRATION_DESCRIPTORS"  # "off": a test/admin switch
MAX_HANDLE_SZ = 128
_AT_EMPTY_PATH = 0x1000


@dataclass(frozen=True)
class PortableOptions:
    """virtiofsd's migration options, as this back-end uses them."""

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


def portable_refusal(state: dict[str, Any]) -> str | None:
    """Why the source's guest cannot move without its descriptors (None: it can): it
    holds locks or has waits queued. From the saved parts themselves."""
    locks, why = state.get("locks", {}), []
    if "client" in locks:  # central: the daemon holds them; the client knows its files
        c = locks["client"]
        if c.get("files"):
            why.append(f"{len(c['files'])} file(s) registered with the lock daemon (locked "
                       "through this guest and still open)")
        if c.get("waits"):
            why.append(f"{len(c['waits'])} queued wait(s) at the lock daemon")
    else:
        n = sum(len(f.get("descs", ())) for f in locks.get("files", ()))
        if n:
            why.append(f"{n} lock description(s) held")
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
            f"them only a guest that holds no lock and waits for none may move; this one "
            f"has {refused}: its locks would be free between the source's release and "
            "this host's re-take. Refused: the migration fails and the source runs on "
            "with everything")
    return port


def save_portable(state: dict[str, Any], fs: Any, opts: PortableOptions) -> dict[str, Any]:  # noqa: ANN401
    """The source's descriptor-free part: the refusal reason, or the inodes by path or
    handle (`fs`: the Passthrough). Computed only when the guest could use it."""
    refused = portable_refusal(state)
    if refused:
        return {"refused": refused}
    try:
        return {"refused": None, "fs": fs.save_portable(opts)}
    except OSError as exc:  # the descriptor hand-over may still work: no failure here
        return {"refused": f"inodes that could not be described ({exc})"}


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
