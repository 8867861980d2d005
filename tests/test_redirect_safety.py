"""Issue 13, items 1 and 2: a redirect in a sidecar steers writers only to
the image its move made, never into another owner's image, never through a
symbolic link in any folder of the path, and never for a new file that took
the old image's path."""

from __future__ import annotations

import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from blockmirror import SidecarCorruptError, SidecarUnsafeError, TrackedImage, Tracker, sidecar_path

MiB = 1024 * 1024
NOBODY = 65534
OTHER_USER = 65533

# struct bm_control (csrc/bm_internal.h), in the page at 4096.
CTL = 4096
CTL_STATE = CTL + 0
CTL_REDIRECT = CTL + 56
CTL_MOVE_TOKEN = CTL + 2120
CTL_MOVED_FROM = CTL + 2136
STATE_REDIRECTED = 3

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown")


def make_image(path: Path, uid: int | None = None, size: int = MiB) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
    os.chmod(path, 0o600)
    if uid is not None:
        os.chown(path, uid, uid)
    Tracker.create(path).close()  # the sidecar goes to the image's owner
    return path


def poke(path: str | Path, offset: int, data: bytes) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


def forge_redirect(image: Path, target: str, token: bytes = b"T" * 16) -> None:
    """What the owner of IMAGE can do to the 0600 sidecar they own."""
    side = sidecar_path(image)
    poke(side, CTL_REDIRECT, os.fsencode(target) + b"\0")
    poke(side, CTL_MOVE_TOKEN, token)
    poke(side, CTL_STATE, struct.pack("<I", STATE_REDIRECTED))


def forge_moved_from(image: Path, token: bytes = b"T" * 16) -> None:
    poke(sidecar_path(image), CTL_MOVED_FROM, token)


def untouched(path: Path) -> bool:
    return path.read_bytes() == bytes(os.path.getsize(path))


# -- item 1: a redirect must not cross owners ----------------------------------------


@needs_root
@pytest.mark.parametrize("victim_uid", [0, OTHER_USER], ids=["root-owned", "other-user"])
def test_forged_redirect_into_another_owners_image_is_refused(tmp_path, victim_uid):
    """The owner of A points A's sidecar at V; a root writer of A must not
    write into V (it used to: writes landed in V)."""
    os.chmod(tmp_path, 0o755)
    attacker = make_image(tmp_path / "a.img", NOBODY)
    victim = make_image(tmp_path / "v.img", victim_uid)
    forge_moved_from(victim)  # even if the token matched
    with TrackedImage(attacker) as img:
        img.pwrite(b"before", 0)
        forge_redirect(attacker, str(victim))
        with pytest.raises(SidecarUnsafeError, match="owned by uid"):
            img.pwrite(b"escape", 0)
    assert untouched(victim)


def _write_after_redirect_script(image: Path, data: bytes) -> str:
    return (
        "import sys, blockmirror\n"
        f"img = blockmirror.TrackedImage({os.fspath(image)!r})\n"
        "img.pwrite(b'x', 0)\n"
        "print('ready', flush=True)\n"
        "sys.stdin.readline()\n"  # the parent forges the redirect now
        "try:\n"
        f"    img.pwrite({data!r}, 0)\n"
        "except OSError as e:\n"
        "    print('refused', e.errno, e)\n"
        "else:\n"
        "    print('written', img.path)\n"
    )


