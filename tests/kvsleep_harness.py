"""Run a real kvsleep server on 127.0.0.1 in front of sim engines, with an injectable clock.

Tests drive time by advancing `FakeClock` and calling `reconcile()` instead of sleeping; the
reconcile loop itself is parked behind a one-hour check interval.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from kvsleep.config import parse_config
from kvsleep.core.policy import Action
from kvsleep.engines import RetryPolicy
from kvsleep.web.connections import bind
from kvsleep.web.server import KvsleepServer, listen

# Retries fast enough for tests: three attempts within about 30 ms.
FAST_RETRY = RetryPolicy(
    attempts=3,
    initial_wait_seconds=0.005,
    max_wait_seconds=0.02,
    probe_timeout_seconds=2.0,
    sleep_timeout_seconds=5.0,
    wake_timeout_seconds=5.0,
)


class FakeClock:
    """Wall-clock stand-in: starts at the real time, moves only when told."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class RunningKvsleep:
    server: KvsleepServer
    runner: web.AppRunner
    url: str
    clock: FakeClock

    @property
    def manager(self):
        return self.server.manager

    def state(self, model: str) -> str:
        return self.server.manager.slots[model].state.value

    async def reconcile(self) -> list[Action]:
        return await self.server.manager.reconciler.tick()

    async def close(self) -> None:
        await self.runner.cleanup()


def config_doc(
    models: list[dict[str, Any]],
    state_dir: Path,
    *,
    router: dict[str, Any] | None = None,
    gpus: list[dict[str, Any]] | None = None,
    **sleep_manager: Any,
) -> dict[str, Any]:
    """A canonical config document; sleep_manager keys override test defaults, `router` keys
    (e.g. `upstream_timeout_seconds`, `max_body_bytes`) override the router section, and
    `gpus` gives GPU memory budgets."""
    policy = {
        "check_interval_seconds": 3600,
        "idle_threshold_seconds": 60,
        "auto_sleep_enabled": True,
        "min_awake_seconds": 0,
        "min_sleep_duration": 0,
        "wake_timeout_seconds": 10,
        **sleep_manager,
    }
    doc = {
        "router": {"host": "127.0.0.1", "port": 8080, **(router or {})},
        "sleep_manager": policy,
        "models": models,
        "state_dir": str(state_dir),
        "log_dir": str(state_dir / "logs"),
    }
    if gpus:
        doc["gpus"] = gpus
    return doc


async def start_kvsleep(
    doc: dict[str, Any],
    clock: FakeClock | None = None,
    retry: RetryPolicy = FAST_RETRY,
    config_path: str | None = None,
    port: int = 0,
) -> RunningKvsleep:
    """Start kvsleep from a config document on a free loopback port (started = synced)."""
    clock = clock or FakeClock()
    server = KvsleepServer(
        parse_config(doc, "<test>"), clock=clock, retry=retry, config_path=config_path
    )
    runner = await listen(server, bind("127.0.0.1", port))  # the listener `serve` uses
    port = runner.addresses[0][1]
    return RunningKvsleep(server, runner, f"http://127.0.0.1:{port}", clock)


async def post_json(
    session: aiohttp.ClientSession, url: str, body: Any, **kwargs: Any
) -> tuple[int, Any]:
    async with session.post(url, json=body, **kwargs) as resp:
        return resp.status, await resp.json(content_type=None)


def sim_model(sim: Any, **extra: Any) -> dict[str, Any]:
    """The config entry routing a sim's model name to it (a conftest `RunningSim`)."""
    return {"name": sim.settings.model, "engine": sim.settings.flavor, "url": sim.url, **extra}
