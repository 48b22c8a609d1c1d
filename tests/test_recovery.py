"""Wakes interrupted by a failure or by kvsleep's own death are completed, never repeated:
SGLang dies on a resume without a prior release."""

from __future__ import annotations

import json

import aiohttp

from tests.kvsleep_harness import config_doc, sim_model, start_kvsleep


async def test_failed_weight_reload_is_retried_without_a_second_resume(
    sim_factory, kvsleep_factory
):
    sim = await sim_factory("sglang", "org/q")
    kv = await kvsleep_factory([sim_model(sim)])
    assert await kv.manager.put_model_to_sleep("org/q", manual=True)
    async with aiohttp.ClientSession() as session:
        # Three reload failures outlast the adapter's three attempts: this wake fails.
        async with session.post(f"{sim.url}/sim/faults", json={"fail": {"reload": 3}}) as r:
            assert r.status == 200
        async with session.post(
            f"{kv.url}/v1/completions", json={"model": "org/q", "prompt": "x"}
        ) as resp:
            assert resp.status == 503
            assert "org/q" in (await resp.json())["error"]["message"]
        assert kv.state("org/q") == "failed"
        async with session.post(
            f"{kv.url}/v1/completions", json={"model": "org/q", "prompt": "x"}
        ) as resp:
            assert resp.status == 200
    stats = sim.sim.stats()
    assert stats["calls"]["/resume_memory_occupation"] == 1
    assert not stats["hazards"], stats["hazards"]


async def test_wake_interrupted_by_kvsleep_death_is_finished_at_restart(sim_factory, tmp_path):
    sim = await sim_factory("sglang", "org/q")
    doc = config_doc([sim_model(sim)], tmp_path / "state")
    kv = await start_kvsleep(doc)
    assert await kv.manager.put_model_to_sleep("org/q", manual=True)
    await kv.close()
    # The previous kvsleep sent the resume and died before the weight reload: its state file
    # says waking, and the engine is resumed with stale weights.
    state_file = tmp_path / "state" / "state.json"
    record = json.loads(state_file.read_text())
    record["models"]["org/q"]["state"] = "waking"
    state_file.write_text(json.dumps(record))
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{sim.url}/resume_memory_occupation", json={}) as r:
            assert r.status == 200
        kv = await start_kvsleep(doc)
        try:
            assert kv.state("org/q") == "awake"
            async with session.post(
                f"{kv.url}/v1/completions", json={"model": "org/q", "prompt": "x"}
            ) as resp:
                assert resp.status == 200
        finally:
            await kv.close()
    stats = sim.sim.stats()
    assert stats["calls"]["/resume_memory_occupation"] == 1
    assert stats["calls"]["/update_weights_from_disk"] == 1
    assert not stats["hazards"], stats["hazards"]
