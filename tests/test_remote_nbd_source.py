"""An NBD export as the source of `blockmirror sync` and of `verify` (issue
12): qemu-nbd and `nbdkit file` on private unix sockets serving an image
made here, copied into a local file.

The copy must be the served file byte for byte, sparse (holes where the
export reads as zeros, and block status keeping those ranges from being
read at all), committed by rename only when whole: a bad URI or a refused
writable export creates nothing, a server killed mid-copy leaves nothing at
the destination (no partial either), exit codes as for a local sync."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from imagetools import (
    MiB,
    allocated_bytes,
    make_data_image,
    nonzero_cells,
    partial_exists,
    run_cli,
    start_cli,
    tmpfs,
    wait_for,
)
from netnstools import two_hosts
from test_remote_nbd import Server, one_line_error

from blockmirror.copying import endpoint
from blockmirror.copying.remote import ExportReader, NbdExport, libnbd_available

pytestmark = pytest.mark.skipif(not libnbd_available(),
                                reason="blockmirror._remote not built (needs libnbd-dev)")

SERVERS = ("qemu-nbd", "nbdkit")
Serve = Callable[..., Server]


def make_image(path: Path, size: int = 32 * MiB) -> bytes:
    """Random 1 MiB extents and an allocated run of zeros (a sixteenth of
    SIZE, a quarter in): block status calls the holes zero, only reading
    finds the written zeros."""
    content = bytearray(make_data_image(path, size, extents=8))
    start, length = size // 4, size // 16
    with open(path, "r+b") as f:
        f.seek(start)
        f.write(bytes(length))
    content[start:start + length] = bytes(length)
    assert len(content) == size == os.path.getsize(path)
    return bytes(content)


@pytest.fixture
def serve_image(ram_tmp_path: Path) -> Iterator[Serve]:
    """Factory: ``serve_image(kind, file, readonly=True, filters=())`` -> a
    Server of FILE on a private socket; all stopped at the end."""
    servers: list[Server] = []

    def _serve(kind: str, file: Path, *, readonly: bool = True, **options: object) -> Server:
        sock = ram_tmp_path / f"source{len(servers)}.sock"
        servers.append(Server(kind, file, sock, readonly=readonly, **options))  # type: ignore[arg-type]
        return servers[-1]

    yield _serve
    for server in servers:
        server.stop()


def sync_json(uri: str, dst: Path, *options: str) -> dict[str, object]:
    proc = run_cli("sync", uri, dst, "--json", *options)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["status"] == "ok", result
    return result


# -- the copy -------------------------------------------------------------------------


@pytest.mark.parametrize("kind", SERVERS)
def test_copy_of_a_read_only_export_is_exact_and_sparse(kind, ram_tmp_path, serve_image):
    image = ram_tmp_path / "served.img"
    content = make_image(image)
    server = serve_image(kind, image)
    dst = ram_tmp_path / "copy.img"
    result = sync_json(server.uri, dst, "--verify")
    assert dst.read_bytes() == content
    # Sparse: the holes and the written zeros stay holes in the copy.
    assert allocated_bytes(dst) <= nonzero_cells(content) + 256 * 1024
    assert result["bytes_written"] == nonzero_cells(content)
    assert result["source"] == server.uri and result["verified"] and not result["tracked"]
    notes = " ".join(result["notes"])  # type: ignore[arg-type]
    assert "exact only if nothing wrote the export" in notes and "read-only" in notes
    assert not partial_exists(ram_tmp_path)
    for a, b in ((server.uri, dst), (dst, server.uri)):
        done = run_cli("verify", a, b)
        assert done.returncode == 0 and "identical" in done.stdout, done.stderr
    with open(dst, "r+b") as f:  # verify with an export as source sees one byte
        f.seek(3 * MiB + 1)
        f.write(b"\x01" if content[3 * MiB + 1] != 1 else b"\x02")
    done = run_cli("verify", server.uri, dst, "--json")
    assert done.returncode == 5 and json.loads(done.stdout)["differing"] == [[3 * MiB, 65536]]


def _read_bytes_logged(log: Path) -> int:
    """What nbdkit's log filter says the client read, in bytes."""
    text = log.read_text()
    return sum(int(n, 16) for n in re.findall(r"\bRead id=\d+ offset=0x[0-9a-f]+ count=0x"
                                              r"([0-9a-f]+)", text))


