"""The sleep policy as pure functions: plain values in, decisions out (no sockets, no clock)."""

from __future__ import annotations

import dataclasses

import pytest

from kvsleep.config import SleepPolicy
from kvsleep.control.state_file import StoredModel
from kvsleep.core import policy
from kvsleep.core.policy import Admission, Adopt, ModelView, Sleep, Wake
from kvsleep.core.states import ModelState
from kvsleep.engines.base import Observation

NOW = 1_000_000.0
POLICY = SleepPolicy(
    idle_threshold_seconds=60,
    auto_sleep_enabled=True,
    min_awake_seconds=10,
    min_sleep_duration=80,
    max_held_requests=4,
)
NOT_AWAKE = [s for s in ModelState if s is not ModelState.AWAKE]

UP_AWAKE = Observation(up=True, asleep=False)
UP_ASLEEP = Observation(up=True, asleep=True)
UP_UNKNOWN = Observation(up=True, asleep=None)
DOWN = Observation(up=False, detail="connection refused")


def view(**kw) -> ModelView:
    """An awake model, idle for 100 s, awake for 1000 s, with nothing in flight."""
    base = dict(
        name="m",
        state=ModelState.AWAKE,
        state_since=NOW - 1000,
        version=7,
        busy=False,
        in_flight=0,
        held=0,
        last_activity=NOW - 100,
        policy=POLICY,
        always_on=False,
        engine_up=True,
    )
    base.update(kw)
    return ModelView(**base)


def pol(**kw) -> SleepPolicy:
    return dataclasses.replace(POLICY, **kw)


# ---- admission --------------------------------------------------------------------------------


def test_admission_admits_awake_model_whatever_the_queue():
    assert policy.admission(ModelState.AWAKE, 0, POLICY) is Admission.ADMIT
    assert policy.admission(ModelState.AWAKE, 10_000, POLICY) is Admission.ADMIT
    assert policy.admission(ModelState.AWAKE, 0, pol(wakeup_on_request=False)) is Admission.ADMIT


@pytest.mark.parametrize("state", NOT_AWAKE)
def test_admission_holds_requests_for_every_non_awake_state(state):
    assert policy.admission(state, 0, POLICY) is Admission.HOLD
    assert policy.admission(state, 3, POLICY) is Admission.HOLD


@pytest.mark.parametrize("state", NOT_AWAKE)
def test_admission_rejects_when_the_hold_queue_is_full(state):
    assert policy.admission(state, 4, POLICY) is Admission.REJECT_QUEUE_FULL
    assert policy.admission(state, 5, POLICY) is Admission.REJECT_QUEUE_FULL
    assert policy.admission(state, 0, pol(max_held_requests=0)) is Admission.REJECT_QUEUE_FULL


@pytest.mark.parametrize(
    "state", [s for s in NOT_AWAKE if s not in (ModelState.WAKING, ModelState.STARTING)]
)
def test_admission_without_wakeup_on_request_rejects_instead_of_waking(state):
    off = pol(wakeup_on_request=False)
    assert policy.admission(state, 0, off) is Admission.REJECT_NO_WAKE
    # The explanation wins over "queue full": nothing would ever drain that queue.
    assert policy.admission(state, 99, off) is Admission.REJECT_NO_WAKE


@pytest.mark.parametrize("state", NOT_AWAKE)
def test_admission_bounds_held_bodies_by_bytes_per_model_and_overall(state):
    small = pol(max_held_bytes=100)
    assert policy.admission(state, 0, small, size=100) is Admission.HOLD
    assert policy.admission(state, 1, small, size=1, held_bytes=100) is (
        Admission.REJECT_QUEUE_FULL
    )
    assert policy.admission(state, 0, POLICY, size=50, room_bytes=50) is Admission.HOLD
    assert policy.admission(state, 0, POLICY, size=51, room_bytes=50) is (
        Admission.REJECT_QUEUE_FULL
    )
    # An awake model holds nothing: its requests go straight to the engine.
    assert policy.admission(ModelState.AWAKE, 0, small, size=10**9, room_bytes=0) is (
        Admission.ADMIT
    )


@pytest.mark.parametrize("state", [ModelState.WAKING, ModelState.STARTING])
def test_admission_without_wakeup_on_request_still_holds_for_a_wake_under_way(state):
    """A wake or a launched engine's start is coming anyway: its requests wait for it."""
    off = pol(wakeup_on_request=False)
    assert policy.admission(state, 0, off) is Admission.HOLD
    assert policy.admission(state, 4, off) is Admission.REJECT_QUEUE_FULL


# ---- idle_seconds -----------------------------------------------------------------------------


def test_idle_counts_from_the_last_request():
    assert policy.idle_seconds(view(last_activity=NOW - 42), NOW) == 42


