"""The per-engine state machine as pure event sequences: no sockets, no clock, no asyncio.

Each scenario of issue #13 (and its three "also seen") is played here event by event; the same
scenarios run end to end against the simulator in tests/test_engine_state_trust.py.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from kvsleep.config import ModelConfig, SleepPolicy
from kvsleep.core.engine_facts import EngineSteps, Observation, Step
from kvsleep.core.machine import (
    Admit,
    Adopted,
    Arrived,
    Call,
    CallDone,
    CallResult,
    CheckLoad,
    Drained,
    Effect,
    EngineMachine,
    Finished,
    Hold,
    Identified,
    Identify,
    LaunchStarted,
    LaunchStarting,
    LoadReported,
    MakeRoom,
    Measured,
    MeasureMemory,
    Observed,
    Pending,
    Record,
    Recorded,
    Reject,
    RejectHeld,
    ReleaseHeld,
    Removed,
    RoomReady,
    Settle,
    WaitDrained,
    WantSleep,
    WantWake,
    WriteRecord,
    recover,
)
from kvsleep.core.states import ModelState

RELEASE = Step("release", idempotent=False)
RESUME = Step("resume", idempotent=False)
RELOAD = Step("reload_weights", idempotent=True)
SGLANG = EngineSteps((RELEASE,), (RESUME, RELOAD), observable=False)
VLLM = EngineSteps((Step("sleep", True),), (Step("wake_up", True),), observable=True)
VLLM_LEVEL2 = EngineSteps(
    (Step("sleep", True),),
    (Step("wake_up_weights", True), Step("reload_weights", True), Step("wake_up_kv_cache", True)),
    observable=True,
)
T = 1000.0
INC = "sglang:1700000000.0"


def machine(
    steps: EngineSteps = SGLANG, state: ModelState = ModelState.AWAKE, **policy: Any
) -> EngineMachine:
    pol = SleepPolicy(**{"drain_timeout_seconds": 5, **policy})
    cfg = ModelConfig("org/m", "sglang" if steps is SGLANG else "vllm", "http://e", policy=pol)
    m = EngineMachine(cfg, steps, state, T)
    m.incarnation = INC
    return m


def up(incarnation: str | None = INC, asleep: bool | None = None) -> Observation:
    return Observation(up=True, asleep=asleep, incarnation=incarnation)


def jobs(effects: list[Effect]) -> list[Effect]:
    return [
        e
        for e in effects
        if isinstance(e, (WaitDrained, CheckLoad, Identify, WriteRecord, MakeRoom, Call))
    ]


def calls(effects: list[Effect]) -> list[str]:
    return [e.step.name for e in effects if isinstance(e, Call)]


def sleep_until_call(m: EngineMachine, load: int | None = 0) -> list[Effect]:
    """Ask for a sleep and answer every job up to the engine call; the effects on the way."""
    seen = m.handle(WantSleep(T, "manual"))
    seen += m.handle(Drained(T, True))
    seen += m.handle(LoadReported(T, load))
    seen += m.handle(Identified(T, up()))
    seen += m.handle(Recorded(T, True))
    return seen


def put_to_sleep(m: EngineMachine) -> None:
    effects = sleep_until_call(m)
    assert calls(effects) == ["release"]
    assert m.handle(CallDone(T, CallResult.OK)) == [Identify()]  # which process got it?
    m.handle(Identified(T, up()))
    m.handle(Recorded(T, True))
    assert m.state is ModelState.ASLEEP and not m.busy


# ---- 1. a client that left while its request still runs in the engine ------------------------


def test_1_an_engine_still_busy_after_its_client_left_is_not_released():
    m = machine()
    assert m.handle(Arrived(T)) == [Admit()]
    m.handle(Finished())  # kvsleep's side is over: the client left
    effects = m.handle(WantSleep(T, "idle"))
    assert jobs(effects) == [WaitDrained(5)]
    assert jobs(m.handle(Drained(T, True))) == [CheckLoad()]
    # The engine itself still runs the abandoned request: ask again, never release.
    for _ in range(3):
        effects = m.handle(LoadReported(T, 1))
        assert jobs(effects) == [CheckLoad(0.5)]
        assert calls(effects) == []
    assert jobs(m.handle(LoadReported(T, 0))) == [Identify()]
    assert jobs(m.handle(Identified(T, up()))) == [WriteRecord()]
    assert calls(m.handle(Recorded(T, True))) == ["release"]


def test_1_an_engine_busy_past_the_drain_timeout_is_not_released_and_stays_awake():
    m = machine(drain_timeout_seconds=1)
    m.handle(WantSleep(T, "idle"))
    m.handle(Drained(T, True))
    effects: list[Effect] = []
    for _ in range(5):
        effects = m.handle(LoadReported(T, 2))
        assert calls(effects) == []
    assert m.state is ModelState.AWAKE and not m.busy
    assert "still runs 2 requests" in (m.last_error or "")


# ---- 2 and 7. a fresh engine process is awake, whatever the records say ----------------------


def test_2_a_fresh_engine_after_a_restart_is_awake_whatever_the_record_says():
    record = Record(ModelState.ASLEEP, T - 50, INC)
    state, _, why = recover(up("sglang:1700000999.0"), record, SGLANG)
    assert state is ModelState.AWAKE and "fresh" in why
    # The same process (paused, or kvsleep restarted alone) keeps the record.
    assert recover(up(INC), record, SGLANG)[0] is ModelState.ASLEEP


def test_2_a_launched_engine_restarted_is_awake_and_its_first_sleep_releases_once():
    m = machine()
    put_to_sleep(m)
    m.handle(LaunchStarting(T + 1, "engine exited; restarting"))
    assert m.state is ModelState.STARTING
    m.handle(LaunchStarted(T + 2, 10.0))
    assert m.state is ModelState.AWAKE and m.incarnation is None  # learnt from the new process
    effects = sleep_until_call(m)
    assert calls(effects) == ["release"]


def test_7_an_engine_killed_and_restarted_between_two_probes_is_awake_and_not_resumed():
    m = machine()
    put_to_sleep(m)
    effects = m.handle(Observed(T + 5, up("sglang:1700000500.0")))
    assert m.state is ModelState.AWAKE
    assert calls(effects) == []
    assert m.handle(Arrived(T + 6)) == [Admit()]


def test_7_a_wake_that_finds_a_fresh_process_calls_no_resume():
    m = machine()
    put_to_sleep(m)
    m.handle(Arrived(T + 5))
    m.handle(RoomReady(T + 5, True))
    effects = m.handle(Identified(T + 5, up("sglang:1700000500.0")))
    # No resume; the weight reload (harmless, idempotent) finishes the wake.
    assert calls(effects) == ["reload_weights"]
    effects = m.handle(CallDone(T + 6, CallResult.OK))
    assert ReleaseHeld() in effects and m.state is ModelState.AWAKE


# ---- 3. reload: an engine's state follows the engine -----------------------------------------


def test_3_a_vllm_seen_for_the_first_time_asleep_is_asleep():
    state, _, _ = recover(up(None, asleep=True), None, VLLM)
    assert state is ModelState.ASLEEP


def test_3_another_awake_engine_behind_a_model_is_awake_despite_an_asleep_record():
    record = Record(ModelState.ASLEEP, T, "sglang:1")
    assert recover(up("sglang:2"), record, SGLANG)[0] is ModelState.AWAKE


# ---- 4. a state file that cannot be written ----------------------------------------------------


def test_4_a_release_whose_intent_cannot_be_written_is_not_made():
    m = machine()
    m.handle(WantSleep(T, "idle"))
    m.handle(Drained(T, True))
    m.handle(LoadReported(T, 0))
    m.handle(Identified(T, up()))
    effects = m.handle(Recorded(T, False, "No space left on device"))
    assert calls(effects) == []
    assert Settle("sleep", False) in effects
    assert m.state is ModelState.AWAKE and "cannot be written" in (m.last_error or "")
    assert "No space left on device" in (m.last_error or "")


# ---- 5. interrupted and failed wakes -----------------------------------------------------------


def test_5a_resume_ok_reload_failed_then_restart_reloads_only():
    m = machine()
    put_to_sleep(m)
    m.handle(Arrived(T))
    m.handle(RoomReady(T, True))
    m.handle(Identified(T, up()))
    assert calls(m.handle(Recorded(T, True))) == ["resume"]
    m.handle(CallDone(T, CallResult.OK))
    assert m.handle(Identified(T, up())) == [WriteRecord()]  # "resumed" on disk first
    assert calls(m.handle(Recorded(T, True))) == ["reload_weights"]
    effects = m.handle(CallDone(T, CallResult.FAILED, "update_weights_from_disk failed"))
    assert RejectHeld in {type(e) for e in effects}
    record = m.record()
    assert record.state is ModelState.FAILED
    assert record.pending == Pending("wake", "resume", "done")
    # kvsleep restarts: the same engine process; the next wake only reloads the weights.
    again = machine(state=ModelState.AWAKE)
    again.restore(T + 10, up(), record)
    assert again.state is ModelState.FAILED and again.resume_from == 1
    again.handle(Arrived(T + 11))
    assert calls(again.handle(RoomReady(T + 11, True))) == ["reload_weights"]


def test_5a_without_a_restart_the_retry_reloads_only_too():
    m = machine()
    put_to_sleep(m)
    m.handle(Arrived(T))
    m.handle(RoomReady(T, True))
    m.handle(Identified(T, up()))
    m.handle(Recorded(T, True))
    m.handle(CallDone(T, CallResult.OK))
    m.handle(Identified(T, up()))
    m.handle(Recorded(T, True))
    m.handle(CallDone(T, CallResult.FAILED, "reload failed"))
    m.handle(Arrived(T + 1))
    assert calls(m.handle(RoomReady(T + 1, True))) == ["reload_weights"]


def test_5b_a_resume_refused_by_a_dead_engine_then_a_fresh_process_is_awake():
    m = machine()
    put_to_sleep(m)
    m.handle(Arrived(T))
    m.handle(RoomReady(T, True))
    m.handle(Identified(T, up()))
    m.handle(Recorded(T, True))
    m.handle(CallDone(T, CallResult.FAILED, "cannot connect"))
    assert m.state is ModelState.FAILED
    m.handle(Observed(T + 1, Observation(up=False, detail="refused")))
    effects = m.handle(Observed(T + 2, up("sglang:1700000777.0")))
    assert m.state is ModelState.AWAKE and calls(effects) == []
    # And after a restart of kvsleep in between: the record's process is not the one answering.
    state, _, _ = recover(up("sglang:1700000777.0"), Record(ModelState.FAILED, T, INC), SGLANG)
    assert state is ModelState.AWAKE


# ---- 6. a paused engine is the same engine -----------------------------------------------------


def test_6_a_released_engine_paused_then_continued_stays_asleep():
    m = machine()
    put_to_sleep(m)
    m.handle(Observed(T + 1, Observation(up=False, detail="timeout")))
    assert m.reported_state() is ModelState.DOWN
    effects = m.handle(Observed(T + 9, up(INC)))
    assert m.state is ModelState.ASLEEP and calls(effects) == []


def test_6_without_incarnations_an_engine_back_after_being_down_is_taken_as_restarted():
    """The documented fallback for engines that do not say which process answers."""
    m = machine()
    m.incarnation = None
    put_to_sleep(m)
    m.handle(Observed(T + 1, Observation(up=False)))
    m.handle(Observed(T + 2, up(None)))
    assert m.state is ModelState.AWAKE


# ---- 8. a crash between the record and the call --------------------------------------------------


@pytest.mark.parametrize(
    ("pending", "adopt", "then"),
    [
        (Pending("sleep", "release", "intent"), ModelState.ASLEEP, ["resume", "reload_weights"]),
        (Pending("wake", "resume", "intent"), ModelState.AWAKE, ["reload_weights"]),
    ],
)
def test_8_an_intent_without_outcome_is_unknown_until_an_operator_says(pending, adopt, then):
    record = Record(
        ModelState.SLEEPING if pending.op == "sleep" else ModelState.WAKING, T, INC, pending
    )
    m = machine()
    effects = m.restore(T + 1, up(INC), record)
    assert m.state is ModelState.UNKNOWN and calls(effects) == []
    rejected = m.handle(Arrived(T + 2))
    assert isinstance(rejected[0], Reject) and rejected[0].status == 503
    assert "unknown" in rejected[0].message and "kvsleep adopt" in rejected[0].message
    assert calls(m.handle(WantWake(T + 2, "manual"))) == []
    m.handle(Adopted(T + 3, adopt))
    if adopt is ModelState.ASLEEP:
        assert m.state is ModelState.ASLEEP
        m.handle(Arrived(T + 4))
    names: list[str] = []
    effects = m.handle(RoomReady(T + 4, True))
    while True:
        names += calls(effects)
        if isinstance(m.job, Identify):
            effects = m.handle(Identified(T + 4, up(INC)))
        elif isinstance(m.job, WriteRecord):
            effects = m.handle(Recorded(T + 4, True))
        elif isinstance(m.job, Call):
            effects = m.handle(CallDone(T + 4, CallResult.OK))
        else:
            break
    assert names == then
    assert m.state is ModelState.AWAKE


def test_a_process_restarted_around_a_release_is_unknown():
    """Identified, then restarted before the call went out: the fresh process got the release,
    or the old one did and then died. Nobody can tell which holds its memory."""
    m = machine()
    sleep_until_call(m)
    m.handle(CallDone(T, CallResult.OK))
    m.handle(Identified(T, up("sglang:2")))
    assert m.state is ModelState.UNKNOWN and "changed around the release" in (m.last_error or "")


def test_8_an_intent_for_another_process_is_no_ambiguity():
    record = Record(ModelState.SLEEPING, T, INC, Pending("sleep", "release", "intent"))
    assert recover(up("sglang:2"), record, SGLANG)[0] is ModelState.AWAKE


# ---- 9. a call that timed out ------------------------------------------------------------------


def test_9_a_release_that_timed_out_is_unknown_not_failed():
    m = machine()
    effects = sleep_until_call(m)
    assert calls(effects) == ["release"]
    effects = m.handle(CallDone(T + 60, CallResult.UNKNOWN, "no answer within 60s"))
    assert m.state is ModelState.UNKNOWN
    assert Settle("sleep", False) in effects
    assert calls(m.handle(Arrived(T + 61))) == []
    assert m.handle(Arrived(T + 61))[0].reason == "wake_failed"  # type: ignore[union-attr]


def test_9_a_timed_out_wake_step_that_may_be_repeated_is_a_failure():
    m = machine(VLLM, ModelState.ASLEEP)
    m.handle(Arrived(T))
    effects = m.handle(RoomReady(T, True))
    assert calls(effects) == ["wake_up"]
    m.handle(CallDone(T, CallResult.UNKNOWN, "timeout"))
    assert m.state is ModelState.FAILED


# ---- 10. slept behind kvsleep's back with a request inside ---------------------------------------


def test_10_an_engine_found_asleep_with_a_request_inside_is_woken():
    m = machine(VLLM)
    assert m.handle(Arrived(T)) == [Admit()]
    effects = m.handle(Observed(T + 1, Observation(up=True, asleep=True)))
    assert m.state is ModelState.ASLEEP
    assert jobs(effects) == [MakeRoom("request")]


# ---- also seen ---------------------------------------------------------------------------------


def test_a_control_call_waiting_for_a_removed_model_is_settled_at_once():
    m = machine()
    m.handle(WantSleep(T, "manual"))
    effects = m.handle(Removed())
    assert Settle("sleep", False) in effects


def test_a_second_sleep_call_while_one_is_in_the_engine_joins_it():
    m = machine()
    sleep_until_call(m)
    assert calls(m.handle(WantSleep(T, "manual"))) == []  # joins: no second release
    m.handle(CallDone(T, CallResult.OK))
    assert calls(m.handle(Identified(T, up()))) == []
    effects = m.handle(Recorded(T, True))
    assert effects.count(Settle("sleep", True)) == 1  # both callers: one answer, success


def test_held_requests_are_let_through_in_one_release_when_the_wake_ends():
    m = machine(VLLM, ModelState.ASLEEP)
    assert isinstance(m.handle(Arrived(T))[0], Hold)
    assert isinstance(m.handle(Arrived(T))[0], Hold)
    m.handle(RoomReady(T, True))
    effects = m.handle(CallDone(T, CallResult.OK, took=2.0))
    assert effects.count(ReleaseHeld()) == 1
    assert m.in_engine == 2 and m.held == 0


# ---- NVML resolves `unknown` where it can tell -----------------------------------------------


@pytest.mark.parametrize(
    ("used_gb", "verdict"),
    [(0.8, ModelState.ASLEEP), (19.0, ModelState.AWAKE), (9.0, None)],
)
def test_unknown_is_resolved_by_the_gpu_memory_of_the_engines_processes(used_gb, verdict):
    record = Record(ModelState.SLEEPING, T, INC, Pending("sleep", "release", "intent"))
    m = machine()
    m.cfg = dataclasses.replace(m.cfg, memory_gb=20.0)
    m.can_measure = True
    effects = m.restore(T + 1, up(INC), record)
    assert MeasureMemory() in effects and m.state is ModelState.UNKNOWN
    m.handle(Measured(T + 2, used_gb))
    assert m.state is (verdict or ModelState.UNKNOWN)
    assert calls(m.handle(WantWake(T + 3, "manual"))) == []  # a wake goes through room first


def test_without_nvml_unknown_waits_for_an_operator():
    record = Record(ModelState.WAKING, T, INC, Pending("wake", "resume", "intent"))
    m = machine()
    effects = m.restore(T + 1, up(INC), record)
    assert not [e for e in effects if isinstance(e, MeasureMemory)]
    assert m.state is ModelState.UNKNOWN


def test_an_engine_that_reports_its_state_resolves_unknown_itself():
    m = machine(VLLM)
    m.restore(T, up(None), Record(ModelState.SLEEPING, T, None, Pending("sleep", "x", "intent")))
    assert m.state is ModelState.UNKNOWN
    m.handle(Observed(T + 1, Observation(up=True, asleep=True)))
    assert m.state is ModelState.ASLEEP


@pytest.mark.parametrize(
    ("asleep", "then"),
    [(True, MakeRoom("request")), (False, ReleaseHeld())],
    ids=["asleep", "awake"],
)
def test_3_requests_held_while_a_new_engine_is_looked_at_get_their_answer(asleep, then):
    """A model added by a reload is held (STARTING) until its first probe: what the probe
    finds lets the held requests through, at once or after a wake."""
    m = machine(VLLM)
    m.state = ModelState.STARTING
    assert isinstance(m.handle(Arrived(T))[0], Hold)
    effects = m.restore(T + 1, up(None, asleep=asleep), None)
    assert then in effects
    assert m.held == 0 and m.in_engine == 1 if not asleep else m.want_awake


def test_a_wake_is_timed_from_its_start_and_over_all_its_steps():
    m = machine(VLLM_LEVEL2, ModelState.ASLEEP)
    m.handle(Arrived(T + 100))
    m.handle(RoomReady(T + 100, True))
    assert m.state is ModelState.WAKING and m.state_since == T + 100  # the ETA counts from here
    for took in (1.0, 3.0, 0.5):
        m.handle(CallDone(T + 105, CallResult.OK, took=took))
    assert m.state is ModelState.AWAKE and list(m.wake_history) == [4.5]
