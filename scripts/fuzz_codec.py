#!/usr/bin/env python3
"""Fuzz the native FUSE codec with atheris, differentially against the pure-Python codec.

    python scripts/fuzz_codec.py [--seconds N] [--asan] [-- extra libFuzzer args]

Every input is decoded by NativeCodec (decode, decode_batch, decode_batch_rows) and by
PyCodec; any difference, exception or sanitizer report is a failure (exit != 0). With
--asan the native module is first rebuilt with -fsanitize=address,undefined into a
temporary directory and loaded in place of the installed one (LD_PRELOAD of the
sanitizer runtimes, since the Python interpreter itself is not instrumented).
The test suite runs short bounded runs of the three fuzzers at once (tests/test_fuzz.py);
for a long run: --asan --seconds 3600.
"""

from __future__ import annotations

import argparse
import importlib.machinery
import importlib.util
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAN_FLAGS = "-fsanitize=address,undefined -fno-omit-frame-pointer -g -O1"


def build_sanitized(tmp: str) -> str:
    """Compile lockd._native with the sanitizers into tmp; the path of the .so."""
    env = dict(os.environ, VFS_LOCKD_CFLAGS=SAN_FLAGS, VFS_LOCKD_LDFLAGS="-fsanitize=address,undefined")
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('b', {os.path.join(ROOT, 'native', 'build_native.py')!r})\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        f"print(m.ffibuilder.compile(tmpdir={tmp!r}))\n"
    )
    # cwd outside the tree: the build script then names its sources by absolute path.
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp, check=True,
                         capture_output=True, text=True)
    so = out.stdout.strip().splitlines()[-1]
    return so if os.path.isabs(so) else os.path.join(tmp, so)


def sanitizer_runtime() -> str:
    libs = []
    for name in ("libasan.so", "libubsan.so"):
        path = subprocess.run(["gcc", f"-print-file-name={name}"], capture_output=True,
                              text=True).stdout.strip()
        if os.path.isabs(path):
            libs.append(os.path.realpath(path))
    return ":".join(libs)


def sanitized_env(so: str, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a run on the sanitized build `so` (build_sanitized): the
    sanitizer runtimes preloaded, and any report fatal."""
    return dict(os.environ if base is None else base, VFS_LOCKD_FUZZ_SO=so,
                LD_PRELOAD=sanitizer_runtime(), ASAN_OPTIONS="detect_leaks=0:abort_on_error=1",
                UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1")


def load_native_from(path: str) -> None:
    loader = importlib.machinery.ExtensionFileLoader("lockd._native", path)
    spec = importlib.util.spec_from_file_location("lockd._native", path, loader=loader)
    mod = importlib.util.module_from_spec(spec)
    loader.exec_module(mod)
    sys.modules["lockd._native"] = mod


def write_seeds(d: str) -> None:
    """Valid messages of every decoded kind, alone and back to back, to start from."""
    import struct

    hdr = struct.Struct("<IIQQIII4x")
    bodies = {
        31: struct.pack("<QQQQIII4x", 1, 2, 0, 9, 1, 42, 0),
        32: struct.pack("<QQQQIII4x", 1, 2, 5, 0x7FFFFFFFFFFFFFFF, 0, 42, 1),
        33: struct.pack("<QQQQIII4x", 1, 2, 5, 6, 2, 42, 0),
        36: struct.pack("<Q", 77),
        25: struct.pack("<QIIQ", 3, 0, 0, 9),
        18: struct.pack("<QIIQ", 3, 2, 2, 9),
        29: struct.pack("<QIIQ", 3, 2, 0, 9),
        1: b"name\0",
    }
    msgs = [hdr.pack(40 + len(b), op, i + 1, 1, 0, 0, 99) + b
            for i, (op, b) in enumerate(bodies.items())]
    for i, m in enumerate(msgs):
        with open(os.path.join(d, f"seed-{i}"), "wb") as f:
            f.write(m)
    with open(os.path.join(d, "seed-batch"), "wb") as f:
        f.write(b"".join(msgs))


def fuzz(seconds: int, extra: list[str]) -> None:
    so = os.environ.get("VFS_LOCKD_FUZZ_SO")
    if so:
        load_native_from(so)
    import atheris

    with atheris.instrument_imports():
        from lockd.fuse import codec
    native, py = codec.NativeCodec(), codec.PyCodec()
    if so:
        assert sys.modules["lockd._native"].__file__ == so

    def one_input(data: bytes) -> None:
        want = py.decode_batch(data)
        if native.decode_batch(data) != want:
            raise AssertionError(f"decode_batch differs on {data!r}")
        if native.decode_batch_rows(data).tolist() != [list(t) for t in want]:
            raise AssertionError(f"decode_batch_rows differs on {data!r}")
        if native.decode(data) != py.decode(data):
            raise AssertionError(f"decode differs on {data!r}")
        view = memoryview(bytearray(data))
        if native.decode_batch(view) != want:
            raise AssertionError("decode_batch of a memoryview differs")

    seeds = os.path.join(tempfile.gettempdir(), "vfs-lockd-fuzz-corpus")
    os.makedirs(seeds, exist_ok=True)
    write_seeds(seeds)
    atheris.Setup([sys.argv[0], f"-max_total_time={seconds}", "-max_len=512", seeds, *extra],
                  one_input)
    atheris.Fuzz()


def run(script: str, what: str, fuzz_fn) -> None:  # noqa: ANN001 - fuzz(seconds, extra)
    """Command line of a fuzz script: `--seconds N [--asan] [libFuzzer args]`."""
    ap = argparse.ArgumentParser(description=f"fuzz {what}")
    ap.add_argument("--seconds", type=int, default=60)
    ap.add_argument("--asan", action="store_true", help="rebuild with ASan/UBSan first")
    ap.add_argument("extra", nargs="*", help="extra libFuzzer arguments")
    args = ap.parse_args()
    if args.asan and "VFS_LOCKD_FUZZ_SO" not in os.environ:
        # Coverage feedback does not work with the sanitizer runtime preloaded, so a
        # coverage-guided run grows the corpus first, then the sanitized build replays
        # and mutates it.
        half = max(args.seconds // 2, 1)
        rc = subprocess.run([sys.executable, script, "--seconds", str(half),
                             *args.extra]).returncode
        if rc:
            sys.exit(rc)
        with tempfile.TemporaryDirectory() as tmp:
            rc = subprocess.run([sys.executable, script, "--seconds", str(half),
                                 *args.extra], env=sanitized_env(build_sanitized(tmp))
                                ).returncode
        sys.exit(rc)
    fuzz_fn(args.seconds, args.extra)


def main() -> None:
    run(os.path.abspath(__file__), "the native codec", fuzz)


if __name__ == "__main__":
    main()