def test_block_status_keeps_zero_ranges_from_being_read(ram_tmp_path, serve_image):
    """Only what block status calls data is read: the holes never cross the
    wire (nbdkit's log filter counts the reads)."""
    image = ram_tmp_path / "served.img"
    size = 64 * MiB
    content = make_image(image, size)
    log = ram_tmp_path / "reads.log"
    server = serve_image("nbdkit", image, filters=("log", f"logfile={log}"))
    sync_json(server.uri, ram_tmp_path / "copy.img")
    assert (ram_tmp_path / "copy.img").read_bytes() == content
    read = _read_bytes_logged(log)
    assert 0 < read <= allocated_bytes(image) + MiB, (read, allocated_bytes(image))
    assert read < size // 4


def test_without_block_status_everything_is_read_and_the_copy_stays_sparse(ram_tmp_path,
                                                                           serve_image):
    image = ram_tmp_path / "served.img"
    size = 16 * MiB
    content = make_image(image, size)
    log = ram_tmp_path / "reads.log"
    server = serve_image("nbdkit", image, filters=("noextents", "log", f"logfile={log}"))
    dst = ram_tmp_path / "copy.img"
    sync_json(server.uri, dst)
    assert dst.read_bytes() == content
    assert _read_bytes_logged(log) == size
    assert allocated_bytes(dst) <= nonzero_cells(content) + 256 * 1024


def test_data_extents_and_reads_in_flight_on_every_connection(ram_tmp_path, serve_image):
    """The map merges block status into the data extents; the reader uses
    all four multi-conn connections with many reads in flight on each
    (nbdkit holds each read 1 ms, so one at a time would show 1)."""
    image = ram_tmp_path / "served.img"
    size = 64 * MiB
    content = make_data_image(image, size, extents=16, extent_size=2 * MiB)
    server = serve_image("nbdkit", image, filters=("delay", "delay-read=1ms"))
    parsed = endpoint.parse(server.uri)
    assert isinstance(parsed, endpoint.NbdUri)
    dst = ram_tmp_path / "copy.img"
    with NbdExport(parsed, connections=4) as export:
        extents = export.data_extents()
        assert export.connections == 4 and not export.writable
        expected = [(o, 2 * MiB) for o in range(0, size, 2 * MiB) if any(content[o:o + 2 * MiB])]
        merged: list[tuple[int, int]] = []
        for o, n in expected:  # touching extents come back as one
            if merged and sum(merged[-1]) == o:
                merged[-1] = (merged[-1][0], merged[-1][1] + n)
            else:
                merged.append((o, n))
        assert [(int(o), int(n)) for o, n in extents] == merged
        fd = os.open(dst, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            os.ftruncate(fd, size)
            with ExportReader(export, fd, requests=16) as reader:
                stats = reader.copy_extents(extents, dst_fresh=True)
        finally:
            os.close(fd)
    assert reader.most_in_flight >= 8, reader.most_in_flight
    assert stats.bytes_read == sum(n for _, n in merged)
    assert dst.read_bytes() == content


# -- refusals: one line, exit 2, nothing created ---------------------------------------------


def test_a_writable_export_needs_quiesced(ram_tmp_path, serve_image):
    image = ram_tmp_path / "served.img"
    content = make_image(image, 8 * MiB)
    server = serve_image("qemu-nbd", image, readonly=False)
    dst = ram_tmp_path / "copy.img"
    line = one_line_error(run_cli("sync", server.uri, dst), 2)
    assert "--quiesced" in line and "writable" in line
    assert not dst.exists() and not partial_exists(ram_tmp_path)
    result = sync_json(server.uri, dst, "--quiesced")
    assert dst.read_bytes() == content
    assert any("--quiesced" in n for n in result["notes"])  # type: ignore[union-attr]


@pytest.mark.parametrize("uri", [
    "nbd://",                                   # no host
    "nbd://127.0.0.1:99999/",                   # no such port number
    "nbd+unix:///?socket=/nonexistent/nbd.sock",
    "nbds://127.0.0.1/",                        # TLS: not yet
    "garbage://x/",
])
def test_bad_source_uris_are_one_line_exit_2(uri, ram_tmp_path):
    dst = ram_tmp_path / "copy.img"
    one_line_error(run_cli("sync", uri, dst), 2)
    assert os.listdir(ram_tmp_path) == []


def test_a_port_nobody_listens_on_is_exit_2_and_user_info_never_shown(ram_tmp_path):
    with socket.socket() as s:  # a free port: bound, never listened on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        line = one_line_error(run_cli("sync", f"nbd://bob:pw@127.0.0.1:{port}/",
                                      ram_tmp_path / "copy.img"), 2)
    assert "pw" not in line and "bob" not in line and f"127.0.0.1:{port}" in line
    assert os.listdir(ram_tmp_path) == []


