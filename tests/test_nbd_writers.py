"""Unmodified NBD clients write through blockmirror's nbdkit plugin (issue 9):
qemu-io's patterns land where they were aimed, nbdinfo sees the image's
holes, nbdcopy copies in and out, and every byte any of them wrote is in the
sidecar's dirty bitmap."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from imagetools import MiB, is_sparse, make_data_image
from nbdlog import WriteLog
from nbdtools import Exports, connected, require

from blockmirror import Tracker
from blockmirror.extents import Extent

G = 64 * 1024


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Exports]:
    with Exports(tmp_path) as exports:
        yield exports


def granules(extents: list[tuple[int, int]], size: int) -> set[int]:
    """The granule numbers EXTENTS touch (I1 rounds marks out to granules)."""
    out: set[int] = set()
    for off, n in extents:
        if n > 0:
            out.update(range(off // G, min(-(-(off + n) // G), -(-size // G))))
    return out


def assert_tracked_exactly(image: Path, written: list[tuple[int, int]]) -> None:
    """The sidecar's dirty set is every granule WRITTEN touched, and no other."""
    with Tracker.open(image) as t:
        assert t.consistent
        dirty = granules(t.dirty_extents(), t.image_size)
        size = t.image_size
    want = granules(written, size)
    assert not want - dirty, f"writes missing from the bitmap: granules {sorted(want - dirty)[:10]}"
    assert not dirty - want, f"granules dirty that nobody wrote: {sorted(dirty - want)[:10]}"


def data_map(image: Path) -> list[Extent]:
    """The image's data extents, from SEEK_DATA/SEEK_HOLE."""
    out: list[Extent] = []
    with open(image, "rb") as f:
        size, pos = os.fstat(f.fileno()).st_size, 0
        while pos < size:
            try:
                pos = os.lseek(f.fileno(), pos, os.SEEK_DATA)
            except OSError:
                break
            end = os.lseek(f.fileno(), pos, os.SEEK_HOLE)
            out.append((pos, end - pos))
            pos = end
    return out


# -- qemu-io -------------------------------------------------------------------------

# (qemu-io command, offset, length, byte it leaves; None: zeroes)
QEMU_IO = [
    ("write -P 0xab 1M 64k", 1 * MiB, 64 * 1024, 0xAB),
    ("write -P 0xcd 3000001 5000", 3000001, 5000, 0xCD),  # unaligned, one granule
    ("write -f -P 0x5a 196600 300", 196600, 300, 0x5A),  # FUA, straddles a granule edge
    ("write -z 2200000 100000", 2200000, 100000, None),  # zeroes over data
    ("write -z -u 5M 128k", 5 * MiB, 128 * 1024, None),  # zeroes, may punch
    ("discard 6M 128k", 6 * MiB, 128 * 1024, None),  # aligned trim over data: a hole
]


def test_qemu_io_patterns_land_and_are_tracked(serve, tmp_path):
    require("qemu-io", "qemu-img")
    image = tmp_path / "disk.img"
    content = bytearray(make_data_image(image, 8 * MiB, extents=4, extent_size=1 * MiB, seed=5))
    # data under the zeroing and trimming commands, so they have something to undo
    with open(image, "r+b") as f:
        for off in (2 * MiB, 5 * MiB, 6 * MiB):
            f.seek(off)
            f.write(b"\x77" * MiB)
            content[off:off + MiB] = b"\x77" * MiB
    export = serve.start(image)
    args = [a for cmd, *_ in QEMU_IO for a in ("-c", cmd)]
    proc = subprocess.run(["qemu-io", "-f", "raw", export.uri, *args],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "failed" not in proc.stdout, proc.stdout + proc.stderr
    for _cmd, off, n, byte in QEMU_IO:
        content[off:off + n] = bytes([byte or 0]) * n
    expected = tmp_path / "expected.img"
    expected.write_bytes(content)
    for side in (str(image), export.uri):  # the file itself, and read back over NBD
        cmp = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", side,
                              str(expected)], capture_output=True, text=True, timeout=60)
        assert cmp.returncode == 0, f"{side}: {cmp.stdout}{cmp.stderr}"
    assert export.stop() == 0, export.stderr()
    assert_tracked_exactly(image, [(off, n) for _c, off, n, _b in QEMU_IO])


# -- nbdinfo --map ---------------------------------------------------------------------


def nbd_map(uri: str) -> list[dict[str, int]]:
    proc = subprocess.run(["nbdinfo", "--map", "--json", uri], capture_output=True,
                          text=True, timeout=60, check=True)
    return json.loads(proc.stdout)


def allocated(entries: list[dict[str, int]]) -> list[Extent]:
    """The entries with NBD_STATE_HOLE clear, merged."""
    out: list[Extent] = []
    for e in entries:
        if e["type"] & 1:
            continue
        if out and out[-1][0] + out[-1][1] == e["offset"]:
            out[-1] = (out[-1][0], out[-1][1] + e["length"])
        else:
            out.append((e["offset"], e["length"]))
    return out


