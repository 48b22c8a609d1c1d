"""`kvsleep simulate`: replay request arrivals through the live sleep policy on a virtual clock.

Nothing here decides anything: each model is the live per-engine state machine
(`core/machine.py`: admission, holding, draining, every state change), every reconcile tick
builds the policy's views with the manager's `EngineMachine.view` and calls `policy.decide`,
idle time comes from the real `TrafficMonitor` and adaptive thresholds from the real
`adaptive.Thresholds`. What the replay adds is time: requests arrive and end on a virtual clock,
a wake takes the model's wake latency (requests arriving meanwhile wait for it, up to their
wake timeout), a sleep is instant or takes `sleep_seconds`, and a reconcile tick runs every
check interval.

Inputs: a CSV trace (`timestamp,model,duration`), kvsleep's own request counters in Prometheus,
or a seeded synthetic trace (`kvsleep.lab.traces`). Outputs, per model and in total and for every
policy compared: GPU memory-hours held, the share saved against always-on, requests that waited
for a wake, the latency those waits added (p50/p99 over all requests), sleep cycles per hour.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime as dt
import heapq
import itertools
import json
import math
import re
import urllib.parse
import urllib.request
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from kvsleep.config import Config, ModelConfig
from kvsleep.control.adaptive import Thresholds
from kvsleep.control.traffic import RequestStats, TrafficMonitor
from kvsleep.core import policy
from kvsleep.core.engine_facts import EngineSteps, Observation
from kvsleep.core.machine import (
    JOBS,
    Admit,
    Arrived,
    Call,
    CallDone,
    CallResult,
    CheckLoad,
    Drained,
    Effect,
    EngineMachine,
    Event,
    HeldLeft,
    Hold,
    Identified,
    Identify,
    Job,
    LaunchStarted,
    LoadReported,
    MakeRoom,
    Recorded,
    RejectHeld,
    ReleaseHeld,
    RoomReady,
    Start,
    WaitDrained,
    WantSleep,
    WantWake,
    WriteRecord,
)
from kvsleep.core.states import ModelState
from kvsleep.engines import adapter_for

# Events at the same instant run in this order (the live equivalence test follows it too).
OP_DONE, END, ARRIVAL, TICK = range(4)

DEFAULT_SWEEP = (15, 30, 60, 90, 120, 180, 300, 450, 600, 900, 1200, 1800, 2700, 3600)
MAIN_POLICIES = ("always-on", "config", "fixed-300", "adaptive")
ENDPOINT = "/v1/completions"


class TraceError(Exception):
    """A trace that cannot be read; the message names the file and line."""


# ---- traces ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    t: float
    model: str
    duration: float = 0.0


@dataclass
class Trace:
    """Requests sorted by arrival, and the window [start, end] they were observed in."""

    requests: list[Request]
    start: float
    end: float
    name: str = "trace"

    @classmethod
    def of(
        cls,
        requests: Iterable[Request],
        start: float | None = None,
        end: float | None = None,
        name: str = "trace",
    ) -> Trace:
        ordered = sorted(requests, key=lambda r: r.t)
        first = ordered[0].t if ordered else 0.0
        last = max((r.t + r.duration for r in ordered), default=first)
        return cls(ordered, first if start is None else start, last if end is None else end, name)

    @property
    def models(self) -> list[str]:
        return sorted({r.model for r in self.requests})


def _timestamp(text: str) -> float:
    """Unix seconds, or ISO 8601 (a time without a zone is UTC)."""
    try:
        return float(text)
    except ValueError:
        pass
    when = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)
    return when.timestamp()


def load_csv(path: str) -> Trace:
    """Read a trace: a header `timestamp,model,duration` (duration optional), one request a line.

    timestamp: arrival, Unix seconds or ISO 8601; duration: seconds from arrival to the last byte
    (0 when absent). Blank lines and lines starting with `#` are skipped.
    """
    requests: list[Request] = []
    try:
        with open(path, newline="", encoding="utf-8") as stream:
            lines = (line for line in stream if line.strip() and not line.startswith("#"))
            reader = csv.DictReader(lines)
            fields = [f.strip() for f in reader.fieldnames or []]
            if "timestamp" not in fields or "model" not in fields:
                raise TraceError(
                    f"{path}: the header must name timestamp,model[,duration], "
                    f"got {','.join(fields) or 'nothing'}"
                )
            for row in reader:
                row = {(k or "").strip(): (v or "").strip() for k, v in row.items()}
                where = f"{path}: request {reader.line_num - 1}"
                try:
                    t = _timestamp(row["timestamp"])
                    duration = float(row.get("duration") or 0.0)
                except ValueError as exc:
                    raise TraceError(f"{where}: {exc}") from None
                if not row["model"]:
                    raise TraceError(f"{where}: empty model")
                if not (math.isfinite(t) and math.isfinite(duration)) or duration < 0:
                    raise TraceError(
                        f"{where}: timestamp and duration must be finite, duration >= 0"
                    )
                requests.append(Request(t, row["model"], duration))
    except OSError as exc:
        raise TraceError(f"{path}: {exc.strerror or exc}") from exc
    if not requests:
        raise TraceError(f"{path}: no requests")
    return Trace.of(requests, name=path)


def write_csv(trace: Trace, path: str) -> None:
    with open(path, "w", newline="", encoding="utf-8") as stream:
        out = csv.writer(stream)
        out.writerow(["timestamp", "model", "duration"])
        for r in trace.requests:
            out.writerow([f"{r.t:.3f}", r.model, f"{r.duration:.3f}"])


# ---- Prometheus ------------------------------------------------------------------------------

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> float:
    """Prometheus-style durations: `90s`, `36h`, `7d`, `1w2d`, or plain seconds."""
    try:
        return float(text)
    except ValueError:
        pass
    parts = re.fullmatch(r"(?:\d+(?:\.\d+)?[smhdw])+", text.strip())
    if not parts:
        raise ValueError(f"bad duration {text!r} (e.g. 7d, 36h, 90m)")
    return sum(float(n) * _UNITS[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)([smhdw])", text))


class PrometheusReader:
    """Raw samples of kvsleep's own series, fetched a day at a time."""

    CHUNK_SECONDS = 86400

    def __init__(self, url: str, timeout: float = 30.0) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout

    def query(self, promql: str, at: float) -> list[dict[str, Any]]:
        params = urllib.parse.urlencode({"query": promql, "time": f"{at:.3f}"})
        with urllib.request.urlopen(
            f"{self.url}/api/v1/query?{params}", timeout=self.timeout
        ) as resp:
            body = json.loads(resp.read())
        if body.get("status") != "success":
            raise TraceError(f"Prometheus {self.url}: {promql}: {body.get('error', body)}")
        return body["data"]["result"]

    def samples(
        self, selector: str, start: float, end: float
    ) -> dict[tuple[tuple[str, str], ...], list[tuple[float, float]]]:
        """Every raw sample of `selector` in [start, end], per series (labels sorted)."""
        series: dict[tuple[tuple[str, str], ...], dict[float, float]] = defaultdict(dict)
        chunk_end = end
        while chunk_end > start:
            width = min(self.CHUNK_SECONDS, chunk_end - start)
            for item in self.query(f"{selector}[{math.ceil(width)}s]", chunk_end):
                key = tuple(sorted(item["metric"].items()))
                for t, v in item["values"]:
                    if start <= float(t) <= end:
                        series[key][float(t)] = float(v)
            chunk_end -= width
        return {k: sorted(v.items()) for k, v in series.items()}


