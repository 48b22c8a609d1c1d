"""The adapter interface and the HTTP plumbing (timeouts, bounded retries) adapters share."""

from __future__ import annotations

import asyncio
import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families
from tenacity import (
    AsyncRetrying,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential,
)

from kvsleep.config import ModelConfig
from kvsleep.core.engine_facts import EngineSteps, Observation, Step
from kvsleep.core.states import ModelState


class EngineError(Exception):
    """An engine call failed. `retryable` is true only when repeating it cannot do harm;
    `status` is the engine's HTTP status where it answered one."""

    def __init__(
        self,
        message: str,
        *,
        retryable: bool = False,
        status: int | None = None,
        maybe_applied: bool = False,
    ) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.status = status
        self.maybe_applied = maybe_applied
        """True when the call may have taken effect (no answer in time, a cut connection): its
        outcome is unknown, not failed. An engine's own error answer (4xx, 5xx) is a failure."""


class SleepUnsupported(EngineError):
    """The engine has no sleep route (404/405): asking again cannot help until it is restarted
    with other flags, so the model is marked "cannot sleep" instead of retried."""


@dataclass(frozen=True)
class Probe:
    """One GET of a route that is safe in every state; `status` is None when nothing answered."""

    status: int | None
    body: bytes = b""
    detail: str = ""

    @property
    def up(self) -> bool:
        return self.status is not None and self.status < 500

    def json(self) -> Any:
        """The body as JSON; None where the engine did not answer 200 with JSON."""
        if self.status != 200:
            return None
        try:
            return json.loads(self.body)
        except ValueError:
            return None

    def metric_sums(self, names: Collection[str]) -> dict[str, float]:
        """`metric_sums` of a /metrics answer; empty where it failed or does not parse."""
        if self.status != 200:
            return {}
        try:
            return metric_sums(self.body.decode(errors="replace"), names)
        except ValueError:
            return {}


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 3
    initial_wait_seconds: float = 0.2
    max_wait_seconds: float = 5.0
    probe_timeout_seconds: float = 5.0
    sleep_timeout_seconds: float = 60.0
    wake_timeout_seconds: float = 600.0


SessionSource = Callable[[], aiohttp.ClientSession]


