"""A copy-mode sync whose destination is an NBD export (``nbd://``, ``nbd+unix://``).

The flow is the file sync's — bulk pass, dirty passes, freeze, final pass,
thaw, commit — with the same predicate, progress and result, but the passes
write straight into the export: there is no shadow copy, no rename and no
manifest beside it (the remote side holds only the image). The commit is an
NBD flush, after the thaw as a local copy's fsync is. A failure thaws the
writers and leaves the source untouched, but cannot take back what was
written: the export is left partly written, and the error says so.

Not yet (issue 12): ``--move`` to an export (writers cannot be redirected
to a remote image), incremental syncs onto one (each sync is a full copy),
an export as a sync's source, and ``--converge mirror`` (writers mirror only
into a local file). Each is refused with one line (exit 2), except that
``--converge auto`` escalates to the throttle instead of mirroring.
"""

from __future__ import annotations

import contextlib
import errno
import os

from blockmirror.copying.endpoint import NbdUri, parse
from blockmirror.copying.remote import NbdExport, RemoteCopier
from blockmirror.copying.remote_compare import compare_with_export
from blockmirror.errors import BlockMirrorError, InvalidInputError, VerifyError
from blockmirror.extents import subtract
from blockmirror.migration import precheck
from blockmirror.migration.job import FileSyncJob, JobState
from blockmirror.migration.options import SyncOptions
from blockmirror.migration.passes import PassRunner
from blockmirror.migration.precheck import Plan
from blockmirror.migration.result import SyncResult
from blockmirror.tracking.tracker import sidecar_path
from blockmirror.units import format_bytes

LEFT_PARTLY = "the NBD export was left partly written; the source is untouched"


def sync_to_export(src: str, dst: str, options: SyncOptions) -> SyncResult:
    """File mode into an export: checked (one line, exit 2, nothing written
    on bad input), connected, then run as a :class:`RemoteSyncJob`."""
    if isinstance(parse(src), NbdUri):  # a one-shot copy of the export (remote_source.py)
        from blockmirror.migration.remote_source import sync_from_export

        return sync_from_export(src, dst, options)
    uri = parse(dst)
    assert isinstance(uri, NbdUri)
    _refuse_unsupported(src, uri, options)
    st = precheck.check_source(src, move=False)
    export = NbdExport(uri, connections=options.workers, write=True)
    try:
        if export.size < st.st_size:
            raise InvalidInputError(
                f"NBD export {uri} is {format_bytes(export.size)}, smaller than the source "
                f"{src} ({format_bytes(st.st_size)}); an export cannot be resized")
        plan = Plan(os.path.abspath(src), uri.display, "", st.st_size, st.st_blocks * 512,
                    st.st_uid, st.st_mode)
    except BaseException:
        export.close()
        raise
    return RemoteSyncJob(plan, options, export).run()


def _refuse_unsupported(src: str, uri: NbdUri, options: SyncOptions) -> None:
    if os.path.isdir(src):
        raise InvalidInputError(f"directory mode into an NBD export is not supported: {uri} "
                                "holds one image; sync each image to its own export")
    if options.move:
        raise InvalidInputError(f"--move to an NBD export is not supported yet ({uri}): "
                                "writers cannot be redirected to a remote image; copy instead")
    if options.converge == "mirror":
        raise InvalidInputError(f"--converge mirror needs a local copy; into {uri} use "
                                "--converge throttle or auto")


