"""The sleep manager over real HTTP against simulated engines: holding, single-flight wakes,
drains, failures, control routes, metrics and the kvcached Python API.

Every test checks the simulated engines' hazard counters: a request that reached an engine that
was not awake, a release on a busy SGLang or a resume without a release would show there even
when every HTTP answer looked fine. Time-dependent policy runs on a FakeClock; engine operations
that must stay "in progress" are held by taking the simulated engine's control lock, not by
racing real time.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import itertools
import json
import random
import urllib.parse
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
import yarl
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from prometheus_client.parser import text_string_to_metric_families

from kvsleep import cli
from kvsleep.control.manager import SleepConfig, SleepManager
from kvsleep.control.traffic import TrafficMonitor
from kvsleep.core.policy import Adopt, Sleep, Wake
from kvsleep.core.states import ModelState
from kvsleep.sim.engine import SimEngine, SimSettings, build_app
from kvsleep.web.router import OpenAIError
from tests.conftest import FAST_SIM_SETTINGS
from tests.kvsleep_harness import FakeClock, config_doc, sim_model, start_kvsleep

V, S = "org/llama", "org/qwen"  # model names with a slash, as real ones have

# ---- helpers ----------------------------------------------------------------------------------


async def until(predicate: Callable[[], bool], timeout: float = 5.0, what: str = "") -> None:
    """Wait (bounded) for a condition that the event loop will make true."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        await asyncio.sleep(0.002)


async def settle(kv: Any, model: str) -> None:
    """Wait until the model's single-flight worker (if any) is done."""
    slot = kv.manager.slots[model]
    if slot.worker is not None:
        await asyncio.wait_for(asyncio.shield(slot.worker), 10)


async def complete(
    session: aiohttp.ClientSession, kv: Any, model: str, prompt: str = "hi", **extra: Any
) -> tuple[int, dict[str, Any], Any]:
    body = {"model": model, "prompt": prompt, "max_tokens": 3, **extra}
    async with session.post(f"{kv.url}/v1/completions", json=body) as resp:
        return resp.status, await resp.json(content_type=None), resp.headers


async def stream(
    session: aiohttp.ClientSession, kv: Any, model: str, max_tokens: int = 5
) -> tuple[int, list[Any]]:
    """A streamed chat completion; returns the status and the parsed SSE events."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "hi"}],
        "stream": True,
        "max_tokens": max_tokens,
        "ignore_eos": True,
    }
    async with session.post(f"{kv.url}/v1/chat/completions", json=body) as resp:
        raw = (await resp.read()).decode()
    return resp.status, sse_events(raw)


def sse_events(raw: str) -> list[Any]:
    events = [line[len("data: ") :] for line in raw.split("\n") if line.startswith("data: ")]
    return [e if e == "[DONE]" else json.loads(e) for e in events]


def finish_reasons(events: list[Any]) -> list[str]:
    return [
        c["finish_reason"]
        for e in events
        if isinstance(e, dict)
        for c in e.get("choices", [])
        if c.get("finish_reason")
    ]


async def control(
    session: aiohttp.ClientSession,
    kv: Any,
    path: str,
    *,
    token: str | None = None,
    encoded: bool = False,
) -> tuple[int, dict[str, Any]]:
    url = yarl.URL(kv.url + path, encoded=True) if encoded else kv.url + path
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with session.post(url, headers=headers) as resp:
        return resp.status, await resp.json(content_type=None)


async def get_json(session: aiohttp.ClientSession, url: str) -> Any:
    async with session.get(url) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json()


async def scrape(session: aiohttp.ClientSession, kv: Any) -> dict[tuple[str, frozenset], float]:
    async with session.get(f"{kv.url}/metrics") as resp:
        text = await resp.text()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def sample(samples: dict[tuple[str, frozenset], float], name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def clean(stats: dict[str, Any]) -> None:
    """The engine suffered nothing: no hazard, nothing served while not awake, nothing aborted."""
    assert stats["hazards"] == {}, stats["hazards"]
    assert stats["state"] != "dead", stats
    assert stats["requests"]["served_while_not_awake"] == 0, stats["requests"]
    assert stats["requests"]["aborted"] == 0, stats["requests"]


def calls(sim: Any, route: str) -> int:
    return sim.sim.stats()["calls"].get(route, 0)


@contextlib.asynccontextmanager
async def engine_busy(sim: Any) -> AsyncIterator[None]:
    """Hold the simulated engine's control lock: a wake or sleep sent meanwhile stays in
    progress (deterministically) until the block ends."""
    async with sim.sim.control_lock:
        yield


@contextlib.contextmanager
def wake_gate(kv: Any, model: str):
    """Make the model's next wakes wait until the block ends, before reaching the engine."""
    slot = kv.manager.slots[model]
    gate = asyncio.Event()
    wake = slot.adapter.wake

    async def gated_wake() -> None:
        await gate.wait()
        await wake()

    slot.adapter.wake = gated_wake
    try:
        yield
    finally:
        gate.set()


async def arm(session: aiohttp.ClientSession, sim: Any, **faults: Any) -> None:
    async with session.post(f"{sim.url}/sim/faults", json=faults) as resp:
        assert resp.status == 200, await resp.text()


class Tracker:
    """Records, for every routed request, its arrival number, whether it had to be held, and the
    order in which requests were let through to the engine (`_forward` is called as soon as
    the lease is granted)."""

    def __init__(self, kv: Any) -> None:
        self.forwarded: list[tuple[str, int, bool]] = []
        router = kv.server.router
        numbers = itertools.count()
        ticket: contextvars.ContextVar[tuple[str, int, bool]] = contextvars.ContextVar("ticket")
        hold, forward = router._hold, router._forward

        async def tracked_hold(request, slot, *args, **kwargs):
            held = slot.state is not ModelState.AWAKE
            ticket.set((slot.cfg.name, next(numbers), held))
            return await hold(request, slot, *args, **kwargs)

        async def tracked_forward(request, slot, body, early):
            # A request for an awake model is admitted without `_hold`: numbered here.
            self.forwarded.append(ticket.get((slot.cfg.name, next(numbers), False)))
            return await forward(request, slot, body, early)

        router._hold = tracked_hold
        router._forward = tracked_forward

    def held(self, model: str) -> list[int]:
        return [n for m, n, held in self.forwarded if m == model and held]

    def assert_held_in_arrival_order(self) -> None:
        for model in {m for m, _, _ in self.forwarded}:
            order = self.held(model)
            assert order == sorted(order), f"{model}: held requests let through as {order}"


# ---- many requests to an asleep model: one wake, nothing reaches a sleeping engine -----------


