"""Operator routes on a real kvsleep: `GET /v1/models/{id}`, Retry-After, `GET /` without a
browser, `/logs/{model}` of really launched engines, and the page's assets."""

from __future__ import annotations

import asyncio
import re
import socket
import sys
from pathlib import Path

import aiohttp
import openai
import pytest

from kvsleep.config import parse_config
from kvsleep.control.launcher import Launcher
from kvsleep.web import operator_routes, status_page
from kvsleep.web.router import OpenAIError
from kvsleep.web.server import KvsleepServer
from tests.kvsleep_harness import config_doc, sim_model, start_kvsleep


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_openai_error(body: dict, code: str) -> None:
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == code


# ---- Retry-After -------------------------------------------------------------------------


@pytest.mark.parametrize(("eta", "header"), [(2.4, "3"), (2.0, "2"), (0.2, "1"), (30, "30")])
def test_retry_after_is_rounded_up(eta, header):
    response = OpenAIError(503, "later", "service_unavailable", retry_after=eta).response()
    assert response.headers["Retry-After"] == header


async def test_a_2_4_s_eta_says_retry_after_3(sim_factory, tmp_path):
    sim = await sim_factory("vllm", "org/m")
    kv = await start_kvsleep(config_doc([sim_model(sim, wake_eta_seconds=2.4)], tmp_path))
    try:
        assert await kv.manager.put_model_to_sleep("org/m", manual=True)
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                f"{kv.url}/v1/completions",
                json={"model": "org/m", "prompt": "x"},
                headers={"X-Request-Timeout": "1"},
            ) as r,
        ):
            assert r.status == 503
            assert r.headers["Retry-After"] == "3"
    finally:
        await kv.close()


async def test_openai_client_retry_honoring_retry_after_is_served_after_the_wake(
    sim_factory, tmp_path
):
    """Queue full: the client is told to come back when the wake should be over; with
    `max_retries=1` its single retry must find the model awake. An ETA of 1.2 s rounded to 1
    would send it back while the engine still wakes (a second 503, and the client gives up)."""
    sim = await sim_factory("vllm", "org/chat-m", wake_latency=1.2)
    kv = await start_kvsleep(
        config_doc([sim_model(sim, wake_eta_seconds=1.2)], tmp_path, max_held_requests=1)
    )
    client = openai.AsyncOpenAI(base_url=f"{kv.url}/v1", api_key="unused", max_retries=1)
    try:
        assert await kv.manager.put_model_to_sleep("org/chat-m", manual=True)
        held = asyncio.create_task(
            client.completions.create(model="org/chat-m", prompt="first", max_tokens=2)
        )
        while not kv.manager.slots["org/chat-m"].waiters:
            await asyncio.sleep(0.01)
        raw = await client.completions.with_raw_response.create(
            model="org/chat-m", prompt="second", max_tokens=2
        )
        assert raw.status_code == 200
        assert raw.retries_taken == 1  # refused once (queue full), then served
        assert raw.parse().choices
        assert (await held).choices
    finally:
        await client.close()
        await kv.close()
    stats = sim.sim.stats()
    assert stats["calls"].get("/wake_up") == 1, stats["calls"]
    assert stats["requests"]["completed"] == 2
    assert not stats["hazards"]


# ---- GET /v1/models/{id} -----------------------------------------------------------------


async def test_v1_model_retrieve_with_slashes(sim_factory, tmp_path):
    sim = await sim_factory("vllm", "meta-llama/Llama-3.2-1B")
    kv = await start_kvsleep(config_doc([sim_model(sim)], tmp_path))
    try:
        async with aiohttp.ClientSession() as session:
            for path in ("meta-llama/Llama-3.2-1B", "meta-llama%2FLlama-3.2-1B"):
                async with session.get(f"{kv.url}/v1/models/{path}") as r:
                    assert r.status == 200
                    body = await r.json()
                assert body["id"] == "meta-llama/Llama-3.2-1B"
                assert body["object"] == "model"
                assert body["owned_by"] == "vllm"
                assert body["state"] == "awake"
                assert isinstance(body["created"], int)
            async with session.get(f"{kv.url}/v1/models/meta-llama/Llama-9") as r:
                assert r.status == 404
                assert_openai_error(await r.json(), "model_not_found")
        client = openai.AsyncOpenAI(base_url=f"{kv.url}/v1", api_key="unused", max_retries=0)
        try:
            model = await client.models.retrieve("meta-llama/Llama-3.2-1B")
            assert model.id == "meta-llama/Llama-3.2-1B"
            assert model.object == "model"
            with pytest.raises(openai.NotFoundError):
                await client.models.retrieve("meta-llama/nope")
        finally:
            await client.close()
    finally:
        await kv.close()


