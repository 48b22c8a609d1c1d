"""Every metric kvsleep exports, defined in one place so names and labels stay the contract.

Per-request metrics are updated on the hot path; everything that is a *view* of current state
(model state, in-flight, held, last-seen, engine up, thresholds) is computed at scrape time by a
collector, so the data path never touches a gauge and the numbers can never drift from the truth.
"""

from __future__ import annotations

from collections import Counter as Tally
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    disable_created_metrics,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from kvsleep import __version__
from kvsleep.core.scaling import BLOCKED
from kvsleep.core.states import ModelState

# The router adds well under a millisecond; engines take seconds to minutes.
# `_created` series double the exposition and no dashboard or alert of ours reads them.
disable_created_metrics()

REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
# Wakes span a warm vLLM level-1 resume (~0.1 s) to a cold weight reload (minutes).
OPERATION_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600)
RECONCILE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5)

GB = 1024**3
# Rejections alerts watch (`asleep_no_wake` is what `wakeup_on_request: false` asks for).
ALERTED_REJECT_REASONS = ("queue_full", "wake_timeout", "wake_failed")


@dataclass(frozen=True)
class ReplicaSnapshot:
    """One engine of a model (a one-engine model is replica "0")."""

    replica: str
    state: ModelState
    in_flight: int


@dataclass(frozen=True)
class ScalingSnapshot:
    """A scaled model's bounds and the scaler's last verdict."""

    min_awake: int
    max_awake: int
    desired: int | None  # None until the scaler's first pass
    demand: float | None
    blocked: str | None


@dataclass(frozen=True)
class ModelSnapshot:
    """What the state collector needs to know about one model at scrape time."""

    name: str
    state: ModelState
    in_flight: int
    held: int
    last_request_timestamp: float
    idle_threshold_seconds: float
    engine_up: bool | None
    wake_eta_seconds: float | None = None
    waiting_for_memory: bool = False
    cannot_sleep: bool = False
    sleep_failures: int = 0
    replicas: tuple[ReplicaSnapshot, ...] = ()
    scaling: ScalingSnapshot | None = None


class SnapshotSource(Protocol):
    def model_snapshots(self) -> Iterable[ModelSnapshot]: ...

    def gpu_snapshots(self) -> Iterable[tuple[int, float, float]]:
        """(GPU id, budget GB, committed GB) for every budgeted GPU."""
        ...


