"""Issue 8, the C side: reading the sidecar changes nothing (the writer
sweep is an explicit call), and a copier handle remembers what the
filesystems refused for every later call and thread."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import threading
import time

import numpy as np

from blockmirror import Tracker
from blockmirror._bindings import copy as _copy
from blockmirror.extents import EXTENT_DTYPE

CTX = mp.get_context("spawn")


def _hold_writer_slot(image: str, ready) -> None:  # type: ignore[no-untyped-def]
    t = Tracker.open(image, writer=True)
    ready.set()
    time.sleep(60)
    t.close()


def test_info_does_not_sweep_but_consistent_does(tracked_image) -> None:  # type: ignore[no-untyped-def]
    with Tracker.open(tracked_image) as t:
        ready = CTX.Event()
        p = CTX.Process(target=_hold_writer_slot, args=(os.fspath(tracked_image), ready))
        p.start()
        try:
            assert ready.wait(30)
            os.kill(p.pid, signal.SIGKILL)
            p.join(10)
        finally:
            p.kill()
            p.join()
        # info() reports what the control block holds: the dead slot is still
        # there and nobody has marked the sidecar unclean yet.
        info = t.info()
        assert info.live_writers == 1
        assert not info.unclean
        # consistent sweeps explicitly: it notices the dead writer (I4).
        assert t.consistent is False
        assert t.info().unclean
        assert t.info().live_writers == 0
        assert t.live_writers() == 0


def test_copier_handle_drops_copy_file_range_for_every_thread(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """copy_file_range from a pipe-like source is refused; the first refusal
    clears the capability on the handle, so calls on other threads, later,
    never try it again (they report no new refusal)."""
    dst = tmp_path / "dst"
    dst_fd = os.open(dst, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        # A source the kernel cannot copy_file_range from (procfs: EINVAL or
        # EXDEV, both "unsupported").
        procfile = os.open("/proc/self/stat", os.O_RDONLY)
        try:
            handle = _copy.new_copier(procfile, dst_fd, 4096, copy_file_range=True, seek=False)
            extents = np.array([(0, 4096)], dtype=EXTENT_DTYPE)
            first = _copy.copy_extents(handle, extents, None)
            assert first.found_unsupported & _copy.FILE_RANGE_FAILED
            assert not _copy.capabilities(handle) & _copy.CAN_FILE_RANGE
            found: list[int] = []

            def again() -> None:
                found.append(_copy.copy_extents(handle, extents, None).found_unsupported)

            threads = [threading.Thread(target=again) for _ in range(4)]
            for th in threads:
                th.start()
            for th in threads:
                th.join()
            assert found == [0, 0, 0, 0]
        finally:
            os.close(procfile)
    finally:
        os.close(dst_fd)
