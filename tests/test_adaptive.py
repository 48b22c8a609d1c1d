"""Adaptive idle thresholds: the pure rule, the bounded learner, the config keys, and the live
wiring (traffic monitor arrivals in, `kvsleep_model_idle_threshold_seconds` out)."""

from __future__ import annotations

import dataclasses
import math
import random
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvsleep.config import ConfigError, ModelConfig, SleepPolicy, parse_config
from kvsleep.control import adaptive
from kvsleep.control.adaptive import (
    EDGES,
    N_BINS,
    GapHistogram,
    ModelLearner,
    Thresholds,
    adaptive_threshold,
    best_threshold,
    expected_cost,
    flap_level,
)
from kvsleep.control.traffic import TrafficMonitor

POLICY = SleepPolicy(
    idle_threshold_seconds=300,
    idle_policy="adaptive",
    min_idle_threshold_seconds=30,
    max_idle_threshold_seconds=3600,
)


def histogram(gaps: list[float]) -> GapHistogram:
    hist = GapHistogram()
    for gap in gaps:
        hist.add(gap)
    return hist


def exponential(mean: float, n: int = 400) -> list[float]:
    """Deterministic exponential gaps (quantiles), shuffled with a fixed seed."""
    gaps = [-mean * math.log(1 - (i + 0.5) / n) for i in range(n)]
    random.Random(1).shuffle(gaps)
    return gaps


# ---- the histogram ---------------------------------------------------------------------------


def test_bins_cover_every_gap_at_a_quarter_octave() -> None:
    assert adaptive._bin(0.0) == 0 and adaptive._bin(0.99) == 0
    assert adaptive._bin(1.0) == 1 and adaptive._bin(2**0.25 - 1e-6) == 1
    assert adaptive._bin(2.0) == 5
    assert adaptive._bin(1e9) == N_BINS - 1
    for i, edge in enumerate(EDGES[:-1]):
        assert adaptive._bin(edge * 1.0001) == i + 1


def test_memory_is_bounded_and_old_gaps_fade() -> None:
    learner = ModelLearner()
    for i in range(5000):
        learner.arrival(float(i), 5.0)
        learner.sleep(float(i))
    assert len(learner.gaps.counts) == len(learner.gaps.sums) == N_BINS
    assert len(learner.asleep_for) == adaptive.SLEEP_OUTCOMES
    # The weight converges to 1 / (1 - DECAY) (about 289 gaps), however many were seen.
    assert learner.gaps.total == pytest.approx(1 / (1 - adaptive.DECAY), rel=1e-3)
    hist = histogram([1000.0] + [5.0] * adaptive.HALF_LIFE_GAPS)
    assert hist.counts[adaptive._bin(1000.0)] == pytest.approx(0.5)


# ---- the rule --------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    gaps=st.lists(st.floats(0, 50_000), min_size=1, max_size=60),
    wake_cost=st.floats(0, 5000),
    low=st.floats(0, 100),
    span=st.floats(0, 10_000),
)
def test_best_threshold_is_the_argmin_of_the_expected_cost(
    gaps: list[float], wake_cost: float, low: float, span: float
) -> None:
    """The one-pass search agrees with evaluating E[min(g,T)] + B P(g>T) at every candidate."""
    hist = histogram(gaps)
    high = low + span
    candidates = sorted({low, high, *(e for e in EDGES if low < e < high)})
    costs = [expected_cost(hist, t, wake_cost) for t in candidates]
    chosen = best_threshold(hist, wake_cost, low, high)
    assert low <= chosen <= high
    assert expected_cost(hist, chosen, wake_cost) <= min(costs) * (1 + 1e-6) + 1e-9


def test_poisson_traffic_is_all_or_nothing() -> None:
    """Memoryless gaps: if they average more than B, sleeping at once is best; if less, never
    sleeping through a gap is: the threshold clears every gap seen, with the margin (twice the
    longest) that the unknown tail beyond them gets."""
    sparse = histogram(exponential(mean=900))
    busy_gaps = exponential(mean=60)
    assert adaptive_threshold(sparse, [], POLICY, None) == 30
    threshold = adaptive_threshold(histogram(busy_gaps), [], POLICY, None)
    assert 2 * max(busy_gaps) * 0.9 < threshold < 2 * max(busy_gaps) * 1.1


def test_sessions_sleep_just_after_the_session_gaps() -> None:
    """Gaps of a few seconds within sessions, a 30 to 60 min pause between: the threshold sits
    above the in-session gaps and far below the pauses (a fixed 300 s wastes minutes each)."""
    rng = random.Random(2)
    gaps = [
        rng.expovariate(1 / 5) if rng.random() > 0.03 else rng.uniform(1800, 3600)
        for _ in range(400)
    ]
    threshold = adaptive_threshold(histogram(gaps), [], POLICY, None)
    assert 20 < threshold < 120


