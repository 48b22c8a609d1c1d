"""The simulated engines over real HTTP: OpenAI shapes, sleep contracts, hazards and faults.

Hazards matter most: each one is what a real engine would do to a router that misbehaves, so
each gets a test that triggers it and checks it is visible (answer, crash, counter).
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from kvsleep.sim.engine import GIB, REPLY, add_sim_arguments, settings_from_args
from tests.conftest import RunningSim, SimFactory, sim_process

pytestmark = pytest.mark.timeout(30)

FULL = 8 * GIB  # default weights_gb + kv_cache_gb
WEIGHTS = 2 * GIB


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as client:
        yield client


async def call(
    session: aiohttp.ClientSession, method: str, url: str, **kwargs: Any
) -> tuple[int, str]:
    async with session.request(method, url, **kwargs) as response:
        return response.status, await response.text()


async def call_json(
    session: aiohttp.ClientSession, method: str, url: str, **kwargs: Any
) -> tuple[int, Any]:
    status, text = await call(session, method, url, **kwargs)
    return status, json.loads(text) if text else None


async def scrape(session: aiohttp.ClientSession, url: str) -> dict[tuple[str, frozenset], float]:
    _, text = await call(session, "GET", url + "/metrics")
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def sample(samples: dict[tuple[str, frozenset], float], name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def sse_events(raw: str) -> list[str]:
    """Split an SSE body the way OpenAI clients do, checking the framing on the way."""
    assert raw.endswith("\n\n")
    events = raw[:-2].split("\n\n")
    assert all(event.startswith("data: ") for event in events), events
    return [event[len("data: ") :] for event in events]


async def wait_for(predicate: Any, timeout: float = 2.0) -> None:
    """Poll in-process state until `predicate()` holds; tests use it to sequence requests."""
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.005)


def complete(engine: RunningSim, session: aiohttp.ClientSession, **body: Any) -> asyncio.Task:
    return asyncio.create_task(
        call_json(session, "POST", engine.url + "/v1/completions", json={"prompt": "hi", **body})
    )


# -- OpenAI-compatible answers ------------------------------------------------------------------


@pytest.mark.parametrize("flavor", ["vllm", "sglang"])
async def test_completion_reports_length_or_stop(sim_factory: SimFactory, session, flavor) -> None:
    engine = await sim_factory(flavor)
    url = engine.url + "/v1/completions"
    status, body = await call_json(session, "POST", url, json={"model": "m", "prompt": "a b c"})
    assert status == 200
    assert body["id"].startswith("cmpl-") and body["object"] == "text_completion"
    assert body["model"] == "m"
    (choice,) = body["choices"]
    assert choice["text"] == " ".join(REPLY[:16]) and choice["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 16, "total_tokens": 19}

    status, body = await call_json(session, "POST", url, json={"prompt": "x", "max_tokens": 99})
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["completion_tokens"] == len(REPLY)
    assert (await engine.stats())["requests"]["completed"] == 2


@pytest.mark.parametrize("flavor", ["vllm", "sglang"])
async def test_chat_completion_shape(sim_factory: SimFactory, session, flavor) -> None:
    engine = await sim_factory(flavor)
    messages = [{"role": "user", "content": [{"type": "text", "text": "two words"}]}]
    status, body = await call_json(
        session,
        "POST",
        engine.url + "/v1/chat/completions",
        json={"model": "m", "messages": messages, "max_tokens": 3},
    )
    assert status == 200
    assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion"
    (choice,) = body["choices"]
    assert choice["message"] == {"role": "assistant", "content": " ".join(REPLY[:3])}
    assert choice["finish_reason"] == "length"
    assert body["usage"]["prompt_tokens"] == 2


@pytest.mark.parametrize("flavor", ["vllm", "sglang"])
@pytest.mark.parametrize("route", ["/v1/completions", "/v1/chat/completions"])
async def test_streams_parse_like_openai_client(
    sim_factory: SimFactory, session, flavor: str, route: str
) -> None:
    engine = await sim_factory(flavor)
    chat = route == "/v1/chat/completions"
    body: dict[str, Any] = {"model": "m", "stream": True, "max_tokens": 5}
    body |= {"messages": [{"role": "user", "content": "hi"}]} if chat else {"prompt": "hi"}
    body["stream_options"] = {"include_usage": True}
    async with session.post(engine.url + route, json=body) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/event-stream")
        events = sse_events(await response.text())

    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    *choice_chunks, usage_chunk = chunks
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] == 5
    assert len({chunk["id"] for chunk in chunks}) == 1
    assert chunks[0]["id"].startswith("chatcmpl-" if chat else "cmpl-")
    kind = "chat.completion.chunk" if chat else "text_completion"
    assert all(chunk["object"] == kind for chunk in chunks)
    choices = [chunk["choices"][0] for chunk in choice_chunks]
    assert [c["finish_reason"] for c in choices] == [None] * (len(choices) - 1) + ["length"]
    if chat:
        assert choices[0]["delta"] == {"role": "assistant", "content": ""}
        text = "".join(c["delta"].get("content", "") for c in choices)
    else:
        text = "".join(c["text"] for c in choices)
    assert text == " ".join(REPLY[:5])


async def test_tokens_are_paced(sim_factory: SimFactory, session) -> None:
    engine = await sim_factory("vllm", tokens_per_second=100.0)
    loop = asyncio.get_running_loop()
    started = loop.time()
    await call_json(session, "POST", engine.url + "/v1/completions", json={"prompt": "p"})
    assert loop.time() - started >= 16 / 100


@pytest.mark.parametrize("flavor", ["vllm", "sglang"])
async def test_embeddings_and_models(sim_factory: SimFactory, session, flavor) -> None:
    engine = await sim_factory(flavor, model="org/emb", embedding_dim=4)
    request = {"model": "org/emb", "input": ["a", "a"]}
    status, body = await call_json(session, "POST", engine.url + "/v1/embeddings", json=request)
    assert status == 200 and body["object"] == "list"
    first, second = body["data"]
    assert first["object"] == "embedding" and len(first["embedding"]) == 4
    assert first["embedding"] == second["embedding"] and second["index"] == 1
    status, models = await call_json(session, "GET", engine.url + "/v1/models")
    assert models["object"] == "list"
    assert models["data"][0]["id"] == "org/emb" and models["data"][0]["owned_by"] == flavor


async def test_errors_use_each_engines_shape(sim_factory: SimFactory, session) -> None:
    vllm, sglang = await sim_factory("vllm"), await sim_factory("sglang")
    body = {"model": "x", "prompt": "hi"}
    status, error = await call_json(session, "POST", vllm.url + "/v1/completions", json=body)
    assert status == 404
    assert error == {
        "error": {
            "message": "The model `x` does not exist.",
            "type": "NotFoundError",
            "param": "model",
            "code": 404,
        }
    }
    status, error = await call_json(session, "POST", sglang.url + "/v1/completions", json=body)
    assert status == 404 and error["object"] == "error" and error["code"] == 404

    for engine in (vllm, sglang):
        status, error = await call_json(
            session, "POST", engine.url + "/v1/chat/completions", data=b"{not json"
        )
        assert status == 400
        assert (error["error"] if engine is vllm else error)["type"] == "BadRequestError"
    status, error = await call_json(session, "POST", vllm.url + "/v1/completions", json={})
    assert status == 400 and error["error"]["param"] == "prompt"


# -- vLLM sleep contract ------------------------------------------------------------------------


async def test_vllm_sleep_and_wake_move_memory(sim_factory: SimFactory, session) -> None:
    engine = await sim_factory("vllm")
    labels = {"model_name": "m", "engine": "0"}
    metrics = await scrape(session, engine.url)
    assert sample(metrics, "kvsleep_sim_gpu_memory_used_bytes") == FULL
    assert sample(metrics, "vllm:engine_sleep_state", **labels, sleep_state="awake") == 1

    status, body = await call_json(session, "POST", engine.url + "/sleep?level=1", json={"x": 1})
    assert (status, body) == (200, {"status": "sleeping", "level": 1})
    assert await call_json(session, "GET", engine.url + "/is_sleeping") == (
        200,
        {"is_sleeping": True},
    )
    assert (await call(session, "GET", engine.url + "/health"))[0] == 200
    metrics = await scrape(session, engine.url)
    assert sample(metrics, "kvsleep_sim_gpu_memory_used_bytes") == 0
    assert sample(metrics, "vllm:engine_sleep_state", **labels, sleep_state="awake") == 0
    assert sample(metrics, "vllm:engine_sleep_state", **labels, sleep_state="weights_offloaded")
    stats = await engine.stats()
    assert stats["state"] == "asleep" and stats["gpu_memory_bytes"] == 0

    status, body = await call_json(session, "POST", engine.url + "/wake_up")
    assert (status, body) == (200, {"status": "awake", "tags": ["weights", "kv_cache"]})
    assert (await call(session, "POST", engine.url + "/wake_up"))[0] == 200  # repeat: harmless
    stats = await engine.stats()
    assert stats["state"] == "awake" and stats["gpu_memory_bytes"] == FULL
    assert stats["calls"] == {"/sleep": 1, "/is_sleeping": 1, "/health": 1, "/wake_up": 2}
    assert stats["hazards"] == {}
    metrics = await scrape(session, engine.url)
    assert sample(metrics, "kvsleep_sim_control_calls_total", route="/wake_up") == 2


async def test_vllm_older_versions_answer_empty_bodies(sim_factory: SimFactory, session) -> None:
    for version in ("0.11", "0.19"):
        engine = await sim_factory("vllm", vllm_version=version)
        assert await call(session, "POST", engine.url + "/sleep") == (200, "")
        assert await call(session, "POST", engine.url + "/wake_up") == (200, "")
        _, body = await call_json(session, "GET", engine.url + "/version")
        assert body == {"version": f"{version}.0"}
        names = {name for name, _ in await scrape(session, engine.url)}
        assert ("vllm:engine_sleep_state" in names) == (version != "0.11")


async def test_vllm_without_dev_mode_has_no_sleep_routes(sim_factory: SimFactory, session) -> None:
    engine = await sim_factory("vllm", dev_mode=False)
    for path in ("/sleep", "/wake_up"):
        assert await call_json(session, "POST", engine.url + path) == (404, {"detail": "Not Found"})


async def test_vllm_rejects_bad_sleep_and_wake_parameters(sim_factory: SimFactory, session) -> None:
    engine = await sim_factory("vllm")
    for query in ("/sleep?level=3", "/sleep?mode=later", "/wake_up?tags=optimizer"):
        status, body = await call_json(session, "POST", engine.url + query)
        assert status == 400 and body["error"]["code"] == 400
    assert (await engine.stats())["state"] == "awake"


async def test_vllm_request_while_asleep_hangs_until_full_wake(
    sim_factory: SimFactory, session
) -> None:
    engine = await sim_factory("vllm")
    await call(session, "POST", engine.url + "/sleep?level=1")
    held = complete(engine, session)
    await wait_for(lambda: engine.sim.queued == 1)
    await asyncio.sleep(0.1)
    assert not held.done()
    metrics = await scrape(session, engine.url)
    # A sleeping vLLM takes no engine steps, so its gauges still say what they said when it fell
    # asleep: the held request shows nowhere (seen on a real vLLM 0.32).
    assert sample(metrics, "vllm:num_requests_waiting", model_name="m", engine="0") == 0
    assert (await engine.stats())["hazards"] == {"request_while_asleep": 1}

    await call(session, "POST", engine.url + "/wake_up?tags=weights")
    await asyncio.sleep(0.05)
    assert not held.done()  # weights alone are not a full wake
    await call(session, "POST", engine.url + "/wake_up?tags=kv_cache")
    status, body = await asyncio.wait_for(held, 2)
    assert status == 200 and body["choices"][0]["finish_reason"] == "length"

    stats = await engine.stats()
    assert stats["requests"]["served_while_not_awake"] == 1
    events = [(e["event"], e.get("route")) for e in stats["log"]]
    arrival = events.index(("request", "/v1/completions"))
    assert arrival < events.index(("control", "/wake_up"))


async def test_vllm_011_request_while_asleep_kills_the_process(session) -> None:
    args = ("--vllm-version", "0.11", "--sleep-latency", "0.01")
    async with sim_process("vllm", "m", *args) as engine:
        assert (await call(session, "POST", engine.url + "/sleep"))[0] == 200
        with pytest.raises(aiohttp.ClientError):
            await call(session, "POST", engine.url + "/v1/completions", json={"prompt": "hi"})
        assert await engine.wait_exit() == 70
        assert "request_while_asleep" in "".join(engine.stderr_lines)


async def test_vllm_011_sleep_with_requests_in_flight_crashes(
    sim_factory: SimFactory, session
) -> None:
    engine = await sim_factory("vllm", vllm_version="0.11", tokens_per_second=50.0)
    in_flight = complete(engine, session)
    await wait_for(lambda: engine.sim.in_flight == 1)
    with pytest.raises(aiohttp.ClientError):
        await call(session, "POST", engine.url + "/sleep?mode=wait")  # 0.11 ignores the mode
    with pytest.raises(aiohttp.ClientError):
        await in_flight
    with pytest.raises(aiohttp.ClientError):  # a dead engine answers nothing at all
        await call(session, "GET", engine.url + "/health")
    stats = await engine.stats()
    assert stats["state"] == "dead" and stats["hazards"] == {"sleep_while_busy": 1}


async def test_vllm_level2_needs_reload_or_serves_garbage(sim_factory: SimFactory, session) -> None:
    engine = await sim_factory("vllm")
    await call(session, "POST", engine.url + "/sleep?level=2")
    assert (await engine.stats())["engine"]["weights"] == "none"
    await call(session, "POST", engine.url + "/wake_up")
    await complete(engine, session)
    assert (await engine.stats())["hazards"] == {"garbage_weights": 1}

    rpc = {"method": "reload_weights"}
    assert (await call(session, "POST", engine.url + "/collective_rpc", json=rpc))[0] == 200
    await complete(engine, session)
    assert (await engine.stats())["hazards"] == {"garbage_weights": 1}


async def test_vllm_level2_documented_wake_sequence_is_clean(
    sim_factory: SimFactory, session
) -> None:
    engine = await sim_factory("vllm")
    await call(session, "POST", engine.url + "/sleep?level=2")
    metrics = await scrape(session, engine.url)
    labels = {"model_name": "m", "engine": "0", "sleep_state": "discard_all"}
    assert sample(metrics, "vllm:engine_sleep_state", **labels) == 1
    _, body = await call_json(session, "POST", engine.url + "/wake_up?tags=weights")
    assert body == {"status": "sleeping", "tags": ["weights"]}
    assert (await engine.stats())["gpu_memory_bytes"] == WEIGHTS
    rpc = {"method": "reload_weights"}
    assert (await call(session, "POST", engine.url + "/collective_rpc", json=rpc))[0] == 200
    _, body = await call_json(session, "POST", engine.url + "/wake_up?tags=kv_cache")
    assert body["status"] == "awake"
    status, _ = await complete(engine, session)
    stats = await engine.stats()
    assert status == 200 and stats["hazards"] == {} and stats["gpu_memory_bytes"] == FULL


async def test_vllm_reload_before_waking_weights_crashes(sim_factory: SimFactory, session) -> None:
    engine = await sim_factory("vllm")
    await call(session, "POST", engine.url + "/sleep?level=2")
    with pytest.raises(aiohttp.ClientError):
        rpc = {"method": "reload_weights"}
        await call(session, "POST", engine.url + "/collective_rpc", json=rpc)
    assert (await engine.stats())["hazards"] == {"reload_while_asleep": 1}


async def test_vllm_abort_mode_ends_streams_with_abort(sim_factory: SimFactory, session) -> None:
    engine = await sim_factory("vllm", tokens_per_second=50.0)
    body = {"prompt": "hi", "stream": True, "max_tokens": 20}
    async with session.post(engine.url + "/v1/completions", json=body) as response:
        first = await response.content.readuntil(b"\n\n")
        assert json.loads(first[len("data: ") :])["choices"][0]["finish_reason"] is None
        assert (await call(session, "POST", engine.url + "/sleep"))[0] == 200
        events = sse_events((await response.read()).decode())
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["choices"][0]["finish_reason"] == "abort"
    stats = await engine.stats()
    assert stats["hazards"] == {"aborted_requests": 1}
    assert stats["requests"]["aborted"] == 1


async def test_vllm_wait_mode_drains_before_sleeping(sim_factory: SimFactory, session) -> None:
    engine = await sim_factory("vllm", tokens_per_second=100.0)
    in_flight = complete(engine, session, max_tokens=10)
    await wait_for(lambda: engine.sim.in_flight == 1)
    assert (await call(session, "POST", engine.url + "/sleep?mode=wait"))[0] == 200
    assert in_flight.done()
    _, body = in_flight.result()
    assert body["choices"][0]["finish_reason"] == "length"
    stats = await engine.stats()
    assert stats["hazards"] == {} and stats["state"] == "asleep"


async def test_vllm_keep_mode_freezes_until_wake(sim_factory: SimFactory, session) -> None:
    engine = await sim_factory("vllm", tokens_per_second=200.0)
    in_flight = complete(engine, session, max_tokens=10)
    await wait_for(lambda: engine.sim.in_flight == 1)
    await call(session, "POST", engine.url + "/sleep?mode=keep")
    (request,) = engine.sim.requests
    frozen_at = request.generated
    await asyncio.sleep(0.1)
    assert request.generated == frozen_at < 10 and not in_flight.done()
    await call(session, "POST", engine.url + "/wake_up")
    _, body = await asyncio.wait_for(in_flight, 2)
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 10
    assert (await engine.stats())["hazards"] == {}


async def test_vllm_033_repeated_sleep_aborts_queued_requests(
    sim_factory: SimFactory, session
) -> None:
    engine = await sim_factory("vllm")
    await call(session, "POST", engine.url + "/sleep")
    held = complete(engine, session)
    await wait_for(lambda: engine.sim.queued == 1)
    assert (await call(session, "POST", engine.url + "/sleep"))[0] == 200
    status, body = await asyncio.wait_for(held, 2)
    assert status == 200 and body["choices"][0]["finish_reason"] == "abort"
    assert (await engine.stats())["hazards"] == {"request_while_asleep": 1, "aborted_requests": 1}


async def test_vllm_019_repeated_sleep_keeps_queued_requests(
    sim_factory: SimFactory, session
) -> None:
    engine = await sim_factory("vllm", vllm_version="0.19")
    await call(session, "POST", engine.url + "/sleep")
    held = complete(engine, session)
    await wait_for(lambda: engine.sim.queued == 1)
    await call(session, "POST", engine.url + "/sleep")
    await call(session, "POST", engine.url + "/wake_up")
    _, body = await asyncio.wait_for(held, 2)
    assert body["choices"][0]["finish_reason"] == "length"


async def test_health_answers_503_during_startup(sim_factory: SimFactory, session) -> None:
    engine = await sim_factory("vllm", startup_seconds=0.2)
    assert (await call(session, "GET", engine.url + "/health"))[0] == 503
    await asyncio.sleep(0.25)
    assert (await call(session, "GET", engine.url + "/health"))[0] == 200


# -- SGLang memory contract ---------------------------------------------------------------------


async def test_sglang_release_and_resume_move_memory(sim_factory: SimFactory, session) -> None:
    engine = await sim_factory("sglang", weights_cpu_backup=True)
    release = engine.url + "/release_memory_occupation"
    resume = engine.url + "/resume_memory_occupation"
    assert await call(session, "POST", release, json={}) == (200, "null")
    metrics = await scrape(session, engine.url)
    assert sample(metrics, "kvsleep_sim_gpu_memory_used_bytes") == 0
    assert (await engine.stats())["state"] == "released"
    assert await call(session, "POST", resume, json={"tags": ["weights"]}) == (200, "null")
    assert (await engine.stats())["gpu_memory_bytes"] == WEIGHTS
    await call(session, "POST", resume, json={"tags": ["kv_cache", "cuda_graph"]})
    stats = await engine.stats()
    assert stats["state"] == "awake" and stats["gpu_memory_bytes"] == FULL
    status, _ = await complete(engine, session)
    assert status == 200 and stats["hazards"] == {}
    assert stats["calls"] == {
        "/release_memory_occupation": 1,
        "/resume_memory_occupation": 2,
    }


async def test_sglang_release_requires_a_json_body(sim_factory: SimFactory, session) -> None:
    engine = await sim_factory("sglang")
    url = engine.url + "/release_memory_occupation"
    for kwargs in ({}, {"data": b"nope"}, {"json": {"tags": ["optimizer"]}}):
        status, body = await call_json(session, "POST", url, **kwargs)
        assert status == 400 and body["object"] == "error"
    assert (await engine.stats())["state"] == "awake"


async def test_sglang_release_while_busy_kills_the_process(session) -> None:
    async with sim_process("sglang", "m", "--tokens-per-second", "20") as engine:
        body = {"prompt": "hi", "stream": True, "max_tokens": 20}
        async with session.post(engine.url + "/v1/completions", json=body) as stream:
            await stream.content.readuntil(b"\n\n")
            with pytest.raises(aiohttp.ClientError):
                await call(session, "POST", engine.url + "/release_memory_occupation", json={})
        assert await engine.wait_exit() == 70
        assert "release_while_busy" in "".join(engine.stderr_lines)


async def test_sglang_health_on_released_engine_is_a_hazard(
    sim_factory: SimFactory, session
) -> None:
    engine = await sim_factory("sglang")
    await call(session, "POST", engine.url + "/release_memory_occupation", json={})
    assert (await call(session, "GET", engine.url + "/health"))[0] == 503
    assert (await call(session, "GET", engine.url + "/health_generate"))[0] == 503
    stats = await engine.stats()
    assert stats["hazards"] == {"health_while_released": 2} and stats["state"] == "released"
    metrics = await scrape(session, engine.url)
    assert sample(metrics, "kvsleep_sim_hazards_total", kind="health_while_released") == 2


async def test_sglang_stale_weights_until_update_from_disk(
    sim_factory: SimFactory, session
) -> None:
    engine = await sim_factory("sglang", model="served", weights_path="/models/served")
    await call(session, "POST", engine.url + "/release_memory_occupation", json={})
    await call(session, "POST", engine.url + "/resume_memory_occupation", json={})
    assert (await complete(engine, session, model="served"))[0] == 200
    assert (await engine.stats())["hazards"] == {"stale_weights": 1}

    update = engine.url + "/update_weights_from_disk"
    status, body = await call_json(session, "POST", update, json={"model_path": "served"})
    assert status == 400 and body["success"] is False
    status, body = await call_json(session, "POST", update, json={"model_path": "/models/served"})
    assert status == 200
    assert body == {
        "success": True,
        "message": "Succeeded to update model weights.",
        "num_paused_requests": 0,
    }
    await complete(engine, session, model="served")
    assert (await engine.stats())["hazards"] == {"stale_weights": 1}


@pytest.mark.parametrize(
    ("steps", "hazard"),
    [
        (["/resume_memory_occupation"], "resume_without_release"),
        (["/release_memory_occupation", "/release_memory_occupation"], "double_release"),
        (["/release_memory_occupation", "/v1/completions"], "request_while_released"),
        (
            ["/release_memory_occupation", "/update_weights_from_disk"],
            "update_weights_while_released",
        ),
    ],
)
async def test_sglang_misuse_crashes(
    sim_factory: SimFactory, session, steps: list[str], hazard: str
) -> None:
    engine = await sim_factory("sglang")
    *setup, fatal = steps
    body = {"prompt": "hi", "model_path": "m"}
    for path in setup:
        assert (await call(session, "POST", engine.url + path, json={}))[0] == 200
    with pytest.raises(aiohttp.ClientError):
        await call(session, "POST", engine.url + fatal, json=body)
    with pytest.raises(aiohttp.ClientError):
        await call(session, "GET", engine.url + "/v1/models")
    stats = await engine.stats()
    assert stats["state"] == "dead" and stats["hazards"] == {hazard: 1}


async def test_sglang_without_memory_saver_release_frees_nothing(
    sim_factory: SimFactory, session
) -> None:
    engine = await sim_factory("sglang", memory_saver=False)
    assert await call(session, "POST", engine.url + "/release_memory_occupation", json={}) == (
        200,
        "null",
    )
    assert (await call(session, "GET", engine.url + "/health"))[0] == 200
    assert (await complete(engine, session))[0] == 200
    stats = await engine.stats()
    assert stats["gpu_memory_bytes"] == FULL and stats["hazards"] == {}


async def test_sglang_pause_holds_requests_and_server_info(
    sim_factory: SimFactory, session
) -> None:
    engine = await sim_factory("sglang", weights_path="/w")
    await call(session, "POST", engine.url + "/pause_generation", json={"mode": "in_place"})
    held = complete(engine, session)
    await wait_for(lambda: engine.sim.queued == 1)
    metrics = await scrape(session, engine.url)
    assert sample(metrics, "sglang:num_queue_reqs", model_name="m") == 1
    await call(session, "POST", engine.url + "/continue_generation", json={})
    assert (await asyncio.wait_for(held, 2))[0] == 200
    for path in ("/server_info", "/get_server_info"):
        _, info = await call_json(session, "GET", engine.url + path)
        assert info["model_path"] == "/w" and info["version"]
    metrics = await scrape(session, engine.url)
    assert sample(metrics, "sglang:e2e_request_latency_seconds_count", model_name="m") == 1
    assert (await engine.stats())["hazards"] == {}


# -- fault injection ----------------------------------------------------------------------------


async def test_fail_next_sleep_answers_500_and_does_nothing(
    sim_factory: SimFactory, session
) -> None:
    engine = await sim_factory("vllm")
    await call(session, "POST", engine.url + "/sim/faults", json={"fail": {"sleep": 1}})
    status, body = await call_json(session, "POST", engine.url + "/sleep")
    assert status == 500 and body["error"]["code"] == 500
    assert (await engine.stats())["state"] == "awake"
    assert (await call(session, "POST", engine.url + "/sleep"))[0] == 200
    assert (await engine.stats())["calls"]["/sleep"] == 2


async def test_hang_next_wake_never_answers(sim_factory: SimFactory, session) -> None:
    engine = await sim_factory("sglang", hang_next={"wake": 1})
    resume = engine.url + "/resume_memory_occupation"
    await call(session, "POST", engine.url + "/release_memory_occupation", json={})
    with pytest.raises(asyncio.TimeoutError):
        await call(session, "POST", resume, json={}, timeout=aiohttp.ClientTimeout(total=0.2))
    assert (await engine.stats())["state"] == "released"
    assert await call(session, "POST", resume, json={}) == (200, "null")


async def test_hang_requests_and_crash_mid_stream(sim_factory: SimFactory, session) -> None:
    engine = await sim_factory("vllm")
    faults = {"hang_requests": 1, "crash_stream_after_chunks": 2}
    await call(session, "POST", engine.url + "/sim/faults", json=faults)
    with pytest.raises(asyncio.TimeoutError):
        await call(
            session,
            "POST",
            engine.url + "/v1/completions",
            json={"prompt": "hi"},
            timeout=aiohttp.ClientTimeout(total=0.2),
        )
    assert (await engine.stats())["requests"]["hung"] == 1
    body = {"prompt": "hi", "stream": True}
    async with session.post(engine.url + "/v1/completions", json=body) as response:
        await response.content.readuntil(b"\n\n")
        await response.content.readuntil(b"\n\n")
        with pytest.raises(aiohttp.ClientError):
            await response.read()
    stats = await engine.stats()
    assert stats["state"] == "dead" and stats["hazards"] == {"injected_crash": 1}


async def test_exit_fault_ends_the_process_with_its_code(session) -> None:
    async with sim_process("sglang", "m") as engine:
        with pytest.raises(aiohttp.ClientError):
            await call(session, "POST", engine.url + "/sim/faults", json={"exit": 3})
        assert await engine.wait_exit() == 3


def test_cli_flags_build_settings() -> None:
    parser = argparse.ArgumentParser()
    add_sim_arguments(parser)
    flags = "--flavor sglang --model q --no-memory-saver --wake-latency 0.3 --weights-path /w"
    ns = parser.parse_args([*flags.split(), "--fail-next", "sleep=2", "--hang-next", "wake=1"])
    settings = settings_from_args(ns)
    assert settings.memory_saver is False and settings.wake_latency == 0.3
    assert settings.fail_next == {"sleep": 2} and settings.hang_next == {"wake": 1}
    assert settings.weights_source == "/w" and settings.dev_mode is True
    with pytest.raises(SystemExit):
        parser.parse_args(["--flavor", "vllm", "--model", "m", "--fail-next", "nap=1"])
