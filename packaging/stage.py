"""Stage the Debian package's tree from a built wheel (called by debian/rules).

    python3 packaging/stage.py WHEELDIR DESTDIR LIBDIR

Unpacks the wheel into DESTDIR/LIBDIR (a private module directory), writes the two
commands to /usr/bin (a few lines that put LIBDIR first on sys.path), a
/usr/libexec/vfs-lockd-virtiofsd link beside Debian's /usr/libexec/virtiofsd, the QEMU
vhost-user descriptor naming the installed back-end, and the man pages, generated from
the commands' own help so that they say exactly what the commands accept.
"""

from __future__ import annotations

import glob
import os
import sys
import zipfile

BIN = "/usr/bin"
VIRTIOFSD = f"{BIN}/vfs-lockd-virtiofsd"
DESCRIPTOR_DIR = "/usr/share/qemu/vhost-user"
MAN1 = "/usr/share/man/man1"

# command -> (module, function): the wheel's console_scripts.
COMMANDS = {
    "vfs-lockd": ("lockd.cli", "main"),
    "vfs-lockd-virtiofsd": ("fuse_server.virtiofs_cli", "main"),
}

WRAPPER = """#!/usr/bin/python3 -s
# {name} (Debian package): its modules live in {lib}, not in dist-packages. The
# Python processes it starts (`python3 -m lockd.journal.keeper`, the rig's workers) find
# them through PYTHONPATH.
import os
import sys

LIB = "{lib}"
sys.path.insert(0, LIB)
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [LIB, os.environ.get("PYTHONPATH")]))
from {module} import {func}  # noqa: E402

sys.exit({func}())
"""


def _write(path: str, text: str, mode: int = 0o644) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    os.chmod(path, mode)


def stage(wheel_dir: str, dest: str, lib: str) -> None:
    wheels = glob.glob(os.path.join(wheel_dir, "vfs_lockd-*.whl"))
    if len(wheels) != 1:
        sys.exit(f"stage.py: expected one vfs_lockd wheel in {wheel_dir}, found {wheels}")
    libdir = dest + lib
    with zipfile.ZipFile(wheels[0]) as whl:
        if any(n.split("/", 1)[0].endswith(".data") for n in whl.namelist()):
            sys.exit("stage.py: the wheel has a .data directory; stage it explicitly")
        whl.extractall(libdir)
        # extractall drops the modes: 0644, or 0755 for what the wheel has executable
        # (lockd/vl-waiter, the namespace sandbox's waiting parent, is a program).
        programs = {os.path.normpath(os.path.join(libdir, i.filename))
                    for i in whl.infolist() if (i.external_attr >> 16) & 0o111
                    and not i.filename.endswith(".so")}
    for root, _dirs, files in os.walk(libdir):
        for name in files:
            path = os.path.join(root, name)
            os.chmod(path, 0o755 if os.path.normpath(path) in programs else 0o644)
    for name, (module, func) in COMMANDS.items():
        _write(f"{dest}{BIN}/{name}", WRAPPER.format(name=name, lib=lib, module=module,
                                                     func=func), 0o755)
    libexec = f"{dest}/usr/libexec"
    os.makedirs(libexec, exist_ok=True)
    link = os.path.join(libexec, "vfs-lockd-virtiofsd")
    if os.path.lexists(link):
        os.unlink(link)
    os.symlink(os.path.relpath(VIRTIOFSD, "/usr/libexec"), link)

    sys.path.insert(0, libdir)
    from fuse_server import qemu_descriptor  # the staged copy: its name and contents

    path = dest + qemu_descriptor.descriptor_path("/usr/share", 40)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    # install() writes the file; it checks nothing about the binary, which is not
    # installed on the build machine.
    qemu_descriptor.install(dest + "/usr/share", VIRTIOFSD, 40)
    assert os.path.exists(path), path

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import manpages

    for name, text in manpages.pages().items():
        _write(f"{dest}{MAN1}/{name}.1", text)


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    stage(*sys.argv[1:])
