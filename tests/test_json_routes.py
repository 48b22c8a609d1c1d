"""The kvcached controller's JSON routes and `GET /v1/models`, over real HTTP.

Keys are the kvcached controller's (controller/frontend.py); model names contain `/` and are
accepted raw and percent-encoded. Time is a FakeClock, so idle times are exact.
"""

from __future__ import annotations

import asyncio
import json
import urllib.parse
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from tests.kvsleep_harness import sim_model

VLLM_MODEL = "meta-llama/Llama-3.2-1B"
SGLANG_MODEL = "Qwen/Qwen3-0.6B"
# Per-model keys of the kvcached controller's traffic stats.
TRAFFIC_KEYS = {
    "total_requests",
    "successful_requests",
    "failed_requests",
    "request_rate",
    "avg_response_time",
    "last_activity_time",
    "idle_time_seconds",
    "is_idle",
}
SPELLINGS = [
    pytest.param(lambda n: n, id="raw"),
    pytest.param(lambda n: urllib.parse.quote(n, safe=""), id="percent-encoded"),
]


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as session:
        yield session


@pytest.fixture
async def fleet(sim_factory, kvsleep_factory):
    """kvsleep in front of a vLLM and an SGLang sim whose model names contain `/`."""
    vllm = await sim_factory("vllm", VLLM_MODEL)
    sglang = await sim_factory("sglang", SGLANG_MODEL, tokens_per_second=100.0)
    kv = await kvsleep_factory([sim_model(vllm), sim_model(sglang)], idle_threshold_seconds=60)
    return kv, vllm, sglang


async def get(http: aiohttp.ClientSession, url: str, status: int = 200) -> Any:
    # encoded=True: send `%2F` as written instead of letting the client normalize it.
    from yarl import URL

    async with http.get(URL(url, encoded=True)) as resp:
        body = await resp.json()
        assert resp.status == status, body
        assert resp.content_type == "application/json"
        return body


async def complete(http: aiohttp.ClientSession, kv: Any, model: str, **extra: Any) -> int:
    body = {"model": model, "prompt": "hi", "max_tokens": 2, **extra}
    async with http.post(f"{kv.url}/v1/completions", json=body) as resp:
        await resp.read()
        return resp.status


async def test_health_and_models(fleet, http):
    kv, vllm, sglang = fleet
    assert await get(http, f"{kv.url}/health") == {"status": "healthy"}
    models = (await get(http, f"{kv.url}/models"))["models"]
    assert set(models) == {VLLM_MODEL, SGLANG_MODEL}
    assert models[VLLM_MODEL]["endpoint"] == vllm.url
    assert models[SGLANG_MODEL]["endpoint"] == sglang.url


@pytest.mark.parametrize("spell", SPELLINGS)
async def test_model_health(spell, fleet, http):
    kv, vllm, sglang = fleet
    for name, sim in ((VLLM_MODEL, vllm), (SGLANG_MODEL, sglang)):
        doc = await get(http, f"{kv.url}/health/{spell(name)}")
        assert doc["model"] == name
        assert doc["health"] == {sim.url: True}
    # As kvcached: an unknown model has no endpoints to report, so its health is empty.
    missing = await get(http, f"{kv.url}/health/{spell('no/such-model')}")
    assert missing == {"model": "no/such-model", "health": {}}


async def test_model_health_reports_a_down_engine(kvsleep_factory, http):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    kv = await kvsleep_factory([{"name": "org/down", "engine": "vllm", "url": url}])
    doc = await get(http, f"{kv.url}/health/org%2Fdown")
    assert doc["model"] == "org/down" and doc["health"] == {url: False}


