"""Smoke test of the NBD front-end harness (bench/nbd, issue 9): a tiny run
(8 MiB images, 1 MiB per fio run, 2 rounds) of every job on every server this
machine has, checked for consistency. No timing verdict: the figures come
from ``blockmirror bench nbd``. Skips without fio (with its nbd engine) or
nbdkit; a server that cannot run here (qemu-nbd missing, the plugin not
built) is left out of the run and named in the report.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.nbd import harness, servers  # noqa: E402

MiB = 1 << 20


def _fio_has_nbd() -> bool:
    if shutil.which("fio") is None:
        return False
    out = subprocess.run(["fio", "--enghelp"], capture_output=True, text=True).stdout
    return "nbd" in out.split()


needs_tools = pytest.mark.skipif(
    not _fio_has_nbd() or shutil.which("nbdkit") is None,
    reason="needs fio with its nbd engine and nbdkit (Debian: fio nbdkit)")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> harness.Result:
    tmp = tmp_path_factory.mktemp("nbdbench")
    cfg = harness.Config(image_size=8 * MiB, io_size=1 * MiB, rounds=2, sync_between=False,
                         workdir=tmp / "work", output=tmp / "out")
    return harness.run(cfg, log=lambda line: None, command="smoke")


@needs_tools
def test_every_job_on_every_server_that_runs(tiny_run: harness.Result) -> None:
    ran = [k for k in servers.SERVERS if k not in tiny_run.skipped]
    assert servers.BASELINE in ran
    assert {(r["job"], r["server"]) for r in tiny_run.rows} == {
        (j.name, k) for j in harness.JOBS for k in ran}
    jobs = {j.name: j for j in harness.JOBS}
    for row in tiny_run.rows:
        assert row["rounds"] == 2, row
        assert row["iops"] > 0, row
        # fio's bandwidth is its IOPS times the block size: the report was parsed right.
        expected = row["iops"] * jobs[row["job"]].block_size / MiB
        assert row["bw_mib"] == pytest.approx(expected, rel=0.05), row


@needs_tools
def test_ratios_are_paired_per_round(tiny_run: harness.Result) -> None:
    base = {(s.round, s.job): s.iops for s in tiny_run.samples if s.server == servers.BASELINE}
    for row in tiny_run.rows:
        mine = [s.iops / base[(s.round, s.job)] for s in tiny_run.samples
                if s.job == row["job"] and s.server == row["server"]]
        assert row["ratio_min"] == pytest.approx(min(mine))
        assert row["ratio_max"] == pytest.approx(max(mine))
        if row["server"] == servers.BASELINE:
            assert row["ratio"] == 1.0
        if row["server"] == "blockmirror":
            assert row["met"] == (row["ratio"] >= harness.TARGET_RATIO)
        else:
            assert row["met"] is None


@needs_tools
def test_report_files_and_table(tiny_run: harness.Result) -> None:
    table = harness.table_markdown(tiny_run)
    for row in tiny_run.rows:
        assert f"| {row['job']} | {row['server']} |" in table
    files = harness.write_output(tiny_run)
    assert [f.name for f in files] == ["results.json", "summary.md"]
    data = json.loads(files[0].read_text())
    assert len(data["samples"]) == len(tiny_run.samples)
    assert data["rows"] == json.loads(json.dumps(tiny_run.rows))
    assert table in files[1].read_text()
    if "blockmirror" not in tiny_run.skipped:
        assert ("MET" in table) or ("MISSED" in table)


@needs_tools
def test_blockmirror_writes_were_tracked(tiny_run: harness.Result) -> None:
    if "blockmirror" in tiny_run.skipped:
        pytest.skip(f"blockmirror serve not available: {tiny_run.skipped['blockmirror']}")
    assert tiny_run.tracked_dirty_bytes is not None
    assert tiny_run.tracked_dirty_bytes > 0


@needs_tools
def test_servers_gone_and_images_intact(tiny_run: harness.Result) -> None:
    work = tiny_run.config.workdir
    assert work is not None
    for kind in servers.SERVERS:
        if kind in tiny_run.skipped:
            continue
        image = work / f"{kind}.img"
        assert image.stat().st_size == 8 * MiB, kind  # nothing wrote past the end
    for how in tiny_run.servers_how.values():
        sock = Path(how.split(" -U ")[-1].split()[0]) if " -U " in how else None
        if sock is not None:
            assert not sock.exists()
    # No server left running: every nbdkit / qemu-nbd of this run has exited.
    mine = [p for p in os.listdir("/proc") if p.isdigit()]
    for pid in mine:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        assert str(work) not in cmdline, cmdline


def test_server_process_tree_has_children() -> None:
    """blockmirror serve runs nbdkit as a child: the server's CPU time must
    include the children's."""
    parent = subprocess.Popen(["sh", "-c", "sleep 30; true"])
    tree: list[int] = []
    try:
        deadline = time.monotonic() + 10
        while len(tree := servers._process_tree(parent.pid)) < 2:
            assert time.monotonic() < deadline, "the child never showed up"
            time.sleep(0.01)
        names = {Path(f"/proc/{pid}/comm").read_text().strip() for pid in tree}
    finally:
        for pid in reversed(tree[1:]):  # the sleep this test started
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        parent.kill()
        parent.wait()
    assert tree[0] == parent.pid
    assert "sleep" in names


