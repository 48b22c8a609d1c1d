"""kvcached's HTTP routes, as its `controller/frontend.py` answers them: status codes, keys, JSON
types, `{"error": "text"}` errors, which models appear, and its control semantics.

Written from kvcached's documented and observed behaviour (docs/kvcached.md lists where kvsleep
differs on purpose); kvsleep runs on loopback in front of simulated engines, on a fake clock.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from yarl import URL

from tests.kvsleep_harness import config_doc, sim_model, start_kvsleep

V = "meta-llama/Llama-3.2-1B"
S = "Qwen/Qwen3-0.6B"
# kvcached's keys per model in /traffic/stats and /traffic/stats/{model}, with their JSON types.
TRAFFIC_TYPES = {
    "total_requests": int,
    "successful_requests": int,
    "failed_requests": int,
    "request_rate": float,
    "avg_response_time": float,
    "last_activity_time": float,
    "idle_time_seconds": float,
    "is_idle": bool,
}


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as session:
        yield session


@pytest.fixture
async def fleet(sim_factory, kvsleep_factory):
    vllm = await sim_factory("vllm", V)
    sglang = await sim_factory("sglang", S)
    # kvcached's example policy: whole seconds, as its YAML gives them.
    kv = await kvsleep_factory(
        [sim_model(vllm), sim_model(sglang)],
        idle_threshold_seconds=300,
        min_sleep_duration=80,
        auto_sleep_enabled=False,
    )
    return kv, vllm, sglang


async def call(http: aiohttp.ClientSession, method: str, url: str) -> tuple[int, Any]:
    async with http.request(method, URL(url, encoded=True)) as resp:
        assert resp.content_type == "application/json", url
        return resp.status, await resp.json()


async def complete(http: aiohttp.ClientSession, kv: Any, model: str) -> None:
    body = {"model": model, "prompt": "hi", "max_tokens": 2}
    async with http.post(f"{kv.url}/v1/completions", json=body) as resp:
        assert resp.status == 200, await resp.text()


def assert_types(doc: dict[str, Any], types: dict[str, type]) -> None:
    for key, kind in types.items():
        assert key in doc, (key, doc)
        value = doc[key]
        # JSON has one number type per kind: an int must not come back as 300.0, nor a bool.
        assert type(value) is kind, (key, value, kind)


async def test_get_server_info_is_kvcached_placeholder(fleet, http):
    kv, _, _ = fleet
    assert await call(http, "GET", f"{kv.url}/get_server_info") == (200, {"status": "dummy"})


async def test_health_of_all_models_and_of_an_unknown_one(fleet, http):
    kv, vllm, sglang = fleet
    assert await call(http, "GET", f"{kv.url}/health/all") == (
        200,
        {"model": "all", "health": {V: {vllm.url: True}, S: {sglang.url: True}}},
    )
    for spelled in ("no/such", "no%2Fsuch"):
        assert await call(http, "GET", f"{kv.url}/health/{spelled}") == (
            200,
            {"model": "no/such", "health": {}},
        )
    status, doc = await call(http, "GET", f"{kv.url}/health/{urllib.parse.quote(V, safe='')}")
    assert status == 200 and (doc["model"], doc["health"]) == (V, {vllm.url: True})


async def test_models_without_traffic_do_not_appear_in_traffic_views(fleet, http):
    kv, _, _ = fleet
    status, doc = await call(http, "GET", f"{kv.url}/traffic/stats")
    assert status == 200 and doc == {"traffic_stats": {}, "window_seconds": 60}
    status, doc = await call(http, "GET", f"{kv.url}/models/active")
    assert (doc["active_models"], doc["active_model_details"], doc["active_models_count"]) == (
        [],
        {},
        0,
    )
    for spelled in (V, urllib.parse.quote(V, safe="")):
        assert await call(http, "GET", f"{kv.url}/traffic/stats/{spelled}") == (
            404,
            {"error": f"No traffic data found for model {V}"},
        )

    await complete(http, kv, V)
    status, doc = await call(http, "GET", f"{kv.url}/traffic/stats")
    assert list(doc["traffic_stats"]) == [V]
    assert_types(doc["traffic_stats"][V], TRAFFIC_TYPES)
    status, doc = await call(http, "GET", f"{kv.url}/models/active")
    assert (doc["active_models"], doc["active_models_count"]) == ([V], 1)
    status, doc = await call(http, "GET", f"{kv.url}/traffic/stats/{V}")
    assert status == 200 and doc["model_stats"]["model_name"] == V
    assert_types(doc["model_stats"], TRAFFIC_TYPES)
    assert await call(http, "GET", f"{kv.url}/traffic/stats/{S}") == (
        404,
        {"error": f"No traffic data found for model {S}"},
    )


@pytest.mark.parametrize(
    "query, threshold, window",
    [
        ("", 300, 60),
        ("?threshold=120&window=30", 120, 30),
    ],
)
async def test_whole_seconds_are_json_integers(query, threshold, window, fleet, http):
    kv, _, _ = fleet
    await complete(http, kv, V)
    kv.clock.advance(400)  # V idle past both thresholds
    _, idle = await call(http, "GET", f"{kv.url}/models/idle{query}")
    assert_types(
        idle,
        {
            "idle_models": list,
            "idle_threshold_seconds": int,
            "idle_model_details": dict,
            "idle_models_count": int,
        },
    )
    assert idle["idle_threshold_seconds"] == threshold and V in idle["idle_models"]
    assert_types(
        idle["idle_model_details"][V],
        {"idle_time_seconds": float, "total_requests": int, "last_activity_time": float},
    )
    _, active = await call(http, "GET", f"{kv.url}/models/active{query}")
    assert_types(
        active,
        {
            "active_models": list,
            "idle_threshold_seconds": int,
            "window_seconds": int,
            "active_model_details": dict,
            "active_models_count": int,
        },
    )
    assert (active["idle_threshold_seconds"], active["window_seconds"]) == (threshold, window)
    window_query = f"?window={window}" if query else ""
    _, stats = await call(http, "GET", f"{kv.url}/traffic/stats{window_query}")
    assert type(stats["window_seconds"]) is int and stats["window_seconds"] == window
    _, stats = await call(http, "GET", f"{kv.url}/traffic/stats/{V}{window_query}")
    assert type(stats["window_seconds"]) is int and stats["window_seconds"] == window
    for path in ("/sleep/status", "/sleep/candidates"):
        _, doc = await call(http, "GET", kv.url + path)
        assert type(doc["idle_threshold_seconds"]) is int and doc["idle_threshold_seconds"] == 300
        assert type(doc["auto_sleep_enabled"]) is bool


async def test_decimal_seconds_are_kept(fleet, http):
    """kvsleep takes decimal seconds where kvcached answers 500 (int() of "1.5")."""
    kv, _, _ = fleet
    _, doc = await call(http, "GET", f"{kv.url}/models/active?threshold=1.5&window=2.5")
    assert (doc["idle_threshold_seconds"], doc["window_seconds"]) == (1.5, 2.5)


async def test_sleep_status_and_candidates_keys_and_types(fleet, http):
    kv, _, _ = fleet
    await complete(http, kv, V)
    kv.clock.advance(301)
    _, status = await call(http, "GET", f"{kv.url}/sleep/status")
    assert_types(
        status,
        {
            "sleeping_models": dict,
            "sleep_candidates": list,
            "auto_sleep_enabled": bool,
            "idle_threshold_seconds": int,
            "wakeup_on_request": bool,
        },
    )
    _, cand = await call(http, "GET", f"{kv.url}/sleep/candidates")
    assert set(cand) == {
        "sleep_candidates",
        "candidate_details",
        "idle_threshold_seconds",
        "auto_sleep_enabled",
    }
    assert V in cand["sleep_candidates"]
    assert_types(
        cand["candidate_details"][V],
        {
            "idle_time_seconds": float,
            "total_requests": int,
            "last_activity_time": float,
            "can_sleep": bool,
        },
    )

    assert (await call(http, "POST", f"{kv.url}/action/sleep/{V}"))[0] == 200
    kv.clock.advance(5)
    _, status = await call(http, "GET", f"{kv.url}/sleep/status")
    assert_types(
        status["sleeping_models"][V],
        {"sleep_start_time": float, "sleep_duration": float, "manual_sleep": bool},
    )


async def test_errors_are_strings_on_kvcached_routes_and_openai_objects_elsewhere(fleet, http):
    kv, _, _ = fleet
    for verb in ("sleep", "wakeup"):
        for spelled in ("org/missing", "org%2Fmissing"):
            assert await call(http, "POST", f"{kv.url}/action/{verb}/{spelled}") == (
                404,
                {"error": "Model org/missing not found"},
            )
    # kvcached answers 500 for a window that is not an integer; kvsleep 400, same shape.
    for path in (
        "/traffic/stats?window=abc",
        f"/traffic/stats/{V}?window=-1",
        "/models/idle?threshold=nan",
        "/models/active?window=x",
    ):
        status, doc = await call(http, "GET", kv.url + path)
        assert status == 400 and set(doc) == {"error"} and isinstance(doc["error"], str), doc
    # The OpenAI routes keep the OpenAI error shape.
    body = {"model": "org/missing", "prompt": "hi"}
    async with http.post(f"{kv.url}/v1/completions", json=body) as resp:
        doc = await resp.json()
    assert resp.status == 404
    assert set(doc["error"]) == {"message", "type", "param", "code"}


async def test_access_refusals_are_strings_on_kvcached_routes(
    sim_factory, tmp_path, http, monkeypatch
):
    monkeypatch.setenv("KVSLEEP_COMPAT_TOKEN", "t0ken")
    engine = await sim_factory("vllm", V)
    doc = config_doc(
        [sim_model(engine)], tmp_path / "state", router={"admin_token_env": "KVSLEEP_COMPAT_TOKEN"}
    )
    kv = await start_kvsleep(doc)
    try:
        async with http.post(f"{kv.url}/action/sleep/{V}") as resp:
            assert resp.status == 401 and resp.headers["WWW-Authenticate"].startswith("Bearer")
            body = await resp.json()
        assert set(body) == {"error"} and "bearer token" in body["error"]
        async with http.post(f"{kv.url}/models/{V}/sleep") as resp:  # kvsleep's own route
            assert resp.status == 401
            assert (await resp.json())["error"]["type"] == "authentication_error"
    finally:
        await kv.close()


async def test_control_semantics(fleet, http):
    kv, vllm, _ = fleet
    keys = {"model_name": str, "success": bool, "message": str}

    # Waking an awake model: 400, success false (kvcached's wakeup_model returns False).
    status, doc = await call(http, "POST", f"{kv.url}/action/wakeup/{V}")
    assert status == 400 and doc["success"] is False and doc["model_name"] == V
    assert_types(doc, keys)
    assert doc["message"].startswith(f"Model {V} wake request failed")

    status, doc = await call(http, "POST", f"{kv.url}/action/sleep/{V}")
    assert (status, doc["success"]) == (200, True) and vllm.sim.stats()["state"] == "asleep"
    assert doc["message"] == f"Model {V} sleep request successful"
    assert_types(doc, keys)

    # Sleeping an asleep model: 400, success false; the engine is not called again.
    status, doc = await call(http, "POST", f"{kv.url}/action/sleep/{V}")
    assert (status, doc["success"]) == (400, False)
    assert vllm.sim.stats()["calls"]["/sleep"] == 1

    # A wake within min_sleep_duration (80 s): 400, and nothing is scheduled.
    kv.clock.advance(79)
    status, doc = await call(http, "POST", f"{kv.url}/action/wakeup/{V}")
    assert (status, doc["success"]) == (400, False) and "min_sleep_duration" in doc["message"]
    assert kv.state(V) == "asleep" and kv.manager.slots[V].deferred_wake is None
    kv.clock.advance(1)
    status, doc = await call(http, "POST", f"{kv.url}/action/wakeup/{V}")
    assert (status, doc["success"]) == (200, True)
    assert doc["message"] == f"Model {V} wake request successful"
    assert vllm.sim.stats()["state"] == "awake"

    # A request is never refused for min_sleep_duration: it wakes the model (kvcached: 500).
    assert (await call(http, "POST", f"{kv.url}/action/sleep/{S}"))[0] == 200
    await complete(http, kv, S)
    assert kv.state(S) == "awake"


async def test_kvsleep_own_routes_keep_their_semantics(fleet, http):
    """`/models/{m}/sleep|wake` (the seed's, and `kvsleep sleep|wake`): idempotent, and a wake
    inside min_sleep_duration is scheduled (202) rather than refused."""
    kv, _, _ = fleet
    assert (await call(http, "POST", f"{kv.url}/models/{V}/wake"))[0] == 200
    assert (await call(http, "POST", f"{kv.url}/models/{V}/sleep"))[0] == 200
    assert (await call(http, "POST", f"{kv.url}/models/{V}/sleep"))[0] == 200
    status, doc = await call(http, "POST", f"{kv.url}/models/{V}/wake")
    assert (status, doc["success"]) == (202, True)
