"""What one hostile client can cost kvsleep is bounded (kvsleep/connections.py, held bytes).

These run `kvsleep serve` as a real process, with a real file limit, so that what is measured
(sockets, RSS) is kvsleep's own; the engine is an in-process simulator whose wake the test can
hold back (`control_lock`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import resource
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from aiohttp import ClientConnectionResetError, web

from kvsleep.web.router import _end
from tests.conftest import REPO_ROOT, SimFactory
from tests.kvsleep_harness import config_doc, sim_model, start_kvsleep
from tests.prometheus_server import free_port

MiB = 1024 * 1024


class ServeProcess:
    def __init__(self, proc: asyncio.subprocess.Process, url: str, log: Path) -> None:
        self.proc = proc
        self.url = url
        self.log = log

    def status(self, key: str) -> int:
        """A /proc/PID/status value in bytes (VmRSS, VmHWM)."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
        raise KeyError(key)

    async def metric(self, session: aiohttp.ClientSession, name: str, **labels: str) -> float:
        async with session.get(self.url + "/metrics") as resp:
            text = await resp.text()
        wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
        series = f"{name}{{{wanted}}}" if labels else name
        for line in text.splitlines():
            if line.startswith(series + " "):
                return float(line.rsplit(" ", 1)[1])
        raise AssertionError(f"no series {series} in /metrics")


def _limit_files(limit: int) -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))


@contextlib.asynccontextmanager
async def serve_process(
    tmp_path: Path, doc: dict[str, Any], file_limit: int | None = None
) -> AsyncIterator[ServeProcess]:
    port = free_port()
    doc["router"]["port"] = port
    path = tmp_path / "kvsleep.yaml"
    path.write_text(yaml.safe_dump(doc))
    log = tmp_path / "kvsleep.stderr"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "kvsleep",
        "serve",
        "--config",
        str(path),
        cwd=REPO_ROOT,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=log.open("wb"),
        preexec_fn=(lambda: _limit_files(file_limit)) if file_limit else None,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as session:
            for _ in range(200):
                with contextlib.suppress(aiohttp.ClientError):
                    async with session.get(url + "/-/ready") as resp:
                        if resp.status == 200:
                            break
                assert proc.returncode is None, log.read_text()
                await asyncio.sleep(0.1)
            else:
                raise AssertionError("kvsleep never became ready:\n" + log.read_text())
        yield ServeProcess(proc, url, log)
    finally:
        if proc.returncode is None:
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 15)
            except asyncio.TimeoutError:
                proc.kill()
                await proc.wait()


def _raise_own_file_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def _until_closed(reader: asyncio.StreamReader) -> bytes:
    """Everything the server sends until it closes the connection."""
    out = b""
    while chunk := await reader.read(4096):
        out += chunk
    return out


