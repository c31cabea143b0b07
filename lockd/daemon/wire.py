"""The vfs-lockd wire protocol (Unix stream socket between guest servers and the daemon).

Requests (client -> daemon) use the fuse_in_header layout, so the FUSE lock frames are
literally FUSE messages: a guest's server forwards the guest's GETLK, SETLK, SETLKW,
INTERRUPT, FLUSH, RELEASE and DESTROY unchanged, the daemon decodes them with
`lockd.fuse.codec.CODEC` and answers them with the guest's `lockd.dispatch.LockDispatcher`,
and the reply is the FUSE reply the guest gets:

    u32 len        whole frame, header included (40 <= len <= MAX_FRAME)
    u32 type       a FUSE opcode for lock frames, or one of the T_* values below
    u64 id         request id chosen by the client, non-zero; the reply carries it (a
                   forwarded FUSE message keeps its FUSE unique)
    u64 handle     the inode (FUSE nodeid) the frame is about: registered by FILE
    u32 uid, gid, pid; u32 pad (ignored)
    body           len - 40 bytes

Replies (daemon -> client) use the fuse_out_header layout:

    u32 len; i32 status; u64 id; payload (len - 16 bytes)

status is 0, a negative errno, or +1 (STATUS_QUEUED: interim answer to a wait; the final
reply follows later with the same id). A reply with a negative status and a non-empty
payload is an error frame; its payload is a UTF-8 message. id 0 is never a request: a
frame with id 0 is a notice from the daemon (error frame for a request that could not be
attributed, or an eviction); after a notice about lost framing the daemon closes.

GETLK's reply is the FUSE reply (fuse_out_header + fuse_lk_out, 40 bytes), exactly what
the guest kernel takes, for a FUSE server that forwards it. A client that asked for it in
its HELLO ("holder_names": true; a tool, e.g. `LockClient(holder_names=True)`) gets the
holder's guest name after it, UTF-8, the length field grown to match:

    u32 len (40 + n); i32 0; u64 id; fuse_lk_out; u8 name[n]   (n = 0: no guest holds it)

(Version 2 named the holder to every client and its FUSE servers cut the name off again;
a version-2 HELLO still gets it, a version-3 client asks.)

A request frame longer than MAX_FRAME (the daemon's limit, in its HELLO reply) is
refused with an error reply (EMSGSIZE) for its id and its body skipped: the connection
goes on. Only a length below the header's size loses the framing (then the daemon
closes).
"""

from __future__ import annotations

import errno
import json
import struct

from lockd.fuse import abi

# 2: files registered per inode, lock frames answered by the dispatcher; 3: GETLK names
# the holder only to a client that asks (HELLO "holder_names").
VERSION = 3
MIN_VERSION = 2
NAMES_ASKED = 3  # from this version on, a HELLO asks for holder names or gets none
MAGIC = b"VFSLOCKD"
# Largest request frame the daemon accepts; a longer one is refused (an error reply
# for its id; the connection goes on). Clients keep every frame within it whatever a
# guest does: RETURN is split (delegation.return_frames), a FILE label is cut to
# MAX_LABEL, HELLO fields are bounded.
MAX_FRAME = 64 * 1024
MAX_LABEL = 4096  # bytes of a FILE frame's path label (display only)

# FUSE opcodes used as frame types (include/uapi/linux/fuse.h).
T_RELEASE = abi.RELEASE  # fuse_release_in; release_flags & FUSE_RELEASE_FLOCK_UNLOCK -> release_flock(fh)
T_FLUSH = abi.FLUSH  # fuse_flush_in -> release_owner(lock_owner, handle)
T_GETLK = abi.GETLK  # fuse_lk_in
T_SETLK = abi.SETLK  # fuse_lk_in (lk_flags & FUSE_LK_FLOCK -> flock(fh) without waiting)
T_SETLKW = abi.SETLKW  # fuse_lk_in (waits; FUSE_LK_FLOCK -> flock(fh) waiting)
T_INTERRUPT = abi.INTERRUPT  # fuse_interrupt_in {u64 id}: cancel wait `id`; 0 (done) or -EAGAIN
T_DESTROY = abi.DESTROY  # no body: release everything of the guest (connection stays)
# vfs-lockd's own frame types.
T_HELLO = 1000  # MAGIC, u32 version, u32 0, JSON {"guest", "role", "session"}; with
#                "takeover": true and the session's token, the session moves to this
#                connection even while another one has it ("waits": the ids the new
#                connection expects answers to; sessions.Sessions.take_over);
#                "holder_names": true, GETLK replies name the holder's guest (above)
T_FILE = 1001  # handle = inode number (0: the daemon picks one), one fd in SCM_RIGHTS;
#                body: optional UTF-8 path label (display only) -> FILE_OUT
T_PUT_FILE = 1002  # handle in header: the guest closed its last handle of the inode
T_PING = 1003  # no body; reply 0
T_RETURN = 1004  # handle = inode; JSON body + fds: a delegation handed back (delegation.py)
T_LIST = 1100  # admin: JSON snapshot
T_STATUS = 1101  # admin: JSON status
T_EVICT = 1102  # admin: body = UTF-8 guest name
T_CANCEL_WAIT = 1103  # body u64 wait id (admin: any wait; guest: its own waits)

