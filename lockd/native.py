"""The one place that imports the cffi extension lockd._native.

`HAVE_NATIVE` says whether it is built; `ffi`/`lib` are None when it is not, and
`IMPORT_ERROR` keeps the reason for diagnostics (`vfs-lockd` can print it). Set
VFS_LOCKD_NO_NATIVE=1 to force the pure-Python fallbacks (differential runs, debugging).
"""

from __future__ import annotations

import os

TYPE_CHECKING = False  # `typing` stays out of the back-end (lockd/structs.py)
if TYPE_CHECKING:
    from typing import Any

ffi: Any = None
lib: Any = None
IMPORT_ERROR: str | None = None

if os.environ.get("VFS_LOCKD_NO_NATIVE"):
    IMPORT_ERROR = "disabled by VFS_LOCKD_NO_NATIVE"
else:
    try:
        import lockd._native as _ext
    except ImportError as exc:  # not built (e.g. running from a bare checkout)
        IMPORT_ERROR = str(exc)
    else:
        ffi, lib = _ext.ffi, _ext.lib

HAVE_NATIVE: bool = lib is not None
