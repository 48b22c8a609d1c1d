"""kvsleep launching and supervising a real `vllm` API server (issue: orphans at first contact).

A real vLLM is several processes (the API server, its EngineCore, a resource tracker): a
SIGKILL of the API server used to leave the others running beside a new one, and they survived
kvsleep too. Here kvsleep launches it, the API server is SIGKILLed (nothing of the old group may
remain, the engine is restarted and the requests held meanwhile are served), then kvsleep itself
is SIGKILLed (no engine process may outlive it by more than the grace period).
"""

from __future__ import annotations

import os
import signal
import threading

import pytest

from kvsleep.control.keeper import members
from tests.real_engine.conftest import (
    MODEL_NAME,
    READY_TIMEOUT_SECONDS,
    free_port,
    installed_vllm,
    vllm_argv,
    vllm_env,
)
from tests.test_launcher import Serve, alive, http, serve_runs, url_of, wait_for, write_config
from tests.test_process_ownership import find, group_of

GRACE = 10.0  # stop_grace_seconds: vLLM's EngineCore takes a few seconds to exit on SIGTERM

pytestmark = [pytest.mark.real_engine, pytest.mark.timeout(3 * READY_TIMEOUT_SECONDS)]

__all__ = ["serve_runs"]  # the fixture: whatever the test leaves is killed at teardown


def completion(base: str) -> tuple[int, object]:
    """A completion that may be held while the engine (re)starts."""
    body = {"model": MODEL_NAME, "prompt": "hi", "max_tokens": 2}
    return http("POST", base + "/v1/completions", body, timeout=READY_TIMEOUT_SECONDS)


def test_a_launched_vllm_owns_its_processes(tmp_path, serve_runs):
    python, model = installed_vllm()
    port = free_port()
    env = {
        k: v for k, v in vllm_env(dev_mode=False).items() if k.startswith(("VLLM_", "OMP_", "HF_"))
    }
    config = write_config(
        tmp_path,
        [
            {
                "name": MODEL_NAME,
                "engine": "vllm",
                "url": f"http://127.0.0.1:{port}",
                "command": vllm_argv(python, model, port),
                "env": env,
                "engine_flags": "none",  # the CPU build refuses --enable-sleep-mode
                "ready_timeout_seconds": READY_TIMEOUT_SECONDS,
                "stop_grace_seconds": GRACE,
            }
        ],
        wake_timeout_seconds=READY_TIMEOUT_SECONDS,
    )
    serve = Serve(config, tmp_path)
    serve_runs.append(serve)
    base = url_of(config)
    wait_for(
        lambda: http("GET", base + "/-/ready")[0] == 200,
        READY_TIMEOUT_SECONDS,
        "kvsleep ready with its vLLM",
    )
    assert completion(base)[0] == 200

    group = group_of(serve.engine_pids()[0])
    [api_server] = find(group, "vllm.entrypoints.openai.api_server")
    old = [p for p in members(group) if p != api_server]
    assert old, "vLLM's children (EngineCore, resource tracker) are in the engine's group"
    os.kill(api_server, signal.SIGKILL)
    wait_for(
        lambda: http("GET", base + "/sleep/status")[1]["models"][MODEL_NAME]["state"] == "starting",
        30,
        "the model starting again",
    )
    results: list[tuple[int, object]] = []
    threads = [threading.Thread(target=lambda: results.append(completion(base))) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(READY_TIMEOUT_SECONDS)
    assert [status for status, _ in results] == [200] * 3, results  # held, then served
    assert not any(alive(p) for p in old), "a process of the old vLLM outlived its API server"
    assert not members(group)
    assert len(serve.engine_pids()) == 2

    new_group = group_of(serve.engine_pids()[1])
    engine = members(new_group)
    assert len(engine) >= 3  # keeper, API server, EngineCore
    serve.kill()  # SIGKILL: nothing of kvsleep runs to clean up
    wait_for(
        lambda: not any(alive(p) for p in engine),
        GRACE + 20,
        "every vLLM process gone after kvsleep's SIGKILL",
    )
