"""Delegations: the server of a guest that is the only one using a file decides that
file's locks itself, without a round trip to the daemon for each lock.

Why it is safe: every lock, wherever it is decided, is an OFD lock on a host description,
so the host kernel excludes conflicting owners whoever decides. What the daemon adds is
FIFO fairness and deadlock detection between guests, naming holders, limits and the
journal; a file only one guest uses needs none of those between guests. So:

* Grant: at the guest's FILE frame (its first lock request on the inode), when no other
  guest has the file registered and nothing is held or queued on it, the daemon answers
  "delegated" (FILE_FLAGS). Never for a file on a FUSE file system (a cluster mount: its
  lost-lock reports go through the daemon's journal), never while --guest-grace keeps
  sessions for a restarted server (delegated locks live in the server's process).
* While delegated, the guest's server runs the same lockd.dispatch.LockDispatcher on an
  in-process manager for that inode: lock, unlock, GETLK, FLUSH, RELEASE. A request that
  would wait goes central: the server hands the delegation back first (no wait is ever
  decided locally, so deadlock detection and FIFO order stay the daemon's).
* Recall: when another guest registers the file, or an admin lists the locks, the daemon
  sends a RECALL notice; the server hands the delegation back. Handing back is a RETURN
  frame carrying every description that holds a lock (SCM_RIGHTS) with its ranges, and
  the OFD owner bookkeeping of the inode: the locks never leave the host (they belong to
  the descriptions, which are in flight), and the daemon adopts them (journaled, kept).
  It takes as many RETURN frames as its size needs (at most MAX_PER_FRAME descriptions
  and wire.MAX_FRAME bytes each, "final" on the last): one owner's thousands of ranges
  are split, the later parts ("more") extending the description adopted for that
  (kind, owner) earlier in the same hand-back.
  Frames from the server arrive in order, so its later requests for the inode are
  answered centrally, after the adoption.
* Meanwhile the daemon does not wait for the return: another guest's request meets the
  delegated locks as host locks (the kernel refuses or makes it wait), which is right,
  only less fair until the return arrives.
* Crashes: a daemon crash leaves delegated locks where they are (the server's process);
  the server's crash ends its guest, whose locks go anyway. After a daemon restart the
  server registers its files again and hands back any delegation not granted again.
* Limits: the server's manager enforces the daemon's per-guest limits on delegated files;
  they are counted there, apart from the guest's central locks.
"""

from __future__ import annotations

import errno
import json
import os
import struct
import time
from collections.abc import Callable

from lockd.daemon import wire
from lockd.engine import ofd

TYPE_CHECKING = False  # `typing` stays out of the back-end (lockd/structs.py)
if TYPE_CHECKING:
    from lockd.daemon.server import Conn, Daemon, GuestSession
    from lockd.fuse.codec import FuseMsg

FILE_FLAGS = struct.Struct("<I")  # after FILE_OUT in a FILE reply
DELEGATED = 1
STATUS_RECALL = 2  # a notice (id 0): give back the delegation of the inode in the payload
RECALL = struct.Struct("<Q")  # the notice's payload: the receiver's inode number
MAX_PER_FRAME = 16  # descriptions per RETURN frame (the daemon takes 16 fds a message)

# entry: (kind "posix"|"flock", owner or fh, [(start, end, type)], pid)
Entry = tuple[str, int, list, int]


def _dumps(obj: object) -> str:
    return json.dumps(obj, separators=(",", ":"))


