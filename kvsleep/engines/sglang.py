"""SGLang: release/resume memory occupation, then reload weights from disk."""

from __future__ import annotations

from kvsleep.core.engine_facts import Observation, Step
from kvsleep.engines.base import EngineAdapter, EngineError, SleepUnsupported
from kvsleep.sleep_state import ModelState

RELEASE = Step("release", idempotent=False)
RESUME = Step("resume", idempotent=False)
RELOAD_WEIGHTS = Step("reload_weights", idempotent=True)


class SGLangAdapter(EngineAdapter):
    """Release and resume are not idempotent (a second release or a resume without a release
    kills the scheduler), so a call that may have reached the engine is never repeated; only
    refused connections and explicit 5xx answers are. The state machine identifies the process
    before each of them and records it, so a resume never reaches a fresh process.

    Observation never touches /health: on SGLang it runs a forward pass, which on released memory
    is a crash. /server_info answers from the tokenizer manager without touching the GPU.
    """

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
        seen = await self.reachable("/server_info")
        if seen.up and seen.detail == "HTTP 404":
            seen = await self.reachable("/get_server_info")
        return Observation(up=seen.up, asleep=None, detail=seen.detail)
