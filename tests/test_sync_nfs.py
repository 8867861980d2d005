"""sync to and from the NFS stand-in (tests/nfs_standin.py): no SEEK_HOLE, no
hole punching, no copy_file_range, a round trip per request. The copy must be
exact and sparse, parallel requests must pay off, and where the destination
refuses what move mode needs, the failure must be clean."""

from __future__ import annotations

from pathlib import Path

import nfs_standin
import pytest
from imagetools import MiB, allocated_bytes, make_data_image, run_cli

from blockmirror.migration import sync

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(nfs_standin.skip_reason() is not None,
                       reason=str(nfs_standin.skip_reason())),
]


@pytest.fixture
def nfs(tmp_path):
    backing = tmp_path / "export"
    backing.mkdir()
    with nfs_standin.mounted(backing, latency=0.002) as fs:
        yield fs, backing


def test_copy_onto_nfs_under_a_writer_is_exact_and_sparse(nfs, tmp_path, live_writer):
    fs, backing = nfs
    image = tmp_path / "vm.img"
    initial = make_data_image(image, 32 * MiB, extents=8, tracked=True)
    writer = live_writer(image, rate="4M", wait=5)
    result = sync(image, fs.mountpoint, target_downtime=0.5)
    # and an incremental update of that copy, over the same mount
    writer.wait_for_more(10)
    again = sync(image, fs.mountpoint, target_downtime=0.5)
    assert writer.stop() == 0
    assert result.status == "ok" and again.incremental
    writer.assert_point_in_time((backing / "vm.img").read_bytes(), initial)
    # 8 MiB of data plus the writer's blocks: far below the 32 MiB apparent size.
    assert allocated_bytes(backing / "vm.img") < 16 * MiB


def test_copy_from_nfs_stays_sparse_by_zero_detection(nfs, tmp_path):
    """Reading from the stand-in, every byte looks like data; all-zero blocks
    must still become holes."""
    fs, backing = nfs
    content = make_data_image(backing / "remote.img", 32 * MiB, extents=4)
    dst = tmp_path / "local.img"
    result = sync(Path(fs.mountpoint) / "remote.img", dst)
    assert dst.read_bytes() == content
    assert allocated_bytes(dst) <= 4 * MiB + 65536
    assert result.passes[0].bytes == 32 * MiB  # the whole file was read: no SEEK_HOLE


def test_parallel_requests_reach_the_server_at_once(nfs, tmp_path):
    """Reading from the stand-in, each request pays 2 ms: with four workers
    the server must see several requests in flight at once, with one only
    one. (Counted, not timed: on a loaded machine a timed ratio wobbles;
    the speed-up itself is measured in bench/. Writes into one file on a
    FUSE direct_io mount are serialised by the kernel, unlike NFS, so the
    read side is the one looked at.)"""
    fs, backing = nfs
    make_data_image(backing / "p.img", 32 * MiB, extents=12)
    peaks = {}
    for workers in (1, 4):
        fs.stats()  # resets the peak
        sync(Path(fs.mountpoint) / "p.img", tmp_path / f"w{workers}.img", workers=workers)
        peaks[workers] = fs.stats()["peak_inflight"]
    assert peaks[1] == 1 and peaks[4] >= 3, peaks


def test_move_onto_a_mount_that_refuses_shared_mmap_fails_cleanly(nfs, tmp_path, live_writer):
    """The stand-in's direct_io files refuse MAP_SHARED (ENODEV), which the
    destination's sidecar needs. The move must fail before the switch: the
    destination side removed, the source and its writer untouched."""
    fs, backing = nfs
    image = tmp_path / "m.img"
    initial = make_data_image(image, 16 * MiB, extents=4, tracked=True)
    writer = live_writer(image, rate="2M", wait=3)
    proc = run_cli("sync", image, fs.mountpoint, "--move")
    assert proc.returncode == 1, proc.stderr
    assert "No such device" in proc.stderr or "map" in proc.stderr
    writer.wait_for_more(3)  # not frozen, not redirected
    assert writer.stop() == 0
    assert list(backing.iterdir()) == []
    assert image.read_bytes() == writer.replayed(initial)


def test_move_onto_an_mmap_capable_mount(tmp_path, live_writer):
    """Without direct_io the stand-in allows shared mappings, as NFS does:
    move mode works and the writer follows the image there."""
    backing = tmp_path / "export"
    backing.mkdir()
    image = tmp_path / "mv.img"
    initial = make_data_image(image, 16 * MiB, extents=4, tracked=True)
    with nfs_standin.mounted(backing, latency=0.001, direct_io=False) as fs:
        writer = live_writer(image, rate="2M", wait=3)
        result = sync(image, fs.mountpoint, mode="move", target_downtime=0.5)
        writer.wait_for_more(5)
        assert writer.stop() == 0  # before the unmount: it writes there now
        assert result.status == "ok"
        moved = (Path(fs.mountpoint) / "mv.img").read_bytes()
    assert not image.exists()
    assert moved == writer.replayed(initial)
