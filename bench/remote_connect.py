"""How long opening an NBD export takes over a link with real round trips:
one connection, and the four of a multi-conn export, which blockmirror
connects at once after the first (the first says whether the server takes
more). Beside it, `nbdinfo --size` on the same link (one connection, C,
its process start included). Then the same for mounting an NFS export
(nfs-ganesha) on one and on four connections, all four at once, beside
`nfs-ls` of the export (one mount, C, its start included).

    python bench/remote_connect.py [--delay-ms 0.5] [--rounds 9]   # root

The servers (nbdkit file, qemu-nbd -e 8) run in a network namespace behind
a veth pair; the link's delay comes from netem where the kernel has it,
else from the relay in C in front of the server (tests/delay_relay.c,
D ms each way). Medians of interleaved rounds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

PORT = 10809


def _server(kind: str, link: object, file: Path) -> subprocess.Popen[bytes]:
    ip = link.remote_ip  # type: ignore[attr-defined]
    argv = (["nbdkit", "-f", "-i", ip, "-p", str(PORT), "file", f"file={file}"]
            if kind == "nbdkit" else
            ["qemu-nbd", "-t", "-e", "8", "-f", "raw", "-b", ip, "-p", str(PORT), str(file)])
    proc = subprocess.Popen(["ip", "netns", "exec", link.netns, *argv],  # type: ignore[attr-defined]
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    uri = f"nbd://{ip}:{PORT}/"
    for _ in range(300):
        if subprocess.run(["nbdinfo", "--size", uri], capture_output=True).returncode == 0:
            return proc
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"{kind} did not start")


def _rounds(uri: str, rounds: int) -> dict[str, float]:
    from blockmirror.copying.endpoint import parse
    from blockmirror.copying.remote import NbdExport

    times: dict[str, list[float]] = {"1 connection": [], "4 connections": [], "nbdinfo": []}
    for _ in range(rounds):
        for conns in (1, 4):
            started = time.perf_counter()
            export = NbdExport(parse(uri), connections=conns, write=True)
            times[f"{conns} connection{'s' if conns > 1 else ''}"].append(
                time.perf_counter() - started)
            assert export.connections == conns
            export.close()
        started = time.perf_counter()
        subprocess.run(["nbdinfo", "--size", uri], capture_output=True, check=True)
        times["nbdinfo"].append(time.perf_counter() - started)
    return {k: statistics.median(v) * 1000 for k, v in times.items()}


def _nfs_rounds(url: str, export_url: str, rounds: int) -> dict[str, float]:
    from blockmirror.copying.endpoint import parse
    from blockmirror.copying.nfs import NfsFile

    times: dict[str, list[float]] = {"1 connection": [], "4 connections": [], "nfs-ls": []}
    for _ in range(rounds):
        for conns in (1, 4):
            started = time.perf_counter()
            nfs_file = NfsFile(parse(url), connections=conns)  # type: ignore[arg-type]
            times[f"{conns} connection{'s' if conns > 1 else ''}"].append(
                time.perf_counter() - started)
            assert nfs_file.connections == conns
            nfs_file.close()
        started = time.perf_counter()
        subprocess.run(["nfs-ls", export_url], capture_output=True, check=True)
        times["nfs-ls"].append(time.perf_counter() - started)
    return {k: statistics.median(v) * 1000 for k, v in times.items()}


def _nfs(link: object, work: Path, args: argparse.Namespace) -> None:
    from ganeshatools import MOUNT_PORT, NFS_PORT, RPCBIND_PORT, ganesha
    from netnstools import delayed

    folder = work / "nfs-export"
    folder.mkdir()
    with ganesha(link, folder, work / "ganesha") as server, \
            delayed(link, [RPCBIND_PORT, MOUNT_PORT, NFS_PORT], args.delay_ms) as host:
        url = server.url("disk.img", host=host)
        m = _nfs_rounds(url, url.rsplit("/", 1)[0], args.rounds)
    print(f"{'ganesha':9s} " + ", ".join(f"{k} {v:.1f} ms" for k, v in m.items()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--delay-ms", type=float, default=0.5, help="each way (default 0.5)")
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("needs root (a network namespace)", file=sys.stderr)
        return 2
    from netnstools import delayed, two_hosts

    with tempfile.TemporaryDirectory(dir="/dev/shm") as work:
        file = Path(work) / "export.img"
        with open(file, "wb") as f:
            f.truncate(1 << 30)
        with two_hosts(delay_ms=args.delay_ms, rate="10gbit") as link:
            how = "netem" if link.shaped else "a relay in C"
            print(f"link: {args.delay_ms} ms each way ({how}); medians of {args.rounds} rounds")
            for kind in ("nbdkit", "qemu-nbd"):
                proc = _server(kind, link, file)
                try:
                    with delayed(link, [PORT], args.delay_ms) as host:
                        m = _rounds(f"nbd://{host}:{PORT}/", args.rounds)
                finally:
                    proc.terminate()
                    proc.wait()
                print(f"{kind:9s} " + ", ".join(f"{k} {v:.1f} ms" for k, v in m.items()))
            _nfs(link, Path(work), args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