def sleep_query(sim: Any) -> dict[str, list[str]]:
    events = [
        e for e in sim.sim.stats()["log"] if e["event"] == "control" and e["route"] == "/sleep"
    ]
    assert len(events) == 1, events
    return urllib.parse.parse_qs(events[0]["query"])


async def test_500_plus_500_requests_to_asleep_engines_share_one_wake_each(
    sim_factory, kvsleep_factory
):
    vllm = await sim_factory("vllm", V, wake_latency=0.3)
    sglang = await sim_factory("sglang", S, wake_latency=0.3)
    kv = await kvsleep_factory([sim_model(vllm), sim_model(sglang)])
    tracker = Tracker(kv)
    for name in (V, S):
        assert await kv.manager.put_model_to_sleep(name, manual=True) is True
        assert kv.state(name) == "asleep"
    # vLLM's sleep is sent with its options as query parameters: the body is ignored.
    assert sleep_query(vllm) == {"level": ["1"], "mode": ["wait"]}
    assert vllm.sim.stats()["state"] == "asleep"
    assert sglang.sim.stats()["engine"]["released"] == ["cuda_graph", "kv_cache", "weights"]

    async with aiohttp.ClientSession() as session:
        results = await asyncio.gather(
            *(complete(session, kv, m, prompt=f"p{i}") for i in range(500) for m in (V, S))
        )
        samples = await scrape(session, kv)
    assert [status for status, _, _ in results] == [200] * 1000
    assert all(body["choices"][0]["text"] for _, body, _ in results)
    v, s = vllm.sim.stats(), sglang.sim.stats()
    assert v["calls"]["/sleep"] == 1 and v["calls"]["/wake_up"] == 1, v["calls"]
    assert s["calls"]["/release_memory_occupation"] == 1
    assert s["calls"]["/resume_memory_occupation"] == 1
    assert s["calls"]["/update_weights_from_disk"] == 1
    assert "/health" not in s["calls"], "a released SGLang must never be health-probed"
    clean(v)
    clean(s)
    assert v["requests"]["completed"] == 500 and s["requests"]["completed"] == 500
    assert kv.state(V) == kv.state(S) == "awake"
    tracker.assert_held_in_arrival_order()
    for name in (V, S):
        held = len(tracker.held(name))
        assert held >= 1  # the first request found the model asleep
        assert (
            sample(samples, "kvsleep_wakes_total", model=name, reason="request", result="ok") == 1
        )
        assert (
            sample(samples, "kvsleep_sleeps_total", model=name, reason="manual", result="ok") == 1
        )
        assert sample(samples, "kvsleep_request_hold_seconds_count", model=name) == held
        assert sample(samples, "kvsleep_held_requests", model=name) == 0
        assert sample(samples, "kvsleep_model_state", model=name, state="awake") == 1
        assert sample(samples, "kvsleep_model_state", model=name, state="asleep") == 0
        assert (
            sample(
                samples,
                "kvsleep_requests_total",
                model=name,
                endpoint="/v1/completions",
                code="200",
            )
            == 500
        )


async def test_vllm_sleep_level_2_wakes_weights_reloads_then_kv_cache(sim_factory, kvsleep_factory):
    vllm = await sim_factory("vllm", V, wake_latency=0.1)
    kv = await kvsleep_factory([sim_model(vllm, sleep_level=2)])
    assert await kv.manager.put_model_to_sleep(V, manual=True)
    assert sleep_query(vllm) == {"level": ["2"], "mode": ["wait"]}
    assert vllm.sim.stats()["engine"]["weights"] == "none"

    async with aiohttp.ClientSession() as session:
        results = await asyncio.gather(*(complete(session, kv, V) for _ in range(100)))
    assert [status for status, _, _ in results] == [200] * 100
    stats = vllm.sim.stats()
    clean(stats)  # includes: no garbage_weights hazard (served before reload_weights)
    assert stats["engine"]["weights_valid"] is True and stats["engine"]["sleep_level"] is None
    wake_calls = [
        (e["route"], e["query"])
        for e in stats["log"]
        if e["event"] == "control" and e["route"] in ("/wake_up", "/collective_rpc")
    ]
    assert wake_calls == [
        ("/wake_up", "tags=weights"),
        ("/collective_rpc", ""),
        ("/wake_up", "tags=kv_cache"),
    ]


# ---- streams are never cut; idle counts from the end of the last request ---------------------


@pytest.mark.parametrize("flavor", ["vllm", "sglang"])
async def test_a_long_stream_is_never_cut_by_an_idle_sleep(flavor, sim_factory, kvsleep_factory):
    engine = await sim_factory(flavor, V, tokens_per_second=10)
    kv = await kvsleep_factory([sim_model(engine)], idle_threshold_seconds=1)
    stats = kv.manager.traffic_monitor.model_stats[V]
    body = {"model": V, "prompt": "tell me", "max_tokens": 10, "ignore_eos": True, "stream": True}
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{kv.url}/v1/completions", json=body) as resp,
    ):
        assert resp.status == 200
        first = await resp.content.readline()
        assert first.startswith(b"data: ")
        # 0.9 s of generation left: the stream is in flight while time jumps far past the
        # threshold, and no reconcile pass may touch the model.
        for _ in range(3):
            assert stats.in_flight == 1
            kv.clock.advance(1000)
            assert await kv.reconcile() == []
            assert kv.state(V) == "awake"
        assert kv.manager.get_sleep_candidates() == []
        raw = (first + await resp.read()).decode()
    events = sse_events(raw)
    assert events[-1] == "[DONE]"
    assert finish_reasons(events) == ["length"]
    assert "".join(e["choices"][0]["text"] for e in events[:-1]).count(" ") == 9  # 10 tokens
    await until(lambda: stats.in_flight == 0, what="the stream's end to be recorded")

    # Idle time counts from the end of the stream, not from its start.
    assert await kv.reconcile() == []
    kv.clock.advance(0.9)
    assert await kv.reconcile() == []
    kv.clock.advance(0.1)
    assert await kv.reconcile() == [Sleep(V, "idle")]
    await settle(kv, V)
    assert kv.state(V) == "asleep"
    engine_stats = engine.sim.stats()
    clean(engine_stats)
    assert engine_stats["requests"]["completed"] == 1


