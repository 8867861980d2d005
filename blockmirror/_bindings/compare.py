"""Bindings of the verify kernel (csrc/compare.c)."""

from __future__ import annotations

import numpy as np

from blockmirror._bindings._ffi import CData, error_from_c, extents_pointer, ffi, lib
from blockmirror.extents import EXTENT_DTYPE, ExtentArray

DEFAULT_BUFFER: int = lib.BM_COMPARE_DEFAULT_BUFFER


def compare_extents(
    a_fd: int,
    b_fd: int,
    extents: ExtentArray,
    block_size: int,
    buf: CData | None = None,
    cancel: CData | None = None,
    a_path: str | None = None,
    b_path: str | None = None,
) -> ExtentArray:
    """The BLOCK_SIZE blocks where A and B differ over EXTENTS (a C-contiguous
    EXTENT_DTYPE array, ascending), one C call: an EXTENT_DTYPE array, merged,
    empty if identical. BUF is scratch from copy.new_buffer (None: the call
    allocates its own). Errors raise OSError naming the side that failed."""
    ext = extents_pointer(extents)
    # Each extent holds at most length // block + 2 (partial) blocks.
    room = int((extents["length"] // np.uint64(block_size)).sum()) + 2 * len(extents)
    out = np.empty(room, dtype=EXTENT_DTYPE)
    side = ffi.new("uint32_t *")
    n = lib.bm_compare_extents(
        a_fd, b_fd, ext, len(extents),
        ffi.NULL if buf is None else buf, 0 if buf is None else len(buf),
        block_size,
        ffi.NULL if cancel is None else cancel,
        ffi.cast("bm_extent *", ffi.from_buffer(out.data)) if room else ffi.NULL,
        room,
        side,
    )
    if n < 0:
        failed = side[0]
        raise error_from_c(
            a_path if failed == lib.BM_COMPARE_SIDE_A
            else b_path if failed == lib.BM_COMPARE_SIDE_B else None
        )
    result: ExtentArray = out[:n].copy()
    return result
