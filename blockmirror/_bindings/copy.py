"""Bindings of the extent copy (csrc/copy.c).

A copier handle (``new_copier``), buffers, the cancel flag and the rate cap
are cffi objects the caller keeps (cffi frees them with the last reference;
a copier handle must outlive every call on it, and its fds the handle)."""

from __future__ import annotations

import array
import functools
import importlib
import os
from typing import TYPE_CHECKING, Any, TypeAlias

from blockmirror._bindings._ffi import (
    SCAN_CHUNK,
    CData,
    error_from_c,
    extent_count,
    extents_pointer,
    ffi,
    lib,
    scan_all,
    scan_pairs,
)
from blockmirror.extents import Extent

if TYPE_CHECKING:  # numpy loads late (see blockmirror.extents)
    import numpy as np
    import numpy.typing as npt

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


class CopyCounts:
    """What one bm_copy_extents call did (``bm_copy_stats``). A plain class,
    not a dataclass: making a dataclass costs ~0.5 ms of every start."""

    def __init__(self, bytes_read: int, bytes_written: int, bytes_zero: int, bytes_hole: int,
                 bytes_punched: int, found_unsupported: int) -> None:
        self.bytes_read = bytes_read
        self.bytes_written = bytes_written
        self.bytes_zero = bytes_zero
        self.bytes_hole = bytes_hole
        self.bytes_punched = bytes_punched
        self.found_unsupported = found_unsupported  # the *_FAILED bits

    def __repr__(self) -> str:
        return f"CopyCounts({', '.join(f'{k}={v}' for k, v in vars(self).items())})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CopyCounts) and vars(self) == vars(other)


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


