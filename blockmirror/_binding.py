"""The only module that touches the compiled core (``blockmirror._core``).

One small wrapper per C call: it converts arguments, calls C (cffi releases
the GIL for the call) and turns a -1 return into an exception built from the
C errno and the thread's last-error message. Nothing above this module knows
about cffi. The one exception to cffi is the tracked write's hot path,
``blockmirror._fastwrite`` (see ``pwrite_function``), also imported only here.
"""

from __future__ import annotations

import errno
import os
from typing import Any

import numpy as np

from blockmirror._core import ffi, lib
from blockmirror.errors import SidecarCorruptError, SidecarUnsafeError

try:
    from blockmirror import _fastwrite
except ImportError:  # not built: every write goes through cffi, a little slower
    _fastwrite = None

Handle = Any  # a cffi ``bm_tracker *`` owned by ffi.gc

EXTENT_DTYPE = np.dtype([("offset", np.uint64), ("length", np.uint64)])
SCAN_DONE = 2**64 - 1

DEFAULT_GRANULARITY: int = lib.BM_DEFAULT_GRANULARITY
MIN_GRANULARITY: int = lib.BM_MIN_GRANULARITY
MAX_GRANULARITY: int = lib.BM_MAX_GRANULARITY
MAX_IMAGE_SIZE: int = lib.BM_MAX_IMAGE_SIZE
FLAG_UNCLEAN: int = lib.BM_FLAG_UNCLEAN
STATE_NAMES = {
    lib.BM_STATE_RUNNING: "running",
    lib.BM_STATE_FREEZING: "freezing",
    lib.BM_STATE_FROZEN: "frozen",
    lib.BM_STATE_REDIRECTED: "redirected",
}


def error_from_c(path: str | None = None) -> OSError:
    """The exception for the C call that just failed on this thread."""
    err = ffi.errno
    message = ffi.string(lib.bm_last_error()).decode("utf-8", "replace")
    if err == errno.EUCLEAN:
        return SidecarCorruptError(message, path)
    if err == errno.EPERM and path is not None and path.endswith(".cbt"):
        return SidecarUnsafeError(message, path)
    return OSError(err, message or os.strerror(err), path)


def _check(rc: int, path: str | None = None) -> int:
    if rc < 0:
        raise error_from_c(path)
    return rc


def create(path: str, image_size: int, granularity: int, owner_uid: int) -> None:
    _check(lib.bm_create(os.fsencode(path), image_size, granularity, owner_uid), path)


def open_tracker(path: str, writer: bool, expected_uid: int) -> Handle:
    flags = lib.BM_OPEN_WRITER if writer else lib.BM_OPEN_READER
    handle = lib.bm_open(os.fsencode(path), flags, expected_uid)
    if handle == ffi.NULL:
        raise error_from_c(path)
    return ffi.gc(handle, lib.bm_close)


def close(handle: Handle) -> None:
    ffi.release(handle)  # runs bm_close now instead of at garbage collection


def info(handle: Handle) -> dict[str, Any]:
    out = ffi.new("bm_info *")
    _check(lib.bm_get_info(handle, out))
    return {
        "version": out.version,
        "granularity": out.granularity,
        "image_size": out.image_size,
        "generation": out.generation,
        "series": bytes(ffi.buffer(out.series, 16)).hex(),
        "flags": out.flags,
        "state": STATE_NAMES.get(out.state, f"unknown({out.state})"),
        "live_writers": out.live_writers,
        "copier_pid": out.copier_pid,
        "throttle_bytes_per_s": out.throttle_bytes_per_s,
    }


def reset(handle: Handle) -> None:
    _check(lib.bm_reset(handle))


def mark(handle: Handle, offset: int, length: int) -> None:
    if offset < 0 or length < 0:
        raise ValueError(f"offset and length must be >= 0, got {offset}, {length}")
    _check(lib.bm_mark(handle, offset, length))


def clear_range(handle: Handle, offset: int, length: int) -> None:
    if offset < 0 or length < 0:
        raise ValueError(f"offset and length must be >= 0, got {offset}, {length}")
    _check(lib.bm_clear_range(handle, offset, length))


def mark_all(handle: Handle) -> None:
    _check(lib.bm_mark_all(handle))


def dirty_bytes(handle: Handle) -> int:
    return _check(lib.bm_dirty_bytes(handle))


