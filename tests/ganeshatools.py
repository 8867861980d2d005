"""A real NFS server for the tests: nfs-ganesha with the VFS FSAL, NFSv3,
exporting a folder, inside the second host of :mod:`netnstools`.

NFSv3 needs rpcbind (ganesha refuses to start when it cannot register);
rpcbind runs beside ganesha in the namespace, with a tmpfs over /run in the
private mount namespace ``ip netns exec`` gives them, so its socket never
meets this host's. Both share one process group, which :meth:`Ganesha.stop`
kills whatever happened. NFSv4 is not used: libnfs 4.0 (Debian 12) fails
NFSv4 writes over 4 KiB.

The export's pseudo path is ``/export``; with Mount_Path_Pseudo a client
mounts that, and a file NAME in the folder is ``nfs://IP/export/NAME``. The
server skips its grace period (Graceless), so a restarted server takes
writes at once. Root only: :func:`require_ganesha` skips the test otherwise
(or where ganesha, its VFS FSAL or rpcbind is missing); one installed that
does not start fails it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from netnstools import Link

PSEUDO = "/export"
NFS_PORT = 2049
MOUNT_PORT = 20048
RPCBIND_PORT = 111

CONFIG = """
NFS_CORE_PARAM {{
    Protocols = 3;
    NFS_Port = {nfs_port};
    MNT_Port = {mount_port};
    Bind_addr = {address};
    Enable_NLM = false;
    Enable_RQUOTA = false;
    Enable_UDP = false;
    Mount_Path_Pseudo = true;
}}
NFSV4 {{
    Graceless = true;
    RecoveryBackend = fs;
    RecoveryRoot = {state};
}}
NFS_KRB5 {{ Active_krb5 = false; }}
EXPORT {{
    Export_Id = 1;
    Path = {folder};
    Pseudo = {pseudo};
    Access_Type = RW;
    Squash = No_Root_Squash;
    SecType = sys;
    Protocols = 3;
    Transports = TCP;
    FSAL {{ Name = VFS; }}
}}
"""

# Run inside the namespace: a private /run for rpcbind, then ganesha in its
# place (so the Popen's pid is ganesha's; rpcbind stays in its group).
START = """set -e
mount -t tmpfs -o size=4m bm-ganesha-run /run
mkdir -p /run/rpcbind
rpcbind -f &
for i in $(seq 100); do [ -S /run/rpcbind.sock ] && break; sleep 0.05; done
exec ganesha.nfsd -F -f "$1" -L "$2" -p "$3" -N NIV_EVENT
"""


def require_ganesha() -> None:
    """Skip unless this host can run ganesha in a namespace."""
    if os.geteuid() != 0:
        pytest.skip("nfs-ganesha in a network namespace needs root")
    for tool, package in (("ganesha.nfsd", "nfs-ganesha"), ("rpcbind", "rpcbind")):
        if shutil.which(tool) is None:
            pytest.skip(f"needs {tool} (Debian {package})")
    if not any(Path(d, "libfsalvfs.so").exists() for d in
               ("/usr/lib/x86_64-linux-gnu/ganesha", "/usr/lib/ganesha", "/usr/lib64/ganesha")):
        pytest.skip("needs ganesha's VFS FSAL (Debian nfs-ganesha-vfs)")


class Ganesha:
    """ganesha (and its rpcbind) in LINK's namespace, exporting FOLDER;
    its config, log and state under STATE_DIR."""

    def __init__(self, link: Link, folder: Path, state_dir: Path) -> None:
        self.link, self.folder, self.state_dir = link, folder, state_dir
        self.config = state_dir / "ganesha.conf"
        self.log = state_dir / "ganesha.log"
        (state_dir / "recovery").mkdir(parents=True, exist_ok=True)
        self.config.write_text(CONFIG.format(
            nfs_port=NFS_PORT, mount_port=MOUNT_PORT, address=link.remote_ip,
            state=state_dir / "recovery", folder=folder, pseudo=PSEUDO))
        self.proc: subprocess.Popen[bytes] | None = None

    def url(self, name: str, query: str = "", host: str | None = None) -> str:
        """NAME's URL on this server, or through HOST (a relay in front of it)."""
        return (f"nfs://{host or self.link.remote_ip}{PSEUDO}/{name}"
                + (f"?{query}" if query else ""))

    def start(self, timeout: float = 30) -> None:
        self.log.write_text("")
        script = self.state_dir / "start.sh"
        script.write_text(START)
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", self.link.netns, "sh", str(script), str(self.config),
             str(self.log), str(self.state_dir / "ganesha.pid")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout
        while not self._ready():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                log = self.log.read_text(errors="replace")[-2000:]
                self.stop()
                # Installed (require_ganesha) but not serving: a failure, not a
                # skip, or a broken config would silently skip every NFS test.
                pytest.fail(f"nfs-ganesha did not start: {log.strip() or 'no log'}")
            time.sleep(0.1)

    def _ready(self) -> bool:
        if "NFS SERVER INITIALIZED" not in self.log.read_text(errors="replace"):
            return False
        for port in (RPCBIND_PORT, MOUNT_PORT, NFS_PORT):
            with socket.socket() as s:
                s.settimeout(1)
                try:
                    s.connect((self.link.remote_ip, port))
                except OSError:
                    return False
        return True

    def kill_server(self) -> None:
        """SIGKILL ganesha alone: the server dies mid-whatever (rpcbind stays)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        """Kill ganesha and rpcbind (the whole group this started)."""
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()


@contextlib.contextmanager
def ganesha(link: Link, folder: Path, state_dir: Path) -> Iterator[Ganesha]:
    """A started server exporting FOLDER, always stopped at the end. Mount
    anything under FOLDER before: ganesha sees the mounts of its start."""
    require_ganesha()
    server = Ganesha(link, folder, state_dir)
    try:
        server.start()
        yield server
    finally:
        server.stop()