@pytest.mark.parametrize("options, said", [
    (("--move",), "--move from an NBD export"),
    (("--converge", "throttle"), "need a tracked local source"),
    (("--requests", "0"), "--requests"),
])
def test_refused_options(options, said, ram_tmp_path, serve_image):
    image = ram_tmp_path / "served.img"
    make_image(image, 4 * MiB)
    server = serve_image("nbdkit", image)
    dst = ram_tmp_path / "copy.img"
    done = run_cli("sync", server.uri, dst, *options)
    assert done.returncode == 2 and said in done.stderr, done.stderr
    assert not dst.exists() and not partial_exists(ram_tmp_path)


def test_refused_destinations(ram_tmp_path, serve_image):
    image = ram_tmp_path / "served.img"
    content = make_image(image, 4 * MiB)
    server = serve_image("nbdkit", image)
    assert "folder" in one_line_error(run_cli("sync", server.uri, ram_tmp_path), 2)
    assert "nbdcopy" in one_line_error(run_cli("sync", server.uri, server.uri), 2)
    existing = ram_tmp_path / "old.img"
    existing.write_bytes(b"old")
    assert "--force" in one_line_error(run_cli("sync", server.uri, existing), 2)
    assert existing.read_bytes() == b"old"
    sync_json(server.uri, existing, "--force")
    assert existing.read_bytes() == content


def test_nbd_only_options_on_a_local_sync_are_refused(ram_tmp_path):
    image = ram_tmp_path / "a.img"
    make_data_image(image, 4 * MiB, extents=2)
    for option in (("--requests", "8"), ("--quiesced",)):
        line = one_line_error(run_cli("sync", image, ram_tmp_path / "b.img", *option), 2)
        assert option[0] in line
    assert not (ram_tmp_path / "b.img").exists()


def test_no_room_for_the_data_is_exit_4_and_nothing_created(ram_tmp_path, serve_image):
    image = ram_tmp_path / "served.img"
    make_data_image(image, 32 * MiB, extents=16)
    server = serve_image("nbdkit", image)
    with tmpfs(ram_tmp_path / "small", "4m") as small:
        done = run_cli("sync", server.uri, small / "copy.img")
        assert "free" in one_line_error(done, 4)
        assert os.listdir(small) == []


# -- failures mid-copy ----------------------------------------------------------------------


@pytest.mark.parametrize("kind", SERVERS)
def test_server_killed_mid_copy_is_exit_1_and_leaves_nothing(kind, ram_tmp_path,
                                                             serve_image):
    image = ram_tmp_path / "served.img"
    make_data_image(image, 64 * MiB, extents=48)
    server = serve_image(kind, image)
    dst = ram_tmp_path / "copy.img"
    proc = start_cli("sync", server.uri, dst, "--bwlimit", "8M")
    wait_for(lambda: partial_exists(ram_tmp_path) and any(
        allocated_bytes(ram_tmp_path / n) > 4 * MiB for n in os.listdir(ram_tmp_path)
        if n.endswith(".bm-partial")), 30, "the copy to write")
    server.proc.kill()
    started = time.monotonic()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, err
    assert time.monotonic() - started < 10
    assert len(err.strip().splitlines()) == 1, err
    assert not dst.exists() and not partial_exists(ram_tmp_path)


