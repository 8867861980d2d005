"""Issue 11: the last writer's seal costs what was written, not the image's
apparent size, and seals as well as before (csrc/eras.c).

A writer that raises eras in a chunk marks the chunk's checksum slot; the
sealing computes the marked chunks only and leaves every other slot as the
last sealing (or the sidecar's creation) left it. The tests read the slots
straight from the sidecar (layout in csrc/bm_internal.h) to see what a seal
wrote, and damage eras sealed in an *earlier* session to show that skipping
unmarked chunks loses no protection.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import struct
from pathlib import Path

import pytest

from blockmirror import ChangeIdInvalidError, TrackedImage, Tracker
from blockmirror import sidecar_path as side_of

G = 65536
CHUNK_GRANULES = 4096
BITMAP = 40960  # header, control and eight interlock pages
CHUNK_BYTES = 512 + CHUNK_GRANULES * 4 + 8  # dirty words, eras, checksum slot
TOUCH = 1 << 63
OFF_ERA_SEAL = 116
SEALED = 2


def slot(image: Path, chunk: int) -> int:
    with open(side_of(image), "rb") as f:
        f.seek(BITMAP + chunk * CHUNK_BYTES + 512 + CHUNK_GRANULES * 4)
        return int.from_bytes(f.read(8), "little")


def seal_state(image: Path) -> int:
    with open(side_of(image), "rb") as f:
        f.seek(OFF_ERA_SEAL)
        return struct.unpack("<I", f.read(4))[0] & 3


def zero_chunk_eras(image: Path, chunk: int) -> None:
    fd = os.open(side_of(image), os.O_RDWR)
    try:
        os.pwrite(fd, bytes(CHUNK_GRANULES * 4), BITMAP + chunk * CHUNK_BYTES + 512)
    finally:
        os.close(fd)


def write_session(image: Path, granules: list[int]) -> None:
    with TrackedImage(image) as img:
        for g in granules:
            img.pwrite(b"new data", g * G)


@pytest.fixture
def eight_chunks(tmp_path: Path) -> Path:
    """An image of 8 chunks (2 GiB at 64 KiB granules), tracked, a change id taken."""
    image = tmp_path / "eight.img"
    with open(image, "wb") as f:
        f.truncate(8 * CHUNK_GRANULES * G)
    Tracker.create(image).close()
    return image


def change_id(image: Path) -> str:
    with Tracker.open(image) as t:
        return t.change_id()


def test_a_writer_marks_the_chunks_it_raises_and_the_seal_sums_only_those(eight_chunks):
    image = eight_chunks
    change_id(image)  # generation 1: writes raise eras from here on
    with TrackedImage(image) as img:
        img.pwrite(b"x", 3 * CHUNK_GRANULES * G + 5 * G)  # chunk 3
        img.pwrite(b"y", 6 * CHUNK_GRANULES * G)  # chunk 6
        assert slot(image, 3) & TOUCH and slot(image, 6) & TOUCH
        assert slot(image, 0) == 0
    assert seal_state(image) == SEALED
    for c in range(8):
        value = slot(image, c)
        assert not value & TOUCH, (c, hex(value))
        # Written chunks carry a checksum now; the others were never written.
        assert (value != 0) == (c in (3, 6)), (c, hex(value))


def test_rewriting_a_granule_of_the_current_era_leaves_the_seal_alone(eight_chunks):
    image = eight_chunks
    change_id(image)
    write_session(image, [7])
    sealed = slot(image, 0)
    with TrackedImage(image) as img:
        img.pwrite(b"again", 7 * G)  # its era is current already: nothing to mark
        assert slot(image, 0) == sealed
    assert slot(image, 0) == sealed and seal_state(image) == SEALED


def test_eras_sealed_in_an_earlier_session_are_still_checked(eight_chunks):
    """Chunk 1 is summed by the first seal only; the second seal skips it.
    Zeroing its eras afterwards must still refuse the change id."""
    image = eight_chunks
    since = change_id(image)
    write_session(image, [CHUNK_GRANULES + 9])
    change_id(image)
    write_session(image, [5 * CHUNK_GRANULES + 2])  # another chunk, another seal
    with Tracker.open(image) as t:
        assert t.consistent
        assert t.changed_extents(since) == [((CHUNK_GRANULES + 9) * G, G),
                                            ((5 * CHUNK_GRANULES + 2) * G, G)]
    zero_chunk_eras(image, 1)
    with Tracker.open(image) as t, pytest.raises(ChangeIdInvalidError, match="checksums"):
        t.changed_extents(since)


def test_a_mark_planted_under_a_seal_is_damage(eight_chunks):
    """Eras change only with the seal open; a mark found under a seal says
    something changed them behind the writers' backs."""
    image = eight_chunks
    since = change_id(image)
    write_session(image, [1])
    fd = os.open(side_of(image), os.O_RDWR)
    try:
        os.pwrite(fd, (TOUCH | 1 << 32).to_bytes(8, "little"),
                  BITMAP + 4 * CHUNK_BYTES + 512 + CHUNK_GRANULES * 4)
    finally:
        os.close(fd)
    with Tracker.open(image) as t, pytest.raises(ChangeIdInvalidError):
        t.changed_extents(since)


