"""`kvsleep simulate --replicas N`: warm autoscaling against cold autoscaling and always-on.

Each model of the trace runs as N replicas, each replica the live per-engine state machine
(`core/machine.py`), driven on a virtual clock as `simulate.Replay` drives one engine (the same
`job_outcome` answers its jobs). Three strategies:

- `warm`: the scaler (`core/scaling.decide_scale`, every check interval) wakes an asleep replica
  (the model's wake latency) and drains and sleeps one; an asleep replica holds `asleep_gb`.
- `cold`: the same decisions, as a pod autoscaler would pay them: a step up starts the engine
  (`cold_start_seconds`), a step down drains the replica and stops its process (the machine's
  `LaunchDeferred`: asleep in effect, no memory held, its next wake is a start).
- `always-on`: every replica awake throughout, no scaler.

Requests are routed by `core/scaling.pick_replica` (least in flight, ties at random, seeded)
among the awake replicas. With none awake, a request is held by the replica that is waking or
starting, else by the first asleep one (whose machine then wakes it), as live.

Service model (kept simple on purpose): a replica serves up to `capacity` requests at once, each
for its trace duration (no slowdown with load); more wait in that replica's FIFO queue, as an
engine queues what it cannot schedule (a queued request stays with its replica when a sibling
wakes). A request's added latency is the time it was held for a wake or start plus the time it
queued. GPU memory: a replica holds its `memory_gb` in every state but asleep (waking, starting
and draining included), `asleep_gb` asleep, nothing stopped.

With `min_awake: 0`, as live, the idle policy (`core/policy.decide`, the config's threshold)
also sleeps a replica once the model (all its replicas) is idle, since the scaler never sleeps
the last awake one; the next request is held for a wake. Replicas start with
`max(min_awake, 1)` awake (always-on: all of them).
"""

from __future__ import annotations

import dataclasses
import random
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from kvsleep.config import Config
from kvsleep.core import policy
from kvsleep.core.machine import (
    JOBS,
    Admit,
    Arrived,
    Drained,
    Effect,
    EngineMachine,
    Event,
    HeldLeft,
    Hold,
    Job,
    LaunchDeferred,
    RejectHeld,
    ReleaseHeld,
    WaitDrained,
    WantSleep,
    WantWake,
)
from kvsleep.core.scaling import (
    ReplicaView,
    ScaleMemory,
    ScalingPolicy,
    decide_scale,
    pick_replica,
)
from kvsleep.core.states import ModelState
from kvsleep.lab.simulate import (
    END,
    OP_DONE,
    Agenda,
    Request,
    SimModel,
    Trace,
    engine_steps,
    job_outcome,
    percentile,
    served_models,
    sim_models,
)

STRATEGIES = ("warm", "cold", "always-on")


@dataclass(frozen=True)
class LabSettings:
    """How the replicas are run and served (the CLI's `--replicas` options)."""

    replicas: int = 3
    scaling: ScalingPolicy = field(default_factory=ScalingPolicy)  # the config's defaults
    capacity: int = 12  # requests one replica serves at once; more queue in it
    cold_start_seconds: float = 90.0
    asleep_gb: float = 0.0  # what an asleep replica still holds (CUDA context, ...)
    check_seconds: float = 30.0  # the scaler's cadence (the reconciler's check interval)
    sleep_seconds: float = 0.0
    seed: int = 0  # for pick_replica's ties


@dataclass
class ScaleResult:
    """One model's replicas under one strategy."""

    strategy: str
    model: str
    replicas: int
    memory_gb: float
    scaling: ScalingPolicy
    requests: int = 0
    served: int = 0
    rejected: int = 0
    held: int = 0  # waited for a wake or a start
    queued: int = 0  # waited in a replica's queue
    wakes: int = 0
    starts: int = 0
    downs: int = 0  # scale-downs (drains begun)
    gb_seconds: float = 0.0
    added: list[float] = field(default_factory=list)  # added latency of every served request
    events: list[tuple[float, str, str]] = field(default_factory=list)  # (t, replica, what)