class _StateCollector(Collector):
    def __init__(self, source: SnapshotSource) -> None:
        self._source = source

    def collect(self) -> Iterator[Metric]:
        state = GaugeMetricFamily(
            "kvsleep_model_state",
            "Current sleep state of each model (1 for the state it is in).",
            labels=["model", "state"],
        )
        in_flight = GaugeMetricFamily(
            "kvsleep_requests_in_flight",
            "Requests received and not yet fully answered (held requests included).",
            labels=["model"],
        )
        held = GaugeMetricFamily(
            "kvsleep_held_requests",
            "Requests waiting for their model to wake.",
            labels=["model"],
        )
        last_seen = GaugeMetricFamily(
            "kvsleep_model_last_request_timestamp_seconds",
            "Unix time of the latest request start or end for the model (0 = never).",
            labels=["model"],
        )
        threshold = GaugeMetricFamily(
            "kvsleep_model_idle_threshold_seconds",
            "Idle time after which the model is put to sleep (policy in force).",
            labels=["model"],
        )
        up = GaugeMetricFamily(
            "kvsleep_engine_up",
            "Whether the model's engine answered its last probe (1) or not (0).",
            labels=["model"],
        )
        eta = GaugeMetricFamily(
            "kvsleep_model_wake_eta_seconds",
            "Expected wake time: median of recent wakes, or the configured guess.",
            labels=["model"],
        )
        blocked = GaugeMetricFamily(
            "kvsleep_model_waiting_for_memory",
            "1 while a wake of the model waits for room in its GPUs' memory budget.",
            labels=["model"],
        )
        cannot_sleep = GaugeMetricFamily(
            "kvsleep_model_cannot_sleep",
            "1 when the model's engine has no sleep route (404/405): idle sleeps stop until a "
            "reload or an engine restart.",
            labels=["model"],
        )
        failures = GaugeMetricFamily(
            "kvsleep_model_sleep_failures",
            "Failed sleeps of the model in a row; idle sleeps back off exponentially meanwhile.",
            labels=["model"],
        )
        replicas = GaugeMetricFamily(
            "kvsleep_model_replicas",
            "Replicas (engines) of the model in each state.",
            labels=["model", "state"],
        )
        replica_state = GaugeMetricFamily(
            "kvsleep_replica_state",
            "State of each replica of the model (1 for the state it is in).",
            labels=["model", "replica", "state"],
        )
        replica_in_flight = GaugeMetricFamily(
            "kvsleep_replica_in_flight_requests",
            "Requests inside the replica's engine (held ones are not yet in any).",
            labels=["model", "replica"],
        )
        desired = GaugeMetricFamily(
            "kvsleep_model_replicas_desired",
            "Replicas the scaler wants awake: the demand within [min_awake, max_awake].",
            labels=["model"],
        )
        demand = GaugeMetricFamily(
            "kvsleep_model_replica_demand",
            "The demand in replicas (in flight over target, engine gauges, trend included).",
            labels=["model"],
        )
        min_awake = GaugeMetricFamily(
            "kvsleep_model_replicas_min_awake",
            "Replicas kept awake whatever the demand (scaling.min_awake).",
            labels=["model"],
        )
        max_awake = GaugeMetricFamily(
            "kvsleep_model_replicas_max_awake",
            "Most replicas awake at once (scaling.max_awake, else all).",
            labels=["model"],
        )
        scale_blocked = GaugeMetricFamily(
            "kvsleep_model_scale_blocked",
            "1 while the demand wants more awake replicas than it can have, by why.",
            labels=["model", "reason"],
        )
        for snap in self._source.model_snapshots():
            counts = Tally(r.state for r in snap.replicas)
            for candidate in ModelState:
                replicas.add_metric([snap.name, candidate.value], counts[candidate])
            for r in snap.replicas:
                for candidate in ModelState:
                    current = 1.0 if candidate is r.state else 0.0
                    replica_state.add_metric([snap.name, r.replica, candidate.value], current)
                replica_in_flight.add_metric([snap.name, r.replica], r.in_flight)
            if (scaled := snap.scaling) is not None:
                min_awake.add_metric([snap.name], scaled.min_awake)
                max_awake.add_metric([snap.name], scaled.max_awake)
                if scaled.desired is not None:
                    desired.add_metric([snap.name], scaled.desired)
                if scaled.demand is not None:
                    demand.add_metric([snap.name], scaled.demand)
                for reason in BLOCKED:
                    current = 1.0 if reason == scaled.blocked else 0.0
                    scale_blocked.add_metric([snap.name, reason], current)
            for candidate in ModelState:
                current = 1.0 if candidate is snap.state else 0.0
                state.add_metric([snap.name, candidate.value], current)
            in_flight.add_metric([snap.name], snap.in_flight)
            held.add_metric([snap.name], snap.held)
            last_seen.add_metric([snap.name], snap.last_request_timestamp)
            threshold.add_metric([snap.name], snap.idle_threshold_seconds)
            if snap.engine_up is not None:
                up.add_metric([snap.name], 1.0 if snap.engine_up else 0.0)
            if snap.wake_eta_seconds is not None:
                eta.add_metric([snap.name], snap.wake_eta_seconds)
            blocked.add_metric([snap.name], 1.0 if snap.waiting_for_memory else 0.0)
            cannot_sleep.add_metric([snap.name], 1.0 if snap.cannot_sleep else 0.0)
            failures.add_metric([snap.name], snap.sleep_failures)
        yield from (
            state,
            in_flight,
            held,
            last_seen,
            threshold,
            up,
            eta,
            blocked,
            cannot_sleep,
            failures,
            replicas,
            replica_state,
            replica_in_flight,
            desired,
            demand,
            min_awake,
            max_awake,
            scale_blocked,
        )
        budget = GaugeMetricFamily(
            "kvsleep_gpu_memory_budget_bytes",
            "GPU memory the configuration lets models hold.",
            labels=["gpu"],
        )
        committed = GaugeMetricFamily(
            "kvsleep_gpu_memory_committed_bytes",
            "GPU memory held by models that are not asleep (their configured memory_gb).",
            labels=["gpu"],
        )
        for gpu, budget_gb, committed_gb in self._source.gpu_snapshots():
            budget.add_metric([str(gpu)], budget_gb * GB)
            committed.add_metric([str(gpu)], committed_gb * GB)
        yield from (budget, committed)


