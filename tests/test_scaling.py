"""Warm autoscaling decisions as pure functions: replicas, policy, memory and time in, one
decision out (no sockets, no clock). Scenarios are played over virtual time."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pytest

from kvsleep.core.scaling import (
    BLOCKED,
    REASONS,
    ReplicaView,
    ScaleDecision,
    ScaleMemory,
    ScalingPolicy,
    decide_scale,
    demand,
    desired_replicas,
    pick_replica,
    projected_demand,
)
from kvsleep.core.states import ModelState

A = ModelState.AWAKE
S = ModelState.ASLEEP
W = ModelState.WAKING
D = ModelState.DRAINING
# Neither awake nor asleep nor coming: never chosen, never capacity.
OTHER = [ModelState.DRAINING, ModelState.SLEEPING, ModelState.FAILED, ModelState.UNKNOWN]
OTHER += [ModelState.DOWN]

POLICY = ScalingPolicy(
    min_awake=1,
    max_awake=3,
    target_in_flight=8,
    scale_up_after_seconds=5,
    scale_down_after_seconds=120,
    trend_window_seconds=0,  # the trend has its own tests
)


def pol(**kw: object) -> ScalingPolicy:
    return dataclasses.replace(POLICY, **kw)  # type: ignore[arg-type]


def rv(i: int | str, state: ModelState, in_flight: int = 0, **kw: object) -> ReplicaView:
    return ReplicaView(str(i), state, in_flight, 0, **kw)  # type: ignore[arg-type]


def fleet(*states: ModelState, in_flight: tuple[int, ...] = ()) -> list[ReplicaView]:
    loads = in_flight or (0,) * len(states)
    return [rv(i, s, n) for i, (s, n) in enumerate(zip(states, loads, strict=True))]


def run(
    replicas: list[ReplicaView],
    policy: ScalingPolicy,
    times: list[float],
    memory: ScaleMemory | None = None,
) -> tuple[ScaleDecision, ScaleMemory]:
    """The same replicas at each of `times`; the last pass's decision and memory."""
    mem = memory or ScaleMemory()
    decision = None
    for t in times:
        decision, mem = decide_scale(replicas, policy, mem, t)
    assert decision is not None
    return decision, mem


# ---- demand -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "replicas, policy, expected",
    [
        # in flight + held of every replica (held ones wait for a wake, drained ones still run)
        ([rv(0, A, 8), rv(1, S)], POLICY, 1.0),
        ([rv(0, A, 12), ReplicaView("1", W, 0, 4)], POLICY, 2.0),
        ([rv(0, A, 4), rv(1, D, 4)], POLICY, 1.0),
        ([rv(0, A, 0)], POLICY, 0.0),
        # engine queue: mean of the awake replicas that report it, times the awake replicas
        ([rv(0, A, queue=6), rv(1, A, queue=2)], pol(target_queue=4), 2.0),
        ([rv(0, A, queue=6), rv(1, A)], pol(target_queue=4), 3.0),
        ([rv(0, A, queue=9), rv(1, S, queue=9)], pol(target_queue=3), 3.0),
        # KV cache: mean usage over the awake replicas against the target
        (
            [rv(0, A, kv_cache_usage=0.9), rv(1, A, kv_cache_usage=0.7)],
            pol(target_kv_cache_usage=0.8),
            2.0,
        ),
        # the largest ratio counts
        ([rv(0, A, 4, queue=12)], pol(target_queue=4), 3.0),
        # no target, no demand
        ([rv(0, A, 100, queue=100)], pol(target_in_flight=None), 0.0),
    ],
)
def test_demand_in_replicas(replicas, policy, expected):
    assert demand(replicas, policy) == pytest.approx(expected)