def test_cold_start_uses_the_configured_threshold_within_the_bounds() -> None:
    few = histogram([5.0] * 10)
    assert adaptive_threshold(few, [], POLICY, None) == 300
    narrow = dataclasses.replace(POLICY, min_idle_threshold_seconds=400)
    assert adaptive_threshold(few, [], narrow, None) == 400


def test_beyond_every_recent_gap_the_threshold_keeps_a_margin() -> None:
    """Only short gaps seen: the cost is flat past the longest, so the rule takes twice it."""
    gaps = [1.0 + 0.1 * (i % 200) for i in range(400)]  # 1 .. 20.9 s
    threshold = adaptive_threshold(histogram(gaps), [], POLICY, None)
    longest = max(
        s / c for c, s in zip(histogram(gaps).counts, histogram(gaps).sums, strict=True) if c > 0.5
    )
    assert threshold == pytest.approx(2 * longest)
    assert 30 <= threshold < 45


def test_wake_cost_is_the_configured_threshold_plus_the_wake() -> None:
    assert adaptive.wake_cost_seconds(POLICY, 20.0) == 320
    assert adaptive.wake_cost_seconds(POLICY, None) == 300
    # Gaps of 400 s on average: worth sleeping through when a wake costs 300 s, not 500 s.
    gaps = exponential(mean=400)
    assert adaptive_threshold(histogram(gaps), [], POLICY, None) == 30
    assert adaptive_threshold(histogram(gaps), [], POLICY, 200.0) > max(gaps)


def test_flapping_raises_the_threshold_and_paying_sleeps_lower_it() -> None:
    b = 300.0
    assert flap_level([], b) == 0
    assert flap_level([100], b) == 0  # one quick wake is a priced-in bet
    assert flap_level([100, 50], b) == 1
    assert flap_level([100, 50, 20], b) == 2
    assert flap_level([100, 50, 20, 5000], b) == 1
    assert flap_level([100, 50, 20, 5000, 5000], b) == 0
    assert flap_level([10] * 50, b) == adaptive.MAX_FLAP_LEVEL
    sparse = histogram(exponential(mean=900))
    assert adaptive_threshold(sparse, [100, 50], POLICY, None) == 300  # at least B
    assert adaptive_threshold(sparse, [100, 50, 20], POLICY, None) == 600  # then doubling
    assert adaptive_threshold(sparse, [10] * 8, POLICY, None) == 3600  # within the bounds


def test_learner_judges_each_sleep_by_the_next_arrival() -> None:
    learner = ModelLearner()
    for i in range(40):
        learner.arrival(1000.0 + i * 1000, 900.0)
    policy = learner.policy(POLICY, None)
    assert policy.idle_threshold_seconds == 30
    assert learner.policy(POLICY, None) is policy  # cached until the traffic changes
    learner.sleep(50_000.0)
    learner.arrival(50_100.0, None)
    learner.sleep(50_200.0)
    learner.arrival(50_210.0, None)
    assert list(learner.asleep_for) == [100.0, 10.0]
    assert learner.policy(POLICY, None).idle_threshold_seconds == 300


# ---- the registry and the live wiring --------------------------------------------------------


def test_thresholds_only_move_adaptive_models() -> None:
    monitor = TrafficMonitor(clock=lambda: 0.0)
    thresholds = Thresholds.watching(monitor)
    fixed = ModelConfig(
        "f", "vllm", "http://127.0.0.1:1", policy=SleepPolicy(idle_threshold_seconds=120)
    )
    adapt = ModelConfig("a", "vllm", "http://127.0.0.1:2", policy=POLICY)
    now = 0.0
    monitor.clock = lambda: now
    for model in ("f", "a"):
        for i in range(40):
            now = i * 1000.0
            monitor.record_request_end(monitor.record_request_start(model, "/v1/completions"))
    assert thresholds.policy_for(fixed) is fixed.policy
    assert thresholds.threshold_for(fixed) == 120
    assert thresholds.threshold_for(adapt) == 30
    assert thresholds.learners["a"].gaps.total > adaptive.MIN_SAMPLES
    thresholds.keep_only(["a"])
    assert set(thresholds.learners) == {"a"}


