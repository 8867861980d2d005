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

Move mode onto an export (``--move``): the same passes, then under the
freeze the final pass, an NBD flush (the commit), and only then the
redirect: writers are sent to the export's URI (Tracker.redirect_to_export,
a compare-and-swap from FROZEN, so a freeze whose lease ran out during the
flush fails the redirect instead of losing the writes made meanwhile), and
each writer's next I/O goes to the export through libnbd, untracked
(tracking/image.py). Any failure before the redirect thaws writers on the
untouched source; the export is left partly written, as in copy mode.
After the redirect the source and its sidecar are removed once writers
have followed (as a local move does); no manifest is kept (there is no
source left to update the export from). A copier killed after the redirect
leaves the source behind with writers on the export: the same move run
again only removes the source (``_finish_interrupted_move``). Refused up front (one line, exit
2, nothing written) when not every writer could follow: an image served
by ``blockmirror serve`` (the nbdkit front end follows only moves to a
file), a live writer that is not the image's owner (only the owner
follows a URI; csrc/redirect.c says why), a URI with user info (it is
never stored in the sidecar) or a relative socket path; also with
``--verify`` (writes after the switch land on the export untracked, so
nothing could tell them from a copy error).

Not yet: ``--converge mirror`` (writers mirror only into a local file):
refused with one line (exit 2), while ``--converge auto`` escalates to the
throttle instead of mirroring. (``--move`` onto an NFS file: remote_nfs.py.)

