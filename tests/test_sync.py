"""blockmirror.sync end to end: exact copies under live writers, both modes."""

from __future__ import annotations

import json
import os
import time

import pytest
from imagetools import (
    MiB,
    is_sparse,
    make_data_image,
    partial_exists,
    run_cli,
    start_cli,
    wait_for,
    writer_dies,
)

import blockmirror
from blockmirror import Tracker
from blockmirror.migration import sync


def test_untracked_idle_copy_is_exact_and_sparse(dirs):
    src, dst = dirs
    content = make_data_image(src / "a.img", 32 * MiB, extents=4)
    result = sync(src / "a.img", dst)
    assert result.status == "ok" and not result.tracked
    out = (dst / "a.img").read_bytes()
    assert out == content
    assert is_sparse(dst / "a.img")
    assert result.passes[0].kind == "bulk"
    # No temporary file left beside the copy.
    assert sorted(os.listdir(dst)) == ["a.img", "a.img.bm-manifest"]


def test_size_not_a_multiple_of_the_granularity(dirs):
    src, dst = dirs
    size = 5 * MiB + 12345
    content = bytearray(os.urandom(size))
    (src / "odd.img").write_bytes(content)
    Tracker.create(src / "odd.img").close()
    result = sync(src / "odd.img", dst / "odd.img")
    assert result.tracked
    assert (dst / "odd.img").read_bytes() == bytes(content)


def test_copy_mode_is_the_source_at_the_freeze(dirs, live_writer):
    """A writer runs through the whole sync. The copy must equal the initial
    image with exactly a prefix of the logged writes applied (those before
    the freeze), and the source all of them."""
    src, dst = dirs
    image = src / "live.img"
    initial = make_data_image(image, 64 * MiB, extents=16, tracked=True)
    writer = live_writer(image, rate="16M", wait=20)
    result = sync(image, dst, target_downtime=0.3)
    writer.wait_for_more(10)  # still writing after the switch
    assert writer.stop() == 0
    k = writer.assert_point_in_time((dst / "live.img").read_bytes(), initial)
    assert 20 <= k < len(writer.writes())
    assert image.read_bytes() == writer.replayed(initial)
    assert result.downtime <= 0.3 * 4  # the freeze lease bounds it; target is what we aim at
    assert result.passes[-1].kind == "final"


def test_move_mode_loses_no_write(dirs, live_writer):
    """--move under a steady writer: after it stops, the destination is the
    initial image with every logged write applied in order; the source and
    its sidecar are gone; the writer never noticed."""
    src, dst = dirs
    image = src / "vm.img"
    initial = make_data_image(image, 64 * MiB, extents=16, tracked=True)
    writer = live_writer(image, rate="16M", wait=20)
    proc = run_cli("sync", image, dst, "--move", "--target-downtime", "300ms", "--json")
    assert proc.returncode == 0, proc.stderr
    writer.wait_for_more(10)  # it goes on writing, now into the destination
    assert writer.stop() == 0
    result = json.loads(proc.stdout)
    assert result["status"] == "ok" and result["mode"] == "move"
    assert not image.exists() and not (src / "vm.img.cbt").exists()
    assert (dst / "vm.img.cbt").exists()
    assert (dst / "vm.img").read_bytes() == writer.replayed(initial)


def test_verify_passes_under_a_live_writer(dirs, live_writer):
    src, dst = dirs
    image = src / "v.img"
    make_data_image(image, 32 * MiB, extents=8, tracked=True)
    live_writer(image, rate="16M", wait=10)
    result = sync(image, dst, target_downtime=0.3, verify=True)
    assert result.status == "ok" and result.verified


def test_unclean_sidecar_is_reset_and_copy_is_still_exact(dirs):
    src, dst = dirs
    image = src / "u.img"
    content = make_data_image(image, 16 * MiB, extents=4, tracked=True)
    writer_dies(image, how="exit")  # a writer that dies leaves the sidecar unclean
    assert Tracker.open(image).consistent is False
    result = sync(image, dst)
    assert any("unclean" in n for n in result.notes)
    assert (dst / "u.img").read_bytes() == content
    assert Tracker.open(image).consistent is True


