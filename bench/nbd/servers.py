"""NBD servers on a unix socket, started and stopped the same way for every
benchmark: ``blockmirror serve`` (nbdkit with blockmirror's plugin),
``nbdkit file`` and ``qemu-nbd``.

``blockmirror`` is ``blockmirror serve IMAGE --socket S --foreground`` when
the command exists; before it did (and where the serve sub-command is
missing) it is nbdkit loading the plugin ``.so`` directly, as
/work/notes/plugin_contract.md describes it; the server's ``how`` says which.
Every server is ready when its socket answers with the NBD greeting.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

SERVERS = ("blockmirror", "nbdkit-file", "qemu-nbd")
BASELINE = "nbdkit-file"
NBD_MAGIC = b"NBDMAGIC"
START_TIMEOUT_S = 20.0


def plugin_path() -> str | None:
    """blockmirror's nbdkit plugin, where ``setup.py`` built it, or None."""
    import blockmirror

    found = sorted(glob.glob(os.path.join(os.path.dirname(blockmirror.__file__),
                                          "_nbdkit_plugin*.so")))
    return found[0] if found else None


def has_serve_command() -> bool:
    """Whether this checkout's CLI has ``blockmirror serve``."""
    try:
        done = subprocess.run([sys.executable, "-m", "blockmirror", "serve", "--help"],
                              capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return False
    return done.returncode == 0


def missing(kind: str) -> str | None:
    """None when server KIND can run here, else why not (one line)."""
    if kind == "qemu-nbd":
        return None if shutil.which("qemu-nbd") else "qemu-nbd not installed (Debian qemu-utils)"
    if shutil.which("nbdkit") is None:
        return "nbdkit not installed (Debian nbdkit)"
    if kind == "blockmirror" and plugin_path() is None:
        return ("blockmirror's nbdkit plugin is not built (needs nbdkit-plugin-dev, then "
                "python3 setup.py build_ext --inplace)")
    return None


@dataclass
class Server:
    kind: str
    image: Path
    socket: Path
    proc: subprocess.Popen[bytes]
    how: str  # the command line, for the report
    log: Path  # the server's stderr

    @property
    def uri(self) -> str:
        return f"nbd+unix:///?socket={self.socket}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def cpu_seconds(self) -> float:
        """CPU time (user + system) the server has used so far, its child
        processes included (``blockmirror serve`` runs nbdkit as one)."""
        return sum(_cpu_seconds(pid) for pid in _process_tree(self.pid))


_TICK = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split()  # after "pid (comm) "


def _cpu_seconds(pid: int) -> float:
    fields = _stat_fields(pid)
    # utime and stime are fields 14 and 15 of stat(5); fields[0] is field 3
    return (int(fields[11]) + int(fields[12])) / _TICK if fields else 0.0


def _process_tree(root: int) -> list[int]:
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (fields := _stat_fields(int(entry))):
            parents[int(entry)] = int(fields[1])
    tree, frontier = [root], [root]
    while frontier:
        frontier = [p for p, pp in parents.items() if pp in frontier]
        tree += frontier
    return tree


def command(kind: str, image: Path, sock: Path, *, use_serve: bool) -> list[str]:
    """The argv that serves IMAGE on SOCK (foreground, one process tree)."""
    if kind == "blockmirror":
        if use_serve:
            return [sys.executable, "-m", "blockmirror", "serve", str(image), "--socket",
                    str(sock), "--foreground"]
        return ["nbdkit", "--foreground", "--exit-with-parent", "-U", str(sock),
                str(plugin_path()), f"image={image}"]
    if kind == "nbdkit-file":
        return ["nbdkit", "--foreground", "--exit-with-parent", "-U", str(sock), "file",
                f"file={image}"]
    if kind == "qemu-nbd":
        # --persistent: serve one client after another; --shared: several at once.
        return ["qemu-nbd", "-f", "raw", "--cache=writeback", "--aio=threads", "-k", str(sock),
                "--persistent", "--shared=16", str(image)]
    raise ValueError(f"unknown server {kind!r}; one of {SERVERS}")


def wait_ready(sock: Path, proc: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    """Until SOCK sends the NBD greeting; raises if PROC dies first."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            err = log.read_text(errors="replace") if log.exists() else ""
            raise RuntimeError(f"server exited (status {proc.returncode}): {err.strip()[-400:]}")
        with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as s:
            s.settimeout(1.0)
            s.connect(str(sock))
            if s.recv(len(NBD_MAGIC), socket.MSG_WAITALL) == NBD_MAGIC:
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"no NBD greeting on {sock} within {timeout:g} s")
        time.sleep(0.02)


def prepare_image(kind: str, image: Path, granularity: int = 64 << 10) -> None:
    """What KIND needs beside the image: blockmirror's plugin a sidecar
    (``blockmirror serve`` creates one itself)."""
    if kind == "blockmirror" and not Path(str(image) + ".cbt").exists():
        from blockmirror.tracking.tracker import Tracker

        Tracker.create(image, granularity).close()


def stop(proc: subprocess.Popen[bytes], grace: float = 10.0) -> int:
    """SIGTERM (nbdkit and serve drain and close the sidecar clean), then SIGKILL."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


@contextlib.contextmanager
def serving(kind: str, image: Path, sock: Path, *, use_serve: bool | None = None,
            granularity: int = 64 << 10) -> Iterator[Server]:
    """Serve IMAGE on SOCK with server KIND for the block; stopped after, even on error."""
    why = missing(kind)
    if why:
        raise RuntimeError(why)
    if use_serve is None:
        use_serve = kind == "blockmirror" and has_serve_command()
    if not (kind == "blockmirror" and use_serve):
        prepare_image(kind, image, granularity)
    with contextlib.suppress(FileNotFoundError):
        sock.unlink()
    argv = command(kind, image, sock, use_serve=use_serve)
    log = sock.with_name(sock.name + ".log")
    # A file, not a pipe nobody drains: a chatty server never blocks on it.
    with open(log, "wb") as err:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=err)
    try:
        wait_ready(sock, proc, log, START_TIMEOUT_S)
        how = " ".join(argv).replace(sys.executable, "python")
        yield Server(kind, image, sock, proc, how, log)
    finally:
        stop(proc)
        with contextlib.suppress(FileNotFoundError):
            sock.unlink()
