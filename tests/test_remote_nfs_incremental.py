"""Incremental sync onto a file on an NFS server (issue 12): the file's
manifest is kept beside the source (``SRC.bm-remote/``, as for an NBD
export), and the next sync to the same ``nfs://`` URL, when that manifest
still describes the file, updates the file in place on the server with
only what changed since (no partial, no rename: the served file keeps its
inode). Any doubt - the file changed behind our back, the manifest corrupt,
the tracker reset, --force, a sync killed midway - must end in a full copy
through the partial that makes the file the source again.

Served by a real nfs-ganesha in a second network namespace (the fixtures
of test_remote_nfs.py); the exported folder is read directly to check what
reached the server."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import test_remote_nfs
from imagetools import MiB, make_data_image, run_cli, start_cli, wait_for
from test_remote_nfs import kill_server_in_final_pass, one_line_error, partials, sync_json

from blockmirror import TrackedImage, Tracker
from blockmirror.copying.nfs import libnfs_available
from blockmirror.migration.digests import digest
from blockmirror.migration.remote_manifest import FOLDER_SUFFIX, RemoteManifest

pytestmark = pytest.mark.skipif(not libnfs_available(),
                                reason="blockmirror._nfs not built (needs libnfs-dev)")

serve_nfs = test_remote_nfs.serve_nfs  # the fixture: ganesha in a second host
SIZE = 32 * MiB
GRANULE = 64 * 1024


def manifests(image: Path) -> list[Path]:
    folder = Path(str(image) + FOLDER_SUFFIX)
    return sorted(folder.glob("*.manifest")) if folder.is_dir() else []


def write_tracked(image: Path, offset: int, data: bytes) -> bytes:
    """One tracked write of DATA at OFFSET; the image's new content."""
    with TrackedImage(str(image)) as w:
        w.pwrite(data, offset)
    return image.read_bytes()


def assert_full_copy(result: dict[str, object], said: str) -> None:
    """RESULT is a full copy through the partial, with a note containing SAID."""
    notes = result["notes"]
    assert isinstance(notes, list) and isinstance(result["passes"], list)
    assert not result["incremental"] and result["passes"][0]["kind"] == "bulk", result
    assert result["bytes_skipped"] == 0, result
    assert any(said in n for n in notes), notes
    assert any("renamed over the target" in n for n in notes), notes


def first_sync(image: Path, url: str, served: Path, content: bytes) -> int:
    """The first sync to URL: a full copy, exact, with a manifest kept; the
    served file's inode."""
    result = sync_json(image, url)
    assert_full_copy(result, "full copy: no manifest")
    assert served.read_bytes() == content and len(manifests(image)) == 1
    return served.stat().st_ino


# -- the incremental path ---------------------------------------------------------------


