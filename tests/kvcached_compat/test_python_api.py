"""kvcached's Python API (`controller.sleep_manager`, `controller.traffic_monitor`) as offered by
`kvsleep.sleep_manager` and `kvsleep.traffic_monitor`: names, signatures, defaults and return
values, carried out by kvsleep's own machinery against simulated engines.

The expected signatures are kvcached's documented API (its README and the controller source).
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import socket
from collections import defaultdict
from typing import Any

import pytest
import yarl

from kvsleep.config import SleepPolicy, parse_config
from kvsleep.sleep_manager import SleepConfig, SleepManager
from kvsleep.traffic_monitor import ModelActivityStats, RequestStats, TrafficMonitor
from tests.kvsleep_harness import FakeClock

V = "meta-llama/Llama-3.2-1B"
S = "Qwen/Qwen3-0.6B"
EMPTY = inspect.Parameter.empty

# method -> [(parameter, default)], self left out; EMPTY = required.
SLEEP_MANAGER_API: dict[str, list[tuple[str, Any]]] = {
    "start": [],
    "stop": [],
    "put_model_to_sleep": [("model_name", EMPTY), ("manual", False)],
    "wakeup_model": [("model_name", EMPTY)],
    "is_model_sleeping": [("model_name", EMPTY)],
    "get_sleeping_models": [],
    "get_sleep_candidates": [],
    "handle_model_wakeup_on_request": [("model_name", EMPTY)],
    "update_config": [("kwargs", EMPTY)],
    "check_model_sleep_status": [("model_name", EMPTY)],
    "add_vllm_model": [("model_name", EMPTY), ("host", "localhost"), ("port", "8000")],
    "remove_vllm_model": [("model_name", EMPTY)],
    "get_vllm_models": [],
    "add_sglang_model": [("model_name", EMPTY), ("host", "localhost"), ("port", "8000")],
    "remove_sglang_model": [("model_name", EMPTY)],
    "get_sglang_models": [],
    "_call_vllm_sleep_api": [("host", EMPTY), ("port", EMPTY), ("level", 1)],
    "_call_vllm_wakeup_api": [("host", EMPTY), ("port", EMPTY)],
    "_call_sglang_release_api": [("host", EMPTY), ("port", EMPTY)],
    "_call_sglang_resume_api": [("host", EMPTY), ("port", EMPTY)],
}
TRAFFIC_MONITOR_API: dict[str, list[tuple[str, Any]]] = {
    "start": [],
    "stop": [],
    "record_request_start": [("model_name", EMPTY), ("endpoint_path", EMPTY)],
    "record_request_end": [
        ("request_stats", EMPTY),
        ("success", True),
        ("response_time", None),
        ("error_message", None),
    ],
    "get_model_stats": [("model_name", EMPTY)],
    "get_all_model_stats": [],
    "get_idle_models": [("idle_threshold_seconds", None)],
    "get_active_models": [("idle_threshold_seconds", None)],
    "get_traffic_summary": [("window_seconds", 60)],
}
MODEL_STATS_API: dict[str, list[tuple[str, Any]]] = {
    "add_request": [("request_stats", EMPTY)],
    "get_request_rate": [("window_seconds", 60)],
    "get_idle_time": [],
    "is_idle": [("idle_threshold_seconds", 300)],
}


def leading(func: Any, count: int) -> list[tuple[str, Any]]:
    """The first `count` parameters (kvsleep may add keyword parameters after them)."""
    params = [p for p in inspect.signature(func).parameters.values() if p.name != "self"]
    return [(p.name, p.default) for p in params[:count]]


@pytest.mark.parametrize(
    "cls, api",
    [
        (SleepManager, SLEEP_MANAGER_API),
        (TrafficMonitor, TRAFFIC_MONITOR_API),
        (ModelActivityStats, MODEL_STATS_API),
    ],
)
def test_every_kvcached_method_with_its_signature(cls, api):
    for name, expected in api.items():
        method = getattr(cls, name)
        assert leading(method, len(expected)) == expected, name
        assert inspect.iscoroutinefunction(method) == (
            name
            in (
                "start",
                "stop",
                "put_model_to_sleep",
                "wakeup_model",
                "handle_model_wakeup_on_request",
                "check_model_sleep_status",
            )
            or name.startswith("_call_")
        ), name
    assert inspect.iscoroutinefunction(TrafficMonitor._periodic_cleanup)
    assert leading(TrafficMonitor.__init__, 1) == [("idle_threshold_seconds", 300)]
    assert leading(SleepManager.__init__, 2) == [("config", None), ("traffic_monitor", None)]


def test_sleep_config_has_kvcached_class_defaults_and_is_mutable():
    config = SleepConfig()
    assert (
        config.idle_threshold_seconds,
        config.check_interval_seconds,
        config.auto_sleep_enabled,
        config.wakeup_on_request,
        config.min_sleep_duration,
        config.vllm_models_config,
        config.sglang_models_config,
    ) == (300, 60, False, True, 60, {}, {})
    positional = SleepConfig(120, 30, True, False, 10)
    assert (positional.idle_threshold_seconds, positional.min_sleep_duration) == (120, 10)
    config.min_sleep_duration = 5
    assert config.min_sleep_duration == 5
    assert SleepConfig(vllm_models_config=None).vllm_models_config == {}
    # Every kvsleep policy key is there, with the config file's default.
    for key in (f.name for f in dataclasses.fields(SleepPolicy)):
        if key not in (
            "idle_threshold_seconds",
            "check_interval_seconds",
            "auto_sleep_enabled",
            "wakeup_on_request",
            "min_sleep_duration",
        ):
            assert getattr(SleepConfig(), key) == getattr(SleepPolicy(), key), key


def test_config_files_keep_the_seed_defaults():
    """The seed README documents min_sleep_duration 80 for the config file; only the Python
    class default follows kvcached's class (60)."""
    doc = {"instances": [{"model": V, "engine": "vllm", "engine_args": ["--port=12346"]}]}
    config = parse_config(doc)
    assert config.sleep_manager.min_sleep_duration == 80
    assert SleepManager(config.sleep_manager).config.min_sleep_duration == 80


