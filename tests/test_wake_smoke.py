import asyncio

import aiohttp

from tests.kvsleep_harness import sim_model


async def test_concurrent_requests_to_asleep_models_share_one_wake(sim_factory, kvsleep_factory):
    vllm = await sim_factory("vllm", "org/llama", wake_latency=0.3)
    sglang = await sim_factory("sglang", "org/qwen", wake_latency=0.3)
    kv = await kvsleep_factory([sim_model(vllm), sim_model(sglang)])
    for name in ("org/llama", "org/qwen"):
        resp = await kv.manager.put_model_to_sleep(name, manual=True)
        assert resp is True
    assert kv.state("org/llama") == "asleep"

    async with aiohttp.ClientSession() as session:
        async def one(model: str) -> int:
            async with session.post(f"{kv.url}/v1/completions",
                                    json={"model": model, "prompt": "x", "max_tokens": 2}) as r:
                await r.read()
                return r.status

        statuses = await asyncio.gather(*(one(m) for m in ["org/llama", "org/qwen"] * 500))
    assert statuses.count(200) == 1000
    v, s = vllm.sim.stats(), sglang.sim.stats()
    assert v["calls"].get("/wake_up") == 1, v["calls"]
    assert s["calls"].get("/resume_memory_occupation") == 1
    assert s["calls"].get("/update_weights_from_disk") == 1
    assert not v["hazards"] and not s["hazards"], (v["hazards"], s["hazards"])
