"""The state file: what no engine reveals (SGLang's released memory) survives kvsleep restarts;
a corrupt or unreadable file is logged and the probes decide; writes are atomic."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from pathlib import Path

import aiohttp
import pytest

from kvsleep.control import state_file as sleep_state
from kvsleep.control.state_file import StateStore, StoredModel
from kvsleep.core.states import ModelState
from tests.kvsleep_harness import FakeClock, config_doc, sim_model, start_kvsleep
from tests.test_sleep_manager import S, V, calls, clean, complete, settle

URL = "http://127.0.0.1:30000"


def record(
    state: ModelState, since: float = 1000.0, engine: str = "sglang", url: str = URL
) -> StoredModel:
    return StoredModel(state, since, engine, url)


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name != "state.json")


# ---- StateStore -------------------------------------------------------------------------------


def test_save_then_load_round_trips(tmp_path):
    store = StateStore(tmp_path / "state")  # created on first save
    models = {
        "b/two": record(ModelState.ASLEEP, 12.5),
        "a/one": record(ModelState.AWAKE, 3.0, "vllm", "http://127.0.0.1:8000"),
    }
    store.save(models)
    assert store.load() == models
    doc = json.loads(store.path.read_text())
    assert doc["version"] == 2  # 2: records name the engine process and the call in progress
    assert list(doc["models"]) == ["a/one", "b/two"]
    assert doc["models"]["b/two"] == {
        "state": "asleep",
        "since": 12.5,
        "engine": "sglang",
        "url": URL,
        "incarnation": None,
        "pending": None,
    }
    assert leftovers(store.path.parent) == []


def test_a_missing_file_is_no_record_and_no_warning(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        assert StateStore(tmp_path / "nowhere").load() == {}
    assert caplog.records == []


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b'{"version": 1, "models": {"m": {"state": "asleep"',  # cut short
        b"not json at all",
        b"\xff\xfe\x00garbage",
        b"[]",
        b"null",
        b'{"version": 1}',
        b'{"version": 1, "models": []}',
        b'{"version": 1, "models": {"m": "asleep"}}',
        b'{"version": 1, "models": {"m": {"state": "dozing", "since": 1, '
        b'"engine": "sglang", "url": "u"}}}',
        b'{"version": 1, "models": {"m": {"state": "asleep", "since": "soon", '
        b'"engine": "sglang", "url": "u"}}}',
        b'{"version": 1, "models": {"m": {"state": "asleep", "engine": "sglang"}}}',
        b"[" * 100_000 + b"]" * 100_000,  # deeper than the JSON parser's recursion limit
    ],
)
def test_a_corrupt_file_is_logged_and_yields_nothing(tmp_path, caplog, content):
    store = StateStore(tmp_path)
    store.path.write_bytes(content)
    with caplog.at_level(logging.WARNING, logger="kvsleep.control.state_file"):
        assert store.load() == {}
    assert any(
        "unreadable" in r.getMessage() and str(store.path) in r.getMessage() for r in caplog.records
    ), caplog.text


def test_an_unreadable_file_is_logged_and_yields_nothing(tmp_path, caplog):
    store = StateStore(tmp_path)
    store.path.mkdir()  # reading a directory fails with an OSError, even as root
    with caplog.at_level(logging.WARNING, logger="kvsleep.control.state_file"):
        assert store.load() == {}
    assert "unreadable" in caplog.text


def test_a_write_that_fails_midway_leaves_the_old_file_whole(tmp_path, monkeypatch):
    store = StateStore(tmp_path)
    old = {"m": record(ModelState.ASLEEP)}
    store.save(old)
    before = store.path.read_bytes()

    def half_dump(doc, fh, **kw):
        fh.write(json.dumps(doc)[:10])
        raise OSError("disk full")

    monkeypatch.setattr(sleep_state.json, "dump", half_dump)
    with pytest.raises(OSError, match="disk full"):
        store.save({"m": record(ModelState.AWAKE)})
    assert store.path.read_bytes() == before
    assert store.load() == old
    assert leftovers(tmp_path) == []  # the temporary file is gone too


def test_a_failed_rename_leaves_the_old_file_whole(tmp_path, monkeypatch):
    store = StateStore(tmp_path)
    old = {"m": record(ModelState.ASLEEP)}
    store.save(old)

    def no_rename(src, dst):
        raise OSError("read-only file system")

    monkeypatch.setattr(sleep_state.os, "replace", no_rename)
    with pytest.raises(OSError):
        store.save({"m": record(ModelState.AWAKE)})
    assert store.load() == old
    assert leftovers(tmp_path) == []


# ---- the file as kvsleep writes it ------------------------------------------------------------


async def test_the_file_is_valid_json_at_every_instant_of_many_transitions(sim_factory, tmp_path):
    vllm = await sim_factory("vllm", V)
    sglang = await sim_factory("sglang", S)
    kv = await start_kvsleep(config_doc([sim_model(vllm), sim_model(sglang)], tmp_path / "state"))
    path = kv.manager.state_store.path
    stop = threading.Event()
    reads: list[int] = []
    problems: list[str] = []

    def reader() -> None:  # another process reading the file at any moment
        while not stop.is_set():
            try:
                text = path.read_text()
            except FileNotFoundError:
                continue
            try:
                json.loads(text)["models"]
                reads.append(1)
            except (ValueError, KeyError) as exc:
                problems.append(f"{exc!r}: {text!r}")

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    try:
        for _ in range(12):
            assert await kv.manager.put_model_to_sleep(V, manual=True)
            assert await kv.manager.put_model_to_sleep(S, manual=True)
            assert await kv.manager.wakeup_model(V)
            assert await kv.manager.wakeup_model(S)
        assert await kv.manager.put_model_to_sleep(S, manual=True)
    finally:
        stop.set()
        await asyncio.to_thread(thread.join, 5)
        await kv.close()
    assert problems == []
    assert reads, "the reader never saw the file"
    doc = json.loads(path.read_text())
    assert {name: rec["state"] for name, rec in doc["models"].items()} == {V: "awake", S: "asleep"}
    assert doc["models"][S]["url"] == sglang.url and doc["models"][S]["engine"] == "sglang"
    assert leftovers(path.parent) == []
    clean(vllm.sim.stats())
    clean(sglang.sim.stats())


async def test_restart_remembers_both_asleep_and_the_next_request_wakes_each_once(
    sim_factory, tmp_path
):
    vllm = await sim_factory("vllm", V)
    sglang = await sim_factory("sglang", S)
    doc = config_doc([sim_model(vllm), sim_model(sglang)], tmp_path / "state")
    first = await start_kvsleep(doc)
    try:
        for name in (V, S):
            assert await first.manager.put_model_to_sleep(name, manual=True)
        # Written at the transition, not at shutdown: a kill -9 now would keep it too.
        stored = first.manager.state_store.load()
        assert {n: r.state for n, r in stored.items()} == {
            V: ModelState.ASLEEP,
            S: ModelState.ASLEEP,
        }
    finally:
        await first.close()

    second = await start_kvsleep(doc, FakeClock())
    try:
        assert second.state(V) == "asleep"  # the engine says so
        assert second.state(S) == "asleep"  # only the state file can say so
        assert second.manager.get_sleeping_models()[S]["sleep_start_time"] == stored[S].since
        assert second.manager.is_model_sleeping(S)
        async with aiohttp.ClientSession() as session:
            results = await asyncio.gather(
                *(complete(session, second, m) for _ in range(25) for m in (V, S))
            )
        assert [r[0] for r in results] == [200] * 50
        assert second.state(V) == second.state(S) == "awake"
    finally:
        await second.close()
    assert calls(vllm, "/sleep") == 1 and calls(vllm, "/wake_up") == 1
    assert calls(sglang, "/release_memory_occupation") == 1
    assert calls(sglang, "/resume_memory_occupation") == 1
    assert calls(sglang, "/update_weights_from_disk") == 1
    assert calls(sglang, "/health") == 0
    clean(vllm.sim.stats())
    clean(sglang.sim.stats())


async def test_without_its_record_a_released_sglang_cannot_be_known_asleep(sim_factory, tmp_path):
    """Why the file exists: delete it and only vLLM's state can be recovered (from probes)."""
    vllm = await sim_factory("vllm", V)
    sglang = await sim_factory("sglang", S)
    doc = config_doc([sim_model(vllm), sim_model(sglang)], tmp_path / "state")
    first = await start_kvsleep(doc)
    try:
        for name in (V, S):
            assert await first.manager.put_model_to_sleep(name, manual=True)
    finally:
        await first.close()
    first.manager.state_store.path.unlink()
    second = await start_kvsleep(doc)
    try:
        assert second.state(V) == "asleep"
        assert second.state(S) == "awake"
    finally:
        await second.close()
    clean(sglang.sim.stats())  # and the start-up probes did not touch its released memory