class _Body:
    """One RETURN body being filled, its encoded size known exactly at every step:
    {"locks": [entry, ...], "more": [entry, ...], "owners": [[o, fh], ...], "final": b}.
    "locks" entries each come with one descriptor; "more" entries add ranges to the
    description adopted for the same (kind, owner) earlier in the same hand-back."""

    SKELETON = len('{"locks":[],"more":[],"owners":[],"final":false}')

    def __init__(self) -> None:
        self.lists: dict[str, list[str]] = {"locks": [], "more": [], "owners": []}
        self.size = self.SKELETON
        self.fds = 0

    def cost(self, key: str, item: str) -> int:
        return len(item) + (1 if self.lists[key] else 0)  # the comma before it

    def add(self, key: str, item: str) -> None:
        self.size += self.cost(key, item)
        self.lists[key].append(item)

    def encode(self, final: bool) -> bytes:
        parts = ",".join(f'"{k}":[{",".join(v)}]' for k, v in self.lists.items())
        return ("{" + parts + f',"final":{"true" if final else "false"}' + "}").encode()


def return_frames(new_id: Callable[[], int], nodeid: int, entries: list[Entry],
                  owners: list[tuple[int, int]],
                  max_frame: int = wire.MAX_FRAME) -> list[tuple[int, bytes, int]]:
    """The RETURN frames that hand back a delegation: [(id, frame, number of fds)],
    each id from `new_id`; the fds go with their frame, in `entries` order.

    A guest decides how many locks and owners there are, so every frame is bounded
    by bytes as well as descriptors: an entry whose ranges do not fit in one frame is
    split, its descriptor going with the first part and the rest following as "more"
    entries in the next frames."""
    budget = max_frame - wire.HEADER_SIZE
    if budget < 1024:  # room for the skeleton and any one entry with one range
        raise ValueError(f"max_frame {max_frame} too small for RETURN frames")
    bodies = [_Body()]

    def room(key: str, item: str) -> _Body:
        body = bodies[-1]
        if body.size + body.cost(key, item) > budget:
            body = _Body()
            bodies.append(body)
        return body

    for kind, owner, ranges, pid in entries:
        head, tail = f'["{kind}",{int(owner)},[', f"],{int(pid)}]"
        items = [_dumps([int(x) for x in r]) for r in ranges]
        key = "locks"
        at = 0
        while True:
            body = bodies[-1]
            if key == "locks" and body.fds >= MAX_PER_FRAME:
                body = _Body()
                bodies.append(body)
            # As many ranges as fit after the entry's own bytes (an entry with one
            # range is under 200 bytes: it always fits in an empty frame).
            used = body.size + body.cost(key, head + tail)
            if used > budget:
                body = _Body()
                bodies.append(body)
                used = body.size + body.cost(key, head + tail)
            end = at
            while end < len(items) and used + len(items[end]) + (end > at) <= budget:
                used += len(items[end]) + (end > at)
                end += 1
            if end == at and at < len(items) and (body.lists["locks"] or body.lists["more"]):
                bodies.append(_Body())  # not even one range: start a fresh frame
                continue
            body.add(key, head + ",".join(items[at:end]) + tail)
            if key == "locks":
                body.fds += 1
            at = end
            if at >= len(items):
                break
            key = "more"
    for o, fh in owners:
        room("owners", _dumps([int(o), int(fh)])).add("owners", _dumps([int(o), int(fh)]))
    out = []
    for i, body in enumerate(bodies):
        rid = new_id()
        out.append((rid, wire.frame(wire.T_RETURN, rid, body.encode(i == len(bodies) - 1),
                                    handle=nodeid), body.fds))
    return out


def parse_return(body: bytes) -> tuple[list[Entry], list[Entry], list[tuple[int, int]], bool]:
    """(entries, continuations, owner-fh pairs, final) of a RETURN body; ValueError when
    malformed. Each entry comes with one descriptor; a continuation ("more") adds
    ranges to the description adopted for its (kind, owner) earlier in the hand-back."""
    doc = json.loads(body)
    if not isinstance(doc, dict):
        raise ValueError("RETURN body is not an object")

    def entries_of(key: str) -> list[Entry]:
        out = []
        for k, o, rs, p in doc.get(key, []):
            if (k not in ("posix", "flock") or not isinstance(o, int)
                    or not isinstance(p, int) or not isinstance(rs, list)):
                raise ValueError("bad RETURN entry")
            out.append((k, o, [tuple(int(x) for x in r) for r in rs], p))
        return out

    owners = [(int(o), int(fh)) for o, fh in doc["owners"]]
    return entries_of("locks"), entries_of("more"), owners, bool(doc["final"])