# ---- GET / without a browser -------------------------------------------------------------


async def test_status_page_lists_every_model_escaped(tmp_path):
    models = [
        {
            "name": 'org/a<b>&"c',
            "engine": "vllm",
            "url": "http://127.0.0.1:9",
            "memory_gb": 20,
            "gpus": [0],
        },
        {"name": "org/plain", "engine": "sglang", "url": "http://127.0.0.1:10", "always_on": True},
    ]
    kv = await start_kvsleep(config_doc(models, tmp_path, gpus=[{"id": 0, "memory_gb": 80}]))
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{kv.url}/") as r:
                assert r.status == 200
                assert r.content_type == "text/html"
                assert "script-src 'self'" in r.headers["Content-Security-Policy"]
                html = await r.text()
            for asset, kind in (("status.js", "text/javascript"), ("status.css", "text/css")):
                async with session.get(f"{kv.url}/static/{asset}") as r:
                    assert r.status == 200
                    assert r.content_type == kind
            async with session.get(f"{kv.url}/static/../server.py") as r:
                assert r.status == 404
            async with session.get(f"{kv.url}/sleep/status") as r:
                states = {name: m["state"] for name, m in (await r.json())["models"].items()}
    finally:
        await kv.close()
    assert "org/a&lt;b&gt;&amp;&quot;c" in html
    assert 'org/a<b>&"c' not in html
    rows = re.findall(r'<tr data-model="([^"]*)" data-state="([^"]*)">', html)
    # Both engines are unreachable: each row says the state /sleep/status reports.
    assert rows == [
        ("org/a&lt;b&gt;&amp;&quot;c", states['org/a<b>&"c']),
        ("org/plain", states["org/plain"]),
    ]
    assert "(always on)" in html
    assert 'href="metrics"' in html
    assert '<meter min="0" max="80" value="20"' in html
    assert "http://" not in html and "https://" not in html  # nothing loaded from elsewhere


# ---- /logs/{model} -----------------------------------------------------------------------


def launched_doc(tmp_path: Path, **router: object) -> dict:
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "kvsleep",
        "sim-engine",
        "--flavor",
        "vllm",
        "--model",
        "org/launched",
        "--port",
        str(port),
    ]
    models = [
        {
            "name": "org/launched",
            "engine": "vllm",
            "url": f"http://127.0.0.1:{port}",
            "command": command,
            "ready_timeout_seconds": 30,
        },
        {"name": "org/attached", "engine": "vllm", "url": "http://127.0.0.1:9"},
    ]
    return config_doc(models, tmp_path, router=router or None)


async def launch(server: KvsleepServer, doc: dict) -> Launcher:
    """Start the config's launched engines as `kvsleep serve` does, for /logs to serve."""
    config = parse_config(doc, "<test>")
    launcher = Launcher(server.manager, server.metrics, config.log_dir)
    await launcher.start([m for m in config.models if m.launched])
    server.launcher = launcher
    return launcher


async def sse_lines(resp: aiohttp.ClientResponse, count: int) -> list[str]:
    got: list[str] = []
    while len(got) < count:
        line = (await asyncio.wait_for(resp.content.readline(), 10)).decode()
        if line.startswith("data: "):
            got.append(line[len("data: ") :].rstrip("\n"))
    return got