def test_a_reset_zeroes_eras_and_their_checksums(eight_chunks):
    image = eight_chunks
    change_id(image)
    write_session(image, [2, 2 * CHUNK_GRANULES])
    with Tracker.open(image) as t:
        t.reset()
        fresh = t.change_id()
    assert seal_state(image) == SEALED
    assert all(slot(image, c) & 0xFFFFFFFF == 0 for c in range(8))
    write_session(image, [3 * CHUNK_GRANULES + 1])
    with Tracker.open(image) as t:
        assert t.consistent
        assert t.changed_extents(fresh) == [((3 * CHUNK_GRANULES + 1) * G, G)]


def _sessions(image: str, seed: int, rounds: int) -> None:
    rng = random.Random(seed)
    for _ in range(rounds):
        with TrackedImage(image) as img:
            for _ in range(rng.randint(1, 6)):
                img.pwrite(b"s", rng.randrange(8 * CHUNK_GRANULES) * G)


def test_racing_sealers_leave_correct_checksums(eight_chunks):
    """Writers opening and closing in four processes at once: sealers race
    each other and writers arriving mid-seal. No seal may store a checksum
    that a later check finds wrong (false damage), and no write is lost."""
    image = eight_chunks
    since = change_id(image)
    ctx = mp.get_context("spawn")
    for round_ in range(3):
        procs = [ctx.Process(target=_sessions, args=(str(image), round_ * 10 + i, 25))
                 for i in range(4)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(120)
            assert p.exitcode == 0
        with Tracker.open(image) as t:
            assert not t.info().eras_damaged
            assert t.consistent
            t.changed_extents(since)  # checks the seal if one is in place
        change_id(image)  # the next round raises eras to a new generation


def test_changed_since_skips_only_chunks_sealed_unwritten(eight_chunks):
    """A sealed query skips chunks whose checksum says never written; every
    write still shows, with the writer gone (sealed) or still in (open)."""
    image = eight_chunks
    since = change_id(image)
    write_session(image, [2 * CHUNK_GRANULES + 3])
    with TrackedImage(image) as img:
        img.pwrite(b"live", (6 * CHUNK_GRANULES + 1) * G)
        with Tracker.open(image) as reader:  # the seal is open: all eras read
            assert reader.changed_extents(since) == [((2 * CHUNK_GRANULES + 3) * G, G),
                                                     ((6 * CHUNK_GRANULES + 1) * G, G)]
    assert seal_state(image) == SEALED
    with Tracker.open(image) as reader:
        assert reader.changed_extents(since) == [((2 * CHUNK_GRANULES + 3) * G, G),
                                                 ((6 * CHUNK_GRANULES + 1) * G, G)]
