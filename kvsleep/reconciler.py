"""The reconcile loop: observe every engine, ask the policy what to do, have the manager do it.

Like a Kubernetes controller, each pass compares what should be with what is and converges,
idempotently: a missed pass, a restart of kvsleep or an engine restarted behind its back is healed
by the next pass, not by special cases.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from kvsleep import policy
from kvsleep.engines.base import EngineAdapter, Observation
from kvsleep.policy_source import PrometheusSource
from kvsleep.sleep_state import ModelState

if TYPE_CHECKING:
    from kvsleep.sleep_manager import SleepManager

log = logging.getLogger(__name__)

# Probes run concurrently but bounded, so 1,000 models do not open 1,000 sockets at once.
MAX_CONCURRENT_PROBES = 64


class Reconciler:
    def __init__(self, manager: SleepManager) -> None:
        self.manager = manager
        self.source: PrometheusSource | None = None
        self._probe_slots = asyncio.Semaphore(MAX_CONCURRENT_PROBES)

    def interval(self) -> float:
        """The shortest check interval in force; checking a model early is harmless."""
        intervals = [s.cfg.policy.check_interval_seconds for s in self.manager.slots.values()]
        return min([self.manager.config.check_interval_seconds, *intervals])

    async def sync(self) -> None:
        """Before serving: believe each engine's word where it has one, the state file otherwise."""
        stored = self.manager.state_store.load() if self.manager.state_store else {}
        # A launched engine being started is the launcher's: nothing to probe or adopt yet.
        slots = [s for s in self.manager.slots.values() if s.state is not ModelState.STARTING]
        observations = await asyncio.gather(
            *(
                self._observe(
                    s.adapter,
                    stored[s.cfg.name].state if s.cfg.name in stored else ModelState.AWAKE,
                )
                for s in slots
            )
        )
        for slot, obs in zip(slots, observations, strict=True):
            record = stored.get(slot.cfg.name)
            if record is not None and record.url != slot.cfg.url:
                record = None  # a record of another engine says nothing about this one
            state = policy.initial_state(obs, record)
            slot.engine_up = obs.up
            slot.want_awake = state is not ModelState.ASLEEP
            if state is ModelState.ASLEEP:
                slot.slept_at = record.since if record else self.manager.clock()
            slot.state = state
            slot.state_since = self.manager.clock()
            log.info(
                "model %s: engine %s, starting as %s",
                slot.cfg.name,
                "up" if obs.up else f"down ({obs.detail})",
                state.value,
            )
        await asyncio.gather(
            *(
                self.manager.finish_interrupted_wake(s)
                for s in slots
                if s.state is ModelState.WAKING
            )
        )
        await self.manager.flush()

    async def tick(self) -> list[policy.Action]:
        """One pass; returns the actions it took (for tests and logs)."""
        started = time.perf_counter()
        manager = self.manager
        slots = [
            s
            for s in manager.slots.values()
            if not s.busy and s.state is not ModelState.STARTING and not s.stopped
        ]
        versions = [s.version for s in slots]
        observations = await asyncio.gather(*(self._observe(s.adapter, s.state) for s in slots))
        fleet = (
            await self.source.fleet_traffic(s.cfg.name for s in slots)
            if self.source is not None
            else {}
        )
        views = []
        for slot, version, obs in zip(slots, versions, observations, strict=True):
            if slot.version != version or manager.slots.get(slot.cfg.name) is not slot:
                continue  # changed while we probed: judge it next pass
            views.append(
                manager.view(
                    slot, obs, fleet.get(slot.cfg.name), fleet_mode=self.source is not None
                )
            )
            previous_up, slot.engine_up = slot.engine_up, obs.up
            if previous_up and not obs.up:
                log.warning("model %s: engine unreachable: %s", slot.cfg.name, obs.detail)
            if previous_up is False and obs.up:
                slot.reset_sleep_backoff()  # back after being down: maybe restarted, new flags
        now = manager.clock()
        manager.thresholds.keep_only(manager.slots)
        actions = policy.decide(views, now)
        for action in actions:
            if isinstance(action, policy.Sleep):
                # An adaptive threshold judges its sleeps by when the next request comes.
                manager.thresholds.note_sleep(action.model, now)
            try:
                self._apply(action)
            except Exception:
                manager.metrics.reconcile_errors.inc()
                log.exception("reconcile action %s failed", action)
        manager.metrics.reconcile_duration.observe(time.perf_counter() - started)
        return actions

    def _apply(self, action: policy.Action) -> None:
        if isinstance(action, policy.Adopt):
            self.manager.adopt(action)
        elif isinstance(action, policy.Sleep):
            log.info("model %s is idle; putting it to sleep", action.model)
            self.manager.request_sleep(action.model, action.reason)
        elif isinstance(action, policy.Wake):
            self.manager.request_wake(action.model, action.reason)

    async def _observe(self, adapter: EngineAdapter, believed: ModelState) -> Observation:
        async with self._probe_slots:
            return await adapter.observe(believed)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval())
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception:
                self.manager.metrics.reconcile_errors.inc()
                log.exception("reconcile pass failed")
