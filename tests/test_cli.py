"""The `kvsleep` command as a user runs it: exit codes and what it prints."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from kvsleep import __version__

REPO = Path(__file__).resolve().parent.parent


def kvsleep(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kvsleep", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )


def test_check_config_accepts_the_documented_examples():
    for path, models in (
        ("example-config.yaml", "3 models (2 vllm, 1 sglang), 5 engines"),
        ("tests/data/kvcached-config.yaml", "2 models (1 vllm, 1 sglang),"),
        ("examples/demo.yaml", "2 models (1 vllm, 1 sglang),"),
    ):
        result = kvsleep("check-config", path)
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith(f"OK: {models}")


def test_check_config_reports_every_problem_with_its_key_path():
    path = "tests/data/five-mistakes.yaml"
    result = kvsleep("check-config", path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 5, lines
    for key in (
        "sleep_manager.idle_treshold_seconds",
        "sleep_manager.min_sleep_duration",
        "models[1].engine",
        "models[2].name",
        "models[2].url",
    ):
        assert any(line.startswith(f"{path}: {key}: ") for line in lines), (key, lines)
    assert "did you mean 'idle_threshold_seconds'" in result.stderr


def test_serve_refuses_a_bad_config_with_one_line_reason():
    result = kvsleep("serve", "--config", "tests/data/five-mistakes.yaml")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "kvsleep: refusing to start: 5 configuration problem(s)"
    )


def test_version_and_help():
    assert kvsleep("--version").stdout.strip() == f"kvsleep {__version__}"
    help_text = kvsleep("--help").stdout
    for command in ("serve", "check-config", "sim-engine", "status", "sleep", "wake"):
        assert command in help_text


def test_admin_client_reports_an_unreachable_server():
    result = kvsleep("status", "--url", "http://127.0.0.1:9", "--timeout", "2")
    assert result.returncode == 1
    assert "cannot reach http://127.0.0.1:9" in result.stderr


def test_an_unset_admin_token_warns_in_check_config_and_simulate_but_stops_serve(tmp_path):
    """Validating a production config in CI, or replaying its traffic on a laptop, must not
    need the production secret; serving it does."""
    config = tmp_path / "prod.yaml"
    config.write_text(
        "router: {admin_token_env: KVSLEEP_TEST_UNSET_TOKEN, port: 9}\n"
        "models: [{name: m, engine: vllm, url: 'http://127.0.0.1:8001'}]\n"
    )
    trace = tmp_path / "trace.csv"
    trace.write_text("timestamp,model,duration\n0,m,1\n600,m,1\n")
    warning = (
        "warning: "
        f"{config}: router.admin_token_env: environment variable "
        "KVSLEEP_TEST_UNSET_TOKEN is not set (needed by kvsleep serve)"
    )
    checked = kvsleep("check-config", str(config))
    assert checked.returncode == 0 and checked.stdout.startswith("OK: 1 model")
    assert warning in checked.stderr.splitlines()
    replayed = kvsleep("simulate", "--config", str(config), "--trace", str(trace))
    assert replayed.returncode == 0, replayed.stderr
    assert warning in replayed.stderr.splitlines()
    served = kvsleep("serve", "--config", str(config))
    assert served.returncode == 2
    assert "KVSLEEP_TEST_UNSET_TOKEN is not set" in served.stderr
