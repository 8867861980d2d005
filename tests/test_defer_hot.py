"""Hot-block deferral (sync(defer_hot=True)): blocks dirty in two dirty
passes in a row wait for the final pass. Nothing may be lost by it: the
deferred blocks stay dirty, so the copy is still the source at one instant."""

from __future__ import annotations

from imagetools import MiB, make_data_image

from blockmirror import sync
from blockmirror.migration.policy import ConvergencePolicy, PassRecord


def rec(i: int, nbytes: int, seconds: float, dirty_left: int) -> PassRecord:
    return PassRecord(index=i, kind="dirty", bytes=nbytes, seconds=seconds,
                      dirty_left=dirty_left)


def test_budget_is_a_share_of_the_target_and_none_once_it_fits():
    policy = ConvergencePolicy(target_downtime=1.0)
    far = [rec(0, 100 * MiB, 1.0, 500 * MiB)]  # 100 MiB/s, 5 s of dirt
    assert policy.defer_budget(far) == int(0.5 * 1.0 * 0.85 * 100 * MiB)
    near = [rec(0, 100 * MiB, 1.0, 50 * MiB)]
    assert policy.defer_budget(near) == 0
    assert policy.defer_budget([]) == 0


def test_deferred_hot_blocks_reach_the_copy_at_one_instant(dirs, live_writer):
    src, dst = dirs
    image = src / "hot.img"
    initial = make_data_image(image, 32 * MiB, extents=8, tracked=True)
    writer = live_writer(image, rate="7M", pattern="hotspot", wait=10)
    result = sync(image, dst, target_downtime=0.1, rate_limit=8 * MiB, max_passes=40,
                  defer_hot=True, converge="throttle")  # it ends, converged or slowed
    assert result.status == "ok"
    assert any(p.deferred > 0 for p in result.passes), [p.to_dict() for p in result.passes]
    writer.assert_point_in_time((dst / "hot.img").read_bytes(), initial)


def test_the_first_dirty_pass_defers_what_the_bulk_saw_dirtied_early(dirs, live_writer):
    """Halfway through the bulk pass the job looks (without clearing) at what
    writers already dirtied again: the first dirty pass leaves those blocks
    for the final pass. Without the look, nothing is deferred before a
    second dirty pass, which a fitting target never reaches."""
    src, dst = dirs
    image = src / "early.img"
    initial = make_data_image(image, 32 * MiB, extents=8, tracked=True)
    writer = live_writer(image, rate="12M", pattern="hotspot", wait=10)
    result = sync(image, dst, target_downtime=0.2, rate_limit=8 * MiB, max_passes=40,
                  defer_hot=True, converge="throttle")
    assert result.status == "ok"
    first = result.passes[1]
    assert first.kind == "dirty" and first.deferred > 0, [p.to_dict() for p in result.passes]
    writer.assert_point_in_time((dst / "early.img").read_bytes(), initial)


def test_deferral_switches_as_soon_as_the_target_fits():
    """Polishing passes would copy the held-back hot blocks again and again,
    so with --defer-hot a fitting pass is the last (bench/defer_hot.py: 23 %
    fewer bytes re-copied, a longer pause)."""
    from blockmirror.migration.options import SyncOptions
    from blockmirror.migration.policy import Decision

    bulk = PassRecord(index=0, kind="bulk", bytes=640 * MiB, seconds=10.0, dirty_left=64 * MiB)
    fits = PassRecord(index=1, kind="dirty", bytes=64 * MiB, seconds=1.0, dirty_left=16 * MiB)
    passes = [bulk, fits]  # 16 MiB at 64 MiB/s: 0.25 s, within a 0.5 s target
    assert SyncOptions(target_downtime=0.5).policy().decide(passes) is Decision.CONTINUE
    deferring = SyncOptions(target_downtime=0.5, defer_hot=True).policy()
    assert deferring.decide(passes) is Decision.SWITCHOVER
