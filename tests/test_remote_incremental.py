"""Incremental sync onto an NBD export (issue 12): the export's manifest is
kept beside the source (``SRC.bm-remote/``), and the next sync to the same
export copies only what changed since the change id the export is exact at.

What is written to the export is counted from nbdkit's log filter (every
Write / Zero / Trim request it served), not only from the result. Any
doubt - the export overwritten behind our back, the manifest corrupt or
missing, the tracker reset, a sync killed midway - must end in a full copy
that makes the export the source again."""

from __future__ import annotations

import os
import re
import signal
import stat
from pathlib import Path

import numpy as np
import pytest
from imagetools import MiB, make_data_image, run_cli, start_cli, wait_for
from test_remote_nbd import serve, sync_json  # noqa: F401  (serve: a fixture)

from blockmirror import TrackedImage, Tracker
from blockmirror.copying.remote import libnbd_available
from blockmirror.migration.digests import digest
from blockmirror.migration.remote_manifest import FOLDER_SUFFIX, RemoteManifest

pytestmark = pytest.mark.skipif(not libnbd_available(),
                                reason="blockmirror._remote not built (needs libnbd-dev)")

SIZE = 32 * MiB
GRANULE = 64 * 1024
REQUEST = re.compile(rb"\b(Write|Zero|Trim|Read) id=\d+ offset=(0x[0-9a-f]+) count=(0x[0-9a-f]+)")


def logged_server(serve, tmp: Path, *, junk: bool = True):  # noqa: F811
    log = tmp / "nbdkit-requests.log"
    return serve("nbdkit", SIZE, junk=junk, filters=("log", f"logfile={log}")), log


def requests_since(log: Path, start: int) -> list[tuple[str, int, int]]:
    """Every Write/Zero/Trim nbdkit logged after byte START of its log."""
    return [r for r in logged(log, start) if r[0] != "Read"]


def logged(log: Path, start: int = 0) -> list[tuple[str, int, int]]:
    """Every request nbdkit logged after byte START of its log (Read too)."""
    with open(log, "rb") as f:
        f.seek(start)
        text = f.read()
    return [(m[1].decode(), int(m[2], 16), int(m[3], 16)) for m in REQUEST.finditer(text)]


def assert_wrote_everything(log: Path, start: int) -> None:
    """nbdkit saw the whole image written (data, or zeros) since START."""
    covered = sum(count for _, _, count in requests_since(log, start))
    assert covered >= SIZE, f"only {covered} bytes written: not a full copy"


def manifests(image: Path) -> list[Path]:
    folder = Path(str(image) + FOLDER_SUFFIX)
    return sorted(folder.glob("*.manifest")) if folder.is_dir() else []


def write_tracked(image: Path, offset: int, length: int, byte: int) -> bytes:
    """One tracked write of LENGTH bytes of BYTE at OFFSET; the image's new content."""
    with TrackedImage(str(image)) as w:
        w.pwrite(bytes([byte]) * length, offset)
    return image.read_bytes()


def test_second_sync_copies_only_what_changed_under_a_live_writer(ram_tmp_path, serve,  # noqa: F811
                                                                  live_writer):
    """A writer confined to the first 4 MiB runs through both syncs. The
    second sync is incremental: nbdkit saw no request outside the writer's
    region (plus granule rounding), the result says what it skipped, and
    the export is the source at the second switchover (a longer prefix of
    the writer's log than the first). The manifest is private and holds no
    user info from the URI."""
    image = ram_tmp_path / "live.img"
    initial = make_data_image(image, SIZE, extents=12, tracked=True)
    server, log = logged_server(serve, ram_tmp_path)
    uri = server.uri.replace("nbd+unix://", "nbd+unix://alice@")
    region = 4 * MiB
    writer = live_writer(image, rate="4M", wait=20, extra=["--region", str(region)])
    first = sync_json(image, uri, "--target-downtime", "1s")
    assert not first["incremental"] and first["passes"][0]["kind"] == "bulk"
    k1 = writer.assert_point_in_time(server.file.read_bytes(), initial)
    # The passes hashed what they copied from the source: only the final
    # pass's granules were read back from the export, not the whole copy.
    read_back = sum(count for kind, _, count in logged(log) if kind == "Read")
    assert read_back <= region + 2 * MiB, read_back
    [kept] = manifests(image)
    assert stat.S_IMODE(kept.stat().st_mode) == 0o600
    assert stat.S_IMODE(kept.parent.stat().st_mode) == 0o700
    assert b"alice" not in kept.read_bytes() and "alice" not in kept.name
    writer.wait_for_more(30)
    start = log.stat().st_size
    second = sync_json(image, uri, "--target-downtime", "1s")
    writer.wait_for_more(10)  # not left frozen
    assert writer.stop() == 0
    k2 = writer.assert_point_in_time(server.file.read_bytes(), initial)
    assert k2 > k1, "the second sync shows no write the first did not"
    assert second["incremental"] and second["passes"][0]["kind"] == "incremental", second
    assert second["bytes_skipped"] >= SIZE - region - GRANULE, second
    assert second["passes"][0]["bytes"] <= region + GRANULE
    sent = requests_since(log, start)
    assert sent, "nbdkit logged no request in the second sync"
    assert all(offset + count <= region + GRANULE for _, offset, count in sent), sent[:5]
    assert sum(count for _, _, count in sent) < SIZE // 2