@dataclass(eq=False)
class _Replica:
    label: str
    machine: EngineMachine
    running: int = 0
    queue: deque[tuple[Request, float, float]] = field(default_factory=deque)  # (r, held, at)
    waiters: dict[int, Request] = field(default_factory=dict)  # held requests by key
    state: ModelState = ModelState.AWAKE  # the machine's state when last looked at
    stopped: bool = False
    gb: float = 0.0  # memory held since `since`
    since: float = 0.0


class ScaleReplay(Agenda):
    """One model's N replicas under one strategy over a trace; `run()` returns a ScaleResult."""

    def __init__(self, trace: Trace, spec: SimModel, strategy: str, settings: LabSettings) -> None:
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {strategy!r} (one of: {', '.join(STRATEGIES)})")
        self.trace = trace
        self.spec = spec
        self.strategy = strategy
        self.settings = settings
        self.scaling = settings.scaling
        super().__init__(trace.start)
        self.rng = random.Random(f"pick/{settings.seed}")
        self.memory = ScaleMemory()
        self.last_activity = trace.start
        # Request-seconds kvsleep has had in flight (held included), and at the last pass: the
        # scaler weighs the mean between passes, as live (control/traffic.py integrates it).
        self.area = 0.0
        self.meter = (0.0, trace.start)
        self.result = ScaleResult(
            strategy, spec.cfg.name, settings.replicas, spec.memory_gb, settings.scaling
        )
        awake = (
            settings.replicas
            if strategy == "always-on"
            else min(settings.replicas, max(self.scaling.min_awake, 1))
        )
        cfg = spec.cfg
        self.replicas: list[_Replica] = []
        for i in range(settings.replicas):
            state = ModelState.AWAKE if i < awake else ModelState.ASLEEP
            machine = EngineMachine(cfg, engine_steps(cfg), state, trace.start)
            machine.want_awake = state is ModelState.AWAKE
            rep = _Replica(str(i), machine, state=state, since=trace.start)
            if strategy == "cold":
                machine.can_start = True
                if state is ModelState.ASLEEP:
                    machine.stopped = rep.stopped = True
            rep.gb = self._gb(rep)
            self.replicas.append(rep)
        self.by_label = {r.label: r for r in self.replicas}

    def run(self) -> ScaleResult:
        arrivals = (r for r in self.trace.requests if r.model == self.spec.cfg.name)
        step = 0.0 if self.strategy == "always-on" else self.settings.check_seconds
        self._play(arrivals, step, self.trace.end)
        for rep in self.replicas:
            self._account(rep, self.trace.end)
        return self.result

    def _advance(self, t: float) -> None:
        self.area += self._in_flight() * (t - self.now)
        super()._advance(t)

    # -- views and decisions ------------------------------------------------------------------

    def views(self) -> list[ReplicaView]:
        """Each replica as the scaler and the router see it (kvsleep's own counts)."""
        return [
            ReplicaView(
                replica=rep.label,
                state=rep.machine.state,
                in_flight=rep.machine.in_engine,
                held=rep.machine.held,
                queue=len(rep.queue),
                wake_eta=rep.machine.wake_eta(),
            )
            for rep in self.replicas
        ]

    def _tick(self) -> None:
        """A reconcile pass, as live: the idle policy and the scaler decide on the replicas as
        they stand, then the idle sleeps are carried out, then the scaler's action."""
        now = self.now
        idle = self._idle() if self.scaling.min_awake == 0 else []
        (area, then), self.meter = self.meter, (self.area, now)
        mean = (self.area - area) / (now - then) if now > then else None
        decision, self.memory = decide_scale(self.views(), self.scaling, self.memory, now, mean)
        for rep in idle:
            self._feed(rep, WantSleep(now, "idle"))
        if decision.action == "up":
            assert decision.replica is not None
            self._feed(self.by_label[decision.replica], WantWake(now, "scale_up"))
        elif decision.action == "down":
            assert decision.replica is not None
            self._feed(self.by_label[decision.replica], WantSleep(now, "scale_down"))

    def _idle(self) -> list[_Replica]:
        """Scale to zero, as the live manager does: each replica's view carries the model's
        traffic (a replica is idle when its model is); the idle policy says which to sleep."""
        in_flight = self._in_flight()
        chosen = []
        for rep in self.replicas:
            machine = rep.machine
            if machine.busy:
                continue
            view = machine.view(machine.cfg.policy, in_flight, self.last_activity)
            if any(isinstance(a, policy.Sleep) for a in policy.decide([view], self.now)):
                chosen.append(rep)
        return chosen

    def _in_flight(self) -> int:
        return sum(r.machine.in_engine + r.machine.held for r in self.replicas)

    # -- the request path ---------------------------------------------------------------------

    def _arrive(self, r: Request) -> None:
        self.result.requests += 1
        self.last_activity = max(self.last_activity, self.now)
        chosen = pick_replica(self.views(), None, self.rng.random())
        if chosen is not None:
            rep = self.by_label[chosen]
            admitted = rep.machine.admit_awake()
            assert admitted, "pick_replica chose a replica that is not awake"
            self._serve(rep, r, 0.0)
            return
        rep = self._holder()
        effects = rep.machine.handle(Arrived(self.now))
        verdict = effects[0]
        if isinstance(verdict, Admit):
            self._serve(rep, r, 0.0)
        elif isinstance(verdict, Hold):
            key = self._seq = self._seq + 1
            rep.waiters[key] = r
            self._at(self.now + verdict.timeout, OP_DONE, lambda: self._hold_timeout(rep, key))
        else:
            self.result.rejected += 1
        self._after(rep, effects[1:])

    def _holder(self) -> _Replica:
        """The replica a request waits for when none is awake: one already coming, else the
        first asleep (its machine wakes it), else the first (its machine decides)."""
        for states in ((ModelState.WAKING, ModelState.STARTING), (ModelState.ASLEEP,)):
            for rep in self.replicas:
                if rep.machine.state in states:
                    return rep
        return self.replicas[0]

    def _serve(self, rep: _Replica, r: Request, held: float) -> None:
        """Into the replica (already counted in flight by its machine): served now if it has a
        free slot, else queued."""
        if rep.running < self.settings.capacity:
            self._start(rep, r, held)
        else:
            rep.queue.append((r, held, self.now))

    def _start(self, rep: _Replica, r: Request, added: float) -> None:
        rep.running += 1
        self.result.served += 1
        self.result.added.append(added)
        self._at(self.now + r.duration, END, (rep,))

    def _end(self, rep: _Replica) -> None:
        self.last_activity = max(self.last_activity, self.now)
        rep.running -= 1
        machine = rep.machine
        machine.finished()
        if rep.queue:
            r, held, at = rep.queue.popleft()
            self.result.queued += 1
            self._start(rep, r, held + self.now - at)
        if not machine.in_engine and isinstance(machine.job, WaitDrained):
            self._feed(rep, Drained(self.now, True))

    def _hold_timeout(self, rep: _Replica, key: int) -> None:
        if rep.waiters.pop(key, None) is not None:
            self._feed(rep, HeldLeft(0))
            self.result.rejected += 1

    # -- the machine's effects ----------------------------------------------------------------

    def _feed(self, rep: _Replica, event: Event) -> None:
        self._after(rep, rep.machine.handle(event))

    def _after(self, rep: _Replica, effects: list[Effect]) -> None:
        self._track(rep)
        for effect in effects:
            if isinstance(effect, JOBS):
                self._perform(rep, effect)
            elif isinstance(effect, ReleaseHeld):
                waiters, rep.waiters = list(rep.waiters.values()), {}
                for r in waiters:
                    self.result.held += 1
                    self._serve(rep, r, self.now - r.t)
            elif isinstance(effect, RejectHeld):
                self.result.rejected += len(rep.waiters)
                rep.waiters.clear()
        machine = rep.machine
        if (
            self.strategy == "cold"
            and machine.state is ModelState.ASLEEP
            and not machine.stopped
            and machine.job is None
        ):
            # A pod autoscaler's step down: the drained replica's process is stopped.
            self._feed(rep, LaunchDeferred(self.now))

    def _perform(self, rep: _Replica, job: Job) -> None:
        start = self.settings.cold_start_seconds if self.strategy == "cold" else None
        delay, outcome = job_outcome(
            rep.machine, job, self.spec.wake_seconds, self.settings.sleep_seconds, start
        )
        if delay <= 0:
            self._feed(rep, outcome(self.now))
            return

        def done() -> None:
            if rep.machine.job is job:  # not settled meanwhile (a drain by the last request)
                self._feed(rep, outcome(self.now))

        self._at(self.now + delay, OP_DONE, done)

    def _track(self, rep: _Replica) -> None:
        """Follow a replica's state: count wakes, starts and scale-downs; integrate memory."""
        machine = rep.machine
        if machine.state is rep.state and machine.stopped == rep.stopped:
            return
        what = {
            ModelState.WAKING: "wake",
            ModelState.STARTING: "start",
            ModelState.DRAINING: "drain",
            ModelState.AWAKE: "awake",
        }.get(machine.state)
        if machine.state is not rep.state and what is not None:
            if what == "wake":
                self.result.wakes += 1
            elif what == "start":
                self.result.starts += 1
            elif what == "drain":
                self.result.downs += 1
            self.result.events.append((self.now, rep.label, what))
        if machine.state is ModelState.ASLEEP and rep.state is not ModelState.ASLEEP:
            self.result.events.append((self.now, rep.label, "asleep"))
        rep.state, rep.stopped = machine.state, machine.stopped
        self._account(rep, self.now)
        rep.gb = self._gb(rep)

    def _gb(self, rep: _Replica) -> float:
        if rep.machine.state is not ModelState.ASLEEP:
            return self.spec.memory_gb
        return 0.0 if rep.machine.stopped else self.settings.asleep_gb

    def _account(self, rep: _Replica, now: float) -> None:
        """Memory held by the replica from `since` to `now`, clipped to the trace window."""
        lo, hi = max(rep.since, self.trace.start), min(now, self.trace.end)
        if hi > lo:
            self.result.gb_seconds += rep.gb * (hi - lo)
        rep.since = now


