"""Two kvsleep replicas behind one Prometheus: fleet-wide idleness, and no request meets a
sleeping engine because one replica slept it while another still routed to it."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest

from kvsleep.config import FleetConfig
from kvsleep.control.fleet import owner_of
from tests.kvsleep_harness import FakeClock, config_doc, sim_model, start_kvsleep
from tests.prometheus_server import Prometheus, free_port


def test_every_replica_computes_the_same_owner():
    urls = ["http://127.0.0.1:8080", "http://127.0.0.1:8081", "http://127.0.0.1:8082"]
    owners = {owner_of("org/m", FleetConfig(u, tuple(x for x in urls if x != u))) for u in urls}
    assert len(owners) == 1
    spread = {owner_of(f"org/m{i}", FleetConfig(urls[0], tuple(urls[1:]))) for i in range(50)}
    assert spread == set(urls)
    assert owner_of("org/m", FleetConfig(urls[0], ())) is None


async def query(session: aiohttp.ClientSession, prom: Prometheus, promql: str) -> dict[str, float]:
    async with session.get(f"{prom.url}/api/v1/query", params={"query": promql}) as resp:
        body = await resp.json()
    return {r["metric"].get("model", ""): float(r["value"][1]) for r in body["data"]["result"]}


async def until(
    session: aiohttp.ClientSession, prom: Prometheus, promql: str, predicate, timeout: float = 15
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if predicate(await query(session, prom, promql)):
                return
        except (aiohttp.ClientError, KeyError):
            pass
        assert time.monotonic() < deadline, f"{promql}: {prom.log_tail()}"
        await asyncio.sleep(0.2)


@pytest.mark.parametrize("flavor", ["vllm", "sglang"])
async def test_two_replicas_share_idleness_and_lose_nothing(
    sim_factory, prometheus_factory, tmp_path, flavor
):
    sim = await sim_factory(flavor, "org/m", tokens_per_second=20, wake_latency=0.1)
    ports = [free_port(), free_port()]
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    prom = prometheus_factory(
        {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [
                {
                    "job_name": "kvsleep",
                    "scrape_interval": "500ms",
                    "static_configs": [{"targets": [u.removeprefix("http://") for u in urls]}],
                }
            ],
        }
    )
    clock = FakeClock()
    replicas = []
    try:
        for i, port in enumerate(ports):
            doc = config_doc([sim_model(sim)], tmp_path / f"state{i}", idle_threshold_seconds=60)
            doc["router"]["port"] = port
            doc["fleet"] = {"self_url": urls[i], "peers": [urls[1 - i]]}
            doc["policy_source"] = {
                "type": "prometheus",
                "url": prom.url,
                "max_staleness_seconds": 30,
            }
            replicas.append(await start_kvsleep(doc, clock=clock, port=port))
        owner_url = owner_of("org/m", FleetConfig(urls[0], (urls[1],)))
        owner = replicas[urls.index(owner_url)]
        other = replicas[1 - urls.index(owner_url)]

        async with aiohttp.ClientSession() as session:
            # A slow stream through the replica that does not own the model.
            async def stream(via) -> bytes:
                async with session.post(
                    f"{via.url}/v1/completions",
                    json={"model": "org/m", "prompt": "x", "max_tokens": 80, "stream": True},
                ) as r:
                    assert r.status == 200
                    return await r.read()

            # Prometheus syncs new targets about every 5 s: wait until it scrapes both replicas.
            await until(session, prom, "sum(up)", lambda r: r.get("") == 2, timeout=20)
            streaming = asyncio.create_task(stream(other))
            await until(
                session,
                prom,
                "sum by (model) (kvsleep_requests_in_flight)",
                lambda r: r.get("org/m") == 1,
            )
            clock.advance(600)
            assert await owner.reconcile() == []  # busy on the other replica: not slept
            assert owner.state("org/m") == "awake"
            body = await streaming
            assert body.endswith(b"data: [DONE]\n\n")

            await until(
                session,
                prom,
                "sum by (model) (kvsleep_requests_in_flight)",
                lambda r: r.get("org/m") == 0,
            )
            await until(
                session,
                prom,
                "max by (model) (kvsleep_model_last_request_timestamp_seconds)",
                lambda r: r.get("org/m", 0) >= clock.now - 1,
            )
            assert await owner.reconcile() == []  # the stream just ended fleet-wide
            clock.advance(61)
            assert await other.reconcile() == []  # only the owner sleeps
            actions = await owner.reconcile()
            assert [(a.model, a.reason) for a in actions] == [("org/m", "idle")]
            await asyncio.wait_for(_until(lambda: owner.state("org/m") == "asleep"), 5)
            assert other.state("org/m") == "asleep"

            # Right after the owner slept it, a burst reaches the other replica.
            async def one(via) -> int:
                async with session.post(
                    f"{via.url}/v1/completions",
                    json={"model": "org/m", "prompt": "x", "max_tokens": 2},
                ) as r:
                    await r.read()
                    return r.status

            statuses = await asyncio.gather(*(one(r) for r in [other] * 20 + [owner] * 20))
            assert statuses == [200] * 40
            assert owner.state("org/m") == "awake" and other.state("org/m") == "awake"

            # Prometheus gone: fail safe, nothing is slept.
            prom.stop()
            clock.advance(3600)
            assert await owner.reconcile() == []
            assert owner.server.metrics.registry.get_sample_value("kvsleep_policy_source_up") == 0

        stats = sim.sim.stats()
        assert not stats["hazards"], stats["hazards"]
        assert stats["requests"]["served_while_not_awake"] == 0
        wakes = stats["calls"].get("/wake_up", 0) + stats["calls"].get(
            "/resume_memory_occupation", 0
        )
        assert wakes == 1
    finally:
        for kv in replicas:
            await kv.close()


async def _until(predicate) -> None:
    while not predicate():
        await asyncio.sleep(0.02)