TYPE_NAMES = {
    T_RELEASE: "RELEASE_FLOCK", T_FLUSH: "RELEASE_OWNER", T_GETLK: "GETLK",
    T_SETLK: "SETLK", T_SETLKW: "SETLKW", T_INTERRUPT: "CANCEL", T_DESTROY: "RELEASE_GUEST",
    T_HELLO: "HELLO", T_FILE: "FILE", T_PUT_FILE: "PUT_FILE", T_PING: "PING",
    T_RETURN: "RETURN",
    T_LIST: "LIST", T_STATUS: "STATUS", T_EVICT: "EVICT", T_CANCEL_WAIT: "CANCEL_WAIT",
}
ROLES = ("guest", "admin")

STATUS_QUEUED = 1
# A notice (id 0): this connection's session was taken over by another connection of
# the guest (a HELLO with "takeover", live migration); the daemon closes this one and
# nothing sent on it changes the session any more. Its payload is a UTF-8 message.
STATUS_SUPERSEDED = 3  # (2 is delegation.STATUS_RECALL)
FUSE_LK_FLOCK = abi.LK_FLOCK
FUSE_RELEASE_FLOCK_UNLOCK = abi.RELEASE_FLOCK_UNLOCK

def _framed(body: struct.Struct) -> struct.Struct:
    """fuse_in_header followed by a body struct, packed in one call."""
    return struct.Struct("<" + abi.IN_HEADER.format.lstrip("<") + body.format.lstrip("<"))


HEADER = abi.IN_HEADER
HEADER_SIZE = HEADER.size  # 40
PEEK = struct.Struct("<IIQQ")  # len, type, id, handle: the start of fuse_in_header
LK_FRAME = _framed(abi.LK_IN)
INTERRUPT_FRAME = _framed(abi.INTERRUPT_IN)
FLUSH_FRAME = _framed(abi.FLUSH_IN)
RELEASE_FRAME = _framed(abi.RELEASE_IN)
REPLY = abi.OUT_HEADER
REPLY_SIZE = REPLY.size  # 16
FILE_OUT = struct.Struct("<QQQ")  # handle, dev, ino
U64 = struct.Struct("<Q")
HELLO_PREFIX = struct.Struct("<8sII")
_ID_AT = struct.calcsize("<II")  # the id's offset in a request header (after len, type)

_U32 = 0xFFFFFFFF
_U64 = 0xFFFFFFFFFFFFFFFF


class ProtocolError(Exception):
    """A frame that cannot be understood; `err` is the errno for the error frame."""

    def __init__(self, err: int, message: str) -> None:
        super().__init__(message)
        self.err = err


# ---------------------------------------------------------------- request encoders
def frame(type_: int, rid: int, body: bytes = b"", handle: int = 0, pid: int = 0) -> bytes:
    """Any request frame."""
    return HEADER.pack(HEADER_SIZE + len(body), type_, rid, handle, 0, 0, pid, 0, 0) + body


def hello(rid: int, guest: str | None, role: str = "guest", session: str | None = None,
          version: int = VERSION, **extra: object) -> bytes:
    body = {"guest": guest, "role": role, "session": session, **extra}
    out = frame(T_HELLO, rid, HELLO_PREFIX.pack(MAGIC, version, 0) + json.dumps(body).encode())
    if len(out) > MAX_FRAME:  # a HELLO the daemon refuses costs the connection
        raise ProtocolError(errno.EMSGSIZE, f"hello frame of {len(out)} bytes")
    return out


