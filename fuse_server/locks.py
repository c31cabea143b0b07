"""Where a FUSE session's lock messages go: the lock service in this process, or the
central daemon.

Both endpoints take the same decoded messages (GETLK, SETLK, SETLKW, INTERRUPT, FLUSH,
DESTROY through `handle`, RELEASE through `released`) and give the same answers, because
both end in the one `lockd.dispatch.LockDispatcher`:

* `LocalLocks` runs the dispatcher here (embedded mode).
* `RemoteLocks` forwards the messages unchanged to `vfs-lockd serve`, whose dispatcher
  for this guest answers them; replies come back on the client's reader thread. Nothing
  but locking talks to the daemon: a file is registered there at the guest's first lock
  request on it, a FLUSH of a file never locked through this guest is answered here.

An answer is `bytes` now, or None: it comes later through `deliver` (a queued wait, every
forwarded request) or never (an INTERRUPT that needs no reply).
"""

from __future__ import annotations

import errno
import logging
import struct
from collections.abc import Callable

from lockd.api import LockService
from lockd.daemon import wire
from lockd.dispatch import LockDispatcher
from lockd.fuse import abi
from lockd.fuse.codec import CODEC, FuseMsg

log = logging.getLogger("vfs-lockd.fuse.locks")

_encode = CODEC.encode_reply
_REPLY = abi.OUT_HEADER
_UNIQUE = struct.Struct("<Q")  # fuse_in_header.unique, at offset 8

FdOf = Callable[[int], "int | None"]  # file handle -> an open fd of it
Deliver = Callable[[bytes], None]


class LocalLocks:
    """The dispatcher in this process (embedded mode)."""

    def __init__(self, service: LockService, guest: str, fd_of: FdOf, deliver: Deliver,
                 max_files: int | None = None) -> None:
        self.service = service
        self.dispatcher = LockDispatcher(service, guest, deliver, fd_of=fd_of,
                                         max_files=max_files)

    @property
    def nonblocking(self) -> bool:
        return bool(getattr(self.service, "nonblocking", False))

    def handle(self, msg: FuseMsg, buf: bytes | memoryview) -> bytes | None:
        return self.dispatcher.handle(msg)

    def released(self, msg: FuseMsg, buf: bytes | memoryview, last: bool) -> None:
        self.dispatcher.release(msg)
        if last:
            self.dispatcher.forget(msg.nodeid)

    def end(self) -> None:
        self.dispatcher.end()


class RemoteLocks:
    """Forwarding to the central daemon through a `lockd.daemon.client.LockClient`."""

    nonblocking = True  # nothing here waits for the daemon: replies come back later

    def __init__(self, client: object, fd_of: FdOf, deliver: Deliver) -> None:
        self.client = client
        self.fd_of = fd_of
        self.deliver = deliver

    def _reply(self, rid: int, status: int, payload: bytes) -> None:
        self.deliver(_REPLY.pack(_REPLY.size + len(payload), status, rid) + payload)

    def _getlk_reply(self, rid: int, status: int, payload: bytes) -> None:
        # The daemon names the holder's guest after fuse_lk_out: not for the kernel.
        self._reply(rid, status, payload[:abi.LK_OUT.size])

    def _interrupt_reply(self, rid: int, status: int, payload: bytes) -> None:
        if status:  # 0: done, no FUSE reply is due; -EAGAIN: the kernel asks again
            self._reply(rid, status, payload)

    def handle(self, msg: FuseMsg, buf: bytes | memoryview) -> bytes | None:
        op, unique, client = msg.opcode, msg.unique, self.client
        if op == abi.FLUSH:
            if not client.registered(msg.nodeid):
                return _encode(unique, 0)  # this guest never locked the inode
            # If the daemon is away for long, close() returns and the release waits.
            client.submit(bytes(buf), unique, self._reply, local=0, keep=True)
            return None
        if op == abi.INTERRUPT:
            target = msg.target
            if client.withdraw(target):  # never reached the daemon: cancelled here
                self.deliver(_encode(target, -errno.EINTR))
                return None
            if not client.pending(target):
                return _encode(unique, -errno.EAGAIN)
            client.submit(bytes(buf), unique, self._interrupt_reply, local=None)
            return None
        if op == abi.DESTROY:
            client.submit(bytes(buf), unique, self._reply, local=0, keep=True)
            return None
        if not client.registered(msg.nodeid):  # GETLK, SETLK, SETLKW
            fd = self.fd_of(msg.fh)
            if fd is None:
                return _encode(unique, -errno.EINVAL)  # a handle this guest never opened
            try:
                client.register(msg.nodeid, fd)
            except OSError as exc:
                return _encode(unique, -(exc.errno or errno.EIO))
        client.submit(bytes(buf), unique, self._getlk_reply if op == abi.GETLK else self._reply)
        return None

    def released(self, msg: FuseMsg, buf: bytes | memoryview, last: bool) -> None:
        """The guest's RELEASE is answered by the session; the daemon still has to drop
        what the handle held (delivered however long the daemon is away)."""
        client = self.client
        if not client.registered(msg.nodeid):
            return
        rid = client.new_id()
        frame = bytearray(buf)
        _UNIQUE.pack_into(frame, 8, rid)
        client.submit(bytes(frame), rid, _ignore, local=None)
        if last:
            client.unregister(msg.nodeid)

    def end(self) -> None:
        """This FUSE session is over (the guest unmounted or its device was reset):
        everything the guest had in the daemon goes, delivered however long the daemon
        is away (a later session's requests follow it in order)."""
        client = self.client
        rid = client.new_id()
        client.submit(wire.frame(wire.T_DESTROY, rid), rid, _ignore, local=None)
        for nodeid in client.registered_nodes():
            client.unregister(nodeid)


def _ignore(rid: int, status: int, payload: bytes) -> None:
    if status < 0:
        log.debug("background lock request %d: %s", rid, errno.errorcode.get(-status))
