"""Warm autoscaling of a model's replicas by sleep and wake, as pure decisions.

A model may run several replicas (engines). The scaler wakes an asleep replica when the demand
outgrows the awake ones and drains and sleeps one when the demand fits in fewer; the router
spreads requests over the awake ones. A step up costs a wake (seconds), not a cold start.

Nothing here does I/O or reads a clock: the reconciler calls `decide_scale` once per pass with
each replica as it stands, the policy, what the last pass remembered and the time, and carries
out the one decision it returns; the router calls `pick_replica` per request. Replicas come in
config order: that order is their index (scale-up wakes the lowest asleep index first, scale-down
sleeps the highest among the least loaded, so replica 0 is the one that stays).

Demand is measured in replicas: for each configured target, what is in use divided by what one
replica should carry (the pod autoscaler's `ceil(replicas * metric / target)`), and the largest of
them counts. The scaler acts on the demand it expects once a wake would be done: the trend of the
recent samples, extrapolated over the wake ETA, so a wake starts before the awake replicas
saturate. The samples start afresh at each scale action: a step already answered by a wake is
not a ramp to answer again. A step that stops just short of the capacity looks like a ramp for
up to `trend_window_seconds`; the replica it may wake sleeps again after
`scale_down_after_seconds` (the price of waking early on a real ramp).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

from kvsleep.core.states import ModelState

# Bounded vocabularies: ScaleDecision.reason and .blocked become metric labels.
REASONS = (
    "min_awake",  # up: fewer than min_awake are awake or waking
    "target",  # up: the demand is above what the awake and waking replicas carry
    "trend",  # up: it will be, by the time a wake is done
    "max_awake",  # down: more than max_awake are awake
    "below_target",  # down: the demand fits in one fewer replica
    "wake_in_progress",  # none: more is wanted, a wake is already under way
    "drain_in_progress",  # none: fewer is wanted, a drain is already under way
    "cooldown",  # none: fewer is wanted, too soon after a scale-up
    "waiting",  # none: more or fewer is wanted, not yet for long enough
    "steady",  # none: the replicas match the demand
)
BLOCKED = (
    "max_awake",  # the demand wants more than max_awake
    "budget",  # an asleep replica exists but none fits its GPUs' budget
    "unavailable",  # no replica is asleep to be woken (failed, down, draining, ...)
)

# Numbers computed from float targets (3 * 0.8 / 0.8) must not ask for a replica too many.
_EPSILON = 1e-9
# Bound on the samples kept for the trend, whatever the pass interval.
_MAX_SAMPLES = 120

_COMING = (ModelState.WAKING, ModelState.STARTING)
_LEAVING = (ModelState.DRAINING, ModelState.SLEEPING)


@dataclass(frozen=True)
class ScalingPolicy:
    """The config's `scaling:` block of a model.

    Targets left at None do not count; with none at all only min_awake and max_awake apply.
    """

    min_awake: int = 0  # 0 = scale to zero (the idle policy sleeps the last replica)
    max_awake: int | None = None  # None = all replicas
    target_in_flight: float | None = 8.0  # per awake replica: in flight + held (kvsleep's)
    target_queue: float | None = None  # per awake replica: engine-reported waiting requests
    target_kv_cache_usage: float | None = None  # 0..1, mean over awake replicas
    scale_up_after_seconds: float = 5.0
    scale_down_after_seconds: float = 120.0
    # How far back the demand samples reach for the trend; 0 turns the trend off.
    trend_window_seconds: float = 30.0


@dataclass(frozen=True)
class ReplicaView:
    """One replica (engine) of a model at one instant."""

    replica: str  # bounded label from config ("0", "1", ... or a configured name)
    state: ModelState
    in_flight: int  # requests inside it (kvsleep's count)
    held: int  # requests held for its wake
    queue: float | None = None  # engine-reported waiting requests, where known
    kv_cache_usage: float | None = None
    wake_eta: float | None = None  # expected wake seconds (median of measured wakes)
    fits: bool = True  # its GPUs' budget has room for it without evicting anyone
    last_activity: float = 0.0


@dataclass(frozen=True)
class ScaleMemory:
    """What the scaler remembers between passes (returned, not mutated)."""

    above_since: float | None = None
    below_since: float | None = None
    last_up: float | None = None
    last_down: float | None = None
    demand: tuple[tuple[float, float], ...] = ()  # recent (time, demand) samples for the trend
    awake: int | None = None  # replicas awake at the last pass (None before the first)


@dataclass(frozen=True)
class ScaleDecision:
    """One pass's verdict: at most one action, and what the demand asked for (for metrics)."""

    action: str | None  # "up" | "down" | None
    replica: str | None  # the replica to wake, or to drain and sleep
    reason: str  # one of REASONS
    desired: int  # replicas the demand asks for, clamped to [min_awake, max_awake]
    blocked: str | None = None  # one of BLOCKED when the demand wants more than it can have
    demand: float = 0.0  # the demand in replicas, trend included (unclamped, for a gauge)


