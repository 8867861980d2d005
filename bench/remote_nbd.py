"""`blockmirror sync` into an NBD export against `nbdcopy` into the same
export, same run, interleaved rounds (issue 12's target: >= 1.0x nbdcopy).

    python bench/remote_nbd.py [--size 1G] [--data SIZE] [--rounds 3]
                               [--server nbdkit qemu-nbd] [--netns] [--workers 4]
                               [--requests N]
    python bench/remote_nbd.py --size 4G --data 1G --netns   # issue 12's bulk case
    python bench/remote_nbd.py --from-export ...             # export -> local file

The source is SIZE apparent with DATA of random data (default all of it) in
64 evenly spaced extents, untracked, in /dev/shm; each server serves a raw
file of SIZE in /dev/shm on a unix socket, or with --netns (root) on TCP in
a network namespace behind a veth pair (netem 0.5 ms each way where the
kernel has it; otherwise nbdkit's delay filter holds each request 1 ms at
the server and qemu-nbd runs unshaped, which the output says). Before every
run the export's file is punched back to all zeros, so each tool starts
from the same export: blockmirror sees that in block status and sends data
only; nbdcopy zeroes the source's holes (WRITE_ZEROES) unless told the
destination is zero, which `nbdcopy --destination-is-zero` ("-z" below) does and is
timed too. nbdcopy gets as many connections (and threads) as blockmirror's
--workers: by default it takes one per core, 2 here. Both tools flush at
the end (nbdcopy --flush). Times are wall
clock of the whole command; blockmirror's own elapsed (from --json) is shown
too. The ratio is nbdcopy's time over blockmirror's: above 1.0 blockmirror
is faster. With --from-export the direction turns: each server serves the
source itself read-only, and `blockmirror sync URI FILE` (block status:
holes not read) races `nbdcopy URI FILE` into a new file in /dev/shm.
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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from blockmirror.units import format_bytes, size_argument

MiB = 1 << 20
RELAY_IP = "127.0.0.2"  # where --relay-ms listens (loopback, this namespace)
# `python -m blockmirror` loads the package from its working folder first:
# the commands run from this tree, whatever folder the bench started in.
REPO = Path(__file__).resolve().parent.parent
# Compiled bytecode, as an installed package has it, whatever
# PYTHONDONTWRITEBYTECODE says (compiling every module each run: +15-20 ms).
PYTHON_ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
PYTHON_ENV["PYTHONPYCACHEPREFIX"] = str(Path(tempfile.gettempdir()) / "bm-bench-pycache")


def blockmirror_command(*args: str) -> list[str]:
    """A blockmirror command as the bench runs it: the real interpreter
    (sys.executable, never a console-script shim), as nbdcopy runs as its
    binary; see REPO and PYTHON_ENV for where from and how."""
    return [sys.executable, "-m", "blockmirror", *args]


def make_source(path: Path, size: int, data: int) -> None:
    """SIZE bytes apparent, DATA of them random, in up to 64 evenly spaced
    extents (holes between)."""
    pieces = 64 if data < size else 1
    piece = data // pieces
    with open(path, "wb") as f:
        for i in range(pieces):
            f.seek(i * (size // pieces))
            for left in range(piece, 0, -64 * MiB):
                f.write(os.urandom(min(left, 64 * MiB)))
        f.truncate(size)


def wait_listening(proc: subprocess.Popen[bytes], uri: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited {proc.returncode}")
        if subprocess.run(["nbdinfo", "--size", uri], capture_output=True).returncode == 0:
            return
        time.sleep(0.05)
    raise RuntimeError(f"no server at {uri}")


def _server(stack: ExitStack, kind: str, file: Path, sock: Path, link: object | None,
            readonly: bool = False, relay_ms: float = 0.0) -> tuple[str, str]:
    """Start KIND serving FILE; (its URI, how its requests are delayed).
    With RELAY_MS, clients reach it through tests/delay_relay.c on 127.0.0.2."""
    shaping = "none (unix socket)"
    if link is None:
        where_q, where_k, uri = ["-k", str(sock)], ["-U", str(sock)], f"nbd+unix:///?socket={sock}"
    else:
        ip = link.remote_ip  # type: ignore[attr-defined]
        where_q, where_k = ["-b", ip, "-p", "10809"], ["-i", ip, "-p", "10809"]
        uri = f"nbd://{ip}:10809/"
        shaping = "netem 0.5 ms each way" if link.shaped else "none (veth, no netem)"  # type: ignore[attr-defined]
    if kind == "qemu-nbd":
        argv = ["qemu-nbd", "-t", "-e", "8", "-f", "raw", "--discard=unmap", *where_q,
                *(["-r"] if readonly else []), str(file)]
    else:
        filters: list[str] = []
        if link is not None and not link.shaped and not relay_ms:  # type: ignore[attr-defined]
            filters = ["--filter=delay", "file", f"file={file}", "delay-read=1ms",
                       "delay-write=1ms", "delay-zero=1ms"]
            shaping = "nbdkit delay filter, 1 ms per request"
        argv = ["nbdkit", "--foreground", *where_k, *(["-r"] if readonly else []),
                *(filters or ["file", f"file={file}"])]
    if link is not None:
        argv = ["ip", "netns", "exec", link.netns, *argv]  # type: ignore[attr-defined]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    stack.callback(lambda: (proc.terminate(), proc.wait()))
    wait_listening(proc, uri)
    if relay_ms:  # started once the server listens (it connects on each accept)
        from relaytools import delay_relay

        stack.enter_context(delay_relay(RELAY_IP, link.remote_ip,  # type: ignore[attr-defined]
                                        [10809], relay_ms))
        uri = f"nbd://{RELAY_IP}:10809/"
        shaping = f"a C relay holding every byte {relay_ms} ms each way"
    return uri, shaping


def blockmirror_sync(src: Path | str, uri: Path | str, workers: int,
                     extra: list[str] | None = None, tree: Path = REPO) -> tuple[float, float]:
    """`blockmirror sync SRC URI --json` (either may be the export): (wall
    seconds of the command, the sync's own elapsed)."""
    started = time.perf_counter()
    done = subprocess.run(blockmirror_command("sync", str(src), str(uri), "--json",
                                              "--workers", str(workers), *(extra or [])),
                          capture_output=True, text=True, cwd=tree, env=PYTHON_ENV)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"blockmirror sync failed: {done.stderr}")
    return wall, float(json.loads(done.stdout)["elapsed"])


