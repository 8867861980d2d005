"""I4, distrust an unclean bitmap: a writer that dies with the sidecar open
leaves it reported inconsistent until a consumer resets it."""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import signal
import struct
import subprocess
import time

import pytest
from imagetools import wait_for

from blockmirror import TrackedImage, Tracker

MiB = 1024 * 1024
G = 65536
CTX = mp.get_context("spawn")


# -- child processes (module level so 'spawn' can import them) ------------------


def _write_until_killed(image: str, ready, how: str) -> None:
    rng = random.Random(os.getpid())
    if how == "image":
        img = TrackedImage(image)
        writes = 0
        while True:
            img.pwrite(os.urandom(512), rng.randrange(0, 4 * MiB - 512))
            writes += 1
            if writes == 100:
                ready.set()
    else:
        t = Tracker.open(image, writer=True)
        marks = 0
        while True:
            t.mark(rng.randrange(0, 4 * MiB - 1), 1)
            marks += 1
            if marks == 100:
                ready.set()


def _open_and_exit(image: str, how: str) -> None:
    if how == "clean":
        with TrackedImage(image) as img:
            img.pwrite(b"bye", 0)
    elif how == "exit-without-close":
        img = TrackedImage(image)
        img.pwrite(b"bye", 0)
        os._exit(0)  # no close, no atexit, no garbage collection
    elif how == "reader":
        t = Tracker.open(image)
        t.dirty_extents()
        os.kill(os.getpid(), signal.SIGKILL)
    else:
        raise AssertionError(how)


# -- helpers ----------------------------------------------------------------------


def _start_and_kill(image, how: str, reap: bool = True):
    ready = CTX.Event()
    p = CTX.Process(target=_write_until_killed, args=(os.fspath(image), ready, how))
    p.start()
    try:

        def going() -> bool:
            assert p.is_alive(), f"writer died before it got going (exit {p.exitcode})"
            return ready.wait(0.05)

        wait_for(going, 30, "the writer to get going", every=0)
        time.sleep(0.02)  # let it get deeper into the stream
        os.kill(p.pid, signal.SIGKILL)
        if reap:
            p.join(10)
            assert p.exitcode == -signal.SIGKILL
        else:
            _wait_zombie(p.pid)
    except BaseException:
        p.kill()
        p.join()
        raise
    return p


def _wait_zombie(pid: int, timeout: float = 10.0) -> None:
    def dead_for_good() -> bool:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        # a zombie whose other threads (numpy's BLAS pool) have gone too:
        # dead for good, only waiting for its parent to reap it
        return state in ("Z", "X") and len(os.listdir(f"/proc/{pid}/task")) == 1

    wait_for(dead_for_good, timeout, f"pid {pid} to become a zombie")


def _run(target, *args) -> int:
    p = CTX.Process(target=target, args=args)
    p.start()
    p.join(30)
    return p.exitcode


# -- tests ----------------------------------------------------------------------


@pytest.mark.parametrize("how", ["image", "tracker"])
def test_killed_writer_leaves_sidecar_inconsistent(tracked_image, how):
    with Tracker.open(tracked_image) as t:
        old_series = t.series
        assert t.consistent
    _start_and_kill(tracked_image, how)

    with Tracker.open(tracked_image) as t:
        assert t.consistent is False
        assert t.consistent is False
        assert t.live_writers() == 0  # the dead slot is not a live writer
        t.reset()
        assert t.consistent is True
        assert t.series != old_series
        assert t.generation == 0
        assert t.dirty_bytes() == 4 * MiB
        assert t.dirty_extents() == [(0, 4 * MiB)]
    # the reset is persistent: a later consumer trusts the new series
    with Tracker.open(tracked_image) as t:
        assert t.consistent is True
        assert t.series != old_series
        assert t.dirty_extents() == [(0, 4 * MiB)]


def test_killed_writer_still_a_zombie_is_dead(tracked_image):
    """A killed writer whose parent has not reaped it yet is still dead: it
    will never finish its write, so the sidecar must already be unclean."""
    p = _start_and_kill(tracked_image, "image", reap=False)
    try:
        with Tracker.open(tracked_image) as t:
            assert t.consistent is False
    finally:
        p.join(10)


