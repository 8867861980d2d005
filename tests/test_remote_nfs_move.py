"""`blockmirror sync --move SRC nfs://...` (issue 12): the image moves onto a
file on an NFS server (nfs-ganesha in a second host) while writers run.
Under the freeze the final pass goes into the partial, which is committed
(COMMIT3) and renamed over the target, and only then are writers sent
there: their next I/O goes to the file through libnfs (WRITE3, COMMIT3 at
their flush), untracked. Every logged write before and after the switch
must end in the served file; a failure before the redirect leaves the
source with every write and its writers running on it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import test_remote_nfs
from imagetools import MiB, cli_killed_at, make_data_image, run_cli
from test_remote_move import all_writes, stop_all, writers_on
from test_remote_nfs import one_line_error

from blockmirror import TrackedImage, Tracker
from blockmirror.copying.nfs import libnfs_available

pytestmark = pytest.mark.skipif(not libnfs_available(),
                                reason="blockmirror._nfs not built (needs libnfs-dev)")

serve_nfs = test_remote_nfs.serve_nfs  # the fixture: ganesha in a second host


def test_move_onto_an_nfs_file_loses_no_write(ram_tmp_path, serve_nfs):
    """Two writers (one also discarding) through a move: the served file
    ends as the initial image with every logged write applied, before and
    after the switch; no partial is left; the source and its sidecar are
    gone."""
    server = serve_nfs()
    image = ram_tmp_path / "vm.img"
    size = 32 * MiB
    initial = make_data_image(image, size, extents=8, tracked=True)
    writers = writers_on(image, ram_tmp_path, size, 2, rate="2M", discard_every=5)
    try:
        proc = run_cli("sync", image, server.url("vm.img"), "--move", "--target-downtime",
                       "500ms", "--json")
        assert proc.returncode == 0, proc.stderr
        before = [w.count() for w in writers]
        for w in writers:
            w.wait_for_more(10)  # writing on, now into the NFS file
    finally:
        stop_all(writers)
    result = json.loads(proc.stdout)
    assert result["status"] == "ok" and result["mode"] == "move"
    assert result["passes"][-1]["kind"] == "final"
    assert any("moved onto the NFS file" in n for n in result["notes"]), result["notes"]
    assert all(w.count() > n for w, n in zip(writers, before, strict=True))
    assert not image.exists() and not Path(f"{image}.cbt").exists()
    served = server.folder / "vm.img"
    assert served.read_bytes() == all_writes(initial, writers), "a logged write is missing"
    assert sorted(p.name for p in server.folder.iterdir()) == ["vm.img"]


def test_a_writer_reads_zeroes_flushes_and_grows_the_nfs_file_after_a_move(ram_tmp_path,
                                                                            serve_nfs):
    """The library API: a TrackedImage opened before the move writes, zeroes,
    discards, flushes, reads and resizes the NFS file after it."""
    server = serve_nfs()
    image = ram_tmp_path / "a.img"
    size = 8 * MiB
    make_data_image(image, size, extents=2, tracked=True)
    with TrackedImage(image) as img:
        img.pwrite(b"before" * 100, 4096)
        proc = run_cli("sync", image, server.url("a.img"), "--move")
        assert proc.returncode == 0, proc.stderr
        img.pwrite(b"after!" * 100, 1 * MiB)
        img.write_zeroes(2 * MiB, 65536)
        img.discard(3 * MiB, 65536)
        img.flush()
        assert img.export is not None and img.size == size
        assert img.pread(600, 1 * MiB) == b"after!" * 100
        assert img.pread(600, 4096) == b"before" * 100
        img.truncate(size + MiB)
        assert img.size == size + MiB
    content = (server.folder / "a.img").read_bytes()
    assert len(content) == size + MiB
    assert content[1 * MiB:1 * MiB + 600] == b"after!" * 100
    assert content[4096:4696] == b"before" * 100
    assert content[2 * MiB:2 * MiB + 65536] == bytes(65536)
    assert content[3 * MiB:3 * MiB + 65536] == bytes(65536)
    assert not image.exists()


def test_a_move_killed_before_its_redirect_keeps_every_write_on_the_source(ram_tmp_path,
                                                                           serve_nfs):
    """SIGKILL after the commit and rename, before the redirect: writers
    resume on the source, which keeps every write; rerunning the move
    finishes it."""
    server = serve_nfs()
    image = ram_tmp_path / "live.img"
    size = 16 * MiB
    initial = make_data_image(image, size, extents=4, tracked=True)
    writers = writers_on(image, ram_tmp_path, size, 1, rate="4M")
    try:
        writers[0].wait_for_writes(10)
        cli_killed_at("blockmirror.tracking.tracker", "Tracker.redirect_to_export", "sync",
                      image, server.url("live.img"), "--move", "--target-downtime", "1s")
        writers[0].wait_for_more(10, timeout=10)  # not frozen past the lease
    finally:
        stop_all(writers)
    with Tracker.open(image) as tracker:
        assert tracker.state == "running"
    kept = image.read_bytes()
    assert kept == all_writes(initial, writers), "the source lost a logged write"
    proc = run_cli("sync", image, server.url("live.img"), "--move", "--force")
    assert proc.returncode == 0, proc.stderr
    assert not image.exists()
    assert (server.folder / "live.img").read_bytes() == kept


def test_a_move_with_user_info_or_verify_is_refused(ram_tmp_path, serve_nfs):
    server = serve_nfs()
    image = ram_tmp_path / "a.img"
    make_data_image(image, 4 * MiB, extents=2, tracked=True)
    line = one_line_error(run_cli("sync", image, server.url("a.img"), "--move", "--verify"), 2)
    assert "--verify cannot check a move" in line
    assert image.exists() and not (server.folder / "a.img").exists()


def test_a_redirect_that_fails_removes_the_copy_renamed_into_place(ram_tmp_path, serve_nfs,
                                                                   monkeypatch):
    """The redirect refused after the rename (as when the freeze's lease ran
    out): the copy at the target is removed again, writers are thawed on
    the source, and the error is one OSError."""
    import errno

    from blockmirror.migration import sync
    from blockmirror.tracking.tracker import Tracker as TrackerClass

    server = serve_nfs()
    image = ram_tmp_path / "a.img"
    content = make_data_image(image, 8 * MiB, extents=2, tracked=True)

    def refused(self: object, uri: str) -> None:
        raise OSError(errno.ETIMEDOUT, "the freeze ended before the redirect")

    monkeypatch.setattr(TrackerClass, "redirect_to_export", refused)
    with pytest.raises(OSError, match="freeze ended"):
        sync(str(image), server.url("a.img"), mode="move")
    assert list(server.folder.iterdir()) == []  # neither the copy nor a partial
    assert image.read_bytes() == content
    with Tracker.open(image) as tracker:
        assert tracker.state == "running"
