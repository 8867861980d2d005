"""`blockmirror sync` into an NBD export and `blockmirror verify` against one
(issue 12, first slice): qemu-nbd and `nbdkit file` on private unix sockets
serving a plain file, a tracked source with a live logged writer.

The export's served file is read directly after the sync: it must be the
source at one instant (a prefix of the writer's log), its zero runs punched
rather than written, and the junk it held before overwritten. Bad URIs, a
refused mode and a server killed mid-copy each end in one line and the
right exit code, with writers never left frozen."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from imagetools import (
    MiB,
    allocated_bytes,
    make_data_image,
    nonzero_cells,
    run_cli,
    start_cli,
    wait_for,
)
from nbdtools import require, uri_of
from netnstools import delayed, two_hosts

from blockmirror import Tracker
from blockmirror.copying import endpoint
from blockmirror.copying.remote import NbdExport, RemoteCopier, libnbd_available

pytestmark = pytest.mark.skipif(not libnbd_available(),
                                reason="blockmirror._remote not built (needs libnbd-dev)")

SERVERS = ("qemu-nbd", "nbdkit")


class Server:
    """One NBD server process serving FILE (raw) on a unix socket, or on
    TCP at ADDRESS:PORT, optionally inside network namespace NETNS."""

    def __init__(self, kind: str, file: Path, sock: Path | None, *,
                 tcp: tuple[str, int] | None = None, netns: str | None = None,
                 filters: tuple[str, ...] = (), readonly: bool = False,
                 discard: bool = True, shared: int = 1) -> None:
        require(kind)
        self.kind, self.file, self.socket, self.tcp = kind, file, sock, tcp
        if kind == "qemu-nbd":
            where = ["-k", str(sock)] if sock else ["-b", tcp[0], "-p", str(tcp[1])]  # type: ignore[index]
            # -t: stay up across clients (sync, then verify); --discard=unmap:
            # WRITE_ZEROES may punch holes (qemu's default only zeroes).
            argv = ["qemu-nbd", "-t", "-f", "raw", *(["--discard=unmap"] if discard else []),
                    *(["-e", str(shared)] if shared > 1 else []),
                    *where,
                    *(["-r"] if readonly else []), str(file)]
        else:
            where = ["-U", str(sock)] if sock else ["-i", tcp[0], "-p", str(tcp[1])]  # type: ignore[index]
            # FILTERS: nbdkit filter=arg words, e.g. ("nozero",), ("delay", "wdelay=1ms")
            names = [f"--filter={f}" for f in filters if "=" not in f]
            argv = ["nbdkit", "--foreground", *(["-r"] if readonly else []), *where, *names,
                    "file", f"file={file}",
                    *[f for f in filters if "=" in f]]
        if netns:
            argv = ["ip", "netns", "exec", netns, *argv]
        self.log = file.with_suffix(".server.log")
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=log)
        wait_for(self._listening, 15, f"{kind} to listen")

    def _listening(self) -> bool:
        assert self.proc.poll() is None, self.log.read_text(errors="replace")
        family = socket.AF_UNIX if self.socket else socket.AF_INET
        with contextlib.suppress(OSError), socket.socket(family) as s:
            s.connect(str(self.socket) if self.socket else self.tcp)
            return True
        return False

    @property
    def uri(self) -> str:
        if self.socket:
            return uri_of(self.socket)
        assert self.tcp is not None
        return f"nbd://{self.tcp[0]}:{self.tcp[1]}/"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                # A server whose client sits behind a cut link drains for as
                # long as TCP lets it: the test is done with it, kill it.
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc.wait()


@pytest.fixture
def serve(ram_tmp_path: Path) -> Iterator[object]:
    """Factory: ``serve(kind, size, junk=False)`` -> a Server of a new file
    of SIZE bytes (sparse, or full of 0x5a with JUNK); all stopped at the end."""
    servers: list[Server] = []

    def _serve(kind: str, size: int, *, junk: bool = False, **where: object) -> Server:
        n = len(servers)
        file = ram_tmp_path / f"export{n}.img"
        with open(file, "wb") as f:
            if junk:
                block = b"\x5a" * MiB
                for _ in range(size // MiB):
                    f.write(block)
            f.truncate(size)
        sock = None if "tcp" in where else ram_tmp_path / f"export{n}.sock"
        servers.append(Server(kind, file, sock, **where))  # type: ignore[arg-type]
        return servers[-1]

    yield _serve
    for server in servers:
        server.stop()


def sync_json(src: Path, uri: str, *options: str) -> dict[str, object]:
    proc = run_cli("sync", src, uri, "--json", *options)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["status"] == "ok", result
    return result


def one_line_error(proc: subprocess.CompletedProcess[str], code: int) -> str:
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("blockmirror: "), proc.stderr
    return lines[0]


# -- the copy -------------------------------------------------------------------------


@pytest.mark.parametrize("kind", SERVERS)
def test_sync_is_the_source_at_one_instant_and_stays_sparse(kind, ram_tmp_path, serve,
                                                            live_writer):
    """A live writer through the whole sync; the export held junk before.
    After it the served file is the source at the freeze (a prefix of the
    log), the junk under the source's holes is gone, and those zeros were
    punched (WRITE_ZEROES), not written."""
    image = ram_tmp_path / "live.img"
    size = 32 * MiB
    initial = make_data_image(image, size, extents=8, tracked=True)
    server = serve(kind, size, junk=True)
    writer = live_writer(image, rate="8M", wait=20)
    result = sync_json(image, server.uri, "--target-downtime", "1s", "--bwlimit", "32M",
                       "--verify")
    writer.wait_for_more(10)  # not frozen after the switch
    assert writer.stop() == 0
    copy = server.file.read_bytes()
    k = writer.assert_point_in_time(copy, initial)
    assert 0 < k < len(writer.writes()), "the copy shows no write, or every one"
    assert result["destination"] == server.uri and result["tracked"] and result["verified"]
    assert result["passes"][0]["kind"] == "bulk"
    assert result["passes"][-1]["kind"] == "final"
    assert any("no shadow copy" in n for n in result["notes"])  # type: ignore[union-attr]
    assert any("held data" in n for n in result["notes"])  # type: ignore[union-attr]
    # Punched, not written: the served file holds about the data only.
    assert allocated_bytes(server.file) <= nonzero_cells(copy) + 2 * MiB
    assert allocated_bytes(server.file) < size // 2


@pytest.mark.parametrize("kind", SERVERS)
def test_untracked_sync_then_verify_finds_a_difference(kind, ram_tmp_path, serve):
    image = ram_tmp_path / "still.img"
    content = make_data_image(image, 16 * MiB, extents=6)
    server = serve(kind, 16 * MiB, junk=True)
    result = sync_json(image, server.uri, "--verify")
    assert result["verified"] and not result["tracked"]
    assert server.file.read_bytes() == content
    for a, b in ((image, server.uri), (server.uri, image)):
        done = run_cli("verify", a, b)
        assert done.returncode == 0 and "identical" in done.stdout, done.stderr
    with open(server.file, "r+b") as f:  # behind the server: one byte differs
        f.seek(5 * MiB + 7)
        f.write(b"\x01")
    for a, b in ((image, server.uri), (server.uri, image)):
        done = run_cli("verify", a, b, "--json")
        assert done.returncode == 5, done.stderr
        assert json.loads(done.stdout)["differing"] == [[5 * MiB, 65536]]


def test_verify_two_exports(ram_tmp_path, serve):
    a, b = serve("nbdkit", 4 * MiB), serve("qemu-nbd", 4 * MiB)
    assert run_cli("verify", a.uri, b.uri).returncode == 0
    with open(b.file, "r+b") as f:
        f.write(b"x")
    assert run_cli("verify", a.uri, b.uri).returncode == 5


# -- refusals: one line, exit 2, the export untouched --------------------------------------


@pytest.mark.parametrize("uri", [
    "nbd://",                                   # no host
    "nbd://127.0.0.1:99999/",                   # no such port number
    "nbd+unix:///",                             # no socket
    "nbd+unix:///?socket=/nonexistent/nbd.sock",
    "nbds://127.0.0.1/",                        # TLS: not yet
    "ftp://127.0.0.1/x",
])
def test_bad_uris_are_one_line_exit_2(uri, ram_tmp_path):
    image = ram_tmp_path / "a.img"
    make_data_image(image, 4 * MiB, extents=2)
    for argv in (("sync", image, uri), ("verify", image, uri), ("verify", uri, image)):
        one_line_error(run_cli(*argv), 2)


def test_a_port_nobody_listens_on_is_exit_2_and_user_info_never_shown(ram_tmp_path):
    image = ram_tmp_path / "a.img"
    make_data_image(image, 4 * MiB, extents=2)
    with socket.socket() as s:  # a free port: bound, never listened on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        uri = f"nbd://alice:s3cret@127.0.0.1:{port}/"
        line = one_line_error(run_cli("sync", image, uri, "--json"), 2)
    assert "s3cret" not in line and "alice" not in line
    assert f"nbd://127.0.0.1:{port}/" in line


def test_user_info_stays_out_of_the_result(ram_tmp_path, serve):
    image = ram_tmp_path / "a.img"
    make_data_image(image, 4 * MiB, extents=2)
    server = serve("nbdkit", 4 * MiB)
    uri = server.uri.replace("nbd+unix://", "nbd+unix://alice@")
    result = sync_json(image, uri)
    assert "alice" not in json.dumps(result)
    assert result["destination"] == server.uri


def test_endpoint_display_and_repr_hide_user_info():
    parsed = endpoint.parse("nbd://bob:pw@host:10809/exp")
    assert isinstance(parsed, endpoint.NbdUri)
    assert parsed.display == "nbd://host:10809/exp"
    assert "pw" not in repr(parsed) and "pw" not in str(parsed)
    assert endpoint.parse("/some/path.img") == "/some/path.img"


@pytest.mark.parametrize("options, said", [
    (("--converge", "mirror"), "--converge mirror needs a local copy"),
])
def test_refused_modes(options, said, ram_tmp_path, serve):
    image = ram_tmp_path / "a.img"
    make_data_image(image, 4 * MiB, extents=2, tracked=True)
    server = serve("nbdkit", 4 * MiB, junk=True)
    before = server.file.read_bytes()
    assert said in one_line_error(run_cli("sync", image, server.uri, *options), 2)
    assert server.file.read_bytes() == before


@pytest.mark.parametrize("kind", SERVERS)
def test_a_read_only_export_is_refused(kind, ram_tmp_path, serve):
    image = ram_tmp_path / "a.img"
    content = make_data_image(image, 4 * MiB, extents=2)
    server = serve(kind, 4 * MiB, readonly=True)
    assert "read-only" in one_line_error(run_cli("sync", image, server.uri), 2)
    assert set(server.file.read_bytes()) == {0}
    server.file.write_bytes(content)  # verify only reads: a read-only export will do
    assert run_cli("verify", server.uri, image).returncode == 0


def test_an_export_as_source_or_a_folder_is_refused(ram_tmp_path, serve):
    image = ram_tmp_path / "a.img"
    make_data_image(image, 4 * MiB, extents=2)
    server = serve("nbdkit", 4 * MiB)
    assert "source of sync" in one_line_error(run_cli("sync", server.uri, image), 2)
    assert "directory mode" in one_line_error(run_cli("sync", ram_tmp_path, server.uri), 2)


def test_an_export_smaller_than_the_source_is_refused(ram_tmp_path, serve):
    image = ram_tmp_path / "a.img"
    make_data_image(image, 8 * MiB, extents=2)
    server = serve("nbdkit", 4 * MiB, junk=True)
    assert "smaller than the source" in one_line_error(run_cli("sync", image, server.uri), 2)
    assert set(server.file.read_bytes()) == {0x5A}


def test_without_libnbd_an_nbd_uri_names_the_package(ram_tmp_path):
    """A build without libnbd-dev has no blockmirror._remote: the rest works
    and a URI gets one line naming the package."""
    image = ram_tmp_path / "a.img"
    make_data_image(image, 4 * MiB, extents=2)
    code = ("import sys; sys.modules['blockmirror._remote'] = None\n"
            "from blockmirror.cli import main\nsys.exit(main(sys.argv[1:]))\n")
    for argv in (("sync", image, "nbd+unix:///?socket=/x.sock"),
                 ("verify", image, "nbd://127.0.0.1/")):
        proc = subprocess.run([sys.executable, "-c", code, *map(str, argv)],
                              capture_output=True, text=True, timeout=60)
        assert "libnbd-dev" in one_line_error(proc, 2)
    local = subprocess.run([sys.executable, "-c", code, "verify", str(image), str(image)],
                           capture_output=True, text=True, timeout=60)
    assert local.returncode == 0, local.stderr


# -- failures mid-copy ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", SERVERS)
def test_server_killed_in_the_final_pass(kind, ram_tmp_path, serve, live_writer):
    """The server dies while writers are frozen for the final pass: the
    sync fails with an I/O error (exit 1) saying the export was left partly
    written, and the writer goes on at once (never left frozen)."""
    image = ram_tmp_path / "live.img"
    make_data_image(image, 64 * MiB, extents=4, tracked=True)
    server = serve(kind, 64 * MiB)
    writer = live_writer(image, rate="8M", wait=20, extra=["--region", "8M"])
    # The writer dirties up to 8 MiB; the final pass copies it at 4 MB/s.
    proc = start_cli("sync", image, server.uri, "--bwlimit", "4M", "--target-downtime", "10s",
                     "--max-passes", "2")
    with Tracker.open(image) as tracker:
        wait_for(lambda: tracker.state == "frozen" or proc.poll() is not None, 60,
                 "the final pass", every=0.01)
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.3)
        server.proc.kill()
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 1, err
        assert "left partly written" in err and len(err.strip().splitlines()) == 1, err
        writer.wait_for_more(10, timeout=5)
        assert tracker.state == "running"


def test_server_killed_in_the_bulk_pass(ram_tmp_path, serve, live_writer):
    image = ram_tmp_path / "live.img"
    make_data_image(image, 64 * MiB, extents=32, tracked=True)
    server = serve("nbdkit", 64 * MiB)
    writer = live_writer(image, rate="4M", wait=10)
    proc = start_cli("sync", image, server.uri, "--bwlimit", "8M")
    wait_for(lambda: allocated_bytes(server.file) > 4 * MiB, 30, "the bulk pass to write")
    server.proc.kill()
    started = time.monotonic()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, err
    assert time.monotonic() - started < 10
    writer.wait_for_more(10, timeout=5)
    assert os.path.exists(image)


@pytest.mark.parametrize("kind", SERVERS)
def test_into_an_export_that_reads_as_zeros_only_data_is_sent(kind, ram_tmp_path, serve,
                                                              live_writer):
    """The server's block status says the fresh export is all zeros: the
    bulk pass takes the allocated extents only and sends data only, as into
    a new sparse file (here qemu-nbd runs without --discard=unmap)."""
    image = ram_tmp_path / "live.img"
    size = 32 * MiB
    initial = make_data_image(image, size, extents=6, tracked=True)
    server = serve(kind, size, discard=False)
    writer = live_writer(image, rate="4M", wait=10)
    result = sync_json(image, server.uri, "--target-downtime", "1s")
    assert writer.stop() == 0
    copy = server.file.read_bytes()
    writer.assert_point_in_time(copy, initial)
    assert any("read as zeros" in n for n in result["notes"])  # type: ignore[union-attr]
    assert result["passes"][0]["bytes"] < size // 2  # not the whole image
    assert allocated_bytes(server.file) <= nonzero_cells(copy) + 2 * MiB


def test_an_export_without_write_zeroes_gets_zeros_written(ram_tmp_path, serve):
    """nbdkit's nozero filter hides WRITE_ZEROES: zero runs go out as writes
    of zeros, and the junk under the source's holes still goes."""
    image = ram_tmp_path / "a.img"
    content = make_data_image(image, 8 * MiB, extents=3)
    server = serve("nbdkit", 8 * MiB, junk=True, filters=("nozero",))
    sync_json(image, server.uri)
    assert server.file.read_bytes() == content


