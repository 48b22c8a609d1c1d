"""vLLM: /sleep and /wake_up (dev mode), observable through /is_sleeping."""

from __future__ import annotations

import asyncio

import aiohttp

from kvsleep.core.engine_facts import Observation, Step
from kvsleep.core.states import ModelState
from kvsleep.engines.base import EngineAdapter, EngineError, SleepUnsupported

_NO_DEV_MODE = (
    "sleep routes are missing (404): start vLLM with VLLM_SERVER_DEV_MODE=1 and --enable-sleep-mode"
)
_START = "process_start_time_seconds"
_RUNNING, _WAITING = "vllm:num_requests_running", "vllm:num_requests_waiting"
_NO_SLEEP = (
    "vLLM has no sleep route (POST /sleep answered {status}): start it with "
    "VLLM_SERVER_DEV_MODE=1 and, on GPUs, --enable-sleep-mode; kvsleep stops putting "
    "this model to sleep until a reload or an engine restart"
)


# Every vLLM call is idempotent: a repeated /sleep or /wake_up answers 200 and does no harm.
SLEEP = Step("sleep", idempotent=True)
WAKE_UP = Step("wake_up", idempotent=True)
WAKE_WEIGHTS = Step("wake_up_weights", idempotent=True)
RELOAD_WEIGHTS = Step("reload_weights", idempotent=True)
WAKE_KV_CACHE = Step("wake_up_kv_cache", idempotent=True)


class VLLMAdapter(EngineAdapter):
    """vLLM's wake calls are idempotent, so timeouts and 5xx are retried.

    `mode=wait` makes vLLM itself drain anything that slipped past our own drain instead of
    aborting it (the default `abort` would cut a stream). A sleep that times out is not repeated:
    held requests are waiting, and `/is_sleeping` tells the manager how it ended.
    """

    observable = True
    pressure_metrics = (_WAITING, "vllm:kv_cache_usage_perc")  # usage is 0 to 1 despite its name

    @property
    def sleep_steps(self) -> tuple[Step, ...]:
        return (SLEEP,)

    @property
    def wake_steps(self) -> tuple[Step, ...]:
        if self.model.sleep_level == 2:
            # Level 2 discarded the weights: restore them, reload from disk, then the KV cache.
            return (WAKE_WEIGHTS, RELOAD_WEIGHTS, WAKE_KV_CACHE)
        return (WAKE_UP,)

    async def run(self, step: Step) -> None:
        timeout = self.retry.wake_timeout_seconds
        if step == SLEEP:
            await self._sleep()
        elif step == WAKE_UP:
            await self._wake_up(timeout, None)
        elif step == WAKE_WEIGHTS:
            await self._wake_up(timeout, [("tags", "weights")])
        elif step == RELOAD_WEIGHTS:
            resp = await self.call(
                "POST",
                "/collective_rpc",
                json={"method": "reload_weights"},
                timeout=timeout,
                retry_on_timeout=True,
            )
            if resp is None:
                raise EngineError("POST /collective_rpc is missing (404): cannot reload weights")
        elif step == WAKE_KV_CACHE:
            await self._wake_up(timeout, [("tags", "kv_cache")])
        else:
            raise ValueError(f"vLLM has no step {step.name!r}")

    async def _sleep(self) -> None:
        level = self.model.sleep_level
        try:
            resp = await self.call(
                "POST",
                "/sleep",
                params={"level": str(level), "mode": "wait"},
                timeout=self.retry.sleep_timeout_seconds,
            )
        except EngineError as exc:
            if exc.status == 405:
                raise SleepUnsupported(_NO_SLEEP.format(status=405), status=405) from exc
            raise
        if resp is None:
            raise SleepUnsupported(_NO_SLEEP.format(status=404), status=404)

    async def _wake_up(self, timeout: float, params: list[tuple[str, str]] | None) -> None:
        resp = await self.call(
            "POST", "/wake_up", params=params, timeout=timeout, retry_on_timeout=True
        )
        if resp is None:
            raise EngineError(_NO_DEV_MODE)
        try:
            body = await resp.json(content_type=None)
        except ValueError:
            body = None  # before 0.33 the answer is empty
        if params is None and isinstance(body, dict) and body.get("status") == "sleeping":
            raise EngineError("engine still reports it is sleeping after wake_up", retryable=True)

    async def observe(self, believed: ModelState) -> Observation:
        seen, metrics = await asyncio.gather(self._sleep_state(), self.get("/metrics"))
        if not seen.up:
            return seen
        start = metrics.metric_sums((_START,)).get(_START)
        reported = None if start is None else f"vllm:{start!r}"
        return Observation(
            up=True, asleep=seen.asleep, detail=seen.detail, incarnation=self.identify(reported)
        )

    async def load(self) -> int | None:
        sums = (await self.get("/metrics")).metric_sums((_RUNNING, _WAITING))
        return round(sum(sums.values())) if sums else None

    async def _sleep_state(self) -> Observation:
        try:
            async with self.session.get(
                self.base_url + "/is_sleeping",
                timeout=aiohttp.ClientTimeout(total=self.retry.probe_timeout_seconds),
            ) as resp:
                if resp.status == 404:
                    return await self.reachable("/health")
                if resp.status != 200:
                    return Observation(up=False, detail=f"/is_sleeping HTTP {resp.status}")
                body = await resp.json(content_type=None)
                return Observation(up=True, asleep=bool(body.get("is_sleeping")))
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError, AttributeError) as exc:
            return Observation(up=False, detail=str(exc) or type(exc).__name__)
