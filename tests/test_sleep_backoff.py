"""Failed sleeps back off; an engine without sleep routes is marked "cannot sleep".

Before this, a vLLM without dev mode got `POST /sleep` once per idle threshold, forever (30 x 404
in 3 minutes at a 5 s threshold), each one preceded by a drain. Time runs on a FakeClock: each
test walks three virtual minutes in one-second reconcile passes.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
import pytest
import yaml

from kvsleep.config import SleepPolicy
from kvsleep.core import policy
from tests.kvsleep_harness import config_doc, post_json, sim_model, start_kvsleep
from tests.test_alertmanager import alert, payload

M = "org/llama"
SLEEP_404 = "POST /sleep (404)"


async def walk(kv: Any, seconds: int, step: float = 1.0) -> None:
    """Advance the fake clock in `step`s, one reconcile pass each, letting operations finish."""
    for _ in range(int(seconds / step)):
        kv.clock.advance(step)
        await kv.reconcile()
        worker = kv.manager.slots[M].worker
        if worker is not None:
            await asyncio.wait_for(asyncio.shield(worker), 10)


def sample(kv: Any, name: str, **labels: str) -> float | None:
    return kv.server.metrics.registry.get_sample_value(name, labels)


async def complete(session: aiohttp.ClientSession, kv: Any) -> tuple[int, Any]:
    return await post_json(
        session, f"{kv.url}/v1/completions", {"model": M, "prompt": "hi", "max_tokens": 2}
    )


async def test_vllm_without_dev_mode_is_asked_to_sleep_once_then_marked(sim_factory, tmp_path):
    engine = await sim_factory("vllm", M, dev_mode=False)
    doc = config_doc([sim_model(engine)], tmp_path / "state", idle_threshold_seconds=2)
    kv = await start_kvsleep(doc)
    try:
        await walk(kv, 180)
        # The bound is <= 5 sleep calls in 3 minutes; a missing route needs only one.
        assert engine.sim.calls[SLEEP_404] == 1
        assert kv.state(M) == "awake"
        assert sample(kv, "kvsleep_model_cannot_sleep", model=M) == 1
        assert sample(kv, "kvsleep_sleeps_total", model=M, reason="idle", result="error") == 1
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{kv.url}/sleep/status") as resp:
                status = (await resp.json())["models"][M]
            assert "VLLM_SERVER_DEV_MODE=1" in status["cannot_sleep"]
            assert status["sleep_failures"] == 1
            assert (
                M
                not in (await (await session.get(f"{kv.url}/sleep/candidates")).json())[
                    "sleep_candidates"
                ]
            )
            # It keeps serving.
            code, body = await complete(session, kv)
            assert code == 200 and body["choices"]
            # A manual sleep is still tried (the operator may have fixed the engine) and fails
            # with the reason, not a bare 404.
            code, body = await post_json(session, f"{kv.url}/models/{M}/sleep", None)
            assert code == 400 and "VLLM_SERVER_DEV_MODE=1" in body["message"]
            # An alert asking for a sleep (KvsleepModelIdle) is not passed on: it cannot help.
            code, body = await post_json(
                session, f"{kv.url}/alertmanager/webhook", payload(alert(M, "sleep"))
            )
            assert code == 200
            assert body["actions"][0]["result"].startswith("ignored: the model cannot sleep")
        assert engine.sim.calls[SLEEP_404] == 2
        assert engine.sim.hazards == {}
    finally:
        await kv.close()


async def test_failing_sleeps_back_off_exponentially_and_success_resets(sim_factory, tmp_path):
    engine = await sim_factory("vllm", M)
    doc = config_doc(
        [sim_model(engine)],
        tmp_path / "state",
        idle_threshold_seconds=2,
        sleep_retry_initial_seconds=10,
        sleep_retry_max_seconds=40,
    )
    kv = await start_kvsleep(doc)
    try:
        engine.sim.arm_faults({"fail": {"sleep": 1000}})
        attempts: list[float] = []
        start = kv.clock()
        for _ in range(180):
            before = sample(kv, "kvsleep_sleeps_total", model=M, reason="idle", result="error")
            await walk(kv, 1)
            after = sample(kv, "kvsleep_sleeps_total", model=M, reason="idle", result="error")
            if (after or 0) > (before or 0):
                attempts.append(kv.clock() - start)
        # Idle after 2 s, then waits of 10, 20, 40, 40, 40 s (capped): 2, 12, 32, 72, 112, 152.
        assert attempts == [2, 12, 32, 72, 112, 152]
        assert engine.sim.calls["/sleep"] <= 6 * 3  # each attempt: at most 3 calls (500 retried)
        assert kv.state(M) == "awake"
        assert sample(kv, "kvsleep_model_sleep_failures", model=M) == 6
        assert sample(kv, "kvsleep_model_cannot_sleep", model=M) == 0
        engine.sim.arm_faults({"fail": {"sleep": 0}})
        await walk(kv, 40)
        assert kv.state(M) == "asleep"
        assert sample(kv, "kvsleep_model_sleep_failures", model=M) == 0
        assert kv.manager.slots[M].sleep_retry_at == 0
        assert engine.sim.hazards == {}
    finally:
        await kv.close()


async def test_reload_clears_cannot_sleep(sim_factory, tmp_path):
    engine = await sim_factory("vllm", M, dev_mode=False)
    path = tmp_path / "kvsleep.yaml"
    doc = config_doc([sim_model(engine)], tmp_path / "state", idle_threshold_seconds=2)
    path.write_text(yaml.safe_dump(doc))
    kv = await start_kvsleep(doc, config_path=str(path))
    try:
        await walk(kv, 10)
        assert kv.manager.slots[M].cannot_sleep is not None
        async with aiohttp.ClientSession() as session, session.post(f"{kv.url}/-/reload") as resp:
            assert resp.status == 200
        assert kv.manager.slots[M].cannot_sleep is None
        assert sample(kv, "kvsleep_model_cannot_sleep", model=M) == 0
        await walk(kv, 10)  # tried once more after the reload, then marked again
        assert engine.sim.calls[SLEEP_404] == 2
        assert kv.manager.slots[M].cannot_sleep is not None
    finally:
        await kv.close()


async def test_an_engine_slept_behind_our_back_with_a_request_inside_is_woken(
    sim_factory, tmp_path
):
    engine = await sim_factory("vllm", M)
    doc = config_doc([sim_model(engine)], tmp_path / "state", idle_threshold_seconds=600)
    kv = await start_kvsleep(doc)
    try:
        async with aiohttp.ClientSession() as session:
            async with session.post(engine.url + "/sleep?level=1") as resp:
                assert resp.status == 200
            # kvsleep still believes it awake and forwards; the engine queues the request.
            request = asyncio.create_task(complete(session, kv))
            for _ in range(500):
                if engine.sim.queued:
                    break
                await asyncio.sleep(0.01)
            assert engine.sim.queued == 1
            await kv.reconcile()  # finds the engine asleep with a request inside: wakes it
            code, body = await asyncio.wait_for(request, 10)
            assert code == 200 and body["choices"][0]["finish_reason"] == "length"
        assert kv.state(M) == "awake"
        assert sample(kv, "kvsleep_wakes_total", model=M, reason="request", result="ok") == 1
    finally:
        await kv.close()


@pytest.mark.parametrize(
    ("failures", "expected"),
    [(0, 0.0), (1, 30.0), (2, 60.0), (3, 120.0), (6, 960.0), (7, 1800.0), (500, 1800.0)],
)
def test_sleep_retry_delay_doubles_up_to_the_cap(failures, expected):
    assert policy.sleep_retry_delay(failures, SleepPolicy()) == expected


def test_a_model_backing_off_or_unable_to_sleep_is_no_candidate():
    view = policy.ModelView(
        name=M,
        state=policy.ModelState.AWAKE,
        state_since=0.0,
        version=1,
        busy=False,
        in_flight=0,
        held=0,
        last_activity=0.0,
        policy=SleepPolicy(idle_threshold_seconds=10, min_awake_seconds=0),
        always_on=False,
        engine_up=True,
    )
    assert policy.sleep_candidate(view, 100.0)
    backing_off = policy.ModelView(**{**view.__dict__, "sleep_retry_at": 150.0})
    assert not policy.sleep_candidate(backing_off, 100.0)
    assert policy.sleep_candidate(backing_off, 150.0)
    unable = policy.ModelView(**{**view.__dict__, "cannot_sleep": True})
    assert not policy.sleep_candidate(unable, 10_000.0)


async def test_a_model_slept_behind_our_back_makes_room_for_the_request_inside(
    sim_factory, tmp_path
):
    """Waking it for the request inside needs room on its GPU: an idle neighbour is slept."""
    engine = await sim_factory("vllm", M)
    other = await sim_factory("vllm", "org/other")
    doc = config_doc(
        [sim_model(s, memory_gb=6, gpus=[0]) for s in (engine, other)],
        tmp_path / "state",
        idle_threshold_seconds=600,
        gpus=[{"id": 0, "memory_gb": 10}],
    )
    kv = await start_kvsleep(doc)
    try:
        await kv.manager.request_sleep("org/other", "manual")
        async with aiohttp.ClientSession() as session:
            async with session.post(engine.url + "/sleep?level=1") as resp:
                assert resp.status == 200
            await kv.reconcile()  # M is asleep, nothing inside: adopted, not woken
            assert kv.state(M) == "asleep"
            await kv.manager.request_wake("org/other", "manual")  # takes the GPU's room
            async with session.post(engine.url + "/wake_up") as resp:
                assert resp.status == 200
            await kv.reconcile()  # M awake again behind our back: 12 GB on a 10 GB budget
            assert kv.state(M) == "awake"
            async with session.post(engine.url + "/sleep?level=1") as resp:
                assert resp.status == 200
            request = asyncio.create_task(complete(session, kv))
            for _ in range(500):
                if engine.sim.queued:
                    break
                await asyncio.sleep(0.01)
            assert engine.sim.queued == 1
            kv.clock.advance(60)  # org/other idle: it may be slept to make room
            await kv.reconcile()
            code, body = await asyncio.wait_for(request, 10)
            assert code == 200 and body["choices"]
        assert kv.state(M) == "awake" and kv.state("org/other") == "asleep"
    finally:
        await kv.close()
