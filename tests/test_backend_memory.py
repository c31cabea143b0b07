"""What a virtio-fs back-end imports, every guest pays for: one back-end process (and its
sandbox parent) per guest, so a module loaded "just in case" costs megabytes times the
number of guests (scripts/bench --only memory measures it). A back-end imports what its
configuration needs, before its sandbox, and nothing it serves needs more: the journal
(sqlite3 and the journal's modules) only with --journal, the daemon's client only with
--lockd, click (the other verbs' command line) and OpenSSL not at all.

Real back-end processes (default sandbox: namespace + seccomp kill filter) driven by the
Python vhost-user front-end; every module a process imports is read from CPython's own
import log (PYTHONPROFILEIMPORTTIME), parent and sandboxed child alike.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO
from procutil import stop as stop_process
from procutil import wait_until
from test_vhost_user import REQ, init, lk, lookup, open_file
from vhost_frontend import Frontend

from fuse_server import protocol as P
from fuse_server.launch import READY_LINE
from lockd.api import F_UNLCK, F_WRLCK

VERB = [sys.executable, "-c", "import sys; from lockd.cli import main; sys.exit(main())",
        "virtiofs"]
DROPIN = [sys.executable, "-c", "from fuse_server.virtiofs_cli import main; main()"]
JOURNAL = {"lockd.journal.store", "sqlite3", "sqlite_utils", "numpy"}
# Not needed by any back-end: the other verbs' command line, OpenSSL (hashlib)
NEVER = {"click", "_hashlib"}


def _root_only() -> None:
    if os.geteuid() != 0:
        if os.environ.get("CI") == "true":
            pytest.fail("the namespace sandbox needs root (CI=true)")
        pytest.skip("the namespace sandbox needs root")


def imported(log: str) -> set[str]:
    """Every module named in CPython's import log (`import time: us | us | name`)."""
    out = set()
    for line in log.splitlines():
        if line.startswith("import time:") and line.count("|") == 2:
            name = line.rsplit("|", 1)[1].strip()
            if name != "imported package":
                out.add(name)
    return out


def serve_and_log(tmp_path: Path, cmd: list[str], args: list[str]) -> str:
    """Start a back-end, serve a FUSE session with a lock pair through it, let it exit
    when its front-end goes; its output (the import log included)."""
    share = tmp_path / "share"
    share.mkdir()
    (share / "f").write_bytes(b"hello\n")
    sock = tmp_path / "vu.sock"
    log = tmp_path / "backend.log"
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONPROFILEIMPORTTIME="1")
    with open(log, "wb") as logf:
        proc = subprocess.Popen([*cmd, f"--socket-path={sock}", f"--shared-dir={share}", *args],
                                stdout=logf, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    fe = None
    try:
        assert wait_until(lambda: READY_LINE.encode() in log.read_bytes()
                          or proc.poll() is not None, 30), "no ready line"
        assert proc.poll() is None, log.read_text(errors="replace")[-3000:]
        fe = Frontend(str(sock))
        assert init(fe) & P.POSIX_LOCKS
        nodeid = lookup(fe, b"f")
        fh = open_file(fe, nodeid)
        out = fe.fuse(REQ, P.READ, P.READ_IN.pack(fh, 0, 4096, 0, 0, os.O_RDWR, 0), nodeid)
        assert out.payload == b"hello\n"
        for typ in (F_WRLCK, F_UNLCK):
            assert fe.fuse(REQ, P.SETLK, lk(fh, 7, typ), nodeid).error == 0
        fe.close()
        fe = None
        # It served everything inside its sandbox and exits 0 now that the front-end
        # is gone: no import was missing there, no system call killed it.
        assert proc.wait(30) == 0, log.read_text(errors="replace")[-3000:]
    finally:
        if fe is not None:
            with contextlib.suppress(OSError):
                fe.close()
        stop_process(proc)
    return log.read_text(errors="replace")


@pytest.mark.parametrize("entry", ["vfs-lockd-virtiofsd", "vfs-lockd virtiofs"])
def test_embedded_backend_imports_neither_journal_nor_daemon_client(tmp_path: Path,
                                                                    entry: str) -> None:
    _root_only()
    out = serve_and_log(tmp_path, DROPIN if entry == "vfs-lockd-virtiofsd" else VERB, [])
    assert "sandbox=namespace" in out and "embedded lock manager" in out, out[-3000:]
    mods = imported(out)
    assert "fuse_server.session" in mods and "lockd.engine.manager" in mods  # the log works
    unwanted = JOURNAL | NEVER | {"lockd.daemon.client"}
    assert not mods & unwanted, sorted(mods & unwanted)


def test_journal_is_imported_when_asked_for(tmp_path: Path) -> None:
    """The other side of the same switch: --journal loads the journal before the
    sandbox, and the back-end serves with it."""
    _root_only()
    out = serve_and_log(tmp_path, DROPIN, [f"--journal={tmp_path / 'j.db'}"])
    mods = imported(out)
    assert {"lockd.journal.store", "sqlite3"} <= mods, sorted(mods & JOURNAL)


# Modules nothing a back-end runs needs, that cost every back-end heap all the same:
# `typing` ~0.7 MiB (its NamedTuple class syntax comes from lockd/structs.py instead;
# Any/Protocol are imported for type checkers only), `dataclasses` ~1 MiB with the
# inspect, ast and dis it pulls in and the methods it generates.
PLAIN = {"typing": {"typing"}, "dataclasses": {"dataclasses", "inspect", "ast", "dis"}}


@pytest.mark.parametrize("entry", ["vfs-lockd-virtiofsd", "vfs-lockd virtiofs"])
@pytest.mark.parametrize("group", ["typing", "dataclasses"])
def test_backend_imports_neither_typing_nor_dataclasses(tmp_path: Path, entry: str,
                                                        group: str) -> None:
    _root_only()
    mods = imported(serve_and_log(tmp_path, DROPIN if entry == "vfs-lockd-virtiofsd" else VERB,
                                  []))
    assert "fuse_server.session" in mods and "lockd.api" in mods  # the log works
    assert not mods & PLAIN[group], sorted(mods & PLAIN[group])
