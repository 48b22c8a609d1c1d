"""NVML readers, with a stand-in for the NVML library (the hardware is not here; the code that
reads it is ours and runs unchanged)."""

from __future__ import annotations

import sys
import types
from typing import Any

import pytest

from kvsleep.control.gpu import GB, nvml_process_memory_gb


def fake_nvml(monkeypatch: pytest.MonkeyPatch, per_gpu: list[list[tuple[int, int | None]]]) -> None:
    module: Any = types.ModuleType("pynvml")
    module.nvmlInit = lambda: None
    module.nvmlDeviceGetCount = lambda: len(per_gpu)
    module.nvmlDeviceGetHandleByIndex = lambda i: i
    module.nvmlDeviceGetComputeRunningProcesses = lambda h: [
        types.SimpleNamespace(pid=pid, usedGpuMemory=used) for pid, used in per_gpu[h]
    ]
    monkeypatch.setitem(sys.modules, "pynvml", module)


def test_the_memory_of_an_engines_processes_is_summed_over_gpus(monkeypatch):
    fake_nvml(monkeypatch, [[(10, 2 * GB), (99, 50 * GB)], [(11, GB // 2)]])
    assert nvml_process_memory_gb([10, 11]) == pytest.approx(2.5)


def test_processes_on_no_gpu_or_no_nvml_say_nothing(monkeypatch):
    fake_nvml(monkeypatch, [[(99, GB)]])
    assert nvml_process_memory_gb([10]) is None
    assert nvml_process_memory_gb([]) is None
    monkeypatch.setitem(sys.modules, "pynvml", None)  # not installed
    assert nvml_process_memory_gb([10]) is None
