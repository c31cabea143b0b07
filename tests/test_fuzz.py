"""Bounded atheris runs: the native codec (rebuilt with ASan/UBSan), differential against
the pure-Python codec; the virtqueue walker against its model; the FUSE session fed every
opcode as a hostile guest. The long runs: scripts/fuzz_*.py --asan --seconds 3600."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_fuzz_native_codec_with_sanitizers(tmp_path):
    pytest.importorskip("atheris")
    env = dict(os.environ, TMPDIR=str(tmp_path))
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "fuzz_codec.py"), "--asan",
         "--seconds", "40"],
        env=env, capture_output=True, text=True, timeout=300,
    )
    tail = (proc.stdout + proc.stderr)[-3000:]
    assert proc.returncode == 0, tail
    assert tail.count("DONE") == 2, tail  # both phases ran to their time limit


def test_fuzz_native_virtqueue_with_sanitizers(tmp_path):
    """The descriptor-chain walker of the vhost-user transport, differential against its
    Python model (scripts/fuzz_virtqueue.py); ~20 s: 10 s guided, 10 s under ASan/UBSan."""
    pytest.importorskip("atheris")
    env = dict(os.environ, TMPDIR=str(tmp_path))
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "fuzz_virtqueue.py"), "--asan",
         "--seconds", "20"],
        env=env, capture_output=True, text=True, timeout=300,
    )
    tail = (proc.stdout + proc.stderr)[-3000:]
    assert proc.returncode == 0, tail
    assert tail.count("DONE") == 2, tail


def test_fuzz_session_every_opcode(tmp_path):
    """The FUSE session as a hostile guest drives it (scripts/fuzz_session.py): every
    opcode, replies well-formed and within the guest's buffer, no special file opened,
    nothing outside the share touched, no descriptor left; ~20 s: 10 s guided, 10 s with
    the native codec under ASan/UBSan."""
    pytest.importorskip("atheris")
    env = dict(os.environ, TMPDIR=str(tmp_path))
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "fuzz_session.py"), "--asan",
         "--seconds", "20"],
        env=env, capture_output=True, text=True, timeout=300, cwd=str(tmp_path),
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert out.count("DONE") == 2, out[-3000:]  # both phases ran to their time limit