def _increases(samples: list[tuple[float, float]]) -> list[tuple[float, float, float]]:
    """(previous time, time, increase) between consecutive samples of one counter; a drop is a
    counter reset, after which the new value is the increase."""
    out = []
    for (t0, v0), (t1, v1) in itertools.pairwise(samples):
        delta = v1 - v0 if v1 >= v0 else v1
        if delta > 0:
            out.append((t0, t1, delta))
    return out


def trace_from_prometheus(
    url: str, range_seconds: float, end: float
) -> tuple[Trace, dict[str, float]]:
    """Rebuild arrivals from `kvsleep_requests_total` over (end - range, end].

    The counter moves when a request finishes, so for every scrape interval with n finished
    requests of a model, n completions are spread evenly over the interval and each arrival is
    its completion minus the interval's mean request duration (`kvsleep_request_duration_seconds`
    sum over count). Resolution is the scrape interval. Also returns each model's mean wake time
    over the range, from `kvsleep_wake_duration_seconds`.
    """
    reader = PrometheusReader(url)
    start = end - range_seconds
    counts = reader.samples("kvsleep_requests_total", start, end)
    dur_sum = reader.samples("kvsleep_request_duration_seconds_sum", start, end)
    dur_count = reader.samples("kvsleep_request_duration_seconds_count", start, end)
    # Mean duration per (model, scrape time), over every endpoint.
    spent: dict[tuple[str, float], list[float]] = defaultdict(lambda: [0.0, 0.0])
    for source, slot in ((dur_sum, 0), (dur_count, 1)):
        for labels, samples in source.items():
            spent_by = dict(labels).get("model") or ""
            for _, t1, delta in _increases(samples):
                spent[(spent_by, t1)][slot] += delta
    requests: list[Request] = []
    for labels, samples in counts.items():
        model = dict(labels).get("model")
        if not model:
            continue
        for t0, t1, delta in _increases(samples):
            n = round(delta)
            total, finished = spent.get((model, t1), (0.0, 0.0))
            duration = max(0.0, total / finished) if finished > 0 else 0.0
            step = (t1 - t0) / max(n, 1)
            for k in range(n):
                done = t0 + (k + 0.5) * step
                requests.append(Request(max(start, done - duration), model, duration))
    if not counts:
        raise TraceError(
            f"Prometheus {url}: no kvsleep_requests_total samples between "
            f"{_iso(start)} and {_iso(end)}"
        )
    window = f"{math.ceil(range_seconds)}s"
    wake = {}
    for item in reader.query(
        f"sum by (model) (increase(kvsleep_wake_duration_seconds_sum[{window}])) / "
        f"sum by (model) (increase(kvsleep_wake_duration_seconds_count[{window}]))",
        end,
    ):
        value = float(item["value"][1])
        if math.isfinite(value) and value >= 0:
            wake[item["metric"].get("model", "")] = value
    return Trace.of(requests, start, end, name=f"prometheus {url} {_iso(start)}..{_iso(end)}"), wake


