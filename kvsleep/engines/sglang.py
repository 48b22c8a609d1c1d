"""SGLang: release/resume memory occupation, then reload weights from disk."""

from __future__ import annotations

from typing import Any

from kvsleep.core.engine_facts import Observation, Step
from kvsleep.core.states import ModelState
from kvsleep.engines.base import EngineAdapter, EngineError, Probe, SleepUnsupported

RELEASE = Step("release", idempotent=False)
RESUME = Step("resume", idempotent=False)
RELOAD_WEIGHTS = Step("reload_weights", idempotent=True)


class SGLangAdapter(EngineAdapter):
    """Release and resume are not idempotent (a second release or a resume without a release
    kills the scheduler), so a call that may have reached the engine is never repeated; only
    refused connections and explicit 5xx answers are. The state machine identifies the process
    before each of them and records it, so a resume never reaches a fresh process.

    Observation never touches /health: on SGLang it runs a forward pass, which on released memory
    is a crash. /server_info answers from the tokenizer manager without touching the GPU, and its
    `startup_time` (0.5.x) names the process: a fresh one is awake and holds its memory.
    """

    pressure_metrics = ("sglang:num_queue_reqs", "sglang:token_usage")

    sleep_steps = (RELEASE,)
    # Without --enable-weights-cpu-backup the resumed weights are garbage; reloading is
    # idempotent and cheap enough to do always rather than guess the engine's flags.
    wake_steps = (RESUME, RELOAD_WEIGHTS)

    async def run(self, step: Step) -> None:
        if step == RELEASE:
            await self._release()
        elif step == RESUME:
            await self._resume()
        elif step == RELOAD_WEIGHTS:
            await self._reload_weights()
        else:
            raise ValueError(f"SGLang has no step {step.name!r}")

    async def _release(self) -> None:
        try:
            resp = await self.call(
                "POST",
                "/release_memory_occupation",
                json={},
                timeout=self.retry.sleep_timeout_seconds,
            )
        except EngineError as exc:
            if exc.status == 405:
                raise SleepUnsupported(
                    "POST /release_memory_occupation is not allowed (405)", status=405
                ) from exc
            raise
        if resp is None:
            raise SleepUnsupported("POST /release_memory_occupation is missing (404)", status=404)

    async def _resume(self) -> None:
        resp = await self.call(
            "POST", "/resume_memory_occupation", json={}, timeout=self.retry.wake_timeout_seconds
        )
        if resp is None:
            raise EngineError("POST /resume_memory_occupation is missing (404)")

    async def _reload_weights(self) -> None:
        weights = self.model.weights_path or self.model.name
        resp = await self.call(
            "POST",
            "/update_weights_from_disk",
            json={"model_path": weights},
            timeout=self.retry.wake_timeout_seconds,
            retry_on_timeout=True,
        )
        if resp is None:
            raise EngineError("POST /update_weights_from_disk is missing (404)")
        body = await resp.json(content_type=None)
        if isinstance(body, dict) and body.get("success") is False:
            raise EngineError(
                f"update_weights_from_disk({weights!r}) failed: {body.get('message')}"
            )

    async def observe(self, believed: ModelState) -> Observation:
        info = await self.get("/server_info")
        if info.status == 404:
            info = await self.get("/get_server_info")
        if not info.up:
            return Observation(up=False, detail=info.detail)
        return Observation(
            up=True, detail=info.detail, incarnation=self.identify(startup_time(info.json()))
        )

    async def load(self) -> int | None:
        """`/metrics` needs --enable-metrics; `/get_load` (0.4.x+) answers without it."""
        metrics = await self.get("/metrics")
        sums = metrics.metric_sums((_RUNNING, _QUEUED))
        if sums:
            return round(sum(sums.values()))
        if metrics.status is None:
            return None
        return requests_in(await self.get("/get_load"))


_RUNNING, _QUEUED = "sglang:num_running_reqs", "sglang:num_queue_reqs"


def startup_time(info: Any) -> str | None:
    """The incarnation in a /server_info document: its `startup_time`, or where only the
    data-parallel ranks carry one, all of theirs (a rank restarted alone is a new incarnation)."""
    if not isinstance(info, dict):
        return None
    times = _numbers([info], "startup_time") or _numbers(
        info.get("internal_states"), "startup_time"
    )
    return "sglang:" + ",".join(repr(t) for t in times) if times else None


def requests_in(probe: Probe) -> int | None:
    """Requests in a /get_load answer: one entry per data-parallel rank, whose `num_reqs` counts
    running and waiting requests both (`num_waiting_reqs` is the waiting part of it)."""
    loads = probe.json()
    counts = _numbers([loads] if isinstance(loads, dict) else loads, "num_reqs")
    return None if counts is None else round(sum(counts))


def _numbers(entries: Any, key: str) -> list[float] | None:
    """`key` of every entry of a non-empty list of objects; None unless all are numbers."""
    if not isinstance(entries, list) or not entries:
        return None
    values = [entry.get(key) if isinstance(entry, dict) else None for entry in entries]
    numbers = [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return numbers if len(numbers) == len(values) else None