async def test_a_corrupt_state_file_is_logged_and_probes_decide(sim_factory, tmp_path, caplog):
    vllm = await sim_factory("vllm", V)
    sglang = await sim_factory("sglang", S)
    doc = config_doc([sim_model(vllm), sim_model(sglang)], tmp_path / "state")
    first = await start_kvsleep(doc)
    try:
        assert await first.manager.put_model_to_sleep(V, manual=True)
    finally:
        await first.close()
    path = first.manager.state_store.path
    path.write_text('{"version": 1, "models": {"org/llama": {"sta')  # torn by hand
    with caplog.at_level(logging.WARNING, logger="kvsleep.control.state_file"):
        second = await start_kvsleep(doc)
    try:
        assert "unreadable" in caplog.text and "engine probes" in caplog.text
        assert second.state(V) == "asleep"  # vLLM answers /is_sleeping
        assert second.state(S) == "awake"
        # The start-up rewrote a whole file.
        assert json.loads(path.read_text())["models"][V]["state"] == "asleep"
        async with aiohttp.ClientSession() as session:
            results = await asyncio.gather(
                *(complete(session, second, m) for _ in range(10) for m in (V, S))
            )
        assert [r[0] for r in results] == [200] * 20
    finally:
        await second.close()
    assert calls(vllm, "/wake_up") == 1
    assert calls(sglang, "/resume_memory_occupation") == 0
    clean(vllm.sim.stats())
    clean(sglang.sim.stats())


