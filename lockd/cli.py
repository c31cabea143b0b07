"""The `vfs-lockd` command. Each verb lives in the module that owns it and is imported
only when used, so `vfs-lockd locks` does not pay for the FUSE server's imports."""

from __future__ import annotations

import importlib

import click

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
def main() -> None:
    """vfs-lockd: a lock manager for virtio-fs shares."""
