"""Attach mode: `kvsleep serve` given only a kvcached config file routes to engines that already
run, as kvcached's `frontend.py --config_path FILE` does, and launches none of them.

The engines are simulators on free loopback ports; kvsleep is a real `python -m kvsleep serve`
process. The config names a virtualenv that does not exist, so a launch would fail at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from tests.conftest import REPO_ROOT

V = "meta-llama/Llama-3.2-1B"
S = "Qwen/Qwen3-0.6B"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kvcached_doc(vllm_port: int, sglang_port: int, router_port: int) -> dict[str, Any]:
    """kvcached's example-config.yaml, with the ports of this test's engines and router."""
    return {
        "kvcached": {"kvcached_gpu_utilization": 0.95, "kvcached_log_level": "INFO"},
        "router": {"enable_router": True, "router_port": router_port, "router_host": "localhost"},
        "sleep_manager": {
            "idle_threshold_seconds": 300,
            "check_interval_seconds": 60,
            "auto_sleep_enabled": False,
            "wakeup_on_request": True,
            "min_sleep_duration": 80,
        },
        "instances": [
            {
                "name": "instance1",
                "model": V,
                "engine": "vllm",
                "using_venv": True,
                "venv_path": "./no-such-venv/.venv",
                "kvcached_env": ["ENABLE_KVCACHED=true", "KVCACHED_AUTOPATCH=1"],
                "engine_env": ["VLLM_SERVER_DEV_MODE=1"],
                "engine_args": [
                    "--host=localhost",
                    f"--port={vllm_port}",
                    "--gpu-memory-utilization 0.5",
                    "--enable-sleep-mode",
                ],
            },
            {
                "name": "instance2",
                "model": S,
                "engine": "sglang",
                "using_venv": True,
                "venv_path": "./no-such-venv/.venv",
                "engine_args": [
                    "--host=localhost",
                    f"--port={sglang_port}",
                    "--enable-memory-saver",
                ],
            },
        ],
    }


@contextlib.asynccontextmanager
async def serving(config: Path, *args: str) -> AsyncIterator[asyncio.subprocess.Process]:
    """`kvsleep serve --config FILE ARGS`, stopped with SIGTERM afterwards."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "kvsleep",
        "serve",
        "--config",
        str(config),
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        cwd=config.parent,
        env={"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin"},
    )
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(proc.wait(), 15)
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def wait_ready(
    session: aiohttp.ClientSession, url: str, proc: asyncio.subprocess.Process
) -> None:
    for _ in range(300):
        if proc.returncode is not None:
            assert proc.stderr is not None
            raise AssertionError("kvsleep exited: " + (await proc.stderr.read()).decode())
        with contextlib.suppress(aiohttp.ClientError):
            async with session.get(url + "/-/ready") as resp:
                if resp.status == 200:
                    return
        await asyncio.sleep(0.05)
    raise AssertionError("kvsleep did not become ready")


@pytest.fixture
async def engines(sim_factory):
    vllm = await sim_factory("vllm", V)
    sglang = await sim_factory("sglang", S)
    return vllm, sglang


def write_config(tmp_path: Path, engines: Any, **top: Any) -> tuple[Path, str]:
    vllm, sglang = engines
    port = free_port()
    doc = {
        **kvcached_doc(int(vllm.url.rsplit(":", 1)[1]), int(sglang.url.rsplit(":", 1)[1]), port),
        **top,
    }
    path = tmp_path / "kvcached.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path, f"http://127.0.0.1:{port}"


@pytest.mark.parametrize("how", ["flag", "config key"])
async def test_attach_routes_to_running_engines_and_launches_none(how, engines, tmp_path):
    vllm, sglang = engines
    path, url = write_config(tmp_path, engines, **({"attach": True} if how == "config key" else {}))
    args = ("--attach",) if how == "flag" else ()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as session:
        async with serving(path, *args) as proc:
            await wait_ready(session, url, proc)
            for model, sim in ((V, vllm), (S, sglang)):
                body = {"model": model, "prompt": "hi", "max_tokens": 2}
                async with session.post(url + "/v1/completions", json=body) as resp:
                    assert resp.status == 200, await resp.text()
                assert sim.sim.stats()["requests"]["completed"] == 1
            async with session.get(url + "/models") as resp:
                models = (await resp.json())["models"]
            assert {m: d["endpoint"] for m, d in models.items()} == {
                V: vllm.url.replace("127.0.0.1", "localhost"),
                S: sglang.url.replace("127.0.0.1", "localhost"),
            }
            # Sleep and wake reach the attached engines.
            async with session.post(url + f"/action/sleep/{V}") as resp:
                assert (resp.status, (await resp.json())["success"]) == (200, True)
            assert vllm.sim.stats()["state"] == "asleep"
        assert proc.returncode == 0
        assert proc.stderr is not None
        log = (await proc.stderr.read()).decode()
    assert "attach mode: routing to 2 running engines, launching none" in log
    assert "0.0.0.0" in log and "router.host" in log  # how to listen more widely
    assert "started pid" not in log
    assert not (tmp_path / ".kvsleep-logs").exists()  # no engine log: nothing was launched


async def test_without_attach_the_same_file_launches_engines(engines, tmp_path):
    """The contrast: without attach, kvsleep launches the instances (here the venv is missing,
    so it exits 1 naming the engine it could not start)."""
    path, _ = write_config(tmp_path, engines)
    async with serving(path) as proc:
        await asyncio.wait_for(proc.wait(), 30)
        assert proc.stderr is not None
        log = (await proc.stderr.read()).decode()
    assert proc.returncode == 1
    assert "cannot start" in log and "no-such-venv" in log


def test_attach_is_a_validated_config_key(tmp_path):
    from kvsleep.config import ConfigError, parse_config

    doc = kvcached_doc(12346, 30000, 8080)
    assert parse_config(doc).attach is False
    assert parse_config({**doc, "attach": True}).attach is True
    with pytest.raises(ConfigError) as caught:
        parse_config({**doc, "attach": "yes"})
    assert caught.value.problems == ["<config>: attach: expected true or false, got string 'yes'"]


def test_attach_takes_a_restart_and_attached_engines_come_and_go_by_reload():
    from kvsleep.config import needs_restart, parse_config

    doc = kvcached_doc(12346, 30000, 8080)
    third = {"model": "org/third", "engine": "vllm", "engine_args": ["--port=12347"]}
    grown = {**doc, "instances": [*doc["instances"], third]}
    assert needs_restart(parse_config(doc), parse_config({**doc, "attach": True})) == ["attach"]
    # Attached, an engine added or removed is a plain reload: nothing is launched.
    attached = parse_config({**doc, "attach": True})
    assert needs_restart(attached, parse_config({**grown, "attach": True})) == []
    assert needs_restart(parse_config({**grown, "attach": True}), attached) == []
    # Not attached, the new instance is an engine to launch: a restart.
    assert needs_restart(parse_config(doc), parse_config(grown)) != []
