"""The plugin under the tracker's fault rules (issue 9): a SIGKILLed nbdkit
leaves its sidecar unclean and the next sync distrusts it (I4); a freeze
holds NBD writes, trims and zeroes, and a lease that runs out lets them go
(I3)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from imagetools import MiB, make_data_image, read_at, run_cli
from nbdlog import WriteLog
from nbdtools import Exports, NbdClient

from blockmirror import Tracker

G = 64 * 1024


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Exports]:
    with Exports(tmp_path) as exports:
        yield exports


class Pending(threading.Thread):
    """One NBD request run in the background; when its reply came."""

    def __init__(self, request: Callable[[], None]) -> None:
        super().__init__(daemon=True)
        self.request = request
        self.done_at: float | None = None
        self.error: BaseException | None = None
        self.finished = threading.Event()
        self.start()

    def run(self) -> None:
        try:
            self.request()
        except BaseException as e:  # checked by the test
            self.error = e
        self.done_at = time.monotonic()
        self.finished.set()


def sync_json(*args: object) -> dict[str, object]:
    proc = run_cli("sync", *args, "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_sigkilled_nbdkit_leaves_the_sidecar_unclean(serve, tmp_path):
    """A first sync makes a copy exact at a change id; then nbdkit is killed
    with SIGKILL while four connections write. The sidecar must be unclean,
    so the next (incremental) sync of the same copy cannot use the change
    id: it re-checks every granule, and the copy is exactly the image."""
    (tmp_path / "dst").mkdir()
    image = tmp_path / "killed.img"
    make_data_image(image, 16 * MiB, extents=6, extent_size=1 * MiB, seed=6)
    export = serve.start(image)
    log = WriteLog(str(export.socket), 16 * MiB).start()
    log.wait_for(50)
    first = sync_json(image, tmp_path / "dst", "--target-downtime", "300ms")
    assert first["change_id"]
    log.wait_for(50)
    export.kill()
    for w in log.writers:  # each meets the dead server on its next request
        w.join(10)
    errors = log.stop(check=False)
    assert len(errors) == len(log.writers), "the kill did not come mid-stream"
    with Tracker.open(image) as t:
        assert not t.consistent, "a SIGKILLed nbdkit left a sidecar that claims to be clean"
    again = sync_json(image, tmp_path / "dst")
    notes = " ".join(map(str, again["notes"]))
    assert "hash resync" in notes and "unclean" in notes, notes
    assert "incremental since change id" not in notes
    assert (tmp_path / "dst" / "killed.img").read_bytes() == image.read_bytes()
    with Tracker.open(image) as t:
        assert t.consistent  # the sync accepted (reset) it


def requests_during_a_freeze(image: Path, clients: list[NbdClient]) -> list[Pending]:
    """A write, a zero and a trim, each on its own connection, into granules
    3, 5 and 7 (which hold data)."""
    write, zero, trim = clients
    return [Pending(lambda: write.pwrite(b"held write", 3 * G + 10)),
            Pending(lambda: zero.zero(1000, 5 * G + 10, may_trim=False)),
            Pending(lambda: trim.trim(G, 7 * G))]


def assert_landed(image: Path) -> None:
    assert read_at(image, 3 * G + 10, 10) == b"held write"
    assert read_at(image, 5 * G + 10, 1000) == bytes(1000)
    assert read_at(image, 7 * G, G) == bytes(G)


@pytest.fixture
def frozen_setup(serve, tmp_path) -> Iterator[tuple[Path, bytes, list[NbdClient]]]:
    image = tmp_path / "frozen.img"
    initial = make_data_image(image, 4 * MiB, extents=1, extent_size=4 * MiB, seed=7)
    export = serve.start(image)
    clients = [NbdClient(export.socket) for _ in range(3)]
    try:
        yield image, initial, clients
    finally:
        for c in clients:
            c.close()


def test_a_freeze_holds_nbd_writes_until_thaw(frozen_setup):
    image, initial, clients = frozen_setup
    with Tracker.open(image) as copier:
        copier.freeze(30)
        pending = requests_during_a_freeze(image, clients)
        time.sleep(0.5)
        assert not any(p.finished.is_set() for p in pending), "a request completed while frozen"
        assert image.read_bytes() == initial  # and nothing of them reached the image
        assert copier.dirty_bytes() == 0
        thawed = time.monotonic()
        copier.thaw()
        for p in pending:
            assert p.finished.wait(10)
            assert p.error is None, p.error
            assert p.done_at is not None and p.done_at - thawed < 2.0
        assert_landed(image)
        assert copier.dirty_extents() == [(3 * G, G), (5 * G, G), (7 * G, G)]


def test_a_lease_that_runs_out_releases_nbd_writes(frozen_setup):
    """The copier freezes and never thaws: the requests complete once the
    lease is over (measured from the freeze), not before, not much later."""
    image, initial, clients = frozen_setup
    lease = 1.5
    with Tracker.open(image) as copier:
        before = time.monotonic()
        copier.freeze(lease)
        after = time.monotonic()
        pending = requests_during_a_freeze(image, clients)
        time.sleep(0.5)
        assert not any(p.finished.is_set() for p in pending), "a request completed while frozen"
        assert image.read_bytes() == initial
        for p in pending:
            assert p.finished.wait(lease + 10)
            assert p.error is None, p.error
            assert p.done_at is not None
            assert p.done_at - before >= lease - 0.05, "released before the lease ran out"
            assert p.done_at - after <= lease + 1.0, "held long after the lease ran out"
        assert not copier.freeze_holds()
        assert_landed(image)
        copier.thaw()
    clients[0].pwrite(b"after", 9 * G)  # and the export goes on as before
    assert read_at(image, 9 * G, 5) == b"after"

