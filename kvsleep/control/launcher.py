"""Start, supervise and stop the engines the config asks kvsleep to run (no tmux, no orphans).

Each engine runs under a keeper (kvsleep/keeper.py) that leads the engine's own session and
process group, copies its output into a rotated per-model log file, and ends the whole group
(SIGTERM, then SIGKILL after a grace period) when kvsleep asks, when the engine's main process
exits, or when kvsleep dies, however it dies. The group ids (with their start times) are recorded
in the state dir, so a kvsleep restarted after its own SIGKILL stops what it left before launching.

Ready means: our keeper is alive, the engine lists the configured model in `/v1/models`, and its
`/health` answers 200. A port already taken before launch is a stranger's: an error naming the
port and the process, never adopted. Engines start one at a time per GPU; a model that would not
fit its GPUs' memory budget beside those already awake first has them put to sleep (or is started
on its first request). A crashed engine is restarted with backoff while its requests are held.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client import Counter, Gauge

from kvsleep.config import ModelConfig
from kvsleep.control.keeper import members, proc_stat
from kvsleep.control.manager import SleepManager
from kvsleep.core import policy
from kvsleep.core.states import ModelState
from kvsleep.web.metrics import Metrics

log = logging.getLogger(__name__)

READY_POLL_SECONDS = 0.2
STOP_GRACE_SECONDS = 10.0
RESTART_BACKOFF_SECONDS = (1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
# An engine that dies this many times within the window is crash-looping.
CRASH_LOOP_RESTARTS = 3
CRASH_LOOP_WINDOW_SECONDS = 300.0
LOG_TAIL_LINES = 20
LOG_TAIL_BYTES = 8192  # a restart quotes at most this much of the log (progress bars are long)
LOG_LINE_CHARS = 400
LOG_MAX_BYTES = 32 * 1024 * 1024  # per file; the keeper rotates past it
LOG_BACKUPS = 2
START_MARKER = "==== kvsleep starting "
RECORDS_FILE = "engines.json"
PR_SET_PDEATHSIG = 1  # linux/prctl.h
VLLM_API_MODULES = ("vllm.entrypoints.openai.api_server", "vllm.entrypoints.api_server")
SGLANG_MODULES = ("sglang.launch_server",)


class LaunchError(Exception):
    """An engine could not be started; the message names the model and shows its log."""


# ---- the command line and environment ------------------------------------------------------


def build_command(model: ModelConfig) -> list[str]:
    """The argv to run: the configured command, or the kvcached controller's engine command,
    with the flag that makes the engine's sleep routes free memory added where it is missing
    (unless the model says `engine_flags: none`).

    `{python}` in a configured command is this interpreter, so demos run from any virtualenv.
    """
    if model.command:
        argv = [sys.executable if arg == "{python}" else arg for arg in model.command]
    elif model.engine == "vllm":
        argv = [_venv_bin(model, "vllm"), "serve", model.name, *model.engine_args]
    else:
        python = _venv_bin(model, "python") if model.venv_path else sys.executable
        argv = [
            python,
            "-m",
            "sglang.launch_server",
            "--model-path",
            model.name,
            *model.engine_args,
        ]
    if model.engine_flags == "none":
        return argv
    if model.engine == "vllm" and _is_vllm_server(argv):
        _add_flag(argv, "--enable-sleep-mode")
    elif model.engine == "sglang" and _is_sglang_server(argv):
        _add_flag(argv, "--enable-memory-saver")
    return argv


def build_env(model: ModelConfig, hidden: Iterable[str] = ()) -> dict[str, str]:
    """The engine's environment: kvsleep's, the model's, vLLM's dev mode (sleep routes) where
    missing; never the variables in `hidden` (the admin token: an engine has no use for it,
    and its /proc environ is readable by more people than kvsleep's secret should be)."""
    env = dict(os.environ)
    env.update(model.env)
    for name in hidden:
        env.pop(name, None)
    if model.venv_path:
        env["VIRTUAL_ENV"] = model.venv_path
        env["PATH"] = f"{Path(model.venv_path) / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    if model.engine == "vllm" and model.engine_flags != "none":
        if model.env.get("VLLM_SERVER_DEV_MODE", "1") != "1":
            log.warning(
                "model %s: VLLM_SERVER_DEV_MODE=%s disables vLLM's sleep routes; kvsleep "
                "will not be able to put it to sleep",
                model.name,
                model.env["VLLM_SERVER_DEV_MODE"],
            )
        else:
            env["VLLM_SERVER_DEV_MODE"] = "1"
    return env


def _add_flag(argv: list[str], flag: str) -> None:
    """Add `flag` unless it is given in any spelling (`--flag`, `--flag=...`, `--no-flag`)."""
    negated = "--no-" + flag[2:]
    if not any(a in (flag, negated) or a.startswith(flag + "=") for a in argv):
        argv.append(flag)


def _venv_bin(model: ModelConfig, program: str) -> str:
    return str(Path(model.venv_path) / "bin" / program) if model.venv_path else program


def _module_of(argv: list[str]) -> str | None:
    """`python -m MODULE ...` -> MODULE."""
    for i, arg in enumerate(argv[:-1]):
        if arg == "-m":
            return argv[i + 1]
    return None


def _is_vllm_server(argv: list[str]) -> bool:
    serve = len(argv) >= 2 and Path(argv[0]).name == "vllm" and argv[1] == "serve"
    return serve or _module_of(argv) in VLLM_API_MODULES


def _is_sglang_server(argv: list[str]) -> bool:
    serve = len(argv) >= 2 and Path(argv[0]).name == "sglang" and argv[1] == "serve"
    return serve or _module_of(argv) in SGLANG_MODULES


# ---- logs ----------------------------------------------------------------------------------


def log_path(model: ModelConfig, log_dir: str) -> Path:
    """The model's engine log file (what `GET /logs/{model}` reads)."""
    if model.log_file:
        return Path(model.log_file)
    return Path(log_dir) / (re.sub(r"[^A-Za-z0-9._-]+", "_", model.name) + ".log")


def tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last lines of the engine's latest run, bounded in bytes: a restart quotes what
    explains it, not the whole log (nor a megabyte-long progress bar line)."""
    try:
        with path.open("rb") as fh:
            size = fh.seek(0, os.SEEK_END)
            fh.seek(max(0, size - LOG_TAIL_BYTES))
            raw = fh.read(LOG_TAIL_BYTES)
    except OSError:
        return "(no log)"
    text = raw.decode(errors="replace")
    marker = text.rfind(START_MARKER)
    if marker >= 0:
        text = text[marker:]
    kept = [
        line if len(line) <= LOG_LINE_CHARS else line[:LOG_LINE_CHARS] + " [...]"
        for line in re.split(r"[\r\n]+", text)
        if line.strip()
    ]
    return "\n".join(kept[-lines:]) or "(empty log)"


def note(path: Path, text: str) -> None:
    """Append one kvsleep event line (sleep, wake, restart) to an engine's log."""
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("ab") as fh:
            fh.write(f"==== kvsleep {stamp}: {text}\n".encode())


# ---- processes -----------------------------------------------------------------------------


def start_ticks(pid: int) -> int | None:
    stat = proc_stat(pid)
    return None if stat is None else stat[3]


def boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def describe_pid(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
        command = raw.replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        command = ""
    return f"pid {pid} ({command[:200]})" if command else f"pid {pid}"


def port_holders(port: int) -> list[int]:
    """PIDs holding a listening TCP socket on `port` (those whose /proc fds are readable)."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            cols = row.split()
            if len(cols) > 9 and cols[3] == "0A" and int(cols[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(f"socket:[{cols[9]}]")
    holders: list[int] = []
    if not inodes:
        return holders
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{entry}/fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{entry}/fd/{fd}") in inodes:
                        holders.append(int(entry))
                        break
    return holders


async def _port_answers(host: str, port: int) -> bool:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 2.0)
    except (OSError, asyncio.TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


async def end_group(group: int, grace: float, started: int | None = None) -> list[int]:
    """SIGTERM every process of a group/session, SIGKILL what remains after `grace`; returns
    the PIDs signalled. With `started`, only processes that started no earlier than that
    (clock ticks since boot) are taken as the group's: an older one cannot be ours."""

    def ours() -> list[int]:
        found = members(group)
        if started is None:
            return found
        return [p for p in found if (t := start_ticks(p)) is not None and t >= started]

    targets = ours()
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        left = ours()
        if not left:
            break
        for pid in left:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while ours() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
    return targets


class Records:
    """`engines.json` in the state dir: which process groups this kvsleep started, so that the
    next one can stop them if this one is killed before it could."""

    def __init__(self, state_dir: str) -> None:
        self.path = Path(state_dir) / RECORDS_FILE

    def load(self) -> dict[str, dict[str, Any]]:
        """The records as written (JSON): their fields are checked where they are used."""
        try:
            doc = json.loads(self.path.read_text(encoding="utf-8"))
            groups = doc["groups"]
            return groups if isinstance(groups, dict) else {}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("engine records %s unreadable (%s); ignoring them", self.path, exc)
            return {}

    def save(self, groups: dict[str, dict[str, object]]) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".engines.", dir=self.path.parent)
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump({"version": 1, "groups": groups}, fh, indent=1)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except OSError as exc:
            log.error("cannot record launched engines in %s: %s", self.path, exc)

    def put(self, model: str, group: int, ticks: int | None, grace: float) -> None:
        groups = self.load()
        groups[model] = {
            "pgid": group,
            "start_ticks": ticks,
            "boot_id": boot_id(),
            "grace_seconds": grace,
        }
        self.save(groups)

    def drop(self, model: str) -> None:
        groups = self.load()
        if groups.pop(model, None) is not None:
            self.save(groups)


async def stop_leftovers(records: Records) -> None:
    """Before launching: stop the engine groups a previous kvsleep recorded and left running.

    A group is ours when its leader still runs with the recorded start time, or, its leader
    gone, for the members started since (a PGID cannot be reused while a member holds it).
    A leader with another start time is a stranger that reused the PID: left alone.
    """
    groups = records.load()
    if not groups:
        return
    boot = boot_id()
    for model, rec in groups.items():
        try:
            group, ticks = int(rec["pgid"]), rec.get("start_ticks")
            ticks = None if ticks is None else int(ticks)
            grace = float(rec.get("grace_seconds", STOP_GRACE_SECONDS))
        except (KeyError, TypeError, ValueError):
            continue
        if rec.get("boot_id") != boot or ticks is None:
            continue  # recorded before a reboot: nothing of it can still run
        leader = start_ticks(group)
        if leader is not None and leader != ticks:
            log.info(
                "engine group %d recorded for %s is now another process's; left alone", group, model
            )
            continue
        stopped = await end_group(group, grace, started=ticks)
        if stopped:
            log.warning(
                "model %s: stopped %d engine process(es) of group %d left running by "
                "a previous kvsleep",
                model,
                len(stopped),
                group,
            )
    records.save({})


# ---- the launcher --------------------------------------------------------------------------


@dataclass(eq=False)
class Engine:
    model: ModelConfig
    log_file: Path
    process: asyncio.subprocess.Process | None = None  # the keeper
    control: socket.socket | None = None
    died: asyncio.Event = field(default_factory=asyncio.Event)
    exit_code: int | None = None
    supervisor: asyncio.Task[None] | None = None
    listener: asyncio.Task[None] | None = None
    deaths: deque[float] = field(default_factory=lambda: deque(maxlen=CRASH_LOOP_RESTARTS))

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.returncode is None


class Launcher:
    def __init__(
        self,
        manager: SleepManager,
        metrics: Metrics,
        log_dir: str,
        state_dir: str | None = None,
        hidden_env: Iterable[str] = (),
    ) -> None:
        self.manager = manager
        self.log_dir = log_dir
        self.records = Records(state_dir) if state_dir is not None else None
        self.hidden_env = tuple(hidden_env)
        self.engines: dict[str, Engine] = {}
        self._stopping = False
        self._gpu_locks: dict[int, asyncio.Lock] = {}
        self.restarts = Counter(
            "kvsleep_engine_restarts",
            "Launched engines restarted after exiting unexpectedly.",
            ["model"],
            registry=metrics.registry,
        )
        self.crash_looping = Gauge(
            "kvsleep_engine_crash_looping",
            "1 while a launched engine keeps dying soon after start.",
            ["model"],
            registry=metrics.registry,
        )

    def log_file(self, model: str) -> Path | None:
        """A launched model's engine log, or None for a model kvsleep does not launch."""
        engine = self.engines.get(model)
        return engine.log_file if engine is not None else None

    def prepare(self, models: list[ModelConfig]) -> None:
        """Before the router starts: these models are starting, not to be probed or adopted."""
        for model in models:
            engine = Engine(model, log_path(model, self.log_dir))
            self.engines[model.name] = engine
            self.restarts.labels(model.name)
            self.crash_looping.labels(model.name).set(0)
            self.manager.engine_starting(model.name, queued=True)
        self.manager.starter = self._start_on_request
        self.manager.on_event = self._note

    async def start(self, models: list[ModelConfig] | None = None) -> None:
        """Start every engine (one at a time per GPU, `always_on` first) and wait until all are
        ready or deferred; on any failure stop them all."""
        if models is not None and not self.engines:
            self.prepare(models)
        if self.records is not None:
            await stop_leftovers(self.records)
        order = sorted(self.engines.values(), key=lambda e: not e.model.always_on)
        tasks = [asyncio.create_task(self._initial_start(e)) for e in order]
        try:
            await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.stop()
            raise

    async def _initial_start(self, engine: Engine) -> None:
        try:
            started = await self._start_in_budget(engine)
        except LaunchError as exc:
            self.manager.engine_failed(engine.model.name, str(exc))
            raise
        if started:
            self._supervise_later(engine)

    def _supervise_later(self, engine: Engine) -> None:
        if engine.supervisor is None or engine.supervisor.done():
            engine.supervisor = asyncio.create_task(
                self._supervise(engine), name=f"kvsleep-supervise-{engine.model.name}"
            )

    def _locks(self, model: ModelConfig) -> list[asyncio.Lock]:
        return [self._gpu_locks.setdefault(g, asyncio.Lock()) for g in sorted(set(model.gpus))]

    async def _start_in_budget(self, engine: Engine) -> bool:
        """Start the engine with its GPUs to itself, after making room in their budgets.
        Returns False when it was deferred to its first request (no room could be made)."""
        locks = self._locks(engine.model)
        async with contextlib.AsyncExitStack() as stack:
            for lock in locks:
                await stack.enter_async_context(lock)
            if not await self._make_room(engine.model):
                log.info(
                    "model %s: no room in its GPUs' budget beside the models awake; "
                    "it starts on its first request",
                    engine.model.name,
                )
                self.manager.engine_deferred(engine.model.name)
                return False
            began = time.monotonic()
            await self._spawn_and_wait(engine)
            self.manager.engine_started(engine.model.name, time.monotonic() - began)
            return True

    async def _make_room(self, model: ModelConfig) -> bool:
        """Put idle awake models to sleep until `model` fits its GPUs' budgets."""
        manager = self.manager
        if not manager.gpu_budgets or not model.gpus or not model.memory_gb:
            return True
        target = manager.slots.get(model.name)
        if target is None:
            return True
        give_up = time.monotonic() + model.policy.wake_timeout_seconds
        while time.monotonic() < give_up:
            plan = policy.plan_room(
                manager.memory_view(target),
                [manager.memory_view(s) for s in manager.slots.values() if s is not target],
                manager.gpu_budgets,
                None,
            )
            if plan.ok:
                return True
            if not plan.evict and not plan.reason.startswith("waiting"):
                return False  # every model in the way is busy or pinned
            outcomes = []
            for victim in plan.evict:
                log.info(
                    "model %s: sleeping %s before starting, to stay within the GPU budget",
                    model.name,
                    victim,
                )
                manager.metrics.evictions.labels(victim).inc()
                outcomes.append(manager.request_sleep(victim, "idle"))
            if outcomes and not all(await asyncio.gather(*outcomes)):
                return False
            if not outcomes:
                await asyncio.sleep(READY_POLL_SECONDS)
        return False

    async def _start_on_request(self, name: str) -> None:
        """The sleep manager's starter: a deferred engine's first request starts it."""
        engine = self.engines[name]
        began = time.monotonic()
        async with contextlib.AsyncExitStack() as stack:
            for lock in self._locks(engine.model):
                await stack.enter_async_context(lock)
            # Another engine may have started on these GPUs since the wake made room.
            if not await self._make_room(engine.model):
                raise LaunchError(f"model {name}: no room in its GPUs' memory budget")
            await self._spawn_and_wait(engine)
        self.manager.note_start_duration(name, time.monotonic() - began)
        self._supervise_later(engine)

    async def _spawn_and_wait(self, engine: Engine) -> None:
        try:
            await self._spawn(engine)
            await self._wait_ready(engine)
        except BaseException:
            await self._end(engine)
            raise

    async def _spawn(self, engine: Engine) -> None:
        model = engine.model
        argv = build_command(model)
        env = build_env(model, self.hidden_env)
        # The keeper runs the command; a missing program is said here, plainly, and first.
        if shutil.which(argv[0], path=env.get("PATH")) is None:
            raise LaunchError(
                f"model {model.name}: cannot start {argv[0]!r}: no such executable program"
            )
        await self._refuse_stranger(model)
        note_line = f"{START_MARKER}{model.name}: {' '.join(argv)}\n"
        engine.log_file.parent.mkdir(parents=True, exist_ok=True)
        ours, theirs = socket.socketpair()
        ours.setblocking(False)
        keeper = [
            sys.executable,
            "-m",
            "kvsleep.control.keeper",
            "--log",
            str(engine.log_file),
            "--max-bytes",
            str(LOG_MAX_BYTES),
            "--backups",
            str(LOG_BACKUPS),
            "--grace",
            f"{model.stop_grace_seconds:g}",
            "--",
            *argv,
        ]
        engine.died = asyncio.Event()
        engine.exit_code = None
        self.manager.engine_spawning(model.name)
        with engine.log_file.open("ab") as out:
            out.write(b"\n" + note_line.encode())
            out.flush()
            try:
                engine.process = await asyncio.create_subprocess_exec(
                    *keeper,
                    stdin=theirs.fileno(),
                    stdout=asyncio.subprocess.DEVNULL,
                    stderr=out,
                    env=env,
                    start_new_session=True,
                    preexec_fn=_die_with_parent,
                )
            except OSError as exc:
                ours.close()
                raise LaunchError(f"model {model.name}: cannot start {argv[0]!r}: {exc}") from exc
            finally:
                theirs.close()
        engine.control = ours
        pid = engine.process.pid
        ticks = start_ticks(pid)
        if self.records is not None:
            self.records.put(model.name, pid, ticks, model.stop_grace_seconds)
        # The process kvsleep launched names the engine where the engine names none itself.
        self.manager.pin_incarnation(model.name, f"launched:{boot_id()}:{pid}:{ticks}")
        engine.listener = asyncio.create_task(
            self._listen(engine, ours, engine.process), name=f"kvsleep-keeper-{model.name}"
        )
        log.info(
            "model %s: started pid %d (process group %d), log %s",
            model.name,
            pid,
            pid,
            engine.log_file,
        )

    async def _listen(
        self, engine: Engine, sock: socket.socket, process: asyncio.subprocess.Process
    ) -> None:
        """The keeper says `exited CODE` the moment the engine's main process ends; EOF when
        the keeper itself is gone."""
        loop = asyncio.get_running_loop()
        buffer = b""
        try:
            while True:
                data = await loop.sock_recv(sock, 512)
                if not data:
                    break
                buffer += data
                for line in buffer.split(b"\n")[:-1]:
                    if line.startswith(b"exited ") and engine.process is process:
                        with contextlib.suppress(ValueError):
                            engine.exit_code = int(line.split()[1])
                        engine.died.set()
                buffer = buffer.rsplit(b"\n", 1)[-1]
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            if engine.process is process:
                engine.died.set()

    async def _refuse_stranger(self, model: ModelConfig) -> None:
        if not await _port_answers(model.host or "127.0.0.1", model.port):
            return
        holders = await asyncio.to_thread(port_holders, model.port)
        who = ", ".join(describe_pid(p) for p in holders) or "a process kvsleep cannot identify"
        raise LaunchError(
            f"model {model.name}: port {model.port} is already in use by {who}; "
            "kvsleep does not adopt an engine it did not start (stop it, or give "
            "the model another port)"
        )

    async def _wait_ready(self, engine: Engine) -> None:
        """Ready: our keeper (and so the engine's group) alive, the configured model listed by
        `/v1/models`, and `/health` 200 (a freshly started engine holds its memory)."""
        model, process = engine.model, engine.process
        assert process is not None
        deadline = time.monotonic() + model.ready_timeout_seconds
        base = model.url.rstrip("/")
        listed: list[str] | None = None
        async with aiohttp.ClientSession() as session:
            while True:
                if engine.died.is_set() or process.returncode is not None:
                    code = (
                        engine.exit_code if engine.exit_code is not None else await process.wait()
                    )
                    raise LaunchError(
                        f"model {model.name}: engine exited with code {code} before becoming "
                        f"ready; log {engine.log_file}:\n{tail(engine.log_file)}"
                    )
                with contextlib.suppress(
                    aiohttp.ClientError,
                    asyncio.TimeoutError,
                    ValueError,
                    KeyError,
                    TypeError,
                    AttributeError,
                ):
                    timeout = aiohttp.ClientTimeout(total=2)
                    async with session.get(base + "/v1/models", timeout=timeout) as resp:
                        if resp.status == 200:
                            doc = await resp.json(content_type=None)
                            listed = [str(m.get("id")) for m in doc["data"]]
                    if listed is not None and model.served_name in listed:
                        async with session.get(base + "/health", timeout=timeout) as resp:
                            if resp.status == 200:
                                log.info("model %s: engine ready", model.name)
                                return
                if time.monotonic() > deadline:
                    lists = (
                        ""
                        if listed is None
                        else f" (it lists {', '.join(listed) or 'no model'}, "
                        f"not {model.served_name})"
                        if model.served_name not in listed
                        else " (its /health is not 200)"
                    )
                    raise LaunchError(
                        f"model {model.name}: engine not ready after "
                        f"{model.ready_timeout_seconds:g}s ({base}){lists}; log "
                        f"{engine.log_file}:\n{tail(engine.log_file)}"
                    )
                await asyncio.sleep(READY_POLL_SECONDS)

    async def _supervise(self, engine: Engine) -> None:
        name = engine.model.name
        restarts = 0
        while True:
            await self._wait_death(engine)
            if self._stopping:
                return
            slot = self.manager.slots.get(name)
            if (
                slot is not None
                and slot.state is ModelState.ASLEEP
                and not slot.waiters
                and engine.model.gpus
                and self.manager.gpu_budgets
            ):
                # A fresh process would be awake and hold memory the budget gave to others:
                # it starts again on its first request instead.
                code = await self._end(engine)
                log.warning(
                    "model %s: engine exited with code %s while asleep; it starts on "
                    "its first request. Last log lines (%s):\n%s",
                    name,
                    code,
                    engine.log_file,
                    tail(engine.log_file),
                )
                note(
                    engine.log_file,
                    f"engine exited with code {code} while asleep; it starts on its first request",
                )
                self.manager.engine_deferred(name)
                return
            # Requests are held from this moment, while the keeper still ends the group.
            self.manager.engine_starting(name, "engine exited; restarting")
            code = await self._end(engine)
            now = time.monotonic()
            engine.deaths.append(now)
            looping = (
                len(engine.deaths) == CRASH_LOOP_RESTARTS
                and now - engine.deaths[0] < CRASH_LOOP_WINDOW_SECONDS
            )
            self.crash_looping.labels(name).set(1 if looping else 0)
            level = logging.ERROR if looping else logging.WARNING
            log.log(
                level,
                "model %s: engine exited with code %s%s; restarting. Last log lines (%s):\n%s",
                name,
                code,
                " (CRASH LOOP)" if looping else "",
                engine.log_file,
                tail(engine.log_file),
            )
            note(engine.log_file, f"engine exited with code {code}; restarting")
            if looping:
                self.manager.engine_starting(name, "crash loop")
            delay = RESTART_BACKOFF_SECONDS[min(restarts, len(RESTART_BACKOFF_SECONDS) - 1)]
            restarts = restarts + 1 if looping else 0
            await asyncio.sleep(delay)
            self.restarts.labels(name).inc()
            try:
                started = await self._start_in_budget(engine)
            except LaunchError as exc:
                log.error("%s", exc)
                self.manager.engine_failed(name, str(exc))
                engine.died.set()
                continue
            if not started:
                return

    async def _wait_death(self, engine: Engine) -> None:
        """Until the engine dies; an engine that stays up a whole window is not looping."""
        while True:
            try:
                await asyncio.wait_for(engine.died.wait(), CRASH_LOOP_WINDOW_SECONDS)
                return
            except asyncio.TimeoutError:
                self.crash_looping.labels(engine.model.name).set(0)

    async def _end(self, engine: Engine) -> int | None:
        """Stop the engine's keeper (which ends its group) and make sure nothing of the group
        is left: a restart never starts beside survivors. Returns the engine's exit code."""
        grace = engine.model.stop_grace_seconds
        process, control = engine.process, engine.control
        if process is None:
            return engine.exit_code
        if process.returncode is None and control is not None:
            with contextlib.suppress(OSError):
                control.send(b"stop\n")
        try:
            await asyncio.wait_for(asyncio.shield(process.wait()), grace + 10.0)
        except asyncio.TimeoutError:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
            await process.wait()
        # A keeper killed outright leaves its group behind; end it here.
        await end_group(process.pid, grace)
        if engine.listener is not None:
            engine.listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await engine.listener
            engine.listener = None
        if control is not None:
            control.close()
            engine.control = None
        if self.records is not None:
            self.records.drop(engine.model.name)
        return engine.exit_code if engine.exit_code is not None else process.returncode

    def _note(self, model: str, text: str) -> None:
        engine = self.engines.get(model)
        if engine is not None:
            note(engine.log_file, text)

    async def stop(self) -> None:
        """End every engine's process group: SIGTERM, then SIGKILL after the grace."""
        self._stopping = True
        for engine in self.engines.values():
            if engine.supervisor is not None:
                engine.supervisor.cancel()
        await asyncio.gather(*(self._end(e) for e in self.engines.values()), return_exceptions=True)


# Loaded once here, so that the child between fork and exec only makes one system call.
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def _die_with_parent() -> None:
    """In the keeper before exec: SIGTERM when kvsleep dies, even by SIGKILL (the keeper also
    sees its control socket close; this covers a keeper not yet reading it)."""
    if _LIBC is not None:
        _LIBC.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
