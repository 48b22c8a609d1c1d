"""Warm autoscaling end to end: one model served by three simulated engines, scaled by sleep
and wake, routed over HTTP; time for the scaler is a fake clock, told, not waited for."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp

from tests.conftest import RunningSim

M = "chat"
TARGET = 2  # requests in flight per awake replica
CLIENTS = 6  # three replicas' worth at the target
UP_AFTER, DOWN_AFTER = 5, 60


async def until(predicate: Callable[[], bool], what: str, tries: int = 1000) -> None:
    for _ in range(tries):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def replicated(sims: list[RunningSim], **scaling: Any) -> dict[str, Any]:
    return {
        "name": M,
        "engine": "vllm",
        "replicas": [{"url": sim.url} for sim in sims],
        "scaling": {
            "target_in_flight": TARGET,
            "scale_up_after_seconds": UP_AFTER,
            "scale_down_after_seconds": DOWN_AFTER,
            "trend_window_seconds": 0,
            **scaling,
        },
    }


async def three(sim_factory: Any, **settings: Any) -> list[RunningSim]:
    return [await sim_factory("vllm", model=M, **settings) for _ in range(3)]


def states(kv: Any) -> list[str]:
    return [slot.state.value for slot in kv.manager.groups[M].slots]


async def completion(session: aiohttp.ClientSession, kv: Any, **extra: Any) -> int:
    body = {"model": M, "prompt": "hi", "max_tokens": 10, **extra.pop("body", {})}
    async with session.post(kv.url + "/v1/completions", json=body, **extra) as resp:
        await resp.read()
        return resp.status


async def metrics(session: aiohttp.ClientSession, kv: Any) -> str:
    async with session.get(kv.url + "/metrics") as resp:
        return await resp.text()


def sample(text: str, name: str, **labels: str) -> float:
    """The value of the one series of `name` with these labels (among others)."""
    values = [
        float(value)
        for found, value in re.findall(rf"^{name}\{{([^}}]*)\}} (\S+)$", text, re.M)
        if all(f'{k}="{v}"' in found for k, v in labels.items())
    ]
    assert len(values) == 1, (name, labels, values)
    return values[0]


class Load:
    """CLIENTS closed-loop clients: each sends its next request when the last is answered."""

    def __init__(self, session: aiohttp.ClientSession, kv: Any) -> None:
        self.codes: list[int] = []
        self.running = True
        self.tasks = [asyncio.create_task(self._client(session, kv)) for _ in range(CLIENTS)]

    async def _client(self, session: aiohttp.ClientSession, kv: Any) -> None:
        while self.running:
            self.codes.append(await completion(session, kv))

    async def stop(self) -> None:
        self.running = False
        await asyncio.gather(*self.tasks)


def in_flight(kv: Any) -> int:
    return sum(slot.in_engine + len(slot.waiters) for slot in kv.manager.groups[M].slots)


async def scale_step(
    kv: Any, wait_for: Callable[[], bool], what: str, load: int | None = None
) -> None:
    """A reconcile pass now and one after the scaler's delay; then the change it started.

    The scaler weighs the requests in flight on average since its last pass (the time between
    is all on the fake clock: the `advance`). With `load`, each pass and the advance wait until
    that many requests are in: a closed-loop client is out for a moment between two requests.
    """

    async def loaded() -> None:
        if load is not None:
            await until(lambda: in_flight(kv) >= load, f"{load} requests in flight")

    await loaded()
    await kv.reconcile()
    await loaded()
    kv.clock.advance(max(UP_AFTER, DOWN_AFTER))
    await kv.reconcile()
    await until(wait_for, what)


async def test_a_step_load_wakes_two_more_replicas_and_its_end_sleeps_them_after_drains(
    sim_factory: Any, kvsleep_factory: Callable[..., Awaitable[Any]]
) -> None:
    # A quarter second per request: long enough to be in flight when the scaler looks.
    sims = await three(sim_factory, tokens_per_second=40.0)
    kv = await kvsleep_factory([replicated(sims, min_awake=1)], idle_threshold_seconds=3600)
    async with aiohttp.ClientSession() as session:
        # Idle at start: two scale-downs leave replica 0 awake (min_awake).
        await scale_step(kv, lambda: states(kv) == ["awake", "awake", "asleep"], "scale down")
        await scale_step(kv, lambda: states(kv) == ["awake", "asleep", "asleep"], "scale down")
        await kv.reconcile()
        assert states(kv) == ["awake", "asleep", "asleep"]  # never below min_awake

        load = Load(session, kv)
        await until(lambda: kv.manager.slots[f"{M}@0"].in_engine > TARGET, "the step")
        # 5 in flight: demand 2.5 replicas, 3 when rounded up; never more than three.
        await scale_step(kv, lambda: states(kv)[1] == "awake", "replica 1 woken", load=5)
        await scale_step(kv, lambda: states(kv) == ["awake"] * 3, "replica 2 woken", load=5)

        # Three replicas awake, six clients: least outstanding puts two on each, never three
        # (once what replica 0 took while alone is answered).
        await until(lambda: kv.manager.slots[f"{M}@0"].in_engine <= TARGET, "replica 0 < 3")
        served_before = [sim.sim.completed for sim in sims]
        peaks = [0, 0, 0]
        while min(s.sim.completed - b for s, b in zip(sims, served_before, strict=True)) < 5:
            for i in range(3):
                peaks[i] = max(peaks[i], kv.manager.slots[f"{M}@{i}"].in_engine)
            await asyncio.sleep(0.002)
        assert max(peaks) <= TARGET, peaks
        text = await metrics(session, kv)
        assert sample(text, "kvsleep_model_replicas", model=M, state="awake") == 3
        assert sample(text, "kvsleep_model_replicas_desired", model=M) == 3
        for i in range(3):
            assert sample(text, "kvsleep_replica_state", model=M, replica=str(i), state="awake")
        await load.stop()

        # Load gone. Replica 2 turned awake since the last pass: that starts the anti-flap wait.
        await kv.reconcile()
        kv.clock.advance(DOWN_AFTER)
        # Then one replica drained and slept per scale-down delay, down to min_awake.
        await scale_step(kv, lambda: states(kv) == ["awake", "awake", "asleep"], "scale down")
        await scale_step(kv, lambda: states(kv) == ["awake", "asleep", "asleep"], "scale down")
        await kv.reconcile()
        text = await metrics(session, kv)

    assert load.codes and set(load.codes) == {200}, sorted(set(load.codes))
    for sim in sims:
        stats = await sim.stats()
        assert stats["hazards"] == {}, stats["hazards"]
        assert stats["requests"]["aborted"] == 0
    # Two wakes, one for each extra replica, and four sleeps, each after its drain.
    assert sample(text, "kvsleep_wakes_total", model=M, reason="scale_up", result="ok") == 2
    assert sample(text, "kvsleep_sleeps_total", model=M, reason="scale_down", result="ok") == 4
    for replica in ("1", "2"):
        assert (
            sample(text, "kvsleep_scale_events_total", model=M, replica=replica, direction="up")
            == 1
        )
    assert sample(text, "kvsleep_model_replicas", model=M, state="awake") == 1
    assert sample(text, "kvsleep_model_replicas", model=M, state="asleep") == 2
    assert sample(text, "kvsleep_model_replicas_desired", model=M) == 1
    assert sample(text, "kvsleep_model_state", model=M, state="awake") == 1
    assert sample(text, "kvsleep_model_scale_blocked", model=M, reason="max_awake") == 0


async def test_min_awake_0_sleeps_every_replica_when_idle_and_a_request_wakes_one(
    sim_factory: Any, kvsleep_factory: Callable[..., Awaitable[Any]]
) -> None:
    sims = await three(sim_factory)
    kv = await kvsleep_factory([replicated(sims, min_awake=0)], idle_threshold_seconds=60)
    async with aiohttp.ClientSession() as session:
        assert await completion(session, kv) == 200
        kv.clock.advance(61)
        await kv.reconcile()
        await until(lambda: states(kv) == ["asleep"] * 3, "every replica asleep")
        async with session.get(kv.url + "/v1/models") as resp:
            (model,) = (await resp.json())["data"]
        assert (model["id"], model["state"]) == (M, "asleep")

        codes = await asyncio.gather(*(completion(session, kv) for _ in range(5)))
        assert codes == [200] * 5
        assert states(kv) == ["awake", "asleep", "asleep"]  # held requests shared one wake
        text = await metrics(session, kv)
    assert sample(text, "kvsleep_wakes_total", model=M, reason="request", result="ok") == 1
    assert sample(text, "kvsleep_sleeps_total", model=M, reason="idle", result="ok") == 3
    for sim in sims:
        assert (await sim.stats())["hazards"] == {}


async def test_affinity_keeps_a_client_on_one_replica_while_others_serve_the_rest(
    sim_factory: Any, kvsleep_factory: Callable[..., Awaitable[Any]]
) -> None:
    sims = await three(sim_factory)
    doc = {**replicated(sims, min_awake=3), "affinity": "header:X-Session"}
    kv = await kvsleep_factory([doc])
    async with aiohttp.ClientSession() as session:
        for _ in range(6):
            headers = {"X-Session": "alice"}
            assert await completion(session, kv, headers=headers) == 200
        served = [sim.sim.completed for sim in sims]
        assert sorted(served) == [0, 0, 6]
        # Without the header, requests spread (ties at random, so any replica may take one).
        await asyncio.gather(*(completion(session, kv) for _ in range(30)))
        assert sum(sim.sim.completed for sim in sims) == 36


async def test_the_kvcached_routes_see_one_model_awake_when_any_replica_is(
    sim_factory: Any, kvsleep_factory: Callable[..., Awaitable[Any]]
) -> None:
    sims = await three(sim_factory)
    kv = await kvsleep_factory([replicated(sims, min_awake=0)])
    async with aiohttp.ClientSession() as session:
        async with session.post(kv.url + f"/models/{M}/sleep") as resp:
            assert resp.status == 200, await resp.text()
        assert states(kv) == ["asleep"] * 3
        async with session.post(kv.url + f"/models/{M}/wake") as resp:
            assert resp.status == 200, await resp.text()
        assert states(kv) == ["awake", "asleep", "asleep"]
        async with session.get(kv.url + "/v1/models") as resp:
            (model,) = (await resp.json())["data"]
        assert (model["id"], model["state"]) == (M, "awake")
        async with session.get(kv.url + f"/v1/models/{M}") as resp:
            assert (await resp.json())["state"] == "awake"
        async with session.get(kv.url + f"/v1/models/{M}@1") as resp:  # an engine, no model
            assert resp.status == 404
            assert (await resp.json())["error"]["code"] == "model_not_found"


async def test_the_kvcached_api_and_status_name_the_model_and_each_replica(
    sim_factory: Any, kvsleep_factory: Callable[..., Awaitable[Any]]
) -> None:
    sims = await three(sim_factory)
    kv = await kvsleep_factory([replicated(sims, min_awake=0)])
    manager = kv.manager
    async with aiohttp.ClientSession() as session:
        async with session.post(kv.url + f"/action/sleep/{M}") as resp:
            assert resp.status == 200, await resp.text()
        assert manager.is_model_sleeping(M) and list(manager.get_sleeping_models()) == [M]
        async with session.post(kv.url + f"/action/wakeup/{M}") as resp:
            assert resp.status == 200, await resp.text()
        assert not manager.is_model_sleeping(M) and manager.get_sleeping_models() == {}
        assert await manager.handle_model_wakeup_on_request(M)
        async with session.get(kv.url + f"/health/{M}") as resp:
            health = await resp.json()
        assert health == {"model": M, "health": {s.url: True for s in sims}, "state": "awake"}
        async with session.get(kv.url + "/sleep/status") as resp:
            rows = (await resp.json())["models"]
    assert {name: (row["model"], row["replica"], row["state"]) for name, row in rows.items()} == {
        f"{M}@0": (M, "0", "awake"),
        f"{M}@1": (M, "1", "asleep"),
        f"{M}@2": (M, "2", "asleep"),
    }


async def test_with_a_prometheus_policy_source_the_fleets_requests_count_too(
    sim_factory: Any, kvsleep_factory: Callable[..., Awaitable[Any]]
) -> None:
    """Other kvsleep processes in front of the same replicas report 12 requests in flight
    (Prometheus's `sum by (model)`): this one, with none of its own, scales up for them."""
    from kvsleep.control.policy_source import FleetTraffic

    sims = await three(sim_factory)
    kv = await kvsleep_factory([replicated(sims, min_awake=1)])
    fleet = {M: FleetTraffic(last_activity=kv.clock(), in_flight=12)}
    assert await kv.manager.scale(kv.clock(), fleet) == []
    decision = kv.manager.groups[M].decision
    # 12 over 2 per replica: six replicas' worth, more than the three there are.
    assert (decision.demand, decision.desired, decision.blocked) == (6.0, 3, "max_awake")
    kv.clock.advance(DOWN_AFTER)
    assert await kv.manager.scale(kv.clock(), {}) == []  # without it: none in flight here...
    kv.clock.advance(DOWN_AFTER)
    (action,) = await kv.manager.scale(kv.clock(), {})  # ...for long enough to scale down
    assert (action.model, action.reason) == (f"{M}@2", "scale_down")


async def test_the_engines_own_kv_cache_usage_can_drive_the_scaler(
    sim_factory: Any, kvsleep_factory: Callable[..., Awaitable[Any]]
) -> None:
    """target_kv_cache_usage: the awake replicas' `vllm:kv_cache_usage_perc`, read from their
    /metrics at each pass, wakes a second replica when two requests fill replica 0's cache."""
    # A cache of 100 tokens; each request grows by 50 tokens a second, for 4 s.
    sims = await three(sim_factory, kv_cache_gb=100 / 16384, tokens_per_second=50.0)
    doc = replicated(sims, min_awake=1, target_in_flight=None, target_kv_cache_usage=0.5)
    kv = await kvsleep_factory([doc])
    async with aiohttp.ClientSession() as session:
        for replica in ("2", "1"):
            async with session.post(kv.url + f"/models/{M}@{replica}/sleep") as resp:
                assert resp.status == 200
        long = {"body": {"max_tokens": 200, "ignore_eos": True}}
        requests = [asyncio.create_task(completion(session, kv, **long)) for _ in range(2)]
        await until(lambda: sims[0].sim.kv_usage() >= 0.8, "replica 0's cache filling up")
        await kv.reconcile()
        kv.clock.advance(UP_AFTER)
        await kv.reconcile()
        decision = kv.manager.groups[M].decision
        assert decision.reason == "target" and decision.demand >= 1.6
        await until(lambda: states(kv)[1] == "awake", "replica 1 woken")
        assert await asyncio.gather(*requests) == [200, 200]
    for sim in sims:
        assert (await sim.stats())["hazards"] == {}


async def test_each_engine_reports_its_queue_and_kv_cache_usage(sim_factory: Any) -> None:
    from kvsleep.config import ModelConfig
    from kvsleep.engines import adapter_for
    from tests.kvsleep_harness import FAST_RETRY

    async with aiohttp.ClientSession() as session:
        for flavor in ("vllm", "sglang"):
            sim = await sim_factory(flavor, model=M)
            engine = adapter_for(ModelConfig(M, flavor, sim.url), lambda: session, FAST_RETRY)
            assert await engine.pressure() == (0.0, 0.0), flavor


async def test_launched_replicas_are_ready_when_they_serve_the_models_name(
    kvsleep_factory: Callable[..., Awaitable[Any]], tmp_path: Any
) -> None:
    """Each replica's engine serves the model's name (not its `MODEL@i` engine name): that is
    what the launcher waits to see in its /v1/models."""
    import sys

    from kvsleep.control.launcher import Launcher
    from tests.prometheus_server import free_port

    ports = [free_port() for _ in range(2)]
    doc = {
        "name": M,
        "engine": "vllm",
        "replicas": [
            {
                "url": f"http://127.0.0.1:{port}",
                "command": [
                    sys.executable,
                    "-m",
                    "kvsleep.sim.engine",
                    "--flavor",
                    "vllm",
                    "--model",
                    M,
                    "--port",
                    str(port),
                ],
            }
            for port in ports
        ],
        "scaling": {"min_awake": 1},
        "ready_timeout_seconds": 20,
    }
    kv = await kvsleep_factory([doc])
    launcher = Launcher(kv.manager, kv.server.metrics, str(tmp_path / "engine-logs"))
    try:
        await launcher.start([m for m in kv.server.config.models if m.launched])
        await until(lambda: states(kv) == ["awake", "awake"], "both replicas ready", 3000)
        async with aiohttp.ClientSession() as session:
            assert await completion(session, kv) == 200
    finally:
        await launcher.stop()


async def test_a_replica_whose_engine_is_down_gets_no_request_while_a_sibling_serves(
    sim_factory: Any, kvsleep_factory: Callable[..., Awaitable[Any]]
) -> None:
    """Replicas 1 and 2 have nothing listening: once a probe says so they are `down`, no
    capacity for the scaler and no destination for the router."""
    from tests.prometheus_server import free_port

    (sim,) = [await sim_factory("vllm", model=M)]
    doc = replicated([sim], min_awake=1)
    doc["replicas"] += [{"url": f"http://127.0.0.1:{free_port()}"} for _ in range(2)]
    kv = await kvsleep_factory([doc])
    await kv.reconcile()
    async with aiohttp.ClientSession() as session:
        text = await metrics(session, kv)
        assert sample(text, "kvsleep_model_replicas", model=M, state="down") == 2
        codes = await asyncio.gather(*(completion(session, kv) for _ in range(12)))
    assert codes == [200] * 12
    assert sim.sim.completed == 12
    decision = kv.manager.groups[M].decision
    assert decision is not None and decision.blocked is None  # no demand, nothing blocked


async def test_an_alertmanager_action_on_the_models_name_acts_on_its_replicas(
    sim_factory: Any, kvsleep_factory: Callable[..., Awaitable[Any]]
) -> None:
    """Alerts carry the metrics' `model` label: the name clients use, not an engine's."""
    from tests.test_alertmanager import alert, payload

    sims = await three(sim_factory)
    kv = await kvsleep_factory([replicated(sims, min_awake=0)])
    async with aiohttp.ClientSession() as session:
        hook = kv.url + "/alertmanager/webhook"
        async with session.post(hook, json=payload(alert(M, "sleep"))) as resp:
            assert resp.status == 200, await resp.text()
            (result,) = (await resp.json())["actions"]
        assert result == {"model": M, "action": "sleep", "result": "sleep requested"}
        await until(lambda: states(kv) == ["asleep"] * 3, "every replica asleep")
        async with session.post(hook, json=payload(alert(M, "wake"))) as resp:
            assert resp.status == 200
        await until(lambda: "awake" in states(kv), "a replica awake")
        assert sorted(states(kv)) == ["asleep", "asleep", "awake"]
