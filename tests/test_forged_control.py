"""Issue 13, item 3: a forged or damaged control block, or a sidecar cut
short under a running writer, must not become a denial of service: no
writer waits longer than the longest lease a copier may set, a forged
in-flight count does not make every freeze fail, and a truncated sidecar
fails writes instead of killing the writer with SIGBUS."""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import signal
import struct
import subprocess
import time

import pytest

from blockmirror import TrackedImage, Tracker, sidecar_path

MiB = 1024 * 1024
CTX = mp.get_context("spawn")

# struct bm_control (csrc/bm_internal.h), in the page at 4096.
CTL = 4096
CTL_STATE = CTL + 0
CTL_COPIER_PID = CTL + 4
CTL_COPIER_START = CTL + 8
CTL_LEASE_DEADLINE = CTL + 16
CTL_SLOTS = CTL + 1080
STATE_FROZEN = 2


def poke(path: str, offset: int, data: bytes) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


def start_time(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[19])


@pytest.fixture
def bystander():
    """Some live process that has nothing to do with the sidecar."""
    proc = subprocess.Popen(["sleep", "120"])
    yield proc.pid
    proc.kill()
    proc.wait()


def _timed_write(image: str, results, times: bool = False) -> None:  # type: ignore[no-untyped-def]
    """One tracked write; reports how long it took, or (TIMES) when it
    started and ended on the monotonic clock."""
    with TrackedImage(image) as img:
        t0 = time.monotonic()
        img.pwrite(b"x", 0)
        t1 = time.monotonic()
        results.put((t0, t1) if times else t1 - t0)


def _one_write_takes(image: object) -> float:
    """Seconds one tracked write from a fresh process takes; fails the test
    if it is held for 15 s."""
    results = CTX.Queue()
    p = CTX.Process(target=_timed_write, args=(os.fspath(image), results))
    p.start()
    try:
        return float(results.get(timeout=15))
    except queue.Empty:
        pytest.fail("a forged freeze held the writer")
    finally:
        p.kill()
        p.join()


def test_forged_freeze_with_a_far_deadline_does_not_hold_writers(tracked_image, bystander):
    """A freeze naming a live process, with a deadline a day away: no copier
    can set a lease longer than BM_MAX_LEASE_NS, so the writer goes on at
    once (it used to wait 120 s)."""
    side = sidecar_path(tracked_image)
    day = 86400 * 10**9
    poke(side, CTL_COPIER_PID, struct.pack("<IQQ", bystander, start_time(bystander),
                                           time.monotonic_ns() + day))
    poke(side, CTL_STATE, struct.pack("<I", STATE_FROZEN))
    assert _one_write_takes(tracked_image) < 5


def test_forged_freeze_within_the_lease_limit_is_void_too(tracked_image, bystander):
    """A deadline inside the 60 s limit, naming a live process that holds no
    tracker (it does not map the sidecar): writers find out after a short
    wait and go on (they used to wait the whole forged lease)."""
    side = sidecar_path(tracked_image)
    poke(side, CTL_COPIER_PID, struct.pack("<IQQ", bystander, start_time(bystander),
                                           time.monotonic_ns() + 30 * 10**9))
    poke(side, CTL_STATE, struct.pack("<I", STATE_FROZEN))
    assert _one_write_takes(tracked_image) < 5


def test_a_real_freeze_longer_than_the_suspicion_still_holds(tracked_image):
    """The check above must not void a real copier's freeze: it maps the
    sidecar, so a writer waits out its whole lease (here 5 s). Measured
    against the freeze's own clock, so a slow start of the writer process on
    a loaded machine cannot shorten what the test sees."""
    lease = 5.0
    frozen = CTX.Queue()
    copier = CTX.Process(target=_freeze_and_sleep, args=(os.fspath(tracked_image), lease, frozen))
    copier.start()
    try:
        frozen_at = frozen.get(timeout=30)
        results = CTX.Queue()
        p = CTX.Process(target=_timed_write, args=(os.fspath(tracked_image), results, True))
        p.start()
        try:
            started, ended = results.get(timeout=30)
        finally:
            p.kill()
            p.join()
        assert started < frozen_at + lease - 1, "the writer started too late to tell"
        assert ended > frozen_at + lease - 0.5  # held until the lease ended, not voided at 50 ms
    finally:
        copier.kill()
        copier.join()


