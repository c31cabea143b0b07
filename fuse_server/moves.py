"""Renames of directories on a share's filesystem, counted (native vl_moves).

Every name the guest resolves in a directory first checks that the directory is still
below the share (passthrough.py `_inside`: a directory moved out must not lead the guest
out). That check costs a readlink and a path walk per request. A directory found below
the share without crossing a mount has only ancestors on the share's filesystem, and
only a rename there can change them; so the verdict is kept, tagged with this count, and
holds until a directory of that filesystem is moved (by anyone: the kernel queues the
event before the rename returns, and the count reads the queue first).

The watch is a fanotify filesystem mark: root only, local filesystems only (another
host's renames on a network filesystem make no event here). It is made before seccomp is
installed (launch.py) and shared by every session of the process; where it cannot be
made, every request checks as before.
"""

from __future__ import annotations

import logging
import os

from lockd import native

log = logging.getLogger(__name__)

_watches: dict[int, object] = {}  # st_dev -> vl_moves* (or None: none can be had)
# A descriptor of each watched filesystem, kept open: while the watch is used its
# filesystem cannot go, so its st_dev cannot name another filesystem later.
_pins: list[int] = []


def for_share(root_fd: int) -> object | None:
    """The count of the filesystem of `root_fd` (made on first use), or None."""
    if not native.HAVE_NATIVE:
        return None
    dev = os.fstat(root_fd).st_dev
    if dev not in _watches:
        err = native.ffi.new("int *")
        m = native.lib.vl_moves_new(root_fd, err)
        if m == native.ffi.NULL:
            log.debug("directory moves not watched (%s): every name resolved checks its "
                      "directory", os.strerror(err[0]))
            m = None
        else:
            _pins.append(os.dup(root_fd))
        _watches[dev] = m  # (never freed: the process's, like the share)
    return _watches[dev]