@pytest.mark.parametrize(
    "load, policy, total, expected",
    [
        (0.0, POLICY, 3, 1),  # min_awake
        (0.0, pol(min_awake=0), 3, 0),
        (1.0, POLICY, 3, 1),
        (1.01, POLICY, 3, 2),
        (3 * 0.1 / 0.1, pol(max_awake=None), 5, 3),  # float noise asks for no extra replica
        (7.0, POLICY, 5, 3),  # max_awake
        (7.0, pol(max_awake=None), 5, 5),  # all replicas
        (7.0, pol(max_awake=None), 2, 2),
        (0.0, pol(min_awake=4), 3, 3),  # never more than max_awake, even for the floor
    ],
)
def test_desired_replicas_clamped(load, policy, total, expected):
    assert desired_replicas(load, policy, total) == expected


def test_projected_demand_extrapolates_the_line():
    assert projected_demand([(0.0, 1.0), (1.0, 1.5), (2.0, 2.0)], 4.0) == pytest.approx(4.0)
    assert projected_demand([(0.0, 2.0), (1.0, 1.0)], 1.0) == pytest.approx(0.0)
    assert projected_demand([(0.0, 1.0)], 4.0) is None
    assert projected_demand([(3.0, 1.0), (3.0, 2.0)], 4.0) is None


# ---- scale up ---------------------------------------------------------------------------------

HIGH = fleet(A, S, S, in_flight=(20, 0, 0))  # 2.5 replicas' worth, one awake


def test_wakes_one_more_after_scale_up_after_seconds_above_target():
    decision, mem = run(HIGH, POLICY, [0.0, 4.9])
    assert (decision.action, decision.reason, decision.desired) == (None, "waiting", 3)
    assert mem.above_since == 0.0
    decision, mem = run(HIGH, POLICY, [5.0], mem)
    assert (decision.action, decision.replica, decision.reason) == ("up", "1", "target")
    assert (mem.last_up, mem.above_since) == (5.0, None)


def test_a_dip_below_target_restarts_the_wait():
    steady = fleet(A, S, S, in_flight=(8, 0, 0))
    _, mem = run(HIGH, POLICY, [0.0, 1.0, 2.0])
    decision, mem = decide_scale(steady, POLICY, mem, 3.0)
    assert (decision.reason, mem.above_since) == ("steady", None)
    decision, mem = run(HIGH, POLICY, [4.0, 8.9], mem)
    assert decision.action is None
    decision, _ = run(HIGH, POLICY, [9.0], mem)
    assert decision.action == "up"


def test_exactly_at_target_is_not_above():
    decision, _ = run(fleet(A, S, in_flight=(8, 0)), POLICY, [0.0, 100.0])
    assert (decision.action, decision.reason, decision.desired) == (None, "steady", 1)


@pytest.mark.parametrize(
    "replicas, expected",
    [
        ([rv(0, A, 20), rv(1, S), rv(2, S)], "1"),
        ([rv(0, A, 20), rv(1, S, fits=False), rv(2, S)], "2"),
        ([rv("big", A, 20), rv("a", S), rv("b", S)], "a"),  # config order, not name order
        ([rv(0, S), rv(1, A, 20), rv(2, S)], "0"),
    ],
)
def test_scale_up_wakes_the_lowest_asleep_replica_that_fits(replicas, expected):
    decision, _ = run(replicas, POLICY, [0.0, 5.0])
    assert (decision.action, decision.replica) == ("up", expected)


def test_no_second_wake_while_one_is_under_way():
    waking = fleet(A, W, S, in_flight=(30, 0, 0))  # 3.75 replicas' worth, 2 awake or coming
    decision, mem = run(waking, POLICY, [0.0, 5.0, 60.0])
    assert (decision.action, decision.reason) == (None, "wake_in_progress")
    assert mem.above_since == 0.0  # the wait runs on: once it serves, the next is due at once
    woke = fleet(A, A, S, in_flight=(15, 15, 0))
    decision, _ = decide_scale(woke, POLICY, mem, 61.0)
    assert (decision.action, decision.replica) == ("up", "2")