@pytest.mark.parametrize("flavor", ["vllm", "sglang"])
async def test_requests_arriving_while_draining_are_held_and_served_after_the_wake(
    flavor, sim_factory, kvsleep_factory
):
    engine = await sim_factory(flavor, V, tokens_per_second=20)
    kv = await kvsleep_factory([sim_model(engine)])
    tracker = Tracker(kv)
    body = {"model": V, "prompt": "long", "max_tokens": 16, "ignore_eos": True, "stream": True}
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{kv.url}/v1/completions", json=body) as resp:
            first = await resp.content.readline()
            status, answer = await control(session, kv, f"/action/sleep/{V}?wait=false")
            assert (status, answer["success"]) == (202, True)
            await until(lambda: kv.state(V) == "draining")
            held = [asyncio.create_task(complete(session, kv, V, prompt=f"h{i}")) for i in range(5)]
            await until(lambda: len(kv.manager.slots[V].waiters) == 5)
            assert kv.state(V) == "draining"  # the stream still runs: nothing was slept yet
            assert calls(engine, "/sleep") + calls(engine, "/release_memory_occupation") == 0
            raw = (first + await resp.read()).decode()
        results = await asyncio.wait_for(asyncio.gather(*held), 10)
    assert finish_reasons(sse_events(raw)) == ["length"]
    assert [r[0] for r in results] == [200] * 5
    assert kv.state(V) == "awake"
    stats = engine.sim.stats()
    clean(stats)
    sleeps = stats["calls"].get("/sleep", 0) + stats["calls"].get("/release_memory_occupation", 0)
    wakes = stats["calls"].get("/wake_up", 0) + stats["calls"].get("/resume_memory_occupation", 0)
    assert (sleeps, wakes) == (1, 1)
    assert tracker.held(V) == sorted(tracker.held(V)) and len(tracker.held(V)) == 5


async def test_a_stream_outlasting_the_drain_timeout_keeps_the_model_awake(
    sim_factory, kvsleep_factory
):
    """A manual sleep gives up rather than cut a stream; requests held meanwhile are served."""
    engine = await sim_factory("vllm", V, tokens_per_second=10)
    kv = await kvsleep_factory([sim_model(engine)], drain_timeout_seconds=0.2)
    body = {"model": V, "prompt": "long", "max_tokens": 10, "ignore_eos": True, "stream": True}
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{kv.url}/v1/completions", json=body) as resp:
            first = await resp.content.readline()
            sleeping = asyncio.create_task(control(session, kv, f"/models/{V}/sleep"))
            await until(lambda: kv.state(V) == "draining")
            held = asyncio.create_task(complete(session, kv, V))
            await until(lambda: len(kv.manager.slots[V].waiters) == 1)
            status, answer = await sleeping
            assert (status, answer["success"]) == (400, False)
            assert "in flight" in answer["message"]
            assert kv.state(V) == "awake"
            assert (await held)[0] == 200  # served while the stream still runs
            assert kv.manager.traffic_monitor.model_stats[V].in_flight == 1
            raw = (first + await resp.read()).decode()
        samples = await scrape(session, kv)
    assert finish_reasons(sse_events(raw)) == ["length"]
    assert calls(engine, "/sleep") == 0
    assert sample(samples, "kvsleep_sleeps_total", model=V, reason="manual", result="error") == 1
    clean(engine.sim.stats())


@pytest.mark.parametrize("flavor", ["vllm", "sglang"])
async def test_requests_arriving_while_the_engine_sleeps_are_held_in_arrival_order(
    flavor, sim_factory, kvsleep_factory
):
    engine = await sim_factory(flavor, V)
    kv = await kvsleep_factory([sim_model(engine)])
    tracker = Tracker(kv)
    async with aiohttp.ClientSession() as session:
        async with engine_busy(engine):
            sleeping = asyncio.create_task(control(session, kv, f"/models/{V}/sleep"))
            await until(lambda: kv.state(V) == "sleeping")
            held = []
            for i in range(6):  # one at a time, so arrival order is known
                held.append(asyncio.create_task(complete(session, kv, V, prompt=f"h{i}")))
                await until(lambda n=i + 1: len(kv.manager.slots[V].waiters) == n)
        status, answer = await sleeping
        results = await asyncio.wait_for(asyncio.gather(*held), 10)
    assert (status, answer["success"]) == (200, True)
    assert [r[0] for r in results] == [200] * 6
    clean(engine.sim.stats())
    assert tracker.held(V) == sorted(tracker.held(V)) and len(tracker.held(V)) == 6


@pytest.mark.parametrize("flavor", ["vllm", "sglang"])
async def test_a_manual_sleep_never_strands_requests_already_held(
    flavor, sim_factory, kvsleep_factory
):
    """Held requests are served even when another sleep is asked for before their wake."""
    engine = await sim_factory(flavor, V)
    kv = await kvsleep_factory([sim_model(engine)], wake_timeout_seconds=3)
    async with aiohttp.ClientSession() as session:
        async with engine_busy(engine):
            first_sleep = kv.manager.request_sleep(V, "manual")
            await until(lambda: kv.state(V) == "sleeping")
            held = asyncio.create_task(complete(session, kv, V))
            await until(lambda: len(kv.manager.slots[V].waiters) == 1)
            second_sleep = kv.manager.request_sleep(V, "manual")
        assert await first_sleep is True
        await second_sleep
        status, body, _ = await asyncio.wait_for(held, 5)
    assert status == 200, body
    assert kv.state(V) == "awake"
    clean(engine.sim.stats())


