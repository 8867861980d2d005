"""Where a moved image's I/O goes once it was moved onto a remote copy: an
NBD export (:class:`ExportImage`, libnbd) or a file on an NFS server
(:class:`NfsImage`, libnfs). One connection each, one request at a time
(threads sharing the image take turns), each answered or failed within the
timeout, never retried elsewhere. Untracked: the remote side holds only the
image. :func:`open_remote_image` picks one by the URI's scheme."""

from __future__ import annotations

import errno
import os
import threading
from typing import Any, Protocol

Buffer = bytes | bytearray | memoryview


class RemoteImage(Protocol):
    """What TrackedImage asks of the place a move sent its writes."""

    name: str

    @property
    def size(self) -> int: ...
    def pwrite(self, data: Buffer, offset: int) -> int: ...
    def pread(self, length: int, offset: int) -> bytes: ...
    def zero(self, offset: int, length: int, *, may_trim: bool) -> None: ...
    def truncate(self, size: int) -> None: ...
    def flush(self) -> None: ...
    def close(self) -> None: ...


def open_remote_image(uri: str) -> RemoteImage:
    """Connect to the copy URI names (``nbd://``, ``nbd+unix://`` or ``nfs://``)."""
    return NfsImage(uri) if uri.startswith("nfs://") else ExportImage(uri)


def _export_timeout() -> float:
    """Seconds a writer's remote request may go unanswered
    (BLOCKMIRROR_NBD_TIMEOUT, as for the copier; default 30)."""
    try:
        return max(0.1, float(os.environ.get("BLOCKMIRROR_NBD_TIMEOUT", "30")))
    except ValueError:
        return 30.0


class ExportImage:
    """A moved image's I/O on the NBD export it was moved onto: one libnbd
    connection, one request at a time (threads sharing the image take
    turns), each answered or failed within the timeout, never retried
    elsewhere. Untracked: the export is no tracked image."""

    def __init__(self, uri: str) -> None:
        from blockmirror._bindings import remote as _r

        if not _r.available():
            raise OSError(errno.ENOSYS, "the image was moved onto an NBD export, but this "
                          "build has no libnbd (blockmirror._remote): install Debian's "
                          "libnbd-dev and rebuild blockmirror; nothing was written", uri)
        self._r = _r
        self.name = uri  # stored without user info (csrc/redirect.c)
        self._lock = threading.Lock()
        self._h: Any = _r.open_export(uri, 1, write=True, timeout_s=_export_timeout(),
                                      name=uri)
        self.size = _r.size(self._h)
        self._buf: Any = None
        self._buf_len = 0

    def pwrite(self, data: Buffer, offset: int) -> int:
        with self._lock:
            return self._r.pwrite(self._h, 0, data, offset, self.name)

    def pread(self, length: int, offset: int) -> bytes:
        """Up to LENGTH bytes (short only at the export's end)."""
        n = max(0, min(length, self.size - offset))
        if n == 0:
            return b""
        with self._lock:
            if self._buf_len < n:
                self._buf, self._buf_len = self._r.new_buffer(n), n
            return self._r.pread(self._h, 0, self._buf, n, offset, self.name)

    def zero(self, offset: int, length: int, *, may_trim: bool) -> None:
        with self._lock:
            self._r.zero(self._h, 0, offset, length, may_trim=may_trim, name=self.name)

    def truncate(self, size: int) -> None:
        if size != self.size:
            raise OSError(errno.EOPNOTSUPP, "the image was moved onto an NBD export, which "
                          "cannot be resized", self.name)

    def flush(self) -> None:
        with self._lock:
            self._r.flush(self._h, self.name)

    def close(self) -> None:
        with self._lock:
            if self._h is not None:
                self._r.close(self._h)
                self._h = None


ZERO_CHUNK = 1 << 20


class NfsImage:
    """A moved image's I/O on the NFS file it was moved onto: one mount,
    WRITE3 calls made durable by COMMIT3 at flush (bm_nfs_pwrite,
    bm_nfs_commit; a server that restarted in between fails the flush).
    NFSv3 cannot punch holes: a discard or zeroing writes zeros."""

    def __init__(self, url: str) -> None:
        from blockmirror._bindings import nfs as _n
        from blockmirror.copying.endpoint import NfsUrl, parse
        from blockmirror.copying.nfs import NfsFile

        if not _n.available():
            raise OSError(errno.ENOSYS, "the image was moved onto an NFS file, but this build "
                          "has no libnfs (blockmirror._nfs): install Debian's libnfs-dev and "
                          "rebuild blockmirror; nothing was written", url)
        where = parse(url)
        if not isinstance(where, NfsUrl):
            raise OSError(errno.EINVAL, "not an NFS URL", url)
        self._n = _n
        self.name = url
        self._lock = threading.Lock()
        self._file = NfsFile(where, connections=1, timeout_s=_export_timeout())
        try:
            self._file.open_for_update()
        except BaseException:
            self._file.close()
            raise
        self._zeros = bytes(0)

    @property
    def size(self) -> int:
        return self._file.size

    def pwrite(self, data: Buffer, offset: int) -> int:
        with self._lock:
            n = self._n.pwrite(self._file.handle, 0, data, offset, self.name)
            self._file.size = max(self._file.size, offset + n)
            return n

    def pread(self, length: int, offset: int) -> bytes:
        """Up to LENGTH bytes (short only at the file's end)."""
        n = max(0, min(length, self._file.size - offset))
        if n == 0:
            return b""
        with self._lock:
            return self._file.pread(0, n, offset)

    def zero(self, offset: int, length: int, *, may_trim: bool) -> None:
        with self._lock:
            if len(self._zeros) < min(length, ZERO_CHUNK):
                self._zeros = bytes(min(max(length, 4096), ZERO_CHUNK))
            end = offset + length
            while offset < end:
                n = min(len(self._zeros), end - offset)
                self._n.pwrite(self._file.handle, 0, memoryview(self._zeros)[:n], offset,
                               self.name)
                offset += n
            self._file.size = max(self._file.size, end)

    def truncate(self, size: int) -> None:
        with self._lock:
            self._file.resize(size)

    def flush(self) -> None:
        with self._lock:
            self._file.flush()

    def close(self) -> None:
        with self._lock:
            self._file.close()
