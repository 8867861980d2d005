"""I3, freeze has a lease: the copier's control block (freeze, thaw, lease,
copier liveness, redirect) and the shared throttle, seen from writer
processes."""

from __future__ import annotations

import errno
import multiprocessing as mp
import os
import queue
import signal
import struct
import time

import pytest
from imagetools import read_at

from blockmirror import TrackedImage, Tracker

MiB = 1024 * 1024
G = 65536
CTX = mp.get_context("spawn")

# struct bm_control (csrc/bm_internal.h) sits at 4096 in the sidecar.
CTL = 4096
CTL_STATE = CTL + 0
CTL_THROTTLE_NEXT = CTL + 40
CTL_SLOTS = CTL + 1080
SLOT_SIZE = 16


# -- child processes ----------------------------------------------------------------


def _writer_service(image: str, commands, results) -> None:
    """A writer that does what it is told: (offset, data) -> pwrite, timed."""
    with TrackedImage(image) as img:
        results.put(("ready", os.getpid()))
        while True:
            cmd = commands.get()
            if cmd is None:
                break
            offset, data = cmd
            t0 = time.monotonic()
            try:
                img.pwrite(data, offset)
            except OSError as e:
                results.put(("error", e.errno, time.monotonic() - t0))
                continue
            results.put(("done", time.monotonic() - t0, img.path))
    results.put(("closed",))


def _copier_freezes_and_hangs(image: str, lease_s: float, frozen) -> None:
    t = Tracker.open(image)
    t.freeze(lease_s)
    frozen.set()
    time.sleep(120)


def _timed_write(image: str, results) -> None:
    with TrackedImage(image) as img:
        t0 = time.monotonic()
        img.pwrite(b"x" * 4096, 0)
        results.put(time.monotonic() - t0)


# -- helpers ------------------------------------------------------------------------


class Writer:
    def __init__(self, image) -> None:
        self.commands = CTX.Queue()
        self.results = CTX.Queue()
        self.proc = CTX.Process(
            target=_writer_service, args=(os.fspath(image), self.commands, self.results)
        )
        self.proc.start()
        kind, self.pid = self.results.get(timeout=30)
        assert kind == "ready"

    def write(self, offset: int, data: bytes) -> None:
        self.commands.put((offset, data))

    def result(self, timeout: float):
        return self.results.get(timeout=timeout)

    def assert_blocked(self, for_s: float) -> None:
        with pytest.raises(queue.Empty):
            self.results.get(timeout=for_s)

    def stop(self) -> None:
        if self.proc.is_alive():
            self.commands.put(None)
            self.proc.join(10)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()


@pytest.fixture
def writer(tracked_image):
    w = Writer(tracked_image)
    yield w
    w.stop()


# -- freeze and thaw ----------------------------------------------------------------


def test_freeze_blocks_writer_until_thaw(tracked_image, writer):
    with Tracker.open(tracked_image) as copier:
        copier.freeze(60)
        assert copier.freeze_holds()
        assert copier.state == "frozen"
        assert copier.info().copier_pid == os.getpid()
        writer.write(3 * G, b"during the freeze")
        writer.assert_blocked(0.5)
        # nothing slipped into the frozen image: not the data, not a mark
        assert read_at(tracked_image, 3 * G, 17) == b"\0" * 17
        assert copier.dirty_bytes() == 0
        assert copier.freeze_holds()
        copier.thaw()
        assert copier.state == "running"
        kind, waited, _ = writer.result(30)
        assert kind == "done"
        assert 0.4 <= waited < 30  # released by the thaw, not by the 60 s lease
        assert read_at(tracked_image, 3 * G, 17) == b"during the freeze"
        assert copier.dirty_extents() == [(3 * G, G)]
        copier.thaw()  # idempotent


def test_lease_expiry_lets_writers_go(tracked_image, writer):
    with Tracker.open(tracked_image) as copier:
        copier.freeze(0.6)
        assert copier.freeze_holds()
        writer.write(0, b"late")
        kind, waited, _ = writer.result(20)  # the copier never thaws
        assert kind == "done"
        assert waited >= 0.3
        assert copier.freeze_holds() is False  # the copier must not switch over now
        assert read_at(tracked_image, 0, 4) == b"late"
        copier.thaw()
        writer.write(G, b"after")
        assert writer.result(10)[0] == "done"


def test_freeze_holds_false_after_lease(tracked_image):
    with Tracker.open(tracked_image) as copier:
        assert copier.freeze_holds() is False  # not frozen at all
        copier.freeze(0.2)
        assert copier.freeze_holds() is True
        time.sleep(0.3)
        assert copier.freeze_holds() is False
        copier.thaw()
        assert copier.freeze_holds() is False


