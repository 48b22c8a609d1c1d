"""The launcher: `kvsleep serve` starts, supervises and stops its engines as real processes."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from kvsleep.config import load_config, parse_config
from kvsleep.control.launcher import build_command, build_env

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method: str, url: str, body: dict | None = None, timeout: float = 30) -> tuple[int, dict]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(
        url, data=data, method=method, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, _decode(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, _decode(exc.read())


def _decode(raw: bytes) -> dict | str:
    try:
        return json.loads(raw)
    except ValueError:
        return raw.decode(errors="replace")


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return
        except (OSError, urllib.error.URLError):
            pass
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); it is gone for every practical purpose.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


class Serve:
    """`kvsleep serve --config FILE` as a subprocess, with its stderr collected to a file."""

    def __init__(self, config: Path, cwd: Path) -> None:
        self.log = cwd / "kvsleep.stderr"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kvsleep", "serve", "--config", str(config)],
            cwd=cwd,
            stdout=subprocess.DEVNULL,
            stderr=self.log.open("wb"),
        )

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def engine_pids(self) -> list[int]:
        return [int(p) for p in re.findall(r"started pid (\d+)", self.text())]

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def serve_runs():
    started: list[Serve] = []
    yield started
    for s in started:
        s.kill()
        for pid in s.engine_pids():
            if alive(pid):
                os.killpg(pid, signal.SIGKILL)


def sim_command(flavor: str, model: str, port: int, *extra: str) -> list[str]:
    return [
        "{python}",
        "-m",
        "kvsleep",
        "sim-engine",
        "--flavor",
        flavor,
        "--model",
        model,
        "--port",
        str(port),
        "--wake-latency",
        "0.2",
        "--tokens-per-second",
        "0",
        *extra,
    ]


def write_config(tmp_path: Path, models: list[dict], **sleep_manager) -> Path:
    port = free_port()
    doc = {
        "router": {"host": "127.0.0.1", "port": port},
        "sleep_manager": {
            "check_interval_seconds": 0.5,
            "idle_threshold_seconds": 3600,
            "min_awake_seconds": 0,
            "min_sleep_duration": 0,
            "wake_timeout_seconds": 30,
            **sleep_manager,
        },
        "models": models,
        "state_dir": str(tmp_path / "state"),
        "log_dir": str(tmp_path / "logs"),
    }
    path = tmp_path / "kvsleep.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def url_of(config: Path) -> str:
    return f"http://127.0.0.1:{yaml.safe_load(config.read_text())['router']['port']}"


def test_demo_runs_the_whole_cycle_and_leaves_no_process(tmp_path, serve_runs):
    """The README's demo: requests, idle sleep, wake on request, clean SIGTERM."""
    # The demo as shipped, on free ports (a developer's own kvsleep may hold 8080) and with
    # its state and logs in tmp_path rather than in examples/.
    demo = tmp_path / "demo.yaml"
    text = (REPO / "examples" / "demo.yaml").read_text()
    router, llama, qwen = free_port(), free_port(), free_port()
    for old, new in (
        ("port: 8080", f"port: {router}"),
        ("18001", str(llama)),
        ("18002", str(qwen)),
    ):
        assert old in text
        text = text.replace(old, new)
    demo.write_text(text)
    base = f"http://127.0.0.1:{router}"
    serve = Serve(demo, tmp_path)
    serve_runs.append(serve)
    wait_for(lambda: http("GET", base + "/-/ready")[0] == 200, 30, "kvsleep ready")
    models = ["demo/llama-sim", "demo/qwen-sim"]
    for model in models:
        status, body = http(
            "POST", base + "/v1/completions", {"model": model, "prompt": "hi", "max_tokens": 2}
        )
        assert status == 200, body
        assert body["choices"][0]["text"]

    def both_asleep() -> bool:
        states = http("GET", base + "/sleep/status")[1]["models"]
        return all(states[m]["state"] == "asleep" for m in models)

    wait_for(both_asleep, 60, "both demo models asleep after their idle thresholds")
    for model in models:
        status, body = http(
            "POST", base + "/v1/completions", {"model": model, "prompt": "wake", "max_tokens": 2}
        )
        assert status == 200, body
    metrics = urllib.request.urlopen(base + "/metrics", timeout=10).read().decode()
    for model in models:
        assert f'kvsleep_wakes_total{{model="{model}",reason="request",result="ok"}} 1.0' in metrics
        assert f'kvsleep_sleeps_total{{model="{model}",reason="idle",result="ok"}} 1.0' in metrics

    pids = serve.engine_pids()
    assert len(pids) == 2
    assert serve.stop() == 0
    wait_for(lambda: not any(alive(p) for p in pids), 10, "engines gone after SIGTERM")


def test_killed_engine_is_restarted_and_its_requests_served(tmp_path, serve_runs):
    port = free_port()
    config = write_config(
        tmp_path,
        [
            {
                "name": "org/m",
                "engine": "vllm",
                "url": f"http://127.0.0.1:{port}",
                "ready_timeout_seconds": 20,
                "command": sim_command("vllm", "org/m", port),
            }
        ],
    )
    serve = Serve(config, tmp_path)
    serve_runs.append(serve)
    base = url_of(config)
    wait_for(lambda: http("GET", base + "/-/ready")[0] == 200, 30, "kvsleep ready")
    first = serve.engine_pids()[0]
    os.killpg(first, signal.SIGKILL)
    wait_for(lambda: len(serve.engine_pids()) == 2, 20, "engine restarted")
    status, body = http(
        "POST", base + "/v1/completions", {"model": "org/m", "prompt": "hi", "max_tokens": 2}
    )
    assert status == 200, body
    metrics = urllib.request.urlopen(base + "/metrics", timeout=10).read().decode()
    assert 'kvsleep_engine_restarts_total{model="org/m"} 1.0' in metrics
    assert "exited with code -9" in serve.text()
    assert serve.stop() == 0
    assert not any(alive(p) for p in serve.engine_pids())