def _freeze_and_sleep(image: str, lease_s: float, frozen) -> None:  # type: ignore[no-untyped-def]
    t = Tracker.open(image)
    t.freeze(lease_s)
    frozen.put(time.monotonic())
    time.sleep(60)


def test_forged_throttle_owner_is_lifted(tracked_image, bystander):
    """A throttle of 1 byte/s said to be set by a live process that holds no
    tracker: lifted at the first look (it used to bind while that lived)."""
    side = sidecar_path(tracked_image)
    with Tracker.open(tracked_image) as t:
        t.set_throttle(1 << 30)
    poke(side, CTL + 32, struct.pack("<Q", 1))  # throttle_bytes_per_s
    poke(side, CTL + 40, struct.pack("<Q", 0))  # throttle_next_ns
    poke(side, CTL + 2104, struct.pack("<IIQ", bystander, 0, start_time(bystander)))
    with TrackedImage(tracked_image) as img:
        t0 = time.monotonic()
        for i in range(20):
            img.pwrite(b"x" * 4096, i * 4096)
        assert time.monotonic() - t0 < 5
        assert img.tracker.info().throttle_bytes_per_s == 0


def test_forged_inflight_count_does_not_fail_every_freeze(tracked_image, bystander):
    """A slot naming a live process that never mapped the sidecar, with a
    write 'in flight': the drain ignores it once it has taken suspiciously
    long, so the freeze holds (it used to time out, every time)."""
    side = sidecar_path(tracked_image)
    poke(side, CTL_SLOTS + 16 * 7, struct.pack("<IIQ", bystander, 1, start_time(bystander)))
    with Tracker.open(tracked_image) as copier:
        assert copier.live_writers() == 1  # the forged slot looks alive
        t0 = time.monotonic()
        copier.freeze(2)
        assert copier.freeze_holds()
        assert time.monotonic() - t0 < 1.5
        copier.thaw()


@pytest.mark.parametrize("count", [0xFFFFFFFF, 1 << 20])
def test_absurd_inflight_count_of_a_real_writer_is_ignored(tracked_image, count):
    side = sidecar_path(tracked_image)
    with TrackedImage(tracked_image) as img, Tracker.open(tracked_image) as copier:
        img.pwrite(b"x", 0)
        with open(side, "rb") as f:
            f.seek(CTL_SLOTS)
            raw = f.read(64 * 16)
        slot = next(i for i in range(64)
                    if struct.unpack_from("<I", raw, 16 * i)[0] == os.getpid())
        poke(side, CTL_SLOTS + 16 * slot + 4, struct.pack("<I", count))
        copier.freeze(2)
        assert copier.freeze_holds()
        copier.thaw()


def _write_until_error(image: str, ready, results) -> None:  # type: ignore[no-untyped-def]
    img = TrackedImage(image)
    n = 0
    try:
        while True:
            img.pwrite(os.urandom(4096), (n * 4096 * 17) % (4 * MiB - 4096))
            n += 1
            if n == 100:
                ready.set()
    except OSError as e:
        results.put(("error", e.errno, str(e)))
    try:
        img.pwrite(b"again", 0)
    except OSError as e:
        results.put(("again", e.errno))
    img.close()
    results.put(("closed",))


@pytest.mark.parametrize("cut", [0, 4096, 8192], ids=["all", "control", "bitmap"])
def test_sidecar_truncated_under_a_running_writer(tracked_image, cut):
    """Truncating the sidecar used to kill the writer with SIGBUS (its next
    store hit a page past the file's end). Now its writes fail with EUCLEAN,
    every later one too, and it can still close."""
    ready, results = CTX.Event(), CTX.Queue()
    p = CTX.Process(target=_write_until_error, args=(os.fspath(tracked_image), ready, results))
    p.start()
    try:
        assert ready.wait(30)
        os.truncate(sidecar_path(tracked_image), cut)
        p.join(30)
        assert p.exitcode != -signal.SIGBUS, "the writer was killed by SIGBUS"
        assert p.exitcode == 0
        kind, err, message = results.get(timeout=5)
        assert (kind, err) == ("error", 117)  # EUCLEAN
        assert "truncated" in message
        assert results.get(timeout=5) == ("again", 117)
        assert results.get(timeout=5) == ("closed",)
    finally:
        p.kill()
        p.join()