def test_second_sync_updates_only_the_changed_granules_in_place(ram_tmp_path, serve_nfs):
    """Three granules change between two syncs (new data over data, new data
    in a hole, zeros over data): the second sync is incremental, sends only
    those granules (two of data, one of zeros) into the served file itself
    (same inode, no partial), and leaves it the source, exactly; the new
    manifest's digests are the served file's own."""
    server = serve_nfs()
    image = ram_tmp_path / "a.img"
    content = make_data_image(image, SIZE, extents=12, tracked=True)
    url, served = server.url("disk.img"), server.folder / "disk.img"
    inode = first_sync(image, url, served, content)
    data = [k for k in range(0, SIZE, GRANULE) if any(content[k:k + GRANULE])]
    hole = next(k for k in range(0, SIZE, GRANULE) if not any(content[k:k + GRANULE]))
    write_tracked(image, data[3], b"\x33" * GRANULE)
    write_tracked(image, hole, b"\x44" * GRANULE)
    content = write_tracked(image, data[-2], bytes(GRANULE))
    second = sync_json(image, url, "--verify")
    assert second["incremental"] and second["verified"], second
    passes = second["passes"]
    assert isinstance(passes, list) and passes[0]["kind"] == "incremental", passes
    assert passes[0]["bytes"] == 3 * GRANULE, passes
    assert second["bytes_written"] == 2 * GRANULE, second  # the zeros are not data
    assert second["bytes_skipped"] == SIZE - 3 * GRANULE, second
    assert any("in place" in n for n in second["notes"]), second["notes"]
    assert served.read_bytes() == content
    assert served.stat().st_ino == inode, "the file was replaced, not updated in place"
    assert partials(server.folder) == []
    [kept] = manifests(image)
    m = RemoteManifest.from_bytes(kept.read_bytes(), str(kept))
    assert m.change_id == second["change_id"] and m.export == url
    keys = np.arange(SIZE // GRANULE, dtype=np.int64)
    want = [digest(content[k * GRANULE:(k + 1) * GRANULE]) for k in keys.tolist()]
    assert m.table.get(keys).tolist() == want


def test_incremental_under_a_live_writer_is_the_source_at_one_instant(ram_tmp_path, serve_nfs,
                                                                      live_writer):
    """A writer confined to the first 4 MiB runs through both syncs: the
    second is incremental, copies about the writer's region only, and the
    served file is the source at its switchover (a longer prefix of the
    writer's log than the first sync's); the writer is never left frozen."""
    server = serve_nfs()
    image = ram_tmp_path / "live.img"
    initial = make_data_image(image, SIZE, extents=12, tracked=True)
    url, served = server.url("disk.img"), server.folder / "disk.img"
    region = 4 * MiB
    writer = live_writer(image, rate="4M", wait=20, extra=["--region", str(region)])
    first = sync_json(image, url, "--target-downtime", "1s")
    assert not first["incremental"]
    k1 = writer.assert_point_in_time(served.read_bytes(), initial)
    inode = served.stat().st_ino
    writer.wait_for_more(30)
    second = sync_json(image, url, "--target-downtime", "1s", "--verify")
    writer.wait_for_more(10)  # not left frozen
    assert writer.stop() == 0
    k2 = writer.assert_point_in_time(served.read_bytes(), initial)
    assert k2 > k1, "the second sync shows no write the first did not"
    assert second["incremental"] and second["verified"], second
    passes = second["passes"]
    assert isinstance(passes, list) and passes[0]["kind"] == "incremental"
    assert passes[0]["bytes"] <= region + GRANULE, passes
    assert second["bytes_copied"] <= 2 * region < first["bytes_copied"], (first, second)
    assert served.stat().st_ino == inode and partials(server.folder) == []


# -- doubt means a full copy --------------------------------------------------------------


@pytest.mark.parametrize("how", ["junk", "another source"])
def test_a_file_changed_behind_our_back_means_a_full_copy(how, ram_tmp_path, serve_nfs):
    """The served file rewritten between two syncs (junk over all of it on
    the server's side, or another image synced to the same URL): the
    sampled granules disagree with the manifest, so the next sync is a full
    copy through the partial, and the file is the source again."""
    server = serve_nfs()
    image = ram_tmp_path / "a.img"
    content = make_data_image(image, SIZE, extents=12, tracked=True)
    url, served = server.url("disk.img"), server.folder / "disk.img"
    first_sync(image, url, served, content)
    if how == "junk":
        with open(served, "r+b") as f:
            f.write(b"\x5a" * SIZE)
    else:
        other = ram_tmp_path / "other.img"
        make_data_image(other, SIZE, extents=20, seed=9, tracked=True)
        sync_json(other, url)
    assert served.read_bytes() != content
    again = sync_json(image, url)
    assert_full_copy(again, "written behind")
    assert served.read_bytes() == content
    assert manifests(image) and partials(server.folder) == []


def test_a_missing_file_means_a_full_copy(ram_tmp_path, serve_nfs):
    """The served file removed (through the server) since the last sync:
    nothing to update in place; a full copy makes it again."""
    server = serve_nfs()
    image = ram_tmp_path / "a.img"
    content = make_data_image(image, SIZE, extents=12, tracked=True)
    url, served = server.url("disk.img"), server.folder / "disk.img"
    first_sync(image, url, served, content)
    from blockmirror.copying import endpoint
    from blockmirror.copying.nfs import NfsFile

    parsed = endpoint.parse(url)
    assert isinstance(parsed, endpoint.NfsUrl)
    with NfsFile(parsed, connections=1) as nfs_file:
        assert nfs_file.discard(nfs_file.target) is None
    assert not served.exists()
    again = sync_json(image, url)
    assert_full_copy(again, "for update")
    assert served.read_bytes() == content


@pytest.mark.parametrize("damage", ["digest", "header", "truncated"])
def test_a_corrupt_manifest_means_a_full_copy(damage, ram_tmp_path, serve_nfs):
    """One digest flipped, the header edited, or the file cut short: the
    manifest is refused and the sync copies everything (the change since
    the last sync is one granule: a used manifest would copy only that)."""
    server = serve_nfs()
    image = ram_tmp_path / "a.img"
    content = make_data_image(image, SIZE, extents=12, tracked=True)
    url, served = server.url("disk.img"), server.folder / "disk.img"
    first_sync(image, url, served, content)
    [kept] = manifests(image)
    raw = bytearray(kept.read_bytes())
    if damage == "digest":
        raw[-3] ^= 0x40
    elif damage == "header":
        raw = raw.replace(b'"generation": ', b'"generation": 1', 1)
    else:
        raw = raw[:-8]
    kept.write_bytes(bytes(raw))
    content = write_tracked(image, 5 * MiB, b"\x44" * GRANULE)
    again = sync_json(image, url)
    assert_full_copy(again, "full copy: manifest")
    assert served.read_bytes() == content


@pytest.mark.parametrize("why, said", [
    ("reset", "another series"),
    ("force", "full copy: --force"),
    ("untracked", "full copy: the source is not tracked"),
])
def test_a_reset_tracker_force_or_no_tracker_means_a_full_copy(why, said, ram_tmp_path,
                                                               serve_nfs):
    """The sidecar recreated (a new series: no change id of the old one can
    be trusted; found before the partial is chosen, so the file is not
    rewritten whole in place), --force, or no sidecar at all: a full copy
    through the partial, the file exact."""
    server = serve_nfs()
    image = ram_tmp_path / "a.img"
    content = make_data_image(image, SIZE, extents=12, tracked=True)
    url, served = server.url("disk.img"), server.folder / "disk.img"
    inode = first_sync(image, url, served, content)
    content = write_tracked(image, 7 * MiB, b"\x55" * GRANULE)
    if why != "force":
        os.unlink(str(image) + ".cbt")
    if why == "reset":
        Tracker.create(str(image)).close()
    again = sync_json(image, url, *(["--force"] if why == "force" else []))
    assert_full_copy(again, said)
    assert served.read_bytes() == content
    assert served.stat().st_ino != inode  # renamed over it, not updated in place
    assert partials(server.folder) == []


# -- failures of an update in place --------------------------------------------------------


def update_started(served: Path, offset: int, length: int, marker: bytes) -> bool:
    """Some of MARKER reached the served file's [OFFSET, OFFSET+LENGTH)."""
    with open(served, "rb") as f:
        f.seek(offset)
        return marker in f.read(length)


def test_a_sync_killed_mid_update_leaves_no_manifest_and_the_next_is_full(ram_tmp_path,
                                                                        serve_nfs):
    """SIGKILL of the CLI while its incremental first pass writes the
    served file: the manifest went before the first byte did, so the next
    sync is a full copy (its note says why) and the file is exact again."""
    server = serve_nfs()
    image = ram_tmp_path / "a.img"
    content = make_data_image(image, SIZE, extents=12, tracked=True)
    url, served = server.url("disk.img"), server.folder / "disk.img"
    first_sync(image, url, served, content)
    content = write_tracked(image, 0, b"\x33" * (24 * MiB))  # 24 MiB to re-copy
    proc = start_cli("sync", image, url, "--bwlimit", "2M")
    marker = b"\x33" * GRANULE
    wait_for(lambda: update_started(served, 0, 24 * MiB, marker)
             or proc.poll() is not None, 30, "the killed sync to write the file", every=0.01)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    assert served.read_bytes() != content, "the killed sync finished its update"
    assert manifests(image) == [], "a sync killed midway left a manifest"
    with Tracker.open(image) as tracker:
        wait_for(lambda: tracker.state == "running", 10, "the tracker to be running")
    again = sync_json(image, url)
    assert_full_copy(again, "full copy: no manifest")
    assert served.read_bytes() == content
    assert partials(server.folder) == []


def test_export_full_during_an_update_in_place_is_exit_4(ram_tmp_path, serve_nfs):
    """The export's filesystem (a 32 MiB tmpfs) filled by another file after
    the first sync; the second, in place, writes 8 MiB of new data where the
    served file has holes: the server says NOSPC (at WRITE or COMMIT), exit
    4 in one line saying the file was left partly updated, no manifest, the
    source untouched. With room again, the next sync is a full copy, exact."""
    server = serve_nfs(tiny="32m")
    small = server.folder / "small"
    image = ram_tmp_path / "a.img"
    content = make_data_image(image, SIZE, extents=8, tracked=True)
    url, served = server.url("small/disk.img"), small / "disk.img"
    first_sync(image, url, served, content)
    holes = [k for k in range(0, SIZE, MiB) if not any(content[k:k + MiB])][:8]
    for k in holes:
        content = write_tracked(image, k, os.urandom(MiB))
    filler = small / "filler"
    with contextlib.suppress(OSError), open(filler, "wb") as f:
        while True:  # until this host's write of the tmpfs fails: it is full
            f.write(b"\xff" * MiB)
            f.flush()
    proc = run_cli("sync", image, url)
    line = one_line_error(proc, 4)
    assert "ran out of space" in line and "left partly updated" in line, line
    assert manifests(image) == []
    assert image.read_bytes() == content  # the source is untouched
    os.truncate(filler, 0)
    again = sync_json(image, url)
    assert_full_copy(again, "full copy: no manifest")
    assert served.read_bytes() == content
    assert sorted(p.name for p in small.iterdir()) == ["disk.img", "filler"]


def test_server_killed_mid_update_then_a_full_copy_after_restart(ram_tmp_path, serve_nfs,
                                                                 live_writer):
    """ganesha SIGKILLed while an incremental sync updates the served file
    under a live writer: exit 1 within seconds, one line saying the file was
    left partly updated; the writer goes on. Restarted, the next sync is a
    full copy (no manifest) and the file is the source at its switchover."""
    server = serve_nfs()
    image = ram_tmp_path / "live.img"
    content = make_data_image(image, SIZE, extents=12, tracked=True)
    url, served = server.url("disk.img"), server.folder / "disk.img"
    first_sync(image, url, served, content)
    initial = write_tracked(image, 8 * MiB, b"\x33" * (24 * MiB))
    writer = live_writer(image, rate="4M", wait=10, extra=["--region", "4M"])
    proc = start_cli("sync", image, url, "--bwlimit", "4M")
    wait_for(lambda: update_started(served, 8 * MiB, 24 * MiB, b"\x33" * GRANULE)
             or proc.poll() is not None, 30, "the sync to write the file", every=0.01)
    assert proc.poll() is None, proc.communicate()
    server.kill_server()
    started = time.monotonic()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, err
    assert time.monotonic() - started < 15, "the failure took too long"
    assert len(err.strip().splitlines()) == 1 and "left partly updated" in err, err
    writer.wait_for_more(10, timeout=5)
    assert manifests(image) == []
    server.restart()
    again = sync_json(image, url, "--target-downtime", "1s")
    assert writer.stop() == 0
    assert_full_copy(again, "full copy: no manifest")
    writer.assert_point_in_time(served.read_bytes(), initial)
    assert partials(server.folder) == []


def test_server_killed_in_the_final_pass_of_an_update(ram_tmp_path, serve_nfs, live_writer):
    """The server dies while writers are frozen for the final pass of an
    incremental sync: exit 1 saying the file was left partly updated, and
    the writer goes on at once (long before the lease), the tracker running."""
    server = serve_nfs()
    image = ram_tmp_path / "live.img"
    content = make_data_image(image, SIZE, extents=4, tracked=True)
    url, served = server.url("disk.img"), server.folder / "disk.img"
    first_sync(image, url, served, content)
    write_tracked(image, 16 * MiB, b"\x33" * (16 * MiB))  # the first pass: 16 MiB at 4 MB/s
    writer = live_writer(image, rate="8M", wait=20, extra=["--region", "8M"])
    proc = start_cli("sync", image, url, "--bwlimit", "4M", "--target-downtime", "10s",
                     "--max-passes", "2")
    err = kill_server_in_final_pass(server, image, proc, writer)
    assert "left partly updated" in err, err
    assert manifests(image) == []


def test_two_targets_of_one_source_keep_a_manifest_each(ram_tmp_path, serve_nfs):
    """Two NFS targets of one source keep a manifest each (named by URL):
    syncing to one never makes the other's incremental lie."""
    server = serve_nfs()
    image = ram_tmp_path / "a.img"
    content = make_data_image(image, SIZE, extents=12, tracked=True)
    urls = [server.url("one.img"), server.url("two.img")]
    for url in urls:
        sync_json(image, url)
    assert len(manifests(image)) == 2
    content = write_tracked(image, 9 * MiB, b"\x66" * GRANULE)
    for url in urls:
        result = sync_json(image, url)
        assert result["incremental"], result
        assert result["passes"][0]["bytes"] == GRANULE  # type: ignore[index]
    for name in ("one.img", "two.img"):
        assert (server.folder / name).read_bytes() == content
    assert run_cli("verify", image, urls[1]).returncode == 0


# -- hash while copying ----------------------------------------------------------------------


@pytest.mark.parametrize("g", [64 * 1024, 512 * 1024])  # 512 KiB: not a default request's divisor
def test_nfs_copy_digests_what_the_file_holds(g, ram_tmp_path, serve_nfs):
    """As into an NBD export (test_remote_hashing.py): every whole granule
    NfsCopier copies is digested from the bytes it sent, equal to the
    file's own digest and to the local copier's; data is read from its
    granule's start to its granule's end; granules an extent's edge cuts,
    and the short last one, get none."""
    from test_remote_hashing import expected, local_digests, mixed_image

    from blockmirror._bindings import copy as _c
    from blockmirror.copying import endpoint
    from blockmirror.copying.copier import DigestRequest
    from blockmirror.copying.nfs import NfsCopier, NfsFile

    if _c.digest_function() is None:
        pytest.skip("xxhash's library does not export XXH3_64bits")
    server = serve_nfs()
    granules, tail = 32, 5000
    image = ram_tmp_path / "mixed.img"
    content = mixed_image(image, g, granules, tail)
    parsed = endpoint.parse(server.url("mixed.img"))
    assert isinstance(parsed, endpoint.NfsUrl)
    fd = os.open(image, os.O_RDONLY)
    try:
        with NfsFile(parsed, connections=2) as nfs_file:
            nfs_file.create_partial(len(content), 0o600)
            with NfsCopier(fd, nfs_file, src_path=str(image)) as copier:
                whole = [(0, len(content))]
                request = DigestRequest(g)
                stats = copier.copy_extents(whole, dst_fresh=True, digests=request)
                keys, values = request.take()
                assert stats.bytes_read == 14 * g + tail, stats
                assert keys.tolist() == list(range(granules))
                assert values.tolist() == expected(content, g, list(range(granules)))
                assert (keys.tolist(), values.tolist()) == local_digests(
                    fd, ram_tmp_path / "local.img", whole, g)
                cut = [(g + 100, 4 * g), (10 * g + 1, 3 * g - 1), (20 * g, 7 * g)]
                request = DigestRequest(g)
                copier.copy_extents(cut, digests=request)  # over what is there: in place
                keys, values = request.take()
                assert keys.tolist() == [2, 3, 4, 11, 12, 20, 21, 22, 23, 24, 25, 26]
                assert values.tolist() == expected(content, g, keys.tolist())
            nfs_file.publish()
    finally:
        os.close(fd)
    assert (server.folder / "mixed.img").read_bytes() == content


def test_a_sync_to_nfs_never_reads_the_source_twice(ram_tmp_path, serve_nfs, monkeypatch):
    """In-process syncs of a tracked image (whole granules) to NFS, a full
    copy then an incremental one: the digests come from the copy itself,
    so the source is never read again to hash it (hash_granules is not
    called), and each manifest kept equals the served file's digests."""
    from blockmirror.migration import remote as remote_sync  # NfsPassRunner's _copy is its
    from blockmirror.migration import sync
    from blockmirror.migration.options import SyncOptions

    server = serve_nfs()
    image = ram_tmp_path / "a.img"
    content = make_data_image(image, SIZE, extents=12, tracked=True)
    url, served = server.url("disk.img"), server.folder / "disk.img"
    reread: list[object] = []
    real = remote_sync.hash_granules

    def counted(fd: int, runs: object, *args: object, **kwargs: object) -> object:
        reread.append(runs)
        return real(fd, runs, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(remote_sync, "hash_granules", counted)
    for incremental in (False, True):
        if incremental:
            content = write_tracked(image, 3 * MiB + 12345, b"\x77" * (GRANULE + 9))
        result = sync(str(image), url, SyncOptions())
        assert result.incremental is incremental, result.notes
        assert reread == [], reread
        assert served.read_bytes() == content
        [kept] = manifests(image)
        m = RemoteManifest.from_bytes(kept.read_bytes(), str(kept))
        assert m.change_id == result.change_id
        keys = np.arange(SIZE // GRANULE, dtype=np.int64)
        assert m.table.get(keys).tolist() == [digest(content[k * GRANULE:(k + 1) * GRANULE])
                                              for k in keys.tolist()]