def test_same_fio_job_for_every_server(tmp_path: Path) -> None:
    cfg = harness.Config(output=None)
    for job in harness.JOBS:
        a = harness.fio_command(job, "nbd+unix:///?socket=/a", cfg, tmp_path / "r.json")
        b = harness.fio_command(job, "nbd+unix:///?socket=/b", cfg, tmp_path / "r.json")
        assert [x for x in a if not x.startswith("--uri=")] == \
            [x for x in b if not x.startswith("--uri=")]
        assert f"--iodepth={job.iodepth}" in a and "--ioengine=nbd" in a


def test_parse_fio_skips_leading_notes(tmp_path: Path) -> None:
    report = tmp_path / "r.json"
    body = {"jobs": [{"write": {"iops": 10.0, "bw_bytes": 40960.0,
                                "clat_ns": {"percentile": {"99.000000": 5000}}},
                      "read": {"iops": 0.0, "bw_bytes": 0.0}}]}
    report.write_text("note: something fio said\n" + json.dumps(body))
    job = harness.JOBS[0]
    assert harness.parse_fio(report, job) == (10.0, 40960.0, 5.0)


# -- the convergence harness with --frontend nbd ---------------------------------------------

needs_plugin = pytest.mark.skipif(
    servers.missing("blockmirror") is not None,
    reason=f"blockmirror serve cannot run here: {servers.missing('blockmirror')}")


@needs_tools
@needs_plugin
def test_convergence_frontend_nbd(tmp_path: Path) -> None:
    """A tiny matrix whose writers are fio through blockmirror serve: idle and
    a low rate both converge, verified, and the guest's rate and pause are
    read back from fio."""
    from bench.convergence import harness as conv

    rate = 4 * MiB
    cfg = conv.MatrixConfig(
        image_size=16 * MiB, allocated_fraction=0.5, rates=[0, rate], writers=2,
        target_downtime=0.1, copy_cap=32 * MiB, max_passes=6, warmup_s=0.3,
        output=tmp_path / "out", workdir=tmp_path / "work", plots=False, frontend="nbd")
    assert conv.frontend_missing(cfg) is None
    result = conv.run_matrix(cfg, log=lambda line: None)
    rows = {r["rate_requested"]: r for r in result.rows}
    assert set(rows) == {0, rate}
    for row in rows.values():
        assert row["frontend"] == "nbd", row
        assert row["outcome"] == "converged", row.get("notes")
        assert row["verified"] is True
    busy = rows[rate]
    # fio's rate limit held, and the timeline saw it during the copy.
    assert busy["writer_rate_overall"] == pytest.approx(rate, rel=0.3)
    assert 0 < busy["writer_rate"] < 2 * rate
    # The freeze held the guest's writes: its longest write covers the pause.
    # The freeze held fio's writes: one caught in it waited about the pause.
    # A pause of a few ms (the switch polishes low rates down to that) may
    # fall between two writes, so only a longer one must show.
    if busy["downtime_s"] > 0.05:
        assert busy["writer_max_write_s"] >= 0.5 * busy["downtime_s"]
    assert any("fio --ioengine=nbd" in n for n in result.notes)


