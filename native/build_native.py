"""cffi build script (API mode, out-of-line) for lockd._native.

setuptools runs it through `cffi_modules` in setup.py; it can also be run directly
(`python native/build_native.py`) to build the extension in place for development.
Extra compiler/linker flags come from VFS_LOCKD_CFLAGS / VFS_LOCKD_LDFLAGS, e.g. a
fuzz build with VFS_LOCKD_CFLAGS="-fsanitize=address,undefined -g".
"""

from __future__ import annotations

import os
import re

import cffi

HERE = os.path.dirname(os.path.abspath(__file__))
HEADER = os.path.join(HERE, "vl_native.h")


def _cdef() -> str:
    # One source of truth: the declarations between the CDEF markers of the header.
    with open(HEADER, encoding="utf-8") as f:
        text = f.read()
    match = re.search(r"/\* CDEF-BEGIN \*/(.*?)/\* CDEF-END \*/", text, re.S)
    if match is None:
        raise RuntimeError(f"{HEADER}: CDEF-BEGIN/CDEF-END markers missing")
    return match.group(1)


def _env_flags(name: str) -> list[str]:
    return os.environ.get(name, "").split()


def _source(name: str) -> str:
    # setuptools wants source paths relative to the project root (the cwd of a pip
    # build); fall back to the absolute path when run from elsewhere.
    path = os.path.join(HERE, name)
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


ffibuilder = cffi.FFI()
ffibuilder.cdef(_cdef())
ffibuilder.set_source(
    "lockd._native",
    '#include "vl_native.h"',
    sources=[_source("vl_native.c"), _source("vl_serve.c"), _source("vl_ring.c")],
    depends=[_source("vl_native.h")],  # rebuild on header edits; ships it in the sdist
    include_dirs=[HERE],
    extra_compile_args=["-O2", *_env_flags("VFS_LOCKD_CFLAGS")],
    extra_link_args=_env_flags("VFS_LOCKD_LDFLAGS"),
)

if __name__ == "__main__":
    # Direct run: build into the source tree so `import lockd._native` works in place.
    import glob

    os.chdir(os.path.dirname(HERE))
    built = os.path.abspath(ffibuilder.compile(verbose=True))
    # A stale lockd/_native.abi3.so from pip (or vice versa) would be imported instead of
    # or alongside this one depending on suffix order: keep only the fresh build.
    for other in glob.glob(os.path.join("lockd", "_native*.so")):
        if os.path.abspath(other) != built:
            os.remove(other)
