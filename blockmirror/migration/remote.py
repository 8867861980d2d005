"""A copy-mode sync whose destination is an NBD export (``nbd://``, ``nbd+unix://``)
or a file on an NFS server (``nfs://``).

The flow is the file sync's — bulk pass, dirty passes, freeze, final pass,
thaw, commit — with the same predicate, progress and result, but the passes
write straight into the export: there is no shadow copy and no rename. The
commit is an NBD flush, after the thaw as a local copy's fsync is. A failure
thaws the writers and leaves the source untouched, but cannot take back what
was written: the export is left partly written, and the error says so.

Incremental syncs onto an export: the remote side holds only the image, so
its manifest is kept beside the source (remote_manifest.py). A tracked sync
records, after the final flush, the change id the export is exact at and
the export's granule digests; the next sync to the same export, when that
manifest still describes the export (size, sampled granules read back) and
the change id is still trusted, copies only what changed since as its first
pass. Any doubt means a full copy, with a note saying why. The manifest is
removed before the export is written, and again on any failure.

Not yet (issue 12): ``--move`` to an export (writers cannot be redirected
to a remote image), and ``--converge mirror`` (writers mirror only
into a local file). Each is refused with one line (exit 2), except that
``--converge auto`` escalates to the throttle instead of mirroring.

Into NFS (:class:`NfsSyncJob`, the same job with another endpoint) the copy
goes to ``NAME.bm-partial`` beside the target, created sparse, and the commit
is COMMIT3 then a rename over the target, as a local copy's fsync and
rename; on any failure the partial is removed from the server (over a new
mount if the old one died), and the error says whether that worked.
"""

from __future__ import annotations

import contextlib
import errno
import os
from typing import TYPE_CHECKING, Any

from blockmirror.copying.copier import Copier, CopyStats
from blockmirror.copying.endpoint import NbdUri, NfsUrl, parse
from blockmirror.copying.nfs import PARTIAL_SUFFIX, NfsCopier, NfsFile
from blockmirror.copying.remote import NbdExport, RemoteCopier
from blockmirror.copying.remote_compare import compare_with_export
from blockmirror.errors import (
    BlockMirrorError,
    ChangeIdInvalidError,
    InvalidInputError,
    OutOfSpaceError,
    VerifyError,
)
from blockmirror.extents import pairs, subtract, total_bytes
from blockmirror.migration import digests as dg
from blockmirror.migration import precheck
from blockmirror.migration.digests import DigestTable
from blockmirror.migration.job import FileSyncJob, JobState
from blockmirror.migration.manifest import ManifestError, hash_granules
from blockmirror.migration.options import SyncOptions
from blockmirror.migration.passes import PassRunner
from blockmirror.migration.precheck import Plan
from blockmirror.migration.remote_manifest import (
    RemoteManifest,
    invalidate,
    manifest_location,
    sample_mismatch,
)
from blockmirror.migration.result import SyncResult
from blockmirror.tracking.tracker import sidecar_path
from blockmirror.units import format_bytes

if TYPE_CHECKING:
    import numpy as np

    from blockmirror.extents import Extents
else:  # numpy on first use (see blockmirror._numpy)
    from blockmirror._numpy import np

LEFT_PARTLY = "the NBD export was left partly written; the source is untouched"


def sync_to_export(src: str, dst: str, options: SyncOptions) -> SyncResult:
    """File mode into an export or an NFS file: checked (one line, exit 2,
    nothing written on bad input), connected, then run as a
    :class:`RemoteSyncJob` (or :class:`NfsSyncJob`). An export as the
    source is a one-shot copy of it (remote_source.py)."""
    source = parse(src)
    if isinstance(source, NbdUri):
        from blockmirror.migration.remote_source import sync_from_export

        return sync_from_export(src, dst, options)
    if isinstance(source, NfsUrl):
        raise InvalidInputError("an NFS file as the source of sync is not supported yet; "
                                "copy it with nfs-cp, or sync from a local image")
    uri = parse(dst)
    if isinstance(uri, NfsUrl):
        return _sync_to_nfs(src, uri, options)
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


def _sync_to_nfs(src: str, url: NfsUrl, options: SyncOptions) -> SyncResult:
    _refuse_unsupported(src, url, options)
    st = precheck.check_source(src, move=False)
    nfs_file = NfsFile(url, connections=options.workers)
    try:
        _check_nfs_space(nfs_file, st.st_blocks * 512)
    except BaseException:
        nfs_file.close()
        raise
    partial = url.display.partition("?")[0] + PARTIAL_SUFFIX  # for messages
    plan = Plan(os.path.abspath(src), url.display, partial, st.st_size, st.st_blocks * 512,
                st.st_uid, st.st_mode)
    return NfsSyncJob(plan, options, nfs_file).run()


