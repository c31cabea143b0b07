#!/usr/bin/env python3
"""Benchmark the FUSE codecs: NativeCodec vs PyCodec.

Batch decode of `messages` mixed messages (lock, interrupt, flush, release, others) in
chunks of 4096, single-message decode, and encode_lk_reply; codecs interleaved A B A B
for `rounds` rounds so drift hits both alike. Prints medians, min/max and native/python
speedups. Importable by path (scripts/ is not a package):

    spec = importlib.util.spec_from_file_location("bench_codec", "scripts/bench_codec.py")
    mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
    results = mod.run(messages=200_000, rounds=3)
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import struct
import sys
import time
from collections.abc import Callable
from pathlib import Path

try:
    from lockd.fuse import codec
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from lockd.fuse import codec

CHUNK = 4096
SINGLE_OPS = 200_000


def make_messages(n: int, seed: int = 1) -> list[bytes]:
    """A realistic mix: mostly lock requests, some interrupt/flush/release/other."""
    rng = random.Random(seed)
    hdr = struct.Struct("<IIQQIII4x")
    out = []
    for unique in range(1, n + 1):
        r = rng.random()
        nodeid, pid = rng.randrange(1, 1 << 20), rng.randrange(1, 1 << 22)
        if r < 0.6:
            op = rng.choice((31, 32, 33))
            start = rng.randrange(0, 1 << 30)
            body = struct.pack(
                "<QQQQIII4x",
                rng.randrange(1 << 32),
                rng.getrandbits(64),
                start,
                start + rng.randrange(0, 4096),
                rng.choice((0, 1, 2)),
                pid,
                rng.random() < 0.1,
            )
        elif r < 0.7:
            op, body = 36, struct.pack("<Q", rng.randrange(1, unique + 1))
        elif r < 0.8:
            op, body = 25, struct.pack("<QIIQ", rng.randrange(1 << 32), 0, 0, rng.getrandbits(64))
        elif r < 0.9:
            op = rng.choice((18, 29))
            body = struct.pack("<QIIQ", rng.randrange(1 << 32), 0o2, 2, rng.getrandbits(64))
        else:
            op, body = rng.choice((1, 3, 14, 15, 16)), bytes(rng.randrange(0, 64))
        out.append(hdr.pack(40 + len(body), op, unique, nodeid, 0, 0, pid) + body)
    return out


def _time(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def run(messages: int = 1_000_000, rounds: int = 5, gc_enabled: bool = True) -> dict:
    """Run the benchmark; returns {case: {codec: {median, min, max, unit}, ratio}}.

    gc_enabled=False disables the cyclic GC while timing: both codecs build the same
    result tuples, and the GC passes over them are a large shared cost on slow hosts."""
    if not codec.HAVE_NATIVE:
        raise RuntimeError("lockd._native is not built: nothing to compare")
    codecs = {"python": codec.PyCodec(), "native": codec.NativeCodec()}
    msgs = make_messages(messages)
    chunks = [b"".join(msgs[i : i + CHUNK]) for i in range(0, len(msgs), CHUNK)]
    singles = msgs[:SINGLE_OPS]
    lk_args = [(i, i % 3, i * 7, i * 7 + 99, i & 0xFFFF) for i in range(SINGLE_OPS)]

    # Same answers first: a fast wrong codec is worth nothing.
    for chunk in chunks[:4]:
        assert codecs["native"].decode_batch(chunk) == codecs["python"].decode_batch(chunk)

    def batch(c) -> Callable[[], object]:
        def go() -> None:
            n = 0
            for chunk in chunks:
                n += len(c.decode_batch(chunk))
            assert n == messages

        return go

    def rows(c) -> Callable[[], object]:
        def go() -> None:
            n = 0
            for chunk in chunks:
                n += len(c.decode_batch_rows(chunk))
            assert n == messages

        return go

    def single(c) -> Callable[[], object]:
        def go() -> None:
            decode = c.decode
            for m in singles:
                decode(m)

        return go

    def encode(c) -> Callable[[], object]:
        def go() -> None:
            enc = c.encode_lk_reply
            for a in lk_args:
                enc(*a)

        return go

    def encode_c(c) -> Callable[[], object]:
        # NativeCodec encodes with struct (faster than a cffi call here); this row
        # measures its C encoder against PyCodec's to keep that choice checked.
        def go() -> None:
            enc = getattr(c, "encode_lk_reply_c", c.encode_lk_reply)
            for a in lk_args:
                enc(*a)

        return go

    cases = {
        "decode_batch": (batch, messages, "ns/msg"),
        "decode_batch_rows": (rows, messages, "ns/msg"),
        "decode_single": (single, len(singles), "ns/msg"),
        "encode_lk_reply": (encode, len(lk_args), "ns/op"),
        "encode_lk_reply_c": (encode_c, len(lk_args), "ns/op"),
    }
    results: dict = {"messages": messages, "rounds": rounds, "chunk": CHUNK, "gc": gc_enabled}
    was_enabled = gc.isenabled()
    if not gc_enabled:
        gc.disable()
    try:
        _measure(cases, codecs, rounds, results)
    finally:
        if was_enabled:
            gc.enable()
    return results


def _measure(cases: dict, codecs: dict, rounds: int, results: dict) -> None:
    for case, (factory, count, unit) in cases.items():
        samples: dict[str, list[float]] = {name: [] for name in codecs}
        fns = {name: factory(c) for name, c in codecs.items()}
        for _ in range(rounds):
            for name in codecs:  # interleaved: python, native, python, native, ...
                samples[name].append(_time(fns[name]) / count * 1e9)
        entry: dict = {}
        for name, vals in samples.items():
            entry[name] = {
                "median": statistics.median(vals),
                "min": min(vals),
                "max": max(vals),
                "unit": unit,
                "values": vals,  # every round, for callers that tabulate their own stats
            }
        entry["ratio"] = entry["python"]["median"] / entry["native"]["median"]
        results[case] = entry


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--messages", type=int, default=1_000_000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--no-gc", action="store_true", help="disable the cyclic GC while timing")
    ap.add_argument("--json", action="store_true", help="print the result dict as JSON")
    args = ap.parse_args()
    res = run(args.messages, args.rounds, gc_enabled=not args.no_gc)
    if args.json:
        print(json.dumps(res, indent=2))
        return
    print(
        f"{args.messages} messages, chunks of {CHUNK}, {args.rounds} interleaved rounds,"
        f" gc {'on' if res['gc'] else 'off'}"
    )
    for case in ("decode_batch", "decode_batch_rows", "decode_single", "encode_lk_reply",
                 "encode_lk_reply_c"):
        e = res[case]
        for name in ("python", "native"):
            s = e[name]
            print(
                f"  {case:18} {name:7} median {s['median']:8.1f} {s['unit']}"
                f"  (min {s['min']:.1f}, max {s['max']:.1f})"
            )
        print(f"  {case:18} native/python speedup: {e['ratio']:.2f}x")


if __name__ == "__main__":
    main()
