"""Bindings of the extent copy (csrc/copy.c).

A copier handle (``new_copier``), buffers, the cancel flag and the rate cap
are cffi objects the caller keeps (cffi frees them with the last reference;
a copier handle must outlive every call on it, and its fds the handle)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeAlias

from blockmirror._bindings._ffi import (
    SCAN_CHUNK,
    CData,
    error_from_c,
    extents_pointer,
    ffi,
    lib,
    scan_all,
)
from blockmirror.extents import ExtentArray

Handle: TypeAlias = CData
"""A ``bm_copier *`` owned by ffi.gc: bm_copier_free runs with its last reference."""

CAN_PUNCH: int = lib.BM_COPIER_CAN_PUNCH
CAN_SEEK: int = lib.BM_COPIER_CAN_SEEK
CAN_FILE_RANGE: int = lib.BM_COPIER_CAN_FILE_RANGE
DST_FRESH: int = lib.BM_COPY_DST_FRESH
START_WRITEBACK: int = lib.BM_COPY_START_WRITEBACK
FILE_RANGE_FAILED: int = lib.BM_COPY_FILE_RANGE_FAILED
PUNCH_FAILED: int = lib.BM_COPY_PUNCH_FAILED
SEEK_FAILED: int = lib.BM_COPY_SEEK_FAILED
MIN_BLOCK: int = lib.BM_COPY_MIN_BLOCK
MAX_BLOCK: int = lib.BM_COPY_MAX_BLOCK
DEFAULT_BUFFER: int = lib.BM_COPY_DEFAULT_BUFFER


@dataclass(frozen=True)
class CopyCounts:
    """What one bm_copy_extents call did (``bm_copy_stats``)."""

    bytes_read: int
    bytes_written: int
    bytes_zero: int
    bytes_hole: int
    bytes_punched: int
    found_unsupported: int  # the *_FAILED bits


def new_buffer(size: int) -> CData:
    """Scratch memory for copy_extents and compare_extents, reusable across
    calls of one thread."""
    return ffi.new("char[]", size)


def new_cancel_flag() -> CData:
    """A flag copy_extents polls; set ``flag[0] = 1`` to stop running calls."""
    return ffi.new("uint32_t *", 0)


def new_rate_cap(bytes_per_s: int) -> CData:
    """A cap on the copier's data rate (``--bwlimit``, not the writers'
    throttle) shared by every copy_extents call handed it (0: none)."""
    cap: Any = ffi.new("bm_rate_cap *")
    cap.bytes_per_s = max(0, int(bytes_per_s))
    owned: CData = cap
    return owned


def new_copier(src_fd: int, dst_fd: int, block_size: int, *, copy_file_range: bool = False,
               seek: bool = True, punch: bool = True) -> Handle:
    """A copier from SRC_FD to DST_FD (not owned: keep them open while it is
    used) with BLOCK_SIZE-byte zero detection, trying copy_file_range,
    SEEK_DATA and hole punching as asked. Each capability is dropped for
    good, for every later call, at its first refusal (see ``capabilities``)."""
    caps = ((CAN_FILE_RANGE if copy_file_range else 0) | (CAN_SEEK if seek else 0)
            | (CAN_PUNCH if punch else 0))
    handle = lib.bm_copier_new(src_fd, dst_fd, block_size, caps)
    if handle == ffi.NULL:
        raise error_from_c()
    owned: Handle = ffi.gc(handle, lib.bm_copier_free)
    return owned


def capabilities(copier: Handle) -> int:
    """The CAN_* bits COPIER still uses (one atomic load)."""
    return int(lib.bm_copier_caps(copier))


def copy_extents(
    copier: Handle,
    extents: ExtentArray,
    buf: CData | None,
    flags: int = 0,
    rate_cap: CData | None = None,
    cancel: CData | None = None,
    src_path: str | None = None,
    dst_path: str | None = None,
) -> CopyCounts:
    """Copy EXTENTS (a C-contiguous EXTENT_DTYPE array) with COPIER in one C
    call (FLAGS: DST_FRESH, START_WRITEBACK); any thread, in parallel on
    disjoint extents. Errors raise OSError naming the side that failed."""
    ext = extents_pointer(extents)
    stats: Any = ffi.new("bm_copy_stats *")
    rc = lib.bm_copy_extents(
        copier, ext, len(extents),
        ffi.NULL if buf is None else buf, 0 if buf is None else len(buf),
        flags,
        ffi.NULL if rate_cap is None else rate_cap,
        ffi.NULL if cancel is None else cancel,
        stats,
    )
    if rc < 0:
        side = stats.error_side
        path = src_path if side == lib.BM_COPY_SIDE_SRC else dst_path if side else None
        raise error_from_c(path)
    return CopyCounts(int(stats.bytes_read), int(stats.bytes_written), int(stats.bytes_zero),
                      int(stats.bytes_hole), int(stats.bytes_punched), int(stats.flags))


def data_extents(fd: int, end: int, chunk: int = SCAN_CHUNK) -> ExtentArray:
    """The data extents of FD over [0, END) (SEEK_DATA/SEEK_HOLE)."""
    return scan_all(lambda cursor, out, room: lib.bm_data_extents(fd, cursor, end, out, room),
                    chunk)


def buffer_is_zero(data: bytes | bytearray | memoryview) -> bool:
    view = memoryview(data).cast("B")
    return bool(lib.bm_buffer_is_zero(ffi.from_buffer("char[]", view), view.nbytes))



