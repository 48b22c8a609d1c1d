"""Sleep policy as pure functions of (observed state, traffic, config, now) -> decisions.

Nothing here does I/O or reads a clock: the reconciler and the request path feed it facts and
carry out what it returns, so every rule is testable with plain values.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Protocol

from kvsleep.config import SleepPolicy
from kvsleep.core.engine_facts import Observation
from kvsleep.core.states import ModelState


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
    sleep_retry_at: float = 0.0
    cannot_sleep: bool = False


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
    """Awake, not pinned, nothing in flight, idle past its threshold and the anti-flap floor,
    able to sleep and not backing off after a failed sleep."""
    return (
        view.state is ModelState.AWAKE
        and view.owned
        and view.sleep_allowed
        and not view.always_on
        and not view.busy
        and not view.cannot_sleep
        and now >= view.sleep_retry_at
        and idle_seconds(view, now) >= view.policy.idle_threshold_seconds
        and now - view.state_since >= view.policy.min_awake_seconds
    )


def sleep_retry_delay(failures: int, policy: SleepPolicy) -> float:
    """How long idle sleeps wait after `failures` failed sleeps in a row: exponential, capped.

    Without it a model whose sleeps fail is retried at every idle threshold, forever (30 calls
    in 3 minutes at a 5 s threshold), each one a drain that holds the model's requests.
    """
    if failures <= 0:
        return 0.0
    delay = policy.sleep_retry_initial_seconds * 2.0 ** min(failures - 1, 62)
    return min(delay, policy.sleep_retry_max_seconds)


def heal(view: ModelView) -> Adopt | None:
    """Reconcile belief with what the engine says, where the engine can say anything."""
    obs = view.observation
    if view.busy or obs is None or not obs.up:
        return None
    if not view.owned:
        # Another replica sleeps this engine; between its peers' drain and its sleep call the
        # engine still says "awake", so only the owner's word makes this replica forward again.
        if obs.asleep is True and view.state is ModelState.AWAKE:
            return Adopt(view.name, ModelState.ASLEEP, "engine reports it is asleep", view.version)
        return None
    settled = (ModelState.FAILED, ModelState.UNKNOWN)  # an engine that can tell resolves these
    if obs.asleep is True and view.state in (ModelState.AWAKE, *settled):
        return Adopt(view.name, ModelState.ASLEEP, "engine reports it is asleep", view.version)
    if obs.asleep is False and view.state in (ModelState.ASLEEP, *settled):
        return Adopt(view.name, ModelState.AWAKE, "engine reports it is awake", view.version)
    if (
        obs.asleep is None
        and obs.incarnation is None
        and view.state is ModelState.ASLEEP
        and view.engine_up is False
    ):
        # An engine that can report neither its sleep state nor which process answers, and
        # was unreachable, is taken as restarted: a fresh process holds its memory again. (One
        # that names its process is judged by that: a paused process is the same one.)
        return Adopt(view.name, ModelState.AWAKE, "engine came back after being down", view.version)
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
        elif (
            view.deferred_wake and view.state is ModelState.ASLEEP and now >= wake_allowed_at(view)
        ):
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


def admission(
    state: ModelState,
    held: int,
    policy: SleepPolicy,
    *,
    size: int = 0,
    held_bytes: int = 0,
    room_bytes: float = float("inf"),
) -> Admission:
    """What to do with a request of `size` body bytes that arrives for a model in `state`
    with `held` requests (`held_bytes` bytes) waiting; `room_bytes` is what the overall
    budget for held bodies has left."""
    if state is ModelState.AWAKE:
        return Admission.ADMIT
    if not policy.wakeup_on_request and state not in (ModelState.WAKING, ModelState.STARTING):
        return Admission.REJECT_NO_WAKE
    if held >= policy.max_held_requests:
        return Admission.REJECT_QUEUE_FULL
    if held_bytes + size > policy.max_held_bytes or size > room_bytes:
        return Admission.REJECT_QUEUE_FULL
    return Admission.HOLD


class Recorded(Protocol):
    """A record of the state file, as far as the start-up belief needs it."""

    @property
    def state(self) -> ModelState: ...


def initial_state(obs: Observation, stored: Recorded | None) -> ModelState:
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
    if stored.state in (ModelState.FAILED, ModelState.UNKNOWN):
        return stored.state
    return ModelState.AWAKE


@dataclass(frozen=True)
class MemoryView:
    """One model's claim on GPU memory, as the budget sees it."""

    name: str
    gpus: tuple[int, ...]
    memory_gb: float
    state: ModelState
    want_awake: bool
    evictable: bool
    last_activity: float


