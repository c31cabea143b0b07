"""Bounded atheris runs: the native codec (rebuilt with ASan/UBSan), differential against
the pure-Python codec; the virtqueue walker against its model; the FUSE session fed every
opcode as a hostile guest. The long runs: scripts/fuzz_*.py --asan --seconds 3600.

Each fuzzer runs in two phases, as `scripts/fuzz_*.py --asan` does: a coverage-guided run
grows a corpus (coverage feedback does not work with the sanitizer runtime preloaded),
then a run on the ASan/UBSan build replays and mutates that corpus. A fuzzer is one
single-threaded process, so the three run side by side (the sanitized build is made
once, while the guided phases run), and each phase must run to its time limit."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from fuzz_codec import build_sanitized, sanitized_env  # noqa: E402

# seconds of each phase: a fuzzer's share of the two cores is larger once the shortest
# (virtqueue) is done
PHASE_SECONDS = {"codec": 16, "virtqueue": 8, "session": 12}
SCRIPTS = {"codec": "fuzz_codec.py", "virtqueue": "fuzz_virtqueue.py",
           "session": "fuzz_session.py"}


class Phase:
    """One fuzzer run in the background, its output in a file."""

    def __init__(self, name: str, work: Path, phase: str, env: dict[str, str]) -> None:
        self.log = work / f"{phase}.log"
        with open(self.log, "wb") as out:
            # cwd: the session fuzzer's share and artifacts stay in its own directory
            self.proc = subprocess.Popen(
                [sys.executable, str(ROOT / "scripts" / SCRIPTS[name]), "--seconds",
                 str(PHASE_SECONDS[name])], stdout=out, stderr=subprocess.STDOUT,
                env=dict(env, TMPDIR=str(work)), cwd=work)

    def result(self, timeout: float = 300) -> tuple[int, str]:
        rc = self.proc.wait(timeout)
        return rc, self.log.read_text(errors="replace")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def campaign(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, list]]:
    """name -> [(exit status, output) of the guided phase, of the sanitized phase]."""
    pytest.importorskip("atheris")
    work = {n: tmp_path_factory.mktemp(f"fuzz-{n}") for n in SCRIPTS}
    running: list[Phase] = []
    try:
        guided = {n: Phase(n, work[n], "guided", dict(os.environ)) for n in SCRIPTS}
        running += guided.values()
        env = sanitized_env(build_sanitized(str(tmp_path_factory.mktemp("asan"))))
        results: dict[str, list] = {}
        sanitized: dict[str, Phase] = {}
        for n in sorted(SCRIPTS, key=PHASE_SECONDS.get):  # each as soon as its corpus is
            results[n] = [guided[n].result()]
            if results[n][0][0] == 0:
                sanitized[n] = Phase(n, work[n], "asan", env)
                running.append(sanitized[n])
        for n, p in sanitized.items():
            results[n].append(p.result())
        yield results
    finally:
        for p in running:
            p.kill()


def check(results: list) -> None:
    assert len(results) == 2, results[0][1][-3000:]  # the guided phase failed
    for rc, out in results:
        assert rc == 0, out[-3000:]
        assert "DONE" in out, out[-3000:]  # ran to its time limit


def test_fuzz_native_codec_with_sanitizers(campaign) -> None:
    check(campaign["codec"])


def test_fuzz_native_virtqueue_with_sanitizers(campaign) -> None:
    """The descriptor-chain walker of the vhost-user transport, differential against its
    Python model (scripts/fuzz_virtqueue.py)."""
    check(campaign["virtqueue"])


def test_fuzz_session_every_opcode(campaign) -> None:
    """The FUSE session as a hostile guest drives it (scripts/fuzz_session.py): every
    opcode, replies well-formed and within the guest's buffer, no special file opened,
    nothing outside the share touched, no descriptor left; the second phase with the
    native codec under ASan/UBSan."""
    check(campaign["session"])
