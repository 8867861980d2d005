"""`sync --converge mirror`: writes outpacing the copy still converge,
because writers' writes to clean ranges go to the copy too (csrc/mirror.c).
The copier's --bwlimit caps only its own passes, so a writer far faster
than the copy keeps the dirty set growing in the other modes."""

from __future__ import annotations

import os

import pytest
from imagetools import MiB, make_data_image

import blockmirror
from blockmirror import Tracker, sync
from blockmirror.cli.workload import DISCARD


def _mirror_note(result) -> str:
    return next(n for n in result.notes if n.startswith("mirrored "))


def test_mirror_converges_where_fail_would_not_and_is_one_instant(dirs, live_writer):
    src, dst = dirs
    image = src / "m.img"
    initial = make_data_image(image, 16 * MiB, extents=4, tracked=True)
    writer = live_writer(image, rate="16M", wait=10)
    result = sync(image, dst, target_downtime=0.2, rate_limit=4 * MiB, max_passes=40,
                  converge="mirror")
    assert result.status == "ok"
    assert "mirrored 0 B" not in _mirror_note(result)
    writer.wait_for_more(5)  # never left frozen
    copy = (dst / "m.img").read_bytes()
    assert writer.assert_point_in_time(copy, initial) > 10
    with Tracker.open(image) as t:
        assert t.mirror_status().state == "off"


