"""fio over NBD (issue 9, "Measure it"): ``blockmirror serve`` against
``nbdkit file`` and ``qemu-nbd``, in the same run.

Each server exports its own copy of one image (same size, same random data,
fully allocated, in the page cache) on a unix socket; all of them stay up for
the whole run. fio (``--ioengine=nbd``, one job = one connection) runs the
same job against each in turn, and the rounds interleave: in every round each
job runs once on every server, in an order that rotates from round to round,
after an untimed ``sync`` so that no earlier run's writeback competes. Each
round gives one ratio per server and job to ``nbdkit file`` in that round; the
table reports medians (IOPS, MiB/s, the ratio) and the ratios' range.

Target (issue 9): blockmirror ≥ 0.9 x ``nbdkit file`` on every row.

Run: ``blockmirror bench nbd --help`` or ``python -m bench.nbd --help`` from
the repository root.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import servers as _servers

MiB = 1 << 20
KiB = 1 << 10
TARGET_RATIO = 0.9
DEFAULT_OUTPUT = Path(__file__).resolve().parent.parent / "results" / "nbd"
Log = Callable[[str], None]


@dataclass(frozen=True)
class Job:
    name: str
    rw: str  # fio --rw
    block_size: int
    iodepth: int

    @property
    def reads(self) -> bool:
        return "read" in self.rw


JOBS = (
    Job("randwrite-4k-qd32", "randwrite", 4 * KiB, 32),
    Job("write-1m-qd8", "write", 1 * MiB, 8),
    Job("randread-4k-qd32", "randread", 4 * KiB, 32),
)


@dataclass
class Config:
    image_size: int = 1 << 30
    runtime_s: float = 3.0
    ramp_s: float = 1.0
    rounds: int = 7  # short runs, many rounds: a busy spell hits one pair, not a row
    io_size: int | None = None  # bytes per run instead of a time (the smoke test)
    fill_block: int = 4 * MiB  # the images are written this many bytes at a time
    jobs: list[str] = field(default_factory=lambda: [j.name for j in JOBS])
    servers: list[str] = field(default_factory=lambda: list(_servers.SERVERS))
    sync_between: bool = True
    workdir: Path | None = None  # images; default a temporary folder, removed
    output: Path | None = DEFAULT_OUTPUT

    def __post_init__(self) -> None:
        unknown = set(self.jobs) - {j.name for j in JOBS}
        if unknown:
            raise ValueError(f"unknown jobs {sorted(unknown)}; known: {[j.name for j in JOBS]}")
        if set(self.servers) - set(_servers.SERVERS):
            raise ValueError(f"servers must be among {_servers.SERVERS}")
        if _servers.BASELINE not in self.servers:
            raise ValueError(f"{_servers.BASELINE} is the baseline: it must be in the run")
        if self.rounds < 1 or self.image_size < MiB:
            raise ValueError("rounds must be >= 1 and the image at least 1 MiB")
        if self.fill_block < 4 * KiB or self.fill_block & (self.fill_block - 1):
            raise ValueError("the fill block must be a power of two of at least 4 KiB")

    @property
    def job_list(self) -> list[Job]:
        return [j for j in JOBS if j.name in self.jobs]


@dataclass
class Sample:
    round: int
    job: str
    server: str
    iops: float
    bw_bytes: float
    clat_p99_us: float
    server_cpu_s: float = 0.0  # the server's CPU time over the whole fio run
    ios: float = 0.0  # requests over the whole fio run (ramp included, estimated)

    @property
    def cpu_us_per_io(self) -> float:
        return self.server_cpu_s / self.ios * 1e6 if self.ios > 0 else 0.0


@dataclass
class Result:
    config: Config
    samples: list[Sample]
    rows: list[dict[str, Any]]
    skipped: dict[str, str]  # server: why it did not run
    servers_how: dict[str, str]
    environment: list[str]
    tracked_dirty_bytes: int | None  # blockmirror's sidecar after the run
    command: str
    started: str


# -- fio ----------------------------------------------------------------------------------


def fio_command(job: Job, uri: str, cfg: Config, report: Path) -> list[str]:
    """The one fio command line every server gets for JOB."""
    argv = ["fio", f"--name={job.name}", "--ioengine=nbd", f"--uri={uri}", f"--rw={job.rw}",
            f"--bs={job.block_size}", f"--iodepth={job.iodepth}", "--numjobs=1",
            "--norandommap", "--randrepeat=0", "--output-format=json", f"--output={report}"]
    if cfg.io_size is not None:
        argv.append(f"--io_size={cfg.io_size}")
    else:
        argv += ["--time_based", f"--runtime={cfg.runtime_s:g}", f"--ramp_time={cfg.ramp_s:g}"]
    return argv


def parse_fio(report: Path, job: Job) -> tuple[float, float, float]:
    """IOPS, bytes/s and p99 completion latency (µs) from fio's JSON report."""
    text = report.read_text()
    data = json.loads(text[text.index("{"):])  # fio may print notes before the JSON
    side = data["jobs"][0]["read" if job.reads else "write"]
    p99 = side.get("clat_ns", {}).get("percentile", {}).get("99.000000", 0) / 1000
    return float(side["iops"]), float(side["bw_bytes"]), float(p99)


