"""Malformed input, by class: each gets its documented 4xx (or config error) and changes nothing.

For every class: model states and held queues unchanged, the engines got no request and no
control call, /metrics has exactly the series it had before (unbounded input never becomes a
label), and no log record carries a traceback. Per-class status codes of the OpenAI routes are
also in test_router.py (`test_bad_request_bodies_get_openai_400`, 413 tests) and 10,000 unknown
models in test_metrics.py (`test_unknown_models_never_become_series`); this file adds the
invariants above, the classes those tests lack (bad Content-Encoding, hostile model names and
paths on the control routes, X-Request-Timeout, HTTP framing), Alertmanager payloads beyond
test_alertmanager.py, and config files beyond test_config.py.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import os
import zlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
import yarl
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvsleep import cli
from kvsleep.config import ConfigError, load_config
from kvsleep.web.alertmanager import PayloadError, parse_webhook
from tests.invariants import Snapshot, assert_no_traceback, series
from tests.kvsleep_harness import config_doc, sim_model, start_kvsleep

V, S = "org/llama", "org/qwen"
ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/embeddings")
LIMIT = 256 * 1024
VALID = {
    "/v1/completions": {"prompt": "x", "max_tokens": 1},
    "/v1/chat/completions": {"messages": [{"role": "user", "content": "x"}], "max_tokens": 1},
    "/v1/embeddings": {"input": "x"},
}


def body(endpoint: str, **fields: Any) -> bytes:
    return json.dumps({**VALID[endpoint], **fields}).encode()


@pytest.fixture
async def env(sim_factory, tmp_path, caplog) -> AsyncIterator[dict[str, Any]]:
    """kvsleep in front of a vLLM and an SGLang engine, warmed up so that every series a
    good request or an unknown model creates already exists; caplog records from INFO."""
    caplog.set_level(logging.INFO)
    sims = [await sim_factory("vllm", V), await sim_factory("sglang", S)]
    path = tmp_path / "kvsleep.yaml"
    doc = config_doc(
        [sim_model(s) for s in sims], tmp_path / "state", router={"max_body_bytes": LIMIT}
    )
    path.write_text(yaml.safe_dump(doc))
    kv = await start_kvsleep(doc, config_path=str(path))
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        for endpoint in ENDPOINTS:
            for model in (V, S, "warm-up/unknown"):
                async with session.post(
                    kv.url + endpoint,
                    data=body(endpoint, model=model),
                    headers={"Content-Type": "application/json"},
                ) as r:
                    assert r.status == (404 if model.startswith("warm") else 200)
        try:
            yield {"kv": kv, "sims": sims, "session": session, "path": path, "doc": doc}
        finally:
            await kv.close()
    for sim in sims:
        stats = sim.sim.stats()
        assert stats["hazards"] == {} and stats["requests"]["served_while_not_awake"] == 0


async def refused(
    env: dict[str, Any],
    caplog,
    what: str,
    send: Callable[[], Any],
    *,
    errors_allowed_from: tuple[str, ...] = (),
    ignored: tuple[str, ...] = (),
) -> None:
    """Run `send` (which asserts each answer) between two snapshots that must be equal."""
    before = await Snapshot.take(env["session"], env["kv"], env["sims"])
    caplog.clear()
    await send()
    after = await Snapshot.take(env["session"], env["kv"], env["sims"])
    before.assert_unchanged(after, what)
    assert_no_traceback(
        caplog.records, what, errors_allowed_from=errors_allowed_from, ignored=ignored
    )


async def expect(
    session: aiohttp.ClientSession,
    method: str,
    url: str | yarl.URL,
    status: int,
    code: Any = "any",
    **kwargs: Any,
) -> dict[str, Any]:
    """One request whose answer must be `status` with an OpenAI-shaped error `code`."""
    async with session.request(method, url, **kwargs) as resp:
        raw = await resp.read()
        assert resp.status == status, (url, resp.status, raw[:300])
        assert resp.content_type == "application/json", (url, raw[:300])
    doc = json.loads(raw)
    assert set(doc) == {"error"} and set(doc["error"]) == {"message", "type", "param", "code"}
    if code != "any":
        assert doc["error"]["code"] == code, (url, doc)
    return doc["error"]


# ---- the OpenAI routes -------------------------------------------------------------------

JSON = {"Content-Type": "application/json"}


def cases(endpoint: str) -> dict[str, list[tuple[bytes, dict[str, str], int, str]]]:
    """class -> [(body, headers, status, error code)] for one endpoint."""
    deep = b'{"model": "org/llama", "x": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"
    good = body(endpoint, model=V)
    return {
        "not-json": [
            (raw, JSON, 400, "invalid_json")
            for raw in (
                b"{not json",
                b"",
                b'{"model": "org/llama"',
                b"\xff\xfe{}",
                b"\x00",
                b'{"model": "org/llama", "prompt": "\xff\xfe"}',
                b'{"model": "org/llama",}',
                b'{"model": "org/llama", "x": NaN',
                b'{"model": "org/llama", "x": 1' + b"1" * 5000 + b"}",
            )
        ],
        "not-an-object": [
            (raw, JSON, 400, "invalid_json")
            for raw in (b"[1, 2]", b'"org/llama"', b"null", b"42", b"true", b"[]")
        ],
        "deep-nesting": [
            (b"[" * 100_000, JSON, 400, "invalid_json"),
            (b"{" * 100_000, JSON, 400, "invalid_json"),
            (deep, JSON, 400, "invalid_json"),
        ],
        "wrong-model-type": [
            (body(endpoint, model=m), JSON, 400, code)
            for m, code in (
                (7, "invalid_model"),
                (["org/llama"], "invalid_model"),
                ({"id": V}, "invalid_model"),
                (True, "invalid_model"),
                ("", "invalid_model"),
                (None, "missing_model"),
                (1.5, "invalid_model"),
            )
        ]
        + [(json.dumps(VALID[endpoint]).encode(), JSON, 400, "missing_model")],
        "stream-not-bool": [
            (body(endpoint, model=V, stream=s), JSON, 400, "invalid_type")
            for s in ("true", 1, 0, [], {}, "false")
        ],
        "bad-content-encoding": [
            (b"not gzip at all", {**JSON, "Content-Encoding": "gzip"}, 400, "invalid_body"),
            (b"xx", {**JSON, "Content-Encoding": "deflate"}, 400, "invalid_body"),
            (
                gzip.compress(b"{not json"),
                {**JSON, "Content-Encoding": "gzip"},
                400,
                "invalid_json",
            ),
            (
                gzip.compress(gzip.compress(good)),
                {**JSON, "Content-Encoding": "gzip"},
                400,
                "invalid_json",
            ),
            (zlib.compress(b"[1]"), {**JSON, "Content-Encoding": "deflate"}, 400, "invalid_json"),
        ],
        "bad-deadline-header": [
            (good, {**JSON, "X-Request-Timeout": t}, 400, "invalid_header")
            for t in ("nan", "-1", "0", "inf", "1e400", "", "soon", "5s")
        ],
        "hostile-model-names": [
            (body(endpoint, model=m), JSON, 404, "model_not_found")
            for m in (
                "../x",
                "org/../org/llama",
                "org/./llama",
                "/org/llama",
                "org/llama/",
                "%2e%2e",
                "org%2Fllama",
                "org%2fllama",
                "org/llama\x00",
                "org/llama\n",
                "\x1b[31morg/llama",
                "org/llama ",
                " org/llama",
                "ORG/LLAMA",
                "org/ll\u0430ma",
                "org\\llama",
                "a" * 50_000,
                "'; DROP TABLE models; --",
                "${jndi:ldap://x}",
                "{{7*7}}",
            )
        ],
    }


CLASSES = tuple(cases("/v1/completions"))


@pytest.mark.parametrize("klass", CLASSES)
async def test_openai_routes_refuse_each_class_and_change_nothing(klass, env, caplog):
    session, kv = env["session"], env["kv"]

    async def send() -> None:
        for endpoint in ENDPOINTS:
            for raw, headers, status, code in cases(endpoint)[klass]:
                await expect(
                    session, "POST", kv.url + endpoint, status, code, data=raw, headers=headers
                )

    await refused(env, caplog, klass, send)


async def test_bodies_over_the_limit_are_413_however_they_are_sent(env, caplog):
    session, kv = env["session"], env["kv"]
    big = body("/v1/completions", model=V, prompt="a" * LIMIT)

    async def chunked() -> AsyncIterator[bytes]:
        for start in range(0, len(big), 8192):
            yield big[start : start + 8192]

    # A few kB of gzip that would inflate to 4 MiB: the limit counts decoded bytes.
    bomb = gzip.compress(b'{"model": "org/llama", "prompt": "' + b"a" * (16 * LIMIT))
    assert len(bomb) < LIMIT // 8

    async def send() -> None:
        for endpoint in ENDPOINTS:
            url = kv.url + endpoint
            await expect(session, "POST", url, 413, 413, data=big, headers=JSON)
            await expect(session, "POST", url, 413, 413, data=chunked(), headers=JSON)
            await expect(
                session,
                "POST",
                url,
                413,
                413,
                data=bomb,
                headers={**JSON, "Content-Encoding": "gzip"},
            )
        await expect(session, "POST", kv.url + "/alertmanager/webhook", 413, 413, data=big)

    await refused(env, caplog, "over the size limit", send)


async def test_distinct_unknown_and_hostile_models_never_become_series(env, caplog):
    """Fewer than test_metrics' 10,000 (same mechanism), with names built to look like labels,
    paths and escapes."""
    session, kv = env["session"], env["kv"]
    names = [f'ghost-{i}"}} x{{model="{i}' if i % 3 else f"../ghost/{i}\n" for i in range(600)]

    async def send() -> None:
        for i, name in enumerate(names):
            endpoint = ENDPOINTS[i % 3]
            await expect(
                session,
                "POST",
                kv.url + endpoint,
                404,
                "model_not_found",
                data=body(endpoint, model=name),
                headers=JSON,
            )

    await refused(env, caplog, "unknown models", send)
    text = "\n".join(f"{n}{sorted(lbl)}" for n, lbl in await series(session, kv.url))
    assert "ghost" not in text


# ---- the control routes ------------------------------------------------------------------

HOSTILE_PATHS = (
    # raw dot segments and slashes (sent unnormalized)
    "../x",
    "..",
    ".",
    "org/x/../llama",
    "./org/llama",
    "org/llama/.",
    "org/llama/",
    "/org/llama",
    "org//llama",
    "org/llama/..",
    "../../../../etc/passwd",
    # percent-encoding tricks: decoded once, never twice, and never matched after decoding
    "%2e%2e",
    "%2E%2E%2Fx",
    "org%2F..%2Fllama",
    "..%2F..%2Fetc%2Fpasswd",
    "org%252Fllama",
    "org%2Fllama%00",
    "org%00",
    "%00",
    "org%2Fllama%0A",
    "%0d%0aX-Injected:%201",
    "org%2Fllama%20",
    "%c0%ae%c0%ae",
    "%ff%fe",
    "org%2fll%D0%B0ma",
    "%",
    # other unknown names
    "ORG/LLAMA",
    "org/llama;sleep",
    "org/llama%3Fx=1",
    "org/llama%23",
    "a" * 4000,
)


async def test_control_routes_refuse_hostile_model_paths_and_change_nothing(env, caplog):
    session, kv = env["session"], env["kv"]

    async def send() -> None:
        for name in HOSTILE_PATHS:
            for template in (
                "/models/{}/sleep",
                "/models/{}/wake",
                "/action/sleep/{}",
                "/action/wakeup/{}",
            ):
                url = yarl.URL(kv.url + template.format(name), encoded=True)
                async with session.post(url) as resp:
                    raw = await resp.read()
                    # An unknown model, or (a newline in the path) no such route: 404 JSON.
                    assert (resp.status, resp.content_type) == (404, "application/json"), (
                        url,
                        raw[:200],
                    )
                    error = json.loads(raw)["error"]
                    if isinstance(error, str):  # kvcached's routes: {"error": "text"}
                        assert template.startswith("/action/") and "not found" in error, raw
                    else:
                        assert error["code"] in ("model_not_found", 404), raw
        for i in range(1000):  # distinct unknown names: nothing keyed by them
            await expect(
                session, "POST", f"{kv.url}/models/ghost%2F{i}/sleep", 404, "model_not_found"
            )

    await refused(env, caplog, "control paths", send)


# ---- HTTP framing --------------------------------------------------------------------------


async def raw_exchange(url: str, data: bytes) -> bytes:
    host, port = yarl.URL(url).host, yarl.URL(url).port
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()


FRAMING = {
    "bad Content-Length": b"Content-Length: abc\r\n\r\n",
    "two Content-Lengths": b"Content-Length: 2\r\nContent-Length: 3\r\n\r\n{}x",
    "bad chunk size": b"Transfer-Encoding: chunked\r\n\r\nzz\r\n",
    "control character in a header": b"X-Note: a\x01b\r\nContent-Length: 2\r\n\r\n{}",
    "header over 8 KiB": b"X-Big: " + b"a" * 20_000 + b"\r\nContent-Length: 2\r\n\r\n{}",
    "brotli body without Brotli": b"Content-Encoding: br\r\nContent-Length: 2\r\n\r\n{}",
}


async def test_http_framing_errors_are_refused_by_the_parser(env, caplog):
    """aiohttp's parser answers these 400 before kvsleep sees a request. aiohttp would log each
    at ERROR with a traceback (logger aiohttp.server); kvsleep turns that into one DEBUG line,
    so a client cannot flood the log."""
    kv = env["kv"]

    async def send() -> None:
        for what, rest in FRAMING.items():
            for head in (
                b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n",
                b"POST /models/org%2Fllama/sleep HTTP/1.1\r\nHost: x\r\n",
            ):
                answer = await raw_exchange(kv.url, head + rest)
                assert answer.split(b"\r\n", 1)[0].endswith(b" 400 Bad Request"), (what, answer)
        for line in (b"POST /v1/comp\x00letions HTTP/1.1", b"GARBAGE", b"POST /models/a\x7f/sleep"):
            answer = await raw_exchange(kv.url, line + b"\r\nHost: x\r\n\r\n")
            assert b" 400 " in answer.split(b"\r\n", 1)[0], (line, answer)

    await refused(env, caplog, "HTTP framing", send, ignored=("aiohttp.server",))
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not [r for r in caplog.records if r.exc_info]


# ---- Alertmanager payloads -----------------------------------------------------------------


def alert(model: str = V, action: str = "sleep", **labels: Any) -> dict[str, Any]:
    return {
        "status": "firing",
        "labels": {"alertname": "X", "model": model, "action": action, **labels},
    }


def payload(*alerts: Any, **extra: Any) -> dict[str, Any]:
    return {
        "version": "4",
        "status": "firing",
        "receiver": "kvsleep",
        "alerts": list(alerts),
        **extra,
    }


WEBHOOK_CASES: list[tuple[str, bytes, dict[str, str], int]] = [
    ("deep nesting", b"[" * 100_000, JSON, 400),
    (
        "deep nesting in labels",
        json.dumps(payload(alert())).encode().replace(b'"X"', b"[" * 10_000 + b"]" * 10_000),
        JSON,
        400,
    ),
    ("invalid UTF-8", b'{"version": "4", "alerts": [\xff]}', JSON, 400),
    ("bogus charset", b'{"version": 4}', {"Content-Type": "application/json; charset=bogus"}, 400),
    ("bad gzip", b"not gzip", {**JSON, "Content-Encoding": "gzip"}, 400),
    ("empty", b"", JSON, 400),
    ("not an object", b'[{"version": "4"}]', JSON, 400),
    ("version as a number", json.dumps({**payload(alert()), "version": 4}).encode(), JSON, 400),
    ("alerts null", json.dumps({**payload(), "alerts": None}).encode(), JSON, 400),
    ("label value not a string", json.dumps(payload(alert(model=[V]))).encode(), JSON, 400),
    ("status unknown", json.dumps(payload(alert() | {"status": "pending"})).encode(), JSON, 400),
    ("path-like model", json.dumps(payload(alert(model="org/x/../llama"))).encode(), JSON, 400),
    ("encoded model", json.dumps(payload(alert(model="org%2Fllama"))).encode(), JSON, 400),
    ("model with NUL", json.dumps(payload(alert(model=V + "\x00"))).encode(), JSON, 400),
    ("unknown action", json.dumps(payload(alert(action="reboot"))).encode(), JSON, 400),
    # Refused whole: the valid alerts before the bad one are not acted on either.
    (
        "1,500 alerts, the last one bad",
        json.dumps(
            payload(
                *[alert(V if i % 2 else S, "sleep") for i in range(1500)], alert(model="nobody/x")
            )
        ).encode(),
        JSON,
        400,
    ),
]


async def test_malformed_alertmanager_payloads_are_refused_whole(env, caplog):
    session, kv = env["session"], env["kv"]

    async def send() -> None:
        for what, raw, headers, status in WEBHOOK_CASES:
            err = await expect(
                session, "POST", kv.url + "/alertmanager/webhook", status, data=raw, headers=headers
            )
            assert err["code"] in ("invalid_payload", "invalid_body"), (what, err)

    await refused(env, caplog, "webhook payloads", send)


# ---- config files --------------------------------------------------------------------------

LAUGHS = (
    "a: &a ["
    + ", ".join(['"lol"'] * 9)
    + "]\n"
    + "".join(
        f"{c}: &{c} [" + ", ".join([f"*{p}"] * 9) + "]\n"
        for p, c in zip("abcdefgh", "bcdefghi", strict=True)
    )
)

CONFIGS: dict[str, bytes] = {
    "NUL byte": b"models:\x00\n",
    "escape character": b"router:\n  host: \x1b[2J\nmodels: []\n",
    "deeply nested list": b"models: " + b"[" * 5000 + b"]" * 5000 + b"\n",
    "deeply nested mapping": b"models:\n"
    + b"".join(b"  " * i + b"k%d:\n" % i for i in range(1, 3000)),
    "not UTF-8": b"models:\n  - name: \xff\xfe\n",
    "binary": bytes(range(256)) * 4,
    "python tag": b"models: !!python/object/apply:os.system ['echo PWNED']\n",
    "billion laughs": (LAUGHS + "models: *i\n").encode(),
    "billion laughs in a command": (
        LAUGHS + "models:\n  - {name: m, engine: vllm, url: 'http://127.0.0.1:1', command: *i}\n"
    ).encode(),
    "integer of 5,000 digits": b"router:\n  port: " + b"9" * 5000 + b"\nmodels: []\n",
    "empty": b"",
    "only a comment": b"# nothing\n",
    "a list": b"- models\n",
    "tab indentation": b"models:\n\t- name: m\n",
    "unterminated string": b'models: "abc\n',
}


@pytest.mark.parametrize("what", list(CONFIGS))
def test_malformed_config_files_are_config_errors(what, tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_bytes(CONFIGS[what])
    with pytest.raises(ConfigError) as caught:
        load_config(str(path))
    problems = caught.value.problems
    assert problems, what
    for problem in problems:
        assert problem.startswith(f"{path}: "), problem
        assert "\n" not in problem and len(problem) < 1000, problem
    assert "PWNED" not in capsys.readouterr().out
    assert cli.main(["check-config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == problems and "Traceback" not in err


def test_a_directory_or_a_missing_file_is_a_config_error(tmp_path):
    for path in (tmp_path, tmp_path / "missing.yaml"):
        with pytest.raises(ConfigError) as caught:
            load_config(str(path))
        assert caught.value.problems[0].startswith(f"{path}: cannot read the file")


async def test_reload_of_malformed_files_is_refused_and_changes_nothing(env, caplog):
    session, kv, path = env["session"], env["kv"], env["path"]
    good = path.read_bytes()

    async def send() -> None:
        for what in (
            "NUL byte",
            "deeply nested list",
            "not UTF-8",
            "billion laughs",
            "python tag",
            "empty",
        ):
            path.write_bytes(CONFIGS[what])
            async with session.post(kv.url + "/-/reload") as resp:
                assert resp.status == 400, what
                answer = await resp.json()
            assert answer["status"] == "error" and answer["errors"][0].startswith(f"{path}: ")
        os.chmod(path, 0)  # unreadable, or (as root) readable and empty: refused either way
        try:
            async with session.post(kv.url + "/-/reload") as resp:
                assert resp.status == 400
        finally:
            os.chmod(path, 0o644)

    await refused(env, caplog, "reload", send, errors_allowed_from=("kvsleep.web.server",))
    values = await series(session, kv.url)
    assert values[("kvsleep_config_last_reload_successful", frozenset())] == 0.0
    path.write_bytes(good)
    async with session.post(kv.url + "/-/reload") as resp:
        assert resp.status == 200
    assert (await series(session, kv.url))[
        ("kvsleep_config_last_reload_successful", frozenset())
    ] == 1.0
    assert Path(path).read_bytes() == good


# ---- property tests: the text paths the existing ones (parse_config, parse_model) skip ------

YAML_BITS = st.sampled_from(
    [
        "models:",
        "router:",
        "- ",
        "[",
        "]",
        "{",
        "}",
        ": ",
        ", ",
        "&a ",
        "*a",
        "!!python/name:x ",
        "!!binary ",
        "\x00",
        "\t",
        "\n",
        "  ",
        "name: m",
        "engine: vllm",
        "url: http://x:1",
        "'",
        '"',
        "%YAML 1.1\n",
        "---\n",
        "...\n",
        "? ",
        "|\n",
        ">\n",
        "#",
        "\ufeff",
        "\x85",
        "\u2028",
        "1e999",
        "9" * 30,
        "~",
        "<<: *a",
        "\\",
        "\x1b",
        "\r",
    ]
)


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.one_of(
        st.binary(max_size=300),
        st.lists(YAML_BITS, max_size=40).map(
            lambda bits: "".join(bits).encode("utf-8", "surrogatepass")
        ),
    )
)
def test_any_config_file_gives_a_config_or_config_errors(tmp_path, raw: bytes) -> None:
    path = tmp_path / "fuzz.yaml"
    path.write_bytes(raw)
    try:
        load_config(str(path))
    except ConfigError as error:
        assert error.problems
        for problem in error.problems:
            assert problem.startswith(f"{path}: ") and "\n" not in problem.rstrip(), problem


ALERT_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.text(max_size=8)
    | st.sampled_from(["4", "firing", "resolved", "sleep", "wake", "org/a", "model", "action"]),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.sampled_from(
                ["version", "alerts", "status", "labels", "model", "action", "alertname"]
            )
            | st.text(max_size=4),
            inner,
            max_size=5,
        )
    ),
    max_leaves=25,
)


@settings(max_examples=500, deadline=None)
@given(ALERT_JSON)
def test_any_webhook_document_gives_actions_on_known_models_or_a_refusal(doc: Any) -> None:
    try:
        actions = parse_webhook(doc, {"org/a"})
    except PayloadError as exc:
        assert str(exc)
    else:
        assert all(a.model == "org/a" and a.action in ("sleep", "wake") for a in actions)
