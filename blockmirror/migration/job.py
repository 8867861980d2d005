"""One file's sync as a job with explicit states and one exit.

    PLANNED -> COPYING -> FROZEN -> THAWED -> COMMITTED -> DONE        (copy)
    PLANNED -> COPYING -> FROZEN -> COMMITTED -> REDIRECTED -> DONE    (move)

A switchover whose freeze lease runs out mid final pass goes from FROZEN back
to COPYING. Whatever the state when something fails, :meth:`FileSyncJob._abort`
looks at that one state and undoes exactly what was done (I6): writers are
thawed and the throttle lifted, the shadow copy (or the published copy) is
removed, an earlier copy updated in place is left marked for repair, and
nothing is touched once writers write the destination. The source is never
written.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import time
from enum import Enum
from typing import TYPE_CHECKING, Any

from blockmirror.copying.copier import Copier
from blockmirror.copying.verify import compare_files
from blockmirror.errors import (
    FreezeError,
    InvalidInputError,
    NotConvergedError,
    OutOfSpaceError,
    SourceChangedError,
    VerifyError,
)
from blockmirror.extents import Extent, pairs, subtract, union
from blockmirror.migration import commit, journal
from blockmirror.migration import digests as dg
from blockmirror.migration.digests import DigestTable
from blockmirror.migration.manifest import Manifest, manifest_path
from blockmirror.migration.options import SyncOptions
from blockmirror.migration.passes import PassRunner, ProgressReporter
from blockmirror.migration.policy import Decision, predict_downtime
from blockmirror.migration.precheck import Plan, claim_partial
from blockmirror.migration.result import SyncResult
from blockmirror.tracking.changeid import ChangeId
from blockmirror.tracking.tracker import DEFAULT_GRANULARITY, Tracker, sidecar_path
from blockmirror.units import format_bytes, format_rate, format_seconds

# Loaded where a sync needs them (an earlier copy, a tracked source, mirror
# or auto convergence): a plain sync does not pay their imports
# (incremental's loads numpy, which a plain sync wants loaded only while its
# bulk copy runs; see blockmirror._numpy).
if TYPE_CHECKING:
    from blockmirror.migration.escalation import Escalation
    from blockmirror.migration.mirroring import MirrorSession
    from blockmirror.tracking.bypass import BypassWatch


def __getattr__(name: str) -> Any:
    """``job.BypassWatch``, imported on first use (its ctypes.util loads
    subprocess): the name stays this module's, for callers and tests."""
    if name != "BypassWatch":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from blockmirror.tracking.bypass import BypassWatch

    globals()[name] = BypassWatch
    return BypassWatch

# A failed switchover (lease ran out mid final pass) goes back to dirty
# passes; this many failures in one run are declared non-convergence.
MAX_SWITCHOVER_ATTEMPTS = 3
# Work items of the paced copier of mirrored passes (see _start_mirror).
MIRRORED_ITEM_BYTES = 1 << 20


class JobState(Enum):
    PLANNED = "planned"  # checked; nothing of ours on the destination side yet
    COPYING = "copying"  # the shadow copy exists, or the earlier copy is being updated
    FROZEN = "frozen"  # writers paused by this job
    THAWED = "thawed"  # copy mode: the copy is exact, writers back on the source
    COMMITTED = "committed"  # durable under its final name (move: writers still frozen)
    REDIRECTED = "redirected"  # move mode: writers write the copy
    DONE = "done"


class _Switch(Enum):
    DONE = "done"
    NOT_READY = "not_ready"  # the dirty set grew past the target; no freeze happened
    LEASE_RAN_OUT = "lease_ran_out"  # writers were thawed; go on with dirty passes