def run_fio(job: Job, server: _servers.Server, cfg: Config, folder: Path) -> Sample:
    report = folder / f"fio-{job.name}-{server.kind}.json"
    argv = fio_command(job, server.uri, cfg, report)
    timeout = 120 + (0 if cfg.io_size else cfg.runtime_s + cfg.ramp_s)
    cpu0 = server.cpu_seconds()
    done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=timeout)
    cpu = server.cpu_seconds() - cpu0
    if done.returncode != 0:
        raise RuntimeError(f"fio against {server.kind} failed ({done.returncode}): "
                           f"{(done.stderr or done.stdout).strip()[-400:]}")
    if server.proc.poll() is not None:
        raise RuntimeError(f"{server.kind} exited during {job.name}")
    iops, bw, p99 = parse_fio(report, job)
    # fio's figures leave the ramp out; the CPU time covers it.
    ios = cfg.io_size / job.block_size if cfg.io_size else iops * (cfg.runtime_s + cfg.ramp_s)
    return Sample(-1, job.name, server.kind, iops, bw, p99, cpu, ios)


# -- the run --------------------------------------------------------------------------------


def make_images(folder: Path, names: Sequence[str], size: int, fill_block: int, *,
                sync: bool = True) -> dict[str, Path]:
    """One image per server, identical in content *and history*: each written
    the same way, FILL_BLOCK bytes per write, every block allocated.

    The history matters: the page cache keeps the folio size the file was
    written with, and a 4 KiB overwrite inside a large folio cost ext4 (Linux
    6.18) 3-4x one into a 4 KiB folio here (ext4_block_write_begin walks the
    folio's buffers). An image copied with ``shutil.copyfile`` beside one
    written in 4 MiB pieces made nbdkit file look 4x faster than itself.
    """
    folder.mkdir(parents=True, exist_ok=True)
    data = os.urandom(max(fill_block, 4 * MiB))
    images = {}
    for name in names:
        images[name] = folder / f"{name}.img"
        fd = os.open(images[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            for off in range(0, size, fill_block):
                start = off % len(data) // fill_block * fill_block
                os.pwrite(fd, data[start:start + min(fill_block, size - off)], off)
        finally:
            os.close(fd)
    if sync:
        os.sync()
    return images


def run(cfg: Config, *, log: Log = print, command: str = "") -> Result:
    """Every job on every available server, cfg.rounds interleaved rounds."""
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    skipped = {k: why for k in cfg.servers if (why := _servers.missing(k))}
    kinds = [k for k in cfg.servers if k not in skipped]
    if _servers.BASELINE not in kinds:
        raise RuntimeError(f"the baseline cannot run: {skipped[_servers.BASELINE]}")
    for kind, why in skipped.items():
        log(f"{kind} skipped: {why}")
    own = cfg.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="bm-nbdbench-")) if own else Path(cfg.workdir)  # type: ignore[arg-type]
    # Unix socket paths must stay short (108 bytes): not under the workdir.
    sockets = Path(tempfile.mkdtemp(prefix="bmn-"))
    samples: list[Sample] = []
    how: dict[str, str] = {}
    dirty: int | None = None
    try:
        images = make_images(workdir, kinds, cfg.image_size, cfg.fill_block,
                             sync=cfg.sync_between)
        with contextlib.ExitStack() as stack:
            live = {k: stack.enter_context(_servers.serving(k, images[k], sockets / f"{k}.sock"))
                    for k in kinds}
            how = {k: s.how for k, s in live.items()}
            for rnd in range(cfg.rounds):
                samples += _one_round(cfg, rnd, [live[k] for k in kinds], workdir, log)
        if "blockmirror" in images:
            dirty = _tracked_dirty(images["blockmirror"])
    finally:
        shutil.rmtree(sockets, ignore_errors=True)
        if own:
            shutil.rmtree(workdir, ignore_errors=True)
    return Result(cfg, samples, summarize(samples, cfg), skipped, how, environment(),
                  dirty, command, started)