def test_idle_counts_from_the_wake_when_that_is_later():
    v = view(last_activity=NOW - 500, state_since=NOW - 5)
    assert policy.idle_seconds(v, NOW) == 5


def test_idle_of_a_never_used_model_counts_from_when_it_became_awake():
    assert policy.idle_seconds(view(last_activity=0.0, state_since=NOW - 30), NOW) == 30


@pytest.mark.parametrize("busy", [dict(in_flight=1), dict(held=1), dict(in_flight=3, held=2)])
def test_a_model_with_requests_in_flight_or_held_is_never_idle(busy):
    assert policy.idle_seconds(view(last_activity=NOW - 10_000, **busy), NOW) == 0.0


def test_idle_of_a_sleeping_model_ignores_when_it_fell_asleep():
    v = view(state=ModelState.ASLEEP, state_since=NOW - 1, last_activity=NOW - 300)
    assert policy.idle_seconds(v, NOW) == 300


def test_idle_is_never_negative():
    assert policy.idle_seconds(view(last_activity=NOW + 50, state_since=NOW + 60), NOW) == 0.0


# ---- sleep_candidate --------------------------------------------------------------------------


def test_idle_awake_model_is_a_candidate():
    assert policy.sleep_candidate(view(), NOW)


def test_candidate_threshold_is_inclusive():
    assert policy.sleep_candidate(view(last_activity=NOW - 60), NOW)
    assert not policy.sleep_candidate(view(last_activity=NOW - 59.9), NOW)


@pytest.mark.parametrize(
    "change",
    [
        dict(state=ModelState.ASLEEP),
        dict(state=ModelState.DRAINING),
        dict(state=ModelState.WAKING),
        dict(state=ModelState.SLEEPING),
        dict(state=ModelState.FAILED),
        dict(always_on=True),
        dict(busy=True),
        dict(in_flight=1),
        dict(held=1),
        dict(last_activity=NOW - 1),
        dict(state_since=NOW - 5, last_activity=NOW - 500),  # woke 5 s ago: anti-flap floor
        dict(policy=pol(idle_threshold_seconds=101)),
    ],
)
def test_not_a_candidate(change):
    assert not policy.sleep_candidate(view(**change), NOW)


def test_min_awake_floor_applies_even_with_zero_idle_threshold():
    p = pol(idle_threshold_seconds=0, min_awake_seconds=10)
    assert not policy.sleep_candidate(view(policy=p, state_since=NOW - 9), NOW)
    assert policy.sleep_candidate(view(policy=p, state_since=NOW - 10), NOW)


# ---- heal -------------------------------------------------------------------------------------


def test_heal_adopts_an_engine_slept_behind_our_back():
    assert policy.heal(view(observation=UP_ASLEEP)) == Adopt(
        "m", ModelState.ASLEEP, "engine reports it is asleep", 7
    )


def test_heal_adopts_an_engine_woken_or_restarted_behind_our_back():
    action = policy.heal(view(state=ModelState.ASLEEP, observation=UP_AWAKE))
    assert isinstance(action, Adopt)
    assert (action.model, action.state, action.version) == ("m", ModelState.AWAKE, 7)


@pytest.mark.parametrize(
    "obs, state", [(UP_ASLEEP, ModelState.ASLEEP), (UP_AWAKE, ModelState.AWAKE)]
)
def test_heal_takes_the_engine_word_for_a_failed_model(obs, state):
    action = policy.heal(view(state=ModelState.FAILED, observation=obs))
    assert action is not None and action.state is state


def test_heal_adopts_awake_for_an_engine_that_came_back_after_being_down():
    v = view(state=ModelState.ASLEEP, observation=UP_UNKNOWN, engine_up=False)
    action = policy.heal(v)
    assert action is not None and action.state is ModelState.AWAKE


@pytest.mark.parametrize(
    "change",
    [
        dict(observation=None),
        dict(observation=DOWN, state=ModelState.ASLEEP),
        dict(observation=UP_AWAKE),  # agrees
        dict(observation=UP_ASLEEP, state=ModelState.ASLEEP),  # agrees
        dict(observation=UP_ASLEEP, busy=True),  # an operation is running
        dict(observation=UP_AWAKE, state=ModelState.ASLEEP, busy=True),
        dict(observation=UP_UNKNOWN, state=ModelState.ASLEEP),  # SGLang, always up
        dict(observation=UP_UNKNOWN, state=ModelState.ASLEEP, engine_up=None),
        dict(observation=UP_UNKNOWN, state=ModelState.AWAKE, engine_up=False),
        # Transitional states belong to the worker, never to a probe.
        dict(observation=UP_AWAKE, state=ModelState.DRAINING),
        dict(observation=UP_AWAKE, state=ModelState.SLEEPING),
        dict(observation=UP_ASLEEP, state=ModelState.WAKING),
    ],
)
def test_heal_leaves_alone(change):
    assert policy.heal(view(**change)) is None


