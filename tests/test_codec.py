"""The FUSE codecs: known vectors, and PyCodec vs NativeCodec on arbitrary and structured
(valid and mutated) input."""

from __future__ import annotations

import errno
import os
import struct
import subprocess
import sys
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lockd.fuse import codec
from lockd.fuse.codec import (
    DECODED_FIELDS,
    FUSE_FLUSH,
    FUSE_GETLK,
    FUSE_INTERRUPT,
    FUSE_RELEASE,
    FUSE_RELEASEDIR,
    FUSE_SETLK,
    FUSE_SETLKW,
    PyCodec,
)

U8 = st.integers(0, 2**8 - 1)
U32 = st.integers(0, 2**32 - 1)
U64 = st.integers(0, 2**64 - 1)
OPCODES = [
    FUSE_RELEASE,
    FUSE_FLUSH,
    FUSE_RELEASEDIR,
    FUSE_GETLK,
    FUSE_SETLK,
    FUSE_SETLKW,
    FUSE_INTERRUPT,
    1,
    15,
    26,
    38,
    0,
    2**32 - 1,
]
EINVAL = errno.EINVAL

py = PyCodec()
native = codec.NativeCodec() if codec.HAVE_NATIVE else None
needs_native = pytest.mark.skipif(native is None, reason="lockd._native not built")
CODECS = [py] + ([native] if native is not None else [])


def header(
    length: int,
    opcode: int,
    unique: int = 0,
    nodeid: int = 0,
    uid: int = 0,
    gid: int = 0,
    pid: int = 0,
    extlen: int = 0,
) -> bytes:
    return struct.pack("<IIQQIIIHH", length, opcode, unique, nodeid, uid, gid, pid, extlen, 0)


def msg(opcode: int, body: bytes, unique: int = 1, **kw: int) -> bytes:
    return header(40 + len(body), opcode, unique, **kw) + body


def lk_in(
    fh: int, owner: int, start: int, end: int, type_: int, pid: int, flags: int = 0, pad: int = 0
) -> bytes:
    return struct.pack("<QQQQIIII", fh, owner, start, end, type_, pid, flags, pad)


def as_dict(t: tuple[int, ...]) -> dict[str, int]:
    return dict(zip(DECODED_FIELDS, t, strict=True))


# ------------------------------------------------------------------ known vectors


