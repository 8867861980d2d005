"""Hash while copying into an NBD export (issue 11's "hash while copying",
for the NBD path): RemoteCopier digests each granule it copies whole from
the buffer it read and sent, with the local copier's function and zero
convention, so the export's manifest agrees with a local copy's; a sync
onto an export reads the source a second time only for granules the copy
could not see whole (the source's short last granule)."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest
from imagetools import MiB
from test_remote_incremental import manifests
from test_remote_nbd import serve  # noqa: F401  (a fixture)

from blockmirror import Tracker
from blockmirror._bindings import copy as _c
from blockmirror.copying.copier import Copier, DigestRequest
from blockmirror.copying.endpoint import NbdUri, parse
from blockmirror.copying.remote import NbdExport, RemoteCopier, libnbd_available
from blockmirror.migration import remote as remote_sync
from blockmirror.migration.digests import digest
from blockmirror.migration.options import SyncOptions
from blockmirror.migration.remote_manifest import RemoteManifest

pytestmark = [
    pytest.mark.skipif(not libnbd_available(),
                       reason="blockmirror._remote not built (needs libnbd-dev)"),
    pytest.mark.skipif(_c.digest_function() is None,
                       reason="xxhash's library does not export XXH3_64bits"),
]

K = 1024


def mixed_image(path: Path, g: int, granules: int, tail: int) -> bytes:
    """GRANULES granules then TAIL bytes (a short last granule): data,
    a granule of written zeros, holes, data ending and starting mid-granule,
    data in the short tail. Returns the content."""
    rng = random.Random(g)
    size = granules * g + tail
    content = bytearray(size)

    def put(offset: int, data: bytes) -> None:
        content[offset:offset + len(data)] = data

    put(0, rng.randbytes(4 * g))            # granules 0-3: data
    put(4 * g, bytes(g))                    # granule 4: zeros, written
    # granules 5-9: a hole
    put(10 * g + g // 3, rng.randbytes(g))  # data from mid-granule 10 into 11
    put(20 * g, rng.randbytes(6 * g + 7))   # granules 20-25 and 7 bytes of 26
    put(granules * g, rng.randbytes(tail))  # the short last granule
    with open(path, "wb") as f:
        f.truncate(size)
        for offset, length in ((0, 5 * g), (10 * g + g // 3, g), (20 * g, 6 * g + 7),
                               (granules * g, tail)):
            f.seek(offset)
            f.write(content[offset:offset + length])
    return bytes(content)


def expected(content: bytes, g: int, keys: list[int]) -> list[int]:
    return [digest(content[k * g:(k + 1) * g]) for k in keys]


def local_digests(src_fd: int, dst: Path, extents: list[tuple[int, int]], g: int
                  ) -> tuple[list[int], list[int]]:
    """What the local copier digests for the same extents (into a new file)."""
    fd = os.open(dst, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with Copier(src_fd, fd, use_copy_file_range=False) as copier:
            request = DigestRequest(g)
            copier.copy_extents(extents, dst_fresh=True, digests=request)
            keys, values = request.take()
    finally:
        os.close(fd)
    return keys.tolist(), values.tolist()


@pytest.mark.parametrize("g", [64 * K, 512 * K])  # 512 KiB: larger than a default request
def test_nbd_copy_digests_what_the_file_holds(g, ram_tmp_path, serve):  # noqa: F811
    """Data, written zeros, holes, data cut mid-granule and a short last
    granule: every whole granule copied is digested, equal to the file's
    own digest and to the local copier's; the short last granule and the
    granules an extent's edge cuts get none (the caller reads those)."""
    granules, tail = 32, 5000
    image = ram_tmp_path / "mixed.img"
    content = mixed_image(image, g, granules, tail)
    server = serve("nbdkit", (granules + 4) * g, junk=True)
    uri = parse(server.uri)
    assert isinstance(uri, NbdUri)
    fd = os.open(image, os.O_RDONLY)
    try:
        with NbdExport(uri, connections=2, write=True) as export, \
                RemoteCopier(fd, export, src_path=str(image)) as copier:
            whole = [(0, len(content))]
            request = DigestRequest(g)
            stats = copier.copy_extents(whole, digests=request)
            keys, values = request.take()
            # Data is read from its granule's start to its granule's end, no more.
            assert stats.bytes_read == 14 * g + tail, stats
            assert keys.tolist() == list(range(granules))
            assert values.tolist() == expected(content, g, list(range(granules)))
            assert values[4] == values[7] == digest(bytes(g))  # written zeros, hole
            assert server.file.read_bytes()[:len(content)] == content
            assert (keys.tolist(), values.tolist()) == local_digests(
                fd, ram_tmp_path / "local.img", whole, g)
            cut = [(g + 100, 4 * g), (10 * g + 1, 3 * g - 1), (20 * g, 7 * g)]
            request = DigestRequest(g)
            copier.copy_extents(cut, digests=request)
            keys, values = request.take()
            assert keys.tolist() == [2, 3, 4, 11, 12, 20, 21, 22, 23, 24, 25, 26]
            assert values.tolist() == expected(content, g, keys.tolist())
            assert (keys.tolist(), values.tolist()) == local_digests(
                fd, ram_tmp_path / "local2.img", cut, g)
    finally:
        os.close(fd)


