# Type stub for the cffi-built NFS endpoint (csrc/nfs/build_ffi.py), present
# only where libnfs-dev was installed at build time. Only
# blockmirror._bindings.nfs imports it; its functions are typed in
# csrc/nfs/bm_nfs.h.
from typing import Any

import cffi

ffi: cffi.FFI
lib: Any
