"""The sync job's one exit undoes exactly what this run did, by state."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest
from imagetools import make_data_image

import blockmirror
from blockmirror import Tracker
from blockmirror.migration import sync
from blockmirror.migration.job import FileSyncJob, JobState
from blockmirror.migration.options import SyncOptions
from blockmirror.migration.precheck import partial_path, plan_file_sync

MiB = 1 << 20


@pytest.mark.parametrize("tracked", [True, False], ids=["tracked", "untracked"])
def test_a_refused_second_sync_leaves_the_running_one_alone(tmp_path, tracked):
    """Issue 13 item 12: a second sync into the same destination is refused
    (the source lock, or the shadow copy's lock) and must not delete the
    shadow copy the first sync is writing; the first one finishes exact."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    image = src / "one.img"
    content = make_data_image(image, 64 * MiB, extents=32)
    if tracked:
        Tracker.create(image).close()
    first = subprocess.Popen([sys.executable, "-m", "blockmirror", "sync", str(image), str(dst),
                              "--bwlimit", "16M", "--quiet"])
    shadow = partial_path(str(dst / "one.img"))
    try:
        deadline = time.monotonic() + 20
        while not os.path.exists(shadow):
            assert time.monotonic() < deadline, "the first sync never started copying"
            time.sleep(0.01)
        with pytest.raises(blockmirror.InvalidInputError, match="another sync"):
            sync(image, dst)
        assert os.path.exists(shadow), "the refused sync removed the running sync's shadow"
    finally:
        assert first.wait(timeout=60) == 0
    assert (dst / "one.img").read_bytes() == content


def test_states_of_a_copy_and_of_a_failure(tmp_path, monkeypatch):
    """A finished copy ends DONE; a failure records the state it failed in."""
    image = tmp_path / "a.img"
    make_data_image(image, 8 * MiB)
    Tracker.create(image).close()
    job = FileSyncJob(plan_file_sync(str(image), str(tmp_path / "b.img")), SyncOptions())
    job.run()
    assert job.state is JobState.DONE and job.failed_from is None

    def fail_commit(self: FileSyncJob) -> None:
        raise OSError(5, "injected commit failure")

    monkeypatch.setattr(FileSyncJob, "_commit", fail_commit)
    job = FileSyncJob(plan_file_sync(str(image), str(tmp_path / "c.img")), SyncOptions())
    with pytest.raises(OSError, match="injected"):
        job.run()
    assert job.failed_from is JobState.THAWED  # copy mode thaws before the commit
    assert sorted(os.listdir(tmp_path)) == ["a.img", "a.img.cbt", "b.img", "b.img.bm-manifest"]
    with Tracker.open(image) as t:
        assert t.state == "running"


def test_untracked_growth_during_a_sync_is_caught_inside_the_freeze(tmp_path):
    """Issue 13 item 7: an image grown and written without the tracker while
    a sync runs must fail the sync (not converged, nothing left at the
    destination, source untouched), not commit a copy that misses its data.
    The write comes from this process, which the bypass watch (item 8)
    cannot tell from the copier, so the consistency check in the freeze is
    what must catch it."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    image = src / "g.img"
    make_data_image(image, 32 * MiB, extents=24)
    Tracker.create(image).close()
    grown: list[bytes] = []

    def grow_once(progress: blockmirror.SyncProgress) -> None:
        if not grown:
            with open(image, "r+b") as f:  # untracked: plain writes past the tracked end
                f.seek(32 * MiB)
                f.write(b"untracked!" * 100_000)
            grown.append(image.read_bytes())

    with pytest.raises(blockmirror.SourceChangedError, match="written behind the tracker"):
        sync(image, dst, rate_limit=16 * MiB, target_downtime=2.0, progress=grow_once)
    assert grown, "the sync reported no progress"
    assert os.listdir(dst) == []
    assert image.read_bytes() == grown[0]
    with Tracker.open(image) as t:
        assert t.state == "running"


def _sync_while(tmp_path, write_untracked, *extra):
    """Run a slow CLI sync of a tracked image while WRITE_UNTRACKED(image)
    writes it; return (exit code, stderr, destination folder, image)."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    image = src / "b.img"
    initial = make_data_image(image, 32 * MiB, extents=24)
    Tracker.create(image).close()
    proc = subprocess.Popen([sys.executable, "-m", "blockmirror", "sync", str(image), str(dst),
                             "--bwlimit", "16M", "--quiet", *extra], stderr=subprocess.PIPE)
    shadow = partial_path(str(dst / "b.img"))
    deadline = time.monotonic() + 20
    while not os.path.exists(shadow):
        assert time.monotonic() < deadline, "the sync never started copying"
        time.sleep(0.01)
    write_untracked(image)
    _, err = proc.communicate(timeout=60)
    return proc.returncode, err.decode(), dst, image, initial


def _python_pwrite(image):
    subprocess.run([sys.executable, "-c",
                    "import os, sys; fd = os.open(sys.argv[1], os.O_RDWR); "
                    "[os.pwrite(fd, b'bypass!!' * 131072, i << 20) for i in range(10)]",
                    str(image)], check=True)


def _qemu_io_write(image):
    for i in range(10):
        subprocess.run(["qemu-io", "-f", "raw", "-c", f"write -P 0x5a {i}M 1M", str(image)],
                       check=True, capture_output=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="fanotify needs root")
@pytest.mark.parametrize("writer", [
    _python_pwrite,
    pytest.param(_qemu_io_write, marks=pytest.mark.skipif(
        shutil.which("qemu-io") is None, reason="qemu-io (qemu-utils) is not installed")),
], ids=["pwrite", "qemu-io"])
def test_a_writer_that_bypasses_the_tracker_fails_the_sync(tmp_path, writer):
    """Issue 13 item 8: ten 1 MiB writes straight to a tracked image during a
    sync (the issue's own case is qemu-io) must fail it with exit 3 and
    nothing at the destination, instead of a copy that misses them."""
    code, err, dst, image, _ = _sync_while(tmp_path, writer)
    assert code == 3, err
    assert "written without the tracker" in err
    assert os.listdir(dst) == []
    with Tracker.open(image) as t:
        assert t.state == "running"


def test_tracked_writer_processes_are_not_taken_for_bypassing_ones(tmp_path):
    """The other side of the same check: writes through TrackedImage from
    another process during the sync must not fail it."""
    def tracked_writes(image):
        # Short-lived writers: each writes and exits before the watch can
        # look at its memory map; the watch must know them by their opening
        # of the sidecar.
        for n in range(5):
            subprocess.run([sys.executable, "-c",
                            "import sys, blockmirror\n"
                            "first = 2 * int(sys.argv[2])\n"
                            "with blockmirror.TrackedImage(sys.argv[1]) as img:\n"
                            "    for i in range(first, first + 2):\n"
                            "        img.pwrite(b'tracked!' * 131072, i << 20)\n",
                            str(image), str(n)], check=True)

    code, err, dst, image, initial = _sync_while(tmp_path, tracked_writes, "--verify")
    assert code == 0, err
    # The sync may end before the last writer: the copy is the source at one
    # instant, i.e. the first k of the ten 1 MiB writes there, the rest not.
    copy, now = (dst / "b.img").read_bytes(), image.read_bytes()
    regions = [slice(i << 20, (i + 1) << 20) for i in range(10)]
    k = sum(1 for r in regions if copy[r] == now[r])
    assert all(copy[r] == now[r] for r in regions[:k])
    assert all(copy[r] == initial[r] for r in regions[k:])
    assert copy[10 << 20:] == now[10 << 20:] == initial[10 << 20:]


def test_track_status_says_a_dead_copier_s_freeze_is_void(tmp_path):
    """Issue 13: a SIGKILLed copier's freeze stays in the control block until
    the next write; status must not report writers as held by it."""
    image = tmp_path / "f.img"
    make_data_image(image, 4 * MiB)
    Tracker.create(image).close()
    code = ("import os, sys\nfrom blockmirror import Tracker\n"
            "t = Tracker.open(sys.argv[1])\nt.freeze(30)\nos.kill(os.getpid(), 9)\n")
    assert subprocess.run([sys.executable, "-c", code, str(image)]).returncode == -9
    status = subprocess.run([sys.executable, "-m", "blockmirror", "track", "status", str(image),
                             "--json"], capture_output=True, text=True)
    info = json.loads(status.stdout)
    assert info["state"] == "frozen" and info["freeze_void"] is True
    text = subprocess.run([sys.executable, "-m", "blockmirror", "track", "status", str(image)],
                          capture_output=True, text=True).stdout
    assert "void: its copier is gone" in text
    with Tracker.open(image) as t:
        t.freeze(5)  # a live copier's freeze is not void
        live = subprocess.run([sys.executable, "-m", "blockmirror", "track", "status",
                               str(image), "--json"], capture_output=True, text=True)
        assert json.loads(live.stdout)["freeze_void"] is False
        t.thaw()


def test_an_in_place_write_behind_the_tracker_is_caught_by_the_image_mtime(tmp_path,
                                                                            monkeypatch):
    """Issue 13 item 8 without fanotify (any user): an untracked write that
    does not grow the image still moves its mtime past the last tracked
    write, and the check inside the freeze fails the sync. The write comes
    from this process and the bypass watch is off, so only that check can
    catch it."""
    from blockmirror.migration import job

    monkeypatch.setattr(job.BypassWatch, "start", classmethod(lambda cls, *a: None))
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    image = src / "m.img"
    make_data_image(image, 32 * MiB, extents=24)
    Tracker.create(image).close()
    with blockmirror.TrackedImage(image) as img:  # a tracked write before the sync
        img.pwrite(b"tracked" * 100, 0)
    time.sleep(0.05)  # file times are coarse: let the clock move on
    written: list[bytes] = []

    def write_once(progress: blockmirror.SyncProgress) -> None:
        if not written:
            with open(image, "r+b") as f:  # untracked, in place
                f.seek(5 * MiB)
                f.write(b"behind the tracker" * 1000)
            written.append(image.read_bytes())

    with pytest.raises(blockmirror.SourceChangedError, match="modification time"):
        sync(image, dst, rate_limit=16 * MiB, target_downtime=2.0, progress=write_once)
    assert written and os.listdir(dst) == []
    assert image.read_bytes() == written[0]