@pytest.mark.parametrize("seed", [11, 23, 37])
async def test_randomized_traffic_with_sleeps_and_wakes_loses_nothing(
    seed, sim_factory, kvsleep_factory
):
    """Seeded interleavings of plain and streamed requests with manual sleeps and wakes and
    idle sleeps, over several cycles, against both engines."""
    rng = random.Random(seed)
    fast = dict(wake_latency=0.03, sleep_latency=0.05, reload_latency=0.01, tokens_per_second=300)
    vllm = await sim_factory("vllm", V, **fast)
    sglang = await sim_factory("sglang", S, **fast)
    kv = await kvsleep_factory(
        [sim_model(vllm), sim_model(sglang)], idle_threshold_seconds=30, wake_timeout_seconds=5
    )
    tracker = Tracker(kv)
    requests: list[asyncio.Task] = []
    controls: list[asyncio.Task] = []
    async with aiohttp.ClientSession() as session:
        for _cycle in range(6):
            for _ in range(rng.randint(10, 25)):
                op = rng.choices(
                    ["request", "stream", "sleep", "wake", "idle", "pause"],
                    weights=[6, 3, 3, 1, 1, 3],
                )[0]
                model = rng.choice((V, S))
                if op == "request":
                    requests.append(
                        asyncio.create_task(
                            complete(session, kv, model, max_tokens=rng.randint(1, 6))
                        )
                    )
                elif op == "stream":
                    requests.append(
                        asyncio.create_task(
                            stream(session, kv, model, max_tokens=rng.randint(1, 8))
                        )
                    )
                elif op in ("sleep", "wake"):
                    route = rng.choice(
                        ["/action/sleep/", "/models/{}/sleep"]
                        if op == "sleep"
                        else ["/action/wakeup/", "/models/{}/wake"]
                    )
                    path = route.format(model) if "{}" in route else route + model
                    controls.append(asyncio.create_task(control(session, kv, path)))
                elif op == "idle":
                    kv.clock.advance(31)
                    await kv.reconcile()
                else:
                    await asyncio.sleep(rng.uniform(0, 0.02))
            await asyncio.wait_for(asyncio.gather(*requests, *controls), 20)
        results = [t.result() for t in requests]
        answers = [t.result() for t in controls]
        samples = await scrape(session, kv)

    assert requests, "the seed produced no traffic"
    for result in results:
        assert result[0] == 200, (seed, result)
        if isinstance(result[1], list):  # a stream: complete, never aborted
            assert result[1][-1] == "[DONE]" and "abort" not in finish_reasons(result[1])
    for status, answer in answers:
        # A sleep may lose to requests that arrived before it completed; never a server error.
        assert status in (200, 400) and answer["success"] is (status == 200), (seed, answer)
    for name, sim in ((V, vllm), (S, sglang)):
        await settle(kv, name)
        stats = sim.sim.stats()
        clean(stats)
        sleep_route, wake_route = (
            ("/sleep", "/wake_up")
            if sim is vllm
            else ("/release_memory_occupation", "/resume_memory_occupation")
        )
        slept, woke = stats["calls"].get(sleep_route, 0), stats["calls"].get(wake_route, 0)
        # The engine and kvsleep agree on where the model stands.
        assert slept - woke == (1 if kv.state(name) == "asleep" else 0), (seed, name, stats)
        assert kv.state(name) in ("awake", "asleep")
        ok_sleeps = sum(
            sample(samples, "kvsleep_sleeps_total", model=name, reason=r, result="ok")
            for r in ("idle", "manual")
        )
        ok_wakes = sum(
            sample(samples, "kvsleep_wakes_total", model=name, reason=r, result="ok")
            for r in ("request", "manual")
        )
        assert (ok_sleeps, ok_wakes) == (slept, woke), (seed, name)
        assert sample(samples, "kvsleep_held_requests", model=name) == 0
        assert not kv.manager.slots[name].waiters
    tracker.assert_held_in_arrival_order()


# ---- engines changed behind kvsleep's back ---------------------------------------------------


class RestartableSim:
    """An in-process engine that can be stopped and started again on the same port."""

    def __init__(self, flavor: str, model: str, **settings: Any) -> None:
        self.flavor, self.model = flavor, model
        self.settings = {**FAST_SIM_SETTINGS, **settings}
        self.port = 0
        self.runner: web.AppRunner | None = None
        self.sim: SimEngine | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def entry(self, **extra: Any) -> dict[str, Any]:
        return {"name": self.model, "engine": self.flavor, "url": self.url, **extra}

    async def start(self) -> RestartableSim:
        self.sim = SimEngine(SimSettings(flavor=self.flavor, model=self.model, **self.settings))
        self.runner = web.AppRunner(build_app(self.sim), access_log=None, shutdown_timeout=1.0)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()
        self.port = self.runner.addresses[0][1]
        return self

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None


@pytest.fixture
async def restartable() -> AsyncIterator[Callable[..., Any]]:
    sims: list[RestartableSim] = []

    async def make(flavor: str, model: str, **settings: Any) -> RestartableSim:
        sim = await RestartableSim(flavor, model, **settings).start()
        sims.append(sim)
        return sim

    yield make
    for sim in sims:
        await sim.stop()


async def test_vllm_restarted_behind_our_back_is_adopted_awake_in_one_pass(
    restartable, kvsleep_factory
):
    engine = await restartable("vllm", V)
    kv = await kvsleep_factory([engine.entry()])
    assert await kv.manager.put_model_to_sleep(V, manual=True)
    await engine.stop()
    await engine.start()  # a fresh process holds its memory: awake
    actions = await kv.reconcile()
    assert [(type(a), a.state) for a in actions] == [(Adopt, ModelState.AWAKE)]
    assert kv.state(V) == "awake"
    async with aiohttp.ClientSession() as session:
        status, _, _ = await complete(session, kv, V)
    assert status == 200
    assert calls(engine, "/wake_up") == 0  # nothing to wake
    clean(engine.sim.stats())


async def test_vllm_slept_behind_our_back_is_adopted_asleep_then_woken_by_a_request(
    sim_factory, kvsleep_factory
):
    engine = await sim_factory("vllm", V)
    kv = await kvsleep_factory([sim_model(engine)], auto_sleep_enabled=False)
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{engine.url}/sleep?level=1") as resp:
            assert resp.status == 200
        actions = await kv.reconcile()
        assert [(type(a), a.state) for a in actions] == [(Adopt, ModelState.ASLEEP)]
        assert kv.state(V) == "asleep"
        assert await kv.reconcile() == []  # converged
        results = await asyncio.gather(*(complete(session, kv, V) for _ in range(20)))
    assert [r[0] for r in results] == [200] * 20
    assert calls(engine, "/wake_up") == 1
    clean(engine.sim.stats())


async def test_vllm_woken_behind_our_back_is_adopted_awake(sim_factory, kvsleep_factory):
    engine = await sim_factory("vllm", V)
    kv = await kvsleep_factory([sim_model(engine)])
    assert await kv.manager.put_model_to_sleep(V, manual=True)
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{engine.url}/wake_up") as resp:
            assert resp.status == 200
        assert [type(a) for a in await kv.reconcile()] == [Adopt]
        assert kv.state(V) == "awake"
        status, _, _ = await complete(session, kv, V)
    assert status == 200
    assert calls(engine, "/wake_up") == 1  # only the direct call
    clean(engine.sim.stats())


async def test_sglang_restarted_behind_our_back_is_adopted_awake_once_seen_down(
    restartable, kvsleep_factory
):
    engine = await restartable("sglang", S)
    kv = await kvsleep_factory([engine.entry()])
    assert await kv.manager.put_model_to_sleep(S, manual=True)
    assert await kv.reconcile() == []  # SGLang cannot say it is asleep: our record stands
    await engine.stop()
    assert await kv.reconcile() == []
    assert kv.state(S) == "asleep" and kv.manager.slots[S].engine_up is False
    await engine.start()
    actions = await kv.reconcile()
    assert [(type(a), a.state) for a in actions] == [(Adopt, ModelState.AWAKE)]
    async with aiohttp.ClientSession() as session:
        status, _, _ = await complete(session, kv, S)
    assert status == 200
    # Resuming a fresh engine that released nothing would kill it.
    assert calls(engine, "/resume_memory_occupation") == 0
    clean(engine.sim.stats())


