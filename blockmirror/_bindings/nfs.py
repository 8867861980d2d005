"""Bindings of the NFS endpoint (csrc/nfs/nfs.c, module ``blockmirror._nfs``).

The module exists only where libnfs-dev was installed at build time;
:func:`available` says so and every other call raises
:class:`~blockmirror.errors.InvalidInputError` naming the package otherwise.
Handles are freed by cffi with their last reference (``bm_nfs_close``) and
must outlive every call on them. Messages never hold the URL: the caller
names the file itself.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, TypeAlias

from blockmirror._bindings._ffi import extents_pointer
from blockmirror._bindings.optional import CopyCounts, OptionalModule

if TYPE_CHECKING:  # numpy-backed (blockmirror.extents)
    from blockmirror.extents import ExtentArray

if TYPE_CHECKING:
    import numpy as np
    import numpy.typing as npt

Handle: TypeAlias = Any
"""A ``bm_nfs *`` owned by ffi.gc (bm_nfs_close runs with its last reference)."""

MISSING = ("nfs:// endpoints need libnfs: install Debian's libnfs-dev and rebuild "
           "blockmirror (pip install .)")
_EXT = OptionalModule("blockmirror._nfs", MISSING, "bm_nfs_last_error")
_lib, _ffi, _constant = _EXT.lib, _EXT.ffi, _EXT.constant
error_from_c = _EXT.error_from_c


def available() -> bool:
    """Whether this build has the NFS endpoint (built with libnfs-dev)."""
    return _EXT.available()


CREATE = _constant("BM_NFS_CREATE", 1)
READ = _constant("BM_NFS_READ", 0)
UPDATE = _constant("BM_NFS_UPDATE", 2)
DST_FRESH = _constant("BM_NFS_DST_FRESH", 1)
SIDE_SRC = _constant("BM_NFS_SIDE_SRC", 1)
SIDE_DST = _constant("BM_NFS_SIDE_DST", 2)
MAX_CONNS = _constant("BM_NFS_MAX_CONNS", 8)
DEFAULT_REQUESTS = _constant("BM_NFS_DEFAULT_REQUESTS", 16)
DEFAULT_REQUEST_BYTES = _constant("BM_NFS_DEFAULT_REQUEST_BYTES", 1048576)


def mount(url: str, connections: int, *, timeout_s: float, name: str) -> Handle:
    """Mount URL's export on CONNECTIONS connections. NAME labels errors."""
    ffi, lib = _ffi(), _lib()
    handle = lib.bm_nfs_mount(url.encode(), connections, max(0, round(timeout_s * 1000)))
    if handle == ffi.NULL:
        raise error_from_c(name)
    return ffi.gc(handle, lib.bm_nfs_close)


def close(handle: Handle) -> None:
    """Disconnect now instead of at garbage collection."""
    _ffi().release(handle)


def url_file(handle: Handle) -> str:
    """The URL's file, '/NAME' under the export."""
    raw = _ffi().string(_lib().bm_nfs_url_file(handle))
    return raw.decode("utf-8", "surrogateescape") if isinstance(raw, bytes) else str(raw)


def connections(handle: Handle) -> int:
    return int(_lib().bm_nfs_connections(handle))


def write_max(handle: Handle) -> int:
    return int(_lib().bm_nfs_write_max(handle))


def _check(rc: int, name: str | None) -> None:
    if rc < 0:
        raise error_from_c(name)


def open_file(handle: Handle, path: str, *, how: int, mode: int = 0o600,
              name: str | None = None) -> None:
    """Open PATH on every connection: HOW is READ (read only), UPDATE
    (read-write, as it is) or CREATE (created with MODE, or truncated)."""
    if how not in (READ, UPDATE, CREATE):
        raise ValueError(f"unknown way to open an NFS file: {how}")
    _check(_lib().bm_nfs_open_file(handle, os.fsencode(path), how, mode), name)


def close_file(handle: Handle, name: str | None = None) -> None:
    _check(_lib().bm_nfs_close_file(handle), name)


def size(handle: Handle, name: str | None = None) -> int:
    value = int(_lib().bm_nfs_size(handle))
    _check(value, name)
    return value


def allocated(handle: Handle, name: str | None = None) -> int:
    """Bytes the server has allocated to the open file (GETATTR's used)."""
    value = int(_lib().bm_nfs_allocated(handle))
    _check(value, name)
    return value


def truncate(handle: Handle, length: int, name: str | None = None) -> None:
    _check(_lib().bm_nfs_truncate(handle, length), name)


def commit(handle: Handle, name: str | None = None) -> None:
    """COMMIT3 on every connection that wrote: late write errors surface here."""
    _check(_lib().bm_nfs_commit(handle), name)


