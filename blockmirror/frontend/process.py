"""A helper program the supervisor runs (nbdkit, nbdfuse): its own session
(a terminal's Ctrl-C reaches only the supervisor, which stops things in
order), stdin and stdout on /dev/null, its stderr kept for the report and
passed on once serving."""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import threading

_TAIL_LINES = 20


class Child:
    """NAME running COMMAND. ``pidfd`` becomes readable when it exits."""

    def __init__(self, name: str, command: list[str]) -> None:
        self.name = name
        self.proc = subprocess.Popen(command, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                     start_new_session=True)
        self.pidfd = os.pidfd_open(self.proc.pid)
        self.forward = False  # pass its stderr on to ours (set once serving)
        self._tail: collections.deque[str] = collections.deque(maxlen=_TAIL_LINES)
        self._reader = threading.Thread(target=self._read_stderr, daemon=True,
                                        name=f"{name}-stderr")
        self._reader.start()

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            line = raw.decode(errors="replace").rstrip("\n")
            self._tail.append(line)
            if self.forward:
                print(line, file=sys.stderr, flush=True)

    def running(self) -> bool:
        return self.proc.poll() is None

    def problem(self) -> str:
        """Its last words on stderr (the line that says what went wrong)."""
        self._reader.join(timeout=1.0)
        lines = [line.strip() for line in self._tail if line.strip()]
        return lines[-1] if lines else ""

    def said(self, text: str) -> bool:
        """Did its stderr contain TEXT?"""
        self._reader.join(timeout=1.0)
        return any(text in line for line in self._tail)

    def exit_description(self) -> str:
        code = self.proc.poll()
        if code is None:
            return "is still running"
        if code < 0:
            return f"was killed by {signal.Signals(-code).name}"
        return f"exited with status {code}"

    def stop(self, timeout: float | None = None) -> int:
        """SIGTERM (it drains and exits) and wait; after TIMEOUT seconds,
        SIGKILL. Idempotent; returns its exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.close()
        return self.proc.returncode

    def close(self) -> None:
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1
        self._reader.join(timeout=1.0)
        if self.proc.stderr is not None and not self._reader.is_alive():
            self.proc.stderr.close()
