"""The switchover predicate and the stall rule, on hand-made pass histories."""

from __future__ import annotations

import math

import pytest

from blockmirror.migration.policy import ConvergencePolicy, Decision, PassRecord, predict_downtime

MiB = 1 << 20


def rec(i: int, nbytes: int, seconds: float, dirty_left: int) -> PassRecord:
    return PassRecord(index=i, kind="bulk" if i == 0 else "dirty", bytes=nbytes,
                      seconds=seconds, dirty_left=dirty_left)


def test_predict_downtime():
    assert predict_downtime(0, 0.0) == 0.0
    assert predict_downtime(100 * MiB, 100 * MiB) == pytest.approx(1.0)
    assert math.isinf(predict_downtime(1, 0.0))


def test_switches_over_when_dirty_fits_the_target():
    policy = ConvergencePolicy(target_downtime=1.0, polish_passes=0)
    # 100 MiB/s measured; 50 MiB dirty -> 0.5 s < 1 s
    assert policy.decide([rec(0, 1000 * MiB, 10.0, 50 * MiB)]) is Decision.SWITCHOVER
    # 150 MiB dirty -> 1.5 s: another pass
    assert policy.decide([rec(0, 1000 * MiB, 10.0, 150 * MiB)]) is Decision.CONTINUE


def test_stall_after_three_non_shrinking_passes():
    policy = ConvergencePolicy(target_downtime=0.1, stall_passes=3)
    passes = [rec(0, 1000 * MiB, 10.0, 100 * MiB)]
    for i, left in enumerate([110, 120, 130], start=1):
        assert policy.decide(passes) is Decision.CONTINUE
        passes.append(rec(i, 100 * MiB, 1.0, left * MiB))
    assert policy.stalled_for(passes) == 3
    assert policy.decide(passes) is Decision.STALLED
    # A shrinking pass resets the run.
    passes.append(rec(4, 130 * MiB, 1.3, 90 * MiB))
    assert policy.stalled_for(passes) == 0
    # ... and stall_from hides history judged under an earlier regime.
    assert policy.stalled_for(passes[:4], stall_from=3) == 0


def test_out_of_passes():
    policy = ConvergencePolicy(target_downtime=0.1, max_passes=2)
    passes = [rec(0, 1000 * MiB, 10.0, 100 * MiB), rec(1, 100 * MiB, 1.0, 50 * MiB)]
    assert policy.decide(passes) is Decision.OUT_OF_PASSES


def test_small_pass_does_not_set_the_throughput():
    """A tiny pass's timing is mostly overhead; the prediction uses the
    latest pass that moved at least 4 MiB."""
    passes = [rec(0, 1000 * MiB, 10.0, 1 * MiB), rec(1, 64 * 1024, 0.01, 1 * MiB)]
    assert ConvergencePolicy.copy_throughput(passes) == pytest.approx(100 * MiB)


@pytest.mark.parametrize("bad", [dict(target_downtime=0), dict(target_downtime=-1),
                                 dict(target_downtime=math.nan), dict(max_passes=0)])
def test_rejects_bad_settings(bad):
    with pytest.raises(ValueError):
        ConvergencePolicy(**bad)


def test_a_wobbling_dirty_set_counts_as_stalled():
    """Around a hot working set the dirty set wobbles by a few percent; that
    is not progress."""
    policy = ConvergencePolicy(target_downtime=0.01, stall_passes=3)
    passes = [rec(0, 100 * MiB, 1.0, 20 * MiB)]
    for i, left in enumerate([19.5, 20.0, 19.2], start=1):
        passes.append(rec(i, 20 * MiB, 1.0, int(left * MiB)))
    assert policy.decide(passes) is Decision.STALLED
    # Real progress (each pass leaves under 90 %) is not a stall.
    shrinking = [rec(0, 100 * MiB, 1.0, 20 * MiB)]
    for i, left in enumerate([17, 15, 13], start=1):
        shrinking.append(rec(i, 20 * MiB, 1.0, left * MiB))
    assert policy.stalled_for(shrinking) == 0


@pytest.mark.parametrize("target", [0.2, 1.0, 5.0])
def test_switchover_margin_boundary(target):
    """The prediction must fit in 85 % of the target, not in all of it: the
    final pass also pays the freeze and a throughput that wobbles. Just under
    0.85 x target switches over, just over does not (nor does the target)."""
    policy = ConvergencePolicy(target_downtime=target, polish_passes=0)
    assert policy.switchover_margin == 0.85
    throughput = 100 * MiB  # bytes/s, as the bulk pass below measures it
    edge = 0.85 * target * throughput  # dirty bytes that take exactly 85 % of the target
    under, over = int(edge * (1 - 1e-4)), int(edge * (1 + 1e-4))
    assert policy.fits(under, throughput)
    assert not policy.fits(over, throughput)
    assert not policy.fits(int(0.95 * target * throughput), throughput)  # fits the target only
    bulk = rec(0, 1000 * MiB, 10.0, 0)
    assert ConvergencePolicy.copy_throughput([bulk]) == pytest.approx(throughput)
    assert policy.decide([rec(0, 1000 * MiB, 10.0, under)]) is Decision.SWITCHOVER
    assert policy.decide([rec(0, 1000 * MiB, 10.0, over)]) is Decision.CONTINUE