def free_bytes(handle: Handle, path: str, name: str | None = None) -> int:
    """Available bytes on the filesystem of the directory PATH (FSSTAT)."""
    value = int(_lib().bm_nfs_free_bytes(handle, os.fsencode(path)))
    _check(value, name)
    return value


def rename(handle: Handle, old: str, new: str, name: str | None = None) -> None:
    _check(_lib().bm_nfs_rename(handle, os.fsencode(old), os.fsencode(new)), name)


def unlink(handle: Handle, path: str, name: str | None = None) -> None:
    _check(_lib().bm_nfs_unlink(handle, os.fsencode(path)), name)


def new_buffer(nbytes: int) -> Any:
    return _ffi().new("char[]", nbytes)


def pread(handle: Handle, conn: int, buf: Any, nbytes: int, offset: int,
          name: str | None = None) -> bytes:
    """NBYTES at OFFSET of the open file, read through BUF (new_buffer, at
    least NBYTES long); zeros past its end."""
    _check(_lib().bm_nfs_pread(handle, conn, buf, nbytes, offset), name)
    return bytes(_ffi().buffer(buf, nbytes))


def pwrite(handle: Handle, conn: int, data: bytes | bytearray | memoryview, offset: int,
           name: str | None = None) -> int:
    """Write DATA at OFFSET of the open file over connection CONN (a writer's
    write after a move onto it; durable at commit); all of it, or OSError."""
    view = memoryview(data).cast("B")
    _check(_lib().bm_nfs_pwrite(handle, conn, _ffi().from_buffer(view), len(view), offset),
           name)
    return len(view)


def new_rate_cap(bytes_per_s: int) -> Any:
    cap = _ffi().new("bm_nfs_rate_cap *")
    cap.bytes_per_s = max(0, int(bytes_per_s))
    return cap


def copy_extents(handle: Handle, conn: int, src_fd: int, extents: ExtentArray,
                 block_size: int, *, requests: int = 0, request_bytes: int = 0,
                 flags: int = 0, rate_cap: Any = None, cancel: Any = None,
                 src_path: str | None = None, dst_name: str | None = None,
                 digests: tuple[Any, int, int, npt.NDArray[np.uint64]] | None = None
                 ) -> CopyCounts:
    """Copy EXTENTS (a C-contiguous EXTENT_DTYPE array) of SRC_FD into the
    open file over connection CONN, in one C call; errors name the side.
    CANCEL is the Copier's ``uint32_t *`` flag (any cffi module's). DIGESTS,
    if given, is (copy.digest_function(), granularity, zero-granule digest,
    out): OUT (zeroed, one uint64 per slot of ``copy.digest_slots``)
    receives the digest of each granule copied whole, hashed from the bytes
    sent (0: none). The granularity must divide REQUEST_BYTES."""
    ffi, lib = _ffi(), _lib()
    ext = extents_pointer(extents, on=ffi, ctype="bm_nfs_extent *")
    stats = ffi.new("bm_nfs_copy_stats *")
    flag = ffi.NULL if cancel is None else ffi.cast("uint32_t *", cancel)
    sink = ffi.NULL if digests is None else _EXT.digest_sink("bm_nfs", *digests)
    rc = lib.bm_nfs_copy_extents_hashed(handle, conn, src_fd, ext, len(extents), block_size,
                                        requests, request_bytes, flags,
                                        ffi.NULL if rate_cap is None else rate_cap, flag, sink,
                                        stats)
    if rc < 0:
        side = stats.error_side
        raise error_from_c(src_path if side == SIDE_SRC else dst_name if side else None)
    return CopyCounts.of(stats)


def read_extents(handle: Handle, conn: int, dst_fd: int, extents: ExtentArray,
                 block_size: int, *, requests: int = 0, request_bytes: int = 0,
                 rate_cap: Any = None, cancel: Any = None, src_name: str | None = None,
                 dst_path: str | None = None) -> CopyCounts:
    """Read EXTENTS of the open file over connection CONN into the same
    offsets of the fresh local file DST_FD (non-zero blocks only), in one C
    call; errors name the side."""
    ffi, lib = _ffi(), _lib()
    ext = extents_pointer(extents, on=ffi, ctype="bm_nfs_extent *")
    stats = ffi.new("bm_nfs_copy_stats *")
    flag = ffi.NULL if cancel is None else ffi.cast("uint32_t *", cancel)
    rc = lib.bm_nfs_read_extents(handle, conn, dst_fd, ext, len(extents), block_size,
                                 requests, request_bytes,
                                 ffi.NULL if rate_cap is None else rate_cap, flag, stats)
    if rc < 0:
        side = stats.error_side
        raise error_from_c(src_name if side == SIDE_SRC else dst_path if side else None)
    return CopyCounts.of(stats)
