"""What the endpoint bindings (remote.py: NBD, nfs.py: NFS) share: a cffi
module that setup.py builds only where its library's headers were
installed, the counts each endpoint's copy call reports, and the digest
sink its hashed copy call fills.

:class:`OptionalModule` loads such a module if it was built; without it,
every call that needs it raises :class:`~blockmirror.errors.InvalidInputError`
with a line naming the Debian package, while its constants keep defaults so
the rest of blockmirror still imports.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from blockmirror.errors import InvalidInputError


class OptionalModule:
    """The cffi module NAME, if this build has it. MISSING is the one line
    said when it has not; LAST_ERROR names the module's C function giving
    the message of the call that just failed on this thread."""

    def __init__(self, name: str, missing: str, last_error: str) -> None:
        self.missing = missing
        self._last_error = last_error
        try:
            self.module: ModuleType | None = importlib.import_module(name)
        except ImportError:  # built without the library's headers
            self.module = None

    def available(self) -> bool:
        return self.module is not None

    def lib(self) -> Any:
        if self.module is None:
            raise InvalidInputError(self.missing)
        return self.module.lib

    def ffi(self) -> Any:
        if self.module is None:
            raise InvalidInputError(self.missing)
        return self.module.ffi

    def constant(self, name: str, default: int) -> int:
        """The C constant NAME, or DEFAULT in a build without the module."""
        if self.module is None:
            return default
        return int(getattr(self.module.lib, name))

    def digest_sink(self, prefix: str, core_fn: Any, granularity: int, zero: int,
                    out: Any) -> Any:
        """A ``PREFIX_digest_sink *`` of this module writing into OUT (a
        writable C-contiguous uint64 numpy array that must outlive its use),
        hashing with CORE_FN (copy.digest_function(), the core module's
        ``bm_hash_fn``) cast to this module's ``PREFIX_hash_fn``: the same
        address, so the same digest."""
        import numpy as np  # late: numpy (see blockmirror.extents)

        from blockmirror._bindings._ffi import ffi as core_ffi

        if out.dtype != np.uint64 or not out.flags.c_contiguous or not out.flags.writeable:
            raise ValueError("digest slots must be a writable C-contiguous uint64 array")
        ffi = self.ffi()
        sink = ffi.new(f"{prefix}_digest_sink *")
        sink.hash = ffi.cast(f"{prefix}_hash_fn", int(core_ffi.cast("uintptr_t", core_fn)))
        sink.granularity, sink.zero_digest = granularity, zero
        sink.count = len(out)
        sink.digests = ffi.cast("uint64_t *", ffi.from_buffer(out.data)) if len(out) else ffi.NULL
        return sink

    def error_from_c(self, name: str | None = None) -> OSError:
        """The exception for the call that just failed on this thread; NAME
        (the endpoint's display name, or a local path) goes into it as the
        filename."""
        ffi, lib = self.ffi(), self.lib()
        err = ffi.errno
        raw = ffi.string(getattr(lib, self._last_error)())
        message = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
        return OSError(err, message or os.strerror(err), name)


@dataclass(frozen=True)
class CopyCounts:
    """What one endpoint copy call did (``bm_nbd_copy_stats``,
    ``bm_nfs_copy_stats``: the same fields)."""

    bytes_read: int
    bytes_written: int
    bytes_zero: int
    bytes_hole: int
    bytes_punched: int
    requests: int
    max_in_flight: int

    @classmethod
    def of(cls, stats: Any) -> CopyCounts:
        """From the C stats struct a call filled in."""
        return cls(int(stats.bytes_read), int(stats.bytes_written), int(stats.bytes_zero),
                   int(stats.bytes_hole), int(stats.bytes_punched), int(stats.requests),
                   int(stats.max_in_flight))
