"""Run `wrk` with bench/post.lua and read its one-line JSON result."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.procs import die_with_parent

LUA = Path(__file__).resolve().parent / "post.lua"
MARK = "BENCH_RESULT "


class WrkError(RuntimeError):
    pass


def wrk_path() -> str | None:
    return shutil.which("wrk")


@dataclass(frozen=True)
class Load:
    url: str
    body: str
    connections: int
    seconds: float
    sse: bool = False
    timeout_s: float = 10.0

    @property
    def threads(self) -> int:
        return max(1, min(2, self.connections))


async def run_wrk(load: Load) -> dict[str, Any]:
    """One wrk run; returns 2xx throughput, events/s and latency percentiles (milliseconds)."""
    wrk = wrk_path()
    if wrk is None:
        raise WrkError("wrk is not installed")
    argv = [
        wrk,
        "-t",
        str(load.threads),
        "-c",
        str(load.connections),
        "-d",
        f"{max(1, round(load.seconds))}s",
        "--timeout",
        f"{load.timeout_s:g}s",
        "--latency",
        "-s",
        str(LUA),
        load.url,
        "--",
        load.body,
        "1" if load.sse else "0",
    ]
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        preexec_fn=die_with_parent,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), load.seconds + load.timeout_s + 15)
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
    text = out.decode(errors="replace")
    line = next((ln for ln in text.splitlines() if ln.startswith(MARK)), None)
    if proc.returncode != 0 or line is None:
        raise WrkError(f"wrk failed (exit {proc.returncode}):\n{text[-2000:]}")
    raw = json.loads(line[len(MARK) :])
    seconds = raw["duration_us"] / 1e6
    lat = raw["latency_us"]
    errors = raw["errors"]
    return {
        "ok_per_s": raw["ok2xx"] / seconds,
        "events_per_s": raw["events"] / seconds,
        "ok2xx": raw["ok2xx"],
        "non2xx": raw["non2xx"],
        "socket_errors": errors["connect"] + errors["read"] + errors["write"] + errors["timeout"],
        "p50_ms": lat["p50"] / 1000,
        "p90_ms": lat["p90"] / 1000,
        "p99_ms": lat["p99"] / 1000,
        "mean_ms": lat["mean"] / 1000,
        "max_ms": lat["max"] / 1000,
        "seconds": seconds,
    }
