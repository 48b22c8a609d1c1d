"""`kvsleep simulate --replicas N`: warm autoscaling vs cold autoscaling vs always-on.

Hand-computed traces pin the replay's arithmetic (routing, queueing, wakes, starts, drains,
memory held); the step and sine traces show what a user reads off the table.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from kvsleep.cli import main
from kvsleep.config import parse_config
from kvsleep.core.scaling import ScalingPolicy
from kvsleep.lab import autoscale, simulate, traces
from kvsleep.lab.autoscale import LabSettings, ScaleReplay
from kvsleep.lab.simulate import Request, SimModel, Trace
from tests.test_simulate import one_model as single_engine_model

T0 = 1_000_000.0


def one_model(**policy_keys: Any) -> SimModel:
    """test_simulate's model `m` (10 GB, wake 5 s, checked every 10 s), one replica's worth."""
    return single_engine_model(**policy_keys)[0]


def two_of_capacity_one(**scaling: Any) -> LabSettings:
    """Two replicas serving one request each; the scaler every 10 s, wanting one in flight per
    replica, at once (no trend, so the hand computation stays short)."""
    policy = ScalingPolicy(
        **{
            "min_awake": 1,
            "target_in_flight": 1.0,
            "scale_up_after_seconds": 0.0,
            "scale_down_after_seconds": 60.0,
            "trend_window_seconds": 0.0,
            **scaling,
        }
    )
    return LabSettings(
        replicas=2, scaling=policy, capacity=1, cold_start_seconds=50.0, check_seconds=10.0
    )


OVERLOAD = Trace.of(
    [Request(T0 + 1, "m", 100.0), Request(T0 + 2, "m", 100.0), Request(T0 + 20, "m", 10.0)],
    T0,
    T0 + 300,
)


def test_warm_step_up_wakes_a_replica_and_routes_to_it() -> None:
    """Replica 0 runs the +1 request; the +2 one queues in it (capacity 1) until +101. The +10
    pass sees 2 in flight for 1 awake: wakes replica 1 (awake at +15). The +20 request goes to
    it, the least loaded, and is served at once. Below target (1 in flight on average since the
    last pass, 2 awake) from the +120 pass (the +110 one averages 1.1: the +1 request ended at
    +101), 60 s later (+180) replica 1, the idle one, is drained and sleeps.
    Memory: replica 0 for 300 s, replica 1 from +10 to +180, at 10 GB."""
    r = ScaleReplay(OVERLOAD, one_model(), "warm", two_of_capacity_one()).run()
    assert [(t - T0, rep, what) for t, rep, what in r.events] == [
        (10, "1", "wake"),
        (15, "1", "awake"),
        (180, "1", "drain"),
        (180, "1", "asleep"),
    ]
    assert sorted(r.added) == [0.0, 0.0, 99.0]
    assert (r.requests, r.served, r.rejected, r.held, r.queued) == (3, 3, 0, 0, 1)
    assert (r.wakes, r.starts, r.downs) == (1, 0, 1)
    assert r.gb_seconds == pytest.approx(10 * 300 + 10 * 170)


def test_cold_step_up_pays_an_engine_start() -> None:
    """The same decisions, but replica 1 starts for 50 s (+10 to +60, memory held from +10):
    the +20 request finds only replica 0 awake and queues behind the +2 one (served at +201:
    181 s added). Below target on average from the +220 pass, stopped at +280."""
    r = ScaleReplay(OVERLOAD, one_model(), "cold", two_of_capacity_one()).run()
    assert [(t - T0, rep, what) for t, rep, what in r.events] == [
        (10, "1", "start"),
        (60, "1", "awake"),
        (280, "1", "drain"),
        (280, "1", "asleep"),
    ]
    assert sorted(r.added) == [0.0, 99.0, 181.0]
    assert (r.wakes, r.starts, r.downs, r.held, r.queued) == (0, 1, 1, 0, 2)
    assert r.gb_seconds == pytest.approx(10 * 300 + 10 * 270)


def test_always_on_keeps_every_replica_and_never_wakes() -> None:
    """Both awake: the +1 and +2 requests run side by side; the +20 one queues behind one of
    them until +101 or +102."""
    r = ScaleReplay(OVERLOAD, one_model(), "always-on", two_of_capacity_one()).run()
    assert r.events == []
    assert sorted(r.added)[:2] == [0.0, 0.0] and sorted(r.added)[2] in (81.0, 82.0)
    assert r.gb_seconds == pytest.approx(2 * 10 * 300)


def test_scale_to_zero_replays_like_a_single_engine() -> None:
    """min_awake 0 with one replica is today's single engine: the same sleeps, wakes, waits and
    memory as `simulate.replay` of the model (its hand-computed trace: asleep at +70, woken at
    +200 for 5 s, a request at +203 joins the wake, asleep again at +270)."""
    model = one_model()
    trace = Trace.of(
        [Request(T0 + 5, "m", 5.0), Request(T0 + 200, "m", 2.0), Request(T0 + 203, "m", 1.0)],
        T0,
        T0 + 400,
    )
    single = simulate.replay(trace, [model], simulate.as_is(), 10.0).models["m"]
    settings = LabSettings(replicas=1, scaling=ScalingPolicy(min_awake=0), check_seconds=10.0)
    r = ScaleReplay(trace, model, "warm", settings).run()
    assert r.gb_seconds == pytest.approx(single.gb_seconds) == pytest.approx(10 * 140)
    assert sorted(a for a in r.added if a) == sorted(single.waits) == [2.0, 5.0]
    assert (r.wakes, r.downs, r.held) == (single.wakes, single.sleeps, single.waited) == (1, 2, 2)
    cold = ScaleReplay(trace, model, "cold", settings).run()
    assert sorted(a for a in cold.added if a) == [87.0, 90.0]  # held for a 90 s start


def test_requests_for_a_model_with_nothing_awake_are_held_and_wake_one_replica() -> None:
    """Scaled to zero, a burst of three is held by one replica's wake (one wake, not three),
    then spread over the awake replica."""
    model = one_model()
    trace = Trace.of(
        [Request(T0 + 5, "m", 1.0)] + [Request(T0 + 300 + i, "m", 1.0) for i in range(3)],
        T0,
        T0 + 400,
    )
    settings = LabSettings(replicas=3, scaling=ScalingPolicy(min_awake=0), check_seconds=10.0)
    r = ScaleReplay(trace, model, "warm", settings).run()
    assert (r.wakes, r.held, r.served, r.rejected) == (1, 3, 4, 0)
    assert sorted(r.added)[-3:] == [3.0, 4.0, 5.0]


# ---- what a user reads off the table ---------------------------------------------------------

_RUNS: dict[str, autoscale.ScaleComparison] = {}


def lab(name: str) -> autoscale.ScaleComparison:
    if name not in _RUNS:
        trace = traces.synthetic(name)
        models, _ = simulate.sim_models(parse_config(traces.SYNTHETIC_CONFIG), trace.models)
        _RUNS[name] = autoscale.compare_scaling(trace, models, LabSettings())
    return _RUNS[name]


@pytest.mark.parametrize("name", ["step", "sine"])
def test_warm_holds_less_memory_than_always_on(name: str) -> None:
    c = lab(name)
    warm, cold, on = (c.summary(k) for k in autoscale.STRATEGIES)
    assert warm.gb_hours < 0.75 * on.gb_hours, (warm, on)
    assert on.gb_hours == pytest.approx(on.always_on_gb_hours)
    # It scales: the extra replicas are woken for the peak and slept after it.
    assert warm.wakes >= 2 and warm.downs >= 2 and warm.starts == 0
    assert cold.starts >= 2 and cold.wakes == 0


def test_on_the_step_warm_answers_far_sooner_than_cold() -> None:
    """The step to three replicas' worth overloads the one awake replica until the others
    serve: seconds with a wake, a minute and more with an engine start."""
    c = lab("step")
    warm, cold, on = (c.summary(k) for k in autoscale.STRATEGIES)
    assert warm.p99 * 4 < cold.p99, (warm.p99, cold.p99)
    assert warm.max < cold.max
    assert on.p99 == 0.0 and on.max == 0.0


@pytest.mark.parametrize("name", ["step", "sine", *traces.SYNTHETIC])
def test_every_request_is_answered_and_always_on_never_waits_for_a_wake(name: str) -> None:
    c = lab(name)
    for strategy in autoscale.STRATEGIES:
        s = c.summary(strategy)
        assert s.requests == len(c.trace.requests) > 0
        assert (s.served, s.rejected) == (s.requests, 0), strategy
    on = c.summary("always-on")
    assert (on.held, on.wakes, on.starts, on.downs) == (0, 0, 0, 0)


def test_the_replays_are_deterministic() -> None:
    trace = traces.synthetic("step")
    models, _ = simulate.sim_models(parse_config(traces.SYNTHETIC_CONFIG), trace.models)
    again = autoscale.compare_scaling(trace, models, LabSettings())
    assert again.as_dict() == lab("step").as_dict()


def test_cli_prints_a_row_per_strategy(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["simulate", "--synthetic", "step", "--replicas", "3"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("trace: synthetic step (seed 0)")
    assert "3 replicas per model" in out and "a cold start takes 90 s" in out
    header = next(line for line in out.splitlines() if line.startswith("strategy"))
    for column in ("GB-h held", "held", "p50 s", "p99 s", "wakes", "starts", "lost"):
        assert column in header
    for strategy in autoscale.STRATEGIES:
        assert sum(line.startswith(strategy + " ") for line in out.splitlines()) == 1


def test_cli_options_reach_the_replay(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["simulate", "--synthetic", "step", "--replicas", "2", "--strategies", "warm,cold"]
    args += ["--cold-start-seconds", "30", "--wake-seconds", "1", "--capacity", "20", "--json"]
    assert main(args) == 0
    doc = json.loads(capsys.readouterr().out)
    assert (doc["replicas"], doc["capacity"], doc["cold_start_seconds"]) == (2, 20, 30.0)
    model = doc["models"]["chat-8b"]
    assert model["wake_seconds"] == 1.0
    assert list(model["strategies"]) == ["warm", "cold"]
    assert model["strategies"]["warm"]["served"] == doc["trace"]["requests"]


@pytest.mark.parametrize(
    "extra",
    [
        ["--strategies", "warm,lukewarm"],
        ["--plot", "x.png"],
        ["--min-awake", "3", "--max-awake", "2"],
        ["--model", "nobody"],
    ],
)
def test_cli_refuses_what_it_cannot_compare(
    extra: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["simulate", "--synthetic", "step", "--replicas", "3", *extra]) == 2
    assert "kvsleep simulate:" in capsys.readouterr().err


def test_a_models_scaling_block_and_replicas_come_from_the_config(
    tmp_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """A model served by `replicas:` is replayed by its served name, with its replicas' memory
    and wake time and its `scaling:` block; an option given on the command line wins."""
    config = tmp_path / "kvsleep.yaml"
    config.write_text(
        """
