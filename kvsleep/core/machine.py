"""One engine's sleep state machine: events in, effects out; no I/O, no clock, no asyncio.

Everything kvsleep believes about one engine lives here, and only `handle` changes it. The
asyncio manager (sleep_manager.py) feeds it what happened (a request arrived, a call ended, a
probe answered, a record reached the disk) and carries out what it returns; `kvsleep simulate`
feeds the same machine on a virtual clock, so live and replay cannot disagree.

Two kinds of effects. *Immediate* ones (admit, hold, reject, release the held requests, settle
control calls, persist a snapshot, log, count) are carried out at once. A *job* is I/O whose
result comes back as the next event: drain, ask the engine's load, identify the engine process,
write the record, make room on the GPUs, call the engine, start a launched engine. At most one
job is outstanding per engine, so engine calls are strictly one at a time.

Safety rules the transitions keep (see shared/engine-contracts.md):
- Before a call that is not idempotent (SGLang's release and resume), the engine process is
  identified and the intent is on disk; if the record cannot be written, the call is not made.
  After it, the outcome is recorded. A crash between the two leaves an intent without outcome:
  at start-up that is `unknown`, and nothing is called until an operator (or a probe that can
  tell) resolves it.
- An engine process is known by its incarnation (SGLang's `startup_time`, a launched engine's
  PID and start time): a different one is a fresh process, awake and holding its memory,
  whatever the records say. The same one after a silence (paused, network blip) keeps them.
- A call that timed out may have taken effect: its outcome is unknown, not failed.
"""

from __future__ import annotations

import dataclasses
import enum
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, get_args

from kvsleep.config import ModelConfig, SleepPolicy
from kvsleep.core import policy
from kvsleep.core.engine_facts import EngineSteps, Observation, Step
from kvsleep.core.states import ModelState

WAKE_HISTORY = 10  # measured wakes the ETA is the median of
LOAD_RECHECK_SECONDS = 0.5  # how often a drain re-asks a busy engine
IDENTIFY_RETRY_SECONDS = 0.5  # how often a silent engine is asked again which process it is
VERIFY_SECONDS = 30.0  # how long it may stay silent right after a release or resume


@dataclass(frozen=True)
class Pending:
    """The operation an engine call belongs to, as recorded: `intent` before the call, `done`
    after it succeeded (a wake of several steps records each)."""

    op: str  # "sleep" | "wake"
    step: str
    phase: str  # "intent" | "done"


@dataclass(frozen=True)
class Record:
    """What the state file keeps about one engine."""

    state: ModelState
    since: float
    incarnation: str | None = None
    pending: Pending | None = None


class CallResult(enum.Enum):
    OK = "ok"
    FAILED = "failed"  # the call did not take effect
    UNSUPPORTED = "unsupported"  # the engine has no such route: do not try again
    UNKNOWN = "unknown"  # it may have taken effect (timeout, 5xx, cut connection)


# ---- events ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Arrived:
    now: float
    size: int = 0
    room_bytes: float = float("inf")  # what the router-wide budget for held bodies has left
    deadline: float | None = None  # the request's own patience, seconds


@dataclass(frozen=True)
class Finished:
    """A forwarded request is over: its client is answered and its upstream connection closed."""


@dataclass(frozen=True)
class HeldLeft:
    """A held request stopped waiting (its client left, or its timeout)."""

    size: int


@dataclass(frozen=True)
class WantSleep:
    now: float
    reason: str


@dataclass(frozen=True)
class WantWake:
    now: float
    reason: str


@dataclass(frozen=True)
class Observed:
    now: float
    obs: Observation
    version: int | None = None  # the version probed; a changed machine ignores a stale probe
    owned: bool = True  # False: another kvsleep replica sleeps and wakes this engine


@dataclass(frozen=True)
class Drained:
    now: float
    ok: bool  # False: kvsleep's own requests were still in flight at the drain timeout


@dataclass(frozen=True)
class LoadReported:
    now: float
    load: int | None  # requests the engine itself runs or queues; None: it cannot say


@dataclass(frozen=True)
class Identified:
    """The engine process about to receive a call that must not reach another one."""

    now: float
    obs: Observation


@dataclass(frozen=True)
class Recorded:
    now: float
    ok: bool
    error: str = ""


@dataclass(frozen=True)
class RoomReady:
    now: float
    ok: bool
    reason: str = ""


@dataclass(frozen=True)
class CallDone:
    now: float
    result: CallResult
    error: str = ""
    took: float = 0.0


@dataclass(frozen=True)
class Adopted:
    """An operator's word (`kvsleep adopt`): the engine is in this state. `incarnation`: the
    process a probe found answering when the word was given (the word is about it)."""

    now: float
    state: ModelState
    incarnation: str | None = None


@dataclass(frozen=True)
class Measured:
    """GPU memory held by the engine's processes (NVML), asked about a model in `unknown`."""

    now: float
    used_gb: float | None


@dataclass(frozen=True)
class Reconfigured:
    now: float
    cfg: ModelConfig


@dataclass(frozen=True)
class LaunchStarting:
    now: float
    problem: str | None = None
    queued: bool = False


@dataclass(frozen=True)
class LaunchSpawning:
    pass


@dataclass(frozen=True)
class LaunchStarted:
    now: float
    took: float | None = None


@dataclass(frozen=True)
class LaunchFailed:
    now: float
    error: str


@dataclass(frozen=True)
class LaunchDeferred:
    now: float


@dataclass(frozen=True)
class Removed:
    """The model left the configuration: every waiter gets its answer now."""


Event = (
    Arrived
    | Finished
    | HeldLeft
    | WantSleep
    | WantWake
    | Observed
    | Drained
    | LoadReported
    | Identified
    | Recorded
    | RoomReady
    | CallDone
    | Adopted
    | Measured
    | Reconfigured
    | LaunchStarting
    | LaunchSpawning
    | LaunchStarted
    | LaunchFailed
    | LaunchDeferred
    | Removed
)