def _one_round(cfg: Config, rnd: int, live: list[_servers.Server], folder: Path,
               log: Log) -> list[Sample]:
    out = []
    shift = rnd % len(live)
    order = live[shift:] + live[:shift]  # a rotating order: no server always first
    for job in cfg.job_list:
        for server in order:
            if cfg.sync_between:
                os.sync()  # untimed: no earlier run's writeback competes
            sample = run_fio(job, server, cfg, folder)
            sample.round = rnd
            out.append(sample)
            log(f"round {rnd + 1}/{cfg.rounds}  {job.name:18} {server.kind:12} "
                f"{sample.iops:10.0f} IOPS {sample.bw_bytes / MiB:9.1f} MiB/s")
    return out


def _tracked_dirty(image: Path) -> int | None:
    """Dirty bytes in blockmirror's sidecar: > 0 proves the writes were tracked."""
    from blockmirror.tracking.tracker import Tracker

    try:
        with Tracker.open(image) as tracker:
            return tracker.dirty_bytes()
    except (OSError, ValueError):
        return None


def summarize(samples: Sequence[Sample], cfg: Config) -> list[dict[str, Any]]:
    """One row per job and server: medians, and the paired per-round ratio."""
    rows = []
    base = {(s.round, s.job): s for s in samples if s.server == _servers.BASELINE}
    for job in cfg.job_list:
        for kind in cfg.servers:
            mine = [s for s in samples if s.job == job.name and s.server == kind]
            if not mine:
                continue
            ratios = [s.iops / base[(s.round, s.job)].iops for s in mine
                      if base.get((s.round, s.job)) and base[(s.round, s.job)].iops > 0]
            ratio = statistics.median(ratios) if ratios else None
            cpu = [s.cpu_us_per_io / base[(s.round, s.job)].cpu_us_per_io for s in mine
                   if base.get((s.round, s.job)) and base[(s.round, s.job)].cpu_us_per_io > 0]
            rows.append({
                "job": job.name, "server": kind, "rounds": len(mine),
                "iops": statistics.median(s.iops for s in mine),
                "bw_mib": statistics.median(s.bw_bytes for s in mine) / MiB,
                "clat_p99_us": statistics.median(s.clat_p99_us for s in mine),
                "cpu_us_per_io": statistics.median(s.cpu_us_per_io for s in mine),
                "cpu_ratio": statistics.median(cpu) if cpu else None,
                "ratio": ratio, "ratio_min": min(ratios, default=None),
                "ratio_max": max(ratios, default=None),
                "met": None if kind != "blockmirror" or ratio is None else ratio >= TARGET_RATIO,
            })
    return rows


# -- report ---------------------------------------------------------------------------------


