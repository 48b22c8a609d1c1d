"""What the pure core knows of an engine: what a probe saw, and the calls a sleep or wake is made
of. Adapters (kvsleep/engines) produce these; the core never talks to an engine itself."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Observation:
    """What a probe learned. `asleep` is None where the engine cannot tell (SGLang);
    `incarnation` names the process that answered (None where it cannot be told)."""

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


@dataclass(frozen=True)
class EngineSteps:
    """What the state machine needs to know of an engine's flavor (from its adapter)."""

    sleep: tuple[Step, ...]
    wake: tuple[Step, ...]
    observable: bool  # its probes say whether it is asleep
