"""The reconcile loop: observe every engine, ask the policy what to do, have the manager do it.

Like a Kubernetes controller, each pass compares what should be with what is and converges,
idempotently: a missed pass, a restart of kvsleep or an engine restarted behind its back is healed
by the next pass, not by special cases. It changes nothing itself: observations go to each
engine's state machine and decisions to the manager, through the small `Engines` protocol.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from typing import Protocol

from kvsleep.control.policy_source import FleetTraffic, PrometheusSource
from kvsleep.core import policy
from kvsleep.core.engine_facts import Observation

log = logging.getLogger(__name__)

# Probes run concurrently but bounded, so 1,000 models do not open 1,000 sockets at once.
MAX_CONCURRENT_PROBES = 64


class Probe(Protocol):
    """One engine as the loop sees it."""

    @property
    def name(self) -> str: ...
    @property
    def served_name(self) -> str:
        """The model clients name (the fleet's traffic is per model, not per engine)."""
        ...

    @property
    def version(self) -> int: ...
    @property
    def check_interval(self) -> float: ...
    @property
    def probe_now(self) -> bool:
        """Settled, not in an operation, not a launched engine without a process."""

    async def observe(self) -> Observation: ...


class Engines(Protocol):
    """What the loop needs of the manager."""

    def probes(self) -> Iterable[Probe]: ...
    def default_interval(self) -> float: ...
    def clock(self) -> float: ...
    def observe(
        self, model: str, observed: Observation, version: int | None = None
    ) -> list[policy.Adopt]: ...
    def views(
        self,
        probed: list[tuple[str, Observation]],
        fleet: dict[str, FleetTraffic],
        fleet_mode: bool,
    ) -> list[policy.ModelView]: ...
    async def scale(self, now: float, fleet: dict[str, FleetTraffic]) -> list[policy.Action]: ...
    def apply(self, action: policy.Action, now: float) -> None: ...
    def reconcile_failed(self) -> None: ...
    def reconcile_took(self, seconds: float) -> None: ...


class Reconciler:
    def __init__(self, engines: Engines, source: PrometheusSource | None = None) -> None:
        self.engines = engines
        self.source = source
        self._probe_slots = asyncio.Semaphore(MAX_CONCURRENT_PROBES)

    def interval(self) -> float:
        """The shortest check interval in force; checking a model early is harmless."""
        return min(
            [self.engines.default_interval(), *(p.check_interval for p in self.engines.probes())]
        )

    async def tick(self) -> list[policy.Action]:
        """One pass; returns the actions it took (for tests and logs)."""
        started = time.perf_counter()
        engines = self.engines
        probes = [p for p in engines.probes() if p.probe_now]
        versions = [p.version for p in probes]
        observations = await asyncio.gather(*(self._observe(p) for p in probes))
        fleet = (
            await self.source.fleet_traffic({p.served_name for p in probes})
            if self.source is not None
            else {}
        )
        healed: list[policy.Action] = []
        for probe, version, obs in zip(probes, versions, observations, strict=True):
            healed += engines.observe(probe.name, obs, version)
        probed = [(p.name, obs) for p, obs in zip(probes, observations, strict=True)]
        now = engines.clock()
        actions = policy.decide(engines.views(probed, fleet, self.source is not None), now)
        actions += await engines.scale(now, fleet)
        for action in actions:
            try:
                engines.apply(action, now)
            except Exception:
                engines.reconcile_failed()
                log.exception("reconcile action %s failed", action)
        engines.reconcile_took(time.perf_counter() - started)
        return healed + actions

    async def _observe(self, probe: Probe) -> Observation:
        async with self._probe_slots:
            return await probe.observe()

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval())
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception:
                self.engines.reconcile_failed()
                log.exception("reconcile pass failed")
