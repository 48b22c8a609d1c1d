"""The operator side of the `kvsleep` command: help when bare, `status` as a table, `--url`
as host:port, and `serve --host/--port`."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import yaml

from tests.kvsleep_harness import config_doc, sim_model, start_kvsleep

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def kvsleep(*args: str) -> tuple[int, str, str]:
    """Run the command without blocking the loop that serves the in-process kvsleep."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "kvsleep",
        *args,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_bare_kvsleep_prints_help_not_an_error():
    code, out, err = await kvsleep()
    assert code == 0
    assert out.startswith("usage: kvsleep")
    for command in ("serve", "status", "sleep", "wake", "check-config"):
        assert command in out
    assert "error" not in err


async def test_status_prints_a_table_and_json_with_a_host_port_url(sim_factory, tmp_path):
    a = await sim_factory("vllm", "meta-llama/Llama-3.2-1B")
    b = await sim_factory("sglang", "Qwen/Qwen3-0.6B")
    kv = await start_kvsleep(
        config_doc(
            [sim_model(a), sim_model(b, wake_eta_seconds=12)],
            tmp_path,
            gpus=[{"id": 0, "memory_gb": 80}],
        )
    )
    address = kv.url.removeprefix("http://")
    try:
        code, out, err = await kvsleep("sleep", "Qwen/Qwen3-0.6B", "--url", address)
        assert code == 0, err
        code, out, err = await kvsleep("status", "--url", address)
        assert code == 0, err
        lines = out.splitlines()
        assert lines[0].split() == [
            "MODEL",
            "STATE",
            "ENGINE",
            "IDLE/THRESHOLD",
            "IN-FLIGHT",
            "HELD",
            "WAKE-ETA",
            "LAST-ERROR",
        ]
        llama, qwen = lines[1].split(), lines[2].split()
        assert llama[:3] == ["meta-llama/Llama-3.2-1B", "awake", "vllm"]
        assert qwen[:3] == ["Qwen/Qwen3-0.6B", "asleep", "sglang"]
        assert "12s" in qwen  # its wake ETA
        assert "GPU 0: 0 / 80 GB committed" in lines
        assert len(lines) == 5  # two models, a short table, not a page of JSON
        code, out, err = await kvsleep("status", "--json", "--url", address)
        assert code == 0, err
        assert json.loads(out)["models"]["Qwen/Qwen3-0.6B"]["state"] == "asleep"
    finally:
        await kv.close()


def test_serve_host_and_port_override_the_config(tmp_path):
    config_port, port = free_port(), free_port()
    doc = config_doc(
        [{"name": "org/m", "engine": "vllm", "url": "http://127.0.0.1:9"}],
        tmp_path,
        router={"host": "localhost", "port": config_port},
    )
    path = tmp_path / "kvsleep.yaml"
    path.write_text(yaml.safe_dump(doc))
    bad = subprocess.run(
        [sys.executable, "-m", "kvsleep", "serve", "--config", str(path), "--port", "70000"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2
    assert "not a TCP port" in bad.stderr
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "kvsleep",
            "serve",
            "--config",
            str(path),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/-/healthy", timeout=2) as r:
                    assert r.status == 200
                    break
            except OSError:
                assert proc.poll() is None, proc.communicate()[1]
                assert time.monotonic() < deadline, "kvsleep serve did not listen on --port"
                time.sleep(0.1)
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", config_port)) != 0  # the config's port is unused
        # The flags outlive a reload: the file's own port is not a change that needs a restart.
        reload = urllib.request.Request(f"http://127.0.0.1:{port}/-/reload", method="POST")
        with urllib.request.urlopen(reload, timeout=10) as r:
            assert json.loads(r.read()) == {"status": "success"}
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
