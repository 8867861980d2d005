"""Copying into an NBD export, and reading one: the copier's remote endpoint.

:class:`NbdExport` is a set of connections to one export (several only where
the server offers multi-conn, as nbdcopy decides). :class:`RemoteCopier` is a
:class:`~blockmirror.copying.copier.Copier` whose work items go, one C call
per worker thread, each on its own connection, into the export through
libnbd's asynchronous API (csrc/remote/nbd.c): many requests in flight per
connection, data as NBD_CMD_WRITE, zero runs as NBD_CMD_WRITE_ZEROES (which
the server may punch), holes of the source never read.

An export is not a new sparse file: unless the server says it reads as zeros
(:meth:`NbdExport.reads_zero`, NBD block status), a bulk pass must cover the
whole image, holes included (see ``whole_image``), with no zero run skipped;
where it does, the bulk pass is a local one's: allocated extents only,
``dst_fresh``.

:class:`ExportReader` is the other direction, an export as the source: the
ranges block status does not call zero (:meth:`NbdExport.data_extents`) are
read with many reads in flight per connection and only their data blocks
are written into a new sparse local file.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

from blockmirror._bindings import copy as _c
from blockmirror._bindings import remote as _r
from blockmirror.closeable import Closeable
from blockmirror.copying.connections import ConnectionCopier, timeout_from_environment
from blockmirror.copying.copier import (
    DEFAULT_BATCH_BYTES,
    DEFAULT_BLOCK_SIZE,
    CopyStats,
    DigestRequest,
    takes_pair_items,
)
from blockmirror.copying.endpoint import NbdUri
from blockmirror.errors import InvalidInputError
from blockmirror.extents import as_extent_array

if TYPE_CHECKING:
    from blockmirror.extents import ExtentArray

DEFAULT_TIMEOUT_S = timeout_from_environment("BLOCKMIRROR_NBD_TIMEOUT")
"""A connection with requests outstanding and no reply this long has failed
(30 s; BLOCKMIRROR_NBD_TIMEOUT=SECONDS changes it, e.g. for a test that cuts
the link)."""
DEFAULT_REQUESTS = 32
REQUEST_BYTES = _r.DEFAULT_REQUEST_BYTES


def libnbd_available() -> bool:
    """Whether this build can reach NBD exports (built with libnbd-dev)."""
    return _r.available()


class NbdExport(Closeable):
    """Connections to the export URI. Connecting fails with
    InvalidInputError (one line, the URI shown without user info) when the
    server cannot be reached or refuses the export: bad input, exit 2."""

    def __init__(self, uri: NbdUri, *, connections: int = 4, write: bool = False,
                 timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.uri = uri
        self.name = uri.display
        wanted = max(1, min(connections, _r.MAX_CONNS))
        try:
            self._handle: Any = _r.open_export(uri.uri, wanted, write=write,
                                               timeout_s=timeout_s, name=self.name)
        except OSError as e:
            reason = (e.strerror or str(e)).replace(uri.uri, uri.display)
            raise InvalidInputError(f"cannot use NBD export {self.name}: {reason}") from None
        self.size = _r.size(self._handle)
        self.capabilities = _r.capabilities(self._handle)
        self.connections = _r.connections(self._handle)
        self._buffers = threading.local()

    @property
    def multi_conn(self) -> bool:
        return bool(self.capabilities & _r.CAN_MULTI_CONN)

    @property
    def writable(self) -> bool:
        """Whether the server lets this client write (not a read-only export)."""
        return bool(self.capabilities & _r.CAN_WRITE)

    @property
    def can_zero(self) -> bool:
        return bool(self.capabilities & _r.CAN_ZERO)

    @property
    def handle(self) -> Any:
        if self._handle is None:
            raise ValueError(f"NBD export {self.name} is closed")
        return self._handle

    def reads_zero(self, offset: int, length: int) -> bool:
        """Whether the export says the range reads as zeros (block status,
        base:allocation); False where the server cannot say."""
        return _r.reads_zero(self.handle, 0, offset, length, self.name)

    def data_extents(self) -> ExtentArray:
        """Where the export may hold data: every range block status
        (base:allocation) does not flag as reading zeros; all of it where
        the server cannot say."""
        return _r.map_data(self.handle, 0, 0, self.size, self.name)

    def flush(self) -> None:
        """Every completed write durable on the server (NBD_CMD_FLUSH)."""
        _r.flush(self.handle, self.name)

    def pread(self, conn: int, nbytes: int, offset: int) -> bytes:
        """NBYTES at OFFSET over connection CONN (one thread per connection)."""
        buf = getattr(self._buffers, "buf", None)
        if buf is None or len(buf) < nbytes:
            buf = self._buffers.buf = _r.new_buffer(max(nbytes, 1 << 20))
        return _r.pread(self.handle, conn, buf, nbytes, offset, self.name)

    def close(self) -> None:
        if self._handle is not None:
            _r.close(self._handle)
            self._handle = None


class RemoteCopier(ConnectionCopier):
    """Copies extents of the local ``src_fd`` into EXPORT at the same offsets.

    One worker thread per connection of the export, each with up to REQUESTS
    commands of REQUEST_BYTES in flight. The export is never resized (the
    caller checks it is large enough) and is flushed only by the caller
    (:meth:`NbdExport.flush`). ``copy_extents`` keeps the Copier's
    interface; ``dst_fresh`` is the caller's promise that the export reads
    as zeros over the extents, ``start_writeback`` means nothing here.
    A :class:`DigestRequest` is served as the local copier serves it: each
    granule copied whole is hashed, in C with the GIL released, from the
    request buffer its bytes were read into and sent from (the same xxh3-64
    function pointer, the same zero-granule digest).
    """

    def __init__(self, src_fd: int, export: NbdExport, *,
                 requests: int | None = DEFAULT_REQUESTS,
                 batch_bytes: int = DEFAULT_BATCH_BYTES, block_size: int = DEFAULT_BLOCK_SIZE,
                 rate_limit: float | None = None, src_path: str | None = None) -> None:
        super().__init__(export, src_fd, -1, requests=requests,
                         default_requests=DEFAULT_REQUESTS, batch_bytes=batch_bytes,
                         block_size=block_size, rate_limit=rate_limit, src_path=src_path,
                         dst_path=export.name)
        self.export: NbdExport = export
        self._nbd_rate_cap = _r.new_rate_cap(round(rate_limit)) if rate_limit else None

    @takes_pair_items
    def _copy_item_now(self, item: Any, dst_fresh: bool, cancel: Any,
                       start_writeback: bool, digests: DigestRequest | None) -> CopyStats:
        if isinstance(item, list):  # pairs (see Copier.copies_pairs); hashing takes arrays
            item = as_extent_array(item) if digests is not None else _c.pairs_array(item)
        spec, request_bytes, slots = self._digest_sink(item, digests, REQUEST_BYTES)
        counts = _r.copy_extents(
            self.export.handle, self._connection(), self.src_fd, item, self.block_size,
            requests=self.requests, request_bytes=request_bytes,
            flags=_r.DST_FRESH if dst_fresh else 0, rate_cap=self._nbd_rate_cap,
            cancel=cancel, src_path=self.src_path, dst_name=self.export.name, digests=spec)
        self._take_digests(digests, spec, slots)
        self._tally(counts)
        return CopyStats(counts.bytes_read, counts.bytes_written, counts.bytes_zero,
                         counts.bytes_hole, counts.bytes_punched)


class ExportReader(ConnectionCopier):
    """Copies extents of EXPORT into the same offsets of the local ``dst_fd``,
    which must read as zeros there (a new sparse file: only data blocks are
    written). One worker thread per connection, each with up to REQUESTS
    reads of REQUEST_BYTES in flight; ``copy_extents`` keeps the Copier's
    interface (``dst_fresh`` must be True)."""

    def __init__(self, export: NbdExport, dst_fd: int, *, requests: int | None = None,
                 batch_bytes: int = DEFAULT_BATCH_BYTES, block_size: int = DEFAULT_BLOCK_SIZE,
                 rate_limit: float | None = None, dst_path: str | None = None) -> None:
        super().__init__(export, -1, dst_fd, requests=requests,
                         default_requests=DEFAULT_REQUESTS, batch_bytes=batch_bytes,
                         block_size=block_size, rate_limit=rate_limit, src_path=export.name,
                         dst_path=dst_path)
        self.export: NbdExport = export
        self._nbd_rate_cap = _r.new_rate_cap(round(rate_limit)) if rate_limit else None

    def allocated_extents(self) -> ExtentArray:
        return self.export.data_extents()

    def _copy_item_now(self, item: ExtentArray, dst_fresh: bool, cancel: Any,
                       start_writeback: bool, digests: DigestRequest | None) -> CopyStats:
        if not dst_fresh:
            raise ValueError("an export is read only into a fresh (all-zero) local file")
        counts = _r.read_extents(
            self.export.handle, self._connection(), self.dst_fd, item, self.block_size,
            requests=self.requests, request_bytes=REQUEST_BYTES, rate_cap=self._nbd_rate_cap,
            cancel=cancel, src_name=self.export.name, dst_path=self.dst_path)
        self._tally(counts)
        return CopyStats(counts.bytes_read, counts.bytes_written, counts.bytes_zero, 0, 0)