class EngineAdapter(ABC):
    """Sleep, wake and observe one engine. Callers guarantee one operation at a time.

    A sleep and a wake are each a sequence of steps (`sleep_steps`, `wake_steps`), run one by one
    with `run`, so that the state machine can record each step that must not be repeated before
    and after it is made (core/machine.py).
    """

    observable = False
    """Whether `observe` reveals the sleep state. If not, only kvsleep's state file knows it, and
    the file must be written before each engine call, on the wake path too."""

    pinned_incarnation: str | None = None
    """Set by whoever launched the engine (its PID and start time): the incarnation observations
    report when the engine answers without naming one itself."""

    pressure_metrics: tuple[str, str] | None = None
    """The engine's own gauges of requests waiting and KV cache usage (0 to 1), which the
    scaler's `target_queue` and `target_kv_cache_usage` weigh; None: it has none."""

    def __init__(self, model: ModelConfig, sessions: SessionSource, retry: RetryPolicy) -> None:
        self.model = model
        self.sessions = sessions
        self.retry = retry
        self.base_url = model.url.rstrip("/")

    @property
    def session(self) -> aiohttp.ClientSession:
        """The shared control session, looked up per call: it is created inside the event loop,
        after models may already have been added."""
        return self.sessions()

    @property
    @abstractmethod
    def sleep_steps(self) -> tuple[Step, ...]: ...

    @property
    @abstractmethod
    def wake_steps(self) -> tuple[Step, ...]: ...

    @property
    def steps(self) -> EngineSteps:
        return EngineSteps(self.sleep_steps, self.wake_steps, self.observable)

    @abstractmethod
    async def run(self, step: Step) -> None:
        """Make one step's call; raises EngineError (SleepUnsupported for a missing route)."""

    async def sleep(self) -> None:
        """Free the engine's GPU memory (every sleep step). Called only when it is idle."""
        for step in self.sleep_steps:
            await self.run(step)

    async def wake(self) -> None:
        """Make the engine fully able to serve again (weights reloaded where needed)."""
        for step in self.wake_steps:
            await self.run(step)

    @abstractmethod
    async def observe(self, believed: ModelState) -> Observation:
        """Probe without harming the engine in the state we believe it is in."""

    async def load(self) -> int | None:
        """Requests the engine itself has running or waiting, asked right before a sleep so that
        work kvsleep does not know of (a request whose client left but which still generates,
        traffic that bypassed kvsleep) is drained too. None where the engine cannot tell or does
        not answer: the caller then has only its own count."""
        return None

    async def pressure(self) -> tuple[float | None, float | None]:
        """(requests waiting, KV cache usage) as the awake engine reports them; None for what it
        does not (asked only where the model's scaling targets them)."""
        if self.pressure_metrics is None:
            return None, None
        queue, usage = self.pressure_metrics
        sums = (await self.get("/metrics")).metric_sums(self.pressure_metrics)
        return sums.get(queue), sums.get(usage)

    def identify(self, reported: str | None) -> str | None:
        """The incarnation of a process that answered: its own word, else the launcher's."""
        return reported or self.pinned_incarnation

    async def call(
        self,
        method: str,
        path: str,
        *,
        timeout: float,
        json: Any = None,
        params: Any = None,
        retry_on_timeout: bool = False,
        retry_on_5xx: bool = True,
    ) -> aiohttp.ClientResponse | None:
        """One control call with bounded exponential retries; returns None on a 404.

        A refused connection never reached the engine, so it is always retried; a 5xx or a
        timeout may have taken effect, so the adapter says whether repeating is safe.
        """
        async for attempt in AsyncRetrying(
            stop=stop_after_attempt(self.retry.attempts),
            wait=wait_exponential(
                multiplier=self.retry.initial_wait_seconds, max=self.retry.max_wait_seconds
            ),
            retry=retry_if_exception(lambda e: isinstance(e, EngineError) and e.retryable),
            reraise=True,
        ):
            with attempt:
                return await self._call_once(
                    method,
                    path,
                    timeout=timeout,
                    json=json,
                    params=params,
                    retry_on_timeout=retry_on_timeout,
                    retry_on_5xx=retry_on_5xx,
                )
        raise AssertionError("unreachable")

    async def _call_once(
        self,
        method: str,
        path: str,
        *,
        timeout: float,
        json: Any,
        params: Any,
        retry_on_timeout: bool,
        retry_on_5xx: bool,
    ) -> aiohttp.ClientResponse | None:
        url = self.base_url + path
        try:
            async with self.session.request(
                method,
                url,
                json=json,
                params=params,
                timeout=aiohttp.ClientTimeout(total=timeout),
            ) as resp:
                await resp.read()
        except aiohttp.ClientConnectorError as exc:
            raise EngineError(f"{method} {path}: cannot connect ({exc})", retryable=True) from exc
        except asyncio.TimeoutError as exc:
            raise EngineError(
                f"{method} {path}: no answer within {timeout:g}s",
                retryable=retry_on_timeout,
                maybe_applied=True,
            ) from exc
        except aiohttp.ClientError as exc:
            raise EngineError(
                f"{method} {path}: {exc}", retryable=retry_on_timeout, maybe_applied=True
            ) from exc
        if resp.status == 404:
            return None
        if resp.status >= 500:
            raise EngineError(
                f"{method} {path}: HTTP {resp.status}", retryable=retry_on_5xx, status=resp.status
            )
        if resp.status >= 400:
            raise EngineError(
                f"{method} {path}: HTTP {resp.status} {await resp.text()}", status=resp.status
            )
        return resp

    async def get(self, path: str) -> Probe:
        """GET a route that is safe in every state, once, within the probe timeout."""
        try:
            async with self.session.get(
                self.base_url + path,
                timeout=aiohttp.ClientTimeout(total=self.retry.probe_timeout_seconds),
            ) as resp:
                return Probe(resp.status, await resp.read(), f"HTTP {resp.status}")
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            return Probe(None, detail=str(exc) or type(exc).__name__)

    async def reachable(self, path: str) -> Observation:
        """A probe of a route that is safe in every state; down on any transport failure."""
        probe = await self.get(path)
        up = probe.up
        return Observation(
            up=up, detail=probe.detail, incarnation=self.identify(None) if up else None
        )


def metric_sums(text: str, names: Collection[str]) -> dict[str, float]:
    """The sum over every series of each named sample in a Prometheus text exposition (engines
    label theirs by model, engine or data-parallel rank); names the text lacks are left out.
    Raises ValueError where the text does not parse.

    Only the sample lines of the named metrics go to the parser: each line of the format stands
    alone, and a real vLLM's /metrics (about 600 lines, 50 KB) took the parser 8 ms of event loop
    per probe here, its few wanted lines 0.2 ms."""
    wanted = tuple(names)
    lines = "\n".join(line for line in text.splitlines() if line.startswith(wanted))
    sums: dict[str, float] = {}
    for family in text_string_to_metric_families(lines):
        for sample in family.samples:
            if sample.name in names:
                sums[sample.name] = sums.get(sample.name, 0.0) + sample.value
    return sums
