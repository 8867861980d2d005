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
from imagetools import MiB, allocated_bytes, make_data_image, run_cli, wait_for
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


# Copy mode switches over with a whole-image final pass held to 32 MB/s: the
# writers stay frozen for the better part of a second, so a freeze that did
# not hold them would tear the copy in plain view. Two passes at most: with
# more, the switch would polish the final pass down to milliseconds.
LONG_FINAL_PASS = ("--target-downtime", "2s", "--bwlimit", "32M", "--max-passes", "2")


def sync(image: Path, dst: Path, *options: str) -> dict[str, object]:
    proc = run_cli("sync", image, dst, "--json", *options)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["status"] == "ok" and result["tracked"], result
    final = result["passes"][-1]
    assert final["kind"] == "final"
    if options[:len(LONG_FINAL_PASS)] == LONG_FINAL_PASS:
        assert final["seconds"] > 0.2, f"the final pass was short: {final}"
    return result


# -- fio ---------------------------------------------------------------------------------


class Fio:
    """4 jobs, one NBD connection each, random 4 KiB writes (each block once)
    over their own 8 MiB, paced to take ~4 s; then fio reads every block
    back and checks its crc32c and the header naming its offset. Every
    write's completion time and latency go to a log in FOLDER."""

    def __init__(self, export: Export, folder: Path) -> None:
        folder.mkdir()
        self.folder = folder
        self.proc = subprocess.Popen(
            ["fio", "--name=bm", "--ioengine=nbd", f"--uri={export.uri}", "--rw=randwrite",
             "--bs=4k", f"--size={FIO_REGION}", f"--offset_increment={FIO_REGION}",
             f"--numjobs={FIO_JOBS}", "--verify=crc32c", "--verify_fatal=1",
             "--iodepth=1", "--rate_iops=400", "--verify_state_save=0",
             f"--write_lat_log={folder}/bm",
             "--log_offset=1", "--log_unix_epoch=1", "--output-format=json",
             f"--output={folder}/out.json"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=folder)

    def wait_writing(self, image: Path) -> None:
        """Until fio has filled 2 MiB of IMAGE's holes."""
        start = allocated_bytes(image)

        def writing() -> bool:
            assert self.proc.poll() is None, "fio ended before the sync began"
            return allocated_bytes(image) >= start + 2 * MiB

        wait_for(writing, 20, "fio to start writing")

    def finish(self) -> None:
        """fio exits 0 (its verify passed) having written and read back every block."""
        assert self.proc.poll() is None, "fio finished before the switchover: nothing proved"
        _, err = self.proc.communicate(timeout=120)
        assert self.proc.returncode == 0, f"fio failed: {err.decode(errors='replace')}"
        jobs = json.loads((self.folder / "out.json").read_text())["jobs"]
        assert len(jobs) == FIO_JOBS
        for job in jobs:
            assert job["error"] == 0
            assert job["write"]["io_bytes"] == FIO_REGION
            assert job["read"]["io_bytes"] == FIO_REGION  # the verify pass

    def writes(self) -> list[list[tuple[float, float, int, int]]]:
        """Per job, in the order they completed (iodepth 1: the order they
        were issued), every write's (earliest issue, latest completion) in
        epoch seconds, offset and length. The log's lines are "completion
        ms, latency ns, direction, length, offset"; the ms is truncated."""
        jobs = []
        for log in sorted(self.folder.glob("bm_lat.*.log")):
            job = []
            for line in log.read_text().splitlines():
                t_ms, lat_ns, direction, length, offset = map(int, line.split(",")[:5])
                if direction == 1:
                    job.append((t_ms / 1e3 - lat_ns / 1e9, (t_ms + 1) / 1e3, offset, length))
            assert len(job) == FIO_REGION // 4096
            jobs.append(job)
        assert len(jobs) == FIO_JOBS
        return jobs


def fio_prefixes(jobs: list[list[tuple[float, float, int, int]]], copy: bytes, source: bytes,
                 initial: bytes) -> list[tuple[float, float]]:
    """Each job wrote every block once, so each block of COPY is the
    source's (the write is in) or the initial one (it is not): per job, the
    writes in must be a prefix of its log. Returns, per job, the window
    (last write in issued, first write out completed) the copy's instant
    lies in."""
    windows = []
    for n, job in enumerate(jobs):
        held = []
        for _issued, _completed, off, length in job:
            block = slice(off, off + length)
            assert copy[block] in (source[block], initial[block]), f"torn block at {off}"
            held.append(copy[block] == source[block] != initial[block])
        k = held.index(False) if False in held else len(held)
        assert not any(held[k:]), f"job {n}: write {k} is missing but a later one is in"
        windows.append((job[k - 1][0] if k else float("-inf"),
                        job[k][1] if k < len(job) else float("inf")))
    return windows


def test_fio_copy_mode(sides):
    """The copy holds, per fio job, a prefix of its writes, all prefixes at
    one instant inside the sync; it is the source wherever the source's
    change id (taken at the switchover) says nothing changed since; fio,
    still writing when the sync returned, verifies every block afterwards."""
    require("fio")
    src, dst, exports = sides
    image = src / "fio.img"
    initial = make_data_image(image, 64 * MiB, extents=8, extent_size=2 * MiB, seed=4)
    fio = Fio(exports.start(image), src.parent / "fio")
    fio.wait_writing(image)
    began = time.time()
    result = sync(image, dst, *LONG_FINAL_PASS)
    ended = time.time()
    fio.finish()
    source, copy = image.read_bytes(), (dst / "fio.img").read_bytes()
    windows = fio_prefixes(fio.writes(), copy, source, initial)
    earliest, latest = max(w[0] for w in windows), min(w[1] for w in windows)
    assert earliest < latest, f"the jobs' prefixes are from different instants: {windows}"
    assert began < latest and earliest < ended, "the copy's instant is not inside the sync"
    with Tracker.open(image) as t:
        since = t.changed_extents(str(result["change_id"]))
    blank_source, blank_copy = bytearray(source), bytearray(copy)
    for off, n in since:  # what changed after the instant, blanked on both sides
        blank_source[off:off + n] = blank_copy[off:off + n] = bytes(n)
    assert blank_source == blank_copy, "the copy differs where nothing changed since its id"


def test_fio_move_mode(sides):
    """fio keeps its four connections across the move; its verify, reading
    every block back after the switch, passes; the source is gone."""
    require("fio")
    src, dst, exports = sides
    image = src / "fio.img"
    make_data_image(image, 64 * MiB, extents=8, extent_size=2 * MiB, seed=4)
    export = exports.start(image)
    fio = Fio(export, src.parent / "fio")
    fio.wait_writing(image)
    result = sync(image, dst, "--move", "--target-downtime", "300ms")
    assert result["mode"] == "move"
    fio.finish()
    assert not image.exists() and not (src / "fio.img.cbt").exists()
    assert export.stop() == 0, export.stderr()
    with Tracker.open(dst / "fio.img") as t:
        assert t.consistent  # nbdkit wrote the copy through its tracker and closed it clean


# -- the logged writers --------------------------------------------------------------------


def logged(src: Path, exports: Exports,
           pause: float = 0.0005) -> tuple[Path, bytes, WriteLog, Export]:
    image = src / "log.img"
    initial = make_data_image(image, 16 * MiB, extents=6, extent_size=1 * MiB, seed=8)
    export = exports.start(image)
    log = WriteLog(str(export.socket), 16 * MiB, pause=pause).start()
    log.wait_for(50)
    return image, initial, log, export


# --converge mirror (issue 10): dirty passes run (a short target, a capped
# copy) while the plugin's writes to clean ranges also go to the copy; the
# writers are paced so that mirroring converges.
MIRROR = ("--target-downtime", "50ms", "--bwlimit", "64M", "--converge", "mirror")


@pytest.mark.parametrize(("options", "pause"), [(LONG_FINAL_PASS, 0.0005), (MIRROR, 0.002)],
                         ids=["freeze", "mirror"])
def test_logged_writers_copy_mode_is_one_instant(sides, options, pause):
    """The copy is, for every connection, a prefix of its log, all at one
    instant between the sync's start and its end; the source has every
    request. Also when the plugin mirrored writes to the copy meanwhile."""
    src, dst, exports = sides
    image, initial, log, _export = logged(src, exports, pause)
    began = time.monotonic()
    result = sync(image, dst, *options)
    if options == MIRROR:
        mirrored = [n for n in result["notes"] if n.startswith("mirrored ")]
        assert mirrored and not mirrored[0].startswith("mirrored 0 B"), result["notes"]
    ended = time.monotonic()
    log.wait_for(50)  # writing on after the switch
    log.stop()
    ks = log.assert_one_instant((dst / "log.img").read_bytes(), initial, after=began,
                                before=ended)
    assert 0 < sum(ks) < sum(log.counts())
    assert image.read_bytes() == log.replayed(initial)


def test_logged_writers_move_mode_loses_nothing(sides):
    """Every request any connection had acknowledged, before the move or
    after it, is in the moved image; the clients saw no error."""
    src, dst, exports = sides
    image, initial, log, export = logged(src, exports)
    sync(image, dst, "--move", "--target-downtime", "300ms")
    moved = time.monotonic()
    log.wait_for(50)  # every connection goes on, now into the copy
    log.stop()
    assert all(n >= 50 for n in log.acked_after(moved))
    assert not image.exists() and not (src / "log.img.cbt").exists()
    assert export.stop() == 0, export.stderr()
    assert (dst / "log.img").read_bytes() == log.replayed(initial)
