"""`blockmirror sync` to an ``nfs://`` URL and `blockmirror verify` against
one (issue 12, NFS slice): a real nfs-ganesha (VFS FSAL, NFSv3) in a second
network namespace exporting a folder, a tracked source with a live logged
writer.

The exported folder is read directly after each sync: the copy must be the
source at one instant (a prefix of the writer's log), sparse on the server's
filesystem, and no partial may be left beside it. A full export filesystem,
a killed server and bad URLs each end in one line and the right exit code,
with writers never left frozen. Where the kernel has no netem (these VMs)
the live-writer sync goes through a relay holding every byte 0.5 ms each way
(netnstools.delayed); the others reach the server directly, at 1 Gbit/s."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from ganeshatools import MOUNT_PORT, NFS_PORT, RPCBIND_PORT, Ganesha, ganesha
from imagetools import (
    MiB,
    allocated_bytes,
    make_data_image,
    nonzero_cells,
    run_cli,
    start_cli,
    tmpfs,
    wait_for,
)
from netnstools import delayed, two_hosts

from blockmirror import Tracker
from blockmirror.copying import endpoint
from blockmirror.copying.nfs import NfsCopier, NfsFile, libnfs_available

pytestmark = pytest.mark.skipif(not libnfs_available(),
                                reason="blockmirror._nfs not built (needs libnfs-dev)")

PARTIAL = ".bm-partial"


@pytest.fixture
def serve_nfs(ram_tmp_path: Path, tmp_path: Path) -> Iterator[Callable[..., Ganesha]]:
    """Factory: ``serve_nfs(tiny=None)`` -> a started Ganesha in a second
    host exporting a new folder; TINY (e.g. "8m") also mounts a tmpfs of
    that size at FOLDER/small first. Server, mount and namespace are always
    removed, in that order."""
    with contextlib.ExitStack() as stack:

        def _serve(tiny: str | None = None) -> Ganesha:
            link = stack.enter_context(two_hosts(delay_ms=0.5, rate="1gbit"))
            folder = ram_tmp_path / "export"
            folder.mkdir()
            if tiny:
                stack.enter_context(tmpfs(folder / "small", tiny))
            return stack.enter_context(ganesha(link, folder, tmp_path / "ganesha"))

        yield _serve


def sync_json(src: Path, url: str, *options: str) -> dict[str, object]:
    proc = run_cli("sync", src, url, "--json", *options)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["status"] == "ok", result
    return result


def one_line_error(proc: subprocess.CompletedProcess[str], code: int) -> str:
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("blockmirror: "), proc.stderr
    return lines[0]


def partials(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob(f"*{PARTIAL}"))


# -- the copy -------------------------------------------------------------------------


def test_sync_under_a_live_writer_is_the_source_at_one_instant_and_sparse(
        ram_tmp_path, serve_nfs, live_writer):
    """A live writer through the whole sync; an older copy full of junk sat
    at the target. After it the served file is the source at the freeze (a
    prefix of the log), renamed over the old one, and sparse on the server."""
    server = serve_nfs()
    image = ram_tmp_path / "live.img"
    size = 32 * MiB
    initial = make_data_image(image, size, extents=8, tracked=True)
    served = server.folder / "disk.img"
    served.write_bytes(b"\x5a" * size)
    with delayed(server.link, [RPCBIND_PORT, MOUNT_PORT, NFS_PORT]) as host:
        url = server.url("disk.img", host=host)
        writer = live_writer(image, rate="8M", wait=20)
        result = sync_json(image, url, "--target-downtime", "1s", "--bwlimit", "32M",
                           "--verify")
        writer.wait_for_more(10)  # not frozen after the switch
        assert writer.stop() == 0
    copy = served.read_bytes()
    k = writer.assert_point_in_time(copy, initial)
    assert 0 < k < len(writer.writes()), "the copy shows no write, or every one"
    assert result["destination"] == url and result["tracked"] and result["verified"]
    passes = result["passes"]
    assert isinstance(passes, list) and passes[0]["kind"] == "bulk"
    assert passes[-1]["kind"] == "final"
    assert passes[0]["bytes"] < size // 2  # the allocated extents only, not the whole image
    assert allocated_bytes(served) <= nonzero_cells(copy) + 2 * MiB
    assert allocated_bytes(served) < size // 2
    assert partials(server.folder) == []


def test_untracked_sync_then_verify_finds_a_difference(ram_tmp_path, serve_nfs):
    server = serve_nfs()
    image = ram_tmp_path / "still.img"
    content = make_data_image(image, 16 * MiB, extents=6)
    url = server.url("still.img")
    result = sync_json(image, url, "--verify")
    assert result["verified"] and not result["tracked"]
    served = server.folder / "still.img"
    assert served.read_bytes() == content
    assert allocated_bytes(served) <= 6 * MiB + 1 * MiB
    for a, b in ((image, url), (url, image)):
        done = run_cli("verify", a, b)
        assert done.returncode == 0 and "identical" in done.stdout, done.stderr
    with open(served, "r+b") as f:  # behind the server: one byte differs
        f.seek(5 * MiB + 7)
        f.write(b"\x01")
    for a, b in ((image, url), (url, image)):
        done = run_cli("verify", a, b, "--json")
        assert done.returncode == 5, done.stderr
        assert json.loads(done.stdout)["differing"] == [[5 * MiB, 65536]]


def test_many_writes_in_flight_on_each_connection(ram_tmp_path, serve_nfs):
    """Two connections, each driven by one C call with many WRITE3 calls
    outstanding (a copy one call at a time would show 1)."""
    server = serve_nfs()
    image = ram_tmp_path / "a.img"
    size = 64 * MiB
    content = make_data_image(image, size, extents=48)
    parsed = endpoint.parse(server.url("a.img"))
    assert isinstance(parsed, endpoint.NfsUrl)
    with NfsFile(parsed, connections=2) as nfs_file:
        assert nfs_file.connections == 2
        nfs_file.create_partial(size, 0o600)
        fd = os.open(image, os.O_RDONLY)
        try:
            with NfsCopier(fd, nfs_file, requests=16) as copier:
                stats = copier.copy_extents(copier.allocated_extents(), dst_fresh=True)
            nfs_file.publish()
        finally:
            os.close(fd)
    assert copier.most_in_flight >= 2, copier.most_in_flight
    assert stats.bytes_written == nonzero_cells(content)
    assert (server.folder / "a.img").read_bytes() == content


# -- failures mid-copy ------------------------------------------------------------------------


def test_export_filled_mid_copy_is_exit_4_and_the_partial_goes(ram_tmp_path, serve_nfs,
                                                               live_writer):
    """16 MiB of data into a 24 MiB tmpfs under the export (the pre-check
    passes), which another file fills mid-copy: the server says NOSPC; exit 4
    in one line, the partial gone from the server, the writer never paused,
    and the source exactly what the writer made it."""
    server = serve_nfs(tiny="24m")
    small = server.folder / "small"
    image = ram_tmp_path / "live.img"
    initial = make_data_image(image, 64 * MiB, extents=16, tracked=True)
    partial = small / f"disk.img{PARTIAL}"
    writer = live_writer(image, rate="4M", wait=10)
    proc = start_cli("sync", image, server.url("small/disk.img"), "--bwlimit", "8M")
    wait_for(lambda: partial.exists() and allocated_bytes(partial) > 2 * MiB, 30,
             "the bulk pass to write")
    with contextlib.suppress(OSError), open(small / "filler", "wb") as filler:
        while True:  # until this host's write of the tmpfs fails: it is full
            filler.write(b"\xff" * MiB)
            filler.flush()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 4, err
    assert len(err.strip().splitlines()) == 1, err
    assert "ran out of space" in err and "was removed" in err, err
    assert sorted(p.name for p in small.iterdir()) == ["filler"]
    writer.wait_for_more(10, timeout=5)
    with Tracker.open(image) as tracker:
        assert tracker.state == "running"
    assert writer.stop() == 0
    assert image.read_bytes() == writer.replayed(initial)


def test_too_little_room_on_the_server_is_exit_4_before_anything(ram_tmp_path, serve_nfs):
    """Step 0, as for a local copy: 24 MiB of data, 8 MiB free (FSSTAT)."""
    server = serve_nfs(tiny="8m")
    image = ram_tmp_path / "a.img"
    make_data_image(image, 64 * MiB, extents=24)
    line = one_line_error(run_cli("sync", image, server.url("small/disk.img")), 4)
    assert "need 24" in line and "free" in line, line
    assert list((server.folder / "small").iterdir()) == []


def test_server_killed_mid_copy_then_a_rerun_after_restart(ram_tmp_path, serve_nfs,
                                                           live_writer):
    """ganesha SIGKILLed in the bulk pass: exit 1 within seconds, saying the
    partial could not be removed; writers go on. Restarted, a rerun
    truncates the stale partial, and its copy is exact."""
    server = serve_nfs()
    image = ram_tmp_path / "live.img"
    initial = make_data_image(image, 64 * MiB, extents=32, tracked=True)
    url = server.url("disk.img")
    partial = server.folder / f"disk.img{PARTIAL}"
    writer = live_writer(image, rate="4M", wait=10)
    proc = start_cli("sync", image, url, "--bwlimit", "8M")
    wait_for(lambda: partial.exists() and allocated_bytes(partial) > 4 * MiB, 30,
             "the bulk pass to write")
    server.kill_server()
    started = time.monotonic()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, err
    assert time.monotonic() - started < 15, "the failure took too long"
    assert len(err.strip().splitlines()) == 1 and "could not be removed" in err, err
    writer.wait_for_more(10, timeout=5)
    server.restart()
    sync_json(image, url, "--target-downtime", "1s")
    assert writer.stop() == 0
    writer.assert_point_in_time((server.folder / "disk.img").read_bytes(), initial)
    assert partials(server.folder) == []


def test_server_killed_in_the_final_pass(ram_tmp_path, serve_nfs, live_writer):
    """The server dies while writers are frozen for the final pass: exit 1,
    and the writer goes on at once (long before the 40 s lease)."""
    server = serve_nfs()
    image = ram_tmp_path / "live.img"
    make_data_image(image, 64 * MiB, extents=4, tracked=True)
    writer = live_writer(image, rate="8M", wait=20, extra=["--region", "8M"])
    # The writer dirties up to 8 MiB; the final pass copies it at 4 MB/s.
    proc = start_cli("sync", image, server.url("disk.img"), "--bwlimit", "4M",
                     "--target-downtime", "10s", "--max-passes", "2")
    kill_server_in_final_pass(server, image, proc, writer)


def kill_server_in_final_pass(server, image, proc, writer) -> str:
    """Kill SERVER once PROC's sync of IMAGE has writers frozen for its
    final pass: WRITER goes on within 10 s, the sync exits 1 with one line
    (returned) and leaves the tracker running."""
    with Tracker.open(image) as tracker:
        wait_for(lambda: tracker.state == "frozen" or proc.poll() is not None, 60,
                 "the final pass", every=0.01)
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.3)
        server.kill_server()
        killed = time.monotonic()
        writer.wait_for_more(10, timeout=10)
        assert time.monotonic() - killed < 10
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 1, err
        assert len(err.strip().splitlines()) == 1, err
        assert tracker.state == "running"
    return err


@pytest.mark.slow
def test_link_cut_mid_copy_fails_in_bounded_time(ram_tmp_path, serve_nfs, live_writer):
    """`ip link set ... down` in the bulk pass: no reply ever comes; after
    BLOCKMIRROR_NFS_TIMEOUT the sync fails (exit 1), the partial is reported
    left behind, writers keep going; a new mount over the dead link fails
    within the timeout too (exit 2)."""
    server = serve_nfs()
    image = ram_tmp_path / "live.img"
    make_data_image(image, 64 * MiB, extents=32, tracked=True)
    url = server.url("disk.img")
    partial = server.folder / f"disk.img{PARTIAL}"
    writer = live_writer(image, rate="4M", wait=10)
    env = {**os.environ, "BLOCKMIRROR_NFS_TIMEOUT": "3"}
    proc = subprocess.Popen([sys.executable, "-m", "blockmirror", "sync", str(image), url,
                             "--bwlimit", "8M"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    wait_for(lambda: partial.exists() and allocated_bytes(partial) > 4 * MiB, 30,
             "the bulk pass to write")
    subprocess.run(["ip", "link", "set", server.link.local_dev, "down"], check=True)
    started = time.monotonic()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, err
    assert time.monotonic() - started < 15, "the failure took too long"
    assert len(err.strip().splitlines()) == 1 and "could not be removed" in err, err
    writer.wait_for_more(10, timeout=5)
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "blockmirror", "verify", str(image), url],
                          env=env, capture_output=True, text=True, timeout=60)
    assert "cannot use NFS export" in one_line_error(done, 2)
    assert time.monotonic() - started < 15


# -- refusals: one line, exit 2 -----------------------------------------------------------------


def test_bad_exports_and_ports_are_one_line_exit_2(ram_tmp_path, serve_nfs):
    server = serve_nfs()
    image = ram_tmp_path / "a.img"
    make_data_image(image, 4 * MiB, extents=2)
    bad = [
        server.url("disk.img").replace("/export/", "/no-such-export/"),
        server.url("disk.img", "nfsport=1&mountport=1"),  # nobody listens there
    ]
    for url in bad:
        for argv in (("sync", image, url), ("verify", image, url)):
            assert "cannot use NFS export" in one_line_error(run_cli(*argv), 2)
    assert "cannot read" in one_line_error(run_cli("verify", image, server.url("none.img")), 2)
    assert sorted(p.name for p in server.folder.iterdir()) == []


@pytest.mark.parametrize("url", [
    "nfs://",                                  # no server
    "nfs://10.213.0.9/",                       # no file
    "nfs://10.213.0.9:2049/export/a.img",      # port in the host part
    "nfs://10.213.0.9/export/a.img?version=4",  # libnfs 4.0's v4 writes are broken
    "nfs://10.213.0.9/export/a.img?bogus=1",
    "nfs://10.213.0.9/export/a.img#x",
])
def test_garbage_urls_are_one_line_exit_2(url, ram_tmp_path):
    image = ram_tmp_path / "a.img"
    make_data_image(image, 4 * MiB, extents=2)
    for argv in (("sync", image, url), ("verify", image, url), ("verify", url, image)):
        one_line_error(run_cli(*argv), 2)


def test_user_info_is_refused_and_never_shown(ram_tmp_path):
    image = ram_tmp_path / "a.img"
    make_data_image(image, 4 * MiB, extents=2)
    line = one_line_error(run_cli("sync", image, "nfs://alice:s3cret@10.213.0.9/e/a.img"), 2)
    assert "s3cret" not in line and "alice" not in line and "nfs://10.213.0.9/e/a.img" in line


@pytest.mark.parametrize("options, said", [
    (("--converge", "mirror"), "--converge mirror needs a local copy"),
])
def test_refused_modes(options, said, ram_tmp_path):
    image = ram_tmp_path / "a.img"
    make_data_image(image, 4 * MiB, extents=2, tracked=True)
    assert said in one_line_error(run_cli("sync", image, "nfs://10.213.0.9/e/a.img",
                                          *options), 2)


def test_an_nfs_source_or_a_folder_is_refused(ram_tmp_path):
    image = ram_tmp_path / "a.img"
    make_data_image(image, 4 * MiB, extents=2)
    assert "--quiesced" in one_line_error(  # an NFS source: its writers cannot be tracked
        run_cli("sync", "nfs://10.213.0.9/e/a.img", image), 2)
    assert "directory mode" in one_line_error(
        run_cli("sync", ram_tmp_path, "nfs://10.213.0.9/e/a.img"), 2)


def test_without_libnfs_an_nfs_url_names_the_package(ram_tmp_path):
    """A build without libnfs-dev has no blockmirror._nfs: the rest works
    and an nfs:// URL gets one line naming the package."""
    image = ram_tmp_path / "a.img"
    make_data_image(image, 4 * MiB, extents=2)
    code = ("import sys; sys.modules['blockmirror._nfs'] = None\n"
            "from blockmirror.cli import main\nsys.exit(main(sys.argv[1:]))\n")
    for argv in (("sync", image, "nfs://10.213.0.9/e/a.img"),
                 ("verify", image, "nfs://10.213.0.9/e/a.img")):
        proc = subprocess.run([sys.executable, "-c", code, *map(str, argv)],
                              capture_output=True, text=True, timeout=60)
        assert "libnfs-dev" in one_line_error(proc, 2)
    local = subprocess.run([sys.executable, "-c", code, "verify", str(image), str(image)],
                           capture_output=True, text=True, timeout=60)
    assert local.returncode == 0, local.stderr