def _nbdcopy(src: Path | str, dst: Path | str, extra: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(["nbdcopy", "--flush", *extra, str(src), str(dst)], check=True)
    return time.perf_counter() - started


def _fresh(export: Path) -> None:
    """The export's file back to all zeros (holes), size unchanged."""
    subprocess.run(["fallocate", "--punch-hole", "--offset", "0", "--length",
                    str(export.stat().st_size), str(export)], check=True)


def _rounds(src: Path, uri: str, export: Path, args: argparse.Namespace) -> dict[str, float]:
    times: dict[str, list[float]] = {"bm": [], "inside": [], "nbdcopy": [], "nbdcopy -z": [],
                                     "baseline": [], "baseline inside": []}
    extra = ["--requests", str(args.requests)] if args.requests else []
    tools = ["bm", "nbdcopy", "nbdcopy -z", *(["baseline"] if args.baseline_tree else [])]
    for tree in [REPO, *filter(None, [args.baseline_tree])]:  # bytecode compiled, every module
        subprocess.run([sys.executable, "-m", "compileall", "-q", "blockmirror"],
                       capture_output=True, cwd=tree, env=PYTHON_ENV, check=True)
    for r in range(args.rounds):
        n = len(tools)
        for tool in tools[r % n:] + tools[:r % n]:
            _fresh(export)
            if tool in ("bm", "baseline"):
                tree = REPO if tool == "bm" else Path(args.baseline_tree)
                wall, elapsed = blockmirror_sync(src, uri, args.workers, extra, tree)
                times[tool].append(wall)
                times["inside" if tool == "bm" else "baseline inside"].append(elapsed)
            else:
                same = [f"--connections={args.workers}", f"--threads={args.workers}"]
                if tool == "nbdcopy -z":
                    same.append("--destination-is-zero")
                times[tool].append(_nbdcopy(src, uri, same))
    return {k: statistics.median(v) for k, v in times.items() if v}


def _rounds_from(uri: str, folder: Path, args: argparse.Namespace) -> dict[str, float]:
    """The other direction: the export (serving the source, read-only) into
    a new local file, blockmirror against nbdcopy, each copy removed after."""
    times: dict[str, list[float]] = {"bm": [], "inside": [], "nbdcopy": []}
    extra = ["--requests", str(args.requests)] if args.requests else []
    copy = folder / "copy.img"
    for r in range(args.rounds):
        for tool in (("bm", "nbdcopy") if r % 2 == 0 else ("nbdcopy", "bm")):
            if tool == "bm":
                started = time.perf_counter()
                done = subprocess.run(blockmirror_command("sync", uri, str(copy), "--json",
                                                          "--workers", str(args.workers),
                                                          *extra),
                                      capture_output=True, text=True, cwd=REPO,
                                      env=PYTHON_ENV)
                times["bm"].append(time.perf_counter() - started)
                if done.returncode != 0:
                    raise RuntimeError(f"blockmirror sync failed: {done.stderr}")
                times["inside"].append(float(json.loads(done.stdout)["elapsed"]))
            else:
                copy.touch()
                times["nbdcopy"].append(_nbdcopy(uri, copy, [f"--connections={args.workers}",
                                                            f"--threads={args.workers}"]))
            copy.unlink()
    return {k: statistics.median(v) for k, v in times.items()}


def _report_from(kind: str, shaping: str, data: int, m: dict[str, float]) -> None:
    mib = data / MiB
    print(f"{kind:9s} FROM the export, delay: {shaping}; blockmirror {m['bm']:.2f} s "
          f"(sync itself {m['inside']:.2f} s, {mib / m['inside']:.0f} MiB/s of data), nbdcopy "
          f"{m['nbdcopy']:.2f} s ({mib / m['nbdcopy']:.0f} MiB/s): ratio "
          f"{m['nbdcopy'] / m['bm']:.2f} (command), {m['nbdcopy'] / m['inside']:.2f} "
          "(sync itself)", flush=True)


def _report(kind: str, shaping: str, data: int, m: dict[str, float]) -> None:
    mib = data / MiB
    print(f"{kind:9s} delay: {shaping}; blockmirror {m['bm']:.2f} s ({mib / m['bm']:.0f} MiB/s "
          f"of data; sync itself {m['inside']:.2f} s, {mib / m['inside']:.0f} MiB/s), nbdcopy "
          f"{m['nbdcopy']:.2f} s ({mib / m['nbdcopy']:.0f} MiB/s), nbdcopy -z "
          f"{m['nbdcopy -z']:.2f} s: ratio {m['nbdcopy'] / m['bm']:.2f} (command), "
          f"{m['nbdcopy'] / m['inside']:.2f} (sync itself), "
          f"{m['nbdcopy -z'] / m['bm']:.2f} (command vs -z)", flush=True)
    ratio = m["nbdcopy"] / m["bm"]
    print(f"{kind:9s} issue 12 target, the command >= 1.0x nbdcopy's throughput: "
          f"{ratio:.2f}x, {'MET' if ratio >= 1.0 else 'MISSED'}", flush=True)
    if "baseline" in m:
        print(f"{kind:9s} baseline tree, same rounds: {m['baseline']:.2f} s (sync itself "
              f"{m['baseline inside']:.2f} s): ratio {m['nbdcopy'] / m['baseline']:.2f} "
              "(command)", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--size", type=size_argument, default=1 << 30,
                        help="apparent size (default 1G)")
    parser.add_argument("--data", type=size_argument, default=None,
                        help="random data in it (default: all of it)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--server", nargs="+", default=["nbdkit", "qemu-nbd"])
    parser.add_argument("--netns", action="store_true", help="server in a network namespace")
    parser.add_argument("--relay-ms", type=float, default=0.0, metavar="D",
                        help="with --netns: reach every server through a relay in C holding "
                        "each byte D ms each way (a round trip of 2D; no netem here)")
    parser.add_argument("--rate", default="10gbit",
                        help="with --netns: the link's rate (tc syntax; netem, else tbf)")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--requests", type=int, default=None,
                        help="blockmirror sync --requests (default: its own, 32)")
    parser.add_argument("--baseline-tree", metavar="DIR",
                        help="also time another checkout's command (built in place) in the "
                        "same rounds: before/after in one run")
    parser.add_argument("--from-export", action="store_true",
                        help="the other direction: the export (the source, read-only) into a "
                        "new local file")
    args = parser.parse_args(argv)
    if args.relay_ms and not args.netns:
        parser.error("--relay-ms needs --netns")
    data = min(args.data or args.size, args.size)
    for tool in ("nbdcopy", "nbdinfo", "fallocate", *args.server):
        if shutil.which(tool) is None:
            print(f"needs {tool}", file=sys.stderr)
            return 2
    folder = Path(tempfile.mkdtemp(prefix="bm-remote-bench-", dir="/dev/shm"))
    try:
        src = folder / "src.img"
        make_source(src, args.size, data)
        print(f"{format_bytes(args.size)} apparent, {format_bytes(data)} of data, "
              f"{args.rounds} rounds, medians; blockmirror --workers {args.workers} "
              f"--requests {args.requests or 32}, nbdcopy --connections/--threads "
              f"{args.workers} (its default on 2 cores would be 2) --requests 64 (its "
              "default); ratio = nbdcopy / blockmirror time "
              "(> 1: blockmirror faster)")
        for kind in args.server:
            with ExitStack() as stack:
                link = None
                if args.netns:
                    from netnstools import two_hosts

                    link = stack.enter_context(two_hosts(delay_ms=0.5, rate=args.rate))
                if args.from_export:
                    uri, shaping = _server(stack, kind, src, folder / f"{kind}.sock", link,
                                           readonly=True, relay_ms=args.relay_ms)
                    _report_from(kind, shaping, data, _rounds_from(uri, folder, args))
                    continue
                export = folder / f"{kind}.img"
                with open(export, "wb") as f:
                    f.truncate(args.size)
                uri, shaping = _server(stack, kind, export, folder / f"{kind}.sock", link,
                                       relay_ms=args.relay_ms)
                _report(kind, shaping, data, _rounds(src, uri, export, args))
                export.unlink()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
