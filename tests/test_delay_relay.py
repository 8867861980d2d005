"""The link the remote tests stand on: where the kernel has no netem, a
relay in C (tests/delay_relay.c) must hold every byte its delay each way,
so a request through it pays a real round trip, and must carry a stream
whole and in order."""

from __future__ import annotations

import os
import socket
import statistics
import subprocess
import threading
import time

import pytest
from netnstools import Link, delayed
from relaytools import delay_relay

PORT = 10899


def _echo_server(ip: str) -> socket.socket:
    listener = socket.create_server((ip, PORT))

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            while data := conn.recv(1 << 16):
                conn.sendall(data)

    threading.Thread(target=serve, daemon=True).start()
    return listener


@pytest.fixture
def relay_to_echo() -> object:
    if subprocess.run(["sh", "-c", "command -v cc"], capture_output=True).returncode != 0:
        pytest.skip("needs a C compiler for the relay")
    listener = _echo_server("127.0.0.1")
    try:
        with delay_relay("127.0.0.3", "127.0.0.1", [PORT], delay_ms=2.0):
            yield ("127.0.0.3", PORT)
    finally:
        listener.close()


def test_each_round_trip_pays_twice_the_delay(relay_to_echo):
    with socket.create_connection(relay_to_echo) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        trips = []
        for _ in range(20):
            started = time.perf_counter()
            s.sendall(b"x")
            assert s.recv(1) == b"x"
            trips.append(time.perf_counter() - started)
    assert statistics.median(trips) >= 0.004  # 2 ms there, 2 ms back
    assert statistics.median(trips) < 0.05


def test_a_stream_comes_back_whole_and_in_order(relay_to_echo):
    sent = os.urandom(8 << 20)
    got = bytearray()
    with socket.create_connection(relay_to_echo) as s:
        reader = threading.Thread(target=lambda: _read_into(s, got, len(sent)))
        reader.start()
        s.sendall(sent)
        reader.join(30)
    assert bytes(got) == sent


def _read_into(s: socket.socket, got: bytearray, n: int) -> None:
    while len(got) < n and (data := s.recv(1 << 20)):
        got += data


def test_a_link_netem_delays_needs_no_relay():
    link = Link("ns", "10.213.0.1", "10.213.0.2", True, "dev")
    with delayed(link, [PORT]) as host:
        assert host == "10.213.0.2"
