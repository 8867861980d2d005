"""Connecting to an NBD export costs round trips, not delayed ACKs (issue 12).

qemu-nbd sends some handshake replies (the meta context's, NBD_OPT_GO's
info) in small pieces without TCP_NODELAY, so each next piece waited for
the client's delayed ACK: ~40 ms twice, ~88 ms a connection, 350 ms for a
sync's four, serially, before the first byte was copied. The client now
asks for quick ACKs while it shakes hands (csrc/remote/nbd.c). Root only
(a network namespace: the delayed ACK needs TCP; loopback has it too, but
the two hosts are how issue 12 measures).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from netnstools import two_hosts
from test_remote_nbd import PORT, Server

from blockmirror.copying import endpoint
from blockmirror.copying.remote import NbdExport, libnbd_available

pytestmark = pytest.mark.skipif(not libnbd_available(),
                                reason="blockmirror._remote not built (needs libnbd-dev)")


@pytest.mark.parametrize("kind", ["qemu-nbd", "nbdkit"])
def test_connections_are_made_without_waiting_for_delayed_acks(kind, tmp_path: Path):
    """Four connections asked for (as many as the server allows: qemu-nbd
    without -e offers one, nbdkit's file plugin four)."""
    image = tmp_path / "export.img"
    with open(image, "wb") as f:
        f.truncate(16 << 20)
    with two_hosts(delay_ms=0.5, rate="1gbit") as link:
        server = Server(kind, image, None, tcp=(link.remote_ip, PORT), netns=link.netns)
        try:
            uri = endpoint.parse(server.uri)
            assert isinstance(uri, endpoint.NbdUri)
            best = float("inf")
            for _ in range(3):
                started = time.perf_counter()
                export = NbdExport(uri, connections=4, write=True)
                best = min(best, time.perf_counter() - started)
                made = export.connections
                export.close()
        finally:
            server.stop()
    assert made >= 1
    # A handshake is a few round trips (1 ms each with netem; less without):
    # even four of them stay below one delayed ACK (~40 ms), let alone two.
    assert best < 0.03, f"{made} connection(s) took {best * 1e3:.0f} ms"


def test_an_untracked_sync_into_an_export_never_loads_numpy(tmp_path: Path):
    """Nothing after the copy needs numpy there (no manifest is kept for an
    untracked source), so the command must not pay its import at all."""
    import json
    import os
    import subprocess
    import sys

    from test_fast_start import PROBE, REPO

    size = 8 << 20
    source, export = tmp_path / "src.img", tmp_path / "export.img"
    with open(source, "wb") as f:
        f.truncate(size)
        f.seek(1 << 20)
        f.write(os.urandom(1 << 20))
    with open(export, "wb") as f:
        f.truncate(size)
    server = Server("nbdkit", export, tmp_path / "nbd.sock")
    try:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]))
        out = subprocess.run([sys.executable, "-c", PROBE, "sync", "--quiet", str(source),
                              server.uri], cwd=tmp_path, env=env, capture_output=True,
                             text=True, timeout=120)
        report = json.loads(out.stderr.strip().splitlines()[-1])
    finally:
        server.stop()
    assert report["code"] == 0, out.stderr
    assert "numpy" not in report["loaded"]
    assert export.read_bytes() == source.read_bytes()
