"""cffi build script of ``blockmirror._nfs``: the NFS endpoint
(csrc/nfs/nfs.c) linked with libnfs.

A module of its own so neither the core nor the NBD endpoint links libnfs:
setup.py lists this builder only where libnfs's header is installed (Debian
libnfs-dev); without it everything else builds and an nfs:// URI is refused
with a line naming the package. The cdef is csrc/endpoint/bm_endpoint.h
(the types both endpoints share) then bm_nfs.h, read verbatim; the shared
copy loop (csrc/endpoint/source_loop.c) is compiled in.
"""

from __future__ import annotations

import os
from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent
ENDPOINT = HERE.parent / "endpoint"  # what the two endpoints share

ffibuilder = FFI()
ffibuilder.cdef((ENDPOINT / "bm_endpoint.h").read_text() + (HERE / "bm_nfs.h").read_text())
ffibuilder.set_source(
    "blockmirror._nfs",
    "#include <stdint.h>\n#include \"bm_endpoint.h\"\n#include \"bm_nfs.h\"",
    sources=[os.path.relpath(HERE / "nfs.c"),
             os.path.relpath(ENDPOINT / "source_loop.c")],
    include_dirs=[os.path.relpath(HERE), os.path.relpath(ENDPOINT)],
    libraries=["nfs"],
    extra_compile_args=["-std=gnu11", "-O2", "-Wall", "-Wextra"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
