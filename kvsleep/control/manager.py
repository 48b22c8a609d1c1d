"""The one owner of every model's sleep state: admission, holding, and single-flight operations.

Each model has a *desired* state (awake or not) and at most one worker task converging the actual
state to it, one engine call at a time. Requests never reach an engine that is not awake: while a
model drains, sleeps or wakes they wait in a bounded FIFO and are let through, in arrival order,
the moment a wake completes. The reconciler (reconciler.py) decides when to sleep; this module
decides nothing, it only carries out safely.

Also the kvcached controller's SleepManager API (`SleepConfig`, `add_vllm_model`, ...), with its
signatures, defaults and return values, carried out by the same machinery (docs/kvcached.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
import weakref
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from kvsleep.config import ModelConfig, SleepPolicy
from kvsleep.control.adaptive import Thresholds
from kvsleep.control.policy_source import FleetTraffic
from kvsleep.control.reconciler import Reconciler
from kvsleep.control.replicas import ModelGroup
from kvsleep.control.state_file import StateStore, StateWriter, StoredModel
from kvsleep.control.traffic import TrafficMonitor
from kvsleep.core import policy, scaling
from kvsleep.core.machine import (
    JOBS,
    Admit,
    Adopted,
    Arrived,
    Call,
    CallDone,
    CallResult,
    CheckLoad,
    Count,
    Drained,
    Effect,
    EngineMachine,
    Event,
    Healed,
    HeldLeft,
    Hold,
    Identified,
    Identify,
    Job,
    LaunchDeferred,
    LaunchFailed,
    LaunchSpawning,
    LaunchStarted,
    LaunchStarting,
    LoadReported,
    Log,
    MakeRoom,
    Measured,
    MeasureMemory,
    Observed,
    Pending,
    Persist,
    Reconfigured,
    Record,
    Recorded,
    Reject,
    RejectHeld,
    ReleaseHeld,
    Removed,
    RoomReady,
    Settle,
    Start,
    WaitDrained,
    WantSleep,
    WantWake,
    WriteRecord,
)
from kvsleep.core.states import ModelState
from kvsleep.engines import (
    EngineAdapter,
    EngineError,
    Observation,
    RetryPolicy,
    SessionSource,
    SleepUnsupported,
    adapter_for,
)
from kvsleep.web.metrics import Metrics, ModelSnapshot, ReplicaSnapshot, ScalingSnapshot

log = logging.getLogger(__name__)

POLICY_KEYS = tuple(f.name for f in dataclasses.fields(SleepPolicy))


def _with_policy_fields(cls: type) -> type:
    """Add every SleepPolicy key the class does not declare, with the config file's default, so
    that SleepConfig carries the whole policy, keys kvsleep adds later included."""
    annotations = cls.__annotations__  # the class body's own (mutated here)
    for policy_field in dataclasses.fields(SleepPolicy):
        if policy_field.name not in annotations:
            annotations[policy_field.name] = policy_field.type
            setattr(
                cls,
                policy_field.name,
                field(default=policy_field.default, default_factory=policy_field.default_factory),
            )
    return cls


@dataclass
@_with_policy_fields
class SleepConfig:
    """The kvcached controller's SleepConfig: mutable, its fields and class defaults first.

    Assigning a policy field of a manager's config (`manager.config.min_sleep_duration = 120`)
    applies it to every model of that manager, as `update_config` does. The class default of
    `min_sleep_duration` is kvcached's class default (60); a config *file* without the key gets
    the seed's documented 80 (SleepPolicy). kvsleep's other policy keys follow, with the config
    file's defaults.
    """

    idle_threshold_seconds: float = 300
    check_interval_seconds: float = 60
    auto_sleep_enabled: bool = False
    wakeup_on_request: bool = True
    min_sleep_duration: float = 60
    # model name -> {"host": ..., "port": ...}; kept in step with the manager's models
    vllm_models_config: dict[str, dict[str, Any]] | None = None
    sglang_models_config: dict[str, dict[str, Any]] | None = None
    # The managers whose models follow this config's policy fields.
    _managers: weakref.WeakSet[SleepManager] = field(
        default_factory=weakref.WeakSet, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        if self.vllm_models_config is None:
            self.vllm_models_config = {}
        if self.sglang_models_config is None:
            self.sglang_models_config = {}

    def __setattr__(self, name: str, value: object) -> None:
        object.__setattr__(self, name, value)
        if name in POLICY_KEYS:
            for manager in getattr(self, "_managers", ()):
                manager.apply_policy({name: value})

    @classmethod
    def from_policy(cls, policy: SleepPolicy, **models: Any) -> SleepConfig:
        policy_keys: dict[str, Any] = {key: getattr(policy, key) for key in POLICY_KEYS}
        return cls(**policy_keys, **models)

    def policy(self) -> SleepPolicy:
        """The immutable policy a model carries."""
        return SleepPolicy(**{key: getattr(self, key) for key in POLICY_KEYS})

    def models_of(self, engine: str) -> dict[str, dict[str, Any]]:
        found = self.vllm_models_config if engine == "vllm" else self.sglang_models_config
        assert found is not None  # set by __post_init__
        return found


HoldCallback = Callable[[], Awaitable[None]]
Starter = Callable[[str], Awaitable[None]]
AdapterFactory = Callable[[ModelConfig, SessionSource, RetryPolicy], EngineAdapter]
EngineKey = tuple[str, str]

MEMORY_RECHECK_SECONDS = 0.5  # a wake blocked on GPU memory re-plans at least this often


class Rejected(Exception):
    """A request that cannot be served because its model cannot be made awake for it."""

    def __init__(
        self, model: str, reason: str, message: str, status: int, retry_after: float | None = None
    ) -> None:
        super().__init__(message)
        self.model = model
        self.reason = reason
        self.status = status
        self.retry_after = retry_after


class NotAllowed(Exception):
    """An operation the configuration forbids (e.g. sleeping an `always_on` model)."""


def engine_key(cfg: ModelConfig) -> EngineKey:
    """What kvsleep's knowledge is about: an engine (flavor and address), not a config entry."""
    return (cfg.engine, cfg.url.rstrip("/"))