# -- two hosts: the server in its own network namespace ----------------------------------

PORT = 10809


@pytest.fixture
def link() -> Iterator[object]:
    with two_hosts(delay_ms=0.5, rate="1gbit") as made:
        yield made


@pytest.mark.parametrize("kind", SERVERS)
def test_sync_across_a_network_namespace(kind, ram_tmp_path, serve, live_writer, link):
    """The export on another host (a veth pair at 1 Gbit/s, 1 ms round
    trips: netem where the kernel has it, else a relay holding every byte
    0.5 ms each way): the copy is the source at one instant, sparse, and
    verify agrees over the same link."""
    image = ram_tmp_path / "live.img"
    size = 32 * MiB
    initial = make_data_image(image, size, extents=8, tracked=True)
    server = serve(kind, size, junk=True, tcp=(link.remote_ip, PORT), netns=link.netns)
    with delayed(link, [PORT]) as host:
        uri = f"nbd://{host}:{PORT}/"
        writer = live_writer(image, rate="4M", wait=20)
        result = sync_json(image, uri, "--target-downtime", "1s")
        writer.wait_for_more(10)
        assert writer.stop() == 0
        copy = server.file.read_bytes()
        writer.assert_point_in_time(copy, initial)
        assert result["destination"] == uri
        assert allocated_bytes(server.file) <= nonzero_cells(copy) + 2 * MiB
        done = run_cli("verify", image, uri)
        assert done.returncode == 5, done.stdout  # the writer wrote after the switch
        assert run_cli("verify", server.file, uri).returncode == 0


