"""Access to the control routes (sleep, wake, reload, Alertmanager webhook).

With a token configured every control route wants exactly `Authorization: Bearer <token>`
(401 otherwise, compared with hmac.compare_digest whatever the lengths); the token never shows
in logs, metrics or JSON. Without a token they answer loopback clients only (403 otherwise).
The listener binds 127.0.0.1 by default, and /metrics and the OpenAI routes never ask for a
token. Complements test_sleep_manager.py (`test_control_routes_require_the_bearer_token_when_
configured`, the loopback check on a mocked request) and test_alertmanager.py (webhook token).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import secrets
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web

from kvsleep.config import RouterConfig, parse_config
from kvsleep.web.server import KvsleepServer, serve
from tests.invariants import Snapshot, assert_no_traceback
from tests.kvsleep_harness import FAST_RETRY, FakeClock, config_doc, sim_model

V = "org/llama"
ENV = "KVSLEEP_TEST_ACCESS_TOKEN"
SLEEP_ALERT = {
    "version": "4",
    "status": "firing",
    "receiver": "kvsleep",
    "alerts": [
        {"status": "firing", "labels": {"alertname": "Idle", "model": V, "action": "sleep"}}
    ],
}
# Every control route, with what a request to it carries.
CONTROL = [
    (f"/models/{V}/sleep", None),
    ("/models/org%2Fllama/wake", None),
    (f"/action/sleep/{V}", None),
    (f"/action/wakeup/{V}", None),
    ("/-/reload", None),
    ("/alertmanager/webhook", SLEEP_ALERT),
]


def assert_refused(route: str, raw: bytes, type_: str, code: str) -> None:
    """kvcached's routes answer errors as {"error": "text"}, kvsleep's in the OpenAI shape."""
    err = json.loads(raw)["error"]
    if route.startswith("/action/"):
        assert isinstance(err, str) and err, raw
    else:
        assert (err["type"], err["code"]) == (type_, code)


def non_loopback_ipv4() -> str | None:
    """This machine's address on its default route (a UDP connect sends nothing)."""
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("192.0.2.1", 9))
        address = s.getsockname()[0]
        if not address.startswith("127.") and address != "0.0.0.0":
            return address
    return None


@contextlib.asynccontextmanager
async def kvsleep_on(
    doc: dict[str, Any], host: str, config_path: Path | None = None
) -> AsyncIterator[tuple[Any, int]]:
    """kvsleep listening on `host` (a free port); yields (server, port)."""
    server = KvsleepServer(
        parse_config(doc, "<test>"),
        clock=FakeClock(),
        retry=FAST_RETRY,
        config_path=str(config_path) if config_path else None,
    )
    runner = web.AppRunner(
        server.app, handler_cancellation=True, access_log=None, shutdown_timeout=2.0
    )
    await runner.setup()
    try:
        await web.TCPSite(runner, host, 0).start()
        yield server, runner.addresses[0][1]
    finally:
        await runner.cleanup()


class Running:
    """Enough of the harness' RunningKvsleep for tests.invariants.Snapshot."""

    def __init__(self, server: KvsleepServer, url: str) -> None:
        self.server, self.url, self.manager = server, url, server.manager


async def call(
    session: aiohttp.ClientSession, url: str, doc: Any, authorization: str | None
) -> tuple[int, bytes]:
    headers = {} if authorization is None else {"Authorization": authorization}
    kwargs: dict[str, Any] = {"json": doc} if doc is not None else {}
    async with session.post(url, headers=headers, **kwargs) as resp:
        return resp.status, await resp.read()


