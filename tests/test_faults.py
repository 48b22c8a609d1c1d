"""Faults around sleeping and waking: the model ends serving, the error is counted, nothing is
lost and no engine hazard fires."""

from __future__ import annotations

import asyncio
import dataclasses

import aiohttp
import pytest

from tests.kvsleep_harness import FAST_RETRY, config_doc, sim_model, start_kvsleep

SHORT_SLEEP_TIMEOUT = dataclasses.replace(FAST_RETRY, sleep_timeout_seconds=0.3)


def sample(kv, name: str, **labels: str) -> float:
    return kv.server.metrics.registry.get_sample_value(name, labels) or 0.0


@pytest.mark.parametrize("flavor", ["vllm", "sglang"])
@pytest.mark.parametrize("fault", ["fail", "hang"])
async def test_sleep_that_fails_or_hangs_leaves_the_model_serving(
    sim_factory, tmp_path, flavor, fault
):
    sim = await sim_factory(flavor, "org/m")
    kv = await start_kvsleep(config_doc([sim_model(sim)], tmp_path), retry=SHORT_SLEEP_TIMEOUT)
    try:
        async with aiohttp.ClientSession() as session:
            # Enough failures to outlast the adapter's retries.
            async with session.post(f"{sim.url}/sim/faults", json={fault: {"sleep": 3}}) as r:
                assert r.status == 200
            sleeping = kv.manager.request_sleep("org/m", "manual")

            async def one() -> int:
                async with session.post(
                    f"{kv.url}/v1/completions", json={"model": "org/m", "prompt": "x"}
                ) as resp:
                    await resp.read()
                    return resp.status

            held = [asyncio.create_task(one()) for _ in range(5)]
            assert await sleeping is False
            if flavor == "sglang" and fault == "hang":
                # A release that timed out may still happen (issue #13, scenario 9): neither
                # forwarding (released memory) nor resuming (not released) is safe, so the
                # model is `unknown`, its requests are refused with the reason, and an operator
                # says what the engine is. (This hang never reached the engine: awake.)
                assert await asyncio.gather(*held) == [503] * 5
                assert kv.state("org/m") == "unknown"
                async with session.post(f"{kv.url}/models/org%2Fm/adopt?state=awake") as r:
                    assert r.status == 200, await r.text()
                assert await one() == 200
            else:
                assert await asyncio.gather(*held) == [200] * 5
                # They arrived while it drained or slept, and were held, not refused.
                assert sample(kv, "kvsleep_request_hold_seconds_count", model="org/m") == 5
            assert kv.state("org/m") == "awake"
            assert kv.manager.slots["org/m"].last_error or fault == "hang"
            assert (
                sample(kv, "kvsleep_sleeps_total", model="org/m", reason="manual", result="error")
                == 1
            )
            # Retried later (the faults are spent): this time it sleeps.
            async with session.post(f"{sim.url}/sim/faults", json={fault: {"sleep": 0}}) as r:
                assert r.status == 200
            assert await kv.manager.put_model_to_sleep("org/m", manual=True) is True
    finally:
        await kv.close()
    assert not sim.sim.stats()["hazards"]


async def test_engine_down_at_start_is_marked_down_and_picked_up_later(sim_factory, tmp_path):
    from tests.test_fleet import free_port

    up = await sim_factory("vllm", "org/up")
    port = free_port()
    late_entry = {"name": "org/late", "engine": "vllm", "url": f"http://127.0.0.1:{port}"}
    kv = await start_kvsleep(config_doc([sim_model(up), late_entry], tmp_path))
    try:
        assert sample(kv, "kvsleep_engine_up", model="org/up") == 1
        assert sample(kv, "kvsleep_engine_up", model="org/late") == 0
        async with aiohttp.ClientSession() as session:
            async with session.post(
                f"{kv.url}/v1/completions", json={"model": "org/up", "prompt": "x"}
            ) as resp:
                assert resp.status == 200
            async with session.post(
                f"{kv.url}/v1/completions", json={"model": "org/late", "prompt": "x"}
            ) as resp:
                assert resp.status == 502
                assert (await resp.json())["error"]["code"] == "engine_unreachable"
            late = await sim_factory("vllm", "org/late", port=port)
            await kv.reconcile()
            assert sample(kv, "kvsleep_engine_up", model="org/late") == 1
            assert kv.state("org/late") == "awake"
            async with session.post(
                f"{kv.url}/v1/completions", json={"model": "org/late", "prompt": "x"}
            ) as resp:
                assert resp.status == 200
    finally:
        await kv.close()
    assert not late.sim.stats()["hazards"]
