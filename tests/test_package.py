"""The Debian package (`make deb`): built here, its contents checked without installing it
(scripts/package-test installs it in booted Debian 12 and 13 roots; that takes minutes).
And the lock daemon under socket activation, as vfs-lockd.socket starts it."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from procutil import stop, wait_until

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
SYS_PYTHON = "/usr/bin/python3"  # Debian's: the package runs on it, not on the venv's


@pytest.fixture(scope="module")
def package(tmp_path_factory) -> tuple[Path, Path]:
    """(the .deb, the tree it unpacks to)."""
    tmp = tmp_path_factory.mktemp("deb")
    env = dict(os.environ, DEB_OUT=str(tmp / "out"), DEB_WORK=str(tmp / "work"))
    out = subprocess.run(["bash", str(ROOT / "packaging/build-deb")], env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    debs = sorted((tmp / "out").glob("vfs-lockd_*.deb"))
    assert len(debs) == 1, (debs, out.stdout)
    tree = tmp / "tree"
    subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(tree)], check=True)
    return debs[0], tree


def _field(deb: Path, name: str) -> str:
    return subprocess.run(["dpkg-deb", "-f", str(deb), name], check=True,
                          capture_output=True, text=True).stdout.strip()


def _contents(deb: Path) -> dict[str, str]:
    """path -> the `dpkg-deb -c` line (mode, owner, size, link target)."""
    lines = subprocess.run(["dpkg-deb", "-c", str(deb)], check=True, capture_output=True,
                           text=True).stdout.splitlines()
    out = {}
    for line in lines:
        path = line.split(None, 5)[5].split(" -> ")[0].removeprefix(".")
        out[path.rstrip("/") or "/"] = line
    return out


def _units_dir(files: dict | Path) -> str:
    """Where the package puts its systemd units (whichever the building debhelper uses)."""
    for d in ("/usr/lib/systemd/system", "/lib/systemd/system"):
        if (f"{d}/vfs-lockd.service" in files if isinstance(files, dict)
                else (files / d.lstrip("/") / "vfs-lockd.service").exists()):
            return d
    raise AssertionError("no systemd units in the package")


def test_package_files(package):
    deb, tree = package
    files = _contents(deb)
    for path in ["/usr/bin/vfs-lockd", "/usr/bin/vfs-lockd-virtiofsd",
                 "/usr/share/qemu/vhost-user/40-vfs-lockd.json",
                 "/usr/share/man/man1/vfs-lockd.1.gz",
                 "/usr/share/man/man1/vfs-lockd-virtiofsd.1.gz",
                 "/usr/lib/vfs-lockd/lockd/_native.abi3.so",
                 "/usr/lib/vfs-lockd/lockd/daemon/server.py",
                 "/usr/lib/vfs-lockd/fuse_server/launch.py",
                 "/usr/lib/vfs-lockd/vfs_lockd-0.1.0.dist-info/METADATA"]:
        assert path in files, path
    # The units: /lib/systemd/system from Debian 12's debhelper, /usr/lib/... from 13's.
    units = _units_dir(files)
    for unit in ("vfs-lockd.service", "vfs-lockd.socket"):
        assert f"{units}/{unit}" in files, (units, unit)
    for cmd in ("/usr/bin/vfs-lockd", "/usr/bin/vfs-lockd-virtiofsd",
                "/usr/lib/vfs-lockd/lockd/vl-waiter"):  # the namespace sandbox's parent
        assert files[cmd].startswith("-rwxr-xr-x root/root"), files[cmd]
    assert files["/usr/libexec/vfs-lockd-virtiofsd"].endswith(
        "-> ../bin/vfs-lockd-virtiofsd"), files["/usr/libexec/vfs-lockd-virtiofsd"]
    # Nothing built or cached on the build machine ships: byte code is compiled at install.
    assert not [p for p in files if "__pycache__" in p or p.endswith((".pyc", ".o"))]
    assert not [p for p in files if p.startswith(("/usr/local", "/etc", "/var", "/run"))]
    # One package for every python3 from 3.10 on (abi3 module): nothing pins 3.11.
    depends = _field(deb, "Depends")
    assert "python3 (>= 3.10)" in depends and "<<" not in depends, depends
    assert not re.search(r"python3\.\d+", depends), depends
    for dep in ("python3-cffi-backend", "python3-click", "libc6"):
        assert dep in depends, depends


def test_package_descriptor_names_the_installed_backend(package):
    deb, tree = package
    path = tree / "usr/share/qemu/vhost-user/40-vfs-lockd.json"
    doc = json.loads(path.read_text())
    assert doc["type"] == "fs"
    assert doc["binary"] == "/usr/bin/vfs-lockd-virtiofsd"
    assert os.access(tree / doc["binary"].lstrip("/"), os.X_OK)
    # libvirt takes the first `fs` descriptor in file name order: ours before the
    # distributions' 50-*.json virtiofsd.
    assert sorted([path.name, "50-qemu-virtiofsd.json", "50-virtiofsd.json"])[0] == path.name


def _wrapper(tree: Path, name: str) -> list[str]:
    """Run an unpacked command with Debian's python3, its modules from the unpacked tree.
    Run it outside the source tree: `python -c` and `-m` put the working directory first
    on sys.path, where this tree's modules would stand in for missing packaged ones."""
    text = (tree / "usr/bin" / name).read_text()
    assert text.startswith("#!/usr/bin/python3"), text
    assert '"/usr/lib/vfs-lockd"' in text
    code = text.replace('"/usr/lib/vfs-lockd"', repr(str(tree / "usr/lib/vfs-lockd")))
    return [SYS_PYTHON, "-s", "-c", code]