def test_unclean_survives_another_writer_opening(tracked_image):
    """The next writer frees the dead slot, but the evidence stays."""
    _start_and_kill(tracked_image, "image")
    with TrackedImage(tracked_image) as img:
        img.pwrite(b"x", 0)
        assert img.tracker.consistent is False
    with Tracker.open(tracked_image) as t:
        assert t.consistent is False
        t.reset()
        assert t.consistent


def test_clean_close_in_child_is_consistent(tracked_image):
    assert _run(_open_and_exit, os.fspath(tracked_image), "clean") == 0
    with Tracker.open(tracked_image) as t:
        assert t.consistent is True
        assert t.live_writers() == 0
        assert t.dirty_extents() == [(0, G)]


def test_exit_without_close_is_unclean(tracked_image):
    assert _run(_open_and_exit, os.fspath(tracked_image), "exit-without-close") == 0
    with Tracker.open(tracked_image) as t:
        assert t.consistent is False


def test_killed_reader_is_harmless(tracked_image):
    assert _run(_open_and_exit, os.fspath(tracked_image), "reader") == -signal.SIGKILL
    with Tracker.open(tracked_image) as t:
        assert t.consistent is True


def test_clean_close_in_process(tracked_image):
    with TrackedImage(tracked_image) as img:
        img.pwrite(b"abc", 5 * G)
        with Tracker.open(tracked_image) as t:
            assert t.consistent  # a live writer is not a crash
            assert t.live_writers() == 1
    with Tracker.open(tracked_image) as t:
        assert t.consistent
        assert t.dirty_extents() == [(5 * G, G)]


def test_untracked_growth_is_inconsistent(tracked_image):
    os.truncate(tracked_image, 6 * MiB + 7)
    with Tracker.open(tracked_image) as t:
        assert t.consistent is False
        t.reset()
        assert t.consistent is True
        # every granule of the image as it is now is dirty, the grown part too
        assert t.image_size == 6 * MiB + 7
        assert t.dirty_extents() == [(0, 6 * MiB + 7)]
    with Tracker.open(tracked_image) as t:
        assert t.consistent is True


def test_untracked_growth_seen_by_writer(tracked_image):
    os.truncate(tracked_image, 5 * MiB)
    with TrackedImage(tracked_image) as img:
        assert img.tracker.consistent is False


# struct bm_control's writer slots (csrc/bm_internal.h): {u32 pid, u32
# inflight, u64 start_time} x 64, 1080 bytes into the control page at 4096.
SLOTS = 4096 + 1080


def _poke_slot(image, index: int, pid: int, start_time: int) -> None:
    fd = os.open(os.fspath(image) + ".cbt", os.O_RDWR)
    try:
        os.pwrite(fd, struct.pack("<IIQ", pid, 0, start_time), SLOTS + 16 * index)
    finally:
        os.close(fd)


def test_writer_dead_mid_claim_frees_its_slot(tracked_image):
    """A writer that died inside open, between taking a slot and stamping its
    start time, never wrote: its slot is freed, not counted as a live writer
    for ever (which would keep a move from ever seeing its writers gone)."""
    with TrackedImage(tracked_image) as img:  # check the layout on a real slot
        with open(os.fspath(tracked_image) + ".cbt", "rb") as f:
            raw = f.read(SLOTS + 16)[SLOTS:]
        assert struct.unpack("<IIQ", raw)[0] == os.getpid()
        img.pwrite(b"x", 0)
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        _poke_slot(tracked_image, 5, sleeper.pid, 0)  # claiming right now
        with Tracker.open(tracked_image) as t:
            assert t.live_writers() == 1
        sleeper.kill()
        sleeper.wait()
        with Tracker.open(tracked_image) as t:
            assert t.live_writers() == 0
            assert t.consistent  # it never wrote: no crash to report
    finally:
        sleeper.kill()
        sleeper.wait()


def test_untracked_growth_seen_by_an_open_tracker(tracked_image):
    with Tracker.open(tracked_image) as t:
        assert t.consistent
        os.truncate(tracked_image, 5 * MiB)  # grown behind the tracker's back
        assert t.consistent is False
        with TrackedImage(tracked_image) as img:
            # a tracked write past the end grows the tracked size over the
            # untracked part, marking all of it dirty: nothing is missed now
            img.pwrite(b"end", 5 * MiB)
        assert t.consistent is True
        assert t.dirty_extents() == [(4 * MiB, MiB + 3)]