# -- polishing: fitting the target allows a switch; fast shrinking delays it ----


def test_a_lone_bulk_pass_that_fits_gets_one_more_pass():
    policy = ConvergencePolicy(target_downtime=1.0)
    assert policy.decide([rec(0, 1000 * MiB, 10.0, 10 * MiB)]) is Decision.CONTINUE


def test_keeps_polishing_while_each_pass_halves_the_dirty_set():
    policy = ConvergencePolicy(target_downtime=1.0)
    passes = [rec(0, 1000 * MiB, 10.0, 40 * MiB), rec(1, 40 * MiB, 0.4, 16 * MiB)]
    assert policy.decide(passes) is Decision.CONTINUE
    passes.append(rec(2, 16 * MiB, 0.16, 13 * MiB))  # 0.81x: no longer worth a pass
    assert policy.decide(passes) is Decision.SWITCHOVER


def test_a_pause_already_under_min_pause_switches_at_once():
    policy = ConvergencePolicy(target_downtime=1.0, min_pause=0.005)
    # 100 MiB/s: 256 KiB is 2.5 ms
    assert policy.decide([rec(0, 1000 * MiB, 10.0, 256 << 10)]) is Decision.SWITCHOVER
    assert policy.decide([rec(0, 1000 * MiB, 10.0, 0)]) is Decision.SWITCHOVER


def test_polishing_is_bounded():
    policy = ConvergencePolicy(target_downtime=10.0, polish_passes=3, min_pause=0.0)
    passes = [rec(0, 1000 * MiB, 10.0, 512 * MiB)]
    for i in range(1, 3):
        passes.append(rec(i, 400 * MiB, 4.0, passes[-1].dirty_left // 4))
        assert policy.decide(passes) is Decision.CONTINUE
    passes.append(rec(3, 400 * MiB, 4.0, passes[-1].dirty_left // 4))
    assert policy.decide(passes) is Decision.SWITCHOVER  # three fitting passes spent


def test_polishing_never_outlasts_max_passes():
    policy = ConvergencePolicy(target_downtime=1.0, max_passes=2)
    passes = [rec(0, 1000 * MiB, 10.0, 40 * MiB), rec(1, 40 * MiB, 0.4, 10 * MiB)]
    assert policy.decide(passes) is Decision.SWITCHOVER


def test_mirrored_passes_are_paced_to_what_writers_leave():
    policy = ConvergencePolicy(mirror_copy_share=0.4)
    assert policy.mirror_copy_rate(100 * MiB, 30 * MiB) == 70 * MiB
    # Writers asking more than the destination takes: the copy keeps its floor.
    assert policy.mirror_copy_rate(100 * MiB, 150 * MiB) == 40 * MiB
    assert policy.mirror_copy_rate(0.0, 10 * MiB) == 0.0  # nothing measured: no pace


def test_a_paced_pass_does_not_predict_the_final_pass():
    bulk = PassRecord(index=0, kind="bulk", bytes=640 * MiB, seconds=10.0, dirty_left=64 * MiB)
    paced = PassRecord(index=1, kind="dirty", bytes=64 * MiB, seconds=4.0, dirty_left=8 * MiB,
                       paced=True)
    assert ConvergencePolicy.copy_throughput([bulk, paced]) == 64 * MiB
    unpaced = PassRecord(index=1, kind="dirty", bytes=64 * MiB, seconds=4.0, dirty_left=8 * MiB)
    assert ConvergencePolicy.copy_throughput([bulk, unpaced]) == 16 * MiB


def test_after_a_mirrored_pass_only_zero_dirty_is_short_enough():
    """A few KiB left after an unpaced pass predict a pause under min_pause:
    switch. Left after a mirrored (paced) pass they are worth one more pass,
    which costs writers no pause: a final pass of even one granule waited
    36-110 ms in a slow destination's dirty throttle (bench/README.md)."""
    policy = ConvergencePolicy(target_downtime=0.5)
    bulk = PassRecord(index=0, kind="bulk", bytes=640 * MiB, seconds=10.0,
                      dirty_left=100 * MiB)

    def after(paced: bool, left: int) -> list[PassRecord]:
        return [bulk, PassRecord(index=1, kind="dirty", bytes=100 * MiB, seconds=2.0,
                                 dirty_left=left, paced=paced)]

    assert not policy.worth_polishing(after(False, 128 * 1024))  # 2 ms at 64 MiB/s
    assert policy.worth_polishing(after(True, 128 * 1024))
    assert policy.decide(after(True, 128 * 1024)) is Decision.CONTINUE
    assert policy.decide(after(True, 0)) is Decision.SWITCHOVER
