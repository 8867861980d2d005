"""A sync killed between its rename and the end of its job is finished or
redone by the next run, never refused (issue 13 item 10, and the orphan of
item 11: a move killed right after its redirect)."""

from __future__ import annotations

import os

import pytest
from imagetools import cli_killed_at, make_data_image, run_cli

from blockmirror import TrackedImage, Tracker
from blockmirror.migration.journal import journal_path
from blockmirror.migration.manifest import manifest_path

MiB = 1 << 20
# Where the child is killed (imagetools.cli_killed_at): module, function.
BEFORE_MANIFEST = ("blockmirror.migration.job", "FileSyncJob._write_manifest")
BEFORE_REDIRECT = ("blockmirror.migration.job", "FileSyncJob._redirect")
AFTER_REDIRECT = ("blockmirror.migration.commit", "remove_source")


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "src.img"
    make_data_image(path, 16 * MiB, extents=8)
    Tracker.create(path).close()
    return path


def test_copy_killed_before_its_manifest_is_resumed(image, tmp_path):
    dst = tmp_path / "copy.img"
    cli_killed_at(*BEFORE_MANIFEST, "sync", image, dst, "--quiet")
    assert dst.exists() and not os.path.exists(manifest_path(str(dst)))
    assert os.path.exists(journal_path(str(dst)))
    with TrackedImage(image) as img:  # the source moves on before the next run
        img.pwrite(b"later" * 1000, 3 * MiB)
    proc = run_cli("sync", image, dst)
    assert proc.returncode == 0, proc.stderr
    assert "resumed a commit" in proc.stdout
    assert dst.read_bytes() == image.read_bytes()
    assert os.path.exists(manifest_path(str(dst)))
    assert not os.path.exists(journal_path(str(dst)))
    again = run_cli("sync", image, dst)  # and the copy is a normal earlier copy again
    assert again.returncode == 0 and "incremental since change id" in again.stdout


def test_move_killed_before_its_redirect_is_redone(image, tmp_path):
    dst = tmp_path / "moved.img"
    cli_killed_at(*BEFORE_REDIRECT, "sync", image, dst, "--quiet", "--move")
    assert dst.exists() and os.path.exists(journal_path(str(dst)))
    with TrackedImage(image) as img:  # writers stayed on the source: the copy is stale
        img.pwrite(b"after the kill" * 1000, 5 * MiB)
    content = image.read_bytes()
    proc = run_cli("sync", image, dst, "--move")
    assert proc.returncode == 0, proc.stderr
    assert "removed the stale copy" in proc.stdout
    assert dst.read_bytes() == content
    assert not image.exists() and not os.path.exists(str(image) + ".cbt")
    assert not os.path.exists(journal_path(str(dst)))


def test_move_killed_after_its_redirect_is_finished(image, tmp_path):
    dst = tmp_path / "moved.img"
    content = image.read_bytes()
    cli_killed_at(*AFTER_REDIRECT, "sync", image, dst, "--quiet", "--move")
    with Tracker.open(image) as t:
        assert t.state == "redirected"  # the orphan the issue saw
    proc = run_cli("sync", image, dst, "--move")
    assert proc.returncode == 0, proc.stderr
    assert "finished a move" in proc.stdout
    assert not image.exists() and not os.path.exists(str(image) + ".cbt")
    assert dst.read_bytes() == content
    assert not os.path.exists(journal_path(str(dst)))


def test_a_journal_for_another_source_is_not_taken(image, tmp_path):
    """The journal only vouches for the source and inode it names."""
    dst = tmp_path / "copy.img"
    cli_killed_at(*BEFORE_MANIFEST, "sync", image, dst, "--quiet")
    other = tmp_path / "other.img"
    make_data_image(other, 16 * MiB, seed=9)
    proc = run_cli("sync", other, dst)
    assert proc.returncode == 2 and "exists" in proc.stderr
