"""Truth in status: a model whose engine does not answer is `down`, wherever kvsleep says what
state a model is in, and waking it fails."""

from __future__ import annotations

import dataclasses
from typing import Any

import aiohttp

from tests.kvsleep_harness import post_json, sim_model
from tests.test_launcher import free_port

M, OTHER = "org/m", "org/other"


def sample(kv: Any, name: str, **labels: str) -> float:
    return kv.server.metrics.registry.get_sample_value(name, labels) or 0.0


async def states(session: aiohttp.ClientSession, kv: Any) -> dict[str, dict[str, str]]:
    async with session.get(kv.url + "/v1/models") as resp:
        listed = {m["id"]: m["state"] for m in (await resp.json())["data"]}
    async with session.get(kv.url + "/sleep/status") as resp:
        status = {n: m["state"] for n, m in (await resp.json())["models"].items()}
    async with session.get(kv.url + "/models") as resp:
        kvcached = {n: m["state"] for n, m in (await resp.json())["models"].items()}
    return {"v1": listed, "status": status, "models": kvcached}


async def test_unreachable_engine_is_down_and_cannot_be_woken(sim_factory, kvsleep_factory):
    other = await sim_factory("vllm", OTHER)
    dead = f"http://127.0.0.1:{free_port()}"
    kv = await kvsleep_factory([{"name": M, "engine": "vllm", "url": dead}, sim_model(other)])
    async with aiohttp.ClientSession() as session:
        seen = await states(session, kv)
        assert seen == {view: {M: "down", OTHER: "awake"} for view in seen}, seen
        assert sample(kv, "kvsleep_model_state", model=M, state="down") == 1
        assert sample(kv, "kvsleep_model_state", model=M, state="awake") == 0
        async with session.get(kv.url + "/-/ready") as resp:
            assert resp.status == 200  # the other model serves
            assert f"down: {M}" in await resp.text()
        status, body = await post_json(session, f"{kv.url}/models/{M}/wake", None)
        assert status == 400 and body["success"] is False, body
        assert "unreachable" in body["message"]
        status, body = await post_json(session, f"{kv.url}/models/{OTHER}/wake", None)
        assert status == 200 and body["success"] is True, body


async def test_ready_names_the_models_down(kvsleep_factory):
    kv = await kvsleep_factory(
        [{"name": M, "engine": "sglang", "url": f"http://127.0.0.1:{free_port()}"}]
    )
    async with aiohttp.ClientSession() as session, session.get(kv.url + "/-/ready") as resp:
        assert resp.status == 200
        assert f"down: {M}" in await resp.text()


async def test_engine_that_stops_answering_is_down_at_once_and_back_when_it_answers(
    sim_factory, kvsleep_factory
):
    sim = await sim_factory("vllm", M)
    kv = await kvsleep_factory([sim_model(sim)])
    cfg = kv.manager.slots[M].cfg
    async with aiohttp.ClientSession() as session:
        assert (await states(session, kv))["v1"] == {M: "awake"}
        # The engine's address stops answering (as a crashed engine's would).
        kv.manager.update_model(dataclasses.replace(cfg, url=f"http://127.0.0.1:{free_port()}"))
        status, body = await post_json(
            session, kv.url + "/v1/completions", {"model": M, "prompt": "hi", "max_tokens": 2}
        )
        assert status == 502, body
        assert (await states(session, kv))["status"] == {M: "down"}
        kv.manager.update_model(cfg)
        await kv.reconcile()
        assert (await states(session, kv))["status"] == {M: "awake"}