def resize(handle: Handle, size: int) -> None:
    _check(lib.bm_resize(handle, size))


def scan_extents(handle: Handle, clear: bool, chunk: int = 65536) -> np.ndarray:
    """All dirty extents as a structured array (fields offset, length).

    Scans in chunks of CHUNK extents straight into numpy memory; with CLEAR
    the bits are taken atomically (bm_fetch_and_clear), otherwise only read.
    """
    scan = lib.bm_fetch_and_clear if clear else lib.bm_snapshot
    cursor = ffi.new("uint64_t *", 0)
    parts = []
    while cursor[0] != SCAN_DONE:
        buf = np.empty(chunk, dtype=EXTENT_DTYPE)
        n = _check(scan(handle, cursor, ffi.cast("bm_extent *", ffi.from_buffer(buf)), chunk))
        parts.append(buf[:n])
    if len(parts) == 1:
        return parts[0]
    return _merge_touching(np.concatenate(parts))


def _merge_touching(extents: np.ndarray) -> np.ndarray:
    """Merge extents that touch (a run split across two scan chunks), so
    callers see the same answer whatever the chunk size."""
    if len(extents) < 2:
        return extents
    ends = extents["offset"][:-1] + extents["length"][:-1]
    touching = ends == extents["offset"][1:]
    if not touching.any():
        return extents
    starts = np.flatnonzero(np.concatenate(([True], ~touching)))
    group_ends = np.concatenate((starts[1:], [len(extents)])) - 1
    out = np.empty(len(starts), dtype=EXTENT_DTYPE)
    out["offset"] = extents["offset"][starts]
    out["length"] = extents["offset"][group_ends] + extents["length"][group_ends] - out["offset"]
    return out


def new_change_id(handle: Handle) -> int:
    """Take a change id: the generation now, which then moves on."""
    out = ffi.new("uint64_t *")
    _check(lib.bm_new_change_id(handle, out))
    return int(out[0])


def changed_since(handle: Handle, since: int, chunk: int = 65536) -> np.ndarray:
    """Extents of granules marked after generation SINCE (eras > SINCE)."""
    cursor = ffi.new("uint64_t *", 0)
    parts = []
    while cursor[0] != SCAN_DONE:
        buf = np.empty(chunk, dtype=EXTENT_DTYPE)
        n = _check(lib.bm_changed_since(handle, since, cursor,
                                        ffi.cast("bm_extent *", ffi.from_buffer(buf)), chunk))
        parts.append(buf[:n])
    return _merge_touching(np.concatenate(parts)) if len(parts) > 1 else parts[0]


# The fast path calls the one copy of the C core, in _core, through these
# pointers (csrc/python/fastwrite.c says why it is not cffi).
_BM_PWRITE_ADDR = int(ffi.cast("uintptr_t", ffi.addressof(lib, "bm_pwrite")))
_BM_LAST_ERROR_ADDR = int(ffi.cast("uintptr_t", ffi.addressof(lib, "bm_last_error")))


def pwrite_function(handle: Handle, fd: int, path: str, on_stale=None):  # type: ignore[no-untyped-def]
    """A fast ``pwrite(data, offset) -> int`` bound to one handle and fd.

    Built once per image so a write is one C call: a ``_fastwrite.Writer``
    (no Python frame; about as cheap to call as ``os.pwrite``), or, where the
    extension is not built, the cffi closure of ``cffi_pwrite_function``.
    When the write fails with ESTALE (the image was redirected) and ON_STALE
    is given, the result of ``on_stale(data, offset)`` is returned instead of
    raising, so the caller needs no frame of its own around the fast path.
    Call ``retire_pwrite_function`` on it before the handle is closed.
    """
    if _fastwrite is None:
        return cffi_pwrite_function(handle, fd, path, on_stale)
    return _fastwrite.Writer(_BM_PWRITE_ADDR, _BM_LAST_ERROR_ADDR,
                             int(ffi.cast("uintptr_t", handle)), handle, fd, path, on_stale)