@pytest.mark.parametrize("how", ["junk", "another source"])
def test_an_export_overwritten_behind_our_back_is_detected(how, ram_tmp_path, serve):  # noqa: F811
    """The export's file rewritten between two syncs (junk over all of it,
    or another image synced into the same export): the sampled granules
    disagree with the manifest, so the next sync is a full copy, and the
    export is the source again."""
    image = ram_tmp_path / "a.img"
    content = make_data_image(image, SIZE, extents=12, tracked=True)
    server, log = logged_server(serve, ram_tmp_path, junk=False)
    sync_json(image, server.uri)
    assert server.file.read_bytes() == content and manifests(image)
    if how == "junk":
        server.file.write_bytes(b"\x5a" * SIZE)
    else:
        other = ram_tmp_path / "other.img"
        make_data_image(other, SIZE, extents=20, seed=9, tracked=True)
        sync_json(other, server.uri)
    start = log.stat().st_size
    again = sync_json(image, server.uri)
    assert_wrote_everything(log, start)
    assert not again["incremental"], again
    assert any("written behind" in n for n in again["notes"]), again["notes"]
    assert server.file.read_bytes() == content
    assert manifests(image)  # the full copy keeps a manifest for the next one


def test_a_sync_killed_mid_copy_leaves_no_manifest_and_the_next_is_full(ram_tmp_path,
                                                                        serve):  # noqa: F811
    """SIGKILL of the CLI while its incremental first pass writes the
    export: the manifest went before the first byte did, so the next sync
    is a full copy (its note says why) and the export is exact again."""
    image = ram_tmp_path / "a.img"
    make_data_image(image, SIZE, extents=12, tracked=True)
    server, log = logged_server(serve, ram_tmp_path, junk=False)
    sync_json(image, server.uri)
    assert manifests(image)
    content = write_tracked(image, 0, 24 * MiB, 0x33)  # 24 MiB to re-copy
    start = log.stat().st_size
    proc = start_cli("sync", image, server.uri, "--bwlimit", "2M")
    wait_for(lambda: requests_since(log, start) or proc.poll() is not None, 30,
             "the killed sync to write the export", every=0.01)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    assert server.file.read_bytes() != content, "the killed sync finished its copy"
    assert manifests(image) == [], "a sync killed midway left a manifest"
    with Tracker.open(image) as tracker:
        wait_for(lambda: tracker.state == "running", 10, "the tracker to be running")
    start = log.stat().st_size
    again = sync_json(image, server.uri)
    assert_wrote_everything(log, start)
    assert not again["incremental"], again
    assert any(n.startswith("full copy: no manifest") for n in again["notes"]), again["notes"]
    assert server.file.read_bytes() == content


@pytest.mark.parametrize("damage", ["digest", "header", "truncated", "group-writable"])
def test_a_corrupt_manifest_means_a_full_copy(damage, ram_tmp_path, serve):  # noqa: F811
    """One digest flipped, the header edited, the file cut short, or its
    mode loosened: the manifest is refused and the sync copies everything.
    (A flipped digest could otherwise vouch for a granule the sample never
    reads; here the change since the last sync is one granule, so a used
    manifest would copy only that.)"""
    image = ram_tmp_path / "a.img"
    make_data_image(image, SIZE, extents=12, tracked=True)
    server, log = logged_server(serve, ram_tmp_path, junk=False)
    sync_json(image, server.uri)
    [kept] = manifests(image)
    raw = bytearray(kept.read_bytes())
    if damage == "digest":
        raw[-3] ^= 0x40
    elif damage == "header":
        raw = raw.replace(b'"generation": ', b'"generation": 1', 1)
    elif damage == "truncated":
        raw = raw[:-8]
    kept.write_bytes(bytes(raw))
    if damage == "group-writable":
        os.chmod(kept, 0o620)
    content = write_tracked(image, 5 * MiB, GRANULE, 0x44)
    start = log.stat().st_size
    again = sync_json(image, server.uri)
    assert_wrote_everything(log, start)
    assert not again["incremental"], again
    assert again["passes"][0]["kind"] == "bulk" and again["bytes_skipped"] == 0
    assert any(n.startswith("full copy: manifest") for n in again["notes"]), again["notes"]
    assert server.file.read_bytes() == content


