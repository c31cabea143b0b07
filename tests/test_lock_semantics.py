"""Lock semantics through mounts match the host file system's, scenario by scenario.

Each scenario (tests/lockscenario.py) runs first on the host directory itself, the
reference, then through a mount of it; what a separate process sees after every step
must be the same through the mount, from a second guest's mount and on the host. The
scenarios are the ones real programs depend on and that a FUSE server has to infer:
the guest kernel sends no unlock when an OFD lock's description goes away (QEMU image
locking, Samba and modern libraries use OFD locks), and closing any descriptor of a file
drops the process's classic POSIX locks on it. Both modes: embedded and `--lockd`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

pytestmark = pytest.mark.fuse

SCENARIO = str(Path(__file__).with_name("lockscenario.py"))

SCENARIOS = {
    "ofd close frees": [
        ["a", "open", "x"], ["a", "ofd", "x", "w", 0, 10], ["probe", 0, 10],
        ["a", "close", "x"], ["probe", 0, 10]],
    "ofd process exit frees": [
        ["a", "open", "x"], ["a", "ofd", "x", "w", 0, 10], ["probe", 0, 10],
        ["a", "exit"], ["probe", 0, 10]],
    "ofd dup keeps until the last close": [
        ["a", "open", "x"], ["a", "ofd", "x", "w", 0, 10], ["a", "dup", "x", "y"],
        ["a", "close", "x"], ["probe", 0, 10], ["a", "close", "y"], ["probe", 0, 10]],
    "ofd fork keeps until the last close": [
        ["a", "open", "x"], ["a", "ofd", "x", "r", 0, 10], ["a", "fork", "c"],
        ["a", "close", "x"], ["probe", 0, 10], ["c", "ofd", "x", "w", 5, 10],
        ["probe", 0, 20], ["c", "exit"], ["probe", 0, 20]],
    "ofd passed with SCM_RIGHTS keeps until the last close": [
        ["a", "open", "x"], ["a", "ofd", "x", "w", 0, 10], ["a", "send", "x", "b", "y"],
        ["a", "close", "x"], ["probe", 0, 10], ["b", "close", "y"], ["probe", 0, 10]],
    "posix and ofd of one process, close the ofd descriptor": [
        ["a", "open", "p"], ["a", "posix", "p", "w", 0, 5], ["a", "open", "o"],
        ["a", "ofd", "o", "w", 20, 5], ["probe", 0, 30], ["a", "close", "o"],
        ["probe", 0, 30]],
    "posix and ofd of one process, close the posix descriptor": [
        ["a", "open", "p"], ["a", "posix", "p", "w", 0, 5], ["a", "open", "o"],
        ["a", "ofd", "o", "w", 20, 5], ["a", "close", "p"], ["probe", 0, 30],
        ["a", "close", "o"], ["probe", 0, 30]],
    "posix lock survives the close of a descriptor another process shares": [
        ["a", "open", "p"], ["a", "fork", "c"], ["a", "posix", "p", "w", 0, 5],
        ["c", "close", "p"], ["probe", 0, 5], ["a", "close", "p"], ["probe", 0, 5]],
    "posix owner locks again through a second descriptor": [
        ["a", "open", "p"], ["a", "open", "q"], ["a", "posix", "p", "w", 0, 5],
        ["a", "close", "p"], ["probe", 0, 5], ["a", "posix", "q", "w", 0, 5],
        ["probe", 0, 5], ["a", "close", "q"], ["probe", 0, 5]],
    "ofd locks of two descriptors of one process conflict": [
        ["a", "open", "x"], ["a", "open", "y"], ["a", "ofd", "x", "w", 0, 10],
        ["a", "ofd", "y", "w", 5, 10], ["a", "close", "x"], ["probe", 0, 10],
        ["a", "ofd", "y", "w", 5, 10], ["probe", 0, 20], ["a", "close", "y"],
        ["probe", 0, 20]],
}


def run(directory: Path, name: str, steps: list, expected: list | None = None,
        probes: tuple[Path, ...] = ()) -> list:
    r = subprocess.run([sys.executable, SCENARIO, str(directory), name, json.dumps(steps),
                        json.dumps(expected) if expected else "-", *map(str, probes)],
                       capture_output=True, text=True, timeout=120, cwd=REPO)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.mark.parametrize("mode", ["embedded", "lockd"])
def test_scenarios_match_the_host(mounts, daemon, mode: str) -> None:
    args = ["--lockd", daemon.sock] if mode == "lockd" else []
    source, (ma, mb) = mounts(2, args)
    failures = {}
    for i, (name, steps) in enumerate(SCENARIOS.items()):
        f = f"f{i}"  # a file per scenario: one's leftovers cannot decide another's
        (source / f).write_bytes(b"x" * 100)
        want = run(source, f, steps)
        got = run(ma.path, f, steps, want, (mb.path, source))
        if got != want:
            failures[name] = {"host": want, "mount": got}
    assert not failures, json.dumps(failures, indent=1)
