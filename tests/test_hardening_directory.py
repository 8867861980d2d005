"""Issue 13, items 3, 4, 5 and 13, and the pre-check's space for the manifest
and the sidecar.

3: directory mode never writes through a planted ``.NAME.bm-partial`` link.
13: a directory sync failing on a later image leaves nothing behind.
4: ``track disable`` is refused while a sync holds the image.
5: ``sync --force OTHER LIVE`` is refused while a writer has LIVE open.
"""

from __future__ import annotations

import fcntl
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from imagetools import MiB, make_data_image

from blockmirror import InvalidInputError, OutOfSpaceError, TrackedImage, Tracker
from blockmirror.migration import precheck
from blockmirror.migration.directory import classify, sync_directory
from blockmirror.migration.options import SyncOptions
from blockmirror.migration.run import sync, sync_file

ROOT = Path(__file__).resolve().parent.parent


def run(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "blockmirror", *map(str, args)],
                          capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """A VM's home folder: two small files and two tracked images."""
    src = tmp_path / "vm"
    src.mkdir()
    (src / "vm.conf").write_text("memsize = 1024\n")
    os.chmod(src / "vm.conf", 0o640)
    os.utime(src / "vm.conf", ns=(1_000_000_000, 2_000_000_000))
    for name in ("a.img", "b.img"):
        make_data_image(src / name, 4 * MiB, extents=2)
        Tracker.create(src / name).close()
    return src


# -- item 3 ---------------------------------------------------------------------------


def test_planted_partial_symlink_is_not_written_through(home, tmp_path):
    dst = tmp_path / "shared"
    dst.mkdir()
    os.chmod(dst, 0o777)  # writable by others, no sticky bit
    victim = tmp_path / "victim"
    victim.write_text("root's file\n")
    os.symlink(victim, dst / ".vm.conf.bm-partial")
    sync(home, dst)
    assert victim.read_text() == "root's file\n"
    assert (dst / "vm.conf").read_text() == "memsize = 1024\n"
    assert not (dst / "vm.conf").is_symlink()
    assert not os.path.lexists(dst / ".vm.conf.bm-partial")


def test_home_file_keeps_mode_and_times(home, tmp_path):
    dst = tmp_path / "out"
    sync(home, dst)
    st = os.stat(dst / "vm.conf")
    assert stat.S_IMODE(st.st_mode) == 0o640
    assert st.st_mtime_ns == 2_000_000_000
    assert stat.S_IMODE(os.stat(dst).st_mode) == stat.S_IMODE(os.stat(home).st_mode)


def test_home_file_swapped_for_a_link_is_not_followed(home, tmp_path, monkeypatch):
    """A home file replaced by a symlink between the listing and the copy is
    refused, not followed (it would copy another file's content)."""
    import blockmirror.migration.directory as directory

    secret = tmp_path / "secret"
    secret.write_text("not yours\n")
    real_classify = directory.classify

    def racing_classify(folder: str) -> tuple[list[str], list[str]]:
        out = real_classify(folder)
        os.unlink(home / "vm.conf")
        os.symlink(secret, home / "vm.conf")
        return out

    monkeypatch.setattr(directory, "classify", racing_classify)
    with pytest.raises(OSError):
        sync(home, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_blockmirror_files_in_a_source_folder_are_not_home_files(home):
    (home / "old.img.bm-manifest").write_bytes(b"BMMANIFEST 2\n")
    (home / "old.img.bm-manifest.tmp").write_bytes(b"x")
    files, images = classify(str(home))
    assert files == ["vm.conf"] and images == ["a.img", "b.img"]


# -- item 13 --------------------------------------------------------------------------


def _failing_on(name: str):  # type: ignore[no-untyped-def]
    def sync_one(src: str, dst: str, options: SyncOptions):  # type: ignore[no-untyped-def]
        if os.path.basename(src) == name:
            raise OSError(5, "injected I/O error", src)
        return sync_file(src, dst, options)
    return sync_one


def test_failure_on_the_second_image_leaves_no_folder(home, tmp_path):
    dst = tmp_path / "out"
    with pytest.raises(OSError, match="injected"):
        sync_directory(str(home), str(dst), SyncOptions(), sync_file=_failing_on("b.img"))
    assert not dst.exists(), sorted(os.listdir(dst))


def test_failure_on_the_second_image_leaves_an_existing_folder_as_it_was(home, tmp_path):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "mine.txt").write_text("keep\n")
    with pytest.raises(OSError, match="injected"):
        sync_directory(str(home), str(dst), SyncOptions(), sync_file=_failing_on("b.img"))
    assert sorted(os.listdir(dst)) == ["mine.txt"]