@pytest.mark.parametrize("why, said", [
    ("reset", "another series"),
    ("force", "full copy: --force"),
])
def test_a_reset_tracker_or_force_means_a_full_copy(why, said, ram_tmp_path, serve):  # noqa: F811
    """The sidecar recreated (a new series: no change id of the old one can
    be trusted), or --force: a full copy, the export exact."""
    image = ram_tmp_path / "a.img"
    make_data_image(image, SIZE, extents=12, tracked=True)
    server, log = logged_server(serve, ram_tmp_path, junk=False)
    sync_json(image, server.uri)
    if why == "reset":
        os.unlink(str(image) + ".cbt")
        Tracker.create(str(image)).close()
    content = write_tracked(image, 7 * MiB, GRANULE, 0x55)
    start = log.stat().st_size
    again = sync_json(image, server.uri, *(["--force"] if why == "force" else []))
    assert_wrote_everything(log, start)
    assert not again["incremental"], again
    assert any(said in n for n in again["notes"]), again["notes"]
    assert server.file.read_bytes() == content


def test_the_manifest_records_the_export_as_flushed(ram_tmp_path, serve,  # noqa: F811
                                                   live_writer):
    """Under a live writer, the manifest's digests are the export's own at
    the switchover (compared granule by granule with the served file), at
    the change id the result names - not the source's after the thaw."""
    image = ram_tmp_path / "a.img"
    make_data_image(image, SIZE, extents=12, tracked=True)
    server, _ = logged_server(serve, ram_tmp_path)
    writer = live_writer(image, rate="8M", wait=20, extra=["--region", "2M"])
    result = sync_json(image, server.uri, "--target-downtime", "1s")
    writer.wait_for_more(20)
    assert writer.stop() == 0
    [kept] = manifests(image)
    m = RemoteManifest.from_bytes(kept.read_bytes(), str(kept))
    assert m.change_id == result["change_id"] and m.export == server.uri
    assert m.export_size == SIZE and m.image_size == SIZE
    export = server.file.read_bytes()
    keys = np.arange(SIZE // GRANULE, dtype=np.int64)
    want = [digest(export[k * GRANULE:(k + 1) * GRANULE]) for k in keys.tolist()]
    assert m.table.get(keys).tolist() == want
    assert run_cli("verify", image, server.uri).returncode == 5  # the writer went on


def test_a_folder_others_can_write_is_never_used(ram_tmp_path, serve):  # noqa: F811
    """SRC.bm-remote made by someone else (here: writable by all): no
    manifest is read from it or kept in it; each sync is a full copy."""
    image = ram_tmp_path / "a.img"
    make_data_image(image, SIZE, extents=12, tracked=True)
    server, log = logged_server(serve, ram_tmp_path, junk=False)
    sync_json(image, server.uri)
    folder = Path(str(image) + FOLDER_SUFFIX)
    os.chmod(folder, 0o777)
    content = write_tracked(image, 3 * MiB, GRANULE, 0x66)
    start = log.stat().st_size
    again = sync_json(image, server.uri)
    assert_wrote_everything(log, start)
    assert not again["incremental"]
    assert any("writable by others" in n for n in again["notes"]), again["notes"]
    assert any(n.startswith("no manifest kept") for n in again["notes"]), again["notes"]
    assert server.file.read_bytes() == content


def test_incremental_into_qemu_nbd_is_exact_and_verified(ram_tmp_path, serve,  # noqa: F811
                                                         live_writer):
    """The same through qemu-nbd (one connection, no log filter: the
    result counts): the second sync copies about the writer's region only,
    verifies, and the export is the source at its switchover."""
    image = ram_tmp_path / "live.img"
    initial = make_data_image(image, SIZE, extents=12, tracked=True)
    server = serve("qemu-nbd", SIZE, junk=True)
    region = 2 * MiB
    writer = live_writer(image, rate="4M", wait=20, extra=["--region", str(region)])
    first = sync_json(image, server.uri, "--target-downtime", "1s")
    writer.wait_for_more(30)
    second = sync_json(image, server.uri, "--target-downtime", "1s", "--verify")
    assert writer.stop() == 0
    writer.assert_point_in_time(server.file.read_bytes(), initial)
    assert not first["incremental"] and second["incremental"] and second["verified"], second
    assert second["bytes_copied"] <= 4 * region < first["bytes_copied"] // 4, second
