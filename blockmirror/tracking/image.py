"""The tracked writer: write to an image so every change lands in its bitmap.

``TrackedImage`` is what a VM, database or backup agent uses instead of
``os.pwrite`` on the image. Each write is a single call into C that marks the
range dirty, writes it and marks it again (I1), waiting out a copier's freeze
for at most the freeze's lease (I3). When a ``sync --move`` redirects writers,
the next write transparently reopens the image at its new place.

A move onto an NBD export or an NFS file (``sync --move SRC nbd://...`` or
``nfs://...``) sends writers to a URI instead: the next write, read, zeroing
or flush connects there (remote_image.py: libnbd, libnfs) and all I/O goes
there from then on, untracked (the remote side holds only the image). A
writer follows such a move only if it runs as the image's owner
(csrc/redirect.c says why); where this build lacks the library, or the
server cannot be reached, the call fails with an OSError saying so instead
of writing anywhere.
"""

from __future__ import annotations

import contextlib
import errno
import os
import threading
import weakref
from collections.abc import Callable

from blockmirror import files
from blockmirror.closeable import Closeable
from blockmirror.tracking.remote_image import RemoteImage, open_remote_image
from blockmirror.tracking.tracker import (
    DEFAULT_GRANULARITY,
    Tracker,
    retire_pwrite_function,
    sidecar_path,
)

Buffer = bytes | bytearray | memoryview


def _closed_pwrite(data: Buffer, offset: int) -> int:
    raise ValueError("image is closed")


def _redirect_handler(image: TrackedImage) -> Callable[[Buffer, int], int]:
    """``image._write_after_redirect``, holding IMAGE only weakly: the handler
    lives in the fast path, which lives in IMAGE, and a cycle would leave a
    forgotten, unclosed image (and its writer slot, I4) to the cyclic GC."""
    ref = weakref.ref(image)

    def on_stale(data: Buffer, offset: int) -> int:
        live = ref()
        if live is None:
            raise ValueError("image is closed")
        return live._write_after_redirect(data, offset)

    return on_stale


