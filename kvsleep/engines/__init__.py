"""Engine adapters: everything engine-specific about sleeping, waking and observing an engine.

The sleep manager only sees `EngineAdapter`; adding an engine means one new module here and one
entry in `ADAPTERS`.
"""

from __future__ import annotations

from kvsleep.config import ModelConfig
from kvsleep.engines.base import (
    EngineAdapter,
    EngineError,
    Observation,
    RetryPolicy,
    SessionSource,
    SleepUnsupported,
)
from kvsleep.engines.sglang import SGLangAdapter
from kvsleep.engines.vllm import VLLMAdapter

ADAPTERS: dict[str, type[EngineAdapter]] = {"vllm": VLLMAdapter, "sglang": SGLangAdapter}


def adapter_for(
    model: ModelConfig, sessions: SessionSource, retry: RetryPolicy | None = None
) -> EngineAdapter:
    return ADAPTERS[model.engine](model, sessions, retry or RetryPolicy())


__all__ = [
    "ADAPTERS",
    "EngineAdapter",
    "EngineError",
    "Observation",
    "RetryPolicy",
    "SessionSource",
    "SleepUnsupported",
    "adapter_for",
]
