"""Backup tooling (issue 5): change ids, several consumers, incremental sync,
hash resync after a crash, and refusal of corrupt manifests."""

from __future__ import annotations

import json
import os
import random
import time

import pytest
from imagetools import MiB, make_data_image, run_cli, start_cli, wait_for, write_at, writer_dies

import blockmirror
from blockmirror import ChangeIdInvalidError, TrackedImage, Tracker
from blockmirror.migration import sync
from blockmirror.migration.manifest import Manifest, manifest_path

G = 65536


def granules(extents):
    out = set()
    for offset, length in extents:
        out.update(range(offset // G, -(-(offset + length) // G)))
    return out


@pytest.fixture
def live(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "backup").mkdir()
    image = tmp_path / "src" / "db.img"
    initial = make_data_image(image, 32 * MiB, extents=8, tracked=True)
    return image, initial, tmp_path / "backup" / "db.img"


def test_full_then_incrementals_under_a_live_writer(live, live_writer):
    """Each backup equals the source at its change id's instant (a prefix of
    the writer's log), and each incremental copies only what changed."""
    image, initial, backup = live
    writer = live_writer(image, rate="4M", wait=5)
    results = []
    for _round in range(4):
        results.append(sync(image, backup, target_downtime=0.3))
        writer.assert_point_in_time(backup.read_bytes(), initial)
        writer.wait_for_more(8)
    assert writer.stop() == 0
    assert not results[0].incremental
    assert all(r.incremental for r in results[1:])
    assert all(r.change_id for r in results)
    for r in results[1:]:
        assert any("incremental since change id" in n for n in r.notes)
        # 4 MiB/s of 64 KiB writes between rounds: far less than the image.
        assert r.bytes_copied < results[0].bytes_copied
    manifest = Manifest.open(manifest_path(str(backup)))
    assert manifest.state == "clean" and manifest.change_id == results[-1].change_id


def test_sigkilled_writer_invalidates_ids_and_resync_is_exact(live, tmp_path):
    image, _initial, backup = live
    first = sync(image, backup)
    assert first.change_id
    # A writer writes some blocks, then dies without closing.
    writer_dies(image, [((i * 7919 % 500) * G, 4096) for i in range(20)])
    with Tracker.open(image) as t:
        assert not t.consistent
        with pytest.raises(ChangeIdInvalidError, match="unclean"):
            t.changed_extents(since=first.change_id)
    second = sync(image, backup)
    assert second.incremental
    assert any("hash resync" in n for n in second.notes)
    assert backup.read_bytes() == image.read_bytes()
    # The hash resync copied only the differing granules, not the image.
    assert second.bytes_copied <= 20 * G


def test_two_consumers_and_a_sync_never_miss_a_block(live, tmp_path):
    image, _initial, backup = live
    rng = random.Random(5)
    written_after = {"a": set(), "b": set()}
    with Tracker.open(image) as a, Tracker.open(image) as b, TrackedImage(image) as w:
        id_a = a.change_id()
        for _ in range(30):
            off = rng.randrange(512) * G
            w.pwrite(b"\x01" * 4096, off)
            written_after["a"].add(off // G)
        id_b = b.change_id()
        for step in range(60):
            off = rng.randrange(512) * G
            w.pwrite(b"\x02" * 4096, off)
            written_after["a"].add(off // G)
            written_after["b"].add(off // G)
            if step == 20:
                sync(image, backup)  # clears the dirty bitmap for its passes
            if step == 40:
                # interleaved queries must not consume anything either
                assert written_after["a"] <= granules(a.changed_extents(id_a))
        assert written_after["a"] <= granules(a.changed_extents(id_a))
        assert written_after["b"] <= granules(b.changed_extents(id_b))
        assert written_after["b"] <= granules(a.changed_extents(id_b))


def test_change_id_rules(live):
    image, _initial, _backup = live
    with Tracker.open(image) as t:
        cid = t.change_id()
        assert t.changed_extents(cid) == []
        for bad in ("", "nonsense", "abc:1", t.series + ":x"):
            with pytest.raises(ChangeIdInvalidError, match="not a blockmirror change id"):
                t.changed_extents(bad)
        with pytest.raises(ChangeIdInvalidError, match="never handed out"):
            t.changed_extents(f"{t.series}:999")
        t.reset()
        with pytest.raises(ChangeIdInvalidError, match="another series"):
            t.changed_extents(cid)
        everything = t.changed_extents("*")
        assert sum(n for _, n in everything) == 8 * MiB  # the allocated data


def test_sync_killed_mid_incremental_is_repaired_by_hash(live, tmp_path):
    """Kill a sync halfway through updating a copy, then put the source back
    as it was at the copy's change id. The copy now holds blocks the source
    no longer has; only because their digests were forgotten before they
    were overwritten does the hash resync find them."""
    image, initial, backup = live
    sync(image, backup)
    assert backup.read_bytes() == initial
    changed = [(i * 37 % 512) * G for i in range(200)]  # 12.5 MiB of changes
    with TrackedImage(image) as w:
        for off in changed:
            w.pwrite(os.urandom(G), off)
    proc = start_cli("sync", image, backup, "--bwlimit", "4M", "--quiet", capture=False)
    try:
        wait_for(lambda: Manifest.open(manifest_path(str(backup))).state == "updating",
                 what="the sync to start updating the copy")
        time.sleep(0.8)
    finally:
        proc.kill()
        proc.wait()
    assert Manifest.open(manifest_path(str(backup))).state == "updating"
    torn = backup.read_bytes()
    assert torn != initial  # the killed sync did write part of the update
    with TrackedImage(image) as w:  # undo every change on the source
        for off in changed:
            w.pwrite(initial[off:off + G], off)
    assert image.read_bytes() == initial
    result = sync(image, backup)
    assert any("did not finish" in n for n in result.notes)
    assert backup.read_bytes() == initial


def test_corrupt_manifest_is_refused(live):
    image, _initial, backup = live
    sync(image, backup)
    before = backup.read_bytes()
    path = manifest_path(str(backup))
    write_at(path, 4096 + 8 * 3, b"\x00\x01\x02\x03")
    proc = run_cli("sync", image, backup)
    assert proc.returncode == 2
    assert "corrupt" in proc.stderr and "--force" in proc.stderr
    assert backup.read_bytes() == before
    write_at(path, 0, b"garbage!")
    with pytest.raises(blockmirror.InvalidInputError, match="not a blockmirror manifest"):
        sync(image, backup)
    # --force takes a full copy and a fresh manifest.
    result = sync(image, backup, force=True)
    assert not result.incremental
    assert Manifest.open(path).state == "clean"


def test_changed_command(live):
    image, _initial, _backup = live
    with Tracker.open(image) as t:
        cid = t.change_id()
    with TrackedImage(image) as w:
        w.pwrite(b"z" * 100, 3 * MiB + 10)
    proc = run_cli("changed", image, "--since", cid, "--json", "--new-id")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["extents"] == [[3 * MiB, G]] and out["new_change_id"].startswith(cid[:32])
    proc = run_cli("changed", image, "--since", "0" * 32 + ":0")
    assert proc.returncode == 2 and "full copy" in proc.stderr


def test_manifest_is_a_trust_boundary(live):
    """Whoever can edit the digests can make a hash resync skip blocks: the
    manifest is created 0600 and refused when others can write it."""
    import stat as stat_mod

    image, _initial, backup = live
    sync(image, backup)
    path = manifest_path(str(backup))
    assert stat_mod.S_IMODE(os.stat(path).st_mode) == 0o600
    os.chmod(path, 0o666)
    with pytest.raises(blockmirror.InvalidInputError, match="not trusted"):
        sync(image, backup)
    os.chmod(path, 0o600)
    link = str(backup) + ".link"
    os.rename(path, link)
    os.symlink(link, path)
    with pytest.raises(blockmirror.InvalidInputError, match="cannot be opened"):
        sync(image, backup)