def _version(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "?"
    lines = (done.stdout or done.stderr).strip().splitlines()
    return lines[0] if lines else "?"


def environment() -> list[str]:
    """What was measured on: machine, tools, code."""
    root = Path(__file__).resolve().parent.parent.parent
    head = _version(["git", "-C", str(root), "rev-parse", "--short", "HEAD"])
    dirty = _version(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"])
    return [
        f"{platform.node()}: Linux {platform.release()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}",
        f"{_version(['fio', '--version'])}, {_version(['nbdkit', '--version'])}, "
        f"{_version(['qemu-nbd', '--version'])}",
        f"code: git {head}" + (" (uncommitted changes)" if dirty not in ("", "?") else ""),
    ]


def _fmt_ratio(row: dict[str, Any]) -> str:
    if row["ratio"] is None:
        return "-"
    if row["server"] == _servers.BASELINE:
        return "1.00"
    return f"{row['ratio']:.2f} ({row['ratio_min']:.2f}-{row['ratio_max']:.2f})"


def table_markdown(result: Result) -> str:
    """The table: one row per job and server; the verdict on blockmirror's rows."""
    cfg = result.config
    size = f"{cfg.io_size / MiB:g} MiB per run" if cfg.io_size else \
        f"{cfg.runtime_s:g} s per run after {cfg.ramp_s:g} s ramp"
    lines = [
        f"fio --ioengine=nbd over a unix socket, {cfg.image_size / MiB:g} MiB image per server "
        f"(written {cfg.fill_block / KiB:g} KiB at a time), "
        f"{size}, {cfg.rounds} interleaved rounds; medians, ratio = IOPS ÷ nbdkit file's in the "
        f"same round (median, min-max); target ≥ {TARGET_RATIO:g}x nbdkit file. Server CPU = "
        "the server process tree's user + system time over the run (ramp included) per I/O, "
        "less sensitive to a busy machine than IOPS; its ratio is paired per round too.",
        "",
        "| job | server | IOPS | MiB/s | p99 clat µs | ÷ nbdkit file | target | server CPU "
        "µs/IO | CPU/IO ÷ nbdkit file |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result.rows:
        verdict = "-" if r["met"] is None else ("MET" if r["met"] else "MISSED")
        lines.append(f"| {r['job']} | {r['server']} | {r['iops']:.0f} | {r['bw_mib']:.1f} | "
                     f"{r['clat_p99_us']:.0f} | {_fmt_ratio(r)} | {verdict} | "
                     f"{r['cpu_us_per_io']:.1f} | "
                     f"{'-' if r['cpu_ratio'] is None else format(r['cpu_ratio'], '.2f')} |")
    mine = [r for r in result.rows if r["server"] == "blockmirror"]
    if mine:
        every = all(r["met"] for r in mine)
        lines += ["", f"blockmirror ≥ {TARGET_RATIO:g}x nbdkit file on every row: "
                  f"{'MET' if every else 'MISSED'}"]
    if result.tracked_dirty_bytes is not None:
        lines.append(f"blockmirror's sidecar after the run: {result.tracked_dirty_bytes / MiB:g} "
                     "MiB dirty (the writes were tracked)")
    for kind, why in result.skipped.items():
        lines.append(f"{kind}: not run ({why})")
    lines += ["", "Servers:"] + [f"- {k}: `{v}`" for k, v in result.servers_how.items()]
    lines += [f"- {line}" for line in result.environment]
    return "\n".join(lines)


def write_output(result: Result) -> list[Path]:
    out = result.config.output
    if out is None:
        return []
    out.mkdir(parents=True, exist_ok=True)
    data = {"config": {**asdict(result.config), "workdir": None, "output": str(out)},
            "samples": [asdict(s) for s in result.samples], "rows": result.rows,
            "skipped": result.skipped, "servers": result.servers_how,
            "environment": result.environment, "command": result.command,
            "started": result.started, "tracked_dirty_bytes": result.tracked_dirty_bytes}
    files = [out / "results.json", out / "summary.md"]
    files[0].write_text(json.dumps(data, indent=1) + "\n")
    files[1].write_text(f"{result.started}: `{result.command}`\n\n{table_markdown(result)}\n")
    return files


# -- command line ---------------------------------------------------------------------------


def _size(text: str) -> int:
    from blockmirror.units import size_argument

    return size_argument(text)


def _names(known: Sequence[str]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        names = [x for x in text.replace(" ", "").split(",") if x]
        bad = [x for x in names if x not in known]
        if bad or not names:
            raise argparse.ArgumentTypeError(f"choose from {', '.join(known)}: {text!r}")
        return names
    return parse


def build_parser(prog: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0]
                                if __doc__ else None)
    p.add_argument("--size", type=_size, default=1 << 30, help="image size (default 1G)")
    p.add_argument("--runtime", type=float, default=3.0, help="seconds per fio run (default 3)")
    p.add_argument("--ramp", type=float, default=1.0,
                   help="fio ramp time before measuring, seconds (default 1)")
    p.add_argument("--rounds", type=int, default=7, help="interleaved rounds (default 7)")
    p.add_argument("--io-size", type=_size,
                   help="bytes per fio run instead of --runtime (quick checks)")
    p.add_argument("--jobs", type=_names([j.name for j in JOBS]),
                   default=[j.name for j in JOBS], help="comma separated (default: all)")
    p.add_argument("--servers", type=_names(_servers.SERVERS), default=list(_servers.SERVERS),
                   help=f"comma separated (default {','.join(_servers.SERVERS)})")
    p.add_argument("--fill-block", type=_size, default=4 * MiB,
                   help="write the images this much at a time (default 4M, as a copy "
                   "does; the page cache keeps that folio size, and ext4 pays for 4 KiB "
                   "overwrites into large folios: try 4k as well)")
    p.add_argument("--no-sync", action="store_true",
                   help="no untimed sync before each fio run")
    p.add_argument("--workdir", type=Path, help="where the images go (default: a temporary "
                   "folder, removed); put it on the filesystem to measure")
    p.add_argument("--output", type=Path, default=DEFAULT_OUTPUT,
                   help="results.json and summary.md go here (default bench/results/nbd)")
    return p


def main(argv: Sequence[str] | None = None, prog: str = "blockmirror bench nbd") -> int:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    try:
        cfg = Config(image_size=args.size, runtime_s=args.runtime, ramp_s=args.ramp,
                     rounds=args.rounds, io_size=args.io_size, jobs=args.jobs,
                     fill_block=args.fill_block,
                     servers=args.servers, sync_between=not args.no_sync,
                     workdir=args.workdir, output=args.output)
    except ValueError as e:
        parser.error(str(e))
    command = shlex.join([*prog.split(), *(sys.argv[1:] if argv is None else argv)])
    try:
        result = run(cfg, command=command)
    except RuntimeError as e:
        parser.exit(2, f"{prog}: error: {e}\n")
    print(f"\n{table_markdown(result)}")
    files = write_output(result)
    if files:
        print("wrote " + ", ".join(str(f) for f in files))
    return 0
