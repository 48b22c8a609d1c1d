"""kvsleep owns the processes it launches: whole groups stopped, nothing outlives it, no stranger
adopted. Real `kvsleep serve` and `kvsleep sim-engine` processes, real signals; the "engine" of a
wrapper command is a grandchild of kvsleep, and a `sleep` beside it plays vLLM's EngineCore (a
child that outlives a SIGKILL of the API server)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from kvsleep.control.keeper import members, proc_stat
from tests import test_launcher
from tests.test_launcher import (
    Serve,
    alive,
    free_port,
    http,
    sim_command,
    url_of,
    wait_for,
    write_config,
)

GRACE = 2.0  # stop_grace_seconds of the engines launched here

serve_runs = test_launcher.serve_runs  # the fixture: processes killed at teardown


def shell_words(argv: list[str]) -> str:
    return " ".join(f"'{sys.executable if a == '{python}' else a}'" for a in argv)


def group_of(pid: int) -> int:
    stat = proc_stat(pid)
    assert stat is not None, f"process {pid} is gone"
    return stat[1]


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def find(group: int, text: str) -> list[int]:
    """Processes of the group running `text` (not the keeper or a shell that names it)."""
    return [
        p
        for p in members(group)
        if text in (line := cmdline(p))
        and "kvsleep.control.keeper" not in line
        and not line.startswith("sh ")
    ]


def engine_config(tmp_path: Path, command: list[str], port: int, **extra) -> Path:
    return write_config(
        tmp_path,
        [
            {
                "name": "org/m",
                "engine": "vllm",
                "url": f"http://127.0.0.1:{port}",
                "ready_timeout_seconds": 20,
                "stop_grace_seconds": GRACE,
                "command": command,
                **extra,
            }
        ],
    )


def wrapped(port: int, script: str) -> list[str]:
    """`sh -c SCRIPT` where SCRIPT's `$SIM` is the sim engine's command line."""
    return ["sh", "-c", script.replace("$SIM", shell_words(sim_command("vllm", "org/m", port)))]


def completion(base: str) -> tuple[int, object]:
    return http(
        "POST", base + "/v1/completions", {"model": "org/m", "prompt": "hi", "max_tokens": 2}
    )


def test_sigkill_of_the_api_server_ends_its_group_and_restarts_holding_requests(
    tmp_path, serve_runs
):
    port = free_port()
    config = engine_config(tmp_path, wrapped(port, "sleep 1000 & exec $SIM"), port)
    serve = Serve(config, tmp_path)
    serve_runs.append(serve)
    base = url_of(config)
    wait_for(lambda: http("GET", base + "/-/ready")[0] == 200, 30, "kvsleep ready")
    group = group_of(serve.engine_pids()[0])
    [api_server] = find(group, "sim-engine")
    [engine_core] = find(group, "sleep 1000")
    os.kill(api_server, signal.SIGKILL)
    wait_for(
        lambda: http("GET", base + "/sleep/status")[1]["models"]["org/m"]["state"] == "starting",
        10,
        "model starting again",
    )
    # Held while the engine restarts, then served: no 502.
    results: list[tuple[int, object]] = []
    threads = [threading.Thread(target=lambda: results.append(completion(base))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(40)
    assert [status for status, _ in results] == [200, 200, 200], results
    assert not alive(engine_core), "the old group's survivor still runs"
    assert not members(group), f"processes of the old group remain: {members(group)}"
    assert len(serve.engine_pids()) == 2
    assert serve.stop() == 0
    assert not any(members(group_of_pid) for group_of_pid in serve.engine_pids())


@pytest.mark.parametrize("shape", ["direct", "exec-wrapper", "non-exec-wrapper"])
def test_no_engine_outlives_a_sigkilled_kvsleep(tmp_path, serve_runs, shape):
    port = free_port()
    command = {
        "direct": sim_command("vllm", "org/m", port),
        # The engine's child ignores SIGTERM: only SIGKILL after the grace period ends it.
        "exec-wrapper": wrapped(port, "trap '' TERM; sleep 1000 & exec $SIM"),
        "non-exec-wrapper": wrapped(port, "$SIM; echo engine ended"),
    }[shape]
    config = engine_config(tmp_path, command, port)
    serve = Serve(config, tmp_path)
    serve_runs.append(serve)
    wait_for(lambda: http("GET", url_of(config) + "/-/ready")[0] == 200, 30, "kvsleep ready")
    group = group_of(serve.engine_pids()[0])
    engines = find(group, "sim-engine")
    assert engines
    serve.kill()
    wait_for(lambda: not members(group), GRACE + 10, "every engine process gone")
    # The next kvsleep launches cleanly on the same ports.
    again = Serve(config, tmp_path)
    serve_runs.append(again)
    wait_for(lambda: http("GET", url_of(config) + "/-/ready")[0] == 200, 30, "kvsleep ready")
    assert completion(url_of(config))[0] == 200
    assert again.stop() == 0


def test_next_kvsleep_stops_what_a_killed_one_left(tmp_path, serve_runs):
    """kvsleep and the keeper of its engine both SIGKILLed: a process that ignores SIGTERM is
    left behind. The next kvsleep finds its group in the state dir and ends it first."""
    port = free_port()
    config = engine_config(tmp_path, wrapped(port, "trap '' TERM; sleep 1000 & exec $SIM"), port)
    serve = Serve(config, tmp_path)
    serve_runs.append(serve)
    wait_for(lambda: http("GET", url_of(config) + "/-/ready")[0] == 200, 30, "kvsleep ready")
    keeper = serve.engine_pids()[0]
    group = group_of(keeper)
    [leftover] = find(group, "sleep 1000")
    serve.kill()
    os.kill(keeper, signal.SIGKILL)
    wait_for(lambda: not alive(keeper), 10, "keeper gone")
    assert alive(leftover)
    again = Serve(config, tmp_path)
    serve_runs.append(again)
    wait_for(
        lambda: http("GET", url_of(config) + "/-/ready")[0] == 200, GRACE + 30, "kvsleep ready"
    )
    assert not alive(leftover)
    assert "left running by a previous kvsleep" in again.text()
    assert again.stop() == 0


async def test_leftovers_are_stopped_only_when_their_start_time_matches(tmp_path):
    """A recorded group whose leader is now another process (PID reused) is left alone."""
    from kvsleep.control.launcher import Records, stop_leftovers

    ours = subprocess.Popen(["sleep", "1000"], start_new_session=True)
    stranger = subprocess.Popen(["sleep", "1000"], start_new_session=True)
    try:
        records = Records(str(tmp_path))
        records.put("ours", ours.pid, proc_stat(ours.pid)[3], GRACE)
        records.put("reused", stranger.pid, proc_stat(stranger.pid)[3] - 1, GRACE)
        await stop_leftovers(records)
        await asyncio.to_thread(ours.wait, 10)
        assert ours.returncode == -signal.SIGTERM
        assert stranger.poll() is None
        assert records.load() == {}
    finally:
        for proc in (ours, stranger):
            proc.kill()
            proc.wait()


def test_stranger_on_the_engine_port_is_an_error_never_adopted(tmp_path, serve_runs):
    port = free_port()
    stranger = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "kvsleep",
            "sim-engine",
            "--flavor",
            "vllm",
            "--model",
            "org/m",
            "--port",
            str(port),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(
            lambda: http("GET", f"http://127.0.0.1:{port}/v1/models")[0] == 200, 20, "stranger up"
        )
        marker = tmp_path / "launched"
        config = engine_config(tmp_path, wrapped(port, f"touch {marker}; exec $SIM"), port)
        serve = Serve(config, tmp_path)
        serve_runs.append(serve)
        assert serve.proc.wait(30) == 1
        text = serve.text()
        assert f"port {port} is already in use by pid {stranger.pid}" in text, text
        assert "sim-engine" in text
        assert not marker.exists()
        assert stranger.poll() is None, "the stranger was touched"
    finally:
        stranger.kill()
        stranger.wait()