async def raw_post(port: int, path: str, authorization: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(
            b"POST "
            + path.encode()
            + b" HTTP/1.1\r\nHost: x\r\nAuthorization: "
            + authorization
            + b"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()


@pytest.fixture
def token(monkeypatch) -> str:
    value = "tok-" + secrets.token_hex(16)
    monkeypatch.setenv(ENV, value)
    return value


def token_doc(sim: Any, tmp_path: Path) -> tuple[dict[str, Any], Path]:
    doc = config_doc([sim_model(sim)], tmp_path / "state", router={"admin_token_env": ENV})
    path = tmp_path / "kvsleep.yaml"
    path.write_text(yaml.safe_dump(doc))
    return doc, path


async def test_every_control_route_refuses_a_missing_or_wrong_token_with_401(
    token, sim_factory, tmp_path, caplog, monkeypatch
):
    caplog.set_level(logging.DEBUG)
    compared: list[tuple[int, int]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        compared.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    sim = await sim_factory("vllm", V)
    doc, path = token_doc(sim, tmp_path)
    wrong = [
        None,
        "",
        "Bearer",
        "Bearer ",
        f"Bearer {token[:-1]}",
        f"Bearer {token}x",
        f"Bearer {'x' * len(token)}",
        f"Bearer {token.upper()}",
        f"Basic {token}",
        token,
        f"Bearer {token} {token}",
        f"Token {token}",
        f"Bearer{token}",
        "Bearer " + "a" * 4000,
        f"Bearer {token}\u00e9",
    ]
    async with http_session() as session, kvsleep_on(doc, "127.0.0.1", path) as (server, port):
        url = f"http://127.0.0.1:{port}"
        kv = Running(server, url)
        before = await Snapshot.take(session, kv, [sim])
        for route, body in CONTROL:
            for authorization in wrong:
                status, raw = await call(session, url + route, body, authorization)
                assert status == 401, (route, authorization, raw)
                assert_refused(route, raw, "authentication_error", "unauthorized")
                assert token not in raw.decode()
            # Bytes that are not UTF-8 are a wrong token too (not a server error).
            answer = await raw_post(port, route, b"Bearer \xff\xfe" + token.encode())
            assert answer.startswith(b"HTTP/1.1 401 "), answer[:200]
        await asyncio.sleep(0.05)
        before.assert_unchanged(await Snapshot.take(session, kv, [sim]), "wrong tokens")
        assert_no_traceback(caplog.records, "wrong tokens")
        # One constant-time comparison per request, tokens of every length included.
        assert len(compared) == len(CONTROL) * (len(wrong) + 1)
        assert {a != b for a, b in compared} == {True, False}

        # Reading is never guarded; nor is inference, whatever Authorization it carries.
        for path_ in (
            "/metrics",
            "/sleep/status",
            "/v1/models",
            "/models",
            "/health",
            "/-/healthy",
            "/-/ready",
            "/sleep/candidates",
            "/traffic/stats",
        ):
            async with session.get(url + path_) as resp:
                assert resp.status == 200, path_
        for authorization in (None, "Bearer wrong"):
            status, _ = await call(
                session,
                url + "/v1/completions",
                {"model": V, "prompt": "x", "max_tokens": 1},
                authorization,
            )
            assert status == 200

        # The right token opens every route.
        right = f"Bearer {token}"
        status, raw = await call(session, url + f"/models/{V}/sleep", None, right)
        assert (status, server.manager.slots[V].state.value) == (200, "asleep"), raw
        status, raw = await call(session, url + "/models/org%2Fllama/wake", None, right)
        assert (status, server.manager.slots[V].state.value) == (200, "awake"), raw
        status, raw = await call(session, url + f"/action/sleep/{V}", None, right)
        assert (status, server.manager.slots[V].state.value) == (200, "asleep"), raw
        status, raw = await call(session, url + f"/action/wakeup/{V}", None, right)
        assert (status, server.manager.slots[V].state.value) == (200, "awake"), raw
        status, raw = await call(session, url + "/-/reload", None, right)
        assert status == 200 and json.loads(raw)["status"] == "success"
        status, raw = await call(session, url + "/alertmanager/webhook", SLEEP_ALERT, right)
        assert status == 200 and json.loads(raw)["actions"][0]["result"] == "sleep requested"
        for _ in range(250):
            if server.manager.slots[V].state.value == "asleep":
                break
            await asyncio.sleep(0.02)
        assert server.manager.slots[V].state.value == "asleep"
    assert sim.sim.stats()["hazards"] == {}


async def test_the_scheme_is_case_insensitive_and_401_names_it(token, sim_factory, tmp_path):
    """RFC 7235: the auth scheme is case-insensitive; a 401 says which scheme to use."""
    sim = await sim_factory("vllm", V)
    doc, path = token_doc(sim, tmp_path)
    async with http_session() as session, kvsleep_on(doc, "127.0.0.1", path) as (_, port):
        url = f"http://127.0.0.1:{port}/models/{V}/sleep"
        async with session.post(url, headers={"Authorization": "Basic x"}) as resp:
            assert resp.status == 401
            assert resp.headers["WWW-Authenticate"].startswith("Bearer")
        async with session.post(url, headers={"Authorization": f"bearer {token}"}) as resp:
            assert resp.status == 200, await resp.text()


async def test_the_token_never_appears_in_logs_metrics_or_json(
    token, sim_factory, tmp_path, caplog
):
    caplog.set_level(logging.DEBUG)
    sim = await sim_factory("sglang", V)
    doc, path = token_doc(sim, tmp_path)
    seen: list[str] = []
    async with http_session() as session, kvsleep_on(doc, "127.0.0.1", path) as (server, port):
        url = f"http://127.0.0.1:{port}"
        for authorization in (
            f"Bearer {token}",
            f"Bearer {token[:-2]}",
            f"Basic {token}",
            f"Bearer {token}{token}",
        ):
            for route, body in CONTROL:
                seen.append((await call(session, url + route, body, authorization))[1].decode())
            await asyncio.sleep(0.05)
        path.write_text("models: [")  # a rejected reload logs its problems
        seen.append((await call(session, url + "/-/reload", None, f"Bearer {token}"))[1].decode())
        path.write_text(yaml.safe_dump(doc))
        seen.append((await call(session, url + "/-/reload", None, f"Bearer {token}"))[1].decode())
        for get in (
            "/metrics",
            "/sleep/status",
            "/models",
            "/v1/models",
            "/health",
            "/traffic/stats",
            "/sleep/candidates",
            "/models/idle",
            "/models/active",
            f"/health/{V}",
            f"/traffic/stats/{V}",
        ):
            async with session.get(url + get) as resp:
                # /traffic/stats/M: 404 without traffic, as kvcached
                assert resp.status == (404 if get.startswith("/traffic/stats/") else 200), get
                seen.append(await resp.text())
        await server.manager.flush()
        seen.append((tmp_path / "state" / "state.json").read_text())
        seen.append(repr(server.config))
    seen.append(caplog.text)
    seen.extend(str(r.args) for r in caplog.records)
    assert len(caplog.records) > 5, "nothing was logged: the search proves nothing"
    assert any("reload rejected" in r.getMessage() for r in caplog.records)
    for text in seen:
        assert token not in text
        assert token[4:20] not in text  # no fragment either


async def test_without_a_token_control_routes_refuse_non_loopback_clients(
    sim_factory, tmp_path, caplog, monkeypatch
):
    address = non_loopback_ipv4()
    if address is None:
        pytest.skip("this machine has no non-loopback IPv4 address to connect from")
    caplog.set_level(logging.INFO)
    sim = await sim_factory("vllm", V)
    doc = config_doc([sim_model(sim)], tmp_path / "state")
    async with http_session() as session, kvsleep_on(doc, "0.0.0.0", None) as (server, port):
        remote, local = f"http://{address}:{port}", f"http://127.0.0.1:{port}"
        kv = Running(server, local)
        before = await Snapshot.take(session, kv, [sim])
        for route, body in CONTROL:
            status, raw = await call(session, remote + route, body, None)
            assert status == 403, (route, raw)
            assert_refused(route, raw, "permission_error", "forbidden")
            # A token offered where none is configured changes nothing.
            status, _ = await call(session, remote + route, body, "Bearer anything")
            assert status == 403
        before.assert_unchanged(await Snapshot.take(session, kv, [sim]), "non-loopback")
        assert_no_traceback(caplog.records, "non-loopback")
        # The same client reads and infers freely.
        status, _ = await call(
            session, remote + "/v1/completions", {"model": V, "prompt": "x", "max_tokens": 1}, None
        )
        assert status == 200
        for path_ in ("/metrics", "/sleep/status", "/v1/models"):
            async with session.get(remote + path_) as resp:
                assert resp.status == 200
        # A loopback client may act.
        status, raw = await call(session, local + f"/models/{V}/sleep", None, None)
        assert (status, server.manager.slots[V].state.value) == (200, "asleep"), raw

    # With a token configured, the token is what counts, wherever the client is.
    monkeypatch.setenv(ENV, "remote-ok")
    doc["router"]["admin_token_env"] = ENV
    async with http_session() as session, kvsleep_on(doc, "0.0.0.0", None) as (server, port):
        remote = f"http://{address}:{port}"
        assert (await call(session, remote + f"/models/{V}/wake", None, "Bearer nope"))[0] == 401
        status, raw = await call(session, remote + f"/models/{V}/wake", None, "Bearer remote-ok")
        assert (status, server.manager.slots[V].state.value) == (200, "awake"), raw
    assert sim.sim.stats()["hazards"] == {}


async def test_the_default_bind_address_is_loopback(sim_factory, tmp_path):
    assert RouterConfig().host == "127.0.0.1"
    sim = await sim_factory("vllm", V)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    doc = {
        "router": {"port": port},
        "models": [sim_model(sim)],
        "state_dir": str(tmp_path / "state"),
    }
    config = parse_config(doc)
    assert config.router.host == "127.0.0.1"
    server = KvsleepServer(config, retry=FAST_RETRY)
    stop = asyncio.Event()
    task = asyncio.create_task(serve(server, stop))
    try:
        async with http_session() as session:
            for _ in range(200):
                with contextlib.suppress(aiohttp.ClientConnectionError):
                    async with session.get(f"http://127.0.0.1:{port}/-/ready") as resp:
                        if resp.status == 200:
                            break
                await asyncio.sleep(0.02)
            else:
                pytest.fail("kvsleep did not become ready")
            address = non_loopback_ipv4()
            if address is not None:
                with pytest.raises(aiohttp.ClientConnectionError):
                    async with session.get(f"http://{address}:{port}/-/ready"):
                        pass
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


def http_session() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20))
