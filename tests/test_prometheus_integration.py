"""A real Prometheus scrapes a live kvsleep and its engines, evaluates the real rules, and answers
every query of the Grafana dashboard.

Scenario (all on 127.0.0.1): four simulated engines behind a kvsleep harness server, `org/llama`
(steady traffic and two sleep/wake cycles with held requests), `org/qwen` (one request, then idle
past its 2 s threshold), `org/flaky` (asleep, every wake fails) and `org/launched` (started by
kvsleep's launcher as a process, killed once and restarted), plus requests for an unknown model.
Prometheus scrapes every second and evaluates alerts/kvsleep-rules.yml every second.

Alerts need their `for:` to pass before they fire, and ours are minutes long; the test loads a
temporary copy of the rules with every `for:` rewritten to 1s (nothing else changes).

Histograms and most label combinations appear lazily, at their first observation, so rate() over
them only sees changes made after Prometheus scraped them once: that is why the cycles are
repeated and the test waits for a scrape in between.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import math
import re
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from kvsleep.control.launcher import Launcher
from tests.kvsleep_harness import sim_model
from tests.prometheus_server import Prometheus, free_port

REPO = Path(__file__).resolve().parent.parent
RULES = REPO / "alerts" / "kvsleep-rules.yml"
DASHBOARD = REPO / "grafana" / "dashboards" / "kvsleep.json"

# The substitutions Grafana would make: with a 1 s scrape interval $__rate_interval is ~4 s; a
# minute keeps the assertions independent of exactly when each event happened.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$model": ".*", "${datasource}": ""}

pytestmark = pytest.mark.timeout(60)


def hostport(url: str) -> str:
    return url.removeprefix("http://").rstrip("/")


def rules_with_short_for(dest: Path) -> Path:
    """A copy of the real rules with every `for:` shortened to 1s, so alerts fire in seconds."""
    text, count = re.subn(r"(?m)^(\s+for:\s*)\S+", r"\g<1>1s", RULES.read_text(encoding="utf-8"))
    assert count == len(re.findall(r"(?m)^\s+- alert:", text))
    dest.write_text(text, encoding="utf-8")
    return dest


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL with Grafana's variables substituted) for every dashboard target."""
    dash = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    queries = []
    for panel in dash["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for variable, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(variable, value)
            assert "$" not in expr, f"{panel['title']}: unsubstituted variable in {expr}"
            queries.append((panel["title"], expr))
    return queries


async def eventually(
    check: Callable[[], Awaitable[bool]], timeout: float, what: str, prom: Prometheus | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
            if await check():
                return
        if time.monotonic() > deadline:
            tail = f"\nprometheus log:\n{prom.log_tail()}" if prom else ""
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}{tail}")
        await asyncio.sleep(0.25)


async def query(
    session: aiohttp.ClientSession, prom: Prometheus, promql: str
) -> list[dict[str, Any]]:
    async with session.get(f"{prom.url}/api/v1/query", params={"query": promql}) as resp:
        body = await resp.json(content_type=None)
    assert body.get("status") == "success", f"{promql}: {body}"
    return body["data"]["result"]


def finite(result: list[dict[str, Any]]) -> list[float]:
    return [v for v in (float(r["value"][1]) for r in result) if math.isfinite(v)]


async def without_data(
    session: aiohttp.ClientSession, prom: Prometheus, queries: list[str], patience: float = 8.0
) -> dict[str, Any]:
    """The queries that return no finite value, retried for up to `patience` seconds (a rule
    group may not have been evaluated since the series it reads appeared); each query must parse.
    """
    deadline = time.monotonic() + patience
    pending = list(queries)
    results: dict[str, Any] = {}
    while True:
        for promql in list(pending):
            results[promql] = await query(session, prom, promql)
            if finite(results[promql]):
                pending.remove(promql)
        if not pending or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.5)
    if pending:  # context for the failure message
        results['up{job="kvsleep"}[1m]'] = await query(session, prom, 'up{job="kvsleep"}[1m]')
    return {promql: results[promql] for promql in pending} | (
        {"scrapes of kvsleep": results['up{job="kvsleep"}[1m]']} if pending else {}
    )


async def completion(session: aiohttp.ClientSession, url: str, model: str) -> int:
    async with session.post(
        f"{url}/v1/completions", json={"model": model, "prompt": "hi", "max_tokens": 2}
    ) as resp:
        await resp.read()
        return resp.status