@functools.cache
def digest_function() -> CData | None:
    """The manifest's digest (xxh3-64) as a C function the copy can call with
    the GIL released: ``XXH3_64bits`` (its dispatching entry where
    exported) from the library of the ``xxhash``
    module the manifest itself uses, so both compute the same thing by
    construction (checked here on a few inputs). None where that library
    does not export it: the caller then digests after the copy."""
    import xxhash

    try:
        path = importlib.import_module("xxhash._xxhash").__file__
    except ImportError:
        return None
    if not path:
        return None
    # Looked up in C (dlopen/dlsym; the library is never unloaded), not with
    # ctypes, whose import was ~2 ms of every sync's start. The dispatching
    # entry picks the widest vector unit at run time (AVX2 here: twice the
    # plain one's speed); same digest.
    address = ffi.NULL
    for name in (b"XXH3_64bits_dispatch", b"XXH3_64bits"):
        address = lib.bm_library_symbol(os.fsencode(path), name)
        if address != ffi.NULL:
            break
    if address == ffi.NULL:
        return None
    fn: Any = ffi.cast("bm_hash_fn", address)
    for size in (0, 1, 17, 240, 241, 4096, 65536 + 3):
        sample = (bytes(range(256)) * (size // 256 + 1))[size % 7:size % 7 + size]
        if int(fn(ffi.from_buffer(sample), size)) != xxhash.xxh3_64_intdigest(sample):
            return None
    found: CData = fn
    return found


def filesystem_type(fd: int) -> int | None:
    """The type (statfs f_type, e.g. 0xEF53 for ext2/3/4) of FD's
    filesystem, or None where it cannot be told."""
    kind = int(lib.bm_filesystem_type(fd))
    return None if kind < 0 else kind


def new_digest_slots(count: int) -> CData:
    """COUNT zeroed digest slots in C memory (a sink's OUT without numpy)."""
    slots: CData = ffi.new("uint64_t[]", max(1, count))
    return slots


def slot_values(slots: CData, count: int) -> memoryview:
    """The first COUNT slots of new_digest_slots' SLOTS, as uint64 bytes."""
    return memoryview(ffi.buffer(slots, 8 * count))


def slot_count(extents: list[Extent], granularity: int) -> int:
    """How many slots a digest sink needs for EXTENTS (pairs): one per
    granule each non-empty extent touches (``len(digest_slots(...))``)."""
    g = granularity
    return sum(-(-(o + n) // g) - o // g for o, n in extents if n > 0)


def pairs_array(extents: list[Extent]) -> array.array[int]:
    """EXTENTS (pairs) laid out as ``bm_extent[]`` in an array of uint64:
    what copy_extents takes without numpy."""
    words = array.array("Q")
    for offset, length in extents:
        words.append(offset)
        words.append(length)
    return words


def _sink(fn: CData, granularity: int, zero: int, out: Any) -> CData:
    """A ``bm_digest_sink`` writing into OUT (which must outlive its use):
    a uint64 numpy array, or slots from new_digest_slots."""
    sink: Any = ffi.new("bm_digest_sink *")
    sink.hash, sink.granularity, sink.zero_digest = fn, granularity, zero
    if isinstance(out, ffi.CData):
        sink.count = len(out)
        sink.digests = out
        owned_c: CData = sink
        return owned_c
    import numpy as np

    if out.dtype != np.uint64 or not out.flags.c_contiguous or not out.flags.writeable:
        raise ValueError("digest slots must be a writable C-contiguous uint64 array")
    sink.count = len(out)
    sink.digests = ffi.cast("uint64_t *", ffi.from_buffer(out.data)) if len(out) else ffi.NULL
    owned: CData = sink
    return owned


def digest_extents(fd: int, extents: ExtentArray, granularity: int,
                   buf: CData | None = None) -> npt.NDArray[np.uint64] | None:
    """The digest of every granule of EXTENTS of FD (each extent starting on
    a granule boundary; see bm_digest_extents), in slot order, read and
    hashed in one C call with the GIL released; None where the digest
    cannot be called from C (see digest_function)."""
    import numpy as np

    fn = digest_function()
    if fn is None:
        return None
    out = np.zeros(len(digest_slots(extents, granularity)), dtype=np.uint64)
    sink = _sink(fn, granularity, 0, out)
    rc = lib.bm_digest_extents(fd, extents_pointer(extents), len(extents),
                               ffi.NULL if buf is None else buf, 0 if buf is None else len(buf),
                               ffi.NULL, sink)
    if rc < 0:
        raise error_from_c()
    return out


def digest_slots(extents: ExtentArray, granularity: int) -> npt.NDArray[np.int64]:
    """The granule of each slot a digest sink needs for EXTENTS: one per
    granule each extent touches, extent after extent (see bm_digest_sink)."""
    import numpy as np

    if not len(extents):
        return np.zeros(0, dtype=np.int64)
    first = (extents["offset"] // np.uint64(granularity)).astype(np.int64)
    end = (-(-(extents["offset"] + extents["length"]).astype(np.int64) // granularity))
    lengths = np.where(extents["length"] > 0, end - first, 0)
    shift = np.repeat(first - np.concatenate(([0], np.cumsum(lengths)[:-1])), lengths)
    return np.arange(int(lengths.sum()), dtype=np.int64) + shift


def copy_extents(
    copier: Handle,
    extents: ExtentArray | array.array[int],
    buf: CData | None,
    flags: int = 0,
    rate_cap: CData | None = None,
    cancel: CData | None = None,
    src_path: str | None = None,
    dst_path: str | None = None,
    digests: tuple[CData, int, int, Any] | None = None,
) -> CopyCounts:
    """Copy EXTENTS (a C-contiguous EXTENT_DTYPE array, or the uint64 words
    of pairs_array) with COPIER in one C call (FLAGS: DST_FRESH,
    START_WRITEBACK); any thread, in parallel on disjoint extents. Errors
    raise OSError naming the side that failed.

    DIGESTS, if given, is (digest_function(), granularity, zero-granule
    digest, out): OUT (zeroed, one uint64 per slot of ``digest_slots``: an
    array, or new_digest_slots) receives the digest of each granule copied
    whole (0: none)."""
    count = extent_count(extents)
    ext = extents_pointer(extents)
    stats: Any = ffi.new("bm_copy_stats *")
    sink: Any = ffi.NULL if digests is None else _sink(*digests)
    rc = lib.bm_copy_extents_hashed(
        copier, ext, count,
        ffi.NULL if buf is None else buf, 0 if buf is None else len(buf),
        flags,
        ffi.NULL if rate_cap is None else rate_cap,
        ffi.NULL if cancel is None else cancel,
        sink,
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


def data_extent_pairs(fd: int, end: int) -> list[Extent]:
    """:func:`data_extents` as ``(offset, length)`` pairs, without numpy."""
    return scan_pairs(lambda cursor, out, room: lib.bm_data_extents(fd, cursor, end, out, room))


def buffer_is_zero(data: bytes | bytearray | memoryview) -> bool:
    view = memoryview(data).cast("B")
    return bool(lib.bm_buffer_is_zero(ffi.from_buffer("char[]", view), view.nbytes))