# ---- failing and slow wakes ------------------------------------------------------------------


@pytest.mark.parametrize("flavor", ["vllm", "sglang"])
async def test_a_wake_that_fails_twice_then_succeeds_serves_the_held_requests(
    flavor, sim_factory, kvsleep_factory
):
    engine = await sim_factory(flavor, V)
    kv = await kvsleep_factory([sim_model(engine)])
    assert await kv.manager.put_model_to_sleep(V, manual=True)
    wake_route = "/wake_up" if flavor == "vllm" else "/resume_memory_occupation"
    async with aiohttp.ClientSession() as session:
        await arm(session, engine, fail={"wake": 2})
        results = await asyncio.gather(*(complete(session, kv, V) for _ in range(20)))
        samples = await scrape(session, kv)
    assert [r[0] for r in results] == [200] * 20
    assert calls(engine, wake_route) == 3
    clean(engine.sim.stats())
    assert sample(samples, "kvsleep_wakes_total", model=V, reason="request", result="ok") == 1
    assert sample(samples, "kvsleep_wakes_total", model=V, reason="request", result="error") == 0


@pytest.mark.parametrize("flavor", ["vllm", "sglang"])
async def test_a_wake_that_keeps_failing_answers_503_and_the_next_request_retries(
    flavor, sim_factory, kvsleep_factory
):
    engine = await sim_factory(flavor, V)
    other = await sim_factory("vllm", "org/other")
    kv = await kvsleep_factory([sim_model(engine), sim_model(other)])
    assert await kv.manager.put_model_to_sleep(V, manual=True)
    async with aiohttp.ClientSession() as session:
        await arm(session, engine, fail={"wake": 1000})
        with wake_gate(kv, V):  # all five are held before the (single) wake fails
            pending = [asyncio.create_task(complete(session, kv, V)) for _ in range(5)]
            await until(lambda: len(kv.manager.slots[V].waiters) == 5)
        results = await asyncio.gather(*pending)
        for status, body, headers in results:
            assert status == 503
            assert f"`{V}`" in body["error"]["message"]
            assert "failed to wake" in body["error"]["message"]
            assert body["error"]["code"] == "wake_failed"
            assert int(headers["Retry-After"]) >= 1
        assert kv.state(V) == "failed"
        # The router stays up and serves other models.
        assert (await get_json(session, f"{kv.url}/health"))["status"] == "healthy"
        assert (await complete(session, kv, "org/other"))[0] == 200
        status_doc = await get_json(session, f"{kv.url}/sleep/status")
        assert "HTTP 500" in status_doc["models"][V]["last_error"]

        await arm(session, engine, fail={"wake": 0})
        status, _, _ = await complete(session, kv, V)
        assert status == 200
        samples = await scrape(session, kv)
    assert kv.state(V) == "awake"
    clean(engine.sim.stats())
    assert sample(samples, "kvsleep_wakes_total", model=V, reason="request", result="error") == 1
    assert sample(samples, "kvsleep_wakes_total", model=V, reason="request", result="ok") == 1
    assert sample(samples, "kvsleep_rejected_requests_total", model=V, reason="wake_failed") == 5
    assert sample(samples, "kvsleep_model_state", model=V, state="awake") == 1


async def test_sglang_wake_retried_after_a_failed_weight_reload_does_not_resume_twice(
    sim_factory, kvsleep_factory
):
    """Resume succeeded, the reload failed: the next wake must only reload (a second resume
    without a release kills SGLang's scheduler)."""
    engine = await sim_factory("sglang", S, weights_path="/models/qwen-v1")
    kv = await kvsleep_factory([sim_model(engine, weights_path="/models/qwen-v2")])
    assert await kv.manager.put_model_to_sleep(S, manual=True)
    async with aiohttp.ClientSession() as session:
        status, body, _ = await complete(session, kv, S)
        assert status == 503 and "qwen-v2" in body["error"]["message"]
        assert kv.state(S) == "failed"
        engine.settings.weights_path = "/models/qwen-v2"  # e.g. the volume came back
        status, body, _ = await complete(session, kv, S)
    assert status == 200, body
    stats = engine.sim.stats()
    clean(stats)
    assert stats["calls"]["/resume_memory_occupation"] == 1
    assert stats["calls"]["/update_weights_from_disk"] == 2
    assert stats["engine"]["weights_stale"] is False


async def test_full_hold_queue_answers_503_with_retry_after(sim_factory, kvsleep_factory):
    engine = await sim_factory("vllm", V)
    kv = await kvsleep_factory([sim_model(engine)], max_held_requests=2)
    assert await kv.manager.put_model_to_sleep(V, manual=True)
    async with aiohttp.ClientSession() as session:
        async with engine_busy(engine):
            held = []
            for n in (1, 2):
                held.append(asyncio.create_task(complete(session, kv, V)))
                await until(lambda n=n: len(kv.manager.slots[V].waiters) == n)
            status, body, headers = await complete(session, kv, V)
            assert status == 503
            assert body["error"]["code"] == "queue_full"
            assert f"`{V}`" in body["error"]["message"]
            assert int(headers["Retry-After"]) >= 1
            samples = await scrape(session, kv)
            assert sample(samples, "kvsleep_held_requests", model=V) == 2
        assert [r[0] for r in await asyncio.gather(*held)] == [200, 200]
        samples = await scrape(session, kv)
    assert sample(samples, "kvsleep_rejected_requests_total", model=V, reason="queue_full") == 1
    assert sample(samples, "kvsleep_held_requests", model=V) == 0
    assert sample(samples, "kvsleep_request_hold_seconds_count", model=V) == 2
    clean(engine.sim.stats())


async def test_a_wake_slower_than_wake_timeout_answers_504_then_serves(
    sim_factory, kvsleep_factory
):
    engine = await sim_factory("vllm", V)
    kv = await kvsleep_factory([sim_model(engine)], wake_timeout_seconds=0.2)
    assert await kv.manager.put_model_to_sleep(V, manual=True)
    async with aiohttp.ClientSession() as session:
        async with engine_busy(engine):
            status, body, _ = await complete(session, kv, V)
            assert status == 504
            assert body["error"]["code"] == "wake_timeout"
            assert f"`{V}`" in body["error"]["message"]
            assert not kv.manager.slots[V].waiters
            assert kv.state(V) == "waking"
        await settle(kv, V)
        assert kv.state(V) == "awake"  # the wake itself went on
        assert (await complete(session, kv, V))[0] == 200
        samples = await scrape(session, kv)
    assert sample(samples, "kvsleep_rejected_requests_total", model=V, reason="wake_timeout") == 1
    assert calls(engine, "/wake_up") == 1
    clean(engine.sim.stats())


