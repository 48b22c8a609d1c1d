"""Run the main coroutine on uvloop where it is installed (it is on Linux): the proxy spends
most of its time in the event loop and socket writes, which uvloop makes cheaper."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

try:
    import uvloop
except ImportError:  # Windows, or an install without it
    uvloop = None

T = TypeVar("T")


def run_event_loop(main: Coroutine[Any, Any, T]) -> T:
    if uvloop is not None:
        return uvloop.run(main)
    return asyncio.run(main)