def _check_nfs_space(nfs_file: NfsFile, allocated: int) -> None:
    """Step 0 as for a local copy: room on the server for the source's
    allocated bytes, or exit 4 before anything is created there."""
    try:
        available = nfs_file.free_bytes()
    except OSError as e:
        raise InvalidInputError(f"cannot ask {nfs_file.name}'s server for its free space: "
                                f"{e.strerror}") from None
    if allocated > available:
        raise OutOfSpaceError(f"need {format_bytes(allocated)} of data on the NFS server for "
                              f"{nfs_file.name}, {format_bytes(available)} free", nfs_file.name)


def _refuse_unsupported(src: str, uri: NbdUri | NfsUrl, options: SyncOptions) -> None:
    kind = "an NFS file" if isinstance(uri, NfsUrl) else "an NBD export"
    if os.path.isdir(src):
        raise InvalidInputError(f"directory mode into {kind} is not supported: {uri} "
                                "holds one image; sync each image to its own place")
    if options.move:
        raise InvalidInputError(f"--move to {kind} is not supported yet ({uri}): "
                                "writers cannot be redirected to a remote image; copy instead")
    if options.converge == "mirror":
        raise InvalidInputError(f"--converge mirror needs a local copy; into {uri} use "
                                "--converge throttle or auto")


class RemotePassRunner(PassRunner):
    """The passes into an export: the bulk pass covers the whole image (the
    export's old bytes under the source's holes must go), and the copy
    follows the source's size within the export's. Into an NFS file (a new
    partial, which reads as zeros) the bulk pass takes the allocated extents
    only, and the file follows the source's size."""

    def bulk(self) -> None:
        """Into an export the server says reads as zeros: the allocated
        extents, zeros skipped (as into a new sparse file). Otherwise the
        whole image, every zero run sent as WRITE_ZEROES."""
        assert isinstance(self.copier, (RemoteCopier, NfsCopier))
        export = self.copier.export
        fresh = export.reads_zero(0, export.size)
        if isinstance(export, NfsFile):
            stats = self._copy("bulk", self.copier.allocated_extents(), dst_fresh=fresh,
                               before_item=self._clear_before_read if self.tracker else None)
            self._record("bulk", stats)
            return
        self.result.notes.append(
            "the export read as zeros (block status): only data was sent" if fresh else
            "the export held data (or cannot say): every zero run was zeroed on it")
        # As pairs, so the copy starts before numpy loads (beside it: PassRunner.bulk).
        extents = (self.copier.allocated_extent_pairs() if fresh
                   else self.copier.whole_image_pairs())
        stats = self._copy("bulk", extents, dst_fresh=fresh,
                           before_item=self._clear_before_read if self.tracker else None,
                           started=self.numpy_preload())
        self._record("bulk", stats)

    def _copy(self, phase: str, extents: Extents, **kwargs: Any) -> CopyStats:
        """Copy; into an export that keeps a manifest, the copy itself
        hashes each granule it copies whole from the buffer it read the
        bytes into and sent them from (RemoteCopier, as the local copier
        does), so the digest is of exactly the bytes sent: stronger than a
        second read, which could only see the same bytes or newer ones.
        Only granules the copy could not see whole (cut by an extent's
        edge, the source's short last granule, a granule too coarse for the
        copy's buffers) are digested here, by reading the source again. A
        write landing after the copy's read is marked dirty (I1, after the
        clear), so its granule is copied and hashed again later: that keeps
        a re-read digest (which may be of newer bytes than were sent) from
        lasting, as it keeps the export's bytes from lagging. The final
        pass's digests are dropped and nothing is re-read there (writers
        are frozen; the pause must not grow): the commit reads those
        granules back from the flushed export, which holds exactly the
        switchover instant."""
        stats = super()._copy(phase, extents, **kwargs)
        table = self.fresh_digests
        if table is None:
            return stats
        runs = dg.granule_runs(pairs(extents), table.granularity, table.granules)
        if phase == "final":
            table.forget(runs)
            return stats
        left = dg.intersect(runs, table.unknown)  # what the copy did not hash
        if len(left):
            keys, values, holes = hash_granules(self.src_fd, left, table.granularity,
                                                table.size, self.copier.workers)
            table.set_zero(holes)
            table.put(keys, values)
        return stats

    def follow_source_size(self) -> None:
        assert isinstance(self.copier, (RemoteCopier, NfsCopier))
        export = self.copier.export
        size = os.fstat(self.src_fd).st_size
        if isinstance(export, NfsFile):
            if size != export.size:
                export.resize(size)
            self.result.image_size = size
            return
        if size > export.size:
            raise OSError(errno.EFBIG, f"the source grew to {format_bytes(size)}, past the "
                          f"NBD export's {format_bytes(export.size)}", export.name)
        previous = self.result.image_size
        if size < previous:  # the source shrank: its old tail reads as zeros now
            self.copier.copy_extents([(size, previous - size)])
        self.result.image_size = size