# ---- effects ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Admit:
    pass


@dataclass(frozen=True)
class Hold:
    timeout: float


@dataclass(frozen=True)
class Reject:
    reason: str  # a `kvsleep_rejected_requests_total` reason
    status: int
    message: str
    retry_after: float | None = None


@dataclass(frozen=True)
class ReleaseHeld:
    pass


@dataclass(frozen=True)
class RejectHeld:
    reason: str
    message: str
    status: int = 503


@dataclass(frozen=True)
class Settle:
    """Answer the control calls waiting for a sleep or a wake."""

    op: str  # "sleep" | "wake"
    ok: bool


@dataclass(frozen=True)
class Persist:
    """Write a snapshot of the state file soon (not waited for)."""


@dataclass(frozen=True)
class Log:
    level: str  # "info" | "warning" | "error"
    text: str
    event: bool = True  # also a line in a launched engine's log


@dataclass(frozen=True)
class Count:
    op: str  # "sleep" | "wake"
    reason: str
    ok: bool
    took: float | None = None


@dataclass(frozen=True)
class Healed:
    """Belief changed to what the engine showed (it changed behind kvsleep's back)."""

    state: ModelState
    why: str
    version: int


@dataclass(frozen=True)
class WaitDrained:
    timeout: float


@dataclass(frozen=True)
class CheckLoad:
    after: float = 0.0


@dataclass(frozen=True)
class Identify:
    after: float = 0.0


@dataclass(frozen=True)
class WriteRecord:
    """Write the state file now and report whether it reached the disk."""


@dataclass(frozen=True)
class MakeRoom:
    reason: str


@dataclass(frozen=True)
class Call:
    op: str
    step: Step


@dataclass(frozen=True)
class Start:
    reason: str


@dataclass(frozen=True)
class MeasureMemory:
    """Ask NVML how much GPU memory the engine's processes hold (where kvsleep knows them)."""


Job = WaitDrained | CheckLoad | Identify | WriteRecord | MakeRoom | Call | Start | MeasureMemory
Effect = (
    Admit | Hold | Reject | ReleaseHeld | RejectHeld | Settle | Persist | Log | Count | Healed | Job
)
JOBS = (WaitDrained, CheckLoad, Identify, WriteRecord, MakeRoom, Call, Start, MeasureMemory)


# ---- recovery --------------------------------------------------------------------------------


def recover(
    obs: Observation, record: Record | None, steps: EngineSteps
) -> tuple[ModelState, int, str]:
    """What to believe at start-up (or for an engine seen for the first time): the state, the
    first wake step still to do, and why. The engine's word where it has one; a different
    process than the record's is a fresh one (awake); else the record, where an intent without
    outcome of a call that is not idempotent is `unknown`."""
    fresh = record is not None and record.incarnation and obs.incarnation != record.incarnation
    if obs.up and obs.incarnation and fresh:
        return ModelState.AWAKE, 0, "a fresh engine process (its incarnation changed)"
    engine_says = obs.up and obs.asleep is not None
    if record is not None and record.pending is not None and not engine_says:
        return _pending(record, record.pending, steps)
    state = policy.initial_state(obs, record)
    if engine_says:
        return state, 0, "the engine says so"
    if record is None:
        return state, 0, "no record: an engine holds its memory until told otherwise"
    if state is ModelState.WAKING:
        # A record from before intents were written: the wake had passed its steps that are
        # not idempotent (they were recorded first); finish the idempotent rest.
        return state, _idempotent_tail(steps.wake), "record: a wake was interrupted"
    return state, 0, f"record: {record.state.value}"


def _pending(record: Record, pending: Pending, steps: EngineSteps) -> tuple[ModelState, int, str]:
    """A record of an engine call in progress: done steps stand, an intent of a step that may
    be repeated is repeated, an intent of one that may not is unknown."""
    ops = steps.sleep if pending.op == "sleep" else steps.wake
    index = next((i for i, s in enumerate(ops) if s.name == pending.step), None)
    if index is None:  # a record of another engine flavor's steps
        return ModelState.UNKNOWN, 0, f"the record names an unknown step {pending.step!r}"
    if pending.phase == "intent" and not ops[index].idempotent:
        return (
            ModelState.UNKNOWN,
            0,
            f"kvsleep stopped during the {pending.step} call of a {pending.op}; the engine "
            "may or may not have done it",
        )
    if pending.op == "sleep":
        if pending.phase == "done":
            return ModelState.ASLEEP, 0, "record: asleep"
        return ModelState.FAILED, 0, f"record: a {pending.step} call did not complete"
    done = index + 1 if pending.phase == "done" else index
    if record.state is ModelState.FAILED:
        return ModelState.FAILED, done, "record: a wake failed"
    if done >= len(ops):
        return ModelState.AWAKE, 0, "record: awake"
    return ModelState.WAKING, done, "record: a wake was interrupted"


def _idempotent_tail(steps: tuple[Step, ...]) -> int:
    """Index of the first step after the last one that must not be repeated."""
    done = len(steps)
    while done and steps[done - 1].idempotent:
        done -= 1
    return done


# ---- the machine -----------------------------------------------------------------------------


