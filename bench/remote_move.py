"""The switch of `sync --move` onto an NBD export against a local move, same
run, interleaved rounds (issue 12).

    python bench/remote_move.py [--rounds 3] [--writers 2] [--rate 4M]

As root: the export's server (nbdkit file, qemu-nbd -e 8) runs in a second
network namespace behind a veth pair, limited to 1 Gbit/s with tbf where
the kernel has no netem (then nbdkit's delay filter holds each request 1 ms
at the server and qemu-nbd runs without a delay, which the output says).
Each round moves a fresh 32 MiB tracked image (8 MiB of data) in /dev/shm
with WRITERS logging writer processes at RATE each, once onto each server
and once into a local folder. Reported: the pause under the freeze (the
result's downtime: final pass, flush, redirect) and the longest single
write any writer saw, which for a move onto an export also pays that
writer's connect to it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from imagetools import MiB, WriterProcess, make_data_image, run_cli
from netnstools import two_hosts
from test_remote_move import SERVER_DELAY, _tbf
from test_remote_nbd import Server

SIZE = 32 * MiB
PORT = 10809


def move_once(tmp: Path, tag: str, dst: str, writers: int, rate: str) -> tuple[float, float]:
    """(pause ms, longest write ms) of one move of a fresh image to DST."""
    image = tmp / f"{tag}.img"
    make_data_image(image, SIZE, extents=8, tracked=True)
    region = SIZE // writers
    procs = [WriterProcess(image, tmp / f"{tag}-{i}.log", rate=rate, seed=3 + i,
                           extra=["--region", str(region), "--base", str(i * region),
                                  "--stats", str(tmp / f"{tag}-{i}.json"), "--timeline", "0.5"])
             for i in range(writers)]
    try:
        for w in procs:
            w.wait_for_writes(15)
        done = run_cli("sync", image, dst, "--move", "--target-downtime", "500ms", "--json")
        if done.returncode != 0:
            raise SystemExit(done.stderr)
    finally:
        codes = [w.stop() for w in procs]
    if codes != [0] * writers:
        raise SystemExit(f"writer exit codes {codes}")
    longest = max(json.loads((tmp / f"{tag}-{i}.json").read_text())["max_write_seconds"]
                  for i in range(writers))
    return json.loads(done.stdout)["downtime"] * 1000, longest * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--writers", type=int, default=2)
    parser.add_argument("--rate", default="4M")
    args = parser.parse_args()
    found: dict[str, list[tuple[float, float]]] = {}
    with two_hosts(0.5, "1gbit") as link:
        if not link.shaped:
            peer = subprocess.run(["ip", "-n", link.netns, "-o", "link", "show", "type", "veth"],
                                  capture_output=True, text=True).stdout.split(":")[1]
            tbf = _tbf(None, link.local_dev) and _tbf(link.netns, peer.strip().partition("@")[0])
            print(f"no netem: tbf 1 Gbit/s {'on' if tbf else 'refused'}; nbdkit delays 1 ms "
                  "per request, qemu-nbd undelayed")
        tmp = Path(tempfile.mkdtemp(prefix="bm-move-", dir="/dev/shm"))
        try:
            for r in range(args.rounds):
                for kind in ("nbdkit", "qemu-nbd", "local"):
                    tag = f"{kind}-{r}"
                    if kind == "local":
                        (tmp / tag).mkdir()
                        ms = move_once(tmp, tag, str(tmp / tag), args.writers, args.rate)
                    else:
                        export = tmp / f"{tag}.export"
                        with open(export, "wb") as f:
                            f.truncate(SIZE)
                        delay = SERVER_DELAY if kind == "nbdkit" and not link.shaped else ()
                        server = Server(kind, export, None, tcp=(link.remote_ip, PORT),
                                        netns=link.netns, filters=delay, shared=8)
                        try:
                            ms = move_once(tmp, tag, server.uri, args.writers, args.rate)
                        finally:
                            server.stop()
                    found.setdefault(kind, []).append(ms)
                    print(f"round {r} {kind:8}: pause {ms[0]:6.1f} ms, longest write "
                          f"{ms[1]:6.1f} ms", flush=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    local = statistics.median(p for p, _ in found["local"])
    for kind, runs in found.items():
        pause = statistics.median(p for p, _ in runs)
        print(f"{kind:8}: median pause {pause:.1f} ms ({pause / local:.1f}x local), median "
              f"longest write {statistics.median(w for _, w in runs):.1f} ms")


if __name__ == "__main__":
    main()
