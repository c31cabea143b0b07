"""A bounded atheris run of the native codec (rebuilt with ASan/UBSan), differential
against the pure-Python codec. The long run: scripts/fuzz_codec.py --asan --seconds 3600."""

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
