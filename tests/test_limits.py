"""Size limits of a sidecar and the address space its handles reserve."""

from __future__ import annotations

import errno
import os

import pytest

from blockmirror import TrackedImage, Tracker
from blockmirror._bindings import tracker as _tracker_c


def test_granule_count_limit_scales_with_granularity(make_image):
    img = make_image(4096)
    fd = os.open(img, os.O_RDONLY)
    try:
        with pytest.raises(OSError) as ei:
            _tracker_c.create(str(img) + ".cbt", fd, 65 << 40, 4096)  # 65 TiB at 4 KiB
        assert ei.value.errno == errno.EFBIG and "64 TiB limit" in ei.value.strerror
        # At 64 KiB granules the same size is within the limit (2^30
        # granules); its 4 GiB sidecar is not made here, only the 1 PiB
        # bound checked.
        with pytest.raises(OSError) as ei:
            _tracker_c.create(str(img) + ".cbt", fd, (1 << 50) + 1, 65536)
        assert "1 PiB limit" in ei.value.strerror
    finally:
        os.close(fd)


def test_many_trackers_fit_in_one_process(make_image):
    """Each handle reserves address space for its largest image; at 4 KiB
    granules that used to be ~1.1 TB each, so ~120 handles exhausted it."""
    img = make_image(1 << 20)
    Tracker.create(img, granularity=4096).close()
    handles = [Tracker.open(img) for _ in range(400)]
    try:
        with TrackedImage(img) as w:
            w.pwrite(b"x", 0)
        assert all(h.dirty_bytes() == 4096 for h in handles[::50])
    finally:
        for h in handles:
            h.close()
