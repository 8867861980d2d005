# Type stub for the cffi-built NBD endpoint (csrc/remote/build_ffi.py), present
# only where libnbd-dev was installed at build time. Only
# blockmirror._bindings.remote imports it; its functions are typed in
# csrc/remote/bm_remote.h.
from typing import Any

import cffi

ffi: cffi.FFI
lib: Any
