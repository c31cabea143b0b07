"""FUSE request decoding and reply encoding for the lock opcodes.

Two codecs with one interface: `NativeCodec` (the C fast path in lockd._native) and
`PyCodec` (pure Python, the fallback and the reference for differential tests).
`CODEC` is the best one available.

A decoded message is a tuple of 18 unsigned ints named by `DECODED_FIELDS`. `status` is 0
or EINVAL: EINVAL for a buffer shorter than fuse_in_header, a header len outside
[40, bytes available], or a body too short for a lock opcode (GETLK/SETLK/SETLKW need
fuse_lk_in, INTERRUPT fuse_interrupt_in, FLUSH fuse_flush_in, RELEASE/RELEASEDIR
fuse_release_in). Header fields are filled whenever the 40 header bytes exist; body fields
are 0 unless the body decoded. Other opcodes decode with status 0 and body fields 0.
"""

from __future__ import annotations

import errno
import struct
import threading
from array import array

from lockd.fuse import abi
from lockd.native import HAVE_NATIVE
from lockd.native import ffi as _ffi
from lockd.native import lib as _lib
from lockd.structs import NamedTuple  # typing's, without importing typing

# What the decoders accept (collections.abc.Buffer is 3.12+).
Buffer = bytes | bytearray | memoryview

DECODED_FIELDS = (
    "status",
    "len",
    "opcode",
    "unique",
    "nodeid",
    "uid",
    "gid",
    "pid",
    "fh",
    "owner",
    "lk_start",
    "lk_end",
    "lk_type",
    "lk_pid",
    "lk_flags",
    "flags",
    "release_flags",
    "target",
)
NFIELDS = len(DECODED_FIELDS)

_PEEK_U64 = struct.Struct("<Q")
_PEEK_U32 = struct.Struct("<I")


# Peeks for transports that route a message without decoding it.
def unique_of(buf: Buffer) -> int:
    """The unique of a request or a reply (fuse_in_header and fuse_out_header keep it at
    the same offset); the caller has checked that a header's bytes are there."""
    return _PEEK_U64.unpack_from(buf, abi.UNIQUE_OFFSET)[0]


def set_unique(buf: bytearray | memoryview, unique: int) -> None:
    """Rewrite a request's or reply's unique in place."""
    _PEEK_U64.pack_into(buf, abi.UNIQUE_OFFSET, unique)


def lk_type_of(buf: Buffer) -> int | None:
    """fuse_lk_in.lk.type of a GETLK/SETLK/SETLKW request; None when it is too short to
    hold one."""
    if len(buf) < abi.LK_TYPE_OFFSET + 4:
        return None
    return _PEEK_U32.unpack_from(buf, abi.LK_TYPE_OFFSET)[0]


class FuseMsg(NamedTuple):
    """A decoded message: the header, and the lock-related body fields (0 for other
    opcodes). `status` is 0 or EINVAL (see the module docstring)."""

    status: int
    len: int
    opcode: int
    unique: int
    nodeid: int
    uid: int
    gid: int
    pid: int
    fh: int
    owner: int
    lk_start: int
    lk_end: int
    lk_type: int
    lk_pid: int
    lk_flags: int
    flags: int
    release_flags: int
    target: int


assert FuseMsg._fields == DECODED_FIELDS
_msg = tuple.__new__  # _msg(FuseMsg, values): a FuseMsg without _make's checks
# Indexes into a decoded tuple, e.g. msg[OPCODE].
(
    STATUS,
    LEN,
    OPCODE,
    UNIQUE,
    NODEID,
    UID,
    GID,
    PID,
    FH,
    OWNER,
    LK_START,
    LK_END,
    LK_TYPE,
    LK_PID,
    LK_FLAGS,
    FLAGS,
    RELEASE_FLAGS,
    TARGET,
) = range(NFIELDS)

FUSE_RELEASE, FUSE_FLUSH, FUSE_RELEASEDIR = abi.RELEASE, abi.FLUSH, abi.RELEASEDIR
FUSE_GETLK, FUSE_SETLK, FUSE_SETLKW, FUSE_INTERRUPT = abi.GETLK, abi.SETLK, abi.SETLKW, abi.INTERRUPT

IN_HEADER_SIZE = abi.IN_HEADER_SIZE
OUT_HEADER_SIZE = abi.OUT_HEADER_SIZE
LK_REPLY_SIZE = OUT_HEADER_SIZE + abi.LK_OUT.size

_EINVAL = errno.EINVAL
_U32 = 0xFFFFFFFF

