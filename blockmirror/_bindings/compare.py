"""Bindings of the verify kernel (csrc/compare.c)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from blockmirror._bindings._ffi import CData, error_from_c, extent_pairs, extents_pointer, ffi, lib
from blockmirror.extents import Extent

if TYPE_CHECKING:
    from blockmirror.extents import ExtentArray

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
    import numpy as np  # late: see blockmirror.extents

    from blockmirror.extents import EXTENT_DTYPE

    ext = extents_pointer(extents)
    # Each extent holds at most length // block + 2 (partial) blocks.
    room = int((extents["length"] // np.uint64(block_size)).sum()) + 2 * len(extents)
    out = np.empty(room, dtype=EXTENT_DTYPE)
    n = _call(a_fd, b_fd, ext, len(extents), block_size, buf, cancel,
              ffi.cast("bm_extent *", ffi.from_buffer(out.data)) if room else ffi.NULL, room,
              (a_path, b_path))
    result: ExtentArray = out[:n].copy()
    return result


def compare_pairs(
    a_fd: int,
    b_fd: int,
    extents: list[Extent],
    block_size: int,
    buf: CData | None = None,
    cancel: CData | None = None,
    a_path: str | None = None,
    b_path: str | None = None,
) -> list[Extent]:
    """:func:`compare_extents` over ``(offset, length)`` pairs, without
    numpy (the answer as pairs too): what ``verify`` uses, so a command
    comparing a few extents does not pay numpy's import."""
    room = sum(length // block_size for _, length in extents) + 2 * len(extents)
    out = ffi.new("bm_extent[]", room)
    ext = ffi.new("bm_extent[]", extents) if extents else ffi.NULL
    n = _call(a_fd, b_fd, ext, len(extents), block_size, buf, cancel, out, room,
              (a_path, b_path))
    return extent_pairs(out, n)


def _call(a_fd: int, b_fd: int, ext: CData, count: int, block_size: int, buf: CData | None,
          cancel: CData | None, out: CData, room: int, paths: tuple[str | None, str | None],
          ) -> int:
    """One bm_compare_extents: the count written to OUT, or OSError naming
    the side (PATHS: A's, B's) that failed."""
    side = ffi.new("uint32_t *")
    n = lib.bm_compare_extents(
        a_fd, b_fd, ext, count,
        ffi.NULL if buf is None else buf, 0 if buf is None else len(buf),
        block_size,
        ffi.NULL if cancel is None else cancel,
        out, room, side,
    )
    if n < 0:
        failed = side[0]
        raise error_from_c(
            paths[0] if failed == lib.BM_COMPARE_SIDE_A
            else paths[1] if failed == lib.BM_COMPARE_SIDE_B else None
        )
    return int(n)