Into NFS: remote_nfs.py (the same job, another endpoint).
"""

from __future__ import annotations

import contextlib
import errno
import os
import urllib.parse
from typing import TYPE_CHECKING, Any

from blockmirror.copying.copier import Copier, CopyStats
from blockmirror.copying.endpoint import NbdUri, NfsUrl, parse
from blockmirror.copying.remote import NbdExport, RemoteCopier
from blockmirror.errors import (
    BlockMirrorError,
    ChangeIdInvalidError,
    InvalidInputError,
    VerifyError,
)
from blockmirror.extents import pairs, subtract, total_bytes
from blockmirror.migration import commit, precheck
from blockmirror.migration import digests as dg
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
    read_back,
    sample_mismatch,
)
from blockmirror.migration.result import SyncResult
from blockmirror.tracking.tracker import sidecar_path, sidecar_users
from blockmirror.units import format_bytes

if TYPE_CHECKING:
    from blockmirror.copying.nfs import NfsFile
    from blockmirror.extents import Extents

LEFT_PARTLY = "the NBD export was left partly written; the source is untouched"


def sync_to_export(src: str, dst: str, options: SyncOptions) -> SyncResult:
    """File mode into the export DST: checked (one line, exit 2, nothing
    written on bad input), connected, then run as a :class:`RemoteSyncJob`.
    (Into an NFS file: remote_nfs.py; from either: remote_source.py; the
    choice is run.py's.)"""
    uri = parse(dst)
    assert isinstance(uri, NbdUri)
    refuse_unsupported(src, uri, options)
    if options.move:
        check_move_onto_export(src, uri, options)
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


def refuse_unsupported(src: str, uri: NbdUri | NfsUrl, options: SyncOptions) -> None:
    kind = "an NFS file" if isinstance(uri, NfsUrl) else "an NBD export"
    if os.path.isdir(src):
        raise InvalidInputError(f"directory mode into {kind} is not supported: {uri} "
                                "holds one image; sync each image to its own place")
    if options.converge == "mirror":
        raise InvalidInputError(f"--converge mirror needs a local copy; into {uri} use "
                                "--converge throttle or auto")


def redirect_uri_of(uri: NbdUri | NfsUrl) -> str:
    """The URI writers are sent to when the image moves onto URI."""
    return uri.uri if isinstance(uri, NbdUri) else uri.url


def check_move_onto_export(src: str, uri: NbdUri | NfsUrl, options: SyncOptions) -> None:
    """--move onto an export, before anything is written: refused (exit 2)
    unless every writer of SRC could follow the URI and the source can go."""
    why = _move_refusal(os.path.abspath(src), uri, options)
    if why:
        raise InvalidInputError(f"--move to {uri}: {why}; nothing was written")


def _move_refusal(src: str, uri: NbdUri | NfsUrl, options: SyncOptions) -> str | None:
    parts = urllib.parse.urlsplit(redirect_uri_of(uri))
    if "@" in parts.netloc:
        return "a URI with user info cannot be a redirect (it is never stored)"
    socket = urllib.parse.parse_qs(parts.query).get("socket", [""])[0]
    if parts.scheme == "nbd+unix" and not socket.startswith("/"):
        return "the socket path must be absolute (writers reopen it from their own folders)"
    if options.verify:
        return ("--verify cannot check a move onto an export (writes after the switch land "
                "there untracked); verify a copy, or compare before writers start")
    if not os.access(os.path.dirname(src), os.W_OK):
        return f"{os.path.dirname(src)} is not writable: a move removes the source"
    return _writers_that_cannot_follow(src)


def _writers_that_cannot_follow(src: str) -> str | None:
    """Why a writer of SRC could not follow a redirect to an export, or None:
    a front end serving it (the nbdkit plugin follows moves to files only),
    or a live process mapping its sidecar that is not the image's owner
    (writers follow a URI only as the owner; csrc/redirect.c)."""
    from blockmirror.frontend.plugin import served_elsewhere

    if not os.path.exists(sidecar_path(src)):
        return None
    if served_elsewhere(src, readonly=False):
        return ("the image is served by blockmirror serve, whose clients cannot follow a move "
                "onto an export; stop it (or move to a file) first")
    owner = os.stat(src).st_uid
    foreign = [(pid, uid) for pid, uid in sidecar_users(src) if uid != owner]
    if foreign:
        who = ", ".join(f"pid {pid} (uid {uid})" for pid, uid in foreign[:3])
        return (f"writers that are not the image's owner (uid {owner}) cannot follow a move "
                f"onto an export: {who}")
    return None


class RemotePassRunner(PassRunner):
    """The passes into an export: the bulk pass covers the whole image (the
    export's old bytes under the source's holes must go), and the copy
    follows the source's size within the export's. (Into an NFS file:
    remote_nfs.NfsPassRunner.)"""

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
    """A copy-mode :class:`FileSyncJob` into EXPORT (connected, checked).
    Subclasses for other endpoints override the hooks: _notes, _new_copier,
    _commit, _left_behind (and _abort, to clean up). Into an NBD export it
    keeps the export's manifest beside the source (``keeps_manifest``)."""

    keeps_manifest = True
    pass_runner: type[RemotePassRunner] = RemotePassRunner

    def __init__(self, plan: Plan, options: SyncOptions, export: NbdExport | NfsFile) -> None:
        super().__init__(plan, options)
        self.export = export
        self.manifest_at = manifest_location(plan.source, export.name)
        self.earlier: RemoteManifest | None = None  # the last sync's, when it can be used
        self.result.notes.extend(self._notes())

    def _notes(self) -> list[str]:
        assert isinstance(self.export, NbdExport)
        notes = (["moved onto the NBD export: flushed, then writers sent there; the source "
                  "is removed once they follow; no manifest"] if self.options.move else
                 ["written straight into the NBD export: no shadow copy, no rename; its "
                  "manifest is kept beside the source"])
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
            if self.tracker is not None and self.tracker.state == "redirected":
                self._finish_interrupted_move()
                return
        fresh = None
        if self.keeps_manifest:
            self.earlier = self._usable_manifest()
            # Before the first byte goes into the export: a run that dies
            # from here on must leave no manifest that could lie.
            # (A folder we do not trust is never read: nothing to remove.)
            with contextlib.suppress(ManifestError):
                invalidate(*self.manifest_at)
            if self.tracker is not None and not self.options.move:
                fresh = (self.earlier.table if self.earlier is not None
                         else DigestTable(self._granularity, plan.size))
        self.state = JobState.COPYING  # from here the export holds bytes of this run
        self.copier = self._new_copier()
        self.passes = self.pass_runner(self.copier, self.tracker, self.src_fd, -1, self.result,
                                        self.report, fresh_digests=fresh)

    def _finishing_a_move(self) -> bool:
        """A move onto this export whose copier was killed after the switch:
        the sidecar still sends writers here (only ever after the export's
        flush), so all that was left is removing the source."""
        assert self.tracker is not None
        return (self.options.move
                and self.tracker.redirect_target() == redirect_uri_of(self.export.uri))

    def _finish_interrupted_move(self) -> None:
        self.export.close()  # nothing to send (and qemu-nbd may take few clients)
        self._wait_for_writers_to_follow()
        commit.remove_source(self.plan)
        self.state = JobState.DONE
        self.result.notes.append("finished a move onto the export a killed run left after "
                                 "its switch (writers were sent there after its flush): the "
                                 "source was removed")

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
        mismatch = self._still_holds(earlier)
        return earlier if mismatch is None else mismatch

    def _still_holds(self, earlier: RemoteManifest) -> str | None:
        """Why the export may not hold what EARLIER says, or None."""
        return sample_mismatch(earlier, self.export)

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
        """The NBD flush. In move mode it runs frozen, after the final pass and
        before the redirect: writers go only to an export that has flushed."""
        self.export.flush()
        self.state = JobState.COMMITTED
        if not self.options.move:
            self._keep_manifest()

    def _flush_before_freeze(self) -> None:
        """Move mode: flush what the passes sent while writers still run, so
        the flush inside the freeze has little left to do."""
        self.export.flush()

    def _redirect(self) -> None:
        """Move mode, frozen and flushed: send writers to the export. A front
        end that began serving the image since the start is checked for once
        more (one lock query); a writer that joined since then as another
        uid fails its next write with EPERM instead of following."""
        from blockmirror.frontend.plugin import served_elsewhere

        assert self.tracker is not None
        if served_elsewhere(self.plan.source, readonly=False):
            raise InvalidInputError(f"{self.plan.source} began to be served by blockmirror "
                                    "serve during the move; its clients cannot follow a move "
                                    "onto an export; the source keeps running")
        self.tracker.redirect_to_export(redirect_uri_of(self.export.uri))
        self.state = JobState.REDIRECTED

    def _finish(self) -> None:
        """Move mode: once writers have followed (or after a moment), the
        source and its sidecar go, as after a local move."""
        if self.options.verify:
            self._verify()
        if self.options.move:
            # Nothing more to send: free our connections first, for servers
            # that take few clients at once (qemu-nbd takes one unless -e N).
            self.export.close()
            self._wait_for_writers_to_follow()
            commit.remove_source(self.plan)
        self.state = JobState.DONE

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
        series, _, generation = self.result.change_id.rpartition(":")
        try:
            read_back(table, self.export)
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
        from blockmirror.copying.remote_compare import compare_with_export

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
            # A move is frozen until its redirect, committed (flushed) or not.
            if self.state is JobState.FROZEN or (self.state is JobState.COMMITTED
                                                 and self.options.move):
                with contextlib.suppress(Exception):
                    self.tracker.thaw()
        self._undo_remote()

    def _release(self) -> None:
        try:
            super()._release()
        finally:
            self.export.close()