# ---- summaries and the table -----------------------------------------------------------------


@dataclass(frozen=True)
class ScaleSummary:
    strategy: str
    requests: int
    served: int
    rejected: int
    gb_hours: float
    always_on_gb_hours: float
    held: int
    queued: int
    p50: float  # added latency over all served requests
    p99: float
    max: float
    wakes: int
    starts: int
    downs: int

    @property
    def saved(self) -> float:
        if self.always_on_gb_hours <= 0:
            return 0.0
        return round(1.0 - self.gb_hours / self.always_on_gb_hours, 12) + 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "strategy": self.strategy,
            "requests": self.requests,
            "served": self.served,
            "rejected": self.rejected,
            "gb_hours": round(self.gb_hours, 3),
            "always_on_gb_hours": round(self.always_on_gb_hours, 3),
            "saved_share": round(self.saved, 4),
            "held": self.held,
            "queued": self.queued,
            "added_latency_p50_s": round(self.p50, 3),
            "added_latency_p99_s": round(self.p99, 3),
            "added_latency_max_s": round(self.max, 3),
            "wakes": self.wakes,
            "starts": self.starts,
            "scale_downs": self.downs,
        }


def summarize(results: Sequence[ScaleResult], hours: float) -> ScaleSummary:
    """One strategy, over one model's replicas or several models'."""
    added = [a for r in results for a in r.added]
    return ScaleSummary(
        strategy=results[0].strategy,
        requests=sum(r.requests for r in results),
        served=sum(r.served for r in results),
        rejected=sum(r.rejected for r in results),
        gb_hours=sum(r.gb_seconds for r in results) / 3600,
        always_on_gb_hours=sum(r.memory_gb * r.replicas for r in results) * hours,
        held=sum(r.held for r in results),
        queued=sum(r.queued for r in results),
        p50=percentile(added, 50),
        p99=percentile(added, 99),
        max=max(added, default=0.0),
        wakes=sum(r.wakes for r in results),
        starts=sum(r.starts for r in results),
        downs=sum(r.downs for r in results),
    )


