"""Smoke test of the NBD front-end harness (bench/nbd, issue 9): a tiny run
(8 MiB images, 1 MiB per fio run, 2 rounds) of every job on every server this
machine has, checked for consistency. No timing verdict: the figures come
from ``blockmirror bench nbd``. Skips without fio (with its nbd engine) or
nbdkit; a server that cannot run here (qemu-nbd missing, the plugin not
built) is left out of the run and named in the report.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
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