def _iso(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# ---- what is replayed ------------------------------------------------------------------------


@dataclass(frozen=True)
class SimModel:
    """A model as the replay needs it: its config, what it holds awake, how long it wakes."""

    cfg: ModelConfig
    memory_gb: float
    wake_seconds: float


@dataclass(frozen=True)
class Variant:
    """A policy to compare: a rewrite of each model's config."""

    name: str
    rewrite: Callable[[ModelConfig], ModelConfig]


def _with_policy(cfg: ModelConfig, **changes: Any) -> ModelConfig:
    return dataclasses.replace(cfg, policy=dataclasses.replace(cfg.policy, **changes))


def always_on() -> Variant:
    return Variant("always-on", lambda c: _with_policy(c, auto_sleep_enabled=False))


def as_is() -> Variant:
    """The config exactly as written (adaptive where it says so)."""
    return Variant("as-is", lambda c: c)


def as_configured() -> Variant:
    """The config's own fixed thresholds (and its auto_sleep_enabled, always_on as given)."""
    return Variant("config", lambda c: _with_policy(c, idle_policy="fixed"))


def fixed(seconds: float) -> Variant:
    return Variant(
        f"fixed-{seconds:g}",
        lambda c: _with_policy(
            c, idle_policy="fixed", idle_threshold_seconds=float(seconds), auto_sleep_enabled=True
        ),
    )


def adaptive() -> Variant:
    """Adaptive thresholds for every model (bounds and break-even from the config)."""
    return Variant(
        "adaptive", lambda c: _with_policy(c, idle_policy="adaptive", auto_sleep_enabled=True)
    )


def variants(sweep: Sequence[float] = DEFAULT_SWEEP) -> list[Variant]:
    """The compared policies: always-on, config, fixed 300 s (kvcached's default and Ollama's
    5 min), adaptive, and the fixed thresholds of `sweep` (for the best-fixed comparison)."""
    main = [always_on(), as_configured(), fixed(300), adaptive()]
    return main + [fixed(s) for s in sweep if s != 300]


def sim_models(
    config: Config, trace_models: Iterable[str], wake_history: dict[str, float] | None = None
) -> tuple[list[SimModel], list[str]]:
    """The replayed models (the trace's, with their config) and notes about guesses made."""
    notes: list[str] = []
    out: list[SimModel] = []
    wake_history = wake_history or {}
    for name in trace_models:
        cfg = config.model(name)
        if cfg is None:
            cfg = ModelConfig(name, "vllm", "http://replay.invalid", policy=config.sleep_manager)
            notes.append(f"{name}: not in the config; replayed with the sleep_manager policy")
        if name in wake_history:
            cfg = dataclasses.replace(cfg, wake_eta_seconds=wake_history[name])
        if cfg.memory_gb is None:
            notes.append(f"{name}: no memory_gb; counted as 1 GB")
        if cfg.wake_eta_seconds is None:
            notes.append(f"{name}: no wake_eta_seconds and no wake history; wakes take 0 s")
        out.append(SimModel(cfg, cfg.memory_gb or 1.0, cfg.wake_eta_seconds or 0.0))
    return out, notes


def served_models(config: Config) -> tuple[Config, dict[str, int], dict[str, str]]:
    """The config with one model per name clients use: a model served by `replicas:` (engines
    `name@0`, `name@1`, ...) becomes its replica 0 under its served name. Also how many engines
    serve each, and notes (by model) where its replicas differ in what a replay reads."""
    groups: dict[str, list[ModelConfig]] = {}
    for cfg in config.models:
        groups.setdefault(cfg.served_name, []).append(cfg)
    notes = {
        name: f"{name}: its replicas differ in memory_gb or wake_eta_seconds; replica 0's are used"
        for name, group in groups.items()
        if len({(c.memory_gb, c.wake_eta_seconds) for c in group}) > 1
    }
    served = tuple(dataclasses.replace(group[0], name=name) for name, group in groups.items())
    counts = {name: len(group) for name, group in groups.items()}
    return dataclasses.replace(config, models=served), counts, notes


def tick_interval(config: Config, models: Iterable[SimModel]) -> float:
    """The live reconciler's cadence: the shortest check interval in force."""
    return min(
        [
            config.sleep_manager.check_interval_seconds,
            *(m.cfg.policy.check_interval_seconds for m in models),
        ]
    )


# ---- the replay ------------------------------------------------------------------------------


@dataclass
class ModelResult:
    """One model under one policy."""

    model: str
    memory_gb: float
    requests: int = 0
    waited: int = 0
    rejected: int = 0
    sleeps: int = 0
    wakes: int = 0
    gb_seconds: float = 0.0
    waits: list[float] = field(default_factory=list)  # added latency of every waiting request
    timeline: list[tuple[float, float]] = field(default_factory=list)  # (t, GB held from t)
    wake_times: list[float] = field(default_factory=list)


@dataclass
class RunResult:
    policy: str
    start: float
    end: float
    models: dict[str, ModelResult]
    log: list[tuple[float, str, str]] = field(default_factory=list)  # (t, model, sleep|wake)
    thresholds: list[tuple[float, str, float]] = field(default_factory=list)  # at each tick


def _no_session() -> Any:
    raise AssertionError("the replay calls no engine")


def engine_steps(cfg: ModelConfig) -> EngineSteps:
    """The calls a sleep and a wake of the model's engine flavor are made of (its adapter's)."""
    return adapter_for(cfg, _no_session).steps


def job_outcome(
    machine: EngineMachine,
    job: Job,
    wake_seconds: float,
    sleep_seconds: float,
    start_seconds: float | None = None,
) -> tuple[float, Callable[[float], Event]]:
    """What a replay answers to a job the machine asks for: after how many virtual seconds, and
    the event (made at that time). Engine calls succeed, a wake's `wake_seconds` and a sleep's
    `sleep_seconds` on the operation's last step; a drain with requests inside the engine is
    settled by the replay when the last one ends (else its timeout); the engine's load is
    unknown, the process the same one, records written, GPU room available; a start (only with
    `start_seconds`: a launched engine) is ready after `start_seconds`."""
    if isinstance(job, WaitDrained):
        if machine.in_engine:
            return job.timeout, lambda now: Drained(now, False)
        return 0.0, lambda now: Drained(now, True)
    if isinstance(job, CheckLoad):
        return job.after, lambda now: LoadReported(now, None)
    if isinstance(job, Identify):
        return job.after, lambda now: Identified(now, Observation(up=True))
    if isinstance(job, WriteRecord):
        return 0.0, lambda now: Recorded(now, True)
    if isinstance(job, MakeRoom):
        return 0.0, lambda now: RoomReady(now, True)
    if isinstance(job, Call):
        steps = machine.steps.sleep if job.op == "sleep" else machine.steps.wake
        took = sleep_seconds if job.op == "sleep" else wake_seconds
        took = took if job.step == steps[-1] else 0.0
        return took, lambda now: CallDone(now, CallResult.OK, took=took)
    if isinstance(job, Start) and start_seconds is not None:
        return start_seconds, lambda now: LaunchStarted(now, took=start_seconds)
    raise AssertionError(f"the replay launches no engine and has no NVML: {job}")


@dataclass(eq=False)
class _Model:
    spec: SimModel
    machine: EngineMachine
    result: ModelResult
    state: ModelState = ModelState.AWAKE  # the machine's state when last looked at
    # Held requests by arrival (a key for each, so a hold timeout finds its own).
    waiters: dict[int, tuple[Request, RequestStats]] = field(default_factory=dict)
    held_since: float | None = None  # memory held since (None: asleep)


class Agenda:
    """The virtual clock of a replay: events at times, taken in time order (ties: the order they
    were set), each handed to the replay's `_tick`, `_arrive`, `_end` or a callback."""

    def __init__(self, start: float) -> None:
        self.now = start
        self._events: list[tuple[float, int, int, Any]] = []
        self._seq = 0

    def _at(self, t: float, kind: int, payload: Any) -> None:
        self._seq += 1
        heapq.heappush(self._events, (t, kind, self._seq, payload))

    def _play(self, requests: Iterable[Request], tick_seconds: float, end: float) -> None:
        """Every request's arrival and a tick each `tick_seconds` (0: none) up to `end`."""
        for r in requests:
            self._at(r.t, ARRIVAL, r)
        if tick_seconds > 0:
            self._at(self.now + tick_seconds, TICK, None)
        while self._events:
            t, kind, _, payload = heapq.heappop(self._events)
            self._advance(t)
            if kind == TICK:
                self._tick()
                if t + tick_seconds <= end:
                    self._at(t + tick_seconds, TICK, None)
            elif kind == ARRIVAL:
                self._arrive(payload)
            elif kind == END:
                self._end(*payload)
            else:
                payload()

    def _advance(self, t: float) -> None:
        self.now = t

    def _tick(self) -> None:
        raise NotImplementedError

    def _arrive(self, r: Request) -> None:
        raise NotImplementedError

    def _end(self, *what: Any) -> None:
        raise NotImplementedError


class Replay(Agenda):
    """One policy over one trace. `run()` returns its RunResult.

    Each model is the live state machine (`core/machine.py`), executed here as the manager
    executes it, on the virtual clock: a request arriving is `Arrived` (or the awake fast path),
    its end `finished()`; a reconcile tick builds the policy's views as the manager does and
    feeds its decisions in; every job the machine asks for comes back as the event the manager
    would feed, at the virtual time it would: engine calls succeed after the configured latency
    (a wake's `wake_seconds`, a sleep's `sleep_seconds`, on the operation's last step), a drain
    when the engine's last request ends, the rest at once (the engine's load unknown, the
    process the same one, records written, GPU room available). Admission, holding, draining and
    every state change are the machine's.
    """

    def __init__(
        self,
        trace: Trace,
        models: Sequence[SimModel],
        variant: Variant,
        tick_seconds: float,
        sleep_seconds: float = 0.0,
        timeline: bool = False,
        trace_thresholds: bool = False,
    ) -> None:
        self.trace = trace
        self.variant = variant
        self.tick_seconds = tick_seconds
        self.sleep_seconds = sleep_seconds
        self.keep_timeline = timeline
        self.keep_thresholds = trace_thresholds
        super().__init__(trace.start)
        self.traffic = TrafficMonitor(clock=lambda: self.now)
        configs = [variant.rewrite(spec.cfg) for spec in models]
        # Live, every model's learner listens; here only a policy that reads one needs it.
        learning = any(c.policy.idle_policy == "adaptive" for c in configs)
        self.thresholds = Thresholds.watching(self.traffic) if learning else Thresholds()
        self.models: dict[str, _Model] = {}
        for spec, cfg in zip(models, configs, strict=True):
            self.traffic.add_model(cfg.name)
            machine = EngineMachine(cfg, engine_steps(cfg), ModelState.AWAKE, trace.start)
            m = _Model(spec, machine, ModelResult(cfg.name, spec.memory_gb), held_since=trace.start)
            if timeline:
                m.result.timeline.append((trace.start, spec.memory_gb))
            self.models[cfg.name] = m
        self.result = RunResult(
            variant.name, trace.start, trace.end, {n: m.result for n, m in self.models.items()}
        )

    def run(self) -> RunResult:
        arrivals = (r for r in self.trace.requests if r.model in self.models)
        self._play(arrivals, self.tick_seconds, self.trace.end)
        for m in self.models.values():
            self._hold(m, False, self.trace.end)
        return self.result

    # -- what the live request path does (SleepManager.acquire and release) ---------------------

    def _arrive(self, r: Request) -> None:
        m = self.models[r.model]
        m.result.requests += 1
        stats = self.traffic.record_request_start(r.model, ENDPOINT)
        machine = m.machine
        if machine.admit_awake():
            self._at(self.now + r.duration, END, (m, stats))
            return
        effects = machine.handle(Arrived(self.now))
        self._track(m)
        verdict = effects[0]
        if isinstance(verdict, Admit):
            self._at(self.now + r.duration, END, (m, stats))
        elif isinstance(verdict, Hold):
            key = self._seq
            m.waiters[key] = (r, stats)
            self._at(self.now + verdict.timeout, OP_DONE, lambda: self._hold_timeout(m, key))
        else:
            self._reject(m, stats)
        self._carry_out(m, effects[1:])

    def _end(self, m: _Model, stats: RequestStats) -> None:
        self.traffic.record_request_end(stats)
        machine = m.machine
        machine.finished()
        if not machine.in_engine and isinstance(machine.job, WaitDrained):
            self._feed(m, Drained(self.now, True))

    def _hold_timeout(self, m: _Model, key: int) -> None:
        waiter = m.waiters.pop(key, None)
        if waiter is not None:
            self._feed(m, HeldLeft(0))
            self._reject(m, waiter[1])

    def _reject(self, m: _Model, stats: RequestStats) -> None:
        m.result.rejected += 1
        self.traffic.record_request_end(stats, success=False)

    # -- what the live reconciler does -----------------------------------------------------------

    def _tick(self) -> None:
        now = self.now
        if self.keep_thresholds:
            self.result.thresholds.extend(
                (now, name, self.thresholds.threshold_for(m.machine.cfg))
                for name, m in self.models.items()
            )
        stats = self.traffic.model_stats
        policy_for = self.thresholds.policy_for
        views = []
        for name, m in self.models.items():
            if not m.machine.busy:
                s = stats[name]
                machine = m.machine
                views.append(
                    machine.view(policy_for(machine.cfg), s.in_flight, s.last_activity_time)
                )
        for action in policy.decide(views, now):
            m = self.models[action.model]
            if isinstance(action, policy.Sleep):
                self.thresholds.note_sleep(action.model, now)
                m.result.sleeps += 1
                self.result.log.append((now, action.model, "sleep"))
                self._feed(m, WantSleep(now, action.reason))
            elif isinstance(action, policy.Wake):
                self._feed(m, WantWake(now, action.reason))

    # -- carrying out the machine's effects (SleepManager._carry_out and _perform) ---------------

    def _feed(self, m: _Model, event: Event) -> None:
        effects = m.machine.handle(event)
        self._track(m)
        self._carry_out(m, effects)

    def _carry_out(self, m: _Model, effects: list[Effect]) -> None:
        # Records, logs, metrics and control calls have no bearing on what a replay measures.
        for effect in effects:
            if isinstance(effect, JOBS):
                self._perform(m, effect)
            elif isinstance(effect, ReleaseHeld):
                for r, stats in m.waiters.values():
                    m.result.waited += 1
                    m.result.waits.append(self.now - r.t)
                    self._at(self.now + r.duration, END, (m, stats))
                m.waiters.clear()
            elif isinstance(effect, RejectHeld):
                for _, stats in m.waiters.values():
                    self._reject(m, stats)
                m.waiters.clear()

    def _perform(self, m: _Model, job: Job) -> None:
        """The job's result, now or at the virtual time it would come."""
        delay, outcome = job_outcome(m.machine, job, m.spec.wake_seconds, self.sleep_seconds)
        self._later(m, job, delay, lambda: outcome(self.now))

    def _later(self, m: _Model, job: Job, delay: float, event: Callable[[], Event]) -> None:
        if delay <= 0:
            self._feed(m, event())
            return

        def done() -> None:
            if m.machine.job is job:  # not settled meanwhile (a drain by the last request)
                self._feed(m, event())

        self._at(self.now + delay, OP_DONE, done)

    def _track(self, m: _Model) -> None:
        """Follow the machine's state: memory is held unless asleep; a wake begins on WAKING."""
        state = m.machine.state
        if state is m.state:
            return
        m.state = state
        if state is ModelState.WAKING:
            m.result.wakes += 1
            m.result.wake_times.append(self.now)
            self.result.log.append((self.now, m.machine.name, "wake"))
        self._hold(m, state is not ModelState.ASLEEP, self.now)

    def _hold(self, m: _Model, held: bool, now: float) -> None:
        """Integrate memory held up to `now` (clipped to the trace window), then switch."""
        if m.held_since is not None:
            lo, hi = max(m.held_since, self.trace.start), min(now, self.trace.end)
            if hi > lo:
                m.result.gb_seconds += m.spec.memory_gb * (hi - lo)
        if held and m.held_since is None:
            m.held_since = now
            if self.keep_timeline:
                m.result.timeline.append((now, m.spec.memory_gb))
        elif held:
            m.held_since = now
        elif m.held_since is not None:
            m.held_since = None
            if self.keep_timeline:
                m.result.timeline.append((now, 0.0))


def replay(
    trace: Trace,
    models: Sequence[SimModel],
    variant: Variant,
    tick_seconds: float,
    sleep_seconds: float = 0.0,
    timeline: bool = False,
    trace_thresholds: bool = False,
) -> RunResult:
    return Replay(
        trace, models, variant, tick_seconds, sleep_seconds, timeline, trace_thresholds
    ).run()


# ---- summaries -------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (0 for no values)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


@dataclass(frozen=True)
class Summary:
    policy: str
    requests: int
    gb_hours: float
    always_on_gb_hours: float
    waited: int
    rejected: int
    p50: float  # added latency over all requests
    p99: float
    waited_p50: float  # over the requests that waited
    waited_p99: float
    sleeps: int
    cycles_per_hour: float

    @property
    def saved(self) -> float:
        if self.always_on_gb_hours <= 0:
            return 0.0
        return round(1.0 - self.gb_hours / self.always_on_gb_hours, 12) + 0.0  # no "-0.0%"

    def as_dict(self) -> dict[str, Any]:
        return {
            "policy": self.policy,
            "requests": self.requests,
            "gb_hours": round(self.gb_hours, 3),
            "always_on_gb_hours": round(self.always_on_gb_hours, 3),
            "saved_share": round(self.saved, 4),
            "waited": self.waited,
            "rejected": self.rejected,
            "added_latency_p50_s": round(self.p50, 3),
            "added_latency_p99_s": round(self.p99, 3),
            "waited_latency_p50_s": round(self.waited_p50, 3),
            "waited_latency_p99_s": round(self.waited_p99, 3),
            "sleeps": self.sleeps,
            "cycles_per_hour": round(self.cycles_per_hour, 3),
        }


def summarize(run: RunResult, models: Iterable[str] | None = None) -> Summary:
    """Per model (one name) or in total (None: every model)."""
    chosen = [run.models[n] for n in (models if models is not None else run.models)]
    hours = max(run.end - run.start, 1e-9) / 3600
    waits = [w for m in chosen for w in m.waits]
    requests = sum(m.requests for m in chosen)
    everyone = waits + [0.0] * (requests - len(waits))
    sleeps = sum(m.sleeps for m in chosen)
    return Summary(
        policy=run.policy,
        requests=requests,
        gb_hours=sum(m.gb_seconds for m in chosen) / 3600,
        always_on_gb_hours=sum(m.memory_gb for m in chosen) * hours,
        waited=sum(m.waited for m in chosen),
        rejected=sum(m.rejected for m in chosen),
        p50=percentile(everyone, 50),
        p99=percentile(everyone, 99),
        waited_p50=percentile(waits, 50),
        waited_p99=percentile(waits, 99),
        sleeps=sleeps,
        cycles_per_hour=sleeps / hours,
    )


def best_fixed(summaries: Iterable[Summary], adaptive_summary: Summary) -> Summary | None:
    """The fixed threshold that saves most with no more waits than the adaptive policy."""
    fair = [
        s
        for s in summaries
        if s.policy.startswith("fixed-") and s.waited <= adaptive_summary.waited
    ]
    return max(fair, key=lambda s: (s.saved, -s.waited), default=None)


@dataclass
class Comparison:
    """Every policy's run over one trace."""

    trace: Trace
    models: list[SimModel]
    runs: dict[str, RunResult]
    tick_seconds: float
    notes: list[str] = field(default_factory=list)

    def summary(self, policy_name: str, model: str | None = None) -> Summary:
        return summarize(self.runs[policy_name], None if model is None else [model])

    def scopes(self) -> list[str | None]:
        return [m.cfg.name for m in self.models] + [None]

    def best_fixed(self, model: str | None = None) -> Summary | None:
        fixed_runs = [self.summary(p, model) for p in self.runs if p.startswith("fixed-")]
        return best_fixed(fixed_runs, self.summary("adaptive", model))

    def as_dict(self) -> dict[str, Any]:
        def scope(model: str | None) -> dict[str, Any]:
            best = self.best_fixed(model)
            adapt = self.summary("adaptive", model)
            return {
                "policies": {p: self.summary(p, model).as_dict() for p in self.runs},
                "best_fixed_with_no_more_waits": best.policy if best else None,
                "adaptive_saves_at_least_best_fixed": (
                    best is None or adapt.saved + 1e-9 >= best.saved
                ),
            }

        return {
            "trace": {
                "name": self.trace.name,
                "start": self.trace.start,
                "end": self.trace.end,
                "hours": round((self.trace.end - self.trace.start) / 3600, 3),
                "requests": len(self.trace.requests),
            },
            "tick_seconds": self.tick_seconds,
            "models": {
                m.cfg.name: {
                    "memory_gb": m.memory_gb,
                    "wake_seconds": m.wake_seconds,
                    "idle_threshold_seconds": m.cfg.policy.idle_threshold_seconds,
                    "min_idle_threshold_seconds": m.cfg.policy.min_idle_threshold_seconds,
                    "max_idle_threshold_seconds": m.cfg.policy.max_idle_threshold_seconds,
                    **scope(m.cfg.name),
                }
                for m in self.models
            },
            "total": scope(None),
            "notes": self.notes,
        }


def compare(
    trace: Trace,
    models: Sequence[SimModel],
    tick_seconds: float,
    *,
    sweep: Sequence[float] = DEFAULT_SWEEP,
    sleep_seconds: float = 0.0,
    timeline: bool = False,
    notes: Iterable[str] = (),
) -> Comparison:
    runs = {
        v.name: replay(
            trace,
            models,
            v,
            tick_seconds,
            sleep_seconds,
            timeline=timeline and v.name in MAIN_POLICIES,
        )
        for v in variants(sweep)
    }
    return Comparison(trace, list(models), runs, tick_seconds, list(notes))


def simulate_config(
    config: Config,
    trace: Trace,
    *,
    wake_history: dict[str, float] | None = None,
    sweep: Sequence[float] = DEFAULT_SWEEP,
    sleep_seconds: float = 0.0,
    timeline: bool = False,
) -> Comparison:
    config, counts, differ = served_models(config)
    notes = list(differ.values())
    notes += [
        f"{name}: served by {n} replicas; replayed as one engine (kvsleep simulate --replicas "
        f"{n} compares scaling them)"
        for name, n in counts.items()
        if n > 1
    ]
    idle = [m.name for m in config.models if m.name not in set(trace.models)]
    models, more = sim_models(config, [*trace.models, *idle], wake_history)
    notes += more + [f"{name}: no request in the trace (idle throughout)" for name in idle]
    return compare(
        trace,
        models,
        tick_interval(config, models),
        sweep=sweep,
        sleep_seconds=sleep_seconds,
        timeline=timeline,
        notes=notes,
    )


# ---- output ----------------------------------------------------------------------------------

_HEADER = (
    f"{'policy':<14}{'GB-h held':>11}{'saved':>8}{'waits':>7}{'wait%':>7}"
    f"{'p50 s':>8}{'p99 s':>8}{'waited p99':>11}{'cycles/h':>10}"
)


def _row(s: Summary, label: str | None = None) -> str:
    share = s.waited / s.requests if s.requests else 0.0
    return (
        f"{label or s.policy:<14}{s.gb_hours:>11.1f}{s.saved:>8.1%}{s.waited:>7d}"
        f"{share:>7.1%}{s.p50:>8.2f}{s.p99:>8.2f}{s.waited_p99:>11.2f}"
        f"{s.cycles_per_hour:>10.2f}"
    )


def format_table(comparison: Comparison) -> str:
    """Per model then in total: the main policies side by side, and the best fixed threshold
    that needs no more waits than adaptive."""
    c = comparison
    hours = (c.trace.end - c.trace.start) / 3600
    lines = [
        f"trace: {c.trace.name}: {len(c.trace.requests)} requests over {hours:.1f} h, "
        f"reconcile every {c.tick_seconds:g} s"
    ]
    for scope in c.scopes():
        if scope is None:
            title = "TOTAL"
        else:
            m = next(x for x in c.models if x.cfg.name == scope)
            pol = m.cfg.policy
            title = (
                f"{scope}  ({m.memory_gb:g} GB, wake {m.wake_seconds:g} s, config "
                f"threshold {pol.idle_threshold_seconds:g} s, adaptive bounds "
                f"{pol.min_idle_threshold_seconds:g}..{pol.max_idle_threshold_seconds:g} s)"
            )
        lines += ["", title, _HEADER]
        lines += [_row(c.summary(p, scope)) for p in MAIN_POLICIES if p in c.runs]
        best = c.best_fixed(scope)
        adapt = c.summary("adaptive", scope)
        if best is None:
            lines.append("  no fixed threshold of the sweep needs as few waits as adaptive")
        else:
            verdict = (
                "adaptive saves at least as much"
                if adapt.saved + 1e-9 >= best.saved
                else "adaptive saves LESS"
            )
            lines.append(_row(best, f"best {best.policy}"))
            lines.append(
                f"  best fixed threshold with <= {adapt.waited} waits: {best.policy} ({verdict})"
            )
    if c.notes:
        lines += ["", *(f"note: {n}" for n in c.notes)]
    return "\n".join(lines)


def plot(comparison: Comparison, path: str) -> None:
    """PNG: GPU memory held over time under each sleeping policy, wakes marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [p for p in MAIN_POLICIES if p in comparison.runs and p != "always-on"]
    fig, axes = plt.subplots(
        len(shown), 1, figsize=(12, 2.6 * len(shown)), sharex=True, squeeze=False
    )
    start = comparison.trace.start
    total_gb = sum(m.memory_gb for m in comparison.models)
    for ax, name in zip(axes[:, 0], shown, strict=True):
        run = comparison.runs[name]
        changes: list[tuple[float, float, str]] = []
        for m in run.models.values():
            last = 0.0
            for t, gb in m.timeline:
                changes.append((t, gb - last, m.model))
                last = gb
        changes.sort(key=lambda c: c[0])
        xs, ys, level = [0.0], [0.0], 0.0
        for t, delta, _ in changes:
            level += delta
            xs.append((t - start) / 3600)
            ys.append(level)
        xs.append((comparison.trace.end - start) / 3600)
        ys.append(level)
        ax.fill_between(xs, ys, step="post", alpha=0.35, label="GB held")
        ax.axhline(total_gb, color="grey", linestyle="--", linewidth=0.8, label="always-on")
        wakes = sorted((t - start) / 3600 for m in run.models.values() for t in m.wake_times)
        ax.plot(
            wakes,
            [total_gb * 1.02] * len(wakes),
            "|",
            color="tab:red",
            markersize=6,
            label=f"wakes ({len(wakes)})",
        )
        s = comparison.summary(name)
        ax.set_title(
            f"{name}: {s.gb_hours:.0f} GB-h held, {s.saved:.0%} saved, {s.waited} waits", fontsize=9
        )
        ax.set_ylabel("GB")
        ax.set_ylim(0, total_gb * 1.08)
        ax.legend(loc="upper right", fontsize=7)
    axes[-1, 0].set_xlabel("hours since trace start")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