@dataclass
class ScaleComparison:
    """Every strategy over one trace, per model."""

    trace: Trace
    models: list[SimModel]
    settings: LabSettings
    runs: dict[str, dict[str, ScaleResult]]  # strategy -> model -> result
    notes: list[str] = field(default_factory=list)

    @property
    def hours(self) -> float:
        return max(self.trace.end - self.trace.start, 1e-9) / 3600

    def summary(self, strategy: str, model: str | None = None) -> ScaleSummary:
        chosen = self.runs[strategy]
        results = list(chosen.values()) if model is None else [chosen[model]]
        return summarize(results, self.hours)

    def scopes(self) -> list[str | None]:
        names: list[str | None] = [m.cfg.name for m in self.models]
        return [*names, None] if len(names) > 1 else names

    def as_dict(self) -> dict[str, Any]:
        s = self.settings
        return {
            "trace": {
                "name": self.trace.name,
                "start": self.trace.start,
                "end": self.trace.end,
                "hours": round(self.hours, 3),
                "requests": len(self.trace.requests),
            },
            "replicas": s.replicas,
            "capacity": s.capacity,
            "check_seconds": s.check_seconds,
            "cold_start_seconds": s.cold_start_seconds,
            "asleep_gb": s.asleep_gb,
            "models": {
                m.cfg.name: {
                    "memory_gb": m.memory_gb,
                    "wake_seconds": m.wake_seconds,
                    "scaling": dataclasses.asdict(
                        next(iter(self.runs.values()))[m.cfg.name].scaling
                    ),
                    "strategies": {k: self.summary(k, m.cfg.name).as_dict() for k in self.runs},
                }
                for m in self.models
            },
            "total": {k: self.summary(k).as_dict() for k in self.runs},
            "notes": self.notes,
        }