def _write_after_forged_redirect(source: object, target: str, walk: bool) -> str:
    """A writer process opens SOURCE; its sidecar is then forged to redirect
    to TARGET and the writer writes: returns what the writer reports. WALK
    forces the component-by-component resolver instead of openat2."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    if walk:
        env["BLOCKMIRROR_NO_OPENAT2"] = "1"
    proc = subprocess.Popen([sys.executable, "-c", _write_after_redirect_script(source, b"zz")],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "ready\n"
        forge_redirect(source, target)
        out, _ = proc.communicate("go\n", timeout=30)
    finally:
        proc.kill()
        proc.wait()
    return out


@pytest.mark.parametrize("walk", [False, True], ids=["openat2", "component-walk"])
def test_redirect_through_a_symlinked_folder_is_refused(tmp_path, walk):
    """O_NOFOLLOW covers only the last component: a folder link on the way
    let a forged redirect reach any file of the same owner - even with the
    move token forged into both sidecars."""
    here = tmp_path / "here"
    elsewhere = tmp_path / "elsewhere"
    here.mkdir()
    elsewhere.mkdir()
    source = make_image(here / "a.img")
    target = make_image(elsewhere / "b.img")
    forge_moved_from(target)
    os.symlink(elsewhere, here / "link")
    out = _write_after_forged_redirect(source, str(here / "link" / "b.img"), walk)
    assert out.startswith("refused"), out
    assert "symbolic link" in out
    assert untouched(target)


@pytest.mark.parametrize("walk", [False, True], ids=["openat2", "component-walk"])
def test_a_plain_path_is_followed_by_either_resolver(tmp_path, walk):
    """Both resolvers follow a link-free path of several folders."""
    deep = tmp_path / "a" / "b" / "c"
    deep.mkdir(parents=True)
    source = make_image(tmp_path / "src.img")
    target = make_image(deep / "dst.img")
    forge_moved_from(target)
    out = _write_after_forged_redirect(source, str(target), walk)
    assert out == f"written {target}\n"
    assert target.read_bytes()[:2] == b"zz"


def test_same_owner_redirect_with_the_move_recorded_is_followed(tmp_path):
    """The control for the test above: the same forged redirect along a
    path without links is followed (same owner, move token recorded), so it
    is the folder link that was refused there."""
    source = make_image(tmp_path / "a.img")
    target = make_image(tmp_path / "b.img")
    forge_moved_from(target)
    with TrackedImage(source) as img:
        img.pwrite(b"x", 0)
        forge_redirect(source, str(target))
        img.pwrite(b"followed", 0)
        assert img.path == str(target)
    assert target.read_bytes()[:8] == b"followed"


def test_redirect_to_a_sidecar_that_does_not_record_the_move_is_refused(tmp_path):
    """Same owner, no link: still refused unless the target's sidecar holds
    the token of the move the source's names (a sidecar can't name any
    tracked image of its owner as its own move)."""
    source = make_image(tmp_path / "a.img")
    target = make_image(tmp_path / "b.img")  # tracked, but no move made it
    with TrackedImage(source) as img:
        img.pwrite(b"x", 0)
        forge_redirect(source, str(target))
        with pytest.raises(SidecarUnsafeError, match="does not record this move"):
            img.pwrite(b"escape", 0)
    assert untouched(target)


def test_a_real_move_is_followed(tmp_path):
    source = make_image(tmp_path / "a.img")
    moved = make_image(tmp_path / "b.img")
    with TrackedImage(source) as img, Tracker.open(source) as copier:
        img.pwrite(b"x", 0)
        copier.freeze(5)
        copier.redirect(moved)
        img.pwrite(b"moved", 0)
        assert img.path == str(moved)
    assert moved.read_bytes()[:5] == b"moved"


def test_a_move_into_a_symlinked_folder_is_followed(tmp_path):
    """The copier resolves its own destination's folders: a legitimate move
    behind a folder link still works, with no link left for writers."""
    (tmp_path / "real").mkdir()
    os.symlink(tmp_path / "real", tmp_path / "link")
    source = make_image(tmp_path / "a.img")
    make_image(tmp_path / "real" / "b.img")
    with TrackedImage(source) as img, Tracker.open(source) as copier:
        img.pwrite(b"x", 0)
        copier.freeze(5)
        copier.redirect(tmp_path / "link" / "b.img")
        assert copier.redirect_target() == str(tmp_path / "real" / "b.img")
        img.pwrite(b"moved", 0)
    assert (tmp_path / "real" / "b.img").read_bytes()[:5] == b"moved"


# -- item 2: a redirect binds only the image it was made for --------------------------


def _move_and_die(source: Path, destination: Path) -> None:
    """A sync --move killed right after its redirect: the source and its
    sidecar (state redirected) are left behind."""
    code = (
        "import os, sys, blockmirror\n"
        "t = blockmirror.Tracker.open(sys.argv[1])\n"
        "t.freeze(5)\n"
        "t.redirect(sys.argv[2])\n"
        "os.kill(os.getpid(), 9)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(source), str(destination)],
                          env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    assert proc.returncode == -9


def test_new_image_at_the_old_path_is_not_sent_to_the_moved_one(tmp_path):
    source = make_image(tmp_path / "src.img")
    moved = make_image(tmp_path / "dst.img")
    _move_and_die(source, moved)
    # Someone removes the old image and makes a new one at its path.
    os.unlink(source)
    with open(source, "wb") as f:
        f.truncate(MiB)
    # Its writer must not follow the stale redirect into the moved image
    # (it used to: the write landed in dst.img).
    with pytest.raises(SidecarCorruptError, match="made for another file"):
        TrackedImage(source)
    assert untouched(moved)
    # A reader sees a sidecar that is not about this image...
    with Tracker.open(source) as t:
        assert t.consistent is False
        assert t.info().not_this_image
        t.reset()  # ...and accepting it binds it to the new image
        assert t.state == "running"
    with TrackedImage(source) as img:
        img.pwrite(b"mine", 0)
        assert img.path == str(source)
    assert source.read_bytes()[:4] == b"mine"
    assert untouched(moved)


def test_image_replaced_by_rename_is_refused(tmp_path):
    """The same binding protects against a file swapped in by rename (a
    restore, an editor's safe save): the bitmap is about the old file."""
    image = make_image(tmp_path / "disk.img")
    new = tmp_path / "disk.img.new"
    new.write_bytes(bytes(MiB))
    os.rename(new, image)
    with pytest.raises(SidecarCorruptError, match="made for another file"):
        TrackedImage(image)