async def test_slowloris_cannot_starve_legitimate_clients(sim_factory: SimFactory, tmp_path):
    """Under a 1,024 file limit, one client opens 1,100 idle connections, 200 that stop halfway
    through their head and 200 that stop halfway through their body. Requests of others keep
    being answered (no reset), every hostile connection is closed within its timeout (or
    evicted at the connection limit), and /metrics counts each reason."""
    _raise_own_file_limit()
    sim = await sim_factory("vllm", model="m")
    doc = config_doc(
        [sim_model(sim)],
        tmp_path / "state",
        router={"idle_timeout_seconds": 4, "header_timeout_seconds": 3, "body_timeout_seconds": 3},
    )
    async with serve_process(tmp_path, doc, file_limit=1024) as kv:
        port = int(kv.url.rsplit(":", 1)[1])
        attack_done = asyncio.Event()
        answers: list[int | str] = []

        async def legitimate() -> None:
            # A new connection for every request: each must find room among the hostile ones.
            connector = aiohttp.TCPConnector(force_close=True)
            async with aiohttp.ClientSession(connector=connector) as session:
                while not attack_done.is_set() or len(answers) < 50:
                    body = {"model": "m", "prompt": "hi", "max_tokens": 2}
                    try:
                        async with session.post(kv.url + "/v1/completions", json=body) as resp:
                            await resp.read()
                            answers.append(resp.status)
                    except aiohttp.ClientError as exc:
                        answers.append(repr(exc))

        async def hostile(first: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            if first:
                writer.write(first)
                await writer.drain()
            return reader, writer

        head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
        half_body = head + b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
        half_body += b'{"model": "m", "prompt": "' + b"x" * 480
        client = asyncio.create_task(legitimate())
        idle = [await hostile(b"") for _ in range(1100)]
        heads = [await hostile(head) for _ in range(200)]
        bodies = [await hostile(half_body) for _ in range(200)]
        attack_done.set()
        await asyncio.wait_for(client, 120)

        assert answers and all(a == 200 for a in answers), [a for a in answers if a != 200][:5]
        replies = await asyncio.wait_for(
            asyncio.gather(*(_until_closed(r) for r, _ in idle + heads + bodies)), 120
        )
        for _, writer in idle + heads + bodies:
            writer.close()
        body_replies = replies[1300:]
        assert all(b" 408 " in r.split(b"\r\n", 1)[0] for r in body_replies), body_replies[:3]
        assert json.loads(body_replies[0].split(b"\r\n\r\n", 1)[1])["error"]["code"] == (
            "body_timeout"
        )

        async with aiohttp.ClientSession() as session:
            closed = {
                reason: await kv.metric(
                    session, "kvsleep_client_connections_closed_total", reason=reason
                )
                for reason in ("idle_timeout", "header_timeout", "body_timeout", "limit")
            }
            assert closed["body_timeout"] == 200
            assert closed["limit"] > 0  # 1,500 sockets do not fit under a 1,024 file limit
            assert closed["idle_timeout"] + closed["header_timeout"] + closed["limit"] >= 1300
            assert await kv.metric(session, "kvsleep_client_connections") <= 1
        assert "Traceback" not in kv.log.read_text()


async def test_held_bodies_are_bounded_by_bytes(sim_factory: SimFactory, tmp_path):
    """40 requests of 16 MiB for a model whose wake is held back: those within the 128 MiB
    budget for held bodies wait (and are served once it wakes); the rest get 503 queue_full
    with Retry-After at once, and kvsleep's RSS stays under the budget plus 100 MiB."""
    sim = await sim_factory("vllm", model="m")
    async with aiohttp.ClientSession() as session, session.post(sim.url + "/sleep") as resp:
        assert resp.status == 200
    doc = config_doc(
        [sim_model(sim)],
        tmp_path / "state",
        wake_timeout_seconds=120,
        router={"max_held_bytes": 128 * MiB, "max_body_bytes": 17 * MiB},
    )
    async with serve_process(tmp_path, doc) as kv:
        baseline = kv.status("VmRSS")
        padding = 16 * MiB - 100
        payload = b'{"model": "m", "max_tokens": 2, "prompt": "' + b"x" * padding + b'"}'
        results: list[tuple[int, dict[str, str], bytes]] = []

        async def send(session: aiohttp.ClientSession) -> None:
            headers = {"Content-Type": "application/json"}
            async with session.post(
                kv.url + "/v1/completions", data=payload, headers=headers
            ) as resp:
                results.append((resp.status, dict(resp.headers), await resp.read()))

        await sim.sim.control_lock.acquire()  # the wake starts and waits here
        try:
            async with aiohttp.ClientSession() as session:
                tasks = []
                for _ in range(40):  # one at a time on the wire, as arrivals
                    tasks.append(asyncio.create_task(send(session)))
                    while len(results) + _held(kv) < len(tasks):
                        await asyncio.sleep(0.02)
                held_rss, peak = kv.status("VmRSS"), kv.status("VmHWM")
                assert len(results) == 32 and all(r[0] == 503 for r in results)
                sim.sim.control_lock.release()
                await asyncio.wait_for(asyncio.gather(*tasks), 60)
        finally:
            if sim.sim.control_lock.locked():
                sim.sim.control_lock.release()
    statuses = sorted(r[0] for r in results)
    assert statuses == [200] * 8 + [503] * 32
    refused = [r for r in results if r[0] == 503]
    assert all(int(r[1]["Retry-After"]) >= 1 for r in refused)
    assert {json.loads(r[2])["error"]["code"] for r in refused} == {"queue_full"}
    # While they are held (the peak adds the transient copies of one request being parsed).
    assert held_rss < 128 * MiB + 100 * MiB, (baseline, held_rss, peak)


def _held(kv: ServeProcess) -> int:
    """Requests kvsleep holds now, from its /sleep/status (read synchronously: the test loop
    also runs the engine)."""
    import urllib.request

    with urllib.request.urlopen(kv.url + "/sleep/status", timeout=10) as resp:
        return int(json.load(resp)["models"]["m"]["held_requests"])


async def _exchange(url: str, data: bytes) -> bytes:
    """Send raw bytes, return everything the server answers until it closes."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(data)
    await writer.drain()
    try:
        return await asyncio.wait_for(_until_closed(reader), 10)
    finally:
        writer.close()


def _status_and_error(answer: bytes) -> tuple[int, dict[str, Any]]:
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), json.loads(body)["error"]


async def test_an_absolute_form_target_is_routed_by_its_path(sim_factory, kvsleep_factory):
    """HTTP/1.1 servers must accept `POST http://host/path`; it is the path that routes."""
    sim = await sim_factory("vllm", "m")
    kv = await kvsleep_factory([sim_model(sim)])
    body = b'{"model": "m", "prompt": "hi", "max_tokens": 2}'
    answer = await _exchange(
        kv.url,
        b"POST http://example.com/v1/completions?x=1 HTTP/1.1\r\n"
        b"Host: example.com\r\nConnection: close\r\n"
        b"Content-Type: application/json\r\nContent-Length: "
        + str(len(body)).encode()
        + b"\r\n\r\n"
        + body,
    )
    head, _, payload = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), answer
    assert json.loads(payload)["choices"]
    assert sim.sim.stats()["requests"]["completed"] == 1
    registry = kv.server.metrics.registry
    assert (
        registry.get_sample_value(
            "kvsleep_requests_total", {"model": "m", "endpoint": "/v1/completions", "code": "200"}
        )
        == 1
    )


async def test_malformed_http_is_answered_in_the_openai_error_shape(sim_factory, kvsleep_factory):
    """aiohttp's own answers to requests it cannot parse are plain text, and it leaves an
    HTTP/0.9 request line unanswered: kvsleep answers both like every other error."""
    sim = await sim_factory("vllm", "m")
    kv = await kvsleep_factory([sim_model(sim)])
    for raw, status in (
        (b"GET /v1/models\r\n", 505),
        (b"GET /\r\n\r\n", 505),
        (b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n", 400),
        (b"POST /v1/completions HTTP/1.1\r\nContent-Length: abc\r\n\r\n", 400),
    ):
        got, error = _status_and_error(await _exchange(kv.url, raw))
        assert got == status, raw
        assert error["type"] == "invalid_request_error" and error["message"], raw
    assert sim.sim.stats()["requests"]["completed"] == 0


async def test_a_client_leaving_as_its_stream_ends_is_no_error(
    sim_factory, kvsleep_factory, caplog
):
    """The client goes away between the last chunk and the end of the stream: the final
    `write_eof` fails, which is the client's business, not an ERROR with a traceback."""
    sim = await sim_factory("vllm", "m")
    kv = await kvsleep_factory([sim_model(sim)])

    class GoneAtTheEnd(web.StreamResponse):
        async def write(self, data: bytes) -> None:
            return None

        async def write_eof(self, data: bytes = b"") -> None:
            raise ClientConnectionResetError("Cannot write to closing transport")

    body = {"model": "m", "prompt": "hi", "max_tokens": 3, "stream": True}
    async with (
        aiohttp.ClientSession() as session,
        session.post(sim.url + "/v1/completions", json=body) as upstream,
    ):
        slot = kv.manager.slots["m"]
        response, code = await kv.server.router._relay(None, slot, upstream, GoneAtTheEnd())
    assert code == 200  # the engine's answer is relayed in full...
    assert await _end(response, code) == 499  # ...and its end found the client gone
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_a_removed_model_leaves_no_series_and_no_traffic_behind(sim_factory, tmp_path):
    """Requests in flight (streaming) and held (waiting for a wake) when a reload removes
    their model: the streams finish, the held ones get 503, and afterwards no series, traffic
    entry or idle listing names the model."""
    gone = await sim_factory("vllm", "org/gone", tokens_per_second=40)
    asleep = await sim_factory("sglang", "org/asleep")
    kept = await sim_factory("vllm", "org/kept")
    path = tmp_path / "kvsleep.yaml"
    doc = config_doc([sim_model(gone), sim_model(asleep), sim_model(kept)], tmp_path / "state")
    path.write_text(yaml.safe_dump(doc))
    kv = await start_kvsleep(doc, config_path=str(path))
    try:
        assert await kv.manager.put_model_to_sleep("org/asleep", manual=True)
        await asleep.sim.control_lock.acquire()  # its wake waits
        async with aiohttp.ClientSession() as session:

            async def call(model: str, stream: bool) -> int:
                body = {"model": model, "prompt": "x", "max_tokens": 8, "stream": stream}
                async with session.post(kv.url + "/v1/completions", json=body) as resp:
                    await resp.read()
                    return resp.status

            streams = [asyncio.create_task(call("org/gone", True)) for _ in range(3)]
            held = [asyncio.create_task(call("org/asleep", False)) for _ in range(3)]
            while (
                kv.manager.slots["org/gone"].in_engine < 3
                or len(kv.manager.slots["org/asleep"].waiters) < 3
            ):
                await asyncio.sleep(0.01)
            doc["models"] = [sim_model(kept)]
            path.write_text(yaml.safe_dump(doc))
            async with session.post(kv.url + "/-/reload") as resp:
                assert resp.status == 200, await resp.text()
            assert await asyncio.gather(*streams) == [200] * 3
            assert await asyncio.gather(*held) == [503] * 3
            async with session.get(kv.url + "/metrics") as resp:
                exposition = await resp.text()
            for name in ("org/gone", "org/asleep"):
                assert f'model="{name}"' not in exposition
            assert await call("org/kept", False) == 200
            kv.clock.advance(10)
            async with session.get(kv.url + "/models/idle?threshold=1") as resp:
                assert (await resp.json())["idle_models"] == ["org/kept"]
            async with session.get(kv.url + "/traffic/stats") as resp:
                assert set((await resp.json())["traffic_stats"]) == {"org/kept"}
    finally:
        if asleep.sim.control_lock.locked():
            asleep.sim.control_lock.release()
        await kv.close()


async def test_held_streams_and_long_generations_outlast_the_client_timeouts(
    sim_factory, kvsleep_factory
):
    """The connection limits bound idle and slow clients only: a stream held through a 2.5 s
    wake and a 3 s generation both finish under 1 s idle, head and body timeouts."""
    slow_wake = await sim_factory("vllm", "asleep", wake_latency=2.5)
    slow_tokens = await sim_factory("sglang", "long", tokens_per_second=4)
    limits = {"idle_timeout_seconds": 1, "header_timeout_seconds": 1, "body_timeout_seconds": 1}
    kv = await kvsleep_factory([sim_model(slow_wake), sim_model(slow_tokens)], router=limits)
    assert await kv.manager.put_model_to_sleep("asleep", manual=True)
    async with aiohttp.ClientSession() as session:

        async def stream(model: str, tokens: int) -> bytes:
            body = {
                "model": model,
                "prompt": "x",
                "max_tokens": tokens,
                "stream": True,
                "ignore_eos": True,
            }
            async with session.post(kv.url + "/v1/completions", json=body) as resp:
                assert resp.status == 200
                return await resp.read()

        held, long = await asyncio.gather(stream("asleep", 2), stream("long", 12))
    assert held.endswith(b"data: [DONE]\n\n") and long.endswith(b"data: [DONE]\n\n")
    assert long.count(b"data: {") >= 12  # one event per token (SGLang adds a final one)
    registry = kv.server.metrics.registry
    for reason in ("idle_timeout", "header_timeout", "body_timeout", "limit"):
        closed = registry.get_sample_value(
            "kvsleep_client_connections_closed_total", {"reason": reason}
        )
        assert closed == 0, reason
