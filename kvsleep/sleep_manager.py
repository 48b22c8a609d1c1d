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

from kvsleep import policy
from kvsleep.adaptive import Thresholds
from kvsleep.config import ModelConfig, SleepPolicy
from kvsleep.engines import (
    EngineAdapter,
    Observation,
    RetryPolicy,
    SessionSource,
    SleepUnsupported,
    adapter_for,
)
from kvsleep.metrics import Metrics, ModelSnapshot
from kvsleep.policy_source import FleetTraffic
from kvsleep.reconciler import Reconciler
from kvsleep.sleep_state import ModelState, StateStore, StateWriter, StoredModel
from kvsleep.traffic_monitor import TrafficMonitor

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

WAKE_HISTORY = 10  # measured wakes the ETA is the median of
MEMORY_RECHECK_SECONDS = 0.5  # a wake blocked on GPU memory re-plans at least this often
_SETTLED = (
    ModelState.AWAKE,
    ModelState.ASLEEP,
    ModelState.FAILED,
    ModelState.SLEEPING,
    ModelState.WAKING,
)


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


@dataclass(eq=False)
class ModelSlot:
    """Runtime state of one model. Only SleepManager mutates it."""

    cfg: ModelConfig
    adapter: EngineAdapter
    state: ModelState
    state_since: float
    version: int = 0
    in_engine: int = 0
    drained: asyncio.Event = field(default_factory=asyncio.Event)
    waiters: deque[asyncio.Future[None]] = field(default_factory=deque)
    held_bytes: int = 0  # body bytes of the waiters
    want_awake: bool = True
    wake_reason: str = "request"
    sleep_reason: str = "idle"
    worker: asyncio.Task[None] | None = None
    engine_up: bool | None = None
    slept_at: float | None = None
    manual_sleep: bool = False
    deferred_wake: str | None = None
    last_error: str | None = None
    waiting_for_memory: str | None = None
    wake_history: deque[float] = field(default_factory=lambda: deque(maxlen=WAKE_HISTORY))
    start_history: deque[float] = field(default_factory=lambda: deque(maxlen=WAKE_HISTORY))
    # A launched engine with no process: `queued` waits for its turn to start, `stopped` is
    # started by its first request. Neither holds GPU memory.
    queued: bool = False
    stopped: bool = False
    sleep_outcomes: list[asyncio.Future[bool]] = field(default_factory=list)
    wake_outcomes: list[asyncio.Future[bool]] = field(default_factory=list)
    # Failed sleeps in a row, when idle sleeps may try again, and why the engine cannot sleep
    # at all (no sleep route); all three reset on a success, a reload or an engine restart.
    sleep_failures: int = 0
    sleep_retry_at: float = 0.0
    cannot_sleep: str | None = None

    def __post_init__(self) -> None:
        self.drained.set()

    def reset_sleep_backoff(self) -> None:
        self.sleep_failures = 0
        self.sleep_retry_at = 0.0
        self.cannot_sleep = None

    @property
    def busy(self) -> bool:
        return self.worker is not None and not self.worker.done()


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
        self.slots: dict[str, ModelSlot] = {}
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
        self.reconciler = Reconciler(self)
        self._reconciler_task: asyncio.Task[None] | None = None
        self.writer = StateWriter(state_store, self._stored)
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
        slot = ModelSlot(
            cfg, self.adapter_factory(cfg, self._get_session, self.retry), state, self.clock()
        )
        self.slots[cfg.name] = slot
        self.traffic_monitor.add_model(cfg.name)
        self.metrics.add_models([cfg.name])
        self._list_engine(cfg, {"host": cfg.host, "port": str(cfg.port)})
        return slot

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
        """Forget a model; requests already admitted keep their slot until they finish."""
        slot = self.slots.pop(model_name, None)
        if slot is None:
            return
        self.config.models_of(slot.cfg.engine).pop(model_name, None)
        self._reject_waiters(slot, "wake_failed", f"model `{model_name}` was removed", 503)
        if slot.worker is not None:
            slot.worker.cancel()
        self.traffic_monitor.remove_model(model_name)
        self.metrics.remove_model(model_name)

    def update_model(self, cfg: ModelConfig) -> None:
        """Apply a changed model config in place, keeping its state and its waiters."""
        slot = self.slots[cfg.name]
        if (cfg.url, cfg.engine) != (slot.cfg.url, slot.cfg.engine):
            slot.adapter = self.adapter_factory(cfg, self._get_session, self.retry)
        slot.cfg = cfg
        slot.adapter.model = cfg
        self._list_engine(cfg, {"host": cfg.host, "port": str(cfg.port)})
        # A reload is how an operator says "the engine was fixed": sleeps may be tried again.
        slot.reset_sleep_backoff()

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
        if "idle_threshold_seconds" in changes:
            self.traffic_monitor.idle_threshold_seconds = self.config.idle_threshold_seconds

    # ---- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Learn every engine's real state, then run the reconcile loop."""
        await self.reconciler.sync()
        self._reconciler_task = asyncio.create_task(self.reconciler.run(), name="kvsleep-reconcile")

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
        the hold timeout) or waited in vain (timeout, failed wake). While held, `on_hold` is
        awaited every `hold_interval` seconds. The caller must `release` the returned slot.
        """
        slot = self.slots[model_name]
        if slot.state is ModelState.AWAKE:
            slot.in_engine += 1
            slot.drained.clear()
            return slot
        pol = slot.cfg.policy
        timeout = min(pol.wake_timeout_seconds, deadline or pol.wake_timeout_seconds)
        wait = self.eta_remaining(slot)
        retry_after = max(1.0, wait) if wait is not None else 1.0
        decision = policy.admission(
            slot.state,
            len(slot.waiters),
            pol,
            size=size,
            held_bytes=slot.held_bytes,
            room_bytes=self.max_held_bytes - self.held_bytes,
        )
        if decision is policy.Admission.REJECT_NO_WAKE:
            raise self._reject(
                slot,
                "asleep_no_wake",
                503,
                None,
                f"model `{model_name}` is {slot.state.value} and "
                "wakeup_on_request is off; wake it first",
            )
        if decision is policy.Admission.REJECT_QUEUE_FULL:
            raise self._reject(
                slot,
                "queue_full",
                503,
                retry_after,
                f"model `{model_name}` is {slot.state.value} and its hold "
                f"queue is full ({len(slot.waiters)} requests, "
                f"{slot.held_bytes} body bytes wait for it)",
            )
        if not slot.want_awake or not slot.busy:
            self.request_wake(model_name, "request")
        if wait is not None and wait > timeout:
            # Waiting in vain helps nobody: say when to come back; the wake goes on.
            raise self._reject(
                slot,
                "wake_timeout",
                503,
                retry_after,
                f"model `{model_name}` is {slot.state.value}; its wake is "
                f"expected to take {wait:.0f}s, longer than this request's "
                f"{timeout:g}s deadline",
            )
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        slot.waiters.append(fut)
        slot.held_bytes += size
        self.held_bytes += size
        started = time.monotonic()
        try:
            await self._wait_held(fut, started + timeout, on_hold, hold_interval)
        except asyncio.TimeoutError:
            self._forget_waiter(slot, fut)
            wait = self.eta_remaining(slot)
            raise self._reject(
                slot,
                "wake_timeout",
                504,
                max(1.0, wait or 1.0),
                f"model `{model_name}` did not wake within {timeout:g}s"
                + (f" ({slot.waiting_for_memory})" if slot.waiting_for_memory else ""),
            ) from None
        except Rejected as exc:
            if self.slots.get(model_name) is slot:  # a removed model leaves no series behind
                self.metrics.rejected_requests.labels(model_name, exc.reason).inc()
            raise
        except BaseException:  # cancelled, or on_hold found the client gone
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                self.release(slot)
            else:
                self._forget_waiter(slot, fut)
            raise
        finally:
            slot.held_bytes -= size
            self.held_bytes -= size
        if self.slots.get(model_name) is slot:
            self.metrics.request_hold.labels(model_name).observe(time.monotonic() - started)
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

    def release(self, slot: ModelSlot) -> None:
        slot.in_engine -= 1
        if slot.in_engine <= 0:
            slot.in_engine = 0
            slot.drained.set()
            if self.gpu_budgets:
                self._signal_change()

    def _signal_change(self) -> None:
        """Wake whoever waits for memory to be freed; they re-plan."""
        self._changed.set()
        self._changed = asyncio.Event()

    def wake_eta(self, slot: ModelSlot) -> float | None:
        """Expected wake time; for a launched engine starting (or to be started), its measured
        start time (unknown until one start has been measured)."""
        if slot.state is ModelState.STARTING or slot.stopped:
            return policy.wake_eta(list(slot.start_history), None)
        return policy.wake_eta(list(slot.wake_history), slot.cfg.wake_eta_seconds)

    def eta_remaining(self, slot: ModelSlot) -> float | None:
        return policy.eta_remaining(slot.state, slot.state_since, self.wake_eta(slot), self.clock())

    def _reject(
        self, slot: ModelSlot, reason: str, status: int, retry_after: float | None, message: str
    ) -> Rejected:
        self.metrics.rejected_requests.labels(slot.cfg.name, reason).inc()
        return Rejected(slot.cfg.name, reason, message, status, retry_after)

    @staticmethod
    def _forget_waiter(slot: ModelSlot, fut: asyncio.Future[None]) -> None:
        with contextlib.suppress(ValueError):
            slot.waiters.remove(fut)

    def _release_waiters(self, slot: ModelSlot) -> None:
        while slot.waiters:
            fut = slot.waiters.popleft()
            if not fut.done():
                slot.in_engine += 1
                slot.drained.clear()
                fut.set_result(None)

    def _reject_waiters(self, slot: ModelSlot, reason: str, message: str, status: int) -> None:
        while slot.waiters:
            fut = slot.waiters.popleft()
            if not fut.done():
                fut.set_exception(Rejected(slot.cfg.name, reason, message, status, 5.0))

    # ---- operations ----------------------------------------------------------------------

    def request_sleep(self, model_name: str, reason: str) -> asyncio.Future[bool]:
        """Ask for the model to sleep (after draining); the future says whether it did."""
        slot = self.slots[model_name]
        if slot.cfg.always_on:
            raise NotAllowed(f"model `{model_name}` is always_on and is never put to sleep")
        outcome = asyncio.get_running_loop().create_future()
        if slot.state in (ModelState.ASLEEP, ModelState.SLEEPING) and not slot.want_awake:
            outcome.set_result(slot.state is ModelState.ASLEEP)
            if slot.state is ModelState.ASLEEP:
                return outcome
        slot.want_awake = False
        slot.sleep_reason = reason
        slot.manual_sleep = reason == "manual"
        slot.deferred_wake = None
        if not outcome.done():
            slot.sleep_outcomes.append(outcome)
        self._kick(slot)
        return outcome

    def request_wake(self, model_name: str, reason: str) -> asyncio.Future[bool]:
        """Ask for the model to wake; the future says whether it did."""
        slot = self.slots[model_name]
        outcome = asyncio.get_running_loop().create_future()
        slot.deferred_wake = None
        if slot.state is ModelState.AWAKE and slot.want_awake:
            # Awake only counts if its engine answers: waking an unreachable one fails.
            task = asyncio.create_task(self._confirm_up(slot, outcome))
            self._probes.add(task)
            task.add_done_callback(self._probes.discard)
            return outcome
        slot.want_awake = True
        slot.wake_reason = reason
        slot.wake_outcomes.append(outcome)
        self._kick(slot)
        return outcome

    async def _confirm_up(self, slot: ModelSlot, outcome: asyncio.Future[bool]) -> None:
        observed = await slot.adapter.observe(slot.state)
        slot.engine_up = observed.up
        if not observed.up:
            slot.last_error = f"engine unreachable: {observed.detail}"
        if not outcome.done():
            outcome.set_result(observed.up)

    def engine_unreachable(self, model_name: str, detail: str) -> None:
        """The router could not connect: report the model down until a probe says otherwise."""
        slot = self.slots.get(model_name)
        if slot is not None and slot.state is ModelState.AWAKE:
            if slot.engine_up is not False:
                log.warning("model %s: engine unreachable: %s", model_name, detail)
            slot.engine_up = False

    def reported_state(self, slot: ModelSlot) -> ModelState:
        """The state shown to operators: `down` for a settled model whose engine does not
        answer; never for a launched engine with no process by design (stopped: it is asleep
        and starts on its first request)."""
        if slot.stopped:
            return slot.state
        if slot.engine_up is False and slot.state in (
            ModelState.AWAKE,
            ModelState.ASLEEP,
            ModelState.FAILED,
        ):
            return ModelState.DOWN
        return slot.state

    def defer_wake(self, model_name: str, reason: str) -> float | None:
        """Schedule a wake nobody's request asked for once `min_sleep_duration` has passed.

        Returns when it will happen, or None when it may happen now.
        """
        slot = self.slots[model_name]
        if slot.state is not ModelState.ASLEEP or slot.slept_at is None:
            return None
        at = slot.slept_at + slot.cfg.policy.min_sleep_duration
        if self.clock() >= at:
            return None
        slot.deferred_wake = reason
        return at

    def _kick(self, slot: ModelSlot) -> None:
        if not slot.busy:
            slot.worker = asyncio.create_task(
                self._converge(slot), name=f"kvsleep-op-{slot.cfg.name}"
            )

    async def _converge(self, slot: ModelSlot) -> None:
        while True:
            if slot.state is ModelState.STARTING:
                return  # the launcher ends it; outcomes are settled then
            if slot.waiters and slot.state is not ModelState.AWAKE:
                # Held requests always get their wake, even if a sleep was asked for after
                # they arrived; otherwise they would wait out wake_timeout for nothing.
                slot.want_awake = True
            if not slot.want_awake and slot.state is ModelState.AWAKE:
                await self._sleep_once(slot)
            elif slot.want_awake and slot.state in (ModelState.ASLEEP, ModelState.FAILED):
                await self._wake_once(slot)
            else:
                self._settle(slot.sleep_outcomes, slot.state is ModelState.ASLEEP)
                self._settle(slot.wake_outcomes, slot.state is ModelState.AWAKE)
                return

    async def _sleep_once(self, slot: ModelSlot) -> None:
        name, reason = slot.cfg.name, slot.sleep_reason
        self._set_state(slot, ModelState.DRAINING)
        try:
            await asyncio.wait_for(slot.drained.wait(), slot.cfg.policy.drain_timeout_seconds)
        except asyncio.TimeoutError:
            self._sleep_failed(
                slot,
                reason,
                f"{slot.in_engine} requests still in flight after "
                f"{slot.cfg.policy.drain_timeout_seconds:g}s",
            )
            return
        self._set_state(slot, ModelState.SLEEPING)
        await self._record_before_engine_call(slot)
        started = time.monotonic()
        try:
            await slot.adapter.sleep()
        except Exception as exc:  # any failure must leave the model serving, not stuck
            observed = await slot.adapter.observe(ModelState.SLEEPING)
            if observed.asleep is not True:
                self._sleep_failed(
                    slot, reason, str(exc), unsupported=isinstance(exc, SleepUnsupported)
                )
                return
        self.metrics.sleep_duration.labels(name).observe(time.monotonic() - started)
        self.metrics.sleeps.labels(name, reason, "ok").inc()
        slot.slept_at = self.clock()
        slot.last_error = None
        slot.reset_sleep_backoff()
        self._set_state(slot, ModelState.ASLEEP)
        await self.flush()
        log.info("model %s is asleep (reason: %s)", name, reason)
        self._event(name, f"asleep (reason: {reason})")
        self._settle(slot.sleep_outcomes, True)

    def _sleep_failed(
        self, slot: ModelSlot, reason: str, error: str, unsupported: bool = False
    ) -> None:
        slot.sleep_failures += 1
        delay = policy.sleep_retry_delay(slot.sleep_failures, slot.cfg.policy)
        slot.sleep_retry_at = self.clock() + delay
        if unsupported:
            slot.cannot_sleep = error
            log.error("model %s cannot sleep, it stays awake: %s", slot.cfg.name, error)
        else:
            log.warning(
                "sleeping model %s failed (%d in a row), it stays awake; idle sleeps wait %gs: %s",
                slot.cfg.name,
                slot.sleep_failures,
                delay,
                error,
            )
        self._event(slot.cfg.name, f"sleep failed, stays awake: {error}")
        self.metrics.sleeps.labels(slot.cfg.name, reason, "error").inc()
        slot.last_error = error
        slot.want_awake = True
        self._set_state(slot, ModelState.AWAKE)
        self._settle(slot.sleep_outcomes, False)

    async def _wake_once(self, slot: ModelSlot) -> None:
        name, reason = slot.cfg.name, slot.wake_reason
        if self.gpu_budgets and not await self._make_room(slot):
            return
        if slot.stopped and self.starter is not None:
            await self._start_stopped(slot, reason)
            return
        self._set_state(slot, ModelState.WAKING)
        await self._record_before_engine_call(slot)
        started = time.monotonic()
        try:
            await slot.adapter.wake()
        except Exception as exc:  # every waiter must get an answer, whatever went wrong
            log.warning("waking model %s failed: %s", name, exc)
            self._event(name, f"wake failed: {exc}")
            self.metrics.wakes.labels(name, reason, "error").inc()
            slot.last_error = str(exc)
            slot.want_awake = False
            self._set_state(slot, ModelState.FAILED)
            self._reject_waiters(slot, "wake_failed", f"model `{name}` failed to wake: {exc}", 503)
            self._settle(slot.wake_outcomes, False)
            return
        took = time.monotonic() - started
        slot.wake_history.append(took)
        self.metrics.wake_duration.labels(name).observe(took)
        self.metrics.wakes.labels(name, reason, "ok").inc()
        slot.last_error = None
        slot.manual_sleep = False
        self._set_state(slot, ModelState.AWAKE)
        log.info("model %s is awake (reason: %s)", name, reason)
        self._event(name, f"awake (reason: {reason})")
        self._settle(slot.wake_outcomes, True)

    async def _start_stopped(self, slot: ModelSlot, reason: str) -> None:
        """Wake a launched engine that has no process: start it (the launcher's starter)."""
        name = slot.cfg.name
        assert self.starter is not None
        self._set_state(slot, ModelState.STARTING)
        try:
            await self.starter(name)
        except Exception as exc:  # every waiter must get an answer, whatever went wrong
            self.metrics.wakes.labels(name, reason, "error").inc()
            self.engine_failed(name, str(exc))
            slot.stopped = True  # no process: the next request tries to start it again
            return
        self.metrics.wakes.labels(name, reason, "ok").inc()
        slot.stopped = False
        self.engine_started(name)

    def _event(self, name: str, text: str) -> None:
        if self.on_event is not None:
            self.on_event(name, text)

    async def _make_room(self, slot: ModelSlot) -> bool:
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
                    return True
                for victim in plan.evict:
                    log.info("model %s: sleeping %s to make room on its GPUs", name, victim)
                    self.metrics.evictions.labels(victim).inc()
                    self.request_sleep(victim, "idle")
                if plan.reason != slot.waiting_for_memory:
                    log.info("model %s waits for GPU memory: %s", name, plan.reason)
                slot.waiting_for_memory = plan.reason
                nobody_waits = (
                    slot.wake_reason == "request" and not slot.waiters and not slot.in_engine
                )
                if nobody_waits or time.monotonic() > give_up:
                    slot.want_awake = False
                    slot.last_error = f"no GPU memory to wake: {plan.reason}"
                    self._reject_waiters(
                        slot, "wake_failed", f"model `{name}` cannot wake: {plan.reason}", 503
                    )
                    self._settle(slot.wake_outcomes, False)
                    return False
                changed = self._changed
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(changed.wait(), MEMORY_RECHECK_SECONDS)
        finally:
            slot.waiting_for_memory = None

    def memory_view(self, slot: ModelSlot) -> policy.MemoryView:
        stats = self.traffic_monitor.model_stats.get(slot.cfg.name)
        idle = slot.in_engine == 0 and not slot.waiters and (stats is None or not stats.in_flight)
        return policy.MemoryView(
            name=slot.cfg.name,
            gpus=slot.cfg.gpus,
            memory_gb=slot.cfg.memory_gb or 0.0,
            state=ModelState.ASLEEP if slot.queued or slot.stopped else slot.state,
            want_awake=slot.want_awake,
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

    @staticmethod
    def _settle(outcomes: list[asyncio.Future[bool]], result: bool) -> None:
        for fut in outcomes:
            if not fut.done():
                fut.set_result(result)
        outcomes.clear()

    def _set_state(self, slot: ModelSlot, state: ModelState) -> None:
        slot.state = state
        slot.state_since = self.clock()
        slot.version += 1
        if state is ModelState.AWAKE:
            self._release_waiters(slot)
        if self.gpu_budgets:
            self._signal_change()
        if state in _SETTLED:
            self.persist()

    async def finish_interrupted_wake(self, slot: ModelSlot) -> None:
        """At start-up: a previous process died mid-wake; complete it before serving."""
        try:
            await slot.adapter.finish_wake()
        except Exception as exc:  # stays failed; the next request retries a full wake
            log.warning("model %s: finishing an interrupted wake failed: %s", slot.cfg.name, exc)
            slot.last_error = str(exc)
            self._set_state(slot, ModelState.FAILED)
            return
        self._set_state(slot, ModelState.AWAKE)

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
        slot.engine_up = None if problem is None else False
        slot.last_error = problem
        slot.reset_sleep_backoff()  # the new process may have other flags
        slot.want_awake = True
        slot.queued = queued
        slot.stopped = False
        if slot.state is not ModelState.STARTING:
            self._set_state(slot, ModelState.STARTING)
        if problem is not None:
            self._event(model_name, problem)

    def engine_spawning(self, model_name: str) -> None:
        if (slot := self.slots.get(model_name)) is not None:
            slot.queued = slot.stopped = False
            if self.gpu_budgets:
                self._signal_change()

    def engine_started(self, model_name: str, took: float | None = None) -> None:
        """A launched engine is ready: a fresh process is awake and holds its memory."""
        slot = self.slots.get(model_name)
        if slot is None:
            return
        if took is not None:
            self.note_start_duration(model_name, took)
        slot.engine_up = True
        slot.last_error = None
        slot.queued = slot.stopped = False
        slot.want_awake = True
        self._set_state(slot, ModelState.AWAKE)
        self._event(model_name, "engine ready; awake")
        self._settle(slot.wake_outcomes, True)
        if slot.sleep_outcomes:
            slot.want_awake = False
            self._kick(slot)

    def note_start_duration(self, model_name: str, took: float) -> None:
        if (slot := self.slots.get(model_name)) is not None:
            slot.start_history.append(took)

    def engine_failed(self, model_name: str, error: str) -> None:
        """A launched engine could not be started: every held request gets its answer."""
        slot = self.slots.get(model_name)
        if slot is None:
            return
        slot.engine_up = False
        slot.last_error = error
        slot.want_awake = False
        slot.queued = False
        self._set_state(slot, ModelState.FAILED)
        self._reject_waiters(
            slot, "wake_failed", f"model `{model_name}` engine failed to start: {error}", 503
        )
        self._settle(slot.wake_outcomes, False)
        self._settle(slot.sleep_outcomes, False)

    def engine_deferred(self, model_name: str) -> None:
        """A launched engine left unstarted (no room in its GPUs' budget): it is asleep in
        effect, and its first request starts it."""
        slot = self.slots.get(model_name)
        if slot is None:
            return
        slot.stopped = True
        slot.queued = False
        slot.engine_up = None
        slot.want_awake = False
        slot.slept_at = self.clock()
        self._set_state(slot, ModelState.ASLEEP)
        self._settle(slot.sleep_outcomes, True)
        if slot.waiters or slot.wake_outcomes:
            slot.want_awake = True
            self._kick(slot)

    def adopt(self, action: policy.Adopt) -> bool:
        """Take an engine's observed state, unless something changed since the probe."""
        slot = self.slots.get(action.model)
        if slot is None or slot.busy or slot.version != action.version:
            return False
        log.warning(
            "model %s: %s; now %s (was %s)",
            action.model,
            action.why,
            action.state.value,
            slot.state.value,
        )
        slot.want_awake = action.state is ModelState.AWAKE
        if action.state is ModelState.ASLEEP:
            slot.slept_at = self.clock()
        self._set_state(slot, action.state)
        if (slot.waiters or slot.in_engine) and action.state is not ModelState.AWAKE:
            # Requests held for it, or already inside an engine slept behind our back (vLLM
            # queues them until a wake that nobody else will send): wake it for them.
            self.request_wake(action.model, "request")
        return True

    def persist(self) -> None:
        self.writer.schedule()

    async def flush(self) -> None:
        await self.writer.flush()

    async def _record_before_engine_call(self, slot: ModelSlot) -> None:
        """An engine that cannot tell its state after a crash of ours needs the record first;
        for one that can, the write goes on beside the call and the wake is not delayed."""
        if not slot.adapter.observable:
            await self.flush()

    def _stored(self) -> dict[str, StoredModel]:
        return {
            name: StoredModel(s.state, s.state_since, s.cfg.engine, s.cfg.url)
            for name, s in self.slots.items()
        }

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
        stats = self.traffic_monitor.add_model(slot.cfg.name)
        in_flight, last_activity = stats.in_flight, stats.last_activity_time
        if fleet is not None:
            in_flight = max(in_flight, fleet.in_flight)
            last_activity = max(last_activity, fleet.last_activity)
        return policy.ModelView(
            name=slot.cfg.name,
            state=slot.state,
            state_since=slot.state_since,
            version=slot.version,
            busy=slot.busy,
            in_flight=in_flight,
            held=len(slot.waiters),
            last_activity=last_activity,
            policy=self.thresholds.policy_for(slot.cfg),
            always_on=slot.cfg.always_on,
            engine_up=slot.engine_up,
            observation=observation,
            slept_at=slot.slept_at,
            deferred_wake=slot.deferred_wake,
            owned=self.owns(slot.cfg.name),
            sleep_allowed=fleet is not None or not fleet_mode,
            sleep_retry_at=slot.sleep_retry_at,
            cannot_sleep=slot.cannot_sleep is not None,
        )

    def model_snapshots(self) -> Iterator[ModelSnapshot]:
        stats = self.traffic_monitor.model_stats
        for name, slot in self.slots.items():
            s = stats.get(name)
            yield ModelSnapshot(
                name=name,
                state=self.reported_state(slot),
                in_flight=s.in_flight if s else 0,
                held=len(slot.waiters),
                last_request_timestamp=s.last_activity_time if s else 0.0,
                idle_threshold_seconds=self.thresholds.threshold_for(slot.cfg),
                engine_up=slot.engine_up,
                wake_eta_seconds=self.wake_eta(slot),
                waiting_for_memory=slot.waiting_for_memory is not None,
                cannot_sleep=slot.cannot_sleep is not None,
                sleep_failures=slot.sleep_failures,
            )

    def gpu_snapshots(self) -> Iterator[tuple[int, float, float]]:
        committed = self.gpu_committed()
        for gpu, budget in self.gpu_budgets.items():
            yield gpu, budget, committed[gpu]

    # ---- the kvcached controller's API ---------------------------------------------------

    def sleep_refusal(self, model_name: str) -> str | None:
        """Why kvcached's `put_model_to_sleep` would answer False now, if it would."""
        slot = self.slots.get(model_name)
        if slot is None:
            return f"no engine is configured for model {model_name}"
        if slot.cfg.always_on:
            return f"model {model_name} is always_on and is never put to sleep"
        if self.is_model_sleeping(model_name):
            return f"model {model_name} is already asleep"
        return None

    def wake_refusal(self, model_name: str) -> str | None:
        """Why kvcached's `wakeup_model` would answer False now, if it would: the model is not
        asleep, or has slept less than `min_sleep_duration`."""
        slot = self.slots.get(model_name)
        if slot is None:
            return f"no engine is configured for model {model_name}"
        if slot.state in (ModelState.AWAKE, ModelState.DRAINING):
            return f"model {model_name} is not asleep"
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
        slot = self.slots.get(model_name)
        pol = slot.cfg.policy if slot is not None else self.config
        if not pol.wakeup_on_request:
            return False
        if slot is None or slot.state is ModelState.AWAKE:
            return True
        return await self.request_wake(model_name, "request")

    def is_model_sleeping(self, model_name: str) -> bool:
        slot = self.slots.get(model_name)
        return slot is not None and slot.state in (ModelState.SLEEPING, ModelState.ASLEEP)

    @property
    def sleeping_models(self) -> dict[str, float]:
        """Model -> when it went to sleep (kvcached's attribute; a fresh copy, read-only)."""
        return {name: info["sleep_start_time"] for name, info in self.get_sleeping_models().items()}

    @property
    def manual_sleep_models(self) -> set[str]:
        """Models asleep because someone asked (kvcached's attribute; a fresh copy)."""
        return {name for name, info in self.get_sleeping_models().items() if info["manual_sleep"]}

    def get_sleeping_models(self) -> dict[str, dict[str, Any]]:
        now = self.clock()
        return {
            name: {
                "sleep_start_time": slot.slept_at or slot.state_since,
                "sleep_duration": now - (slot.slept_at or slot.state_since),
                "manual_sleep": slot.manual_sleep,
            }
            for name, slot in self.slots.items()
            if slot.state in (ModelState.SLEEPING, ModelState.ASLEEP)
        }

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
