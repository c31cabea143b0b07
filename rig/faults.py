"""Faults the rig injects from outside the engine it tests.

`python -m rig.faults grant-everything ARGS...` runs the `vfs-lockd` command line (ARGS)
with a LockManager that answers every lock request "granted" without checking for
conflicts or taking anything on the host: the broken lock path that the rig's checks
must catch (a rig that cannot fail proves nothing). Production code has no such switch;
the fake replaces the class before the command builds its lock service.
"""

from __future__ import annotations

import sys

from lockd.api import F_UNLCK
from lockd.engine import manager


class GrantEverything(manager.LockManager):
    """Grants every lock and wait at once; unlocks behave as usual."""

    def setlk(self, guest, owner, ref, type_, start, end, pid):  # noqa: ANN001, ANN201
        return super().setlk(guest, owner, ref, type_, start, end, pid) if type_ == F_UNLCK else 0

    def setlkw(self, guest, owner, ref, type_, start, end, pid, callback, tag=None):  # noqa: ANN001, ANN201
        if type_ == F_UNLCK:
            return super().setlkw(guest, owner, ref, type_, start, end, pid, callback, tag)
        return 0

    def flock(self, guest, fh, ref, type_, pid, wait, callback=None, tag=None):  # noqa: ANN001, ANN201
        if type_ == F_UNLCK:
            return super().flock(guest, fh, ref, type_, pid, wait, callback, tag)
        return 0


FAULTS = {"grant-everything": GrantEverything}


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in FAULTS:
        print(f"usage: python -m rig.faults {{{'|'.join(FAULTS)}}} VFS-LOCKD-ARGS...",
              file=sys.stderr)
        return 2
    manager.LockManager = FAULTS[argv[0]]  # the CLI imports the class when it runs
    from lockd.cli import main as cli_main

    return cli_main(argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
