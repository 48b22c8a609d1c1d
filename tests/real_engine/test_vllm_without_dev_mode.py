"""kvsleep in front of a real vLLM started without VLLM_SERVER_DEV_MODE: no sleep routes.

Before kvsleep backed off, such an engine got `POST /sleep` once per idle threshold, forever. Here
kvsleep (in-process, fake clock) walks three virtual minutes at a 2 s idle threshold; the
engine's own access log counts the sleep calls it received.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from tests.kvsleep_harness import RunningKvsleep, config_doc, start_kvsleep
from tests.real_engine.conftest import ENGINE_TIMEOUT, RealVLLM
from tests.real_engine.test_vllm_dev_mode import COMPLETION, REAL_RETRY, M, post

pytestmark = [pytest.mark.real_engine, ENGINE_TIMEOUT]
SLEEP_404 = '"POST /sleep?level=1&mode=wait HTTP/1.1" 404'


@pytest.fixture
async def kv(vllm_plain: RealVLLM, tmp_path: Path) -> AsyncIterator[RunningKvsleep]:
    doc = config_doc(
        [{"name": M, "engine": "vllm", "url": vllm_plain.url}],
        tmp_path / "state",
        idle_threshold_seconds=2,
        wake_timeout_seconds=60,
    )
    running = await start_kvsleep(doc, retry=REAL_RETRY)
    yield running
    await running.close()


async def test_no_sleep_routes_one_call_a_clear_error_and_it_keeps_serving(kv, vllm_plain):
    before = vllm_plain.count_in_log(SLEEP_404)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        for second in range(180):
            kv.clock.advance(1)
            await kv.reconcile()
            worker = kv.manager.slots[M].worker
            if worker is not None:
                await asyncio.wait_for(asyncio.shield(worker), 60)
            if second % 60 == 30:  # traffic now and then: served, never held
                code, raw, _ = await post(session, kv.url + "/v1/completions", COMPLETION)
                assert code == 200 and json.loads(raw)["usage"]["completion_tokens"] == 12
        await asyncio.sleep(0.5)  # uvicorn writes its access line after answering
        calls = vllm_plain.count_in_log(SLEEP_404) - before
        assert 1 <= calls <= 5
        assert calls == 1  # a missing route is not retried until a reload or restart
        assert kv.state(M) == "awake"
        async with session.get(kv.url + "/sleep/status") as resp:
            status = (await resp.json())["models"][M]
        assert "VLLM_SERVER_DEV_MODE=1" in status["cannot_sleep"]
        assert status["state"] == "awake" and status["engine_up"] is True
        registry = kv.server.metrics.registry
        assert registry.get_sample_value("kvsleep_model_cannot_sleep", {"model": M}) == 1
        # A manual sleep says why it cannot, in the kvcached controller's answer shape.
        async with session.post(f"{kv.url}/models/{M}/sleep") as resp:
            body = await resp.json()
        assert resp.status == 400 and body["success"] is False
        assert "no sleep route" in body["message"] and "404" in body["message"]
        code, _, _ = await post(session, kv.url + "/v1/completions", COMPLETION)
        assert code == 200
