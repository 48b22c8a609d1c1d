"""Where idle decisions read traffic from: this process, or the whole fleet through Prometheus.

With several kvsleep replicas in front of the same engines, one replica's own counters say
nothing about the others: a model idle here may be busy there. The Prometheus source reads every
replica's last-seen and in-flight series and merges them per model. It fails safe: when
Prometheus is unreachable, answers an error, or its newest sample of a model is older than
`max_staleness_seconds`, that model is not slept (and `kvsleep_policy_source_up` says so).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from dataclasses import dataclass

import aiohttp
from prometheus_client import Gauge

from kvsleep.config import PolicySource

log = logging.getLogger(__name__)

LAST_SEEN = "max by (model) (kvsleep_model_last_request_timestamp_seconds)"
IN_FLIGHT = "sum by (model) (kvsleep_requests_in_flight)"
# Age of the freshest sample per model: a replica that stopped being scraped ages out.
AGE = "min by (model) (time() - timestamp(kvsleep_requests_in_flight))"


@dataclass(frozen=True)
class FleetTraffic:
    last_activity: float
    in_flight: int


class PrometheusSource:
    def __init__(self, config: PolicySource, up: Gauge) -> None:
        assert config.url is not None
        self.config = config
        self.url = config.url.rstrip("/") + "/api/v1/query"
        self.session: aiohttp.ClientSession | None = None
        self.up = up

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()
            self.session = None

    async def fleet_traffic(self, models: Iterable[str]) -> dict[str, FleetTraffic]:
        """Fresh fleet traffic per model; a model missing from the result must not be slept."""
        if self.session is None:
            self.session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.config.query_timeout_seconds)
            )
        try:
            last, flight, age = await asyncio.gather(
                self._query(LAST_SEEN), self._query(IN_FLIGHT), self._query(AGE)
            )
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, KeyError) as exc:
            log.warning(
                "Prometheus policy source %s unusable, no model will be slept: %s",
                self.config.url,
                exc,
            )
            self.up.set(0)
            return {}
        fresh = {m for m, a in age.items() if a <= self.config.max_staleness_seconds}
        result = {
            m: FleetTraffic(last.get(m, 0.0), int(flight.get(m, 0)))
            for m in models
            if m in fresh and m in flight
        }
        self.up.set(1)
        return result

    async def _query(self, promql: str) -> dict[str, float]:
        assert self.session is not None
        async with self.session.get(self.url, params={"query": promql}) as resp:
            body = await resp.json(content_type=None)
        if resp.status != 200 or body.get("status") != "success":
            raise ValueError(f"query {promql!r}: HTTP {resp.status} {body.get('error', '')}")
        return {
            item["metric"].get("model", ""): float(item["value"][1])
            for item in body["data"]["result"]
        }
