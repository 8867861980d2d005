"""A copy-mode sync whose destination is a file on an NFS server (``nfs://``).

The flow and its hooks are the NBD export's (remote.py, which says what a
failure leaves behind); what differs is the endpoint: a full copy goes to
``NAME.bm-partial`` beside the target, created sparse, and the commit is
COMMIT3 then a rename over the target, as a local copy's fsync and rename;
on any failure the partial is removed from the server (over a new mount if
the old one died), and the error says whether that worked. An incremental
sync (a usable manifest, checked as for an export) skips the partial: it
updates the target in place and only commits it.

Move mode (``--move``): the same passes; under the freeze the final pass,
then the commit (COMMIT3 and the rename of the partial over the target, or
COMMIT3 of the target updated in place), and only then the redirect:
writers are sent to the file's URL and their next I/O goes there through
libnfs (tracking/remote_image.py: WRITE3, COMMIT3 at their flush), untracked.
A failure before the redirect leaves writers on the source with every
write; a copy already renamed into place is removed again (it would be a
stale one). After the redirect the source and its sidecar are removed once
writers have followed. No manifest is kept.

A module of its own so that a sync into an NBD export never loads the NFS
client (its bindings and copier).
"""

from __future__ import annotations

import contextlib
import os
from typing import TYPE_CHECKING

from blockmirror.copying.nfs import PARTIAL_SUFFIX, NfsCopier, NfsFile
from blockmirror.errors import ChangeIdInvalidError, InvalidInputError, OutOfSpaceError
from blockmirror.migration import precheck
from blockmirror.migration.job import JobState
from blockmirror.migration.passes import _granule_aligned
from blockmirror.migration.precheck import Plan
from blockmirror.migration.remote import (
    RemotePassRunner,
    RemoteSyncJob,
    check_move_onto_export,
    refuse_unsupported,
)
from blockmirror.units import format_bytes

if TYPE_CHECKING:
    from blockmirror.copying.copier import Copier
    from blockmirror.copying.endpoint import NfsUrl
    from blockmirror.extents import Extents
    from blockmirror.migration.options import SyncOptions
    from blockmirror.migration.remote_manifest import RemoteManifest
    from blockmirror.migration.result import SyncResult


def sync_to_nfs(src: str, url: NfsUrl, options: SyncOptions) -> SyncResult:
    """File mode into a file on an NFS server (checked, then run as an
    :class:`NfsSyncJob`)."""
    refuse_unsupported(src, url, options)
    if options.move:
        check_move_onto_export(src, url, options)
    st = precheck.check_source(src, move=False)
    nfs_file = NfsFile(url, connections=options.workers)
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


class NfsPassRunner(RemotePassRunner):
    """The passes into an NFS file: a new partial reads as zeros, so its
    bulk pass takes the allocated extents only; a full copy in place (a
    change id the tracker no longer vouches for) must also zero what the
    source has as holes. The file follows the source's size, either way."""

    def bulk(self) -> None:
        assert isinstance(self.copier, NfsCopier)
        export = self.copier.export
        fresh = export.reads_zero(0, export.size)
        ranges: Extents = (self.copier.allocated_extents() if fresh
                           else self.copier.whole_image())
        if self.fresh_digests is not None:  # whole granules, each hashed as it is sent
            ranges = _granule_aligned(ranges, self.fresh_digests.granularity,
                                      os.fstat(self.src_fd).st_size)
        stats = self._copy("bulk", ranges, dst_fresh=fresh,
                           before_item=self._clear_before_read if self.tracker else None)
        self._record("bulk", stats)

    def follow_source_size(self) -> None:
        assert isinstance(self.copier, NfsCopier)
        size = os.fstat(self.src_fd).st_size
        if size != self.copier.export.size:
            self.copier.export.resize(size)
        self.result.image_size = size


LEFT_UPDATED = ("the NFS file was left partly updated and its manifest removed (the next "
                "sync is a full copy); the source is untouched")


