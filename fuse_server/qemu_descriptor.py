"""`vfs-lockd install-qemu-descriptor`: the vhost-user back-end descriptor (QEMU's
docs/interop/vhost-user.json format) that lets libvirt find `vfs-lockd-virtiofsd` for a
`<filesystem><driver type='virtiofs'/>` without `<binary path=...>`.

Management software reads `*.json` from /usr/share/qemu/vhost-user (distribution),
/etc/qemu/vhost-user (the administrator's) and, unprivileged, $XDG_CONFIG_HOME/qemu/
vhost-user, sorts all of them by file name and takes the first of the wanted type. Ours
is called 40-vfs-lockd.json: it comes before the 50-*.json of distribution virtiofsd
packages (Debian's QEMU ships 50-qemu-virtiofsd.json).
"""

from __future__ import annotations

import json
import os
import shutil
import sys

import click

NAME = "vfs-lockd.json"
DESCRIPTION = "vfs-lockd: virtio-fs back-end whose POSIX and flock locks are host locks"


def descriptor(binary: str) -> dict:
    return {"description": DESCRIPTION, "type": "fs", "binary": binary}


def default_binary() -> str | None:
    """The installed `vfs-lockd-virtiofsd` (next to this Python, else on PATH)."""
    here = os.path.join(os.path.dirname(sys.executable), "vfs-lockd-virtiofsd")
    if os.access(here, os.X_OK):
        return os.path.abspath(here)
    found = shutil.which("vfs-lockd-virtiofsd")
    return os.path.abspath(found) if found else None


def descriptor_path(prefix: str, priority: int) -> str:
    return os.path.join(prefix, "qemu", "vhost-user", f"{priority:02d}-{NAME}")


def install(prefix: str, binary: str, priority: int = 40) -> str:
    """Write the descriptor (atomically, 0644); its path."""
    path = descriptor_path(prefix, priority)
    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(descriptor(binary), f, indent=2)
        f.write("\n")
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    return path


def remove(prefix: str, priority: int = 40) -> str | None:
    """Remove our descriptor (only if it is ours); its path, or None if there was none."""
    path = descriptor_path(prefix, priority)
    try:
        with open(path) as f:
            doc = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise click.ClickException(f"{path}: {exc}") from None
    if doc.get("description") != DESCRIPTION:
        raise click.ClickException(f"{path} is not vfs-lockd's descriptor; left alone")
    os.unlink(path)
    return path


@click.command("install-qemu-descriptor")
@click.option("--prefix", default="/etc", show_default=True,
              type=click.Path(file_okay=False),
              help="Write PREFIX/qemu/vhost-user/NN-vfs-lockd.json: /etc (administrator), "
                   "/usr/share (distribution) or ~/.config (one user's libvirt).")
@click.option("--binary", default=None, type=click.Path(dir_okay=False),
              help="The back-end to name (default: the installed vfs-lockd-virtiofsd).")
@click.option("--priority", default=40, show_default=True, type=click.IntRange(0, 99),
              help="NN: descriptors are tried in file name order (distributions use 50).")
@click.option("--remove", "remove_it", is_flag=True, help="Remove the descriptor instead.")
def install_cmd(prefix: str, binary: str | None, priority: int, remove_it: bool) -> None:
    """Install the vhost-user descriptor through which libvirt finds vfs-lockd-virtiofsd."""
    if remove_it:
        path = remove(prefix, priority)
        click.echo(f"removed {path}" if path else "no descriptor to remove")
        return
    binary = binary or default_binary()
    if not binary:
        raise click.ClickException("vfs-lockd-virtiofsd is not installed; name it with --binary")
    binary = os.path.abspath(binary)
    if not os.access(binary, os.X_OK):
        raise click.ClickException(f"{binary} is not executable")
    try:
        path = install(prefix, binary, priority)
    except OSError as exc:
        raise click.ClickException(f"writing the descriptor: {exc}") from None
    click.echo(path)