async def test_wakeup_on_request_off_answers_503_at_once_with_an_explanation(
    sim_factory, kvsleep_factory
):
    engine = await sim_factory("vllm", V)
    kv = await kvsleep_factory([sim_model(engine)], wakeup_on_request=False)
    assert await kv.manager.put_model_to_sleep(V, manual=True)
    async with aiohttp.ClientSession() as session:
        status, body, _ = await complete(session, kv, V)
        assert status == 503
        assert body["error"]["code"] == "asleep_no_wake"
        assert "wakeup_on_request" in body["error"]["message"] and V in body["error"]["message"]
        assert kv.state(V) == "asleep" and calls(engine, "/wake_up") == 0
        assert (await control(session, kv, f"/action/wakeup/{V}"))[0] == 200
        assert (await complete(session, kv, V))[0] == 200
        samples = await scrape(session, kv)
    assert sample(samples, "kvsleep_rejected_requests_total", model=V, reason="asleep_no_wake") == 1
    assert sample(samples, "kvsleep_wakes_total", model=V, reason="manual", result="ok") == 1
    clean(engine.sim.stats())


async def test_a_client_that_disconnects_while_held_leaves_the_queue(sim_factory, kvsleep_factory):
    engine = await sim_factory("vllm", V)
    kv = await kvsleep_factory([sim_model(engine)])
    assert await kv.manager.put_model_to_sleep(V, manual=True)
    async with aiohttp.ClientSession() as watcher:
        async with engine_busy(engine):
            async with aiohttp.ClientSession() as impatient:
                gone = asyncio.create_task(complete(impatient, kv, V))
                await until(lambda: len(kv.manager.slots[V].waiters) == 1)
                assert sample(await scrape(watcher, kv), "kvsleep_held_requests", model=V) == 1
                gone.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await gone
            await until(lambda: not kv.manager.slots[V].waiters, what="the waiter to leave")
            await until(lambda: kv.manager.traffic_monitor.model_stats[V].in_flight == 0)
            assert sample(await scrape(watcher, kv), "kvsleep_held_requests", model=V) == 0
        await settle(kv, V)
    stats = engine.sim.stats()
    clean(stats)
    assert stats["requests"]["completed"] == 0  # the request never reached the engine
    assert kv.manager.slots[V].in_engine == 0


# ---- control routes ---------------------------------------------------------------------------


async def test_control_routes_accept_raw_and_encoded_model_names(sim_factory, kvsleep_factory):
    engine = await sim_factory("vllm", V)
    kv = await kvsleep_factory([sim_model(engine)])
    encoded = urllib.parse.quote(V, safe="")
    assert encoded == "org%2Fllama"
    async with aiohttp.ClientSession() as session:
        for sleep_path, wake_path, enc in (
            (f"/action/sleep/{V}", f"/action/wakeup/{V}", False),
            (f"/action/sleep/{encoded}", f"/action/wakeup/{encoded}", True),
            (f"/models/{V}/sleep", f"/models/{V}/wake", False),
            (f"/models/{encoded}/sleep", f"/models/{encoded}/wake", True),
        ):
            status, answer = await control(session, kv, sleep_path, encoded=enc)
            assert (status, answer["model_name"], answer["success"]) == (200, V, True), answer
            assert kv.state(V) == "asleep" and vllm_asleep(engine)
            status, answer = await control(session, kv, wake_path, encoded=enc)
            assert (status, answer["model_name"], answer["success"]) == (200, V, True), answer
            assert kv.state(V) == "awake" and not vllm_asleep(engine)
        status, answer = await control(session, kv, "/action/sleep/org/missing")
        assert (status, answer) == (404, {"error": "Model org/missing not found"})  # kvcached's
        status, answer = await control(session, kv, "/models/org%2Fmissing/wake", encoded=True)
        assert status == 404
        samples = await scrape(session, kv)
    assert sample(samples, "kvsleep_sleeps_total", model=V, reason="manual", result="ok") == 4
    assert sample(samples, "kvsleep_wakes_total", model=V, reason="manual", result="ok") == 4
    assert calls(engine, "/sleep") == 4 and calls(engine, "/wake_up") == 4
    clean(engine.sim.stats())


def vllm_asleep(engine: Any) -> bool:
    return engine.sim.stats()["state"] == "asleep"


async def test_sleep_status_and_candidates_keys(sim_factory, kvsleep_factory):
    vllm = await sim_factory("vllm", V)
    sglang = await sim_factory("sglang", S)
    kv = await kvsleep_factory(
        [sim_model(vllm), sim_model(sglang, idle_threshold_seconds=600)], idle_threshold_seconds=60
    )
    async with aiohttp.ClientSession() as session:
        assert await kv.manager.put_model_to_sleep(S, manual=True)
        doc = await get_json(session, f"{kv.url}/sleep/status")
        assert {
            "sleeping_models",
            "sleep_candidates",
            "auto_sleep_enabled",
            "idle_threshold_seconds",
            "wakeup_on_request",
            "models",
        } <= set(doc)
        assert set(doc["sleeping_models"]) == {S}
        assert set(doc["sleeping_models"][S]) == {
            "sleep_start_time",
            "sleep_duration",
            "manual_sleep",
        }
        assert doc["sleeping_models"][S]["manual_sleep"] is True
        assert doc["models"][V]["state"] == "awake" and doc["models"][S]["state"] == "asleep"
        assert doc["models"][S]["idle_threshold_seconds"] == 600
        assert doc["sleep_candidates"] == []

        kv.clock.advance(61)
        doc = await get_json(session, f"{kv.url}/sleep/candidates")
        assert set(doc) == {
            "sleep_candidates",
            "candidate_details",
            "idle_threshold_seconds",
            "auto_sleep_enabled",
        }
        assert doc["sleep_candidates"] == [V]
        assert set(doc["candidate_details"][V]) == {
            "idle_time_seconds",
            "total_requests",
            "last_activity_time",
            "can_sleep",
        }
        assert doc["candidate_details"][V]["idle_time_seconds"] >= 61
        doc = await get_json(session, f"{kv.url}/sleep/status")
        assert doc["sleep_candidates"] == [V]


