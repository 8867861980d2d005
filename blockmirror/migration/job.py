"""The sync loop: bulk pass, measured dirty passes, switchover, clean failure.

One call copies a live image to a new place and makes the copy exact at one
instant (design steps 0-6):

    pre-check -> shadow file -> bulk pass -> dirty passes (measured)
    -> freeze -> final pass -> thaw (copy) or redirect (move) -> cleanup

Every failure path runs the same cleanup (I6): writers thawed, throttle
lifted, the shadow copy removed, the source left as the writers made it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import time
from collections.abc import Callable
from enum import Enum
from typing import Any

from blockmirror.copying.copier import Copier, CopyStats
from blockmirror.errors import (
    ChangeIdInvalidError,
    FreezeError,
    InvalidInputError,
    NotConvergedError,
    OutOfSpaceError,
    SourceChangedError,
)
from blockmirror.extents import pairs, subtract, union
from blockmirror.migration import precheck
from blockmirror.migration.manifest import (
    STATE_CLEAN,
    Manifest,
    ManifestError,
    differing_extents,
    manifest_path,
)
from blockmirror.migration.options import SyncOptions
from blockmirror.migration.policy import Decision, PassRecord, predict_downtime
from blockmirror.migration.result import SyncProgress, SyncResult
from blockmirror.tracking.tracker import DEFAULT_GRANULARITY, Tracker, sidecar_path
from blockmirror.units import format_bytes, format_rate, format_seconds

# A failed switchover (lease ran out mid final pass) goes back to dirty
# passes; this many failures in one run are declared non-convergence.
MAX_SWITCHOVER_ATTEMPTS = 3


class _Switch(Enum):
    DONE = "done"
    NOT_READY = "not_ready"
    LEASE_RAN_OUT = "lease_ran_out"


class FileSyncJob:
    """One file-mode sync. Holds every resource the cleanup must release."""

    def __init__(self, plan: precheck.Plan, options: SyncOptions) -> None:
        self.plan = plan
        self.policy = options.policy()
        mode = options.mode
        self.mode = mode
        self.verify = options.verify
        self.progress = options.progress
        self.workers = options.workers
        self.rate_limit = options.rate_limit
        self.converge = options.converge
        self.started = time.perf_counter()
        self.result = SyncResult(
            status="running", source=plan.source, destination=plan.destination, mode=mode,
            tracked=False, image_size=plan.size, allocated_bytes=plan.allocated,
            target_downtime=self.policy.target_downtime,
        )
        self.src_fd = -1
        self.dst_fd = -1
        self.lock_fd = -1
        self.tracker: Tracker | None = None
        self.copier: Copier | None = None
        self.frozen = False
        self.throttle_rate = 0  # bytes/s this sync holds writers to (0: none)
        self.committed = False  # the destination has its final name
        self.redirected = False  # move mode: writers now write the destination
        self.stall_from = 0  # passes before this index don't count as stalls
        # The digest manifest beside a copy-mode destination (issue 5): the
        # earlier copy's, when updating it in place, or a new one.
        self.manifest: Manifest | None = None
        self.touched: list[Any] = []  # extents written into the copy this run

    # -- the run ------------------------------------------------------------

    def run(self) -> SyncResult:
        try:
            self._open()
            if self.tracker is None:
                self._run_untracked()
            else:
                self._run_tracked()
        except BaseException as exc:
            self._abort()
            if isinstance(exc, OSError) and exc.errno == errno.ENOSPC and not isinstance(
                exc, OutOfSpaceError
            ):
                raise OutOfSpaceError(
                    f"destination ran out of space at {os.path.dirname(self.plan.destination)}; "
                    "the partial copy was removed and the source is untouched",
                    self.plan.destination,
                ) from exc
            raise
        finally:
            self._release()
        self.result.status = "ok"
        self.result.elapsed = time.perf_counter() - self.started
        self._report("done", len(self.result.passes), 0, 0, 0.0, 0)
        return self.result

    def _open(self) -> None:
        plan = self.plan
        self.src_fd = os.open(plan.source, os.O_RDONLY | os.O_CLOEXEC)
        if os.path.exists(sidecar_path(plan.source)):
            self._lock_source()
            self.tracker = Tracker.open(plan.source)
            self.result.tracked = True
            if not self.tracker.consistent:
                # I4: an unclean bitmap is never trusted. This run copies
                # everything allocated anyway; reset so later runs can trust it.
                self.tracker.reset()
                self.result.notes.append(
                    "sidecar was unclean (a writer died); tracking was reset"
                )
            if self.tracker.state == "redirected":
                raise InvalidInputError(
                    f"source {plan.source} was already moved to {self.tracker.redirect_target()}"
                )
        if plan.incremental:
            self._open_earlier_copy()
        else:
            self.dst_fd = precheck.claim_partial(plan.partial)
            os.ftruncate(self.dst_fd, plan.size)
        self.copier = Copier(self.src_fd, self.dst_fd, workers=self.workers,
                             rate_limit=self.rate_limit, src_path=plan.source,
                             dst_path=plan.destination if plan.incremental else plan.partial)

    def _open_earlier_copy(self) -> None:
        """Incremental sync: DST is an earlier copy with its manifest. It is
        updated in place (there is no room for a second copy), so it is locked
        against other syncs and its manifest says "updating" before any byte
        changes: a crash midway leaves a copy the next run repairs by hash."""
        plan = self.plan
        try:
            self.manifest = Manifest.open(manifest_path(plan.destination))
        except ManifestError as e:
            raise InvalidInputError(f"{e}; use --force for a full copy") from None
        self.dst_fd = os.open(plan.destination, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
        try:
            fcntl.flock(self.dst_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InvalidInputError(
                f"another sync is writing {plan.destination}"
            ) from None
        self.result.incremental = True

    def _lock_source(self) -> None:
        """One copier per source at a time: the dirty bitmap is taken by
        fetch-and-clear, so a second sync would steal the first one's bits.
        An flock on the sidecar, released by the kernel if this process dies."""
        self.lock_fd = os.open(sidecar_path(self.plan.source),
                               os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        try:
            fcntl.flock(self.lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InvalidInputError(
                f"another sync of {self.plan.source} is running"
            ) from None

    def _run_untracked(self) -> None:
        """No sidecar: nobody is known to write. Copy once, then make sure the
        source really did not change meanwhile; never hand back a torn copy."""
        before = os.fstat(self.src_fd)
        if self.plan.incremental:
            self._incremental_pass(dirty_left=lambda: 0)
        else:
            self._bulk_pass(dirty_left=lambda: 0)
        after = os.fstat(self.src_fd)
        if (before.st_size, before.st_mtime_ns, before.st_ctime_ns) != (
            after.st_size, after.st_mtime_ns, after.st_ctime_ns
        ):
            raise SourceChangedError(
                f"source {self.plan.source} changed while it was copied and is not tracked; "
                f"enable tracking (blockmirror track enable {self.plan.source}) and write "
                "through blockmirror, or stop the writers"
            )
        self._durable_commit()
        if self.mode == "move":
            self._remove_source()

    def _run_tracked(self) -> None:
        assert self.tracker is not None
        tracker = self.tracker
        # I2: clear before read. Everything is copied by the bulk pass, so
        # bits from before it are stale; writes from now on are marked again.
        tracker.fetch_and_clear_array()
        if self.plan.incremental:
            self._incremental_pass(dirty_left=tracker.dirty_bytes)
        else:
            self._bulk_pass(dirty_left=tracker.dirty_bytes)
        attempts = 0
        while True:
            decision = self.policy.decide(self.result.passes, stall_from=self.stall_from)
            if decision is Decision.SWITCHOVER:
                outcome = self._switchover()
                if outcome is _Switch.DONE:
                    break
                if outcome is _Switch.LEASE_RAN_OUT:
                    attempts += 1
                if attempts >= MAX_SWITCHOVER_ATTEMPTS:
                    raise NotConvergedError(
                        f"switchover failed {attempts} times: the final pass outlasted the "
                        "freeze lease each time; the source keeps running"
                    )
            elif decision in (Decision.STALLED, Decision.OUT_OF_PASSES):
                if self.converge == "throttle" and decision is Decision.STALLED:
                    self._tighten_throttle()
                else:
                    raise NotConvergedError(self._not_converged_message(decision))
            self._dirty_pass()

    # -- passes -------------------------------------------------------------

    def _bulk_pass(self, dirty_left: Callable[[], int]) -> None:
        assert self.copier is not None
        extents = self.copier.allocated_extents()
        # Everything the bulk pass writes is fsynced before the commit:
        # start its writeback as it goes (see Copier.copy_extents).
        stats = self._copy("bulk", extents, dirty=0, dst_fresh=True,
                           start_writeback=True, before_item=self._clear_before_read)
        self._record("bulk", stats, dirty_left())

    def _incremental_pass(self, dirty_left: Callable[[], int]) -> None:
        """First pass onto an earlier copy: what changed since the change id
        it was taken at, or - when that id cannot be trusted - every granule
        whose digest differs from the manifest (hash resync)."""
        assert self.manifest is not None
        manifest = self.manifest
        size = os.fstat(self.src_fd).st_size
        extents: Any = None
        if self.tracker is not None and manifest.state == STATE_CLEAN and manifest.series:
            try:
                extents = self.tracker.changed_extents_array(manifest.change_id)
                self.result.notes.append(f"incremental since change id {manifest.change_id}")
            except ChangeIdInvalidError as e:
                self.result.notes.append(f"hash resync: {e}")
        elif manifest.state != STATE_CLEAN:
            self.result.notes.append("hash resync: the earlier update of the copy did not finish")
        else:
            self.result.notes.append("hash resync: the copy has no change id to start from")
        manifest.begin_update()
        if size != manifest.image_size:
            manifest.resize(size)
        if os.fstat(self.dst_fd).st_size != size:
            os.ftruncate(self.dst_fd, size)
        if extents is None:
            extents = differing_extents(manifest, self.src_fd, size, workers=self.workers)
        else:
            extents = union(pairs(extents), manifest.unknown_extents())
        stats = self._copy("incremental", extents, dirty=0, dst_fresh=False,
                           start_writeback=True)
        self._record("incremental", stats, dirty_left())

    def _dirty_pass(self) -> None:
        assert self.tracker is not None
        _, stats = self._take_dirty_and_copy("dirty")
        self._record("dirty", stats, self.tracker.dirty_bytes())

    def _take_dirty_and_copy(self, phase: str) -> tuple[Any, CopyStats]:
        """Follow the source's size, take the dirty set (clear before read,
        I2) and copy it; returns the extents taken and what the copy did."""
        assert self.tracker is not None
        self._follow_source_size()
        dirty = self.tracker.dirty_bytes()
        extents = self.tracker.fetch_and_clear_array()
        return extents, self._copy(phase, extents, dirty=dirty, dst_fresh=False)

    def _clear_before_read(self, item: Any) -> None:
        """Bulk pass, on a copy worker: the bits of this item's granules go
        just before it is read, so a block written since the pass began but
        before the pass reached it is copied once, not again by a dirty
        pass (QEMU's mirror clears per chunk the same way)."""
        if self.tracker is not None:
            for offset, length in pairs(item):
                self.tracker.clear_range(offset, length)

    def _copy(self, phase: str, extents: Any, *, dirty: int, dst_fresh: bool,
              start_writeback: bool = False,
              before_item: Callable[[Any], None] | None = None) -> CopyStats:
        assert self.copier is not None
        extent_list = pairs(extents)
        total = sum(length for _, length in extent_list)
        if self.manifest is not None and self.plan.incremental:
            # The copy is about to change under these digests: forget them
            # durably first, so a crash can never leave one that lies.
            self.manifest.forget(extent_list)
        self.touched.append(extents)
        index = len(self.result.passes)
        start = time.perf_counter()
        done = 0

        def on_progress(nbytes: int) -> None:
            nonlocal done
            done += nbytes
            elapsed = time.perf_counter() - start
            self._report(phase, index, done, total, done / elapsed if elapsed > 0 else 0.0,
                         dirty)

        return self.copier.copy_extents(
            extents, dst_fresh=dst_fresh, progress=on_progress if self.progress else None,
            start_writeback=start_writeback, before_item=before_item,
        )

    def _record(self, kind: str, stats: CopyStats, dirty_left: int) -> PassRecord:
        rec = PassRecord(
            index=len(self.result.passes), kind=kind, bytes=stats.copied,
            seconds=stats.seconds, dirty_left=dirty_left, bytes_written=stats.bytes_written,
        )
        self.result.passes.append(rec)
        self.result.bytes_copied += stats.copied
        self.result.bytes_written += stats.bytes_written
        return rec

    def _follow_source_size(self) -> None:
        """Writers may grow or shrink the image; the copy follows its size."""
        size = os.fstat(self.src_fd).st_size
        if size != os.fstat(self.dst_fd).st_size:
            if self.manifest is not None:
                self.manifest.resize(size)
            os.ftruncate(self.dst_fd, size)
        self.result.image_size = size

    # -- switchover ---------------------------------------------------------

    def _switchover(self) -> _Switch:
        """Freeze, final pass, commit. NOT_READY if the dirty set grew past
        the target before the freeze (no freeze happened); LEASE_RAN_OUT if the
        final pass outlasted the lease (writers were thawed). Either way the
        loop goes on with dirty passes."""
        assert self.tracker is not None
        tracker = self.tracker
        if self.mode == "move":
            # Move mode fsyncs inside the freeze (the copy must be durable
            # before writers go there): flush what the passes wrote first,
            # while writers still run, so that fsync has little left to do.
            # Copy mode fsyncs after the thaw, so it skips this.
            os.fdatasync(self.dst_fd)
            # Writers went on during the flush: decide again on what is dirty
            # now, or the pause would outlast the target.
            throughput = self.policy.copy_throughput(self.result.passes)
            if not self.policy.fits(tracker.dirty_bytes(), throughput):
                return _Switch.NOT_READY
        lease = min(60.0, max(2.0, 4 * self.policy.target_downtime))
        frozen_at = time.perf_counter()
        try:
            tracker.freeze(lease)
        except OSError as e:  # ETIMEDOUT (writes did not drain), EBUSY (another copier)
            raise FreezeError(e.errno, f"could not pause writers: {e.strerror}") from None
        self.frozen = True
        extents, stats = self._take_dirty_and_copy("final")
        self._record("final", stats, 0)
        if not tracker.freeze_holds():
            # Writers may have resumed mid-pass: this is no point-in-time copy.
            # Everything this pass copied is still valid pre-copy; re-mark it
            # so nothing is lost, and go on with dirty passes.
            for offset, length in pairs(extents):
                tracker.mark(int(offset), int(length))
            self._thaw()
            self.result.notes.append("freeze lease ran out during the final pass; retried")
            return _Switch.LEASE_RAN_OUT
        if self.mode == "copy":
            # The copy is exact at this instant: name it for backup tools.
            self.result.change_id = tracker.change_id()
            self._thaw()
            self.result.downtime = time.perf_counter() - frozen_at
            self._durable_commit()
        else:
            self._durable_commit()
            self._attach_destination_tracker()
            tracker.redirect(self.plan.destination)
            self.redirected = True
            self.frozen = False
            self.result.downtime = time.perf_counter() - frozen_at
        if self.throttle_rate:
            tracker.set_throttle(0)
            self.throttle_rate = 0
        if self.verify:
            self._verify()
        if self.mode == "move":
            self._remove_source()
        return _Switch.DONE

    def _durable_commit(self) -> None:
        """fsync the shadow copy, give it the source's mode and its final
        name, and fsync the folder so the name survives a crash."""
        dst = self.plan.destination
        if self.plan.incremental:
            os.fsync(self.dst_fd)
            self._write_manifest()
            return
        os.fchmod(self.dst_fd, self.plan.mode & 0o7777)
        if os.geteuid() == 0:
            os.fchown(self.dst_fd, self.plan.owner_uid, -1)
        os.fsync(self.dst_fd)
        for stale in (dst + ".cbt", manifest_path(dst)):
            # --force: the replaced copy's sidecar and manifest must go before
            # the new copy takes the name, or they would describe it wrongly.
            if os.path.lexists(stale):
                os.unlink(stale)
        os.rename(self.plan.partial, dst)
        self.committed = True
        _fsync_folder(os.path.dirname(dst))
        if self.mode == "copy":
            self._write_manifest()

    def _write_manifest(self) -> None:
        """Digest what this run wrote (a new copy: all of it) and record the
        change id the copy is exact at, for the next incremental sync."""
        dst = self.plan.destination
        size = os.fstat(self.dst_fd).st_size
        if self.manifest is None:
            # A new copy started as one hole: what no pass wrote is zeros.
            granularity = self.tracker.granularity if self.tracker else DEFAULT_GRANULARITY
            self.manifest = Manifest.create(manifest_path(dst), granularity=granularity,
                                            image_size=size, source=self.plan.source)
        regions = union(*(pairs(extents) for extents in self.touched))
        self.manifest.record(self.dst_fd, regions, workers=self.workers)
        series, _, generation = (self.result.change_id or ":0").partition(":")
        self.manifest.commit(series, int(generation), recorded=regions)
        self.manifest.close()

    def _attach_destination_tracker(self) -> None:
        """Move mode: writers will continue on the destination, so it needs a
        sidecar of its own before they are sent there."""
        assert self.tracker is not None
        Tracker.create(self.plan.destination, self.tracker.granularity).close()

    def _remove_source(self) -> None:
        """Move mode, after the switch: the source and its sidecar go. Writers
        still holding them were redirected; their mapping of the sidecar keeps
        answering ESTALE, so no write lands in the removed file."""
        os.unlink(self.plan.source)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(sidecar_path(self.plan.source))
        _fsync_folder(os.path.dirname(self.plan.source))

    def _verify(self) -> None:
        """Compare the copy with the source, excusing blocks written since the
        switch (the tracker says which); anything else that differs is a bug."""
        from blockmirror.copying.verify import compare_files

        self._report("verify", len(self.result.passes), 0, self.result.image_size, 0.0, 0)
        differing = compare_files(self.plan.source, self.plan.destination)
        copy_size = os.path.getsize(self.plan.destination)
        if copy_size == self.result.image_size:
            # The copy has the size the source had at the freeze; a source
            # resized since differs past the shorter of the two, legitimately.
            shorter = min(copy_size, os.path.getsize(self.plan.source))
            differing = [(o, min(n, shorter - o)) for o, n in differing if o < shorter]
        if differing:
            # Blocks changed after the switch are expected to differ. Read the
            # dirty set only now: any write that changed a block we compared
            # was marked before it landed (I1).
            if self.mode == "copy":
                assert self.tracker is not None
                changed = self.tracker.dirty_extents()
            else:
                with Tracker.open(self.plan.destination) as dst_tracker:
                    changed = dst_tracker.dirty_extents()
            unexplained = subtract(differing, changed)
            if unexplained:
                off, length = unexplained[0]
                raise FreezeError(
                    5, f"verify failed: {len(unexplained)} extents differ, first at {off}+{length}"
                )
        self.result.verified = True

    # -- convergence help ---------------------------------------------------

    def _tighten_throttle(self) -> None:
        """converge="throttle": hold writers to half the copy throughput (and
        half again at each further stall), like QEMU's auto-converge."""
        assert self.tracker is not None
        throughput = self.policy.copy_throughput(self.result.passes)
        rate = max(1 << 20, int((self.throttle_rate or throughput) / 2))
        self.tracker.set_throttle(rate)
        self.throttle_rate = rate
        self.result.notes.append(f"writers throttled to {format_rate(rate)}")
        self.stall_from = len(self.result.passes) - 1  # judge the new rate afresh

    def _not_converged_message(self, decision: Decision) -> str:
        passes = self.result.passes
        last = passes[-1]
        throughput = self.policy.copy_throughput(passes)
        predicted = predict_downtime(last.dirty_left, throughput)
        why = (
            f"the dirty set stopped shrinking for {self.policy.stall_passes} passes"
            if decision is Decision.STALLED
            else f"no switchover after {len(passes)} passes"
        )
        return (
            f"not converged: {why} (writers dirty ~{format_rate(last.write_rate)}, copy runs "
            f"~{format_rate(throughput)}, {format_bytes(last.dirty_left)} dirty would take "
            f"{format_seconds(predicted)} > target {format_seconds(self.policy.target_downtime)}); "
            "the source keeps running untouched"
        )

    # -- cleanup ------------------------------------------------------------

    def _thaw(self) -> None:
        if self.frozen and self.tracker is not None:
            self.tracker.thaw()
        self.frozen = False

    def _abort(self) -> None:
        """Undo everything on the destination side; never leave writers
        frozen or throttled (I6). Each step runs even if another fails."""
        if self.tracker is not None:
            with contextlib.suppress(Exception):
                if self.throttle_rate:
                    self.tracker.set_throttle(0)
            with contextlib.suppress(Exception):
                self._thaw()
        if self.redirected:
            return  # the move happened; the destination is now the live image
        if self.plan.incremental:
            # The earlier copy was being updated in place: it stays, with its
            # manifest saying "updating"; the next sync repairs it by hash.
            if self.manifest is not None:
                with contextlib.suppress(Exception):
                    self.manifest.close()
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.plan.partial)
        if self.committed:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.plan.destination)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(sidecar_path(self.plan.destination))
            with contextlib.suppress(FileNotFoundError):
                os.unlink(manifest_path(self.plan.destination))
        with contextlib.suppress(FileNotFoundError):
            os.unlink(manifest_path(self.plan.destination) + ".tmp")  # a new one, unpublished

    def _release(self) -> None:
        if self.copier is not None:
            self.copier.close()
        if self.tracker is not None:
            self.tracker.close()
        for fd in (self.src_fd, self.dst_fd, self.lock_fd):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.src_fd = self.dst_fd = self.lock_fd = -1

    def _report(self, phase: str, index: int, done: int, total: int, rate: float,
                dirty: int) -> None:
        if self.progress is not None:
            self.progress(SyncProgress(phase, index, done, total, rate, dirty,
                                       time.perf_counter() - self.started))


def _fsync_folder(folder: str) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
