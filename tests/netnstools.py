"""A second host on this machine: a network namespace joined to this one by
a veth pair, each end shaped with ``tc netem`` (a delay, optionally a rate),
so every request to a server inside pays a real round trip (issue 12).

Root only; :func:`two_hosts` skips the test otherwise, and always removes
the pair and the namespace, even when the test fails. A kernel without the
netem qdisc (this project's VMs have none) still gets the two hosts, with
``Link.shaped`` False and the rate, if asked, from ``tc tbf`` instead:
callers then delay requests through :func:`delayed` (a relay in C on this
side, tests/delay_relay.c) or at the server (nbdkit's delay filter) and say
so. The addresses are a /30 of 10.213.0.0/16 picked from the pid, on links
that exist only here.
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


def _tc(netns: str | None, dev: str, qdisc: list[str]) -> subprocess.CompletedProcess[str]:
    argv = ["tc", "qdisc", "add", "dev", dev, "root", *qdisc]
    if netns:
        argv = ["ip", "netns", "exec", netns, *argv]
    return subprocess.run(argv, capture_output=True, text=True)


def _shape(netns: str | None, dev: str, delay_ms: float, rate: str | None) -> bool:
    """Shape DEV with netem; False where the kernel has no netem qdisc (the
    rate then comes from tbf, which it has)."""
    done = _tc(netns, dev, ["netem", "delay", f"{delay_ms}ms", *(["rate", rate] if rate else [])])
    if done.returncode != 0 and "unknown" in done.stderr:
        if rate:
            done = _tc(netns, dev, ["tbf", "rate", rate, "burst", "256k", "latency", "50ms"])
            if done.returncode != 0:
                raise subprocess.CalledProcessError(done.returncode, done.args, done.stdout,
                                                    done.stderr)
        return False
    if done.returncode != 0:
        raise subprocess.CalledProcessError(done.returncode, done.args, done.stdout, done.stderr)
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
        shaped = _shape(None, here, delay_ms, rate) and _shape(netns, there, delay_ms, rate)
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


@contextlib.contextmanager
def delayed(link: Link, ports: list[int], delay_ms: float = 0.5) -> Iterator[str]:
    """The address to reach LINK's server on PORTS with DELAY_MS each way:
    the server's own where netem delays the link; otherwise a relay in C on
    a loopback address of this process's (tests/delay_relay.c), started
    now, so every request still pays a real round trip. Start the server
    first: the relay connects to it on each connection it accepts."""
    if link.shaped:
        yield link.remote_ip
        return
    from relaytools import delay_relay

    relay_ip = "127." + link.local_ip.split(".", 1)[1]  # as unique as the link's /30
    with delay_relay(relay_ip, link.remote_ip, ports, delay_ms):
        yield relay_ip
