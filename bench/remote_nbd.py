"""`blockmirror sync` into an NBD export against `nbdcopy` into the same
export, same run, interleaved rounds (issue 12's target: >= 1.0x nbdcopy).

    python bench/remote_nbd.py [--size 1024] [--rounds 3] [--server nbdkit qemu-nbd]
                               [--netns] [--workers 4]

The source is SIZE MiB of random data (untracked, in /dev/shm); each server
serves a raw file of the same size in /dev/shm on a unix socket, or with
--netns (root) on TCP in a network namespace behind a veth pair (netem 0.5 ms
each way where the kernel has it; otherwise nbdkit's delay filter holds each
request 1 ms and qemu-nbd runs unshaped, which the output says). Both tools
flush at the end (nbdcopy --flush). Times are wall clock of the whole
command; blockmirror's own elapsed (from --json) is shown too. The ratio is
nbdcopy's time over blockmirror's: above 1.0 blockmirror is faster.
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


def _source(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        for _ in range(size // (64 * MiB)):
            f.write(os.urandom(64 * MiB))
        f.truncate(size)


def _wait_listening(proc: subprocess.Popen[bytes], uri: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited {proc.returncode}")
        if subprocess.run(["nbdinfo", "--size", uri], capture_output=True).returncode == 0:
            return
        time.sleep(0.05)
    raise RuntimeError(f"no server at {uri}")


def _server(stack: ExitStack, kind: str, file: Path, sock: Path, link: object | None
            ) -> tuple[str, str]:
    """Start KIND serving FILE; (its URI, how its requests are delayed)."""
    shaping = "none (unix socket)"
    if link is None:
        where_q, where_k, uri = ["-k", str(sock)], ["-U", str(sock)], f"nbd+unix:///?socket={sock}"
    else:
        ip = link.remote_ip  # type: ignore[attr-defined]
        where_q, where_k = ["-b", ip, "-p", "10809"], ["-i", ip, "-p", "10809"]
        uri = f"nbd://{ip}:10809/"
        shaping = "netem 0.5 ms each way" if link.shaped else "none (veth, no netem)"  # type: ignore[attr-defined]
    if kind == "qemu-nbd":
        argv = ["qemu-nbd", "-t", "-e", "8", "-f", "raw", "--discard=unmap", *where_q, str(file)]
    else:
        filters: list[str] = []
        if link is not None and not link.shaped:  # type: ignore[attr-defined]
            filters = ["--filter=delay", "file", f"file={file}", "delay-read=1ms",
                       "delay-write=1ms", "delay-zero=1ms"]
            shaping = "nbdkit delay filter, 1 ms per request"
        argv = ["nbdkit", "--foreground", *where_k,
                *(filters or ["file", f"file={file}"])]
    if link is not None:
        argv = ["ip", "netns", "exec", link.netns, *argv]  # type: ignore[attr-defined]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    stack.callback(lambda: (proc.terminate(), proc.wait()))
    _wait_listening(proc, uri)
    return uri, shaping


def _blockmirror(src: Path, uri: str, workers: int) -> tuple[float, float]:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "blockmirror", "sync", str(src), uri, "--json",
                           "--workers", str(workers)], capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"blockmirror sync failed: {done.stderr}")
    return wall, float(json.loads(done.stdout)["elapsed"])


def _nbdcopy(src: Path, uri: str) -> float:
    started = time.perf_counter()
    subprocess.run(["nbdcopy", "--flush", str(src), uri], check=True)
    return time.perf_counter() - started


def _rounds(src: Path, uri: str, args: argparse.Namespace) -> dict[str, float]:
    ours, inside, theirs = [], [], []
    for r in range(args.rounds):
        order = ("bm", "nbdcopy") if r % 2 == 0 else ("nbdcopy", "bm")
        for tool in order:
            if tool == "bm":
                wall, elapsed = _blockmirror(src, uri, args.workers)
                ours.append(wall)
                inside.append(elapsed)
            else:
                theirs.append(_nbdcopy(src, uri))
    return {"blockmirror_s": statistics.median(ours), "blockmirror_inside_s":
            statistics.median(inside), "nbdcopy_s": statistics.median(theirs)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=1024, help="MiB of data (default 1024)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--server", nargs="+", default=["nbdkit", "qemu-nbd"])
    parser.add_argument("--netns", action="store_true", help="server in a network namespace")
    parser.add_argument("--workers", type=int, default=4)
    args = parser.parse_args(argv)
    for tool in ("nbdcopy", "nbdinfo", *args.server):
        if shutil.which(tool) is None:
            print(f"needs {tool}", file=sys.stderr)
            return 2
    folder = Path(tempfile.mkdtemp(prefix="bm-remote-bench-", dir="/dev/shm"))
    try:
        src = folder / "src.img"
        _source(src, args.size * MiB)
        print(f"{args.size} MiB of data, {args.rounds} rounds, medians; ratio = nbdcopy / "
              "blockmirror time (> 1: blockmirror faster)")
        for kind in args.server:
            with ExitStack() as stack:
                link = None
                if args.netns:
                    from netnstools import two_hosts

                    link = stack.enter_context(two_hosts(delay_ms=0.5, rate="10gbit"))
                export = folder / f"{kind}.img"
                with open(export, "wb") as f:
                    f.truncate(args.size * MiB)
                uri, shaping = _server(stack, kind, export, folder / f"{kind}.sock", link)
                m = _rounds(src, uri, args)
                rate = args.size / m["blockmirror_s"]
                print(f"{kind:9s} delay: {shaping}; blockmirror {m['blockmirror_s']:.2f} s "
                      f"({rate:.0f} MiB/s; sync itself {m['blockmirror_inside_s']:.2f} s), "
                      f"nbdcopy {m['nbdcopy_s']:.2f} s "
                      f"({args.size / m['nbdcopy_s']:.0f} MiB/s): ratio "
                      f"{m['nbdcopy_s'] / m['blockmirror_s']:.2f}")
                export.unlink()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
