"""`blockmirror sync` to an ``nfs://`` URL against libnfs's `nfs-cp` to the
same server, same run, interleaved rounds (issue 12: faster than nfs-cp by
the depth of requests in flight).

    python bench/remote_nfs.py [--size 1024] [--data 256] [--rounds 3] [--workers 4]
                               [--delay-ms 0]

Root only: nfs-ganesha (VFS FSAL, NFSv3) runs in a network namespace behind
a veth pair (tests/ganeshatools.py), exporting a folder in /dev/shm. netem
shapes the link where the kernel has it (0.5 ms each way); where it does not
the output says "unshaped", and --delay-ms D puts a TCP relay in C
(tests/delay_relay.c) on 127.0.0.2 in front of the server instead, holding every
byte D ms each way (both tools go through it; it is CPU too, on a 2-core
machine). The source
is SIZE MiB with DATA MiB of random data in 4 MiB runs spread evenly, the
rest holes (in /dev/shm). nfs-cp copies every byte, one 1 MiB request at a
time; blockmirror reads the source's data only and keeps up to 16 WRITE3
calls in flight on each of WORKERS connections, then commits (COMMIT3) and
renames. Each tool's target is removed (through the server) before its
round. Times are wall clock of the whole command; the ratio is nfs-cp's time
over blockmirror's: above 1.0 blockmirror is faster.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

MiB = 1 << 20
RUN = 4 * MiB


def _source(path: Path, size: int, data: int) -> None:
    """SIZE bytes, DATA of them random in RUN-sized runs spread evenly."""
    runs = max(1, data // RUN)
    stride = max(RUN, (size // runs) // RUN * RUN)
    with open(path, "wb") as f:
        f.truncate(size)
        for k in range(runs):
            f.seek(min(k * stride, size - RUN))
            f.write(os.urandom(RUN))


def _remove(url: str) -> None:
    """Remove URL's file through the server: unlinked behind its back, ganesha
    would still think it exists (its cache) and refuse to create it again."""
    from blockmirror.copying.endpoint import NfsUrl, parse
    from blockmirror.copying.nfs import NfsFile

    where = parse(url)
    assert isinstance(where, NfsUrl)
    with NfsFile(where, connections=1) as nfs_file:
        nfs_file.discard(nfs_file.target)  # None, or why not (it was not there)


RELAY_IP = "127.0.0.2"
RELAY_PORTS = (111, 20048, 2049)  # rpcbind, mountd, nfsd (tests/ganeshatools.py)


def _sync_command(src: str, dst: str, workers: int, *extra: str) -> tuple[float, float]:
    """`blockmirror sync SRC DST --json`: (wall seconds, the sync's own elapsed)."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "blockmirror", "sync", src, dst, "--json",
                           "--workers", str(workers), *extra], capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"blockmirror sync failed: {done.stderr}")
    return wall, float(json.loads(done.stdout)["elapsed"])


def _blockmirror(src: Path, url: str, workers: int) -> tuple[float, float]:
    _remove(url)
    return _sync_command(str(src), url, workers)