def test_model_activity_stats_as_kvcached_builds_and_feeds_them():
    clock = FakeClock()
    stats = ModelActivityStats()
    assert (
        stats.total_requests,
        stats.successful_requests,
        stats.failed_requests,
        stats.last_activity_time,
        stats.avg_response_time,
    ) == (0, 0, 0, 0.0, 0.0)
    assert ModelActivityStats(3, 2, 1).failed_requests == 1
    stats = ModelActivityStats(clock=clock)
    stats.add_request(RequestStats(clock.now - 2, V, "/v1/completions", response_time=1.0))
    stats.add_request(RequestStats(clock.now - 1, V, "/v1/completions", response_time=3.0))
    stats.add_request(RequestStats(clock.now, V, "/v1/completions", success=False))
    assert (stats.total_requests, stats.successful_requests, stats.failed_requests) == (3, 2, 1)
    assert stats.avg_response_time == 2.0
    assert stats.last_activity_time == clock.now
    assert stats.get_request_rate(60) == 3 / 60
    clock.advance(10)
    assert stats.get_idle_time() == 10 and stats.is_idle(5) and not stats.is_idle()
    # A past request fed late counts in the windows it falls in; activity does not go back.
    stats.add_request(RequestStats(clock.now - 100, V, "/v1/completions", response_time=2.0))
    assert stats.get_request_rate(60) == 3 / 60 and stats.get_request_rate(200) == 4 / 200
    assert stats.last_activity_time == clock.now - 10


async def test_traffic_monitor_lists_only_models_that_saw_traffic():
    clock = FakeClock()
    monitor = TrafficMonitor(clock=clock)
    assert isinstance(monitor.model_stats, defaultdict)
    monitor.add_model(S)  # what kvsleep does for each configured model
    assert monitor.get_model_stats(S) is None
    assert monitor.get_traffic_summary() == {} and monitor.get_all_model_stats() == {}
    assert monitor.get_active_models() == []
    request = monitor.record_request_start(V, "/v1/completions")
    clock.advance(1)
    monitor.record_request_end(request, success=True)
    assert list(monitor.get_traffic_summary()) == [V]
    assert monitor.get_active_models() == [V]
    assert isinstance(monitor.get_model_stats(V), ModelActivityStats)
    assert set(monitor.get_all_model_stats()) == {V}
    clock.advance(400)
    assert set(monitor.get_idle_models()) == {V, S}  # kvsleep sleeps unused models too


async def test_periodic_cleanup_prunes_stale_history():
    clock = FakeClock()
    monitor = TrafficMonitor(clock=clock)
    monitor.record_request_end(monitor.record_request_start(V, "/v1/completions"))
    assert monitor.model_stats[V].get_request_rate(60) > 0
    await monitor.start()
    assert monitor._cleanup_task is not None and not monitor._cleanup_task.done()
    await monitor.stop()
    assert monitor._cleanup_task is None
    clock.advance(7200)
    monitor._running = True
    task = asyncio.create_task(monitor._periodic_cleanup(0.001))
    for _ in range(200):
        if not monitor.model_stats[V]._buckets:
            break
        await asyncio.sleep(0.005)
    monitor._running = False
    await asyncio.wait_for(task, 1)
    assert not monitor.model_stats[V]._buckets
    assert monitor.model_stats[V].get_request_rate(7200 * 2) == 0


