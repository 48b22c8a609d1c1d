"""Child processes of the benchmark: start, wait until ready, and always stop them.

Every child gets PR_SET_PDEATHSIG=SIGKILL, so even a SIGKILLed harness (e.g. a test timeout)
leaves no engine or router behind; `Processes.stop_all` is the orderly path (SIGTERM, then
SIGKILL after a grace period).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"
PYTHON = sys.executable
_PR_SET_PDEATHSIG = 1

try:
    _LIBC: ctypes.CDLL | None = ctypes.CDLL(None, use_errno=True)
except OSError:  # not Linux: children are still stopped by stop_all
    _LIBC = None


def die_with_parent() -> None:
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class StartError(RuntimeError):
    """A child did not come up; the message carries the tail of its log."""


@dataclass
class Child:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, lines: int = 15) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])


class Processes:
    """The set of children one benchmark run started."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.children: list[Child] = []

    def spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> Child:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = self.log_dir / f"{re.sub(r'[^A-Za-z0-9._-]+', '_', name)}.log"
        with log.open("wb") as out:
            popen = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, **(env or {})},
                start_new_session=True,
                # Only a prctl call between fork and exec (the harness's helper threads, if
                # any, only wait on children), so the preexec_fn caveat about locks is moot.
                preexec_fn=die_with_parent,
            )
        child = Child(name, popen, log)
        self.children.append(child)
        return child

    def stop(self, child: Child, grace: float = 5.0) -> None:
        if child.alive():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(child.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.popen.wait(grace)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(child.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.popen.wait(grace)
        if child in self.children:
            self.children.remove(child)

    def stop_all(self) -> None:
        for child in reversed(list(self.children)):
            self.stop(child)


def free_port() -> int:
    """A port nobody listens on right now (the caller binds it soon after; tiny race)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def closed_ports(count: int) -> list[int]:
    """`count` distinct ports that were free a moment ago (for engines that are down)."""
    socks = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            socks.append(sock)
            sock.bind((HOST, 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for sock in socks:
            sock.close()


def http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def http_post(url: str, timeout: float = 30.0) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=b"", method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def wait_http(child: Child, url: str, timeout: float, ok: tuple[int, ...] = (200,)) -> float:
    """Poll `url` until it answers one of `ok`; returns the seconds waited."""
    started = time.monotonic()
    deadline = started + timeout
    while True:
        if not child.alive():
            raise StartError(
                f"{child.name} exited with code {child.popen.returncode} before "
                f"answering {url}; log {child.log}:\n{child.tail()}"
            )
        with contextlib.suppress(OSError):
            status, _ = http_get(url, timeout=1.0)
            if status in ok:
                return time.monotonic() - started
        if time.monotonic() > deadline:
            raise StartError(
                f"{child.name} did not answer {url} within {timeout:g}s; log "
                f"{child.log}:\n{child.tail()}"
            )
        time.sleep(0.05)


def wait_log(child: Child, pattern: str, timeout: float) -> re.Match[str]:
    """Wait for a line of the child's log to match `pattern` (e.g. the port it picked)."""
    deadline = time.monotonic() + timeout
    regex = re.compile(pattern)
    while True:
        with contextlib.suppress(OSError):
            match = regex.search(child.log.read_text(errors="replace"))
            if match:
                return match
        if not child.alive():
            raise StartError(
                f"{child.name} exited with code {child.popen.returncode}; log "
                f"{child.log}:\n{child.tail()}"
            )
        if time.monotonic() > deadline:
            raise StartError(
                f"{child.name}: no line matching {pattern!r} within {timeout:g}s; "
                f"log {child.log}:\n{child.tail()}"
            )
        time.sleep(0.05)


def rss_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak) of a process, in KiB."""
    out: dict[str, int] = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0])
    return out


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time a process has used so far (None once it is gone).

    From the scheduler's nanosecond counters of its threads (`/proc/PID/task/*/schedstat`)
    where the kernel has them: `/proc/PID/stat` counts in clock ticks (10 ms), which is a few
    per cent of what a proxy spends in a 1 s run. A thread that exits between two readings
    takes its time with it; the processes measured here keep theirs (event loop, executor).
    """
    total = 0
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):  # thread just ended
                total += int(Path(f"/proc/{pid}/task/{task}/schedstat").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        total = 0
    if total:
        return total / 1e9
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def listen_overflows() -> int | None:
    """The kernel's TcpExt ListenOverflows (machine-wide): SYNs dropped on a full accept queue.

    Each drop costs the client a 1 s SYN retransmit, which shows as a latency spike or lost
    throughput at high connection counts (aiohttp's listen backlog defaults to 128).
    """
    try:
        lines = Path("/proc/net/netstat").read_text().splitlines()
    except OSError:
        return None
    for head, values in zip(lines[::2], lines[1::2], strict=False):
        fields = dict(zip(head.split(), values.split(), strict=False))
        if "ListenOverflows" in fields:
            return int(fields["ListenOverflows"])
    return None


def loadavg() -> list[float]:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except (OSError, ValueError):
        return []


def _raise_exit(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def run_children(
    prefix: str,
    body: Callable[[Processes, Path], Coroutine[Any, Any, dict[str, Any]]],
    out_dir: Path,
    stem: str,
    render: Callable[[dict[str, Any]], str],
) -> tuple[dict[str, Any], Path] | None:
    """A bench run: `body(processes, workdir)` in a fresh temporary directory, every child
    stopped whatever happens (SIGTERM too), its results written to OUT/STEM.json and .md.
    Returns them and the children's log folder; None (said on stderr) when a child would not
    start."""
    signal.signal(signal.SIGTERM, _raise_exit)
    out_dir.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix=f"{prefix}-"))
    procs = Processes(workdir / "logs")
    try:
        results = asyncio.run(body(procs, workdir))
    except StartError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return None
    finally:
        procs.stop_all()
    (out_dir / f"{stem}.json").write_text(json.dumps(results, indent=1) + "\n")
    (out_dir / f"{stem}.md").write_text(render(results))
    return results, procs.log_dir
