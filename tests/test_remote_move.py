# ruff: noqa: F811  (serve, a fixture of test_remote_nbd, is a test argument)
"""`blockmirror sync --move SRC nbd://...` (issue 12): a move onto an NBD
export, with live tracked writers that follow it there.

The export's served file is read directly at the end: it must be the
initial image with every logged write applied, those made before the switch
(copied from the source) and after it (sent by the writers through libnbd)
alike, and its holes must still be holes. A failure before the redirect
(the server killed in the final pass, the flush refused) must leave the
source with every write and the writers running on it. A redirect to an
export in the sidecar of an image owned by another uid is never followed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from imagetools import (
    MiB,
    WriterProcess,
    allocated_bytes,
    cli_killed_at,
    make_data_image,
    nonzero_cells,
    replay,
    run_cli,
    start_cli,
    wait_for,
)
from nbdtools import require
from netnstools import delayed, two_hosts
from test_remote_nbd import Server, one_line_error, serve  # noqa: F401 (a fixture)

from blockmirror import TrackedImage, Tracker
from blockmirror.copying.remote import libnbd_available

pytestmark = pytest.mark.skipif(not libnbd_available(),
                                reason="blockmirror._remote not built (needs libnbd-dev)")

SERVERS = ("qemu-nbd", "nbdkit")
PORT = 10809


# -- helpers ------------------------------------------------------------------------------


@pytest.fixture
def link() -> Iterator[object]:
    """The export's host: a network namespace behind a veth pair at 1 Gbit/s,
    0.5 ms each way (netem, or a relay: netnstools.delayed)."""
    with two_hosts(delay_ms=0.5, rate="1gbit") as made:
        yield made


def writers_on(image: Path, tmp: Path, size: int, count: int, *, rate: str,
               discard_every: int = 0) -> list[WriterProcess]:
    """COUNT logging writer processes, each in its own slice of IMAGE (so
    the end state does not depend on how their writes interleave)."""
    region = size // count
    found = []
    for i in range(count):
        extra = ["--region", str(region), "--base", str(i * region)]
        if discard_every and i == 0:
            extra += ["--discard-every", str(discard_every)]
        found.append(WriterProcess(image, tmp / f"writes-{i}.log", rate=rate, seed=11 + i,
                                   extra=extra))
    for w in found:
        w.wait_for_writes(15)
    return found


def all_writes(initial: bytes, writers: list[WriterProcess]) -> bytes:
    """INITIAL with every logged write of every writer applied."""
    out = initial
    for w in writers:
        out = replay(out, w.writes(), w.seed)
    return out


def stop_all(writers: list[WriterProcess]) -> None:
    codes = [w.stop() for w in writers]
    assert codes == [0] * len(writers), f"writer exit codes {codes}"


def qemu_img_equal(a: str, b: str) -> bool:
    done = subprocess.run(["qemu-img", "compare", "-q", "-f", "raw", "-F", "raw", a, b],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode in (0, 1), done.stderr
    return done.returncode == 0


# -- the move, with writers following ------------------------------------------------------


@pytest.mark.parametrize("kind", SERVERS)
def test_move_onto_an_export_in_another_namespace_loses_no_write(kind, ram_tmp_path, serve,
                                                                 link):
    """Three writers (one also discarding) through a move onto an export on
    another host: the export ends as the initial image with every logged
    write applied, in order, before and after the switch; qemu-img agrees;
    holes stayed holes; the source and its sidecar are gone."""
    require("qemu-img")
    image = ram_tmp_path / "vm.img"
    size = 48 * MiB
    initial = make_data_image(image, size, extents=12, tracked=True)
    # qemu-nbd serves one client at a time unless told more (-e): one
    # connection per writer, and the copier's while it hands over.
    server = serve(kind, size, junk=True, tcp=(link.remote_ip, PORT), netns=link.netns,
                   shared=8)
    writers = writers_on(image, ram_tmp_path, size, 3, rate="2M", discard_every=5)
    with delayed(link, [PORT]) as host:  # the writers follow through it too
        try:
            proc = run_cli("sync", image, f"nbd://{host}:{PORT}/", "--move",
                           "--target-downtime", "500ms", "--json")
            assert proc.returncode == 0, proc.stderr
            before = [w.count() for w in writers]
            for w in writers:
                w.wait_for_more(10)  # writing on, now into the export
        finally:
            stop_all(writers)
    result = json.loads(proc.stdout)
    assert result["status"] == "ok" and result["mode"] == "move"
    assert result["passes"][-1]["kind"] == "final"
    assert not image.exists() and not Path(f"{image}.cbt").exists()
    assert all(w.count() > n for w, n in zip(writers, before, strict=True))
    expected = all_writes(initial, writers)
    final = server.file.read_bytes()
    assert final == expected, "the export lacks a logged write (or holds a stale block)"
    copy = ram_tmp_path / "expected.img"
    copy.write_bytes(expected)
    assert qemu_img_equal(str(copy), server.uri)
    # The junk under the source's holes was punched, and discards after the
    # switch punched too: about the data is allocated, nothing more.
    assert allocated_bytes(server.file) <= nonzero_cells(final) + 2 * MiB


@pytest.mark.parametrize("kind", SERVERS)
def test_move_onto_a_local_export_with_a_writer_that_reads_and_flushes(kind, ram_tmp_path,
                                                                       serve):
    """The library API: a TrackedImage opened before the move writes, zeroes,
    discards, flushes and reads the export after it, through libnbd."""
    image = ram_tmp_path / "a.img"
    size = 8 * MiB
    make_data_image(image, size, extents=2, tracked=True)
    server = serve(kind, size)
    with TrackedImage(image) as img:
        img.pwrite(b"before" * 100, 4096)
        proc = run_cli("sync", image, server.uri, "--move")
        assert proc.returncode == 0, proc.stderr
        img.pwrite(b"after!" * 100, 1 * MiB)
        img.write_zeroes(2 * MiB, 65536)
        img.discard(3 * MiB, 65536)
        img.flush()
        assert img.export is not None and img.size == size
        assert img.pread(600, 1 * MiB) == b"after!" * 100
        assert img.pread(600, 4096) == b"before" * 100
        with pytest.raises(OSError, match="cannot be resized"):
            img.truncate(size // 2)
    content = server.file.read_bytes()
    assert content[1 * MiB:1 * MiB + 600] == b"after!" * 100
    assert content[4096:4696] == b"before" * 100
    assert not image.exists()


# -- failures before the redirect -------------------------------------------------------------


def _start_move_into(server: Server, image: Path, **env: str) -> subprocess.Popen[str]:
    # The writer dirties up to 8 MiB; the final pass copies it at 4 MB/s.
    return start_cli("sync", image, server.uri, "--move", "--bwlimit", "4M",
                     "--target-downtime", "10s", "--max-passes", "2")


def _assert_source_kept_everything(image: Path, initial: bytes, writer: WriterProcess,
                                   tracker: Tracker) -> None:
    writer.wait_for_more(10, timeout=5)  # not frozen, still writing
    assert tracker.state == "running"
    assert writer.stop() == 0
    assert image.read_bytes() == writer.replayed(initial), "a write missed the source"


@pytest.mark.parametrize("kind", SERVERS)
def test_server_killed_in_the_final_pass_of_a_move(kind, ram_tmp_path, serve):
    """The server dies while writers are frozen: exit 1, one line, the
    source holds every write and the writer goes on against it."""
    image = ram_tmp_path / "live.img"
    initial = make_data_image(image, 64 * MiB, extents=4, tracked=True)
    server = serve(kind, 64 * MiB)
    writer = WriterProcess(image, ram_tmp_path / "w.log", rate="8M", extra=["--region", "8M"])
    try:
        writer.wait_for_writes(20)
        proc = _start_move_into(server, image)
        with Tracker.open(image) as tracker:
            wait_for(lambda: tracker.state == "frozen" or proc.poll() is not None, 60,
                     "the final pass", every=0.01)
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.3)
            server.proc.kill()
            _, err = proc.communicate(timeout=60)
            assert proc.returncode == 1, err
            assert "left partly written" in err and len(err.strip().splitlines()) == 1, err
            _assert_source_kept_everything(image, initial, writer, tracker)
    finally:
        writer.stop()


# The sync, with the export's flush failing (EIO) when the commit calls it,
# under the freeze: the flush before the freeze still works.
_FLUSH_FAILS_AT_COMMIT = """
import errno, sys
from blockmirror.copying.remote import NbdExport
from blockmirror.cli import main
real = NbdExport.flush
def flush(self):
    if sys._getframe(1).f_code.co_name == "_commit":
        raise OSError(errno.EIO, "flush refused (injected)", self.name)
    real(self)