_IN_HEADER = abi.IN_HEADER  # we keep len, opcode, unique, nodeid, uid, gid, pid
_LK_IN = abi.LK_IN
_INTERRUPT_IN = abi.INTERRUPT_IN
_FLUSH_IN = abi.FLUSH_IN
_RELEASE_IN = abi.RELEASE_IN
_OUT_HEADER = abi.OUT_HEADER
# fuse_out_header + fuse_lk_out in one pack.
_LK_REPLY = struct.Struct("<" + abi.OUT_HEADER.format.lstrip("<") + abi.LK_OUT.format.lstrip("<"))
_DECODED = struct.Struct(f"<{NFIELDS}Q")
_DECODED_UNPACK = _DECODED.unpack

_ZERO_BODY = (0,) * 10  # fh .. target
_SHORT = (_EINVAL,) + (0,) * (NFIELDS - 1)
_LOCK_OPS = (FUSE_GETLK, FUSE_SETLK, FUSE_SETLKW)
_RELEASE_OPS = (FUSE_RELEASE, FUSE_RELEASEDIR)


class _StructEncoder:
    """Reply encoding shared by both codecs (see NativeCodec for why it is struct)."""

    def encode_reply(self, unique: int, error: int, payload: bytes = b"") -> bytes:
        """fuse_out_header (+ payload); `error` is 0 or a negative errno."""
        return _OUT_HEADER.pack(OUT_HEADER_SIZE + len(payload), error, unique) + payload

    def encode_lk_reply(self, unique: int, type_: int, start: int, end: int, pid: int) -> bytes:
        """A GETLK reply (fuse_out_header + fuse_lk_out). pid wraps to u32 (an OFD
        holder's -1 must not raise)."""
        return _LK_REPLY.pack(LK_REPLY_SIZE, 0, unique, start, end, type_, pid & _U32)


class PyCodec(_StructEncoder):
    """Pure-Python codec (struct module)."""

    name = "python"

    @staticmethod
    def _decode_at(buf: Buffer, off: int, avail: int) -> tuple[tuple[int, ...], bool]:
        """Decode the message at `off` with `avail` bytes left; also say whether the header
        was unusable (a batch cannot find the next message then)."""
        if avail < IN_HEADER_SIZE:
            return _SHORT, True
        hdr = _IN_HEADER.unpack_from(buf, off)[:7]
        hlen, opcode = hdr[0], hdr[1]
        if hlen < IN_HEADER_SIZE or hlen > avail:
            return (_EINVAL, *hdr, *_ZERO_BODY), True
        body = hlen - IN_HEADER_SIZE
        boff = off + IN_HEADER_SIZE
        if opcode in _LOCK_OPS:
            if body >= _LK_IN.size:
                fh, owner, start, end, typ, pid, lk_flags = _LK_IN.unpack_from(buf, boff)
                return (0, *hdr, fh, owner, start, end, typ, pid, lk_flags, 0, 0, 0), False
        elif opcode == FUSE_INTERRUPT:
            if body >= _INTERRUPT_IN.size:
                (target,) = _INTERRUPT_IN.unpack_from(buf, boff)
                return (0, *hdr, *_ZERO_BODY[:-1], target), False
        elif opcode == FUSE_FLUSH:
            if body >= _FLUSH_IN.size:
                fh, _, _, owner = _FLUSH_IN.unpack_from(buf, boff)
                return (0, *hdr, fh, owner, 0, 0, 0, 0, 0, 0, 0, 0), False
        elif opcode in _RELEASE_OPS:
            if body >= _RELEASE_IN.size:
                fh, flags, rflags, owner = _RELEASE_IN.unpack_from(buf, boff)
                return (0, *hdr, fh, owner, 0, 0, 0, 0, 0, flags, rflags, 0), False
        else:
            return (0, *hdr, *_ZERO_BODY), False
        return (_EINVAL, *hdr, *_ZERO_BODY), False

    def decode(self, buf: Buffer) -> tuple[int, ...]:
        """Decode one message (the first one in `buf`)."""
        return _msg(FuseMsg, self._decode_at(buf, 0, len(buf))[0])

    def decode_batch(self, buf: Buffer) -> list[tuple[int, ...]]:
        """Decode back-to-back messages; stops after one whose header is unusable."""
        out = []
        pos, total = 0, len(buf)
        decode_at = self._decode_at
        while pos < total:
            msg, fatal = decode_at(buf, pos, total - pos)
            out.append(_msg(FuseMsg, msg))
            if fatal:
                break
            pos += msg[LEN]
        return out


    def decode_batch_rows(self, buf: Buffer) -> memoryview:
        """Like decode_batch, but the answer is one (n, 18) memoryview of uint64 rows in
        DECODED_FIELDS order: no Python object per message, for consumers that index
        the fields they need."""
        rows = array("Q")
        for msg in self.decode_batch(buf):
            rows.extend(msg)
        return _rows_view(rows.tobytes())


