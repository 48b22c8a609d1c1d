"""The two alerts about engine state a real Prometheus raises from a live kvsleep's own metrics.

`alerts/tests/` checks each rule on made-up series; this checks that what kvsleep really exports
when a model goes `unknown` (an SGLang resume that hangs past the wake timeout) and when its
state file cannot be written (`state.json` is a directory: even root cannot replace it) fires
`KvsleepEngineStateUnknown` and `KvsleepStateFileNotWritable` (with the rules' `for:` shortened
to 1s), and that adopting a state resolves the first.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.kvsleep_harness import FAST_RETRY, config_doc, sim_model, start_kvsleep
from tests.prometheus_server import Prometheus
from tests.test_engine_faults import arm, calls
from tests.test_prometheus_integration import (
    completion,
    eventually,
    hostport,
    query,
    rules_with_short_for,
)

pytestmark = pytest.mark.timeout(60)

STUCK, OTHER = "org/stuck", "org/other"


async def alerts(session: aiohttp.ClientSession, prom: Prometheus) -> dict[tuple[str, str], Any]:
    """Firing alerts by (alertname, model)."""
    async with session.get(f"{prom.url}/api/v1/alerts") as resp:
        body = await resp.json(content_type=None)
    return {
        (a["labels"]["alertname"], a["labels"].get("model", "")): a
        for a in body["data"]["alerts"]
        if a["state"] == "firing"
    }


async def test_unknown_state_and_unwritable_state_file_fire_their_alerts(
    sim_factory, prometheus_factory, tmp_path: Path
) -> None:
    stuck = await sim_factory("sglang", STUCK)
    other = await sim_factory("sglang", OTHER)
    state_dir = tmp_path / "state"
    retry = dataclasses.replace(FAST_RETRY, wake_timeout_seconds=0.3)
    kv = await start_kvsleep(
        config_doc([sim_model(stuck), sim_model(other)], state_dir), retry=retry
    )
    prom = prometheus_factory({
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(rules_with_short_for(tmp_path / "kvsleep-rules.yml"))],
        "scrape_configs": [
            {"job_name": "kvsleep", "static_configs": [{"targets": [hostport(kv.url)]}]},
        ],
    })  # fmt: skip
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as session:

            async def has(promql: str) -> bool:
                return bool(await query(session, prom, promql))

            # Prometheus must see the write-error counter at 0 before it moves.
            await eventually(
                lambda: has('kvsleep_state_write_errors_total{job="kvsleep"} == 0'),
                20,
                "kvsleep scraped",
                prom,
            )
            assert await kv.manager.put_model_to_sleep(STUCK, manual=True)
            await arm(session, stuck.url, hang={"wake": 1})
            assert await completion(session, kv.url, STUCK) == 503
            assert kv.state(STUCK) == "unknown"

            state_file = state_dir / "state.json"
            state_file.unlink()
            state_file.mkdir()
            # A release needs its record first: refused, and counted.
            assert not await kv.manager.put_model_to_sleep(OTHER, manual=True)
            assert kv.state(OTHER) == "awake"

            async def both_firing() -> bool:
                firing = await alerts(session, prom)
                return {
                    ("KvsleepEngineStateUnknown", STUCK),
                    ("KvsleepStateFileNotWritable", ""),
                } <= set(firing)

            await eventually(both_firing, 20, "both state alerts firing", prom)
            firing = await alerts(session, prom)
            unknown = firing[("KvsleepEngineStateUnknown", STUCK)]
            assert unknown["labels"]["severity"] == "critical"
            assert f"kvsleep adopt {STUCK} asleep" in unknown["annotations"]["description"]
            assert ("KvsleepEngineStateUnknown", OTHER) not in firing
            unwritable = firing[("KvsleepStateFileNotWritable", "")]
            assert unwritable["labels"]["instance"] == hostport(kv.url)

            state_file.rmdir()
            async with session.post(f"{kv.url}/models/{STUCK}/adopt?state=asleep") as resp:
                assert resp.status == 200, await resp.text()

            async def unknown_resolved() -> bool:
                return ("KvsleepEngineStateUnknown", STUCK) not in await alerts(session, prom)

            await eventually(unknown_resolved, 20, "KvsleepEngineStateUnknown resolved", prom)
            assert await completion(session, kv.url, STUCK) == 200
            assert kv.state(STUCK) == "awake"
    finally:
        await kv.close()
    assert calls(stuck, "/resume_memory_occupation") == 2  # the hung one, then the real wake
    assert calls(other, "/release_memory_occupation") == 0
    for sim in (stuck, other):
        stats = sim.sim.stats()
        assert stats["hazards"] == {} and stats["requests"]["served_while_not_awake"] == 0
