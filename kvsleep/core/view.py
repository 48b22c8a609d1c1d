"""The policy's view of one engine's state machine: one function, for the live manager and the
replay alike, so the reconciler decides on the same facts in both."""

from __future__ import annotations

from kvsleep.config import SleepPolicy
from kvsleep.core.engine_facts import Observation
from kvsleep.core.machine import EngineMachine
from kvsleep.core.policy import ModelView


def model_view(
    machine: EngineMachine,
    policy: SleepPolicy,
    in_flight: int,
    last_activity: float,
    *,
    observation: Observation | None = None,
    owned: bool = True,
    sleep_allowed: bool = True,
) -> ModelView:
    """`policy` is the one in force (an adaptive threshold filled in); traffic (`in_flight`,
    `last_activity`) is what the caller counts: the machine knows only what reached its engine."""
    cfg = machine.cfg
    return ModelView(
        name=cfg.name,
        state=machine.state,
        state_since=machine.state_since,
        version=machine.version,
        busy=machine.busy,
        in_flight=in_flight,
        held=machine.held,
        last_activity=last_activity,
        policy=policy,
        always_on=cfg.always_on,
        engine_up=machine.engine_up,
        observation=observation,
        slept_at=machine.slept_at,
        deferred_wake=machine.deferred_wake,
        owned=owned,
        sleep_allowed=sleep_allowed,
        sleep_retry_at=machine.sleep_retry_at,
        cannot_sleep=machine.cannot_sleep is not None,
    )
