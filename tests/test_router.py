"""The OpenAI data path over real HTTP: relaying answers and streams, errors, in-flight tracking.

Every request goes to a real kvsleep server on 127.0.0.1 in front of in-process sim engines (or a
scripted engine where exact bytes or exact timing of the engine's writes must be controlled).
"""

from __future__ import annotations

import asyncio
import gzip
import json
import re
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.kvsleep_harness import sim_model

VLLM_MODEL = "meta-llama/Llama-3.2-1B"
SGLANG_MODEL = "Qwen/Qwen3-0.6B"
MODELS = {"vllm": VLLM_MODEL, "sglang": SGLANG_MODEL}
FLAVORS = ("vllm", "sglang")

BODIES: dict[str, dict[str, Any]] = {
    "/v1/completions": {"prompt": "Say something", "max_tokens": 5},
    "/v1/chat/completions": {
        "messages": [{"role": "user", "content": "Say something"}],
        "max_tokens": 5,
    },
    "/v1/embeddings": {"input": ["first text", "second text"]},
}
OBJECTS = {
    "/v1/completions": "text_completion",
    "/v1/chat/completions": "chat.completion",
    "/v1/embeddings": "list",
}
STREAMING = ("/v1/completions", "/v1/chat/completions")
ERROR_KEYS = {"message", "type", "param", "code"}

# The only bytes a sim engine varies between two identical requests.
_VARYING = re.compile(rb'"(id|created)": ("[^"]*"|\d+)')


def normalized(raw: bytes) -> bytes:
    return _VARYING.sub(rb'"\1": "*"', raw)


def sse_events(raw: bytes) -> list[str]:
    """The `data:` payloads of an SSE body, as the OpenAI client's decoder splits them."""
    events = []
    for block in raw.decode().replace("\r\n", "\n").split("\n\n"):
        data = [line[5:].lstrip(" ") for line in block.split("\n") if line.startswith("data:")]
        if data:
            events.append("\n".join(data))
    return events


def assert_openai_error(
    doc: Any, *, type_: str | None = None, param: Any = "any", code: Any = "any"
) -> dict[str, Any]:
    assert isinstance(doc, dict) and set(doc) == {"error"}, doc
    err = doc["error"]
    assert set(err) == ERROR_KEYS, err
    assert isinstance(err["message"], str) and err["message"], err
    if type_ is not None:
        assert err["type"] == type_, err
    if param != "any":
        assert err["param"] == param, err
    if code != "any":
        assert err["code"] == code, err
    return err


async def post_raw(
    http: aiohttp.ClientSession, url: str, body: Any, **kwargs: Any
) -> tuple[int, str, bytes, Any]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    async with http.post(url, data=data, headers=headers, **kwargs) as resp:
        return resp.status, resp.content_type, await resp.read(), resp.headers


def engine_saw_requests(sim: Any) -> int:
    return sum(1 for e in sim.sim.events if e["event"] == "request")


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def scrape(http: aiohttp.ClientSession, kv: Any, name: str, **labels: str) -> float | None:
    from prometheus_client.parser import text_string_to_metric_families

    async with http.get(f"{kv.url}/metrics") as resp:
        text = await resp.text()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return None


