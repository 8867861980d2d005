"""`blockmirror sync` under NBD writers that keep writing through the plugin
(issue 9): fio over four connections, and the logged writers of nbdlog.
Copy mode: the copy is the source at one instant inside the sync. Move
mode: the clients keep their connections, see no error, go on writing into
the copy, and no acknowledged write is lost."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from imagetools import MiB, make_data_image, run_cli, wait_for
from nbdlog import WriteLog
from nbdtools import Export, Exports, require

from blockmirror import Tracker

FIO_JOBS, FIO_REGION = 4, 8 * MiB


@pytest.fixture
def sides(ram_tmp_path: Path) -> Iterator[tuple[Path, Path, Exports]]:
    """(source folder, destination folder, exports) in RAM."""
    src, dst = ram_tmp_path / "src", ram_tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    with Exports(ram_tmp_path) as exports:
        yield src, dst, exports


def sync(image: Path, dst: Path, *extra: str) -> dict[str, object]:
    proc = run_cli("sync", image, dst, "--target-downtime", "300ms", "--json", *extra)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["status"] == "ok" and result["tracked"], result
    return result


# -- fio ---------------------------------------------------------------------------------


def start_fio(export: Export, out: Path) -> subprocess.Popen[bytes]:
    """4 jobs, one NBD connection each, random 4 KiB writes over their own
    8 MiB, paced to take ~4 s, then fio reads every block back and checks
    its crc32c (and the header naming its offset)."""
    return subprocess.Popen(
        ["fio", "--name=bm", "--ioengine=nbd", f"--uri={export.uri}", "--rw=randwrite",
         "--bs=4k", f"--size={FIO_REGION}", f"--offset_increment={FIO_REGION}",
         f"--numjobs={FIO_JOBS}", "--verify=crc32c", "--verify_fatal=1", "--rate_iops=512",
         "--verify_state_save=0", "--output-format=json", f"--output={out}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=out.parent)


def finish_fio(fio: subprocess.Popen[bytes], out: Path) -> None:
    """fio exits 0 (its verify passed) having written and read back every block."""
    _, err = fio.communicate(timeout=120)
    assert fio.returncode == 0, f"fio failed: {err.decode(errors='replace')}"
    jobs = json.loads(out.read_text())["jobs"]
    assert len(jobs) == FIO_JOBS
    for job in jobs:
        assert job["error"] == 0
        assert job["write"]["io_bytes"] == FIO_REGION
        assert job["read"]["io_bytes"] == FIO_REGION  # the verify pass


def fio_under_way(image: Path, fio: subprocess.Popen[bytes]) -> None:
    """Until fio has dirtied a few MiB of IMAGE (it is writing, not verifying)."""
    with Tracker.open(image) as t:
        def writing() -> bool:
            assert fio.poll() is None, "fio ended before the sync began"
            return t.dirty_bytes() >= 4 * MiB

        wait_for(writing, 20, "fio to start writing")


def test_fio_copy_mode(sides):
    """The copy equals the source everywhere the source has not been written
    since the sync's switchover (its change id), and fio, still writing
    when the sync returned, verifies every block afterwards."""
    require("fio")
    src, dst, exports = sides
    image = src / "fio.img"
    make_data_image(image, 64 * MiB, extents=8, extent_size=2 * MiB, seed=4)
    export = exports.start(image)
    out = src.parent / "fio.json"
    fio = start_fio(export, out)
    fio_under_way(image, fio)
    result = sync(image, dst)
    assert fio.poll() is None, "fio finished before the switchover: nothing was proved"
    finish_fio(fio, out)
    with Tracker.open(image) as t:
        since = t.changed_extents(str(result["change_id"]))
    assert since, "fio wrote nothing after the switchover"
    source, copy = bytearray(image.read_bytes()), bytearray((dst / "fio.img").read_bytes())
    for off, n in since:  # blanked on both sides: what changed after the instant
        source[off:off + n] = copy[off:off + n] = bytes(n)
    assert source == copy, "the copy is not the source at the switchover"
    assert source != image.read_bytes(), "the check blanked nothing"


def test_fio_move_mode(sides):
    """fio keeps its four connections across the move; its verify, reading
    every block back after the switch, passes; the source is gone."""
    require("fio")
    src, dst, exports = sides
    image = src / "fio.img"
    make_data_image(image, 64 * MiB, extents=8, extent_size=2 * MiB, seed=4)
    export = exports.start(image)
    out = src.parent / "fio.json"
    fio = start_fio(export, out)
    fio_under_way(image, fio)
    result = sync(image, dst, "--move")
    assert result["mode"] == "move"
    assert fio.poll() is None, "fio finished before the switchover: nothing was proved"
    finish_fio(fio, out)
    assert not image.exists() and not (src / "fio.img.cbt").exists()
    assert export.stop() == 0, export.stderr()
    with Tracker.open(dst / "fio.img") as t:
        assert t.consistent  # nbdkit wrote the copy through its tracker and closed it clean


# -- the logged writers --------------------------------------------------------------------


def logged(src: Path, exports: Exports) -> tuple[Path, bytes, WriteLog, Export]:
    image = src / "log.img"
    initial = make_data_image(image, 16 * MiB, extents=6, extent_size=1 * MiB, seed=8)
    export = exports.start(image)
    log = WriteLog(str(export.socket), 16 * MiB).start()
    log.wait_for(50)
    return image, initial, log, export


def test_logged_writers_copy_mode_is_one_instant(sides):
    """The copy is, for every connection, a prefix of its log, all at one
    instant between the sync's start and its end; the source has every
    request."""
    src, dst, exports = sides
    image, initial, log, _export = logged(src, exports)
    began = time.monotonic()
    sync(image, dst)
    ended = time.monotonic()
    log.wait_for(50)  # writing on after the switch
    log.stop()
    ks = log.assert_one_instant((dst / "log.img").read_bytes(), initial)
    for w, k in zip(log.writers, ks, strict=True):
        assert sum(op.acked < began for op in w.ops) <= k  # done before the sync: in
        assert k <= sum(op.sent < ended for op in w.ops)  # sent after it: out
    assert image.read_bytes() == log.replayed(initial)


def test_logged_writers_move_mode_loses_nothing(sides):
    """Every request any connection had acknowledged, before the move or
    after it, is in the moved image; the clients saw no error."""
    src, dst, exports = sides
    image, initial, log, export = logged(src, exports)
    sync(image, dst, "--move")
    moved = time.monotonic()
    log.wait_for(50)  # every connection goes on, now into the copy
    log.stop()
    assert all(n >= 50 for n in log.acked_after(moved))
    assert not image.exists() and not (src / "log.img.cbt").exists()
    assert export.stop() == 0, export.stderr()
    assert (dst / "log.img").read_bytes() == log.replayed(initial)
