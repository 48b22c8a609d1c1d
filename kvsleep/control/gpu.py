"""GPU memory as the device reports it (NVML), where the `[gpu]` extra and a GPU are present:
free memory per GPU (for budgets), and the memory an engine's processes hold (to resolve a model
in state `unknown` without an operator).

The budget in the config is what kvsleep promises; NVML is what the device has. A wake needs
both: a model must fit its budget, and the GPU must really have the room (another process, or an
engine that has not released yet, may hold it).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable

from kvsleep.config import ModelConfig

log = logging.getLogger(__name__)

GB = 1024**3


def nvml_free_gb(gpu_ids: Iterable[int]) -> Callable[[], dict[int, float] | None]:
    """A reader of free GB per GPU; one that answers None where NVML is not available."""
    ids = sorted(set(gpu_ids))
    if not ids:
        return lambda: None
    try:
        import pynvml

        pynvml.nvmlInit()
        handles = {g: pynvml.nvmlDeviceGetHandleByIndex(g) for g in ids}
    except Exception as exc:  # no package, no driver, no such device: budget only
        log.info("NVML unavailable (%s): GPU budgets use the configured sizes only", exc)
        return lambda: None

    def read() -> dict[int, float] | None:
        try:
            return {g: pynvml.nvmlDeviceGetMemoryInfo(h).free / GB for g, h in handles.items()}
        except pynvml.NVMLError as exc:
            log.warning("NVML read failed: %s", exc)
            return None

    log.info("NVML: reading free memory of GPUs %s", ids)
    return read


def nvml_process_memory_gb(pids: Iterable[int]) -> float | None:
    """GB of GPU memory the given processes hold over every GPU; None where NVML cannot say
    (no package, no driver, or none of the processes uses a GPU)."""
    wanted = set(pids)
    if not wanted:
        return None
    try:
        import pynvml

        pynvml.nvmlInit()
        total, seen = 0.0, False
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
                if proc.pid in wanted and proc.usedGpuMemory is not None:
                    total += proc.usedGpuMemory / GB
                    seen = True
    except Exception as exc:  # no package, no driver: an operator decides
        log.info("NVML cannot tell the engine's GPU memory: %s", exc)
        return None
    return total if seen else None


def engine_memory_reader() -> Callable[[ModelConfig], Awaitable[float | None]] | None:
    """Where NVML works: a reader of the GPU memory held by the processes of an engine on this
    host (the one listening on its port, and its descendants: SGLang's schedulers hold the
    memory). None without NVML; the reader answers None for an engine it cannot find."""
    try:
        import psutil
        import pynvml

        pynvml.nvmlInit()
    except Exception as exc:  # no package, no driver: `unknown` waits for an operator
        log.info("NVML unavailable (%s): a model in state unknown waits for an operator", exc)
        return None

    def pids_of(cfg: ModelConfig) -> list[int]:
        for conn in psutil.net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == cfg.port:
                if conn.pid is None:
                    continue
                main = psutil.Process(conn.pid)
                return [main.pid, *(p.pid for p in main.children(recursive=True))]
        return []

    async def read(cfg: ModelConfig) -> float | None:
        if cfg.host not in LOCAL_HOSTS:
            return None
        return await asyncio.to_thread(lambda: nvml_process_memory_gb(pids_of(cfg)))

    return read


LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost", "::1", "0.0.0.0", "::"})