NbdExport.flush = flush
sys.exit(main(sys.argv[1:]))
"""


def test_flush_failing_under_the_freeze_keeps_writers_on_the_source(ram_tmp_path, serve):
    """The commit's flush fails: the redirect never happens; exit 1; the
    source holds every write; the writer was thawed and goes on writing it."""
    image = ram_tmp_path / "live.img"
    initial = make_data_image(image, 32 * MiB, extents=4, tracked=True)
    server = serve("nbdkit", 32 * MiB)
    writer = WriterProcess(image, ram_tmp_path / "w.log", rate="8M", extra=["--region", "8M"])
    try:
        writer.wait_for_writes(20)
        done = subprocess.run([sys.executable, "-c", _FLUSH_FAILS_AT_COMMIT, "sync",
                               str(image), server.uri, "--move", "--target-downtime", "1s"],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 1, done.stderr
        assert "flush refused" in done.stderr and "left partly written" in done.stderr
        with Tracker.open(image) as tracker:
            _assert_source_kept_everything(image, initial, writer, tracker)
    finally:
        writer.stop()


@pytest.mark.parametrize("failing", ["flush", "redirect"])
def test_a_failed_commit_or_redirect_thaws_writers_at_once(failing, ram_tmp_path, serve,
                                                           monkeypatch):
    """The library call, in this process (whose freeze binds until thawed):
    the commit's flush, or the redirect itself, fails; the sync leaves the
    tracker running, not frozen until the lease ends; the source is
    untouched."""
    from blockmirror import sync
    from blockmirror.copying.remote import NbdExport

    image = ram_tmp_path / "a.img"
    content = make_data_image(image, 8 * MiB, extents=3, tracked=True)
    server = serve("nbdkit", 8 * MiB)
    real = NbdExport.flush

    def flush(self: NbdExport) -> None:
        if sys._getframe(1).f_code.co_name == "_commit":
            raise OSError(5, "refused (injected)", self.name)
        real(self)

    def redirect(self: Tracker, uri: str) -> None:
        raise OSError(110, "refused (injected)")

    if failing == "flush":
        monkeypatch.setattr(NbdExport, "flush", flush)
    else:
        monkeypatch.setattr(Tracker, "redirect_to_export", redirect)
    with pytest.raises(OSError, match="refused"):
        sync(image, server.uri, mode="move", target_downtime=5.0)
    with Tracker.open(image) as tracker:
        assert tracker.state == "running"
    assert image.read_bytes() == content


def test_copier_killed_just_before_the_redirect(ram_tmp_path, serve):
    """SIGKILL after the flush, before the redirect: writers resume on the
    source (the copier is gone), which keeps every write."""
    image = ram_tmp_path / "live.img"
    initial = make_data_image(image, 32 * MiB, extents=4, tracked=True)
    server = serve("nbdkit", 32 * MiB)
    writer = WriterProcess(image, ram_tmp_path / "w.log", rate="8M", extra=["--region", "8M"])
    try:
        writer.wait_for_writes(20)
        cli_killed_at("blockmirror.tracking.tracker", "Tracker.redirect_to_export", "sync",
                      image, server.uri, "--move", "--target-downtime", "1s")
        with Tracker.open(image) as tracker:
            _assert_source_kept_everything(image, initial, writer, tracker)
    finally:
        writer.stop()


def test_a_move_killed_after_its_switch_is_finished_by_the_next_run(ram_tmp_path, serve):
    """SIGKILL after the redirect, before the source is removed: writers are
    on the export already. The same move again only removes the source (no
    copy), says so, and no logged write is lost; a move to another place is
    still refused."""
    image = ram_tmp_path / "live.img"
    size = 16 * MiB
    initial = make_data_image(image, size, extents=4, tracked=True)
    server = serve("nbdkit", size, junk=True)
    writers = writers_on(image, ram_tmp_path, size, 2, rate="2M")
    try:
        cli_killed_at("blockmirror.migration.commit", "remove_source", "sync", image,
                      server.uri, "--move", "--target-downtime", "1s")
        assert image.exists()
        with Tracker.open(image) as tracker:
            assert tracker.state == "redirected"
        other = serve("nbdkit", size)
        assert "already moved" in one_line_error(
            run_cli("sync", image, other.uri, "--move"), 2)
        proc = run_cli("sync", image, server.uri, "--move", "--json")
        assert proc.returncode == 0, proc.stderr
        result = json.loads(proc.stdout)
        assert result["status"] == "ok" and result["passes"] == []
        assert any("finished a move" in n for n in result["notes"]), result["notes"]
        assert not image.exists() and not Path(f"{image}.cbt").exists()
        for w in writers:
            w.wait_for_more(10)  # still writing, into the export
    finally:
        stop_all(writers)
    assert server.file.read_bytes() == all_writes(initial, writers)


# -- refusals ---------------------------------------------------------------------------------


@pytest.mark.parametrize("options, uri_of, said", [
    (("--verify",), lambda u: u, "--verify cannot check a move"),
    ((), lambda u: u.replace("nbd+unix://", "nbd+unix://alice@"), "user info"),
    ((), lambda u: u.split("socket=")[0] + "socket=rel.sock", "must be absolute"),
])
def test_moves_writers_could_not_follow_are_refused(options, uri_of, said, ram_tmp_path,
                                                    serve):
    image = ram_tmp_path / "a.img"
    make_data_image(image, 4 * MiB, extents=2, tracked=True)
    server = serve("nbdkit", 4 * MiB, junk=True)
    before = server.file.read_bytes()
    line = one_line_error(run_cli("sync", image, uri_of(server.uri), "--move", *options), 2)
    assert said in line and "alice" not in line
    assert server.file.read_bytes() == before and image.exists()


def test_an_image_served_by_the_front_end_is_not_moved_onto_an_export(ram_tmp_path, serve):
    """blockmirror serve's plugin follows moves to files only: refused, and
    its client keeps writing the source."""
    from nbdtools import require_plugin

    require_plugin()
    image = ram_tmp_path / "served.img"
    make_data_image(image, 4 * MiB, extents=2, tracked=True)
    server = serve("nbdkit", 4 * MiB)
    front = subprocess.run([sys.executable, "-m", "blockmirror", "serve", str(image),
                            "--pidfile", str(ram_tmp_path / "serve.pid")],
                           capture_output=True, text=True, timeout=60)
    assert front.returncode == 0, front.stderr
    try:
        line = one_line_error(run_cli("sync", image, server.uri, "--move"), 2)
        assert "served by blockmirror serve" in line
        assert image.exists()
    finally:
        pid = int((ram_tmp_path / "serve.pid").read_text())
        os.kill(pid, 15)
        wait_for(lambda: not os.path.exists(f"/proc/{pid}"), 20, "serve to stop")


# -- who follows a redirect to an export ------------------------------------------------------

# A root writer opens an image with a redirect in its sidecar (made with the
# copier's own call: a forged one is byte for byte the same) and writes once.
_WRITE_AFTER_REDIRECT = """
import sys
from blockmirror import Tracker, TrackedImage
image, uri = sys.argv[1], sys.argv[2]
img = TrackedImage(image)
with Tracker.open(image) as t:
    t.freeze(5)
    t.redirect_to_export(uri)
