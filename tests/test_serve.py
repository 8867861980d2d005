"""``blockmirror serve``: the export comes up where it says, is private, stops
cleanly on a signal (the sidecar closed clean, the socket and pidfile gone),
never outlives its supervisor, and refuses bad input with one line, exit 2,
nothing created."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest
from imagetools import MiB, make_data_image, run_cli, start_cli, wait_for

import blockmirror
from blockmirror import Tracker
from blockmirror.errors import InvalidInputError
from blockmirror.frontend import plugin

pytestmark = pytest.mark.skipif(shutil.which("nbdkit") is None,
                                reason="nbdkit is not installed (scripts/setup)")


def _plugin_built() -> bool:
    try:
        plugin.plugin_path()
    except InvalidInputError:
        return False
    return True


needs_plugin = pytest.mark.skipif(not _plugin_built(),
                                  reason="the nbdkit plugin is not built (nbdkit-plugin-dev)")


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (scripts/setup)")
    return path


# -- helpers --------------------------------------------------------------------


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def children_of(pid: int) -> list[int]:
    found = []
    for entry in glob.glob("/proc/[0-9]*/stat"):
        with contextlib.suppress(OSError), open(entry) as f:
            fields = f.read().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid:
                found.append(int(entry.split("/")[2]))
    return found


def socket_of(uri: str) -> str:
    assert uri.startswith("nbd+unix:///?socket="), uri
    return urllib.parse.unquote(uri.split("socket=", 1)[1])


@pytest.fixture(autouse=True)
def own_tmpdir(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """serve makes its private socket folder in TMPDIR: one of each test's
    own (short, for sun_path), so exports of other runs never disturb the
    checks of what is left behind."""
    folder = Path(tempfile.mkdtemp(prefix="bmt-"))
    monkeypatch.setenv("TMPDIR", str(folder))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def private_dirs() -> set[str]:
    return set(glob.glob(os.path.join(os.environ["TMPDIR"], "blockmirror-serve-*")))


def listing(folder: Path) -> list[str]:
    return sorted(os.listdir(folder))


def export_size(uri: str) -> int:
    nbdinfo = _tool("nbdinfo")
    out = subprocess.run([nbdinfo, "--size", uri], capture_output=True, text=True,
                         timeout=30, check=True)
    return int(out.stdout.strip())


def assert_clean_sidecar(image: Path) -> None:
    with Tracker.open(image) as tracker:
        assert tracker.consistent, "the sidecar was left unclean"
        assert tracker.live_writers() == 0
        assert not tracker.info().unclean


class Served:
    """A background serve: its URI (and fuse path), its pidfile and pid."""

    def __init__(self, lines: list[str], pidfile: Path) -> None:
        self.uri = lines[0]
        self.lines = lines
        self.pidfile = pidfile
        self.pid = int(pidfile.read_text())

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if alive(self.pid):
            os.kill(self.pid, sig)
        wait_for(lambda: not alive(self.pid), 60, "the supervisor to exit")


@pytest.fixture
def serve_bg(tmp_path: Path) -> Iterator[object]:
    """``serve_bg(image, *args)`` starts ``blockmirror serve`` detached with a
    pidfile; every server started is stopped at the end."""
    started: list[Served] = []

    def start(image: Path, *args: object) -> Served:
        pidfile = tmp_path / f"serve{len(started)}.pid"
        proc = run_cli("serve", image, "--pidfile", pidfile, *args, timeout=60)
        assert proc.returncode == 0, proc.stderr
        served = Served(proc.stdout.splitlines(), pidfile)
        started.append(served)
        return served

    yield start
    for served in started:
        if alive(served.pid):
            kids = children_of(served.pid)
            served.stop()
            for kid in kids:
                wait_for(lambda k=kid: not alive(k), 30, "a helper of serve to exit")


def read_line(proc: subprocess.Popen[str], timeout: float = 30.0) -> str:
    """The next stdout line of PROC, failing after TIMEOUT seconds."""
    assert proc.stdout is not None
    line: list[str] = []
    reader = threading.Thread(target=lambda: line.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout)
    if not line:  # the caller's foreground() stops it (SIGTERM: nothing left behind)
        raise AssertionError(f"no output within {timeout} s")
    return line[0].rstrip("\n")


@contextlib.contextmanager
def foreground(*args: object) -> Iterator[subprocess.Popen[str]]:
    proc = start_cli("serve", *args, "--foreground")
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    make_data_image(path, 16 * MiB, extents=3)
    return path


# -- serving --------------------------------------------------------------------


@needs_plugin
def test_background_serve_is_private_reachable_and_stops_clean(image, serve_bg):
    before = private_dirs()
    assert not os.path.exists(f"{image}.cbt")
    served = serve_bg(image)
    assert len(served.lines) == 1
    sock = socket_of(served.uri)
    assert stat.S_ISSOCK(os.lstat(sock).st_mode)
    assert stat.S_IMODE(os.lstat(sock).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(os.path.dirname(sock)).st_mode) == 0o700
    assert private_dirs() == {*before, os.path.dirname(sock)}
    assert os.path.exists(f"{image}.cbt"), "tracking was not enabled"
    assert alive(served.pid) and os.getsid(served.pid) != os.getsid(0), "not detached"
    assert export_size(served.uri) == image.stat().st_size

    served.stop(signal.SIGTERM)
    assert not os.path.lexists(sock)
    assert private_dirs() == before
    assert not served.pidfile.exists()
    assert_clean_sidecar(image)


@needs_plugin
def test_writes_through_the_export_land_in_the_image_and_the_bitmap(image, serve_bg):
    qemu_io = _tool("qemu-io")
    served = serve_bg(image)
    with Tracker.open(image) as tracker:
        tracker.fetch_and_clear()
    proc = subprocess.run([qemu_io, "-f", "raw", "-c", "write -P 0x5a 1M 128k", served.uri],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    with open(image, "rb") as f:
        f.seek(1 * MiB)
        assert f.read(128 << 10) == b"\x5a" * (128 << 10)
    with Tracker.open(image) as tracker:
        assert tracker.dirty_extents() == [(1 * MiB, 128 << 10)]
    served.stop()
    assert_clean_sidecar(image)


@needs_plugin
def test_readonly_refuses_writes(image, serve_bg):
    qemu_io = _tool("qemu-io")
    content = image.read_bytes()
    served = serve_bg(image, "--readonly")
    proc = subprocess.run([qemu_io, "-f", "raw", "-c", "write -P 0x11 0 64k", served.uri],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "Permission denied" in proc.stderr, proc.stderr
    proc = subprocess.run([qemu_io, "-r", "-f", "raw", "-c", "read 0 64k", served.uri],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr  # reads still work
    assert image.read_bytes() == content


@needs_plugin
def test_foreground_stays_attached_until_sigint(image, tmp_path):
    sock = tmp_path / "nbd.sock"
    with foreground(image, "--socket", sock) as proc:
        uri = read_line(proc)
        assert socket_of(uri) == str(sock)
        assert stat.S_IMODE(os.lstat(sock).st_mode) == 0o600
        assert export_size(uri) == image.stat().st_size
        assert [n for n in listing(tmp_path) if n.startswith(".bm-")] == []
        time.sleep(0.3)
        assert proc.poll() is None, "the foreground server exited"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0, proc.stderr.read() if proc.stderr else ""
    assert not os.path.lexists(sock)
    assert_clean_sidecar(image)


def _listening(port: int) -> list[str]:
    """Local addresses (hex, as /proc/net/tcp* has them) listening on PORT."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError), open(table) as f:
            for row in f.read().splitlines()[1:]:
                local, state = row.split()[1], row.split()[3]
                address, hexport = local.split(":")
                if state == "0A" and int(hexport, 16) == port:
                    found.append(address)
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@needs_plugin
def test_tcp_listens_on_loopback_only(image):
    port = _free_port()
    with foreground(image, "--port", port) as proc:
        uri = read_line(proc)
        assert uri == f"nbd://127.0.0.1:{port}"
        assert _listening(port) == ["0100007F"]  # 127.0.0.1, nothing else
        assert export_size(uri) == image.stat().st_size
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    assert _listening(port) == []


