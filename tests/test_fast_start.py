"""The light commands start without numpy (issue 11, fast start).

numpy's import alone costs ~40 ms, more than ``qemu-img compare`` of a
sparse pair takes in all. Each command runs here in a fresh interpreter
(``runpy``, as ``python -m blockmirror`` does), and the test asks that
interpreter which modules it loaded: a top-level ``import numpy`` creeping
back into the path of ``--help``, ``track status`` or ``verify`` fails it.
The heavy path (a sync) is checked to load numpy, so the probe can see it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

# Run the command in-process, then print whether numpy (and the other heavy
# modules) were ever imported, whatever the command's exit code (and however
# the command ends its process).
PROBE = """
import json, os, runpy, sys
sys.argv = ["blockmirror", *sys.argv[1:]]
def _exit(code):  # the command's quick end (cli.main.entry), caught like sys.exit
    raise SystemExit(code)
os._exit = _exit
code = 0
try:
    runpy.run_module("blockmirror", run_name="__main__")
except SystemExit as e:
    code = e.code
heavy = ("numpy", "xxhash", "blockmirror.migration.manifest", "blockmirror.copying.copier",
         "ctypes", "blockmirror.copying.endpoint")
print(json.dumps({"code": code, "loaded": [m for m in heavy if m in sys.modules]}),
      file=sys.stderr)
"""

REPO = Path(__file__).resolve().parent.parent


def loaded_by(*argv: str | os.PathLike[str], cwd: Path) -> tuple[int, list[str]]:
    """(exit code, heavy modules loaded) of ``blockmirror ARGV``."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]))
    out = subprocess.run([sys.executable, "-c", PROBE, *map(str, argv)], cwd=cwd, env=env,
                         capture_output=True, text=True, timeout=120)
    report = json.loads(out.stderr.strip().splitlines()[-1])
    return int(report["code"] or 0), list(report["loaded"])


@pytest.fixture
def sparse_pair(tmp_path: Path) -> tuple[Path, Path]:
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    for path in (a, b):
        with open(path, "wb") as f:
            f.truncate(64 << 20)
            f.seek(5 << 20)
            f.write(b"data" * 4096)
    return a, b


def test_help_loads_no_numpy(tmp_path: Path) -> None:
    code, loaded = loaded_by("--help", cwd=tmp_path)
    assert code == 0
    assert loaded == []


def test_verify_of_sparse_images_loads_no_numpy(
        tmp_path: Path, sparse_pair: tuple[Path, Path]) -> None:
    a, b = sparse_pair
    assert loaded_by("verify", a, b, cwd=tmp_path) == (0, [])
    with open(b, "r+b") as f:  # differing images take the same path
        f.seek(9 << 20)
        f.write(b"x")
    assert loaded_by("verify", a, b, cwd=tmp_path) == (5, [])


def test_track_commands_load_no_numpy(tmp_path: Path, sparse_pair: tuple[Path, Path]) -> None:
    a, _ = sparse_pair
    assert loaded_by("track", "enable", a, cwd=tmp_path) == (0, [])
    assert loaded_by("track", "status", a, cwd=tmp_path) == (0, [])
    assert loaded_by("track", "status", "--json", a, cwd=tmp_path) == (0, [])