def test_killed_copier_releases_writers(tracked_image, writer):
    frozen = CTX.Event()
    copier = CTX.Process(
        target=_copier_freezes_and_hangs, args=(os.fspath(tracked_image), 60.0, frozen)
    )
    copier.start()
    try:
        assert frozen.wait(30)
        with Tracker.open(tracked_image) as other:
            with pytest.raises(OSError) as ei:
                other.freeze(5)  # a live copier holds it
            assert ei.value.errno == errno.EBUSY
        writer.write(0, b"x")
        writer.assert_blocked(0.3)
        t_kill = time.monotonic()
        os.kill(copier.pid, signal.SIGKILL)
        # not reaped yet: writers must not wait on a zombie either
        assert writer.result(40)[0] == "done"
        assert time.monotonic() - t_kill < 30  # far sooner than the 60 s lease
        assert copier.is_alive() or copier.exitcode == -signal.SIGKILL
        with Tracker.open(tracked_image) as other:
            other.freeze(5)  # a dead copier's freeze is no obstacle
            other.thaw()
    finally:
        copier.kill()
        copier.join()


def test_closing_copier_thaws(tracked_image, writer):
    copier = Tracker.open(tracked_image)
    copier.freeze(60)
    writer.write(0, b"x")
    writer.assert_blocked(0.2)
    copier.close()  # closing while frozen must never leave writers frozen
    assert writer.result(30)[0] == "done"  # long before the 60 s lease


def test_no_writer_freeze_is_fast(tracked_image):
    with Tracker.open(tracked_image) as copier:
        t0 = time.monotonic()
        copier.freeze(5)
        assert time.monotonic() - t0 < 1.0
        copier.thaw()
    with TrackedImage(tracked_image) as idle, Tracker.open(tracked_image) as copier:
        idle.pwrite(b"x", 0)
        t0 = time.monotonic()
        copier.freeze(5)  # an idle writer has nothing in flight
        assert time.monotonic() - t0 < 1.0
        copier.thaw()


def _slot_of(side: str, pid: int) -> int:
    with open(side, "rb") as f:
        f.seek(CTL_SLOTS)
        raw = f.read(64 * SLOT_SIZE)
    for i in range(64):
        if struct.unpack_from("<I", raw, i * SLOT_SIZE)[0] == pid:
            return CTL_SLOTS + i * SLOT_SIZE
    raise AssertionError(f"no writer slot for pid {pid}")


def test_freeze_waits_for_inflight_and_times_out(tracked_image):
    """A write that stays in flight keeps the freeze from completing; when the
    lease runs out the freeze fails and writers are thawed."""
    side = os.fspath(tracked_image) + ".cbt"
    with TrackedImage(tracked_image) as img, Tracker.open(tracked_image) as copier:
        slot = _slot_of(side, os.getpid())
        fd = os.open(side, os.O_RDWR)
        try:
            os.pwrite(fd, struct.pack("<I", 1), slot + 4)  # pretend a write is in flight
            t0 = time.monotonic()
            with pytest.raises(TimeoutError):
                copier.freeze(0.3)
            assert time.monotonic() - t0 >= 0.25
            assert copier.state == "running"
            assert copier.freeze_holds() is False
            os.pwrite(fd, struct.pack("<I", 0), slot + 4)
        finally:
            os.close(fd)
        copier.freeze(5)
        assert copier.freeze_holds()
        copier.thaw()
        img.pwrite(b"fine", 0)


@pytest.mark.parametrize("lease", [0, -1, 61])
def test_bad_lease(tracked_image, lease):
    with Tracker.open(tracked_image) as copier:
        with pytest.raises((OSError, ValueError, OverflowError)):
            copier.freeze(lease)
        assert copier.state == "running"


# -- redirect -----------------------------------------------------------------------


def test_redirect_moves_writer(tracked_image, make_image, writer):
    target = make_image(4 * MiB, "moved.img")
    Tracker.create(target).close()
    with Tracker.open(tracked_image) as copier:
        copier.freeze(10)
        copier.redirect(target)
        assert copier.state == "redirected"
        assert copier.redirect_target() == os.fspath(target)
        writer.write(5 * G, b"to the new home")
        kind, _, path = writer.result(10)
        assert kind == "done"
        assert path == os.fspath(target)
        assert read_at(target, 5 * G, 15) == b"to the new home"
        assert read_at(tracked_image, 5 * G, 15) == b"\0" * 15
        assert copier.dirty_bytes() == 0  # the source saw nothing
        writer.write(6 * G, b"again")
        assert writer.result(10)[2] == os.fspath(target)
        with Tracker.open(target) as t:
            assert t.dirty_extents() == [(5 * G, 2 * G)]
            assert t.live_writers() == 1
        assert copier.live_writers() == 0  # the writer left the source cleanly
        with pytest.raises(OSError) as ei:
            copier.freeze(5)  # the image was moved away
        assert ei.value.errno == errno.EBUSY
    writer.stop()
    for p in (tracked_image, target):
        with Tracker.open(p) as t:
            assert t.consistent


