"""Issue 13, items 2 and 6: the digest manifest.

Item 2: the manifest is opened once (a new one created exclusively, never
through a link) and written only through that descriptor, so a name swapped
for a symlink in a folder others can write never makes root write elsewhere.

Item 6: a committed manifest is bound to the copy it describes (device,
inode, size, mtime and ctime taken after the copy's final fsync);
``Manifest.mismatch(fd)`` says why a copy is not the one described, and
``mark_untrusted()`` makes every granule unknown, durably, so the next sync
re-copies the whole range in place.
"""

from __future__ import annotations

import builtins
import fcntl
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import xxhash
from imagetools import MiB, make_data_image

from blockmirror import TrackedImage, Tracker
from blockmirror.copying.copier import Copier
from blockmirror.migration import sync
from blockmirror.migration.manifest import (
    HEADER_BYTES,
    Manifest,
    ManifestError,
    differing_extents,
    manifest_path,
)

ROOT = Path(__file__).resolve().parent.parent
G = 65536
STATE_UNTRUSTED = "untrusted"
SIZE = 4 * MiB


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    path = tmp_path / "victim"
    path.write_bytes(b"precious\n" * 100)
    return path


def _new(tmp_path: Path) -> tuple[Manifest, str]:
    final = str(tmp_path / "copy.img.bm-manifest")
    return Manifest.create(final, granularity=G, image_size=SIZE, source="/src"), final


def _copy(tmp_path: Path, name: str = "copy.img") -> Path:
    path = tmp_path / name
    make_data_image(path, SIZE, extents=2)
    return path


# -- item 2: never through a planted link -------------------------------------------------


def test_new_manifest_tmp_swapped_for_symlink_is_not_written_through(tmp_path, victim):
    m, final = _new(tmp_path)
    copy = _copy(tmp_path)
    before = victim.read_bytes()
    os.unlink(final + ".tmp")
    os.symlink(victim, final + ".tmp")  # the attacker's swap, in a 0777 folder
    fd = os.open(copy, os.O_RDONLY)
    try:
        m.record(fd, [(0, SIZE)])
        with pytest.raises(ManifestError, match="replaced"):
            m.commit("ab" * 16, 1)
    finally:
        os.close(fd)
        m.discard()
    assert victim.read_bytes() == before
    assert not os.path.lexists(final)  # what got published was not ours: taken down


def test_incremental_manifest_swapped_for_symlink_is_not_written_through(tmp_path, victim):
    m, final = _new(tmp_path)
    copy = _copy(tmp_path)
    fd = os.open(copy, os.O_RDONLY)
    try:
        m.record(fd, [(0, SIZE)])
        m.commit("ab" * 16, 1)
        m.close()
        m = Manifest.open(final)
        before = victim.read_bytes()
        os.rename(final, str(tmp_path / "moved-away"))
        os.symlink(victim, final)
        m.begin_update()
        m.forget([(0, 2 * G)])
        m.resize(SIZE + G)
        m.record(fd, [(0, 2 * G)])
        m.commit("ab" * 16, 2)
        m.close()
    finally:
        os.close(fd)
    assert victim.read_bytes() == before


def test_open_reads_through_one_descriptor(tmp_path, monkeypatch):
    m, final = _new(tmp_path)
    m.commit("ab" * 16, 1)
    m.close()
    opened: list[str] = []
    real_open, real_os_open = builtins.open, os.open

    def spy_open(file, *a, **k):  # type: ignore[no-untyped-def]
        opened.append(str(file))
        return real_open(file, *a, **k)

    def spy_os_open(path, *a, **k):  # type: ignore[no-untyped-def]
        opened.append(str(path))
        return real_os_open(path, *a, **k)

    monkeypatch.setattr(builtins, "open", spy_open)
    monkeypatch.setattr(os, "open", spy_os_open)
    m = Manifest.open(final)
    m.begin_update()
    m.forget([(0, G)])
    m.commit("ab" * 16, 2, recorded=[(0, G)])
    monkeypatch.undo()
    m.close()
    assert [p for p in opened if p.startswith(final)] == [final]


def test_discard_removes_an_unpublished_manifest(tmp_path):
    m, final = _new(tmp_path)
    assert os.path.exists(final + ".tmp")
    m.discard()
    assert not os.path.lexists(final + ".tmp") and not os.path.lexists(final)
    m.discard()  # twice is fine


def test_discard_leaves_a_name_that_is_no_longer_ours(tmp_path):
    m, final = _new(tmp_path)
    os.unlink(final + ".tmp")
    (tmp_path / "copy.img.bm-manifest.tmp").write_bytes(b"someone else's")
    m.discard()
    assert (tmp_path / "copy.img.bm-manifest.tmp").read_bytes() == b"someone else's"


