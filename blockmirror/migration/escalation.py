"""converge="auto": start with dirty passes alone and escalate when their
trend says they will not converge - to mirroring when the destination can
take the writers' writes, to the throttle when it cannot.

Pure decisions over measurements, like policy.py: the job feeds each pass's
record and the writers' achieved rate (the sidecar counts every byte they
write, mirrored or not) and carries out the step this returns.

- From passes to mirror: the policy's trend (``will_converge``) says no -
  the dirty set stopped shrinking, or shrinks too slowly to fit the target
  within the passes left. Not after a fixed number of passes.
- From passes to mirror, too, as soon as they fit the target with a pause
  still above MIRROR_POLISH_PAUSE: one mirrored pass leaves nothing new
  behind the copy and the pause falls to a few milliseconds, as a mirror
  that waits for zero dirty gets, where polishing passes re-copy what
  writers dirtied meanwhile, pass after pass, and may not get under it at
  all (bench/README.md, issue 10: at half the disk's bandwidth the
  polishing passes re-copied twice what one mirrored pass did and switched
  0.8 s later).
- From mirror to throttle: mirrored writes wait for the destination, so a
  destination that cannot take them (NFS latency, a disk far slower than
  the copy measured) shows as the writers' rate falling. The throttle would
  hold writers to half the copy's throughput (or their own rate, if lower);
  once mirroring leaves them under MIRROR_KEEPS of that, the throttle is
  the better deal for the guest and takes over. A destination that is just
  slower than the writers is not that case: mirroring holds them to what
  it takes, which is about what the throttle would leave too, and the copy
  still finishes. Likewise to the throttle if the mirror did not turn the
  trend.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from blockmirror.migration.policy import ConvergencePolicy, PassRecord, predict_downtime
from blockmirror.units import format_rate

# The share of what the throttle would leave them that writers must keep
# while mirroring.
MIRROR_KEEPS = 0.5
# A pass shorter than this says nothing of the writers' rate: a mirrored
# pass of a few granules lasts milliseconds, in which no write may complete
# ("held writers to 0 B/s" sent a 16 MiB/s hot spot to the throttle).
MIN_RATE_WINDOW = 0.2
# A pause passes alone cannot shrink below this is shortened by mirroring
# (issue 10: QEMU's mirror pauses 2-5 ms at low write rates).
MIRROR_POLISH_PAUSE = 0.02


class Step(Enum):
    STAY = "stay"
    MIRROR = "mirror"
    THROTTLE = "throttle"


@dataclass
class Escalation:
    """Where one auto sync stands: "passes", "mirror" or "throttle"."""

    policy: ConvergencePolicy
    strategy: str = "passes"
    reason: str = ""
    rate_before_mirror: float = 0.0
    since_pass: int = 0  # trends are judged from here (the last escalation)
    polishing: bool = False  # the last escalation to mirror was to shorten the pause
    mirror_refused: bool = False  # this sync cannot mirror (an export, an earlier copy)

    def next_step(self, passes: list[PassRecord], writer_rate: float) -> Step:
        """After a dirty pass; WRITER_RATE is what writers achieved during it
        (bytes/s). Updates the strategy and reason it returns a step for."""
        throughput = self.policy.copy_throughput(passes)
        if self.strategy == "passes":
            if not self.mirror_refused and self._pause_to_shorten(passes):
                pause = predict_downtime(passes[-1].dirty_left, throughput)
                self.rate_before_mirror = writer_rate
                self.polishing = True
                self.reason = (f"passes alone would pause writers {pause * 1000:.0f} ms; "
                               "mirroring their writes to shorten the pause")
                return self._go("mirror", passes, Step.MIRROR)
            if self.policy.will_converge(passes, self.since_pass):
                return Step.STAY
            self.rate_before_mirror = writer_rate
            self.polishing = False
            self.reason = (f"writers at {format_rate(writer_rate)} outpaced the copy at "
                           f"{format_rate(throughput)}; mirroring their writes")
            return self._go("mirror", passes, Step.MIRROR)
        if self.strategy == "mirror":
            throttled = min(self.rate_before_mirror, throughput / 2)
            if writer_rate < MIRROR_KEEPS * throttled and \
                    passes[-1].seconds >= MIN_RATE_WINDOW:
                self.reason = (f"mirroring held writers to {format_rate(writer_rate)} of "
                               f"{format_rate(self.rate_before_mirror)}, under half the "
                               f"{format_rate(throttled)} the throttle leaves: the destination "
                               "cannot take their writes; throttling them instead")
                return self._go("throttle", passes, Step.THROTTLE)
            mirrored_passes = len(passes) - 1 - self.since_pass
            if mirrored_passes >= 2 and not self.policy.will_converge(passes, self.since_pass + 1):
                self.reason = ("mirroring did not shrink the dirty set; throttling writers "
                               "instead")
                return self._go("throttle", passes, Step.THROTTLE)
        return Step.STAY

    def _pause_to_shorten(self, passes: list[PassRecord]) -> bool:
        """The target fits, with a pause still over MIRROR_POLISH_PAUSE."""
        throughput = self.policy.copy_throughput(passes)
        last = passes[-1]
        if not self.policy.fits(last.dirty_left, throughput):
            return False
        return predict_downtime(last.dirty_left, throughput) > MIRROR_POLISH_PAUSE

    def _go(self, strategy: str, passes: list[PassRecord], step: Step) -> Step:
        self.strategy = strategy
        self.since_pass = len(passes) - 1
        return step
