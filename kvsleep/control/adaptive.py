"""Adaptive idle thresholds: learn each model's idle gaps online, pick the threshold they call for.

The rule (ski rental on the learned distribution). Let B be what one wake costs, in seconds of
the model's memory: `idle_threshold_seconds` (the idle time the operator would pay to avoid one
wake) plus `wake_eta_seconds` (memory is held while it reloads). An idle gap g (last request end
to next arrival) under threshold T costs min(g, T) seconds of memory, plus B if g > T (the model
slept and the next request pays a wake). kvsleep picks the T in
[`min_idle_threshold_seconds`, `max_idle_threshold_seconds`] that minimises the expected cost
E[min(g, T)] + B * P(g > T) over the recent gaps. A fixed threshold of B is the classic
break-even (2-competitive) choice; on traffic that keeps its shape the learned T does at least as
well on that cost. Where no recent gap was longer than T, T is twice the longest of them (the
tail beyond is unknown); until MIN_SAMPLES gaps were seen, T is `idle_threshold_seconds`.

Flaps: a sleep the next request undid within B seconds did not pay for its wake. Two in a row
raise the threshold to at least B, each further one doubles it; each sleep that paid off takes
one step back.

Memory per model is bounded: a fixed log-spaced histogram of gaps (decayed, so recent traffic
counts more) and the outcomes of the last few sleeps. The rule is pure functions; the learners
only accumulate the events they are fed, and the live reconciler and `kvsleep simulate` feed
them the same events (arrivals from the traffic monitor, idle sleeps from the policy).
"""

from __future__ import annotations

import dataclasses
import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from kvsleep.config import ModelConfig, SleepPolicy
from kvsleep.control.traffic import TrafficMonitor

BINS_PER_OCTAVE = 4
OCTAVES = 17  # 1 s .. 2**17 s (36 h); shorter gaps fall in bin 0, longer ones in the last bin
EDGES: tuple[float, ...] = tuple(
    2 ** (i / BINS_PER_OCTAVE) for i in range(OCTAVES * BINS_PER_OCTAVE + 1)
)
N_BINS = len(EDGES) + 1
HALF_LIFE_GAPS = 200  # a gap's weight halves after this many newer gaps
DECAY = 0.5 ** (1 / HALF_LIFE_GAPS)
MIN_SAMPLES = 20.0  # decayed weight below which the configured threshold stays in force
RECENT_WEIGHT = 0.5  # a bin holding this much weight had a gap within ~HALF_LIFE_GAPS gaps
SLEEP_OUTCOMES = 8  # recent sleeps judged for flapping
MAX_FLAP_LEVEL = 6


def _bin(gap: float) -> int:
    """Index of the bin holding `gap`: 0 is [0, 1), i is [EDGES[i-1], EDGES[i]), last is open."""
    if gap < 1.0:
        return 0
    return min(N_BINS - 1, 1 + int(math.log2(gap) * BINS_PER_OCTAVE + 1e-9))


@dataclass
class GapHistogram:
    """Decayed counts and sums of idle gaps per bin (fixed size: N_BINS of each).

    Decay is lazy: rather than shrink every bin at each gap (a loop per request when requests
    come one at a time, each after an idle gap), a new gap weighs `1 / DECAY` more than the
    one before, and readers divide by the current weight."""

    _counts: list[float] = field(default_factory=lambda: [0.0] * N_BINS)
    _sums: list[float] = field(default_factory=lambda: [0.0] * N_BINS)
    _total: float = 0.0
    _unit: float = 1.0  # the weight of the newest gap, in stored units

    def add(self, gap: float) -> None:
        self._unit /= DECAY
        i = _bin(gap)
        self._counts[i] += self._unit
        self._sums[i] += gap * self._unit
        self._total += self._unit
        if self._unit > 1e100:  # rescale long before floats overflow
            self._counts = [c / self._unit for c in self._counts]
            self._sums = [x / self._unit for x in self._sums]
            self._total /= self._unit
            self._unit = 1.0

    @property
    def counts(self) -> list[float]:
        return [c / self._unit for c in self._counts]

    @property
    def sums(self) -> list[float]:
        return [x / self._unit for x in self._sums]

    @property
    def total(self) -> float:
        return self._total / self._unit


def expected_cost(hist: GapHistogram, threshold: float, wake_cost: float) -> float:
    """E[min(g, T)] + B * P(g > T) per idle gap, a bin counting as below T if its mean is."""
    below = above = 0.0
    held = 0.0
    for count, total in zip(hist.counts, hist.sums, strict=True):
        if count <= 0.0:
            continue
        if total / count <= threshold:
            held += total
            below += count
        else:
            above += count
    weight = below + above
    if weight <= 0.0:
        return 0.0
    return (held + above * (threshold + wake_cost)) / weight


def best_threshold(hist: GapHistogram, wake_cost: float, low: float, high: float) -> float:
    """The threshold in [low, high] with the least expected cost. Ties go to the smaller one:
    past the longest gap seen lately every threshold costs the same, and the idle time already
    longer than all of them is evidence that this gap is a long one."""
    candidates = sorted({low, high, *(e for e in EDGES if low < e < high)})
    # Bin means rise with the bin index, so the bins below T are a prefix: one pass.
    bins = [
        (total / count, count, total)
        for count, total in zip(hist.counts, hist.sums, strict=True)
        if count > 0.0
    ]
    weight = sum(count for _, count, _ in bins)
    if weight <= 0.0:
        return high
    i = 0
    below = held = 0.0
    best, best_cost = high, math.inf
    for t in candidates:
        while i < len(bins) and bins[i][0] <= t:
            below += bins[i][1]
            held += bins[i][2]
            i += 1
        cost = (held + (weight - below) * (t + wake_cost)) / weight
        if cost < best_cost * (1 - 1e-9):
            best, best_cost = t, cost
    return best


