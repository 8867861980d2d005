"""Shared fixtures and hypothesis profiles for the blockmirror tests.

Hypothesis profiles follow python-zstandard: a quick default for a plain
``pytest`` run, a deeper one for CI soaks, picked with ``HYPOTHESIS_PROFILE``::

    HYPOTHESIS_PROFILE=ci python -m pytest tests
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from imagetools import WriterProcess, tmpfs

settings.register_profile(
    "dev",
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "ci",
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))

MiB = 1024 * 1024


def make_sparse_image(path: Path, size: int) -> Path:
    """A sparse file of SIZE bytes (all holes) at PATH."""
    with open(path, "wb") as f:
        f.truncate(size)
    os.chmod(path, 0o600)
    return path


@pytest.fixture
def make_image(tmp_path: Path) -> Callable[..., Path]:
    """Factory: ``make_image(size, name="disk.img")`` -> path of a sparse image."""

    def _make(size: int = 4 * MiB, name: str = "disk.img") -> Path:
        return make_sparse_image(tmp_path / name, size)

    return _make


@pytest.fixture
def tmp_image(make_image: Callable[..., Path]) -> Path:
    """A 4 MiB sparse image with no sidecar yet."""
    return make_image(4 * MiB)


@pytest.fixture
def tracked_image(tmp_image: Path) -> Iterator[Path]:
    """A 4 MiB sparse image with a fresh 64 KiB-granule sidecar beside it."""
    from blockmirror import Tracker

    Tracker.create(tmp_image).close()
    yield tmp_image


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    """Two empty folders, (tmp_path/src, tmp_path/dst): a sync's two sides."""
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    return src, dst


@pytest.fixture
def ram_tmp_path(tmp_path: Path) -> Iterator[Path]:
    """A scratch directory in RAM (/dev/shm) when there is one, else tmp_path.

    For tests that write hundreds of MiB: on disk their writeback would
    stall unrelated writes (and timing assertions) later in the run.
    """
    shm = Path("/dev/shm")
    if not (shm.is_dir() and os.access(shm, os.W_OK)):
        yield tmp_path
        return
    path = Path(tempfile.mkdtemp(prefix="blockmirror-test-", dir=shm))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def live_writer(tmp_path: Path) -> Iterator[Callable[..., WriterProcess]]:
    """Factory: ``live_writer(image, rate="8M", wait=N, **options)`` starts a
    logging writer process (imagetools.WriterProcess) on IMAGE and waits for
    its first N writes. Every writer is stopped at the end of the test and
    must have exited cleanly: never killed, never stuck in a freeze."""
    writers: list[WriterProcess] = []

    def _start(image: Path, *, wait: int = 0, **options: object) -> WriterProcess:
        log = tmp_path / f"writes-{len(writers)}.log"
        writer = WriterProcess(image, log, **options)  # type: ignore[arg-type]
        writers.append(writer)
        if wait:
            writer.wait_for_writes(wait)
        return writer

    yield _start
    codes = [w.stop() for w in writers]
    assert codes == [0] * len(writers), f"writer exit codes {codes}"


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    """Factory: ``small_tmpfs("8m")`` -> a folder on a fresh tmpfs of that
    size (ENOSPC tests), unmounted at the end. Skips when not root."""
    with contextlib.ExitStack() as stack:
        mounted: list[Path] = []

        def _mount(size: str) -> Path:
            mounted.append(stack.enter_context(tmpfs(tmp_path / f"tmpfs-{len(mounted)}", size)))
            return mounted[-1]

        yield _mount
