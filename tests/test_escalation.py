"""converge="auto"'s decisions (migration/escalation.py) on hand-made pass
histories, and the trend rule they rest on (policy.will_converge)."""

from __future__ import annotations

from blockmirror.migration.escalation import Escalation, Step
from blockmirror.migration.policy import ConvergencePolicy, Decision, PassRecord

MiB = 1 << 20


def rec(i: int, nbytes: int, seconds: float, dirty_left: int) -> PassRecord:
    return PassRecord(index=i, kind="bulk" if i == 0 else "dirty", bytes=nbytes,
                      seconds=seconds, dirty_left=dirty_left)


POLICY = ConvergencePolicy(target_downtime=0.5, max_passes=30)
BULK = rec(0, 640 * MiB, 10.0, 200 * MiB)  # 64 MiB/s


def test_no_trend_after_the_bulk_pass_alone():
    assert POLICY.will_converge([BULK])


def test_a_growing_dirty_set_will_not_converge():
    assert not POLICY.will_converge([BULK, rec(1, 200 * MiB, 3.1, 210 * MiB)])


def test_a_shrinking_set_converges_if_the_passes_left_suffice():
    # Halving from 100 MiB to the ~27 MiB that fits 0.425 s at 64 MiB/s: 2 passes.
    assert POLICY.will_converge([BULK, rec(1, 200 * MiB, 3.1, 100 * MiB)])
    slow = ConvergencePolicy(target_downtime=0.5, max_passes=3)
    # Shrinking by 0.85 from 170 MiB needs ~11 more passes: not within 3.
    assert not slow.will_converge([BULK, rec(1, 200 * MiB, 3.1, 170 * MiB)])


def test_escalates_to_mirror_on_the_first_pass_the_trend_turns():
    esc = Escalation(POLICY)
    assert esc.next_step([BULK, rec(1, 200 * MiB, 3.1, 100 * MiB)], 40 * MiB) is Step.STAY
    passes = [BULK, rec(1, 200 * MiB, 3.1, 100 * MiB), rec(2, 100 * MiB, 1.6, 98 * MiB)]
    assert esc.next_step(passes, 60 * MiB) is Step.MIRROR
    assert esc.strategy == "mirror" and "outpaced the copy" in esc.reason


def test_mirror_that_starves_writers_gives_way_to_the_throttle():
    esc = Escalation(POLICY, strategy="mirror", rate_before_mirror=60 * MiB, since_pass=2)
    passes = [BULK, rec(1, 200 * MiB, 3.1, 100 * MiB), rec(2, 100 * MiB, 1.6, 98 * MiB),
              rec(3, 98 * MiB, 1.5, 10 * MiB)]
    assert esc.next_step(passes, 50 * MiB) is Step.STAY  # writers keep most of their speed
    # The throttle would leave them half the copy's 65 MiB/s: mirroring that
    # holds them to 20 MiB/s (a destination slower than they write) is no
    # worse; 15 MiB/s is under half of it.
    assert esc.next_step(passes, 20 * MiB) is Step.STAY
    assert esc.next_step(passes, 15 * MiB) is Step.THROTTLE
    assert esc.strategy == "throttle" and "cannot take their writes" in esc.reason


def test_a_mirrored_pass_too_short_to_time_writers_changes_nothing():
    """A mirrored pass of two granules lasts milliseconds: no write may end
    in it, and the rate it measures (0) says nothing of the destination."""
    esc = Escalation(POLICY, strategy="mirror", rate_before_mirror=16 * MiB, since_pass=2)
    passes = [BULK, rec(1, 200 * MiB, 3.1, 20 * MiB), rec(2, 20 * MiB, 1.2, 128 * 1024),
              rec(3, 128 * 1024, 0.004, 0)]
    assert esc.next_step(passes, 0.0) is Step.STAY
    assert esc.strategy == "mirror"
    longer = [*passes[:-1], rec(3, 128 * 1024, 0.3, 0)]
    assert esc.next_step(longer, 0.0) is Step.THROTTLE


def test_mirror_that_does_not_turn_the_trend_gives_way_to_the_throttle():
    esc = Escalation(POLICY, strategy="mirror", rate_before_mirror=60 * MiB, since_pass=2)
    passes = [BULK, rec(1, 200 * MiB, 3.1, 100 * MiB), rec(2, 100 * MiB, 1.6, 98 * MiB),
              rec(3, 98 * MiB, 1.5, 97 * MiB)]
    assert esc.next_step(passes, 55 * MiB) is Step.STAY  # one pass is no trend yet
    passes.append(rec(4, 97 * MiB, 1.5, 97 * MiB))
    assert esc.next_step(passes, 55 * MiB) is Step.THROTTLE


def test_throttle_is_the_last_step():
    esc = Escalation(POLICY, strategy="throttle", since_pass=1)
    passes = [BULK, rec(1, 200 * MiB, 3.1, 210 * MiB), rec(2, 210 * MiB, 3.2, 220 * MiB)]
    assert esc.next_step(passes, 10 * MiB) is Step.STAY


def test_a_pause_passes_cannot_shrink_is_shortened_by_mirroring():
    # 64 MiB/s; the target fits since pass 2, but passes stopped shrinking at
    # 4 MiB (62 ms): each takes as long as writers need to dirty it again.
    passes = [BULK, rec(1, 200 * MiB, 3.1, 16 * MiB), rec(2, 16 * MiB, 0.25, 4 * MiB),
              rec(3, 4 * MiB, 0.07, int(3.9 * MiB))]
    assert POLICY.decide(passes) is Decision.SWITCHOVER
    esc = Escalation(POLICY)
    assert esc.next_step(passes, 16 * MiB) is Step.MIRROR
    assert esc.strategy == "mirror" and "shorten the pause" in esc.reason
    assert esc.polishing
    # A sync that cannot mirror (into an export) just switches.
    refused = Escalation(POLICY, mirror_refused=True)
    assert refused.next_step(passes, 16 * MiB) is Step.STAY
    # The first mirrored pass is always made, whatever the polishing budget.
    assert POLICY.decide(passes, stall_from=len(passes) - 1) is Decision.CONTINUE



def test_a_fitting_pause_is_shortened_by_mirroring_without_polishing_first():
    """The first pass that fits the target mirrors at once, though passes
    still halve the dirty set: polishing passes would re-copy what writers
    dirty meanwhile, one mirrored pass leaves nothing behind the copy."""
    passes = [BULK, rec(1, 200 * MiB, 3.1, 16 * MiB)]  # fits the 500 ms target
    assert POLICY.worth_polishing(passes)  # passes alone would polish on
    esc = Escalation(POLICY)
    assert esc.next_step(passes, 4 * MiB) is Step.MIRROR
    assert esc.polishing and "248 ms" in esc.reason  # 16 MiB at 200 MiB / 3.1 s

def test_a_pause_already_short_is_left_to_passes():
    passes = [BULK, rec(1, 200 * MiB, 3.1, 16 * MiB), rec(2, 16 * MiB, 0.25, 1 * MiB),
              rec(3, 1 * MiB, 0.02, int(0.9 * MiB))]  # 14 ms: under MIRROR_POLISH_PAUSE
    assert Escalation(POLICY).next_step(passes, 16 * MiB) is Step.STAY