@pytest.fixture
def admin_token(monkeypatch) -> str:
    monkeypatch.setenv("KVSLEEP_TEST_ADMIN_TOKEN", "s3cret-token")
    monkeypatch.delenv("KVSLEEP_ADMIN_TOKEN", raising=False)
    return "s3cret-token"


async def test_control_routes_require_the_bearer_token_when_configured(
    admin_token, sim_factory, tmp_path
):
    engine = await sim_factory("vllm", V)
    doc = config_doc([sim_model(engine)], tmp_path / "state")
    doc["router"]["admin_token_env"] = "KVSLEEP_TEST_ADMIN_TOKEN"
    kv = await start_kvsleep(doc)
    try:
        async with aiohttp.ClientSession() as session:
            for path in (
                f"/action/sleep/{V}",
                f"/models/{V}/sleep",
                f"/action/wakeup/{V}",
                f"/models/{V}/wake",
                "/-/reload",
            ):
                for token in (None, "wrong", admin_token + "x"):
                    status, answer = await control(session, kv, path, token=token)
                    assert status == 401, (path, token, answer)
                    if path.startswith("/action/"):  # kvcached's routes: {"error": "text"}
                        assert "bearer token" in answer["error"]
                    else:
                        assert answer["error"]["type"] == "authentication_error"
            assert kv.state(V) == "awake" and calls(engine, "/sleep") == 0
            # Read routes stay open.
            assert "models" in await get_json(session, f"{kv.url}/sleep/status")
            status, answer = await control(session, kv, f"/models/{V}/sleep", token=admin_token)
            assert (status, answer["success"]) == (200, True)
            status, answer = await control(session, kv, f"/action/wakeup/{V}", token=admin_token)
            assert (status, answer["success"]) == (200, True)
    finally:
        await kv.close()
    clean(engine.sim.stats())


@pytest.mark.parametrize(
    "remote, allowed",
    [("127.0.0.1", True), ("::1", True), ("10.1.2.3", False), ("192.168.0.7", False)],
)
async def test_without_a_token_control_routes_answer_loopback_clients_only(
    remote, allowed, sim_factory, kvsleep_factory
):
    engine = await sim_factory("vllm", V)
    kv = await kvsleep_factory([sim_model(engine)])

    class Transport:
        def get_extra_info(self, name, default=None):
            return (remote, 40000) if name == "peername" else default

        def is_closing(self):
            return False

    async def handler(request):
        return web.json_response({"reached": True})

    guarded = kv.server._control(handler)
    request = make_mocked_request("POST", f"/action/sleep/{V}", transport=Transport())
    assert request.remote == remote
    if allowed:
        assert (await guarded(request)).status == 200
    else:
        with pytest.raises(OpenAIError) as caught:
            await guarded(request)
        assert caught.value.status == 403
        assert "loopback" in caught.value.message


async def test_always_on_models_are_never_slept(sim_factory, kvsleep_factory):
    engine = await sim_factory("vllm", V)
    kv = await kvsleep_factory([sim_model(engine, always_on=True)], idle_threshold_seconds=1)
    async with aiohttp.ClientSession() as session:
        for path in (f"/action/sleep/{V}", f"/models/{V}/sleep"):
            status, answer = await control(session, kv, path)
            assert status == 409 and answer["success"] is False
            assert "always_on" in answer["message"]
        kv.clock.advance(10_000)
        assert await kv.reconcile() == []
        assert kv.manager.get_sleep_candidates() == []
        assert await kv.manager.put_model_to_sleep(V, manual=True) is False
        assert (await complete(session, kv, V))[0] == 200
    assert kv.state(V) == "awake" and calls(engine, "/sleep") == 0


async def test_min_sleep_duration_defers_manual_wakes_but_never_a_request(
    sim_factory, kvsleep_factory
):
    vllm = await sim_factory("vllm", V)
    sglang = await sim_factory("sglang", S)
    kv = await kvsleep_factory(
        [sim_model(vllm), sim_model(sglang)], min_sleep_duration=80, auto_sleep_enabled=False
    )
    async with aiohttp.ClientSession() as session:
        for name in (V, S):
            assert await kv.manager.put_model_to_sleep(name, manual=True)
        status, answer = await control(session, kv, f"/models/{V}/wake")
        assert (status, answer["success"]) == (202, True)
        assert "min_sleep_duration" in answer["message"] and "80s" in answer["message"]
        assert kv.state(V) == "asleep" and calls(vllm, "/wake_up") == 0
        kv.clock.advance(79)
        assert await kv.reconcile() == []
        kv.clock.advance(1)
        assert await kv.reconcile() == [Wake(V, "manual")]
        await settle(kv, V)
        assert kv.state(V) == "awake" and calls(vllm, "/wake_up") == 1

        # A request is never made to wait for min_sleep_duration.
        status, _, _ = await complete(session, kv, S)
        assert status == 200 and kv.state(S) == "awake"
        samples = await scrape(session, kv)
    assert sample(samples, "kvsleep_wakes_total", model=V, reason="manual", result="ok") == 1
    assert sample(samples, "kvsleep_wakes_total", model=S, reason="request", result="ok") == 1
    clean(vllm.sim.stats())
    clean(sglang.sim.stats())


async def test_cli_status_sleep_and_wake_against_a_running_server(
    admin_token, sim_factory, tmp_path, capsys
):
    engine = await sim_factory("sglang", S)
    doc = config_doc([sim_model(engine)], tmp_path / "state")
    doc["router"]["admin_token_env"] = "KVSLEEP_TEST_ADMIN_TOKEN"
    kv = await start_kvsleep(doc)

    async def run(*argv: str) -> tuple[int, str]:
        code = await asyncio.to_thread(cli.main, [*argv, "--url", kv.url, "--timeout", "10"])
        return code, capsys.readouterr().out

    try:
        code, out = await run("status", "--json")
        assert code == 0 and json.loads(out)["models"][S]["state"] == "awake"
        code, out = await run("sleep", S)
        assert code == 1 and json.loads(out)["error"]["code"] == "unauthorized"
        assert kv.state(S) == "awake"
        code, out = await run("sleep", S, "--token", admin_token)
        assert code == 0 and json.loads(out) == {
            "model_name": S,
            "success": True,
            "message": f"Model {S} sleep request successful",
        }
        assert kv.state(S) == "asleep"
        code, out = await run("status")
        assert out.splitlines()[1].split()[:2] == [S, "asleep"]  # the table
        code, out = await run("wake", S, "--token", admin_token)
        assert code == 0 and json.loads(out)["success"] is True
        assert kv.state(S) == "awake"
    finally:
        await kv.close()
    code = await asyncio.to_thread(
        cli.main, ["status", "--url", "http://127.0.0.1:9", "--timeout", "2"]
    )
    assert code == 1 and "cannot reach" in capsys.readouterr().err
    clean(engine.sim.stats())


