"""sd_notify(3) without libsystemd: datagrams to $NOTIFY_SOCKET.

`notify(READY=1, STATUS="serving")` sends "READY=1\\nSTATUS=serving"; `fds` are passed
with SCM_RIGHTS (for FDSTORE=1). Without NOTIFY_SOCKET every call is a no-op.
"""

from __future__ import annotations

import array
import os
import socket


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