def closed_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


@pytest.fixture
async def engines(sim_factory):
    vllm = await sim_factory("vllm", V)
    sglang = await sim_factory("sglang", S)
    return vllm, sglang


def where(sim: Any) -> tuple[str, str]:
    url = yarl.URL(sim.url)
    return str(url.host), str(url.port)


async def test_sleep_manager_model_registry(engines):
    vllm, sglang = engines
    vhost, vport = where(vllm)
    # kvcached's frontend hands its engines over in SleepConfig.
    manager = SleepManager(
        SleepConfig(vllm_models_config={V: {"host": vhost, "port": vport}}),
        traffic_monitor=TrafficMonitor(),
    )
    try:
        assert manager.get_vllm_models() == {V: {"host": vhost, "port": vport}}
        assert manager.add_sglang_model(S, *where(sglang)) is None
        assert manager.get_sglang_models() == {
            S: dict(zip(("host", "port"), where(sglang), strict=True))
        }
        assert S in manager.config.sglang_models_config
        manager.add_sglang_model("x/y", "localhost", "30001")
        manager.remove_sglang_model("x/y")
        manager.remove_vllm_model("not/there")  # a warning, as kvcached
        assert "x/y" not in manager.get_sglang_models() and "x/y" not in manager.slots
        copy = manager.get_vllm_models()
        copy.clear()
        assert manager.get_vllm_models()  # a copy, as kvcached
        assert await manager.put_model_to_sleep(V) is True  # the SleepConfig's engine is managed
        assert vllm.sim.stats()["state"] == "asleep"
    finally:
        await manager.stop()


async def test_sleep_manager_return_values(engines):
    vllm, sglang = engines
    clock = FakeClock()
    manager = SleepManager(SleepConfig(), traffic_monitor=TrafficMonitor(clock=clock), clock=clock)
    manager.add_vllm_model(V, *where(vllm))
    manager.add_sglang_model(S, *where(sglang))
    try:
        assert await manager.check_model_sleep_status(V) is False
        assert await manager.check_model_sleep_status(S) is None  # SGLang cannot say
        assert await manager.check_model_sleep_status("no/such") is None
        assert await manager.wakeup_model(V) is False  # not asleep
        assert await manager.handle_model_wakeup_on_request(V) is True  # already awake

        assert await manager.put_model_to_sleep(V, manual=True) is True
        assert await manager.put_model_to_sleep(S) is True
        assert await manager.put_model_to_sleep(V) is False  # already asleep
        assert manager.sleeping_models == {V: clock.now, S: clock.now}
        assert manager.manual_sleep_models == {V}
        assert await manager.check_model_sleep_status(V) is True
        assert await manager.check_model_sleep_status(S) is None

        clock.advance(59)  # SleepConfig's min_sleep_duration: 60
        assert await manager.wakeup_model(V) is False
        assert vllm.sim.stats()["state"] == "asleep"
        # A request does not wait for min_sleep_duration.
        assert await manager.handle_model_wakeup_on_request(S) is True
        assert sglang.sim.stats()["state"] == "awake"
        clock.advance(1)
        assert await manager.wakeup_model(V) is True
        assert manager.sleeping_models == {} and manager.manual_sleep_models == set()

        # Assigning a field applies it to the manager's models, as update_config does.
        manager.config.min_sleep_duration = 0
        assert await manager.put_model_to_sleep(V) is True
        assert await manager.wakeup_model(V) is True
        manager.update_config(wakeup_on_request=False)
        assert await manager.put_model_to_sleep(V) is True
        assert await manager.handle_model_wakeup_on_request(V) is False
        assert manager.is_model_sleeping(V)

        # A model without an engine: kvsleep answers False (see docs/kvcached.md).
        assert await manager.put_model_to_sleep("no/such") is False
        assert await manager.wakeup_model("no/such") is False
    finally:
        await manager.stop()


async def test_direct_engine_calls(engines):
    vllm, sglang = engines
    manager = SleepManager()
    try:
        assert await manager._call_vllm_sleep_api(*where(vllm), level=1) is True
        assert vllm.sim.stats()["state"] == "asleep"
        assert await manager._call_vllm_wakeup_api(*where(vllm)) is True
        assert await manager._call_sglang_release_api(*where(sglang)) is True
        assert sglang.sim.stats()["state"] == "released"
        assert await manager._call_sglang_resume_api(*where(sglang)) is True
        assert manager.slots == {}  # direct calls change no model's state
        manager.retry = manager.retry.__class__(
            attempts=1, initial_wait_seconds=0.001, max_wait_seconds=0.001
        )
        assert await manager._call_vllm_sleep_api("127.0.0.1", closed_port()) is False
    finally:
        await manager.stop()
