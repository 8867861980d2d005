"""Change ids: the text ``SERIES:GENERATION`` that names one instant of an
image for backup tools. One home for building and parsing it."""

from __future__ import annotations

import re
from dataclasses import dataclass

from blockmirror.errors import ChangeIdInvalidError

# 32 hex digits, a colon, a generation of at most 20 ASCII digits (a uint64).
_CHANGE_ID = re.compile(r"([0-9a-f]{32}):([0-9]{1,20})")
_MAX_GENERATION = 2**64 - 1


@dataclass(frozen=True)
class ChangeId:
    series: str  # the sidecar's series id, 32 hex digits
    generation: int

    def __str__(self) -> str:
        return f"{self.series}:{self.generation}"

    @classmethod
    def parse(cls, text: str) -> ChangeId:
        """TEXT as a change id; ``ChangeIdInvalidError`` if it is not one."""
        match = _CHANGE_ID.fullmatch(str(text))
        if match is None or int(match.group(2)) > _MAX_GENERATION:
            raise ChangeIdInvalidError(f"{text!r} is not a blockmirror change id")
        return cls(match.group(1), int(match.group(2)))