async def test_logs_of_a_launched_engine(tmp_path, monkeypatch):
    monkeypatch.setattr(operator_routes, "FOLLOW_POLL_SECONDS", 0.02)
    doc = launched_doc(tmp_path)
    kv = await start_kvsleep(doc)
    launcher = await launch(kv.server, doc)
    log_file = launcher.engines["org/launched"].log_file
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{kv.url}/logs/org/launched") as r:
                assert r.status == 200
                assert r.content_type == "text/plain"
                text = await r.text()
            assert "==== kvsleep starting org/launched" in text
            async with session.get(f"{kv.url}/logs/org%2Flaunched?lines=1") as r:
                assert len((await r.text()).splitlines()) == 1
            for query, code in (
                ("lines=0", "invalid_value"),
                ("lines=x", "invalid_value"),
                ("follow=maybe", "invalid_value"),
            ):
                async with session.get(f"{kv.url}/logs/org/launched?{query}") as r:
                    assert r.status == 400
                    assert_openai_error(await r.json(), code)
            async with session.get(f"{kv.url}/logs/org/attached") as r:
                assert r.status == 404
                assert_openai_error(await r.json(), "not_launched")
            async with session.get(f"{kv.url}/logs/org/unknown") as r:
                assert r.status == 404
                assert_openai_error(await r.json(), "model_not_found")

            async with session.get(f"{kv.url}/logs/org/launched?follow=1&lines=1") as r:
                assert r.status == 200
                assert r.content_type == "text/event-stream"
                assert len(await sse_lines(r, 1)) == 1  # the last line so far
                with log_file.open("ab") as out:
                    out.write(b"first new line\nsecond, with a CR\r in it\npartial")
                assert await sse_lines(r, 2) == ["first new line", "second, with a CR in it"]
                with log_file.open("ab") as out:
                    out.write(b" line ends now\n")
                assert await sse_lines(r, 1) == ["partial line ends now"]
                # Rotated: the stream goes on with the new file from its start.
                log_file.rename(log_file.with_suffix(".log.1"))
                log_file.write_bytes(b"after rotation\n")
                assert await sse_lines(r, 1) == ["after rotation"]
    finally:
        await launcher.stop()
        await kv.close()


async def test_logs_need_the_admin_token_when_one_is_set(tmp_path, monkeypatch):
    monkeypatch.setenv("KVSLEEP_TEST_TOKEN", "s3cret")
    doc = launched_doc(tmp_path, admin_token_env="KVSLEEP_TEST_TOKEN")
    kv = await start_kvsleep(doc)
    launcher = await launch(kv.server, doc)
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{kv.url}/logs/org/launched") as r:
                assert r.status == 401
                assert_openai_error(await r.json(), "unauthorized")
            async with session.get(
                f"{kv.url}/logs/org/launched", headers={"Authorization": "Bearer s3cret"}
            ) as r:
                assert r.status == 200
            async with session.get(f"{kv.url}/sleep/status") as r:
                doc = await r.json()
            assert doc["models"]["org/launched"]["launched"] is True
            assert doc["models"]["org/attached"]["launched"] is False
            async with session.get(f"{kv.url}/") as r:
                html = await r.text()
            assert 'href="logs/org%2Flaunched"' in html
            assert 'href="logs/org%2Fattached"' not in html
    finally:
        await launcher.stop()
        await kv.close()


async def test_follow_ends_when_kvsleep_stops(tmp_path):
    """A follower never ends by itself; shutdown must not wait out its grace for it."""
    doc = launched_doc(tmp_path)
    kv = await start_kvsleep(doc)
    launcher = await launch(kv.server, doc)
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"{kv.url}/logs/org/launched?follow=1&lines=1") as r,
        ):
            await sse_lines(r, 1)
            await kv.server.app.shutdown()  # what runner.cleanup does first
            rest = await asyncio.wait_for(r.content.read(), 10)
            assert b"data:" not in rest
    finally:
        await launcher.stop()
        await kv.close()


def test_last_lines_reads_the_tail(tmp_path, monkeypatch):
    path = tmp_path / "engine.log"
    assert operator_routes.last_lines(path, 5) == ([], 0)
    lines = [f"line {i} " + "x" * (i % 300) for i in range(5000)]
    path.write_bytes(("\n".join(lines) + "\nunfinished").encode())
    got, offset = operator_routes.last_lines(path, 3)
    assert got == lines[-3:]
    assert offset == path.stat().st_size - len("unfinished")
    got, _ = operator_routes.last_lines(path, 5000)
    assert got == lines
    monkeypatch.setattr(operator_routes, "LOG_TAIL_MAX_BYTES", 64 * 1024)
    got, _ = operator_routes.last_lines(path, 5000)
    assert 0 < len(got) < 5000 and got == lines[-len(got) :]  # bounded, whole lines only


