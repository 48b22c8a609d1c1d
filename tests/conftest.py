"""Shared fixtures: simulated engines in-process (`sim_factory`) or as processes (`sim_process`)."""

from __future__ import annotations

import asyncio
import contextlib
import re
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from kvsleep.sim.engine import SimEngine, SimSettings, build_app

pytest_plugins = ["tests.prometheus_server"]

REPO_ROOT = Path(__file__).resolve().parent.parent

# Test defaults that keep a sleep/wake cycle and a 16-token answer well under 0.1 s;
# a test that needs slower engines passes its own values to the factory.
FAST_SIM_SETTINGS: dict[str, Any] = {
    "tokens_per_second": 1000.0,
    "wake_latency": 0.02,
    "sleep_latency": 0.01,
    "reload_latency": 0.01,
}


@dataclass
class RunningSim:
    """An in-process simulated engine listening on 127.0.0.1."""

    sim: SimEngine
    settings: SimSettings
    url: str

    async def stats(self) -> dict[str, Any]:
        """Read state directly, so it still works after a crash, when HTTP gets no answer."""
        return self.sim.stats()


SimFactory = Callable[..., Awaitable[RunningSim]]


@pytest.fixture
async def sim_factory() -> AsyncIterator[SimFactory]:
    """`await make(flavor, model="m", **settings)` starts an engine; all stop at teardown.

    Crashes use the in-process callback: the engine stops answering instead of exiting.
    """
    runners: list[web.AppRunner] = []

    async def make(flavor: str, model: str = "m", **overrides: Any) -> RunningSim:
        settings = SimSettings(flavor=flavor, model=model, **{**FAST_SIM_SETTINGS, **overrides})
        sim = SimEngine(settings)
        runner = web.AppRunner(build_app(sim), access_log=None, shutdown_timeout=2.0)
        await runner.setup()
        runners.append(runner)
        await web.TCPSite(runner, "127.0.0.1", settings.port).start()
        port = runner.addresses[0][1]
        return RunningSim(sim=sim, settings=settings, url=f"http://127.0.0.1:{port}")

    yield make
    for runner in reversed(runners):
        await runner.cleanup()


@dataclass
class SimProcess:
    """A simulated engine running as `python -m kvsleep.sim.engine`."""

    proc: asyncio.subprocess.Process
    url: str
    stderr_lines: list[str] = field(default_factory=list)

    async def wait_exit(self, timeout: float = 5.0) -> int:
        """The exit code, or a test failure if the process outlives `timeout`."""
        return await asyncio.wait_for(self.proc.wait(), timeout)


_READY = re.compile(r"serving .* on (http://\S+)")


@contextlib.asynccontextmanager
async def sim_process(
    flavor: str, model: str = "m", *args: str, ready_timeout: float = 15.0
) -> AsyncIterator[SimProcess]:
    """Start a subprocess engine on a free port, wait for its ready line, always kill it after.

    `args` are extra `kvsleep sim-engine` flags. Use it where a crash must end a real process.
    """
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "kvsleep.sim.engine",
        "--flavor",
        flavor,
        "--model",
        model,
        "--port",
        "0",
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        cwd=REPO_ROOT,
    )
    assert proc.stderr is not None
    lines: list[str] = []

    async def wait_ready() -> str:
        while line := (await proc.stderr.readline()).decode():
            lines.append(line)
            if match := _READY.search(line):
                return match.group(1)
        raise RuntimeError("sim-engine exited before it was ready:\n" + "".join(lines))

    async def drain() -> None:  # keeps the pipe from filling and blocking the engine
        while line := (await proc.stderr.readline()).decode():
            lines.append(line)

    drainer: asyncio.Task[None] | None = None
    try:
        url = await asyncio.wait_for(wait_ready(), ready_timeout)
        drainer = asyncio.create_task(drain())
        yield SimProcess(proc=proc, url=url, stderr_lines=lines)
    finally:
        if proc.returncode is None:
            proc.kill()
        await asyncio.wait_for(proc.wait(), 10)
        if drainer is not None:
            await asyncio.wait_for(drainer, 5)


@pytest.fixture
async def kvsleep_factory(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[Any]]]:
    """`await make(models, **sleep_manager)` starts kvsleep (see kvsleep_harness); all stop at
    teardown. `models` are canonical-form model entries, e.g. from `sim_model(sim, ...)`."""
    from tests.kvsleep_harness import config_doc, start_kvsleep

    running: list[Any] = []

    async def make(models: list[dict[str, Any]], clock: Any = None, **sleep_manager: Any) -> Any:
        kv = await start_kvsleep(config_doc(models, tmp_path / "state", **sleep_manager), clock)
        running.append(kv)
        return kv

    yield make
    for kv in reversed(running):
        await kv.close()
