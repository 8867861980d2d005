"""Bindings of the NBD endpoint (csrc/remote/nbd.c, module ``blockmirror._remote``).

The module exists only where libnbd-dev was installed at build time;
:func:`available` says so and :func:`open_export` raises
:class:`~blockmirror.errors.InvalidInputError` naming the package otherwise.
Handles are freed by cffi with their last reference (``bm_nbd_close``), and
must outlive every call on them. Messages never hold the URI: the caller
names the export (without its user info) itself.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING, Any, TypeAlias

from blockmirror._bindings._ffi import extent_count, extents_pointer
from blockmirror._bindings.optional import CopyCounts, OptionalModule

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

    from blockmirror.extents import ExtentArray

Handle: TypeAlias = Any
"""A ``bm_nbd *`` owned by ffi.gc (bm_nbd_close runs with its last reference)."""

MISSING = ("nbd:// endpoints need libnbd: install Debian's libnbd-dev and rebuild "
           "blockmirror (pip install .)")
_EXT = OptionalModule("blockmirror._remote", MISSING, "bm_nbd_last_error")
_lib, _ffi, _constant = _EXT.lib, _EXT.ffi, _EXT.constant
error_from_c = _EXT.error_from_c


def available() -> bool:
    """Whether this build has the NBD endpoint (built with libnbd-dev)."""
    return _EXT.available()


CAN_WRITE = _constant("BM_NBD_CAN_WRITE", 1)
CAN_FLUSH = _constant("BM_NBD_CAN_FLUSH", 2)
CAN_FUA = _constant("BM_NBD_CAN_FUA", 4)
CAN_TRIM = _constant("BM_NBD_CAN_TRIM", 8)
CAN_ZERO = _constant("BM_NBD_CAN_ZERO", 16)
CAN_MULTI_CONN = _constant("BM_NBD_CAN_MULTI_CONN", 32)
CAN_BLOCK_STATUS = _constant("BM_NBD_CAN_BLOCK_STATUS", 64)
DST_FRESH = _constant("BM_NBD_DST_FRESH", 1)
SIDE_SRC = _constant("BM_NBD_SIDE_SRC", 1)
SIDE_DST = _constant("BM_NBD_SIDE_DST", 2)
MAX_CONNS = _constant("BM_NBD_MAX_CONNS", 16)
DEFAULT_REQUESTS = _constant("BM_NBD_DEFAULT_REQUESTS", 16)
DEFAULT_REQUEST_BYTES = _constant("BM_NBD_DEFAULT_REQUEST_BYTES", 262144)


def open_export(uri: str, connections: int, *, write: bool, timeout_s: float,
                name: str) -> Handle:
    """Connect to URI with up to CONNECTIONS connections (more than one only
    where the export offers multi-conn). NAME labels errors."""
    ffi, lib = _ffi(), _lib()
    handle = lib.bm_nbd_open(uri.encode(), connections, 1 if write else 0,
                             max(0, round(timeout_s * 1000)))
    if handle == ffi.NULL:
        raise error_from_c(name)
    return ffi.gc(handle, lib.bm_nbd_close)


def close(handle: Handle) -> None:
    """Disconnect now instead of at garbage collection."""
    _ffi().release(handle)


def size(handle: Handle) -> int:
    return int(_lib().bm_nbd_size(handle))


def capabilities(handle: Handle) -> int:
    """The CAN_* bits the export offered."""
    return int(_lib().bm_nbd_caps(handle))


def connections(handle: Handle) -> int:
    return int(_lib().bm_nbd_connections(handle))


def flush(handle: Handle, name: str | None = None) -> None:
    if _lib().bm_nbd_flush(handle) < 0:
        raise error_from_c(name)


def reads_zero(handle: Handle, conn: int, offset: int, length: int,
               name: str | None = None) -> bool:
    """Whether the export says [OFFSET, OFFSET+LENGTH) reads as zeros (NBD
    block status; False where it cannot say)."""
    rc = _lib().bm_nbd_reads_zero(handle, conn, offset, length)
    if rc < 0:
        raise error_from_c(name)
    return bool(rc)


def new_buffer(nbytes: int) -> Any:
    return _ffi().new("char[]", nbytes)


def pread(handle: Handle, conn: int, buf: Any, nbytes: int, offset: int,
          name: str | None = None) -> bytes:
    """NBYTES at OFFSET of the export, read through BUF (new_buffer, at
    least NBYTES long)."""
    if _lib().bm_nbd_pread(handle, conn, buf, nbytes, offset) < 0:
        raise error_from_c(name)
    return bytes(_ffi().buffer(buf, nbytes))


def pwrite(handle: Handle, conn: int, data: bytes | bytearray | memoryview, offset: int,
           name: str | None = None) -> int:
    """Write DATA at OFFSET of the export over connection CONN (a writer's
    write after a move onto it); the bytes written, all of them."""
    ffi = _ffi()
    view = memoryview(data).cast("B")
    buf = ffi.from_buffer(view)
    if _lib().bm_nbd_pwrite(handle, conn, buf, len(view), offset) < 0:
        raise error_from_c(name)
    return len(view)


def zero(handle: Handle, conn: int, offset: int, length: int, *, may_trim: bool,
         name: str | None = None) -> None:
    """Make [OFFSET, OFFSET+LENGTH) of the export read as zeros (WRITE_ZEROES;
    MAY_TRIM lets the server punch it)."""
    if _lib().bm_nbd_zero(handle, conn, offset, length, 1 if may_trim else 0) < 0:
        raise error_from_c(name)


def new_cancel_flag() -> Any:
    return _ffi().new("uint32_t *", 0)


def new_rate_cap(bytes_per_s: int) -> Any:
    cap = _ffi().new("bm_nbd_rate_cap *")
    cap.bytes_per_s = max(0, int(bytes_per_s))
    return cap


def copy_extents(handle: Handle, conn: int, src_fd: int, extents: ExtentArray,
                 block_size: int, *, requests: int = 0, request_bytes: int = 0,
                 flags: int = 0, rate_cap: Any = None, cancel: Any = None,
                 src_path: str | None = None, dst_name: str | None = None,
                 digests: tuple[Any, int, int, npt.NDArray[np.uint64]] | None = None
                 ) -> CopyCounts:
    """Copy EXTENTS (a C-contiguous EXTENT_DTYPE array) of SRC_FD into the
    export over connection CONN, in one C call (the GIL released); errors
    name the side. DIGESTS, if given, is as for copy.copy_extents
    (copy.digest_function(), granularity, zero-granule digest, out): OUT
    (zeroed, one uint64 per slot of ``copy.digest_slots``) receives the
    digest of each granule copied whole, hashed from the bytes sent (0:
    none). The granularity must divide REQUEST_BYTES."""
    ffi, lib = _ffi(), _lib()
    ext = extents_pointer(extents, on=ffi, ctype="bm_nbd_extent *")
    stats = ffi.new("bm_nbd_copy_stats *")
    sink = ffi.NULL if digests is None else _EXT.digest_sink("bm_nbd", *digests)
    count = extent_count(extents)
    rc = lib.bm_nbd_copy_extents_hashed(handle, conn, src_fd, ext, count, block_size,
                                        requests, request_bytes, flags,
                                        ffi.NULL if rate_cap is None else rate_cap,
                                        ffi.NULL if cancel is None else cancel, sink, stats)
    if rc < 0:
        side = stats.error_side
        raise error_from_c(src_path if side == SIDE_SRC else dst_name if side else None)
    return CopyCounts.of(stats)


MAP_BATCH = 65536
"""Extents one bm_nbd_map call may return (1 MiB of output)."""


def map_data(handle: Handle, conn: int, offset: int, length: int,
             name: str | None = None) -> ExtentArray:
    """The extents of [OFFSET, OFFSET+LENGTH) the export does not say read as
    zeros (NBD block status; all of it where the server cannot say), merged."""
    import numpy as np  # late: numpy (see blockmirror.extents)

    from blockmirror.extents import EXTENT_DTYPE, merge_touching

    ffi, lib = _ffi(), _lib()
    out = np.zeros(MAP_BATCH, dtype=EXTENT_DTYPE)
    described = ffi.new("uint64_t *")
    found: list[ExtentArray] = []
    pos, end = offset, offset + length
    while pos < end:
        n = lib.bm_nbd_map(handle, conn, pos, end - pos,
                           ffi.cast("bm_nbd_extent *", ffi.from_buffer(out.data)), MAP_BATCH,
                           described)
        if n < 0:
            raise error_from_c(name)
        found.append(out[:n].copy())
        if int(described[0]) <= pos:
            raise OSError(errno.EIO, "NBD block status made no progress", name)
        pos = int(described[0])
    return merge_touching(np.concatenate(found)) if found else out[:0].copy()


def read_extents(handle: Handle, conn: int, dst_fd: int, extents: ExtentArray,
                 block_size: int, *, requests: int = 0, request_bytes: int = 0,
                 rate_cap: Any = None, cancel: Any = None, src_name: str | None = None,
                 dst_path: str | None = None) -> CopyCounts:
    """Read EXTENTS of the export over connection CONN into the same offsets
    of the fresh local file DST_FD (data blocks only), in one C call."""
    ffi, lib = _ffi(), _lib()
    ext = extents_pointer(extents, on=ffi, ctype="bm_nbd_extent *")
    stats = ffi.new("bm_nbd_copy_stats *")
    rc = lib.bm_nbd_read_extents(handle, conn, dst_fd, ext, len(extents), block_size,
                                 requests, request_bytes,
                                 ffi.NULL if rate_cap is None else rate_cap,
                                 ffi.NULL if cancel is None else cancel, stats)
    if rc < 0:
        side = stats.error_side
        raise error_from_c(src_name if side == SIDE_SRC else dst_path if side else None)
    return CopyCounts.of(stats)