def test_untracked_source_that_changes_is_refused(dirs):
    """Without a sidecar a writer is invisible; a change during the copy
    must fail the sync (never a torn copy) and leave nothing behind."""
    src, dst = dirs
    image = src / "raw.img"
    make_data_image(image, 32 * MiB, extents=8)
    calls = []

    def meddle(p):
        if not calls:
            with open(image, "r+b") as f:
                f.seek(5 * MiB)
                f.write(b"x" * 4096)
        calls.append(p)

    with pytest.raises(blockmirror.SourceChangedError, match="track enable"):
        sync(image, dst, progress=meddle)
    assert os.listdir(dst) == []


def test_not_converged_leaves_source_untouched(dirs, live_writer):
    """A copy capped far below the write rate cannot converge: it fails with
    NotConvergedError, removes the partial copy, and the writer never paused
    (its log keeps growing throughout). The writer is confined to a 2 MiB
    region, so the dirty set stays put instead of shrinking."""
    src, dst = dirs
    image = src / "hot.img"
    initial = make_data_image(image, 16 * MiB, extents=4, tracked=True)
    writer = live_writer(image, rate="16M", extra=["--region", "2M"], wait=10)
    with pytest.raises(blockmirror.NotConvergedError, match="source keeps running") as info:
        sync(image, dst, target_downtime=0.05, rate_limit=4 * MiB, max_passes=12)
    assert "stopped shrinking" in str(info.value)
    writer.wait_for_more(5)
    assert writer.stop() == 0
    assert os.listdir(dst) == []
    assert image.read_bytes() == writer.replayed(initial)
    with Tracker.open(image) as t:
        assert t.state == "running"
        assert t.info().throttle_bytes_per_s == 0


def test_throttle_strategy_converges_where_fail_would_not(dirs, live_writer):
    src, dst = dirs
    image = src / "t.img"
    make_data_image(image, 16 * MiB, extents=4, tracked=True)
    live_writer(image, rate="16M", extra=["--region", "2M"], wait=10)
    result = sync(image, dst, target_downtime=0.2, rate_limit=4 * MiB, max_passes=40,
                  converge="throttle")
    assert result.status == "ok"
    assert any("throttled" in n for n in result.notes)
    with Tracker.open(image) as t:
        assert t.info().throttle_bytes_per_s == 0  # lifted after the switch


def test_directory_mode_copies_home_files_first(dirs, tmp_path):
    src, _dst = dirs
    (src / "vm.vmx").write_text("memsize = 1024\n")
    (src / "vm.log").write_text("booted\n")
    content = make_data_image(src / "disk.img", 16 * MiB, extents=4, tracked=True)
    target = tmp_path / "moved"
    result = sync(src, target, mode="move")
    assert (target / "vm.vmx").read_text() == "memsize = 1024\n"
    assert (target / "vm.log").read_text() == "booted\n"
    assert (target / "disk.img").read_bytes() == content
    assert sorted(os.listdir(src)) == []
    assert [c.destination for c in result.children] == [str(target / "disk.img")]


def test_one_sync_per_source_at_a_time(dirs, tmp_path):
    """Two copiers would steal each other's dirty bits; the second is refused."""
    src, dst = dirs
    image = src / "one.img"
    make_data_image(image, 64 * MiB, extents=32, tracked=True)
    first = start_cli("sync", image, dst, "--bwlimit", "16M", "--quiet", capture=False)
    try:
        other = tmp_path / "other"
        other.mkdir()
        wait_for(lambda: partial_exists(dst), what="the first sync's partial copy")
        with pytest.raises(blockmirror.InvalidInputError, match="another sync"):
            sync(image, other)
        assert os.listdir(other) == []
    finally:
        assert first.wait(timeout=60) == 0