class RemotePassRunner(PassRunner):
    """The passes into an export: the bulk pass covers the whole image (the
    export's old bytes under the source's holes must go), and the copy
    follows the source's size within the export's."""

    def bulk(self) -> None:
        """Into an export the server says reads as zeros: the allocated
        extents, zeros skipped (as into a new sparse file). Otherwise the
        whole image, every zero run sent as WRITE_ZEROES."""
        assert isinstance(self.copier, RemoteCopier)
        export = self.copier.export
        fresh = export.reads_zero(0, export.size)
        self.result.notes.append(
            "the export read as zeros (block status): only data was sent" if fresh else
            "the export held data (or cannot say): every zero run was zeroed on it")
        extents = self.copier.allocated_extents() if fresh else self.copier.whole_image()
        stats = self._copy("bulk", extents, dst_fresh=fresh,
                           before_item=self._clear_before_read if self.tracker else None)
        self._record("bulk", stats)

    def follow_source_size(self) -> None:
        assert isinstance(self.copier, RemoteCopier)
        export = self.copier.export
        size = os.fstat(self.src_fd).st_size
        if size > export.size:
            raise OSError(errno.EFBIG, f"the source grew to {format_bytes(size)}, past the "
                          f"NBD export's {format_bytes(export.size)}", export.name)
        previous = self.result.image_size
        if size < previous:  # the source shrank: its old tail reads as zeros now
            self.copier.copy_extents([(size, previous - size)])
        self.result.image_size = size


class RemoteSyncJob(FileSyncJob):
    """A copy-mode :class:`FileSyncJob` into EXPORT (connected, checked)."""

    def __init__(self, plan: Plan, options: SyncOptions, export: NbdExport) -> None:
        super().__init__(plan, options)
        self.export = export
        self.result.notes.append(
            "written straight into the NBD export: no shadow copy, no rename, no manifest "
            "(each sync to an export is a full copy)")
        if export.size > plan.size:
            self.result.notes.append(
                f"the export is {format_bytes(export.size)}: the bytes past the source's "
                f"{format_bytes(plan.size)} were left as they were")

    def run(self) -> SyncResult:
        try:
            return super().run()
        except BlockMirrorError:
            raise
        except OSError as e:
            if self.failed_from in (None, JobState.PLANNED):
                raise  # nothing was written yet
            raise OSError(e.errno, f"{e.strerror}; {LEFT_PARTLY}", e.filename) from e

    def _open(self) -> None:
        plan = self.plan
        self.src_fd = os.open(plan.source, os.O_RDONLY | os.O_CLOEXEC)
        if os.path.exists(sidecar_path(plan.source)):
            self._open_tracker()
        self.state = JobState.COPYING  # from here the export holds bytes of this run
        self.copier = RemoteCopier(self.src_fd, self.export, rate_limit=self.options.rate_limit,
                                   requests=self.options.requests, src_path=plan.source)
        self.passes = RemotePassRunner(self.copier, self.tracker, self.src_fd, -1, self.result,
                                       self.report)

    def _commit(self) -> None:
        self.export.flush()
        self.state = JobState.COMMITTED

    def _start_mirror(self) -> None:
        self.result.notes.append("mirroring writes needs a local copy: copying dirty blocks "
                                 "into the export in passes instead")

    def _verify(self) -> None:
        """The export against the source, excusing blocks written since the
        switch (read from the tracker only now, I1)."""
        self.report("verify", len(self.result.passes), 0, self.result.image_size)
        differing = compare_with_export(self.plan.source, self.export,
                                        workers=self.options.workers)
        shorter = min(self.result.image_size, os.path.getsize(self.plan.source))
        differing = [(o, min(n, shorter - o)) for o, n in differing if o < shorter]
        if differing and self.tracker is not None:
            differing = subtract(differing, self.tracker.dirty_extents())
        if differing:
            off, length = differing[0]
            raise VerifyError(f"verify failed: {len(differing)} extents differ, first at "
                              f"{off}+{length}", self.plan.destination)
        self.result.verified = True

    def _out_of_space_message(self) -> str:
        return f"the NBD export {self.plan.destination} ran out of space; {LEFT_PARTLY}"

    def _abort(self) -> None:
        """Writers first (I6): thawed, throttle lifted. Nothing on the
        export can be removed."""
        self.failed_from = self.state
        if self.tracker is not None:
            with contextlib.suppress(Exception):
                self._lift_throttle()
            if self.state is JobState.FROZEN:
                with contextlib.suppress(Exception):
                    self.tracker.thaw()

    def _release(self) -> None:
        try:
            super()._release()
        finally:
            self.export.close()