def may_delegate(ref: object, on_fuse: bool) -> bool:
    """Whether a file just registered by one guest, and delegated to nobody, can be
    delegated to it: nobody else has it registered, nothing is held, kept or queued on
    it, and it is not on a FUSE file system."""
    return (ref.refs == 1 and not ref.locks  # type: ignore[attr-defined]
            and not ref.flocks and not ref.queue and not ref.descs  # type: ignore[attr-defined]
            and not on_fuse)


LIST_WAIT = 1.0  # seconds a LIST waits for recalled delegations to come back


class Delegations:
    """The daemon's side of delegations: which guest's server decides which file, the
    recalls asked for, the hand-backs in progress, and the LIST requests waiting for
    them. The one writer of that state; the event loop calls it from its handlers."""

    def __init__(self, daemon: Daemon, enabled: bool) -> None:
        self._d = daemon
        # Delegated locks live in the guest's server: a session kept for a restarted
        # server (--guest-grace) could not keep them.
        self.enabled = enabled
        # file (the engine's FileState, by identity) -> the guest whose server decides
        # its locks itself
        self.holders: dict[object, str] = {}
        self.recalls: set[tuple[str, int]] = set()  # (guest, inode) asked to hand back
        # A hand-back in progress, (guest, inode) -> (its session, {(kind, owner):
        # adopted}): its "more" entries extend the descriptions adopted before them.
        self.returning: dict[tuple[str, int], tuple[GuestSession, dict]] = {}
        self.lists_waiting: list[tuple[Conn, int, float]] = []  # LIST after recalls

    def holder(self, ref: object) -> str | None:
        """The guest the file is delegated to, or None."""
        return self.holders.get(ref)

    def _clear(self, ref: object) -> None:
        self.holders.pop(ref, None)

    # ------------------------------------------------------------ grant and recall
    def on_file(self, s: GuestSession, ref: object) -> int:
        """A FILE frame of s registered `ref`: the FILE_FLAGS of its reply (delegated or
        not); recalls the delegation another guest has of it."""
        holder = self.holders.get(ref)
        if holder is None:
            # Not while an owner of this guest is still to hear of a lock lost there:
            # its next request must reach the daemon's EIO, not a delegated answer.
            if (s.delegable and may_delegate(ref, ofd.on_fuse(ref.path_fd))  # type: ignore[attr-defined]
                    and not self._lost_here(s.guest, ref)):
                self.holders[ref] = s.guest
                return DELEGATED
            return 0
        if holder == s.guest:
            return DELEGATED  # registered again (after a daemon restart)
        self.recall(ref)  # another guest comes: the file goes central
        return 0

    def _lost_here(self, guest: str, ref: object) -> bool:
        lost = self._d.manager._lost  # (guest, owner key, file key) -> record
        if not lost:
            return False
        fkey = ref.key  # type: ignore[attr-defined]
        return any(k[0] == guest and k[2] == fkey for k in list(lost))

    def recall(self, ref: object) -> None:
        """Ask the delegate's server to hand the file's delegation back."""
        s = self._d.sessions.get(self.holders.get(ref))  # type: ignore[arg-type]
        nodeid = s.locks.nodeid_of(ref) if s is not None else None
        if s is None or nodeid is None or s.conn is None:
            self._clear(ref)
            return
        if (s.guest, nodeid) not in self.recalls:
            self.recalls.add((s.guest, nodeid))
            self._d._send(s.conn, wire.reply(0, STATUS_RECALL, RECALL.pack(nodeid)))

    def recall_all(self) -> None:
        for s in list(self._d.sessions.values()):
            for _nodeid, ref in s.locks.files():
                if self.holders.get(ref) == s.guest:
                    self.recall(ref)

    def _recall_done(self, guest: str, nodeid: int) -> None:
        self.recalls.discard((guest, nodeid))

    # ------------------------------------------------------------ the guest's frames
    def on_return(self, c: Conn, s: GuestSession, m: FuseMsg, buf: bytes, pos: int) -> None:
        """A server hands back (part of) a delegation: adopt its descriptions."""
        d = self._d
        rid = m.unique
        body = bytes(buf[pos + wire.HEADER_SIZE:pos + m.len])
        try:
            entries, more, owners, final = parse_return(body)
        except (ValueError, KeyError, TypeError) as exc:
            d._send(c, wire.error_frame(rid, errno.EINVAL, f"bad RETURN: {exc}"))
            return
        if len(c.fds) < len(entries):
            d._send(c, wire.error_frame(rid, errno.EBADF, "RETURN without its descriptors"))
            return
        fds = [c.fds.popleft() for _ in entries]
        ref = s.locks.file_of(m.nodeid)
        if ref is None:
            for fd in fds:
                os.close(fd)
            d._send(c, wire.reply(rid, -errno.EBADF))
            return
        rkey = (s.guest, m.nodeid)
        seq = self.returning.get(rkey)
        if seq is None or seq[0] is not s:
            seq = self.returning[rkey] = (s, {})
        adopted = seq[1]
        failed = 0
        manager = d.manager
        for (kind, owner, ranges, pid), fd in zip(entries, fds, strict=True):
            ok = manager.adopt(s.guest, ref, kind, owner, fd, ranges, pid) == 0
            adopted[(kind, owner)] = ok
            failed += not ok
        for kind, owner, ranges, pid in more:
            # Only onto a description this hand-back brought: its host locks are there.
            failed += not (adopted.get((kind, owner)) and
                           manager.adopt(s.guest, ref, kind, owner, None, ranges, pid) == 0)
        s.locks.adopt_owners(m.nodeid, owners)
        if final:
            del self.returning[rkey]
            for k in [k for k, (s2, _) in self.returning.items() if s2.dead]:
                del self.returning[k]  # hand-backs cut short by their guest's end
            if self.holders.get(ref) == s.guest:
                self._clear(ref)
            self._recall_done(s.guest, m.nodeid)
        if failed:
            d.log_repeated("return_failed", level="error", guest=s.guest, failed=failed)
        d._send(c, wire.reply(rid, -errno.ENOLCK if failed else 0))

    def on_put_file(self, s: GuestSession, nodeid: int, ref: object) -> None:
        """s's server closed the file: it holds nothing there any more."""
        if self.holders.get(ref) == s.guest:
            self._clear(ref)
            self._recall_done(s.guest, nodeid)

    def on_session_end(self, s: GuestSession) -> None:
        """s's server's delegated locks went with it."""
        if not self.holders:
            return
        for _nodeid, ref in s.locks.files():
            if self.holders.get(ref) == s.guest:
                self._clear(ref)

    # ------------------------------------------------------------ LIST
    def list_requested(self, c: Conn, rid: int) -> None:
        """An admin's LIST: what servers decided themselves comes back first."""
        self.recall_all()
        self.lists_waiting.append((c, rid, time.monotonic() + LIST_WAIT))
        self.answer_lists()

    def answer_lists(self, force: bool = False) -> None:
        """LIST requests waiting for delegations to come back: answered when they have
        (or after LIST_WAIT: a server that does not hand back keeps its locks listed as
        the host's)."""
        d = self._d
        now = time.monotonic()
        keep = []
        for c, rid, deadline in self.lists_waiting:
            if c.closed:
                continue
            if self.recalls and now < deadline and not force:
                keep.append((c, rid, deadline))
                continue
            snap = d.manager.snapshot()
            snap["now"] = now
            d._send_big(c, wire.json_reply(rid, snap))
        self.lists_waiting = keep