# ---- metrics after a mixed scenario ----------------------------------------------------------


async def test_metrics_after_sleeps_wakes_and_rejections(sim_factory, kvsleep_factory):
    vllm = await sim_factory("vllm", V)
    sglang = await sim_factory("sglang", S)
    kv = await kvsleep_factory(
        [sim_model(vllm, max_held_requests=1), sim_model(sglang, wakeup_on_request=False)],
        idle_threshold_seconds=30,
    )
    async with aiohttp.ClientSession() as session:
        kv.clock.advance(31)
        assert sorted(await kv.reconcile(), key=lambda a: a.model) == [
            Sleep(V, "idle"),
            Sleep(S, "idle"),
        ]
        await settle(kv, V)
        await settle(kv, S)
        samples = await scrape(session, kv)
        for name in (V, S):
            states = {
                s: sample(samples, "kvsleep_model_state", model=name, state=s)
                for s in ("awake", "draining", "sleeping", "asleep", "waking", "failed")
            }
            assert states == {
                "awake": 0,
                "draining": 0,
                "sleeping": 0,
                "asleep": 1,
                "waking": 0,
                "failed": 0,
            }
            assert (
                sample(samples, "kvsleep_sleeps_total", model=name, reason="idle", result="ok") == 1
            )
        # S does not wake on requests; V holds one and turns the next away.
        assert (await complete(session, kv, S))[0] == 503
        async with engine_busy(vllm):
            first = asyncio.create_task(complete(session, kv, V))
            await until(lambda: len(kv.manager.slots[V].waiters) == 1)
            samples = await scrape(session, kv)
            assert sample(samples, "kvsleep_held_requests", model=V) == 1
            assert sample(samples, "kvsleep_model_state", model=V, state="waking") == 1
            assert (await complete(session, kv, V))[0] == 503
        assert (await first)[0] == 200
        samples = await scrape(session, kv)
    assert sample(samples, "kvsleep_wakes_total", model=V, reason="request", result="ok") == 1
    assert sample(samples, "kvsleep_held_requests", model=V) == 0
    assert sample(samples, "kvsleep_request_hold_seconds_count", model=V) == 1
    assert sample(samples, "kvsleep_request_hold_seconds_sum", model=V) > 0
    assert sample(samples, "kvsleep_rejected_requests_total", model=V, reason="queue_full") == 1
    assert sample(samples, "kvsleep_rejected_requests_total", model=S, reason="asleep_no_wake") == 1
    for reason in ("wake_timeout", "wake_failed"):
        assert (
            "kvsleep_rejected_requests_total",
            frozenset({"model": V, "reason": reason}.items()),
        ) in samples
        assert sample(samples, "kvsleep_rejected_requests_total", model=V, reason=reason) == 0
    assert sample(samples, "kvsleep_model_state", model=V, state="awake") == 1
    assert sample(samples, "kvsleep_model_state", model=S, state="asleep") == 1
    assert sample(samples, "kvsleep_wake_duration_seconds_count", model=V) == 1
    assert sample(samples, "kvsleep_sleep_duration_seconds_count", model=S) == 1
    clean(vllm.sim.stats())
    clean(sglang.sim.stats())


# ---- the kvcached controller's Python API ----------------------------------------------------


async def test_kvcached_sleep_manager_api(sim_factory, caplog):
    vllm = await sim_factory("vllm", V)
    sglang = await sim_factory("sglang", S)
    clock = FakeClock()
    traffic = TrafficMonitor(clock=clock)
    manager = SleepManager(
        SleepConfig(
            idle_threshold_seconds=300,
            check_interval_seconds=60,
            auto_sleep_enabled=False,
            wakeup_on_request=True,
            min_sleep_duration=80,
        ),
        traffic_monitor=traffic,
        clock=clock,
    )
    for sim, add in ((vllm, manager.add_vllm_model), (sglang, manager.add_sglang_model)):
        url = yarl.URL(sim.url)
        add(sim.settings.model, url.host, str(url.port))
    await manager.start()
    try:
        assert manager.get_sleeping_models() == {}
        assert not manager.is_model_sleeping(V)
        assert await manager.check_model_sleep_status(V) is False
        assert await manager.check_model_sleep_status(S) is None  # SGLang cannot say (kvcached)
        assert await manager.check_model_sleep_status("nope") is None

        assert await manager.put_model_to_sleep(V, manual=True) is True
        clock.advance(5)
        assert await manager.put_model_to_sleep(S) is True
        assert manager.is_model_sleeping(V) and manager.is_model_sleeping(S)
        sleeping = manager.get_sleeping_models()
        assert set(sleeping) == {V, S}
        assert set(sleeping[V]) == {"sleep_start_time", "sleep_duration", "manual_sleep"}
        assert sleeping[V]["manual_sleep"] is True and sleeping[S]["manual_sleep"] is False
        assert sleeping[V]["sleep_duration"] == 5 and sleeping[S]["sleep_duration"] == 0
        assert await manager.check_model_sleep_status(V) is True  # the engine says so
        assert await manager.check_model_sleep_status(S) is None
        assert vllm.sim.stats()["state"] == "asleep"
        assert sglang.sim.stats()["state"] == "released"

        # As kvcached: a second sleep, and a wake within min_sleep_duration, answer False.
        assert await manager.put_model_to_sleep(V) is False
        assert await manager.wakeup_model(V) is False
        assert vllm.sim.stats()["state"] == "asleep"
        clock.advance(80)
        assert await manager.wakeup_model(V) is True
        assert await manager.wakeup_model(S) is True
        assert await manager.wakeup_model(S) is False  # awake already
        assert not manager.is_model_sleeping(V) and not manager.is_model_sleeping(S)
        assert await manager.check_model_sleep_status(V) is False
        assert manager.get_sleeping_models() == {}

        assert manager.get_sleep_candidates() == []
        manager.update_config(idle_threshold_seconds=1, min_awake_seconds=0, bogus=3)
        assert "bogus" in caplog.text
        assert manager.config.idle_threshold_seconds == 1
        clock.advance(2)
        assert sorted(manager.get_sleep_candidates()) == sorted([V, S])

        assert await manager.put_model_to_sleep("nope") is False
        assert await manager.wakeup_model("nope") is False
    finally:
        await manager.stop()
    clean(vllm.sim.stats())
    clean(sglang.sim.stats())
    assert sglang.sim.stats()["calls"]["/update_weights_from_disk"] == 1