def test_forced_run_that_fails_on_an_image_keeps_that_image_s_old_copy(home, tmp_path):
    """Under --force, an image whose sync fails before replacing the old copy
    must find that copy as it was: the run never created it, so its undo
    must not remove it."""
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "b.img").write_bytes(b"the old copy of b")
    with pytest.raises(OSError, match="injected"):
        sync_directory(str(home), str(dst), SyncOptions(force=True),
                       sync_file=_failing_on("b.img"))
    assert (dst / "b.img").read_bytes() == b"the old copy of b"


def test_failure_in_move_mode_keeps_the_moved_image(home, tmp_path):
    dst = tmp_path / "out"
    with pytest.raises(OSError, match="injected"):
        sync_directory(str(home), str(dst), SyncOptions(mode="move"),
                       sync_file=_failing_on("b.img"))
    # a.img was moved: its writers write the destination now, it must stay
    assert (dst / "a.img").exists() and not (home / "a.img").exists()
    assert (home / "b.img").exists() and not (dst / "b.img").exists()


# -- item 4 ---------------------------------------------------------------------------


def test_track_disable_refused_while_a_sync_holds_the_sidecar(tmp_path):
    image = tmp_path / "a.img"
    make_data_image(image, 4 * MiB, extents=2)
    Tracker.create(image).close()
    fd = os.open(str(image) + ".cbt", os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as FileSyncJob._lock_source does
        proc = run("track", "disable", image)
        assert proc.returncode == 2, proc.stderr
        assert "sync" in proc.stderr and "Traceback" not in proc.stderr
        assert os.path.exists(str(image) + ".cbt")
    finally:
        os.close(fd)
    proc = run("track", "disable", image)  # once the sync is gone, it works
    assert proc.returncode == 0, proc.stderr
    assert not os.path.exists(str(image) + ".cbt")


def test_track_disable_refused_during_a_real_sync(tmp_path):
    image = tmp_path / "a.img"
    make_data_image(image, 64 * MiB, extents=32)
    Tracker.create(image).close()
    (tmp_path / "out").mkdir()
    syncing = subprocess.Popen([sys.executable, "-m", "blockmirror", "sync", str(image),
                                str(tmp_path / "out"), "--bwlimit", "16M", "--quiet"],
                               env=dict(os.environ, PYTHONPATH=str(ROOT)))
    try:
        import time

        deadline = time.monotonic() + 20
        while not any(n.endswith(".bm-partial") for n in os.listdir(tmp_path / "out")):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        proc = run("track", "disable", image)
        assert proc.returncode == 2, proc.stderr
        assert os.path.exists(str(image) + ".cbt")
    finally:
        assert syncing.wait(timeout=60) == 0


# -- item 5 ---------------------------------------------------------------------------


def test_force_onto_a_live_image_is_refused(tmp_path):
    live = tmp_path / "live.img"
    make_data_image(live, 4 * MiB, extents=2)
    Tracker.create(live).close()
    other = tmp_path / "other.img"
    make_data_image(other, 4 * MiB, extents=2, seed=2)
    before = os.stat(live)
    with TrackedImage(live) as img:  # a writer holds it open
        img.pwrite(b"live write", 0)
        proc = run("sync", "--force", other, live)
        assert proc.returncode == 2, proc.stderr
        assert "live image" in proc.stderr
        img.pwrite(b"still here", 4096)
    after = os.stat(live)
    assert (after.st_dev, after.st_ino) == (before.st_dev, before.st_ino)
    assert live.read_bytes()[4096:4106] == b"still here"


def test_force_onto_an_image_another_sync_reads_is_refused(tmp_path):
    live = tmp_path / "live.img"
    make_data_image(live, 4 * MiB, extents=2)
    Tracker.create(live).close()
    other = tmp_path / "other.img"
    make_data_image(other, 4 * MiB, extents=2, seed=2)
    fd = os.open(str(live) + ".cbt", os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with pytest.raises(InvalidInputError, match="running sync"):
            precheck.plan_file_sync(str(other), str(live), force=True)
    finally:
        os.close(fd)


def test_force_onto_a_copy_without_writers_still_works(tmp_path):
    dst = tmp_path / "copy.img"
    make_data_image(dst, 4 * MiB, extents=2)
    Tracker.create(dst).close()
    src = tmp_path / "src.img"
    make_data_image(src, 4 * MiB, extents=2, seed=3)
    sync(src, dst, force=True)
    assert dst.read_bytes() == src.read_bytes()


# -- the pre-check counts the manifest and the sidecar -----------------------------------


def test_precheck_counts_the_manifest(tmp_path, monkeypatch):
    src = tmp_path / "src.img"
    make_data_image(src, 16 * MiB, extents=16)  # 256 allocated granules
    allocated = os.stat(src).st_blocks * 512
    (tmp_path / "out").mkdir()
    monkeypatch.setattr(precheck, "free_bytes", lambda folder: allocated + 1024)
    with pytest.raises(OutOfSpaceError, match="manifest"):
        precheck.plan_file_sync(str(src), str(tmp_path / "out"))
    monkeypatch.setattr(precheck, "free_bytes",
                        lambda folder: allocated + precheck.manifest_bytes(allocated, 65536))
    precheck.plan_file_sync(str(src), str(tmp_path / "out"))


def test_precheck_counts_the_destination_sidecar_in_move_mode(tmp_path, monkeypatch):
    src = tmp_path / "src.img"
    make_data_image(src, 16 * MiB, extents=16)
    Tracker.create(src).close()
    allocated = os.stat(src).st_blocks * 512
    (tmp_path / "out").mkdir()
    sidecar = os.path.getsize(str(src) + ".cbt")  # what the move will create beside the copy
    monkeypatch.setattr(precheck, "free_bytes", lambda folder: allocated + sidecar - 1)
    with pytest.raises(OutOfSpaceError, match="sidecar"):
        precheck.plan_file_sync(str(src), str(tmp_path / "out"), move=True)
    for size in (1, 16 * MiB, 1 << 30, (1 << 30) + 1):
        image = tmp_path / "sized.img"
        with open(image, "wb") as f:
            f.truncate(size)
        Tracker.create(image).close()
        assert precheck.sidecar_bytes(size, 65536) == os.path.getsize(str(image) + ".cbt")
        os.unlink(str(image) + ".cbt")


def test_precheck_refuses_a_manifest_too_big_for_memory(tmp_path, monkeypatch):
    """The manifest holds allocated granules only (issue 11): what counts is
    the data, not the apparent size."""
    src = tmp_path / "src.img"
    make_data_image(src, 16 * MiB, extents=16)  # 256 allocated granules
    with open(src, "r+b") as f:
        f.truncate(1 << 40)  # 1 TiB apparent
    (tmp_path / "out").mkdir()
    monkeypatch.setattr(precheck, "_physical_memory", lambda: 1 * MiB, raising=False)
    precheck.plan_file_sync(str(src), str(tmp_path / "out"))  # 256 granules fit in 1 MiB
    monkeypatch.setattr(precheck, "_physical_memory", lambda: 16 * 1024, raising=False)
    with pytest.raises(InvalidInputError, match="memory"):
        precheck.plan_file_sync(str(src), str(tmp_path / "out"))


def test_pseudo_filesystems_are_known_by_type(tmp_path, monkeypatch):
    assert precheck.on_pseudo_filesystem("/proc/self/status")
    assert precheck.on_pseudo_filesystem("/sys/kernel")
    assert not precheck.on_pseudo_filesystem(str(tmp_path))
    # a FUSE or network filesystem that reports no block counts is still storage
    real_statvfs = os.statvfs

    class NoBlocks:
        def __init__(self, st: os.statvfs_result) -> None:
            self.__dict__.update({k: getattr(st, k) for k in dir(st) if k.startswith("f_")})
            self.f_blocks = 0

    monkeypatch.setattr(os, "statvfs", lambda p: NoBlocks(real_statvfs(p)))
    assert not precheck.on_pseudo_filesystem(str(tmp_path))


def _holder(path: Path, mode: str) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([sys.executable, "-c",
                             f"import sys,time\nf=open({str(path)!r},{mode!r})\n"
                             "print('open',flush=True)\ntime.sleep(60)"],
                            stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline() == b"open\n"
    return proc


def test_force_onto_an_image_an_untracked_writer_holds_is_refused(tmp_path):
    live = tmp_path / "live.img"
    make_data_image(live, 4 * MiB, extents=2)
    other = tmp_path / "other.img"
    make_data_image(other, 4 * MiB, extents=2, seed=2)
    before = os.stat(live)
    holder = _holder(live, "r+b")  # a hypervisor writing the image itself
    try:
        proc = run("sync", "--force", other, live)
        assert proc.returncode == 2, proc.stderr
        assert "open for writing" in proc.stderr
    finally:
        holder.kill()
        holder.wait()
    after = os.stat(live)
    assert (after.st_dev, after.st_ino) == (before.st_dev, before.st_ino)


def test_force_onto_a_copy_someone_only_reads_works(tmp_path):
    dst = tmp_path / "copy.img"
    make_data_image(dst, 4 * MiB, extents=2)
    src = tmp_path / "src.img"
    make_data_image(src, 4 * MiB, extents=2, seed=3)
    holder = _holder(dst, "rb")
    try:
        sync(src, dst, force=True)
    finally:
        holder.kill()
        holder.wait()
    assert dst.read_bytes() == src.read_bytes()
