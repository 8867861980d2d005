"""Tracked zeroing (bm_zero), the C path NBD's WRITE_ZEROES and TRIM take
through the front end and TrackedImage.write_zeroes takes from Python."""

from __future__ import annotations

import os

import pytest

from blockmirror.tracking.image import TrackedImage
from blockmirror.tracking.tracker import Tracker

MIB = 1 << 20


def _allocated(path: str) -> int:
    return os.stat(path).st_blocks * 512


@pytest.fixture()
def image(tmp_path):
    path = str(tmp_path / "img")
    with open(path, "wb") as f:
        f.write(b"\xaa" * (4 * MIB))
    return path


@pytest.mark.parametrize("may_trim", [False, True])
def test_zeroed_range_reads_zero_and_is_marked(image, may_trim):
    with TrackedImage(image) as img:
        img.tracker.fetch_and_clear()
        img.write_zeroes(MIB + 100, 300_000, may_trim=may_trim)
        assert img.pread(300_000, MIB + 100) == bytes(300_000)
        # The bytes around the range are untouched.
        assert img.pread(100, MIB) == b"\xaa" * 100
        assert img.pread(100, MIB + 300_100) == b"\xaa" * 100
        dirty = img.tracker.dirty_extents()
    g = 65536
    assert dirty == [(MIB // g * g, ((MIB + 300_100 + g - 1) // g - MIB // g) * g)]


def test_may_trim_punches_and_plain_zero_keeps_allocation(image):
    before = _allocated(image)
    with TrackedImage(image) as img:
        img.write_zeroes(0, MIB, may_trim=False)
        kept = _allocated(image)
        img.write_zeroes(2 * MIB, MIB, may_trim=True)
        punched = _allocated(image)
    assert kept == before, "zeroing in place must not deallocate (NBD_CMD_FLAG_NO_HOLE)"
    assert punched <= before - MIB, "may_trim should leave a hole where the filesystem can"


def test_zero_past_the_end_is_refused_and_changes_nothing(image):
    with TrackedImage(image) as img:
        with pytest.raises(OSError) as err:
            img.write_zeroes(4 * MIB - 10, 20)
        assert "past the image end" in str(err.value)
        assert img.pread(10, 4 * MIB - 10) == b"\xaa" * 10
        assert img.size == 4 * MIB


def test_zero_is_seen_by_another_processes_handle(image):
    """A zero through one process is seen by another's tracker handle."""
    with TrackedImage(image) as img:
        img.tracker.fetch_and_clear()
        img.write_zeroes(0, 4096)
    with Tracker.open(image) as t:
        assert t.dirty_extents() == [(0, 65536)]
