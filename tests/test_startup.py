"""`kvsleep serve` start-up: bind first, listen at once, hold requests for engines still starting,
honour SIGTERM at any time; readiness is our child's; flags and environment of launched engines."""

from __future__ import annotations

import socket
import threading
import urllib.request

from kvsleep.config import ConfigError, parse_config
from kvsleep.control.keeper import members
from kvsleep.control.launcher import build_command, build_env
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
from tests.test_process_ownership import group_of, wrapped

serve_runs = test_launcher.serve_runs  # the fixture: processes killed at teardown


def test_router_port_taken_exits_2_in_one_line_launching_nothing(tmp_path, serve_runs):
    port = free_port()
    marker = tmp_path / "launched"
    config = write_config(
        tmp_path,
        [
            {
                "name": "org/m",
                "engine": "vllm",
                "url": f"http://127.0.0.1:{port}",
                "command": wrapped(port, f"touch {marker}; exec $SIM"),
            }
        ],
    )
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", int(url_of(config).rsplit(":", 1)[1])))
        taken.listen()
        serve = Serve(config, tmp_path)
        serve_runs.append(serve)
        assert serve.proc.wait(30) == 2
    lines = serve.text().strip().splitlines()
    router_port = url_of(config).rsplit(":", 1)[1]
    assert len(lines) == 1, lines
    assert f"cannot listen on 127.0.0.1:{router_port}" in lines[0]
    assert not marker.exists()


def test_listens_at_once_and_holds_requests_while_engines_start(
    tmp_path,
    serve_runs,
    monkeypatch,
):
    port = free_port()
    gate = tmp_path / "go"
    envfile = tmp_path / "engine.env"
    monkeypatch.setenv("TEST_ADMIN_TOKEN", "s3cret-token")
    config = write_config(
        tmp_path,
        [
            {
                "name": "org/m",
                "engine": "vllm",
                "url": f"http://127.0.0.1:{port}",
                "ready_timeout_seconds": 60,
                "command": wrapped(
                    port, f"env > {envfile}; while [ ! -e {gate} ]; do sleep 0.1; done; exec $SIM"
                ),
            }
        ],
    )
    doc = config.read_text().replace("router:\n", "router:\n  admin_token_env: TEST_ADMIN_TOKEN\n")
    config.write_text(doc)
    serve = Serve(config, tmp_path)
    serve_runs.append(serve)
    base = url_of(config)
    wait_for(lambda: http("GET", base + "/sleep/status")[0] == 200, 20, "kvsleep listening")
    status, body = http("GET", base + "/sleep/status")
    assert body["models"]["org/m"]["state"] == "starting"
    status, text = http("GET", base + "/-/ready")
    assert status == 503 and "starting: org/m" in text
    _, models = http("GET", base + "/v1/models")
    assert models["data"][0]["state"] == "starting"
    metrics = urllib.request.urlopen(base + "/metrics", timeout=10).read().decode()
    assert 'kvsleep_model_state{model="org/m",state="starting"} 1.0' in metrics
    results: list[tuple[int, object]] = []
    held = threading.Thread(
        target=lambda: results.append(
            http(
                "POST",
                base + "/v1/completions",
                {"model": "org/m", "prompt": "hi", "max_tokens": 2},
            )
        )
    )
    held.start()
    wait_for(
        lambda: http("GET", base + "/sleep/status")[1]["models"]["org/m"]["held_requests"] == 1,
        10,
        "request held",
    )
    gate.touch()
    held.join(40)
    assert results and results[0][0] == 200, results
    wait_for(lambda: http("GET", base + "/-/ready")[0] == 200, 20, "kvsleep ready")
    env = envfile.read_text()
    assert "s3cret-token" not in env and "TEST_ADMIN_TOKEN" not in env
    assert "VLLM_SERVER_DEV_MODE=1" in env
    assert serve.stop() == 0