class Metrics:
    """The registry and every instrument; one instance per server so tests can run several."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        for default in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
            self.registry.register(default)
        reg = self.registry
        self._request_children: dict[tuple[str, str, int], tuple[Any, Any]] = {}
        self.requests = Counter(
            "kvsleep_requests",
            "Requests routed to a configured model, by HTTP status code.",
            ["model", "endpoint", "code"],
            registry=reg,
        )
        self.request_duration = Histogram(
            "kvsleep_request_duration_seconds",
            "Time from request arrival to the last byte relayed (hold time included).",
            ["model", "endpoint"],
            buckets=REQUEST_BUCKETS,
            registry=reg,
        )
        self.unknown_model_requests = Counter(
            "kvsleep_unknown_model_requests",
            "Requests naming a model that is not configured (the name is never a label).",
            ["endpoint"],
            registry=reg,
        )
        self.sleeps = Counter(
            "kvsleep_sleeps",
            "Sleep operations, by what asked for them and how they ended.",
            ["model", "reason", "result"],
            registry=reg,
        )
        self.wakes = Counter(
            "kvsleep_wakes",
            "Wake operations, by what asked for them and how they ended.",
            ["model", "reason", "result"],
            registry=reg,
        )
        self.sleep_duration = Histogram(
            "kvsleep_sleep_duration_seconds",
            "Time the engine took to go to sleep (drain excluded).",
            ["model"],
            buckets=OPERATION_BUCKETS,
            registry=reg,
        )
        self.wake_duration = Histogram(
            "kvsleep_wake_duration_seconds",
            "Time the engine took to wake, weight reloads included.",
            ["model"],
            buckets=OPERATION_BUCKETS,
            registry=reg,
        )
        self.request_hold = Histogram(
            "kvsleep_request_hold_seconds",
            "Time a request waited for its model to become awake.",
            ["model"],
            buckets=OPERATION_BUCKETS,
            registry=reg,
        )
        self.rejected_requests = Counter(
            "kvsleep_rejected_requests",
            "Requests refused because their model could not be made awake in time.",
            ["model", "reason"],
            registry=reg,
        )
        self.evictions = Counter(
            "kvsleep_evictions",
            "Models put to sleep to make GPU memory room for a wake.",
            ["model"],
            registry=reg,
        )
        self.scale_events = Counter(
            "kvsleep_scale_events",
            "Replicas the scaler woke (up) or drained and slept (down), by why.",
            ["model", "replica", "direction", "reason"],
            registry=reg,
        )
        self.reconcile_duration = Histogram(
            "kvsleep_reconcile_duration_seconds",
            "Time one reconcile pass took (probes included).",
            buckets=RECONCILE_BUCKETS,
            registry=reg,
        )
        self.state_write_errors = Counter(
            "kvsleep_state_write_errors",
            "Writes of the state file that failed. A record that must exist before an engine "
            "call (SGLang release/resume, every sleep) failing means that call is not made.",
            registry=reg,
        )
        self.reconcile_errors = Counter(
            "kvsleep_reconcile_errors",
            "Reconcile passes or actions that raised an error.",
            registry=reg,
        )
        self.config_last_reload_successful = Gauge(
            "kvsleep_config_last_reload_successful",
            "Whether the last configuration load or reload succeeded.",
            registry=reg,
        )
        self.config_last_reload_success_timestamp = Gauge(
            "kvsleep_config_last_reload_success_timestamp_seconds",
            "Unix time of the last successful configuration load or reload.",
            registry=reg,
        )
        self.policy_source_up = Gauge(
            "kvsleep_policy_source_up",
            "Whether idle decisions could read their traffic source at the last reconcile "
            "(always 1 for the local source; 0: no model is slept).",
            registry=reg,
        )
        self.policy_source_up.set(1)
        self.client_connections = Gauge(
            "kvsleep_client_connections",
            "Client connections open now.",
            registry=reg,
        )
        self.client_connections_closed = Counter(
            "kvsleep_client_connections_closed",
            "Client connections kvsleep closed to bound what clients can cost: idle_timeout, "
            "header_timeout, body_timeout, or limit (max_client_connections reached).",
            ["reason"],
            registry=reg,
        )
        for reason in ("idle_timeout", "header_timeout", "body_timeout", "limit"):
            self.client_connections_closed.labels(reason)
        Info("kvsleep_build", "kvsleep build information.", registry=reg).info(
            {"version": __version__}
        )

    def add_models(self, names: Iterable[str]) -> None:
        """Create the zero-valued series alerts rely on, so a first failure shows as an increase.

        Only those: every series costs scrape time, and a fleet may configure a thousand models.
        """
        for name in names:
            self.wakes.labels(name, "request", "error")
            for reason in ALERTED_REJECT_REASONS:
                self.rejected_requests.labels(name, reason)

    def count_request(self, model: str, endpoint: str, code: int, seconds: float) -> None:
        """One answered request. The labelled children are kept per label set: looking them up
        again for every request is a measurable part of the data path's cost."""
        children = self._request_children.get((model, endpoint, code))
        if children is None:
            children = self._request_children[(model, endpoint, code)] = (
                self.requests.labels(model, endpoint, str(code)),
                self.request_duration.labels(model, endpoint),
            )
        children[0].inc()
        children[1].observe(seconds)

    def remove_model(self, name: str) -> None:
        """Drop a model's series when it leaves the configuration (hot reload)."""
        for key in [k for k in self._request_children if k[0] == name]:
            del self._request_children[key]
        for metric in (
            self.requests,
            self.request_duration,
            self.sleeps,
            self.wakes,
            self.sleep_duration,
            self.wake_duration,
            self.request_hold,
            self.rejected_requests,
            self.evictions,
            self.scale_events,
        ):
            metric.remove_by_labels({"model": name})

    def watch(self, source: SnapshotSource) -> None:
        self.registry.register(_StateCollector(source))
