"""A switchover whose freeze lease ran out during the final pass (I3, I6).

The copy made in that pass is no point-in-time copy: writers may have gone
on mid-pass. The sync must re-mark what the pass copied, thaw the writers,
say so in a note and go on with dirty passes - and give up with
NotConvergedError after MAX_SWITCHOVER_ATTEMPTS such failures, the source
running and the shadow copy gone.

The lease is made to run out by patching the public ``Tracker.freeze_holds``
(what the sync asks after its final pass), so these tests hold for any job
that keeps that contract, whatever its internals look like.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from imagetools import MiB, read_at, write_at

import blockmirror
from blockmirror import TrackedImage, Tracker
from blockmirror.copying.verify import compare_files
from blockmirror.migration import sync

G = 65536
NOTE = "freeze lease ran out during the final pass; retried"
# Written as the bulk pass ends (its last progress report), into holes: no
# bulk pass reads them, so the first final pass copies them.
LATE = [(8 * MiB + i * 3 * G, G) for i in range(8)]
LATE_BYTES = sum(n for _, n in LATE)
SCRIBBLE = b"\xee"


@pytest.fixture
def lease(dirs: tuple[Path, Path]) -> tuple[Path, Path]:
    """(dst, image): an empty folder and a tracked 16 MiB image, data in its
    first 4 MiB."""
    src, dst = dirs
    image = src / "lease.img"
    with open(image, "wb") as f:
        f.write(os.urandom(4 * MiB))
        f.truncate(16 * MiB)
    os.chmod(image, 0o600)
    Tracker.create(image).close()
    return dst, image


def late_writer(image: Path) -> tuple[Callable[[blockmirror.SyncProgress], None], list[bytes]]:
    """A progress callback that writes the LATE blocks (through TrackedImage)
    at the bulk pass's last report, and the list that then holds their data."""
    late: list[bytes] = []

    def progress(p: blockmirror.SyncProgress) -> None:
        if p.phase == "bulk" and p.bytes_done >= p.bytes_total and not late:
            late.extend(os.urandom(n) for _, n in LATE)
            with TrackedImage(image) as w:
                for (off, _), block in zip(LATE, late, strict=True):
                    w.pwrite(block, off)

    return progress, late


def record_freezes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Patch Tracker.freeze to note the tracker's state at each call: one
    entry per switchover attempt, "running" if writers were thawed before."""
    states: list[str] = []
    real_freeze = Tracker.freeze

    def freeze(self: Tracker, lease_s: float) -> None:
        states.append(self.state)
        real_freeze(self, lease_s)

    monkeypatch.setattr(Tracker, "freeze", freeze)
    return states


def shadow_copy(dst: Path) -> Path:
    (name,) = [n for n in os.listdir(dst) if n.endswith(".bm-partial")]
    return dst / name


def test_lease_that_ran_out_in_the_final_pass_is_retried(lease, monkeypatch):
    """The first final pass loses its freeze. Its copy of the late blocks is
    then overwritten in the shadow copy (standing for "not to be trusted"):
    only because the sync re-marked them does a later pass copy them again,
    and the copy ends exact. Writers are thawed between the attempts."""
    dst, image = lease
    real_freeze_holds = Tracker.freeze_holds
    answers: list[bool] = []

    def freeze_holds(self: Tracker) -> bool:
        if answers:
            answers.append(real_freeze_holds(self))
        else:  # the first final pass: the lease "ran out"
            for off, n in LATE:
                write_at(shadow_copy(dst), off, SCRIBBLE * n)
            answers.append(False)
        return answers[-1]

    monkeypatch.setattr(Tracker, "freeze_holds", freeze_holds)
    states_at_freeze = record_freezes(monkeypatch)
    progress, late = late_writer(image)
    result = sync(image, dst, target_downtime=1.0, progress=progress)

    assert late and answers[0] is False and answers[-1] is True
    assert result.status == "ok"
    assert NOTE in result.notes
    kinds = [p.kind for p in result.passes]
    assert kinds[0] == "bulk" and kinds[-1] == "final"
    failed = kinds.index("final")
    assert failed < len(kinds) - 1  # the first final pass was not the last pass
    assert result.passes[failed].bytes == LATE_BYTES  # it copied the late blocks...
    assert result.passes[failed + 1].bytes == LATE_BYTES  # ... the next pass again
    # Writers were thawed after the failed attempt: the next freeze found them
    # running (not frozen, not freezing).
    assert states_at_freeze == ["running", "running"]
    # Exact: the scribbles are gone, every late block is in the copy.
    copy = dst / "lease.img"
    assert compare_files(str(image), str(copy)) == []
    for (off, n), block in zip(LATE, late, strict=True):
        assert read_at(copy, off, n) == block
    with Tracker.open(image) as t:
        assert t.state == "running"


def test_retry_under_a_live_writer_ends_at_one_instant(lease, monkeypatch, live_writer):
    """The same failure with a writer process going on: the copy is still the
    source at one instant, and the writer was never left paused."""
    dst, image = lease
    initial = image.read_bytes()
    real_freeze_holds = Tracker.freeze_holds
    answers: list[bool] = []

    def freeze_holds(self: Tracker) -> bool:
        answers.append(bool(answers) and real_freeze_holds(self))
        return answers[-1]

    monkeypatch.setattr(Tracker, "freeze_holds", freeze_holds)
    writer = live_writer(image, rate="4M", wait=10)
    result = sync(image, dst, target_downtime=0.5)
    writer.wait_for_more(10)  # going on after the switch: not frozen
    assert writer.stop() == 0
    assert answers[0] is False and answers[-1] is True
    assert NOTE in result.notes
    assert [p.kind for p in result.passes].count("final") >= 2
    k = writer.assert_point_in_time((dst / "lease.img").read_bytes(), initial)
    assert 10 <= k < len(writer.writes())
    assert image.read_bytes() == writer.replayed(initial)


def test_gives_up_after_three_lost_leases(lease, monkeypatch):
    """freeze_holds never holds: exactly MAX_SWITCHOVER_ATTEMPTS (3) freezes,
    then NotConvergedError; the source is as the writers made it, the shadow
    copy is removed and the tracker is running (writers not paused)."""
    dst, image = lease
    asked = []

    def freeze_holds(self: Tracker) -> bool:
        asked.append(False)
        # A sync that never gives up would loop forever: stop it here.
        assert len(asked) <= 10, "the sync did not give up"
        return False

    monkeypatch.setattr(Tracker, "freeze_holds", freeze_holds)
    states_at_freeze = record_freezes(monkeypatch)
    progress, late = late_writer(image)
    before = image.read_bytes()
    with pytest.raises(blockmirror.NotConvergedError, match="source keeps running"):
        sync(image, dst, target_downtime=1.0, progress=progress)
    # Three attempts, each from running writers (the one before thawed them).
    assert states_at_freeze == ["running"] * 3
    assert len(asked) == 3
    assert os.listdir(dst) == []  # no shadow copy, no manifest
    expected = bytearray(before)
    for (off, n), block in zip(LATE, late, strict=True):
        expected[off:off + n] = block
    assert late and image.read_bytes() == bytes(expected)  # as the writer made it
    with Tracker.open(image) as t:
        assert t.state == "running"
        assert t.info().throttle_bytes_per_s == 0
    # A writer goes on at once, not after a lease (>= 2 s) runs out.
    with TrackedImage(image) as w:
        start = time.monotonic()
        w.pwrite(b"after", 0)
        assert time.monotonic() - start < 1.0
    assert read_at(image, 0, 5) == b"after"
