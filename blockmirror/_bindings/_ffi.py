"""What every binding module shares: the cffi objects, errno to exception,
and the resumable extent scans of the C core."""

from __future__ import annotations

import array
import errno
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeAlias

from blockmirror._core import ffi, lib
from blockmirror.errors import SidecarCorruptError, SidecarUnsafeError
from blockmirror.extents import Extent, merge_touching

if TYPE_CHECKING:
    from cffi import FFI

    from blockmirror.extents import ExtentArray

__all__ = ["SCAN_DONE", "CData", "check", "error_from_c", "ffi", "lib", "scan_all", "scan_pairs"]

if TYPE_CHECKING:  # the stubs' name for a cffi pointer or array (types-cffi)
    CData: TypeAlias = FFI.CData
else:
    CData = ffi.CData

SCAN_DONE = 2**64 - 1
SCAN_CHUNK = 65536


def error_from_c(path: str | None = None, *, sidecar: bool = False) -> OSError:
    """The exception for the C call that just failed on this thread. SIDECAR
    says PATH is a sidecar, so EPERM there means "unsafe to trust"."""
    err = ffi.errno
    raw = ffi.string(lib.bm_last_error())
    message = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    if err == errno.EUCLEAN:
        return SidecarCorruptError(message, path)
    if err == errno.EPERM and sidecar:
        return SidecarUnsafeError(message, path)
    return OSError(err, message or os.strerror(err), path)


def check(rc: int, path: str | None = None) -> int:
    """RC, or the C error as an exception when RC is negative."""
    if rc < 0:
        raise error_from_c(path)
    return int(rc)


ScanStep = Callable[[CData, CData, int], int]
"""One resumable C scan call: (cursor, out, max) -> count."""


def scan_all(step: ScanStep, chunk: int = SCAN_CHUNK) -> ExtentArray:
    """Run a resumable C scan (cursor from 0 to SCAN_DONE) to its end, straight
    into numpy memory. The C scans merge runs within a call, and a run split
    across two calls is joined here, so the answer never depends on the
    chunk size (CHUNK extents per call; tests use small ones)."""
    import numpy as np  # late: see blockmirror.extents

    from blockmirror.extents import EXTENT_DTYPE

    cursor = ffi.new("uint64_t *", 0)
    parts: list[ExtentArray] = []
    while cursor[0] != SCAN_DONE:
        buf = np.empty(chunk, dtype=EXTENT_DTYPE)
        n = check(step(cursor, ffi.cast("bm_extent *", ffi.from_buffer(buf.data)), chunk))
        parts.append(buf[:n])
    if len(parts) == 1:
        return parts[0]
    return merge_touching(np.concatenate(parts))


def scan_pairs(step: ScanStep, chunk: int = 1024) -> list[Extent]:
    """:func:`scan_all` as ``(offset, length)`` pairs, through a cffi buffer
    instead of numpy: for the light commands, whose scans find few extents."""
    cursor = ffi.new("uint64_t *", 0)
    buf = ffi.new("bm_extent[]", chunk)
    out: list[Extent] = []
    while cursor[0] != SCAN_DONE:
        for offset, length in extent_pairs(buf, check(step(cursor, buf, chunk))):
            if out and out[-1][0] + out[-1][1] == offset:  # a run split across calls
                out[-1] = (out[-1][0], out[-1][1] + length)
            elif length:
                out.append((offset, length))
    return out


def extent_pairs(buf: CData, count: int) -> list[Extent]:
    """The first COUNT entries of a ``bm_extent[]`` as pairs, converted in
    one go (array of uint64) rather than field by field through cffi."""
    words = array.array("Q")
    words.frombytes(ffi.buffer(buf, count * ffi.sizeof("bm_extent")))
    return list(zip(words[0::2], words[1::2], strict=True))


def extent_count(extents: ExtentArray | array.array[int]) -> int:
    """How many extents EXTENTS holds, in either form extents_pointer takes
    (an array of uint64 words holds two per extent)."""
    return len(extents) // 2 if isinstance(extents, array.array) else len(extents)


def extents_pointer(extents: ExtentArray | array.array[int], *, on: Any = None,
                    ctype: str = "bm_extent *") -> CData:
    """A CTYPE over EXTENTS (NULL when empty), checked: an EXTENT_DTYPE
    array, or pairs laid out as uint64 words (``copy.pairs_array``: no
    numpy). ON is the ffi of the module the pointer is for: the core's by
    default, or an endpoint's (its extent struct has the same two uint64
    fields)."""
    module_ffi = ffi if on is None else on
    if isinstance(extents, array.array):
        if extents.typecode != "Q" or len(extents) % 2:
            raise ValueError("extent words must be uint64 (offset, length) pairs")
        if not len(extents):
            return module_ffi.NULL
        words: CData = module_ffi.cast(ctype, module_ffi.from_buffer(extents))
        return words
    from blockmirror.extents import EXTENT_DTYPE

    if extents.dtype != EXTENT_DTYPE or not extents.flags.c_contiguous:
        raise ValueError("extents must be a C-contiguous EXTENT_DTYPE array")
    if not len(extents):
        return module_ffi.NULL
    pointer: CData = module_ffi.cast(ctype, module_ffi.from_buffer(extents.data))
    return pointer