def _rows_view(raw: bytes) -> memoryview:
    n = len(raw) // (NFIELDS * 8)
    # memoryview cannot take a shape with a zero in it: no rows is a flat empty view.
    return memoryview(raw).cast("Q", (n, NFIELDS)) if n else memoryview(raw).cast("Q")


class _Scratch(threading.local):
    """Per-thread output buffers reused across calls: C writes into them with the GIL
    released, so threads must not share them."""

    def __init__(self) -> None:
        one = _ffi.new(f"uint64_t[{NFIELDS}]")
        self.single = (one, _ffi.buffer(one))  # one attribute: threading.local gets are slow
        self.lk = _ffi.new(f"uint8_t[{LK_REPLY_SIZE}]")
        self.hdr = _ffi.new(f"uint8_t[{OUT_HEADER_SIZE}]")
        self.cap = 0
        self.batch = None
        self.grow(4096)

    def grow(self, cap: int) -> None:
        self.cap = cap
        self.batch = _ffi.new(f"uint64_t[{cap * NFIELDS}]")


class NativeCodec(_StructEncoder):
    """Codec backed by lockd._native (the GIL is released during the C calls).

    Decoding runs in C. Encoding uses struct.pack, like PyCodec: a reply is a single
    fixed-layout pack, and measured here the cffi call alone (~0.4 us with its GIL
    release) costs more than struct's whole job (~0.25 us). The C encoders stay
    available as encode_reply_c / encode_lk_reply_c (tested against struct) for callers
    that want them.
    """

    name = "native"

    def __init__(self) -> None:
        if not HAVE_NATIVE:
            raise ImportError("lockd._native is not built")
        self._tls = _Scratch()

    def decode(self, buf: Buffer) -> tuple[int, ...]:
        """Decode one message (the first one in `buf`)."""
        out, view = self._tls.single
        # cffi takes bytes as uint8_t* directly; other buffers need a cdata view.
        _lib.vl_decode(buf if type(buf) is bytes else _ffi.from_buffer(buf), len(buf), out)
        return _msg(FuseMsg, _DECODED_UNPACK(view))

    def _decode_raw(self, buf: Buffer) -> memoryview:
        """Run the C batch decoder into this thread's scratch array; its filled bytes."""
        total = len(buf)
        if not total:
            return memoryview(b"")
        tls = self._tls
        # Each message takes >= 40 bytes, plus maybe one short trailing one: never more.
        need = total // IN_HEADER_SIZE + 1
        if need > tls.cap:
            tls.grow(max(need, tls.cap * 2))
        out = tls.batch
        n = _lib.vl_decode_batch(
            buf if type(buf) is bytes else _ffi.from_buffer(buf), total, out, need
        )
        return memoryview(_ffi.buffer(out, n * NFIELDS * 8))

    def decode_batch(self, buf: Buffer) -> list[tuple[int, ...]]:
        """Decode back-to-back messages; stops after one whose header is unusable."""
        # One C-level pass builds the tuples; no per-field Python access.
        return [_msg(FuseMsg, t) for t in _DECODED.iter_unpack(self._decode_raw(buf))]

    def decode_batch_rows(self, buf: Buffer) -> memoryview:
        """Like decode_batch, as one (n, 18) memoryview of uint64 rows (a copy: valid
        after the next call). The C decoder fills the rows directly."""
        return _rows_view(self._decode_raw(buf).tobytes())

    def encode_reply_c(self, unique: int, error: int, payload: bytes = b"") -> bytes:
        """encode_reply through vl_encode_out_header."""
        hdr = self._tls.hdr
        _lib.vl_encode_out_header(hdr, OUT_HEADER_SIZE + len(payload), error, unique)
        return _ffi.buffer(hdr)[:] + payload

    def encode_lk_reply_c(self, unique: int, type_: int, start: int, end: int, pid: int) -> bytes:
        """encode_lk_reply through vl_encode_lk_reply."""
        lk = self._tls.lk
        _lib.vl_encode_lk_reply(lk, unique, start, end, type_, pid & _U32)
        return _ffi.buffer(lk)[:]


CODEC: PyCodec | NativeCodec = NativeCodec() if HAVE_NATIVE else PyCodec()
