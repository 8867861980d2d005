"""The copier over the NFS stand-in (tests/nfs_standin.py): a filesystem that
reports every file as data, cannot punch holes, and makes every request pay a
round trip. The copy must still be exact and sparse, and keeping requests in
flight in parallel must pay off."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import nfs_standin
import numpy as np
import pytest
from imagetools import nonzero_cells

from blockmirror._bindings import copy as _copy
from blockmirror.copying.copier import Copier, CopyStats
from blockmirror.extents import EXTENT_DTYPE

KiB = 1024
MiB = 1024 * KiB
LATENCY = 0.003  # seconds per read/write request

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(
        nfs_standin.skip_reason() is not None, reason=str(nfs_standin.skip_reason())
    ),
]


@pytest.fixture(scope="module")
def standin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[nfs_standin.StandIn]:
    backing = tmp_path_factory.mktemp("nfs-backing")
    with nfs_standin.mounted(backing, latency=LATENCY) as fs:
        yield fs


@pytest.fixture
def area(standin: nfs_standin.StandIn, tmp_path: Path) -> Iterator[dict[str, Path]]:
    """A fresh folder on the stand-in (and its backing path) and a local one."""
    name = f"t{time.monotonic_ns()}"
    (standin.mountpoint / name).mkdir()
    yield {
        "remote": standin.mountpoint / name,
        "backing": standin.backing / name,
        "local": tmp_path,
    }


def make_image(path: Path, seed: int) -> bytes:
    """4 MiB: random data, written zeros, holes, zeros speckled with data."""
    rng = np.random.default_rng(seed)
    layout = ["data", "zeros", "hole", "speckled", "hole", "data", "zeros", "hole"]
    content = bytearray(len(layout) * 512 * KiB)
    with open(path, "wb") as f:
        for i, kind in enumerate(layout):
            off = i * 512 * KiB
            if kind == "hole":
                continue
            chunk = bytearray(512 * KiB)
            if kind == "data":
                chunk[:] = rng.integers(1, 256, len(chunk), dtype=np.uint8).tobytes()
            elif kind == "speckled":
                for pos in rng.integers(0, len(chunk), 5):
                    chunk[int(pos)] = 0xAB
            f.seek(off)
            f.write(chunk)
            content[off : off + len(chunk)] = chunk
        f.truncate(len(content))
    return bytes(content)


def copy_file(src: Path, dst: Path, *, fresh: bool, **kwargs: object) -> tuple[CopyStats, bool]:
    """Copy all of SRC into DST (which exists); returns the stats and whether
    the copier used copy_file_range at the end."""
    src_fd = os.open(src, os.O_RDONLY)
    dst_fd = os.open(dst, os.O_RDWR)
    try:
        with Copier(src_fd, dst_fd, **kwargs) as copier:  # type: ignore[arg-type]
            stats = copier.copy_extents(copier.allocated_extents(), dst_fresh=fresh)
            return stats, copier.uses_copy_file_range
    finally:
        os.close(src_fd)
        os.close(dst_fd)


def test_standin_hides_holes_and_punching(area: dict[str, Path]) -> None:
    content = make_image(area["remote"] / "img", seed=1)
    backing_fd = os.open(area["backing"] / "img", os.O_RDONLY)
    fd = os.open(area["remote"] / "img", os.O_RDWR)
    try:
        assert os.lseek(backing_fd, 0, os.SEEK_HOLE) < len(content)  # the disk has holes
        assert os.lseek(fd, 0, os.SEEK_HOLE) == len(content)  # the stand-in shows none
        with Copier(fd, fd) as copier:
            assert not copier.source_reports_holes()
            assert not copier.uses_copy_file_range
            assert [tuple(map(int, e)) for e in copier.allocated_extents()] == [(0, len(content))]
        # Punching is refused (EOPNOTSUPP): the engine reports it and writes zeros.
        extents = np.array([(len(content) - 512 * KiB, 512 * KiB)], dtype=EXTENT_DTYPE)
        handle = _copy.new_copier(fd, fd, 65536)
        counts = _copy.copy_extents(handle, extents, None)
        stats, found = vars(counts), counts.found_unsupported
        assert found & _copy.PUNCH_FAILED
        assert stats["bytes_punched"] == 512 * KiB
        # The handle remembers: the next call does not ask again.
        assert not _copy.capabilities(handle) & _copy.CAN_PUNCH
        again = _copy.copy_extents(handle, extents, None)
        assert again.found_unsupported == 0 and again.bytes_punched == 512 * KiB
    finally:
        os.close(fd)
        os.close(backing_fd)


@pytest.mark.parametrize("where", ["remote->remote", "local->remote", "remote->local"])
def test_bulk_copy_is_exact_and_sparse(area: dict[str, Path], where: str) -> None:
    src_side, dst_side = where.split("->")
    src = area[src_side] / "src.img"
    dst = area[dst_side] / "dst.img"
    content = make_image(src, seed=2)
    with open(dst, "wb") as f:
        f.truncate(len(content))
    stats, used_cfr = copy_file(src, dst, fresh=True, workers=4)
    assert dst.read_bytes() == content
    # Only a local source shows its holes; through the stand-in all is read
    # and zero detection alone keeps the copy sparse.
    assert stats.bytes_hole == 0
    if src_side == "remote":
        assert stats.bytes_read == len(content)
    assert not used_cfr  # never across filesystems, never without visible holes
    assert stats.bytes_written == nonzero_cells(content)
    on_disk = area["backing"] / "dst.img" if dst_side == "remote" else dst
    assert os.stat(on_disk).st_blocks * 512 <= stats.bytes_written + 64 * KiB


def test_dirty_pass_writes_zeros_where_punching_is_refused(area: dict[str, Path]) -> None:
    src = area["remote"] / "src.img"
    dst = area["remote"] / "dst.img"
    content = make_image(src, seed=3)
    old = os.urandom(len(content) - 256 * KiB)  # shorter: the copy runs past its end
    dst.write_bytes(old)
    stats, _ = copy_file(src, dst, fresh=False, workers=4)
    got = dst.read_bytes()
    # The trailing hole past the old end is not written (the caller sizes dst).
    assert got == content[: len(old)]
    assert not any(content[len(old) :])
    assert stats.bytes_punched == stats.bytes_zero  # every zero run overwritten
    assert stats.bytes_written == nonzero_cells(content)


def test_parallel_requests_beat_one_at_a_time(
    standin: nfs_standin.StandIn, area: dict[str, Path]
) -> None:
    """Each request pays LATENCY; with 4 workers 4 requests are in flight."""
    src = area["remote"] / "src.img"
    with open(src, "wb") as f:
        f.truncate(16 * MiB)
        rng = np.random.default_rng(4)
        for i in range(8):  # 4 MiB of data in 8 pieces, 12 MiB of holes
            f.seek(i * 2 * MiB)
            f.write(rng.integers(0, 256, 512 * KiB, dtype=np.uint8).tobytes())
    content = src.read_bytes()
    seconds = {}
    peaks = {}
    for workers in (1, 4):
        dst = area["remote"] / f"dst-{workers}.img"
        with open(dst, "wb") as f:
            f.truncate(16 * MiB)
        standin.stats()  # reset the peak
        start = time.perf_counter()
        stats, _ = copy_file(src, dst, fresh=True, workers=workers)
        seconds[workers] = time.perf_counter() - start
        peaks[workers] = standin.stats()["peak_inflight"]
        assert dst.read_bytes() == content
        assert stats.bytes_written == 4 * MiB
        assert os.stat(area["backing"] / dst.name).st_blocks * 512 <= 4 * MiB + 64 * KiB
    ratio = seconds[1] / seconds[4]
    print(f"stand-in {LATENCY * 1e3:.0f} ms/request: workers=1 {seconds[1]:.3f} s, "
          f"workers=4 {seconds[4]:.3f} s, ratio {ratio:.2f}, peak in flight {peaks}")  # fmt: skip
    assert peaks[4] > peaks[1]
    assert ratio >= 1.5