@dataclass(eq=False)
class ModelSlot:
    """One model's engine: its state machine (core/machine.py, the only place its state
    changes) and what executing it takes in asyncio (futures of held requests and control calls,
    the task running its current job)."""

    cfg: ModelConfig
    adapter: EngineAdapter
    machine: EngineMachine
    drained: asyncio.Future[None] | None = None  # a drain waits for the last request's end
    waiters: deque[asyncio.Future[None]] = field(default_factory=deque)
    worker: asyncio.Task[None] | None = None
    next_job: Job | None = None
    sleep_outcomes: list[asyncio.Future[bool]] = field(default_factory=list)
    wake_outcomes: list[asyncio.Future[bool]] = field(default_factory=list)
    waiting_for_memory: str | None = None

    # Read-only views of the machine, for routes, metrics and tests.
    state = property(lambda self: self.machine.state)
    state_since = property(lambda self: self.machine.state_since)
    version = property(lambda self: self.machine.version)
    in_engine = property(lambda self: self.machine.in_engine)
    want_awake = property(lambda self: self.machine.want_awake)
    engine_up = property(lambda self: self.machine.engine_up)
    slept_at = property(lambda self: self.machine.slept_at)
    manual_sleep = property(lambda self: self.machine.manual_sleep)
    deferred_wake = property(lambda self: self.machine.deferred_wake)
    last_error = property(lambda self: self.machine.last_error)
    stopped = property(lambda self: self.machine.stopped)
    queued = property(lambda self: self.machine.queued)
    sleep_failures = property(lambda self: self.machine.sleep_failures)
    sleep_retry_at = property(lambda self: self.machine.sleep_retry_at)
    cannot_sleep = property(lambda self: self.machine.cannot_sleep)
    incarnation = property(lambda self: self.machine.incarnation)

    @property
    def busy(self) -> bool:
        return self.machine.busy

    # The reconciler's Probe protocol.
    @property
    def name(self) -> str:
        return self.cfg.name

    @property
    def served_name(self) -> str:
        return self.cfg.served_name

    @property
    def check_interval(self) -> float:
        return self.cfg.policy.check_interval_seconds

    @property
    def probe_now(self) -> bool:
        return not self.busy and self.state is not ModelState.STARTING and not self.stopped

    async def observe(self) -> Observation:
        return await self.adapter.observe(self.state)


def _all(outcomes: list[asyncio.Future[bool]]) -> asyncio.Future[bool]:
    """One outcome for several: true when every one is."""
    joined: asyncio.Future[bool] = asyncio.get_running_loop().create_future()

    def settle(_: object) -> None:
        if not joined.done() and all(o.done() for o in outcomes):
            joined.set_result(all(not o.cancelled() and o.result() for o in outcomes))

    for outcome in outcomes:
        outcome.add_done_callback(settle)
    return joined


