"""GPU memory budgets (waking makes room) and wake ETAs (clients know how long they will wait)."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import openai
import pytest

from tests.kvsleep_harness import config_doc, sim_model, start_kvsleep


def sample(kv, name: str, **labels: str) -> float | None:
    return kv.server.metrics.registry.get_sample_value(name, labels)


async def complete(session: aiohttp.ClientSession, kv, model: str, **extra) -> int:
    async with session.post(
        f"{kv.url}/v1/completions", json={"model": model, "prompt": "x", "max_tokens": 2, **extra}
    ) as r:
        await r.read()
        return r.status


@pytest.fixture
async def three_on_room_for_two(sim_factory, tmp_path):
    """Three 8 GB models on GPU 0 with a 20 GB budget: two fit."""
    sims = {
        "org/a": await sim_factory("vllm", "org/a", tokens_per_second=40),
        "org/b": await sim_factory("sglang", "org/b", tokens_per_second=40),
        "org/c": await sim_factory("vllm", "org/c", wake_latency=0.05),
    }
    doc = config_doc([sim_model(s, memory_gb=8, gpus=[0]) for s in sims.values()], tmp_path)
    doc["gpus"] = [{"id": 0, "memory_gb": 20}]
    kv = await start_kvsleep(doc)
    assert await kv.manager.put_model_to_sleep("org/c", manual=True)
    yield kv, sims
    await kv.close()
    for sim in sims.values():
        stats = sim.sim.stats()
        assert not stats["hazards"], stats["hazards"]
        assert stats["requests"]["served_while_not_awake"] == 0


async def test_waking_the_third_model_sleeps_the_least_recently_used_idle_one(
    three_on_room_for_two,
):
    kv, _ = three_on_room_for_two
    async with aiohttp.ClientSession() as session:
        assert await complete(session, kv, "org/b") == 200
        kv.clock.advance(5)
        assert await complete(session, kv, "org/a") == 200  # a is now the most recent
        assert sample(kv, "kvsleep_gpu_memory_committed_bytes", gpu="0") == 16 * 1024**3
        assert await complete(session, kv, "org/c") == 200
    assert (kv.state("org/a"), kv.state("org/b"), kv.state("org/c")) == ("awake", "asleep", "awake")
    assert sample(kv, "kvsleep_evictions_total", model="org/b") == 1
    assert sample(kv, "kvsleep_gpu_memory_budget_bytes", gpu="0") == 20 * 1024**3
    assert sample(kv, "kvsleep_gpu_memory_committed_bytes", gpu="0") == 16 * 1024**3


async def test_with_both_others_busy_the_wake_is_held_until_one_finishes(three_on_room_for_two):
    kv, sims = three_on_room_for_two
    async with aiohttp.ClientSession() as session:

        async def stream(model: str) -> float:
            async with session.post(
                f"{kv.url}/v1/completions",
                json={
                    "model": model,
                    "prompt": "x",
                    "max_tokens": 20,
                    "stream": True,
                    "ignore_eos": True,
                },
            ) as r:
                assert r.status == 200
                await r.read()
            return time.monotonic()

        busy = [asyncio.create_task(stream(m)) for m in ("org/a", "org/b")]
        while not all(
            s.sim.stats()["requests"]["in_flight"] for m, s in sims.items() if m != "org/c"
        ):
            await asyncio.sleep(0.01)
        waiting = asyncio.create_task(complete(session, kv, "org/c"))
        for _ in range(100):
            await asyncio.sleep(0.01)
            if sample(kv, "kvsleep_model_waiting_for_memory", model="org/c") == 1:
                break
        assert sample(kv, "kvsleep_model_waiting_for_memory", model="org/c") == 1
        async with session.get(f"{kv.url}/sleep/status") as r:
            status = (await r.json())["models"]["org/c"]
        assert "GPU 0" in status["waiting_for_memory"]
        assert status["held_requests"] == 1
        assert not waiting.done()
        ends = await asyncio.gather(*busy)
        assert await waiting == 200
        served_at = time.monotonic()
        assert served_at >= min(ends)
    assert kv.state("org/c") == "awake"
    assert sum(kv.state(m) == "asleep" for m in ("org/a", "org/b")) == 1
    assert sample(kv, "kvsleep_model_waiting_for_memory", model="org/c") == 0


async def test_eta_learns_the_wake_time_and_sets_retry_after(sim_factory, tmp_path):
    sim = await sim_factory("vllm", "org/m", wake_latency=0.3)
    kv = await start_kvsleep(config_doc([sim_model(sim, wake_eta_seconds=30)], tmp_path))
    try:
        async with aiohttp.ClientSession() as session:
            # Configured guess until measured: a 2 s deadline cannot wait out a 30 s wake.
            assert await kv.manager.put_model_to_sleep("org/m", manual=True)
            assert sample(kv, "kvsleep_model_wake_eta_seconds", model="org/m") == 30
            async with session.post(
                f"{kv.url}/v1/completions",
                json={"model": "org/m", "prompt": "x"},
                headers={"X-Request-Timeout": "2"},
            ) as r:
                assert r.status == 503
                assert r.headers["Retry-After"] == "30"
                body = await r.json()
            assert body["error"]["code"] == "wake_timeout"
            assert "expected to take 30s" in body["error"]["message"]
            # The wake went on anyway, so that the retry finds the model awake.
            while kv.state("org/m") != "awake":
                await asyncio.sleep(0.02)
            for _ in range(3):
                assert await kv.manager.put_model_to_sleep("org/m", manual=True)
                assert await complete(session, kv, "org/m") == 200
            eta = sample(kv, "kvsleep_model_wake_eta_seconds", model="org/m")
            assert 0.3 <= eta <= 0.36, eta
            # Measured now: a deadline longer than the ETA waits and is served.
            assert await kv.manager.put_model_to_sleep("org/m", manual=True)
            async with session.post(
                f"{kv.url}/v1/completions",
                json={"model": "org/m", "prompt": "x"},
                headers={"X-Request-Timeout": "5"},
            ) as r:
                assert r.status == 200
            async with session.post(
                f"{kv.url}/v1/completions",
                json={"model": "org/m", "prompt": "x"},
                headers={"X-Request-Timeout": "soon"},
            ) as r:
                assert r.status == 400
    finally:
        await kv.close()
    assert not sim.sim.stats()["hazards"]


async def test_queue_full_retry_after_comes_from_the_eta(sim_factory, tmp_path):
    sim = await sim_factory("sglang", "org/m", wake_latency=0.5)
    kv = await start_kvsleep(
        config_doc([sim_model(sim, wake_eta_seconds=7)], tmp_path, max_held_requests=1)
    )
    try:
        assert await kv.manager.put_model_to_sleep("org/m", manual=True)
        async with aiohttp.ClientSession() as session:
            first = asyncio.create_task(complete(session, kv, "org/m"))
            while not kv.manager.slots["org/m"].waiters:
                await asyncio.sleep(0.01)
            async with session.post(
                f"{kv.url}/v1/completions", json={"model": "org/m", "prompt": "x"}
            ) as r:
                assert r.status == 503
                retry_after = int(r.headers["Retry-After"])
            assert 6 <= retry_after <= 7  # the wake already started: less than the full ETA
            assert await first == 200
    finally:
        await kv.close()


async def test_held_stream_gets_comment_lines_and_parses_with_the_openai_client(
    sim_factory, tmp_path
):
    sim = await sim_factory("vllm", "org/m", wake_latency=1.0)
    kv = await start_kvsleep(
        config_doc(
            [sim_model(sim, wake_eta_seconds=1)], tmp_path, router={"hold_keepalive_seconds": 0.3}
        )
    )
    try:
        body = {
            "model": "org/m",
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 5,
            "stream": True,
        }
        assert await kv.manager.put_model_to_sleep("org/m", manual=True)
        async with (
            aiohttp.ClientSession() as session,
            session.post(f"{kv.url}/v1/chat/completions", json=body) as r,
        ):
            assert r.status == 200
            assert r.headers["Content-Type"].startswith("text/event-stream")
            raw = (await r.read()).decode()
        comments = [line for line in raw.splitlines() if line.startswith(":")]
        assert len(comments) >= 2, raw
        assert comments[0].startswith(": waking org/m, eta ")
        assert raw.rstrip().endswith("data: [DONE]")

        assert await kv.manager.put_model_to_sleep("org/m", manual=True)
        client = openai.AsyncOpenAI(base_url=f"{kv.url}/v1", api_key="unused", max_retries=0)
        try:
            chunks = [
                c
                async for c in await client.chat.completions.create(
                    model="org/m",
                    messages=[{"role": "user", "content": "hi"}],
                    max_tokens=5,
                    stream=True,
                )
            ]
        finally:
            await client.close()
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text and chunks[0].object == "chat.completion.chunk"
    finally:
        await kv.close()
    assert not sim.sim.stats()["hazards"]


async def test_held_stream_whose_wake_fails_ends_with_an_sse_error(sim_factory, tmp_path):
    sim = await sim_factory("vllm", "org/m", wake_latency=0.4)
    kv = await start_kvsleep(
        config_doc([sim_model(sim)], tmp_path, router={"hold_keepalive_seconds": 0.1})
    )
    try:
        assert await kv.manager.put_model_to_sleep("org/m", manual=True)
        async with aiohttp.ClientSession() as session:
            async with session.post(
                f"{sim.url}/sim/faults", json={"hang": {"wake": 1}, "fail": {"wake": 3}}
            ):
                pass
            async with session.post(
                f"{kv.url}/v1/completions",
                json={"model": "org/m", "prompt": "x", "stream": True},
                headers={"X-Request-Timeout": "0.5"},
            ) as r:
                assert r.status == 200  # the stream had started with comment lines
                raw = (await r.read()).decode()
        assert raw.startswith(": waking org/m")
        assert '"code": "wake_timeout"' in raw
        assert raw.rstrip().endswith("data: [DONE]")
    finally:
        await kv.close()
