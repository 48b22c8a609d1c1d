"""`GET /metrics` after known traffic: counts, gauges, histograms, promtool, bounded series."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from kvsleep import __version__
from tests.kvsleep_harness import sim_model

VLLM_MODEL = "meta-llama/Llama-3.2-1B"
SGLANG_MODEL = "Qwen/Qwen3-0.6B"
STATES = ("awake", "draining", "sleeping", "asleep", "waking", "failed")
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"


class Scrape:
    """One exposition, parsed; `value(name, **labels)` finds the one sample that matches."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.families = list(text_string_to_metric_families(text))
        self.samples = [s for f in self.families for s in f.samples]

    def find(self, name: str, **labels: str) -> list[Any]:
        return [
            s
            for s in self.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        ]

    def value(self, name: str, **labels: str) -> float:
        found = self.find(name, **labels)
        assert len(found) == 1, (name, labels, found)
        return found[0].value

    def family(self, name: str) -> Any:
        return next(f for f in self.families if f.name == name)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=30)
    ) as session:
        yield session


@pytest.fixture
async def fleet(sim_factory, kvsleep_factory):
    vllm = await sim_factory("vllm", VLLM_MODEL)
    sglang = await sim_factory("sglang", SGLANG_MODEL, tokens_per_second=100.0)
    kv = await kvsleep_factory([sim_model(vllm), sim_model(sglang)])
    return kv, vllm, sglang


async def scrape(http: aiohttp.ClientSession, kv: Any) -> Scrape:
    async with http.get(f"{kv.url}/metrics") as resp:
        assert resp.status == 200
        assert resp.content_type == "text/plain"
        return Scrape(await resp.text())


async def post(http: aiohttp.ClientSession, kv: Any, endpoint: str, body: dict) -> int:
    async with http.post(kv.url + endpoint, json=body) as resp:
        await resp.read()
        return resp.status


