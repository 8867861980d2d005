"""Issue 13, "Bad input": the rerun of the bad-input table.

Each case runs ``python -m blockmirror`` on one hostile or careless input and
asserts the documented exit code, that no traceback reaches stderr, and
(where it matters) that nothing was replaced or left behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from imagetools import MiB, make_data_image

from blockmirror import Tracker

ROOT = Path(__file__).resolve().parent.parent
IS_ROOT = os.geteuid() == 0


def run(args: list[str], cwd: Path, env: dict[str, str] | None = None,
        timeout: float = 30) -> subprocess.CompletedProcess[bytes]:
    full_env = dict(os.environ, PYTHONPATH=str(ROOT))
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "blockmirror", *args], cwd=cwd,
                          capture_output=True, timeout=timeout, env=full_env)


# -- set-ups: each makes what its case needs in folder D and returns the argv ----------


def _img(d: Path, name: str = "a.img", size: int = 4 * MiB) -> Path:
    path = d / name
    make_data_image(path, size, extents=2)
    return path


def _tracked(d: Path, name: str = "a.img") -> Path:
    path = _img(d, name)
    Tracker.create(path).close()
    return path


def _series(d: Path) -> str:
    with Tracker.open(_tracked(d)) as t:
        return t.series


def _copy_with_manifest(d: Path) -> tuple[Path, Path]:
    """a.img and an earlier blockmirror copy of it, out/a.img (+ manifest)."""
    src = _img(d)
    (d / "out").mkdir()
    proc = run(["sync", str(src), str(d / "out"), "--quiet"], d)
    assert proc.returncode == 0, proc.stderr
    return src, d / "out" / "a.img"


def _fifo(d: Path) -> Path:
    os.mkfifo(d / "fifo")
    return d / "fifo"


@contextlib.contextmanager
def _ro_mount(d: Path) -> Iterator[Path]:
    """A read-only tmpfs at D/ro holding a.img (root only)."""
    ro = d / "ro"
    ro.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(ro)], check=True)
    try:
        make_data_image(ro / "a.img", 4 * MiB, extents=2)
        (ro / "dir").mkdir()
        subprocess.run(["mount", "-o", "remount,ro", str(ro)], check=True)
        yield ro
    finally:
        subprocess.run(["umount", "-l", str(ro)], check=False)


@contextlib.contextmanager
def _tmpfs(d: Path) -> Iterator[Path]:
    t = d / "t"
    t.mkdir()
    if not IS_ROOT:
        yield t
        return
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(t)], check=True)
    try:
        yield t
    finally:
        subprocess.run(["umount", "-l", str(t)], check=False)


@dataclass
class Case:
    name: str
    setup: Callable[[Path], list[str]]
    code: int
    check: Callable[[Path, subprocess.CompletedProcess[bytes]], None] | None = None
    env: dict[str, str] = field(default_factory=dict)
    root: bool = False  # needs root (mounts)
    ro: bool = False  # runs with a read-only tmpfs at D/ro
    tmpfs: bool = False  # runs with a tmpfs at D/t (when root; else D/t is a folder)


def _no_demo_image(d: Path, proc: subprocess.CompletedProcess[bytes]) -> None:
    left = [p for p in d.rglob("demo.img*")]
    assert not left, left


def _devnull_intact(d: Path, proc: subprocess.CompletedProcess[bytes]) -> None:
    assert stat.S_ISCHR(os.lstat(d / "null").st_mode)


def _no_file(path: Path) -> None:
    assert not os.path.lexists(path), path


def _fifo_intact(d: Path, proc: subprocess.CompletedProcess[bytes]) -> None:
    assert stat.S_ISFIFO(os.lstat(d / "fifo").st_mode)


def _no_cbt_cbt(d: Path, proc: subprocess.CompletedProcess[bytes]) -> None:
    assert not (d / "a.img.cbt.cbt").exists()


def _json_out(d: Path, proc: subprocess.CompletedProcess[bytes]) -> None:
    json.loads(proc.stdout)


def _sidecar_intact(d: Path, proc: subprocess.CompletedProcess[bytes]) -> None:
    Tracker.open(d / "b.img").close()  # b.img's sidecar was not replaced by a copy


def _big_sparse(d: Path) -> list[str]:
    path = d / "t" / "huge.img"  # on tmpfs (when root): ext4 stops at 16 TiB
    with open(path, "wb") as f:
        try:
            f.truncate(2 << 50)  # 2 PiB
        except OSError:
            pytest.skip("this filesystem cannot hold a 2 PiB sparse file")
    (d / "out").mkdir()
    return ["sync", str(path), str(d / "out")]


def _symlinked_sidecar(d: Path) -> list[str]:
    src = _tracked(d)
    os.rename(d / "a.img.cbt", d / "real.cbt")
    os.symlink(d / "real.cbt", d / "a.img.cbt")
    (d / "out").mkdir()
    return ["sync", str(src), str(d / "out")]


def _sidecar_link_source(d: Path) -> list[str]:
    _tracked(d)
    os.symlink(d / "a.img.cbt", d / "innocent.img")
    (d / "out").mkdir()
    return ["sync", str(d / "innocent.img"), str(d / "out")]


def _manifest_source(d: Path) -> list[str]:
    _, copy = _copy_with_manifest(d)
    (d / "out2").mkdir()
    return ["sync", str(copy) + ".bm-manifest", str(d / "out2")]


def _partial_source(d: Path) -> list[str]:
    _img(d, ".x.img.bm-partial")
    (d / "out").mkdir()
    return ["sync", str(d / ".x.img.bm-partial"), str(d / "out")]


def _manifest_is_dir(d: Path) -> list[str]:
    src, copy = _copy_with_manifest(d)
    manifest = Path(str(copy) + ".bm-manifest")
    manifest.unlink()
    manifest.mkdir()
    return ["sync", str(src), str(d / "out")]


def _force_onto_other_sidecar(d: Path) -> list[str]:
    src = _img(d)
    _tracked(d, "b.img")
    return ["sync", "--force", str(src), str(d / "b.img.cbt")]


def _force_onto_other_manifest(d: Path) -> list[str]:
    _, copy = _copy_with_manifest(d)
    _img(d, "c.img")
    return ["sync", "--force", str(d / "c.img"), str(copy) + ".bm-manifest"]


def _non_utf8_dst(d: Path) -> list[str]:
    src = _img(d)
    out = d / "out"
    out.mkdir()
    return ["sync", str(src), os.fsdecode(bytes(out) + b"/caf\xe9.img")]


def _ro_dst(d: Path) -> list[str]:
    return ["sync", str(_img(d)), str(d / "ro" / "dir")]


def _bench(*args: str) -> Callable[[Path], list[str]]:
    def setup(d: Path) -> list[str]:
        return ["bench", "convergence", "--output", str(d / "res"), "--no-plots", *args]
    return setup


def _corrupt_runs(d: Path) -> list[str]:
    (d / "res").mkdir()
    (d / "res" / "runs.json").write_text('{"runs": [1, 2')
    return ["bench", "convergence", "--rebuild", "--output", str(d / "res")]


def _wrong_runs(d: Path) -> list[str]:
    (d / "res").mkdir()
    (d / "res" / "runs.json").write_text('[1, 2, 3]')
    return ["bench", "convergence", "--rebuild", "--output", str(d / "res")]


def _simple(*args: str) -> Callable[[Path], list[str]]:
    """ARGS with {img} (a plain image), {tracked}, {out} (a folder) filled in."""
    def setup(d: Path) -> list[str]:
        values: dict[str, str] = {}
        if any("{img}" in a for a in args):
            values["img"] = str(_img(d))
        if any("{tracked}" in a for a in args):
            values["tracked"] = str(_tracked(d, "t.img"))
        if any("{out}" in a for a in args):
            (d / "out").mkdir()
            values["out"] = str(d / "out")
        if any("{fifo}" in a for a in args):
            values["fifo"] = str(_fifo(d))
        if any("{null}" in a for a in args):
            # A private /dev/null (same device numbers) in the test folder: a
            # case that wrongly replaces it must never hit the machine's own.
            os.mknod(d / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
            values["null"] = str(d / "null")
        if any("{d}" in a for a in args):
            values["d"] = str(d)
        return [a.format(**values) for a in args]
    return setup


def _since(generation: str) -> Callable[[Path], list[str]]:
    def setup(d: Path) -> list[str]:
        return ["changed", str(d / "a.img"), "--since", f"{_series(d)}:{generation}"]
    return setup


CASES = [
    # change ids
    Case("changed since superscript two", _since("\u00b2"), 2),
    Case("changed since 5000-digit generation", _since("9" * 5000), 2),
    Case("changed since arabic-indic digits", _since("\u0661\u0662"), 2),
    Case("changed since garbage", _simple("changed", "{tracked}", "--since", "x"), 2),
    Case("changed on untracked image", _simple("changed", "{img}", "--since", "*"), 2),
    # sizes and numbers
    Case("bwlimit 17179869184P", _simple("sync", "--bwlimit", "17179869184P", "{img}", "{out}"),
         2),
    Case("bwlimit 1e400", _simple("sync", "--bwlimit", "1" + "0" * 400, "{img}", "{out}"), 2),
    Case("bwlimit 0", _simple("sync", "--bwlimit", "0", "{img}", "{out}"), 2),
    Case("workers huge", _simple("sync", "--workers", "9" * 30, "{img}", "{out}"), 2),
    Case("max-passes huge", _simple("sync", "--max-passes", "9" * 30, "{img}", "{out}"), 2),
    Case("target-downtime 1e999s", _simple("sync", "--target-downtime", "1e999s", "{img}",
                                           "{out}"), 2),
    Case("target-downtime 99999999999999999999", _simple(
        "sync", "--target-downtime", "9" * 20, "{img}", "{out}"), 2),
    Case("granularity 3", _simple("track", "enable", "{img}", "--granularity", "3"), 2),
    Case("granularity 1P", _simple("track", "enable", "{img}", "--granularity", "1P"), 2),
    Case("2 PiB sparse source", _big_sparse, 2, tmpfs=True),
    # demo
    *[Case(f"demo --size {v!r}", _simple("demo", "--dir", "{d}", "--size", v), 2,
           _no_demo_image) for v in ("abc", "1k", "0", "-5", "", "1P", "99999999999999P")],
    *[Case(f"demo --rate {v!r}", _simple("demo", "--dir", "{d}", "--rate", v), 2,
           _no_demo_image) for v in ("abc", "-1", "", "0")],
    Case("demo --dir on a file", _simple("demo", "--dir", "{img}"), 2),
    Case("demo --dir on a read-only fs", _simple("demo", "--dir", "{d}/ro/dir"), 2, ro=True,
         root=True),
    # bench convergence argument parsing
    Case("bench --rebuild corrupt runs.json", _corrupt_runs, 2),
    Case("bench --rebuild runs.json of the wrong shape", _wrong_runs, 2),
    Case("bench --rebuild no runs.json", _bench("--rebuild"), 2),
    Case("bench --max-passes 0", _bench("--max-passes", "0"), 2),
    Case("bench --granularity 3", _bench("--granularity", "3"), 2),
    Case("bench --rates nan", _bench("--rates", "nan"), 2),
    Case("bench --rates inf", _bench("--rates", "inf"), 2),
    Case("bench --writers 0", _bench("--writers", "0"), 2),
    Case("bench --repetitions 0", _bench("--repetitions", "0"), 2),
    Case("bench --allocated 2", _bench("--allocated", "2"), 2),
    Case("bench --copy-cap nan", _bench("--copy-cap", "nan"), 2),
    Case("bench --qemu-timeout -1", _bench("--qemu-timeout", "-1"), 2),
    # sources that are not images
    Case("source is a sidecar", _simple("sync", "{tracked}.cbt", "{out}"), 2),
    Case("source is a link to a sidecar", _sidecar_link_source, 2),
    Case("source is a manifest", _manifest_source, 2),
    Case("source is a shadow copy", _partial_source, 2),
    Case("source is a /sys file", _simple("sync", "/sys/kernel/mm/transparent_hugepage/enabled",
                                          "{out}"), 2),
    Case("source is a /proc file", _simple("sync", "/proc/self/status", "{out}"), 2),
    Case("source is a link to a /sys file", lambda d: (
        os.symlink("/sys/kernel/mm/transparent_hugepage/enabled", d / "l.img"),
        (d / "out").mkdir(), ["sync", str(d / "l.img"), str(d / "out")])[-1], 2),
    Case("source is a fifo", _simple("sync", "{fifo}", "{out}"), 2),
    Case("source is /dev/null", _simple("sync", "{null}", "{out}"), 2, _devnull_intact,
         root=True),
    Case("source is empty string", _simple("sync", "", "{out}"), 2),
    # destinations
    Case("destination empty string", _simple("sync", "{img}", ""), 2),
    Case("destination *.cbt", _simple("sync", "{img}", "{out}/b.img.cbt"), 2),
    Case("destination *.bm-manifest", _simple("sync", "{img}", "{out}/b.img.bm-manifest"), 2),
    Case("destination *.bm-partial", _simple("sync", "{img}", "{out}/.b.img.bm-partial"), 2),
    Case("--force onto another image's sidecar", _force_onto_other_sidecar, 2,
         _sidecar_intact),
    Case("--force onto another copy's manifest", _force_onto_other_manifest, 2),
    Case("--force onto /dev/null", _simple("sync", "--force", "{img}", "{null}"), 2,
         _devnull_intact, root=True),
    Case("onto /dev/null", _simple("sync", "{img}", "{null}"), 2, _devnull_intact, root=True),
    Case("--force onto a fifo", _simple("sync", "--force", "{img}", "{fifo}"), 2, _fifo_intact),
    Case("destination in /sys", _simple("sync", "{img}", "/sys/kernel/x.img"), 2),
    Case("destination in /proc", _simple("sync", "{img}", "/proc/x.img"), 2),
    Case("destination folder missing", _simple("sync", "{img}", "{d}/nope/x.img"), 2),
    Case("destination on a read-only fs", _ro_dst, 2, ro=True, root=True),
    Case("non-UTF-8 destination, strict UTF-8 locale", _non_utf8_dst, 0,
         env={"LC_ALL": "C.UTF-8", "PYTHONIOENCODING": "utf-8:strict"}),
    Case("non-UTF-8 destination --json", lambda d: [*_non_utf8_dst(d), "--json"], 0,
         _json_out, env={"LC_ALL": "C.UTF-8", "PYTHONIOENCODING": "utf-8:strict"}),
    Case("manifest path is a folder", _manifest_is_dir, 2),
    Case("symlinked sidecar", _symlinked_sidecar, 2),
    # track
    Case("track enable on a sidecar", _simple("track", "enable", "{tracked}.cbt"), 2,
         lambda d, p: None if not (d / "t.img.cbt.cbt").exists() else pytest.fail("X.cbt.cbt")),
    Case("track enable on a fifo", _simple("track", "enable", "{fifo}"), 2, _fifo_intact),
    Case("track status on a fifo", _simple("track", "status", "{fifo}"), 2),
    Case("track enable on /dev/null", _simple("track", "enable", "{null}"), 2,
         lambda d, p: (_devnull_intact(d, p), _no_file(d / "null.cbt")), root=True),
    Case("track status on /dev/null", _simple("track", "status", "{null}"), 2, root=True),
    Case("track enable on a folder", _simple("track", "enable", "{d}"), 2),
    Case("track enable twice", lambda d: ["track", "enable", str(_tracked(d))], 2),
    Case("track status untracked", _simple("track", "status", "{img}"), 2),
    Case("track enable on a missing image", _simple("track", "enable", "{d}/nope.img"), 2),
    Case("track enable on a read-only fs", _simple("track", "enable", "{d}/ro/a.img"), 2,
         ro=True, root=True),
    Case("track enable on a /proc file", _simple("track", "enable", "/proc/self/status"), 2),
    Case("track disable --json", _simple("track", "disable", "{tracked}", "--json"), 0,
         _json_out),
    Case("track enable --json", _simple("track", "enable", "{img}", "--json"), 0, _json_out),
    Case("track reset --json", _simple("track", "reset", "{tracked}", "--json"), 0, _json_out),
    # verify
    Case("verify /proc/self/status empty.img", lambda d: (
        (d / "empty.img").touch(), ["verify", "/proc/self/status", str(d / "empty.img")])[-1],
        2),
    Case("verify a fifo", _simple("verify", "{fifo}", "{img}"), 2),
    Case("verify /dev/zero", _simple("verify", "/dev/zero", "{img}"), 2),
    Case("verify a missing file", _simple("verify", "{d}/nope", "{img}"), 2),
]


def _case_id(case: Case) -> str:
    return case.name


def _run_case(case: Case, folder: Path) -> subprocess.CompletedProcess[bytes]:
    with contextlib.ExitStack() as stack:
        if case.ro:
            stack.enter_context(_ro_mount(folder))
        if case.tmpfs:
            stack.enter_context(_tmpfs(folder))
        argv = case.setup(folder)
        return run(argv, folder, env=case.env)


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, object]]:
    """Every case run once, several at a time (each is a separate process
    that mostly waits for its interpreter to start): name -> (folder, the
    finished process or the exception its set-up raised)."""
    from concurrent.futures import ThreadPoolExecutor

    def one(case: Case) -> tuple[str, tuple[Path, object]]:
        folder = tmp_path_factory.mktemp("case")
        try:
            return case.name, (folder, _run_case(case, folder))
        except BaseException as e:
            return case.name, (folder, e)

    runnable = [c for c in CASES if IS_ROOT or not c.root]
    with ThreadPoolExecutor(max_workers=8) as pool:
        return dict(pool.map(one, runnable))


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_bad_input(case: Case, outcomes: dict[str, tuple[Path, object]]) -> None:
    if case.root and not IS_ROOT:
        pytest.skip("needs root (mounts)")
    folder, proc = outcomes[case.name]
    if isinstance(proc, BaseException):
        raise proc
    assert isinstance(proc, subprocess.CompletedProcess)
    stderr = proc.stderr.decode(errors="replace")
    assert "Traceback" not in stderr, stderr
    assert proc.returncode == case.code, (proc.returncode, stderr)
    if case.check is not None:
        case.check(folder, proc)


def test_sigterm_handler_installed_first(monkeypatch: pytest.MonkeyPatch) -> None:
    """SIGTERM that arrives while the arguments are parsed already unwinds
    cleanly (exit 143), instead of killing the process with -15."""
    import importlib

    cli = importlib.import_module("blockmirror.cli.main")

    seen = []
    real = cli.build_parser

    def spying_parser(command: str | None = None) -> object:
        seen.append(signal.getsignal(signal.SIGTERM))
        os.kill(os.getpid(), signal.SIGTERM)  # arrives during start-up
        return real(command)

    old = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(cli, "build_parser", spying_parser)
    try:
        code = cli.main(["track", "status", "/nonexistent/x.img"])
    finally:
        signal.signal(signal.SIGTERM, old)
    assert seen and seen[0] is cli._on_sigterm
    assert code == 143