def compare_scaling(
    trace: Trace,
    models: Sequence[SimModel],
    settings: LabSettings,
    strategies: Sequence[str] = STRATEGIES,
    notes: Sequence[str] = (),
    scaling: Mapping[str, ScalingPolicy] | None = None,
) -> ScaleComparison:
    """Every strategy for every model; `scaling` gives a model its own policy (its config's
    `scaling:` block), else `settings.scaling` applies."""
    chosen = scaling or {}

    def of(model: SimModel) -> LabSettings:
        own = chosen.get(model.cfg.name)
        return settings if own is None else dataclasses.replace(settings, scaling=own)

    runs = {
        k: {m.cfg.name: ScaleReplay(trace, m, k, of(m)).run() for m in models} for k in strategies
    }
    return ScaleComparison(trace, list(models), settings, runs, list(notes))


def lab_models(
    config: Config, names: Sequence[str], wake_history: Mapping[str, float] | None = None
) -> tuple[list[SimModel], dict[str, ScalingPolicy], list[str]]:
    """The trace's models as the lab replays them, their configured `scaling:` blocks, and notes
    about guesses made. A model the config serves with `replicas:` is known by its served name,
    and every replica replays with replica 0's memory and wake time."""
    served, _, differ = served_models(config)
    scaling = {
        cfg.name: cfg.scaling
        for cfg in served.models
        if cfg.name in names and cfg.scaling is not None
    }
    models, notes = sim_models(served, names, dict(wake_history or {}))
    return models, scaling, [differ[n] for n in names if n in differ] + notes