@needs_plugin
def test_sigkill_of_the_supervisor_takes_nbdkit_with_it(image, tmp_path, serve_bg):
    served = serve_bg(image, "--socket", tmp_path / "s")
    kids = children_of(served.pid)
    assert kids, "no nbdkit under the supervisor"
    served.stop(signal.SIGKILL)
    for kid in kids:
        wait_for(lambda k=kid: not alive(k), 30, "nbdkit to follow its supervisor")
    # nbdkit got SIGTERM (--exit-with-parent) and closed the sidecar clean.
    assert_clean_sidecar(image)


@needs_plugin
def test_nbdkit_dying_on_its_own_is_reported(image, tmp_path):
    sock = tmp_path / "s"
    with foreground(image, "--socket", sock) as proc:
        read_line(proc)
        (nbdkit,) = children_of(proc.pid)
        os.kill(nbdkit, signal.SIGKILL)
        assert proc.wait(timeout=60) == 1
        assert proc.stderr is not None
        lines = proc.stderr.read().strip().splitlines()
    assert lines and "nbdkit was killed by SIGKILL" in lines[-1], lines
    assert "unclean" in lines[-1], lines  # its writer slot was never released (I4)
    assert not os.path.lexists(sock)


# -- bad input: one line, exit 2, nothing left ---------------------------------