def test_a_digest_sink_with_too_few_slots_is_refused(ram_tmp_path, serve):  # noqa: F811
    """The C call checks the sink: too few slots is EINVAL, nothing sent."""
    from blockmirror._bindings import remote as _r
    from blockmirror.extents import as_extent_array

    server = serve("nbdkit", 4 * MiB)
    uri = parse(server.uri)
    assert isinstance(uri, NbdUri)
    image = ram_tmp_path / "a.img"
    image.write_bytes(b"\x11" * MiB)
    fd = os.open(image, os.O_RDONLY)
    try:
        with NbdExport(uri, write=True) as export:
            out = np.zeros(3, dtype=np.uint64)  # 1 MiB of 64 KiB granules needs 16
            spec = (_c.digest_function(), 64 * K, digest(bytes(64 * K)), out)
            with pytest.raises(OSError, match="slots"):
                _r.copy_extents(export.handle, 0, fd, as_extent_array([(0, MiB)]), 65536,
                                digests=spec)
    finally:
        os.close(fd)
    assert server.file.read_bytes() == bytes(4 * MiB)


@pytest.mark.parametrize("tail", [0, 3000])
def test_a_sync_reads_the_source_again_only_for_the_short_last_granule(
        tail, ram_tmp_path, serve, monkeypatch):  # noqa: F811
    """An in-process sync of a tracked image into an export: the passes'
    digests come from the copy itself. The re-read (hash_granules) is
    never called when the image is whole granules, and only for the last,
    short granule otherwise; the manifest kept equals the served file's
    digests granule by granule (the short one hashed as it is)."""
    size = 8 * MiB + tail
    image = ram_tmp_path / "a.img"
    rng = random.Random(5)
    with open(image, "wb") as f:
        f.truncate(size)
        for offset in (0, 3 * MiB + 12345, size - 2 * MiB):
            f.seek(offset)
            f.write(rng.randbytes(MiB))
    os.chmod(image, 0o600)
    Tracker.create(str(image)).close()
    server = serve("nbdkit", 10 * MiB, junk=True)
    reread: list[list[list[int]]] = []
    real = remote_sync.hash_granules

    def counted(fd: int, runs: np.ndarray, *args: object, **kwargs: object) -> object:
        reread.append(runs.tolist())
        return real(fd, runs, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(remote_sync, "hash_granules", counted)
    result = remote_sync.sync_to_export(str(image), server.uri, SyncOptions())
    with Tracker.open(str(image)) as tracker:
        g = tracker.granularity
    last = size // g
    assert reread == ([] if tail == 0 else [[[last, last + 1]]]), reread
    [kept] = manifests(image)
    m = RemoteManifest.from_bytes(kept.read_bytes(), str(kept))
    assert m.change_id == result.change_id
    served = server.file.read_bytes()[:size]
    assert served == image.read_bytes()
    keys = np.arange(-(-size // g), dtype=np.int64)
    assert m.table.get(keys).tolist() == [digest(served[k * g:(k + 1) * g])
                                          for k in keys.tolist()]


def test_the_hashing_copy_releases_the_gil(ram_tmp_path, serve):  # noqa: F811
    """A hashing copy paced to ~0.5 s (one C call per item) leaves Python
    threads running throughout: the GIL is released for the call."""
    import threading
    import time

    g = 64 * K
    image = ram_tmp_path / "a.img"
    image.write_bytes(random.Random(3).randbytes(2 * MiB))
    server = serve("nbdkit", 2 * MiB)
    uri = parse(server.uri)
    assert isinstance(uri, NbdUri)
    ticks = 0
    done = threading.Event()

    def tick() -> None:
        nonlocal ticks
        while not done.is_set():
            ticks += 1
            time.sleep(0.001)

    fd = os.open(image, os.O_RDONLY)
    try:
        with NbdExport(uri, connections=1, write=True) as export, \
                RemoteCopier(fd, export, rate_limit=4 * MiB) as copier:
            thread = threading.Thread(target=tick)
            thread.start()
            try:
                request = DigestRequest(g)
                started = time.perf_counter()
                copier.copy_extents([(0, 2 * MiB)], digests=request)
                took = time.perf_counter() - started
            finally:
                done.set()
                thread.join()
    finally:
        os.close(fd)
    assert len(request.take()[0]) == 2 * MiB // g
    assert took > 0.3, took
    assert ticks > 100, (ticks, took)  # ~1 tick/ms while the copy ran
