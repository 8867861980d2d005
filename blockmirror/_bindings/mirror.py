"""Bindings of active mirroring and its interlock (csrc/mirror.c, I7)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from blockmirror._bindings._ffi import CData, check, ffi, lib

MIRROR_STATES = {0: "off", 1: "on", 2: "failed"}


@dataclass(frozen=True)
class MirrorStatus:
    """What the control block says of the mirror: STATE is "off", "on" or
    "failed" (a destination write failed; ERROR is its errno)."""

    state: str
    error: int
    mirrored_bytes: int
    fallbacks: int


def start(handle: CData, target: str) -> None:
    check(lib.bm_mirror_start(handle, os.fsencode(target)), target)


def stop(handle: CData) -> None:
    check(lib.bm_mirror_stop(handle))


def status(handle: CData) -> MirrorStatus:
    out: Any = ffi.new("bm_mirror_info *")  # a C struct: fields typed in blockmirror.h
    check(lib.bm_mirror_status(handle, out))
    return MirrorStatus(MIRROR_STATES.get(int(out.state), "failed"), int(out.error),
                        int(out.mirrored_bytes), int(out.fallbacks))


def copy_claim(handle: CData, offset: int, length: int) -> None:
    check(lib.bm_copy_claim(handle, offset, length))


def copy_release(handle: CData, offset: int, length: int) -> None:
    check(lib.bm_copy_release(handle, offset, length))