class TrackedImage(Closeable):
    """A writer's handle on an image and its change-tracking sidecar.

    Creates the sidecar (granularity GRANULARITY) if the image has none. One
    handle per process; threads of that process may share it. Do not use a
    handle inherited across ``fork``: open a new one in the child.
    """

    def __init__(
        self, image_path: str | os.PathLike[str], *, granularity: int = DEFAULT_GRANULARITY
    ) -> None:
        self._granularity = granularity
        self._tracker: Tracker | None = None
        self._fd = -1
        self._export: RemoteImage | None = None  # once moved onto a remote copy
        self._follow_lock = threading.Lock()
        self._attach(os.fspath(image_path), create_sidecar=True)

    def _attach(self, path: str, *, create_sidecar: bool) -> None:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            if create_sidecar and not os.path.exists(sidecar_path(path)):
                # Another writer may create it first; then theirs is used.
                with contextlib.suppress(FileExistsError):
                    Tracker.create(path, self._granularity).close()
            # Checked against the very file written through FD.
            tracker = Tracker.open(path, writer=True, image_fd=fd)
        except BaseException:
            os.close(fd)
            raise
        self._bind(path, fd, tracker)

    def _bind(self, path: str, fd: int, tracker: Tracker) -> None:
        self.path = path
        self._fd = fd
        self._tracker = tracker
        # Writes without the redirect handling, for the one retry after a redirect.
        self._pwrite = tracker.pwrite_function(fd, path)
        # The hot path: a C callable (blockmirror._fastwrite.Writer, or the
        # cffi closure where that is not built) is bound on the instance and
        # shadows the pwrite method below, so a tracked write is one C-level
        # call, no Python frame, like os.pwrite (bench/README.md). ESTALE comes
        # back through _write_after_redirect.
        self.pwrite = tracker.pwrite_function(  # type: ignore[method-assign]
            fd, path, on_stale=_redirect_handler(self)
        )

    def _bound_writes(self) -> tuple[object, ...]:
        return self.__dict__.get("pwrite"), self.__dict__.get("_pwrite")

    @staticmethod
    def _retire(writes: tuple[object, ...]) -> None:
        """Detach bound write paths from the tracker about to be closed: they
        hold its raw C handle, and a write through one (even through a
        reference taken earlier) must raise, not use freed memory."""
        for write in writes:
            retire_pwrite_function(write)

    @property
    def tracker(self) -> Tracker:
        if self._tracker is None:
            raise ValueError("image is closed" if self._export is None else
                             "the image was moved onto an NBD export: it has no tracker")
        return self._tracker

    @property
    def export(self) -> RemoteImage | None:
        """Where I/O goes since the image was moved onto an NBD export; None
        while it is a local file."""
        return self._export

    def _follow_redirect(self) -> None:
        """The copier moved the image: reopen it where it went (ESTALE).

        The C side opens the target and its sidecar (the copier tracked it
        already) without following a symbolic link anywhere on the path, and
        only if it belongs to this image's owner and its sidecar records the
        move: the sidecar is the image owner's to edit, and a forged redirect
        must not let our writes escape (I5, issue 13). A move onto an NBD
        export is followed only by the image's owner (csrc/redirect.c)."""
        with self._follow_lock:
            if self._export is not None or not self.tracker.redirected:
                return  # another thread of this process followed it already
            if self.tracker.redirect_target().startswith(("nbd", "nfs://")):
                self._follow_to_export()
                return
            old_fd, old_tracker = self._fd, self._tracker
            tracker, fd = self.tracker.open_redirect_target()
            old_writes = self._bound_writes()
            self._bind(tracker.image_path, fd, tracker)
            self._retire(old_writes)
            assert old_tracker is not None
            old_tracker.close()
            os.close(old_fd)

    def _follow_to_export(self) -> None:
        """Moved onto an export: connect, then drop the source's tracker
        (its writer slot, so the copier sees this writer has followed) and
        file. Nothing changes if the rule refuses or the export is out of
        reach: the call fails, and the next one tries again."""
        export = open_remote_image(self.tracker.export_to_follow())
        old_writes = self._bound_writes()
        self._export = export
        self.path = export.name
        self._pwrite = self.pwrite = export.pwrite  # type: ignore[method-assign]
        self._retire(old_writes)
        old_tracker, old_fd = self._tracker, self._fd
        self._tracker, self._fd = None, -1
        if old_tracker is not None:
            old_tracker.close()
        os.close(old_fd)

    def pwrite(self, data: Buffer, offset: int) -> int:
        """Write DATA at OFFSET, tracked; returns the bytes written (all of them).

        Each open image shadows this method with its bound fast path (see
        ``_attach``), which behaves exactly like this body.
        """
        try:
            return self._pwrite(data, offset)
        except OSError as e:
            if e.errno != errno.ESTALE:
                raise
        return self._write_after_redirect(data, offset)

    def _write_after_redirect(self, data: Buffer, offset: int) -> int:
        """ESTALE: follow the redirect once and write there (no second follow)."""
        self._follow_redirect()
        return self._pwrite(data, offset)

    def pread(self, length: int, offset: int) -> bytes:
        """Read up to LENGTH bytes at OFFSET (short only at end of file).

        After a move, reads follow the image too: the old file no longer
        sees other writers' writes."""
        if self._export is None and self.tracker.redirected:
            self._follow_redirect()
        if self._export is not None:
            return self._export.pread(length, offset)
        return files.pread_full(self._fd, length, offset)

    def discard(self, offset: int, length: int) -> None:
        """Deallocate [offset, offset+length): it reads back as zeros."""
        self._retry_on_redirect(
            lambda: self.tracker.discard(self._fd, offset, length, self.path),
            lambda export: export.zero(offset, length, may_trim=True))

    def write_zeroes(self, offset: int, length: int, *, may_trim: bool = False) -> None:
        """Make [offset, offset+length) read as zeros (NBD's WRITE_ZEROES):
        kept allocated unless MAY_TRIM lets it become a hole."""
        self._retry_on_redirect(
            lambda: self.tracker.zero(self._fd, offset, length, self.path, may_trim=may_trim),
            lambda export: export.zero(offset, length, may_trim=may_trim))

    def truncate(self, size: int) -> None:
        """Resize the image to SIZE bytes, tracked (an export cannot be
        resized: EOPNOTSUPP for any other size than its own)."""
        self._retry_on_redirect(lambda: self.tracker.truncate(self._fd, size, self.path),
                                lambda export: export.truncate(size))

    def _retry_on_redirect(self, local: Callable[[], None],
                           remote: Callable[[RemoteImage], None]) -> None:
        """LOCAL on the file; after a move (ESTALE, followed once) LOCAL on
        the new file, or REMOTE on the export it went to."""
        if self._export is None:
            try:
                local()
                return
            except OSError as e:
                if e.errno != errno.ESTALE:
                    raise
            self._follow_redirect()
        if self._export is not None:
            remote(self._export)
        else:
            local()

    def flush(self) -> None:
        """Make every completed write durable (fdatasync; NBD_CMD_FLUSH once
        the image was moved onto an export)."""
        if self._export is None and self._tracker is not None and self._tracker.redirected:
            self._follow_redirect()
        if self._export is not None:
            self._export.flush()
        else:
            os.fdatasync(self._fd)

    @property
    def size(self) -> int:
        if self._export is not None:
            return self._export.size
        return os.fstat(self._fd).st_size

    def close(self) -> None:
        """Close the image and, cleanly, the sidecar (I4)."""
        # The bound fast path holds the raw C handle, which close() frees:
        # detach it and swap it out first so a write after close raises
        # instead of using freed memory (it used to segfault).
        self._retire(self._bound_writes())
        self._pwrite = self.pwrite = _closed_pwrite  # type: ignore[method-assign]
        if self._tracker is not None:
            self._tracker.close()
            self._tracker = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._export is not None:
            self._export.close()
            self._export = None

