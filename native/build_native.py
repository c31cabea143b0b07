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

# ---- vl-waiter: the namespace sandbox's waiting parent (native/vl_waiter.c), a program
# beside the cffi module in the lockd package (fuse_server/sandbox.py runs it from there).
WAITER = "vl-waiter"


def build_waiter(out_dir: str, compiler: object | None = None, build_temp: str = "build") -> str:
    """Compile native/vl_waiter.c into OUT_DIR/vl-waiter with `compiler` (a distutils
    CCompiler: build_ext's, which has CC, CFLAGS and CPPFLAGS applied) or a new one.
    LDFLAGS from the environment apply too (distutils links executables without them).
    VFS_LOCKD_CFLAGS (sanitizer builds of the codec) are not for this program."""
    if compiler is None:
        # setuptools first: it provides distutils (Python >= 3.12 has none)
        import setuptools  # noqa: F401, I001
        from distutils.ccompiler import new_compiler
        from distutils.sysconfig import customize_compiler

        compiler = new_compiler()
        customize_compiler(compiler)
    objects = compiler.compile([_source("vl_waiter.c")], output_dir=build_temp,
                               extra_postargs=["-O2", "-Wall"])
    compiler.link_executable(objects, WAITER, output_dir=out_dir,
                             extra_postargs=_env_flags("LDFLAGS"))
    return os.path.join(out_dir, WAITER)


def build_ext_with_waiter(base: type) -> type:
    """setup.py's build_ext: `base`'s, then the waiter into the lockd package (the build
    tree for a wheel, the source tree for an in-place or editable build)."""

    class BuildExt(base):  # type: ignore[misc, valid-type]
        def _waiter_dir(self) -> str:
            if self.inplace:
                return self.get_finalized_command("build_py").get_package_dir("lockd")
            return os.path.join(self.build_lib, "lockd")

        def run(self) -> None:
            super().run()
            build_waiter(self._waiter_dir(), self.compiler, self.build_temp)

        def get_outputs(self) -> list[str]:
            return [*super().get_outputs(), os.path.join(self.build_lib, "lockd", WAITER)]

    return BuildExt


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
    build_waiter("lockd")