async def test_traffic_stats_counts_and_rates(fleet, http):
    kv, _, _ = fleet
    for _ in range(3):
        assert await complete(http, kv, VLLM_MODEL) == 200
    assert await complete(http, kv, VLLM_MODEL, max_tokens=0) == 400  # engine refuses
    assert await complete(http, kv, SGLANG_MODEL) == 200

    doc = await get(http, f"{kv.url}/traffic/stats?window=60")
    assert doc["window_seconds"] == 60
    stats = doc["traffic_stats"]
    assert set(stats) == {VLLM_MODEL, SGLANG_MODEL}
    v = stats[VLLM_MODEL]
    assert set(v) >= TRAFFIC_KEYS
    assert (v["total_requests"], v["successful_requests"], v["failed_requests"]) == (4, 3, 1)
    assert v["request_rate"] == pytest.approx(4 / 60)
    assert v["last_activity_time"] == pytest.approx(kv.clock.now)
    assert stats[SGLANG_MODEL]["total_requests"] == 1

    # The window moves with the clock: 2 minutes later nothing is recent in 60 s.
    kv.clock.advance(120)
    recent = (await get(http, f"{kv.url}/traffic/stats?window=60"))["traffic_stats"]
    assert recent[VLLM_MODEL]["request_rate"] == 0
    wide = await get(http, f"{kv.url}/traffic/stats?window=300")
    assert wide["window_seconds"] == 300
    assert wide["traffic_stats"][VLLM_MODEL]["request_rate"] == pytest.approx(4 / 300)
    default = await get(http, f"{kv.url}/traffic/stats")
    assert default["window_seconds"] == 60


@pytest.mark.parametrize("spell", SPELLINGS)
async def test_model_traffic_stats(spell, fleet, http):
    kv, _, _ = fleet
    assert await complete(http, kv, SGLANG_MODEL) == 200
    assert await complete(http, kv, SGLANG_MODEL) == 200
    doc = await get(http, f"{kv.url}/traffic/stats/{spell(SGLANG_MODEL)}?window=10")
    assert doc["window_seconds"] == 10
    stats = doc["model_stats"]
    assert stats["model_name"] == SGLANG_MODEL
    assert set(stats) >= TRAFFIC_KEYS
    assert stats["total_requests"] == 2
    assert stats["request_rate"] == pytest.approx(2 / 10)
    # As kvcached: a model without traffic has no traffic data (404, a string error).
    other = await get(http, f"{kv.url}/traffic/stats/{spell(VLLM_MODEL)}", 404)
    assert other == {"error": f"No traffic data found for model {VLLM_MODEL}"}
    missing = await get(http, f"{kv.url}/traffic/stats/{spell('a/b')}", 404)
    assert missing == {"error": "No traffic data found for model a/b"}


async def test_idle_and_active_models(fleet, http):
    kv, _, _ = fleet
    kv.clock.advance(100)  # both models known for 100 s, never used
    assert await complete(http, kv, VLLM_MODEL) == 200
    kv.clock.advance(30)

    idle = await get(http, f"{kv.url}/models/idle?threshold=50")
    assert idle["idle_models"] == [SGLANG_MODEL]
    assert idle["idle_models_count"] == 1
    assert idle["idle_threshold_seconds"] == 50
    details = idle["idle_model_details"][SGLANG_MODEL]
    assert set(details) == {"idle_time_seconds", "total_requests", "last_activity_time"}
    assert details["idle_time_seconds"] == pytest.approx(130)

    active = await get(http, f"{kv.url}/models/active?threshold=50&window=60")
    assert active["active_models"] == [VLLM_MODEL]
    assert active["active_models_count"] == 1
    assert (active["idle_threshold_seconds"], active["window_seconds"]) == (50, 60)
    details = active["active_model_details"][VLLM_MODEL]
    assert set(details) == {
        "request_rate",
        "total_requests",
        "avg_response_time",
        "last_activity_time",
    }
    assert details["total_requests"] == 1
    assert details["request_rate"] == pytest.approx(1 / 60)

    # Lower the threshold below 30 s: both idle; the default is the configured 60 s.
    assert set((await get(http, f"{kv.url}/models/idle?threshold=20"))["idle_models"]) == {
        VLLM_MODEL,
        SGLANG_MODEL,
    }
    default = await get(http, f"{kv.url}/models/idle")
    assert default["idle_threshold_seconds"] == 60
    assert default["idle_models"] == [SGLANG_MODEL]


