# Metadata lives in pyproject.toml; this file only wires the C builds.
from setuptools import Extension, setup

setup(
    cffi_modules=["csrc/build_ffi.py:ffibuilder"],
    # One function outside cffi: TrackedImage.pwrite's hot path. A cffi call
    # alone costs more than the 10 % a 4 KiB write may add to os.pwrite
    # (issue 2, bench/README.md). It links no core sources: it calls bm_pwrite
    # through a pointer taken from blockmirror._core (csrc/python/fastwrite.c).
    ext_modules=[
        Extension(
            "blockmirror._fastwrite",
            ["csrc/python/fastwrite.c"],
            include_dirs=["csrc"],
            depends=["csrc/blockmirror.h"],
            extra_compile_args=["-std=gnu11", "-O2", "-Wall", "-Wextra"],
        )
    ],
)