_HEADER = (
    f"{'strategy':<11}{'GB-h held':>11}{'saved':>8}{'held':>7}{'queued':>8}"
    f"{'p50 s':>8}{'p99 s':>8}{'max s':>8}{'wakes':>7}{'starts':>8}{'downs':>7}{'lost':>6}"
)


def _row(s: ScaleSummary) -> str:
    return (
        f"{s.strategy:<11}{s.gb_hours:>11.1f}{s.saved:>8.1%}{s.held:>7d}{s.queued:>8d}"
        f"{s.p50:>8.2f}{s.p99:>8.2f}{s.max:>8.1f}{s.wakes:>7d}{s.starts:>8d}{s.downs:>7d}"
        f"{s.requests - s.served:>6d}"
    )


def describe(p: ScalingPolicy) -> str:
    """A scaling policy in one line, in the config's words."""
    top = "all" if p.max_awake is None else str(p.max_awake)
    targets = ", ".join(
        f"{name} {value:g}"
        for name, value in (
            ("target_in_flight", p.target_in_flight),
            ("target_queue", p.target_queue),
            ("target_kv_cache_usage", p.target_kv_cache_usage),
        )
        if value is not None
    )
    return (
        f"min_awake {p.min_awake}, max_awake {top}, {targets or 'no target'}, up after "
        f"{p.scale_up_after_seconds:g} s, down after {p.scale_down_after_seconds:g} s"
    )


def format_scaling(comparison: ScaleComparison) -> str:
    """Per model (and in total when several): one row per strategy."""
    c, s = comparison, comparison.settings
    lines = [
        f"trace: {c.trace.name}: {len(c.trace.requests)} requests over {c.hours:.1f} h",
        f"{s.replicas} replicas per model, each serving {s.capacity} at once (more queue), "
        f"scaled every {s.check_seconds:g} s;",
        f"a cold start takes {s.cold_start_seconds:g} s; "
        f"an asleep replica holds {s.asleep_gb:g} GB",
    ]
    for scope in c.scopes():
        if scope is None:
            lines += ["", "TOTAL", _HEADER]
        else:
            m = next(x for x in c.models if x.cfg.name == scope)
            policy_used = next(iter(c.runs.values()))[scope].scaling
            lines += [
                "",
                f"{scope}  ({m.memory_gb:g} GB per replica, wake {m.wake_seconds:g} s)",
                f"  scaling: {describe(policy_used)}",
                _HEADER,
            ]
        lines += [_row(c.summary(k, scope)) for k in c.runs]
    lines += [
        "",
        "held: requests that waited for a wake or start; queued: for a free slot in a replica;",
        "p50/p99/max: added latency (held + queued) over all served requests; lost: not served",
    ]
    if c.notes:
        lines += ["", *(f"note: {n}" for n in c.notes)]
    return "\n".join(lines)


def parse_strategies(text: str) -> list[str]:
    chosen = [k.strip() for k in text.split(",") if k.strip()]
    unknown = [k for k in chosen if k not in STRATEGIES]
    if unknown or not chosen:
        raise ValueError(
            f"--strategies: unknown {', '.join(unknown) or 'nothing'} "
            f"(choose from {', '.join(STRATEGIES)})"
        )
    return list(dict.fromkeys(chosen))


def with_wake(models: Sequence[SimModel], wake_seconds: float | None) -> list[SimModel]:
    """`--wake-seconds`: every model's wake latency, instead of its config's."""
    if wake_seconds is None:
        return list(models)
    return [dataclasses.replace(m, wake_seconds=wake_seconds) for m in models]