async def test_an_unwritable_state_file_is_logged_and_serving_goes_on(
    sim_factory, tmp_path, caplog
):
    vllm = await sim_factory("vllm", V)
    state_dir = tmp_path / "state"
    (state_dir / "state.json").mkdir(parents=True)
    with caplog.at_level(logging.WARNING):
        kv = await start_kvsleep(config_doc([sim_model(vllm)], state_dir))
        try:
            assert await kv.manager.put_model_to_sleep(V, manual=True)
            async with aiohttp.ClientSession() as session:
                assert (await complete(session, kv, V))[0] == 200
        finally:
            await kv.close()
    assert "unreadable" in caplog.text
    assert "cannot write state file" in caplog.text
    assert leftovers(state_dir) == []
    clean(vllm.sim.stats())


async def test_an_interrupted_sleep_counts_as_asleep_after_restart(sim_factory, tmp_path):
    """kvsleep died while SGLang released its memory: the engine finished the call."""
    sglang = await sim_factory("sglang", S)
    state_dir = tmp_path / "state"
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{sglang.url}/release_memory_occupation", json={}) as resp:
            assert resp.status == 200
        StateStore(state_dir).save({S: record(ModelState.SLEEPING, url=sglang.url)})
        kv = await start_kvsleep(config_doc([sim_model(sglang)], state_dir))
        try:
            assert kv.state(S) == "asleep"
            assert (await complete(session, kv, S))[0] == 200
            await settle(kv, S)
        finally:
            await kv.close()
    assert calls(sglang, "/resume_memory_occupation") == 1
    clean(sglang.sim.stats())


async def test_an_interrupted_wake_is_finished_before_anything_is_served(sim_factory, tmp_path):
    """kvsleep died after SGLang resumed and before the weights were reloaded: the start-up
    finishes the wake (reload only: a second resume would kill the scheduler)."""
    sglang = await sim_factory("sglang", S)
    state_dir = tmp_path / "state"
    async with aiohttp.ClientSession() as session:
        for route in ("/release_memory_occupation", "/resume_memory_occupation"):
            async with session.post(f"{sglang.url}{route}", json={}) as resp:
                assert resp.status == 200
        assert sglang.sim.stats()["engine"]["weights_stale"] is True
        StateStore(state_dir).save({S: record(ModelState.WAKING, url=sglang.url)})
        kv = await start_kvsleep(config_doc([sim_model(sglang)], state_dir))
        try:
            assert kv.state(S) == "awake"
            assert sglang.sim.stats()["engine"]["weights_stale"] is False
            assert (await complete(session, kv, S))[0] == 200
        finally:
            await kv.close()
    assert calls(sglang, "/resume_memory_occupation") == 1  # ours, above
    assert calls(sglang, "/update_weights_from_disk") == 1
    clean(sglang.sim.stats())  # includes: nothing served on stale weights


async def test_a_record_of_another_engine_is_ignored(sim_factory, tmp_path):
    sglang = await sim_factory("sglang", S)
    state_dir = tmp_path / "state"
    StateStore(state_dir).save({S: record(ModelState.ASLEEP, url="http://127.0.0.1:1")})
    kv = await start_kvsleep(config_doc([sim_model(sglang)], state_dir))
    try:
        assert kv.state(S) == "awake"
        async with aiohttp.ClientSession() as session:
            assert (await complete(session, kv, S))[0] == 200
    finally:
        await kv.close()
    assert calls(sglang, "/resume_memory_occupation") == 0
    clean(sglang.sim.stats())