async def test_idle_time_counts_from_the_end_of_the_last_request(fleet, http):
    """A 500 s stream is not idle while it runs, and idle time starts when it ends."""
    kv, _, sglang = fleet
    model = urllib.parse.quote(SGLANG_MODEL, safe="")
    body = {
        "model": SGLANG_MODEL,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 40,
        "ignore_eos": True,
        "stream": True,
    }
    started = kv.clock.now
    async with http.post(f"{kv.url}/v1/chat/completions", json=body) as resp:
        await asyncio.wait_for(resp.content.readuntil(b"\n\n"), 3)
        async with http.post(f"{sglang.url}/pause_generation", json={"mode": "in_place"}) as r:
            assert r.status == 200
        kv.clock.advance(500)
        stats = (await get(http, f"{kv.url}/traffic/stats/{model}"))["model_stats"]
        assert stats["idle_time_seconds"] == 0 and stats["is_idle"] is False
        assert stats["last_activity_time"] == pytest.approx(started)
        idle = (await get(http, f"{kv.url}/models/idle?threshold=0"))["idle_models"]
        assert SGLANG_MODEL not in idle
        active = (await get(http, f"{kv.url}/models/active?threshold=0"))["active_models"]
        assert SGLANG_MODEL in active
        assert (
            SGLANG_MODEL not in (await get(http, f"{kv.url}/sleep/candidates"))["sleep_candidates"]
        )
        async with http.post(f"{sglang.url}/continue_generation", json={}) as r:
            assert r.status == 200
        await asyncio.wait_for(resp.read(), 5)
    ended = kv.clock.now

    stats = (await get(http, f"{kv.url}/traffic/stats/{model}"))["model_stats"]
    assert stats["last_activity_time"] == pytest.approx(ended)
    assert stats["idle_time_seconds"] == 0
    kv.clock.advance(30)
    stats = (await get(http, f"{kv.url}/traffic/stats/{model}"))["model_stats"]
    assert stats["idle_time_seconds"] == pytest.approx(30)
    assert (
        SGLANG_MODEL not in (await get(http, f"{kv.url}/models/idle?threshold=40"))["idle_models"]
    )
    idle = await get(http, f"{kv.url}/models/idle?threshold=20")
    assert SGLANG_MODEL in idle["idle_models"]
    assert idle["idle_model_details"][SGLANG_MODEL]["idle_time_seconds"] == pytest.approx(30)
    assert SGLANG_MODEL not in (await get(http, f"{kv.url}/sleep/candidates"))["sleep_candidates"]
    kv.clock.advance(31)  # 61 s after the end: past the 60 s threshold
    candidates = await get(http, f"{kv.url}/sleep/candidates")
    assert SGLANG_MODEL in candidates["sleep_candidates"]


