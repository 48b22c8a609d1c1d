"""Several kvsleep replicas in front of the same engines, without a request ever meeting an
engine that is not awake.

Each model has one owner among the replicas (rendezvous hashing, so every replica agrees without
talking). Only the owner sleeps or wakes the engine:
- The owner sleeps a model only after every peer has drained it and holds new requests for it
  (the peer's own `POST /models/{m}/sleep?from=owner`, answered once it is drained). A peer that
  cannot drain in time makes the sleep fail, and the model stays awake.
- A peer that holds requests for a model it does not own asks the owner to wake it
  (`POST /models/{m}/wake?reason=request`, answered once the engine is awake) and forwards them
  only then. A peer never takes an engine probe's word that a model is awake: only its owner's.
If the owner is unreachable, its models cannot be slept (nothing changes) and a peer's wake
fails like any failed wake (503 naming the model); the engine is never touched by two replicas.
"""

from __future__ import annotations

import asyncio
import hashlib
import urllib.parse
from collections.abc import Sequence

import aiohttp

from kvsleep.config import FleetConfig
from kvsleep.core.engine_facts import Observation, Step
from kvsleep.core.states import ModelState
from kvsleep.engines.base import EngineAdapter, EngineError


def owner_of(model: str, fleet: FleetConfig) -> str | None:
    """The replica URL that owns `model`; None when there is no fleet."""
    if not fleet.peers or fleet.self_url is None:
        return None
    replicas = [fleet.self_url, *fleet.peers]
    return max(replicas, key=lambda url: hashlib.sha256(f"{model}\0{url}".encode()).digest())


class _FleetAdapter(EngineAdapter):
    """Wraps the engine's own adapter; observing the engine is still the engine's business."""

    def __init__(self, inner: EngineAdapter, token: str | None) -> None:
        super().__init__(inner.model, inner.sessions, inner.retry)
        self.inner = inner
        self.observable = inner.observable
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}

    @property
    def pinned_incarnation(self) -> str | None:
        """The inner adapter's: its observations are the ones that report it."""
        return self.inner.pinned_incarnation

    @pinned_incarnation.setter
    def pinned_incarnation(self, value: str | None) -> None:
        self.inner.pinned_incarnation = value

    async def observe(self, believed: ModelState) -> Observation:
        return await self.inner.observe(believed)

    async def load(self) -> int | None:
        return await self.inner.load()

    async def ask(self, replica: str, verb: str, query: dict[str, str], timeout: float) -> None:
        name = urllib.parse.quote(self.model.name, safe="")
        url = f"{replica}/models/{name}/{verb}"
        try:
            async with self.session.post(
                url,
                params=query,
                headers=self.headers,
                timeout=aiohttp.ClientTimeout(total=timeout),
            ) as resp:
                body = await resp.json(content_type=None)
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
            raise EngineError(
                f"replica {replica}: {verb} failed: {exc!r}", retryable=False
            ) from exc
        if resp.status != 200 or not (isinstance(body, dict) and body.get("success")):
            message = body.get("message") if isinstance(body, dict) else body
            raise EngineError(f"replica {replica}: {verb} refused (HTTP {resp.status}): {message}")


PEERS_DRAIN = Step("peers_drain", idempotent=True, touches_engine=False)
DRAINED_FOR_OWNER = Step("drained_for_owner", idempotent=True, touches_engine=False)
OWNER_WAKE = Step("owner_wake", idempotent=True, touches_engine=False)


class OwnerAdapter(_FleetAdapter):
    """The owner has its peers drain the model first, then puts the engine to sleep itself."""

    def __init__(self, inner: EngineAdapter, token: str | None, peers: Sequence[str]) -> None:
        super().__init__(inner, token)
        self.peers = tuple(peers)

    @property
    def sleep_steps(self) -> tuple[Step, ...]:
        return (PEERS_DRAIN, *self.inner.sleep_steps)

    @property
    def wake_steps(self) -> tuple[Step, ...]:
        return self.inner.wake_steps

    async def run(self, step: Step) -> None:
        if step != PEERS_DRAIN:
            await self.inner.run(step)
            return
        timeout = self.retry.sleep_timeout_seconds
        await asyncio.gather(
            *(self.ask(peer, "sleep", {"from": "owner"}, timeout) for peer in self.peers)
        )


class MemberAdapter(_FleetAdapter):
    """A member only drains for the owner's sleep, and asks the owner for wakes."""

    sleep_steps = (DRAINED_FOR_OWNER,)
    wake_steps = (OWNER_WAKE,)

    def __init__(self, inner: EngineAdapter, token: str | None, owner: str) -> None:
        super().__init__(inner, token)
        self.owner = owner

    async def run(self, step: Step) -> None:
        if step == OWNER_WAKE:
            await self.ask(
                self.owner, "wake", {"reason": "request"}, self.retry.wake_timeout_seconds
            )