async def test_logs_answer_only_loopback_clients_without_a_token(tmp_path):
    from tests.test_access import kvsleep_on, non_loopback_ipv4

    address = non_loopback_ipv4()
    if address is None:
        pytest.skip("this machine has no non-loopback IPv4 address to connect from")
    doc = launched_doc(tmp_path)
    async with kvsleep_on(doc, "0.0.0.0") as (server, port):
        launcher = await launch(server, doc)
        try:
            async with aiohttp.ClientSession() as session:
                async with session.get(f"http://{address}:{port}/logs/org/launched") as r:
                    assert r.status == 403
                    assert_openai_error(await r.json(), "forbidden")
                async with session.get(f"http://127.0.0.1:{port}/logs/org/launched") as r:
                    assert r.status == 200
        finally:
            await launcher.stop()


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (None, "-"),
        (0, "0s"),
        (0.3, "<1s"),
        (42.4, "42s"),
        (60, "1m"),
        (303, "5m 3s"),
        (3600, "1h"),
        (7500, "2h 5m"),
    ],
)
def test_durations_read_like_a_person_wrote_them(seconds, text):
    assert status_page.duration(seconds) == text


def test_eta_while_waking_counts_down():
    m = {
        "state": "waking",
        "wake_eta_seconds": 12.0,
        "seconds_in_state": 9.2,
        "waiting_for_memory": "GPU 0: 10 GB short",
    }
    assert status_page.eta_text(m) == "3s left of 12s (waiting for memory: GPU 0: 10 GB short)"


def test_problems_name_a_model_that_cannot_sleep():
    assert status_page.problem_text({"cannot_sleep": "no /sleep route", "last_error": "boom"}) == (
        "cannot sleep: no /sleep route; boom"
    )
    assert status_page.problem_text({"cannot_sleep": None, "last_error": None}) == ""


def unknown_doc() -> dict:
    """A /sleep/status document with one model in state unknown and one awake."""
    base = {
        "engine": "sglang",
        "idle_seconds": None,
        "idle_threshold_seconds": 60.0,
        "in_flight": 0,
        "held_requests": 0,
        "wake_eta_seconds": None,
        "seconds_in_state": 3.0,
        "cannot_sleep": None,
    }
    return {
        "auto_sleep_enabled": True,
        "gpus": {},
        "models": {
            "org/<m>": {
                **base,
                "state": "unknown",
                "last_error": "the outcome of the resume call is unknown (timed out)",
            },
            "org/ok": {**base, "state": "awake", "last_error": None},
        },
    }


def test_a_model_in_state_unknown_offers_the_operators_answers_and_nothing_else():
    html = status_page.render(unknown_doc())
    (unknown,) = re.findall(r'<tr data-model="[^"]*" data-state="unknown">.*?</tr>', html)
    assert 'data-model="org/&lt;m&gt;"' in unknown
    assert '<span class="state state-unknown">unknown</span>' in unknown
    assert "the outcome of the resume call is unknown (timed out)" in unknown
    assert re.findall(r'data-action="adopt" data-adopt="(\w+)">([^<]*)<', unknown) == [
        ("asleep", "Engine is asleep"),
        ("awake", "Engine is awake"),
    ]
    # Sleep and Wake would be refused (kvsleep calls nothing): disabled.
    assert 'data-action="sleep" disabled>' in unknown and 'data-action="wake" disabled>' in unknown
    assert html.count('data-action="adopt"') == 2  # the awake model has none


def test_kvsleep_status_says_what_to_run_for_a_model_in_state_unknown():
    table = status_page.status_table(unknown_doc())
    lines = table.splitlines()
    assert lines[1].split()[:3] == ["org/<m>", "unknown", "sglang"]
    assert lines[1].endswith("the outcome of the resume call is unknown (timed out)")
    assert lines[-1] == (
        "org/<m>: state unknown, its requests are refused; find out whether its engine released "
        "its memory, then `kvsleep adopt org/<m> asleep` or `... awake` "
        "(docs/runbook.md#kvsleepenginestateunknown)"
    )
    assert "adopt" not in status_page.status_table(
        {**unknown_doc(), "models": {"org/ok": unknown_doc()["models"]["org/ok"]}}
    )