async def test_prometheus_scrapes_kvsleep_evaluates_rules_and_dashboard_queries(
    sim_factory, kvsleep_factory, prometheus_factory, tmp_path: Path
) -> None:
    llama = await sim_factory("vllm", "org/llama", wake_latency=0.2)
    qwen = await sim_factory("sglang", "org/qwen")
    flaky = await sim_factory("vllm", "org/flaky")
    chat = [await sim_factory("vllm", "org/chat") for _ in range(2)]
    port = free_port()
    launched = {
        "name": "org/launched",
        "engine": "vllm",
        "url": f"http://127.0.0.1:{port}",
        "ready_timeout_seconds": 20,
        "command": [sys.executable, "-m", "kvsleep.sim.engine", "--flavor", "vllm",
                    "--model", "org/launched", "--port", str(port)],
    }  # fmt: skip
    # Real clock: Prometheus compares kvsleep's timestamps with its own time().
    # No auto-sleep: this test decides every sleep; reconcile passes still run (and are timed).
    kv = await kvsleep_factory(
        [
            sim_model(llama, memory_gb=16, gpus=[0]),
            sim_model(qwen, idle_threshold_seconds=2, memory_gb=8, gpus=[0]),
            sim_model(flaky),
            launched,
            {  # two replicas, both awake at start: the scaler drains and sleeps one
                "name": "org/chat",
                "engine": "vllm",
                "replicas": [{"url": sim.url} for sim in chat],
                "scaling": {"min_awake": 1, "scale_down_after_seconds": 1},
            },
        ],
        clock=time.time,
        gpus=[{"id": 0, "memory_gb": 80}],
        auto_sleep_enabled=False,
    )
    launcher = Launcher(kv.manager, kv.server.metrics, str(tmp_path / "engine-logs"))
    try:
        await launcher.start([m for m in kv.server.config.models if m.launched])
        await kv.reconcile()  # the launched engine was down at kvsleep's start: now it is up
        engines = [hostport(s.url) for s in (llama, qwen, flaky, *chat)]
        engines.append(f"127.0.0.1:{port}")
        prom = prometheus_factory({
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s",
                       "evaluation_interval": "1s"},
            "rule_files": [str(rules_with_short_for(tmp_path / "kvsleep-rules.yml"))],
            "scrape_configs": [
                {"job_name": "kvsleep", "static_configs": [{"targets": [hostport(kv.url)]}]},
                {"job_name": "engines", "static_configs": [{"targets": engines}]},
            ],
        })  # fmt: skip
        async with aiohttp.ClientSession() as session:
            await drive_scenario(session, prom, kv, launcher, flaky)
            await check_alerts(session, prom)
            await check_rules(session, prom)
            await check_dashboard(session, prom)
    finally:
        await launcher.stop()


async def drive_scenario(
    session: aiohttp.ClientSession, prom: Prometheus, kv: Any, launcher: Launcher, flaky: Any
) -> None:
    """Traffic, two sleep/wake cycles, failing wakes and an engine restart, seen by Prometheus."""

    async def has(promql: str, at_least: int = 1) -> bool:
        return len(await query(session, prom, promql)) >= at_least

    async def ready() -> bool:
        async with session.get(f"{prom.url}/-/ready") as resp:
            return resp.status == 200

    # qwen's only request; then it idles past its 2 s threshold.
    assert await completion(session, kv.url, "org/qwen") == 200
    assert await kv.manager.put_model_to_sleep("org/flaky", manual=True)

    await eventually(ready, 20, "prometheus ready", prom)
    await eventually(lambda: has('up{job="kvsleep"} == 1'), 10, "kvsleep scraped", prom)
    await eventually(lambda: has('up{job="engines"} == 1', 6), 10, "engines scraped", prom)

    # In the background: steady traffic with unknown-model requests, reconcile passes, and
    # requests for org/flaky whose every wake fails.
    traffic_on = asyncio.Event()
    traffic_on.set()

    async def traffic() -> None:
        for n in itertools.count():
            await traffic_on.wait()
            assert await completion(session, kv.url, "org/llama") == 200
            if n % 5 == 0:
                assert await completion(session, kv.url, "org/unknown") == 404
            await asyncio.sleep(0.1)

    async def reconcile() -> None:
        while True:
            await kv.reconcile()
            await asyncio.sleep(0.5)

    async def failing_wakes() -> None:
        faults = {"fail": {"wake": 100_000}}
        async with session.post(f"{flaky.url}/sim/faults", json=faults) as resp:
            assert resp.status == 200
        while True:
            assert await completion(session, kv.url, "org/flaky") == 503
            await asyncio.sleep(0.3)

    background = [asyncio.create_task(f()) for f in (traffic, reconcile, failing_wakes)]
    try:
        # Kill the launched engine once: the launcher restarts it (restarts_total 0 -> 1).
        process = launcher.engines["org/launched"].process
        assert process is not None
        process.kill()

        # Two sleep/wake cycles of llama, each woken by a burst of held requests. The first
        # creates the wake/sleep/hold histograms; rate() sees the second.
        for cycle in (1, 2):
            traffic_on.clear()
            assert await kv.manager.put_model_to_sleep("org/llama", manual=True)
            statuses = await asyncio.gather(
                *(completion(session, kv.url, "org/llama") for _ in range(5))
            )
            assert statuses == [200] * 5
            assert kv.state("org/llama") == "awake"
            traffic_on.set()
            for series in (
                "kvsleep_wake_duration_seconds_count",
                "kvsleep_sleep_duration_seconds_count",
                "kvsleep_request_hold_seconds_count",
            ):
                await eventually(
                    lambda s=series, c=cycle: has(f'{s}{{model="org/llama"}} >= {c}'),
                    10,
                    f"{series} after cycle {cycle}",
                    prom,
                )
        restarted = 'increase(kvsleep_engine_restarts_total{model="org/launched"}[1m]) > 0'
        await eventually(lambda: has(restarted), 20, "the launched engine's restart", prom)

        async def launched_awake() -> bool:  # the counter moves before the new engine is ready
            return kv.state("org/launched") == "awake"

        await eventually(launched_awake, 20, "the restarted engine awake")
        await asyncio.sleep(2)  # a few more scrapes and rule evaluations of all of it
        for task in background:
            assert not task.done(), task.exception()  # they loop until cancelled
    finally:
        for task in background:
            task.cancel()
        for result in await asyncio.gather(*background, return_exceptions=True):
            if isinstance(result, Exception):  # reported with the scenario's own failure
                print(f"background task failed: {result!r}")


