"""kvsleep killed with SIGKILL in the middle of an engine sleep or wake, then restarted.

Everything runs as real processes on 127.0.0.1: a sim engine (`python -m kvsleep sim-engine`)
slow enough to be caught mid-call, and `python -m kvsleep serve --config ...`. The kill lands
while the engine is executing the call (checked in the engine's own log). After a restart the
state file and kvsleep's view converge to the engine's truth, the next request is served, and
the engine suffered no hazard (no resume of a fresh SGLang, no double release, no request to a
sleeping engine). The in-process equivalents (a state file edited to look interrupted) are in
test_state_file.py and test_recovery.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
M = "org/m"
LATENCY = 0.8  # seconds each engine sleep and wake takes: the window the kill lands in


class Proc:
    """A child process with its output in a file, killed by PID."""

    def __init__(self, argv: list[str], log: Path) -> None:
        self.log = log
        with log.open("ab") as out:
            self.popen = subprocess.Popen(
                argv,
                cwd=REPO,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def kill(self) -> int:
        if self.popen.poll() is None:
            os.kill(self.pid, signal.SIGKILL)
        return self.popen.wait(10)


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    started: list[Proc] = []
    yield started
    for proc in started:
        proc.kill()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def until(predicate: Any, timeout: float, what: str, interval: float = 0.01) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(aiohttp.ClientError, OSError):
            value = predicate()
            if asyncio.iscoroutine(value):
                value = await value
            if value:
                return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(interval)


async def start_sim(procs: list[Proc], tmp_path: Path, flavor: str) -> tuple[Proc, str]:
    sim = Proc(
        [
            sys.executable,
            "-m",
            "kvsleep",
            "sim-engine",
            "--flavor",
            flavor,
            "--model",
            M,
            "--port",
            "0",
            "--tokens-per-second",
            "0",
            "--sleep-latency",
            str(LATENCY),
            "--wake-latency",
            str(LATENCY),
            "--reload-latency",
            "0.1",
        ],
        tmp_path / "sim.log",
    )
    procs.append(sim)
    match = await until(
        lambda: re.search(r"serving .* on (http://127\.0\.0\.1:\d+)", sim.text()),
        15,
        "the sim's address",
    )
    return sim, match.group(1)


def start_kvsleep(procs: list[Proc], config: Path) -> Proc:
    proc = Proc(
        [sys.executable, "-m", "kvsleep", "serve", "--config", str(config)],
        config.parent / "kvsleep.log",
    )
    procs.append(proc)
    return proc


async def ready(session: aiohttp.ClientSession, url: str, proc: Proc) -> None:
    async def check() -> bool:
        assert proc.popen.poll() is None, proc.text()[-3000:]
        async with session.get(url + "/-/ready") as resp:
            return resp.status == 200

    await until(check, 20, "kvsleep to be ready", 0.05)


async def get_json(session: aiohttp.ClientSession, url: str) -> Any:
    async with session.get(url) as resp:
        assert resp.status == 200, url
        return await resp.json()


def truth(stats: dict[str, Any]) -> str:
    """Where the engine really stands, from what only the simulator knows."""
    if stats["flavor"] == "vllm":
        return "asleep" if stats["engine"]["sleep_level"] is not None else "awake"
    return "asleep" if stats["engine"]["released"] else "awake"


def last_event(stats: dict[str, Any], route: str) -> str | None:
    events = [
        e["event"]
        for e in stats["log"]
        if e["event"] in ("control", "control_done") and e.get("route") == route
    ]
    return events[-1] if events else None


def stored_state(state_dir: Path) -> str:
    return json.loads((state_dir / "state.json").read_text())["models"][M]["state"]


# (flavor, vLLM sleep level, operation interrupted, engine route it is in, final truth)
CASES = [
    pytest.param("vllm", 1, "sleep", "/sleep", "asleep", id="vllm-sleep"),
    pytest.param("vllm", 2, "wake", "/wake_up", "asleep", id="vllm-level2-wake"),
    pytest.param(
        "sglang", None, "sleep", "/release_memory_occupation", "asleep", id="sglang-sleep"
    ),
    pytest.param("sglang", None, "wake", "/resume_memory_occupation", "awake", id="sglang-wake"),
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("flavor", "level", "op", "route", "final"), CASES)
async def test_sigkill_mid_operation_then_restart_converges_and_serves(
    flavor, level, op, route, final, procs, tmp_path
):
    sim, sim_url = await start_sim(procs, tmp_path, flavor)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    state_dir = tmp_path / "state"
    model: dict[str, Any] = {"name": M, "engine": flavor, "url": sim_url}
    if level is not None:
        model["sleep_level"] = level
    config = tmp_path / "kvsleep.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "router": {"host": "127.0.0.1", "port": port},
                "sleep_manager": {
                    "check_interval_seconds": 0.2,
                    "idle_threshold_seconds": 3600,
                    "auto_sleep_enabled": False,
                    "min_awake_seconds": 0,
                    "min_sleep_duration": 0,
                    "wake_timeout_seconds": 30,
                },
                "models": [model],
                "state_dir": str(state_dir),
                "log_dir": str(tmp_path / "logs"),
            }
        )
    )
    first = start_kvsleep(procs, config)
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        await ready(session, url, first)
        held = None
        if op == "sleep":
            async with session.post(f"{url}/models/org%2Fm/sleep?wait=false") as resp:
                assert resp.status == 202
        else:
            async with session.post(f"{url}/models/org%2Fm/sleep") as resp:
                assert resp.status == 200, await resp.text()
            # A client request wakes it, and is held while the engine wakes.
            held = asyncio.create_task(complete(session, url))

        # Kill kvsleep while the engine is executing the call.
        await until(lambda: _in_call(session, sim_url, route), 10, f"{route} to reach the engine")
        assert first.kill() == -signal.SIGKILL
        at_kill = await get_json(session, sim_url + "/sim/stats")
        assert last_event(at_kill, route) == "control", "the kill did not land mid-call"

        if held is not None:  # a held client sees the connection drop, it does not hang
            with pytest.raises(aiohttp.ClientError):
                await asyncio.wait_for(held, 5)
        # The record kvsleep left: SGLang's is written before each engine call (no engine
        # route says whether it released its memory); vLLM's may lag, its probe tells.
        left = stored_state(state_dir)
        if flavor == "sglang":
            assert left == ("sleeping" if op == "sleep" else "waking")
        else:
            assert left in (
                ("awake", "draining", "sleeping") if op == "sleep" else ("asleep", "waking")
            )

        second = start_kvsleep(procs, config)
        await ready(session, url, second)
        if flavor == "sglang":
            # An intent without an outcome, for the same engine process: kvsleep cannot know
            # whether the call reached SGLang (no route tells), so it calls nothing, refuses
            # requests with the reason, and waits for an operator's word (issue #13).
            status = await get_json(session, url + "/sleep/status")
            assert status["models"][M]["state"] == "unknown"
            status_code, body = await complete(session, url)
            assert status_code == 503, body
            message = json.loads(body)["error"]["message"]
            assert "unknown" in message and M in message
            async with session.post(f"{url}/models/org%2Fm/adopt?state={final}") as resp:
                assert resp.status == 200, await resp.text()

        async def converged() -> bool:
            stats = await get_json(session, sim_url + "/sim/stats")
            status = await get_json(session, url + "/sleep/status")
            return (
                last_event(stats, route) == "control_done"
                and truth(stats) == final
                and status["models"][M]["state"] == final
                and stored_state(state_dir) == final
            )

        await until(
            converged, 10, f"kvsleep, its state file and the engine to agree on {final}", 0.05
        )
        status_code, body = await complete(session, url)
        assert status_code == 200, body
        status = await get_json(session, url + "/sleep/status")
        assert status["models"][M]["state"] == "awake"

        stats = await get_json(session, sim_url + "/sim/stats")
        assert stats["hazards"] == {}, stats["hazards"]
        assert stats["requests"]["served_while_not_awake"] == 0
        assert sim.popen.poll() is None, "the engine died"
        if flavor == "sglang":
            assert stats["calls"]["/release_memory_occupation"] == 1
            assert stats["calls"]["/resume_memory_occupation"] == 1  # never a second resume
        else:
            assert stats["engine"]["weights_valid"] and stats["engine"]["sleep_level"] is None
    second.popen.send_signal(signal.SIGTERM)
    assert second.popen.wait(15) == 0, second.text()[-3000:]
    assert "Traceback" not in first.text() + second.text()


async def complete(session: aiohttp.ClientSession, url: str) -> tuple[int, bytes]:
    async with session.post(
        f"{url}/v1/completions", json={"model": M, "prompt": "x", "max_tokens": 2}
    ) as resp:
        return resp.status, await resp.read()


async def _in_call(session: aiohttp.ClientSession, sim_url: str, route: str) -> bool:
    return last_event(await get_json(session, sim_url + "/sim/stats"), route) == "control"