def _nfs_cp(src: Path, url: str) -> float:
    _remove(url)
    started = time.perf_counter()
    subprocess.run(["nfs-cp", str(src), url], check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - started


def _rounds_from(src: Path, server: object, folder: Path, args: argparse.Namespace
                 ) -> dict[str, float]:
    """--from-server: the served copy of SRC into a new local file, by both
    tools (blockmirror with --quiesced: nothing writes it)."""
    shutil.copyfile(src, folder / "served.img")  # sparse: the source's holes stay holes
    subprocess.run(["fallocate", "--dig-holes", str(folder / "served.img")], check=True)
    url = server.url("served.img")  # type: ignore[attr-defined]
    if args.delay_ms > 0:
        url = url.replace(server.link.remote_ip, RELAY_IP)  # type: ignore[attr-defined]
    times: dict[str, list[float]] = {"bm": [], "inside": [], "nfs_cp": []}
    local = src.parent / "local.img"
    for r in range(args.rounds):
        for tool in (("bm", "nfs-cp") if r % 2 == 0 else ("nfs-cp", "bm")):
            local.unlink(missing_ok=True)
            if tool == "bm":
                wall, elapsed = _sync_command(url, str(local), args.workers, "--quiesced")
                times["bm"].append(wall)
                times["inside"].append(elapsed)
                if local.read_bytes() != src.read_bytes():
                    raise RuntimeError("blockmirror's copy differs from the source")
                bm_alloc = local.stat().st_blocks * 512
            else:
                started = time.perf_counter()
                subprocess.run(["nfs-cp", url, str(local)], check=True, stdout=subprocess.DEVNULL)
                times["nfs_cp"].append(time.perf_counter() - started)
                cp_alloc = local.stat().st_blocks * 512
    local.unlink(missing_ok=True)
    return {"bm": statistics.median(times["bm"]), "bm_inside": statistics.median(times["inside"]),
            "nfs_cp": statistics.median(times["nfs_cp"]), "bm_alloc": bm_alloc,
            "cp_alloc": cp_alloc}


def _rounds(src: Path, server: object, folder: Path, args: argparse.Namespace
            ) -> dict[str, float]:
    ours, inside, theirs = [], [], []
    bm_url, cp_url = server.url("bm.img"), server.url("nfscp.img")  # type: ignore[attr-defined]
    if args.delay_ms > 0:
        ip = server.link.remote_ip  # type: ignore[attr-defined]
        bm_url, cp_url = bm_url.replace(ip, RELAY_IP), cp_url.replace(ip, RELAY_IP)
    for r in range(args.rounds):
        for tool in (("bm", "nfs-cp") if r % 2 == 0 else ("nfs-cp", "bm")):
            if tool == "bm":
                wall, elapsed = _blockmirror(src, bm_url, args.workers)
                ours.append(wall)
                inside.append(elapsed)
            else:
                theirs.append(_nfs_cp(src, cp_url))
    if (folder / "bm.img").read_bytes() != src.read_bytes():
        raise RuntimeError("blockmirror's copy differs from the source")
    return {"bm": statistics.median(ours), "bm_inside": statistics.median(inside),
            "nfs_cp": statistics.median(theirs),
            "bm_alloc": (folder / "bm.img").stat().st_blocks * 512,
            "cp_alloc": (folder / "nfscp.img").stat().st_blocks * 512}


def _report(m: dict[str, float], args: argparse.Namespace, shaped: bool) -> None:
    link = "netem 0.5 ms each way" if shaped else "unshaped veth (no netem)"
    if args.delay_ms > 0:
        link = f"a relay in C (tests/delay_relay.c) holding every byte {args.delay_ms} ms each way"
    print(f"link: {link}; blockmirror --workers {args.workers}")
    print(f"blockmirror {m['bm']:.2f} s (sync itself {m['bm_inside']:.2f} s; "
          f"{args.size / m['bm']:.0f} MiB/s of image), "
          f"nfs-cp {m['nfs_cp']:.2f} s ({args.size / m['nfs_cp']:.0f} MiB/s): "
          f"ratio {m['nfs_cp'] / m['bm']:.2f}")
    where = "locally" if args.from_server else "on the server"
    print(f"allocated {where}: blockmirror {m['bm_alloc'] / MiB:.0f} MiB, "
          f"nfs-cp {m['cp_alloc'] / MiB:.0f} MiB")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=1024, help="MiB of image (default 1024)")
    parser.add_argument("--data", type=int, default=256, help="MiB of data in it (default 256)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--delay-ms", type=float, default=0.0,
                        help="relay the server through 127.0.0.2, D ms each way")
    parser.add_argument("--from-server", action="store_true",
                        help="the other direction: a file on the server into a new local "
                        "file (blockmirror sync NFS_URL FILE --quiesced vs nfs-cp)")
    args = parser.parse_args(argv)
    if os.geteuid() != 0 or shutil.which("nfs-cp") is None or shutil.which("ganesha.nfsd") is None:
        print("needs root, nfs-cp (libnfs-utils) and ganesha.nfsd (nfs-ganesha)", file=sys.stderr)
        return 2
    from ganeshatools import ganesha
    from netnstools import two_hosts

    work = Path(tempfile.mkdtemp(prefix="bm-nfs-bench-", dir="/dev/shm"))
    try:
        src = work / "src.img"
        _source(src, args.size * MiB, min(args.data, args.size) * MiB)
        folder = work / "export"
        folder.mkdir()
        print(f"{args.size} MiB image, {args.data} MiB data, {args.rounds} rounds interleaved, "
              "medians; ratio = nfs-cp / blockmirror time (> 1: blockmirror faster)")
        with ExitStack() as stack:
            link = stack.enter_context(two_hosts(delay_ms=0.5, rate="10gbit"))
            server = stack.enter_context(ganesha(link, folder, work / "ganesha"))
            if args.delay_ms > 0:
                from relaytools import delay_relay

                stack.enter_context(delay_relay(RELAY_IP, link.remote_ip, RELAY_PORTS,
                                                args.delay_ms))
            rounds = _rounds_from if args.from_server else _rounds
            _report(rounds(src, server, folder, args), args, link.shaped)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