async def test_request_counts_and_histograms_after_known_traffic(fleet, http):
    kv, _, _ = fleet
    chat = {"model": VLLM_MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    for _ in range(3):
        assert await post(http, kv, "/v1/completions", {"model": VLLM_MODEL, "prompt": "x"}) == 200
    assert (
        await post(
            http, kv, "/v1/completions", {"model": VLLM_MODEL, "prompt": "x", "max_tokens": 0}
        )
        == 400
    )
    assert await post(http, kv, "/v1/chat/completions", {**chat, "stream": True}) == 200
    assert await post(http, kv, "/v1/chat/completions", chat) == 200
    for _ in range(2):
        assert await post(http, kv, "/v1/embeddings", {"model": SGLANG_MODEL, "input": "x"}) == 200
    # Refused before routing: no per-model series for these.
    assert await post(http, kv, "/v1/completions", {"model": "nope", "prompt": "x"}) == 404
    assert await post(http, kv, "/v1/completions", {"prompt": "x"}) == 400

    m = await scrape(http, kv)
    total = "kvsleep_requests_total"
    assert m.value(total, model=VLLM_MODEL, endpoint="/v1/completions", code="200") == 3
    assert m.value(total, model=VLLM_MODEL, endpoint="/v1/completions", code="400") == 1
    assert m.value(total, model=VLLM_MODEL, endpoint="/v1/chat/completions", code="200") == 2
    assert m.value(total, model=SGLANG_MODEL, endpoint="/v1/embeddings", code="200") == 2
    assert sum(s.value for s in m.find(total)) == 8
    assert {s.labels["model"] for s in m.find(total)} == {VLLM_MODEL, SGLANG_MODEL}
    assert m.family("kvsleep_requests").type == "counter"

    hist = "kvsleep_request_duration_seconds"
    assert m.family(hist).type == "histogram"
    for model, endpoint, count in (
        (VLLM_MODEL, "/v1/completions", 4),
        (VLLM_MODEL, "/v1/chat/completions", 2),
        (SGLANG_MODEL, "/v1/embeddings", 2),
    ):
        labels = {"model": model, "endpoint": endpoint}
        assert m.value(f"{hist}_count", **labels) == count
        assert m.value(f"{hist}_bucket", le="+Inf", **labels) == count
        assert 0 < m.value(f"{hist}_sum", **labels) < 10
        buckets = [s.value for s in m.find(f"{hist}_bucket", **labels)]
        assert buckets == sorted(buckets)  # cumulative
    assert m.value("kvsleep_unknown_model_requests_total", endpoint="/v1/completions") == 1

    for model in (VLLM_MODEL, SGLANG_MODEL):
        assert m.value("kvsleep_requests_in_flight", model=model) == 0
        assert m.value("kvsleep_held_requests", model=model) == 0
        for state in STATES:
            expected = 1 if state == "awake" else 0
            assert m.value("kvsleep_model_state", model=model, state=state) == expected
        assert m.value("kvsleep_model_idle_threshold_seconds", model=model) == 60


async def test_in_flight_and_last_seen_follow_a_stream(fleet, http):
    kv, _, sglang = fleet
    last = "kvsleep_model_last_request_timestamp_seconds"
    known = await scrape(http, kv)
    assert known.value(last, model=SGLANG_MODEL) == 0  # never requested

    kv.clock.advance(10)
    assert await post(http, kv, "/v1/completions", {"model": SGLANG_MODEL, "prompt": "x"}) == 200
    assert (await scrape(http, kv)).value(last, model=SGLANG_MODEL) == kv.clock.now

    kv.clock.advance(10)
    started = kv.clock.now
    body = {
        "model": SGLANG_MODEL,
        "prompt": "x",
        "max_tokens": 40,
        "ignore_eos": True,
        "stream": True,
    }
    async with http.post(f"{kv.url}/v1/completions", json=body) as resp:
        await asyncio.wait_for(resp.content.readuntil(b"\n\n"), 3)
        async with http.post(f"{sglang.url}/pause_generation", json={"mode": "in_place"}) as r:
            assert r.status == 200
        kv.clock.advance(42)
        during = await scrape(http, kv)
        assert during.value("kvsleep_requests_in_flight", model=SGLANG_MODEL) == 1
        assert during.value("kvsleep_requests_in_flight", model=VLLM_MODEL) == 0
        assert during.value(last, model=SGLANG_MODEL) == started  # the start, so far
        async with http.post(f"{sglang.url}/continue_generation", json={}) as r:
            assert r.status == 200
        await asyncio.wait_for(resp.read(), 5)
    ended = kv.clock.now
    kv.clock.advance(7)  # scraping later does not move last-seen

    after = await scrape(http, kv)
    assert after.value("kvsleep_requests_in_flight", model=SGLANG_MODEL) == 0
    assert after.value(last, model=SGLANG_MODEL) == ended == started + 42
    assert (
        after.value(
            "kvsleep_requests_total", model=SGLANG_MODEL, endpoint="/v1/completions", code="200"
        )
        == 2
    )


async def test_build_info_and_contract_metrics_are_exported(fleet, http):
    kv, _, _ = fleet
    m = await scrape(http, kv)
    assert m.value("kvsleep_build_info", version=__version__) == 1
    assert m.family("kvsleep_build_info").type == "gauge"  # an Info in the text format
    assert m.value("kvsleep_config_last_reload_successful") == 1
    assert m.value("kvsleep_config_last_reload_success_timestamp_seconds") > 0
    for name in (
        "kvsleep_requests_in_flight",
        "kvsleep_model_last_request_timestamp_seconds",
        "kvsleep_model_state",
        "kvsleep_model_idle_threshold_seconds",
        "kvsleep_held_requests",
        "kvsleep_engine_up",
    ):
        assert m.family(name).type == "gauge", name
    for name in (
        "kvsleep_sleeps",
        "kvsleep_wakes",
        "kvsleep_rejected_requests",
        "kvsleep_reconcile_errors",
    ):
        assert m.family(name).type == "counter", name
    assert m.value("kvsleep_engine_up", model=VLLM_MODEL) == 1
    # Process metrics from client_python's default collectors are kept.
    assert m.find("process_cpu_seconds_total")
    assert m.find("python_gc_objects_collected_total")


async def test_promtool_check_metrics_is_clean(fleet, http):
    if not shutil.which(PROMTOOL):
        pytest.skip("promtool is not installed (CI installs it; apt/brew 'prometheus')")
    kv, _, _ = fleet
    for endpoint, body in (
        ("/v1/completions", {"model": VLLM_MODEL, "prompt": "x"}),
        ("/v1/embeddings", {"model": SGLANG_MODEL, "input": "x"}),
        ("/v1/completions", {"model": "unknown", "prompt": "x"}),
    ):
        await post(http, kv, endpoint, body)
    await kv.manager.put_model_to_sleep(VLLM_MODEL, manual=True)
    assert await post(http, kv, "/v1/completions", {"model": VLLM_MODEL, "prompt": "x"}) == 200
    await kv.reconcile()
    text = (await scrape(http, kv)).text
    assert "kvsleep_wake_duration_seconds_bucket" in text
    proc = await asyncio.to_thread(
        subprocess.run,
        [PROMTOOL, "check", "metrics"],
        input=text.encode(),
        capture_output=True,
        timeout=30,
    )
    out = (proc.stdout + proc.stderr).decode()
    assert proc.returncode == 0 and out.strip() == "", out


async def test_unknown_models_never_become_series(fleet, http):
    kv, _, _ = fleet
    unknown = "kvsleep_unknown_model_requests_total"

    async def send(names: range) -> None:
        for i in names:
            body = {"model": f"ghost-{i}/model", "prompt": "x"}
            async with http.post(f"{kv.url}/v1/completions", json=body) as resp:
                assert resp.status == 404
                await resp.read()

    await send(range(1))  # creates the endpoint's series
    before = await scrape(http, kv)
    assert before.value(unknown, endpoint="/v1/completions") == 1

    n, workers = 10_000, 8
    await asyncio.gather(*(send(range(1 + w, n + 1, workers)) for w in range(workers)))

    after = await scrape(http, kv)
    assert after.value(unknown, endpoint="/v1/completions") == 1 + n
    assert [s.labels for s in after.find(unknown)] == [{"endpoint": "/v1/completions"}]
    assert len(after.samples) == len(before.samples)
    assert {(s.name, tuple(sorted(s.labels.items()))) for s in after.samples} == {
        (s.name, tuple(sorted(s.labels.items()))) for s in before.samples
    }
    assert "ghost-" not in after.text
    assert kv.server.traffic.model_stats.keys() == {VLLM_MODEL, SGLANG_MODEL}