def demand(
    replicas: Sequence[ReplicaView], policy: ScalingPolicy, in_flight: float | None = None
) -> float:
    """The demand now, in replicas: the largest of the configured targets' ratios.

    In-flight counts every request kvsleep has for the model (held ones and those still inside a
    draining replica too), so a drain never makes the demand look smaller than it is: the mean
    since the last pass where the caller measured it (`in_flight`), else the replicas' counts
    now. The mean keeps a load that hovers around the target from waking and sleeping a replica
    on every chance peak (requests come and go between two passes). The
    engines' queue and KV cache usage are known only for awake replicas: their mean over the
    awake replicas that report it, times the awake replicas (unknown is not zero).
    """
    loads = [0.0]
    target = policy.target_in_flight
    if target is not None and target > 0:
        count = sum(r.in_flight + r.held for r in replicas) if in_flight is None else in_flight
        loads.append(count / target)
    awake = [r for r in replicas if r.state is ModelState.AWAKE]
    target = policy.target_queue
    queues = [r.queue for r in awake if r.queue is not None]
    if target is not None and target > 0 and queues:
        loads.append(sum(queues) / len(queues) * len(awake) / target)
    target = policy.target_kv_cache_usage
    usages = [r.kv_cache_usage for r in awake if r.kv_cache_usage is not None]
    if target is not None and target > 0 and usages:
        loads.append(sum(usages) / len(usages) * len(awake) / target)
    return max(loads)


def projected_demand(samples: Sequence[tuple[float, float]], ahead: float) -> float | None:
    """The demand `ahead` seconds after the last sample, by a least-squares line through them.

    None when the samples cannot tell a trend (fewer than two, or all at one instant).
    """
    if len(samples) < 2:
        return None
    n = len(samples)
    mean_t = sum(t for t, _ in samples) / n
    mean_d = sum(d for _, d in samples) / n
    var = sum((t - mean_t) ** 2 for t, _ in samples)
    if var <= 0:
        return None
    slope = sum((t - mean_t) * (d - mean_d) for t, d in samples) / var
    return samples[-1][1] + slope * ahead


def desired_replicas(load: float, policy: ScalingPolicy, total: int) -> int:
    """Replicas a demand of `load` replicas asks for, within [min_awake, max_awake] of `total`."""
    top = awake_ceiling(policy, total)
    return max(min(policy.min_awake, top), min(top, _whole(load)))


def awake_ceiling(policy: ScalingPolicy, total: int) -> int:
    """max_awake, or every replica when it is not set (and never more than there are)."""
    return total if policy.max_awake is None else max(0, min(policy.max_awake, total))


def _whole(load: float) -> int:
    return max(0, math.ceil(load - _EPSILON))