sleep_manager: {check_interval_seconds: 10}
models:
  - name: org/chat-8B
    engine: vllm
    replicas:
      - {url: http://127.0.0.1:8001, memory_gb: 20, wake_eta_seconds: 3}
      - {url: http://127.0.0.1:8002, memory_gb: 20, wake_eta_seconds: 3}
    scaling: {min_awake: 1, target_in_flight: 4, scale_down_after_seconds: 60}
""",
        encoding="utf-8",
    )
    trace = tmp_path / "trace.csv"
    rows = [f"{T0 + i},org/chat-8B,30" for i in range(12)]
    trace.write_text("timestamp,model,duration\n" + "\n".join(rows) + "\n", encoding="utf-8")
    args = ["simulate", "--config", str(config), "--trace", str(trace), "--replicas", "2"]
    assert main([*args, "--json", "--scale-up-after-seconds", "0"]) == 0
    doc = json.loads(capsys.readouterr().out)
    model = doc["models"]["org/chat-8B"]
    assert (model["memory_gb"], model["wake_seconds"], doc["check_seconds"]) == (20, 3, 10)
    assert model["scaling"]["min_awake"] == 1
    assert model["scaling"]["target_in_flight"] == 4
    assert model["scaling"]["scale_down_after_seconds"] == 60
    assert model["scaling"]["scale_up_after_seconds"] == 0
    warm = model["strategies"]["warm"]
    assert (warm["wakes"], warm["served"], doc["notes"]) == (1, 12, [])
    assert main(args) == 0
    assert "scaling: min_awake 1, max_awake all, target_in_flight 4" in capsys.readouterr().out


def test_the_idle_threshold_replay_sees_a_model_with_replicas_as_one_engine() -> None:
    """Without --replicas, a model served by `replicas:` replays under the name clients use,
    as one engine (replica 0's memory and wake time), and says so; its engines `name@i` are no
    models of their own."""
    config = parse_config(
        {
            "models": [
                {
                    "name": "org/chat-8B",
                    "engine": "vllm",
                    "replicas": [
                        {"url": "http://127.0.0.1:8001", "memory_gb": 20, "wake_eta_seconds": 3},
                        {"url": "http://127.0.0.1:8002", "memory_gb": 24, "wake_eta_seconds": 3},
                    ],
                }
            ]
        }
    )
    trace = Trace.of([Request(T0 + 1, "org/chat-8B", 1.0)], T0, T0 + 600)
    c = simulate.simulate_config(config, trace, sweep=(60,))
    assert [(m.cfg.name, m.memory_gb, m.wake_seconds) for m in c.models] == [("org/chat-8B", 20, 3)]
    assert c.notes == [
        "org/chat-8B: its replicas differ in memory_gb or wake_eta_seconds; replica 0's are used",
        "org/chat-8B: served by 2 replicas; replayed as one engine (kvsleep simulate --replicas "
        "2 compares scaling them)",
    ]
    models, scaling, notes = autoscale.lab_models(config, ["org/chat-8B"])
    assert [m.memory_gb for m in models] == [20] and scaling == {"org/chat-8B": ScalingPolicy()}
    assert notes == [c.notes[0]]