@pytest.mark.parametrize("where", ["data", "hole"])
def test_verify_catches_a_write_behind_the_copy(where, ram_tmp_path, serve_image):
    """--quiesced was not true: a write lands on the export in a data range
    already copied, or in a hole the first map skipped. --verify maps and
    re-reads the export before the rename: it fails as a local sync's verify
    does (exit 1), nothing left at the destination."""
    image = ram_tmp_path / "served.img"
    content = make_data_image(image, 64 * MiB, extents=48)
    holes = [o for o in range(0, 64 * MiB, MiB) if not any(content[o:o + MiB])]
    offset = holes[0] if where == "hole" else next(
        o for o in range(0, 64 * MiB, MiB) if any(content[o:o + MiB]))
    server = serve_image("nbdkit", image, readonly=False)
    dst = ram_tmp_path / "copy.img"
    proc = start_cli("sync", server.uri, dst, "--quiesced", "--verify", "--workers", "1",
                     "--bwlimit", "16M")
    wait_for(lambda: partial_exists(ram_tmp_path) and any(
        allocated_bytes(ram_tmp_path / n) > 8 * MiB for n in os.listdir(ram_tmp_path)
        if n.endswith(".bm-partial")), 30, "the copy to pass the first extents")
    with open(image, "r+b") as f:  # behind the copy: the first extents were read
        f.seek(offset)
        f.write(b"\xff" * 4096)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, err
    assert "written during the copy" in err
    assert not dst.exists() and not partial_exists(ram_tmp_path)


@pytest.mark.slow
def test_link_cut_mid_copy_fails_in_bounded_time_and_leaves_nothing(ram_tmp_path):
    """The export on another host; `ip link set ... down` mid-copy: no reply
    comes, after BLOCKMIRROR_NBD_TIMEOUT the copy fails (exit 1), no partial."""
    image = ram_tmp_path / "served.img"
    make_data_image(image, 64 * MiB, extents=48)
    with two_hosts(delay_ms=0.5) as link:
        server = Server("nbdkit", image, None, tcp=(link.remote_ip, 10809), netns=link.netns,
                        readonly=True)
        try:
            env = {**os.environ, "BLOCKMIRROR_NBD_TIMEOUT": "3"}
            dst = ram_tmp_path / "copy.img"
            proc = subprocess.Popen([sys.executable, "-m", "blockmirror", "sync", server.uri,
                                     str(dst), "--bwlimit", "8M"], env=env,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            wait_for(lambda: partial_exists(ram_tmp_path), 30, "the copy to start")
            time.sleep(0.5)
            subprocess.run(["ip", "link", "set", link.local_dev, "down"], check=True)
            started = time.monotonic()
            _, err = proc.communicate(timeout=60)
            assert proc.returncode == 1, err
            assert time.monotonic() - started < 15, "the failure took too long"
            assert not dst.exists() and not partial_exists(ram_tmp_path)
        finally:
            server.stop()


def test_sigint_mid_copy_leaves_nothing(ram_tmp_path, serve_image):
    image = ram_tmp_path / "served.img"
    make_data_image(image, 64 * MiB, extents=48)
    server = serve_image("nbdkit", image)
    dst = ram_tmp_path / "copy.img"
    proc = start_cli("sync", server.uri, dst, "--bwlimit", "8M")
    wait_for(lambda: partial_exists(ram_tmp_path), 30, "the copy to start")
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert not dst.exists() and not partial_exists(ram_tmp_path)


# -- --requests, either direction ------------------------------------------------------------


def test_requests_sets_the_depth_in_both_directions(ram_tmp_path, serve_image):
    """--requests reaches the C calls: with one request per connection and
    nbdkit holding each 5 ms, 16 MiB of data over one connection take at
    least 64 round trips; with 64 (nbdkit serves 16 at once) about 4. Out of
    range is refused."""
    image = ram_tmp_path / "served.img"
    content = make_data_image(image, 16 * MiB, extents=16)
    server = serve_image("nbdkit", image, readonly=False,
                         filters=("delay", "delay-read=5ms", "delay-write=5ms"))
    seconds, back_seconds = {}, {}
    for requests in ("1", "64"):
        dst = ram_tmp_path / f"copy{requests}.img"
        result = sync_json(server.uri, dst, "--quiesced", "--workers", "1",
                           "--requests", requests)
        assert dst.read_bytes() == content
        seconds[requests] = result["passes"][0]["seconds"]  # type: ignore[index]
        back = sync_json(dst, server.uri, "--workers", "1", "--requests", requests)
        back_seconds[requests] = back["passes"][0]["seconds"]  # type: ignore[index]
    for took in (seconds, back_seconds):
        assert took["1"] >= 64 * 0.005, took
        assert took["64"] < took["1"] / 2, took
    done = run_cli("sync", server.uri, ram_tmp_path / "x.img", "--quiesced", "--requests", "300")
    assert done.returncode == 2 and not (ram_tmp_path / "x.img").exists()