def test_a_starting_replica_is_capacity_coming_too():
    decision, _ = run(fleet(A, ModelState.STARTING, S, in_flight=(12, 0, 0)), POLICY, [0.0, 60.0])
    assert (decision.action, decision.reason) == (None, "steady")


def test_one_action_per_pass():
    replicas = fleet(S, S, S, in_flight=(40, 0, 0))
    decision, mem = decide_scale(replicas, pol(min_awake=3), ScaleMemory(), 0.0)
    assert (decision.action, decision.replica) == ("up", "0")
    assert mem.last_up == 0.0


# ---- bounds: min_awake, max_awake, budget ----------------------------------------------------


def test_below_min_awake_wakes_one_at_once():
    decision, mem = decide_scale(fleet(S, S, S), POLICY, ScaleMemory(), 0.0)
    assert (decision.action, decision.replica, decision.reason) == ("up", "0", "min_awake")
    assert mem.last_up == 0.0


def test_min_awake_counts_waking_replicas_and_does_not_wait_for_them():
    decision, _ = decide_scale(fleet(W, S, S), POLICY, ScaleMemory(), 0.0)
    assert (decision.action, decision.reason) == (None, "steady")
    decision, _ = decide_scale(fleet(W, S, S), pol(min_awake=2), ScaleMemory(), 0.0)
    assert (decision.action, decision.replica, decision.reason) == ("up", "1", "min_awake")


def test_never_above_max_awake():
    replicas = fleet(A, A, S, in_flight=(40, 40, 0))
    decision, _ = run(replicas, pol(max_awake=2), [0.0, 5.0, 600.0])
    assert (decision.action, decision.blocked, decision.reason) == (None, "max_awake", "target")
    assert decision.desired == 2 and decision.demand == pytest.approx(10.0)


def test_more_than_max_awake_awake_drains_one_at_once():
    decision, _ = decide_scale(fleet(A, A, A), pol(max_awake=2), ScaleMemory(), 0.0)
    assert (decision.action, decision.replica, decision.reason) == ("down", "2", "max_awake")


def test_never_a_replica_that_does_not_fit_its_budget():
    replicas = [rv(0, A, 30), rv(1, S, fits=False), rv(2, S, fits=False)]
    decision, _ = run(replicas, POLICY, [0.0, 5.0, 600.0])
    assert (decision.action, decision.replica, decision.blocked) == (None, None, "budget")
    decision, _ = decide_scale([rv(0, S, fits=False)], POLICY, ScaleMemory(), 0.0)
    assert (decision.action, decision.blocked, decision.reason) == (None, "budget", "min_awake")


def test_nothing_asleep_to_wake_is_unavailable():
    replicas = [rv(0, A, 30), rv(1, ModelState.FAILED), rv(2, D)]
    decision, _ = run(replicas, POLICY, [0.0, 5.0])
    assert (decision.action, decision.blocked) == (None, "unavailable")


def test_blocked_is_said_at_once_for_the_alerts():
    replicas = [rv(0, A, 30), rv(1, S, fits=False)]
    decision, _ = decide_scale(replicas, POLICY, ScaleMemory(), 0.0)
    assert decision.blocked == "budget"


# ---- scale down -------------------------------------------------------------------------------

LOW = fleet(A, A, A, in_flight=(3, 2, 2))  # 0.875 replicas' worth, three awake


def test_drains_one_after_scale_down_after_seconds_below_target():
    decision, mem = run(LOW, POLICY, [0.0, 119.0])
    assert (decision.action, decision.reason, decision.desired) == (None, "waiting", 1)
    decision, mem = decide_scale(LOW, POLICY, mem, 120.0)
    assert (decision.action, decision.replica, decision.reason) == ("down", "2", "below_target")
    assert (mem.last_down, mem.below_since) == (120.0, None)
    # each step down waits the full delay again
    two = fleet(A, A, ModelState.ASLEEP, in_flight=(4, 3, 0))
    decision, mem = run(two, POLICY, [121.0, 240.0], mem)
    assert decision.action is None
    decision, _ = decide_scale(two, POLICY, mem, 241.0)
    assert (decision.action, decision.replica) == ("down", "1")