async def wait_for(predicate: Callable[[], Awaitable[bool] | bool], timeout: float = 5.0) -> None:
    """Poll `predicate` until true; fails the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if not isinstance(value, bool):
            value = await value
        if value:
            return
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as session:
        yield session


@pytest.fixture
async def scripted_engine() -> AsyncIterator[Callable[..., Awaitable[str]]]:
    """`await start(handler)`: an engine whose inference routes run `handler`; returns its URL."""
    runners: list[web.AppRunner] = []

    async def start(handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> str:
        app = web.Application()
        for path in BODIES:
            app.router.add_post(path, handler)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        runners.append(runner)
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        return f"http://127.0.0.1:{runner.addresses[0][1]}"

    yield start
    for runner in runners:
        await runner.cleanup()


# ---- answers and streams -----------------------------------------------------------------


@pytest.mark.parametrize("endpoint", list(BODIES))
@pytest.mark.parametrize("flavor", FLAVORS)
async def test_non_streaming_answer_is_the_engines(
    flavor, endpoint, sim_factory, kvsleep_factory, http
):
    sim = await sim_factory(flavor, MODELS[flavor])
    kv = await kvsleep_factory([sim_model(sim)])
    body = {"model": MODELS[flavor], **BODIES[endpoint]}

    d_status, d_type, direct, _ = await post_raw(http, sim.url + endpoint, body)
    status, ctype, relayed, _ = await post_raw(http, kv.url + endpoint, body)

    assert (status, ctype) == (d_status, d_type) == (200, "application/json")
    assert normalized(relayed) == normalized(direct)
    doc = json.loads(relayed)
    assert doc["object"] == OBJECTS[endpoint]
    assert doc["model"] == MODELS[flavor]
    if endpoint == "/v1/embeddings":
        assert relayed == direct  # deterministic vectors: nothing to normalize
        assert [d["index"] for d in doc["data"]] == [0, 1]
    else:
        assert doc["choices"][0]["finish_reason"] == "length"
        assert doc["usage"]["completion_tokens"] == 5


@pytest.mark.parametrize("endpoint", STREAMING)
@pytest.mark.parametrize("flavor", FLAVORS)
async def test_stream_is_relayed_byte_for_byte_and_parses_as_openai(
    flavor, endpoint, sim_factory, kvsleep_factory, http
):
    sim = await sim_factory(flavor, MODELS[flavor])
    kv = await kvsleep_factory([sim_model(sim)])
    body = {
        "model": MODELS[flavor],
        **BODIES[endpoint],
        "stream": True,
        "stream_options": {"include_usage": True},
    }

    d_status, d_type, direct, _ = await post_raw(http, sim.url + endpoint, body)
    status, ctype, relayed, headers = await post_raw(http, kv.url + endpoint, body)

    assert (status, ctype) == (d_status, d_type) == (200, "text/event-stream")
    assert headers.get("Cache-Control") == "no-cache"
    assert normalized(relayed) == normalized(direct)
    assert normalized(relayed) != relayed, "the sim's ids must have been normalized"

    # What the openai SDK's stream decoder would see.
    events = sse_events(relayed)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    chat = endpoint == "/v1/chat/completions"
    expected_object = "chat.completion.chunk" if chat else "text_completion"
    assert {c["object"] for c in chunks} == {expected_object}
    assert len({c["id"] for c in chunks}) == 1
    assert {c["model"] for c in chunks} == {MODELS[flavor]}
    content_chunks = [c for c in chunks if c["choices"]]
    if chat:
        assert content_chunks[0]["choices"][0]["delta"]["role"] == "assistant"
        text = "".join(c["choices"][0]["delta"].get("content") or "" for c in content_chunks)
    else:
        text = "".join(c["choices"][0]["text"] for c in content_chunks)
    assert len(text.split()) == 5
    assert content_chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 5


async def test_stream_bytes_pass_through_exactly(scripted_engine, kvsleep_factory, http):
    """Comments, CRLF framing, an event split across writes and a UTF-8 character split across
    writes all reach the client exactly as the engine wrote them."""
    pieces = [
        b": keep-alive\n\n",
        b'data: {"id":"x","object":"chat.completion.chunk","choices":[{"index":0,'
        b'"delta":{"role":"assistant","content":"caf\xc3',
        b'\xa9"}}]}\n',
        b"\n",
        b'data: {"id":"x","choices":[]}\r\n\r\n',
        b"event: ignored\nretry: 5\n\n",
        b"data: [DONE]\n\n",
    ]

    async def handler(request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "X-Engine-Trace": "abc123"}
        )
        await resp.prepare(request)
        for piece in pieces:
            await resp.write(piece)
            await asyncio.sleep(0.005)
        await resp.write_eof()
        return resp

    url = await scripted_engine(handler)
    kv = await kvsleep_factory([{"name": "scripted", "engine": "vllm", "url": url}])
    status, ctype, relayed, headers = await post_raw(
        http,
        f"{kv.url}/v1/chat/completions",
        {"model": "scripted", "messages": [{"role": "user", "content": "x"}], "stream": True},
    )
    assert (status, ctype) == (200, "text/event-stream")
    assert relayed == b"".join(pieces)
    assert headers["X-Engine-Trace"] == "abc123"


async def test_non_streaming_bytes_and_headers_pass_through_exactly(
    scripted_engine, kvsleep_factory, http
):
    payload = b'{ "id" : "x",\n  "object": "text_completion", "choices": [] }  \n'

    async def handler(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(
            body=payload,
            status=201,
            content_type="application/json",
            headers={"X-Engine-Trace": "t-1"},
        )

    url = await scripted_engine(handler)
    kv = await kvsleep_factory([{"name": "scripted", "engine": "sglang", "url": url}])
    status, ctype, relayed, headers = await post_raw(
        http, f"{kv.url}/v1/completions", {"model": "scripted", "prompt": "x"}
    )
    assert (status, ctype, relayed) == (201, "application/json", payload)
    assert headers["X-Engine-Trace"] == "t-1"


async def test_stream_chunk_reaches_client_while_engine_still_writing(
    scripted_engine, kvsleep_factory, http
):
    """Deterministic: the engine writes its second chunk only after the client has the first,
    so a router that buffers the stream would never deliver it."""
    client_has_first = asyncio.Event()
    engine_finished = asyncio.Event()

    async def handler(request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b'data: {"n": 1}\n\n')
        try:
            await asyncio.wait_for(client_has_first.wait(), 5)
        finally:
            await resp.write(b'data: {"n": 2}\n\ndata: [DONE]\n\n')
            await resp.write_eof()
            engine_finished.set()
        return resp

    url = await scripted_engine(handler)
    kv = await kvsleep_factory([{"name": "scripted", "engine": "vllm", "url": url}])
    body = {"model": "scripted", "prompt": "x", "stream": True}
    async with http.post(f"{kv.url}/v1/completions", json=body) as resp:
        first = await asyncio.wait_for(resp.content.readuntil(b"\n\n"), 3)
        assert first == b'data: {"n": 1}\n\n'
        assert not engine_finished.is_set()
        client_has_first.set()
        rest = await resp.read()
    assert rest == b'data: {"n": 2}\n\ndata: [DONE]\n\n'


@pytest.mark.parametrize("flavor", FLAVORS)
async def test_slow_stream_chunks_arrive_as_generated(flavor, sim_factory, kvsleep_factory, http):
    """A sim at 20 tokens/s needs >= 0.3 s after its first chunk; a buffering router would
    deliver every chunk at the same moment."""
    sim = await sim_factory(flavor, MODELS[flavor], tokens_per_second=20.0)
    kv = await kvsleep_factory([sim_model(sim)])
    body = {
        "model": MODELS[flavor],
        **BODIES["/v1/chat/completions"],
        "max_tokens": 6,
        "ignore_eos": True,
        "stream": True,
    }
    arrivals: list[float] = []
    buffer = b""
    async with http.post(f"{kv.url}/v1/chat/completions", json=body) as resp:
        assert resp.status == 200
        async for data in resp.content.iter_any():
            first = not arrivals
            buffer += data
            arrivals.extend([time.monotonic()] * (buffer.count(b"\n\n") - len(arrivals)))
            if first and arrivals:
                assert sim.sim.in_flight == 1, "first chunk arrived after the engine finished"
    assert sse_events(buffer)[-1] == "[DONE]"
    assert len(arrivals) == 9  # role chunk, 6 tokens, finish chunk, [DONE]
    assert arrivals[-1] - arrivals[0] >= 0.15


# ---- errors --------------------------------------------------------------------------------

BAD_BODIES = [
    pytest.param(b"{not json", "invalid_json", None, id="invalid-json"),
    pytest.param(b"", "invalid_json", None, id="empty-body"),
    pytest.param(b"[1, 2]", "invalid_json", None, id="array"),
    pytest.param(b'"hello"', "invalid_json", None, id="string"),
    pytest.param(b"null", "invalid_json", None, id="null"),
    pytest.param(b"\xff\xfe{", "invalid_json", None, id="not-utf8"),
    pytest.param(b"[" * 100_000, "invalid_json", None, id="deeply-nested"),
    pytest.param(b'{"prompt": "x"}', "missing_model", "model", id="missing-model"),
    pytest.param(b'{"model": null}', "missing_model", "model", id="null-model"),
    pytest.param(b'{"model": 7, "prompt": "x"}', "invalid_model", "model", id="int-model"),
    pytest.param(b'{"model": ["a"]}', "invalid_model", "model", id="list-model"),
    pytest.param(b'{"model": ""}', "invalid_model", "model", id="empty-model"),
    pytest.param(
        f'{{"model": "{VLLM_MODEL}", "prompt": "x", "stream": "true"}}'.encode(),
        "invalid_type",
        "stream",
        id="string-stream",
    ),
    pytest.param(
        f'{{"model": "{VLLM_MODEL}", "prompt": "x", "stream": 1}}'.encode(),
        "invalid_type",
        "stream",
        id="int-stream",
    ),
]


@pytest.mark.parametrize("endpoint", list(BODIES))
@pytest.mark.parametrize(("raw", "code", "param"), BAD_BODIES)
async def test_bad_request_bodies_get_openai_400(
    raw, code, param, endpoint, sim_factory, kvsleep_factory, http
):
    sim = await sim_factory("vllm", VLLM_MODEL)
    kv = await kvsleep_factory([sim_model(sim)])
    status, ctype, body, _ = await post_raw(http, kv.url + endpoint, raw)
    assert (status, ctype) == (400, "application/json")
    assert_openai_error(json.loads(body), type_="invalid_request_error", param=param, code=code)
    assert engine_saw_requests(sim) == 0, "a bad request must not reach the engine"


@pytest.mark.parametrize("endpoint", list(BODIES))
async def test_unknown_model_is_404_with_openai_message(
    endpoint, sim_factory, kvsleep_factory, http
):
    sim = await sim_factory("vllm", VLLM_MODEL)
    kv = await kvsleep_factory([sim_model(sim)])
    for name in ("x", "meta-llama/Llama-3.2-1B-Instruct", "sp ace`quote"):
        status, ctype, body, _ = await post_raw(
            http, kv.url + endpoint, {"model": name, **BODIES[endpoint]}
        )
        assert (status, ctype) == (404, "application/json")
        err = assert_openai_error(
            json.loads(body), type_="invalid_request_error", param="model", code="model_not_found"
        )
        assert err["message"] == f"The model `{name}` does not exist."
    assert engine_saw_requests(sim) == 0


@pytest.mark.parametrize("stream", [False, True])
async def test_unreachable_engine_is_502(stream, kvsleep_factory, http):
    url = f"http://127.0.0.1:{closed_port()}"
    kv = await kvsleep_factory([{"name": "gone", "engine": "vllm", "url": url}])
    status, ctype, body, _ = await post_raw(
        http, f"{kv.url}/v1/completions", {"model": "gone", "prompt": "x", "stream": stream}
    )
    assert (status, ctype) == (502, "application/json")
    err = assert_openai_error(json.loads(body), type_="server_error", code="engine_unreachable")
    assert "gone" in err["message"]
    assert kv.server.traffic.model_stats["gone"].in_flight == 0
    assert kv.server.traffic.model_stats["gone"].failed_requests == 1


@pytest.mark.parametrize("flavor", FLAVORS)
async def test_engine_that_never_answers_is_504(flavor, sim_factory, kvsleep_factory, http):
    sim = await sim_factory(flavor, MODELS[flavor])
    kv = await kvsleep_factory([sim_model(sim)], router={"upstream_timeout_seconds": 0.3})
    async with http.post(f"{sim.url}/sim/faults", json={"hang_requests": 1}) as resp:
        assert resp.status == 200
    status, ctype, body, _ = await asyncio.wait_for(
        post_raw(http, f"{kv.url}/v1/completions", {"model": MODELS[flavor], "prompt": "x"}), 10
    )
    assert (status, ctype) == (504, "application/json")
    assert_openai_error(json.loads(body), type_="server_error", code="engine_timeout")
    assert sim.sim.hung == 1
    # The next request is served normally.
    status, _, _, _ = await post_raw(
        http, f"{kv.url}/v1/completions", {"model": MODELS[flavor], "prompt": "x"}
    )
    assert status == 200


async def test_stream_that_stalls_past_the_timeout_ends_with_an_sse_error(
    sim_factory, kvsleep_factory, http
):
    sim = await sim_factory("sglang", SGLANG_MODEL, tokens_per_second=50.0)
    kv = await kvsleep_factory([sim_model(sim)], router={"upstream_timeout_seconds": 0.3})
    body = {
        "model": SGLANG_MODEL,
        **BODIES["/v1/chat/completions"],
        "max_tokens": 50,
        "ignore_eos": True,
        "stream": True,
    }
    async with http.post(f"{kv.url}/v1/chat/completions", json=body) as resp:
        assert resp.status == 200
        first = await asyncio.wait_for(resp.content.readuntil(b"\n\n"), 3)
        async with http.post(f"{sim.url}/pause_generation", json={"mode": "in_place"}) as r:
            assert r.status == 200
        rest = await asyncio.wait_for(resp.read(), 5)
    async with http.post(f"{sim.url}/continue_generation", json={}) as r:
        assert r.status == 200
    events = sse_events(first + rest)
    assert events[-1] == "[DONE]"
    assert_openai_error(json.loads(events[-2]), type_="server_error")
    await wait_for(lambda: sim.sim.in_flight == 0)
    assert kv.server.traffic.model_stats[SGLANG_MODEL].in_flight == 0


async def test_engine_crash_mid_stream_ends_with_an_sse_error(sim_factory, kvsleep_factory, http):
    sim = await sim_factory("vllm", VLLM_MODEL)
    kv = await kvsleep_factory([sim_model(sim)])
    async with http.post(f"{sim.url}/sim/faults", json={"crash_stream_after_chunks": 2}) as r:
        assert r.status == 200
    body = {"model": VLLM_MODEL, **BODIES["/v1/chat/completions"], "stream": True}
    status, ctype, raw, _ = await post_raw(http, f"{kv.url}/v1/chat/completions", body)
    assert (status, ctype) == (200, "text/event-stream")
    events = sse_events(raw)
    assert len(events) == 4, events  # two engine chunks, the error, [DONE]
    assert json.loads(events[0])["object"] == "chat.completion.chunk"
    assert_openai_error(json.loads(events[2]), type_="server_error")
    assert events[3] == "[DONE]"
    assert kv.server.traffic.model_stats[VLLM_MODEL].in_flight == 0
    assert (
        await scrape(
            http,
            kv,
            "kvsleep_requests_total",
            model=VLLM_MODEL,
            endpoint="/v1/chat/completions",
            code="502",
        )
        == 1
    )


async def test_body_over_the_limit_is_413_in_openai_shape(sim_factory, kvsleep_factory, http):
    sim = await sim_factory("vllm", VLLM_MODEL)
    kv = await kvsleep_factory([sim_model(sim)], router={"max_body_bytes": 1024})
    small = {"model": VLLM_MODEL, "prompt": "word " * 150, "max_tokens": 1}
    big = {"model": VLLM_MODEL, "prompt": "word " * 1000, "max_tokens": 1}
    assert len(json.dumps(small)) < 1024 < len(json.dumps(big))

    status, _, _, _ = await post_raw(http, f"{kv.url}/v1/completions", small)
    assert status == 200
    status, ctype, body, _ = await post_raw(http, f"{kv.url}/v1/completions", big)
    assert (status, ctype) == (413, "application/json")
    err = assert_openai_error(json.loads(body), type_="invalid_request_error")
    assert "1024" in err["message"]
    assert engine_saw_requests(sim) == 1


async def test_chunked_upload_over_the_limit_is_413(sim_factory, kvsleep_factory, http):
    """Without a Content-Length the limit still holds, counted as the body arrives."""
    sim = await sim_factory("vllm", VLLM_MODEL)
    kv = await kvsleep_factory([sim_model(sim)], router={"max_body_bytes": 1024})

    async def chunks() -> AsyncIterator[bytes]:
        yield f'{{"model": "{VLLM_MODEL}", "prompt": "'.encode()
        for _ in range(20):
            yield b"word " * 40
        yield b'"}'

    async with http.post(
        f"{kv.url}/v1/completions", data=chunks(), headers={"Content-Type": "application/json"}
    ) as resp:
        assert resp.status == 413
        assert_openai_error(await resp.json(), type_="invalid_request_error")
    assert engine_saw_requests(sim) == 0


@pytest.mark.parametrize("flavor", FLAVORS)
async def test_engine_errors_pass_through_unchanged(flavor, sim_factory, kvsleep_factory, http):
    sim = await sim_factory(flavor, MODELS[flavor])
    kv = await kvsleep_factory([sim_model(sim)])
    cases = [
        ("/v1/completions", {"model": MODELS[flavor], "prompt": "x", "max_tokens": 0}),
        ("/v1/chat/completions", {"model": MODELS[flavor], "messages": []}),
        ("/v1/chat/completions", {"model": MODELS[flavor], "messages": [], "stream": True}),
        ("/v1/embeddings", {"model": MODELS[flavor], "input": 42}),
    ]
    for endpoint, body in cases:
        direct = await post_raw(http, sim.url + endpoint, body)
        relayed = await post_raw(http, kv.url + endpoint, body)
        assert relayed[:3] == direct[:3]
        assert relayed[0] == 400
        doc = json.loads(relayed[2])
        # vLLM nests its error like OpenAI; SGLang keeps it flat. kvsleep changes neither.
        assert ("error" in doc) == (flavor == "vllm")
    assert kv.server.traffic.model_stats[MODELS[flavor]].failed_requests == len(cases)


async def test_engine_404_passes_through(sim_factory, kvsleep_factory, http):
    """A configured name the engine does not serve: the engine's own 404 reaches the client."""
    sim = await sim_factory("vllm", "served-name")
    kv = await kvsleep_factory([{"name": "alias", "engine": "vllm", "url": sim.url}])
    status, _, body, _ = await post_raw(
        http, f"{kv.url}/v1/completions", {"model": "alias", "prompt": "x"}
    )
    assert status == 404
    err = json.loads(body)["error"]
    assert err["message"] == "The model `alias` does not exist."
    assert (err["type"], err["code"]) == ("NotFoundError", 404)  # the engine's, not kvsleep's