@pytest.mark.slow
def test_link_cut_mid_copy_fails_in_bounded_time(ram_tmp_path, serve, live_writer, link):
    """`ip link set ... down` in the bulk pass: no reply ever comes; after
    BLOCKMIRROR_NBD_TIMEOUT the sync fails (exit 1), writers keep going."""
    image = ram_tmp_path / "live.img"
    make_data_image(image, 64 * MiB, extents=32, tracked=True)
    server = serve("nbdkit", 64 * MiB, tcp=(link.remote_ip, PORT), netns=link.netns)
    writer = live_writer(image, rate="4M", wait=10)
    env = {**os.environ, "BLOCKMIRROR_NBD_TIMEOUT": "3"}
    proc = subprocess.Popen([sys.executable, "-m", "blockmirror", "sync", str(image),
                             server.uri, "--bwlimit", "8M"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: allocated_bytes(server.file) > 4 * MiB, 30, "the bulk pass to write")
    subprocess.run(["ip", "link", "set", link.local_dev, "down"], check=True)
    started = time.monotonic()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1, err
    assert time.monotonic() - started < 15, "the failure took too long"
    assert "left partly written" in err
    writer.wait_for_more(10, timeout=5)
    # A new connection over the dead link gives up after the timeout too.
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "blockmirror", "verify", str(image),
                           server.uri], env=env, capture_output=True, text=True, timeout=60)
    assert "no answer" in one_line_error(done, 2)
    assert time.monotonic() - started < 15