def assert_refused(proc: subprocess.CompletedProcess[str], pattern: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert pattern in lines[0], lines[0]
    assert proc.stdout == ""


@pytest.fixture
def refused(tmp_path: Path) -> Iterator[object]:
    """``refused(pattern, *args, **run_kw)``: serve ARGS must fail with exit
    2 and one line holding PATTERN, and leave tmp_path and the temp folder
    as they were."""
    def check(pattern: str, *args: object, **kwargs: object) -> None:
        before, dirs = listing(tmp_path), private_dirs()
        # A pidfile (created only if the serve wrongly starts) to stop it by;
        # one the test passes comes later and wins.
        pidfile = tmp_path / "refused.pid"
        proc = run_cli("serve", "--pidfile", pidfile, *args, **kwargs)
        if proc.returncode == 0 and pidfile.exists():
            Served(proc.stdout.splitlines(), pidfile).stop()
        assert_refused(proc, pattern)
        assert listing(tmp_path) == before
        assert private_dirs() == dirs

    return check


def test_no_such_image(refused, tmp_path):
    refused("does not exist", tmp_path / "missing.img")


def test_image_not_a_regular_file(refused, tmp_path):
    (tmp_path / "folder").mkdir()
    refused("is a folder", tmp_path / "folder")


@needs_plugin
def test_socket_path_exists(refused, image, tmp_path):
    (tmp_path / "taken").write_text("")
    refused("already exists", image, "--socket", tmp_path / "taken")


@needs_plugin
@pytest.mark.parametrize("where, pattern", [("missing/s", "does not exist"),
                                            ("x" * 120, "longer than 107 bytes")])
def test_socket_path_unusable(refused, image, tmp_path, where, pattern):
    refused(pattern, image, "--socket", tmp_path / where)


@needs_plugin
def test_port_in_use(refused, image):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        refused("in use", image, "--port", s.getsockname()[1])


def test_nbdkit_not_installed(refused, image, tmp_path):
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    refused("apt-get install nbdkit", image, env={**os.environ, "PATH": str(empty)})


@needs_plugin
def test_nbdfuse_not_installed(refused, image, tmp_path):
    only_nbdkit = tmp_path / "bin"
    only_nbdkit.mkdir()
    (only_nbdkit / "nbdkit").symlink_to(shutil.which("nbdkit"))
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    refused("apt-get install libnbd-bin", image, "--fuse", mnt,
            env={**os.environ, "PATH": str(only_nbdkit)})


def test_plugin_not_built(monkeypatch, tmp_path):
    monkeypatch.setattr(blockmirror, "__file__", str(tmp_path / "__init__.py"))
    with pytest.raises(InvalidInputError, match="plugin is not built"):
        plugin.plugin_path()


@needs_plugin
def test_fuse_dir_not_a_folder(refused, image, tmp_path):
    refused("is not a folder", image, "--fuse", tmp_path / "nowhere")


@needs_plugin
def test_pidfile_exists(refused, image, tmp_path):
    (tmp_path / "p.pid").write_text("1\n")
    refused("already exists", image, "--pidfile", tmp_path / "p.pid")


def test_bind_without_port(refused, image):
    refused("--bind needs --port", image, "--bind", "127.0.0.1")


@needs_plugin
def test_image_already_served(refused, image, tmp_path, serve_bg):
    serve_bg(image, "--socket", tmp_path / "first.sock")
    refused("already served", image, "--socket", tmp_path / "second.sock")


@needs_plugin
def test_a_readonly_export_cannot_join_a_writable_one(refused, image, tmp_path, serve_bg):
    serve_bg(image, "--socket", tmp_path / "rw.sock")
    refused("already served", image, "--readonly", "--socket", tmp_path / "ro.sock")


def run_cli_without_prechecks(*args: object, skip: str) -> subprocess.CompletedProcess[str]:
    """``serve ARGS`` with one pre-check (SKIP: "lock", "port", "sidecar") off,
    as if the situation arose between the check and nbdkit's start (a race).
    A serve that wrongly starts is stopped again."""
    patch = {
        "lock": "serve.served_elsewhere = lambda image, readonly: False",
        "port": "serve.TcpEndpoint.check = lambda self: None",
        "sidecar": "serve._check_sidecar = lambda image: None",
    }[skip]
    script = textwrap.dedent(f"""
        import sys
        import blockmirror.frontend.serve as serve
        {patch}
        from blockmirror.cli import main
        sys.exit(main(sys.argv[1:]))
    """)
    pidfile = Path(tempfile.mkdtemp(prefix="bm-test-")) / "wrongly-started.pid"
    proc = subprocess.run([sys.executable, "-c", script, "serve", "--pidfile", str(pidfile),
                           *map(str, args)], capture_output=True, text=True, timeout=60)
    if proc.returncode == 0 and pidfile.exists():
        Served(proc.stdout.splitlines(), pidfile).stop()
    shutil.rmtree(pidfile.parent)
    return proc


@needs_plugin
def test_nbdkit_refusing_a_served_image_is_translated(image, tmp_path, serve_bg):
    """Should the lock check miss it, nbdkit's own refusal is still bad input."""
    serve_bg(image, "--socket", tmp_path / "first.sock")
    before = listing(tmp_path)
    proc = run_cli_without_prechecks(image, "--socket", tmp_path / "second.sock", skip="lock")
    assert_refused(proc, "already served")
    assert listing(tmp_path) == before


@needs_plugin
def test_a_failed_start_removes_the_sidecar_it_created(image, tmp_path):
    before, dirs = listing(tmp_path), private_dirs()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        proc = run_cli_without_prechecks(image, "--port", s.getsockname()[1],
                                         "--pidfile", tmp_path / "p.pid", skip="port")
    assert_refused(proc, "in use")
    assert listing(tmp_path) == before  # no sidecar, no pidfile
    assert private_dirs() == dirs


# -- the fuse file (root and /dev/fuse only) -----------------------------------


def _needs_fuse() -> None:
    if os.geteuid() != 0:
        pytest.skip("nbdfuse mounts need root here")
    if not os.path.exists("/dev/fuse"):
        pytest.skip("no /dev/fuse")
    _tool("nbdfuse")


def _mounted(folder: Path) -> bool:
    with open("/proc/mounts") as f:
        return any(line.split()[1] == str(folder) for line in f)


@needs_plugin
def test_fuse_file_appears_and_reads_back_the_image(image, tmp_path, serve_bg):
    _needs_fuse()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    content = image.read_bytes()
    served = serve_bg(image, "--fuse", mnt)
    assert served.lines[1] == str(mnt / image.name)
    assert _mounted(mnt)
    fuse_file = Path(served.lines[1])
    assert fuse_file.read_bytes() == content
    with open(fuse_file, "r+b") as f:  # written through the export: tracked
        f.seek(3 * MiB)
        f.write(b"\x77" * 65536)
    with open(image, "rb") as f:
        f.seek(3 * MiB)
        assert f.read(65536) == b"\x77" * 65536
    served.stop()
    assert not _mounted(mnt)
    assert_clean_sidecar(image)


@needs_plugin
def test_fuse_file_in_use_delays_the_stop(image, tmp_path):
    _needs_fuse()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with foreground(image, "--fuse", mnt) as proc:
        read_line(proc)
        fuse_file = read_line(proc)
        holder = open(fuse_file, "rb")  # noqa: SIM115 - held across the stop request
        try:
            proc.send_signal(signal.SIGTERM)
            time.sleep(1.0)
            assert proc.poll() is None, "stopped with the fuse file still in use"
            assert holder.read(4096) == image.read_bytes()[:4096]
        finally:
            holder.close()
        assert proc.wait(timeout=60) == 0
    assert not _mounted(mnt)


def test_fuse_dir_not_empty(refused, image, tmp_path):
    if not _plugin_built():
        pytest.skip("the nbdkit plugin is not built")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    (mnt / "keep").write_text("x")
    refused("is not empty", image, "--fuse", mnt)


@needs_plugin
def test_sigkill_of_the_supervisor_leaves_no_mount(image, tmp_path, serve_bg):
    _needs_fuse()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    served = serve_bg(image, "--fuse", mnt, "--socket", tmp_path / "s")
    helpers = children_of(served.pid)
    assert len(helpers) == 2  # nbdkit and nbdfuse
    served.stop(signal.SIGKILL)
    for pid in helpers:
        wait_for(lambda p=pid: not alive(p), 30, "the helpers to follow their supervisor")
    wait_for(lambda: not _mounted(mnt), 10, "the fuse mount to go")
    assert_clean_sidecar(image)


@needs_plugin
@pytest.mark.parametrize("checked", [True, False], ids=["pre-check", "plugin's refusal"])
def test_a_sidecar_made_for_another_file_is_bad_input(tmp_path, checked):
    other, image = tmp_path / "other.img", tmp_path / "disk.img"
    make_data_image(other, 4 * MiB, tracked=True)
    make_data_image(image, 4 * MiB)
    shutil.copy2(f"{other}.cbt", f"{image}.cbt")
    before = listing(tmp_path)
    args = (image, "--socket", tmp_path / "s")
    proc = (run_cli("serve", *args) if checked
            else run_cli_without_prechecks(*args, skip="sidecar"))
    assert_refused(proc, "made for another file")
    assert listing(tmp_path) == before