def test_nbd_guest_runs_the_qemu_peers_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                               ) -> None:
    """--frontend nbd starts exactly the QEMU peer's guest command (URI aside),
    only with fio's bandwidth log added."""
    from bench.convergence import harness as conv
    from bench.convergence import nbd_frontend, qemu_peer

    started: list[list[str]] = []

    class FakeProc:
        stderr = None

        def __init__(self, argv: list[str], **kwargs: object) -> None:
            started.append(argv)

        def poll(self) -> int:
            return 0

    class FakeServer:
        uri = "nbd+unix:///?socket=/x"

    @contextlib.contextmanager
    def fake_serving(*args: object, **kwargs: object) -> Iterator[FakeServer]:
        yield FakeServer()

    monkeypatch.setattr(nbd_frontend.subprocess, "Popen", FakeProc)
    monkeypatch.setattr(nbd_frontend.servers, "serving", fake_serving)
    cfg = conv.MatrixConfig(pattern="hotspot", writers=3, frontend="nbd", output=tmp_path)
    guest = nbd_frontend.FioGuest.start(tmp_path / "i.img", 30 * MiB, cfg, 7, tmp_path)
    guest.stack.close()
    peer = qemu_peer.guest_fio_command(cfg, 30 * MiB, 7, "nbd+unix:///src?socket=/q",
                                       tmp_path / "fio.json")
    (argv,) = started
    assert [a for a in argv[: len(peer)] if not a.startswith("--uri=")] == \
        [a for a in peer if not a.startswith("--uri=")]
    assert "--random_distribution=zoned:90/10:10/90" in argv
    assert all(a.startswith(("--write_bw_log=", "--log_")) for a in argv[len(peer):])


def test_bw_log_timeline(tmp_path: Path) -> None:
    from bench.convergence.nbd_frontend import bw_log_timeline

    a, b = tmp_path / "x_bw.1.log", tmp_path / "x_bw.2.log"
    # msec (Unix time), KiB/s, direction (1 = write), block size, offset
    a.write_text("1000050, 1024, 1, 65536, 0\n1000100, 2048, 1, 65536, 0\n")
    b.write_text("1000050, 1024, 1, 65536, 0\n1000100, 0, 0, 65536, 0\n")
    timeline = bw_log_timeline([str(a), str(b)], epoch_minus_mono=1000.0, window_s=0.05)
    assert [t for t, _ in timeline] == pytest.approx([0.05, 0.05, 0.1])
    # 1 MiB/s for 50 ms twice, then 2 MiB/s for 50 ms; the read line is ignored.
    assert timeline[-1][1] == pytest.approx(0.05 * MiB * 2 + 0.05 * 2 * MiB)


@needs_tools
def test_pool_pairs_rounds_of_the_runs(tiny_run: harness.Result) -> None:
    from bench.nbd import pool

    files = harness.write_output(tiny_run)
    text = pool.table([files[0].parent, files[0].parent])  # the same run twice
    if "blockmirror" in tiny_run.skipped:
        assert text.count("\n") == 1  # the header alone
        return
    for job in harness.JOBS:
        ratios, _ = pool.paired([json.loads(files[0].read_text())], job.name, "blockmirror")
        assert len(ratios) == tiny_run.config.rounds
        assert f"| {job.name} | {2 * len(ratios)} |" in text