class NfsSyncJob(RemoteSyncJob):
    """A :class:`RemoteSyncJob` into a file on an NFS server. A full copy
    goes through a sparse partial beside the target, committed (COMMIT3)
    and renamed over it at the switch, removed on failure. When the last
    sync's manifest can be used (the checks of ``_doubt``, and those of
    ``_still_holds`` here) the target is updated in place and committed.

    In place is safe because the manifest is removed, durably, before the
    first byte of the target changes (``RemoteSyncJob._open``): a run that
    dies midway leaves no manifest, so the next sync can only be a full
    copy, never one that trusts digests the target no longer matches. What
    a failed update cannot do is take the old bytes back: the target is
    left partly updated (the error says so), the source untouched."""

    export: NfsFile
    pass_runner = NfsPassRunner

    def __init__(self, plan: Plan, options: SyncOptions, nfs_file: NfsFile) -> None:
        super().__init__(plan, options, nfs_file)
        self.in_place = False  # updating the target itself (else through the partial)
        self.created = False  # the partial exists on the server
        self.cleanup_error: str | None = None

    def _notes(self) -> list[str]:
        # Which way it writes is known only in _usable_manifest.
        return (["moved onto the NFS file: committed, then writers sent there; the source "
                 "is removed once they follow; no manifest"] if self.options.move else [])

    def _usable_manifest(self) -> RemoteManifest | None:
        """A usable manifest means in place; none, a new partial."""
        earlier = super()._usable_manifest()
        self.in_place = earlier is not None
        if self.in_place:
            self.result.notes.append(f"updated {os.path.basename(self.export.target)} in "
                                     "place on the NFS server, then committed (COMMIT)")
        else:
            self.export.close_file()  # the target, if the sample check opened it
            self._create_partial()
            self.result.notes.append(
                f"written to {os.path.basename(self.export.partial)} on the NFS server, "
                "committed (COMMIT) and renamed over the target")
        return earlier

    def _still_holds(self, earlier: RemoteManifest) -> str | None:
        """First the tracker still vouching for EARLIER's change id (asked
        again after the first clear, in _first_pass): a reset tracker takes
        the partial, not a rewrite of the whole target in place. Then the
        target, opened for update, sampled."""
        assert self.tracker is not None
        try:
            self.tracker.changed_extents_array(earlier.change_id)
        except ChangeIdInvalidError as e:
            return str(e)
        try:
            self.export.open_for_update()
        except OSError as e:
            return f"cannot open {self.plan.destination} for update: {e.strerror}"
        return super()._still_holds(earlier)

    def _create_partial(self) -> None:
        """Room for the source's data on the server (or exit 4 with nothing
        made), then the partial (bad input if the server will not make it)."""
        _check_nfs_space(self.export, self.plan.allocated)
        try:
            self.export.create_partial(self.plan.size, self.plan.mode)
        except OSError as e:
            with contextlib.suppress(OSError):
                self.export.discard(self.export.partial)
            raise InvalidInputError(f"cannot create {self.plan.partial}: "
                                    f"{e.strerror}") from None
        self.created = True

    def _new_copier(self) -> Copier:
        return NfsCopier(self.src_fd, self.export, rate_limit=self.options.rate_limit,
                         src_path=self.plan.source)

    def _commit(self) -> None:
        """COMMIT3 (late write errors surface here), the rename of a
        partial, then the manifest of what the server now holds."""
        if self.in_place:
            self.export.flush()
        else:
            self.export.publish()
        self.state = JobState.COMMITTED
        self._keep_manifest()

    def _undo_remote(self) -> None:
        """The partial goes; so does a copy already renamed into place whose
        verify failed (as a local copy's is unpublished). A target updated
        in place stays as it is: its old bytes are gone."""
        if (self.in_place or not self.created
                or self.state in (JobState.DONE, JobState.REDIRECTED)):
            return
        path = self.export.target if self.state is JobState.COMMITTED else self.export.partial
        self.cleanup_error = self.export.discard(path)

    def _left_behind(self) -> str:
        if self.in_place:
            return LEFT_UPDATED
        if self.cleanup_error is None:
            return "the partial copy on the NFS server was removed; the source is untouched"
        return (f"the partial copy {self.plan.partial} could not be removed "
                f"({self.cleanup_error}); remove it by hand; the source is untouched")

    def _out_of_space_message(self) -> str:
        return f"the NFS server ran out of space for {self.plan.destination}; " + \
            self._left_behind()