@pytest.mark.parametrize(
    "in_flight, expected",
    [
        ((3, 2, 2), "2"),  # fewest in flight; ties: the highest index
        ((0, 0, 0), "2"),
        ((1, 0, 4), "1"),
        ((0, 3, 4), "0"),  # replica 0 only when it is the least loaded
    ],
)
def test_scale_down_picks_the_least_loaded_highest_index(in_flight, expected):
    decision, _ = run(fleet(A, A, A, in_flight=in_flight), POLICY, [0.0, 120.0])
    assert (decision.action, decision.replica) == ("down", expected)


def test_demand_that_needs_every_replica_is_not_below():
    decision, _ = run(fleet(A, A, in_flight=(5, 4)), POLICY, [0.0, 600.0])
    assert (decision.action, decision.reason) == (None, "steady")


def test_no_scale_down_within_the_delay_of_the_last_scale_up():
    mem = ScaleMemory(last_up=0.0)
    decision, mem = run(LOW, POLICY, [10.0, 20.0, 119.0], mem)
    assert (decision.action, decision.reason) == (None, "cooldown")
    decision, _ = decide_scale(LOW, POLICY, mem, 130.0)
    assert decision.action == "down"  # below since 10, 120 s after the scale-up


@pytest.mark.parametrize(
    "third, reason",
    [
        (W, "wake_in_progress"),
        (ModelState.STARTING, "wake_in_progress"),
        (D, "drain_in_progress"),
        (ModelState.SLEEPING, "drain_in_progress"),
    ],
)
def test_no_scale_down_while_a_wake_or_a_drain_is_under_way(third, reason):
    replicas = fleet(A, A, third, in_flight=(1, 1, 0))
    decision, _ = run(replicas, POLICY, [0.0, 600.0])
    assert (decision.action, decision.reason) == (None, reason)


def test_never_below_min_awake():
    decision, _ = run(fleet(A, A, S), pol(min_awake=2), [0.0, 1000.0])
    assert (decision.action, decision.reason, decision.desired) == (None, "steady", 2)


def test_min_awake_zero_never_sleeps_the_last_awake_replica():
    # The idle policy sleeps it (its idle threshold, pins, sleep backoff), as for one engine.
    policy = pol(min_awake=0)
    decision, _ = run(fleet(A, S, S), policy, [0.0, 10_000.0])
    assert (decision.action, decision.desired) == (None, 0)
    decision, mem = run(fleet(A, A, S), policy, [0.0, 120.0])
    assert (decision.action, decision.replica) == ("down", "1")
    decision, _ = run(fleet(A, D, S), policy, [200.0, 10_000.0], mem)
    assert decision.action is None


def test_min_awake_zero_nothing_awake_and_no_demand_stays_asleep():
    decision, _ = run(fleet(S, S), pol(min_awake=0), [0.0, 10_000.0])
    assert (decision.action, decision.reason, decision.desired) == (None, "steady", 0)


@pytest.mark.parametrize("state", OTHER)
def test_other_states_are_neither_chosen_nor_capacity(state):
    # Capacity: one awake replica and one in `state`; demand of 1.5 replicas -> wake replica 2.
    replicas = [rv(0, state, 4), rv(1, A, 8), rv(2, S)]
    decision, _ = run(replicas, POLICY, [0.0, 5.0])
    assert (decision.action, decision.replica) == ("up", "2")
    # Never the one drained either, however idle it is (and one drain at a time).
    decision, _ = run([rv(0, state), rv(1, A), rv(2, A, 1)], POLICY, [0.0, 120.0])
    if state in (D, ModelState.SLEEPING):
        assert (decision.action, decision.reason) == (None, "drain_in_progress")
    else:
        assert (decision.action, decision.replica) == ("down", "1")


