"""``--frontend nbd``: blockmirror's writers as a QEMU guest would be.

Instead of ``python -m blockmirror.cli.workload`` processes writing through
``TrackedImage``, the image is exported by ``blockmirror serve`` (nbdkit with
blockmirror's plugin, on a unix socket) and written by **the very fio command
the QEMU peer runs** (``qemu_peer.guest_fio_command``: ``--ioengine=nbd``,
``--numjobs`` = writers at rate/N, ``--iodepth=8``, the pattern's
``--rw``/``--random_distribution``), only the URI differs, plus fio's
bandwidth log for the timeline. So the side-by-side table compares the two
copy engines on identical guest I/O.

What the harness reads from the guest, as from the Python writers:

- the timeline (bytes written by time): fio's ``--write_bw_log`` averaged over
  ``WRITER_TIMELINE_S``, stamped in Unix time (``--log_unix_epoch``) and
  mapped onto ``time.monotonic()``; summed over the jobs;
- the longest single write: fio's maximum completion latency, the pause the
  guest felt (a write held by the freeze waits in the plugin);
- the overall rate: fio's JSON report.

The export stays up at rate 0 too (idle): the plugin holds the writer slot
either way.
"""

from __future__ import annotations

import contextlib
import glob
import json
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.nbd import servers

from . import qemu_peer

if TYPE_CHECKING:
    from .harness import MatrixConfig

FIO_GRACE_S = 10.0


@dataclass
class FioGuest:
    """``blockmirror serve`` on the image and fio writing to it: the harness's
    writer group for ``--frontend nbd`` (same methods as ``WriterGroup``)."""

    stack: contextlib.ExitStack
    server: servers.Server
    procs: list[subprocess.Popen[bytes]]  # fio, or nothing at rate 0
    report: Path
    log_prefix: Path
    epoch_minus_mono: float  # time.time() - time.monotonic() at the start
    stats: list[dict[str, Any]] = field(default_factory=list)
    timeline: list[tuple[float, float]] = field(default_factory=list)  # (monotonic, bytes)
    max_write_s: float = 0.0
    overall_rate: float = 0.0

    @classmethod
    def start(cls, image: Path, rate: float, cfg: MatrixConfig, seed: int,
              folder: Path) -> FioGuest:
        from .harness import WRITER_TIMELINE_S

        stack = contextlib.ExitStack()
        try:
            # Unix socket paths must stay short (108 bytes): not under the workdir.
            sockets = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bmc-")))
            server = stack.enter_context(servers.serving(
                "blockmirror", image, sockets / "nbd.sock", granularity=cfg.granularity))
            report, prefix = folder / "fio.json", folder / "fio"
            procs: list[subprocess.Popen[bytes]] = []
            if rate > 0:
                argv = [*qemu_peer.guest_fio_command(cfg, rate, seed, server.uri, report),
                        f"--write_bw_log={prefix}",
                        f"--log_avg_msec={int(WRITER_TIMELINE_S * 1000)}", "--log_unix_epoch=1"]
                procs.append(subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                              stdout=subprocess.DEVNULL,
                                              stderr=subprocess.PIPE))
        except BaseException:
            stack.close()
            raise
        return cls(stack, server, procs, report, prefix, time.time() - time.monotonic())

    def wait_attached(self, image: Path, timeout: float = 20.0) -> None:
        """Until the guest's writes land in the bitmap (the sidecar was clean)."""
        if not self.procs:
            return
        from blockmirror.tracking.tracker import Tracker

        deadline = time.monotonic() + timeout
        while True:
            self.check_alive()
            with Tracker.open(image) as tracker:
                if tracker.dirty_bytes() > 0:
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"fio wrote nothing through the export within {timeout:.0f} s")
            time.sleep(0.02)

    def alive(self) -> bool:
        return self.server.proc.poll() is None and all(p.poll() is None for p in self.procs)

    def check_alive(self) -> None:
        if self.server.proc.poll() is not None:
            err = self.server.log.read_text(errors="replace") if self.server.log.exists() else ""
            raise RuntimeError(f"blockmirror serve exited early "
                               f"(status {self.server.proc.returncode}): {err[-400:]}")
        for p in self.procs:
            if p.poll() is not None:
                err = p.stderr.read().decode(errors="replace") if p.stderr else ""
                raise RuntimeError(f"fio exited early (status {p.returncode}): {err[-400:]}")

    def stop(self) -> None:
        """fio first (it completes its requests and reports), then the export."""
        for p in self.procs:
            qemu_peer._stop(p, grace=FIO_GRACE_S)
            if p.stderr:
                p.stderr.close()
        self.stack.close()
        if self.procs:
            self._read_fio()

    def _read_fio(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            text = self.report.read_text()
            report = json.loads(text[text.index("{"):])
            jobs = report.get("jobs", [])
            self.overall_rate = float(sum(j["write"]["bw_bytes"] for j in jobs))
            self.max_write_s = max((j["write"]["lat_ns"]["max"] / 1e9 for j in jobs),
                                   default=0.0)
            self.stats = [{"rate": self.overall_rate, "max_write_seconds": self.max_write_s}]
        from .harness import WRITER_TIMELINE_S

        self.timeline = bw_log_timeline(sorted(glob.glob(f"{self.log_prefix}_bw*.log")),
                                        self.epoch_minus_mono, WRITER_TIMELINE_S)

    def bytes_at(self, t: float) -> float:
        from .harness import _interpolate

        return _interpolate(self.timeline, t)

    def rate_between(self, t0: float, t1: float) -> float:
        if t1 <= t0 or not self.timeline:
            return 0.0
        return (self.bytes_at(t1) - self.bytes_at(t0)) / (t1 - t0)


def bw_log_timeline(paths: list[str], epoch_minus_mono: float,
                    window_s: float) -> list[tuple[float, float]]:
    """Cumulative bytes by monotonic time from fio bandwidth logs (one per job).

    Each line is ``msec, KiB/s, direction, block size, offset``: with
    ``log_avg_msec`` the bandwidth over the window ending at that time, so the
    window's bytes are the rate times the time since the previous line (the
    first line's: WINDOW_S, fio's averaging window).
    """
    steps: list[tuple[float, float]] = []  # (epoch seconds, bytes in the window ending then)
    for path in paths:
        last: float | None = None
        with open(path) as f:
            for line in f:
                parts = [x.strip() for x in line.split(",")]
                if len(parts) < 3 or parts[2] != "1":  # 1: writes
                    continue
                t, kib_s = int(parts[0]) / 1000.0, float(parts[1])
                window = t - last if last is not None else window_s
                last = t
                steps.append((t, kib_s * 1024 * window))
    steps.sort()
    out: list[tuple[float, float]] = []
    total = 0.0
    for t, b in steps:
        total += b
        out.append((t - epoch_minus_mono, total))
    return out
