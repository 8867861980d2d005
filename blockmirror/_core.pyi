# Type stub for the cffi-built core (csrc/build_ffi.py). ``lib`` is the raw C
# namespace: its functions are typed in csrc/blockmirror.h, and only the
# modules of blockmirror._bindings call them, converting every result.
from typing import Any

import cffi

ffi: cffi.FFI
lib: Any