async def test_request_headers_and_gzip_bodies_reach_the_engine_consistently(
    scripted_engine, kvsleep_factory, http
):
    """End-to-end headers reach the engine; a gzip body arrives decoded, so its
    Content-Encoding must not be forwarded with it."""
    seen: list[tuple[Any, bytes]] = []

    async def handler(request: web.Request) -> web.Response:
        seen.append((request.headers.copy(), await request.read()))
        return web.json_response({"object": "text_completion", "choices": []})

    url = await scripted_engine(handler)
    kv = await kvsleep_factory([{"name": "scripted", "engine": "vllm", "url": url}])
    plain = json.dumps({"model": "scripted", "prompt": "x"}).encode()
    headers = {
        "Content-Type": "application/json",
        "Authorization": "Bearer sk-test",
        "X-Request-Id": "req-7",
        "Connection": "keep-alive",
    }
    async with http.post(f"{kv.url}/v1/completions", data=plain, headers=headers) as resp:
        assert resp.status == 200
    async with http.post(
        f"{kv.url}/v1/completions",
        data=gzip.compress(plain),
        headers={**headers, "Content-Encoding": "gzip"},
    ) as resp:
        assert resp.status == 200, await resp.text()

    assert len(seen) == 2
    for got_headers, got_body in seen:
        assert got_body == plain
        assert got_headers["Authorization"] == "Bearer sk-test"
        assert got_headers["X-Request-Id"] == "req-7"
        assert "Content-Encoding" not in got_headers
        assert int(got_headers["Content-Length"]) == len(plain)


