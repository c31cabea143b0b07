"""The `vfs-lockd` command. Each verb lives in the module that owns it and is imported
only when used, so `vfs-lockd locks` does not pay for the FUSE server's imports, and
`vfs-lockd virtiofs` (a back-end per guest, whose every module costs each guest its
memory) does not import click at all: it takes virtiofsd's command line, not click's."""

from __future__ import annotations

import functools
import importlib
import sys

TYPE_CHECKING = False  # `typing` stays out of the back-end (lockd/structs.py)
if TYPE_CHECKING:
    from typing import Any

# verb -> "module:attribute" of a click command
VERBS: dict[str, str] = {
    "mount": "fuse_server.cli:mount_cmd",
    "virtiofs": "fuse_server.virtiofs_cli:virtiofs_cmd",
    "install-qemu-descriptor": "fuse_server.qemu_descriptor:install_cmd",
    "serve": "lockd.daemon.cli:serve_cmd",
    "locks": "lockd.daemon.admin_cli:locks_cmd",
    "status": "lockd.daemon.admin_cli:status_cmd",
    "evict": "lockd.daemon.admin_cli:evict_cmd",
    "cancel": "lockd.daemon.admin_cli:cancel_cmd",
    "journal": "lockd.journal.cli:journal_group",
    "rig": "rig.cli:rig_cmd",
}


@functools.cache
def group() -> Any:  # noqa: ANN401 - the click.Group of every verb
    """The click group behind `vfs-lockd` (its verbs loaded when named)."""
    import click

    class LazyGroup(click.Group):
        def list_commands(self, ctx: click.Context) -> list[str]:
            return sorted(VERBS)

        def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
            target = VERBS.get(name)
            if target is None:
                return None
            module, _, attr = target.partition(":")
            try:
                return getattr(importlib.import_module(module), attr)
            except (ImportError, AttributeError) as exc:
                raise click.ClickException(f"'{name}' is not available: {exc}") from exc

    @click.group(cls=LazyGroup)
    @click.version_option(package_name="vfs-lockd")
    def vfs_lockd() -> None:
        """vfs-lockd: a lock manager for virtio-fs shares."""

    return vfs_lockd


def main(args: list[str] | None = None, **extra: Any) -> Any:  # noqa: ANN401 - click's
    """The `vfs-lockd` console script: `group()` with the command line (or `args`), as
    click runs a command (it exits); `vfs-lockd virtiofs ...` goes to the back-end's
    launcher directly, exactly as the click verb would hand it over."""
    argv = sys.argv[1:] if args is None else list(args)
    if argv[:1] == ["virtiofs"] and not extra:
        from fuse_server.launch import run
        from fuse_server.virtiofsd_options import LEGACY

        sys.exit(run(argv[1:], "vfs-lockd virtiofs", LEGACY))
    return group().main(args, **extra)
