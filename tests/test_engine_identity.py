"""Which engine process answers (its incarnation), and how busy the engine itself says it is.

Adapters are driven against the simulated engines over loopback HTTP; the simulator follows
shared/engine-contracts.md (SGLang's `startup_time`, vLLM's `process_start_time_seconds`, each
engine's request gauges and SGLang's `/get_load`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from kvsleep.config import ModelConfig
from kvsleep.core.states import ModelState
from kvsleep.engines import EngineAdapter, adapter_for
from kvsleep.engines.base import Probe, metric_sums
from kvsleep.engines.sglang import requests_in, startup_time
from kvsleep.sim.engine import SimEngine, SimSettings, build_app
from tests.conftest import FAST_SIM_SETTINGS, sim_process
from tests.kvsleep_harness import FAST_RETRY
from tests.test_simulator import wait_for

FLAVORS = ("vllm", "sglang")
# Generation slow enough that a request is surely still inside the engine while the test looks
# (the checks take milliseconds), fast enough that waiting for its end costs about a second.
SLOW = {"tokens_per_second": 40.0}
LONG = {"max_tokens": 40, "ignore_eos": True}


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


def adapter(flavor: str, url: str, session: aiohttp.ClientSession, **retry: Any) -> EngineAdapter:
    model = ModelConfig(name="m", engine=flavor, url=url)
    return adapter_for(model, lambda: session, replace(FAST_RETRY, **retry))


async def observe(engine: EngineAdapter) -> Any:
    return await engine.observe(ModelState.AWAKE)


class Engine:
    """An in-process simulated engine that can be stopped and started again on its port."""

    def __init__(self, flavor: str, **settings: Any) -> None:
        self.settings = SimSettings(flavor=flavor, model="m", **{**FAST_SIM_SETTINGS, **settings})
        self.port = 0
        self.runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> SimEngine:
        self.sim = SimEngine(self.settings)
        self.runner = web.AppRunner(build_app(self.sim), access_log=None, shutdown_timeout=1.0)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()
        self.port = self.runner.addresses[0][1]
        return self.sim

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None


@contextlib.asynccontextmanager
async def engine(flavor: str, **settings: Any) -> AsyncIterator[Engine]:
    running = Engine(flavor, **settings)
    await running.start()
    try:
        yield running
    finally:
        await running.stop()


async def post_completion(session: aiohttp.ClientSession, url: str, **body: Any) -> bytes:
    payload = {"model": "m", "prompt": "hi", **body}
    async with session.post(f"{url}/v1/completions", json=payload) as resp:
        return await resp.read()


# -- incarnations ----------------------------------------------------------------------------


@pytest.mark.parametrize("flavor", FLAVORS)
async def test_incarnation_is_stable_and_changes_when_the_engine_restarts(flavor, session):
    async with engine(flavor) as running:
        probe = adapter(flavor, running.url, session)
        first, again = await observe(probe), await observe(probe)
        assert first.up and first.incarnation == f"{flavor}:{running.sim.startup_time!r}"
        assert again.incarnation == first.incarnation

        await running.stop()
        down = await observe(probe)
        assert not down.up and down.incarnation is None

        await running.start()  # a fresh process on the same port
        restarted = await observe(probe)
        assert restarted.up and restarted.incarnation not in (None, first.incarnation)
        assert await observe(probe) == restarted


@pytest.mark.parametrize("flavor", FLAVORS)
async def test_a_paused_process_keeps_its_incarnation(flavor, session):
    """SIGSTOP makes the engine unreachable; after SIGCONT it is the same process, and says so."""
    async with sim_process(flavor, "m") as proc:
        probe = adapter(flavor, proc.url, session, probe_timeout_seconds=0.3)
        before = await observe(probe)
        assert before.up and before.incarnation is not None
        os.kill(proc.proc.pid, signal.SIGSTOP)
        try:
            stopped = await observe(probe)
            assert not stopped.up and stopped.incarnation is None
            assert await probe.load() is None
        finally:
            os.kill(proc.proc.pid, signal.SIGCONT)
        after = await observe(probe)
        assert after.up and after.incarnation == before.incarnation


async def test_a_vllm_without_process_metrics_names_no_incarnation(session):
    """A vLLM whose metrics are multiprocess has no process_start_time_seconds: the observation
    is today's (up, asleep), without an incarnation, unless the launcher pinned one."""
    async with engine("vllm", incarnation=False) as running:
        probe = adapter("vllm", running.url, session)
        seen = await observe(probe)
        assert (seen.up, seen.asleep, seen.incarnation) == (True, False, None)
        assert await probe.load() == 0  # the request gauges are still there

        probe.pinned_incarnation = "pid:4242@1732890000.5"
        assert (await observe(probe)).incarnation == "pid:4242@1732890000.5"
        await running.stop()
        assert (await observe(probe)).incarnation is None  # nothing answered