def lk(type_: int, rid: int, handle: int, fh: int, owner: int, lk_type: int, start: int,
       end: int, pid: int, lk_flags: int = 0) -> bytes:
    """GETLK / SETLK / SETLKW frame (header + fuse_lk_in)."""
    return LK_FRAME.pack(LK_FRAME.size, type_, rid, handle, 0, 0, pid & _U32, 0, 0,
                         fh & _U64, owner & _U64, start, end, lk_type & _U32, pid & _U32,
                         lk_flags)


def interrupt(rid: int, target: int) -> bytes:
    return INTERRUPT_FRAME.pack(INTERRUPT_FRAME.size, T_INTERRUPT, rid, 0, 0, 0, 0, 0, 0,
                                target)


def flush(rid: int, handle: int, owner: int) -> bytes:
    return FLUSH_FRAME.pack(FLUSH_FRAME.size, T_FLUSH, rid, handle, 0, 0, 0, 0, 0, 0, 0, 0,
                            owner & _U64)


def release_flock(rid: int, fh: int) -> bytes:
    return RELEASE_FRAME.pack(RELEASE_FRAME.size, T_RELEASE, rid, 0, 0, 0, 0, 0, 0, fh & _U64,
                              0, FUSE_RELEASE_FLOCK_UNLOCK, 0)


def file_frame(rid: int, path: str | None = None, handle: int = 0) -> bytes:
    """FILE frame; the label is cut to MAX_LABEL bytes (it is only shown)."""
    label = (path or "").encode("utf-8", "surrogateescape")[:MAX_LABEL]
    return frame(T_FILE, rid, label, handle=handle)


def with_id(frame: bytes, rid: int) -> bytes:
    """A request frame as it came, under another id (a forwarded message the guest's
    server answers itself, whose FUSE unique the kernel may reuse meanwhile)."""
    return frame[:_ID_AT] + U64.pack(rid) + frame[_ID_AT + U64.size:]


# ---------------------------------------------------------------- replies
def reply(rid: int, status: int, payload: bytes = b"") -> bytes:
    """status: 0, -errno or STATUS_QUEUED."""
    return REPLY.pack(REPLY_SIZE + len(payload), status, rid) + payload


def error_frame(rid: int, err: int, message: str) -> bytes:
    return reply(rid, -abs(err) or -errno.EPROTO, message.encode("utf-8", "replace")[:4096])


def json_reply(rid: int, obj: object) -> bytes:
    return reply(rid, 0, json.dumps(obj, separators=(",", ":")).encode())


def parse_hello(body: bytes) -> tuple[int, dict]:
    """(version, fields) of a HELLO body; ProtocolError when it is not one."""
    if len(body) < HELLO_PREFIX.size:
        raise ProtocolError(errno.EPROTO, "hello: truncated")
    magic, version, _ = HELLO_PREFIX.unpack_from(body)
    if magic != MAGIC:
        raise ProtocolError(errno.EPROTO, "hello: bad magic")
    try:
        fields = json.loads(bytes(body[HELLO_PREFIX.size:]).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProtocolError(errno.EPROTO, f"hello: bad JSON ({exc})") from None
    if not isinstance(fields, dict):
        raise ProtocolError(errno.EPROTO, "hello: JSON body is not an object")
    return version, fields


def split_replies(buf: bytearray, max_len: int = 1 << 31,
                  whole: bool = False) -> list[tuple[int, int, bytes]]:
    """Remove complete reply frames from the front of `buf`: [(id, status, payload)];
    with `whole`, [(id, status, frame)], the header kept (a forwarded FUSE message's
    reply is a FUSE reply as it is)."""
    out = []
    pos, n = 0, len(buf)
    unpack = REPLY.unpack_from
    while n - pos >= REPLY_SIZE:
        ln, status, rid = unpack(buf, pos)
        if ln < REPLY_SIZE or ln > max_len:
            raise ProtocolError(errno.EPROTO, f"bad reply length {ln}")
        if n - pos < ln:
            break
        if whole:
            out.append((rid, status, bytes(buf[pos:pos + ln])))
        else:
            out.append((rid, status, bytes(buf[pos + REPLY_SIZE:pos + ln]) if ln > REPLY_SIZE
                        else b""))
        pos += ln
    if pos:
        del buf[:pos]
    return out
