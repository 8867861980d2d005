"""When to switch over, and when to give up.

Pure decisions over the passes measured so far: no I/O here, so the rules
can be tested and modelled on their own.

The switchover predicate is time-based, as in Storage vMotion: switch when
the dirty bytes left, copied at the throughput the last pass measured, would
take less than the target downtime (less a margin for the freeze itself and
throughput that wobbles). The stall rule declares non-convergence
when the dirty set has stopped shrinking for a few passes in a row: then the
writers dirty blocks about as fast as the copy cleans them, and more passes
would only copy the same blocks again. "Stopped shrinking" allows for noise:
a pass that leaves at least STALL_RATIO of what the previous one left counts
(a dirty set hovering around a hot working set wobbles by a few percent).

Fitting the target is when a switch becomes allowed, not when it must
happen: while each pass still cuts the dirty set at least in half, one more
pass is cheap (it takes about the pause it saves) and shortens the pause, so
the job keeps going until the predicted pause stops improving that fast or
falls under MIN_PAUSE. Low write rates so get pauses of a few milliseconds,
as a mirror that waits for zero dirty does, while high rates still switch
as soon as they fit the target.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum


@dataclass(frozen=True)
class PassRecord:
    """One measured pass over the image."""

    index: int
    kind: str  # "bulk", "dirty" or "final"
    bytes: int  # bytes of source range processed (data, zeros and holes)
    seconds: float
    dirty_left: int  # dirty bytes waiting when the pass ended
    bytes_written: int = 0
    deferred: int = 0  # hot bytes left dirty for the final pass (counted in dirty_left)
    paced: bool = False  # copied at a pace below the destination's (converge="mirror")

    @property
    def throughput(self) -> float:
        """Bytes per second while this pass copied (0 for an empty pass)."""
        return self.bytes / self.seconds if self.seconds > 0 and self.bytes else 0.0

    @property
    def write_rate(self) -> float:
        """Estimated rate at which writers dirtied blocks during this pass."""
        return self.dirty_left / self.seconds if self.seconds > 0 else 0.0

    def predicted_downtime(self, throughput: float) -> float:
        return predict_downtime(self.dirty_left, throughput)

    def to_dict(self, throughput: float | None = None) -> dict[str, float | int | str]:
        tp = self.throughput if throughput is None else throughput
        return {
            "index": self.index,
            "kind": self.kind,
            "bytes": self.bytes,
            "bytes_written": self.bytes_written,
            "seconds": round(self.seconds, 6),
            "throughput": round(self.throughput, 1),
            "dirty_left": self.dirty_left,
            "deferred": self.deferred,
            "paced": self.paced,
            "write_rate": round(self.write_rate, 1),
            "predicted_downtime": round(predict_downtime(self.dirty_left, tp), 6)
            if math.isfinite(predict_downtime(self.dirty_left, tp))
            else -1,
        }


def predict_downtime(dirty_bytes: int, throughput: float) -> float:
    """Seconds the final pass would take: dirty bytes ÷ measured throughput."""
    if dirty_bytes <= 0:
        return 0.0
    if throughput <= 0:
        return math.inf
    return dirty_bytes / throughput


class Decision(Enum):
    SWITCHOVER = "switchover"
    CONTINUE = "continue"
    STALLED = "stalled"
    OUT_OF_PASSES = "out_of_passes"


@dataclass(frozen=True)
class ConvergencePolicy:
    """The rules one sync follows."""

    target_downtime: float = 5.0
    max_passes: int = 30
    stall_passes: int = 3
    stall_ratio: float = 0.9
    # Switch only when the prediction fits in this share of the target: the
    # final pass also pays the freeze, the scan and throughput that wobbles
    # (bench/: without a margin, 6 of 15 runs paused writers up to 17 % long).
    switchover_margin: float = 0.85
    # Polishing (see the module docstring): a predicted pause this short is
    # not worth another pass; a pass must leave at most POLISH_RATIO of what
    # the one before left for another one to be worth it; at most
    # POLISH_PASSES passes are spent once the target fits.
    min_pause: float = 0.005
    polish_ratio: float = 0.65
    polish_passes: int = 6
    # Hot-block deferral: blocks dirty in two passes in a row wait for the
    # final pass, up to this share of what the target pause can copy.
    defer_share: float = 0.5
    # While writers mirror, a dirty pass is paced to what they leave of the
    # destination but takes at least this share of it (issue 10: a copy
    # at full speed left writers 0.26-0.49 of a slow disk's bandwidth).
    mirror_copy_share: float = 0.4

    def __post_init__(self) -> None:
        if not (self.target_downtime > 0 and math.isfinite(self.target_downtime)):
            raise ValueError(f"target downtime must be > 0 s, got {self.target_downtime}")
        if self.max_passes < 1:
            raise ValueError(f"max passes must be >= 1, got {self.max_passes}")
        if self.stall_passes < 1:
            raise ValueError(f"stall passes must be >= 1, got {self.stall_passes}")

    @staticmethod
    def copy_throughput(passes: list[PassRecord]) -> float:
        """Throughput to predict the final pass with: the latest pass that
        moved enough bytes for its timing to mean something, else the bulk.
        A paced pass measured its pace, not the destination: the final pass,
        with writers frozen, runs unpaced."""
        for rec in reversed(passes):
            if rec.bytes >= 4 * 1024 * 1024 and rec.throughput > 0 and not rec.paced:
                return rec.throughput
        return max((r.throughput for r in passes), default=0.0)

    def mirror_copy_rate(self, unshared: float, writer_rate: float) -> float:
        """The pace of a dirty pass while writers mirror (bytes/s; 0: none).
        Mirrored writes and the pass share the destination, whose throughput
        with the copy alone on it was UNSHARED: the pass takes what writers,
        at WRITER_RATE in the last pass, leave of it, but never less than
        MIRROR_COPY_SHARE of it, so the dirty set still drains."""
        if unshared <= 0 or not math.isfinite(unshared):
            return 0.0
        return max(self.mirror_copy_share * unshared, unshared - max(0.0, writer_rate))

    def stalled_for(self, passes: list[PassRecord], stall_from: int = 0) -> int:
        """Passes in a row, up to now, after which the dirty set did not
        shrink; passes before index STALL_FROM are not looked at."""
        run = 0
        recent = passes[stall_from:]
        for prev, cur in zip(recent[::-1][1:], recent[::-1], strict=False):
            if cur.dirty_left > 0 and cur.dirty_left >= self.stall_ratio * prev.dirty_left:
                run += 1
            else:
                break
        return run

    def fits(self, dirty_bytes: int, throughput: float) -> bool:
        """Would copying DIRTY_BYTES at THROUGHPUT fit in the target pause?"""
        predicted = predict_downtime(dirty_bytes, throughput)
        return predicted < self.target_downtime * self.switchover_margin

    def worth_polishing(self, passes: list[PassRecord], since: int = 0) -> bool:
        """The target fits after PASSES: would one more pass shorten the
        pause enough to be worth its time? Passes before index SINCE (a
        change of strategy) do not count against the polishing budget."""
        last = passes[-1]
        if self.polish_passes == 0 or len(passes) >= self.max_passes:
            return False
        throughput = self.copy_throughput(passes)
        # After a mirrored pass nothing short of zero dirty is short enough:
        # a final pass of even one granule writes into a destination the
        # writers kept busy, and waited there 36-110 ms in the kernel's dirty
        # throttle (bench/README.md, issue 10), where one more mirrored pass
        # costs the writers no pause and leaves nothing behind it.
        floor = 0.0 if last.paced else self.min_pause
        if predict_downtime(last.dirty_left, throughput) <= floor:
            return False
        if len(passes) - 1 <= since:
            # The bulk pass (or the last under an old strategy) says nothing
            # yet of how fast writers dirty what is left.
            return True
        fitting = sum(1 for p in passes[since:-1] if self.fits(p.dirty_left, throughput))
        if fitting >= self.polish_passes:
            return False
        return last.dirty_left <= self.polish_ratio * passes[-2].dirty_left

    def defer_budget(self, passes: list[PassRecord]) -> int:
        """Bytes of hot blocks the next dirty pass may leave for the final
        one (each would otherwise be copied again every pass): none once the
        target fits, so polishing can shrink the pause instead."""
        if not passes:
            return 0
        throughput = self.copy_throughput(passes)
        if self.fits(passes[-1].dirty_left, throughput):
            return 0
        budget = self.defer_share * self.target_downtime * self.switchover_margin * throughput
        return int(budget) if math.isfinite(budget) else 0

    def will_converge(self, passes: list[PassRecord], stall_from: int = 0) -> bool:
        """The trend of the dirty set since index STALL_FROM: shrinking by the
        last pass's factor, would it fit the target within the passes left?
        True while there is no trend yet (fewer than two passes)."""
        recent = passes[stall_from:]
        if len(recent) < 2:
            return True
        prev, last = recent[-2], recent[-1]
        throughput = self.copy_throughput(passes)
        if self.fits(last.dirty_left, throughput) or prev.dirty_left == 0:
            return True
        shrink = last.dirty_left / prev.dirty_left
        if shrink >= self.stall_ratio:
            return False
        fit_bytes = self.target_downtime * self.switchover_margin * throughput
        if fit_bytes <= 0:
            return False
        needed = math.log(fit_bytes / last.dirty_left) / math.log(shrink)
        return needed <= self.max_passes - len(passes)

    def decide(self, passes: list[PassRecord], stall_from: int = 0) -> Decision:
        """What to do after the passes so far (the bulk pass first)."""
        if not passes:
            return Decision.CONTINUE
        last = passes[-1]
        if self.fits(last.dirty_left, self.copy_throughput(passes)):
            if self.worth_polishing(passes, stall_from):
                return Decision.CONTINUE
            return Decision.SWITCHOVER
        if self.stalled_for(passes, stall_from) >= self.stall_passes:
            return Decision.STALLED
        if len(passes) >= self.max_passes:
            return Decision.OUT_OF_PASSES
        return Decision.CONTINUE
