"""Sleep policy as pure functions of (observed state, traffic, config, now) -> decisions.

Nothing here does I/O or reads a clock: the reconciler and the request path feed it facts and
carry out what it returns, so every rule is testable with plain values.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from kvsleep.config import SleepPolicy
from kvsleep.engines.base import Observation
from kvsleep.sleep_state import ModelState, StoredModel


@dataclass(frozen=True)
class ModelView:
    """One model as the reconciler sees it at one instant."""

    name: str
    state: ModelState
    state_since: float
    version: int
    busy: bool
    in_flight: int
    held: int
    last_activity: float
    policy: SleepPolicy
    always_on: bool
    engine_up: bool | None
    observation: Observation | None = None
    slept_at: float | None = None
    deferred_wake: str | None = None
    owned: bool = True
    sleep_allowed: bool = True


@dataclass(frozen=True)
class Sleep:
    model: str
    reason: str


@dataclass(frozen=True)
class Wake:
    model: str
    reason: str


@dataclass(frozen=True)
class Adopt:
    """Take the engine's word for its state: it changed behind our back."""

    model: str
    state: ModelState
    why: str
    version: int


Action = Sleep | Wake | Adopt


def idle_seconds(view: ModelView, now: float) -> float:
    """Idle time counts from the last request's end, or from when the model last woke."""
    if view.in_flight or view.held:
        return 0.0
    awake_since = view.state_since if view.state is ModelState.AWAKE else 0.0
    return max(0.0, now - max(view.last_activity, awake_since))


def sleep_candidate(view: ModelView, now: float) -> bool:
    """Awake, not pinned, nothing in flight, idle past its threshold and the anti-flap floor."""
    return (
        view.state is ModelState.AWAKE
        and view.owned
        and view.sleep_allowed
        and not view.always_on
        and not view.busy
        and idle_seconds(view, now) >= view.policy.idle_threshold_seconds
        and now - view.state_since >= view.policy.min_awake_seconds
    )


def heal(view: ModelView) -> Adopt | None:
    """Reconcile belief with what the engine says, where the engine can say anything."""
    obs = view.observation
    if view.busy or obs is None or not obs.up:
        return None
    if not view.owned:
        # Another replica sleeps this engine; between its peers' drain and its sleep call the
        # engine still says "awake", so only the owner's word makes this replica forward again.
        if obs.asleep is True and view.state is ModelState.AWAKE:
            return Adopt(view.name, ModelState.ASLEEP, "engine reports it is asleep",
                         view.version)
        return None
    if obs.asleep is True and view.state in (ModelState.AWAKE, ModelState.FAILED):
        return Adopt(view.name, ModelState.ASLEEP, "engine reports it is asleep", view.version)
    if obs.asleep is False and view.state in (ModelState.ASLEEP, ModelState.FAILED):
        return Adopt(view.name, ModelState.AWAKE, "engine reports it is awake", view.version)
    if obs.asleep is None and view.state is ModelState.ASLEEP and view.engine_up is False:
        # An engine that cannot report its sleep state and was unreachable has restarted:
        # a fresh process holds its memory again.
        return Adopt(view.name, ModelState.AWAKE, "engine came back after being down",
                     view.version)
    return None


def decide(views: list[ModelView], now: float) -> list[Action]:
    """One reconcile pass: heal drift first, then due deferred wakes, then idle sleeps."""
    actions: list[Action] = []
    for view in views:
        if view.busy:
            continue
        adopt = heal(view)
        if adopt is not None:
            actions.append(adopt)
        elif (view.deferred_wake and view.state is ModelState.ASLEEP
              and now >= wake_allowed_at(view)):
            actions.append(Wake(view.name, view.deferred_wake))
        elif view.policy.auto_sleep_enabled and sleep_candidate(view, now):
            actions.append(Sleep(view.name, "idle"))
    return actions


def wake_allowed_at(view: ModelView) -> float:
    """`min_sleep_duration` delays wakes nobody's request asked for (manual, alert)."""
    return (view.slept_at or 0.0) + view.policy.min_sleep_duration


class Admission(enum.Enum):
    ADMIT = "admit"
    HOLD = "hold"
    REJECT_QUEUE_FULL = "queue_full"
    REJECT_NO_WAKE = "asleep_no_wake"


def admission(state: ModelState, held: int, policy: SleepPolicy) -> Admission:
    """What to do with a request that arrives for a model in `state` with `held` waiting."""
    if state is ModelState.AWAKE:
        return Admission.ADMIT
    if not policy.wakeup_on_request and state is not ModelState.WAKING:
        return Admission.REJECT_NO_WAKE
    if held >= policy.max_held_requests:
        return Admission.REJECT_QUEUE_FULL
    return Admission.HOLD


def initial_state(obs: Observation, stored: StoredModel | None) -> ModelState:
    """What to believe at start-up: the engine's word where it has one, else our record.

    A record of an interrupted sleep counts as asleep (the engine finishes a call its client
    dropped); an interrupted drain never reached the engine; an interrupted wake must be
    finished (WAKING) before anything is forwarded.
    """
    if obs.up and obs.asleep is not None:
        return ModelState.ASLEEP if obs.asleep else ModelState.AWAKE
    if stored is None:
        return ModelState.AWAKE
    if stored.state in (ModelState.ASLEEP, ModelState.SLEEPING):
        return ModelState.ASLEEP
    if stored.state is ModelState.WAKING:
        return ModelState.WAKING
    if stored.state is ModelState.FAILED:
        return ModelState.FAILED
    return ModelState.AWAKE
