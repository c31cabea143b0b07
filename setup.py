# The cffi module is declared here because setup.cfg has no key for cffi_modules.
from setuptools import setup

setup(cffi_modules=["native/build_native.py:ffibuilder"])