def test_nbdinfo_map_shows_the_holes(serve, tmp_path):
    require("nbdinfo")
    image = tmp_path / "sparse.img"
    make_data_image(image, 32 * MiB, extents=5, extent_size=1 * MiB, seed=9)
    export = serve.start(image)
    entries = nbd_map(export.uri)
    assert sum(e["length"] for e in entries) == 32 * MiB
    assert allocated(entries) == data_map(image)
    assert len(data_map(image)) >= 2  # there are holes to see
    hole = [e for e in entries if e["type"] & 1]
    assert all(e["type"] & 2 for e in hole), "a hole must read as zeroes"
    # punch one data extent through the export: the map follows
    first = data_map(image)[0]
    with connected(export) as c:
        c.trim(first[1], first[0])
    assert first not in allocated(nbd_map(export.uri))
    assert allocated(nbd_map(export.uri)) == data_map(image)


# -- nbdcopy -----------------------------------------------------------------------------


def test_nbdcopy_in_and_out(serve, tmp_path):
    require("nbdcopy")
    source = tmp_path / "source.img"
    content = make_data_image(source, 32 * MiB, extents=6, extent_size=1 * MiB, seed=11)
    image = tmp_path / "export.img"
    make_data_image(image, 32 * MiB, extents=6, extent_size=1 * MiB, seed=12)  # other data
    export = serve.start(image)
    # in: nbdcopy uses several connections when the export allows multi-conn
    subprocess.run(["nbdcopy", str(source), export.uri], check=True, timeout=120)
    out = tmp_path / "out.img"
    subprocess.run(["nbdcopy", export.uri, str(out)], check=True, timeout=120)
    assert image.read_bytes() == content
    assert out.read_bytes() == content
    assert is_sparse(out)
    assert export.stop() == 0, export.stderr()
    # every range nbdcopy changed is dirty: the old data and the new data
    with Tracker.open(image) as t:
        dirty = granules(t.dirty_extents(), t.image_size)
    old = make_data_image(tmp_path / "old.img", 32 * MiB, extents=6, extent_size=1 * MiB,
                          seed=12)
    changed = {p // G for p in range(0, 32 * MiB, G) if old[p:p + G] != content[p:p + G]}
    assert changed and not changed - dirty


# -- the write log ------------------------------------------------------------------------


def test_every_logged_request_lands_and_is_tracked(serve, tmp_path):
    """4 connections of unaligned, granule-straddling writes, trims and
    zeroes: the image is every request applied, and the bitmap has every
    granule they touched."""
    image = tmp_path / "log.img"
    initial = make_data_image(image, 16 * MiB, extents=6, extent_size=1 * MiB, seed=2)
    export = serve.start(image)
    log = WriteLog(str(export.socket), 16 * MiB, pause=0).start()
    log.wait_for(300)
    log.stop()
    assert export.stop() == 0, export.stderr()
    assert image.read_bytes() == log.replayed(initial)
    ops = [op for w in log.writers for op in w.ops]
    assert {op.kind for op in ops} == {"write", "trim", "zero"}
    assert_tracked_exactly(image, [(op.offset, op.length) for op in ops])


def test_the_one_instant_check_can_fail(serve, tmp_path):
    """The checker itself: the image rebuilt at one instant of the log
    passes, connections taken at two far-apart instants do not. (Against
    ``nbdkit file``: this needs no plugin.)"""
    require("nbdkit")
    image = tmp_path / "plain.img"
    initial = make_data_image(image, 4 * MiB, extents=2, extent_size=1 * MiB, seed=3)
    export = serve.start(image, plugin=False)
    log = WriteLog(str(export.socket), 4 * MiB, pause=0.0002).start()
    log.wait_for(100)
    mid = time.monotonic()
    log.wait_for(100)
    log.stop()

    def at(times: list[float]) -> bytes:
        """Connection i's requests acknowledged before TIMES[i], applied."""
        return log.replayed(initial, [sum(op.acked < t for op in w.ops)
                                      for w, t in zip(log.writers, times, strict=True)])

    final = image.read_bytes()
    assert log.replayed(initial, log.assert_one_instant(final, initial)) == final
    ks = log.assert_one_instant(at([mid] * 4), initial)
    assert 0 < sum(ks) < sum(log.counts())
    with pytest.raises(AssertionError, match="no single instant"):
        log.assert_one_instant(at([mid] * 4), initial, after=mid + 1)
    torn = at([mid, mid, mid, float("inf")])
    with pytest.raises(AssertionError, match="no single instant"):
        log.assert_one_instant(torn, initial)
    broken = bytearray(image.read_bytes())
    broken[12345] ^= 0xFF
    with pytest.raises(AssertionError, match="not any prefix"):
        log.assert_one_instant(bytes(broken), initial)