def test_package_commands_run_on_debian_python(package):
    deb, tree = package
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    env.pop("PYTHONPATH", None)
    out = subprocess.run(_wrapper(tree, "vfs-lockd") + ["--version"], env=env,
                         capture_output=True, text=True, timeout=60, cwd=tree)
    assert out.returncode == 0 and "0.1.0" in out.stdout, out.stdout + out.stderr
    out = subprocess.run(_wrapper(tree, "vfs-lockd-virtiofsd") + ["--print-capabilities"],
                         env=env, capture_output=True, text=True, timeout=60, cwd=tree)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["type"] == "fs"
    # The compiled module loads from the package (not from the source tree or the venv).
    probe = ("import sys; sys.path.insert(0, sys.argv[1]); import lockd._native as n; "
             "print(n.__file__)")
    out = subprocess.run([SYS_PYTHON, "-s", "-c", probe, str(tree / "usr/lib/vfs-lockd")],
                         env=env, capture_output=True, text=True, timeout=60, cwd=tree)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(tree / "usr/lib/vfs-lockd/lockd/_native.abi3.so")


def test_package_daemon_runs_from_the_package(package, tmp_path):
    """`vfs-lockd serve` from the unpacked package on Debian's python3: it starts its
    descriptor keeper (`python3 -m lockd.journal.keeper`, a process that must find the
    package's private module directory too) and answers on its socket."""
    deb, tree = package
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    env.pop("PYTHONPATH", None)
    sock = tmp_path / "lockd.sock"
    log = open(tmp_path / "daemon.log", "w")
    proc = subprocess.Popen(_wrapper(tree, "vfs-lockd") + [
        "serve", "--socket", str(sock), "--journal", str(tmp_path / "journal.db")],
        env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
    try:
        assert wait_until(lambda: sock.exists() or proc.poll() is not None, timeout=60)
        out = subprocess.run(_wrapper(tree, "vfs-lockd") + ["status", "--socket", str(sock),
                             "--json"], env=env, capture_output=True, text=True, timeout=60,
                             cwd=tmp_path)
        assert out.returncode == 0, out.stderr + (tmp_path / "daemon.log").read_text()
        assert json.loads(out.stdout)["journal"] == str(tmp_path / "journal.db")
    finally:
        rc = stop(proc)
        log.close()
    assert rc == 0, (tmp_path / "daemon.log").read_text()


def test_package_units_verify(package, tmp_path):
    deb, tree = package
    units = tree / _units_dir(tree).lstrip("/")
    service = (units / "vfs-lockd.service").read_text()
    socket_unit = (units / "vfs-lockd.socket").read_text()
    want = {"ListenStream=/run/vfs-lockd/lockd.sock", "SocketMode=0600", "RemoveOnStop=yes",
            "WantedBy=sockets.target"}
    assert want <= set(socket_unit.splitlines()), socket_unit
    want = {"Type=notify", "Requires=vfs-lockd.socket", "RuntimeDirectory=vfs-lockd",
            "RuntimeDirectoryPreserve=yes", "StateDirectory=vfs-lockd",
            "OOMScoreAdjust=-900", "KillMode=mixed", "Also=vfs-lockd.socket"}
    assert want <= set(service.splitlines()), service
    assert re.search(r"^FileDescriptorStoreMax=[1-9]\d*$", service, re.M)
    exec_start = re.search(r"^ExecStart=(.*)$", service, re.M).group(1).split()
    assert exec_start[:2] == ["/usr/bin/vfs-lockd", "serve"]
    assert exec_start[exec_start.index("--socket") + 1] == "/run/vfs-lockd/lockd.sock"
    assert exec_start[exec_start.index("--journal") + 1].startswith("/var/lib/vfs-lockd/")
    # systemd-analyze checks the command exists: point it at the unpacked one.
    (tmp_path / "vfs-lockd.service").write_text(
        service.replace("/usr/bin/vfs-lockd", str(tree / "usr/bin/vfs-lockd")))
    shutil.copy(units / "vfs-lockd.socket", tmp_path)
    out = subprocess.run(["systemd-analyze", "verify", "--man=no",
                          str(tmp_path / "vfs-lockd.socket"), str(tmp_path / "vfs-lockd.service")],
                         capture_output=True, text=True, timeout=60)
    # It exits 0 on settings it ignores: any word from it is a defect.
    assert out.returncode == 0 and not out.stdout.strip() and not out.stderr.strip(), \
        out.stdout + out.stderr


def test_package_man_pages(package):
    deb, tree = package
    man = tree / "usr/share/man/man1"
    texts = {}
    for name in ("vfs-lockd", "vfs-lockd-virtiofsd"):
        out = subprocess.run(["man", "--warnings", "-l", str(man / f"{name}.1.gz")],
                             env=dict(os.environ, MANWIDTH="100", MAN_KEEP_FORMATTING=""),
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and not out.stderr.strip(), out.stderr
        texts[name] = out.stdout
    from lockd.cli import VERBS

    for verb in VERBS:
        assert f"vfs-lockd {verb}" in texts["vfs-lockd"], verb
    for opt in ("--guest-grace", "--journal", "--limits", "--prefix"):
        assert opt in texts["vfs-lockd"], opt
    for opt in ("--fd=N", "--shared-dir=DIR", "--sandbox=", "posix_lock", "--lockd=SOCKET"):
        assert opt in texts["vfs-lockd-virtiofsd"], opt


def test_daemon_takes_the_socket_units_socket(tmp_path):
    """vfs-lockd.socket: systemd binds /run/vfs-lockd/lockd.sock and passes it to `vfs-lockd
    serve --socket` (LISTEN_FDS), which must serve it, not refuse to start because
    "another daemon" answers there, and must leave it in place when it stops."""
    sock = tmp_path / "lockd.sock"
    activate = shutil.which("systemd-socket-activate")
    assert activate, "systemd-socket-activate (package systemd) is missing"
    log = open(tmp_path / "daemon.log", "w")
    proc = subprocess.Popen(
        [activate, "-l", str(sock), "--fdname=vfs-lockd.socket",
         str(VENV_BIN / "vfs-lockd"), "serve", "--socket", str(sock),
         "--journal", str(tmp_path / "journal.db"), "--no-keeper"],
        stdout=log, stderr=subprocess.STDOUT)
    try:
        assert wait_until(sock.exists, timeout=30)
        # The first connection starts the daemon (as the socket unit does).
        out = subprocess.run([str(VENV_BIN / "vfs-lockd"), "status", "--socket", str(sock),
                              "--json"], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr + (tmp_path / "daemon.log").read_text()
        assert json.loads(out.stdout)["socket"] == str(sock)
        ino = sock.stat().st_ino
    finally:
        rc = stop(proc)
        log.close()
    assert rc == 0, (tmp_path / "daemon.log").read_text()
    # The socket is the activator's: the daemon did not unlink it.
    assert sock.exists() and sock.stat().st_ino == ino
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        with pytest.raises(ConnectionRefusedError):
            s.connect(str(sock))
