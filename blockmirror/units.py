"""Parsing and printing the quantities people type and read: sizes, durations, rates."""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Callable

_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|min)?\s*$", re.IGNORECASE)
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgtp]?)(i?b?)\s*$", re.IGNORECASE)
_SCALE = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}


def parse_duration(text: str) -> float:
    """Seconds from "5s", "200ms", "1.5", "2m". Raises ValueError on anything else."""
    match = _DURATION.match(text)
    if not match:
        raise ValueError(f"not a duration: {_short(text)} (try 5s, 200ms or 1.5)")
    value = float(match.group(1))
    unit = (match.group(2) or "s").lower()
    seconds = value / 1000 if unit == "ms" else value * 60 if unit in ("m", "min") else value
    if not (seconds > 0 and math.isfinite(seconds)):
        raise ValueError(f"duration must be greater than zero and finite: {_short(text)}")
    return seconds


MAX_SIZE = 2**63 - 1  # the largest size any field (off_t, uint64 rates) holds


def parse_size(text: str) -> int:
    """Bytes from "4G", "512MiB", "65536", "64k" (binary multiples), at most
    MAX_SIZE. Raises ValueError on anything else."""
    match = _SIZE.match(text)
    if not match:
        raise ValueError(f"not a size: {text!r} (try 4G, 512M or 65536)")
    if len(match.group(1)) > 40:
        raise ValueError(f"size too large: {_short(text)} (at most 8 EiB)")
    from fractions import Fraction  # late: ~1.5 ms of every command's start-up

    value = int(Fraction(match.group(1)) * _SCALE[match.group(2).lower()])  # exact
    if value > MAX_SIZE:
        raise ValueError(f"size too large: {_short(text)} (at most 8 EiB)")
    return value


def _short(text: str) -> str:
    return repr(text if len(text) <= 40 else text[:37] + "...")


def format_bytes(n: float) -> str:
    """1536 -> "1.5 KiB"; exact below 1 KiB."""
    if n < 1024:
        return f"{int(n)} B"
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        n /= 1024
        if n < 1024 or unit == "PiB":
            return f"{n:.1f} {unit}"
    raise AssertionError("unreachable")


def format_rate(bytes_per_s: float) -> str:
    return f"{format_bytes(bytes_per_s)}/s"


def format_seconds(s: float) -> str:
    if not math.isfinite(s):
        return "∞"
    if s < 1:
        return f"{s * 1000:.0f} ms"
    if s < 120:
        return f"{s:.1f} s"
    return f"{int(s // 60)}m{int(s % 60):02d}s"


def parse_int_between(text: str, low: int, high: int) -> int:
    """A whole number from LOW to HIGH written in TEXT; ValueError otherwise
    (a long string of digits is refused without converting it)."""
    shown = repr(text if len(text) <= 40 else text[:37] + "...")
    try:
        value = int(text) if len(text) <= 40 else high + 1
    except ValueError:
        raise ValueError(f"not a whole number: {shown}") from None
    if not low <= value <= high:
        raise ValueError(f"must be from {low} to {high}: {shown}")
    return value


def size_argument(text: str) -> int:
    """An argparse ``type=`` for a positive size such as 64k or 1G."""
    try:
        value = parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be positive: {text!r}")
    return value


def int_argument(low: int, high: int) -> Callable[[str], int]:
    """An argparse ``type=`` for a whole number from LOW to HIGH."""
    def parse(text: str) -> int:
        try:
            return parse_int_between(text, low, high)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return parse