def test_redirect_to_untracked_target_fails_loudly(tracked_image, make_image, writer):
    target = make_image(4 * MiB, "moved.img")  # no sidecar: the copier forgot it
    with Tracker.open(tracked_image) as copier:
        copier.freeze(10)
        # The copier learns it at once (the redirect needs the target's
        # tracker to record the move); writers are never sent there.
        with pytest.raises(FileNotFoundError):
            copier.redirect(target)
        assert copier.state == "frozen"
        copier.thaw()
        writer.write(0, b"nowhere")
        assert writer.result(10)[0] == "done"
    assert read_at(tracked_image, 0, 7) == b"nowhere"
    assert read_at(target, 0, 7) == b"\0" * 7


def test_redirect_to_symlink_refused(tracked_image, make_image, tmp_path, writer):
    real = make_image(4 * MiB, "real.img")
    Tracker.create(real).close()
    link = tmp_path / "link.img"
    os.symlink(real, link)
    with Tracker.open(tracked_image) as copier:
        copier.freeze(10)
        with pytest.raises(OSError) as ei:
            copier.redirect(link)
        assert ei.value.errno == errno.ELOOP
        copier.thaw()
        writer.write(0, b"escape")
        assert writer.result(10)[0] == "done"
    assert read_at(real, 0, 6) == b"\0" * 6


def test_redirect_needs_a_freeze(tracked_image, make_image):
    target = make_image(4 * MiB, "moved.img")
    Tracker.create(target).close()
    with Tracker.open(tracked_image) as copier:
        with pytest.raises(OSError) as ei:
            copier.redirect(target)
        assert ei.value.errno == errno.EINVAL
        assert copier.state == "running"
        with pytest.raises(OSError) as ei:
            copier.redirect_target()
        assert ei.value.errno == errno.ENOENT
        copier.freeze(5)
        with pytest.raises(OSError) as ei:
            copier.redirect("/" + "x" * 2000)
        assert ei.value.errno == errno.EINVAL
        copier.thaw()


def test_relative_redirect_is_made_absolute(tracked_image, make_image, monkeypatch):
    target = make_image(4 * MiB, "moved.img")
    Tracker.create(target).close()
    monkeypatch.chdir(target.parent)
    with Tracker.open(tracked_image) as copier:
        copier.freeze(5)
        copier.redirect("moved.img")
        assert copier.redirect_target() == os.fspath(target)


# -- throttle -------------------------------------------------------------------------


def test_throttle_limits_rate(tracked_image):
    with Tracker.open(tracked_image) as copier, TrackedImage(tracked_image) as img:
        copier.set_throttle(4 * MiB)
        assert copier.info().throttle_bytes_per_s == 4 * MiB
        chunk = b"t" * G
        t0 = time.monotonic()
        for i in range(16):  # 1 MiB at 4 MiB/s: at least 15/16 of 0.25 s
            img.pwrite(chunk, i * G)
        assert time.monotonic() - t0 >= 0.2
        copier.set_throttle(0)
        assert copier.info().throttle_bytes_per_s == 0
        for i in range(16):
            img.pwrite(chunk, i * G)
        assert img.pread(G, 15 * G) == chunk


def test_throttle_clock_from_another_boot(tracked_image):
    """The throttle's virtual clock is CLOCK_MONOTONIC, which restarts at
    boot while the sidecar persists: a stale clock far in the future must
    not put writers to sleep for days."""
    side = os.fspath(tracked_image) + ".cbt"
    with Tracker.open(tracked_image) as copier:
        copier.set_throttle(1 << 30)
        fd = os.open(side, os.O_RDWR)
        try:
            day = 86400 * 10**9
            os.pwrite(fd, struct.pack("<Q", time.monotonic_ns() + day), CTL_THROTTLE_NEXT)
        finally:
            os.close(fd)
        results = CTX.Queue()
        p = CTX.Process(target=_timed_write, args=(os.fspath(tracked_image), results))
        p.start()
        try:
            waited = results.get(timeout=10)
        finally:
            p.kill()
            p.join()
        assert waited < 5