try:
    img.pwrite(b"escaped!" * 512, 0)
except OSError as e:
    print(type(e).__name__, e.errno, e)
    sys.exit(3)
print("followed", img.export is not None)
"""


@pytest.mark.parametrize("owner", ["other", "self"])
def test_a_redirect_to_an_export_is_followed_only_by_the_images_owner(owner, ram_tmp_path,
                                                                      serve):
    """Image and sidecar owned by uid 4242: a root writer refuses the URI
    (EPERM) and writes nowhere; owned by root: it follows (the control)."""
    if os.geteuid() != 0:
        pytest.skip("needs root (files of another uid)")
    image = ram_tmp_path / "user.img"
    make_data_image(image, 4 * MiB, extents=2, tracked=True)
    if owner == "other":
        for path in (image, Path(f"{image}.cbt")):
            os.chown(path, 4242, 4242)
    server = serve("nbdkit", 4 * MiB)
    before = server.file.read_bytes()
    done = subprocess.run([sys.executable, "-c", _WRITE_AFTER_REDIRECT, str(image),
                           server.uri], capture_output=True, text=True, timeout=60)
    if owner == "other":
        assert done.returncode == 3, (done.stdout, done.stderr)
        assert "not as the image's owner" in done.stdout
        assert server.file.read_bytes() == before, "the write escaped to the export"
    else:
        assert done.returncode == 0 and "followed True" in done.stdout, done.stderr
        assert server.file.read_bytes()[:8] == b"escaped!"


def test_a_writer_without_libnbd_fails_clearly(ram_tmp_path, serve):
    """A writer process whose build has no blockmirror._remote: its write
    after the move raises at once, naming libnbd-dev; the source is not
    written either (it was moved away)."""
    image = ram_tmp_path / "a.img"
    make_data_image(image, 4 * MiB, extents=2, tracked=True)
    server = serve("nbdkit", 4 * MiB)
    code = ("import blockmirror._bindings.remote as r\n"
            "r._EXT.module = None\n" + _WRITE_AFTER_REDIRECT)
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-c", code, str(image), server.uri],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 3, (done.stdout, done.stderr)
    assert "libnbd-dev" in done.stdout
    assert time.monotonic() - started < 20
    assert b"escaped!" not in image.read_bytes()


def test_uri_redirects_are_refused_with_user_info(ram_tmp_path):
    image = ram_tmp_path / "a.img"
    make_data_image(image, 4 * MiB, extents=2, tracked=True)
    with Tracker.open(image) as t:
        t.freeze(5)
        for bad in ("nbd://alice@host/", "nbd://host/\nfake", "file:///etc/passwd", ""):
            with pytest.raises(OSError):
                t.redirect_to_export(bad)
        assert t.state == "frozen"
        t.thaw()
    assert shutil.which("true")  # the environment is sane; nothing moved
    with Tracker.open(image) as t:
        assert t.state == "running"


def test_a_move_whose_writer_is_not_the_owner_is_refused(ram_tmp_path, serve):
    """A root writer on an image of uid 4242 could not follow the URI: the
    move is refused before anything is written, and the writer goes on."""
    if os.geteuid() != 0:
        pytest.skip("needs root (files of another uid)")
    image = ram_tmp_path / "user.img"
    make_data_image(image, 8 * MiB, extents=2, tracked=True)
    for path in (image, Path(f"{image}.cbt")):
        os.chown(path, 4242, 4242)
    server = serve("nbdkit", 8 * MiB, junk=True)
    before = server.file.read_bytes()
    writer = WriterProcess(image, ram_tmp_path / "w.log", rate="4M")
    try:
        writer.wait_for_writes(10)
        line = one_line_error(run_cli("sync", image, server.uri, "--move"), 2)
        assert "not the image's owner (uid 4242)" in line and f"pid {writer.proc.pid}" in line
        writer.wait_for_more(5)
    finally:
        assert writer.stop() == 0
    assert server.file.read_bytes() == before and image.exists()


def test_a_front_end_that_meets_a_redirect_to_an_export_fails_requests_not_freezes(
        ram_tmp_path, serve):
    """Past the copier's refusal (a front end started mid-move): the nbdkit
    plugin cannot follow a URI; its client's write fails at once with an
    error, is written nowhere, and the plugin says why in its log."""
    from nbdtools import Exports, NbdClient

    image = ram_tmp_path / "served.img"
    content = make_data_image(image, 4 * MiB, extents=2, tracked=True)
    target = serve("nbdkit", 4 * MiB)
    with Exports(ram_tmp_path) as exports:
        front = exports.start(image)
        with NbdClient(front.socket, timeout=20) as client:
            client.pwrite(b"\x01" * 4096, 0)
            content = b"\x01" * 4096 + content[4096:]
            with Tracker.open(image) as tracker:
                tracker.freeze(5)
                tracker.redirect_to_export(target.uri)
            started = time.monotonic()
            with pytest.raises(OSError):
                client.pwrite(b"\x02" * 4096, 8192)
            assert time.monotonic() - started < 5, "the client was held"
        wait_for(lambda: "cannot follow it there" in front.stderr(), 10, "the plugin's reason")
    assert image.read_bytes() == content
    assert b"\x02" * 4096 not in target.file.read_bytes()


def test_an_untracked_image_is_moved_and_removed(ram_tmp_path, serve):
    """No sidecar, so no writer to send anywhere: copied, flushed, checked
    unchanged, then the source goes, as in a local move."""
    image = ram_tmp_path / "still.img"
    content = make_data_image(image, 8 * MiB, extents=3)
    server = serve("qemu-nbd", 8 * MiB, junk=True)
    proc = run_cli("sync", image, server.uri, "--move", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["mode"] == "move"
    assert server.file.read_bytes() == content
    assert not image.exists()
