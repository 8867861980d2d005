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
