"""`vfs-lockd virtiofs` and `vfs-lockd-virtiofsd`: a vhost-user back-end for QEMU's
vhost-user-fs-pci device, standing for one guest, with virtiofsd's command line so that
libvirt, Kata Containers and plain QEMU launch it as they launch virtiofsd.

    vfs-lockd virtiofs --socket-path PATH --shared-dir DIR --guest NAME [--lockd S] ...
    vfs-lockd-virtiofsd --fd=33 -o source=DIR,cache=none,sandbox=chroot,flock,posix_lock

Both take the same options (fuse_server/virtiofsd_options.py) and differ in defaults
only; the work is in fuse_server/launch.py.
"""

from __future__ import annotations

import sys

from fuse_server.virtiofsd_options import DROPIN, LEGACY

TYPE_CHECKING = False  # `typing` stays out of the back-end (lockd/structs.py)
if TYPE_CHECKING:
    from typing import Any


def _command() -> Any:  # noqa: ANN401 - a click.Command
    """The `vfs-lockd virtiofs` verb: a click command that hands its arguments to
    virtiofsd's parser untouched (click's own parsing knows neither `-o a,b` lists nor
    `--fd=N` semantics). Built on first use: `vfs-lockd-virtiofsd` never imports click
    (a back-end per guest pays for every module it imports)."""
    import click

    class _VirtiofsdCommand(click.Command):
        def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
            ctx.args = list(args)
            return []

        def invoke(self, ctx: click.Context) -> None:
            from fuse_server.launch import run

            ctx.exit(run(ctx.args, "vfs-lockd virtiofs", LEGACY))

    return _VirtiofsdCommand(
        "virtiofs", add_help_option=False,
        help="Serve a directory to a QEMU guest over vhost-user (virtiofsd's options; --help).",
        short_help="Serve a directory to a QEMU guest over vhost-user (virtio-fs).")


def __getattr__(name: str) -> Any:  # noqa: ANN401 - `virtiofs_cmd`, made once
    if name == "virtiofs_cmd":
        cmd = globals()["virtiofs_cmd"] = _command()
        return cmd
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def main() -> None:
    """The `vfs-lockd-virtiofsd` console script."""
    from fuse_server.launch import run

    sys.exit(run(sys.argv[1:], "vfs-lockd-virtiofsd", DROPIN))