def test_a_fresh_sync_never_loads_numpy(
        tmp_path: Path, sparse_pair: tuple[Path, Path]) -> None:
    """A new local copy builds and publishes its manifest from the digests
    its bulk pass took, in plain arrays: numpy is never imported (not even
    on the preload thread), and the manifest is the one the numpy path
    writes (what the incremental sync below reads and trusts)."""
    a, _ = sparse_pair
    copy = tmp_path / "copy.img"
    code, loaded = loaded_by("sync", "--quiet", a, copy, cwd=tmp_path)
    assert code == 0
    assert "numpy" not in loaded and "blockmirror.migration.manifest" in loaded
    assert "ctypes" not in loaded  # the digest's address is looked up in C
    # Nor the URI parsers (endpoint, urllib.parse): a local path is no URI.
    assert "blockmirror.copying.endpoint" not in loaded
    from blockmirror.migration.manifest import Manifest, hash_granules

    m = Manifest.open(str(copy) + ".bm-manifest")
    try:
        fd = os.open(copy, os.O_RDONLY)
        try:
            size = os.fstat(fd).st_size
            everything = np.array([[0, -(-size // m.granularity)]], dtype=np.int64)
            keys, values, _ = hash_granules(fd, everything, m.granularity, size)
        finally:
            os.close(fd)
        data = values != m.table.zero_digests(keys)
        assert m.state == "clean" and not len(m.table.unknown)
        assert m.table.keys.tolist() == keys[data].tolist()
        assert m.table.values.tolist() == values[data].tolist()
    finally:
        m.close()


def test_the_probe_sees_numpy_when_a_sync_loads_it(
        tmp_path: Path, sparse_pair: tuple[Path, Path]) -> None:
    """An incremental sync (onto the copy a first one made) reads the
    manifest with numpy: the probe sees it."""
    a, _ = sparse_pair
    copy = tmp_path / "copy.img"
    assert loaded_by("sync", "--quiet", a, copy, cwd=tmp_path)[0] == 0
    with open(a, "r+b") as f:
        f.seek(7 << 20)
        f.write(b"changed")
    code, loaded = loaded_by("sync", "--quiet", a, copy, cwd=tmp_path)
    assert code == 0
    assert "numpy" in loaded and "blockmirror.migration.manifest" in loaded
    assert copy.read_bytes() == a.read_bytes()


@pytest.mark.parametrize("chunk", [1, 2, 3, 1024])
def test_the_numpy_free_scan_agrees_with_the_numpy_one(tmp_path: Path, chunk: int) -> None:
    """scan_pairs (cffi buffer, what verify uses) and scan_all (numpy) give
    the same merged extents, whatever the number of extents per C call."""
    from blockmirror._bindings import _ffi
    from blockmirror._bindings import copy as _copy
    from blockmirror.extents import pairs

    path = tmp_path / "fragmented.img"
    with open(path, "wb") as f:
        f.truncate(64 << 20)
        for i in range(0, 60, 3):  # 20 data extents with holes between
            f.seek(i << 20)
            f.write(b"d" * ((1 + i % 2) << 20))
    fd = os.open(path, os.O_RDONLY)
    try:
        end = os.fstat(fd).st_size

        def step(cursor: object, out: object, room: int) -> int:
            return int(_ffi.lib.bm_data_extents(fd, cursor, end, out, room))

        expected = pairs(_copy.data_extents(fd, end))
        assert len(expected) > 1
        assert _ffi.scan_pairs(step, chunk) == expected
        assert _copy.data_extent_pairs(fd, end) == expected
    finally:
        os.close(fd)


# What a plain sync's modules load before it copies anything.
SYNC_IMPORTS = """
import json, sys
import blockmirror.cli.main, blockmirror.cli.progress, blockmirror.migration.run
import blockmirror.migration.remote, blockmirror.migration.remote_nfs  # into nbd://, nfs://
print(json.dumps([m for m in ("numpy", "xxhash") if m in sys.modules]))
"""


def test_a_syncs_modules_load_without_numpy(tmp_path: Path) -> None:
    """A sync (local, or into an export) imports numpy only once its bulk
    copy runs (beside it, on another thread: blockmirror._numpy), not
    before: no module on its path may import numpy at load."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]))
    out = subprocess.run([sys.executable, "-c", SYNC_IMPORTS], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120, check=True)
    assert "numpy" not in json.loads(out.stdout)


# What a sync into an NBD export loads: not the NFS client, nor verify's reader.
EXPORT_SYNC_IMPORTS = """
import json, sys
import blockmirror.cli.main, blockmirror.migration.run, blockmirror.migration.remote
print(json.dumps(sorted(m for m in sys.modules if m.startswith("blockmirror."))))
"""


def test_a_sync_into_an_export_loads_no_nfs_module(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]))
    out = subprocess.run([sys.executable, "-c", EXPORT_SYNC_IMPORTS], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120, check=True)
    loaded = set(json.loads(out.stdout))
    assert "blockmirror.copying.remote" in loaded  # the probe did load the export's path
    assert not loaded & {"blockmirror.copying.nfs", "blockmirror._bindings.nfs",
                         "blockmirror.migration.remote_nfs", "blockmirror.copying.remote_compare"}


def test_the_bulk_copy_starts_before_numpy_is_loaded(
        tmp_path: Path, sparse_pair: tuple[Path, Path]) -> None:
    """In a fresh interpreter, the first C copy call of a sync runs while
    numpy is not imported; the copy and its manifest are whole all the
    same, and a new untracked copy never imports it at all."""
    a, _ = sparse_pair
    probe = """
import json, sys
from blockmirror._bindings import copy as _c
seen = []
real = _c.copy_extents
def spy(*args, **kwargs):
    numpy = sys.modules.get("numpy")  # fully imported: in sys.modules, not initializing
    seen.append(numpy is not None and not getattr(numpy.__spec__, "_initializing", False))
    return real(*args, **kwargs)
_c.copy_extents = spy
from blockmirror.migration import sync
result = sync(sys.argv[1], sys.argv[2])
print(json.dumps({"numpy_ready_at_first_copy": seen[0], "passes": len(result.passes),
                  "numpy_loaded": "numpy" in sys.modules}))
"""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]))
    copy = tmp_path / "copy.img"
    out = subprocess.run([sys.executable, "-c", probe, str(a), str(copy)], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=120, check=True)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report == {"numpy_ready_at_first_copy": False, "passes": 1, "numpy_loaded": False}
    assert copy.read_bytes() == a.read_bytes()
    assert (tmp_path / "copy.img.bm-manifest").exists()


def test_the_sync_command_exits_with_its_output_flushed(
        tmp_path: Path, sparse_pair: tuple[Path, Path]) -> None:
    """``python -m blockmirror sync`` ends its process without the
    interpreter's teardown (cli.main.entry): what it printed must still
    all arrive, with the exit code, and the copy be whole."""
    a, _ = sparse_pair
    copy = tmp_path / "copy.img"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]))
    out = subprocess.run([sys.executable, "-m", "blockmirror", "sync", "--json", str(a),
                          str(copy)], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["status"] == "ok"
    assert copy.read_bytes() == a.read_bytes()
    failed = subprocess.run([sys.executable, "-m", "blockmirror", "verify", str(a),
                             str(tmp_path / "missing.img")], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)
    assert failed.returncode != 0 and failed.stderr.strip()