async def test_sleep_status_and_candidates(fleet, http):
    kv, _, _ = fleet
    status = await get(http, f"{kv.url}/sleep/status")
    assert {
        "sleeping_models",
        "sleep_candidates",
        "auto_sleep_enabled",
        "idle_threshold_seconds",
        "wakeup_on_request",
    } <= set(status)
    assert status["sleeping_models"] == {} and status["sleep_candidates"] == []
    assert (
        status["auto_sleep_enabled"],
        status["idle_threshold_seconds"],
        status["wakeup_on_request"],
    ) == (True, 60, True)

    assert await complete(http, kv, SGLANG_MODEL) == 200
    kv.clock.advance(61)
    assert await kv.manager.put_model_to_sleep(VLLM_MODEL, manual=True) is True
    kv.clock.advance(5)

    status = await get(http, f"{kv.url}/sleep/status")
    sleeping = status["sleeping_models"]
    assert set(sleeping) == {VLLM_MODEL}
    assert set(sleeping[VLLM_MODEL]) >= {"sleep_start_time", "sleep_duration", "manual_sleep"}
    assert sleeping[VLLM_MODEL]["manual_sleep"] is True
    assert sleeping[VLLM_MODEL]["sleep_duration"] == pytest.approx(5)
    assert status["sleep_candidates"] == [SGLANG_MODEL]

    cand = await get(http, f"{kv.url}/sleep/candidates")
    assert set(cand) >= {
        "sleep_candidates",
        "candidate_details",
        "idle_threshold_seconds",
        "auto_sleep_enabled",
    }
    assert cand["sleep_candidates"] == [SGLANG_MODEL]
    details = cand["candidate_details"][SGLANG_MODEL]
    assert details["can_sleep"] is True
    assert details["total_requests"] == 1
    assert details["idle_time_seconds"] == pytest.approx(66)


async def test_v1_models_lists_every_model_with_its_state(fleet, http):
    kv, _, _ = fleet
    doc = await get(http, f"{kv.url}/v1/models")
    assert doc["object"] == "list"
    by_id = {m["id"]: m for m in doc["data"]}
    assert set(by_id) == {VLLM_MODEL, SGLANG_MODEL}
    for m in doc["data"]:
        assert {"id", "object", "created", "owned_by", "state"} <= set(m)
        assert m["object"] == "model" and isinstance(m["created"], int)
        assert m["state"] == "awake"
    assert by_id[VLLM_MODEL]["owned_by"] == "vllm"

    assert await kv.manager.put_model_to_sleep(SGLANG_MODEL, manual=True) is True
    states = {m["id"]: m["state"] for m in (await get(http, f"{kv.url}/v1/models"))["data"]}
    assert states == {VLLM_MODEL: "awake", SGLANG_MODEL: "asleep"}
    models = (await get(http, f"{kv.url}/models"))["models"]
    assert models[SGLANG_MODEL]["state"] == "asleep"


@pytest.mark.parametrize(
    "path",
    [
        "/traffic/stats?window={v}",
        "/traffic/stats/meta-llama%2FLlama-3.2-1B?window={v}",
        "/traffic/stats/meta-llama/Llama-3.2-1B?window={v}",
        "/models/idle?threshold={v}",
        "/models/active?threshold={v}",
        "/models/active?threshold=5&window={v}",
    ],
)
@pytest.mark.parametrize("value", ["abc", "-1", "nan", "inf", "", "1e999", "0x10"])
async def test_bad_query_values_are_400(path, value, fleet, http):
    kv, _, _ = fleet
    doc = await get(http, kv.url + path.format(v=value), 400)
    param = path.rsplit("?", 1)[1].split("&")[-1].split("=")[0]
    # kvcached's error shape on its routes: {"error": "text"} (it answers 500 here; kvsleep 400).
    assert set(doc) == {"error"} and isinstance(doc["error"], str), doc
    assert param in doc["error"]


async def test_json_routes_answer_json_content(fleet, http):
    """Every read route answers parseable JSON objects (guards against text/plain bodies)."""
    kv, _, _ = fleet
    assert await complete(http, kv, SGLANG_MODEL) == 200  # /traffic/stats/M needs traffic
    for path in (
        "/health",
        "/models",
        "/traffic/stats",
        "/models/idle",
        "/models/active",
        "/sleep/status",
        "/sleep/candidates",
        "/v1/models",
        f"/health/{VLLM_MODEL}",
        f"/traffic/stats/{SGLANG_MODEL}",
    ):
        async with http.get(kv.url + path) as resp:
            assert resp.status == 200, path
            assert resp.content_type == "application/json", path
            assert isinstance(json.loads(await resp.read()), dict), path