class FileSyncJob:
    """One file-mode sync. Holds every resource the exit must release."""

    def __init__(self, plan: Plan, options: SyncOptions) -> None:
        self.plan = plan
        self.options = options
        self.policy = options.policy()
        self.state = JobState.PLANNED
        self.failed_from: JobState | None = None
        self.report = ProgressReporter(options.progress)
        self.result = SyncResult(
            status="running", source=plan.source, destination=plan.destination,
            mode=options.mode, tracked=False, image_size=plan.size,
            allocated_bytes=plan.allocated, target_downtime=self.policy.target_downtime,
        )
        self.src_fd = self.dst_fd = self.lock_fd = -1
        self.tracker: Tracker | None = None
        self.bypass: BypassWatch | None = None  # writes that skip the tracker (root only)
        self.start_mtime_ns = 0  # the source's mtime when the sync began
        self.copier: Copier | None = None
        self.passes: PassRunner | None = None
        # The earlier copy's manifest when updating it in place, else the
        # new copy's once the commit makes one.
        self.manifest: Manifest | None = None
        self.throttle_rate = 0  # bytes/s this job holds writers to (0: none)
        self.mirror: MirrorSession | None = None  # converge="mirror", once engaged
        self.mirror_copier: Copier | None = None  # the one-thread, paced copier of mirrored passes
        self.unshared_throughput = 0.0  # the copy's, measured before writers mirrored
        self.mirror_changed: list[Extent] = []  # what mirrored writes may have changed
        self.escalation: Escalation | None = None
        if options.converge == "auto":
            from blockmirror.migration.escalation import Escalation

            self.escalation = Escalation(self.policy)
        self.rate_sample = (0, 0.0)  # writers' bytes_written and when, at a pass's start
        self.stall_from = 0  # passes before this index don't count as stalls

    # -- the run ------------------------------------------------------------

    def run(self) -> SyncResult:
        try:
            self._open()
            if self.state is JobState.DONE:
                pass  # an interrupted move was finished; nothing to copy
            elif self.tracker is None:
                self._run_untracked()
            else:
                self._run_tracked()
        except BaseException as exc:
            self._abort()
            if isinstance(exc, OSError) and exc.errno == errno.ENOSPC and not isinstance(
                exc, OutOfSpaceError
            ):
                raise OutOfSpaceError(self._out_of_space_message(), self.plan.destination) from exc
            raise
        finally:
            self._release()
        self.result.status = "ok"
        self.result.elapsed = time.perf_counter() - self.report.started
        self.report("done", len(self.result.passes))
        return self.result

    def _open(self) -> None:
        plan = self.plan
        self.src_fd = os.open(plan.source, os.O_RDONLY | os.O_CLOEXEC)
        if os.path.exists(sidecar_path(plan.source)):
            self._open_tracker()
        if plan.resume == "move" and self._resume_move():
            return
        if plan.incremental:
            from blockmirror.migration import incremental

            self.manifest, self.dst_fd = incremental.open_earlier_copy(
                plan.destination, notes=self.result.notes, rebuild=plan.resume == "copy",
                source=plan.source,
                granularity=self._granularity)
            if plan.resume == "copy":
                self.result.notes.append("resumed a commit a killed run left unfinished: "
                                         "the copy was re-hashed to rebuild its manifest")
            self.result.incremental = True
        else:
            self.dst_fd = claim_partial(plan.partial)
        # From here on the destination side holds something of this run's.
        self.state = JobState.COPYING
        if not plan.incremental:
            os.ftruncate(self.dst_fd, plan.size)
        self.copier = Copier(self.src_fd, self.dst_fd, workers=self.options.workers,
                             rate_limit=self.options.rate_limit, src_path=plan.source,
                             dst_path=plan.destination if plan.incremental else plan.partial)
        # A new copy that will get a manifest learns its digests while it is
        # copied (hash while copying): one read of the data, not two.
        fresh = (DigestTable(self._granularity, plan.size)
                 if not plan.incremental and not self.options.move else None)
        self.passes = PassRunner(self.copier, self.tracker, self.src_fd, self.dst_fd,
                                 self.result, self.report,
                                 self.manifest if plan.incremental else None, fresh)
        self.passes.watch_hot = self.options.defer_hot

    def _open_tracker(self) -> None:
        self._lock_source()
        self.tracker = tracker = Tracker.open(self.plan.source)
        self.start_mtime_ns = os.fstat(self.src_fd).st_mtime_ns
        self.result.tracked = True
        watch = globals().get("BypassWatch") or __getattr__("BypassWatch")
        self.bypass = watch.start(self.plan.source, tracker.path)
        if self.bypass is None:
            self.result.notes.append("writes that bypass the tracker are not watched "
                                     "(fanotify needs root); see the README")
        if not tracker.consistent:
            # I4: an unclean bitmap is never trusted. This run copies
            # everything allocated anyway; reset so later runs can trust it.
            tracker.reset()
            self.result.notes.append("sidecar was unclean (a writer died); tracking was reset")
        if tracker.state == "redirected" and not self._finishing_a_move():
            raise InvalidInputError(
                f"source {self.plan.source} was already moved to {tracker.redirect_target()}"
            )

    def _finishing_a_move(self) -> bool:
        """Whether this run may find the source already redirected: it resumes
        a move a killed run left after its switch (journal.py)."""
        return self.plan.resume == "move"

    def _lock_source(self) -> None:
        """One copier per source at a time: the dirty bitmap is taken by
        fetch-and-clear, so a second sync would steal the first one's bits.
        An flock on the sidecar, released by the kernel if this process dies."""
        self.lock_fd = os.open(sidecar_path(self.plan.source),
                               os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        try:
            fcntl.flock(self.lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InvalidInputError(f"another sync of {self.plan.source} is running") from None

    def _run_untracked(self) -> None:
        """No sidecar: nobody is known to write. Copy once, then make sure the
        source really did not change meanwhile; never hand back a torn copy."""
        before = os.fstat(self.src_fd)
        self._first_pass()
        after = os.fstat(self.src_fd)
        if (before.st_size, before.st_mtime_ns, before.st_ctime_ns) != (
            after.st_size, after.st_mtime_ns, after.st_ctime_ns
        ):
            raise SourceChangedError(
                f"source {self.plan.source} changed while it was copied and is not tracked; "
                f"enable tracking (blockmirror track enable {self.plan.source}) and write "
                "through blockmirror, or stop the writers"
            )
        self._commit()
        self._finish()

    def _run_tracked(self) -> None:
        assert self.tracker is not None
        # I2: clear before read. Everything is copied by the first pass, so
        # bits from before it are stale; writes from now on are marked again.
        self.tracker.fetch_and_clear_array()
        self.rate_sample = (self.tracker.info().bytes_written, time.perf_counter())
        self._first_pass()
        if self.options.converge == "mirror":
            self._start_mirror()
        elif self.options.converge == "throttle":
            self.result.strategy = "throttle"  # the stall rule tightens it when needed
        failed_switches = 0
        while True:
            decision = self.policy.decide(self.result.passes, stall_from=self.stall_from)
            if decision is Decision.SWITCHOVER:
                outcome = self._switchover()
                if outcome is _Switch.DONE:
                    return
                if outcome is _Switch.LEASE_RAN_OUT:
                    failed_switches += 1
                if failed_switches >= MAX_SWITCHOVER_ATTEMPTS:
                    raise NotConvergedError(
                        f"switchover failed {failed_switches} times: the final pass outlasted "
                        "the freeze lease each time; the source keeps running"
                    )
            elif decision is Decision.STALLED and self.result.strategy == "throttle":
                self._tighten_throttle()
            elif decision in (Decision.STALLED, Decision.OUT_OF_PASSES):
                raise NotConvergedError(self._not_converged_message(decision))
            self._dirty_pass()
            if self.escalation is not None:
                self._auto_step()

    def _dirty_pass(self) -> None:
        assert self.passes is not None and self.tracker is not None
        budget = self.policy.defer_budget(self.result.passes) if self.options.defer_hot else 0
        if self.mirror is not None:
            self._pace_mirrored_pass()
        self.rate_sample = (self.tracker.info().bytes_written, time.perf_counter())
        self.passes.dirty(budget)
        if self.mirror is not None:
            self.mirror.check()
        self._check_no_bypass()

    def _writer_rate(self) -> float:
        """Bytes/s writers wrote since the last pass began (mirrored or not)."""
        assert self.tracker is not None
        written, at = self.rate_sample
        elapsed = time.perf_counter() - at
        delta = (self.tracker.info().bytes_written - written) % (1 << 64)
        return delta / elapsed if elapsed > 0 else 0.0

    def _first_pass(self) -> None:
        assert self.passes is not None
        if not self.plan.incremental:
            self.passes.bulk()
            return
        assert self.manifest is not None
        from blockmirror.migration import incremental

        extents = incremental.first_pass_extents(
            self.tracker, self.manifest, self.src_fd, self.dst_fd,
            workers=self.options.workers, notes=self.result.notes)
        self.passes.incremental(extents)

    # -- switchover ---------------------------------------------------------

    def _switchover(self) -> _Switch:
        """Freeze, final pass, commit; see _Switch for the other outcomes."""
        assert self.tracker is not None and self.passes is not None
        tracker = self.tracker
        if self.options.move:
            # Move mode fsyncs inside the freeze (the copy must be durable
            # before writers go there): flush what the passes wrote first,
            # while writers still run, so that fsync has little left to do.
            # Copy mode fsyncs after the thaw, so it skips this.
            self._flush_before_freeze()
            # Writers went on during the flush: decide again on what is dirty
            # now, or the pause would outlast the target.
            throughput = self.policy.copy_throughput(self.result.passes)
            if not self.policy.fits(tracker.dirty_bytes(), throughput):
                return _Switch.NOT_READY
        frozen_at = time.perf_counter()
        self._freeze()
        self._copy_threads(every=True)  # writers are frozen: nothing shares the disk now
        extents = self.passes.final()
        if not tracker.freeze_holds():
            # Writers may have resumed mid-pass: this is no point-in-time copy.
            # Everything this pass copied is still valid pre-copy; re-mark it
            # so nothing is lost, and go on with dirty passes.
            for offset, length in pairs(extents):
                tracker.mark(offset, length)
            self._thaw()
            self._copy_threads(every=False)
            self.result.notes.append("freeze lease ran out during the final pass; retried")
            return _Switch.LEASE_RAN_OUT
        # Frozen: first whether the tracker saw every write (a writer that
        # died mid-mirror leaves the sidecar unclean), then no write reaches
        # the copy but through the passes.
        self._check_still_tracked()
        self._stop_mirror()
        if self.options.move:
            self._commit()  # durable before any writer is sent there
            self._redirect()
        else:
            # The copy is exact at this instant: name it for backup tools.
            self.result.change_id = tracker.change_id()
            self._thaw()
            self.state = JobState.THAWED
        self.result.downtime = time.perf_counter() - frozen_at
        if not self.options.move:
            self._commit()  # the fsync runs after the thaw, outside the pause
        self._lift_throttle()
        self._finish()
        return _Switch.DONE

    def _flush_before_freeze(self) -> None:
        """Move mode: what the passes wrote, made durable while writers run."""
        os.fdatasync(self.dst_fd)

    def _freeze(self) -> None:
        assert self.tracker is not None
        lease = min(60.0, max(2.0, 4 * self.policy.target_downtime))
        try:
            self.tracker.freeze(lease)
        except OSError as e:  # ETIMEDOUT (writes did not drain), EBUSY (another copier)
            raise FreezeError(e.errno, f"could not pause writers: {e.strerror}") from None
        self.state = JobState.FROZEN

    def _check_still_tracked(self) -> None:
        """Inside the freeze, before anything is committed: the tracker must
        still account for every write since the sync began (I4). A tracked
        writer that died leaves its slot behind (found by the sweep); a
        program that grew the image without the tracker leaves it larger than
        the tracked size. Either way the copy may miss writes: it is dropped."""
        assert self.tracker is not None
        self._check_no_bypass()
        self.tracker.live_writers()  # the sweep: dead writer slots mark the sidecar unclean
        if not self.tracker.consistent:
            raise SourceChangedError(
                f"source {self.plan.source} was written behind the tracker during the sync (a "
                "writer died, or a program wrote it without blockmirror); the copy was "
                "discarded and the source is untouched; sync again to copy it afresh"
            )
        # Any user: a write that bypassed the tracker after the last tracked
        # one moved the image's mtime past it (writers are drained now).
        mtime = os.fstat(self.src_fd).st_mtime_ns
        if mtime > max(self.start_mtime_ns, self.tracker.info().last_write_ns):
            raise SourceChangedError(
                f"source {self.plan.source} was written without the tracker during the sync "
                "(its modification time moved past the last tracked write); every writer must "
                "write through blockmirror; the copy was discarded and the source is untouched"
            )

    def _check_no_bypass(self) -> None:
        """Fail (not converged, source untouched) once a process was seen
        writing the image without the tracker: the copy would miss it."""
        found = self.bypass.bypassing_writers() if self.bypass is not None else []
        if found:
            who = ", ".join(f"pid {w.pid} ({w.command})" for w in found[:3])
            raise SourceChangedError(
                f"source {self.plan.source} was written without the tracker by {who}; every "
                "writer must write through blockmirror (TrackedImage or blockmirror serve); "
                "the copy was discarded and the source is untouched"
            )

    def _thaw(self) -> None:
        assert self.tracker is not None
        self.tracker.thaw()
        self.state = JobState.COPYING

    def _redirect(self) -> None:
        """Move mode, frozen and committed: writers continue on the copy,
        which needs a sidecar of its own before they are sent there."""
        assert self.tracker is not None
        Tracker.create(self.plan.destination, self.tracker.granularity).close()
        self.tracker.redirect(self.plan.destination)
        self.state = JobState.REDIRECTED

    # -- the commit -----------------------------------------------------------

    def _commit(self) -> None:
        """Make the copy durable under its final name (see commit.py); a copy
        taken in copy mode also gets its manifest, for incremental syncs."""
        if self.plan.incremental:
            os.fsync(self.dst_fd)
        else:
            commit.publish_shadow(self.plan, self.dst_fd, self.options.mode)
        self.state = JobState.COMMITTED
        if not self.options.move:
            self._write_manifest()
            journal.clear(self.plan.destination)  # the copy is whole

    @property
    def _granularity(self) -> int:
        """The granule the copy's manifest uses: the source tracker's."""
        return self.tracker.granularity if self.tracker else DEFAULT_GRANULARITY

    def _write_manifest(self) -> None:
        """Record the copy's digests and the change id it is exact at, for
        the next incremental sync. The passes digested what they copied
        whole; only granules none of them saw whole are read back here."""
        assert self.passes is not None
        if self.manifest is None:
            # A new copy started as one hole: what no pass wrote is zeros.
            self.manifest = Manifest.create(
                manifest_path(self.plan.destination), granularity=self._granularity,
                image_size=os.fstat(self.dst_fd).st_size, source=self.plan.source,
                table=self.passes.fresh_digests)
        if self.mirror_changed:
            # Mirrored writes changed these granules after the passes hashed
            # them from their buffers: read them back instead.
            self.manifest.table.forget(dg.granule_runs(
                self.mirror_changed, self.manifest.granularity, self.manifest.table.granules))
        regions = union(self.passes.touched(), self.mirror_changed)
        self.manifest.record(self.dst_fd, self.manifest.unknown_extents(),
                             workers=self.options.workers)
        change_id = ChangeId.parse(self.result.change_id) if self.result.change_id else None
        self.manifest.commit(change_id.series if change_id else "",
                             change_id.generation if change_id else 0, recorded=regions,
                             copy_fd=self.dst_fd)

    def _finish(self) -> None:
        """After the switch: verify if asked, then (move) remove the source."""
        if self.options.verify:
            self._verify()
        if self.options.move:
            self._wait_for_writers_to_follow()
            commit.remove_source(self.plan)
            journal.clear(self.plan.destination)  # the move is whole
        self.state = JobState.DONE

    def _wait_for_writers_to_follow(self, timeout: float = 2.0) -> None:
        """Give redirected writers a moment to reopen the copy before the
        source goes: the NBD front end follows within milliseconds on its
        own. A writer that only learns of the move at its next write keeps
        the old file open meanwhile; it cannot write there (ESTALE), so the
        source is removed anyway after TIMEOUT, and the result says so."""
        if self.tracker is None:
            return
        deadline = time.monotonic() + timeout
        while (left := self.tracker.live_writers()) and time.monotonic() < deadline:
            time.sleep(0.01)
        if left:
            self.result.notes.append(
                f"{left} writers had not reopened the image at its new place when the source "
                "was removed; their next write goes there")

    def _resume_move(self) -> bool:
        """A move a killed run left after its rename (journal.py). If writers
        were already sent to the copy, only the source's removal was missing:
        finish that (True). Otherwise writers stayed on the source and the
        copy is stale: remove it, so the move starts over (False)."""
        plan = self.plan
        tracker = self.tracker
        if (tracker is not None and tracker.state == "redirected"
                and tracker.redirect_target() == plan.destination):
            commit.remove_source(plan)
            journal.clear(plan.destination)
            self.state = JobState.DONE
            self.result.notes.append("finished a move a killed run left after its switch: "
                                     "the source was removed")
            return True
        if os.path.exists(sidecar_path(plan.destination)):
            with Tracker.open(plan.destination) as stale:
                if stale.live_writers():
                    raise InvalidInputError(
                        f"{plan.destination} has live writers; it is not a stale copy")
        commit.unpublish(plan)
        self.result.notes.append("removed the stale copy of a move a killed run left before "
                                 "its switch; moving afresh")
        return False

    def _verify(self) -> None:
        """Compare the copy with the source, excusing blocks written since the
        switch (the tracker says which); anything else that differs is a bug."""
        self.report("verify", len(self.result.passes), 0, self.result.image_size)
        differing = compare_files(self.plan.source, self.plan.destination)
        copy_size = os.path.getsize(self.plan.destination)
        if copy_size == self.result.image_size:
            # The copy has the size the source had at the freeze; a source
            # resized since differs past the shorter of the two, legitimately.
            shorter = min(copy_size, os.path.getsize(self.plan.source))
            differing = [(o, min(n, shorter - o)) for o, n in differing if o < shorter]
        if differing and self.tracker is not None:
            # Blocks changed after the switch are expected to differ. Read the
            # dirty set only now: any write that changed a block we compared
            # was marked before it landed (I1).
            if self.options.move:
                with Tracker.open(self.plan.destination) as dst_tracker:
                    changed = dst_tracker.dirty_extents()
            else:
                changed = self.tracker.dirty_extents()
            differing = subtract(differing, changed)
        if differing:
            if self.manifest is not None:
                # Never leave a clean manifest on a copy that failed verify:
                # the next incremental run re-copies it whole, in place.
                self.manifest.mark_untrusted()
            off, length = differing[0]
            raise VerifyError(f"verify failed: {len(differing)} extents differ, "
                              f"first at {off}+{length}", self.plan.destination)
        self.result.verified = True

    # -- convergence help ---------------------------------------------------

    def _start_mirror(self) -> None:
        """converge="mirror", after the first pass: every clean range is on
        the copy now, so writes to clean ranges may go to both sides."""
        assert self.tracker is not None and self.passes is not None
        if self.plan.incremental:
            # Mirrored writes would change the earlier copy under its
            # manifest's digests, which only the passes forget first.
            self.result.notes.append("mirroring is not used when updating an earlier copy in "
                                     "place; copying dirty blocks in passes instead")
            return
        try:
            from blockmirror.migration.mirroring import MirrorSession

            self.mirror = MirrorSession(self.tracker, self.plan.partial)
        except OSError as e:
            # E.g. root syncing a user's image: writers only mirror into a
            # file of the image's owner. Dirty passes still work.
            self.result.notes.append(f"mirroring not engaged ({e.strerror}); copying dirty "
                                     "blocks in passes instead")
            return
        self.passes.mirror = self.mirror
        # Mirrored writes and the dirty passes now share the destination:
        # the passes copy on one thread, paced to what writers leave of it
        # (bench/README.md, issue 10: against 4 copy threads at full speed
        # writers kept 0.26-0.30 of a slow disk's bandwidth, 0.42-0.49
        # against one). The final pass, writers frozen, uses them all.
        self.unshared_throughput = self.policy.copy_throughput(self.result.passes)
        if self.mirror_copier is None:
            # Small items: a mirrored write that meets the copier's claim on
            # its range is marked dirty instead, so claims are kept short.
            self.mirror_copier = Copier(
                self.src_fd, self.dst_fd, workers=1, rate_limit=self.options.rate_limit,
                batch_bytes=MIRRORED_ITEM_BYTES, src_path=self.plan.source,
                dst_path=self.plan.partial)
        self._copy_threads(every=False)
        self.result.strategy = "mirror"
        self.result.notes.append("mirroring writes to the copy")

    def _copy_threads(self, *, every: bool) -> None:
        """Passes copy with every thread, or (EVERY false, while writers
        mirror) with the one-thread, paced copier."""
        assert self.passes is not None and self.copier is not None
        one = self.mirror_copier if not every and self.mirror is not None else None
        self.passes.copier = one if one is not None else self.copier
        self.passes.paced = one is not None

    def _pace_mirrored_pass(self) -> None:
        """Before a dirty pass while writers mirror: pace the copy to what
        they left of the destination in the last pass (within --bwlimit)."""
        assert self.mirror_copier is not None
        rate = self.policy.mirror_copy_rate(self.unshared_throughput, self._writer_rate())
        self.mirror_copier.pace(rate)  # --bwlimit still caps it inside each item

    def _stop_mirror(self, *, check: bool = True) -> None:
        """No write reaches the copy after this but through the passes (the
        switchover calls it frozen; auto mode may call it to throttle)."""
        if self.mirror is None:
            return
        assert self.passes is not None and self.copier is not None
        self.passes.mirror = None
        self._copy_threads(every=True)
        if check:
            self.mirror.check()
        status = self.mirror.stop()
        self.mirror_changed = union(self.mirror_changed, self.mirror.changed())
        self.mirror = None
        self.result.notes.append(
            f"mirrored {format_bytes(status.mirrored_bytes)} of writes to the copy; "
            f"{status.fallbacks} writes met a copier and were copied in passes")

    def _auto_step(self) -> None:
        """converge="auto", after a dirty pass: escalate if the trend says so."""
        from blockmirror.migration.escalation import Step

        assert self.escalation is not None
        step = self.escalation.next_step(self.result.passes, self._writer_rate())
        if step is Step.STAY:
            return
        self.result.notes.append(self.escalation.reason)
        if step is Step.MIRROR:
            self._start_mirror()
            if self.mirror is None:  # refused (see _start_mirror)
                self.escalation.mirror_refused = True
                if self.escalation.polishing:
                    # The target fits already: switch as passes alone allow.
                    self.escalation.strategy = "passes"
                    return
                self.escalation.strategy = "throttle"  # go straight on
                step = Step.THROTTLE
        if step is Step.THROTTLE:
            self._stop_mirror(check=False)
            self._tighten_throttle()
        self.result.strategy = self.escalation.strategy
        self.result.strategy_reason = self.escalation.reason
        self.stall_from = len(self.result.passes) - 1  # judge the new strategy afresh

    def _tighten_throttle(self) -> None:
        """converge="throttle": hold writers to half the copy throughput (and
        half again at each further stall), like QEMU's auto-converge."""
        assert self.tracker is not None
        throughput = self.policy.copy_throughput(self.result.passes)
        rate = max(1 << 20, int((self.throttle_rate or throughput) / 2))
        self.tracker.set_throttle(rate)
        self.throttle_rate = rate
        self.result.strategy = "throttle"
        self.result.notes.append(f"writers throttled to {format_rate(rate)}")
        self.stall_from = len(self.result.passes) - 1  # judge the new rate afresh

    def _lift_throttle(self) -> None:
        if self.throttle_rate and self.tracker is not None:
            self.tracker.set_throttle(0)
        self.throttle_rate = 0

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
            + ("; --converge auto would mirror or throttle the writers instead"
               if self.options.converge == "fail" else "")
        )

    def _out_of_space_message(self) -> str:
        folder = os.path.dirname(self.plan.destination)
        if self.plan.incremental:
            return (f"destination ran out of space at {folder}; the earlier copy was left "
                    "marked for repair (the next sync repairs it by hash) and the source is "
                    "untouched")
        return (f"destination ran out of space at {folder}; the partial copy was removed "
                "and the source is untouched")

    # -- the one exit -------------------------------------------------------

    def _abort(self) -> None:
        """Undo what was done up to the state the job failed in. Each step
        runs even if another fails; writers first (I6)."""
        state = self.failed_from = self.state
        if self.mirror is not None:
            # Before the copy goes: no writer may still be writing into it.
            with contextlib.suppress(Exception):
                self.mirror.stop()
        if self.tracker is not None:
            with contextlib.suppress(Exception):
                self._lift_throttle()
            if state is JobState.FROZEN or (state is JobState.COMMITTED and self.options.move):
                with contextlib.suppress(Exception):
                    self.tracker.thaw()
        if state in (JobState.PLANNED, JobState.REDIRECTED, JobState.DONE):
            return  # nothing of ours yet, or writers already write the copy
        if self.plan.incremental:
            # The earlier copy was being updated in place: it stays, with its
            # manifest saying "updating"; the next sync repairs it by hash.
            if self.manifest is not None:
                self.manifest.close()
            return
        if state is JobState.COMMITTED:
            commit.unpublish(self.plan)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.plan.partial)  # ours: we hold its lock
        if self.manifest is not None:
            self.manifest.discard()  # a new manifest, never published

    def _release(self) -> None:
        if self.manifest is not None:
            self.manifest.close()
        if self.bypass is not None:
            self.bypass.close()
        for copier in (self.copier, self.mirror_copier):
            if copier is not None:
                copier.close()
        if self.tracker is not None:
            self.tracker.close()
        for fd in (self.src_fd, self.dst_fd, self.lock_fd):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.src_fd = self.dst_fd = self.lock_fd = -1