async def check_alerts(session: aiohttp.ClientSession, prom: Prometheus) -> None:
    """The scenario fires these alerts (their `for:` shortened to 1s)."""

    async def firing() -> set[tuple[str, str]]:
        async with session.get(f"{prom.url}/api/v1/alerts") as resp:
            body = await resp.json(content_type=None)
        return {(a["labels"]["alertname"], a["labels"].get("model", ""))
                for a in body["data"]["alerts"] if a["state"] == "firing"}  # fmt: skip

    expected = {
        ("KvsleepWakeFailing", "org/flaky"),
        ("KvsleepRequestsRejected", "org/flaky"),
        ("KvsleepModelIdle", "org/qwen"),
    }

    async def all_expected_firing() -> bool:
        return expected <= await firing()

    await eventually(all_expected_firing, 15, f"alerts {expected} firing", prom)
    now_firing = await firing()
    assert ("KvsleepModelIdle", "org/llama") not in now_firing  # busy
    assert ("KvsleepModelIdle", "org/flaky") not in now_firing  # not awake
    assert not {a for a, _ in now_firing} & {"KvsleepDown", "KvsleepConfigReloadFailed"}


async def check_rules(session: aiohttp.ClientSession, prom: Prometheus) -> None:
    """Every rule evaluates without error, and every recording rule has data."""
    async with session.get(f"{prom.url}/api/v1/rules") as resp:
        groups = (await resp.json(content_type=None))["data"]["groups"]
    rules = [r for g in groups for r in g["rules"]]
    in_file = re.findall(r"(?m)^\s+- (?:alert|record):", RULES.read_text(encoding="utf-8"))
    assert len(rules) == len(in_file)
    for rule in rules:
        assert rule["health"] == "ok", f"{rule['name']}: {rule.get('lastError')}"
    recorded = [r["name"] for r in rules if r["type"] == "recording"]
    missing = await without_data(session, prom, recorded)
    assert not missing, f"recording rules without data: {missing}"
    idle = {r["metric"]["model"]: float(r["value"][1])
            for r in await query(session, prom, "model:kvsleep_idle_seconds")}  # fmt: skip
    assert "org/flaky" not in idle  # only awake models
    assert idle["org/qwen"] > 2 > idle["org/llama"]


async def check_dashboard(session: aiohttp.ClientSession, prom: Prometheus) -> None:
    """The `model` variable's values, and every panel query returns data."""
    async with session.get(
        f"{prom.url}/api/v1/label/model/values", params={"match[]": "kvsleep_model_state"}
    ) as resp:
        models = (await resp.json(content_type=None))["data"]
    assert set(models) == {"org/llama", "org/qwen", "org/flaky", "org/launched", "org/chat"}
    panels = {promql: title for title, promql in dashboard_queries()}
    (state_query,) = [q for q, title in panels.items() if title == "Model state"]
    codes = {r["metric"]["model"]: float(r["value"][1])
             for r in await query(session, prom, state_query)}  # fmt: skip
    assert codes["org/llama"] == 1  # awake
    assert codes["org/flaky"] in (4, 5, 6)  # asleep, waking or failed: its wakes keep failing
    empty = await without_data(session, prom, list(panels))
    assert not empty, "dashboard queries without data:\n" + "\n".join(
        f"{panels.get(promql, '')}: {promql} -> {result}" for promql, result in empty.items()
    )
