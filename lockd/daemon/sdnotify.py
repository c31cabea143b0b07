"""sd_notify(3) without libsystemd: datagrams to $NOTIFY_SOCKET.

`notify(READY=1, STATUS="serving")` sends "READY=1\\nSTATUS=serving"; `fds` are passed
with SCM_RIGHTS (for FDSTORE=1). Without NOTIFY_SOCKET every call is a no-op.
`listening_socket(path)` is sd_listen_fds(3) for socket activation (vfs-lockd.socket).
"""

from __future__ import annotations

import array
import os
import socket
import stat


def _address() -> str | None:
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return None
    if addr[0] == "@":  # abstract namespace
        return "\0" + addr[1:]
    if addr[0] != "/":
        return None  # vsock and other forms are not supported here
    return addr


def notify(fds: list[int] | None = None, **fields: object) -> bool:
    """Send KEY=VALUE lines; True when a notification socket took them."""
    addr = _address()
    if addr is None or not fields:
        return False
    msg = "\n".join(f"{k}={v}" for k, v in fields.items()).encode()
    anc = []
    if fds:
        anc.append((socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes()))
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.sendmsg([msg], anc, 0, addr)
    except OSError:
        return False
    return True


def ready(status: str | None = None) -> bool:
    return notify(READY=1, **({"STATUS": status} if status else {}))


def status(text: str) -> bool:
    return notify(STATUS=text)


def stopping(text: str | None = None) -> bool:
    return notify(STOPPING=1, **({"STATUS": text} if text else {}))


SD_LISTEN_FDS_START = 3


def listen_fds() -> list[int]:
    """The descriptors systemd passed to this process (LISTEN_FDS, for our pid only)."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return []
    try:
        n = int(os.environ.get("LISTEN_FDS", "0") or 0)
    except ValueError:
        return []
    return list(range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + max(n, 0)))


def listening_socket(path: str) -> socket.socket | None:
    """The listening Unix stream socket bound to `path` that a socket unit passed, if any.

    The fd store's descriptors arrive the same way (recovery.systemd_fds): only a socket
    in the listening state, bound to exactly this path, is taken."""
    for fd in listen_fds():
        try:
            if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                continue
            probe = socket.socket(fileno=os.dup(fd))
        except OSError:
            continue
        with probe:
            try:
                ok = (probe.family == socket.AF_UNIX and probe.type == socket.SOCK_STREAM
                      and probe.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
                      and probe.getsockname() == path)
            except OSError:
                ok = False
        if ok:
            # Keep the number systemd gave it: nothing else may take that slot of
            # LISTEN_FDS before recovery reads the fd store's entries after it.
            os.set_inheritable(fd, False)
            return socket.socket(fileno=fd)
    return None