def test_discard_after_commit_keeps_the_published_manifest(tmp_path):
    m, final = _new(tmp_path)
    m.commit("ab" * 16, 1)
    m.discard()
    assert Manifest.open(final).state == "clean"


def test_create_refuses_a_tmp_another_sync_is_writing(tmp_path):
    final = str(tmp_path / "copy.img.bm-manifest")
    other = Manifest.create(final, granularity=G, image_size=SIZE, source="/src")
    try:
        with pytest.raises(ManifestError, match="another sync"):
            Manifest.create(final, granularity=G, image_size=SIZE, source="/src")
        assert os.path.exists(final + ".tmp")  # the running sync's file stays
        other.commit("ab" * 16, 1)  # and it can still publish
    finally:
        other.close()
    assert Manifest.open(final).state == "clean"


def test_create_replaces_a_stale_tmp_and_a_planted_link(tmp_path, victim):
    final = str(tmp_path / "copy.img.bm-manifest")
    (tmp_path / "copy.img.bm-manifest.tmp").write_bytes(b"left by a killed run")
    m = Manifest.create(final, granularity=G, image_size=SIZE, source="/src")
    m.discard()
    os.symlink(victim, final + ".tmp")
    before = victim.read_bytes()
    m = Manifest.create(final, granularity=G, image_size=SIZE, source="/src")
    m.commit("ab" * 16, 1)
    m.close()
    assert victim.read_bytes() == before
    assert not os.path.islink(final)


def test_new_manifest_is_private_and_locked(tmp_path):
    m, final = _new(tmp_path)
    try:
        assert os.stat(final + ".tmp").st_mode & 0o777 == 0o600
        fd = os.open(final + ".tmp", os.O_RDONLY)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)
    finally:
        m.discard()


def test_hard_linked_manifest_is_refused(tmp_path):
    m, final = _new(tmp_path)
    m.commit("ab" * 16, 1)
    m.close()
    os.link(final, tmp_path / "second-name")
    with pytest.raises(ManifestError, match="names"):
        Manifest.open(final)


def test_manifest_that_is_a_folder_is_refused(tmp_path):
    final = tmp_path / "copy.img.bm-manifest"
    final.mkdir()
    with pytest.raises(ManifestError):
        Manifest.open(str(final))


# -- item 6: bound to the copy it describes --------------------------------------------------


@pytest.fixture
def backup(tmp_path: Path) -> tuple[Path, Path]:
    """A tracked source and a first full copy of it, made by sync."""
    (tmp_path / "src").mkdir()
    (tmp_path / "dst").mkdir()
    image = tmp_path / "src" / "db.img"
    make_data_image(image, 8 * MiB, extents=3)
    Tracker.create(image).close()
    copy = tmp_path / "dst" / "db.img"
    sync(image, copy)
    return image, copy


def _describes(copy: Path) -> str | None:
    m = Manifest.open(manifest_path(str(copy)))
    fd = os.open(copy, os.O_RDONLY)
    try:
        assert m.describes(fd) == (m.mismatch(fd) is None)
        return m.mismatch(fd)
    finally:
        os.close(fd)
        m.close()


