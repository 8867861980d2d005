"""Issue 13, item 4: eras damaged while nobody tracks the image (a crash, a
stray write, an edit) are caught by their checksums, so a change id is
refused and the sync falls back to a hash resync, never an incremental that
misses blocks. And a sidecar of the old format is refused, saying why."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import time

import pytest
from imagetools import MiB, make_data_image

from blockmirror import ChangeIdInvalidError, SidecarCorruptError, TrackedImage, Tracker
from blockmirror import sidecar_path as side_of
from blockmirror.migration import sync

G = 65536
# Chunk 0 of the bitmap area (csrc/bm_internal.h: after the header page, the
# control page and eight interlock pages): 512 bytes of dirty bits, then one
# uint32 era per granule.
ERAS = 40960 + 512
OFF_VERSION = 8
OFF_ERA_SEAL = 116  # struct bm_header: after image_size, generation and flags


def zero_eras(image, first: int = 0, count: int = 4096) -> None:
    fd = os.open(side_of(image), os.O_RDWR)
    try:
        os.pwrite(fd, bytes(4 * count), ERAS + 4 * first)
    finally:
        os.close(fd)


def write_and_close(image, offsets) -> None:
    with TrackedImage(image) as img:
        for off in offsets:
            img.pwrite(b"new data", off)


def test_zeroed_eras_refuse_the_change_id(tracked_image):
    with Tracker.open(tracked_image) as t:
        since = t.change_id()
    write_and_close(tracked_image, [5 * G])  # the last writer out seals the eras
    zero_eras(tracked_image)
    with Tracker.open(tracked_image) as t:
        # It used to answer [] here: a backup that missed the write.
        with pytest.raises(ChangeIdInvalidError, match="checksums"):
            t.changed_extents(since)
        assert t.consistent is False
        with pytest.raises(ChangeIdInvalidError):
            t.change_id()
        t.reset()  # a new series: trusted again, every block dirty
        assert t.consistent is True
        fresh = t.change_id()
    write_and_close(tracked_image, [7 * G])
    with Tracker.open(tracked_image) as t:
        assert t.changed_extents(fresh) == [(7 * G, G)]


def test_a_writer_that_opens_after_the_damage_notices_it(tracked_image):
    """The next writer in checks the sealed eras before it unseals them, so
    the damage is not hidden by later writes either."""
    with Tracker.open(tracked_image) as t:
        since = t.change_id()
    write_and_close(tracked_image, [3 * G])
    zero_eras(tracked_image)
    with TrackedImage(tracked_image) as img:
        img.pwrite(b"later", 9 * G)
        assert img.tracker.consistent is False
        with pytest.raises(ChangeIdInvalidError):
            img.tracker.changed_extents(since)


def test_one_changed_era_is_caught(tracked_image):
    with Tracker.open(tracked_image) as t:
        since = t.change_id()
    write_and_close(tracked_image, [2 * G, 30 * G])
    zero_eras(tracked_image, first=30, count=1)  # one granule's era only
    with Tracker.open(tracked_image) as t, pytest.raises(ChangeIdInvalidError):
        t.changed_extents(since)


def test_untouched_eras_stay_trusted_across_writers(tracked_image):
    with Tracker.open(tracked_image) as t:
        since = t.change_id()
    for off in (1 * G, 4 * G, 6 * G):
        write_and_close(tracked_image, [off])  # seal, unseal, seal...
    with Tracker.open(tracked_image) as t:
        assert t.consistent
        assert t.changed_extents(since) == [(1 * G, G), (4 * G, G), (6 * G, G)]


def test_incremental_sync_falls_back_to_hash_resync(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "backup").mkdir()
    image = tmp_path / "src" / "db.img"
    make_data_image(image, 8 * MiB, extents=4)
    Tracker.create(image).close()
    backup = tmp_path / "backup" / "db.img"
    assert sync(image, backup).change_id
    write_and_close(image, [11 * G + 100])  # after the change id the copy is at
    zero_eras(image)
    result = sync(image, backup)
    # It used to copy nothing: the eras said no block changed.
    assert backup.read_bytes() == image.read_bytes()
    assert any("hash resync" in n or "unclean" in n for n in result.notes), result.notes


def test_sidecar_of_the_previous_format_is_refused_clearly(tracked_image):
    side = side_of(tracked_image)
    with open(side, "r+b") as f:
        f.seek(OFF_VERSION)
        f.write(struct.pack("<I", 2))  # checksum left stale: the version is checked first
    with pytest.raises(SidecarCorruptError, match=r"version 2.*older blockmirror"):
        Tracker.open(tracked_image)
    with pytest.raises(SidecarCorruptError, match="older blockmirror"):
        TrackedImage(tracked_image)


def test_eras_seal_survives_a_killed_copier_reading(tracked_image):
    """Readers (a backup tool) take no part in sealing: one killed mid-scan
    changes nothing, and the eras stay trusted."""
    with Tracker.open(tracked_image) as t:
        since = t.change_id()
    write_and_close(tracked_image, [8 * G])
    code = ("import os, sys, blockmirror\n"
            "t = blockmirror.Tracker.open(sys.argv[1])\n"
            "t.changed_extents(sys.argv[2])\n"
            "os.kill(os.getpid(), 9)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(tracked_image), since],
                          env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    assert proc.returncode == -9
    with Tracker.open(tracked_image) as t:
        assert t.consistent
        assert t.changed_extents(since) == [(8 * G, G)]


def _open_and_write_at_once(image: str, barrier, index: int) -> None:  # type: ignore[no-untyped-def]
    barrier.wait(60)
    time.sleep(index * 0.004)  # staggered: later opens land inside the first check
    with TrackedImage(image) as img:
        for i in range(200):
            img.pwrite(b"w", ((index * 7919 + i * 104729) % 1000000) * 65536)


def test_writers_opening_together_do_not_flag_their_own_writes(ram_tmp_path):
    """Writers that open a sealed sidecar at the same instant: one checks the
    eras while the others wait, so nobody takes another's first writes for
    damage (that made test_multiprocess flaky under load)."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    image = ram_tmp_path / "big.img"
    with open(image, "wb") as f:
        f.truncate(1000000 * 65536)
    # 16M granules in 3907 chunks: a check reads 62 MiB of eras, long
    # enough for the others' opens to land inside it.
    Tracker.create(image, granularity=4096).close()
    for _round in range(4):
        with Tracker.open(image) as t:
            t.change_id()  # so the writes below raise eras (to the new generation)
        barrier = ctx.Barrier(4)
        procs = [ctx.Process(target=_open_and_write_at_once, args=(str(image), barrier, i))
                 for i in range(4)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(60)
            assert p.exitcode == 0
        with Tracker.open(image) as t:
            assert not t.info().eras_damaged
            assert t.consistent


def test_a_garbage_seal_word_does_not_hold_writers(tracked_image):
    """The seal word lives in the header's changing part (not checksummed):
    garbage saying another handle is checking delays a writer's open by at
    most about a second for a small image, then the writer goes on."""
    fd = os.open(side_of(tracked_image), os.O_RDWR)
    try:
        assert struct.unpack("<I", os.pread(fd, 4, OFF_ERA_SEAL)) == (2,)  # sealed, epoch 0
        os.pwrite(fd, struct.pack("<I", 0xFFFFFFFF), OFF_ERA_SEAL)  # "a handle is checking"
    finally:
        os.close(fd)
    t0 = time.monotonic()
    with TrackedImage(tracked_image) as img:
        img.pwrite(b"x", 0)
    assert time.monotonic() - t0 < 5


def test_eras_raised_in_a_chunk_sealed_empty_can_only_add_changes(tmp_path):
    """The check skips chunks sealed with all-zero eras (a huge sparse image
    then costs what its written chunks cost). Whatever lands in such a chunk
    later can only make changed_extents report more, never hide a write: the
    real write elsewhere still shows, and a planted era (written behind the
    tracker's back, not a write) is a change at most: while sealed the query
    skips such chunks unread too (issue 11), once a writer opens the seal it
    reads them."""
    tracked_image = tmp_path / "two-chunks.img"
    with open(tracked_image, "wb") as f:
        f.truncate(8192 * G)  # two chunks of 4096 granules
    Tracker.create(tracked_image).close()
    with Tracker.open(tracked_image) as t:
        since = t.change_id()
    write_and_close(tracked_image, [5 * G])  # chunk 0 written; the others sealed empty
    chunk_bytes = 512 + 4096 * 4 + 8
    fd = os.open(side_of(tracked_image), os.O_RDWR)
    try:  # era of granule 4100 (chunk 1) raised to a huge generation
        os.pwrite(fd, (2**31).to_bytes(4, "little"), ERAS + chunk_bytes + 4 * 4)
    finally:
        os.close(fd)
    with Tracker.open(tracked_image) as t:
        changed = t.changed_extents(since)
        assert t.consistent
    assert changed == [(5 * G, G)]
    with TrackedImage(tracked_image) as img:  # the seal open: every era read
        changed = img.tracker.changed_extents(since)
    assert (5 * G, G) in changed
    assert (4100 * G, G) in changed
