"""SGLang: release/resume memory occupation, then reload weights from disk."""

from __future__ import annotations

import errno

import aiohttp

from kvsleep.engines.base import EngineAdapter, EngineError, Observation, SleepUnsupported
from kvsleep.sleep_state import ModelState


class SGLangAdapter(EngineAdapter):
    """Release and resume are not idempotent (a second release or a resume without a release
    kills the scheduler), so a call that may have reached the engine is never repeated; only
    refused connections and explicit 5xx answers are.

    Observation never touches /health: on SGLang it runs a forward pass, which on released memory
    is a crash. /server_info answers from the tokenizer manager without touching the GPU.
    """

    # True between a resume that succeeded and the weight reload that completes the wake: a
    # wake retried after a failed reload must not resume again (that kills the scheduler).
    _resumed = False
    # True once a resume found nothing listening: the process that released its memory is gone,
    # and whatever answers next is a fresh one holding its memory, which a resume would kill.
    _gone = False

    async def sleep(self) -> None:
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
        self._resumed = self._gone = False

    async def wake(self) -> None:
        timeout = self.retry.wake_timeout_seconds
        if not self._resumed and not self._gone:
            try:
                resp = await self.call(
                    "POST", "/resume_memory_occupation", json={}, timeout=timeout
                )
            except EngineError as exc:
                self._gone = _refused(exc)
                raise
            if resp is None:
                raise EngineError("POST /resume_memory_occupation is missing (404)")
            self._resumed = True
        # Without --enable-weights-cpu-backup the resumed weights are garbage; reloading is
        # idempotent and cheap enough to do always rather than guess the engine's flags.
        weights = self.model.weights_path or self.model.name
        resp = await self.call(
            "POST",
            "/update_weights_from_disk",
            json={"model_path": weights},
            timeout=timeout,
            retry_on_timeout=True,
        )
        if resp is None:
            raise EngineError("POST /update_weights_from_disk is missing (404)")
        body = await resp.json(content_type=None)
        if isinstance(body, dict) and body.get("success") is False:
            raise EngineError(
                f"update_weights_from_disk({weights!r}) failed: {body.get('message')}"
            )
        self._resumed = self._gone = False

    async def finish_wake(self) -> None:
        """A previous kvsleep sent the resume: only the weight reload may remain."""
        self._resumed = True
        await self.wake()

    async def observe(self, believed: ModelState) -> Observation:
        seen = await self.reachable("/server_info")
        if seen.up and seen.detail == "HTTP 404":
            seen = await self.reachable("/get_server_info")
        return Observation(up=seen.up, asleep=None, detail=seen.detail)


def _refused(exc: EngineError) -> bool:
    """The call found no process listening (not a timeout, not a network failure)."""
    cause = exc.__cause__
    return (
        isinstance(cause, aiohttp.ClientConnectorError)
        and cause.os_error.errno == errno.ECONNREFUSED
    )