def decide_scale(
    replicas: Sequence[ReplicaView],
    policy: ScalingPolicy,
    memory: ScaleMemory,
    now: float,
    in_flight: float | None = None,
) -> tuple[ScaleDecision, ScaleMemory]:
    """One scaler pass for one model: at most one wake or one drain-and-sleep.

    Awake replicas are capacity; waking and starting ones are capacity coming. Draining,
    sleeping, failed, unknown and down replicas are neither chosen nor counted.

    `in_flight`: kvsleep's requests for the model, averaged since the last pass (see `demand`).

    - Fewer than min_awake awake or coming: wake one at once (reason "min_awake"), even while
      another wake is under way: a floor is configuration, not a guess at demand.
    - More than max_awake awake: drain one at once (reason "max_awake").
    - Demand above the awake and coming replicas for `scale_up_after_seconds`: wake one more
      (lowest index asleep that fits its budget). "Above" includes the demand extrapolated over
      the wake ETA of that replica (reason "trend" when only that is above), so the wake is done
      when the load arrives. No second demand wake while one is under way: the replica coming
      is counted, and the next is judged once it serves.
    - Demand, trend included, that fits in one fewer awake replica for
      `scale_down_after_seconds`: drain and sleep the least loaded (ties: the highest index).
      Not while a wake or another drain is under way, nor within `scale_down_after_seconds` of
      the last scale-up or of a replica turning awake by other means (an operator's wake, an
      engine back up): anti-flap. Each step down restarts that wait.
    - Never the last awake replica: with min_awake 0 the idle policy sleeps it when its idle
      threshold passes, and a request for a model with nothing awake is held and wakes one,
      exactly as for a single engine.
    - When more is wanted but cannot be had, `blocked` says why ("max_awake", "budget",
      "unavailable") at once, whatever the timer: it feeds the alerts, which have their own
      `for:`.
    """
    views = list(replicas)
    awake = [r for r in views if r.state is ModelState.AWAKE]
    coming = [r for r in views if r.state in _COMING]
    leaving = [r for r in views if r.state in _LEAVING]
    asleep = [r for r in views if r.state is ModelState.ASLEEP]
    candidate = next((r for r in asleep if r.fits), None)
    capacity = len(awake) + len(coming)
    top = awake_ceiling(policy, len(views))
    floor = min(policy.min_awake, top)

    current = demand(views, policy, in_flight)
    window = policy.trend_window_seconds
    samples = tuple(s for s in memory.demand if now - window < s[0] < now)
    samples = (*samples, (now, current))[-_MAX_SAMPLES:] if window > 0 else ()
    projected = current
    if candidate is not None and candidate.wake_eta is not None:
        ahead = projected_demand(samples, candidate.wake_eta)
        if ahead is not None:
            projected = max(current, ahead)
    wanted = _whole(projected)
    desired = desired_replicas(projected, policy, len(views))

    above = wanted > capacity
    below = wanted < len(awake)
    above_since = (now if memory.above_since is None else memory.above_since) if above else None
    below_since = (now if memory.below_since is None else memory.below_since) if below else None
    # A replica that turned awake since the last pass (its wake done, an operator's wake, an
    # engine back) starts the anti-flap wait, so that no scale-down undoes it at once.
    joined = memory.awake is not None and len(awake) > memory.awake
    memory = replace(
        memory,
        above_since=above_since,
        below_since=below_since,
        demand=samples,
        awake=len(awake),
        last_up=now if joined else memory.last_up,
    )

    def verdict(
        action: str | None, replica: str | None, reason: str, blocked: str | None = None
    ) -> ScaleDecision:
        return ScaleDecision(action, replica, reason, desired, blocked, projected)

    def up(replica: ReplicaView, reason: str) -> tuple[ScaleDecision, ScaleMemory]:
        return verdict("up", replica.replica, reason), replace(
            memory, above_since=None, last_up=now, demand=samples[-1:]
        )

    def down(reason: str) -> tuple[ScaleDecision, ScaleMemory]:
        # The least loaded; among equals the highest index, so replica 0 is the one that stays.
        victim = min(reversed(awake), key=lambda r: r.in_flight + r.held)
        return verdict("down", victim.replica, reason), replace(
            memory, below_since=None, last_down=now, demand=samples[-1:]
        )

    def no_room() -> str:
        return "budget" if asleep else "unavailable"

    if capacity < floor:
        if candidate is None:
            return verdict(None, None, "min_awake", no_room()), memory
        return up(candidate, "min_awake")
    if len(awake) > top and not leaving:
        return down("max_awake")
    if above:
        reason = "target" if _whole(current) > capacity else "trend"
        if capacity >= top:
            return verdict(None, None, reason, "max_awake"), memory
        if candidate is None:
            return verdict(None, None, reason, no_room()), memory
        if coming:
            return verdict(None, None, "wake_in_progress"), memory
        if above_since is not None and now - above_since >= policy.scale_up_after_seconds:
            return up(candidate, reason)
        return verdict(None, None, "waiting"), memory
    if below and len(awake) > max(floor, 1):
        if coming:
            return verdict(None, None, "wake_in_progress"), memory
        if leaving:
            return verdict(None, None, "drain_in_progress"), memory
        if memory.last_up is not None and now - memory.last_up < policy.scale_down_after_seconds:
            return verdict(None, None, "cooldown"), memory
        if below_since is not None and now - below_since >= policy.scale_down_after_seconds:
            return down("below_target")
        return verdict(None, None, "waiting"), memory
    return verdict(None, None, "steady"), memory


