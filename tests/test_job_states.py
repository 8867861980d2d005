"""The sync job's one exit undoes exactly what this run did, by state."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from imagetools import make_data_image

import blockmirror
from blockmirror import Tracker
from blockmirror.migration import sync
from blockmirror.migration.job import FileSyncJob, JobState
from blockmirror.migration.options import SyncOptions
from blockmirror.migration.precheck import partial_path, plan_file_sync

MiB = 1 << 20


@pytest.mark.parametrize("tracked", [True, False], ids=["tracked", "untracked"])
def test_a_refused_second_sync_leaves_the_running_one_alone(tmp_path, tracked):
    """Issue 13 item 12: a second sync into the same destination is refused
    (the source lock, or the shadow copy's lock) and must not delete the
    shadow copy the first sync is writing; the first one finishes exact."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    image = src / "one.img"
    content = make_data_image(image, 64 * MiB, extents=32)
    if tracked:
        Tracker.create(image).close()
    first = subprocess.Popen([sys.executable, "-m", "blockmirror", "sync", str(image), str(dst),
                              "--bwlimit", "16M", "--quiet"])
    shadow = partial_path(str(dst / "one.img"))
    try:
        deadline = time.monotonic() + 20
        while not os.path.exists(shadow):
            assert time.monotonic() < deadline, "the first sync never started copying"
            time.sleep(0.01)
        with pytest.raises(blockmirror.InvalidInputError, match="another sync"):
            sync(image, dst)
        assert os.path.exists(shadow), "the refused sync removed the running sync's shadow"
    finally:
        assert first.wait(timeout=60) == 0
    assert (dst / "one.img").read_bytes() == content


def test_states_of_a_copy_and_of_a_failure(tmp_path, monkeypatch):
    """A finished copy ends DONE; a failure records the state it failed in."""
    image = tmp_path / "a.img"
    make_data_image(image, 8 * MiB)
    Tracker.create(image).close()
    job = FileSyncJob(plan_file_sync(str(image), str(tmp_path / "b.img")), SyncOptions())
    job.run()
    assert job.state is JobState.DONE and job.failed_from is None

    def fail_commit(self: FileSyncJob) -> None:
        raise OSError(5, "injected commit failure")

    monkeypatch.setattr(FileSyncJob, "_commit", fail_commit)
    job = FileSyncJob(plan_file_sync(str(image), str(tmp_path / "c.img")), SyncOptions())
    with pytest.raises(OSError, match="injected"):
        job.run()
    assert job.failed_from is JobState.THAWED  # copy mode thaws before the commit
    assert sorted(os.listdir(tmp_path)) == ["a.img", "a.img.cbt", "b.img", "b.img.bm-manifest"]
    with Tracker.open(image) as t:
        assert t.state == "running"


def test_untracked_growth_during_a_sync_is_caught_inside_the_freeze(tmp_path):
    """Issue 13 item 7: a program that grows and writes the image without the
    tracker while a sync runs must fail the sync (exit 3, nothing left at the
    destination, source untouched), not commit a copy that misses its data."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    image = src / "g.img"
    make_data_image(image, 32 * MiB, extents=24)
    Tracker.create(image).close()
    proc = subprocess.Popen([sys.executable, "-m", "blockmirror", "sync", str(image), str(dst),
                             "--bwlimit", "16M", "--target-downtime", "2s", "--quiet"],
                            stderr=subprocess.PIPE)
    shadow = partial_path(str(dst / "g.img"))
    deadline = time.monotonic() + 20
    while not os.path.exists(shadow):
        assert time.monotonic() < deadline, "the sync never started copying"
        time.sleep(0.01)
    with open(image, "r+b") as f:  # untracked: plain writes past the tracked end
        f.seek(32 * MiB)
        f.write(b"untracked!" * 100_000)
    grown = image.read_bytes()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 3, err.decode()
    assert b"written behind the tracker" in err
    assert os.listdir(dst) == []
    assert image.read_bytes() == grown
    with Tracker.open(image) as t:
        assert t.state == "running"
