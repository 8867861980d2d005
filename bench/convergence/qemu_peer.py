"""The peer: QEMU's block mirror at the same point of the matrix.

The method of ANCHORS.md ("Convergence versus write rate: QEMU's block
mirror"), at the matrix's size, pattern, rates and copy cap:

- ``qemu-storage-daemon`` (Debian ``qemu-system-common``) with the source as a
  raw blockdev (``cache.direct=on``, ``aio=threads``) exported writable over NBD
  on a unix socket, plus a QMP socket;
- ``fio --ioengine=nbd`` as the guest, ``--numjobs`` = the matrix's writers, each
  at rate/N, ``--bs`` = write size, ``--iodepth=8``; uniform is ``randwrite
  --norandommap`` (picks with replacement, as blockmirror's writers do),
  hotspot ``--random_distribution=zoned:90/10:10/90``, zipf
  ``--random_distribution=zipf:S``, sequential ``--rw=write``;
- QMP ``blockdev-add`` of the raw target (an empty sparse file of the same size,
  ``discard=unmap`` so zeros stay holes) and ``blockdev-mirror sync=full``
  with the matrix's granularity and ``speed`` = the copy cap;
- ``query-jobs`` every 0.25 s until ``ready`` (or the time limit): the time to
  ready, and on the way the first time at most 2 MiB were left and the first
  time ``remaining ÷ throughput < target downtime`` (the moment a time-based
  predicate such as blockmirror's would have switched over);
- to pause the guest: SIGTERM to fio, which completes its requests in flight
  and exits (so nothing lands after the switch), then ``block-export-del
  mode=hard`` as in ANCHORS (the guest is already gone: cutting the connection
  under fio first leaves it spinning on the dead socket and unable to report),
  then ``job-complete``: its duration is the downtime; ``pause_s`` is the whole
  pause from the SIGTERM; bytes copied from the job's final progress (which
  counts the image's holes and zeros as well);
- ``qemu-img compare`` of source and copy.

The guest's achieved rate is fio's own (whole run, warm-up included: QEMU
keeps no per-export write statistics); its rate from ``blockdev-mirror`` to
ready comes from fio's periodic reports (``--status-interval``), its write
latency p99 from fio's completion latency over the whole run.

``run_point(..., write_blocking=True)`` is the second peer, engine
"qemu-wb": the same with ``copy-mode=write-blocking`` (each guest write to
an already-copied range waits for the target). With ``--dest-bandwidth`` the
target image is on the same kind of slow disk as blockmirror's copy.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .harness import MatrixConfig, Row

MiB = 1 << 20
POLL_S = 0.25
TOOLS = ("qemu-storage-daemon", "fio", "qemu-img")


def _fio_has_nbd() -> bool:
    try:
        engines = subprocess.run(["fio", "--enghelp"], capture_output=True, text=True,
                                 timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return False
    return "nbd" in engines.split()


def fio_nbd_missing() -> str | None:
    """None when fio with its nbd engine is here (the guest), else why not."""
    if shutil.which("fio") is None:
        return "fio not installed (Debian fio)"
    return None if _fio_has_nbd() else "fio has no nbd engine"


def missing_tools() -> str | None:
    """None when the peer can run, else what is missing and how to get it."""
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if not missing and not _fio_has_nbd():
        missing.append("fio's nbd engine")
    if not missing:
        return None
    return (f"missing {', '.join(missing)} (Debian: apt-get install qemu-system-common "
            "qemu-utils fio)")


class QMPError(RuntimeError):
    pass


class QMP:
    """A minimal QMP client on a unix socket: commands, and events kept aside."""

    def __init__(self, path: Path, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.connect(str(path))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                self.sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        self.sock.settimeout(timeout)
        self.file = self.sock.makefile("rw", encoding="utf-8")
        self.events: list[tuple[float, dict[str, Any]]] = []  # (monotonic at receipt, event)
        greeting = self._read()
        if "QMP" not in greeting:
            raise QMPError(f"not a QMP greeting: {greeting}")
        self.cmd("qmp_capabilities")

    def _read(self) -> dict[str, Any]:
        line = self.file.readline()
        if not line:
            raise QMPError("QMP connection closed")
        return json.loads(line)  # type: ignore[no-any-return]

    def cmd(self, name: str, **arguments: Any) -> Any:
        msg: dict[str, Any] = {"execute": name}
        if arguments:
            msg["arguments"] = arguments
        self.file.write(json.dumps(msg) + "\n")
        self.file.flush()
        while True:
            reply = self._read()
            if "event" in reply:
                self.events.append((time.monotonic(), reply))
                continue
            if "error" in reply:
                raise QMPError(f"{name}: {reply['error'].get('desc', reply['error'])}")
            return reply.get("return")

    def event(self, name: str) -> tuple[float, dict[str, Any]] | None:
        for at, ev in self.events:
            if ev.get("event") == name:
                return at, ev
        return None

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.file.close()
        with contextlib.suppress(OSError):
            self.sock.close()


def fio_pattern_args(pattern: str, zipf_exponent: float) -> list[str]:
    if pattern == "sequential":
        return ["--rw=write"]
    args = ["--rw=randwrite", "--norandommap", "--randrepeat=0"]
    if pattern == "hotspot":
        args.append("--random_distribution=zoned:90/10:10/90")
    elif pattern == "zipf":
        args.append(f"--random_distribution=zipf:{zipf_exponent:g}")
    return args


def guest_fio_command(cfg: MatrixConfig, rate: float, seed: int, uri: str,
                      report: Path) -> list[str]:
    """The guest: fio writing to URI at RATE bytes/s, split over cfg.writers
    jobs (connections). The QEMU peer and ``--frontend nbd`` both run it, so
    both engines copy under the same guest I/O."""
    return ["fio", "--name=guest", "--ioengine=nbd", f"--uri={uri}",
            *fio_pattern_args(cfg.pattern, cfg.zipf_exponent),
            f"--bs={cfg.write_size}", "--iodepth=8",
            f"--rate={max(1, int(rate / cfg.writers))}", f"--numjobs={cfg.writers}",
            f"--randseed={seed}", "--time_based", "--runtime=3600",
            "--group_reporting", "--output-format=json", f"--output={report}"]


def initial_total(samples: list[tuple[float, int, int]] | list[list[Any]],
                  image_size: int) -> int:
    """The job's first full-pass size: the first *non-zero* total progress
    (a poll right after blockdev-mirror may see the job before it counted
    anything, total 0, and every byte would then look re-copied)."""
    return next((int(tot) for _, _, tot in samples if int(tot) > 0), image_size)


def derive_recopied(row: Row, image_size: int) -> None:
    """Re-copied bytes: copied beyond the first full pass (also on rebuild)."""
    if row.get("progress"):
        row["initial_total"] = initial_total(row["progress"], image_size)
    row["recopied_bytes"] = row["bytes_copied"] - row["initial_total"]
    row["recopied_ratio"] = row["recopied_bytes"] / image_size


def _guest_started(qmp: QMP, node: str = "src") -> bool:
    """Whether anything was written to NODE yet (its highest written offset)."""
    for entry in qmp.cmd("query-blockstats", **{"query-nodes": True}):
        if entry.get("node-name") == node:
            return int(entry["stats"].get("wr_highest_offset", 0)) > 0
    return False


def _fio_rate(path: Path) -> float:
    """Bytes/s fio wrote, from its JSON report (after any message lines)."""
    return fio_write_stats(path)[0]


def fio_reports(path: Path) -> list[dict[str, Any]]:
    """Every JSON report in fio's output file, in order (one per
    --status-interval, the final one last), after any message lines."""
    try:
        text = path.read_text()
    except OSError:
        return []
    decoder, out = json.JSONDecoder(), []
    at = text.find("{")
    while at >= 0:
        try:
            report, end = decoder.raw_decode(text, at)
        except ValueError:
            break
        out.append(report)
        at = text.find("{", end)
    return out


def fio_written_between(path: Path, t0: float, t1: float) -> float | None:
    """Bytes/s fio wrote between wall-clock times T0 and T1 (time.time()),
    from its periodic reports (interpolated), or None without them."""
    from .harness import _interpolate

    points = [(r["timestamp_ms"] / 1000, sum(j["write"]["io_bytes"] for j in r["jobs"]))
              for r in fio_reports(path) if "timestamp_ms" in r]
    if len(points) < 2 or t1 <= t0:
        return None
    return (_interpolate(points, t1) - _interpolate(points, t0)) / (t1 - t0)


def fio_write_stats(path: Path) -> tuple[float, float | None]:
    """Bytes/s fio wrote and its write completion latency p99 in seconds (the
    jobs' groups merged by --group_reporting), from its final JSON report."""
    reports = fio_reports(path)
    if not reports:
        return 0.0, None
    jobs = reports[-1].get("jobs", [])
    bw = float(sum(job["write"]["bw_bytes"] for job in jobs))
    p99s = [job["write"].get("clat_ns", {}).get("percentile", {}).get("99.000000")
            for job in jobs]
    known = [float(v) / 1e9 for v in p99s if v]
    return bw, max(known) if known else None


STATUS_INTERVAL = "250ms"  # fio's periodic reports: the guest's rate over a window


def _stop(proc: subprocess.Popen[Any] | None, grace: float = 2.0) -> None:
    """SIGTERM, then SIGKILL: fio spins on a dead NBD connection and may not
    notice SIGTERM."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def run_point(cfg: MatrixConfig, rate: float, repetition: int, workdir: Path, *,
              write_blocking: bool = False) -> Row:
    """One QEMU mirror of a fresh image under fio at RATE bytes/s; with
    WRITE_BLOCKING, copy-mode=write-blocking (engine "qemu-wb"). The target
    goes where the harness puts blockmirror's copy (a slow disk with
    --dest-bandwidth)."""
    from .harness import destination

    engine = "qemu-wb" if write_blocking else "qemu-mirror"
    folder = workdir / f"{engine}-{rate / MiB:g}M-{repetition}"
    shutil.rmtree(folder, ignore_errors=True)
    try:
        with destination(cfg, folder) as dst:
            return _run_point(cfg, rate, repetition, folder, dst / "image.img", engine)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _run_point(cfg: MatrixConfig, rate: float, repetition: int, folder: Path,
               target: Path, engine: str) -> Row:
    from .harness import _base_row, make_source

    image, allocated = make_source(folder / "src", cfg, cfg.seed + repetition, tracked=False)
    with open(target, "wb") as f:
        f.truncate(cfg.image_size)
    row = _base_row(engine, cfg, rate, repetition)
    row.update(allocated_bytes=allocated, passes=None, pass_list=[])
    point = _QemuPoint(cfg, rate, cfg.seed + repetition, image, target, folder / "fio.json",
                       engine, row)
    try:
        return point.run()
    finally:
        point.close()


class _QemuPoint:
    """One run of a QEMU peer: daemon, guest, mirror job, switch, checks.
    Each stage is a method; ``close`` stops whatever is still running."""

    def __init__(self, cfg: MatrixConfig, rate: float, seed: int, image: Path, target: Path,
                 fio_report: Path, engine: str, row: Row) -> None:
        self.cfg, self.rate, self.seed, self.engine, self.row = cfg, rate, seed, engine, row
        self.image, self.target, self.fio_report = image, target, fio_report
        # Unix socket paths must stay short (108 bytes): not under the workdir.
        self.sockets = Path(tempfile.mkdtemp(prefix="bmq-"))
        self.qsd: subprocess.Popen[bytes] | None = None
        self.fio: subprocess.Popen[bytes] | None = None
        self.qmp: QMP | None = None
        self.samples: list[tuple[float, int, int]] = []
        self.t0 = self.wall0 = 0.0

    def run(self) -> Row:
        self._start_daemon()
        if self.rate > 0:
            self._start_guest()
        time.sleep(self.cfg.warmup_s)
        self._start_mirror()
        ready = self._watch_until_ready()
        t_decided = time.monotonic()
        self.row.update(decision_s=ready if ready is not None else t_decided - self.t0,
                        initial_total=initial_total(self.samples, self.cfg.image_size),
                        progress=[[round(t, 3), c, tt] for t, c, tt in self.samples])
        paused = time.monotonic()
        self._stop_guest(t_decided)
        if ready is not None:
            self._complete(paused)
        else:
            self._cancel()
        self._quit_daemon()
        self._derive()
        return self.row

    def _start_daemon(self) -> None:
        nbd_sock, qmp_sock = self.sockets / "nbd.sock", self.sockets / "qmp.sock"
        self.qsd = subprocess.Popen(
            ["qemu-storage-daemon",
             "--blockdev", f"driver=file,filename={self.image},node-name=src-file,"
             "cache.direct=on,aio=threads",
             "--blockdev", "driver=raw,file=src-file,node-name=src",
             "--nbd-server", f"addr.type=unix,addr.path={nbd_sock}",
             "--export", "type=nbd,id=exp0,node-name=src,name=src,writable=on",
             "--chardev", f"socket,path={qmp_sock},server=on,wait=off,id=qmp0",
             "--monitor", "chardev=qmp0"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        self.qmp = QMP(qmp_sock)

    def _start_guest(self) -> None:
        """fio over the export, until QEMU sees its first write."""
        assert self.qmp is not None
        uri = f"nbd+unix:///src?socket={self.sockets / 'nbd.sock'}"
        self.fio = subprocess.Popen(
            [*guest_fio_command(self.cfg, self.rate, self.seed, uri, self.fio_report),
             f"--status-interval={STATUS_INTERVAL}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 20
        while not _guest_started(self.qmp):
            if self.fio.poll() is not None:
                raise RuntimeError(f"fio exited early (status {self.fio.returncode})")
            if time.monotonic() > deadline:
                raise RuntimeError("fio did not start writing within 20 s")
            time.sleep(0.05)

    def _start_mirror(self) -> None:
        assert self.qmp is not None
        self.qmp.cmd("blockdev-add", driver="file", filename=str(self.target),
                     **{"node-name": "dst-file"}, cache={"direct": True}, aio="threads",
                     discard="unmap")
        self.qmp.cmd("blockdev-add", driver="raw", file="dst-file", **{"node-name": "dst"},
                     discard="unmap")
        mirror: dict[str, Any] = {"job-id": "mirror", "device": "src", "target": "dst",
                                  "sync": "full", "granularity": self.cfg.granularity}
        if self.cfg.copy_cap:
            mirror["speed"] = int(self.cfg.copy_cap)
        if self.engine == "qemu-wb":
            mirror["copy-mode"] = "write-blocking"
        self.wall0 = time.time()
        self.t0 = time.monotonic()
        self.qmp.cmd("blockdev-mirror", **mirror)

    def _watch_until_ready(self) -> float | None:
        """Poll the job until ready (its time, from the event) or the time
        limit (None); notes on the way when a time-based predicate would
        have switched and when 2 MiB were left."""
        assert self.qmp is not None
        cfg = self.cfg
        le_2mib = predicate = ready = None
        while True:
            jobs = {j["id"]: j for j in self.qmp.cmd("query-jobs")}
            job = jobs.get("mirror")
            now = time.monotonic() - self.t0
            if job is None:
                raise RuntimeError("the mirror job vanished")
            status = job["status"]
            cur, tot = int(job["current-progress"]), int(job["total-progress"])
            self.samples.append((now, cur, tot))
            left = tot - cur
            if le_2mib is None and left <= 2 * MiB and now > 0:
                le_2mib = now
            throughput = cfg.copy_cap or (cur / now if now > 0 else 0.0)
            if predicate is None and now > 0 and throughput > 0 and \
                    left / throughput < cfg.target_downtime:
                predicate = now
            if status == "ready":
                ev = self.qmp.event("BLOCK_JOB_READY")
                ready = (ev[0] - self.t0) if ev else now
                break
            if status in ("aborting", "concluded", "null"):
                raise RuntimeError(f"mirror job ended early: {status}")
            if now > cfg.qemu_timeout_s:
                break
            time.sleep(POLL_S)
        self.row.update(ready_s=ready, le_2mib_s=le_2mib, predicate_s=predicate)
        return ready

    def _stop_guest(self, t_decided: float) -> None:
        """The guest completes its requests in flight and exits; its rate
        from blockdev-mirror to the decision (fio's p99 covers its whole
        run: it keeps no latencies per window)."""
        _stop(self.fio, grace=10)
        self.fio = None
        rate_got, p99 = fio_write_stats(self.fio_report)
        wall_decided = self.wall0 + (t_decided - self.t0)
        guest = self.rate > 0
        self.row.update(
            writer_rate=rate_got, writer_rate_overall=rate_got, mirror_s=t_decided - self.t0,
            mirror_write_p99_s=p99 if guest else None,
            mirror_writer_rate=fio_written_between(self.fio_report, self.wall0, wall_decided)
            if guest else None)

    def _complete(self, paused: float) -> None:
        """block-export-del, then job-complete: its duration is the downtime."""
        assert self.qmp is not None
        self.qmp.cmd("block-export-del", id="exp0", mode="hard")
        completing = time.monotonic()
        self.qmp.cmd("job-complete", id="mirror")
        while True:
            done = self.qmp.event("BLOCK_JOB_COMPLETED")
            if done is not None:
                break
            jobs = {j["id"]: j for j in self.qmp.cmd("query-jobs")}
            if "mirror" not in jobs or jobs["mirror"]["status"] in ("concluded", "null"):
                done = self.qmp.event("BLOCK_JOB_COMPLETED")
                break
            time.sleep(0.001)
        finished = done[0] if done else time.monotonic()
        copied = int(done[1]["data"]["offset"]) if done else self.samples[-1][1]
        if done and done[1]["data"].get("error"):
            raise RuntimeError(f"mirror failed: {done[1]['data']['error']}")
        self.row.update(outcome="converged", converged=True, downtime_s=finished - completing,
                        pause_s=finished - paused, bytes_copied=copied)

    def _cancel(self) -> None:
        assert self.qmp is not None
        self.qmp.cmd("block-job-cancel", device="mirror", force=True)
        self.row.update(outcome="not_converged", converged=False, downtime_s=0.0,
                        bytes_copied=self.samples[-1][1] if self.samples else 0,
                        notes=f"not ready within {self.cfg.qemu_timeout_s:g} s")

    def _close_qmp(self) -> None:
        """Ask the daemon to quit (it may be gone already) and hang up."""
        if self.qmp is not None:
            with contextlib.suppress(QMPError, OSError):
                self.qmp.cmd("quit")
            self.qmp.close()
            self.qmp = None

    def _quit_daemon(self) -> None:
        assert self.qsd is not None
        self._close_qmp()
        if self.qsd.wait(timeout=30) != 0:
            err = self.qsd.stderr.read().decode(errors="replace") if self.qsd.stderr else ""
            self._note(f"qemu-storage-daemon: {err[-300:]}")

    def _derive(self) -> None:
        """qemu-img compare of a converged copy, and the derived columns."""
        row = self.row
        if row["converged"]:
            cmp = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw",
                                  str(self.image), str(self.target)],
                                 capture_output=True, text=True)
            row["identical"] = cmp.returncode == 0
            if cmp.returncode != 0:
                self._note(cmp.stdout.strip())
        row["writer_max_write_s"] = None
        row["elapsed_s"] = time.monotonic() - self.t0
        row["switchover_s"] = row["ready_s"] if row["converged"] else None
        row["amplification"] = row["bytes_copied"] / self.cfg.image_size
        derive_recopied(row, self.cfg.image_size)
        row["dst_allocated"] = os.stat(self.target).st_blocks * 512

    def _note(self, text: str) -> None:
        self.row["notes"] = (self.row.get("notes", "") + " " + text).strip()

    def close(self) -> None:
        _stop(self.fio)
        self._close_qmp()
        if self.qsd is not None:
            _stop(self.qsd, grace=10)
            if self.qsd.stderr:
                self.qsd.stderr.close()
        shutil.rmtree(self.sockets, ignore_errors=True)
