"""Issue #13 end to end: each scenario over HTTP against simulated engines with hazard counters.

The same scenarios are played event by event through the pure machine in tests/test_machine.py;
here kvsleep runs for real on 127.0.0.1 (tests/kvsleep_harness.py) in front of simulated engines,
in-process or as processes (SIGSTOP, a process killed and replaced). The scenarios that need a
real `kvsleep serve` killed or stopped are in tests/test_engine_state_trust_kill.py. Every test
ends with the engine unharmed (no hazard, no inference on an engine that was not awake, still
running) and every request it sent answered once, with the status the issue expects.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import socket
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests import test_sleep_manager
from tests.conftest import sim_process
from tests.kvsleep_harness import FAST_RETRY, config_doc, sim_model, start_kvsleep

restartable = test_sleep_manager.restartable  # the fixture: engines stopped and started again

M = "org/m"
Q = "org%2Fm"
SLOW = {"tokens_per_second": 20.0}  # 40 tokens take about 2 s: a request that stays inside
LONG = {"max_tokens": 40, "ignore_eos": True}
TIMEOUT = aiohttp.ClientTimeout(total=30)


def safe(stats: dict[str, Any], release: int | None = None, resume: int | None = None) -> None:
    """The engine suffered nothing: no hazard, no inference while not awake, still alive; and
    it got exactly `release` releases and `resume` resumes, where given."""
    assert stats["hazards"] == {}, stats["hazards"]
    assert stats["requests"]["served_while_not_awake"] == 0
    assert stats["exit_code"] is None, "the engine died"
    if release is not None:
        assert calls(stats, "/release_memory_occupation") == release
    if resume is not None:
        assert calls(stats, "/resume_memory_occupation") == resume


def calls(stats: dict[str, Any], route: str) -> int:
    return stats["calls"].get(route, 0)


async def sim_stats(session: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    async with session.get(url + "/sim/stats") as resp:
        assert resp.status == 200
        return await resp.json()


async def complete(
    session: aiohttp.ClientSession, url: str, model: str = M, **extra: Any
) -> tuple[int, Any]:
    body = {"model": model, "prompt": "hi", "max_tokens": 2, **extra}
    async with session.post(url + "/v1/completions", json=body) as resp:
        return resp.status, await resp.json(content_type=None)


async def control(session: aiohttp.ClientSession, url: str, path: str) -> tuple[int, Any]:
    async with session.post(url + path) as resp:
        return resp.status, await resp.json(content_type=None)


async def sleep_model(session: aiohttp.ClientSession, kv: Any) -> None:
    status, body = await control(session, kv.url, f"/models/{Q}/sleep")
    assert status == 200 and body["success"], body
    assert kv.state(M) == "asleep"


async def until(predicate: Any, what: str, timeout: float = 10.0) -> None:
    """Poll a condition (a bound on the test's patience, not a latency assertion)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


def released_answered(stats: dict[str, Any]) -> bool:
    events = [e["event"] for e in stats["log"] if e.get("route") == "/release_memory_occupation"]
    return events[-1:] == ["control_done"]


async def scrape(session: aiohttp.ClientSession, kv: Any, name: str) -> float:
    """An unlabelled sample from kvsleep's /metrics, as Prometheus reads it."""
    async with session.get(kv.url + "/metrics") as resp:
        text = await resp.text()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                return sample.value
    raise AssertionError(f"{name} is not exported")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- 1. a client that left while its request still runs in the engine -----------------------


async def test_1_sleep_waits_for_the_engine_to_finish_a_request_whose_client_left(
    sim_factory, kvsleep_factory
):
    sim = await sim_factory("sglang", M, **SLOW)
    kv = await kvsleep_factory([sim_model(sim)], drain_timeout_seconds=20)
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
        left = asyncio.create_task(complete(session, kv.url, **LONG))
        await until(lambda: sim.sim.in_flight == 1, "the request to run in the engine")
        left.cancel()  # the client closes its connection
        with pytest.raises(asyncio.CancelledError):
            await left
        # kvsleep's side of it ends; the engine still generates for the client that left.
        await until(lambda: kv.manager.slots[M].machine.in_engine == 0, "kvsleep to let it go")
        assert sim.sim.in_flight == 1
        status, body = await control(session, kv.url, f"/models/{Q}/sleep")
        assert status == 200 and body["success"], body
        stats = sim.sim.stats()
        safe(stats)  # a release on a busy SGLang is the `release_while_busy` hazard
        assert stats["requests"]["in_flight"] == 0
        assert stats["requests"]["completed"] + stats["requests"]["aborted"] == 1
        assert calls(stats, "/release_memory_occupation") == 1
        assert sim.sim.stats()["engine"]["released"]


# ---- 3. hot reload: an engine's state follows the engine -------------------------------------


async def start_with_file(tmp_path: Path, models: list[dict[str, Any]], **policy: Any) -> Any:
    doc = config_doc(models, tmp_path / "state", **policy)
    path = tmp_path / "kvsleep.yaml"
    path.write_text(yaml.safe_dump(doc))
    return await start_kvsleep(doc, config_path=str(path)), doc, path


async def reload(
    session: aiohttp.ClientSession, kv: Any, doc: dict[str, Any], path: Path, models: list[Any]
) -> None:
    path.write_text(yaml.safe_dump({**doc, "models": models}))
    async with session.post(kv.url + "/-/reload") as resp:
        assert resp.status == 200, await resp.text()


async def test_3_a_sleeping_model_removed_and_added_back_stays_asleep(sim_factory, tmp_path):
    sim = await sim_factory("sglang", M)
    other = await sim_factory("vllm", "org/other")
    kv, doc, path = await start_with_file(tmp_path, [sim_model(sim), sim_model(other)])
    try:
        async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
            await sleep_model(session, kv)
            await reload(session, kv, doc, path, [sim_model(other)])
            assert M not in kv.manager.slots
            await reload(session, kv, doc, path, [sim_model(sim), sim_model(other)])
            await until(lambda: kv.state(M) == "asleep", "the model to be known asleep again")
            status, body = await complete(session, kv.url)
            assert status == 200, body
    finally:
        await kv.close()
    stats = sim.sim.stats()
    safe(stats)
    assert calls(stats, "/resume_memory_occupation") == 1


@pytest.mark.parametrize("asleep", [True, False], ids=["asleep", "awake"])
async def test_3_a_vllm_added_by_reload_gets_no_request_before_a_wake(
    asleep, sim_factory, tmp_path
):
    """The request sent right after the reload is held while the new engine is looked at, then
    let through: after a wake if the engine was asleep, at once if it was awake."""
    sim = await sim_factory("vllm", M)
    other = await sim_factory("vllm", "org/other")
    kv, doc, path = await start_with_file(tmp_path, [sim_model(other)])
    try:
        async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
            if asleep:
                async with session.post(sim.url + "/sleep?level=1") as resp:
                    assert resp.status == 200
            await reload(session, kv, doc, path, [sim_model(sim), sim_model(other)])
            status, body = await complete(session, kv.url)
            assert status == 200, body
    finally:
        await kv.close()
    stats = sim.sim.stats()
    safe(stats)
    assert calls(stats, "/wake_up") == (1 if asleep else 0)
    assert stats["requests"]["completed"] == 1


async def test_3_a_model_pointed_at_another_awake_engine_is_awake_and_not_resumed(
    sim_factory, tmp_path
):
    first = await sim_factory("sglang", M)
    second = await sim_factory("sglang", M)
    kv, doc, path = await start_with_file(tmp_path, [sim_model(first)])
    try:
        async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
            await sleep_model(session, kv)
            await reload(session, kv, doc, path, [sim_model(second)])
            await until(lambda: kv.state(M) == "awake", "the other engine to be looked at")
            status, body = await complete(session, kv.url)
            assert status == 200, body
    finally:
        await kv.close()
    stats = second.sim.stats()
    safe(stats)
    assert calls(stats, "/resume_memory_occupation") == 0
    assert stats["requests"]["completed"] == 1
    safe(first.sim.stats())
    assert first.sim.stats()["engine"]["released"]  # left as it was: asleep, not resumed


# ---- 4. a state file that cannot be written ------------------------------------------------------


async def test_4_an_unwritable_state_file_refuses_the_sleep_and_a_restart_is_right(
    sim_factory, tmp_path
):
    """Tests run as root, so permissions stop nothing: a directory where the state file goes
    makes every write fail (the rename onto it), as a full or read-only disk would."""
    sim = await sim_factory("sglang", M)
    doc = config_doc([sim_model(sim)], tmp_path / "state")
    kv = await start_kvsleep(doc)
    state_file = tmp_path / "state" / "state.json"
    try:
        state_file.unlink()
        state_file.mkdir()
        async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
            status, body = await control(session, kv.url, f"/models/{Q}/sleep")
            assert status == 400 and not body["success"], body
            assert "cannot be written" in body["message"]
            assert await scrape(session, kv, "kvsleep_state_write_errors_total") > 0
            assert calls(sim.sim.stats(), "/release_memory_occupation") == 0
            assert kv.state(M) == "awake"
    finally:
        await kv.close()
    kv = await start_kvsleep(doc)  # the unreadable file: probes decide
    try:
        assert kv.state(M) == "awake"
        async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
            status, body = await complete(session, kv.url)
            assert status == 200, body
    finally:
        await kv.close()
    stats = sim.sim.stats()
    safe(stats)
    assert not stats["engine"]["released"]
    assert calls(stats, "/release_memory_occupation") == 0


# ---- 5. interrupted and failed wakes -------------------------------------------------------------


async def test_5a_a_wake_whose_reload_failed_then_a_restart_reloads_only(sim_factory, tmp_path):
    sim = await sim_factory("sglang", M)
    doc = config_doc([sim_model(sim)], tmp_path / "state")
    kv = await start_kvsleep(doc)
    try:
        async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
            await sleep_model(session, kv)
            # Every attempt of the (idempotent, retried) weight reload fails.
            fails = {"fail": {"reload": FAST_RETRY.attempts}}
            async with session.post(sim.url + "/sim/faults", json=fails) as r:
                assert r.status == 200
            status, body = await complete(session, kv.url)
            assert status == 503, body
            assert kv.state(M) == "failed"
    finally:
        await kv.close()
    kv = await start_kvsleep(doc)
    try:
        assert kv.state(M) == "failed"
        async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
            status, body = await complete(session, kv.url)
            assert status == 200, body
        assert kv.state(M) == "awake"
    finally:
        await kv.close()
    stats = sim.sim.stats()
    safe(stats)
    assert calls(stats, "/resume_memory_occupation") == 1
    # The failed attempts, then the reload of the next wake.
    assert calls(stats, "/update_weights_from_disk") == FAST_RETRY.attempts + 1
    assert stats["requests"]["completed"] == 1


async def test_5b_a_resume_refused_by_a_dead_engine_is_not_sent_to_its_fresh_successor(
    restartable, tmp_path
):
    sim = await restartable("sglang", M)
    doc = config_doc([sim.entry()], tmp_path / "state")
    kv = await start_kvsleep(doc)
    try:
        async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
            await sleep_model(session, kv)
            await sim.stop()
            status, body = await complete(session, kv.url)
            assert status == 503, body
            assert kv.state(M) == "failed"
    finally:
        await kv.close()
    released = sim.sim.stats()
    await sim.start()  # a fresh process on the same port: awake, holding its memory
    kv = await start_kvsleep(doc)
    try:
        assert kv.state(M) == "awake"
        async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
            status, body = await complete(session, kv.url)
            assert status == 200, body
    finally:
        await kv.close()
    assert calls(released, "/resume_memory_occupation") == 0
    stats = sim.sim.stats()
    safe(stats)
    assert calls(stats, "/resume_memory_occupation") == 0
    assert stats["requests"]["completed"] == 1


# ---- 6 and 7. the same process paused, a fresh process in its place ------------------------------

QUICK_PROBES = dataclasses.replace(FAST_RETRY, probe_timeout_seconds=0.3)


async def test_6_a_released_sglang_paused_then_continued_is_still_asleep(tmp_path):
    async with sim_process("sglang", M, "--tokens-per-second", "0") as proc:
        doc = config_doc([{"name": M, "engine": "sglang", "url": proc.url}], tmp_path / "state")
        kv = await start_kvsleep(doc, retry=QUICK_PROBES)
        try:
            async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
                await sleep_model(session, kv)
                incarnation = kv.manager.slots[M].machine.incarnation
                assert incarnation is not None
                os.kill(proc.proc.pid, signal.SIGSTOP)
                try:
                    for _ in range(3):  # three probe intervals without an answer
                        await kv.reconcile()
                    assert kv.manager.reported_state(kv.manager.slots[M]).value == "down"
                finally:
                    os.kill(proc.proc.pid, signal.SIGCONT)
                await kv.reconcile()
                assert kv.state(M) == "asleep"
                assert kv.manager.slots[M].machine.incarnation == incarnation
                status, body = await complete(session, kv.url)
                assert status == 200, body
                stats = await sim_stats(session, proc.url)
        finally:
            await kv.close()
    safe(stats)
    assert calls(stats, "/resume_memory_occupation") == 1
    assert calls(stats, "/release_memory_occupation") == 1
    assert stats["requests"]["completed"] == 1


async def test_7_an_sglang_killed_and_replaced_between_two_probes_is_awake_and_not_resumed(
    tmp_path,
):
    port = free_port()
    args = ("--tokens-per-second", "0", "--port", str(port))
    doc = config_doc(
        [{"name": M, "engine": "sglang", "url": f"http://127.0.0.1:{port}"}], tmp_path / "state"
    )
    async with sim_process("sglang", M, *args) as first:
        kv = await start_kvsleep(doc)
        async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
            await sleep_model(session, kv)
        first.proc.kill()
        await first.wait_exit()
    try:
        async with sim_process("sglang", M, *args) as second:
            await kv.reconcile()  # the next probe finds another process
            assert kv.state(M) == "awake"
            async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
                status, body = await complete(session, kv.url)
                assert status == 200, body
                stats = await sim_stats(session, second.url)
            assert second.proc.returncode is None
    finally:
        await kv.close()
    safe(stats)
    assert calls(stats, "/resume_memory_occupation") == 0
    assert calls(stats, "/release_memory_occupation") == 0
    assert stats["requests"]["completed"] == 1


# ---- 9. a release slower than the call timeout ---------------------------------------------------


async def test_9_a_release_that_outlasts_its_timeout_is_unknown_and_not_repeated(
    sim_factory, tmp_path
):
    sim = await sim_factory("sglang", M, sleep_latency=1.0)
    retry = dataclasses.replace(FAST_RETRY, sleep_timeout_seconds=0.3)
    kv = await start_kvsleep(config_doc([sim_model(sim)], tmp_path / "state"), retry=retry)
    try:
        async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
            status, body = await control(session, kv.url, f"/models/{Q}/sleep")
            assert status == 400 and not body["success"], body
            assert kv.state(M) == "unknown"
            status, body = await complete(session, kv.url)
            assert status == 503, body
            message = body["error"]["message"]
            assert M in message and "unknown" in message
            # The release completes in the engine; kvsleep made no second call.
            await until(lambda: released_answered(sim.sim.stats()), "the release to be answered")
            assert calls(sim.sim.stats(), "/release_memory_occupation") == 1
            status, body = await control(session, kv.url, f"/models/{Q}/adopt?state=asleep")
            assert status == 200, body
            status, body = await complete(session, kv.url)
            assert status == 200, body
    finally:
        await kv.close()
    stats = sim.sim.stats()
    safe(stats, release=1, resume=1)
    assert stats["requests"]["completed"] == 1


# ---- 10. slept behind kvsleep's back with a request inside ---------------------------------------


async def test_10_an_engine_slept_behind_kvsleeps_back_with_a_request_inside_is_woken(
    sim_factory, kvsleep_factory
):
    sim = await sim_factory("vllm", M, **SLOW)
    kv = await kvsleep_factory([sim_model(sim)])
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
        inside = asyncio.create_task(complete(session, kv.url, **LONG))
        await until(lambda: sim.sim.in_flight == 1, "the request to run in the engine")
        async with session.post(sim.url + "/sleep?level=1&mode=keep") as resp:
            assert resp.status == 200  # an operator's direct call: the request is frozen
        await kv.reconcile()  # kvsleep's next probe sees it asleep with a request inside
        status, body = await asyncio.wait_for(inside, 20)
        assert status == 200, body
        assert body["choices"][0]["finish_reason"] == "length"
    stats = sim.sim.stats()
    safe(stats)
    assert calls(stats, "/wake_up") == 1
    assert stats["requests"]["completed"] == 1 and stats["requests"]["aborted"] == 0
    assert kv.state(M) == "awake"


# ---- also seen -------------------------------------------------------------------------------


async def test_a_sleep_call_waiting_when_a_reload_removes_the_model_is_answered_409(
    sim_factory, tmp_path
):
    sim = await sim_factory("sglang", M, **SLOW)
    other = await sim_factory("vllm", "org/other")
    kv, doc, path = await start_with_file(
        tmp_path, [sim_model(sim), sim_model(other)], drain_timeout_seconds=20
    )
    try:
        async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
            inside = asyncio.create_task(complete(session, kv.url, **LONG))
            await until(lambda: sim.sim.in_flight == 1, "the request to run in the engine")
            sleeping = asyncio.create_task(control(session, kv.url, f"/models/{Q}/sleep"))
            await until(lambda: kv.state(M) == "draining", "the sleep to wait for the drain")
            await reload(session, kv, doc, path, [sim_model(other)])
            status, body = await asyncio.wait_for(sleeping, 5)
            assert status == 409 and not body["success"], body
            assert "removed" in body["message"]
            status, body = await inside
            assert status == 200, body
    finally:
        await kv.close()
    stats = sim.sim.stats()
    safe(stats)
    assert calls(stats, "/release_memory_occupation") == 0
    assert stats["requests"]["completed"] == 1


async def test_a_second_sleep_call_joins_the_one_in_the_engine(sim_factory, kvsleep_factory):
    sim = await sim_factory("sglang", M, sleep_latency=0.5)
    kv = await kvsleep_factory([sim_model(sim)])
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
        first = asyncio.create_task(control(session, kv.url, f"/models/{Q}/sleep"))
        await until(
            lambda: calls(sim.sim.stats(), "/release_memory_occupation") == 1,
            "the release to reach the engine",
        )
        second = await control(session, kv.url, f"/models/{Q}/sleep")
        for status, body in (await first, second):
            assert status == 200 and body["success"], body
    stats = sim.sim.stats()
    safe(stats)
    assert calls(stats, "/release_memory_occupation") == 1
    assert kv.state(M) == "asleep"


async def test_a_state_file_of_nested_brackets_does_not_stop_kvsleep(sim_factory, tmp_path, caplog):
    sim = await sim_factory("sglang", M)
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    (state_dir / "state.json").write_text("[" * 100000)
    kv = await start_kvsleep(config_doc([sim_model(sim)], state_dir))
    try:
        assert "unreadable" in caplog.text
        assert kv.state(M) == "awake"  # the probe decides: an SGLang holds its memory
        async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
            status, body = await complete(session, kv.url)
            assert status == 200, body
        assert json.loads((state_dir / "state.json").read_text())["models"][M]["state"] == "awake"
    finally:
        await kv.close()
    safe(sim.sim.stats())