# -- requests in flight, connections ------------------------------------------------------


@pytest.mark.parametrize("kind, connections", [("nbdkit", 4), ("qemu-nbd", 1)])
def test_many_requests_in_flight_on_as_many_connections_as_allowed(kind, connections,
                                                                   ram_tmp_path, serve):
    """nbdkit's file plugin offers multi-conn: four connections; qemu-nbd
    serving one client does not: one. Each keeps many requests in flight
    (nbdkit holds each 1 ms here, so a copy one request at a time would show 1)."""
    image = ram_tmp_path / "a.img"
    size = 64 * MiB  # work items of 4 MiB: 16 requests each
    content = make_data_image(image, size, extents=64)
    filters = ("delay", "delay-write=1ms") if kind == "nbdkit" else ()
    server = serve(kind, size, filters=filters)
    parsed = endpoint.parse(server.uri)
    assert isinstance(parsed, endpoint.NbdUri)
    with NbdExport(parsed, connections=4, write=True) as export:
        assert export.connections == connections and export.multi_conn == (connections > 1)
        fd = os.open(image, os.O_RDONLY)
        try:
            with RemoteCopier(fd, export, requests=16) as copier:
                stats = copier.copy_extents(copier.whole_image())
            export.flush()
        finally:
            os.close(fd)
    assert copier.most_in_flight >= 8, copier.most_in_flight
    assert stats.bytes_written == nonzero_cells(content) and stats.copied == size
    assert server.file.read_bytes() == content


