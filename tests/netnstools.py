"""A second host on this machine: a network namespace joined to this one by
a veth pair, each end shaped with ``tc netem`` (a delay, optionally a rate),
so every request to a server inside pays a real round trip (issue 12).

Root only; :func:`two_hosts` skips the test otherwise, and always removes
the pair and the namespace, even when the test fails. A kernel without the
netem qdisc (this project's VMs have none) still gets the two hosts, with
``Link.shaped`` False: callers then delay requests at the server instead
(nbdkit's delay filter) and say so. The addresses are a
/30 of 10.213.0.0/16 picked from the pid, on links that exist only here.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass

import pytest


@dataclass(frozen=True)
class Link:
    netns: str        # where the server runs: ``ip netns exec NETNS ...``
    local_ip: str     # this side's address
    remote_ip: str    # the namespace's address (the server's)
    shaped: bool      # whether netem delays the link (False: the kernel lacks netem)
    local_dev: str    # this side's veth end (``ip link set DEV down`` cuts the link)


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


def _netem(netns: str | None, dev: str, delay_ms: float, rate: str | None) -> bool:
    """Shape DEV; False where the kernel has no netem qdisc."""
    argv = ["tc", "qdisc", "add", "dev", dev, "root", "netem", "delay", f"{delay_ms}ms"]
    if rate:
        argv += ["rate", rate]
    if netns:
        argv = ["ip", "netns", "exec", netns, *argv]
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0 and "unknown" in done.stderr:
        return False
    if done.returncode != 0:
        raise subprocess.CalledProcessError(done.returncode, argv, done.stdout, done.stderr)
    return True


def can_make_hosts() -> str | None:
    """Why two hosts cannot be made here, or None."""
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"needs {tool}"
    return None


@contextlib.contextmanager
def two_hosts(delay_ms: float = 1.0, rate: str | None = None, tag: int = 0) -> Iterator[Link]:
    """A namespace behind a veth pair with DELAY_MS each way (so a round
    trip of twice that) and RATE (``tc`` syntax, e.g. 1gbit) if given."""
    reason = can_make_hosts()
    if reason:
        pytest.skip(reason)
    pid = os.getpid() % 16384
    netns, here, there = f"bm{pid}n{tag}", f"bm{pid}a{tag}", f"bm{pid}b{tag}"
    subnet = (pid * 8 + (tag % 2) * 4) % 65536  # a /30 of our own
    local_ip = f"10.213.{subnet // 256}.{subnet % 256 + 1}"
    remote_ip = f"10.213.{subnet // 256}.{subnet % 256 + 2}"
    made: list[str] = []
    try:
        _ip("netns", "add", netns)
        made.append("netns")
        _ip("link", "add", here, "type", "veth", "peer", "name", there)
        made.append("link")
        _ip("link", "set", there, "netns", netns)
        _ip("addr", "add", f"{local_ip}/30", "dev", here)
        _ip("link", "set", here, "up")
        _ip("-n", netns, "addr", "add", f"{remote_ip}/30", "dev", there)
        _ip("-n", netns, "link", "set", there, "up")
        _ip("-n", netns, "link", "set", "lo", "up")
        shaped = _netem(None, here, delay_ms, rate) and _netem(netns, there, delay_ms, rate)
    except (subprocess.CalledProcessError, OSError) as e:
        _remove(made, netns, here)
        pytest.skip(f"cannot make a network namespace here: {getattr(e, 'stderr', e)}")
    try:
        yield Link(netns, local_ip, remote_ip, shaped, here)
    finally:
        _remove(made, netns, here)


def _remove(made: list[str], netns: str, here: str) -> None:
    if "link" in made:
        subprocess.run(["ip", "link", "del", here], capture_output=True)
    if "netns" in made:
        subprocess.run(["ip", "netns", "del", netns], capture_output=True)
