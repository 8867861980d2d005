"""Issue 11: the manifest costs what the copy's data costs (format 3).

The digest table keeps only unknown runs and data granules; the file holds a
header, a body (the table) and, while a sync updates the copy, a journal of
granules made unknown. These tests hold the format to its promises: sizes
follow the data, a crash mid-update can only leave granules unknown, a
damaged body or journal is never trusted, and older formats are rebuilt or
refused cleanly.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
import xxhash
from imagetools import MiB, make_data_image

from blockmirror import Tracker
from blockmirror.migration import digests as dg
from blockmirror.migration import sync
from blockmirror.migration.manifest import (
    HEADER_BYTES,
    RECORD,
    Manifest,
    ManifestError,
    differing_extents,
    manifest_path,
)

G = 65536
TiB = 1 << 40


def _header(path: str) -> dict[str, object]:
    with open(path, "rb") as f:
        meta = json.loads(f.read(HEADER_BYTES).split(b"\n")[1])
    assert isinstance(meta, dict)
    return meta


@pytest.fixture
def huge(tmp_path: Path) -> tuple[Path, Path]:
    """A 1 TiB sparse source with 4 MiB of data in 4 places, and its copy."""
    src = tmp_path / "huge.img"
    with open(src, "wb") as f:
        f.truncate(TiB)
        for i, where in enumerate((0, 5 * MiB + 4096, TiB // 2, TiB - MiB)):
            f.seek(where)
            f.write(random.Random(i).randbytes(MiB))
    copy = tmp_path / "out" / "huge.img"
    copy.parent.mkdir()
    return src, copy


# -- the pure table ------------------------------------------------------------------


def _model_states(table: dg.DigestTable) -> list[int]:
    """The table granule by granule, for the model comparison (small sizes)."""
    keys = np.arange(table.granules, dtype=np.int64)
    return table.get(keys).tolist()


def test_table_against_a_dense_model():
    """The slow twin: a list of per-granule digests, updated the same way."""
    rng = random.Random(5)
    size = 40 * G + 123
    table = dg.DigestTable(G, size)
    zero, zero_last = dg.zero_digest(G), dg.zero_digest(123)
    model = [zero] * 40 + [zero_last]
    for _ in range(300):
        n = table.granules
        a = rng.randrange(n)
        b = min(n, a + rng.randrange(1, 6))
        op = rng.choice(["forget", "zero", "put", "put_zero"])
        if op == "forget":
            table.forget(np.array([[a, b]]))
            model[a:b] = [dg.UNKNOWN] * (b - a)
        elif op == "zero":
            table.set_zero(np.array([[a, b]]))
            model[a:b] = table.zero_digests(np.arange(a, b)).tolist()
        else:
            keys = np.arange(a, b, dtype=np.int64)
            vals = (table.zero_digests(keys) if op == "put_zero"
                    else np.array([rng.randrange(1, 2**64) for _ in keys], dtype=np.uint64))
            table.put(keys, vals)
            model[a:b] = vals.tolist()
        assert _model_states(table) == model
    zeros = table.zero_digests(np.arange(table.granules, dtype=np.int64)).tolist()
    # Only data granules are stored: zero ones, however they became zero, are not.
    assert len(table.keys) == sum(1 for v, z in zip(model, zeros, strict=True)
                                  if v not in (dg.UNKNOWN, z))


def test_run_algebra_matches_sets():
    rng = random.Random(9)
    for _ in range(200):
        def runs() -> tuple[np.ndarray, set[int]]:
            cells = sorted(rng.sample(range(60), rng.randrange(0, 30)))
            keys = np.array(cells, dtype=np.int64)
            return dg.runs_of_keys(keys), set(cells)
        (a, sa), (b, sb) = runs(), runs()
        assert set(dg.keys_of_runs(dg.union(a, b)).tolist()) == sa | sb
        assert set(dg.keys_of_runs(dg.subtract(a, b)).tolist()) == sa - sb
        assert set(dg.keys_of_runs(dg.intersect(a, b)).tolist()) == sa & sb


# -- cost follows the data ----------------------------------------------------------------


def test_a_tib_copy_has_a_manifest_the_size_of_its_data(huge):
    src, copy = huge
    sync(src, copy)
    path = manifest_path(str(copy))
    data_granules = 4 * (MiB // G) + 1  # the unaligned extent straddles one more
    assert os.path.getsize(path) <= HEADER_BYTES + 16 * data_granules + 4096
    m = Manifest.open(path)
    try:
        assert len(m.table.keys) == data_granules and not len(m.table.unknown)
        assert m.state == "clean" and m.unknown_extents() == []
    finally:
        m.close()


def test_hash_resync_of_a_tib_copy_reads_only_data(huge):
    """A hash resync finds the one changed granule and a stray write into a
    hole of the source, without walking the terabyte."""
    src, copy = huge
    sync(src, copy)
    with open(src, "r+b") as f:
        f.seek(TiB // 2 + 3 * G)
        f.write(b"changed")
    m = Manifest.open(manifest_path(str(copy)))
    m.table.put(np.array([7 * (TiB // G) // 8]), np.array([12345], dtype=np.uint64))
    fd = os.open(src, os.O_RDONLY)
    try:
        differ = differing_extents(m, fd, TiB)
    finally:
        os.close(fd)
        m.close()
    assert differ == [(TiB // 2 + 3 * G, G), (7 * TiB // 8, G)]


# -- crash safety ----------------------------------------------------------------------


def _made(tmp_path: Path) -> tuple[Path, Path]:
    image = tmp_path / "a.img"
    make_data_image(image, 8 * MiB, extents=4)
    copy = tmp_path / "out" / "a.img"
    copy.parent.mkdir()
    sync(image, copy)
    return image, copy


def test_forgotten_granules_stay_unknown_after_a_crash(tmp_path):
    _, copy = _made(tmp_path)
    path = manifest_path(str(copy))
    m = Manifest.open(path)
    m.begin_update()
    m.forget([(G, 2 * G), (5 * G, 1)])
    m.resize(8 * MiB + G // 2)
    m.close()  # the process dies here: nothing else was written
    m = Manifest.open(path)
    try:
        assert m.state == "updating" and m.image_size == 8 * MiB + G // 2
        assert m.unknown_extents() == [(G, 2 * G), (5 * G, G), (8 * MiB - G, G + G // 2)]
    finally:
        m.close()


def test_a_torn_journal_record_is_dropped_and_the_rest_kept(tmp_path):
    _, copy = _made(tmp_path)
    path = manifest_path(str(copy))
    m = Manifest.open(path)
    m.begin_update()
    m.forget([(0, G)])
    end = m.body.journal_end
    m.close()
    with open(path, "r+b") as f:  # half a second record: the crash came mid-append
        f.seek(end)
        f.write(RECORD.pack(1, 3, 4, 0, 0)[:20])
    m = Manifest.open(path)
    try:
        assert m.unknown_extents() == [(0, G)]
    finally:
        m.close()


def test_a_record_of_another_body_is_not_replayed(tmp_path):
    """Records carry their body's checksum: a stale one left behind an older
    body (a crash between a commit's header and its truncate) is not read."""
    _, copy = _made(tmp_path)
    path = manifest_path(str(copy))
    m = Manifest.open(path)
    m.begin_update()
    end = m.body.journal_end
    m.close()
    head = RECORD.pack(2, 1, 0, 12345, 0)[:-8]  # "resize to 1 byte", wrong epoch
    with open(path, "r+b") as f:
        f.seek(end)
        f.write(head + xxhash.xxh3_64_intdigest(head).to_bytes(8, "little"))
    m = Manifest.open(path)
    try:
        assert m.image_size == 8 * MiB and m.unknown_extents() == []
    finally:
        m.close()


@pytest.mark.parametrize("where", ["body", "counts"])
def test_a_damaged_body_is_refused(tmp_path, where):
    _, copy = _made(tmp_path)
    path = manifest_path(str(copy))
    meta = _header(path)
    body = meta["body"]
    assert isinstance(body, dict)
    with open(path, "r+b") as f:
        if where == "body":
            f.seek(int(body["offset"]) + 16)
            f.write(b"\xff" * 8)
        else:  # a forged header: right checksum, counts that do not add up
            body["data_granules"] = int(body["data_granules"]) + 1
            raw = json.dumps(meta, sort_keys=True).encode()
            f.write((b"BMMANIFEST 3\n" + raw + b"\n" + xxhash.xxh3_64_hexdigest(raw).encode()
                     + b"\n").ljust(HEADER_BYTES, b" "))
    with pytest.raises(ManifestError, match=r"corrupt|wrong size"):
        Manifest.open(path)


def test_a_malformed_table_with_a_valid_checksum_is_refused(tmp_path):
    """Whoever rewrites the body must also make it well formed: keys out of
    order (which would make lookups miss) are refused even with the right
    checksum."""
    _, copy = _made(tmp_path)
    path = manifest_path(str(copy))
    meta = _header(path)
    body = meta["body"]
    assert isinstance(body, dict) and int(body["data_granules"]) >= 2
    with open(path, "r+b") as f:
        f.seek(int(body["offset"]))
        words = np.frombuffer(f.read(int(body["length"])), dtype="<u8").copy()
        runs = 2 * int(body["unknown_runs"])
        words[runs], words[runs + 1] = words[runs + 1], words[runs]
        raw = words.tobytes()
        f.seek(int(body["offset"]))
        f.write(raw)
        body["xxh3"] = xxhash.xxh3_64_hexdigest(raw)
        head = json.dumps(meta, sort_keys=True).encode()
        f.seek(0)
        f.write((b"BMMANIFEST 3\n" + head + b"\n" + xxhash.xxh3_64_hexdigest(head).encode()
                 + b"\n").ljust(HEADER_BYTES, b" "))
    with pytest.raises(ManifestError, match="malformed"):
        Manifest.open(path)


# -- older formats, untrusted copies ---------------------------------------------------------


def _write_v2(path: str, size: int) -> None:
    body = json.dumps({"granularity": G, "image_size": size, "series": "", "generation": 0,
                       "state": "clean", "source": "", "format": 2}).encode()
    header = b"BMMANIFEST 2\n" + body + b"\n" + xxhash.xxh3_64_hexdigest(body).encode() + b"\n"
    with open(path, "wb") as f:
        f.write(header.ljust(HEADER_BYTES, b" "))
        f.truncate(HEADER_BYTES + 8 * (size // G))
    os.chmod(path, 0o600)


def test_a_format_2_manifest_is_rebuilt_from_the_copy(tmp_path):
    image, copy = _made(tmp_path)
    with open(copy, "r+b") as f:  # the copy is not what the old manifest said
        f.seek(3 * MiB)
        f.write(b"stale bytes")
    os.unlink(manifest_path(str(copy)))
    _write_v2(manifest_path(str(copy)), 8 * MiB)
    result = sync(image, copy)
    assert result.incremental and any("format 2" in n for n in result.notes)
    assert copy.read_bytes() == image.read_bytes()
    assert _header(manifest_path(str(copy)))["format"] == 3


def test_an_untrusted_sparse_copy_is_repaired_by_its_data_only(huge):
    """Untrusted: the source's and the copy's data are re-copied (stray data
    in a hole of the source goes), nothing else is read or written."""
    src, copy = huge
    Tracker.create(src).close()
    sync(src, copy)
    with open(copy, "r+b") as f:
        f.seek(TiB // 4)
        f.write(b"stray data where the source has a hole")
    result = sync(src, copy)
    assert any("full resync" in n for n in result.notes)
    assert result.bytes_copied <= 8 * MiB
    fd = os.open(copy, os.O_RDONLY)
    try:
        assert os.pread(fd, 64, TiB // 4) == bytes(64)
    finally:
        os.close(fd)
    m = Manifest.open(manifest_path(str(copy)))
    try:
        assert m.state == "clean" and m.unknown_extents() == []
        assert len(m.table.keys) == 4 * (MiB // G) + 1
    finally:
        m.close()


def test_a_commit_killed_between_body_and_header_leaves_the_old_state(tmp_path, monkeypatch):
    """The new body is written where it overlaps neither the old body nor
    its journal: a crash before the header points at it leaves the manifest
    as it was (updating, its forgets intact), and the next sync repairs."""
    image = tmp_path / "a.img"
    make_data_image(image, 8 * MiB, extents=4)
    Tracker.create(image).close()
    copy = tmp_path / "out" / "a.img"
    copy.parent.mkdir()
    sync(image, copy)
    with open(image, "r+b") as f:
        f.seek(G)
        f.write(b"new bytes" * 1000)
    with Tracker.open(image) as t:
        t.mark(G, 9000)
    real = Manifest._write_body

    def dies_after_the_body(self: Manifest, *, durable: bool = True) -> None:
        real(self, durable=durable)
        raise KeyboardInterrupt  # the process dies before the header is written

    monkeypatch.setattr(Manifest, "_write_body", dies_after_the_body)
    with pytest.raises(KeyboardInterrupt):
        sync(image, copy)
    monkeypatch.undo()
    m = Manifest.open(manifest_path(str(copy)))
    try:
        assert m.state == "updating" and (G, G) in m.unknown_extents()
    finally:
        m.close()
    result = sync(image, copy)
    assert copy.read_bytes() == image.read_bytes()
    assert any("did not finish" in n for n in result.notes)
