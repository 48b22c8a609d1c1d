"""A real `prometheus` for tests: started on a free loopback port, always killed at teardown."""

from __future__ import annotations

import shutil
import socket
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

PROMETHEUS = shutil.which("prometheus")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Prometheus:
    def __init__(self, url: str, log: Path, process: subprocess.Popen[bytes]) -> None:
        self.url = url
        self.log = log
        self.process = process

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""

    def stop(self) -> None:
        """Take Prometheus away mid-test (the fixture stops it anyway)."""
        stop_all([self.process])


@pytest.fixture
def prometheus_factory(tmp_path: Path) -> Iterator[Callable[[dict[str, Any]], Prometheus]]:
    """`start(config)` runs a real `prometheus` on a free loopback port; killed at teardown.

    New targets are picked up about 5 s after start (Prometheus' target sync)."""
    running: list[subprocess.Popen[bytes]] = []

    def start(config: dict[str, Any]) -> Prometheus:
        if PROMETHEUS is None:
            pytest.skip(
                "prometheus is not installed (scripts/test installs it: apt-get install prometheus)"
            )
        config_file = tmp_path / "prometheus.yml"
        config_file.write_text(yaml.safe_dump(config), encoding="utf-8")
        port = free_port()
        log = tmp_path / "prometheus.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                [
                    PROMETHEUS,
                    f"--config.file={config_file}",
                    f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                    "--log.level=warn",
                ],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        running.append(process)
        return Prometheus(f"http://127.0.0.1:{port}", log, process)

    yield start
    stop_all(running)


def stop_all(running: list[subprocess.Popen[bytes]]) -> None:
    for proc in running:
        if proc.poll() is None:
            proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