def test_reasons_and_blocks_are_bounded():
    seen: set[tuple[str, str | None]] = set()
    cases = [
        HIGH,
        LOW,
        fleet(S, S),
        fleet(A, W, in_flight=(30, 0)),
        [rv(0, A, 30), rv(1, S, fits=False)],
    ]
    for replicas in cases:
        for policy in (POLICY, pol(max_awake=1), pol(min_awake=0), pol(trend_window_seconds=30)):
            mem = ScaleMemory()
            for t in (0.0, 5.0, 130.0):
                decision, mem = decide_scale(replicas, policy, mem, t)
                seen.add((decision.reason, decision.blocked))
    assert all(reason in REASONS and (b is None or b in BLOCKED) for reason, b in seen)


# ---- the trend: wake before the awake ones saturate ------------------------------------------


def ramp_pass(
    in_flight: int, mem: ScaleMemory, t: float, policy: ScalingPolicy
) -> tuple[ScaleDecision, ScaleMemory]:
    replicas = [rv(0, A, in_flight), rv(1, S, wake_eta=10.0), rv(2, S, wake_eta=10.0)]
    return decide_scale(replicas, policy, mem, t)


def test_a_rising_demand_wakes_before_the_target_is_exceeded():
    # In flight rises by 1 every 4 s from 2: above 8 (one replica's target) at t = 28.
    policy = pol(trend_window_seconds=30)
    mem = ScaleMemory()
    woke = None
    for t in range(40):
        decision, mem = ramp_pass(2 + t // 4, mem, float(t), policy)
        if decision.action:
            woke = (t, decision.action, decision.replica, decision.reason)
            break
    assert woke is not None
    t, action, replica, reason = woke
    assert (action, replica, reason) == ("up", "1", "trend")
    # 10 s ahead at 0.25/s reaches 8 + 1 from t = 16; five seconds later the wake starts, so
    # the replica serves around t = 31, when the awake one has just crossed its target.
    assert 20 <= t <= 24


def test_without_the_trend_the_same_ramp_waits_for_the_target():
    mem = ScaleMemory()
    for t in range(40):
        decision, mem = ramp_pass(2 + t // 4, mem, float(t), POLICY)
        if decision.action:
            break
    assert (decision.reason, t) == ("target", 33)  # 9 in flight from t = 28, plus 5 s


def test_no_trend_without_a_wake_eta():
    policy = pol(trend_window_seconds=30)
    mem = ScaleMemory()
    for t in range(28):
        replicas = [rv(0, A, 2 + t // 4), rv(1, S), rv(2, S)]
        decision, mem = decide_scale(replicas, policy, mem, float(t))
        assert decision.action is None


def test_a_falling_demand_does_not_scale_down_early():
    # The trend only adds: a fall is not extrapolated below what is in flight now. In flight
    # falls from 16 to 9 (two replicas' worth all along), one every 4 s.
    policy = pol(trend_window_seconds=30)
    mem = ScaleMemory()
    for t in range(60):
        n = max(9, 16 - t // 4)
        replicas = [rv(0, A, n // 2), rv(1, A, n - n // 2), rv(2, S, wake_eta=10.0)]
        decision, mem = decide_scale(replicas, policy, mem, float(t))
        assert (decision.action, decision.desired, mem.below_since) == (None, 2, None), t


def test_samples_stay_within_the_window_and_restart_at_each_action():
    policy = pol(trend_window_seconds=10)
    _, mem = run([rv(0, A, 1), rv(1, S)], policy, [float(t) for t in range(30)])
    assert [t for t, _ in mem.demand] == [float(t) for t in range(20, 30)]
    decision, mem = run(HIGH, policy, [30.0, 35.0], mem)
    assert decision.action == "up"
    assert mem.demand == ((35.0, 2.5),)


# ---- scenarios over virtual time --------------------------------------------------------------


def play(
    policy: ScalingPolicy,
    load: Callable[[float], int],
    until: float,
    *,
    replicas: int = 3,
    wake_s: float = 8.0,
    drain_s: float = 3.0,
) -> list[tuple[float, ScaleDecision, dict[str, ModelState]]]:
    """Replicas that follow the scaler: a wake takes `wake_s`, a drain and sleep `drain_s`.

    Each second, `load(t)` requests are in flight, each placed by `pick_replica` as the router
    places them, and the scaler makes one pass. Returns every pass.
    """
    names = [str(i) for i in range(replicas)]
    states = {n: S for n in names}
    states["0"] = A
    done_at: dict[str, float] = {}
    mem = ScaleMemory()
    passes = []
    t = 0.0
    while t <= until:
        for n, at in list(done_at.items()):
            if t >= at:
                states[n] = A if states[n] is W else S
                del done_at[n]
        counts = dict.fromkeys(names, 0)
        for k in range(load(t)):
            views = [rv(n, states[n], counts[n], wake_eta=wake_s) for n in names]
            chosen = pick_replica(views, None, (k * 0.37) % 1.0)
            assert chosen is not None
            counts[chosen] += 1
        views = [rv(n, states[n], counts[n], wake_eta=wake_s) for n in names]
        # traffic spreads: no awake replica idle while another has more than its target
        awake_loads = [counts[n] for n in names if states[n] is A]
        assert not (min(awake_loads) == 0 and max(awake_loads) > 8)
        decision, mem = decide_scale(views, policy, mem, t)
        if decision.action == "up":
            assert states[decision.replica] is S
            states[decision.replica] = W
            done_at[decision.replica] = t + wake_s
        elif decision.action == "down":
            assert states[decision.replica] is A
            states[decision.replica] = D
            done_at[decision.replica] = t + drain_s
        passes.append((t, decision, dict(states)))
        t += 1.0
    return passes


def step(t: float) -> int:
    """One replica's target (8 in flight), three times that from 60 s to 300 s, then one."""
    return 24 if 60 <= t < 300 else 8


@pytest.mark.parametrize("trend", [0.0, 30.0])
def test_step_load_wakes_one_at_a_time_and_returns_to_min_awake(trend):
    passes = play(pol(trend_window_seconds=trend), step, 700.0)
    actions = [(t, d.action, d.reason) for t, d, _ in passes if d.action]
    # the second replica 5 s after the step; the third as soon as the second serves (the
    # demand stayed above for the 5 s meanwhile); back down one at a time after 120 s each
    assert actions == [
        (65.0, "up", "target"),
        (73.0, "up", "target"),
        (420.0, "down", "below_target"),
        (541.0, "down", "below_target"),
    ]
    woken = [d.replica for _, d, _ in passes if d.action == "up"]
    slept = [d.replica for _, d, _ in passes if d.action == "down"]
    assert woken == ["1", "2"] and sorted(slept) == ["1", "2"]  # replica 0 stays
    for t, _, states in passes:
        assert sum(s is W for s in states.values()) <= 1, t  # one wake at a time
    awake = {t: sum(s is A for s in states.values()) for t, _, states in passes}
    assert awake[81.0] == 3 and awake[299.0] == 3
    assert awake[544.0] == 1 and all(awake[t] == 1 for t in awake if t >= 544.0)
    blocked = {d.blocked for t, d, _ in passes if t >= 81.0}
    assert blocked == {None}  # three replicas carry three replicas' worth


def test_noisy_load_around_one_replica_does_not_flap():
    # 6..10 in flight, a new value each second: above the target 2 s out of 5, never 5 s on end.
    noise = [6, 10, 7, 9, 8]
    passes = play(POLICY, lambda t: noise[int(t) % 5], 600.0)
    assert [d.action for _, d, _ in passes if d.action] == []


def test_min_awake_zero_scales_to_zero_like_one_engine():
    # Nothing awake, nothing asked: the scaler wakes nothing and sleeps nothing; the idle policy
    # and the request path (hold, wake) do what they do for a single engine.
    policy = pol(min_awake=0)
    mem = ScaleMemory()
    for t in range(0, 1000, 10):
        decision, mem = decide_scale(fleet(S, S, S), policy, mem, float(t))
        assert decision.action is None
    # A held request with nothing coming (the request path did not wake): the scaler wakes one
    # after scale_up_after_seconds, like any demand above capacity.
    held = [ReplicaView("0", S, 0, 1), rv(1, S), rv(2, S)]
    decision, _ = run(held, policy, [0.0, 5.0])
    assert (decision.action, decision.replica, decision.reason) == ("up", "0", "target")
    # Once the request path's wake is under way, the scaler leaves it alone.
    decision, _ = run([ReplicaView("0", W, 0, 3), rv(1, S), rv(2, S)], policy, [0.0, 60.0])
    assert decision.action is None


# ---- routing ----------------------------------------------------------------------------------


def test_pick_least_outstanding():
    replicas = [rv(0, A, 3), rv(1, A, 1), rv(2, A, 2)]
    assert pick_replica(replicas, None, 0.9) == "1"


@pytest.mark.parametrize("rand, expected", [(0.0, "0"), (0.49, "0"), (0.5, "2"), (0.999, "2")])
def test_pick_ties_broken_by_rand(rand, expected):
    replicas = [rv(0, A, 1), rv(1, A, 2), rv(2, A, 1)]
    assert pick_replica(replicas, None, rand) == expected


@pytest.mark.parametrize("state", [s for s in ModelState if s is not A])
def test_pick_never_a_replica_that_is_not_awake(state):
    replicas = [rv(0, state), rv(1, A, 50)]
    assert pick_replica(replicas, None, 0.0) == "1"
    assert pick_replica(replicas, "user-7", 0.0) == "1"
    assert pick_replica([rv(0, state), rv(1, state)], None, 0.0) is None
    assert pick_replica([rv(0, state)], "user-7", 0.0) is None


def test_affinity_is_stable_and_spreads_keys():
    replicas = [rv(i, A) for i in range(3)]
    keys = [f"user-{k}" for k in range(300)]
    first = {k: pick_replica(replicas, k, 0.0) for k in keys}
    # the same key reaches the same replica whatever the loads and the random draw
    loaded = [rv(0, A, 40), rv(1, A, 0), rv(2, A, 7)]
    assert all(pick_replica(loaded, k, 0.7) == first[k] for k in keys)
    counts = {n: list(first.values()).count(n) for n in "012"}
    assert all(60 < c < 140 for c in counts.values()), counts


def test_affinity_moves_only_the_keys_of_a_replica_that_leaves():
    keys = [f"session-{k}" for k in range(300)]
    three = [rv(i, A) for i in range(3)]
    two = [rv(0, A), rv(1, D), rv(2, A)]
    before = {k: pick_replica(three, k, 0.0) for k in keys}
    after = {k: pick_replica(two, k, 0.0) for k in keys}
    assert all(after[k] == before[k] for k in keys if before[k] != "1")
    assert all(after[k] in ("0", "2") for k in keys)


def test_affinity_hash_is_the_same_in_every_process():
    # hashlib, not hash(): PYTHONHASHSEED differs between kvsleep processes and restarts.
    replicas = [rv(i, A) for i in range(4)]
    picks = [pick_replica(replicas, f"k{n}", 0.0) for n in range(8)]
    assert picks == ["0", "1", "0", "0", "3", "2", "2", "1"]


def test_affinity_with_a_bound_skips_loaded_replicas():
    replicas = [rv(i, A) for i in range(3)]
    home = pick_replica(replicas, "user-1", 0.0)
    assert home is not None
    busy = [rv(n, A, 8 if str(n) == home else 2) for n in range(3)]
    assert pick_replica(busy, "user-1", 0.0) == home
    other = pick_replica(busy, "user-1", 0.0, bound=8)
    assert other not in (None, home)
    full = [rv(n, A, 9 if str(n) == home else 8) for n in range(3)]
    assert pick_replica(full, "user-1", 0.0, bound=8) != home  # all full: the least loaded


def test_a_model_is_awake_when_any_replica_is_else_as_close_to_serving_as_its_best() -> None:
    from kvsleep.core.scaling import model_state

    S = ModelState
    assert model_state([S.ASLEEP, S.AWAKE, S.FAILED]) is S.AWAKE
    assert model_state([S.ASLEEP, S.WAKING, S.DRAINING]) is S.WAKING
    assert model_state([S.ASLEEP, S.SLEEPING]) is S.SLEEPING
    assert model_state([S.ASLEEP, S.FAILED]) is S.ASLEEP
    assert model_state([S.DOWN]) is S.DOWN
    assert all(model_state([state]) is state for state in S)


def test_the_mean_in_flight_since_the_last_pass_outweighs_a_peak_seen_at_the_pass() -> None:
    """A load that hovers below the target (mean 6 of 8) but peaks at 12 when the scaler looks
    wakes nothing; the same peak with no mean measured (first pass) counts as it is."""
    peak = fleet(A, S, in_flight=(12, 0))
    decision, _ = run(peak, POLICY, [0, 5])
    assert decision.action == "up"
    mem = ScaleMemory()
    for t in (0, 5, 10):
        decision, mem = decide_scale(peak, POLICY, mem, t, in_flight=6.0)
    assert (decision.action, decision.reason, decision.desired) == (None, "steady", 1)
    assert demand(peak, POLICY, 20.0) == 2.5  # the mean stands for every replica's count


def test_the_traffic_monitor_integrates_requests_in_flight_over_time() -> None:
    from kvsleep.control.replicas import ModelGroup
    from kvsleep.control.traffic import TrafficMonitor

    now = [100.0]
    monitor = TrafficMonitor(60, clock=lambda: now[0])
    group = ModelGroup("m", ())
    stats = monitor.add_model("m")
    assert group.mean_in_flight(stats.in_flight_area_at(now[0]), now[0]) is None
    first = monitor.record_request_start("m", "/v1/completions")
    now[0] += 10  # one request for 10 s
    second = monitor.record_request_start("m", "/v1/completions")
    now[0] += 5  # two for 5 s
    monitor.record_request_end(first)
    monitor.record_request_end(second)
    now[0] += 5  # none for 5 s
    assert stats.in_flight_area_at(now[0]) == 20.0
    assert group.mean_in_flight(stats.in_flight_area_at(now[0]), now[0]) == 1.0  # 20 over 20 s
    assert group.mean_in_flight(stats.in_flight_area_at(now[0]), now[0]) is None  # no time


def test_a_replica_woken_by_other_means_is_not_slept_again_at_once() -> None:
    """An operator wakes replica 1 while the demand fits in one: the scaler waits the full
    scale_down_after_seconds from the pass that saw it awake, not from when the demand fell."""
    mem = ScaleMemory()
    one = fleet(A, S)
    for t in (0, 60, 110):
        decision, mem = decide_scale(one, POLICY, mem, t)
    two = fleet(A, A)  # woken at +115 by someone else
    for t in (120, 180, 230):
        decision, mem = decide_scale(two, POLICY, mem, t)
        assert decision.action is None, t
    decision, mem = decide_scale(two, POLICY, mem, 240)  # 120 s after the pass that saw it
    assert (decision.action, decision.replica, decision.reason) == ("down", "1", "below_target")
