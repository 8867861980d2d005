# Type stub for the CPython extension csrc/python/fastwrite.c.
from collections.abc import Callable
from typing import Any

class Writer:
    def __init__(
        self,
        pwrite_addr: int,
        last_error_addr: int,
        handle_addr: int,
        handle: Any,
        fd: int,
        path: str,
        on_stale: Callable[[Any, int], int] | None,
    ) -> None: ...
    def __call__(self, data: Any, offset: int) -> int: ...
    def close(self) -> None: ...
