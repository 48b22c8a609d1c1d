"""Launched engines' logs: one file per model, size-capped and rotated, sleep and wake noted in
it, and a restart quotes only the last lines of the latest run."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from kvsleep.control.launcher import log_path, tail
from tests import test_launcher
from tests.test_launcher import (
    Serve,
    free_port,
    http,
    url_of,
    wait_for,
    write_config,
)
from tests.test_process_ownership import find, group_of, wrapped

REPO = Path(__file__).resolve().parent.parent

serve_runs = test_launcher.serve_runs  # the fixture: processes killed at teardown


def test_keeper_rotates_the_log_at_its_size_cap(tmp_path):
    log = tmp_path / "engine.log"
    ours, theirs = socket.socketpair()
    script = "i=0; while [ $i -lt 400 ]; do echo line $i of the engine output; i=$((i+1)); done"
    keeper = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "kvsleep.control.keeper",
            "--log",
            str(log),
            "--max-bytes",
            "4000",
            "--backups",
            "2",
            "--grace",
            "2",
            "--",
            "sh",
            "-c",
            script,
        ],
        stdin=theirs.fileno(),
        cwd=REPO,
        start_new_session=True,
    )
    theirs.close()
    try:
        assert keeper.wait(30) == 0
        assert ours.recv(100) == b"exited 0\n"
    finally:
        ours.close()
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["engine.log", "engine.log.1", "engine.log.2"], files
    for name in files:
        assert (tmp_path / name).stat().st_size <= 4000
    assert "line 399 of the engine output" in log.read_text()


def test_tail_quotes_the_latest_run_bounded(tmp_path):
    log = tmp_path / "m.log"
    log.write_bytes(
        b"old run line\n==== kvsleep starting m: engine\nloading\r"
        + b"#" * 1_000_000
        + b"\rdone\nfatal: out of memory\n"
    )
    quoted = tail(log)
    assert "old run line" not in quoted
    assert quoted.endswith("fatal: out of memory")
    assert len(quoted) < 10_000


def test_restart_quotes_only_the_last_lines_and_sleep_wake_are_noted(tmp_path, serve_runs):
    port = free_port()
    # A progress bar a megabyte long on one line, as engines print while loading weights.
    bar = "python3 -c \"import sys; sys.stdout.write('loading ' + 'x' * 1000000 + chr(10))\""
    config = write_config(
        tmp_path,
        [
            {
                "name": "org/m",
                "engine": "vllm",
                "url": f"http://127.0.0.1:{port}",
                "ready_timeout_seconds": 20,
                "command": wrapped(port, f"{bar}; exec $SIM"),
            }
        ],
    )
    serve = Serve(config, tmp_path)
    serve_runs.append(serve)
    base = url_of(config)
    wait_for(lambda: http("GET", base + "/-/ready")[0] == 200, 30, "kvsleep ready")
    assert http("POST", base + "/models/org%2Fm/sleep")[0] == 200
    assert http("POST", base + "/models/org%2Fm/wake")[0] == 200
    [engine] = find(group_of(serve.engine_pids()[0]), "sim-engine")
    os.kill(engine, signal.SIGKILL)
    wait_for(lambda: len(serve.engine_pids()) == 2, 20, "engine restarted")
    wait_for(lambda: http("GET", base + "/-/ready")[0] == 200, 30, "kvsleep ready")
    assert serve.stop() == 0
    assert "exited with code -9" in serve.text()
    assert len(serve.text()) < 100_000, "the restart quoted the whole log"
    from kvsleep.config import load_config

    text = log_path(load_config(str(config)).models[0], str(tmp_path / "logs")).read_text()
    assert "asleep (reason: manual)" in text
    assert "awake (reason: manual)" in text
    assert "engine exited with code -9; restarting" in text
