"""Run the main coroutine on uvloop where it is installed (it is on Linux): the proxy spends
most of its time in the event loop and socket writes, which uvloop makes cheaper."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
from collections.abc import Coroutine
from types import ModuleType
from typing import Any, TypeVar

uvloop: ModuleType | None
try:
    import uvloop
except ImportError:  # Windows, or an install without it
    uvloop = None

T = TypeVar("T")


def run_event_loop(main: Coroutine[Any, Any, T]) -> T:
    if uvloop is not None:
        return uvloop.run(main)
    return asyncio.run(main)


# glibc's M_MMAP_THRESHOLD: 1 MiB, and no longer adaptive.
_M_MMAP_THRESHOLD = -3
_LARGE_ALLOCATION = 1024 * 1024


def return_large_buffers_to_the_os() -> None:
    """Make glibc serve every allocation of 1 MiB or more (a large request body, its decoded
    JSON) from its own mapping, returned to the system when freed.

    By default glibc raises that threshold after the first large free and serves later large
    bodies from its heap, which it rarely gives back: one burst of big requests would then
    keep kvsleep's memory at its peak for good. No-op where the C library is not glibc."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, _LARGE_ALLOCATION)