@pytest.mark.parametrize("change", ["grow", "shrink"])
def test_copy_follows_an_image_resized_during_sync(dirs, change):
    """A writer thread resizes the image while sync runs; the copy must have
    the size and bytes the source had at the freeze."""
    import threading

    from blockmirror import TrackedImage

    src, dst = dirs
    image = src / "r.img"
    make_data_image(image, 16 * MiB, extents=4, tracked=True)
    stop = threading.Event()

    def resize_loop():
        with TrackedImage(image) as w:
            size = w.size
            while not stop.is_set():
                if change == "grow":
                    w.pwrite(os.urandom(65536), size)  # append past the end
                    size += 65536
                else:
                    size = max(1 * MiB, size - 65536 - 123)
                    w.truncate(size)
                    w.pwrite(os.urandom(100), size - 100)
                time.sleep(0.002)

    thread = threading.Thread(target=resize_loop)
    thread.start()
    try:
        time.sleep(0.05)
        result = sync(image, dst, target_downtime=0.2, verify=True)
    finally:
        stop.set()
        thread.join()
    assert result.verified and result.passes[-1].kind == "final"
    assert os.path.getsize(dst / "r.img") == result.image_size
    if change == "grow":
        assert result.image_size > 16 * MiB
    else:
        assert result.image_size < 16 * MiB


def test_reader_follows_a_move(dirs):
    """A handle opened before a move reads the moved image afterwards, so it
    sees what other writers wrote there (not the stale source)."""
    from blockmirror import TrackedImage

    src, dst = dirs
    image = src / "follow.img"
    make_data_image(image, 8 * MiB, extents=2, tracked=True)
    with TrackedImage(image) as reader, TrackedImage(image) as writer:
        sync(image, dst, mode="move", target_downtime=0.5)
        writer.pwrite(b"after the move", 4096)  # follows the redirect
        assert reader.pread(14, 4096) == b"after the move"
        assert reader.path == str(dst / "follow.img")


def test_bulk_pass_reads_blocks_written_ahead_of_it_once(dirs):
    """Blocks written after the sync started but before the bulk pass
    reached them have their bits cleared as the pass reads them, so no dirty
    pass copies them again."""
    from blockmirror import TrackedImage

    src, dst = dirs
    image = src / "ahead.img"
    with open(image, "wb") as f:
        f.write(os.urandom(16 * MiB))
    Tracker.create(image).close()
    written = []

    def write_ahead(p):
        if p.phase == "bulk" and not written:
            with TrackedImage(image) as w:  # the last 4 MiB: far ahead of the copy
                for off in range(12 * MiB, 16 * MiB, 65536):
                    w.pwrite(os.urandom(65536), off)
            written.append(True)

    result = sync(image, dst, workers=1, rate_limit=16 * MiB, progress=write_ahead,
                  target_downtime=1.0)
    assert written
    recopied = sum(p.bytes for p in result.passes if p.kind != "bulk")
    assert recopied < 1 * MiB, [p.to_dict() for p in result.passes]
    assert (dst / "ahead.img").read_bytes() == image.read_bytes()


def test_move_waits_briefly_for_writers_to_follow_then_says_who_did_not(dirs):
    """A writer that learns of a move only at its next write still holds the
    source: the move waits a moment, removes it anyway (the writer cannot
    write there: ESTALE) and says so; the writer's next write reaches the
    copy."""
    src, dst = dirs
    image = src / "idle.img"
    make_data_image(image, 4 * MiB, extents=2, tracked=True)
    with blockmirror.TrackedImage(image) as idle:
        result = sync(image, dst, mode="move")
        assert not image.exists()
        assert any("had not reopened" in n for n in result.notes), result.notes
        idle.pwrite(b"\x42" * 4096, 0)
    assert (dst / "idle.img").read_bytes()[:4096] == b"\x42" * 4096