def test_a_fresh_copy_is_described(backup):
    _, copy = backup
    assert _describes(copy) is None
    header = json.loads(copy.with_name("db.img.bm-manifest").read_bytes()[:HEADER_BYTES]
                        .split(b"\n")[1])
    st = os.stat(copy)
    assert header["copy"] == {"dev": st.st_dev, "ino": st.st_ino, "size": st.st_size,
                              "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns}


def test_an_incremental_keeps_the_copy_described(backup):
    image, copy = backup
    with open(image, "r+b") as f:
        f.write(b"x" * 4096)
    with Tracker.open(image) as t:
        t.mark(0, 4096)
    assert sync(image, copy).incremental
    assert _describes(copy) is None


def _edit(copy: Path) -> None:
    with open(copy, "r+b") as f:
        f.seek(3 * MiB)
        f.write(b"edited")


def _truncate(copy: Path) -> None:
    os.truncate(copy, os.path.getsize(copy) - G)


def _punch(copy: Path) -> None:
    subprocess.run(["fallocate", "--punch-hole", "--offset", "0", "--length", str(MiB),
                    str(copy)], check=True)


def _restore_older(copy: Path) -> None:
    older = copy.with_name("older")
    shutil.copyfile(copy, older)
    _edit(older)
    os.replace(older, copy)


def _restore_in_place(copy: Path) -> None:
    data = bytearray(copy.read_bytes())
    data[100:106] = b"OLDER!"
    with open(copy, "r+b") as f:  # same inode, the old backup's bytes
        f.write(data)


def _same_bytes_new_mtime(copy: Path) -> None:
    data = copy.read_bytes()
    with open(copy, "r+b") as f:  # rewrite identical bytes: ctime moves anyway
        f.write(data[:4096])


def _swap_manifest(copy: Path) -> None:
    """Put a later copy's manifest (of the same source) beside this copy."""
    later = copy.with_name("later.img")
    shutil.copyfile(copy, later)
    _edit(later)
    m = Manifest.create(str(later) + ".bm-manifest", granularity=G,
                        image_size=os.path.getsize(later), source="/src")
    fd = os.open(later, os.O_RDONLY)
    try:
        m.record(fd, [(0, os.path.getsize(later))])
        m.commit("ab" * 16, 9)
    finally:
        os.close(fd)
        m.close()
    os.replace(str(later) + ".bm-manifest", manifest_path(str(copy)))


@pytest.mark.parametrize("tamper", [_edit, _truncate, _punch, _restore_older,
                                    _restore_in_place, _same_bytes_new_mtime, _swap_manifest])
def test_a_tampered_copy_is_not_described(backup, tamper):
    _, copy = backup
    tamper(copy)
    reason = _describes(copy)
    assert reason is not None


def test_mark_untrusted_makes_every_granule_unknown_durably(backup):
    image, copy = backup
    m = Manifest.open(manifest_path(str(copy)))
    m.mark_untrusted()
    m.begin_update()  # an update does not make it "only updating"
    assert m.state == STATE_UNTRUSTED
    m.close()
    m = Manifest.open(manifest_path(str(copy)))
    try:
        assert m.state == STATE_UNTRUSTED
        size = os.path.getsize(copy)
        assert m.unknown_extents() == [(0, size)]
        fd = os.open(image, os.O_RDONLY)
        try:
            assert differing_extents(m, fd, size) == [(0, size)]
        finally:
            os.close(fd)
        assert not m.describes(os.open(copy, os.O_RDONLY))
    finally:
        m.close()


def test_untrusted_copy_is_repaired_by_recopying_everything_in_place(backup):
    """The safe behaviour when the copy is not what its manifest describes:
    every granule unknown, the source's whole range copied over the copy in
    place (holes punched: the copy may hold data where the source has none),
    then a commit that writes every digest and binds the copy again."""
    image, copy = backup
    # Data where the source has a hole, and an edit inside its data.
    with open(copy, "r+b") as f:
        f.seek(os.path.getsize(copy) - 3 * G)
        f.write(b"stray data in a hole of the source")
    _edit(copy)
    m = Manifest.open(manifest_path(str(copy)))
    src_fd = os.open(image, os.O_RDONLY)
    dst_fd = os.open(copy, os.O_RDWR)
    try:
        reason = m.mismatch(dst_fd)
        assert reason is not None
        m.mark_untrusted()
        size = os.fstat(src_fd).st_size
        extents = differing_extents(m, src_fd, size)
        m.begin_update()
        m.forget(extents)
        with Copier(src_fd, dst_fd) as copier:
            copier.copy_extents(extents, dst_fresh=False)
        os.fsync(dst_fd)
        m.record(dst_fd, extents)
        m.commit("ab" * 16, 5, recorded=extents, copy_fd=dst_fd)
        assert m.describes(dst_fd)
    finally:
        os.close(src_fd)
        os.close(dst_fd)
        m.close()
    assert copy.read_bytes() == image.read_bytes()
    m = Manifest.open(manifest_path(str(copy)))  # every digest was written: no checksum error
    assert m.state == "clean" and not m.unknown_extents()
    m.close()


def _write_v1(path: str) -> None:
    body = json.dumps({"granularity": G, "image_size": SIZE, "series": "", "generation": 0,
                       "state": "updating", "source": ""}, sort_keys=True).encode()
    header = b"BMMANIFEST 1\n" + body + b"\n" + xxhash.xxh3_64_hexdigest(body).encode() + b"\n"
    with open(path, "wb") as f:
        f.write(header.ljust(HEADER_BYTES, b" "))
        f.write(bytes(8 * (SIZE // G)))
    os.chmod(path, 0o600)


def test_format_1_is_refused_with_a_hint_to_force(tmp_path):
    path = str(tmp_path / "copy.img.bm-manifest")
    _write_v1(path)
    with pytest.raises(ManifestError, match="--force"):
        Manifest.open(path)


def test_format_1_on_the_command_line(backup):
    image, copy = backup
    os.unlink(manifest_path(str(copy)))
    _write_v1(manifest_path(str(copy)))
    proc = subprocess.run([sys.executable, "-m", "blockmirror", "sync", str(image), str(copy)],
                          capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 2, proc.stderr
    assert "format 1" in proc.stderr and "--force" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_new_manifests_are_format_3(tmp_path):
    m, final = _new(tmp_path)
    m.commit("ab" * 16, 1)
    m.close()
    with open(final, "rb") as f:
        assert f.read(13) == b"BMMANIFEST 3\n"
    assert Manifest.open(final).unknown_extents() == []


def test_end_to_end_incremental_over_an_edited_copy_repairs_it(backup):
    image, copy = backup
    _edit(copy)
    sync(image, copy)
    assert copy.read_bytes() == image.read_bytes()


def test_check_copy_is_the_one_call_for_the_job(backup):
    _, copy = backup
    m = Manifest.open(manifest_path(str(copy)))
    fd = os.open(copy, os.O_RDWR)
    try:
        assert m.check_copy(fd) is None and m.state == "clean"
        os.pwrite(fd, b"edited behind the manifest's back", 0)
        reason = m.check_copy(fd)
        assert reason is not None and "changed" in reason
        assert m.state == STATE_UNTRUSTED
        assert m.check_copy(fd) is None  # already untrusted: nothing more to do
    finally:
        os.close(fd)
        m.close()
    m = Manifest.open(manifest_path(str(copy)))  # durable
    assert m.state == STATE_UNTRUSTED and m.unknown_extents() == [(0, os.path.getsize(copy))]
    m.close()


def test_an_interrupted_update_is_checked_for_the_same_file_only(backup):
    _, copy = backup
    m = Manifest.open(manifest_path(str(copy)))
    m.begin_update()
    m.forget([(0, G)])
    m.close()
    with open(copy, "r+b") as f:  # the dead sync's own write
        f.write(b"half-done update")
    m = Manifest.open(manifest_path(str(copy)))
    fd = os.open(copy, os.O_RDONLY)
    try:
        assert m.state == "updating" and m.mismatch(fd) is None
    finally:
        os.close(fd)
        m.close()
    _restore_older(copy)  # another file in its place
    m = Manifest.open(manifest_path(str(copy)))
    fd = os.open(copy, os.O_RDONLY)
    try:
        assert "not the file" in (m.mismatch(fd) or "")
    finally:
        os.close(fd)
        m.close()


@pytest.mark.parametrize("tamper", [_edit, _truncate, _punch, _restore_older,
                                    _restore_in_place, _swap_manifest])
def test_incremental_repairs_a_tampered_copy(backup, tamper):
    image, copy = backup
    # data in the copy where the source has a hole, too
    with open(copy, "r+b") as f:
        f.seek(os.path.getsize(copy) - 3 * G)
        f.write(b"stray")
    tamper(copy)
    result = sync(image, copy)
    assert result.incremental
    assert any("full resync in place" in n for n in result.notes), result.notes
    assert copy.read_bytes() == image.read_bytes()
    assert _describes(copy) is None  # bound again
    again = sync(image, copy)  # and the next run trusts it again
    assert not any("full resync" in n for n in again.notes)
    assert copy.read_bytes() == image.read_bytes()


def _failing_verify(monkeypatch):  # type: ignore[no-untyped-def]
    """verify finds one extent that differs (as after a bad copy)."""
    from blockmirror.migration import job

    monkeypatch.setattr(job, "compare_files", lambda a, b: [(0, 4096)])


def _incremental_with_failing_verify(backup, monkeypatch):  # type: ignore[no-untyped-def]
    import blockmirror

    image, copy = backup
    with TrackedImage(image) as img:
        img.pwrite(b"n" * 4096, 0)
    _failing_verify(monkeypatch)
    with pytest.raises(blockmirror.BlockMirrorError, match="verify failed"):
        sync(image, copy, verify=True)
    monkeypatch.undo()
    m = Manifest.open(manifest_path(str(copy)))
    try:
        return m.state
    finally:
        m.close()


def test_failed_verify_leaves_an_untrusted_manifest(backup, monkeypatch):
    """A failed verify marks the manifest untrusted, so the next run
    re-copies in place and is then trusted again."""
    image, copy = backup
    assert _incremental_with_failing_verify(backup, monkeypatch) == STATE_UNTRUSTED
    result = sync(image, copy, verify=True)
    assert copy.read_bytes() == image.read_bytes()
    assert _describes(copy) is None and result.verified