class RemoteSyncJob(FileSyncJob):
    """A copy-mode :class:`FileSyncJob` into EXPORT (connected, checked).
    Subclasses for other endpoints override the hooks: _notes, _new_copier,
    _commit, _left_behind (and _abort, to clean up). Into an NBD export it
    keeps the export's manifest beside the source (``keeps_manifest``)."""

    keeps_manifest = True

    def __init__(self, plan: Plan, options: SyncOptions, export: NbdExport | NfsFile) -> None:
        super().__init__(plan, options)
        self.export = export
        self.manifest_at = manifest_location(plan.source, export.name)
        self.earlier: RemoteManifest | None = None  # the last sync's, when it can be used
        self.result.notes.extend(self._notes())

    def _notes(self) -> list[str]:
        assert isinstance(self.export, NbdExport)
        notes = ["written straight into the NBD export: no shadow copy, no rename; its "
                 "manifest is kept beside the source"]
        if self.export.size > self.plan.size:
            notes.append(f"the export is {format_bytes(self.export.size)}: the bytes past the "
                         f"source's {format_bytes(self.plan.size)} were left as they were")
        return notes

    def _left_behind(self) -> str:
        """What a failure left on the remote side, for its message."""
        return LEFT_PARTLY

    def run(self) -> SyncResult:
        try:
            return super().run()
        except BlockMirrorError:
            raise
        except OSError as e:
            if self.failed_from in (None, JobState.PLANNED):
                raise  # nothing was written yet
            raise OSError(e.errno, f"{e.strerror}; {self._left_behind()}", e.filename) from e

    def _open(self) -> None:
        plan = self.plan
        self.src_fd = os.open(plan.source, os.O_RDONLY | os.O_CLOEXEC)
        if os.path.exists(sidecar_path(plan.source)):
            self._open_tracker()
        fresh = None
        if self.keeps_manifest:
            self.earlier = self._usable_manifest()
            # Before the first byte goes into the export: a run that dies
            # from here on must leave no manifest that could lie.
            # (A folder we do not trust is never read: nothing to remove.)
            with contextlib.suppress(ManifestError):
                invalidate(*self.manifest_at)
            if self.tracker is not None:
                fresh = (self.earlier.table if self.earlier is not None
                         else DigestTable(self._granularity, plan.size))
        self.state = JobState.COPYING  # from here the export holds bytes of this run
        self.copier = self._new_copier()
        self.passes = RemotePassRunner(self.copier, self.tracker, self.src_fd, -1, self.result,
                                       self.report, fresh_digests=fresh)

    def _usable_manifest(self) -> RemoteManifest | None:
        """The last sync's manifest of this export, if this sync may start
        from it; else None, with a note saying why it takes a full copy."""
        why = self._doubt()
        if isinstance(why, RemoteManifest):
            return why
        self.result.notes.append(f"full copy: {why}")
        return None

    def _doubt(self) -> RemoteManifest | str:
        """The usable manifest, or the reason there is none."""
        if self.options.force:
            return "--force"
        if self.tracker is None:
            return "the source is not tracked (no change id to start from)"
        try:
            earlier = RemoteManifest.load(*self.manifest_at)
        except ManifestError as e:
            return str(e)
        if earlier.export != self.export.name:
            return "the manifest names another export"
        if (earlier.image_size, earlier.granularity) != (self.plan.size, self._granularity):
            return "the manifest is for another size or granularity of the source"
        mismatch = sample_mismatch(earlier, self.export)
        return earlier if mismatch is None else mismatch

    def _first_pass(self) -> None:
        """Incremental when the last sync's manifest can be used and the
        tracker still vouches for its change id (asked only now, after the
        job's first fetch-and-clear: a write landing between the two is in
        one or the other); otherwise the bulk pass."""
        assert isinstance(self.passes, RemotePassRunner)
        earlier = self.earlier
        if earlier is not None and self.tracker is not None:
            try:
                changed = self.tracker.changed_extents_array(earlier.change_id)
            except ChangeIdInvalidError as e:
                self.result.notes.append(f"full copy: {e}")
                self.passes.fresh_digests = DigestTable(self._granularity, self.plan.size)
            else:
                self.result.notes.append(f"incremental since change id {earlier.change_id}")
                self.result.incremental = True
                self.result.bytes_skipped = max(0, self.plan.size - total_bytes(changed))
                self.passes.incremental(changed)
                return
        self.passes.bulk()


    def _new_copier(self) -> Copier:
        assert isinstance(self.export, NbdExport)
        return RemoteCopier(self.src_fd, self.export, rate_limit=self.options.rate_limit,
                            requests=self.options.requests, src_path=self.plan.source)

    def _commit(self) -> None:
        self.export.flush()
        self.state = JobState.COMMITTED
        self._keep_manifest()

    def _keep_manifest(self) -> None:
        """After the flush: record what the export now holds, for the next
        sync. Granules no pass hashed (the final pass's) are read back from
        the export itself, which holds exactly the switchover instant."""
        assert self.passes is not None
        table = self.passes.fresh_digests
        if table is None or self.result.change_id is None:
            return
        if self.result.image_size != table.size:
            self.result.notes.append("no manifest kept: the source changed size during the sync")
            return
        assert isinstance(self.export, NbdExport)
        series, _, generation = self.result.change_id.rpartition(":")
        try:
            _read_back(table, self.export)
            RemoteManifest(self.export.name, self.export.size, table.size, table.granularity,
                           series, int(generation), table).save(*self.manifest_at)
        except (OSError, ManifestError) as e:
            self.result.notes.append(f"no manifest kept ({e}): the next sync is a full copy")

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

    def _undo_remote(self) -> None:
        """Remove what this run made on the remote side (nothing, on NBD)."""

    def _abort(self) -> None:
        """Writers first (I6): thawed, throttle lifted. Then what the
        endpoint can take back (nothing on an export)."""
        self.failed_from = self.state
        if self.keeps_manifest and self.state is not JobState.PLANNED:
            # A verify that failed after the commit, or anything earlier:
            # the export may not be what a manifest would say.
            with contextlib.suppress(Exception):
                invalidate(*self.manifest_at)
        if self.tracker is not None:
            with contextlib.suppress(Exception):
                self._lift_throttle()
            if self.state is JobState.FROZEN:
                with contextlib.suppress(Exception):
                    self.tracker.thaw()
        self._undo_remote()

    def _release(self) -> None:
        try:
            super()._release()
        finally:
            self.export.close()


