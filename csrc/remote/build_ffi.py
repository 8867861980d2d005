"""cffi build script of ``blockmirror._remote``: the NBD endpoint
(csrc/remote/nbd.c) linked with libnbd.

A module of its own so the core (``blockmirror._core``) never links libnbd:
setup.py lists this builder only where libnbd's header is installed (Debian
libnbd-dev); without it everything else builds and an nbd:// URI is refused
with a line naming the package. The cdef is csrc/endpoint/bm_endpoint.h
(the types both endpoints share) then bm_remote.h, read verbatim; the
shared copy loop (csrc/endpoint/source_loop.c) is compiled in.
"""

from __future__ import annotations

import os
from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent
ENDPOINT = HERE.parent / "endpoint"  # what the two endpoints share

ffibuilder = FFI()
ffibuilder.cdef((ENDPOINT / "bm_endpoint.h").read_text() + (HERE / "bm_remote.h").read_text())
ffibuilder.set_source(
    "blockmirror._remote",
    "#include <libnbd.h>\n#include \"bm_endpoint.h\"\n#include \"bm_remote.h\"",
    sources=[os.path.relpath(HERE / "nbd.c"),
             os.path.relpath(ENDPOINT / "source_loop.c")],
    include_dirs=[os.path.relpath(HERE), os.path.relpath(ENDPOINT)],
    libraries=["nbd"],
    extra_compile_args=["-std=gnu11", "-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