@dataclass(eq=False)
class EngineMachine:
    """See the module docstring. Fields are read by views and metrics; only `handle` (and the
    few pure helpers below) change them."""

    cfg: ModelConfig
    steps: EngineSteps
    state: ModelState
    state_since: float
    incarnation: str | None = None
    version: int = 0
    in_engine: int = 0
    held: int = 0
    held_bytes: int = 0
    want_awake: bool = True
    wake_reason: str = "request"
    sleep_reason: str = "idle"
    manual_sleep: bool = False
    deferred_wake: str | None = None
    engine_up: bool | None = None
    slept_at: float | None = None
    last_error: str | None = None
    unknown_reason: str | None = None
    # A launched engine with no process: `queued` waits for its turn to start, `stopped` is
    # started by its first request. Neither holds GPU memory.
    queued: bool = False
    stopped: bool = False
    can_start: bool = False  # a launcher can start this engine when it is stopped
    can_measure: bool = False  # NVML can tell the GPU memory of this engine's processes
    measured: bool = False  # that was asked once for the current `unknown`
    sleep_failures: int = 0
    sleep_retry_at: float = 0.0
    cannot_sleep: str | None = None
    # The job outstanding, the operation it serves and the step index reached.
    job: Job | None = None
    op: str | None = None
    step: int = 0
    resume_from: int = 0  # wake steps already done (a failed or interrupted wake)
    pending: Pending | None = None
    load_waited: float = 0.0
    load_checked: bool = False
    verifying: bool = False  # identifying the process after a call that must reach one only
    verify_waited: float = 0.0
    recording_outcome: bool = False
    op_took: float = 0.0  # the engine calls' time in the current operation (all its steps)
    # The released process was found gone (nothing listening): whatever answers next is a fresh
    # one. Only needed for engines that do not name their process.
    gone: bool = False
    pending_sleep: int = 0  # control calls waiting for a sleep
    pending_wake: int = 0
    wake_history: deque[float] = field(default_factory=lambda: deque(maxlen=WAKE_HISTORY))
    start_history: deque[float] = field(default_factory=lambda: deque(maxlen=WAKE_HISTORY))

    @property
    def name(self) -> str:
        """How messages to clients name the engine: by the model they asked for, and which of
        its replicas when it has several (`org/chat` replica 1)."""
        cfg = self.cfg
        return cfg.name if not cfg.model else f"{cfg.model}` replica `{cfg.replica}"

    @property
    def busy(self) -> bool:
        return self.job is not None

    # ---- reading -------------------------------------------------------------------------

    def record(self) -> Record:
        return Record(self.state, self.state_since, self.incarnation, self.pending)

    def view(
        self,
        in_force: SleepPolicy,
        in_flight: int,
        last_activity: float,
        *,
        observation: Observation | None = None,
        owned: bool = True,
        sleep_allowed: bool = True,
    ) -> policy.ModelView:
        """The policy's view of this engine, for the live manager and the replay alike, so the
        reconciler decides on the same facts in both. `in_force` is the policy in force (an adaptive
        threshold filled in); traffic (`in_flight`, `last_activity`) is what the caller counts:
        the machine knows only what reached its engine."""
        cfg = self.cfg
        return policy.ModelView(
            name=cfg.name,
            state=self.state,
            state_since=self.state_since,
            version=self.version,
            busy=self.busy,
            in_flight=in_flight,
            held=self.held,
            last_activity=last_activity,
            policy=in_force,
            always_on=cfg.always_on,
            engine_up=self.engine_up,
            observation=observation,
            slept_at=self.slept_at,
            deferred_wake=self.deferred_wake,
            owned=owned,
            sleep_allowed=sleep_allowed,
            sleep_retry_at=self.sleep_retry_at,
            cannot_sleep=self.cannot_sleep is not None,
        )

    def reported_state(self) -> ModelState:
        """The state shown to operators: `down` for a settled model whose engine does not
        answer; never for a launched engine with no process by design (it is asleep and starts
        on its first request)."""
        if self.stopped:
            return self.state
        if self.engine_up is False and self.state in (
            ModelState.AWAKE,
            ModelState.ASLEEP,
            ModelState.FAILED,
        ):
            return ModelState.DOWN
        return self.state

    def wake_eta(self) -> float | None:
        """Expected wake time; for a launched engine starting (or to be started), its measured
        start time (unknown until one start has been measured)."""
        if self.state is ModelState.STARTING or self.stopped:
            return policy.wake_eta(list(self.start_history), None)
        return policy.wake_eta(list(self.wake_history), self.cfg.wake_eta_seconds)

    def eta_remaining(self, now: float) -> float | None:
        return policy.eta_remaining(self.state, self.state_since, self.wake_eta(), now)

    # ---- the one entry point ------------------------------------------------------------

    def finished(self) -> None:
        """The data path's other half: a forwarded request is over (no event object for it)."""
        self.in_engine = max(0, self.in_engine - 1)

    def admit_awake(self) -> bool:
        """The data path's fast case: an awake engine takes the request at once."""
        if self.state is ModelState.AWAKE:
            self.in_engine += 1
            return True
        return False

    def handle(self, event: Event) -> list[Effect]:
        out: list[Effect] = []
        _HANDLERS[type(event)](self, event, out)
        if self.job is None and not isinstance(event, (Removed, Finished, HeldLeft)):
            self._advance(getattr(event, "now", self.state_since), out)
        return out

    # ---- requests ------------------------------------------------------------------------

    def _on_Arrived(self, ev: Arrived, out: list[Effect]) -> None:
        if self.admit_awake():
            out.append(Admit())
            return
        name, state, pol = self.name, self.state, self.cfg.policy
        if state is ModelState.UNKNOWN:
            out.append(
                Reject(
                    "wake_failed",
                    503,
                    f"model `{name}` is in state unknown ({self.unknown_reason}); kvsleep "
                    f"will not call its engine until an operator runs `kvsleep adopt {name} "
                    "asleep|awake`",
                )
            )
            return
        timeout = min(pol.wake_timeout_seconds, ev.deadline or pol.wake_timeout_seconds)
        wait = self.eta_remaining(ev.now)
        retry_after = max(1.0, wait) if wait is not None else 1.0
        decision = policy.admission(
            state,
            self.held,
            pol,
            size=ev.size,
            held_bytes=self.held_bytes,
            room_bytes=ev.room_bytes,
        )
        if decision is policy.Admission.REJECT_NO_WAKE:
            out.append(
                Reject(
                    "asleep_no_wake",
                    503,
                    f"model `{name}` is {state.value} and wakeup_on_request is off; wake it first",
                )
            )
            return
        if decision is policy.Admission.REJECT_QUEUE_FULL:
            out.append(
                Reject(
                    "queue_full",
                    503,
                    f"model `{name}` is {state.value} and its hold queue is full ({self.held} "
                    f"requests, {self.held_bytes} body bytes wait for it)",
                    retry_after,
                )
            )
            return
        self._want_wake("request")
        if wait is not None and wait > timeout:
            # Waiting in vain helps nobody: say when to come back; the wake goes on.
            out.append(
                Reject(
                    "wake_timeout",
                    503,
                    f"model `{name}` is {state.value}; its wake is expected to take {wait:.0f}s, "
                    f"longer than this request's {timeout:g}s deadline",
                    retry_after,
                )
            )
            return
        self.held += 1
        self.held_bytes += ev.size
        out.append(Hold(timeout))

    def _on_Finished(self, ev: Finished, out: list[Effect]) -> None:
        self.finished()

    def _on_HeldLeft(self, ev: HeldLeft, out: list[Effect]) -> None:
        self.held = max(0, self.held - 1)
        self.held_bytes = max(0, self.held_bytes - ev.size)

    def _release_held(self, out: list[Effect]) -> None:
        if self.held:
            self.in_engine += self.held
            self.held = self.held_bytes = 0
            out.append(ReleaseHeld())

    def _reject_held(self, out: list[Effect], reason: str, message: str) -> None:
        if self.held:
            self.held = self.held_bytes = 0
            out.append(RejectHeld(reason, message))

    # ---- wishes --------------------------------------------------------------------------

    def _on_WantSleep(self, ev: WantSleep, out: list[Effect]) -> None:
        self.pending_sleep += 1
        self.want_awake = False
        self.sleep_reason = ev.reason
        self.manual_sleep = ev.reason == "manual"
        self.deferred_wake = None

    def _on_WantWake(self, ev: WantWake, out: list[Effect]) -> None:
        self.pending_wake += 1
        self.deferred_wake = None
        self._want_wake(ev.reason)

    def _want_wake(self, reason: str) -> None:
        if not self.want_awake or self.job is None:
            self.wake_reason = reason
        self.want_awake = True

    def defer_wake(self, reason: str, now: float) -> float | None:
        """Schedule a wake nobody's request asked for once `min_sleep_duration` has passed;
        returns when, or None when it may happen now."""
        if self.state is not ModelState.ASLEEP or self.slept_at is None:
            return None
        at = self.slept_at + self.cfg.policy.min_sleep_duration
        if now >= at:
            return None
        self.deferred_wake = reason
        return at

    def _on_Adopted(self, ev: Adopted, out: list[Effect]) -> None:
        if self.job is not None:
            return
        was, pending = self.state, self.pending
        # The word is about the process that answers now (unnamed: the next probe names it).
        self.incarnation = ev.incarnation
        self.unknown_reason = None
        self.pending = None
        self.resume_from = 0
        if ev.state is ModelState.AWAKE and pending is not None and pending.op == "wake":
            # "Awake" after an interrupted wake step: that step happened; the idempotent rest of
            # the wake (SGLang's weight reload) is still to do before anything is served.
            names = [s.name for s in self.steps.wake]
            if pending.step in names and names.index(pending.step) + 1 < len(names):
                self.resume_from = names.index(pending.step) + 1
                self.pending = Pending("wake", pending.step, "done")
                self._set(ModelState.FAILED, ev.now, out)
                self.want_awake = True
                self.wake_reason = "manual"
                out.append(
                    Log(
                        "warning",
                        f"state set by an operator: awake after {pending.step} "
                        f"(was {was.value}); finishing the wake",
                    )
                )
                out.append(Persist())
                return
        self._set(ev.state, ev.now, out)
        self.want_awake = ev.state is ModelState.AWAKE
        if ev.state is ModelState.ASLEEP:
            self.slept_at = ev.now
        out.append(Log("warning", f"state set by an operator: {ev.state.value} (was {was.value})"))
        out.append(Persist())
        if ev.state is ModelState.AWAKE:
            self._release_held(out)
        elif self.held or self.in_engine:
            self.want_awake = True

    def _on_Measured(self, ev: Measured, out: list[Effect]) -> None:
        """NVML resolves `unknown` without an operator where the memory speaks clearly."""
        self._done()
        if self.state is not ModelState.UNKNOWN or ev.used_gb is None:
            return
        verdict = policy.memory_verdict(ev.used_gb, self.cfg.memory_gb)
        if verdict is None:
            out.append(
                Log(
                    "warning",
                    f"its processes hold {ev.used_gb:.1f} GB of GPU memory, which says neither "
                    "released nor loaded; an operator decides (kvsleep adopt)",
                )
            )
            return
        out.append(
            Log(
                "warning",
                f"its processes hold {ev.used_gb:.1f} GB of GPU memory (NVML): "
                f"taken as {verdict.value}",
            )
        )
        self._on_Adopted(Adopted(ev.now, verdict), out)

    def _on_Reconfigured(self, ev: Reconfigured, out: list[Effect]) -> None:
        self.cfg = ev.cfg
        # A reload is how an operator says "the engine was fixed": sleeps may be tried again.
        self._reset_backoff()

    def _on_Removed(self, ev: Removed, out: list[Effect]) -> None:
        self._reject_held(out, "wake_failed", f"model `{self.name}` was removed")
        out.append(Settle("sleep", False))
        out.append(Settle("wake", False))
        self.pending_sleep = self.pending_wake = 0

    # ---- observations ---------------------------------------------------------------------

    def _on_Observed(self, ev: Observed, out: list[Effect]) -> None:
        if self.job is not None or (ev.version is not None and ev.version != self.version):
            return  # changed while we probed: judge it next pass
        obs, previous_up = ev.obs, self.engine_up
        if self.state is ModelState.STARTING:
            return
        self.engine_up = obs.up
        if not obs.up:
            if previous_up:
                out.append(Log("warning", f"engine unreachable: {obs.detail}", event=False))
            self.last_error = f"engine unreachable: {obs.detail}"
            return
        if previous_up is False:
            self._reset_backoff()  # back after being down: maybe restarted, new flags
            if (self.last_error or "").startswith("engine unreachable"):
                self.last_error = None
        if self._fresh_process(ev.now, obs, out):
            return
        self._heal(ev.now, obs, previous_up, ev.owned, out)

    def _fresh_process(self, now: float, obs: Observation, out: list[Effect]) -> bool:
        """A different process than the one we know: awake and holding its memory."""
        if not obs.incarnation:
            return False
        known, self.incarnation = self.incarnation, obs.incarnation
        if known is None or known == obs.incarnation:
            if self.pending is not None or known is None:
                out.append(Persist())
            return False
        why = f"a fresh engine process answers ({obs.incarnation}, was {known})"
        out.append(Log("warning", why))
        version = self.version
        self._become_fresh(now, out)
        out.append(Healed(ModelState.AWAKE, why, version))
        return True

    def _become_fresh(self, now: float, out: list[Effect]) -> None:
        self.gone = False
        self.pending = None
        self.resume_from = 0
        self.unknown_reason = None
        self.slept_at = None
        self.last_error = None
        self._reset_backoff()
        self.want_awake = True  # the idle policy decides again, from now
        self._set(ModelState.AWAKE, now, out)
        out.append(Persist())
        self._release_held(out)
        if self.pending_wake:
            out.append(Settle("wake", True))
            self.pending_wake = 0

    def _heal(
        self,
        now: float,
        obs: Observation,
        previous_up: bool | None,
        owned: bool,
        out: list[Effect],
    ) -> None:
        # Judged against what was known before this probe (`engine_up` is already its answer).
        view = dataclasses.replace(
            self.view(self.cfg.policy, self.in_engine, 0.0, observation=obs, owned=owned),
            engine_up=previous_up,
        )
        adopt = policy.heal(view)
        if adopt is None:
            return
        out.append(Log("warning", f"{adopt.why}; now {adopt.state.value} (was {self.state.value})"))
        self.unknown_reason = None
        self.pending = None
        self.resume_from = 0
        self.want_awake = adopt.state is ModelState.AWAKE
        if adopt.state is ModelState.ASLEEP:
            self.slept_at = now
        out.append(Healed(adopt.state, adopt.why, self.version))
        self._set(adopt.state, now, out)
        out.append(Persist())
        if adopt.state is ModelState.AWAKE:
            self._release_held(out)
        elif self.held or self.in_engine:
            # Requests held for it, or already inside an engine slept behind our back (vLLM
            # queues them until a wake that nobody else will send): wake it for them.
            self._want_wake("request")

    def restore(self, now: float, obs: Observation, record: Record | None) -> list[Effect]:
        """Believe what `recover` says, before anything is served."""
        state, self.resume_from, why = recover(obs, record, self.steps)
        self.engine_up = obs.up
        self.incarnation = obs.incarnation or (record.incarnation if record else None)
        self.pending = record.pending if record and state is not ModelState.AWAKE else None
        if state is ModelState.AWAKE and obs.incarnation:
            self.pending = None
        self.want_awake = state is not ModelState.ASLEEP
        if state is ModelState.ASLEEP:
            self.slept_at = record.since if record else now
        self.unknown_reason = why if state is ModelState.UNKNOWN else None
        self.state, self.state_since = state, now
        self.version += 1
        out: list[Effect] = [
            Log(
                "warning" if state is ModelState.UNKNOWN else "info",
                f"engine {'up' if obs.up else f'down ({obs.detail})'}, starting as "
                f"{state.value}: {why}",
                event=False,
            ),
            Persist(),
        ]
        if state is ModelState.WAKING:
            # A previous kvsleep died mid-wake: finish it (the steps not done) before serving.
            self.state = ModelState.FAILED
            self.want_awake = True
            self.wake_reason = "reconcile"
            self._advance(now, out)
        elif state is ModelState.UNKNOWN:
            self.last_error = why
            self._reject_held(out, "wake_failed", f"model `{self.name}` is in state unknown: {why}")
            self._advance(now, out)  # NVML may tell
        elif state is ModelState.AWAKE:
            self._release_held(out)  # requests held while the engine was looked at
        elif self.held:
            self._advance(now, out)  # requests held while the engine was looked at: wake it
        return out

    # ---- launched engines -----------------------------------------------------------------

    def _on_LaunchStarting(self, ev: LaunchStarting, out: list[Effect]) -> None:
        self.job = self.op = None  # whatever call was under way went to a dead process
        self.engine_up = None if ev.problem is None else False
        self.last_error = ev.problem
        self._reset_backoff()  # the new process may have other flags
        self.want_awake = True
        self.queued = ev.queued
        self.stopped = False
        self.pending = None
        self.resume_from = 0
        self.unknown_reason = None
        self.incarnation = None  # learnt from the new process
        if self.state is not ModelState.STARTING:
            self._set(ModelState.STARTING, ev.now, out)
        if ev.problem is not None:
            out.append(Log("warning", ev.problem))

    def _on_LaunchSpawning(self, ev: LaunchSpawning, out: list[Effect]) -> None:
        self.queued = self.stopped = False

    def _on_LaunchStarted(self, ev: LaunchStarted, out: list[Effect]) -> None:
        """A launched engine is ready: a fresh process is awake and holds its memory."""
        if ev.took is not None:
            self.start_history.append(ev.took)
        if isinstance(self.job, Start):
            out.append(Count("wake", self.wake_reason, True))
            self.job = self.op = None
        self.engine_up = True
        self.last_error = None
        self.queued = self.stopped = False
        wanted_sleep = self.pending_sleep > 0
        self.want_awake = True
        self._set(ModelState.AWAKE, ev.now, out)
        out.append(Persist())
        self._release_held(out)
        out.append(Log("info", "engine ready; awake"))
        if self.pending_wake:
            out.append(Settle("wake", True))
            self.pending_wake = 0
        if wanted_sleep:
            self.want_awake = False

    def _on_LaunchFailed(self, ev: LaunchFailed, out: list[Effect]) -> None:
        """A launched engine could not be started: every held request gets its answer."""
        started = isinstance(self.job, Start)
        if started:
            out.append(Count("wake", self.wake_reason, False))
            self.job = self.op = None
        self.engine_up = False
        self.last_error = ev.error
        self.want_awake = False
        self.queued = False
        self.stopped = started  # no process: the next request tries to start it again
        self._set(ModelState.FAILED, ev.now, out)
        out.append(Persist())
        self._reject_held(
            out, "wake_failed", f"model `{self.name}` engine failed to start: {ev.error}"
        )
        self._settle(out, "wake", False)
        self._settle(out, "sleep", False)

    def _on_LaunchDeferred(self, ev: LaunchDeferred, out: list[Effect]) -> None:
        """Left unstarted (no room in its GPUs' budget): asleep in effect; its first request
        starts it."""
        self.stopped = True
        self.queued = False
        self.engine_up = None
        self.want_awake = bool(self.held or self.pending_wake)
        self.slept_at = ev.now
        self._set(ModelState.ASLEEP, ev.now, out)
        self._settle(out, "sleep", True)

    # ---- operations ------------------------------------------------------------------------

    def _advance(self, now: float, out: list[Effect]) -> None:
        """Start the next job toward the wanted state, if one is needed (one at a time)."""
        state = self.state
        if state is ModelState.UNKNOWN and self.can_measure and not self.measured:
            self.measured = True
            self._run(MeasureMemory(), out)
            return
        if state in (ModelState.STARTING, ModelState.UNKNOWN):
            if state is ModelState.UNKNOWN:
                self._settle(out, "sleep", False)
                self._settle(out, "wake", False)
            return
        if self.held and state is not ModelState.AWAKE:
            # Held requests always get their wake, even if a sleep was asked for after they
            # arrived; otherwise they would wait out wake_timeout for nothing.
            self.want_awake = True
        if not self.want_awake and state is ModelState.AWAKE:
            self.op = "sleep"
            self.op_took = 0.0
            self.step = 0
            self._set(ModelState.DRAINING, now, out)
            self.load_waited = 0.0
            self._run(WaitDrained(self.cfg.policy.drain_timeout_seconds), out)
        elif self.want_awake and state in (ModelState.ASLEEP, ModelState.FAILED):
            self.op = "wake"
            self.op_took = 0.0
            self._run(MakeRoom(self.wake_reason), out)
        else:
            self._settle(out, "sleep", state is ModelState.ASLEEP)
            self._settle(out, "wake", state is ModelState.AWAKE)

    def _run(self, job: Job, out: list[Effect]) -> None:
        self.job = job
        out.append(job)

    def _done(self) -> None:
        self.job = None

    def _on_Drained(self, ev: Drained, out: list[Effect]) -> None:
        self._done()
        if not ev.ok:
            self._sleep_failed(
                ev.now,
                out,
                f"{self.in_engine} requests still in flight after "
                f"{self.cfg.policy.drain_timeout_seconds:g}s",
            )
            return
        self.load_checked = False
        self._begin_step(ev.now, out)

    def _on_LoadReported(self, ev: LoadReported, out: list[Effect]) -> None:
        self._done()
        if ev.load:
            # The engine runs requests kvsleep does not count (a client that left, traffic that
            # bypassed kvsleep): releasing a busy SGLang kills it. Wait, within the drain budget.
            if self.load_waited >= self.cfg.policy.drain_timeout_seconds:
                self._sleep_failed(
                    ev.now,
                    out,
                    f"the engine still runs {ev.load} requests after "
                    f"{self.cfg.policy.drain_timeout_seconds:g}s",
                )
                return
            self.load_waited += LOAD_RECHECK_SECONDS
            self._run(CheckLoad(LOAD_RECHECK_SECONDS), out)
            return
        self.load_checked = True
        self._begin_step(ev.now, out)

    def _current_steps(self) -> tuple[Step, ...]:
        return self.steps.sleep if self.op == "sleep" else self.steps.wake

    def _begin_step(self, now: float, out: list[Effect]) -> None:
        """Before a step that must reach one process only, identify the process; before any
        step that cannot be repeated, write the intent down first. Before the first sleep step
        that reaches the engine, ask the engine whether it is idle."""
        step = self._current_steps()[self.step]
        if self.op == "sleep" and step.touches_engine and not self.load_checked:
            self._run(CheckLoad(), out)
            return
        if self.op == "sleep" and self.state is ModelState.DRAINING:
            self._set(ModelState.SLEEPING, now, out)
        if not step.idempotent:
            self._run(Identify(), out)
        else:
            self._write_intent(now, step, out)

    def _on_Identified(self, ev: Identified, out: list[Effect]) -> None:
        self._done()
        obs = ev.obs
        if self.verifying:
            self._verified(ev.now, obs, out)
            return
        if not obs.up:
            self.engine_up = False
            self.gone = self.op == "wake" or self.gone
            self._op_failed(ev.now, out, f"engine unreachable: {obs.detail}")
            return
        self.engine_up = True
        named = bool(obs.incarnation and self.incarnation)
        if (named and obs.incarnation != self.incarnation) or (self.gone and not named):
            why = (
                f"a fresh engine process answers ({obs.incarnation}, was {self.incarnation})"
                if named
                else "the engine answers again after its process was gone: a fresh process"
            )
            out.append(Log("warning", f"{why}; it holds its memory"))
            self.incarnation = obs.incarnation
            if self.op == "wake":
                # Nothing of it was released: skip what must not reach a fresh process and
                # finish with what may be repeated (SGLang: the weight reload, harmless).
                self.gone = False
                self.pending = None
                self.step = _idempotent_tail(self.steps.wake)
                if self.step < len(self.steps.wake):
                    self._begin_step(ev.now, out)
                else:
                    self._woken(ev.now, out, None)
                return
            self.op = None
            self._become_fresh(ev.now, out)
            self.want_awake = False  # still wanted: drain and sleep the fresh process
            return
        self.incarnation = obs.incarnation or self.incarnation
        self._write_intent(ev.now, self._current_steps()[self.step], out)

    def _write_intent(self, now: float, step: Step, out: list[Effect]) -> None:
        assert self.op is not None
        self.pending = Pending(self.op, step.name, "intent")
        if self.op == "wake" and self.state is not ModelState.WAKING:
            # From here a request waits for a wake under way: its ETA counts from now.
            self._set(ModelState.WAKING, now, out)
        if not step.idempotent:
            self._run(WriteRecord(), out)
        else:
            # A call that may be repeated needs no record first: the write goes on beside the
            # call, and the operation is not delayed (nor refused) by a disk.
            out.append(Persist())
            self._run(Call(self.op, step), out)

    def _on_Recorded(self, ev: Recorded, out: list[Effect]) -> None:
        self._done()
        if self.recording_outcome:
            self.recording_outcome = False
            if not ev.ok:  # the call happened: carry on
                out.append(Log("error", f"its record cannot be written: {ev.error}"))
            self._step_done(ev.now, out)
            return
        if self.op == "slept":
            self.op = None
            if not ev.ok:
                out.append(Log("error", f"asleep, but its record cannot be written: {ev.error}"))
            self._settle(out, "sleep", True)
            return
        if ev.ok:
            assert self.op is not None
            self._run(Call(self.op, self._current_steps()[self.step]), out)
            return
        self.pending = None
        error = f"the state file cannot be written ({ev.error}); no engine call made"
        if self.op == "sleep":
            self._sleep_failed(ev.now, out, error)
        else:
            self._wake_failed(ev.now, out, error)

    def _on_RoomReady(self, ev: RoomReady, out: list[Effect]) -> None:
        self._done()
        if not ev.ok:
            self.op = None
            self.want_awake = False
            self.last_error = f"no GPU memory to wake: {ev.reason}"
            self._reject_held(out, "wake_failed", f"model `{self.name}` cannot wake: {ev.reason}")
            self._settle(out, "wake", False)
            return
        if self.stopped and self.can_start:
            # A launched engine with no process: starting it is its wake.
            self._set(ModelState.STARTING, ev.now, out)
            self._run(Start(self.wake_reason), out)
            return
        self.step = self.resume_from
        if self.step >= len(self.steps.wake):
            self._woken(ev.now, out, None)
            return
        self._begin_step(ev.now, out)

    def _on_CallDone(self, ev: CallDone, out: list[Effect]) -> None:
        self._done()
        op, steps = self.op, self._current_steps()
        step = steps[self.step]
        if ev.result is CallResult.OK:
            self.pending = Pending(op or "", step.name, "done")
            self.op_took += ev.took
            if not step.idempotent:
                # Which process did it reach? One restarted between the identification and the
                # call got it instead: then nobody can tell which holds its memory.
                self.verifying = True
                self.verify_waited = 0.0
                self._run(Identify(), out)
                return
            self._step_done(ev.now, out)
            return
        if ev.result is CallResult.UNKNOWN and not step.idempotent:
            self._become_unknown(
                ev.now,
                out,
                f"the outcome of the {step.name} call is unknown ({ev.error}); the engine may "
                "or may not have done it",
            )
            return
        self.pending = None if op == "sleep" else self.pending
        if op == "sleep":
            self._sleep_failed(
                ev.now, out, ev.error, unsupported=ev.result is CallResult.UNSUPPORTED
            )
        else:
            if self.pending is not None and self.pending.phase == "intent":
                # A wake step that did not take effect: what was done before it still stands.
                self.pending = (
                    Pending("wake", steps[self.step - 1].name, "done") if self.step else None
                )
            self.resume_from = self.step
            self._wake_failed(ev.now, out, ev.error)

    def _step_done(self, now: float, out: list[Effect]) -> None:
        if self.step + 1 < len(self._current_steps()):
            self.step += 1
            out.append(Persist())
            self._begin_step(now, out)
        elif self.op == "sleep":
            self._slept(now, out, self.op_took)
        else:
            self._woken(now, out, self.op_took)

    def _verified(self, now: float, obs: Observation, out: list[Effect]) -> None:
        step = self._current_steps()[self.step].name
        if not obs.up:
            # Silent right after the call: ask again; whoever answers next must be the same
            # process, or nobody can tell which one got the call.
            if self.verify_waited < VERIFY_SECONDS:
                self.verify_waited += IDENTIFY_RETRY_SECONDS
                self._run(Identify(IDENTIFY_RETRY_SECONDS), out)
                return
            self.verifying = False
            self._become_unknown(
                now,
                out,
                f"the engine stopped answering right after the {step} call; which process "
                "got it cannot be told",
            )
            return
        self.verifying = False
        if obs.up and obs.incarnation and self.incarnation and obs.incarnation != self.incarnation:
            self._become_unknown(
                now,
                out,
                f"the engine process changed around the {step} call ({self.incarnation} "
                f"before, {obs.incarnation} after): either may have received it",
            )
            return
        if self.op == "wake" and self.step + 1 < len(self.steps.wake):
            # The outcome is on disk before the next step: a crash now must find "resumed".
            self.recording_outcome = True
            self._run(WriteRecord(), out)
            return
        self._step_done(now, out)

    def _op_failed(self, now: float, out: list[Effect], error: str) -> None:
        if self.op == "sleep":
            self._sleep_failed(now, out, error)
        else:
            self.resume_from = self.step
            self._wake_failed(now, out, error)

    def _slept(self, now: float, out: list[Effect], took: float | None) -> None:
        """Asleep: said to whoever asked once the record is on disk (a crash after the answer
        must not forget it)."""
        self.op = "slept"
        self.pending = None
        self.slept_at = now
        self.last_error = None
        self._reset_backoff()
        self._set(ModelState.ASLEEP, now, out)
        out.append(Count("sleep", self.sleep_reason, True, took))
        out.append(Log("info", f"asleep (reason: {self.sleep_reason})"))
        self._run(WriteRecord(), out)

    def _woken(self, now: float, out: list[Effect], took: float | None) -> None:
        self.op = None
        self.pending = None
        self.resume_from = 0
        self.last_error = None
        self.manual_sleep = False
        if took is not None:
            self.wake_history.append(took)
        out.append(Count("wake", self.wake_reason, True, took))
        self._set(ModelState.AWAKE, now, out)
        out.append(Persist())
        self._release_held(out)
        out.append(Log("info", f"awake (reason: {self.wake_reason})"))
        self._settle(out, "wake", True)

    def _sleep_failed(
        self, now: float, out: list[Effect], error: str, unsupported: bool = False
    ) -> None:
        self.op = None
        self.sleep_failures += 1
        delay = policy.sleep_retry_delay(self.sleep_failures, self.cfg.policy)
        self.sleep_retry_at = now + delay
        if unsupported:
            self.cannot_sleep = error
            out.append(Log("error", f"cannot sleep, it stays awake: {error}", event=False))
        else:
            out.append(
                Log(
                    "warning",
                    f"sleep failed ({self.sleep_failures} in a row), it stays awake; idle sleeps "
                    f"wait {delay:g}s: {error}",
                    event=False,
                )
            )
        out.append(Log("warning", f"sleep failed, stays awake: {error}"))
        out.append(Count("sleep", self.sleep_reason, False))
        self.last_error = error
        self.want_awake = True
        self._set(ModelState.AWAKE, now, out)
        out.append(Persist())
        self._release_held(out)
        self._settle(out, "sleep", False)

    def _wake_failed(self, now: float, out: list[Effect], error: str) -> None:
        self.op = None
        out.append(Log("warning", f"wake failed: {error}"))
        out.append(Count("wake", self.wake_reason, False))
        self.last_error = error
        self.want_awake = False
        self._set(ModelState.FAILED, now, out)
        out.append(Persist())
        self._reject_held(out, "wake_failed", f"model `{self.name}` failed to wake: {error}")
        self._settle(out, "wake", False)

    def _become_unknown(self, now: float, out: list[Effect], why: str) -> None:
        op, self.op = self.op, None
        self.unknown_reason = why
        self.last_error = why
        out.append(Log("error", f"state unknown: {why}"))
        if op is not None:
            out.append(Count(op, self.wake_reason if op == "wake" else self.sleep_reason, False))
        self._set(ModelState.UNKNOWN, now, out)
        out.append(Persist())
        self._reject_held(out, "wake_failed", f"model `{self.name}` is in state unknown: {why}")
        self._settle(out, "sleep", False)
        self._settle(out, "wake", False)

    # ---- small helpers ---------------------------------------------------------------------

    def _reset_backoff(self) -> None:
        self.sleep_failures = 0
        self.sleep_retry_at = 0.0
        self.cannot_sleep = None

    def _set(self, state: ModelState, now: float, out: Sequence[Effect]) -> None:
        if state is not ModelState.UNKNOWN:
            self.measured = False
        self.state = state
        self.state_since = now
        self.version += 1

    def _settle(self, out: list[Effect], op: str, ok: bool) -> None:
        if op == "sleep" and self.pending_sleep:
            self.pending_sleep = 0
            out.append(Settle("sleep", ok))
        elif op == "wake" and self.pending_wake:
            self.pending_wake = 0
            out.append(Settle("wake", ok))