@pytest.mark.parametrize(
    ("method", "path", "status", "allow"),
    [
        ("GET", "/nope", 404, None),
        ("POST", "/v1/nope", 404, None),
        ("GET", "/v1/chat/completions", 405, "POST"),
        ("PUT", "/v1/completions", 405, "POST"),
        ("DELETE", "/v1/models", 405, "GET"),
    ],
)
async def test_unknown_routes_answer_json(method, path, status, allow, kvsleep_factory, http):
    url = f"http://127.0.0.1:{closed_port()}"
    kv = await kvsleep_factory([{"name": "m", "engine": "vllm", "url": url}])
    async with http.request(method, kv.url + path) as resp:
        assert resp.status == status
        assert resp.content_type == "application/json"
        assert_openai_error(await resp.json(), type_="invalid_request_error", code=status)
        if allow is not None:
            assert allow in {m.strip() for m in resp.headers["Allow"].split(",")}


# ---- in-flight accounting ------------------------------------------------------------------


async def test_stream_keeps_its_model_in_flight_until_the_end(sim_factory, kvsleep_factory, http):
    sim = await sim_factory("sglang", SGLANG_MODEL, tokens_per_second=100.0)
    kv = await kvsleep_factory([sim_model(sim)], idle_threshold_seconds=60)
    body = {
        "model": SGLANG_MODEL,
        **BODIES["/v1/chat/completions"],
        "max_tokens": 40,
        "ignore_eos": True,
        "stream": True,
    }
    traffic = f"{kv.url}/traffic/stats/{SGLANG_MODEL}"
    async with http.post(f"{kv.url}/v1/chat/completions", json=body) as resp:
        await asyncio.wait_for(resp.content.readuntil(b"\n\n"), 3)
        async with http.post(f"{sim.url}/pause_generation", json={"mode": "in_place"}) as r:
            assert r.status == 200
        # A long stream: far past the idle threshold, it is still not idle and not slept.
        kv.clock.advance(600)
        assert await scrape(http, kv, "kvsleep_requests_in_flight", model=SGLANG_MODEL) == 1
        async with http.get(traffic) as r:
            stats = (await r.json())["model_stats"]
        assert stats["in_flight"] == 1 and stats["idle_time_seconds"] == 0
        assert stats["is_idle"] is False
        await kv.reconcile()
        assert kv.state(SGLANG_MODEL) == "awake"
        assert sim.sim.in_flight == 1

        async with http.post(f"{sim.url}/continue_generation", json={}) as r:
            assert r.status == 200
        rest = await asyncio.wait_for(resp.read(), 5)
    assert sse_events(rest)[-1] == "[DONE]"
    assert await scrape(http, kv, "kvsleep_requests_in_flight", model=SGLANG_MODEL) == 0
    async with http.get(traffic) as r:
        stats = (await r.json())["model_stats"]
    assert stats["in_flight"] == 0 and stats["total_requests"] == 1
    assert stats["successful_requests"] == 1