def cffi_pwrite_function(handle: Handle, fd: int, path: str, on_stale=None):  # type: ignore[no-untyped-def]
    """``pwrite_function`` through cffi: one Python frame and one cffi call."""
    bm_pwrite = lib.bm_pwrite
    from_buffer = ffi.from_buffer

    def pwrite(data: bytes, offset: int) -> int:
        if type(data) is bytes:
            n = bm_pwrite(handle, fd, data, len(data), offset)
        else:
            view = memoryview(data).cast("B")
            n = bm_pwrite(handle, fd, from_buffer("char[]", view), view.nbytes, offset)
        if n < 0:
            if on_stale is not None and ffi.errno == errno.ESTALE:
                return on_stale(data, offset)
            raise error_from_c(path)
        return n

    return pwrite


def retire_pwrite_function(pwrite) -> None:  # type: ignore[no-untyped-def]
    """Detach a ``pwrite_function`` from its handle before the handle is
    closed: a fast-path Writer then raises ValueError if called again, even
    through a reference taken earlier. (A cffi closure cannot be detached;
    its owner must drop it.)"""
    close = getattr(pwrite, "close", None)
    if close is not None:
        close()


def discard(handle: Handle, fd: int, offset: int, length: int, path: str) -> None:
    _check(lib.bm_discard(handle, fd, offset, length), path)


def truncate(handle: Handle, fd: int, size: int, path: str) -> None:
    _check(lib.bm_truncate(handle, fd, size), path)


def freeze(handle: Handle, lease_s: float) -> None:
    _check(lib.bm_freeze(handle, int(lease_s * 1e9)))


def freeze_check(handle: Handle) -> None:
    _check(lib.bm_freeze_check(handle))


def thaw(handle: Handle) -> None:
    _check(lib.bm_thaw(handle))


def redirect(handle: Handle, target: str) -> None:
    _check(lib.bm_redirect(handle, os.fsencode(target)))


def redirected(handle: Handle) -> bool:
    """True once writers were sent elsewhere (one atomic load in C)."""
    return bool(lib.bm_get_state(handle) == lib.BM_STATE_REDIRECTED)


def redirect_target(handle: Handle) -> str:
    buf = ffi.new("char[]", lib.BM_REDIRECT_MAX)
    _check(lib.bm_get_redirect(handle, buf, lib.BM_REDIRECT_MAX))
    return os.fsdecode(ffi.string(buf))


def set_throttle(handle: Handle, bytes_per_s: int) -> None:
    _check(lib.bm_set_throttle(handle, max(0, int(bytes_per_s))))


def live_writers(handle: Handle) -> int:
    return _check(lib.bm_live_writers(handle))


# ---------------------------------------------------------------------------
# Extent copy (csrc/copy.c)
#
# One wrapper per C call, as above. Buffers, the cancel flag and the rate cap
# are cffi objects the caller keeps (cffi frees them with the last reference).

COPY_DST_FRESH: int = lib.BM_COPY_DST_FRESH
COPY_FILE_RANGE: int = lib.BM_COPY_FILE_RANGE
COPY_NO_SEEK: int = lib.BM_COPY_NO_SEEK
COPY_NO_PUNCH: int = lib.BM_COPY_NO_PUNCH
COPY_START_WRITEBACK: int = lib.BM_COPY_START_WRITEBACK
COPY_FILE_RANGE_FAILED: int = lib.BM_COPY_FILE_RANGE_FAILED
COPY_PUNCH_FAILED: int = lib.BM_COPY_PUNCH_FAILED
COPY_SEEK_FAILED: int = lib.BM_COPY_SEEK_FAILED
COPY_MIN_BLOCK: int = lib.BM_COPY_MIN_BLOCK
COPY_MAX_BLOCK: int = lib.BM_COPY_MAX_BLOCK
COPY_DEFAULT_BUFFER: int = lib.BM_COPY_DEFAULT_BUFFER
COPY_STAT_FIELDS = ("bytes_read", "bytes_written", "bytes_zero", "bytes_hole", "bytes_punched")


def new_copy_buffer(size: int) -> Any:
    """Scratch memory for copy_extents, reusable across calls of one thread."""
    return ffi.new("char[]", size)


def new_cancel_flag() -> Any:
    """A flag copy_extents polls; set ``flag[0] = 1`` to stop running calls."""
    return ffi.new("uint32_t *", 0)


def new_copy_throttle(bytes_per_s: int) -> Any:
    """A rate cap shared by every copy_extents call handed it (0: none)."""
    throttle = ffi.new("bm_copy_throttle *")
    throttle.bytes_per_s = max(0, int(bytes_per_s))
    return throttle


