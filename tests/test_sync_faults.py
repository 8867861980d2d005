"""Failure paths of sync (I3, I6): out of space, signals, a copier killed
while writers are frozen. Each leaves the source as the writers made it,
removes what the destination side created, and never leaves a writer paused."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from imagetools import MiB, WriterProcess, make_data_image, replay

import blockmirror
from blockmirror import Tracker
from blockmirror.migration import sync

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to mount a tmpfs")


@contextlib.contextmanager
def tmpfs(path, size):
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                   check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def sync_cli(*args):
    return subprocess.Popen([sys.executable, "-m", "blockmirror", "sync", *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(predicate, timeout=20.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.005)
    raise AssertionError(f"timed out waiting for {what}")


def partial_exists(folder):
    return any(n.endswith(".bm-partial") for n in os.listdir(folder))


@needs_root
def test_out_of_space_at_precheck(tmp_path):
    src = tmp_path / "big.img"
    content = make_data_image(src, 32 * MiB, extents=12)  # 12 MiB allocated
    with tmpfs(tmp_path / "small", "8m") as small:
        proc = sync_cli(src, small)
        _out, err = proc.communicate(timeout=60)
        assert proc.returncode == 4, err
        assert err.count("\n") == 1 and "need 12.0 MiB" in err and "free" in err
        assert os.listdir(small) == []
    assert src.read_bytes() == content


@needs_root
def test_out_of_space_mid_copy_cleans_up(tmp_path):
    """Another tenant fills the destination while the bulk pass runs."""
    src = tmp_path / "a.img"
    content = make_data_image(src, 64 * MiB, extents=24)
    Tracker.create(src).close()
    with tmpfs(tmp_path / "small", "40m") as small:
        filled = []

        def fill_once(progress):
            if not filled:
                filler = small / "filler"
                with open(filler, "wb") as f, contextlib.suppress(OSError):
                    while True:
                        f.write(b"\xaa" * MiB)
                filled.append(filler)

        with pytest.raises(blockmirror.OutOfSpaceError) as info:
            sync(src, small, progress=fill_once, rate_limit=64 * MiB)
        assert isinstance(info.value, OSError) and info.value.errno == 28
        assert os.listdir(small) == ["filler"]
    assert src.read_bytes() == content
    with Tracker.open(src) as t:
        assert t.state == "running"


@needs_root
def test_out_of_space_mid_copy_exit_code(tmp_path):
    src = tmp_path / "a.img"
    make_data_image(src, 64 * MiB, extents=24)
    with tmpfs(tmp_path / "small", "40m") as small:
        proc = sync_cli(src, small, "--bwlimit", "16M")
        wait_for(lambda: partial_exists(small), what="the partial copy")
        with open(small / "filler", "wb") as f, contextlib.suppress(OSError):
            while True:
                f.write(b"\xaa" * MiB)
        _out, err = proc.communicate(timeout=60)
        assert proc.returncode == 4, err
        assert "out of space" in err or "No space" in err
        assert os.listdir(small) == ["filler"]


@pytest.mark.parametrize("signum,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_cleans_up(tmp_path, signum, code):
    src = tmp_path / "a.img"
    content = make_data_image(src, 64 * MiB, extents=32)
    Tracker.create(src).close()
    dst = tmp_path / "dst"
    dst.mkdir()
    proc = sync_cli(src, dst, "--bwlimit", "16M")
    wait_for(lambda: partial_exists(dst), what="the partial copy")
    time.sleep(0.2)
    proc.send_signal(signum)
    _out, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert os.listdir(dst) == []
    assert src.read_bytes() == content
    with Tracker.open(src) as t:
        assert t.state == "running"


def test_sync_killed_during_freeze(tmp_path):
    """SIGKILL the copier while writers are frozen: they resume promptly
    (the copier is gone, long before the lease ends), nothing they wrote is
    lost, and the next run removes the leftover and succeeds."""
    src_dir, dst = tmp_path / "src", tmp_path / "dst"
    src_dir.mkdir()
    dst.mkdir()
    image = src_dir / "k.img"
    initial = make_data_image(image, 32 * MiB, extents=8)
    Tracker.create(image).close()
    writer = WriterProcess(image, tmp_path / "writes.log", rate="1M", write_size="64k")
    try:
        writer.wait_for_writes(5)
        # A slow copy and a long target downtime: the final pass runs ~1 s.
        proc = sync_cli(image, dst, "--bwlimit", "2M", "--target-downtime", "3s")
        with Tracker.open(image) as t:
            wait_for(lambda: t.state in ("freezing", "frozen"), timeout=60, what="the freeze")
            proc.kill()
            killed_at = time.monotonic()
            proc.wait(timeout=10)
            n = len(writer.writes())
            writer.wait_for_writes(n + 3, timeout=10)
            resumed_after = time.monotonic() - killed_at
        assert resumed_after < 3.0  # well inside the 12 s lease: the dead copier was noticed
        assert partial_exists(dst)  # SIGKILL: nothing could clean up
        rerun = subprocess.run([sys.executable, "-m", "blockmirror", "sync", str(image),
                                str(dst), "--target-downtime", "1s", "--json"],
                               capture_output=True, text=True, timeout=120)
        assert rerun.returncode == 0, rerun.stderr
        assert json.loads(rerun.stdout)["status"] == "ok"
        assert sorted(os.listdir(dst)) == ["k.img", "k.img.bm-manifest"]
    finally:
        assert writer.stop() == 0
    assert image.read_bytes() == replay(initial, writer.writes(), writer.seed)


def test_throttle_dies_with_whoever_set_it(tmp_path):
    """converge="throttle" slows writers through the sidecar; if the copier
    that set the limit dies (SIGKILL: no cleanup), writers must not stay slow."""
    from blockmirror import TrackedImage

    image = tmp_path / "th.img"
    make_data_image(image, 4 * MiB, extents=1)
    Tracker.create(image).close()

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
    proc = subprocess.run([sys.executable, "-c", code, str(image)])
    assert proc.returncode == -signal.SIGKILL
    with Tracker.open(image) as t:
        assert t.info().throttle_bytes_per_s == 1 << 20  # left behind
    assert timed_mib() < 0.3  # ... but not obeyed: its owner is gone
    with Tracker.open(image) as t:
        assert t.info().throttle_bytes_per_s == 0  # and lifted for everyone
