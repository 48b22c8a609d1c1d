"""The Alertmanager webhook: firing alerts with `model` and `action` labels act on that model."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path

import aiohttp
import pytest
import yaml

from kvsleep.web.alertmanager import AlertAction, PayloadError, parse_webhook
from tests.kvsleep_harness import post_json, sim_model

MODELS = {"org/a", "org/b"}


def payload(*alerts: dict, status: str = "firing") -> dict:
    """A version-4 payload shaped as Alertmanager 0.25 sends it."""
    return {
        "receiver": "kvsleep",
        "status": status,
        "alerts": list(alerts),
        "groupLabels": {},
        "commonLabels": {},
        "commonAnnotations": {},
        "externalURL": "http://127.0.0.1:9093",
        "version": "4",
        "groupKey": "{}:{}",
        "truncatedAlerts": 0,
    }


def alert(model: str, action: str, status: str = "firing", **labels: str) -> dict:
    return {
        "status": status,
        "labels": {"alertname": "KvsleepModelIdle", "model": model, "action": action, **labels},
        "annotations": {},
        "startsAt": "2026-11-27T00:00:00Z",
        "endsAt": "0001-01-01T00:00:00Z",
        "generatorURL": "",
        "fingerprint": "abc",
    }


def test_parse_takes_firing_alerts_with_model_and_action_only():
    other = {"status": "firing", "labels": {"alertname": "Unrelated"}}
    actions = parse_webhook(
        payload(alert("org/a", "sleep"), alert("org/b", "wake", "resolved"), other), MODELS
    )
    assert actions == [AlertAction("org/a", "sleep", "KvsleepModelIdle")]


@pytest.mark.parametrize(
    ("doc", "reason"),
    [
        ([], "JSON object"),
        ({**payload(), "version": "3"}, "version"),
        ({**payload(), "alerts": {}}, "`alerts` must be a list"),
        (payload("nope"), "alerts[0] must be an object"),
        (payload({"status": "pending", "labels": {}}), "status"),
        (payload({"status": "firing", "labels": {"model": 1}}), "labels"),
        (payload(alert("org/a", "reboot")), "unknown action"),
        (payload(alert("org/zzz", "sleep")), "unknown model"),
    ],
)
def test_parse_refuses_payloads_that_can_never_be_acted_on(doc, reason):
    with pytest.raises(PayloadError, match=re.escape(reason)):
        parse_webhook(doc, MODELS)


async def test_webhook_sleeps_and_wakes_through_the_state_machine(sim_factory, kvsleep_factory):
    sim = await sim_factory("sglang", "org/a")
    pinned = await sim_factory("vllm", "org/b")
    kv = await kvsleep_factory([sim_model(sim), sim_model(pinned, always_on=True)])
    hook = f"{kv.url}/alertmanager/webhook"
    async with aiohttp.ClientSession() as session:
        status, body = await post_json(
            session, hook, payload(alert("org/a", "sleep"), alert("org/b", "sleep"))
        )
        assert status == 200, body
        assert body["actions"][1]["result"].startswith("ignored")
        await asyncio.wait_for(_until(lambda: kv.state("org/a") == "asleep"), 5)
        assert kv.state("org/b") == "awake"
        assert sim.sim.stats()["calls"]["/release_memory_occupation"] == 1

        status, _ = await post_json(session, hook, payload(alert("org/a", "wake", "resolved")))
        assert status == 200 and kv.state("org/a") == "asleep"

        status, body = await post_json(session, hook, payload(alert("org/a", "wake")))
        assert status == 200, body
        await asyncio.wait_for(_until(lambda: kv.state("org/a") == "awake"), 5)

        before = sim.sim.stats()["calls"]
        for bad in (
            payload(alert("org/a", "sleep"), alert("nobody/x", "sleep")),
            {"version": "4"},
            [1, 2],
        ):
            status, body = await post_json(session, hook, bad)
            assert status == 400, body
            assert "Alertmanager payload refused" in body["error"]["message"]
        async with session.post(hook, data=b"{not json") as resp:
            assert resp.status == 400
        await asyncio.sleep(0.05)
        assert kv.state("org/a") == "awake" and sim.sim.stats()["calls"] == before
    metrics = kv.server.metrics
    assert metrics.sleeps.labels("org/a", "alert", "ok")._value.get() == 1
    assert metrics.wakes.labels("org/a", "alert", "ok")._value.get() == 1


async def test_webhook_requires_the_admin_token_when_one_is_configured(
    sim_factory, tmp_path, monkeypatch
):
    from tests.kvsleep_harness import config_doc, start_kvsleep

    monkeypatch.setenv("KVSLEEP_TEST_TOKEN", "s3cret")
    sim = await sim_factory("vllm", "org/a")
    doc = config_doc([sim_model(sim)], tmp_path)
    doc["router"]["admin_token_env"] = "KVSLEEP_TEST_TOKEN"
    kv = await start_kvsleep(doc)
    try:
        hook = f"{kv.url}/alertmanager/webhook"
        async with aiohttp.ClientSession() as session:
            for headers in ({}, {"Authorization": "Bearer wrong"}):
                status, body = await post_json(
                    session, hook, payload(alert("org/a", "sleep")), headers=headers
                )
                assert status == 401, body
            assert kv.state("org/a") == "awake"
            status, _ = await post_json(
                session,
                hook,
                payload(alert("org/a", "sleep")),
                headers={"Authorization": "Bearer s3cret"},
            )
            assert status == 200
            await asyncio.wait_for(_until(lambda: kv.state("org/a") == "asleep"), 5)
    finally:
        await kv.close()


async def _until(predicate) -> None:
    while not predicate():
        await asyncio.sleep(0.02)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


ALERTMANAGER = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")


@pytest.mark.skipif(
    ALERTMANAGER is None,
    reason="prometheus-alertmanager is not installed (scripts/test installs it)",
)
async def test_real_alertmanager_alert_puts_the_model_to_sleep(
    sim_factory, kvsleep_factory, tmp_path: Path
):
    sim = await sim_factory("vllm", "org/a")
    kv = await kvsleep_factory([sim_model(sim)])
    port = _free_port()
    config = {
        "route": {
            "receiver": "null",
            "group_wait": "0s",
            "group_interval": "1s",
            "repeat_interval": "1h",
            "routes": [
                {
                    "receiver": "kvsleep",
                    "group_by": ["model", "action"],
                    "matchers": ['action=~"sleep|wake"'],
                }
            ],
        },
        "receivers": [
            {"name": "null"},
            {
                "name": "kvsleep",
                "webhook_configs": [
                    {"url": f"{kv.url}/alertmanager/webhook", "send_resolved": True}
                ],
            },
        ],
    }
    (tmp_path / "am.yml").write_text(yaml.safe_dump(config))
    proc = subprocess.Popen(
        [
            ALERTMANAGER,
            f"--config.file={tmp_path / 'am.yml'}",
            f"--storage.path={tmp_path / 'am-data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--cluster.listen-address=",
        ],
        stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "am.log").open("wb"),
    )
    try:
        base = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession() as session:
            deadline = time.monotonic() + 20
            while True:
                try:
                    async with session.get(f"{base}/-/ready") as resp:
                        if resp.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                assert time.monotonic() < deadline, (tmp_path / "am.log").read_text()
                await asyncio.sleep(0.1)
            body = [
                {
                    "labels": {
                        "alertname": "KvsleepModelIdle",
                        "model": "org/a",
                        "action": "sleep",
                        "severity": "info",
                    },
                    "annotations": {"summary": "org/a is idle"},
                }
            ]
            async with session.post(
                f"{base}/api/v2/alerts",
                data=json.dumps(body),
                headers={"Content-Type": "application/json"},
            ) as resp:
                assert resp.status == 200, await resp.text()
            await asyncio.wait_for(_until(lambda: kv.state("org/a") == "asleep"), 20)
        assert sim.sim.stats()["state"] == "asleep"
        assert not sim.sim.stats()["hazards"]
    finally:
        proc.terminate()
        proc.wait(10)