def copy_extents(
    src_fd: int,
    dst_fd: int,
    extents: np.ndarray,
    buf: Any,
    block_size: int,
    flags: int,
    throttle: Any = None,
    cancel: Any = None,
    src_path: str | None = None,
    dst_path: str | None = None,
) -> tuple[dict[str, int], int]:
    """Copy EXTENTS (an EXTENT_DTYPE array) from src to dst in one C call.

    Returns (stats, found) where stats has COPY_STAT_FIELDS and found holds
    the COPY_*_FAILED bits. Errors raise OSError naming the side that failed.
    """
    if extents.dtype != EXTENT_DTYPE or not extents.flags.c_contiguous:
        raise ValueError("extents must be a C-contiguous EXTENT_DTYPE array")
    stats = ffi.new("bm_copy_stats *")
    ext = ffi.cast("bm_extent *", ffi.from_buffer(extents)) if len(extents) else ffi.NULL
    rc = lib.bm_copy_extents(
        src_fd,
        dst_fd,
        ext,
        len(extents),
        ffi.NULL if buf is None else buf,
        0 if buf is None else len(buf),
        block_size,
        flags,
        ffi.NULL if throttle is None else throttle,
        ffi.NULL if cancel is None else cancel,
        stats,
    )
    if rc < 0:
        side = stats.error_side
        path = src_path if side == lib.BM_COPY_SIDE_SRC else dst_path if side else None
        raise error_from_c(path)
    return {name: getattr(stats, name) for name in COPY_STAT_FIELDS}, stats.flags


def data_extents(fd: int, end: int, chunk: int = 65536) -> np.ndarray:
    """The data extents of FD over [0, END) as an EXTENT_DTYPE array."""
    cursor = ffi.new("uint64_t *", 0)
    parts = []
    while cursor[0] != SCAN_DONE:
        buf = np.empty(chunk, dtype=EXTENT_DTYPE)
        out = ffi.cast("bm_extent *", ffi.from_buffer(buf))
        n = _check(lib.bm_data_extents(fd, cursor, end, out, chunk))
        parts.append(buf[:n])
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


COMPARE_DEFAULT_BUFFER: int = lib.BM_COMPARE_DEFAULT_BUFFER


def compare_extents(
    a_fd: int,
    b_fd: int,
    extents: np.ndarray,
    block_size: int,
    buf: Any = None,
    cancel: Any = None,
    a_path: str | None = None,
    b_path: str | None = None,
) -> np.ndarray:
    """The BLOCK_SIZE blocks where A and B differ over EXTENTS (a C-contiguous
    EXTENT_DTYPE array, ascending), one C call: an EXTENT_DTYPE array, merged,
    empty if identical. BUF is scratch from new_copy_buffer (None: the call
    allocates its own). Errors raise OSError naming the side that failed."""
    if extents.dtype != EXTENT_DTYPE or not extents.flags.c_contiguous:
        raise ValueError("extents must be a C-contiguous EXTENT_DTYPE array")
    # Each extent holds at most length // block + 2 (partial) blocks.
    room = int((extents["length"] // np.uint64(block_size)).sum()) + 2 * len(extents)
    out = np.empty(room, dtype=EXTENT_DTYPE)
    side = ffi.new("uint32_t *")
    n = lib.bm_compare_extents(
        a_fd,
        b_fd,
        ffi.cast("bm_extent *", ffi.from_buffer(extents)) if len(extents) else ffi.NULL,
        len(extents),
        ffi.NULL if buf is None else buf,
        0 if buf is None else len(buf),
        block_size,
        ffi.NULL if cancel is None else cancel,
        ffi.cast("bm_extent *", ffi.from_buffer(out)) if room else ffi.NULL,
        room,
        side,
    )
    if n < 0:
        failed = side[0]
        raise error_from_c(
            a_path if failed == lib.BM_COMPARE_SIDE_A
            else b_path if failed == lib.BM_COMPARE_SIDE_B else None
        )
    return out[:n].copy()


def buffer_is_zero(data: bytes | bytearray | memoryview) -> bool:
    view = memoryview(data).cast("B")
    return bool(lib.bm_buffer_is_zero(ffi.from_buffer("char[]", view), view.nbytes))
