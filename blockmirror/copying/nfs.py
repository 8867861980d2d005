"""Copying into a file on an NFS server, and reading one: the NFS endpoint.

:class:`NfsFile` is one file under an export, mounted over several
connections (each its own libnfs context: libnfs is not thread-safe). A sync
writes a partial copy beside the target (``NAME.bm-partial``, created sparse
at the source's size), commits it (COMMIT3, where NFS reports late errors
such as ENOSPC) and renames it over the target; on failure the partial is
removed. An incremental sync opens the target itself read-write instead
(:meth:`NfsFile.open_for_update`) and only commits it.

:class:`NfsCopier` is a :class:`~blockmirror.copying.copier.Copier` whose
work items go, one C call per worker thread, each on its own connection,
into the file through libnfs's asynchronous API (csrc/nfs/nfs.c): many
WRITE3 calls in flight, holes and zeros of a fresh file skipped so it stays
sparse on the server. :class:`NfsFileReader` goes the other way (an NFS
file as the source of a sync): every byte read, only non-zero blocks written
to a new local file.
"""

from __future__ import annotations

import contextlib
import os
import threading
from typing import TYPE_CHECKING, Any

from blockmirror._bindings import nfs as _n
from blockmirror.closeable import Closeable
from blockmirror.copying.connections import ConnectionCopier, timeout_from_environment
from blockmirror.copying.copier import (
    DEFAULT_BATCH_BYTES,
    DEFAULT_BLOCK_SIZE,
    CopyStats,
    DigestRequest,
)
from blockmirror.copying.endpoint import NfsUrl
from blockmirror.errors import InvalidInputError

if TYPE_CHECKING:  # numpy-backed (blockmirror.extents)
    from blockmirror.extents import ExtentArray

PARTIAL_SUFFIX = ".bm-partial"  # as a local copy's (precheck.PARTIAL_SUFFIX)


DEFAULT_TIMEOUT_S = timeout_from_environment("BLOCKMIRROR_NFS_TIMEOUT")
"""A connection with calls outstanding and no reply this long has failed
(30 s; BLOCKMIRROR_NFS_TIMEOUT=SECONDS changes it)."""
CLEANUP_TIMEOUT_S = 5.0
DEFAULT_REQUESTS = _n.DEFAULT_REQUESTS
REQUEST_BYTES = _n.DEFAULT_REQUEST_BYTES


def libnfs_available() -> bool:
    """Whether this build can reach NFS servers (built with libnfs-dev)."""
    return _n.available()


