"""A file on an NFS server as the source of `blockmirror sync` (issue 12):
nfs-ganesha in a second host (tests/ganeshatools.py), the copy made into a
local file. Every byte is read (NFSv3 has no block status); zero blocks are
not written, so the copy is sparse; the copy appears only whole, through a
shadow that any failure removes; the server's file is never written. The
file's writers cannot be tracked, so --quiesced is required."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import test_remote_nfs
from imagetools import MiB, allocated_bytes, nonzero_cells, run_cli, tmpfs, wait_for
from test_remote_nfs import one_line_error

from blockmirror.copying.nfs import libnfs_available

pytestmark = pytest.mark.skipif(not libnfs_available(),
                                reason="blockmirror._nfs not built (needs libnfs-dev)")

serve_nfs = test_remote_nfs.serve_nfs  # the fixture: ganesha in a second host


def _sparse_file(path: Path, size: int, runs: int) -> bytes:
    """SIZE bytes: RUNS runs of 1 MiB of random data spread out, the rest
    holes, plus a short data tail that ends off any block boundary."""
    with open(path, "wb") as f:
        f.truncate(size)
        for k in range(runs):
            f.seek(k * (size // runs))
            f.write(os.urandom(MiB))
        f.seek(size - 1000)
        f.write(os.urandom(1000))
    return path.read_bytes()


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if "bm-partial" in p.name)


def test_copy_from_an_nfs_file_is_exact_and_sparse(ram_tmp_path, serve_nfs):
    server = serve_nfs()
    served = server.folder / "disk.img"
    content = _sparse_file(served, 48 * MiB, runs=6)
    before = served.stat().st_mtime_ns
    copy = ram_tmp_path / "copy.img"
    proc = run_cli("sync", server.url("disk.img"), copy, "--quiesced", "--verify", "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["status"] == "ok" and result["verified"] and not result["tracked"]
    assert result["source"] == server.url("disk.img")
    assert any("every byte read" in n for n in result["notes"]), result["notes"]
    assert copy.read_bytes() == content
    assert allocated_bytes(copy) <= nonzero_cells(content) + MiB  # holes stayed holes
    assert served.stat().st_mtime_ns == before and served.read_bytes() == content
    assert _leftovers(ram_tmp_path) == []


def test_without_quiesced_it_is_refused_before_anything(ram_tmp_path, serve_nfs):
    server = serve_nfs()
    _sparse_file(server.folder / "disk.img", 8 * MiB, runs=2)
    copy = ram_tmp_path / "copy.img"
    line = one_line_error(run_cli("sync", server.url("disk.img"), copy), 2)
    assert "--quiesced" in line
    assert not copy.exists() and _leftovers(ram_tmp_path) == []


@pytest.mark.parametrize("args, said", [
    (("--move",), "--move from an NFS file"),
    (("--converge", "auto"), "need a tracked local source"),
])
def test_modes_an_nfs_source_cannot_have_are_refused(args, said, ram_tmp_path, serve_nfs):
    server = serve_nfs()
    _sparse_file(server.folder / "disk.img", 4 * MiB, runs=1)
    line = one_line_error(run_cli("sync", server.url("disk.img"), ram_tmp_path / "c.img",
                                  "--quiesced", *args), 2)
    assert said in line


def test_a_missing_file_is_one_line_exit_2(ram_tmp_path, serve_nfs):
    server = serve_nfs()
    line = one_line_error(run_cli("sync", server.url("absent.img"), ram_tmp_path / "c.img",
                                  "--quiesced"), 2)
    assert "absent.img" in line
    assert not (ram_tmp_path / "c.img").exists()


def test_too_little_local_room_is_exit_4_before_anything(ram_tmp_path, serve_nfs):
    """The server's allocated bytes (16 MiB of data) do not fit an 8 MiB
    tmpfs: exit 4 before the shadow is made."""
    server = serve_nfs()
    _sparse_file(server.folder / "disk.img", 64 * MiB, runs=16)
    with tmpfs(ram_tmp_path / "small", "8m") as small:
        line = one_line_error(run_cli("sync", server.url("disk.img"), small / "c.img",
                                      "--quiesced"), 4)
        assert "need" in line
        assert list(small.iterdir()) == []


@pytest.mark.slow
def test_server_killed_mid_copy_is_exit_1_and_the_shadow_goes(ram_tmp_path, serve_nfs):
    server = serve_nfs()
    _sparse_file(server.folder / "disk.img", 64 * MiB, runs=32)
    copy = ram_tmp_path / "copy.img"
    env = {**os.environ, "BLOCKMIRROR_NFS_TIMEOUT": "3"}
    proc = subprocess.Popen([sys.executable, "-m", "blockmirror", "sync",
                             server.url("disk.img"), str(copy), "--quiesced", "--bwlimit", "8M"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    shadows = lambda: [p for p in ram_tmp_path.iterdir() if "bm-partial" in p.name]  # noqa: E731
    wait_for(lambda: any(allocated_bytes(p) > 4 * MiB for p in shadows()), 30,
             "the copy to write")
    server.kill_server()
    killed = time.monotonic()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, err
    assert len(err.strip().splitlines()) == 1, err
    assert time.monotonic() - killed < 15
    assert not copy.exists() and shadows() == []
