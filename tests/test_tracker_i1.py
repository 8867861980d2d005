"""I1 and I2 seen from a copier: mark before and after the write, clear
before the read. A copier that fetch-and-clears and copies the dirty blocks
while a writer process writes ends, after one last pass, with an exact copy -
even though its reads raced the writes. Each write goes to a region of its
own, so nothing later would hide a mark missing after a write."""

from __future__ import annotations

import multiprocessing as mp
import os

from blockmirror import TrackedImage, Tracker

CTX = mp.get_context("spawn")
MiB = 1024 * 1024
REGION = 2 * MiB
ROUNDS = 100


def pattern(i: int) -> bytes:
    return bytes([i % 251 + 1]) * REGION


def _rewrite(image: str, go, done) -> None:
    buffers = [pattern(i) for i in range(ROUNDS)]
    with TrackedImage(image) as img:
        go.wait()
        # big writes: each spends a while in the kernel, with the copier
        # clearing and reading the same granules meanwhile
        for i, buf in enumerate(buffers):
            img.pwrite(buf, i * REGION)
    done.set()


def copy_pass(tracker: Tracker, src_fd: int, dst_fd: int) -> int:
    copied = 0
    for off, length in tracker.fetch_and_clear():  # I2: cleared before read
        os.pwrite(dst_fd, os.pread(src_fd, length, off), off)
        copied += length
    return copied


def test_copier_racing_writer_ends_exact(ram_tmp_path):
    src, dst = ram_tmp_path / "disk.img", ram_tmp_path / "copy.img"
    for path in (src, dst):
        with open(path, "wb") as f:
            f.truncate(REGION * ROUNDS)
    Tracker.create(src, granularity=65536).close()
    go, done = CTX.Event(), CTX.Event()
    writer = CTX.Process(target=_rewrite, args=(os.fspath(src), go, done))
    writer.start()
    src_fd = os.open(src, os.O_RDONLY)
    dst_fd = os.open(dst, os.O_WRONLY)
    try:
        with Tracker.open(src) as copier:
            # space the writes out so the copier keeps up and polls while each
            # write is still in the kernel (the throttle sleeps between writes)
            copier.set_throttle(REGION * 200)
            go.set()
            racing = 0
            while not done.is_set():
                if copy_pass(copier, src_fd, dst_fd):
                    racing += 1
            writer.join(60)
            assert writer.exitcode == 0
            copy_pass(copier, src_fd, dst_fd)  # the final pass, writers quiet
            assert copier.dirty_bytes() == 0
    finally:
        os.close(src_fd)
        os.close(dst_fd)
        if writer.is_alive():
            writer.kill()
            writer.join()

    assert racing >= 10, "the copier hardly raced the writer; the test proved little"
    with open(src, "rb") as a, open(dst, "rb") as b:
        for i in range(ROUNDS):
            expected = pattern(i)
            assert a.read(REGION) == expected
            assert b.read(REGION) == expected, f"region {i} of the copy is stale"
