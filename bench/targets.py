"""The processes under test: sim engines, kvsleep, and the peers when they are installed."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.procs import HOST, PYTHON, Child, Processes, free_port, wait_http, wait_log

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Target:
    """Something that answers OpenAI requests at `url` (a base URL, no path)."""

    name: str
    url: str
    child: Child | None = None


def start_sim(
    procs: Processes,
    name: str,
    model: str,
    *,
    tokens_per_second: float = 0.0,
    wake_latency: float = 0.5,
    sleep_latency: float = 0.05,
    timeout: float = 30.0,
) -> Target:
    """A `kvsleep sim-engine` (vLLM flavor) on a port it picks itself (no race)."""
    child = procs.spawn(
        name,
        [
            PYTHON,
            "-m",
            "kvsleep",
            "sim-engine",
            "--flavor",
            "vllm",
            "--model",
            model,
            "--host",
            HOST,
            "--port",
            "0",
            "--tokens-per-second",
            f"{tokens_per_second:g}",
            "--wake-latency",
            f"{wake_latency:g}",
            "--sleep-latency",
            f"{sleep_latency:g}",
            "--log-level",
            "info",  # the address it picked is logged at INFO (no access log)
        ],
    )
    match = wait_log(child, r"serving .* on http://127\.0\.0\.1:(\d+)", timeout)
    url = f"http://{HOST}:{match.group(1)}"
    wait_http(child, url + "/health", timeout)
    return Target(name, url, child)


def kvsleep_config(
    path: Path,
    port: int,
    models: list[dict[str, Any]],
    state_dir: Path,
    *,
    check_interval: float = 60.0,
) -> None:
    """A kvsleep config file (JSON is YAML) with auto-sleep off: benchmarks sleep explicitly."""
    doc = {
        "router": {"host": HOST, "port": port},
        "sleep_manager": {
            "auto_sleep_enabled": False,
            "check_interval_seconds": check_interval,
            "min_awake_seconds": 0,
            "min_sleep_duration": 0,
            "wake_timeout_seconds": 60,
        },
        "state_dir": str(state_dir / "state"),
        "log_dir": str(state_dir / "logs"),
        "models": models,
    }
    path.write_text(json.dumps(doc, indent=1))


def start_kvsleep(
    procs: Processes, name: str, config: Path, port: int, timeout: float = 60.0
) -> tuple[Target, float]:
    """`kvsleep serve` as its own process; returns it and the seconds until /-/ready."""
    child = procs.spawn(
        name, [PYTHON, "-m", "kvsleep", "serve", "--config", str(config), "--log-level", "warning"]
    )
    url = f"http://{HOST}:{port}"
    ready = wait_http(child, url + "/-/ready", timeout)
    return Target(name, url, child), ready


def start_bare_proxy(procs: Processes, upstream: str, timeout: float = 30.0) -> Target:
    """`bench/bareproxy.py` in front of `upstream`: the floor of an aiohttp router's cost."""
    child = procs.spawn(
        "aiohttp-proxy",
        [PYTHON, "-m", "bench.bareproxy", "--upstream", upstream, "--host", HOST, "--port", "0"],
    )
    match = wait_log(child, r"bare proxy on http://127\.0\.0\.1:(\d+)", timeout)
    url = f"http://{HOST}:{match.group(1)}"
    wait_http(child, url + "/health", timeout)
    return Target("aiohttp-proxy", url, child)


# ---- peers ---------------------------------------------------------------------------------


def find_peer(explicit: str | None, env: str, program: str) -> str | None:
    """An explicit path, $env, or `program` on PATH; None when the peer is not installed."""
    for candidate in (explicit, os.environ.get(env)):
        if candidate:
            return candidate if os.access(candidate, os.X_OK) else None
    return shutil.which(program)


def start_vllm_router(procs: Processes, program: str, worker: str, timeout: float = 60.0) -> Target:
    """vllm-router (Rust) in front of one worker, round robin; limits raised above the load."""
    port = free_port()
    child = procs.spawn(
        "vllm-router",
        [
            program,
            "--host",
            HOST,
            "--port",
            str(port),
            "--worker-urls",
            worker,
            "--policy",
            "round_robin",
            "--max-concurrent-requests",
            "32768",
            "--queue-size",
            "4096",
            "--log-level",
            "warning",
            "--disable-retries",
        ],
        env={"NO_COLOR": "1"},
    )
    url = f"http://{HOST}:{port}"
    wait_http(child, url + "/health", timeout)
    return Target("vllm-router", url, child)


def start_litellm(
    procs: Processes, program: str, model: str, worker: str, workdir: Path, timeout: float = 120.0
) -> Target:
    """The litellm proxy with one route: `model` -> the worker's OpenAI API (one worker process).

    Untested in this repository's CI (litellm is not installed there); see bench/README.md.
    """
    config = workdir / "litellm.yaml"
    config.write_text(
        json.dumps(
            {
                "model_list": [
                    {
                        "model_name": model,
                        "litellm_params": {
                            "model": f"openai/{model}",
                            "api_base": f"{worker}/v1",
                            "api_key": "unused",
                        },
                    }
                ],
                "litellm_settings": {"telemetry": False, "drop_params": True},
            },
            indent=1,
        )
    )
    port = free_port()
    child = procs.spawn(
        "litellm",
        [
            program,
            "--config",
            str(config),
            "--host",
            HOST,
            "--port",
            str(port),
            "--num_workers",
            "1",
        ],
        env={"LITELLM_LOG": "ERROR", "LITELLM_TELEMETRY": "False"},
    )
    url = f"http://{HOST}:{port}"
    wait_http(child, url + "/health/liveliness", timeout)
    return Target("litellm", url, child)