# ---- decide -----------------------------------------------------------------------------------


def test_decide_sleeps_idle_models_only_when_auto_sleep_is_on():
    assert policy.decide([view()], NOW) == [Sleep("m", "idle")]
    assert policy.decide([view(policy=pol(auto_sleep_enabled=False))], NOW) == []


def test_decide_never_sleeps_always_on_busy_or_active_models():
    views = [
        view(name="pinned", always_on=True),
        view(name="busy", busy=True),
        view(name="streaming", in_flight=1),
        view(name="recent", last_activity=NOW - 3),
    ]
    assert policy.decide(views, NOW) == []


def test_decide_heals_before_anything_else():
    # Idle and awake by our record, but the engine says it sleeps: adopt, do not sleep it again.
    assert policy.decide([view(observation=UP_ASLEEP)], NOW) == [
        Adopt("m", ModelState.ASLEEP, "engine reports it is asleep", 7)
    ]


def test_decide_skips_busy_models_even_when_they_drifted():
    assert policy.decide([view(busy=True, observation=UP_ASLEEP)], NOW) == []


def test_decide_runs_a_deferred_wake_once_min_sleep_duration_has_passed():
    asleep = dict(
        state=ModelState.ASLEEP, slept_at=NOW - 50, deferred_wake="manual", observation=UP_ASLEEP
    )
    assert policy.decide([view(**asleep)], NOW) == []
    assert policy.decide([view(**asleep)], NOW + 29.9) == []
    assert policy.decide([view(**asleep)], NOW + 30) == [Wake("m", "manual")]


def test_decide_ignores_a_deferred_wake_of_a_model_that_is_not_asleep():
    assert (
        policy.decide(
            [
                view(
                    deferred_wake="manual", slept_at=NOW - 500, policy=pol(auto_sleep_enabled=False)
                )
            ],
            NOW,
        )
        == []
    )


def test_decide_handles_each_model_on_its_own():
    views = [
        view(name="a"),
        view(name="b", last_activity=NOW - 1),
        view(name="c", state=ModelState.ASLEEP, observation=UP_AWAKE),
        view(name="d", policy=pol(idle_threshold_seconds=1000)),
        view(name="e", policy=pol(idle_threshold_seconds=5)),
    ]
    actions = policy.decide(views, NOW)
    assert actions == [
        Sleep("a", "idle"),
        Adopt("c", ModelState.AWAKE, "engine reports it is awake", 7),
        Sleep("e", "idle"),
    ]


def test_decide_of_nothing_is_nothing():
    assert policy.decide([], NOW) == []


# ---- wake_allowed_at --------------------------------------------------------------------------


def test_wake_allowed_at_is_min_sleep_duration_after_falling_asleep():
    assert policy.wake_allowed_at(view(state=ModelState.ASLEEP, slept_at=NOW)) == NOW + 80
    assert policy.wake_allowed_at(view(slept_at=NOW, policy=pol(min_sleep_duration=0))) == NOW


def test_wake_allowed_at_without_a_known_sleep_time_does_not_defer():
    assert policy.wake_allowed_at(view(slept_at=None)) == 80  # i.e. long ago


# ---- initial_state ----------------------------------------------------------------------------


def stored(state: ModelState) -> StoredModel:
    return StoredModel(state, NOW - 10, "sglang", "http://127.0.0.1:30000")


@pytest.mark.parametrize("record", [None, *ModelState])
def test_initial_state_believes_an_engine_that_can_tell(record):
    rec = None if record is None else stored(record)
    assert policy.initial_state(UP_ASLEEP, rec) is ModelState.ASLEEP
    assert policy.initial_state(UP_AWAKE, rec) is ModelState.AWAKE


@pytest.mark.parametrize(
    "record, expected",
    [
        (None, ModelState.AWAKE),
        (ModelState.AWAKE, ModelState.AWAKE),
        (ModelState.DRAINING, ModelState.AWAKE),  # the drain never reached the engine
        (ModelState.SLEEPING, ModelState.ASLEEP),  # the engine finishes a call its client dropped
        (ModelState.ASLEEP, ModelState.ASLEEP),
        (ModelState.WAKING, ModelState.WAKING),  # half-woken: finished before anything is served
        (ModelState.FAILED, ModelState.FAILED),
    ],
)
@pytest.mark.parametrize("obs", [UP_UNKNOWN, DOWN, Observation(up=False, asleep=True)])
def test_initial_state_falls_back_to_the_record(obs, record, expected):
    rec = None if record is None else stored(record)
    assert policy.initial_state(obs, rec) is expected