# Which method handles which event; every event has one (checked at import).
_HANDLERS: dict[type[Any], Callable[[EngineMachine, Any, list[Effect]], None]] = {
    Arrived: EngineMachine._on_Arrived,
    Finished: EngineMachine._on_Finished,
    HeldLeft: EngineMachine._on_HeldLeft,
    WantSleep: EngineMachine._on_WantSleep,
    WantWake: EngineMachine._on_WantWake,
    Observed: EngineMachine._on_Observed,
    Drained: EngineMachine._on_Drained,
    LoadReported: EngineMachine._on_LoadReported,
    Identified: EngineMachine._on_Identified,
    Recorded: EngineMachine._on_Recorded,
    RoomReady: EngineMachine._on_RoomReady,
    CallDone: EngineMachine._on_CallDone,
    Adopted: EngineMachine._on_Adopted,
    Measured: EngineMachine._on_Measured,
    Reconfigured: EngineMachine._on_Reconfigured,
    LaunchStarting: EngineMachine._on_LaunchStarting,
    LaunchSpawning: EngineMachine._on_LaunchSpawning,
    LaunchStarted: EngineMachine._on_LaunchStarted,
    LaunchFailed: EngineMachine._on_LaunchFailed,
    LaunchDeferred: EngineMachine._on_LaunchDeferred,
    Removed: EngineMachine._on_Removed,
}
assert set(_HANDLERS) == set(get_args(Event))
