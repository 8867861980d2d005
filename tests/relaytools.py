"""A TCP relay holding every byte a fixed time each way (delay_relay.c),
for tests and benchmarks on kernels without netem: every request through it
pays a real round trip, and, being C with a reader and a sender per
direction, it adds latency without becoming the bottleneck (a relay in
Python held a 1 GiB copy to ~110 MiB/s).

    with delay_relay("127.0.0.2", server_ip, [10809], delay_ms=0.5):
        ...  # connect to 127.0.0.2:10809

Built with the system's C compiler on first use, into a cache folder keyed
by the source's hash.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

SOURCE = Path(__file__).with_name("delay_relay.c")


def build() -> Path:
    """The relay's binary, compiled once per version of its source."""
    tag = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:16]
    binary = Path(tempfile.gettempdir()) / "blockmirror-relay" / f"delay_relay-{tag}"
    if not binary.exists():
        binary.parent.mkdir(parents=True, exist_ok=True)
        partial = binary.with_name(f"{binary.name}.{os.getpid()}.partial")
        subprocess.run(["cc", "-O2", "-Wall", "-Wextra", "-pthread", "-o", str(partial),
                        str(SOURCE)], check=True)
        partial.rename(binary)
    return binary


@contextmanager
def delay_relay(listen_ip: str, target_ip: str, ports: Iterable[int],
                delay_ms: float) -> Iterator[None]:
    """LISTEN_IP:PORT relayed to TARGET_IP:PORT for each of PORTS, DELAY_MS
    each way, while the block runs."""
    argv = [str(build()), listen_ip, target_ip, str(round(delay_ms * 1000)),
            *(str(p) for p in ports)]
    relay = subprocess.Popen(argv, stdout=subprocess.PIPE)
    try:
        assert relay.stdout is not None
        if relay.stdout.readline().strip() != b"ready":
            raise RuntimeError(f"the delay relay did not start (exit {relay.wait()})")
        yield
    finally:
        relay.kill()
        relay.wait()
