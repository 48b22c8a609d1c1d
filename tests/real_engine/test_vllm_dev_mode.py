"""kvsleep in front of a real vLLM 0.32 (CPU build) in dev mode.

kvsleep runs in-process (tests/kvsleep_harness.py) with a fake clock, so idle time is told, not
waited for; the engine is real and so is every byte between them. One test starts a real
`kvsleep serve` process on the real clock. The tiny model's answers are gibberish, but greedy
sampling makes them repeatable, so kvsleep's answers can be compared with the engine's own.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
import yaml

from kvsleep.config import ModelConfig
from kvsleep.core.states import ModelState
from kvsleep.engines import RetryPolicy, adapter_for
from tests.kvsleep_harness import RunningKvsleep, config_doc, start_kvsleep
from tests.real_engine.conftest import ENGINE_TIMEOUT, RealVLLM, free_port

pytestmark = [pytest.mark.real_engine, ENGINE_TIMEOUT]
M = "tiny/llama"
# Real engine calls are fast here (the CPU build's sleep frees nothing), but a loaded CI
# machine is slow: allow seconds, not the harness's milliseconds.
REAL_RETRY = RetryPolicy(
    attempts=3,
    initial_wait_seconds=0.1,
    max_wait_seconds=1.0,
    probe_timeout_seconds=10.0,
    sleep_timeout_seconds=60.0,
    wake_timeout_seconds=60.0,
)
# Ids and timestamps differ between two answers; nothing else may.
VOLATILE = re.compile(rb'"(id|created)":("[^"]*"|\d+)')


@pytest.fixture
async def kv(vllm_dev: RealVLLM, tmp_path: Path) -> AsyncIterator[RunningKvsleep]:
    doc = config_doc(
        [{"name": M, "engine": "vllm", "url": vllm_dev.url}],
        tmp_path / "state",
        idle_threshold_seconds=60,
        wake_timeout_seconds=60,
    )
    running = await start_kvsleep(doc, retry=REAL_RETRY)
    yield running
    await running.close()
    # Leave the engine awake for the next test, whatever this one did.
    async with aiohttp.ClientSession() as session, session.post(vllm_dev.url + "/wake_up") as resp:
        assert resp.status == 200


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as s:
        yield s


async def post(session: aiohttp.ClientSession, url: str, body: Any) -> tuple[int, bytes, str]:
    async with session.post(url, json=body) as resp:
        return resp.status, await resp.read(), resp.headers.get("Content-Type", "")


async def is_sleeping(session: aiohttp.ClientSession, engine: RealVLLM) -> bool:
    async with session.get(engine.url + "/is_sleeping") as resp:
        return (await resp.json())["is_sleeping"]


def normalized(raw: bytes) -> bytes:
    return VOLATILE.sub(rb'"\1":"*"', raw)


COMPLETION = {"model": M, "prompt": "Hello, how are you?", "max_tokens": 12, "temperature": 0}
CHAT = {
    "model": M,
    "messages": [{"role": "user", "content": "Tell me a story."}],
    "max_tokens": 12,
    "temperature": 0,
}


@pytest.mark.parametrize(
    ("path", "body"), [("/v1/completions", COMPLETION), ("/v1/chat/completions", CHAT)]
)
async def test_answers_equal_the_engines_own(kv, vllm_dev, session, path, body):
    direct = await post(session, vllm_dev.url + path, body)
    routed = await post(session, kv.url + path, body)
    assert direct[0] == routed[0] == 200
    assert routed[2] == direct[2]
    assert normalized(routed[1]) == normalized(direct[1])
    assert json.loads(routed[1])["usage"]["completion_tokens"] == 12


@pytest.mark.parametrize(
    ("path", "body"), [("/v1/completions", COMPLETION), ("/v1/chat/completions", CHAT)]
)
async def test_streams_are_byte_identical_but_for_ids_and_timestamps(
    kv, vllm_dev, session, path, body
):
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    direct = await post(session, vllm_dev.url + path, body)
    routed = await post(session, kv.url + path, body)
    assert direct[0] == routed[0] == 200
    assert routed[2] == direct[2] == "text/event-stream; charset=utf-8"
    assert routed[1].endswith(b"data: [DONE]\n\n")
    assert normalized(routed[1]) == normalized(direct[1])
    assert routed[1].count(b"data: ") >= 12


async def test_the_openai_client_works_through_kvsleep(kv):
    client = openai.AsyncOpenAI(base_url=kv.url + "/v1", api_key="unused", max_retries=0)
    try:
        models = [m.id async for m in client.models.list()]
        assert models == [M]
        completion = await client.completions.create(
            model=M, prompt="Hello", max_tokens=5, temperature=0
        )
        assert completion.usage.completion_tokens == 5
        chat = await client.chat.completions.create(
            model=M, messages=[{"role": "user", "content": "Hi"}], max_tokens=5, temperature=0
        )
        assert chat.choices[0].message.role == "assistant"
        stream = await client.chat.completions.create(
            model=M,
            messages=[{"role": "user", "content": "Hi"}],
            max_tokens=5,
            temperature=0,
            stream=True,
        )
        chunks = [chunk async for chunk in stream]
        assert chunks[-1].choices[0].finish_reason == "length"
        assert (
            "".join(c.choices[0].delta.content or "" for c in chunks)
            == chat.choices[0].message.content
        )
        with pytest.raises(openai.BadRequestError) as err:
            await client.completions.create(model=M, prompt="Hello", max_tokens=100_000)
        assert "max_model_len" in err.value.message
        with pytest.raises(openai.NotFoundError):
            await client.completions.create(model="no/such-model", prompt="Hello")
    finally:
        await client.close()


@pytest.mark.parametrize(
    "body",
    [
        {**COMPLETION, "max_tokens": 100_000},  # longer than max_model_len
        {**COMPLETION, "temperature": -1},
        {**CHAT, "top_p": 5},
    ],
)
async def test_engine_errors_are_relayed_unchanged(kv, vllm_dev, session, body):
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    direct = await post(session, vllm_dev.url + path, body)
    routed = await post(session, kv.url + path, body)
    assert 400 <= direct[0] < 500
    assert routed[:2] == direct[:2]
    error = json.loads(routed[1])["error"]
    assert {"message", "type", "param", "code"} <= error.keys()
    assert kv.state(M) == "awake"


async def test_models_lists_the_engine_with_its_state(kv, session):
    async with session.get(kv.url + "/v1/models") as resp:
        body = await resp.json()
    assert body["object"] == "list"
    assert [(m["id"], m["owned_by"], m["state"]) for m in body["data"]] == [(M, "vllm", "awake")]


async def test_manual_sleep_then_a_request_wakes_it(kv, vllm_dev, session):
    async with session.post(f"{kv.url}/models/{M}/sleep") as resp:
        assert resp.status == 200, await resp.text()
    assert kv.state(M) == "asleep"
    assert await is_sleeping(session, vllm_dev)
    async with session.get(vllm_dev.url + "/metrics") as resp:
        assert 'sleep_state="weights_offloaded"} 1.0' in await resp.text()
    code, raw, _ = await post(session, kv.url + "/v1/completions", COMPLETION)
    assert code == 200 and json.loads(raw)["usage"]["completion_tokens"] == 12
    assert kv.state(M) == "awake"
    assert not await is_sleeping(session, vllm_dev)
    metrics = kv.server.metrics.registry
    assert (
        metrics.get_sample_value(
            "kvsleep_sleeps_total", {"model": M, "reason": "manual", "result": "ok"}
        )
        == 1
    )
    assert (
        metrics.get_sample_value(
            "kvsleep_wakes_total", {"model": M, "reason": "request", "result": "ok"}
        )
        == 1
    )
    # vLLM was only ever asked with mode=wait: kvsleep drains first, the engine drains again.
    assert vllm_dev.count_in_log('"POST /sleep?level=1&mode=wait HTTP/1.1" 200') >= 1


async def test_idle_sleep_and_manual_wake(kv, vllm_dev, session):
    code, _, _ = await post(session, kv.url + "/v1/completions", COMPLETION)
    assert code == 200
    kv.clock.advance(30)
    assert await kv.reconcile() == []  # idle 30 s of 60: stays awake
    kv.clock.advance(31)
    await kv.reconcile()
    await asyncio.wait_for(asyncio.shield(kv.manager.slots[M].worker), 60)
    assert kv.state(M) == "asleep"
    assert await is_sleeping(session, vllm_dev)
    async with session.post(f"{kv.url}/models/{M}/wake") as resp:
        assert resp.status == 200, await resp.text()
    assert kv.state(M) == "awake"
    assert not await is_sleeping(session, vllm_dev)


async def test_slept_behind_kvsleeps_back_with_a_request_inside(kv, vllm_dev, session):
    async with session.post(vllm_dev.url + "/sleep?level=1") as resp:
        assert resp.status == 200
    # kvsleep still believes the engine awake: the request goes in and vLLM queues it.
    request = asyncio.create_task(post(session, kv.url + "/v1/completions", COMPLETION))
    for _ in range(200):
        if kv.manager.slots[M].in_engine == 1:
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.5)
    assert not request.done()
    await kv.reconcile()  # the engine says it is asleep with a request inside: wake it
    code, raw, _ = await asyncio.wait_for(request, 60)
    assert code == 200 and json.loads(raw)["usage"]["completion_tokens"] == 12
    assert kv.state(M) == "awake"
    assert not await is_sleeping(session, vllm_dev)


async def test_kvsleep_serve_process_sleeps_idle_and_wakes_on_request(vllm_dev, session, tmp_path):
    """The real command on the real clock: idle sleep after 2 s, a request wakes it."""
    doc = config_doc(
        [{"name": M, "engine": "vllm", "url": vllm_dev.url}],
        tmp_path / "state",
        idle_threshold_seconds=2,
        check_interval_seconds=0.5,
        wake_timeout_seconds=60,
    )
    port = doc["router"]["port"] = free_port()
    path = tmp_path / "kvsleep.yaml"
    path.write_text(yaml.safe_dump(doc))
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvsleep", "serve", "--config", str(path)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "kvsleep.log").open("wb"),
    )
    url = f"http://127.0.0.1:{port}"
    try:
        await until(lambda: ready(session, url), 60, "kvsleep ready")
        await until(lambda: is_sleeping(session, vllm_dev), 60, "idle sleep")
        code, raw, _ = await post(session, url + "/v1/completions", COMPLETION)
        assert code == 200 and json.loads(raw)["usage"]["completion_tokens"] == 12
        async with session.get(url + "/metrics") as resp:
            text = await resp.text()
        assert re.search(
            r'kvsleep_sleeps_total\{model="tiny/llama",reason="idle",'
            r'result="ok"\} [1-9]',
            text,
        )
        assert re.search(
            r'kvsleep_wakes_total\{model="tiny/llama",reason="request",'
            r'result="ok"\} 1',
            text,
        )
    finally:
        proc.terminate()
        assert proc.wait(30) == 0, (tmp_path / "kvsleep.log").read_text()
        # Leave the engine awake for the next test, whatever kvsleep last did to it.
        async with session.post(vllm_dev.url + "/wake_up") as resp:
            assert resp.status == 200
        assert not await is_sleeping(session, vllm_dev)


async def test_the_adapter_names_the_process_and_counts_requests_it_never_saw(vllm_dev, session):
    """The API server's process_start_time_seconds names the process, through a sleep; the
    engine's own gauges count a request sent straight to it while it generates."""
    model = ModelConfig(name=M, engine="vllm", url=vllm_dev.url)
    engine = adapter_for(model, lambda: session, REAL_RETRY)

    async def load_is(n: int) -> bool:
        return await engine.load() == n

    awake = await engine.observe(ModelState.AWAKE)
    assert awake.up and awake.asleep is False
    assert awake.incarnation is not None and awake.incarnation.startswith("vllm:")
    assert await engine.load() == 0
    # A paused (dev-mode slept) vLLM publishes no gauges, so the engine must be generating. Each
    # request takes about a second here; watch the gauges without pause while they run, so a
    # fast engine on a slow machine cannot finish between two looks.
    long = {**COMPLETION, "max_tokens": 480, "ignore_eos": True}
    requests = [
        asyncio.create_task(post(session, vllm_dev.url + "/v1/completions", long)) for _ in range(3)
    ]
    seen: set[int | None] = set()
    while not all(r.done() for r in requests):
        seen.add(await engine.load())
    assert [(await r)[0] for r in requests] == [200, 200, 200]
    assert seen & {1, 2, 3}, f"the engine never counted the requests: {seen}"
    await until(lambda: load_is(0), 30, "the engine to count the requests done")

    async with session.post(vllm_dev.url + "/sleep", params={"level": "1"}) as resp:
        assert resp.status == 200
    try:
        asleep = await engine.observe(ModelState.ASLEEP)
        assert asleep.asleep is True and asleep.incarnation == awake.incarnation
    finally:
        async with session.post(vllm_dev.url + "/wake_up") as resp:
            assert resp.status == 200


async def ready(session: aiohttp.ClientSession, url: str) -> bool:
    try:
        async with session.get(url + "/-/ready") as resp:
            return resp.status == 200
    except aiohttp.ClientError:
        return False


async def until(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.2)
