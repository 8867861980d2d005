# Metadata lives in pyproject.toml; this file only wires the cffi build.
from setuptools import setup

setup(cffi_modules=["csrc/build_ffi.py:ffibuilder"])
