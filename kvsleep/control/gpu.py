"""Free GPU memory as the device reports it (NVML), where `nvidia-ml-py` and a GPU are present.

The budget in the config is what kvsleep promises; NVML is what the device has. A wake needs
both: a model must fit its budget, and the GPU must really have the room (another process, or an
engine that has not released yet, may hold it).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

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