@pytest.mark.parametrize("c", CODECS, ids=lambda c: c.name)
class TestVectors:
    def test_setlkw(self, c) -> None:
        m = msg(
            FUSE_SETLKW,
            lk_in(5, 0xDEADBEEF00000001, 10, 2**63 - 1, 1, 4242, 1, 0xFFFFFFFF),
            unique=77,
            nodeid=3,
            uid=1000,
            gid=100,
            pid=4242,
        )
        assert c.decode(m) == (
            0,
            88,
            FUSE_SETLKW,
            77,
            3,
            1000,
            100,
            4242,
            5,
            0xDEADBEEF00000001,
            10,
            2**63 - 1,
            1,
            4242,
            1,
            0,
            0,
            0,
        )

    def test_interrupt_flush_release(self, c) -> None:
        d = as_dict(c.decode(msg(FUSE_INTERRUPT, struct.pack("<Q", 2**64 - 1), unique=9)))
        assert d["status"] == 0 and d["target"] == 2**64 - 1 and d["len"] == 48
        d = as_dict(c.decode(msg(FUSE_FLUSH, struct.pack("<QIIQ", 7, 0xAAAA, 0xBBBB, 99))))
        assert (d["status"], d["fh"], d["owner"], d["flags"]) == (0, 7, 99, 0)
        for op in (FUSE_RELEASE, FUSE_RELEASEDIR):
            d = as_dict(c.decode(msg(op, struct.pack("<QIIQ", 7, 0o2, 2, 1234))))
            assert (d["status"], d["fh"], d["flags"], d["release_flags"], d["owner"]) == (
                0,
                7,
                0o2,
                2,
                1234,
            )

    def test_other_opcode_ignores_body(self, c) -> None:
        assert c.decode(msg(26, b"\xff" * 64, unique=3)) == (0, 104, 26, 3, 0, 0, 0, 0) + (0,) * 10
        assert c.decode(header(40, 38, 4)) == (0, 40, 38, 4) + (0,) * 14

    def test_short_buffer(self, c) -> None:
        for n in (0, 1, 39):
            assert c.decode(b"\xff" * n) == (EINVAL,) + (0,) * 17

    def test_bad_header_len(self, c) -> None:
        m = msg(FUSE_SETLK, lk_in(1, 2, 3, 4, 1, 5), unique=6, pid=8)
        for bad in (0, 39, len(m) + 1, 2**32 - 1):
            t = c.decode(struct.pack("<I", bad) + m[4:])
            assert t == (EINVAL, bad, FUSE_SETLK, 6, 0, 0, 0, 8) + (0,) * 10
        # Extra bytes after the message are fine (the next message).
        assert c.decode(m + b"junk")[0] == 0

    def test_short_body(self, c) -> None:
        cases = {
            FUSE_GETLK: 48,
            FUSE_SETLK: 48,
            FUSE_SETLKW: 48,
            FUSE_INTERRUPT: 8,
            FUSE_FLUSH: 24,
            FUSE_RELEASE: 24,
            FUSE_RELEASEDIR: 24,
        }
        for op, need in cases.items():
            t = c.decode(msg(op, b"\x01" * (need - 1), unique=5) + b"\x01" * 64)
            assert t == (EINVAL, 40 + need - 1, op, 5, 0, 0, 0, 0) + (0,) * 10, op
            assert c.decode(msg(op, b"\x01" * need))[0] == 0

    def test_batch(self, c) -> None:
        a = msg(FUSE_SETLK, lk_in(1, 2, 3, 4, 1, 5), unique=1)
        b = msg(FUSE_SETLK, b"\0" * 8, unique=2)  # short body: EINVAL, but len is usable
        d = msg(FUSE_INTERRUPT, struct.pack("<Q", 1), unique=3)
        out = c.decode_batch(a + b + d)
        assert [t[3] for t in out] == [1, 2, 3]
        assert [t[0] for t in out] == [0, EINVAL, 0]
        assert c.decode_batch(b"") == []
        # Trailing partial header: one EINVAL tuple, then stop.
        out = c.decode_batch(a + d[:20])
        assert len(out) == 2 and out[1] == (EINVAL,) + (0,) * 17
        # Bad len: stop after it even though bytes follow.
        bad = struct.pack("<I", 10) + a[4:]
        out = c.decode_batch(a + bad + a)
        assert [t[0] for t in out] == [0, EINVAL] and out[1][1] == 10

    def test_buffer_types(self, c) -> None:
        m = msg(FUSE_GETLK, lk_in(1, 2, 3, 4, 0, 5), unique=42) * 3
        want = c.decode_batch(m)
        assert c.decode_batch(bytearray(m)) == want
        assert c.decode_batch(memoryview(m)) == want
        assert c.decode(memoryview(m)[88:]) == want[1]

    def test_encode(self, c) -> None:
        assert c.encode_reply(9, 0) == struct.pack("<IiQ", 16, 0, 9)
        assert (
            c.encode_reply(2**64 - 1, -errno.EAGAIN, b"abc")
            == struct.pack("<IiQ", 19, -errno.EAGAIN, 2**64 - 1) + b"abc"
        )
        assert c.encode_lk_reply(5, 1, 0, 2**63 - 1, 1234) == struct.pack(
            "<IiQQQII", 40, 0, 5, 0, 2**63 - 1, 1, 1234
        )
        assert c.encode_lk_reply(5, 2, 0, 0, -1)[-4:] == b"\xff" * 4  # OFD holder pid


# ------------------------------------------------------------------ differential

SETTINGS = settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def body_for(draw: st.DrawFn, opcode: int) -> bytes:
    """A body around the size thresholds, with random content."""
    need = {
        FUSE_GETLK: 48,
        FUSE_SETLK: 48,
        FUSE_SETLKW: 48,
        FUSE_INTERRUPT: 8,
        FUSE_FLUSH: 24,
        FUSE_RELEASE: 24,
        FUSE_RELEASEDIR: 24,
    }.get(opcode, 0)
    size = draw(
        st.one_of(st.sampled_from([need, max(need - 1, 0), need + 1, 0]), st.integers(0, 96))
    )
    if opcode in (FUSE_GETLK, FUSE_SETLK, FUSE_SETLKW) and size >= 48 and draw(st.booleans()):
        lk = lk_in(
            draw(U64), draw(U64), draw(U64), draw(U64), draw(U32), draw(U32), draw(U32), draw(U32)
        )
        return lk + draw(st.binary(min_size=size - 48, max_size=size - 48))
    return draw(st.binary(min_size=size, max_size=size))


