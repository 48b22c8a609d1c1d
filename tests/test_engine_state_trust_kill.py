"""Issue #13 end to end, with real `kvsleep serve` processes stopped or killed (scenarios 2, 8).

Scenario 2: kvsleep stopped with SIGTERM while the SGLang it launched is asleep, then started
again. Scenario 8: kvsleep SIGKILLed right after each kind of record it writes (the fault hook
`KVSLEEP_CRASH_AFTER_WRITE` in kvsleep/control/state_file.py), then restarted: an intent without
an outcome for the same engine process is `unknown` until an operator adopts the engine's true
state; any other record is resumed without help. The engine is a simulator process, whose
hazard counters must stay empty. The other scenarios are in tests/test_engine_state_trust.py.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from kvsleep.engines import RetryPolicy
from tests import test_kill_restart, test_launcher
from tests.test_kill_restart import Proc, get_json, ready, start_kvsleep, truth, until
from tests.test_launcher import Serve, free_port, http, sim_command, wait_for, write_config

procs = test_kill_restart.procs  # the fixture: processes killed at teardown
serve_runs = test_launcher.serve_runs

M = "org/m"
Q = "org%2Fm"


def safe(stats: dict[str, Any]) -> None:
    """The engine suffered nothing: no hazard, no inference while not awake, still alive."""
    assert stats["hazards"] == {}, stats["hazards"]
    assert stats["requests"]["served_while_not_awake"] == 0
    assert stats["exit_code"] is None


def calls(stats: dict[str, Any], route: str) -> int:
    return stats["calls"].get(route, 0)


# ---- 2. kvsleep stopped while its launched SGLang is asleep ------------------------------------


def test_2_a_launched_sglang_asleep_at_sigterm_is_fresh_and_awake_after_a_restart(
    tmp_path, serve_runs
):
    port = free_port()
    engine = f"http://127.0.0.1:{port}"
    config = write_config(
        tmp_path,
        [
            {
                "name": M,
                "engine": "sglang",
                "url": engine,
                "command": sim_command("sglang", M, port),
                "ready_timeout_seconds": 20,
                "stop_grace_seconds": 2,
            }
        ],
    )
    base = f"http://127.0.0.1:{yaml.safe_load(config.read_text())['router']['port']}"

    def state() -> str:
        return http("GET", base + "/sleep/status")[1]["models"][M]["state"]

    first = Serve(config, tmp_path)
    serve_runs.append(first)
    wait_for(lambda: state() == "awake", 30, "the launched engine to be awake")
    status, body = http("POST", f"{base}/models/{Q}/sleep")
    assert status == 200 and body["success"], body
    assert http("GET", engine + "/sim/stats")[1]["engine"]["released"]
    assert first.stop() == 0, first.text()[-3000:]

    second = Serve(config, tmp_path)
    serve_runs.append(second)
    wait_for(lambda: state() == "awake", 30, "the fresh engine to be awake")
    status, body = http(
        "POST", base + "/v1/completions", {"model": M, "prompt": "hi", "max_tokens": 2}
    )
    assert status == 200, body
    stats = http("GET", engine + "/sim/stats")[1]
    safe(stats)
    assert not stats["engine"]["released"]
    assert calls(stats, "/resume_memory_occupation") == 0  # a fresh engine is never resumed
    assert stats["requests"]["completed"] == 1
    assert second.stop() == 0, second.text()[-3000:]
    assert "Traceback" not in first.text() + second.text()


# ---- 8. SIGKILL right after each kind of record write ------------------------------------------

RELEASE, RESUME = "/release_memory_occupation", "/resume_memory_occupation"
ATTEMPTS = RetryPolicy().attempts  # of an engine call the engine answered with an error


def crash(flavor: str, written: str, believed: str, engine_calls: dict[str, int]) -> Any:
    return pytest.param(flavor, written, believed, engine_calls, id=f"{flavor}-{written}")


# (engine flavor, the record written just before the kill, what kvsleep believes after a
# restart, the sleep and wake calls the engine has received at the end). SGLang's release and
# resume are written before the call (intent) and after it; vLLM's calls may be repeated, so
# their record is written beside the call, and its engine's word decides after a restart.
SG, VL = {RELEASE: 1, RESUME: 1}, {"/sleep": 1, "/wake_up": 1}
CRASHES = [
    crash("sglang", "sleep:release:intent", "unknown", {RELEASE: 0, RESUME: 0}),
    crash("sglang", "state:asleep", "asleep", SG),
    crash("sglang", "wake:resume:intent", "unknown", SG),
    crash("sglang", "wake:reload_weights:intent", "awake", SG),
    # Written (fsynced) right after the resume, before the reload: the restart reloads only.
    crash("sglang", "wake:resume:done", "awake", SG),
    # Every attempt of the resume refused by the engine, then the next wake's.
    crash("sglang", "state:failed", "failed", {RELEASE: 1, RESUME: ATTEMPTS + 1}),
    crash("sglang", "state:awake", "awake", SG),
    crash("vllm", "sleep:sleep:intent", "asleep", VL),
    crash("vllm", "state:asleep", "asleep", VL),
    crash("vllm", "wake:wake_up:intent", "awake", VL),
    crash("vllm", "state:awake", "awake", VL),
]
# Long enough for a record written beside an idempotent call (after a 50 ms delay).
SLOW_CALL = "0.5"


def label(state_dir: Path) -> str:
    """The kind of the record on disk (StoredModel.label)."""
    rec = json.loads((state_dir / "state.json").read_text())["models"][M]
    pending = rec["pending"]
    if pending:
        return f"{pending['op']}:{pending['step']}:{pending['phase']}"
    return f"state:{rec['state']}"


async def start_sim(procs: list[Proc], tmp_path: Path, flavor: str) -> tuple[Proc, str]:
    vllm = flavor == "vllm"
    sim = Proc(
        [
            sys.executable,
            "-m",
            "kvsleep",
            "sim-engine",
            *("--flavor", flavor, "--model", M, "--port", "0", "--tokens-per-second", "0"),
            *("--sleep-latency", SLOW_CALL if vllm else "0.05"),
            *("--wake-latency", SLOW_CALL if vllm else "0.05"),
            *("--reload-latency", SLOW_CALL),
        ],
        tmp_path / "sim.log",
    )
    procs.append(sim)
    match = await until(
        lambda: re.search(r"serving .* on (http://127\.0\.0\.1:\d+)", sim.text()), 15, "the sim"
    )
    return sim, match.group(1)


async def attempt(session: aiohttp.ClientSession, method: str, url: str, **kw: Any) -> Any:
    """An HTTP call to a kvsleep that may die under it: (status, body), or None if cut."""
    try:
        async with session.request(method, url, **kw) as resp:
            return resp.status, await resp.json(content_type=None)
    except aiohttp.ClientError:
        return None


async def completion(session: aiohttp.ClientSession, url: str) -> Any:
    body = {"model": M, "prompt": "hi", "max_tokens": 2}
    return await attempt(session, "POST", url + "/v1/completions", json=body)


@pytest.mark.timeout(90)
@pytest.mark.parametrize(("flavor", "written", "believed", "engine_calls"), CRASHES)
async def test_8_sigkill_right_after_each_kind_of_record_then_restart(
    flavor, written, believed, engine_calls, procs, tmp_path, monkeypatch
):
    sim, sim_url = await start_sim(procs, tmp_path, flavor)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    state_dir = tmp_path / "state"
    config = tmp_path / "kvsleep.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "router": {"host": "127.0.0.1", "port": port},
                "sleep_manager": {
                    "check_interval_seconds": 0.2,
                    "idle_threshold_seconds": 3600,
                    "auto_sleep_enabled": False,
                    "min_awake_seconds": 0,
                    "min_sleep_duration": 0,
                    "wake_timeout_seconds": 30,
                },
                "models": [{"name": M, "engine": flavor, "url": sim_url}],
                "state_dir": str(state_dir),
                "log_dir": str(tmp_path / "logs"),
            }
        )
    )
    answers: list[Any] = []  # every answer kvsleep gave a request or control call
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        if written.startswith(("wake:", "state:awake", "state:failed")):
            # Asleep first, under a kvsleep that does not crash (its writes are not the test).
            before = start_kvsleep(procs, config)
            await ready(session, url, before)
            answers.append(await attempt(session, "POST", f"{url}/models/{Q}/sleep"))
            assert answers[-1][0] == 200, answers[-1]
            before.popen.send_signal(signal.SIGTERM)
            assert before.popen.wait(15) == 0, before.text()[-3000:]
        if written == "state:failed":
            await arm(session, sim_url, wake=100)  # SGLang refuses the resume

        monkeypatch.setenv("KVSLEEP_CRASH_AFTER_WRITE", written)
        crashing = start_kvsleep(procs, config)
        monkeypatch.delenv("KVSLEEP_CRASH_AFTER_WRITE")
        await ready(session, url, crashing)
        if written.startswith("sleep:") or written == "state:asleep":
            answers.append(await attempt(session, "POST", f"{url}/models/{Q}/sleep"))
        else:
            answers.append(await completion(session, url))
        assert crashing.popen.wait(15) == -signal.SIGKILL, crashing.text()[-3000:]
        assert label(state_dir) == written
        await arm(session, sim_url, reload=0, wake=0)
        await until(lambda: _settled(session, sim_url), 10, "the engine call to end")
        at_kill = await get_json(session, sim_url + "/sim/stats")

        after = start_kvsleep(procs, config)
        await ready(session, url, after)
        if believed == "unknown":
            status = await get_json(session, url + "/sleep/status")
            assert status["models"][M]["state"] == "unknown"
            answers.append(await completion(session, url))
            code, body = answers[-1]
            assert code == 503, body
            message = body["error"]["message"]
            assert M in message and "unknown" in message and "kvsleep adopt" in message
            await asyncio.sleep(0.6)  # three probe intervals: still no engine call
            stats = await get_json(session, sim_url + "/sim/stats")
            assert stats["calls"] == {**at_kill["calls"], **_probes(stats)}
            answers.append(
                await attempt(session, "POST", f"{url}/models/{Q}/adopt?state={truth(stats)}")
            )
            assert answers[-1][0] == 200, answers[-1]
        else:

            async def believes() -> bool:
                doc = await get_json(session, url + "/sleep/status")
                return doc["models"][M]["state"] == believed

            await until(believes, 10, f"kvsleep to believe {believed} on its own")
        answers.append(await completion(session, url))
        assert answers[-1][0] == 200, answers[-1]
        status = await get_json(session, url + "/sleep/status")
        assert status["models"][M]["state"] == "awake"
        stats = await get_json(session, sim_url + "/sim/stats")
    safe(stats)
    assert sim.popen.poll() is None, "the engine died"
    assert {route: calls(stats, route) for route in engine_calls} == engine_calls
    assert truth(stats) == "awake" and not stats["engine"].get("weights_stale")
    # Requests answered once each: a request cut by the kill got no answer, and none got two.
    assert stats["requests"]["completed"] == sum(
        1 for a in answers if a is not None and "choices" in a[1]
    )
    after.popen.send_signal(signal.SIGTERM)
    assert after.popen.wait(15) == 0, after.text()[-3000:]
    assert "Traceback" not in after.text()


async def arm(session: aiohttp.ClientSession, sim_url: str, **fail: int) -> None:
    async with session.post(sim_url + "/sim/faults", json={"fail": fail}) as resp:
        assert resp.status == 200, await resp.text()


async def _settled(session: aiohttp.ClientSession, sim_url: str) -> bool:
    """No control call is running in the engine (one cut by the kill still completes)."""
    stats = await get_json(session, sim_url + "/sim/stats")
    open_calls: dict[str, int] = {}
    for event in stats["log"]:
        if event["event"] in ("control", "control_done"):
            route = event["route"]
            open_calls[route] = open_calls.get(route, 0) + (event["event"] == "control") * 2 - 1
    return not any(open_calls.values())


PROBE_ROUTES = ("/server_info", "/get_server_info", "/get_load", "/v1/models", "/metrics")


def _probes(stats: dict[str, Any]) -> dict[str, int]:
    """Probe routes (read-only) may be called any number of times."""
    return {r: n for r, n in stats["calls"].items() if r in PROBE_ROUTES}
