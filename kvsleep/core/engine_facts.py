"""What the pure core knows of an engine: what a probe saw, and the calls a sleep or wake is made
of. Adapters (kvsleep/engines) produce these; the core never talks to an engine itself."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Observation:
    """What a probe learned. `asleep` is None where the engine cannot tell (SGLang).

    `incarnation` names the engine process that answered, as an opaque string to compare for
    equality: a different one is a fresh process (awake, holding its memory), the same one after
    an unreachable spell is the same process (paused, or a network blip). None where nothing
    answered or the engine cannot tell (a vLLM without process metrics), which leaves callers with
    what they had before incarnations: an engine unreachable in between may have been replaced.
    """

    up: bool
    asleep: bool | None = None
    detail: str = ""
    incarnation: str | None = None


@dataclass(frozen=True)
class Step:
    """One engine call of a sleep or a wake. A step that is not idempotent must never be
    repeated or sent to another process than the one it was meant for."""

    name: str
    idempotent: bool
    touches_engine: bool = True  # False: a step between kvsleep replicas, not an engine call


@dataclass(frozen=True)
class EngineSteps:
    """What the state machine needs to know of an engine's flavor (from its adapter)."""

    sleep: tuple[Step, ...]
    wake: tuple[Step, ...]
    observable: bool  # its probes say whether it is asleep
