"""Failure paths of sync (I3, I6): out of space, signals, a copier killed
while writers are frozen. Each leaves the source as the writers made it,
removes what the destination side created, and never leaves a writer paused."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time

import pytest
from imagetools import (
    MiB,
    make_data_image,
    partial_exists,
    run_cli,
    run_python,
    start_cli,
    wait_for,
)

import blockmirror
from blockmirror import Tracker
from blockmirror.migration import sync


def fill(folder):
    """Another tenant: write FOLDER/filler until the filesystem is full."""
    with open(folder / "filler", "wb") as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\xaa" * MiB)


def test_out_of_space_at_precheck(tmp_path, small_tmpfs):
    src = tmp_path / "big.img"
    content = make_data_image(src, 32 * MiB, extents=12)  # 12 MiB allocated
    small = small_tmpfs("8m")
    proc = run_cli("sync", src, small, timeout=60)
    assert proc.returncode == 4, proc.stderr
    err = proc.stderr
    assert err.count("\n") == 1 and "need 12.0 MiB" in err and "free" in err
    assert os.listdir(small) == []
    assert src.read_bytes() == content


def test_out_of_space_mid_copy_cleans_up(tmp_path, small_tmpfs):
    """Another tenant fills the destination while the bulk pass runs."""
    src = tmp_path / "a.img"
    content = make_data_image(src, 64 * MiB, extents=24, tracked=True)
    small = small_tmpfs("40m")
    filled = []

    def fill_once(progress):
        if not filled:
            fill(small)
            filled.append(True)

    with pytest.raises(blockmirror.OutOfSpaceError) as info:
        sync(src, small, progress=fill_once, rate_limit=64 * MiB)
    assert filled
    assert isinstance(info.value, OSError) and info.value.errno == 28
    assert os.listdir(small) == ["filler"]
    assert src.read_bytes() == content
    with Tracker.open(src) as t:
        assert t.state == "running"


def test_out_of_space_mid_copy_exit_code(tmp_path, small_tmpfs):
    src = tmp_path / "a.img"
    make_data_image(src, 64 * MiB, extents=24)
    small = small_tmpfs("40m")
    proc = start_cli("sync", src, small, "--bwlimit", "16M")
    wait_for(lambda: partial_exists(small), what="the partial copy")
    fill(small)
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode == 4, err
    assert "out of space" in err or "No space" in err
    assert os.listdir(small) == ["filler"]


@pytest.mark.parametrize("signum,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_cleans_up(tmp_path, signum, code):
    src = tmp_path / "a.img"
    content = make_data_image(src, 64 * MiB, extents=32, tracked=True)
    dst = tmp_path / "dst"
    dst.mkdir()
    proc = start_cli("sync", src, dst, "--bwlimit", "16M")
    wait_for(lambda: partial_exists(dst), what="the partial copy")
    time.sleep(0.2)
    proc.send_signal(signum)
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert os.listdir(dst) == []
    assert src.read_bytes() == content
    with Tracker.open(src) as t:
        assert t.state == "running"


def test_sync_killed_during_freeze(tmp_path, live_writer):
    """SIGKILL the copier while writers are frozen: they resume promptly
    (the copier is gone, long before the lease ends), nothing they wrote is
    lost, and the next run removes the leftover and succeeds."""
    src_dir, dst = tmp_path / "src", tmp_path / "dst"
    src_dir.mkdir()
    dst.mkdir()
    image = src_dir / "k.img"
    initial = make_data_image(image, 32 * MiB, extents=8, tracked=True)
    writer = live_writer(image, rate="1M", write_size="64k", wait=5)
    # A slow copy and a long target downtime: the final pass runs ~1 s.
    proc = start_cli("sync", image, dst, "--bwlimit", "2M", "--target-downtime", "3s")
    with Tracker.open(image) as t:
        wait_for(lambda: t.state in ("freezing", "frozen"), timeout=60, what="the freeze")
        proc.kill()
        killed_at = time.monotonic()
        proc.wait(timeout=10)
        writer.wait_for_more(3, timeout=10)
        resumed_after = time.monotonic() - killed_at
    assert resumed_after < 3.0  # well inside the 12 s lease: the dead copier was noticed
    assert partial_exists(dst)  # SIGKILL: nothing could clean up
    rerun = run_cli("sync", image, dst, "--target-downtime", "1s", "--json")
    assert rerun.returncode == 0, rerun.stderr
    assert json.loads(rerun.stdout)["status"] == "ok"
    assert sorted(os.listdir(dst)) == ["k.img", "k.img.bm-manifest"]
    assert writer.stop() == 0
    assert image.read_bytes() == writer.replayed(initial)


def test_throttle_dies_with_whoever_set_it(tmp_path):
    """converge="throttle" slows writers through the sidecar; if the copier
    that set the limit dies (SIGKILL: no cleanup), writers must not stay slow."""
    from blockmirror import TrackedImage

    image = tmp_path / "th.img"
    make_data_image(image, 4 * MiB, extents=1, tracked=True)

    def timed_mib():
        with TrackedImage(image) as w:
            start = time.monotonic()
            for i in range(16):
                w.pwrite(b"\x07" * 65536, i * 65536)
            return time.monotonic() - start

    with Tracker.open(image) as t:  # a live owner: the limit holds
        t.set_throttle(2 * MiB)
        assert timed_mib() >= 0.3
        t.set_throttle(0)
    code = ("import os, sys, blockmirror\n"
            "blockmirror.Tracker.open(sys.argv[1]).set_throttle(1 << 20)\n"
            "os.kill(os.getpid(), 9)\n")
    assert run_python(code, image).returncode == -signal.SIGKILL
    with Tracker.open(image) as t:
        assert t.info().throttle_bytes_per_s == 1 << 20  # left behind
    assert timed_mib() < 0.3  # ... but not obeyed: its owner is gone
    with Tracker.open(image) as t:
        assert t.info().throttle_bytes_per_s == 0  # and lifted for everyone