def test_engine_that_keeps_dying_is_reported_as_a_crash_loop(tmp_path, serve_runs):
    """Starts once, then every restart exits at once: a crash loop, with its last log lines."""
    port = free_port()
    marker = tmp_path / "started-once"
    sim = " ".join(f"'{a}'" for a in sim_command("vllm", "org/m", port)[1:])
    script = (
        f"if [ -e {marker} ]; then echo 'fatal: CUDA out of memory (simulated)'; exit 3; "
        f"fi; touch {marker}; exec {sys.executable} {sim}"
    )
    config = write_config(
        tmp_path,
        [
            {
                "name": "org/m",
                "engine": "vllm",
                "url": f"http://127.0.0.1:{port}",
                "ready_timeout_seconds": 20,
                "command": ["sh", "-c", script],
            }
        ],
    )
    serve = Serve(config, tmp_path)
    serve_runs.append(serve)
    base = url_of(config)
    wait_for(lambda: http("GET", base + "/-/ready")[0] == 200, 30, "kvsleep ready")
    os.killpg(serve.engine_pids()[0], signal.SIGKILL)
    wait_for(lambda: "CRASH LOOP" in serve.text(), 30, "crash loop reported")
    text = serve.text()
    assert "fatal: CUDA out of memory (simulated)" in text
    metrics = urllib.request.urlopen(base + "/metrics", timeout=10).read().decode()
    assert 'kvsleep_engine_crash_looping{model="org/m"} 1.0' in metrics
    _, body = http("GET", base + "/sleep/status")
    assert "crash loop" in (body["models"]["org/m"]["last_error"] or "")
    assert serve.stop() == 0


def test_command_that_exits_at_once_fails_start_with_its_log(tmp_path, serve_runs):
    config = write_config(
        tmp_path,
        [
            {
                "name": "org/broken",
                "engine": "sglang",
                "url": f"http://127.0.0.1:{free_port()}",
                "command": ["sh", "-c", "echo 'ImportError: no module named sglang'; exit 1"],
            }
        ],
    )
    serve = Serve(config, tmp_path)
    serve_runs.append(serve)
    assert serve.proc.wait(30) == 1
    text = serve.text()
    assert "model org/broken: engine exited with code 1 before becoming ready" in text
    assert "ImportError: no module named sglang" in text


def test_engine_never_ready_fails_naming_model_and_log(tmp_path, serve_runs):
    config = write_config(
        tmp_path,
        [
            {
                "name": "org/slow",
                "engine": "vllm",
                "url": f"http://127.0.0.1:{free_port()}",
                "ready_timeout_seconds": 1,
                "command": ["sh", "-c", "echo 'loading weights...'; exec sleep 60"],
            }
        ],
    )
    serve = Serve(config, tmp_path)
    serve_runs.append(serve)
    assert serve.proc.wait(30) == 1
    text = serve.text()
    assert "model org/slow: engine not ready after 1s" in text
    assert str(tmp_path / "logs" / "org_slow.log") in text
    assert "loading weights..." in text
    pid = int(re.search(r"started pid (\d+)", text).group(1))
    wait_for(lambda: not alive(pid), 10, "the unready engine killed")


def test_kvcached_instances_become_engine_commands():
    config = load_config(str(REPO / "tests" / "data" / "kvcached-config.yaml"))
    vllm, sglang = config.models
    argv = build_command(vllm)
    assert argv[0].endswith("/bin/vllm") and argv[1:3] == ["serve", "meta-llama/Llama-3.2-1B"]
    assert "--port=12346" in argv and argv.count("--enable-sleep-mode") == 1
    env = build_env(vllm)
    assert env["VLLM_SERVER_DEV_MODE"] == "1"
    assert env["ENABLE_KVCACHED"] == "true" and env["KVCACHED_GPU_UTILIZATION"] == "0.95"
    assert env["PATH"].startswith(vllm.venv_path)
    argv = build_command(sglang)
    assert argv[1:5] == ["-m", "sglang.launch_server", "--model-path", "Qwen/Qwen3-0.6B"]
    assert "--enable-memory-saver" in argv


def test_vllm_launch_gets_sleep_mode_added():
    doc = {
        "models": [
            {
                "name": "m",
                "engine": "vllm",
                "url": "http://127.0.0.1:9000",
                "command": ["vllm", "serve", "m", "--port", "9000"],
            }
        ]
    }
    model = parse_config(doc).models[0]
    assert build_command(model)[-1] == "--enable-sleep-mode"
    assert build_env(model)["VLLM_SERVER_DEV_MODE"] == "1"


def test_engines_die_with_a_killed_kvsleep(tmp_path, serve_runs):
    """SIGKILL gives kvsleep no chance to clean up: its engines must not outlive it."""
    port = free_port()
    config = write_config(
        tmp_path,
        [
            {
                "name": "org/m",
                "engine": "sglang",
                "url": f"http://127.0.0.1:{port}",
                "ready_timeout_seconds": 20,
                "command": sim_command("sglang", "org/m", port),
            }
        ],
    )
    serve = Serve(config, tmp_path)
    serve_runs.append(serve)
    wait_for(lambda: http("GET", url_of(config) + "/-/ready")[0] == 200, 30, "kvsleep ready")
    pids = serve.engine_pids()
    serve.kill()
    wait_for(lambda: not any(alive(p) for p in pids), 10, "engine gone with kvsleep")