class NfsFile(Closeable):
    """URL's export mounted on CONNECTIONS connections; no file open yet.
    Mounting fails with InvalidInputError (one line, exit 2) when the server
    cannot be reached or refuses the export."""

    def __init__(self, url: NfsUrl, *, connections: int = 4,
                 timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.uri = url
        self.name = url.display
        self.timeout_s = timeout_s
        self._handle: Any = self._mount(max(1, min(connections, _n.MAX_CONNS)), timeout_s)
        self.connections = _n.connections(self._handle)
        self.target = _n.url_file(self._handle)  # "/NAME" under the export
        self.partial = self.target + PARTIAL_SUFFIX
        self.size = 0
        self.open_path: str | None = None
        self.fresh = False  # a new partial nothing was written to yet
        self._buffers = threading.local()

    def _mount(self, connections: int, timeout_s: float) -> Any:
        try:
            return _n.mount(self.uri.url, connections, timeout_s=timeout_s, name=self.name)
        except OSError as e:
            reason = (e.strerror or str(e)).replace(self.uri.url, self.name)
            raise InvalidInputError(f"cannot use NFS export {self.uri.export} of "
                                    f"{self.name}: {reason}") from None

    @property
    def handle(self) -> Any:
        if self._handle is None:
            raise ValueError(f"NFS file {self.name} is closed")
        return self._handle

    def _open(self, path: str, *, how: int, mode: int = 0o600) -> None:
        _n.open_file(self.handle, path, how=how, mode=mode, name=self.name)
        self.open_path = path

    def open_existing(self) -> None:
        """Open the target for reading (verify); a missing file is bad input."""
        try:
            self._open(self.target, how=_n.READ)
            self.size = _n.size(self.handle, self.name)
        except OSError as e:
            raise InvalidInputError(f"cannot read {self.name}: {e.strerror}") from None

    def open_for_update(self) -> None:
        """Open the target read-write as it is (an incremental sync updates
        it in place); its size from the server. OSError (ENOENT...) as is."""
        self._open(self.target, how=_n.UPDATE)
        self.fresh = False
        try:
            self.size = _n.size(self.handle, self.name)
        except OSError:
            self.close_file()
            raise

    def close_file(self) -> None:
        """Close the open file (errors ignored: nothing was written to it)."""
        with contextlib.suppress(OSError):
            _n.close_file(self.handle, self.name)
        self.open_path = None

    def create_partial(self, size: int, mode: int) -> None:
        """NAME.bm-partial beside the target, empty (truncated if a killed run
        left one) and then sparse at SIZE bytes."""
        self._open(self.partial, how=_n.CREATE, mode=mode & 0o7777)
        _n.truncate(self.handle, size, self.name)
        self.size = size
        self.fresh = True

    def free_bytes(self) -> int:
        """Available bytes on the server's filesystem where the target goes
        (FSSTAT; a stale partial a killed run left is not counted)."""
        return _n.free_bytes(self.handle, os.path.dirname(self.target) or "/", self.name)

    def allocated_bytes(self) -> int:
        """What the server has allocated to the open file: at most its data."""
        return _n.allocated(self.handle, self.name)

    def data_extents(self) -> ExtentArray:
        """Where the open file may hold data: all of it (NFSv3 cannot say
        where its holes are; a reader skips zero blocks instead)."""
        from blockmirror.extents import as_extent_array

        return as_extent_array([(0, self.size)] if self.size else [])

    def reads_zero(self, offset: int, length: int) -> bool:
        """Whether the range reads as zeros: the whole of a new partial does,
        until the first copy into it."""
        return self.fresh

    def resize(self, size: int) -> None:
        _n.truncate(self.handle, size, self.name)
        self.size = size

    def flush(self) -> None:
        """Every completed write durable on the server (COMMIT3)."""
        _n.commit(self.handle, self.name)

    def publish(self) -> None:
        """Commit the partial, close it, rename it over the target, and open
        the target for reading (a verify after the sync reads it)."""
        self.flush()
        _n.close_file(self.handle, self.name)
        self.open_path = None
        _n.rename(self.handle, self.partial, self.target, self.name)
        self._open(self.target, how=_n.READ)

    def discard(self, path: str) -> str | None:
        """Remove PATH (the partial, or a published copy) from the server,
        over a new mount if this one's connections failed. None when done,
        else why not."""
        self.close_file()
        try:
            _n.unlink(self.handle, path, self.name)
            return None
        except OSError as first:
            reason = first.strerror or str(first)
        try:
            fresh = _n.mount(self.uri.url, 1, timeout_s=min(self.timeout_s, CLEANUP_TIMEOUT_S),
                             name=self.name)
            try:
                _n.unlink(fresh, path, self.name)
            finally:
                _n.close(fresh)
            return None
        except OSError as e:
            return e.strerror or reason

    def pread(self, conn: int, nbytes: int, offset: int) -> bytes:
        """NBYTES at OFFSET over connection CONN (one thread per connection)."""
        buf = getattr(self._buffers, "buf", None)
        if buf is None or len(buf) < nbytes:
            buf = self._buffers.buf = _n.new_buffer(max(nbytes, 1 << 20))
        return _n.pread(self.handle, conn, buf, nbytes, offset, self.name)

    def close(self) -> None:
        if self._handle is not None:
            _n.close(self._handle)
            self._handle = None


class NfsCopier(ConnectionCopier):
    """Copies extents of the local ``src_fd`` into the file open in NFS_FILE
    at the same offsets: one worker thread per connection, each with up to
    REQUESTS WRITE3 calls in flight. The file is resized and committed only
    by the caller; ``dst_fresh`` is the caller's promise that the file reads
    as zeros over the extents (a new partial), ``start_writeback`` means
    nothing here. A :class:`DigestRequest` is served in C as into an NBD
    export: each granule copied whole is hashed from the buffer its bytes
    were read into and sent from."""

    def __init__(self, src_fd: int, nfs_file: NfsFile, *, requests: int = DEFAULT_REQUESTS,
                 batch_bytes: int = DEFAULT_BATCH_BYTES, block_size: int = DEFAULT_BLOCK_SIZE,
                 rate_limit: float | None = None, src_path: str | None = None) -> None:
        super().__init__(nfs_file, src_fd, -1, requests=max(1, requests),
                         default_requests=DEFAULT_REQUESTS, batch_bytes=batch_bytes,
                         block_size=block_size, rate_limit=rate_limit, src_path=src_path,
                         dst_path=nfs_file.name)
        self.export: NfsFile = nfs_file
        self._nfs_rate_cap = _n.new_rate_cap(round(rate_limit)) if rate_limit else None

    def _copy_item_now(self, item: ExtentArray, dst_fresh: bool, cancel: Any,
                       start_writeback: bool, digests: DigestRequest | None) -> CopyStats:
        spec, request_bytes, slots = self._digest_sink(item, digests, REQUEST_BYTES)
        counts = _n.copy_extents(
            self.export.handle, self._connection(), self.src_fd, item, self.block_size,
            requests=self.requests, request_bytes=request_bytes,
            flags=_n.DST_FRESH if dst_fresh else 0, rate_cap=self._nfs_rate_cap,
            cancel=cancel, src_path=self.src_path, dst_name=self.export.name, digests=spec)
        self.export.fresh = False
        self._take_digests(digests, spec, slots)
        self._tally(counts)
        return CopyStats(counts.bytes_read, counts.bytes_written, counts.bytes_zero,
                         counts.bytes_hole, counts.bytes_punched)


class NfsFileReader(ConnectionCopier):
    """Copies extents of NFS_FILE (open for reading) into the same offsets of
    the local ``dst_fd``, which must read as zeros there (a new sparse file:
    only non-zero blocks are written). One worker thread per connection,
    each reading REQUESTS requests of REQUEST_BYTES at a time
    (bm_nfs_read_extents); ``copy_extents`` keeps the Copier's interface
    (``dst_fresh`` must be True)."""

    def __init__(self, nfs_file: NfsFile, dst_fd: int, *, requests: int | None = None,
                 batch_bytes: int = DEFAULT_BATCH_BYTES, block_size: int = DEFAULT_BLOCK_SIZE,
                 rate_limit: float | None = None, dst_path: str | None = None) -> None:
        super().__init__(nfs_file, -1, dst_fd, requests=requests,
                         default_requests=DEFAULT_REQUESTS, batch_bytes=batch_bytes,
                         block_size=block_size, rate_limit=rate_limit, src_path=nfs_file.name,
                         dst_path=dst_path)
        self.export: NfsFile = nfs_file
        self._nfs_rate_cap = _n.new_rate_cap(round(rate_limit)) if rate_limit else None

    def allocated_extents(self) -> ExtentArray:
        return self.export.data_extents()

    def _copy_item_now(self, item: ExtentArray, dst_fresh: bool, cancel: Any,
                       start_writeback: bool, digests: DigestRequest | None) -> CopyStats:
        if not dst_fresh:
            raise ValueError("an NFS file is read only into a fresh (all-zero) local file")
        counts = _n.read_extents(
            self.export.handle, self._connection(), self.dst_fd, item, self.block_size,
            requests=self.requests, request_bytes=REQUEST_BYTES, rate_cap=self._nfs_rate_cap,
            cancel=cancel, src_name=self.export.name, dst_path=self.dst_path)
        self._tally(counts)
        return CopyStats(counts.bytes_read, counts.bytes_written, counts.bytes_zero, 0, 0)
