"""Where a FUSE session's lock messages go: the lock service in this process, or the
central daemon.

Both endpoints take the same messages, each the one `lockd.dispatch.LockRequest` the
session built (GETLK, SETLK, SETLKW, FLUSH, DESTROY through `handle`, INTERRUPT through
`interrupt` with the session's fact about its target, RELEASE through `released`), and
give the same answers, because both end in the one
`lockd.dispatch.LockDispatcher`, which makes the decisions about a message (that its
handle is one of its inode; what an INTERRUPT gets is `lockd.dispatch.interrupt_reply`,
the one rule, given each place's facts); the endpoints carry them, except what only the
guest's server can know (RemoteLocks: the handle check, the daemon does not know the
handles; the facts about an INTERRUPT's target that is not at the daemon):

* `LocalLocks` runs the dispatcher here (embedded mode).
* `RemoteLocks` forwards the messages unchanged (the request's `frame`, the one copy of
  the bytes as they came, made only here) to `vfs-lockd serve`, whose dispatcher for this
  guest answers them; its FUSE replies come back on the client's reader thread and go to
  the guest as they are. Nothing but locking talks to the daemon: a file is registered
  there at the guest's first lock request on it, a FLUSH of a file never locked through
  this guest is answered here. A file the daemon delegates to this guest (the only one
  using it) is decided by a dispatcher here, on a manager of this process, until it is
  handed back (lockd/daemon/delegation.py).

Which of the two a session uses is its maker's choice, passed in (`Session(locks=)`):
whoever made the lock service knows what it is; the session does not guess.

An answer is `bytes` now, or None: it comes later through `deliver` (a queued wait, every
forwarded request) or never (an INTERRUPT that needs no reply).
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from collections.abc import Callable

from lockd.api import LockService
from lockd.daemon import delegation, wire
from lockd.dispatch import LockDispatcher, LockRequest, handle_fd, interrupt_reply
from lockd.fuse import abi
from lockd.fuse.codec import CODEC

log = logging.getLogger("vfs-lockd.fuse.locks")

_encode = CODEC.encode_reply
_REPLY = abi.OUT_HEADER

FdOf = Callable[[int, int], "int | None"]  # (file handle, nodeid) -> its fd (handle_fd)
Deliver = Callable[[bytes], None]
Held = Callable[[int], bool]  # is this request's reply held back by the session?


def _never(target: int) -> bool:
    return False


class LocalLocks:
    """The dispatcher in this process (embedded mode)."""

    def __init__(self, service: LockService, guest: str, fd_of: FdOf, deliver: Deliver) -> None:
        """`service` lives in this process: the central daemon's client needs
        RemoteLocks (refused here, TypeError, rather than served as if local)."""
        if getattr(service, "forwards", False):
            raise TypeError("a client of the central daemon is served by RemoteLocks")
        self.service = service
        limits = getattr(service, "limits", None)
        self.dispatcher = LockDispatcher(service, guest, deliver, fd_of=fd_of,
                                         max_files=getattr(limits, "max_files", None))

    @property
    def nonblocking(self) -> bool:
        return bool(getattr(self.service, "nonblocking", False))

    def handle(self, req: LockRequest) -> bytes | None:
        return self.dispatcher.handle(req)

    def interrupt(self, req: LockRequest, held: Held = _never) -> bytes | None:
        """An INTERRUPT; `held(target)`: the session holds the target's reply back."""
        return self.dispatcher.interrupt(req, None, held)

    def released(self, req: LockRequest, inode: object) -> None:
        self.dispatcher.release(req)
        # Only if no handle of the inode was opened meanwhile (asked under the
        # dispatcher's lock, which registering takes too).
        self.dispatcher.forget(req.nodeid, unless=lambda: inode.nopen > 0)  # type: ignore[attr-defined]

    def end(self) -> None:
        self.dispatcher.end()

    # ---- live migration (fuse_server/migration.py) ----
    keeps_waits = False  # a saved source withdraws its waits; they are queued again

    def migration_cancelled(self) -> None:
        pass  # the transport queues the withdrawn waits again

    def start_after_migration(self) -> None:
        pass  # owned since the load
    def suspend(self, unique: int) -> None:
        """Withdraw the wait `unique` (its chain stays in flight, its EINTR is dropped
        by the transport): a saved source changes no lock any more."""
        d = self.dispatcher
        d.service.cancel_tag(d.guest, unique)

    def save_state(self, table) -> dict:  # noqa: ANN001 - a migration.FdTable
        """Per registered file: its lock descriptions (duplicates, into `table`) with
        their ranges, and the OFD bookkeeping (owner, fh)."""
        d = self.dispatcher
        files = []
        for nodeid, ref in d.files():
            descs = [[kind, owner, table.add(fd, owned=True), [list(r) for r in ranges], pid]
                     for kind, owner, fd, ranges, pid in self.service.held(d.guest, ref)]
            with d._lock:
                owners = [[o, fh] for (o, n), fhs in d._owner_fhs.items() if n == nodeid
                          for fh in fhs]
            files.append({"nodeid": nodeid, "descs": descs, "owners": owners})
        return {"files": files}

    def load_state(self, st: dict, rx, fs) -> None:  # noqa: ANN001 - Received, Passthrough
        """Register each file and adopt its descriptions: the host locks are theirs
        already (the source holds the same descriptions until it goes)."""
        d = self.dispatcher
        for f in st["files"]:
            nodeid = int(f["nodeid"])
            fd = fs.any_fd(nodeid)
            if fd is None:
                raise OSError(errno.EINVAL, f"locks on inode {nodeid} without an open handle")
            ref = d.register(nodeid, fd)
            for kind, owner, i, ranges, pid in f["descs"]:
                rc = self.service.adopt(d.guest, ref, kind, int(owner), rx.take(i),
                                        [tuple(r) for r in ranges], int(pid))
                if rc:
                    raise OSError(rc, f"adopting the locks of owner {owner:#x} on inode {nodeid}")
            d.adopt_owners(nodeid, [(int(o), int(fh)) for o, fh in f["owners"]])

    def load_portable(self, st: dict, port: dict, fs) -> int:  # noqa: ANN001 - a Passthrough
        """Without the source's descriptions (another host): take the guest's shared
        locks again on descriptions of our own (migration.retake_shared; MigrationError
        if any cannot be), then adopt them as the one-host load adopts the source's, so
        the owners, ranges, flocks per handle and the OFD bookkeeping are the source's.
        Returns how many descriptions were taken. On an error the caller ends the
        session, which releases what was adopted."""
        from fuse_server import migration as M

        taken = M.retake_shared(st, port, fs)
        d = self.dispatcher
        try:
            refs = {}
            for t in taken:
                ref = refs.get(t.nodeid)
                if ref is None:
                    ref = refs[t.nodeid] = d.register(t.nodeid, fs.any_fd(t.nodeid))
                fd, t.fd = t.fd, -1
                rc = self.service.adopt(d.guest, ref, t.kind, t.owner, fd, t.ranges, t.pid)
                if rc:
                    raise OSError(rc, f"adopting the re-taken locks of owner {t.owner:#x} "
                                  f"on inode {t.nodeid}")
        finally:
            M.close_retaken(taken)
        for f in st["files"]:
            if f.get("descs"):
                d.adopt_owners(int(f["nodeid"]), [(int(o), int(fh)) for o, fh in f["owners"]])
        return len(taken)

    def abandon(self) -> None:
        """Give up every lock of the guest WITHOUT unlocking (the other back-end of a
        migration holds the same descriptions): close our references only."""
        d = self.dispatcher
        for _nodeid, ref in d.files():
            try:
                entries = self.service.hand_over(d.guest, ref)
            except ValueError:  # a wait there: withdrawn first
                log.warning("guest %r still waits on a file being abandoned", d.guest)
                continue
            for entry in entries:
                os.close(entry[2])