def pick_replica(
    replicas: Sequence[ReplicaView],
    affinity: str | None,
    rand: float,
    *,
    bound: int | None = None,
) -> str | None:
    """The awake replica a request goes to; None when none is awake (the caller holds the
    request and wakes one). Never a replica in any other state.

    Without `affinity`: the one with the fewest requests in flight, ties broken by `rand` in
    [0, 1) (index `int(rand * len(ties))` in config order), so equal replicas share the load
    and a test can pin the choice. With `affinity` (a header or the `user` field): rendezvous
    hashing of the key over the awake replicas, so one key keeps reaching the same replica (and
    its prefix cache) while that replica is awake, and only the keys of a replica that leaves
    or joins move. The hash is hashlib's, not `hash()`, which differs between processes.
    With `bound`, a key skips replicas that already have `bound` or more in flight (in its own
    rendezvous order) and falls back to the least loaded, so affinity cannot pile requests on
    one replica while another idles.
    """
    awake = [r for r in replicas if r.state is ModelState.AWAKE]
    if not awake:
        return None
    if affinity is not None:
        ranked = sorted(awake, key=lambda r: _weight(affinity, r.replica), reverse=True)
        for r in ranked:
            if bound is None or r.in_flight < bound:
                return r.replica
    least = min(r.in_flight for r in awake)
    ties = [r for r in awake if r.in_flight == least]
    return ties[min(len(ties) - 1, max(0, int(rand * len(ties))))].replica


def _weight(key: str, replica: str) -> int:
    digest = hashlib.blake2b(f"{key}\0{replica}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


# A model's state is its most available replica's: awake when any replica is (the kvcached API
# and kvsleep_model_state see one model), else the one closest to serving.
_AVAILABILITY = (
    ModelState.AWAKE,
    ModelState.WAKING,
    ModelState.STARTING,
    ModelState.DRAINING,
    ModelState.SLEEPING,
    ModelState.ASLEEP,
    ModelState.UNKNOWN,
    ModelState.DOWN,
    ModelState.FAILED,
)


def model_state(states: Sequence[ModelState]) -> ModelState:
    """The state a model with these replicas shows as one model."""
    return min(states, key=_AVAILABILITY.index)