def _read_back(table: DigestTable, export: NbdExport, chunk: int = 4 << 20) -> None:
    """Digest TABLE's unknown granules from the export (over connection 0)."""
    g = table.granularity
    step = max(g, chunk // g * g)
    for offset, length in dg.byte_extents(table.unknown, g, table.size):
        for start in range(offset, offset + length, step):
            n = min(step, offset + length - start)
            data = memoryview(export.pread(0, n, start))
            first = start // g
            keys = np.arange(first, first + -(-n // g), dtype=np.int64)
            values = np.array([dg.digest(data[i * g:(i + 1) * g]) for i in range(len(keys))],
                              dtype=np.uint64)
            table.put(keys, values)


class NfsSyncJob(RemoteSyncJob):
    """A :class:`RemoteSyncJob` into a file on an NFS server: through a
    sparse partial beside the target, committed and renamed at the switch,
    removed on failure."""

    export: NfsFile
    keeps_manifest = False  # a new partial every time: each sync is a full copy

    def __init__(self, plan: Plan, options: SyncOptions, nfs_file: NfsFile) -> None:
        super().__init__(plan, options, nfs_file)
        self.created = False  # the partial exists on the server
        self.cleanup_error: str | None = None

    def _notes(self) -> list[str]:
        return [f"written to {os.path.basename(self.export.partial)} on the NFS server, "
                "committed (COMMIT) and renamed over the target; no manifest (each sync to "
                "NFS is a full copy)"]

    def _open(self) -> None:
        """The partial first (bad input if the server will not create it)."""
        try:
            self.export.create_partial(self.plan.size, self.plan.mode)
        except OSError as e:
            with contextlib.suppress(OSError):
                self.export.discard(self.export.partial)
            raise InvalidInputError(f"cannot create {self.plan.partial}: "
                                    f"{e.strerror}") from None
        self.created = True
        super()._open()

    def _new_copier(self) -> Copier:
        return NfsCopier(self.src_fd, self.export, rate_limit=self.options.rate_limit,
                         src_path=self.plan.source)

    def _commit(self) -> None:
        """COMMIT3 (late write errors surface here), then the rename."""
        self.export.publish()
        self.state = JobState.COMMITTED

    def _undo_remote(self) -> None:
        """The partial goes; so does a copy already renamed into place whose
        verify failed (as a local copy's is unpublished)."""
        if not self.created or self.state in (JobState.DONE, JobState.REDIRECTED):
            return
        path = self.export.target if self.state is JobState.COMMITTED else self.export.partial
        self.cleanup_error = self.export.discard(path)

    def _left_behind(self) -> str:
        if self.cleanup_error is None:
            return "the partial copy on the NFS server was removed; the source is untouched"
        return (f"the partial copy {self.plan.partial} could not be removed "
                f"({self.cleanup_error}); remove it by hand; the source is untouched")

    def _out_of_space_message(self) -> str:
        return f"the NFS server ran out of space for {self.plan.destination}; " + \
            self._left_behind()
