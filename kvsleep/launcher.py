"""Start, supervise and stop the engines the config asks kvsleep to run (no tmux, no orphans).

Each engine runs in its own process group with its output in a per-model log file. kvsleep waits
for its readiness route before routing to it, restarts it with backoff when it dies (holding its
requests meanwhile, through the sleep manager), reports a crash loop loudly, and on shutdown
terminates every process group it started: SIGTERM, then SIGKILL after a grace period.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import re
import signal
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from prometheus_client import Counter, Gauge

from kvsleep.config import ModelConfig
from kvsleep.metrics import Metrics
from kvsleep.sleep_manager import SleepManager

log = logging.getLogger(__name__)

READY_POLL_SECONDS = 0.2
STOP_GRACE_SECONDS = 10.0
RESTART_BACKOFF_SECONDS = (1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
# An engine that dies this many times within the window is crash-looping.
CRASH_LOOP_RESTARTS = 3
CRASH_LOOP_WINDOW_SECONDS = 300.0
LOG_TAIL_LINES = 20
PR_SET_PDEATHSIG = 1  # linux/prctl.h


class LaunchError(Exception):
    """An engine could not be started; the message names the model and shows its log."""


def build_command(model: ModelConfig) -> list[str]:
    """The argv to run: the configured command, or the kvcached controller's engine command.

    `{python}` in a configured command is this interpreter, so demos run from any virtualenv.
    """
    if model.command:
        argv = [sys.executable if arg == "{python}" else arg for arg in model.command]
    elif model.engine == "vllm":
        argv = [_venv_bin(model, "vllm"), "serve", model.name, *model.engine_args]
    else:
        python = _venv_bin(model, "python") if model.venv_path else sys.executable
        argv = [python, "-m", "sglang.launch_server", "--model-path", model.name,
                *model.engine_args]
    if model.engine == "vllm" and _is_vllm_serve(argv) and "--enable-sleep-mode" not in argv:
        argv.append("--enable-sleep-mode")
    return argv


def build_env(model: ModelConfig) -> dict[str, str]:
    env = dict(os.environ)
    env.update(model.env)
    if model.venv_path:
        env["VIRTUAL_ENV"] = model.venv_path
        env["PATH"] = f"{Path(model.venv_path) / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    if model.engine == "vllm":
        if model.env.get("VLLM_SERVER_DEV_MODE", "1") != "1":
            log.warning("model %s: VLLM_SERVER_DEV_MODE=%s disables vLLM's sleep routes; kvsleep "
                        "will not be able to put it to sleep", model.name,
                        model.env["VLLM_SERVER_DEV_MODE"])
        else:
            env["VLLM_SERVER_DEV_MODE"] = "1"
    return env


def _venv_bin(model: ModelConfig, program: str) -> str:
    return str(Path(model.venv_path) / "bin" / program) if model.venv_path else program


def _is_vllm_serve(argv: list[str]) -> bool:
    return len(argv) >= 2 and Path(argv[0]).name == "vllm" and argv[1] == "serve"


def log_path(model: ModelConfig, log_dir: str) -> Path:
    if model.log_file:
        return Path(model.log_file)
    return Path(log_dir) / (re.sub(r"[^A-Za-z0-9._-]+", "_", model.name) + ".log")


def tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        with path.open("rb") as fh:
            return b"".join(deque(fh, maxlen=lines)).decode(errors="replace").rstrip()
    except OSError:
        return "(no log)"


@dataclass(eq=False)
class Engine:
    model: ModelConfig
    log_file: Path
    process: asyncio.subprocess.Process | None = None
    supervisor: asyncio.Task[None] | None = None
    deaths: deque[float] = field(default_factory=lambda: deque(maxlen=CRASH_LOOP_RESTARTS))


class Launcher:
    def __init__(self, manager: SleepManager, metrics: Metrics, log_dir: str) -> None:
        self.manager = manager
        self.log_dir = log_dir
        self.engines: dict[str, Engine] = {}
        self._stopping = False
        self.restarts = Counter("kvsleep_engine_restarts",
                                "Launched engines restarted after exiting unexpectedly.",
                                ["model"], registry=metrics.registry)
        self.crash_looping = Gauge("kvsleep_engine_crash_looping",
                                   "1 while a launched engine keeps dying soon after start.",
                                   ["model"], registry=metrics.registry)

    async def start(self, models: list[ModelConfig]) -> None:
        """Start every engine and wait until all are ready; on any failure stop them all."""
        for model in models:
            engine = Engine(model, log_path(model, self.log_dir))
            self.engines[model.name] = engine
            self.restarts.labels(model.name)
            self.crash_looping.labels(model.name).set(0)
        try:
            await asyncio.gather(*(self._spawn_and_wait(e) for e in self.engines.values()))
        except BaseException:
            await self.stop()
            raise
        for engine in self.engines.values():
            engine.supervisor = asyncio.create_task(self._supervise(engine),
                                                    name=f"kvsleep-supervise-{engine.model.name}")

    async def _spawn_and_wait(self, engine: Engine) -> None:
        model = engine.model
        argv = build_command(model)
        engine.log_file.parent.mkdir(parents=True, exist_ok=True)
        with engine.log_file.open("ab") as out:
            out.write(f"\n==== kvsleep starting {model.name}: {' '.join(argv)}\n".encode())
            out.flush()
            try:
                engine.process = await asyncio.create_subprocess_exec(
                    *argv, stdin=asyncio.subprocess.DEVNULL, stdout=out,
                    stderr=asyncio.subprocess.STDOUT, env=build_env(model),
                    start_new_session=True, preexec_fn=_die_with_parent)
            except OSError as exc:
                raise LaunchError(f"model {model.name}: cannot start {argv[0]!r}: {exc}") from exc
        log.info("model %s: started pid %d, log %s", model.name, engine.process.pid,
                 engine.log_file)
        await self._wait_ready(engine)

    async def _wait_ready(self, engine: Engine) -> None:
        model, process = engine.model, engine.process
        assert process is not None
        deadline = time.monotonic() + model.ready_timeout_seconds
        url = model.url.rstrip("/") + "/health"
        async with aiohttp.ClientSession() as session:
            while True:
                if process.returncode is not None:
                    raise LaunchError(
                        f"model {model.name}: engine exited with code {process.returncode} "
                        f"before becoming ready; log {engine.log_file}:\n{tail(engine.log_file)}")
                with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
                    async with session.get(url, timeout=aiohttp.ClientTimeout(total=2)) as resp:
                        if resp.status == 200:
                            log.info("model %s: engine ready", model.name)
                            return
                if time.monotonic() > deadline:
                    raise LaunchError(
                        f"model {model.name}: engine not ready after "
                        f"{model.ready_timeout_seconds:g}s ({url}); log {engine.log_file}:\n"
                        f"{tail(engine.log_file)}")
                await asyncio.sleep(READY_POLL_SECONDS)

    async def _supervise(self, engine: Engine) -> None:
        name = engine.model.name
        restarts = 0
        while True:
            code = await self._wait_exit(engine)
            if self._stopping:
                return
            now = time.monotonic()
            engine.deaths.append(now)
            looping = (len(engine.deaths) == CRASH_LOOP_RESTARTS
                       and now - engine.deaths[0] < CRASH_LOOP_WINDOW_SECONDS)
            self.crash_looping.labels(name).set(1 if looping else 0)
            level = logging.ERROR if looping else logging.WARNING
            log.log(level, "model %s: engine exited with code %s%s; restarting. Last log lines "
                    "(%s):\n%s", name, code, " (CRASH LOOP)" if looping else "",
                    engine.log_file, tail(engine.log_file))
            ready: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
            self.manager.engine_restarting(name, ready, "crash loop" if looping else None)
            delay = RESTART_BACKOFF_SECONDS[min(restarts, len(RESTART_BACKOFF_SECONDS) - 1)]
            restarts = restarts + 1 if looping else 0
            await asyncio.sleep(delay)
            self.restarts.labels(name).inc()
            try:
                await self._spawn_and_wait(engine)
            except LaunchError as exc:
                log.error("%s", exc)
                ready.set_result(False)
                if engine.process is not None:
                    _signal_group(engine.process.pid, signal.SIGKILL)
                continue
            ready.set_result(True)

    async def _wait_exit(self, engine: Engine) -> int:
        """The engine's exit code; an engine that stays up a whole window is no longer looping."""
        assert engine.process is not None
        exited = asyncio.ensure_future(engine.process.wait())
        while True:
            done, _ = await asyncio.wait([exited], timeout=CRASH_LOOP_WINDOW_SECONDS)
            if done:
                return exited.result()
            self.crash_looping.labels(engine.model.name).set(0)

    async def stop(self) -> None:
        """Terminate every engine's process group: SIGTERM, then SIGKILL after the grace."""
        self._stopping = True
        for engine in self.engines.values():
            if engine.supervisor is not None:
                engine.supervisor.cancel()
        running = [e.process for e in self.engines.values()
                   if e.process is not None and e.process.returncode is None]
        for process in running:
            _signal_group(process.pid, signal.SIGTERM)
        if running:
            _, pending = await asyncio.wait([asyncio.ensure_future(p.wait()) for p in running],
                                            timeout=STOP_GRACE_SECONDS)
            for process in running:
                _signal_group(process.pid, signal.SIGKILL)
            for task in pending:
                with contextlib.suppress(Exception):
                    await task
        for engine in self.engines.values():
            if engine.process is not None:
                _signal_group(engine.process.pid, signal.SIGKILL)


# Loaded once here, so that the child between fork and exec only makes one system call.
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM when kvsleep dies, even by SIGKILL, so that a
    restarted kvsleep does not find its engines' ports taken by orphans."""
    if _LIBC is not None:
        _LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _signal_group(pid: int, sig: signal.Signals) -> None:
    """Signal the engine's whole process group, so its children go too."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)
