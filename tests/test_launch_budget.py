"""GPU budgets hold from launch on: two 50 GB models on an 80 GB budget are never both awake.

The truth is the engines' own (`/sim/stats`: the GPU memory they hold), sampled from
before the first engine starts until both have served requests."""

from __future__ import annotations

import threading
import time

from tests import test_launcher
from tests.test_launcher import (
    Serve,
    free_port,
    http,
    sim_command,
    url_of,
    wait_for,
    write_config,
)

serve_runs = test_launcher.serve_runs  # the fixture: processes killed at teardown


def resident(port: int) -> bool:
    try:
        status, stats = http("GET", f"http://127.0.0.1:{port}/sim/stats", timeout=2)
    except OSError:
        return False
    return status == 200 and stats["gpu_memory_bytes"] > 0


def test_two_50gb_models_on_an_80gb_budget_are_never_both_awake(tmp_path, serve_runs):
    ports = {"org/a": free_port(), "org/b": free_port()}
    models = [
        {
            "name": name,
            "engine": "vllm",
            "url": f"http://127.0.0.1:{port}",
            "ready_timeout_seconds": 20,
            "memory_gb": 50,
            "gpus": [0],
            "command": sim_command("vllm", name, port),
        }
        for name, port in ports.items()
    ]
    config = write_config(tmp_path, models)
    config.write_text(config.read_text() + "gpus:\n- id: 0\n  memory_gb: 80\n")
    both: list[float] = []
    samples = [0]
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            if all(resident(p) for p in ports.values()):
                both.append(time.monotonic())
            samples[0] += 1
            time.sleep(0.02)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        serve = Serve(config, tmp_path)
        serve_runs.append(serve)
        base = url_of(config)
        wait_for(lambda: http("GET", base + "/-/ready")[0] == 200, 40, "kvsleep ready")
        status = http("GET", base + "/sleep/status")[1]
        assert status["gpus"]["0"]["committed_gb"] <= 80, status["gpus"]
        for name in ("org/a", "org/b", "org/a"):
            code, body = http(
                "POST", base + "/v1/completions", {"model": name, "prompt": "hi", "max_tokens": 2}
            )
            assert code == 200, body
    finally:
        stop.set()
        watcher.join(10)
    assert samples[0] > 20
    assert not both, f"both engines held their weights at {len(both)} samples"
    assert serve.stop() == 0


def test_a_model_with_no_room_at_launch_starts_on_its_first_request(tmp_path, serve_runs):
    """org/a is busy when org/b's turn comes (nothing can be slept for it): org/b is not
    started; its first request, once org/a is idle, sleeps org/a and starts org/b."""
    ports = {"org/a": free_port(), "org/b": free_port()}
    models = [
        {
            "name": name,
            "engine": "vllm",
            "url": f"http://127.0.0.1:{port}",
            "ready_timeout_seconds": 20,
            "memory_gb": 50,
            "gpus": [0],
            "command": [*sim_command("vllm", name, port)[:-2], "--tokens-per-second", "4"],
        }
        for name, port in ports.items()
    ]
    config = write_config(tmp_path, models)
    config.write_text(config.read_text() + "gpus:\n- id: 0\n  memory_gb: 80\n")
    serve = Serve(config, tmp_path)
    serve_runs.append(serve)
    base = url_of(config)
    wait_for(lambda: http("GET", base + "/sleep/status")[0] == 200, 20, "kvsleep listening")
    code, body = http(
        "POST", base + "/v1/completions", {"model": "org/a", "prompt": "hi", "max_tokens": 8}
    )
    assert code == 200, body
    wait_for(lambda: http("GET", base + "/-/ready")[0] == 200, 20, "kvsleep ready")
    status = http("GET", base + "/sleep/status")[1]["models"]
    assert status["org/b"]["state"] == "asleep"
    assert not resident(ports["org/b"])  # never started: nothing answers there
    assert "org/b: started pid" not in serve.text()
    code, body = http(
        "POST", base + "/v1/completions", {"model": "org/b", "prompt": "hi", "max_tokens": 1}
    )
    assert code == 200, body
    status = http("GET", base + "/sleep/status")[1]["models"]
    assert (status["org/a"]["state"], status["org/b"]["state"]) == ("asleep", "awake")
    assert serve.stop() == 0


def test_always_on_models_start_first_and_keep_their_room(tmp_path, serve_runs):
    """org/pinned comes second in the file but starts first; org/b then has no room (a pinned
    model is never put to sleep): it is not started, and its requests say why."""
    ports = {"org/b": free_port(), "org/pinned": free_port()}
    models = [
        {
            "name": name,
            "engine": "vllm",
            "url": f"http://127.0.0.1:{port}",
            "ready_timeout_seconds": 20,
            "memory_gb": 50,
            "gpus": [0],
            "always_on": name == "org/pinned",
            "wake_timeout_seconds": 2,
            "command": sim_command("vllm", name, port),
        }
        for name, port in ports.items()
    ]
    config = write_config(tmp_path, models)
    config.write_text(config.read_text() + "gpus:\n- id: 0\n  memory_gb: 80\n")
    serve = Serve(config, tmp_path)
    serve_runs.append(serve)
    base = url_of(config)
    wait_for(lambda: http("GET", base + "/-/ready")[0] == 200, 30, "kvsleep ready")
    status = http("GET", base + "/sleep/status")[1]["models"]
    assert (status["org/pinned"]["state"], status["org/b"]["state"]) == ("awake", "asleep")
    assert "org/b: started pid" not in serve.text()
    code, body = http(
        "POST", base + "/v1/completions", {"model": "org/b", "prompt": "hi", "max_tokens": 1}
    )
    # Held like any wake waiting for memory, until its timeout, with the reason.
    assert code in (503, 504), body
    assert "busy or pinned" in body["error"]["message"]
    assert not resident(ports["org/b"])
    assert serve.stop() == 0