def test_traffic_monitor_reports_idle_gaps_from_the_last_activity() -> None:
    now = 100.0
    monitor = TrafficMonitor(clock=lambda: now)
    seen: list[tuple[str, float, float | None]] = []
    monitor.arrival_listeners.append(lambda *event: seen.append(event))
    first = monitor.record_request_start("m", "/v1/completions")  # nothing before: no gap
    now = 110.0
    second = monitor.record_request_start("m", "/v1/completions")  # joins one in flight
    now = 130.0
    monitor.record_request_end(first)
    monitor.record_request_end(second)
    now = 175.0
    monitor.record_request_start("m", "/v1/completions")
    assert seen == [("m", 100.0, None), ("m", 110.0, None), ("m", 175.0, 45.0)]


async def test_live_kvsleep_exports_the_learned_threshold(sim_factory, kvsleep_factory) -> None:
    """Requests through a live kvsleep (fake clock) teach the learner; the reconciler's view and
    /metrics carry the learned threshold, a fixed model keeps its own."""
    import aiohttp

    from tests.kvsleep_harness import post_json, sim_model

    sparse = await sim_factory("vllm", "org/sparse")
    fixed = await sim_factory("vllm", "org/fixed")
    kv = await kvsleep_factory(
        [
            sim_model(
                sparse,
                idle_policy="adaptive",
                idle_threshold_seconds=300,
                min_idle_threshold_seconds=40,
                max_idle_threshold_seconds=3000,
            ),
            sim_model(fixed, idle_threshold_seconds=77),
        ],
        auto_sleep_enabled=False,
    )
    async with aiohttp.ClientSession() as session:
        for _ in range(25):
            kv.clock.advance(1000)
            status, _ = await post_json(
                session,
                f"{kv.url}/v1/completions",
                {"model": "org/sparse", "prompt": "x", "max_tokens": 1},
            )
            assert status == 200
        async with session.get(f"{kv.url}/metrics") as resp:
            text = await resp.text()
    assert 'kvsleep_model_idle_threshold_seconds{model="org/sparse"} 40.0' in text
    assert 'kvsleep_model_idle_threshold_seconds{model="org/fixed"} 77.0' in text
    slot = kv.manager.slots["org/sparse"]
    assert kv.manager.view(slot).policy.idle_threshold_seconds == 40
    assert slot.cfg.policy.idle_threshold_seconds == 300  # the config is not rewritten


# ---- configuration ---------------------------------------------------------------------------


def doc(sleep_manager: dict, **model: object) -> dict:
    return {
        "sleep_manager": sleep_manager,
        "models": [{"name": "m", "engine": "vllm", "url": "http://127.0.0.1:9", **model}],
    }


def test_config_defaults_and_per_model_overrides() -> None:
    config = parse_config(doc({}))
    p = config.models[0].policy
    assert (p.idle_policy, p.min_idle_threshold_seconds, p.max_idle_threshold_seconds) == (
        "fixed",
        30.0,
        3600.0,
    )
    config = parse_config(
        doc(
            {"idle_policy": "adaptive", "min_idle_threshold_seconds": 60},
            idle_policy="fixed",
            max_idle_threshold_seconds=600,
        )
    )
    assert config.sleep_manager.idle_policy == "adaptive"
    p = config.models[0].policy
    assert (p.idle_policy, p.min_idle_threshold_seconds, p.max_idle_threshold_seconds) == (
        "fixed",
        60.0,
        600.0,
    )


@pytest.mark.parametrize(
    ("sleep_manager", "model", "problem"),
    [
        (
            {"idle_policy": "smart"},
            {},
            "sleep_manager.idle_policy: expected one of fixed, adaptive",
        ),
        (
            {"min_idle_threshold_seconds": -1},
            {},
            "sleep_manager.min_idle_threshold_seconds: must be >= 0",
        ),
        (
            {"max_idle_threshold_seconds": 0},
            {},
            "sleep_manager.max_idle_threshold_seconds: must be > 0",
        ),
        (
            {"min_idle_threshold_seconds": 900, "max_idle_threshold_seconds": 600},
            {},
            "sleep_manager.min_idle_threshold_seconds: must be <= max_idle_threshold_seconds (600)",
        ),
        (
            {},
            {"min_idle_threshold_seconds": 5000},
            "models[0].min_idle_threshold_seconds: must be <= max_idle_threshold_seconds (3600)",
        ),
        ({}, {"idle_policy": True}, "models[0].idle_policy: expected one of"),
    ],
)
def test_config_problems_name_their_key(sleep_manager: dict, model: dict, problem: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(doc(sleep_manager, **model))
    assert any(problem in p for p in err.value.problems), err.value.problems


def test_example_config_documents_the_keys() -> None:
    text = (Path(__file__).resolve().parent.parent / "example-config.yaml").read_text()
    for key in ("idle_policy:", "min_idle_threshold_seconds:", "max_idle_threshold_seconds:"):
        assert key in text
