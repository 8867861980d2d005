"""cffi build script: compiles csrc/*.c into ``blockmirror._core``.

The cdef is csrc/blockmirror.h read verbatim, so the Python view of the C API
cannot drift from the C. setup.py names this file in ``cffi_modules``.
"""

from __future__ import annotations

import os
from pathlib import Path

from cffi import FFI

CSRC = Path(__file__).resolve().parent

ffibuilder = FFI()
ffibuilder.cdef((CSRC / "blockmirror.h").read_text())
ffibuilder.set_source(
    "blockmirror._core",
    '#include "bm_internal.h"',
    # Relative paths keep setuptools happy when building from an sdist copy.
    # csrc/*.c only: csrc/python/ is the CPython extension setup.py builds.
    sources=[os.path.relpath(p) for p in sorted(CSRC.glob("*.c"))],
    include_dirs=[os.path.relpath(CSRC)],
    extra_compile_args=["-std=gnu11", "-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