async def test_an_engine_that_names_itself_wins_over_the_pinned_incarnation(session):
    async with engine("sglang") as running:
        probe = adapter("sglang", running.url, session)
        probe.pinned_incarnation = "pid:1@1.0"
        assert (await observe(probe)).incarnation == f"sglang:{running.sim.startup_time!r}"


@pytest.mark.parametrize("incarnation", [True, False])
async def test_an_older_sglang_with_only_get_server_info_is_still_observed(session, incarnation):
    async with engine("sglang", legacy_server_info=True, incarnation=incarnation) as running:
        probe = adapter("sglang", running.url, session)
        seen = await observe(probe)
        assert seen.up and seen.asleep is None
        expected = f"sglang:{running.sim.startup_time!r}" if incarnation else None
        assert seen.incarnation == expected
        assert running.sim.calls["/get_server_info"] == 1
        assert running.sim.calls["GET /server_info (404)"] == 1


async def test_a_released_sglang_is_observed_without_touching_health(session):
    async with engine("sglang") as running:
        probe = adapter("sglang", running.url, session)
        before = await observe(probe)
        await probe.sleep()
        after = await observe(probe)
        assert after.up and after.incarnation == before.incarnation
        assert await probe.load() == 0
        assert running.sim.hazards == {}
        assert "/health" not in running.sim.calls


def test_startup_time_comes_from_the_top_level_or_from_every_data_parallel_rank():
    ranks = {"internal_states": [{"startup_time": 17.5}, {"startup_time": 18}]}
    assert startup_time({"startup_time": 1732890000.123, **ranks}) == "sglang:1732890000.123"
    assert startup_time(ranks) == "sglang:17.5,18.0"
    # A rank restarted alone makes a new incarnation.
    assert startup_time({"internal_states": [{"startup_time": 17.5}, {"startup_time": 19}]}) != (
        startup_time(ranks)
    )
    for unknown in (
        None,
        [],
        {},
        {"startup_time": True},
        {"startup_time": "soon"},
        {"internal_states": []},
        {"internal_states": [{"startup_time": 1.0}, {"memory_usage": {}}]},
        {"internal_states": "x"},
    ):
        assert startup_time(unknown) is None, unknown


# -- the engine's own load -------------------------------------------------------------------


@pytest.mark.parametrize("flavor", FLAVORS)
async def test_load_counts_a_request_that_bypassed_kvsleep(flavor, session):
    async with engine(flavor, **SLOW) as running:
        probe = adapter(flavor, running.url, session)
        assert await probe.load() == 0
        sent = asyncio.create_task(post_completion(session, running.url, **LONG))
        await wait_for(lambda: running.sim.in_flight == 1, 10)
        assert await probe.load() == 1
        assert json.loads(await sent)["choices"][0]["finish_reason"] == "length"
        assert await probe.load() == 0


@pytest.mark.parametrize("flavor", FLAVORS)
async def test_load_counts_a_request_whose_client_left_until_the_engine_ends_it(flavor, session):
    """A real engine keeps generating a non-streamed answer for a client that is gone."""
    async with engine(flavor, **SLOW) as running:
        probe = adapter(flavor, running.url, session)
        sent = asyncio.create_task(post_completion(session, running.url, **LONG))
        await wait_for(lambda: running.sim.in_flight == 1, 10)
        sent.cancel()  # closes the connection
        with contextlib.suppress(asyncio.CancelledError):
            await sent
        assert await probe.load() == 1
        await wait_for(lambda: running.sim.in_flight == 0, 10)
        assert await probe.load() == 0