def test_sigterm_during_start_up_is_honoured_at_once(tmp_path, serve_runs):
    port = free_port()
    config = write_config(
        tmp_path,
        [
            {
                "name": "org/m",
                "engine": "vllm",
                "url": f"http://127.0.0.1:{port}",
                "ready_timeout_seconds": 600,
                "command": wrapped(port, "sleep 600; exec $SIM"),
            }
        ],
    )
    serve = Serve(config, tmp_path)
    serve_runs.append(serve)
    base = url_of(config)
    wait_for(lambda: serve.engine_pids(), 20, "engine launched")
    wait_for(lambda: http("GET", base + "/-/ready")[0] == 503, 20, "kvsleep listening")
    group = group_of(serve.engine_pids()[0])
    assert serve.stop(timeout=30) == 0
    assert not members(group)


def test_ready_needs_the_configured_model_listed(tmp_path, serve_runs):
    """An engine that serves another model is not ready for this one."""
    port = free_port()
    config = write_config(
        tmp_path,
        [
            {
                "name": "org/m",
                "engine": "vllm",
                "url": f"http://127.0.0.1:{port}",
                "ready_timeout_seconds": 3,
                "command": sim_command("vllm", "org/other", port),
            }
        ],
    )
    serve = Serve(config, tmp_path)
    serve_runs.append(serve)
    assert serve.proc.wait(30) == 1
    assert "it lists org/other, not org/m" in serve.text()


def model_of(**entry) -> object:
    doc = {
        "models": [{"name": "m", "url": "http://127.0.0.1:9000", **entry}],
        "router": {"admin_token_env": "TEST_ADMIN_TOKEN"},
    }
    return parse_config(doc).models[0]


def test_sleep_flags_added_only_where_missing(monkeypatch):
    monkeypatch.setenv("TEST_ADMIN_TOKEN", "t")
    vllm = model_of(
        engine="vllm",
        command=["python", "-m", "vllm.entrypoints.openai.api_server", "--port", "9000"],
    )
    assert build_command(vllm).count("--enable-sleep-mode") == 1
    given = model_of(engine="vllm", command=["vllm", "serve", "m", "--enable-sleep-mode=true"])
    assert build_command(given) == ["vllm", "serve", "m", "--enable-sleep-mode=true"]
    sglang = model_of(
        engine="sglang", command=["python", "-m", "sglang.launch_server", "--port", "9000"]
    )
    assert build_command(sglang)[-1] == "--enable-memory-saver"
    present = model_of(
        engine="sglang", command=["python", "-m", "sglang.launch_server", "--enable-memory-saver"]
    )
    assert build_command(present).count("--enable-memory-saver") == 1
    wrapper = model_of(engine="vllm", command=["sh", "-c", "exec vllm serve m"])
    assert build_command(wrapper) == ["sh", "-c", "exec vllm serve m"]


def test_engine_flags_none_opts_out(monkeypatch):
    monkeypatch.setenv("TEST_ADMIN_TOKEN", "t")
    monkeypatch.delenv("VLLM_SERVER_DEV_MODE", raising=False)
    vllm = model_of(engine="vllm", engine_flags="none", command=["vllm", "serve", "m"])
    assert build_command(vllm) == ["vllm", "serve", "m"]
    assert "VLLM_SERVER_DEV_MODE" not in build_env(vllm)
    sglang = model_of(
        engine="sglang", engine_flags="none", command=["python", "-m", "sglang.launch_server"]
    )
    assert "--enable-memory-saver" not in build_command(sglang)
    try:
        model_of(engine="vllm", engine_flags="sometimes")
    except ConfigError as exc:
        assert "engine_flags: expected one of auto, none" in str(exc)
    else:
        raise AssertionError("engine_flags: sometimes was accepted")


def test_admin_token_never_reaches_an_engine(monkeypatch):
    monkeypatch.setenv("TEST_ADMIN_TOKEN", "s3cret")
    model = model_of(engine="vllm", command=["vllm", "serve", "m"])
    assert "TEST_ADMIN_TOKEN" not in build_env(model, hidden=["TEST_ADMIN_TOKEN"])