class RemoteLocks:
    """Forwarding to the central daemon through a `lockd.daemon.client.LockClient`, and
    deciding delegated files here."""

    nonblocking = True  # nothing here waits for the daemon: replies come back later

    def __init__(self, client: object, guest: str, fd_of: FdOf, deliver: Deliver) -> None:
        """`client` forwards the daemon's FUSE replies as they are: one that asked for
        GETLK holder names (a tool's) is refused, TypeError (its GETLK replies are not
        FUSE replies)."""
        if getattr(client, "holder_names", False):
            raise TypeError("a FUSE server's daemon client must not ask for holder names")
        self.client = client
        self.fd_of = fd_of
        self.deliver = deliver
        self.local: LockDispatcher | None = None
        # Whether an inode is decided here is the client's record (`client.delegated`),
        # set on its reader thread when the FILE reply grants it, so that a RECALL read
        # right after always finds it. _mu serialises what goes to the daemon about an
        # inode against the decision that the guest no longer has it open (then it is
        # unregistered), and a delegated inode's requests against handing it back.
        # Never held while waiting for the daemon.
        self._mu = threading.Lock()
        if getattr(client, "delegation", False):
            from lockd.api import Limits
            from lockd.engine.manager import LockManager

            limits = Limits(**{k: v for k, v in client.info.get("limits", {}).items()
                               if k in Limits._fields})
            # Given each message's descriptor, checked here already (handle).
            self.local = LockDispatcher(LockManager(limits), guest, deliver,
                                        max_files=limits.max_files)
            client.on_recall = self.give_back
            client.on_registered = self._registered
            client.on_evicted = self._evicted

    # The daemon's answers to forwarded messages come whole (submitted `whole`): the
    # daemon's dispatcher wrote them as FUSE replies, and they go to the guest as they are
    # (GETLK's too: this client did not ask for holder names).
    def _answer(self, rid: int, status: int, frame: bytes) -> None:
        self.deliver(frame)

    def _interrupt_answer(self, rid: int, status: int, frame: bytes) -> None:
        # The dispatcher's answer; "no reply" travels as status 0 (every frame gets one).
        if status:
            self.deliver(frame)

    def _reply(self, rid: int, status: int, payload: bytes) -> None:
        """A wait adopted from a migration's source: its answer, made a FUSE reply."""
        self.deliver(_REPLY.pack(_REPLY.size + len(payload), status, rid) + payload)

    def handle(self, req: LockRequest) -> bytes | None:
        op, unique, client = req.opcode, req.unique, self.client
        if op == abi.INTERRUPT:
            return self.interrupt(req)
        if op == abi.DESTROY:
            client.submit(req.frame, unique, self._answer, local=0, keep=True, whole=True)
            return None
        # The handle's rule (EINVAL), checked once on this path: the daemon cannot, it
        # does not know our handles; a delegated file's dispatcher is given the fd.
        fd = handle_fd(self.fd_of, req)
        nodeid = req.nodeid
        while True:
            if op != abi.FLUSH and not client.registered(nodeid):  # GETLK, SETLK, SETLKW
                try:
                    client.register(nodeid, fd)  # a round trip: outside our lock
                except OSError as exc:
                    return _encode(unique, -(exc.errno or errno.EIO))
            with self._mu:
                if client.delegated(nodeid):
                    reply = self._decide_here(req, fd)
                    if reply is not None:
                        return reply
                if op == abi.FLUSH:
                    if not client.registered(nodeid):
                        return _encode(unique, 0)  # this guest never locked the inode
                    # If the daemon is away for long, close() returns, the release waits.
                    client.submit(req.frame, unique, self._answer, local=0, keep=True,
                                  whole=True)
                    return None
                if client.registered(nodeid):  # not given up by a RELEASE meanwhile
                    client.submit(req.frame, unique, self._answer, whole=True)
                    return None

    def interrupt(self, req: LockRequest, held: Held = _never) -> bytes | None:
        """An INTERRUPT, answered by the one rule (`interrupt_reply`) with what only this
        server knows: a target that never reached the daemon is withdrawn here (EINTR);
        `held(target)`: the session holds its reply back; one in our queue, sent, is the
        daemon's to decide (by the same rule). One not (yet) in our queue gets EAGAIN
        here, not from the daemon: it may be away for long, and a forwarded INTERRUPT
        would wait for it while the target waits for its own."""
        client = self.client

        def withdraw(target: int) -> bool:
            if not client.withdraw(target):
                return False
            self.deliver(_encode(target, -errno.EINTR))
            return True

        def at_daemon(target: int) -> bool:
            if not client.pending(target):
                return False
            client.submit(req.frame, req.unique, self._interrupt_answer, local=None,
                          whole=True)
            return True

        return interrupt_reply(req, withdraw, held, at_daemon)

    def _decide_here(self, req: LockRequest, fd: int) -> bytes | None:
        """A delegated inode's request, answered here (called with _mu held); None when
        it must go to the daemon after all: a wait (no wait is decided here: the
        delegation goes back first)."""
        if req.waits:
            reply = self.local.setlk(req, fd, queue=False)  # granted if it is free
            if _REPLY.unpack_from(reply)[1] != -errno.EAGAIN:
                return reply
            self._give_back_locked(req.nodeid)
            return None
        return self.local.handle(req, fd)

    def give_back(self, nodeid: int) -> None:
        """Hand the inode's delegation back to the daemon (recalled)."""
        with self._mu:
            self._give_back_locked(nodeid)

    def _give_back_locked(self, nodeid: int, always: bool = False) -> None:
        """Hand back what this server decided about the inode: its locks (their
        descriptions in flight) and its OFD bookkeeping, both moved, nothing left here.
        `always`: send the (then empty) hand-back even when the inode was not decided
        here, so that the daemon stops counting it as ours."""
        local, client = self.local, self.client
        if not client.end_delegation(nodeid) and not always:
            return
        ref = local.file_of(nodeid)
        entries = [] if ref is None else local.service.hand_over(local.guest, ref)
        owners = local.take_owners(nodeid)
        local.forget(nodeid)
        fds = [e[2] for e in entries]
        # As many frames as its size needs (a guest decides how many locks there are).
        frames = delegation.return_frames(
            client.new_id, nodeid, [(k, o, rs, p) for k, o, _fd, rs, p in entries], owners)
        at = 0
        for rid, frame, n in frames:
            mine = tuple(fds[at:at + n])
            at += n
            # The descriptors (and their locks) stay ours until the daemon has them.
            client.submit(frame, rid, _closing(mine), local=None, fds=mine)

    def _registered(self, nodeid: int, delegated: bool) -> None:
        """Registered again after a daemon restart: a delegation not granted again goes
        back; one granted again that this server no longer decides is declined (an
        empty hand-back), so that the daemon's record and ours agree."""
        if delegated != self.client.delegated(nodeid):
            with self._mu:
                self._give_back_locked(nodeid, always=True)

    def _evicted(self) -> None:
        """An admin evicted this guest: what was decided here goes too."""
        with self._mu:
            for nodeid in self.client.registered_nodes():
                self.client.end_delegation(nodeid)
            if self.local is not None:
                self.local.service.release_guest(self.local.guest)

    def released(self, req: LockRequest, inode: object) -> None:
        """The guest's RELEASE is answered by the session; the daemon still has to drop
        what the handle held (delivered however long the daemon is away)."""
        client, nodeid = self.client, req.nodeid
        if getattr(client, "superseded", False):
            return  # migrated: the guest's handles live on at the destination
        with self._mu:
            # The last handle of the inode? Asked here, under the lock the requests take:
            # a handle opened meanwhile keeps the registration.
            last = inode.nopen == 0  # type: ignore[attr-defined]
            if client.delegated(nodeid):
                self.local.release(req)
                if not last:
                    return
                client.end_delegation(nodeid)
                self.local.forget(nodeid)  # the guest holds nothing there now
            if not client.registered(nodeid):
                return
            # The message as it came, under an id of ours: the session answers the
            # RELEASE now, and the kernel may reuse its unique while this is in flight.
            rid = client.new_id()
            client.submit(wire.with_id(req.frame, rid), rid, _ignore, local=None)
            if last:
                client.unregister(nodeid)

    def resume_waits(self) -> None:
        """On a migration's destination (a client from LockClient.takeover): the waits
        queued at the source are answered through this session."""
        self.client.attach_waits(self._reply)

    def end(self) -> None:
        """This FUSE session is over (the guest unmounted or its device was reset):
        everything the guest had in the daemon goes, delivered however long the daemon
        is away (a later session's requests follow it in order). Not after the guest
        migrated (the destination has its session now); while its state is out for a
        migration, only if no destination takes the session over in time."""
        client = self.client
        if getattr(client, "superseded", False):
            return
        if getattr(client, "migrating", False):
            client.end_unless_taken_over(self._end)
            return
        self._end()

    def _end(self) -> None:
        client = self.client
        if self.local is not None:
            with self._mu:
                for nodeid in client.registered_nodes():
                    client.end_delegation(nodeid)
                self.local.end()
        rid = client.new_id()
        client.submit(wire.frame(wire.T_DESTROY, rid), rid, _ignore, local=None)
        for nodeid in client.registered_nodes():
            client.unregister(nodeid)

    # ---- live migration, the transport's side (fuse_server/migration.py) ----
    # The daemon keeps the guest's locks and queued waits (in their places) across a
    # migration; the destination's client takes the session over (lockd/daemon/client.py)
    # once the guest runs there.
    keeps_waits = True
    _takeover_pending = False  # a destination's client, not connected yet

    def save_state(self, table: object) -> dict:
        """What the destination needs to take the daemon session over (no descriptors:
        the daemon holds the descriptions)."""
        return {"client": self.client.migration_state()}

    def migration_cancelled(self) -> None:
        """The source runs on: its end releases again as always."""
        self.client.cancel_migration()

    @classmethod
    def taken_over(cls, st: dict, fs: object, daemon: str, deliver: Deliver,
                   wrap: Callable[[object], object]) -> RemoteLocks:
        """The destination's endpoint: a client built from the source's state that
        connects to nothing until start_after_migration() (the source is not disturbed
        while the migration may still fail). `fs`: the loaded Passthrough."""
        from lockd.daemon.client import LockClient

        state = st["client"]
        files = {}
        for fi in state["files"]:
            fd = fs.any_fd(int(fi["nodeid"]))  # type: ignore[attr-defined]
            if fd is None:
                raise OSError(errno.EINVAL, f"inode {fi['nodeid']} registered without an "
                                            "open handle")
            files[int(fi["nodeid"])] = fd
        client = LockClient.takeover(daemon, state, files)
        locks = cls(wrap(client), state["guest"], fs.fd_of, deliver)  # type: ignore[attr-defined]
        locks._takeover_pending = True
        return locks

    def start_after_migration(self) -> None:
        """The guest runs here: take the daemon session over (the source's connection
        is superseded); the waits queued there are answered here."""
        if not self._takeover_pending:
            return
        self._takeover_pending = False
        self.resume_waits()
        info = self.client.take_over()
        if not info.get("resumed", True):
            log.error("migration: the lock daemon no longer had guest %r's session: its "
                      "locks are gone", self.client.guest)

    def abandon(self) -> None:
        """A destination that loaded the state and never ran: close the client that never
        connected (nothing is released: the source still owns the session). On a
        source, nothing: end() waits for the takeover."""
        if self._takeover_pending:
            self._takeover_pending = False
            self.client.close()
            self.end = _nothing_to_end  # type: ignore[method-assign] - it never began


def _nothing_to_end() -> None:
    pass


def _closing(fds: tuple[int, ...]) -> Callable[[int, int, bytes], None]:
    def done(rid: int, status: int, payload: bytes) -> None:
        for fd in fds:
            os.close(fd)
        if status < 0:
            log.warning("handing a delegation back: %s", errno.errorcode.get(-status))
    return done


def _ignore(rid: int, status: int, payload: bytes) -> None:
    if status < 0:
        log.debug("background lock request %d: %s", rid, errno.errorcode.get(-status))