@dataclass(frozen=True)
class RoomPlan:
    """What waking a model needs: nothing, some evictions, or waiting (with the reason)."""

    ok: bool
    evict: tuple[str, ...] = ()
    reason: str = ""


def plan_room(
    target: MemoryView,
    others: list[MemoryView],
    budgets: dict[int, float],
    free_gb: dict[int, float] | None = None,
) -> RoomPlan:
    """Make room on the target's GPUs by sleeping least-recently-used idle models.

    A model holds memory unless it is asleep; one already on its way to sleep counts as freeing.
    Only models that are awake, idle (nothing in flight or held), not always_on and not in an
    operation may be evicted. `free_gb` (NVML, where available) must also show the room.
    """
    gpus = [g for g in target.gpus if g in budgets]
    if not gpus or not target.memory_gb:
        return RoomPlan(ok=True)
    on = {g: [m for m in others if g in m.gpus and m.name != target.name] for g in gpus}
    need: dict[int, float] = {}
    freeing: dict[int, float] = {}
    for g in gpus:
        held = sum(m.memory_gb for m in on[g] if m.state is not ModelState.ASLEEP)
        need[g] = held + target.memory_gb - budgets[g]
        freeing[g] = sum(
            m.memory_gb
            for m in on[g]
            if not m.want_awake and m.state in (ModelState.DRAINING, ModelState.SLEEPING)
        )
    if all(n <= 1e-9 for n in need.values()):
        free = free_gb or {}
        short = [g for g in gpus if g in free and free[g] + 1e-9 < target.memory_gb]
        if short:
            return RoomPlan(
                ok=False,
                reason=", ".join(
                    f"GPU {g} has {free[g]:.1f} GB free (NVML), needs {target.memory_gb:g} GB"
                    for g in short
                ),
            )
        return RoomPlan(ok=True)
    remaining = {g: need[g] - freeing[g] for g in gpus}
    evict: list[str] = []
    candidates = sorted(
        {
            m.name: m for g in gpus for m in on[g] if m.evictable and m.state is ModelState.AWAKE
        }.values(),
        key=lambda m: (m.last_activity, m.name),
    )
    for m in candidates:
        if all(r <= 1e-9 for r in remaining.values()):
            break
        if any(remaining[g] > 1e-9 for g in m.gpus if g in remaining):
            evict.append(m.name)
            for g in m.gpus:
                if g in remaining:
                    remaining[g] -= m.memory_gb
    if evict and all(r <= 1e-9 for r in remaining.values()):
        return RoomPlan(
            ok=False, evict=tuple(evict), reason="sleeping " + ", ".join(evict) + " to make room"
        )
    if all(r <= 1e-9 for r in (need[g] - freeing[g] for g in gpus)):
        return RoomPlan(ok=False, reason="waiting for models going to sleep to free memory")
    return RoomPlan(
        ok=False,
        reason="; ".join(
            f"GPU {g} needs {need[g]:g} GB more and every model on it is busy or pinned"
            for g in gpus
            if need[g] - freeing[g] > 1e-9
        ),
    )


def wake_eta(history: list[float], configured: float | None) -> float | None:
    """Expected wake time: the median of recent measured wakes (one slow outlier does not move
    it), or the configured guess until a wake has been measured."""
    if not history:
        return configured
    ordered = sorted(history)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def eta_remaining(
    state: ModelState, state_since: float, eta: float | None, now: float
) -> float | None:
    """How long a request arriving now would wait for the model (None: unknown)."""
    if state is ModelState.AWAKE:
        return 0.0
    if eta is None:
        return None
    if state in (ModelState.WAKING, ModelState.STARTING):
        return max(0.0, eta - (now - state_since))
    return eta


# A released SGLang keeps little more than its CUDA context (under a GB or two per process).
RELEASED_MAX_GB = 3.0


def memory_verdict(used_gb: float, memory_gb: float | None) -> ModelState | None:
    """What the GPU memory an engine's processes hold says of it: asleep (released) when it is
    about a CUDA context, awake when it is most of what the model is configured to hold, and
    nothing in between (an operator decides)."""
    released = RELEASED_MAX_GB if not memory_gb else min(RELEASED_MAX_GB, 0.25 * memory_gb)
    if used_gb <= released:
        return ModelState.ASLEEP
    if used_gb >= (0.75 * memory_gb if memory_gb else 3 * RELEASED_MAX_GB):
        return ModelState.AWAKE
    return None