async def test_a_stream_whose_client_left_ends_at_its_next_chunk(session):
    async with engine("vllm", **SLOW) as running:
        payload = {"model": "m", "prompt": "hi", "stream": True, **LONG}
        async with session.post(f"{running.url}/v1/completions", json=payload) as resp:
            await resp.content.readline()  # the first token is out
            assert running.sim.in_flight == 1
        await wait_for(lambda: running.sim.in_flight == 0, 10)
        assert running.sim.aborted == 1
        assert await adapter("vllm", running.url, session).load() == 0


async def test_a_sleeping_vllm_keeps_the_load_it_had_when_it_fell_asleep(session):
    """Its gauges come from engine steps: a request frozen by `mode=keep` still counts, one held
    since arriving at the sleeping engine does not (both seen on a real vLLM 0.32)."""
    async with engine("vllm", **SLOW) as running:
        probe, sim = adapter("vllm", running.url, session), running.sim
        frozen = asyncio.create_task(post_completion(session, running.url, **LONG))
        await wait_for(lambda: sim.in_flight == 1, 10)
        async with session.post(f"{running.url}/sleep", params={"level": "1", "mode": "keep"}):
            pass
        assert await probe.load() == 1
        held = asyncio.create_task(post_completion(session, running.url, **LONG))
        await wait_for(lambda: sim.queued == 1, 10)
        assert await probe.load() == 1
        async with session.post(f"{running.url}/wake_up"):
            pass
        await wait_for(lambda: sim.in_flight + sim.queued == 2, 10)
        assert await probe.load() == 2
        await asyncio.gather(frozen, held)
        assert await probe.load() == 0


async def test_sglang_without_metrics_reports_load_from_get_load(session):
    async with engine("sglang", enable_metrics=False, **SLOW) as running:
        probe = adapter("sglang", running.url, session)
        sent = asyncio.create_task(post_completion(session, running.url, **LONG))
        await wait_for(lambda: running.sim.in_flight == 1, 10)
        assert await probe.load() == 1
        assert running.sim.calls["GET /metrics (404)"] == 1
        assert running.sim.calls["/get_load"] == 1
        await sent


@pytest.mark.parametrize("flavor", FLAVORS)
async def test_load_of_an_engine_that_does_not_answer_is_unknown(flavor, session):
    async with engine(flavor) as running:
        probe = adapter(flavor, running.url, session)
    assert await probe.load() is None


def test_load_sums_every_series_and_every_data_parallel_rank():
    text = (
        "# TYPE vllm:num_requests_running gauge\n"
        'vllm:num_requests_running{engine="0",model_name="m"} 2.0\n'
        'vllm:num_requests_running{engine="1",model_name="m"} 3.0\n'
        "# TYPE vllm:num_requests_waiting gauge\n"
        'vllm:num_requests_waiting{engine="0",model_name="m"} 4.0\n'
    )
    names = ("vllm:num_requests_running", "vllm:num_requests_waiting", "absent")
    assert metric_sums(text, names) == {
        "vllm:num_requests_running": 5.0,
        "vllm:num_requests_waiting": 4.0,
    }
    # As a real vLLM 0.32 writes it.
    seen = (
        b"# TYPE process_start_time_seconds gauge\nprocess_start_time_seconds 1.79597260659e+09\n"
    )
    assert Probe(200, seen).metric_sums(["process_start_time_seconds"]) == {
        "process_start_time_seconds": 1795972606.59
    }
    assert Probe(200, b"<html>not metrics</html>").metric_sums(names) == {}
    assert Probe(200, b'vllm:num_requests_running{engine="0" 2.0\n').metric_sums(names) == {}
    assert Probe(404, text.encode()).metric_sums(names) == {}

    ranks = [
        {"dp_rank": 0, "num_reqs": 3, "num_waiting_reqs": 1},
        {"dp_rank": 1, "num_reqs": 2, "num_waiting_reqs": 2},
    ]
    assert requests_in(Probe(200, json.dumps(ranks).encode())) == 5  # waiting already counted
    assert requests_in(Probe(200, json.dumps(ranks[0]).encode())) == 3
    for unknown in (b"[]", b"null", b'[{"dp_rank": 0}]', b"oops"):
        assert requests_in(Probe(200, unknown)) is None
    assert requests_in(Probe(404, json.dumps(ranks).encode())) is None
