# The cffi module is declared here because setup.cfg has no key for cffi_modules.
import os
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "native"))
from build_native import build_ext_with_waiter  # noqa: E402

# build_ext also builds lockd/vl-waiter, the namespace sandbox's waiting parent.
setup(cffi_modules=["native/build_native.py:ffibuilder"],
      cmdclass={"build_ext": build_ext_with_waiter(build_ext)})