@pytest.mark.parametrize("flavor", FLAVORS)
async def test_client_disconnect_mid_stream_releases_model_and_engine(
    flavor, sim_factory, kvsleep_factory, http
):
    sim = await sim_factory(flavor, MODELS[flavor], tokens_per_second=20.0)
    kv = await kvsleep_factory([sim_model(sim)])
    body = {
        "model": MODELS[flavor],
        **BODIES["/v1/completions"],
        "max_tokens": 200,
        "ignore_eos": True,
        "stream": True,
    }
    stats = kv.server.traffic.model_stats[MODELS[flavor]]
    resp = await http.post(f"{kv.url}/v1/completions", json=body)
    try:
        await asyncio.wait_for(resp.content.readuntil(b"\n\n"), 3)
        assert stats.in_flight == 1 and sim.sim.in_flight == 1
    finally:
        resp.close()  # drops the connection mid-stream

    await wait_for(lambda: stats.in_flight == 0 and sim.sim.in_flight == 0)
    assert sim.sim.aborted == 1 and sim.sim.completed == 0
    assert kv.manager.slots[MODELS[flavor]].in_engine == 0
    assert await scrape(http, kv, "kvsleep_requests_in_flight", model=MODELS[flavor]) == 0
    assert (
        await scrape(
            http,
            kv,
            "kvsleep_requests_total",
            model=MODELS[flavor],
            endpoint="/v1/completions",
            code="499",
        )
        == 1
    )
    # The model keeps serving.
    status, _, _, _ = await post_raw(
        http, f"{kv.url}/v1/completions", {"model": MODELS[flavor], "prompt": "x", "max_tokens": 1}
    )
    assert status == 200


async def test_client_gone_during_a_non_streaming_request_releases_the_model(
    sim_factory, kvsleep_factory, http
):
    sim = await sim_factory("sglang", SGLANG_MODEL, tokens_per_second=20.0)
    kv = await kvsleep_factory([sim_model(sim)])
    stats = kv.server.traffic.model_stats[SGLANG_MODEL]
    body = {"model": SGLANG_MODEL, "prompt": "x", "max_tokens": 100, "ignore_eos": True}
    request = asyncio.create_task(post_raw(http, f"{kv.url}/v1/completions", body))
    await wait_for(lambda: sim.sim.in_flight == 1)
    assert stats.in_flight == 1
    request.cancel()  # the client gives up and closes its connection
    with pytest.raises(asyncio.CancelledError):
        await request

    await wait_for(lambda: stats.in_flight == 0)
    assert kv.manager.slots[SGLANG_MODEL].in_engine == 0
    assert (
        await scrape(
            http,
            kv,
            "kvsleep_requests_total",
            model=SGLANG_MODEL,
            endpoint="/v1/completions",
            code="499",
        )
        == 1
    )