class SleepManager:
    """Owns model state; see the module docstring."""

    def __init__(
        self,
        config: SleepConfig | SleepPolicy | None = None,
        traffic_monitor: TrafficMonitor | None = None,
        *,
        metrics: Metrics | None = None,
        state_store: StateStore | None = None,
        clock: Callable[[], float] = time.time,
        session: aiohttp.ClientSession | None = None,
        retry: RetryPolicy | None = None,
        adapter_factory: AdapterFactory = adapter_for,
        owns: Callable[[str], bool] = lambda name: True,
    ) -> None:
        self.clock = clock
        self.slots: dict[str, ModelSlot] = {}  # by engine name (a replica is `model@i`)
        self.groups: dict[str, ModelGroup] = {}  # by the name clients use: a model's replicas
        # Engines of models that left the configuration: re-added or renamed, they keep what is
        # known of them; records read at start-up for engines not configured (yet).
        self.retired: dict[EngineKey, tuple[str, EngineMachine]] = {}
        self.records: dict[EngineKey, StoredModel] = {}
        self._config = SleepConfig()
        self.config = config or SleepConfig()
        self.traffic_monitor = traffic_monitor or TrafficMonitor(
            self.config.idle_threshold_seconds, clock=clock
        )
        self.metrics = metrics or Metrics()
        self.state_store = state_store
        self.retry = retry or RetryPolicy()
        self.adapter_factory = adapter_factory
        self.owns = owns
        self._session = session
        self._owns_session = session is None
        self.thresholds = Thresholds.watching(self.traffic_monitor)  # adaptive idle thresholds
        self.reconciler: Reconciler | None = None  # set by the owner (the server), or start()
        self._reconciler_task: asyncio.Task[None] | None = None
        self.writer = StateWriter(state_store, self._stored, self._state_write_failed)
        self.gpu_budgets: dict[int, float] = {}
        self.max_held_bytes: float = float("inf")  # bodies held over all models (router's)
        self.held_bytes = 0
        self.gpu_free: Callable[[], dict[int, float] | None] = lambda: None
        self._changed = asyncio.Event()
        self._probes: set[asyncio.Task[None]] = set()
        # Set by the launcher: starts a stopped engine (raises when it cannot), and notes
        # sleep/wake events in a launched engine's log.
        self.starter: Starter | None = None
        self.on_event: Callable[[str, str], None] | None = None
        # Set where NVML works: GB of GPU memory an engine's processes hold (None: cannot tell).
        self.gpu_memory_of: Callable[[ModelConfig], Awaitable[float | None]] | None = None
        self.metrics.watch(self)
        # kvcached's SleepConfig names its engines; they become models here.
        for engine in ("vllm", "sglang"):
            for name, where in list(self.config.models_of(engine).items()):
                self._add_engine(
                    engine, name, where.get("host", "localhost"), where.get("port", "8000")
                )

    # ---- configuration -------------------------------------------------------------------

    @property
    def config(self) -> SleepConfig:
        """The global policy (kvcached's SleepConfig); a SleepPolicy assigned here (a config
        file's, on reload) becomes one, keeping the engines it lists."""
        return self._config

    @config.setter
    def config(self, value: SleepConfig | SleepPolicy) -> None:
        if isinstance(value, SleepPolicy):
            value = SleepConfig.from_policy(
                value,
                vllm_models_config=self._config.models_of("vllm"),
                sglang_models_config=self._config.models_of("sglang"),
            )
        self._config._managers.discard(self)
        value._managers.add(self)
        self._config = value

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
        return self._session

    def _get_session(self) -> aiohttp.ClientSession:
        return self.session

    def add_model(self, cfg: ModelConfig, state: ModelState = ModelState.AWAKE) -> ModelSlot:
        """A model joins. An engine known from before (the model was removed, or renamed) keeps
        what kvsleep knows of it; an engine added while kvsleep runs is looked at before any
        request reaches it (its requests are held meanwhile)."""
        adapter = self.adapter_factory(cfg, self._get_session, self.retry)
        key = engine_key(cfg)
        known = self.retired.pop(key, None)
        if known is not None:
            machine = known[1]
            machine.handle(Reconfigured(self.clock(), cfg))
        else:
            machine = EngineMachine(cfg, adapter.steps, state, self.clock())
        machine.can_measure = self.gpu_memory_of is not None
        slot = ModelSlot(cfg, adapter, machine)
        self.slots[cfg.name] = slot
        self.traffic_monitor.add_model(cfg.served_name)
        self.metrics.add_models([cfg.served_name])
        self._list_engine(cfg, {"host": cfg.host, "port": str(cfg.port)})
        self._regroup()
        if known is None and self._reconciler_task is not None:
            self._first_look(slot)
        return slot

    def _regroup(self) -> None:
        """Gather the engines into the models clients name. A model keeps its group object
        (and the scaler's memory) while it has any engine, so the router can tell a request
        whose model left from one whose model merely changed."""
        members: dict[str, list[ModelSlot]] = {}
        for slot in self.slots.values():
            members.setdefault(slot.cfg.served_name, []).append(slot)
        groups: dict[str, ModelGroup] = {}
        for name, slots in members.items():
            slots.sort(key=lambda slot: int(slot.cfg.replica))
            cfg = slots[0].cfg
            group = self.groups.get(name)
            if group is None:
                group = ModelGroup(name, tuple(slots), cfg.scaling, cfg.affinity)
            else:
                group.set_slots(tuple(slots), cfg.scaling, cfg.affinity)
            groups[name] = group
        for name in self.groups.keys() - groups.keys():
            self.traffic_monitor.remove_model(name)
            self.metrics.remove_model(name)
        self.groups = groups

    def _first_look(self, slot: ModelSlot) -> None:
        """An engine never seen: hold its requests until a probe (and any record) says how it
        stands; a vLLM found asleep must not get a request."""
        slot.machine.state = ModelState.STARTING
        task = asyncio.create_task(self._restore(slot), name=f"kvsleep-look-{slot.cfg.name}")
        self._probes.add(task)
        task.add_done_callback(self._probes.discard)

    async def _restore(self, slot: ModelSlot) -> None:
        observed = await slot.adapter.observe(slot.machine.state)
        if self.slots.get(slot.cfg.name) is not slot:
            return
        self._carry_out(
            slot, slot.machine.restore(self.clock(), observed, self._record_for(slot.cfg))
        )

    def _record_for(self, cfg: ModelConfig) -> Record | None:
        stored = self.records.get(engine_key(cfg))
        if stored is None:
            return None
        pending = Pending(*stored.pending) if stored.pending else None
        return Record(stored.state, stored.since, stored.incarnation, pending)

    def _list_engine(self, cfg: ModelConfig, where: dict[str, Any]) -> None:
        """Keep kvcached's per-engine model lists in step with the models."""
        for engine in ("vllm", "sglang"):
            self.config.models_of(engine).pop(cfg.name, None)
        self.config.models_of(cfg.engine)[cfg.name] = where

    def _add_engine(self, engine: str, name: str, host: str, port: str | int) -> None:
        """kvcached's add: a known model keeps its state and takes the new address."""
        netloc_host = f"[{host}]" if ":" in host else host  # an IPv6 address
        cfg = ModelConfig(
            name,
            engine,
            f"http://{netloc_host}:{port}",
            policy=self.config.policy(),
            weights_path=name if engine == "sglang" else None,
        )
        if name in self.slots:
            self.update_model(cfg)
        else:
            self.add_model(cfg)
        self._list_engine(cfg, {"host": host, "port": port})

    def add_vllm_model(self, model_name: str, host: str = "localhost", port: str = "8000") -> None:
        self._add_engine("vllm", model_name, host, port)

    def add_sglang_model(
        self, model_name: str, host: str = "localhost", port: str = "8000"
    ) -> None:
        self._add_engine("sglang", model_name, host, port)

    def remove_vllm_model(self, model_name: str) -> None:
        self._remove_engine("vllm", model_name)

    def remove_sglang_model(self, model_name: str) -> None:
        self._remove_engine("sglang", model_name)

    def _remove_engine(self, engine: str, model_name: str) -> None:
        if model_name in self.config.models_of(engine):
            self.remove_model(model_name)
        else:
            log.warning("no %s model %s to remove", engine, model_name)

    def get_vllm_models(self) -> dict[str, dict[str, Any]]:
        return dict(self.config.models_of("vllm"))

    def get_sglang_models(self) -> dict[str, dict[str, Any]]:
        return dict(self.config.models_of("sglang"))

    def remove_model(self, model_name: str) -> None:
        """Forget a model; requests already admitted keep their slot until they finish, control
        calls waiting for it are answered at once, and what is known of its engine is kept."""
        slot = self.slots.pop(model_name, None)
        if slot is None:
            return
        self.config.models_of(slot.cfg.engine).pop(model_name, None)
        self._carry_out(slot, slot.machine.handle(Removed()))
        if slot.worker is not None:
            slot.worker.cancel()
        self.retired[engine_key(slot.cfg)] = (model_name, slot.machine)
        self._regroup()
        self.persist()

    def update_model(self, cfg: ModelConfig) -> None:
        """Apply a changed model config in place, keeping its state and its waiters. A model
        pointed at another engine gets that engine's state (known, or looked at first)."""
        slot = self.slots[cfg.name]
        old = slot.machine
        if engine_key(cfg) != engine_key(slot.cfg):
            if slot.worker is not None:
                slot.worker.cancel()
            self.retired[engine_key(slot.cfg)] = (cfg.name, old)
            slot.adapter = self.adapter_factory(cfg, self._get_session, self.retry)
            known = self.retired.pop(engine_key(cfg), None)
            slot.machine = (
                known[1]
                if known is not None
                else EngineMachine(cfg, slot.adapter.steps, ModelState.AWAKE, self.clock())
            )
            slot.machine.held, slot.machine.held_bytes = old.held, old.held_bytes
            slot.machine.in_engine = old.in_engine
            old.held = old.held_bytes = old.in_engine = 0
            slot.machine.pending_sleep, slot.machine.pending_wake = (
                old.pending_sleep,
                old.pending_wake,
            )
            old.pending_sleep = old.pending_wake = 0
            if known is None:
                self._first_look(slot)
            self.persist()
        slot.cfg = cfg
        slot.adapter.model = cfg
        self._list_engine(cfg, {"host": cfg.host, "port": str(cfg.port)})
        self._regroup()
        self._carry_out(slot, slot.machine.handle(Reconfigured(self.clock(), cfg)))

    def update_config(self, **kwargs: object) -> None:
        """Change policy keys for every model at once (the kvcached controller's API)."""
        known = {f.name for f in dataclasses.fields(SleepConfig)}
        for key, value in kwargs.items():
            if key in known:
                setattr(self.config, key, value)  # a policy key applies itself (apply_policy)
            else:
                log.warning("update_config: unknown key %r ignored", key)

    def apply_policy(self, changes: dict[str, object]) -> None:
        """Global policy changes override every model's own value, from now on."""
        for slot in self.slots.values():
            merged = dataclasses.replace(slot.cfg.policy, **changes)  # type: ignore[arg-type]
            slot.cfg = dataclasses.replace(slot.cfg, policy=merged)
            slot.adapter.model = slot.cfg
            slot.machine.cfg = slot.cfg
        if "idle_threshold_seconds" in changes:
            self.traffic_monitor.idle_threshold_seconds = self.config.idle_threshold_seconds

    # ---- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Learn every engine's real state, then run the reconcile loop (the owner's, or one
        of its own for the kvcached API)."""
        if self.reconciler is None:
            self.reconciler = Reconciler(self)
        await self.sync()
        self._reconciler_task = asyncio.create_task(self.reconciler.run(), name="kvsleep-reconcile")

    async def sync(self) -> None:
        """Before serving: believe each engine's word where it has one, its record otherwise
        (records are about engines: a renamed model keeps its engine's)."""
        models, retired = self.state_store.load_all() if self.state_store else ({}, [])
        for _name, record in [*retired, *models.items()]:
            self.records[record.key] = record
        for name, record in retired:
            if record.key not in {engine_key(s.cfg) for s in self.slots.values()}:
                cfg = ModelConfig(name, record.engine, record.url)
                steps = self.adapter_factory(cfg, self._get_session, self.retry).steps
                machine = EngineMachine(cfg, steps, ModelState.AWAKE, self.clock())
                machine.restore(self.clock(), Observation(up=False), self._record_for(cfg))
                self.retired[record.key] = (name, machine)
        # A launched engine being started is the launcher's: nothing to probe or adopt yet.
        slots = [s for s in self.slots.values() if s.state is not ModelState.STARTING]
        observations = await asyncio.gather(
            *(s.adapter.observe(self._believed(s.cfg)) for s in slots)
        )
        for slot, observed in zip(slots, observations, strict=True):
            self._carry_out(
                slot, slot.machine.restore(self.clock(), observed, self._record_for(slot.cfg))
            )
        await asyncio.gather(*(s.worker for s in slots if s.worker is not None))
        await self.flush()

    def _believed(self, cfg: ModelConfig) -> ModelState:
        record = self.records.get(engine_key(cfg))
        return record.state if record is not None else ModelState.AWAKE

    async def stop(self) -> None:
        tasks = [
            t
            for t in (self._reconciler_task, *(s.worker for s in self.slots.values()))
            if t is not None
        ]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._reconciler_task = None
        await self.flush()
        if self._owns_session and self._session is not None:
            await self._session.close()
            self._session = None

    # ---- the request path ----------------------------------------------------------------

    async def acquire(
        self,
        model_name: str,
        deadline: float | None = None,
        on_hold: HoldCallback | None = None,
        hold_interval: float = 5.0,
        size: int = 0,
    ) -> ModelSlot:
        """Wait until the model is awake and count the request as in the engine.

        Raises Rejected when the request must not wait (queue full by count or by the `size`
        bytes of held bodies, wakes disabled, a wake expected to outlast `deadline` seconds or
        the hold timeout, state unknown) or waited in vain (timeout, failed wake). While held,
        `on_hold` is awaited every `hold_interval` seconds. The caller must `release` the
        returned slot.
        """
        slot = self.slots[model_name]
        if slot.machine.admit_awake():
            return slot
        served = slot.cfg.served_name
        effects = slot.machine.handle(
            Arrived(self.clock(), size, self.max_held_bytes - self.held_bytes, deadline)
        )
        verdict = effects[0]
        self._carry_out(slot, effects[1:])
        if isinstance(verdict, Admit):
            return slot
        if isinstance(verdict, Reject):
            self.metrics.rejected_requests.labels(served, verdict.reason).inc()
            raise Rejected(
                model_name, verdict.reason, verdict.message, verdict.status, verdict.retry_after
            )
        assert isinstance(verdict, Hold)
        timeout = verdict.timeout
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        slot.waiters.append(fut)
        self.held_bytes += size
        started = time.monotonic()
        try:
            await self._wait_held(fut, started + timeout, on_hold, hold_interval)
        except asyncio.TimeoutError:
            self._forget_waiter(slot, fut, size)
            wait = slot.machine.eta_remaining(self.clock())
            message = f"model `{slot.machine.name}` did not wake within {timeout:g}s"
            if slot.waiting_for_memory:
                message += f" ({slot.waiting_for_memory})"
            self.metrics.rejected_requests.labels(served, "wake_timeout").inc()
            raise Rejected(
                model_name, "wake_timeout", message, 504, max(1.0, wait or 1.0)
            ) from None
        except Rejected as exc:
            if self.slots.get(model_name) is slot:  # a removed model leaves no series behind
                self.metrics.rejected_requests.labels(served, exc.reason).inc()
            raise
        except BaseException:  # cancelled, or on_hold found the client gone
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                self.release(slot)
            else:
                self._forget_waiter(slot, fut, size)
            raise
        finally:
            self.held_bytes -= size
        if self.slots.get(model_name) is slot:
            self.metrics.request_hold.labels(served).observe(time.monotonic() - started)
        return slot

    @staticmethod
    async def _wait_held(
        fut: asyncio.Future[None], until: float, on_hold: HoldCallback | None, interval: float
    ) -> None:
        """Every held request waits the same way (asyncio.wait on its own future), so all are
        resumed in the order their futures were resolved: the FIFO order of arrival."""
        while True:
            left = until - time.monotonic()
            if left <= 0:
                raise asyncio.TimeoutError
            done, _ = await asyncio.wait(
                {fut}, timeout=min(left, interval) if on_hold is not None else left
            )
            if done:
                fut.result()
                return
            if on_hold is not None and time.monotonic() < until:
                await on_hold()

    @staticmethod
    def admit_now(slot: ModelSlot) -> bool:
        """The data path's fast case: an awake model takes the request at once (the caller must
        `release` it)."""
        return slot.machine.admit_awake()

    def release(self, slot: ModelSlot) -> None:
        """A forwarded request is over (its upstream connection closed)."""
        machine = slot.machine
        machine.finished()
        if machine.in_engine == 0:
            if slot.drained is not None and not slot.drained.done():
                slot.drained.set_result(None)
            if self.gpu_budgets:
                self._signal_change()

    def _forget_waiter(self, slot: ModelSlot, fut: asyncio.Future[None], size: int) -> None:
        with contextlib.suppress(ValueError):
            slot.waiters.remove(fut)
            slot.machine.handle(HeldLeft(size))

    def _signal_change(self) -> None:
        """Wake whoever waits for memory to be freed; they re-plan."""
        self._changed.set()
        self._changed = asyncio.Event()

    def wake_eta(self, slot: ModelSlot) -> float | None:
        return slot.machine.wake_eta()

    def eta_remaining(self, slot: ModelSlot) -> float | None:
        return slot.machine.eta_remaining(self.clock())

    # ---- carrying out the machine's effects ------------------------------------------------

    def _feed(self, slot: ModelSlot, event: Event) -> None:
        self._carry_out(slot, slot.machine.handle(event))

    def _carry_out(self, slot: ModelSlot, effects: list[Effect]) -> None:
        name = slot.cfg.name
        for effect in effects:
            if isinstance(effect, JOBS):
                slot.next_job = effect
                if slot.worker is None or slot.worker.done():
                    slot.worker = asyncio.create_task(
                        self._work(slot), name=f"kvsleep-op-{slot.cfg.name}"
                    )
            elif isinstance(effect, ReleaseHeld):
                while slot.waiters:
                    fut = slot.waiters.popleft()
                    if not fut.done():
                        fut.set_result(None)
            elif isinstance(effect, RejectHeld):
                while slot.waiters:
                    fut = slot.waiters.popleft()
                    if not fut.done():
                        fut.set_exception(
                            Rejected(name, effect.reason, effect.message, effect.status, 5.0)
                        )
            elif isinstance(effect, Settle):
                futures = slot.sleep_outcomes if effect.op == "sleep" else slot.wake_outcomes
                for outcome in futures:
                    if not outcome.done():
                        outcome.set_result(effect.ok)
                futures.clear()
            elif isinstance(effect, Persist):
                self.persist()
            elif isinstance(effect, Log):
                getattr(log, effect.level)("model %s: %s", name, effect.text)
                if effect.event:
                    self._event(name, effect.text)
            elif isinstance(effect, Count):
                counter = self.metrics.sleeps if effect.op == "sleep" else self.metrics.wakes
                if self.slots.get(name) is slot:
                    served = slot.cfg.served_name
                    counter.labels(served, effect.reason, "ok" if effect.ok else "error").inc()
                    if effect.took is not None:
                        duration = (
                            self.metrics.sleep_duration
                            if effect.op == "sleep"
                            else self.metrics.wake_duration
                        )
                        duration.labels(served).observe(effect.took)
        if self.gpu_budgets:
            self._signal_change()

    async def _work(self, slot: ModelSlot) -> None:
        """Run the machine's jobs one after another until it needs none."""
        try:
            await self._jobs(slot)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("model %s: carrying out its state machine failed", slot.cfg.name)
            raise

    async def _jobs(self, slot: ModelSlot) -> None:
        while (job := slot.next_job) is not None:
            slot.next_job = None
            log.debug("model %s: %s", slot.cfg.name, job)
            event = await self._perform(slot, job)
            log.debug("model %s: %s", slot.cfg.name, event)
            if self.slots.get(slot.cfg.name) is not slot:
                return
            self._feed(slot, event)

    async def _perform(self, slot: ModelSlot, job: Job) -> Event:
        adapter = slot.adapter
        if isinstance(job, WaitDrained):
            if slot.machine.in_engine:
                slot.drained = asyncio.get_running_loop().create_future()
                try:
                    await asyncio.wait_for(slot.drained, job.timeout)
                except asyncio.TimeoutError:
                    return Drained(self.clock(), False)
                finally:
                    slot.drained = None
            return Drained(self.clock(), True)
        if isinstance(job, CheckLoad):
            if job.after:
                await asyncio.sleep(job.after)
            return LoadReported(self.clock(), await adapter.load())
        if isinstance(job, Identify):
            if job.after:
                await asyncio.sleep(job.after)
            return Identified(self.clock(), await adapter.observe(slot.state))
        if isinstance(job, WriteRecord):
            error = await self.writer.write_now()
            return Recorded(self.clock(), error is None, error or "")
        if isinstance(job, MakeRoom):
            ok, reason = await self._make_room(slot) if self.gpu_budgets else (True, "")
            return RoomReady(self.clock(), ok, reason)
        if isinstance(job, MeasureMemory):
            assert self.gpu_memory_of is not None
            return Measured(self.clock(), await self.gpu_memory_of(slot.cfg))
        if isinstance(job, Start):
            assert self.starter is not None
            try:
                await self.starter(slot.cfg.name)
            except Exception as exc:  # every waiter must get an answer, whatever went wrong
                return LaunchFailed(self.clock(), str(exc))
            return LaunchStarted(self.clock())
        return await self._call(slot, job)

    async def _call(self, slot: ModelSlot, job: Call) -> CallDone:
        adapter = slot.adapter
        started = time.monotonic()
        try:
            await adapter.run(job.step)
        except Exception as exc:  # any failure must leave the model serving, not stuck
            result = CallResult.FAILED
            if isinstance(exc, SleepUnsupported):
                result = CallResult.UNSUPPORTED
            elif getattr(exc, "maybe_applied", False) or not isinstance(exc, EngineError):
                result = CallResult.UNKNOWN
            if result is not CallResult.UNSUPPORTED and adapter.observable:
                # An engine that reports its state settles what the call did.
                observed = await adapter.observe(slot.state)
                if observed.up and observed.asleep is (job.op == "sleep"):
                    result = CallResult.OK
                elif result is CallResult.UNKNOWN:
                    result = CallResult.FAILED
            if result is not CallResult.OK:
                return CallDone(self.clock(), result, str(exc) or type(exc).__name__)
        return CallDone(self.clock(), CallResult.OK, took=time.monotonic() - started)

    def _state_write_failed(self, error: str) -> None:
        self.metrics.state_write_errors.inc()

    # ---- operations ----------------------------------------------------------------------

    def request_sleep(self, model_name: str, reason: str) -> asyncio.Future[bool]:
        """Ask for the model to sleep (after draining); the future says whether it did (a
        second call while one is under way joins it). A model with replicas: all of them."""
        if model_name not in self.slots:
            slots = self.groups[model_name].slots
            return _all([self.request_sleep(slot.cfg.name, reason) for slot in slots])
        slot = self.slots[model_name]
        if slot.cfg.always_on:
            raise NotAllowed(f"model `{model_name}` is always_on and is never put to sleep")
        outcome: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        slot.sleep_outcomes.append(outcome)
        self._feed(slot, WantSleep(self.clock(), reason))
        return outcome

    def request_wake(self, model_name: str, reason: str) -> asyncio.Future[bool]:
        """Ask for the model to wake; the future says whether it did. A model with replicas:
        the one a request would go to (awake already, waking, or the first asleep)."""
        slot = self.slots[self.engine_to_wake(model_name)]
        outcome: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        if slot.state is ModelState.AWAKE and slot.want_awake and not slot.busy:
            # Awake only counts if its engine answers: waking an unreachable one fails.
            task = asyncio.create_task(self._confirm_up(slot, outcome))
            self._probes.add(task)
            task.add_done_callback(self._probes.discard)
            return outcome
        slot.wake_outcomes.append(outcome)
        self._feed(slot, WantWake(self.clock(), reason))
        return outcome

    def engine_to_wake(self, model_name: str) -> str:
        """The engine a wake of `model_name` is for: itself, or the replica a request for the
        model would go to (awake already, waking, or the first asleep)."""
        if model_name in self.slots:
            return model_name
        return self.groups[model_name].route(None).cfg.name

    async def _confirm_up(self, slot: ModelSlot, outcome: asyncio.Future[bool]) -> None:
        observed = await slot.adapter.observe(slot.state)
        self.observe(slot.cfg.name, observed)
        if not outcome.done():
            outcome.set_result(observed.up)

    def observe(
        self, model_name: str, observed: Observation, version: int | None = None
    ) -> list[policy.Adopt]:
        """A probe's answer (the reconciler's, or the router's failure to connect); returns the
        belief it changed, if any."""
        if (slot := self.slots.get(model_name)) is None:
            return []
        effects = slot.machine.handle(
            Observed(self.clock(), observed, version, owned=self.owns(model_name))
        )
        self._carry_out(slot, effects)
        return [
            policy.Adopt(model_name, e.state, e.why, e.version)
            for e in effects
            if isinstance(e, Healed)
        ]

    # ---- the reconciler's Engines protocol -------------------------------------------------

    def probes(self) -> list[ModelSlot]:
        return list(self.slots.values())

    def default_interval(self) -> float:
        return self.config.check_interval_seconds

    def views(
        self,
        probed: list[tuple[str, Observation]],
        fleet: dict[str, FleetTraffic],
        fleet_mode: bool,
    ) -> list[policy.ModelView]:
        """What the policy decides on: the models just probed, as they stand after the probe."""
        self.thresholds.keep_only(self.groups)
        return [
            self.view(slot, None, fleet.get(slot.cfg.served_name), fleet_mode)
            for name, _ in probed
            if (slot := self.slots.get(name)) is not None and not slot.busy
        ]

    async def scale(
        self, now: float, fleet: dict[str, FleetTraffic] | None = None
    ) -> list[policy.Action]:
        """The scaler's pass (core/scaling.py decides): for each model with a `scaling` policy,
        at most one replica to wake or to drain and sleep. With a Prometheus policy source,
        the fleet's requests in flight (every kvsleep's) count when they are more than this
        one's."""
        actions: list[policy.Action] = []
        committed = self.gpu_committed() if self.gpu_budgets else {}
        for group in self.groups.values():
            rules = group.scaling
            if rules is None or not all(self.owns(slot.cfg.name) for slot in group.slots):
                continue
            views = group.views(lambda slot: self._fits(slot, committed))
            if rules.target_queue or rules.target_kv_cache_usage:
                views = await self._with_pressure(group, views)
            stats = self.traffic_monitor.add_model(group.name)
            mean = group.mean_in_flight(stats.in_flight_area_at(now), now)
            if fleet and (seen := fleet.get(group.name)) is not None:
                mean = max(mean if mean is not None else stats.in_flight, seen.in_flight)
            decision, group.memory = scaling.decide_scale(views, rules, group.memory, now, mean)
            group.decision = decision
            if decision.action is None or decision.replica is None:
                continue
            slot = group.replica(decision.replica)
            self.metrics.scale_events.labels(
                group.name, decision.replica, decision.action, decision.reason
            ).inc()
            log.info(
                "model %s: %s replica %s (%s; demand %.2f replicas)",
                group.name,
                "waking" if decision.action == "up" else "draining and sleeping",
                decision.replica,
                decision.reason,
                decision.demand,
            )
            action = policy.Wake if decision.action == "up" else policy.Sleep
            actions.append(action(slot.cfg.name, f"scale_{decision.action}"))
        return actions

    def _fits(self, slot: ModelSlot, committed: dict[int, float]) -> bool:
        """Whether waking the replica keeps its GPUs within budget without evicting anyone."""
        need = slot.cfg.memory_gb or 0.0
        return all(
            committed[gpu] + need <= self.gpu_budgets[gpu]
            for gpu in slot.cfg.gpus
            if gpu in self.gpu_budgets
        )

    async def _with_pressure(
        self, group: ModelGroup, views: list[scaling.ReplicaView]
    ) -> list[scaling.ReplicaView]:
        """The awake replicas' own queue and KV cache gauges, asked concurrently."""
        awake = [i for i, view in enumerate(views) if view.state is ModelState.AWAKE]
        found = await asyncio.gather(
            *(group.slots[i].adapter.pressure() for i in awake), return_exceptions=True
        )
        views = list(views)
        for i, got in zip(awake, found, strict=True):
            if isinstance(got, tuple):
                views[i] = dataclasses.replace(views[i], queue=got[0], kv_cache_usage=got[1])
        return views

    def apply(self, action: policy.Action, now: float) -> None:
        if isinstance(action, policy.Sleep):
            if action.reason == "scale_down":
                self.request_sleep(action.model, action.reason)
                return
            # An adaptive threshold judges its sleeps by when the next request comes.
            self.thresholds.note_sleep(self.slots[action.model].cfg.served_name, now)
            log.info("model %s is idle; putting it to sleep", action.model)
            self.request_sleep(action.model, action.reason)
        elif isinstance(action, policy.Wake):
            self.request_wake(action.model, action.reason)

    def reconcile_failed(self) -> None:
        self.metrics.reconcile_errors.inc()

    def reconcile_took(self, seconds: float) -> None:
        self.metrics.reconcile_duration.observe(seconds)

    async def adopt_state(self, model_name: str, state: ModelState) -> None:
        """An operator's word on an engine kvsleep cannot read (`kvsleep adopt`), about the
        engine process that answers now."""
        slot = self.slots[model_name]
        observed = await slot.adapter.observe(slot.state)
        if slot.busy:
            raise NotAllowed(
                f"model `{model_name}` is {slot.state.value}: an engine call is under way"
            )
        self._feed(slot, Adopted(self.clock(), state, observed.incarnation))

    def engine_unreachable(self, model_name: str, detail: str) -> None:
        """The router could not connect: report the model down until a probe says otherwise."""
        slot = self.slots.get(model_name)
        if slot is not None and slot.state is ModelState.AWAKE and not slot.busy:
            self.observe(model_name, Observation(up=False, detail=detail))

    def reported_state(self, slot: ModelSlot) -> ModelState:
        return slot.machine.reported_state()

    def defer_wake(self, model_name: str, reason: str) -> float | None:
        """Schedule a wake nobody's request asked for once `min_sleep_duration` has passed.

        Returns when it will happen, or None when it may happen now.
        """
        return self.slots[self.engine_to_wake(model_name)].machine.defer_wake(reason, self.clock())

    def _event(self, name: str, text: str) -> None:
        if self.on_event is not None:
            self.on_event(name, text)

    async def _make_room(self, slot: ModelSlot) -> tuple[bool, str]:
        """Before a wake: sleep LRU idle models until the model fits its GPUs' budgets.

        While no room can be made the model stays asleep and its requests stay held (each
        bounded by its own timeout); the reason shows in /sleep/status. Gives up once no request
        waits for a request-driven wake (held, or inside an engine slept behind our back), or
        after `wake_timeout_seconds` for any other.
        """
        name = slot.cfg.name
        give_up = time.monotonic() + slot.cfg.policy.wake_timeout_seconds
        try:
            while True:
                plan = policy.plan_room(
                    self.memory_view(slot),
                    [self.memory_view(s) for s in self.slots.values() if s is not slot],
                    self.gpu_budgets,
                    self.gpu_free(),
                )
                if plan.ok:
                    return True, ""
                for victim in plan.evict:
                    log.info("model %s: sleeping %s to make room on its GPUs", name, victim)
                    self.metrics.evictions.labels(self.slots[victim].cfg.served_name).inc()
                    self.request_sleep(victim, "idle")
                if plan.reason != slot.waiting_for_memory:
                    log.info("model %s waits for GPU memory: %s", name, plan.reason)
                slot.waiting_for_memory = plan.reason
                machine = slot.machine
                nobody_waits = (
                    machine.wake_reason == "request" and not machine.held and not machine.in_engine
                )
                if nobody_waits or time.monotonic() > give_up:
                    return False, plan.reason
                changed = self._changed
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(changed.wait(), MEMORY_RECHECK_SECONDS)
        finally:
            slot.waiting_for_memory = None

    def memory_view(self, slot: ModelSlot) -> policy.MemoryView:
        stats = self.traffic_monitor.model_stats.get(slot.cfg.name)
        machine = slot.machine
        idle = not machine.in_engine and not machine.held and (stats is None or not stats.in_flight)
        return policy.MemoryView(
            name=slot.cfg.name,
            gpus=slot.cfg.gpus,
            memory_gb=slot.cfg.memory_gb or 0.0,
            state=ModelState.ASLEEP if machine.queued or machine.stopped else machine.state,
            want_awake=machine.want_awake,
            evictable=idle and not slot.cfg.always_on and not slot.busy,
            last_activity=stats.last_activity_time if stats else 0.0,
        )

    def gpu_committed(self) -> dict[int, float]:
        """GB each budgeted GPU holds for models that are not asleep."""
        return {
            g: sum(
                s.cfg.memory_gb or 0.0
                for s in self.slots.values()
                if g in s.cfg.gpus
                and s.state is not ModelState.ASLEEP
                and not s.queued
                and not s.stopped
            )
            for g in self.gpu_budgets
        }

    # ---- launched engines (the launcher reports, requests are held meanwhile) ---------------

    def engine_starting(
        self, model_name: str, problem: str | None = None, queued: bool = False
    ) -> None:
        """A launched engine is (re)starting: hold its requests until it is ready. `queued`:
        it waits for its turn and holds no memory yet."""
        slot = self.slots.get(model_name)
        if slot is None:
            return
        if slot.worker is not None and slot.state is not ModelState.STARTING:
            slot.worker.cancel()
        slot.machine.can_start = self.starter is not None
        self._feed(slot, LaunchStarting(self.clock(), problem, queued))

    def pin_incarnation(self, model_name: str, incarnation: str) -> None:
        """The launcher's name for the engine process it started (PID and start time)."""
        if (slot := self.slots.get(model_name)) is not None:
            slot.adapter.pinned_incarnation = incarnation

    def engine_spawning(self, model_name: str) -> None:
        if (slot := self.slots.get(model_name)) is not None:
            self._feed(slot, LaunchSpawning())

    def engine_started(self, model_name: str, took: float | None = None) -> None:
        """A launched engine is ready: a fresh process is awake and holds its memory."""
        if (slot := self.slots.get(model_name)) is not None:
            self._feed(slot, LaunchStarted(self.clock(), took))

    def note_start_duration(self, model_name: str, took: float) -> None:
        if (slot := self.slots.get(model_name)) is not None:
            slot.machine.start_history.append(took)

    def engine_failed(self, model_name: str, error: str) -> None:
        """A launched engine could not be started: every held request gets its answer."""
        if (slot := self.slots.get(model_name)) is not None:
            self._feed(slot, LaunchFailed(self.clock(), error))

    def engine_deferred(self, model_name: str) -> None:
        """A launched engine left unstarted (no room in its GPUs' budget): it is asleep in
        effect, and its first request starts it."""
        if (slot := self.slots.get(model_name)) is not None:
            slot.machine.can_start = self.starter is not None
            self._feed(slot, LaunchDeferred(self.clock()))

    def persist(self) -> None:
        self.writer.schedule()

    async def flush(self) -> None:
        await self.writer.flush()

    def _stored(self) -> tuple[dict[str, StoredModel], dict[str, StoredModel]]:
        def stored(machine: EngineMachine) -> StoredModel:
            rec = machine.record()
            pending = rec.pending
            return StoredModel(
                rec.state,
                rec.since,
                machine.cfg.engine,
                machine.cfg.url,
                rec.incarnation,
                (pending.op, pending.step, pending.phase) if pending else None,
            )

        current = {name: stored(s.machine) for name, s in self.slots.items()}
        retired = {name: stored(machine) for name, machine in self.retired.values()}
        return current, retired

    # ---- views ---------------------------------------------------------------------------

    def view(
        self,
        slot: ModelSlot,
        observation: Observation | None = None,
        fleet: FleetTraffic | None = None,
        fleet_mode: bool = False,
    ) -> policy.ModelView:
        """The policy's view of a model; in fleet mode traffic merges every replica's, and a
        model the fleet view lacks must not be slept."""
        stats = self.traffic_monitor.add_model(slot.cfg.served_name)
        in_flight, last_activity = stats.in_flight, stats.last_activity_time
        if fleet is not None:
            in_flight = max(in_flight, fleet.in_flight)
            last_activity = max(last_activity, fleet.last_activity)
        # A replica is idle when its model is; with a floor of awake replicas, the scaler alone
        # sleeps them (it never goes below the floor).
        scaling = slot.cfg.scaling
        floor = scaling is not None and scaling.min_awake > 0
        return slot.machine.view(
            self.thresholds.policy_for(slot.cfg),
            in_flight,
            last_activity,
            observation=observation,
            owned=self.owns(slot.cfg.name),
            sleep_allowed=(fleet is not None or not fleet_mode) and not floor,
        )

    def model_snapshots(self) -> Iterator[ModelSnapshot]:
        """One per model as clients name it; a model with replicas adds theirs up (awake when
        any is, its engine up when any answers, its earliest wake)."""
        stats = self.traffic_monitor.model_stats
        for name, group in self.groups.items():
            s = stats.get(name)
            machines = [slot.machine for slot in group.slots]
            ups = [m.engine_up for m in machines if m.engine_up is not None]
            etas = [eta for m in machines if (eta := m.wake_eta()) is not None]
            yield ModelSnapshot(
                name=name,
                state=group.state,
                in_flight=s.in_flight if s else 0,
                held=sum(len(slot.waiters) for slot in group.slots),
                last_request_timestamp=s.last_activity_time if s else 0.0,
                idle_threshold_seconds=self.thresholds.threshold_for(group.slots[0].cfg),
                engine_up=any(ups) if ups else None,
                wake_eta_seconds=min(etas) if etas else None,
                waiting_for_memory=any(slot.waiting_for_memory for slot in group.slots),
                cannot_sleep=any(m.cannot_sleep is not None for m in machines),
                sleep_failures=max(m.sleep_failures for m in machines),
                replicas=tuple(
                    ReplicaSnapshot(slot.cfg.replica, slot.machine.reported_state(), slot.in_engine)
                    for slot in group.slots
                ),
                scaling=self._scaling_snapshot(group),
            )

    @staticmethod
    def _scaling_snapshot(group: ModelGroup) -> ScalingSnapshot | None:
        rules, verdict = group.scaling, group.decision
        if rules is None:
            return None
        return ScalingSnapshot(
            min_awake=rules.min_awake,
            max_awake=scaling.awake_ceiling(rules, len(group.slots)),
            desired=verdict.desired if verdict else None,
            demand=verdict.demand if verdict else None,
            blocked=verdict.blocked if verdict else None,
        )

    def gpu_snapshots(self) -> Iterator[tuple[int, float, float]]:
        committed = self.gpu_committed()
        for gpu, budget in self.gpu_budgets.items():
            yield gpu, budget, committed[gpu]

    # ---- the kvcached controller's API ---------------------------------------------------

    def sleep_refusal(self, model_name: str) -> str | None:
        """Why kvcached's `put_model_to_sleep` would answer False now, if it would."""
        replicas = self.replicas_of(model_name)
        if not replicas:
            return f"no engine is configured for model {model_name}"
        if replicas[0].cfg.always_on:
            return f"model {model_name} is always_on and is never put to sleep"
        if self.is_model_sleeping(model_name):
            return f"model {model_name} is already asleep"
        return None

    def wake_refusal(self, model_name: str) -> str | None:
        """Why kvcached's `wakeup_model` would answer False now, if it would: the model is not
        asleep, or has slept less than `min_sleep_duration`."""
        if not self.replicas_of(model_name):
            return f"no engine is configured for model {model_name}"
        if self._state_of(model_name) in (ModelState.AWAKE, ModelState.DRAINING):
            return f"model {model_name} is not asleep"
        slot = self.slots[self.engine_to_wake(model_name)]
        view = self.view(slot)
        if slot.state is ModelState.ASLEEP and self.clock() < policy.wake_allowed_at(view):
            return (
                f"model {model_name} has slept {self.clock() - (slot.slept_at or 0.0):.0f}s, "
                f"less than min_sleep_duration ({view.policy.min_sleep_duration:g}s)"
            )
        return None

    async def put_model_to_sleep(self, model_name: str, manual: bool = False) -> bool:
        """True once the model is asleep; False if it already was, or cannot be slept."""
        refusal = self.sleep_refusal(model_name)
        if refusal is not None:
            log.info("sleep refused: %s", refusal)
            return False
        return await self.request_sleep(model_name, "manual" if manual else "idle")

    async def wakeup_model(self, model_name: str) -> bool:
        """True once the model is awake; False if it was not asleep, slept less than
        `min_sleep_duration`, or failed to wake."""
        refusal = self.wake_refusal(model_name)
        if refusal is not None:
            log.info("wake refused: %s", refusal)
            return False
        return await self.request_wake(model_name, "manual")

    async def handle_model_wakeup_on_request(self, model_name: str) -> bool:
        """A request arrived for the model: True once it is awake (or already was).

        As every request-driven wake in kvsleep, it does not wait for `min_sleep_duration`.
        """
        replicas = self.replicas_of(model_name)
        pol = replicas[0].cfg.policy if replicas else self.config
        if not pol.wakeup_on_request:
            return False
        if not replicas or self._state_of(model_name) is ModelState.AWAKE:
            return True
        return await self.request_wake(model_name, "request")

    def is_model_sleeping(self, model_name: str) -> bool:
        """A model with replicas sleeps when none is awake or on its way."""
        known = bool(self.replicas_of(model_name))
        return known and self._state_of(model_name) in (ModelState.SLEEPING, ModelState.ASLEEP)

    def replicas_of(self, model_name: str) -> tuple[ModelSlot, ...]:
        """The engine itself, or the model's replicas (config order); none when unknown. The
        replicas share every key but the engine's own (policy, always_on: read the first's)."""
        slot = self.slots.get(model_name)
        if slot is not None:
            return (slot,)
        group = self.groups.get(model_name)
        return group.slots if group is not None else ()

    def _state_of(self, model_name: str) -> ModelState:
        """As the kvcached API sees it: the engine's state; a model's, awake when any replica
        is (kvsleep's own belief, as kvcached's: not `down`)."""
        return scaling.model_state([slot.state for slot in self.replicas_of(model_name)])

    @property
    def sleeping_models(self) -> dict[str, float]:
        """Model -> when it went to sleep (kvcached's attribute; a fresh copy, read-only)."""
        return {name: info["sleep_start_time"] for name, info in self.get_sleeping_models().items()}

    @property
    def manual_sleep_models(self) -> set[str]:
        """Models asleep because someone asked (kvcached's attribute; a fresh copy)."""
        return {name for name, info in self.get_sleeping_models().items() if info["manual_sleep"]}

    def get_sleeping_models(self) -> dict[str, dict[str, Any]]:
        """By the name clients use: a model with replicas once all of them sleep (since the
        last one went to sleep; manual when each was put to sleep by hand)."""
        now = self.clock()
        sleeping = {}
        for name, group in self.groups.items():
            if self._state_of(name) not in (ModelState.SLEEPING, ModelState.ASLEEP):
                continue
            since = max(slot.slept_at or slot.state_since for slot in group.slots)
            sleeping[name] = {
                "sleep_start_time": since,
                "sleep_duration": now - since,
                "manual_sleep": all(slot.manual_sleep for slot in group.slots),
            }
        return sleeping

    def get_sleep_candidates(self) -> list[str]:
        now = self.clock()
        return [
            name
            for name, slot in self.slots.items()
            if policy.sleep_candidate(self.view(slot), now)
        ]

    async def check_model_sleep_status(self, model_name: str) -> bool | None:
        """The engine's word: True asleep, False awake, None when it cannot say (SGLang has no
        such route; an engine that does not answer; a model not configured)."""
        slot = self.slots.get(model_name)
        if slot is None:
            return None
        observed = await slot.adapter.observe(slot.state)
        return observed.asleep if observed.up else None

    # kvcached's direct engine calls: one call to the engine at host:port, no drain, no state
    # change (its tests and some users call them).

    async def _call_vllm_sleep_api(self, host: str, port: str, level: int = 1) -> bool:
        return await self._engine_call("vllm", host, port, "sleep", sleep_level=level)

    async def _call_vllm_wakeup_api(self, host: str, port: str) -> bool:
        return await self._engine_call("vllm", host, port, "wake")

    async def _call_sglang_release_api(self, host: str, port: str) -> bool:
        return await self._engine_call("sglang", host, port, "sleep")

    async def _call_sglang_resume_api(self, host: str, port: str) -> bool:
        return await self._engine_call("sglang", host, port, "resume")

    async def _engine_call(
        self, engine: str, host: str, port: str, operation: str, sleep_level: int = 1
    ) -> bool:
        netloc_host = f"[{host}]" if ":" in host else host
        cfg = ModelConfig(
            f"{host}:{port}", engine, f"http://{netloc_host}:{port}", sleep_level=sleep_level
        )
        adapter = adapter_for(cfg, self._get_session, self.retry)
        try:
            if operation == "resume":
                found = await adapter.call(
                    "POST",
                    "/resume_memory_occupation",
                    json={},
                    timeout=self.retry.wake_timeout_seconds,
                )
                return found is not None
            await getattr(adapter, operation)()
        except Exception as exc:  # kvcached's contract: False on any failure, logged
            log.warning("%s %s at %s failed: %s", engine, operation, cfg.url, exc)
            return False
        return True
