"""scripts/qemu-migratable's QEMU loads modules of its own build only.

libvirt probes every QEMU it runs with QMP `qom-list-types`, which loads every module
that provides a QOM type (util/module.c `module_load_qom_all`). QEMU takes a module from
the first directory that has its file: QEMU_MODULE_DIR, then its build's module
directory. On Debian 12 that second directory holds the host's QEMU 7.2 modules, so a
backported QEMU 10 whose own tree lacks a module takes 7.2's (refused: "Only modules
from the same build can be loaded", then an assertion in module.c on the next one). On
Debian 13 the host's QEMU is the migratable one and its build's directory is its own.
The probe runs here as libvirt runs it (`-machine none`, QMP) with the dynamic loader
reporting every file it opens (LD_DEBUG=files): every module it opened must come from
the directory of the QEMU's own build, and the probe must answer with the types the
modules provide."""

from __future__ import annotations

import json
import os
import re
import selectors
import subprocess
import time
from pathlib import Path

from procutil import fail_or_skip
from procutil import stop as stop_process

from rig.vm import REPO, qemu_missing

QEMU_MIGRATABLE = REPO / "scripts" / "qemu-migratable"
# a module's file name (meson: <subsystem>-<name>.so) as the loader reports it
MODULE = re.compile(r"^(accel|audio|block|chardev|hw|ui)-[A-Za-z0-9_-]+\.so$")
LOADED = re.compile(r"file=(\S+)\s+\[\d+\];\s+dynamically loaded by")
ANSWER_S = 120.0  # an answer that must come (2 loaded cores): not a speed bound


def _fail_or_skip(why: str) -> None:
    fail_or_skip(why, "the migratable QEMU must be testable")


def _command() -> tuple[list[str], dict[str, str]]:
    """The migratable QEMU as argv and the environment `--where` gives it (`env VAR=...`)."""
    r = subprocess.run([str(QEMU_MIGRATABLE), "--where"], capture_output=True, text=True,
                       timeout=900)
    if r.returncode != 0:
        _fail_or_skip(f"no QEMU 8.2+ (scripts/qemu-migratable): {r.stderr.strip()}")
    argv = r.stdout.split()
    env: dict[str, str] = {}
    if argv and argv[0] == "env":
        argv.pop(0)
        while argv and "=" in argv[0] and not argv[0].startswith("-"):
            key, _, value = argv.pop(0).partition("=")
            env[key] = value
    return argv, env


def _build_module_dir(binary: str) -> Path:
    """The module directory a Debian QEMU was built with (not relocated: Debian builds
    it fixed), read from the binary itself."""
    with open(binary, "rb") as f:
        data = f.read()
    m = re.search(rb"\x00(/usr/lib/[a-z0-9_]+-linux-gnu[a-z0-9_]*/qemu)\x00", data)
    assert m, f"no module directory string in {binary}"
    return Path(m[1].decode())


class Qmp:
    """QMP over the QEMU's stdin/stdout, one command and its answer at a time."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdin is not None and proc.stdout is not None
        self.proc, self._buf = proc, b""
        self._sel = selectors.DefaultSelector()
        self._sel.register(proc.stdout, selectors.EVENT_READ)

    def _line(self) -> dict:
        deadline = time.monotonic() + ANSWER_S
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            assert left > 0 and self._sel.select(left), "QEMU did not answer on QMP"
            chunk = os.read(self.proc.stdout.fileno(), 65536)  # type: ignore[union-attr]
            assert chunk, f"QEMU closed QMP (exit {self.proc.wait(ANSWER_S)})"
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return json.loads(line)

    def greeting(self) -> dict:
        return self._line()

    def execute(self, command: str) -> dict:
        self.proc.stdin.write(json.dumps({"execute": command}).encode() + b"\n")  # type: ignore[union-attr]
        self.proc.stdin.flush()  # type: ignore[union-attr]
        while True:
            msg = self._line()
            if "event" not in msg:
                return msg


def test_probe_loads_modules_of_its_own_build_only(tmp_path: Path) -> None:
    why = qemu_missing()
    if why:
        _fail_or_skip(why)
    argv, extra = _command()
    own = Path(extra.get("QEMU_MODULE_DIR") or _build_module_dir(argv[0]))
    trace = tmp_path / "ld"
    env = dict(os.environ, **extra, LD_DEBUG="files", LD_DEBUG_OUTPUT=str(trace))
    types: dict = {}
    failure = ""
    with open(tmp_path / "stderr", "wb") as err:
        proc = subprocess.Popen(argv + ["-machine", "none", "-nodefaults", "-display", "none",
                                        "-S", "-qmp", "stdio"],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
                                env=env)
    try:
        qmp = Qmp(proc)
        assert "QMP" in qmp.greeting()
        assert "return" in qmp.execute("qmp_capabilities")
        types = qmp.execute("qom-list-types")
        assert "return" in qmp.execute("quit")
        proc.wait(ANSWER_S)
    except AssertionError as exc:  # the modules it loaded say more: reported first
        failure = str(exc)
    finally:
        stop_process(proc)
    stderr = (tmp_path / "stderr").read_text(errors="replace")
    loaded = [Path(p) for f in tmp_path.glob("ld.*")
              for p in LOADED.findall(f.read_text(errors="replace"))]
    modules = [p for p in loaded if MODULE.match(p.name)]
    foreign = [str(p) for p in modules if p.parent != own]
    assert not foreign, f"modules loaded from outside {own}: {foreign}\n{stderr}"
    assert not failure, f"{failure}\n{stderr}"
    assert "same build" not in stderr, stderr
    assert proc.returncode == 0, stderr
    assert "return" in types, types
    names = {t["name"] for t in types["return"]}
    # vhost-user-fs is built in; virtio-gpu-pci comes from a module (hw-display-virtio-gpu-pci)
    assert {"vhost-user-fs-pci", "virtio-gpu-pci"} <= names
    assert own / "hw-display-virtio-gpu-pci.so" in modules, modules
