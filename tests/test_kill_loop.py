"""Issue 13's kill-at-every-phase rerun: a sync under a live writer is
SIGKILLed at each phase of its job, in copy and in move mode. Each time the
writer must go on writing (never left frozen), the next run of the same
command must succeed and leave nothing behind, and the copy must be the
source at one instant (copy) or hold every write the writer made (move): no
lost writes, no silently wrong copy."""

from __future__ import annotations

import os

import pytest
from imagetools import cli_killed_at, make_data_image, run_cli

from blockmirror import Tracker

MiB = 1 << 20
OPTIONS = ("--bwlimit", "8M", "--target-downtime", "100ms", "--quiet")

COPY_PHASES = [
    ("blockmirror.migration.passes", "PassRunner.bulk"),
    ("blockmirror.migration.passes", "PassRunner.dirty"),
    ("blockmirror.migration.passes", "PassRunner.final"),  # writers frozen
    ("blockmirror.migration.commit", "publish_shadow"),
    ("blockmirror.migration.journal", "write"),  # inside the commit, before the rename
    ("blockmirror.migration.job", "FileSyncJob._write_manifest"),  # after the rename
    ("blockmirror.migration.manifest", "Manifest.commit"),
    ("blockmirror.migration.journal", "clear"),
]
MOVE_PHASES = [
    ("blockmirror.migration.passes", "PassRunner.bulk"),
    ("blockmirror.migration.passes", "PassRunner.dirty"),
    ("blockmirror.migration.passes", "PassRunner.final"),
    ("blockmirror.migration.journal", "write"),  # frozen, before the rename
    ("blockmirror.migration.job", "FileSyncJob._redirect"),  # frozen, after the rename
    ("blockmirror.migration.commit", "remove_source"),  # writers already redirected
]


@pytest.fixture
def image(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    path = src / "vm.img"
    initial = make_data_image(path, 16 * MiB, extents=6)
    Tracker.create(path).close()
    return path, initial


@pytest.mark.parametrize("phase", COPY_PHASES, ids=[q for _, q in COPY_PHASES])
def test_copy_killed_at_every_phase(image, tmp_path, live_writer, phase):
    path, initial = image
    dst = tmp_path / "dst"
    dst.mkdir()
    writer = live_writer(path, rate="2M", wait=3)
    cli_killed_at(*phase, "sync", path, dst, *OPTIONS)
    writer.wait_for_more(5)  # never left frozen by the dead copier
    again = run_cli("sync", path, dst, *OPTIONS)
    assert again.returncode == 0, again.stderr
    writer.assert_point_in_time((dst / "vm.img").read_bytes(), initial)
    assert writer.stop() == 0
    final = run_cli("sync", path, dst, "--quiet")  # once the writer is done: the copy catches up
    assert final.returncode == 0, final.stderr
    copy = (dst / "vm.img").read_bytes()
    assert copy == path.read_bytes() == writer.replayed(initial)
    assert sorted(os.listdir(dst)) == ["vm.img", "vm.img.bm-manifest"]


@pytest.mark.parametrize("phase", MOVE_PHASES, ids=[q for _, q in MOVE_PHASES])
def test_move_killed_at_every_phase(image, tmp_path, live_writer, phase):
    path, initial = image
    dst = tmp_path / "dst"
    dst.mkdir()
    writer = live_writer(path, rate="2M", wait=3)
    cli_killed_at(*phase, "sync", path, dst, "--move", *OPTIONS)
    writer.wait_for_more(5)
    again = run_cli("sync", path, dst, "--move", *OPTIONS)
    assert again.returncode == 0, again.stderr
    writer.wait_for_more(5)  # now writing the moved image
    assert writer.stop() == 0
    assert not path.exists() and not os.path.exists(str(path) + ".cbt")
    assert (dst / "vm.img").read_bytes() == writer.replayed(initial)  # no write lost
    assert sorted(os.listdir(dst)) == ["vm.img", "vm.img.cbt"]
