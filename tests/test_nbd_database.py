"""A real database, live (issue 9): SQLite commits transactions on an ext4
filesystem that lives on the export, through `blockmirror serve --fuse` (a
plain file, by nbdfuse) and a loop device,
while `blockmirror sync` copies the image. The copy is what a power cut at
the switchover would have left: ext4 recovers its journal, `fsck.ext4 -n`
finds nothing, SQLite's integrity check passes, and the database holds a
committed prefix of the transactions (every one committed before the sync
began, none begun after it ended)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from imagetools import MiB, run_cli, wait_for
from nbdtools import require, require_root, served, unmount

pytestmark = pytest.mark.root

# Commits rows 0, 1, 2, ... (random payload and its digest; a counter row
# moved in the same transaction) and logs "i begun committed" after each
# COMMIT returned, until SIGTERM.
WRITER = """
import hashlib, os, random, signal, sqlite3, sys, time
stop = []
signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("PRAGMA synchronous=FULL")
db.execute("CREATE TABLE rows(id INTEGER PRIMARY KEY, data BLOB, digest TEXT)")
db.execute("CREATE TABLE counter(n INTEGER)")
db.execute("INSERT INTO counter VALUES (0)")
rng = random.Random(5)
with open(sys.argv[2], "w", buffering=1) as log:
    i = 0
    while not stop:
        data = rng.randbytes(rng.randint(100, 12000))
        begun = time.monotonic()
        db.execute("BEGIN")
        db.execute("INSERT INTO rows VALUES (?, ?, ?)", (i, data, hashlib.sha256(data).hexdigest()))
        db.execute("UPDATE counter SET n = ?", (i + 1,))
        db.execute("COMMIT")
        log.write(f"{i} {begun} {time.monotonic()}\\n")
        i += 1
        time.sleep(0.002)  # a busy database, not a flood the copy cannot catch up with
"""


def run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)


@contextlib.contextmanager
def loop_device(path: Path) -> Iterator[str]:
    done = run("losetup", "-f", "--show", str(path))
    if done.returncode != 0:
        pytest.skip(f"no loop device: {done.stderr.strip()}")
    device = done.stdout.strip()
    try:
        yield device
    finally:
        run("losetup", "-d", device)


@contextlib.contextmanager
def mounted(device: str, where: Path, *options: str) -> Iterator[Path]:
    where.mkdir(exist_ok=True)
    done = run("mount", *options, device, str(where))
    assert done.returncode == 0, done.stderr
    try:
        yield where
    finally:
        unmount(where)


def commits(log: Path) -> list[tuple[int, float, float]]:
    out = []
    for line in log.read_text().splitlines():
        i, begun, committed = line.split()
        out.append((int(i), float(begun), float(committed)))
    return out


def check_database(folder: Path, scratch: Path) -> int:
    """Open a copy of the database in FOLDER (with its journal, which SQLite
    rolls back) in SCRATCH; integrity check, every row's digest, and the
    counter. Returns how many transactions it holds."""
    scratch.mkdir()
    for f in folder.glob("db.sqlite*"):
        shutil.copy2(f, scratch / f.name)
    with contextlib.closing(sqlite3.connect(scratch / "db.sqlite")) as db:
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        rows = db.execute("SELECT id, data, digest FROM rows ORDER BY id").fetchall()
        (counter,), = db.execute("SELECT n FROM counter").fetchall()
    assert [r[0] for r in rows] == list(range(len(rows))), "not a prefix of the transactions"
    assert all(hashlib.sha256(d).hexdigest() == h for _i, d, h in rows), "a row is torn"
    assert counter == len(rows), "the two tables are from different transactions"
    return len(rows)


def check_copy(copy: Path, work: Path) -> int:
    """The copy's filesystem: journal recovered by a mount (as after a power
    cut), then clean to ``fsck.ext4 -n``; its database checked read-only."""
    with loop_device(copy) as device:
        with mounted(device, work / "recover"):
            pass
        fsck = run("fsck.ext4", "-n", "-f", device)
        assert fsck.returncode == 0, fsck.stdout + fsck.stderr
        with mounted(device, work / "copy-ro", "-o", "ro") as fs:
            return check_database(fs, work / "scratch")


def test_sqlite_on_ext4_on_the_export_survives_a_live_copy(ram_tmp_path):
    require_root()
    require("nbdkit", "nbdfuse", "losetup", "mkfs.ext4", "fsck.ext4", "mount")
    work = ram_tmp_path
    (work / "src").mkdir()
    (work / "dst").mkdir()
    image = work / "src" / "fs.img"
    with open(image, "wb") as f:
        f.truncate(128 * MiB)
    with contextlib.ExitStack() as stack:
        (work / "fuse").mkdir()
        _uri, plain = stack.enter_context(served(image, work, "--fuse", str(work / "fuse")))
        device = stack.enter_context(loop_device(Path(plain)))
        mkfs = run("mkfs.ext4", "-q", "-F", device)
        assert mkfs.returncode == 0, mkfs.stderr
        fs = stack.enter_context(mounted(device, work / "mnt"))
        with open(fs / "ballast", "wb") as f:  # data for a long bulk pass
            f.write(random.Random(1).randbytes(24 * MiB))
            os.fsync(f.fileno())
        log = work / "commits.log"
        writer = subprocess.Popen([sys.executable, "-c", WRITER, str(fs / "db.sqlite"), str(log)])
        stack.callback(writer.wait, 30)
        stack.callback(writer.send_signal, signal.SIGTERM)
        wait_for(lambda: log.exists() and len(commits(log)) >= 30, 30, "30 commits")
        began = time.monotonic()
        # a slow copy: the final pass holds the database frozen a while (two
        # passes at most, or the switch polishes it down to milliseconds)
        proc = run_cli("sync", image, work / "dst", "--target-downtime", "2s", "--bwlimit", "16M",
                       "--max-passes", "2", "--json")
        ended = time.monotonic()
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout)["passes"][-1]["seconds"] > 0.05, proc.stdout
        n = len(commits(log))
        wait_for(lambda: len(commits(log)) >= n + 10, 30, "commits after the sync")
        assert writer.poll() is None, "the database writer died"
    assert writer.returncode == 0
    done = commits(log)
    held = check_copy(work / "dst" / "fs.img", work)
    assert sum(c < began for _i, _b, c in done) <= held  # committed before: in the copy
    assert held <= sum(b < ended for _i, b, _c in done)  # begun after: not in it
    assert held < len(done)
