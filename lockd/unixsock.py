"""A listening Unix socket that appears at its path only once it accepts connections.

bind(2) makes the path, listen(2) makes it accept: a client that starts when the path
appears (QEMU or a script waiting for the file, a lock client) would otherwise find
ECONNREFUSED in between. So the socket is bound under a temporary name in the same
directory, given its mode (and group), put to listening, and only then renamed onto
`path` (rename(2) is atomic and replaces a stale socket there). Where the temporary name
would not fit in sun_path, the socket is bound at `path` itself (the window stays).
"""

from __future__ import annotations

import os
import socket

_SUN_PATH = 107  # sun_path's 108 bytes, the last one a NUL


def listen_at(path: str, mode: int, backlog: int, gid: int | None = None) -> socket.socket:
    """A SOCK_STREAM socket listening at `path` with `mode` (and group `gid`), created
    with that mode from the start (no moment where it is wider)."""
    head, tail = os.path.split(path)
    tmp = os.path.join(head, f".{tail[:8]}.{os.urandom(4).hex()}~")  # not secrets: it maps OpenSSL
    if len(os.fsencode(tmp)) > _SUN_PATH:
        tmp = path
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        old = os.umask(0o777 & ~mode)
        try:
            sock.bind(tmp)
        finally:
            os.umask(old)
        try:
            if gid is not None:
                os.chown(tmp, -1, gid)
            os.chmod(tmp, mode)
            sock.listen(backlog)
            if tmp != path:
                os.rename(tmp, path)
        except BaseException:
            if tmp != path:
                os.unlink(tmp)
            raise
    except BaseException:
        sock.close()
        raise
    return sock
