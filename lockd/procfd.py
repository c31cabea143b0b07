"""How a descriptor is reopened by path: through the /proc/self/fd magic links.

Normally that is "/proc/self/fd/N". Inside a sandbox whose root is the shared directory
(`vfs-lockd-virtiofsd --sandbox chroot|namespace`) there is no /proc: the sandbox keeps a
descriptor of the /proc/self/fd directory, makes it the working directory and calls
`use_cwd()`, after which paths are "./N" (resolved through that directory, never through
a name in the share). Everything that reopens a descriptor by path goes through `path()`.
"""

from __future__ import annotations

_prefix = "/proc/self/fd"


def path(fd: int) -> str:
    """A path that opens what `fd` refers to (a magic link: no symlink games apply)."""
    return f"{_prefix}/{fd}"


def prefix() -> str:
    """The directory of the magic links: "/proc/self/fd", or "." (see the module doc)."""
    return _prefix


def use_cwd() -> None:
    """The working directory is now the /proc/self/fd directory (see the module doc)."""
    global _prefix
    _prefix = "."
