"""Bindings of the tracked write path (csrc/writer.c) and its CPython fast
path, ``blockmirror._fastwrite`` (csrc/python/fastwrite.c says why a 4 KiB
write cannot afford a cffi call)."""

from __future__ import annotations

import errno
from collections.abc import Callable
from typing import Any, Protocol

from blockmirror._bindings._ffi import check, error_from_c, ffi, lib
from blockmirror._bindings.tracker import Handle

try:
    from blockmirror import _fastwrite
except ImportError:  # not built: every write goes through cffi, a little slower
    _fastwrite = None  # type: ignore[assignment]

Buffer = bytes | bytearray | memoryview
StaleHandler = Callable[[Any, int], int]


class PwriteFunction(Protocol):
    """``pwrite(data, offset) -> bytes written``, bound to one handle and fd."""

    def __call__(self, data: Buffer, offset: int) -> int: ...


# The fast path calls the one copy of the C core, in _core, through these
# pointers.
_BM_PWRITE_ADDR = int(ffi.cast("uintptr_t", ffi.addressof(lib, "bm_pwrite")))
_BM_LAST_ERROR_ADDR = int(ffi.cast("uintptr_t", ffi.addressof(lib, "bm_last_error")))


def pwrite_function(handle: Handle, fd: int, path: str,
                    on_stale: StaleHandler | None = None) -> PwriteFunction:
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


def cffi_pwrite_function(handle: Handle, fd: int, path: str,
                         on_stale: StaleHandler | None = None) -> PwriteFunction:
    """``pwrite_function`` through cffi: one Python frame and one cffi call."""
    bm_pwrite = lib.bm_pwrite
    from_buffer = ffi.from_buffer

    def pwrite(data: Buffer, offset: int) -> int:
        if type(data) is bytes:
            n = bm_pwrite(handle, fd, data, len(data), offset)
        else:
            view = memoryview(data).cast("B")
            n = bm_pwrite(handle, fd, from_buffer("char[]", view), view.nbytes, offset)
        if n < 0:
            if on_stale is not None and ffi.errno == errno.ESTALE:
                return on_stale(data, offset)
            raise error_from_c(path)
        return int(n)

    return pwrite


def retire_pwrite_function(pwrite: object) -> None:
    """Detach a ``pwrite_function`` from its handle before the handle is
    closed: a fast-path Writer then raises ValueError if called again, even
    through a reference taken earlier. (A cffi closure cannot be detached;
    its owner must drop it.)"""
    close = getattr(pwrite, "close", None)
    if close is not None:
        close()


def discard(handle: Handle, fd: int, offset: int, length: int, path: str) -> None:
    check(lib.bm_discard(handle, fd, offset, length), path)


def zero(handle: Handle, fd: int, offset: int, length: int, path: str, *,
         may_trim: bool) -> None:
    check(lib.bm_zero(handle, fd, offset, length, lib.BM_ZERO_MAY_TRIM if may_trim else 0), path)


def truncate(handle: Handle, fd: int, size: int, path: str) -> None:
    check(lib.bm_truncate(handle, fd, size), path)
