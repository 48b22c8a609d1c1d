"""Hot reload: `POST /-/reload` and SIGHUP re-read the config; a bad file changes nothing."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time

import aiohttp
import yaml

from tests.kvsleep_harness import config_doc, sim_model, start_kvsleep


def metric(kv, name: str) -> float:
    return kv.server.metrics.registry.get_sample_value(name)


async def test_reload_applies_policy_and_models_and_rejects_bad_files(sim_factory, tmp_path):
    a = await sim_factory("vllm", "org/a")
    b = await sim_factory("sglang", "org/b")
    path = tmp_path / "kvsleep.yaml"
    doc = config_doc([sim_model(a)], tmp_path / "state", idle_threshold_seconds=600)
    path.write_text(yaml.safe_dump(doc))
    kv = await start_kvsleep(doc, config_path=str(path))
    try:
        async with aiohttp.ClientSession() as session:
            kv.clock.advance(120)
            assert await kv.reconcile() == []
            assert kv.state("org/a") == "awake"

            doc["sleep_manager"]["idle_threshold_seconds"] = 60
            doc["models"].append(sim_model(b, idle_threshold_seconds=30))
            path.write_text(yaml.safe_dump(doc))
            async with session.post(f"{kv.url}/-/reload") as resp:
                assert resp.status == 200, await resp.text()
            assert metric(kv, "kvsleep_config_last_reload_successful") == 1
            actions = await kv.reconcile()
            assert [(x.model, x.reason) for x in actions] == [("org/a", "idle")]
            async with session.post(
                f"{kv.url}/v1/completions", json={"model": "org/b", "prompt": "hi"}
            ) as resp:
                assert resp.status == 200
            assert (
                kv.server.metrics.registry.get_sample_value(
                    "kvsleep_model_idle_threshold_seconds", {"model": "org/b"}
                )
                == 30
            )

            path.write_text("sleep_manager:\n  idle_threshold_seconds: -5\nmodels: []\n")
            async with session.post(f"{kv.url}/-/reload") as resp:
                assert resp.status == 400
                body = await resp.json()
            assert any("idle_threshold_seconds" in e for e in body["errors"])
            assert metric(kv, "kvsleep_config_last_reload_successful") == 0
            assert set(kv.manager.slots) == {"org/a", "org/b"}

            doc["models"] = [sim_model(a)]
            path.write_text(yaml.safe_dump(doc))
            async with session.post(f"{kv.url}/-/reload") as resp:
                assert resp.status == 200
            assert set(kv.manager.slots) == {"org/a"}
            async with session.post(
                f"{kv.url}/v1/completions", json={"model": "org/b", "prompt": "hi"}
            ) as resp:
                assert resp.status == 404
            series = await (await session.get(f"{kv.url}/metrics")).text()
            assert 'model="org/b"' not in series
            assert metric(kv, "kvsleep_config_last_reload_successful") == 1
    finally:
        await kv.close()


async def test_requests_in_flight_survive_a_reload(sim_factory, tmp_path):
    sim = await sim_factory("vllm", "org/a", tokens_per_second=50)
    path = tmp_path / "kvsleep.yaml"
    doc = config_doc([sim_model(sim)], tmp_path / "state")
    path.write_text(yaml.safe_dump(doc))
    kv = await start_kvsleep(doc, config_path=str(path))
    try:
        async with aiohttp.ClientSession() as session:

            async def stream() -> bytes:
                async with session.post(
                    f"{kv.url}/v1/completions",
                    json={"model": "org/a", "prompt": "x", "max_tokens": 10, "stream": True},
                ) as resp:
                    assert resp.status == 200
                    return await resp.read()

            task = asyncio.create_task(stream())
            await asyncio.sleep(0.05)
            doc["sleep_manager"]["idle_threshold_seconds"] = 1
            path.write_text(yaml.safe_dump(doc))
            async with session.post(f"{kv.url}/-/reload") as resp:
                assert resp.status == 200
            body = await task
            assert body.endswith(b"data: [DONE]\n\n")
    finally:
        await kv.close()


def test_sighup_reloads_the_running_server(tmp_path):
    from tests.test_launcher import free_port, http, wait_for

    port = free_port()
    doc = config_doc(
        [{"name": "org/a", "engine": "vllm", "url": f"http://127.0.0.1:{free_port()}"}],
        tmp_path / "state",
        idle_threshold_seconds=600,
    )
    doc["router"]["port"] = port
    path = tmp_path / "kvsleep.yaml"
    path.write_text(yaml.safe_dump(doc))
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvsleep", "serve", "--config", str(path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        wait_for(lambda: http("GET", base + "/-/ready")[0] == 200, 20, "kvsleep ready")
        doc["sleep_manager"]["idle_threshold_seconds"] = 42
        path.write_text(yaml.safe_dump(doc))
        before = time.time()
        proc.send_signal(signal.SIGHUP)

        def reloaded() -> bool:
            text = http("GET", base + "/sleep/status")[1]
            return text["models"]["org/a"]["idle_threshold_seconds"] == 42

        wait_for(reloaded, 10, "threshold 42 after SIGHUP")
        metrics = http("GET", base + "/metrics")[1]
        ts = float(
            next(
                line.split()[-1]
                for line in metrics.splitlines()
                if line.startswith("kvsleep_config_last_reload_success_timestamp_seconds")
            )
        )
        assert ts >= before - 1
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        proc.kill()


async def test_reload_applies_router_limits_to_the_next_request(sim_factory, tmp_path):
    """`max_body_bytes` and `upstream_timeout_seconds` used to keep their start-up values."""
    sim = await sim_factory("vllm", "org/a")
    path = tmp_path / "kvsleep.yaml"
    doc = config_doc(
        [sim_model(sim)],
        tmp_path / "state",
        router={"max_body_bytes": 4096, "upstream_timeout_seconds": 60},
    )
    path.write_text(yaml.safe_dump(doc))
    kv = await start_kvsleep(doc, config_path=str(path))
    body = {"model": "org/a", "prompt": "x" * 8000, "max_tokens": 2}
    try:
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{kv.url}/v1/completions", json=body) as resp:
                assert resp.status == 413
            doc["router"].update(max_body_bytes=65536, upstream_timeout_seconds=0.3)
            path.write_text(yaml.safe_dump(doc))
            async with session.post(f"{kv.url}/-/reload") as resp:
                assert resp.status == 200, await resp.text()
            async with session.post(f"{kv.url}/v1/completions", json=body) as resp:
                assert resp.status == 200, await resp.text()
            async with session.post(f"{sim.url}/sim/faults", json={"hang_requests": 1}) as resp:
                assert resp.status == 200
            async with session.post(f"{kv.url}/v1/completions", json=body) as resp:
                assert resp.status == 504
                assert (await resp.json())["error"]["code"] == "engine_timeout"
    finally:
        await kv.close()


async def test_reload_refuses_keys_that_need_a_restart_and_names_them(sim_factory, tmp_path):
    """A reload applies every key or none: the listener, the state directory and launched
    engines cannot change under a running kvsleep, so such a file is refused whole."""
    sim = await sim_factory("vllm", "org/a")
    path = tmp_path / "kvsleep.yaml"
    doc = config_doc([sim_model(sim)], tmp_path / "state", idle_threshold_seconds=600)
    path.write_text(yaml.safe_dump(doc))
    kv = await start_kvsleep(doc, config_path=str(path))
    try:
        doc["router"]["port"] += 1
        doc["state_dir"] = str(tmp_path / "elsewhere")
        doc["sleep_manager"]["idle_threshold_seconds"] = 5
        doc["models"].append(
            {"name": "org/new", "engine": "vllm", "url": "http://127.0.0.1:9", "command": ["true"]}
        )
        path.write_text(yaml.safe_dump(doc))
        async with aiohttp.ClientSession() as session, session.post(f"{kv.url}/-/reload") as resp:
            assert resp.status == 400
            errors = (await resp.json())["errors"]
        assert [e.split(": ")[1] for e in errors] == [
            "router.port",
            "state_dir",
            "models[1] (org/new, a new engine to launch)",
        ]
        assert all("restart" in e for e in errors)
        assert metric(kv, "kvsleep_config_last_reload_successful") == 0
        assert kv.server.config.sleep_manager.idle_threshold_seconds == 600  # nothing applied
        assert set(kv.manager.slots) == {"org/a"}
    finally:
        await kv.close()