@pytest.mark.slow
@pytest.mark.parametrize("converge", ["mirror", "auto"])
def test_four_writers_unaligned_with_discards_get_one_instant(dirs, live_writer, converge):
    """Four writer processes, each in its own quarter of the image, writing
    1-511 bytes off their blocks and discarding every fifth block, faster
    than the copy: the copy shows each writer's log up to one instant (the
    switchover), mirrored writes and discards included, and every writer
    goes on after it."""
    src, dst = dirs
    image = src / "four.img"
    size = 32 * MiB
    initial = make_data_image(image, size, extents=8, tracked=True)
    quarter = size // 4
    writers = [live_writer(image, rate="5M", seed=11 + i, wait=10,
                           extra=["--base", str(i * quarter), "--region", str(quarter),
                                  "--unaligned", "--discard-every", "5"])
               for i in range(4)]
    result = sync(image, dst, target_downtime=0.2, rate_limit=6 * MiB, max_passes=60,
                  converge=converge)
    assert result.status == "ok"
    assert result.strategy in ("mirror", "throttle"), result.notes
    if converge == "mirror":
        assert "mirrored 0 B" not in _mirror_note(result)
    copy = (dst / "four.img").read_bytes()
    for i, writer in enumerate(writers):
        writer.wait_for_more(5)  # never left frozen
        part = slice(i * quarter, (i + 1) * quarter)
        mine = writer.replayed(initial)  # all of this writer's log, on the initial image
        assert any(logged & DISCARD for _, _, logged in writer.writes())
        # Outside its quarter a writer changes nothing: compare its quarter.
        assert mine[:part.start] == initial[:part.start]
        k = writer.assert_point_in_time(
            initial[:part.start] + copy[part] + initial[part.stop:], initial)
        assert k > 10, f"writer {i} showed only {k} operations"
    # The check can fail: one byte off in a quarter is no instant of it.
    flipped = bytearray(initial)
    flipped[: quarter] = copy[:quarter]
    flipped[quarter // 2] ^= 0xFF
    with pytest.raises(AssertionError, match="not the source at any instant"):
        writers[0].assert_point_in_time(bytes(flipped), initial)


def test_fail_mode_does_not_converge_at_that_rate(dirs, live_writer):
    """The control for the test above: the same writer and cap without
    mirroring does not converge."""
    src, dst = dirs
    image = src / "f.img"
    make_data_image(image, 16 * MiB, extents=4, tracked=True)
    live_writer(image, rate="16M", wait=10)
    with pytest.raises(blockmirror.NotConvergedError):
        sync(image, dst, target_downtime=0.2, rate_limit=4 * MiB, max_passes=3)


def test_mirrored_move_loses_no_write(dirs, live_writer):
    src, dst = dirs
    image = src / "mv.img"
    initial = make_data_image(image, 16 * MiB, extents=4, tracked=True)
    writer = live_writer(image, rate="16M", wait=10)
    result = sync(image, dst, mode="move", target_downtime=0.2, rate_limit=4 * MiB,
                  max_passes=40, converge="mirror")
    assert result.status == "ok" and not image.exists()
    writer.wait_for_more(20)  # it follows the redirect and keeps writing
    assert writer.stop() == 0
    assert (dst / "mv.img").read_bytes() == writer.replayed(initial)


def test_destination_full_mid_mirror_fails_cleanly(small_tmpfs, tmp_path, live_writer):
    """Mirrored writes into holes fill a small destination: the sync fails
    as out of space, removes its copy, the writer was never stalled and the
    source holds every write it made."""
    full = small_tmpfs("7m")
    image = tmp_path / "s.img"
    initial = make_data_image(image, 32 * MiB, extents=4, tracked=True)
    writer = live_writer(image, rate="24M", write_size="256k", wait=5)
    with pytest.raises(blockmirror.OutOfSpaceError):
        sync(image, full, target_downtime=0.05, rate_limit=2 * MiB, max_passes=200,
             converge="mirror")
    writer.wait_for_more(5)
    assert writer.stop() == 0
    assert os.listdir(full) == []
    assert image.read_bytes() == writer.replayed(initial)
    with Tracker.open(image) as t:
        assert t.state == "running"
        assert t.mirror_status().state != "on"


@pytest.mark.slow
def test_auto_escalates_to_mirror_and_says_why(dirs, live_writer):
    src, dst = dirs
    image = src / "a.img"
    initial = make_data_image(image, 16 * MiB, extents=4, tracked=True)
    writer = live_writer(image, rate="16M", wait=10)
    result = sync(image, dst, target_downtime=0.2, rate_limit=4 * MiB, max_passes=40,
                  converge="auto")
    assert result.status == "ok"
    assert result.strategy == "mirror" and "outpaced the copy" in result.strategy_reason
    assert "converged by mirror" in result.summary()
    writer.assert_point_in_time((dst / "a.img").read_bytes(), initial)


def test_auto_stays_with_passes_when_they_converge(dirs, live_writer):
    src, dst = dirs
    image = src / "b.img"
    make_data_image(image, 16 * MiB, extents=4, tracked=True)
    live_writer(image, rate="1M", wait=3)
    result = sync(image, dst, target_downtime=0.5, converge="auto")
    assert result.status == "ok" and result.strategy == "passes"
    assert not result.strategy_reason


@pytest.mark.slow
def test_auto_throttles_when_the_destination_cannot_take_mirrored_writes(tmp_path,
                                                                         live_writer):
    """A destination 30 ms away per request: mirrored 4 KiB writes would hold
    the writer to ~33 writes a second (130 KiB/s), far under half of what the
    throttle leaves it (half the copy's throughput, which keeps 128 KiB
    requests in flight on several threads), so auto gives way to the
    throttle. (Sequential writes: the throttled writer then dirties few
    granules, so the passes converge.)"""
    nfs_standin = pytest.importorskip("nfs_standin")
    if nfs_standin.skip_reason() is not None:
        pytest.skip(str(nfs_standin.skip_reason()))
    backing = tmp_path / "export"
    backing.mkdir()
    image = tmp_path / "c.img"
    make_data_image(image, 16 * MiB, extents=2, tracked=True)
    writer = live_writer(image, rate="16M", write_size="4k", pattern="sequential", wait=10)
    with nfs_standin.mounted(backing, latency=0.03) as fs:
        result = sync(image, fs.mountpoint, target_downtime=0.3, rate_limit=12 * MiB,
                      max_passes=60, converge="auto")
    writer.wait_for_more(5)
    assert result.status == "ok"
    assert result.strategy == "throttle", result.notes
    assert "cannot take their writes" in result.strategy_reason or \
        "did not shrink" in result.strategy_reason


def test_no_mirroring_into_an_earlier_copy_updated_in_place(dirs, live_writer):
    """Its manifest's digests are forgotten by the passes before they write;
    a mirrored write would change the copy behind them."""
    src, dst = dirs
    image = src / "i.img"
    make_data_image(image, 16 * MiB, extents=4, tracked=True)
    sync(image, dst)
    writer = live_writer(image, rate="2M", wait=5)
    again = sync(image, dst, target_downtime=0.5, converge="mirror")
    assert again.incremental and again.strategy == "passes"
    assert any("not used when updating" in n for n in again.notes)
    writer.stop()


def test_a_writer_killed_while_mirroring_fails_the_sync_safely(dirs, tmp_path):
    """A writer SIGKILLed mid-mirror may have written the source and not the
    copy, with no dirty bit to say so: its dead slot makes the sidecar
    unclean (I4) and the sync drops the copy instead of publishing it."""
    import signal

    from imagetools import WriterProcess

    src, dst = dirs
    image = src / "k.img"
    make_data_image(image, 16 * MiB, extents=4, tracked=True)
    writer = WriterProcess(image, tmp_path / "k.log", rate="16M")
    writer.wait_for_writes(10)

    def kill_once_mirroring(progress) -> None:
        if progress.phase == "dirty" and writer.proc.poll() is None:
            writer.proc.send_signal(signal.SIGKILL)
            writer.proc.wait()

    try:
        with pytest.raises(blockmirror.SourceChangedError, match="writer died"):
            sync(image, dst, target_downtime=0.2, rate_limit=4 * MiB, max_passes=40,
                 converge="mirror", progress=kill_once_mirroring)
    finally:
        if writer.proc.poll() is None:
            writer.proc.kill()
        writer.proc.wait()
    assert os.listdir(dst) == []


def test_mirrored_passes_copy_with_one_thread(dirs, live_writer, monkeypatch):
    """While writers mirror into the copy, the dirty passes share its disk
    with them: they run on one copy thread, paced to what the writers leave
    of it; the final pass, with writers frozen, on all of them again."""
    from blockmirror.copying.copier import Copier

    made: list[int] = []
    used: list[int] = []
    paces: list[float | None] = []
    init, copy, pace = Copier.__init__, Copier.copy_extents, Copier.pace

    def spy_pace(self, rate):
        paces.append(rate)
        pace(self, rate)
        assert self.pace_rate == rate

    def spy_init(self, *args, **kwargs):
        made.append(kwargs.get("workers", 4))
        init(self, *args, **kwargs)

    def spy_copy(self, *args, **kwargs):
        used.append(self.workers)
        return copy(self, *args, **kwargs)

    monkeypatch.setattr(Copier, "__init__", spy_init)
    monkeypatch.setattr(Copier, "copy_extents", spy_copy)
    monkeypatch.setattr(Copier, "pace", spy_pace)
    src, dst = dirs
    image = src / "w.img"
    initial = make_data_image(image, 16 * MiB, extents=4, tracked=True)
    writer = live_writer(image, rate="16M", wait=10)
    result = sync(image, dst, target_downtime=0.2, rate_limit=4 * MiB, max_passes=40,
                  converge="mirror", workers=4)
    assert result.strategy == "mirror"
    assert made == [4, 1]
    kinds = [p.kind for p in result.passes]
    assert used[0] == 4 and used[-1] == 4, (kinds, used)  # bulk and final
    assert set(used[1:-1]) == {1}, (kinds, used)  # the mirrored dirty passes
    # Writers at 16 MiB/s outrun the 4 MiB/s copy: each mirrored pass is
    # paced to the floor, MIRROR_COPY_SHARE of the bulk pass's throughput,
    # well under the --bwlimit, and is recorded as paced.
    bulk = result.passes[0].throughput
    assert len(paces) == kinds.count("dirty"), (paces, kinds)
    for rate in paces:
        assert rate is not None and 0.39 * bulk <= rate <= 0.6 * bulk, (rate, bulk)
    assert [p.paced for p in result.passes] == [k == "dirty" for k in kinds]
    writer.assert_point_in_time((dst / "w.img").read_bytes(), initial)