@st.composite
def message(draw: st.DrawFn) -> bytes:
    opcode = draw(st.sampled_from(OPCODES) | U32)
    body = draw(body_for(opcode))
    m = (
        header(
            40 + len(body),
            opcode,
            draw(U64),
            draw(U64),
            draw(U32),
            draw(U32),
            draw(U32),
            draw(st.integers(0, 2**16 - 1)),
        )
        + body
    )
    mutation = draw(st.sampled_from(["none"] * 4 + ["len", "truncate", "flip"]))
    if mutation == "len":
        m = (
            struct.pack("<I", draw(st.sampled_from([0, 39, 40, len(m) - 1, len(m) + 1]) | U32))
            + m[4:]
        )
    elif mutation == "truncate":
        m = m[: draw(st.integers(0, len(m)))]
    elif mutation == "flip" and m:
        i = draw(st.integers(0, len(m) - 1))
        m = m[:i] + bytes([m[i] ^ draw(U8)]) + m[i + 1 :]
    return m


@needs_native
@SETTINGS
@given(st.binary(max_size=400))
def test_differential_any_bytes(buf: bytes) -> None:
    assert native.decode(buf) == py.decode(buf)
    assert native.decode_batch(buf) == py.decode_batch(buf)


@needs_native
@SETTINGS
@given(st.lists(message(), max_size=12), st.binary(max_size=50))
def test_differential_structured(msgs: list[bytes], tail: bytes) -> None:
    buf = b"".join(msgs) + tail
    assert native.decode_batch(buf) == py.decode_batch(buf)
    assert native.decode_batch(bytearray(buf)) == py.decode_batch(memoryview(buf))
    want = [list(t) for t in py.decode_batch(buf)]
    assert native.decode_batch_rows(buf).tolist() == want
    assert py.decode_batch_rows(buf).tolist() == want
    for m in msgs:
        assert native.decode(m) == py.decode(m)
        assert len(py.decode(m)) == 18


@needs_native
@SETTINGS
@given(st.lists(message().filter(lambda m: len(m) >= 40), min_size=1, max_size=20))
def test_batch_is_sequence_of_single_decodes(msgs: list[bytes]) -> None:
    # Use only messages whose len is valid, so every one of them is found by the batch.
    good = [struct.pack("<I", len(m)) + m[4:] for m in msgs]
    buf = b"".join(good)
    want = [py.decode(m) for m in good]
    assert py.decode_batch(buf) == want
    assert native.decode_batch(buf) == want


@needs_native
@SETTINGS
@given(U64, st.integers(-4095, 0), st.binary(max_size=64), U32, U64, U64, U32)
def test_encode_round_trip(
    unique: int, error: int, payload: bytes, type_: int, start: int, end: int, pid: int
) -> None:
    encoders = [
        (py.encode_reply, py.encode_lk_reply),
        (native.encode_reply, native.encode_lk_reply),
        (native.encode_reply_c, native.encode_lk_reply_c),
    ]  # the C encoders
    for encode_reply, encode_lk_reply in encoders:
        out = encode_reply(unique, error, payload)
        assert struct.unpack_from("<IiQ", out) == (16 + len(payload), error, unique)
        assert out[16:] == payload
        lk = encode_lk_reply(unique, type_, start, end, pid)
        assert struct.unpack("<IiQQQII", lk) == (40, 0, unique, start, end, type_, pid)
    assert native.encode_lk_reply_c(1, 0, 0, 0, -1) == py.encode_lk_reply(1, 0, 0, 0, -1)


@needs_native
def test_native_threads_do_not_share_buffers() -> None:
    msgs = [msg(FUSE_SETLK, lk_in(i, i, i, i + 1, 1, i), unique=i) for i in range(200)]
    buf = b"".join(msgs)
    want = py.decode_batch(buf)
    errors: list[str] = []

    def work(k: int) -> None:
        for _ in range(200):
            part = b"".join(msgs[k:])
            if native.decode_batch(part) != want[k:] or native.decode(msgs[k]) != want[k]:
                errors.append(f"thread {k}")
                return

    threads = [threading.Thread(target=work, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


@needs_native
def test_batch_grows_scratch_buffer() -> None:
    m = header(40, 1, 7)
    buf = m * 20_000  # more than the initial 4096-tuple scratch buffer
    out = native.decode_batch(buf)
    assert len(out) == 20_000 and out[-1] == (0, 40, 1, 7) + (0,) * 14


def test_codec_choice() -> None:
    assert isinstance(codec.CODEC, codec.NativeCodec if codec.HAVE_NATIVE else PyCodec)
    assert len(DECODED_FIELDS) == 18
    # The escape hatch really selects the fallbacks.
    code = (
        "from lockd.fuse import codec; from lockd.engine import ofd; "
        "print(type(codec.CODEC).__name__, codec.HAVE_NATIVE, ofd.CAN_WAKE)"
    )
    env = dict(os.environ, VFS_LOCKD_NO_NATIVE="1")
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout.split()
    assert out == ["PyCodec", "False", "False"]
