"""The command line: bad input gives one line on stderr, the documented exit
code, and creates nothing."""

from __future__ import annotations

import json
import os

import pytest
from imagetools import MiB, make_data_image, run_cli, write_at, writer_dies

from blockmirror import Tracker


def listing(*folders):
    return {str(f): sorted(os.listdir(f)) for f in folders}


@pytest.fixture
def src_img(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "dst").mkdir()
    path = tmp_path / "src" / "a.img"
    make_data_image(path, 8 * MiB, extents=2)
    return path


def assert_one_line_error(proc, code, pattern):
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("blockmirror: ") or lines[0].startswith("usage:") or \
        "error:" in lines[0]
    assert pattern in lines[0], lines[0]
    assert proc.stdout == ""


def test_sync_ok_json(src_img, tmp_path):
    proc = run_cli("sync", src_img, tmp_path / "dst", "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["status"] == "ok" and out["destination"] == str(tmp_path / "dst" / "a.img")
    assert (tmp_path / "dst" / "a.img").read_bytes() == src_img.read_bytes()
    assert proc.stderr == ""  # no progress display when not on a terminal


def test_sync_quiet_prints_nothing(src_img, tmp_path):
    proc = run_cli("sync", src_img, tmp_path / "dst", "--quiet")
    assert proc.returncode == 0 and proc.stdout == "" and proc.stderr == ""


def test_missing_source(tmp_path):
    before = listing(tmp_path)
    proc = run_cli("sync", tmp_path / "nope.img", tmp_path / "out.img")
    assert_one_line_error(proc, 2, "does not exist")
    assert listing(tmp_path) == before


def test_source_is_a_folder_in_file_mode(tmp_path, src_img):
    target = tmp_path / "dst" / "x.img"
    target.write_bytes(b"old")
    proc = run_cli("sync", tmp_path / "src", target)
    assert_one_line_error(proc, 2, "is a folder")
    assert target.read_bytes() == b"old"


def test_destination_is_the_source(src_img):
    before = listing(src_img.parent)
    proc = run_cli("sync", src_img, src_img)
    assert_one_line_error(proc, 2, "is the source")
    proc = run_cli("sync", src_img, src_img.parent)  # folder: same name in the same place
    assert_one_line_error(proc, 2, "is the source")
    assert listing(src_img.parent) == before


def test_destination_is_the_source_through_a_symlink(src_img, tmp_path):
    link = tmp_path / "dst" / "link.img"
    link.symlink_to(src_img)
    proc = run_cli("sync", src_img, link, "--force")
    assert_one_line_error(proc, 2, "is the source")
    assert os.path.islink(link) and sorted(os.listdir(tmp_path / "dst")) == ["link.img"]


def test_destination_folder_missing(src_img, tmp_path):
    proc = run_cli("sync", src_img, tmp_path / "missing" / "a.img")
    assert_one_line_error(proc, 2, "does not exist")
    assert not (tmp_path / "missing").exists()


def test_destination_exists_needs_force(src_img, tmp_path):
    target = tmp_path / "dst" / "a.img"
    target.write_bytes(b"keep me")
    proc = run_cli("sync", src_img, target)
    assert_one_line_error(proc, 2, "--force")
    assert target.read_bytes() == b"keep me"
    proc = run_cli("sync", src_img, target, "--force", "--quiet")
    assert proc.returncode == 0
    assert target.read_bytes() == src_img.read_bytes()


def test_zero_length_image(tmp_path):
    (tmp_path / "empty.img").write_bytes(b"")
    proc = run_cli("sync", tmp_path / "empty.img", tmp_path / "out.img")
    assert_one_line_error(proc, 2, "empty")
    assert not (tmp_path / "out.img").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every file")
def test_unreadable_source(src_img, tmp_path):
    os.chmod(src_img, 0)
    proc = run_cli("sync", src_img, tmp_path / "dst")
    assert_one_line_error(proc, 2, "permission denied")
    assert os.listdir(tmp_path / "dst") == []


def test_unreadable_source_as_root_without_dac_override(src_img, tmp_path):
    """Root reads everything, so drop the capabilities that let it (the
    process stays uid 0 and can still import the installed package)."""
    if os.geteuid() != 0:
        pytest.skip("covered by test_unreadable_source when not root")
    os.chmod(src_img, 0)
    proc = run_cli("sync", src_img, tmp_path / "dst", timeout=60,
               wrapper=("setpriv", "--bounding-set=-dac_override,-dac_read_search"))
    assert_one_line_error(proc, 2, "permission denied")
    assert os.listdir(tmp_path / "dst") == []


@pytest.mark.parametrize("garbage", ["fast", "-1s", "0", "5 parsecs", ""])
def test_garbage_target_downtime(src_img, tmp_path, garbage):
    proc = run_cli("sync", src_img, tmp_path / "dst", "--target-downtime", garbage)
    assert proc.returncode == 2
    assert "target-downtime" in proc.stderr
    assert os.listdir(tmp_path / "dst") == []


def test_not_enough_space_at_precheck(src_img, tmp_path, monkeypatch):
    """The pre-check compares free space with the source's allocated bytes
    (here: faked free space through a tiny statvfs, in-process)."""
    from blockmirror import OutOfSpaceError
    from blockmirror.migration import precheck

    monkeypatch.setattr(precheck, "free_bytes", lambda folder: 1 * MiB)
    with pytest.raises(OutOfSpaceError, match=r"need 2\.0 MiB at .*, 1\.0 MiB free"):
        precheck.plan_file_sync(str(src_img), str(tmp_path / "dst"))
    assert os.listdir(tmp_path / "dst") == []


def test_track_enable_status_disable(src_img):
    proc = run_cli("track", "enable", src_img)
    assert proc.returncode == 0 and os.path.exists(str(src_img) + ".cbt")
    proc = run_cli("track", "enable", src_img)
    assert proc.returncode == 2 and "exists" in proc.stderr
    proc = run_cli("track", "status", src_img, "--json")
    info = json.loads(proc.stdout)
    assert info["consistent"] is True and info["granularity"] == 65536
    proc = run_cli("track", "status", src_img)
    assert "consistent   yes" in proc.stdout
    proc = run_cli("track", "disable", src_img)
    assert proc.returncode == 0 and not os.path.exists(str(src_img) + ".cbt")
    proc = run_cli("track", "status", src_img)
    assert proc.returncode == 2


def test_track_status_of_corrupt_sidecar(src_img):
    Tracker.create(src_img).close()
    write_at(str(src_img) + ".cbt", 20, b"\xff\xff")
    proc = run_cli("track", "status", src_img)
    assert_one_line_error(proc, 2, "corrupt")


def test_verify_command(src_img, tmp_path):
    copy = tmp_path / "dst" / "copy.img"
    copy.write_bytes(src_img.read_bytes())
    assert run_cli("verify", src_img, copy).returncode == 0
    write_at(copy, 3 * MiB + 5, b"!")
    proc = run_cli("verify", src_img, copy, "--json")
    assert proc.returncode == 5
    assert json.loads(proc.stdout)["differing"] == [[3 * MiB, 65536]]


def test_help_documents_exit_codes():
    proc = run_cli("sync", "--help")
    assert proc.returncode == 0
    for code in ("0 ", "1 ", "2 ", "3 ", "4 ", "130", "143"):
        assert code in proc.stdout


def test_track_reset_accepts_an_unclean_sidecar(src_img):
    assert run_cli("track", "enable", src_img).returncode == 0
    writer_dies(src_img, [(0, 1)])
    assert "all invalid" in run_cli("track", "status", src_img).stdout
    proc = run_cli("track", "reset", src_img)
    assert proc.returncode == 0 and "was unclean" in proc.stdout
    info = json.loads(run_cli("track", "status", src_img, "--json").stdout)
    assert info["consistent"] is True
    assert info["dirty_bytes"] == os.path.getsize(src_img)


def test_demo_runs(tmp_path):
    """The README's main-job command, smaller: a live writer, a sync with
    verify, one JSON result."""
    proc = run_cli("demo", "--size", "64M", "--rate", "8M", "--dir", tmp_path, "--json")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["status"] == "ok" and out["verified"] is True
    assert out["downtime"] < 2.0 and out["writer_rate"] > 0  # 2 s: the freeze lease


def test_a_commands_parser_is_the_full_parsers_part():
    """build_parser(COMMAND) adds only that command's group, and parses its
    command line as the whole parser does; every command is in a group."""
    import argparse
    import importlib

    cli = importlib.import_module("blockmirror.cli.main")  # blockmirror.cli.main is main()
    full = cli.build_parser()
    commands = next(a for a in full._actions if isinstance(a, argparse._SubParsersAction))
    grouped = {c for names in cli._GROUP_COMMANDS.values() for c in names}
    assert grouped == set(commands.choices)
    line = ["sync", "--quiet", "--workers", "3", "--target-downtime", "200ms", "a", "b"]
    one = cli.build_parser("sync")
    assert vars(one.parse_args(line)) == vars(full.parse_args(line))
    sub = next(a for a in one._actions if isinstance(a, argparse._SubParsersAction))
    assert set(sub.choices) == {"sync"}
    verify = ["verify", "--json", "x", "y"]
    assert vars(cli.build_parser("verify").parse_args(verify)) == vars(full.parse_args(verify))


def test_sync_help_still_complete():
    out = run_cli("sync", "--help")
    assert out.returncode == 0
    assert "--target-downtime" in out.stdout and "exit codes" in out.stdout