def flap_level(asleep_for: Iterable[float], wake_cost: float) -> int:
    """How hard the model flaps: a sleep undone within `wake_cost` seconds is a flap (one alone
    is a bet the expected cost already priced in); each flap right after another raises the
    level by one, each sleep that paid off lowers it by one."""
    level = streak = 0
    for seconds in asleep_for:
        if seconds < wake_cost:
            streak += 1
            if streak >= 2:
                level = min(MAX_FLAP_LEVEL, level + 1)
        else:
            streak = 0
            level = max(0, level - 1)
    return level


def wake_cost_seconds(policy: SleepPolicy, wake_eta: float | None) -> float:
    """B: what one wake costs, in seconds of holding the model's memory."""
    return policy.idle_threshold_seconds + (wake_eta or 0.0)


def adaptive_threshold(
    hist: GapHistogram, asleep_for: Iterable[float], policy: SleepPolicy, wake_eta: float | None
) -> float:
    """The whole rule: learned optimum (or the configured threshold until enough gaps were
    seen), raised after flaps, clamped to the bounds."""
    low, high = policy.min_idle_threshold_seconds, policy.max_idle_threshold_seconds
    cost = wake_cost_seconds(policy, wake_eta)
    if hist.total < MIN_SAMPLES:
        threshold = policy.idle_threshold_seconds
    else:
        threshold = best_threshold(hist, cost, low, high)
        recent = [
            total / count
            for count, total in zip(hist.counts, hist.sums, strict=True)
            if count >= RECENT_WEIGHT
        ]
        if recent and max(recent) <= threshold:
            # Nothing seen lately was longer: the tail beyond is unknown, keep a margin.
            threshold = max(threshold, 2 * max(recent))
    level = flap_level(asleep_for, cost)
    if level:
        threshold = max(threshold, cost) * 2 ** (level - 1)
    return min(high, max(low, threshold))


@dataclass
class ModelLearner:
    """What kvsleep knows of one model's traffic: its gaps and how its recent sleeps ended."""

    gaps: GapHistogram = field(default_factory=GapHistogram)
    asleep_for: deque[float] = field(default_factory=lambda: deque(maxlen=SLEEP_OUTCOMES))
    slept_at: float | None = None
    cached: tuple[SleepPolicy, float | None, SleepPolicy] | None = None

    def arrival(self, now: float, idle_gap: float | None) -> None:
        if self.slept_at is not None:
            self.asleep_for.append(max(0.0, now - self.slept_at))
            self.slept_at = None
            self.cached = None
        if idle_gap is not None:
            self.gaps.add(idle_gap)
            self.cached = None

    def sleep(self, now: float) -> None:
        self.slept_at = now
        self.cached = None

    def policy(self, policy: SleepPolicy, wake_eta: float | None) -> SleepPolicy:
        """`policy` with the threshold in force (computed once per change of traffic)."""
        cached = self.cached
        if cached is not None and cached[1] == wake_eta and cached[0] == policy:
            return cached[2]
        value = adaptive_threshold(self.gaps, self.asleep_for, policy, wake_eta)
        in_force = dataclasses.replace(policy, idle_threshold_seconds=value)
        self.cached = (policy, wake_eta, in_force)
        return in_force


class Thresholds:
    """Every model's learner, and the threshold in force for a model's config.

    Fed by the traffic monitor (`note_arrival`, an arrival listener) and by whoever applies the
    policy's idle sleeps (`note_sleep`); read wherever a policy view is built.
    """

    def __init__(self) -> None:
        self.learners: dict[str, ModelLearner] = {}

    @classmethod
    def watching(cls, traffic_monitor: TrafficMonitor) -> Thresholds:
        """A registry fed by `traffic_monitor`'s arrivals."""
        thresholds = cls()
        traffic_monitor.arrival_listeners.append(thresholds.note_arrival)
        return thresholds

    def learner(self, model: str) -> ModelLearner:
        learner = self.learners.get(model)
        if learner is None:
            learner = self.learners[model] = ModelLearner()
        return learner

    def note_arrival(self, model: str, now: float, idle_gap: float | None) -> None:
        self.learner(model).arrival(now, idle_gap)

    def note_sleep(self, model: str, now: float) -> None:
        self.learner(model).sleep(now)

    def keep_only(self, models: Iterable[str]) -> None:
        """Forget models no longer configured (bounded memory across reloads)."""
        keep = set(models)
        for name in [n for n in self.learners if n not in keep]:
            del self.learners[name]

    def policy_for(self, cfg: ModelConfig) -> SleepPolicy:
        """The model's policy with the threshold in force (unchanged when fixed)."""
        if cfg.policy.idle_policy != "adaptive":
            return cfg.policy
        return self.learner(cfg.served_name).policy(cfg.policy, cfg.wake_eta_seconds)

    def threshold_for(self, cfg: ModelConfig) -> float:
        """The idle threshold in force for this model now."""
        return self.policy_for(cfg).idle_threshold_seconds
