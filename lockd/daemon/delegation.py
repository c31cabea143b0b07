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

import json
import struct

from lockd.daemon import wire

FILE_FLAGS = struct.Struct("<I")  # after FILE_OUT in a FILE reply
DELEGATED = 1
STATUS_RECALL = 2  # a notice (id 0): give back the delegation of the inode in the payload
RECALL = struct.Struct("<Q")  # the notice's payload: the receiver's inode number
MAX_PER_FRAME = 16  # descriptions per RETURN frame (the daemon takes 16 fds a message)

# entry: (kind "posix"|"flock", owner or fh, [(start, end, type)], pid)
Entry = tuple[str, int, list, int]


def return_frames(first_id: int, nodeid: int, entries: list[Entry],
                  owners: list[tuple[int, int]]) -> list[tuple[int, bytes, int]]:
    """The RETURN frames that hand back a delegation: [(id, frame, number of fds)];
    the fds go with their frame, in `entries` order."""
    chunks = [entries[i:i + MAX_PER_FRAME] for i in range(0, len(entries), MAX_PER_FRAME)]
    chunks = chunks or [[]]
    out = []
    for i, chunk in enumerate(chunks):
        last = i == len(chunks) - 1
        body = {"locks": [[k, o, [list(r) for r in rs], p] for k, o, rs, p in chunk],
                "owners": [list(x) for x in owners] if last else [], "final": last}
        out.append((first_id + i,
                    wire.frame(wire.T_RETURN, first_id + i, json.dumps(body).encode(),
                               handle=nodeid), len(chunk)))
    return out


def parse_return(body: bytes) -> tuple[list[Entry], list[tuple[int, int]], bool]:
    """(entries, owner-fh pairs, final) of a RETURN body; ValueError when malformed."""
    doc = json.loads(body)
    entries = []
    for k, o, rs, p in doc["locks"]:
        if k not in ("posix", "flock") or not isinstance(o, int) or not isinstance(p, int):
            raise ValueError("bad RETURN entry")
        entries.append((k, o, [tuple(int(x) for x in r) for r in rs], p))
    owners = [(int(o), int(fh)) for o, fh in doc["owners"]]
    return entries, owners, bool(doc["final"])


def may_delegate(ref: object, on_fuse: bool) -> bool:
    """Whether a file just registered by one guest can be delegated to it: nobody else
    has it registered, nothing is held, kept or queued on it, and it is not on a FUSE
    file system."""
    return (ref.refs == 1 and ref.delegate is None and not ref.locks  # type: ignore[attr-defined]
            and not ref.flocks and not ref.queue and not ref.descs  # type: ignore[attr-defined]
            and not on_fuse)