def test_sigint_mid_copy_cleans_up(ram_tmp_path, serve, live_writer):
    image = ram_tmp_path / "live.img"
    make_data_image(image, 64 * MiB, extents=32, tracked=True)
    server = serve("nbdkit", 64 * MiB)
    writer = live_writer(image, rate="4M", wait=10)
    proc = start_cli("sync", image, server.uri, "--bwlimit", "8M")
    wait_for(lambda: allocated_bytes(server.file) > 2 * MiB, 30, "the bulk pass to write")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    writer.wait_for_more(10, timeout=5)
    with Tracker.open(image) as tracker:
        assert tracker.state == "running"


def test_converge_auto_into_an_export_escalates_to_the_throttle(ram_tmp_path, serve,
                                                                live_writer):
    """Writers at twice the copy's cap: auto would mirror, which needs a
    local copy, so it throttles the writers instead, and converges."""
    image = ram_tmp_path / "live.img"
    initial = make_data_image(image, 32 * MiB, extents=8, tracked=True)
    server = serve("nbdkit", 32 * MiB)
    writer = live_writer(image, rate="16M", wait=10, extra=["--region", "16M"])
    result = sync_json(image, server.uri, "--bwlimit", "8M", "--converge", "auto",
                       "--target-downtime", "200ms")
    assert writer.stop() == 0
    writer.assert_point_in_time(server.file.read_bytes(), initial)
    assert result["strategy"] == "throttle", result
    assert any("needs a local copy" in n for n in result["notes"])  # type: ignore[union-attr]
