"""Simulated vLLM and SGLang engines that follow shared/engine-contracts.md, hazards included.

The router is tested against these instead of GPUs, so whatever would break or hang a real engine
(a request sent to a sleeping vLLM, a release on a busy SGLang, ...) must break or hang the
simulator the same way, and be counted as a hazard, or the tests would pass a router that fails in
production. `SimEngine` holds what both flavors share (requests, counters, metrics, faults,
crashes); `_Vllm` and `_Sglang` hold each engine's sleep state and control routes.
"""

from __future__ import annotations

import abc
import argparse
import asyncio
import collections
import dataclasses
import hashlib
import json
import logging
import math
import os
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, NoReturn

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from kvsleep.eventloop import run_event_loop

log = logging.getLogger(__name__)

FLAVORS = ("vllm", "sglang")
VLLM_VERSIONS = ("0.11", "0.19", "0.33")
SGLANG_VERSION = "0.5.5"
FAULT_OPS = ("sleep", "wake", "reload")
CRASH_EXIT_CODE = 70
GIB = 1 << 30
# Converts kv_cache_gb into a token capacity, only to give the usage gauges a plausible scale.
KV_TOKENS_PER_GB = 16384
LOG_LENGTH = 200
# What the simulated model says. Without `ignore_eos` it stops after these words
# (finish_reason "stop"), so a small max_tokens ends with "length" and a large one with "stop".
REPLY_TEXT = (
    "The simulated engine answers every prompt with this same short sentence so that tests "
    "can predict its text, its token count and the reason it stopped."
)
REPLY = REPLY_TEXT.split()
SGLANG_TAGS = ("kv_cache", "weights", "cuda_graph")
VLLM_TAGS = ("weights", "kv_cache")
CrashCallback = Callable[[int], None]


@dataclass
class SimSettings:
    """Knobs of one simulated engine; defaults are plausible for a small model on one GPU."""

    flavor: str
    model: str
    host: str = "127.0.0.1"
    port: int = 0
    tokens_per_second: float = 200.0
    default_max_tokens: int = 16
    wake_latency: float = 0.5
    sleep_latency: float = 0.1
    reload_latency: float = 0.2
    startup_seconds: float = 0.0
    weights_gb: float = 2.0
    kv_cache_gb: float = 6.0
    vllm_version: str = "0.33"
    dev_mode: bool = True
    memory_saver: bool = True
    weights_cpu_backup: bool = False
    weights_path: str | None = None
    enable_metrics: bool = True
    legacy_server_info: bool = False
    incarnation: bool = True
    embedding_dim: int = 8
    cuda_device: int | None = None
    fail_next: dict[str, int] = field(default_factory=dict)
    hang_next: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.flavor not in FLAVORS:
            raise ValueError(f"flavor must be one of {FLAVORS}, not {self.flavor!r}")
        if self.vllm_version not in VLLM_VERSIONS:
            raise ValueError(f"vllm_version must be one of {VLLM_VERSIONS}")
        for name in (
            "tokens_per_second",
            "wake_latency",
            "sleep_latency",
            "reload_latency",
            "startup_seconds",
            "weights_gb",
            "kv_cache_gb",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")
        if self.default_max_tokens < 1 or self.embedding_dim < 1:
            raise ValueError("default_max_tokens and embedding_dim must be at least 1")
        for faults in (self.fail_next, self.hang_next):
            if not set(faults) <= set(FAULT_OPS) or any(n < 0 for n in faults.values()):
                raise ValueError(f"fault operations are {FAULT_OPS}, with counts >= 0")

    @property
    def weights_source(self) -> str:
        """The path SGLang must be given to reload weights (the served name is not enough)."""
        return self.weights_path or self.model


class EngineDead(Exception):
    """Unwinds a handler whose engine died or is shutting down, so it answers nothing."""


class _ApiError(Exception):
    """An HTTP error rendered in the flavor's own error shape by the middleware."""

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param


_ERROR_TYPES = {
    400: "BadRequestError",
    404: "NotFoundError",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
}


@dataclass(eq=False)
class _Request:
    """One inference request inside the engine: queued until admitted, then generating."""

    route: str
    prompt_tokens: int
    max_tokens: int = 1
    ignore_eos: bool = False
    stop: frozenset[str] = frozenset()
    started: float = field(default_factory=time.monotonic)
    admitted: bool = False
    aborted: bool = False
    generated: int = 0
    chunks: int = 0
    crash_after_chunks: int | None = None


@dataclass
class _Faults:
    """Failures armed through /sim/faults or the CLI, each consumed by the calls it hits."""

    fail: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FAULT_OPS, 0))
    hang: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FAULT_OPS, 0))
    crash_stream_after_chunks: int | None = None
    hang_requests: int = 0


def exit_process(code: int) -> None:
    """Crash callback for the CLI: die like a real engine, without cleanup or a goodbye."""
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stderr.flush()
    os._exit(code)


class _GpuBacking:
    """Real GPU memory (torch) that follows the simulated residency, so that NVML sees what a
    real engine would: sleep frees it, wake takes it back. Only with --cuda-device."""

    def __init__(self, device: int, weights_gb: float, kv_cache_gb: float) -> None:
        import torch

        self.torch = torch
        self.device = torch.device("cuda", device)
        self.sizes = {"weights": int(weights_gb * GIB), "kv_cache": int(kv_cache_gb * GIB)}
        self.tensors: dict[str, Any] = {}

    def sync(self, weights: bool, kv_cache: bool) -> None:
        for part, wanted in (("weights", weights), ("kv_cache", kv_cache)):
            if wanted and part not in self.tensors and self.sizes[part]:
                tensor = self.torch.empty(
                    self.sizes[part], dtype=self.torch.uint8, device=self.device
                )
                tensor.fill_(1)  # touch it, as loading weights would
                self.tensors[part] = tensor
            elif not wanted and part in self.tensors:
                del self.tensors[part]
        self.torch.cuda.synchronize(self.device)
        self.torch.cuda.empty_cache()


class SimEngine:
    """State, counters and metrics of one simulated engine, shared by both flavors."""

    def __init__(self, settings: SimSettings, on_crash: CrashCallback | None = None) -> None:
        """`on_crash` defaults to `mark_dead`, so a hazard never kills the test process itself."""
        self.settings = settings
        self._on_crash = on_crash or self.mark_dead
        self.dead = False
        self.exit_code: int | None = None
        self.calls: collections.Counter[str] = collections.Counter()
        self.hazards: collections.Counter[str] = collections.Counter()
        self.completed = 0
        self.aborted = 0
        self.hung = 0
        self.served_while_not_awake = 0
        self.events: collections.deque[dict[str, Any]] = collections.deque(maxlen=LOG_LENGTH)
        self.faults = _Faults()
        self.faults.fail.update(settings.fail_next)
        self.faults.hang.update(settings.hang_next)
        self.control_lock = asyncio.Lock()
        # What a real engine reports as its process start: new for a restarted engine, kept by a
        # paused one. Wall-clock time, as engines report it.
        self.startup_time = time.time()
        self._requests: set[_Request] = set()
        self._transports: set[asyncio.BaseTransport] = set()
        self._changed = asyncio.Event()
        self._closing = False
        self._ready_at = 0.0
        self._token_times: collections.deque[float] = collections.deque(maxlen=100_000)
        self.gpu = (
            _GpuBacking(settings.cuda_device, settings.weights_gb, settings.kv_cache_gb)
            if settings.cuda_device is not None
            else None
        )

        self.registry = CollectorRegistry(auto_describe=True)
        self._memory_gauge = Gauge(
            "kvsleep_sim_gpu_memory_used_bytes",
            "GPU memory the simulated engine holds (weights plus KV cache when resident).",
            registry=self.registry,
        )
        self._calls_counter = Counter(
            "kvsleep_sim_control_calls_total",
            "Control and probe calls received, per route.",
            ["route"],
            registry=self.registry,
        )
        self._hazards_counter = Counter(
            "kvsleep_sim_hazards_total",
            "Calls that would have hurt a real engine, per kind.",
            ["kind"],
            registry=self.registry,
        )
        self.behaviour: _Behaviour = (_Vllm if settings.flavor == "vllm" else _Sglang)(self)
        if self.gpu is not None:
            self.gpu.sync(*self.behaviour.resident())

    # -- shared state -------------------------------------------------------------------

    @property
    def starting(self) -> bool:
        return time.monotonic() < self._ready_at

    @property
    def in_flight(self) -> int:
        return sum(1 for r in self._requests if r.admitted)

    @property
    def queued(self) -> int:
        return sum(1 for r in self._requests if not r.admitted)

    @property
    def requests(self) -> frozenset[_Request]:
        return frozenset(self._requests)

    @property
    def state(self) -> str:
        if self.dead:
            return "dead"
        return "starting" if self.starting else self.behaviour.state()

    def gpu_memory_bytes(self) -> int:
        weights, kv = self.behaviour.resident()
        return int(GIB * (self.settings.weights_gb * weights + self.settings.kv_cache_gb * kv))

    def kv_usage(self) -> float:
        """Fraction of KV capacity the in-flight requests use (0 when the cache is freed)."""
        if not self.behaviour.resident()[1] or self.settings.kv_cache_gb == 0:
            return 0.0
        used = sum(r.prompt_tokens + r.generated for r in self._requests if r.admitted)
        return min(1.0, used / (self.settings.kv_cache_gb * KV_TOKENS_PER_GB))

    def record(self, event: str, **details: Any) -> None:
        """Append to the ordered log that tests read from /sim/stats."""
        self.events.append({"t": time.monotonic(), "event": event, **details})

    def count_call(self, route: str) -> None:
        self.calls[route] += 1
        self._calls_counter.labels(route=route).inc()

    def hazard(self, kind: str, detail: str) -> None:
        """Count something a real engine would suffer from, without stopping."""
        self.hazards[kind] += 1
        self._hazards_counter.labels(kind=kind).inc()
        self.record("hazard", kind=kind, detail=detail)
        log.warning("hazard %s: %s", kind, detail)

    def crash(self, kind: str, detail: str) -> NoReturn:
        """A hazard that takes a real engine down: count it, then die."""
        self.hazard(kind, detail)
        self.die(CRASH_EXIT_CODE, f"engine crashed ({kind}): {detail}")

    def die(self, code: int, reason: str) -> NoReturn:
        log.error("%s; dying with exit code %d", reason, code)
        self.record("exit", code=code, reason=reason)
        self._on_crash(code)
        raise EngineDead(reason)

    def mark_dead(self, code: int) -> None:
        """In-process crash callback: every connection, open or later, ends with no answer."""
        self.dead = True
        self.exit_code = code
        for transport in list(self._transports):
            transport.close()
        self.notify()

    def notify(self) -> None:
        """Wake every waiter so it re-checks the state it waits for."""
        if self.gpu is not None:
            self.gpu.sync(*self.behaviour.resident())
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        """Wait for `predicate`; raises EngineDead if the engine dies or shuts down first."""
        while True:
            if self.dead or self._closing:
                raise EngineDead("engine is gone")
            if predicate():
                return
            await self._changed.wait()

    async def hang(self) -> NoReturn:
        await self.wait_until(lambda: False)
        raise AssertionError("unreachable")  # wait_until only returns when its predicate holds

    def abort(self, request: _Request, *, hazard: str | None) -> None:
        if request.aborted:
            return
        request.aborted = True
        if hazard:
            self.hazard(hazard, f"{request.route} aborted with {request.generated} tokens")
        self.notify()

    def stats(self) -> dict[str, Any]:
        """The /sim/stats document: what no real engine reveals, for tests to assert on."""
        return {
            "flavor": self.settings.flavor,
            "model": self.settings.model,
            "state": self.state,
            "gpu_memory_bytes": self.gpu_memory_bytes(),
            "calls": dict(self.calls),
            "hazards": dict(self.hazards),
            "requests": {
                "completed": self.completed,
                "aborted": self.aborted,
                "in_flight": self.in_flight,
                "queued": self.queued,
                "hung": self.hung,
                # Inference that reached an engine not fully awake (each one is also a hazard).
                "served_while_not_awake": self.served_while_not_awake,
            },
            "engine": self.behaviour.stats(),
            "exit_code": self.exit_code,
            "log": list(self.events),
        }

    # -- faults -------------------------------------------------------------------------

    async def injected_fault(self, op: str) -> web.Response | None:
        """Apply an armed fail/hang for `op`; None when the call should run normally."""
        if self.faults.hang[op] > 0:
            self.faults.hang[op] -= 1
            self.record("fault", op=op, fault="hang")
            await self.hang()
        if self.faults.fail[op] > 0:
            self.faults.fail[op] -= 1
            self.record("fault", op=op, fault="fail")
            return self.error_response(_ApiError(500, f"injected failure of {op}"))
        return None

    def arm_faults(self, body: dict[str, Any]) -> None:
        for kind, target in (("fail", self.faults.fail), ("hang", self.faults.hang)):
            counts = body.get(kind, {})
            if not isinstance(counts, dict) or not set(counts) <= set(FAULT_OPS):
                raise _ApiError(400, f"{kind} must map {FAULT_OPS} to counts", kind)
            for op, n in counts.items():
                target[op] = _count(n, f"{kind}.{op}")
        if "crash_stream_after_chunks" in body:
            value = body["crash_stream_after_chunks"]
            self.faults.crash_stream_after_chunks = (
                None if value is None else _count(value, "crash_stream_after_chunks")
            )
        if "hang_requests" in body:
            self.faults.hang_requests = _count(body["hang_requests"], "hang_requests")

    # -- HTTP helpers -------------------------------------------------------------------

    def error_response(self, error: _ApiError) -> web.Response:
        status = error.status
        detail = {
            "message": error.message,
            "type": _ERROR_TYPES.get(status, "InternalServerError"),
            "param": error.param,
            "code": status,
        }
        # vLLM >= 0.10.1 nests the error (every version simulated here); SGLang keeps it flat.
        if self.settings.flavor == "vllm":
            return web.json_response({"error": detail}, status=status)
        return web.json_response({"object": "error", **detail}, status=status)

    def add_control(
        self,
        app: web.Application,
        method: str,
        path: str,
        handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
        fault_op: str | None = None,
    ) -> None:
        """Register a control route: counted, logged and subject to injected faults."""

        async def control(request: web.Request) -> web.StreamResponse:
            self.count_call(path)
            self.record("control", route=path, query=request.query_string)
            fault = await self.injected_fault(fault_op) if fault_op else None
            response: web.StreamResponse
            if fault is not None:
                response = fault
            else:
                try:
                    response = await handler(request)
                except _ApiError as error:
                    response = self.error_response(error)
            self.record("control_done", route=path, status=response.status)
            return response

        app.router.add_route(method, path, control)

    # -- inference ----------------------------------------------------------------------

    async def _generate(self, request: _Request) -> AsyncIterator[str]:
        """Yield token texts paced by tokens_per_second, honouring freezes and aborts."""
        tps = self.settings.tokens_per_second
        for i in range(request.max_tokens):
            if not request.ignore_eos and i >= len(REPLY):
                return
            word = REPLY[i % len(REPLY)]
            if word in request.stop:
                return
            await asyncio.sleep(1 / tps if tps else 0)
            await self.wait_until(lambda: request.aborted or self.behaviour.running)
            if request.aborted:
                return
            request.generated += 1
            self._token_times.append(time.monotonic())
            yield word if i == 0 else " " + word

    def _finish_reason(self, request: _Request) -> str:
        if request.aborted:
            return "abort"
        return "length" if request.generated >= request.max_tokens else "stop"

    async def handle_inference(self, request: web.Request) -> web.StreamResponse:
        route = request.path
        body = await json_object(request)
        model = body.get("model", self.settings.model)
        if model != self.settings.model:
            raise _ApiError(404, f"The model `{model}` does not exist.", "model")
        req = _parse_request(route, body, self.settings.default_max_tokens)
        stream = body.get("stream") or False
        if not isinstance(stream, bool):
            raise _ApiError(400, "stream must be a boolean", "stream")
        self.record("request", route=route, stream=stream)
        if self.faults.hang_requests > 0:
            self.faults.hang_requests -= 1
            self.hung += 1
            await self.hang()
        self._requests.add(req)
        try:
            await self.behaviour.admit(req)
            req.admitted = True
            self.notify()
            if route == "/v1/embeddings":
                response: web.StreamResponse = await self._embeddings(body, req)
            elif stream:
                req.crash_after_chunks = self.faults.crash_stream_after_chunks
                self.faults.crash_stream_after_chunks = None
                response = await self._stream(request, body, req)
            else:
                response = await self._complete(req)
        except ConnectionResetError:
            if not self.dead:  # the client went away; a real engine aborts the request too
                self.aborted += 1
            raise
        finally:
            self._requests.discard(req)
            self.notify()
        if req.aborted:
            self.aborted += 1
        else:
            self.completed += 1
            self.behaviour.observe_latency(time.monotonic() - req.started)
        return response

    async def _complete(self, req: _Request) -> web.Response:
        text = "".join([token async for token in self._generate(req)])
        chat = req.route == "/v1/chat/completions"
        choice: dict[str, Any] = {"index": 0, "logprobs": None}
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        choice["finish_reason"] = self._finish_reason(req)
        return web.json_response(
            {
                "id": _new_id(chat),
                "object": "chat.completion" if chat else "text_completion",
                "created": int(time.time()),
                "model": self.settings.model,
                "choices": [choice],
                "usage": _usage(req),
            }
        )

    async def _stream(
        self, request: web.Request, body: dict[str, Any], req: _Request
    ) -> web.StreamResponse:
        chat = req.route == "/v1/chat/completions"
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        envelope = {
            "id": _new_id(chat),
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()),
            "model": self.settings.model,
        }

        def chunk(content: str | None, finish_reason: str | None = None) -> dict[str, Any]:
            choice: dict[str, Any] = {"index": 0}
            if chat:
                choice["delta"] = {} if content is None else {"content": content}
            else:
                choice["text"] = content or ""
            choice.update(logprobs=None, finish_reason=finish_reason)
            return {**envelope, "choices": [choice]}

        if chat:
            first = chunk("")
            first["choices"][0]["delta"]["role"] = "assistant"
            await self._send(response, req, first)
        async for token in self._generate(req):
            await self._send(response, req, chunk(token))
        await self._send(response, req, chunk(None, self._finish_reason(req)))
        options = body.get("stream_options") or {}
        if isinstance(options, dict) and options.get("include_usage"):
            await self._send(response, req, {**envelope, "choices": [], "usage": _usage(req)})
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    async def _send(self, response: web.StreamResponse, req: _Request, data: dict) -> None:
        if req.crash_after_chunks == req.chunks:  # only reached here when K is 0
            self.crash("injected_crash", "stream died before its first chunk")
        await response.write(b"data: " + json.dumps(data).encode() + b"\n\n")
        req.chunks += 1
        if req.crash_after_chunks == req.chunks:
            self.crash("injected_crash", f"stream died after {req.chunks} chunks")

    async def _embeddings(self, body: dict[str, Any], req: _Request) -> web.Response:
        tps = self.settings.tokens_per_second
        await asyncio.sleep(1 / tps if tps else 0)
        inputs = body["input"]
        items = inputs if isinstance(inputs, list) and inputs and not _is_ints(inputs) else [inputs]
        data = [
            {"object": "embedding", "index": i, "embedding": _embed(item, self.settings)}
            for i, item in enumerate(items)
        ]
        return web.json_response(
            {
                "object": "list",
                "data": data,
                "model": self.settings.model,
                "usage": {"prompt_tokens": req.prompt_tokens, "total_tokens": req.prompt_tokens},
            }
        )

    # -- routes shared by both flavors ----------------------------------------------------

    async def handle_models(self, request: web.Request) -> web.Response:
        model = {
            "id": self.settings.model,
            "object": "model",
            "created": int(time.time()),
            "owned_by": self.settings.flavor,
            "root": self.settings.weights_source,
            "parent": None,
            "max_model_len": 4096,
        }
        return web.json_response({"object": "list", "data": [model]})

    async def handle_metrics(self, request: web.Request) -> web.Response:
        self._memory_gauge.set(self.gpu_memory_bytes())
        self.behaviour.refresh_metrics()
        response = web.Response(body=generate_latest(self.registry))
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response

    async def handle_stats(self, request: web.Request) -> web.Response:
        return web.json_response(self.stats())

    async def handle_faults(self, request: web.Request) -> web.Response:
        body = await json_object(request)
        if "exit" in body:
            self.die(_count(body["exit"], "exit"), "exit requested through /sim/faults")
        self.arm_faults(body)
        return web.json_response(dataclasses.asdict(self.faults))

    @web.middleware
    async def middleware(
        self,
        request: web.Request,
        handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    ) -> web.StreamResponse:
        """Play dead after a crash, answer 503 while starting, and render errors per flavor."""
        transport = request.transport
        if self.dead or transport is None:
            return _drop(request)
        if self.starting and not request.path.startswith("/sim/") and request.path != "/metrics":
            return self.error_response(_ApiError(503, "The server is still starting up."))
        self._transports.add(transport)
        try:
            return await handler(request)
        except _ApiError as error:
            return self.error_response(error)
        except web.HTTPNotFound:  # FastAPI's body, which clients of both engines see
            # Counted (not exported: a path is client input) so tests can see calls to routes
            # an engine lacks, e.g. /sleep without dev mode.
            self.calls[f"{request.method} {request.path} (404)"] += 1
            return web.json_response({"detail": "Not Found"}, status=404)
        except web.HTTPMethodNotAllowed:
            return web.json_response({"detail": "Method Not Allowed"}, status=405)
        except (EngineDead, ConnectionResetError):
            return _drop(request)
        finally:
            self._transports.discard(transport)

    async def on_startup(self, app: web.Application) -> None:
        self._ready_at = time.monotonic() + self.settings.startup_seconds

    async def on_shutdown(self, app: web.Application) -> None:
        """Release hung handlers so the server can stop instead of waiting for them."""
        self._closing = True
        self.notify()

    def recent_throughput(self, window: float = 5.0) -> float:
        now = time.monotonic()
        return sum(1 for t in self._token_times if t > now - window) / window


class _Behaviour(abc.ABC):
    """What differs between engines: sleep state, admission rules, control routes, metrics."""

    def __init__(self, sim: SimEngine) -> None:
        self.sim = sim
        self.settings = sim.settings
        self.labels = {"model_name": sim.settings.model}

    @property
    @abc.abstractmethod
    def running(self) -> bool:
        """Whether admitted requests may produce tokens now (False freezes them)."""

    @abc.abstractmethod
    def state(self) -> str: ...

    @abc.abstractmethod
    def resident(self) -> tuple[bool, bool]:
        """Whether (weights, KV cache) occupy GPU memory."""

    @abc.abstractmethod
    async def admit(self, request: _Request) -> None:
        """Let a request in, make it wait, count a hazard, or crash, as the engine would."""

    @abc.abstractmethod
    def add_routes(self, app: web.Application) -> None: ...

    @abc.abstractmethod
    def refresh_metrics(self) -> None: ...

    @abc.abstractmethod
    def stats(self) -> dict[str, Any]: ...

    @abc.abstractmethod
    def observe_latency(self, seconds: float) -> None:
        """Record a finished request's end-to-end latency."""


class _Vllm(_Behaviour):
    """vLLM with sleep mode: levels 0-2, modes abort/wait/keep, tagged wake, reload_weights."""

    def __init__(self, sim: SimEngine) -> None:
        super().__init__(sim)
        self.level: int | None = None  # None while fully awake
        self.weights = "gpu"  # "gpu" | "cpu" (level 1) | "none" (level 2)
        self.weights_valid = True  # False after level 2 until reload_weights
        self.kv_cache = True
        self._running = True
        # (running, waiting) as the request gauges said when the engine went to sleep: they are
        # published from engine steps, so a sleeping engine keeps showing them, and a request
        # held meanwhile shows in neither (seen on a real vLLM 0.32).
        self._gauges_at_sleep: tuple[int, int] | None = None
        self.labels = {"model_name": sim.settings.model, "engine": "0"}
        names = list(self.labels)
        registry = sim.registry
        self.running_gauge = Gauge(
            "vllm:num_requests_running",
            "Requests in model execution batches.",
            names,
            registry=registry,
        )
        self.waiting_gauge = Gauge(
            "vllm:num_requests_waiting",
            "Requests waiting to be processed.",
            names,
            registry=registry,
        )
        self.kv_gauge = Gauge(
            "vllm:kv_cache_usage_perc",
            "KV-cache usage. 1 means 100 percent usage.",
            names,
            registry=registry,
        )
        if self.settings.incarnation:
            # The one process metric kvsleep reads, per simulated engine: several share a test
            # process, so client_python's process collector (one per process) cannot stand in.
            Gauge(
                "process_start_time_seconds",
                "Start time of the process since unix epoch in seconds.",
                registry=registry,
            ).set(sim.startup_time)
        self.sleep_gauge: Gauge | None = None
        if self.settings.vllm_version != "0.11":
            self.sleep_gauge = Gauge(
                "vllm:engine_sleep_state",
                "Engine sleep state; awake=1 when serving, weights_offloaded=1 at level 1, "
                "discard_all=1 at level 2.",
                [*names, "sleep_state"],
                registry=registry,
            )

    @property
    def awake(self) -> bool:
        return self.level is None

    @property
    def running(self) -> bool:
        return self._running

    def state(self) -> str:
        return "awake" if self.awake else "asleep"

    def resident(self) -> tuple[bool, bool]:
        return self.weights == "gpu", self.kv_cache

    async def admit(self, request: _Request) -> None:
        if not self.awake:
            self.sim.served_while_not_awake += 1
            detail = f"{request.route} sent while asleep (level {self.level})"
            if self.settings.vllm_version == "0.11":
                self.sim.crash("request_while_asleep", detail + ": ran on freed memory")
            self.sim.hazard("request_while_asleep", detail + ": held until a full wake")
            await self.sim.wait_until(lambda: self.awake or request.aborted)
        if not self.weights_valid and not request.aborted:
            self.sim.hazard("garbage_weights", f"{request.route} served before reload_weights")

    def add_routes(self, app: web.Application) -> None:
        if self.settings.dev_mode:
            self.sim.add_control(app, "POST", "/sleep", self.handle_sleep, "sleep")
            self.sim.add_control(app, "POST", "/wake_up", self.handle_wake, "wake")
            self.sim.add_control(app, "GET", "/is_sleeping", self.handle_is_sleeping)
            self.sim.add_control(app, "POST", "/collective_rpc", self.handle_rpc, "reload")
        self.sim.add_control(app, "GET", "/health", self.handle_health)
        self.sim.add_control(app, "GET", "/version", self.handle_version)

    async def handle_sleep(self, request: web.Request) -> web.Response:
        level = _choice(request.query.get("level", "1"), ("0", "1", "2"), "level")
        old = self.settings.vllm_version == "0.11"
        # 0.11 has no modes: it neither pauses nor aborts, whatever the query says.
        mode = "none" if old else _choice(request.query.get("mode", "abort"), _MODES, "mode")
        async with self.sim.control_lock:
            # A repeat (even on a partly woken engine) changes nothing, except that 0.33 in
            # abort mode aborts whatever was queued or frozen meanwhile.
            if not self.awake:
                if self.settings.vllm_version == "0.33" and mode == "abort":
                    for queued in self.sim.requests:
                        self.sim.abort(queued, hazard="aborted_requests")
                return self._sleep_reply(self.level)
            busy = [r for r in self.sim.requests if r.admitted]
            if busy and old:
                self.sim.crash("sleep_while_busy", f"/sleep with {len(busy)} requests in flight")
            self.level = int(level)
            if mode == "abort":
                for running in busy:
                    self.sim.abort(running, hazard="aborted_requests")
            elif mode == "wait":
                await self.sim.wait_until(lambda: self.sim.in_flight == 0)
            self._running = False
            live = [r for r in self.sim.requests if not r.aborted]
            admitted = sum(1 for r in live if r.admitted)
            self._gauges_at_sleep = (admitted, len(live) - admitted)
            await asyncio.sleep(self.settings.sleep_latency)
            if self.level >= 1:
                self.kv_cache = False
                self.weights = "cpu" if self.level == 1 else "none"
                self.weights_valid = self.weights_valid and self.level == 1
            self.sim.notify()
            return self._sleep_reply(self.level)

    def _sleep_reply(self, level: int | None) -> web.Response:
        if self.settings.vllm_version == "0.33":
            return web.json_response({"status": "sleeping", "level": level})
        return web.Response()

    async def handle_wake(self, request: web.Request) -> web.Response:
        tags = request.query.getall("tags", [])
        for tag in tags:
            _choice(tag, VLLM_TAGS, "tags")
        async with self.sim.control_lock:
            if not self.awake:
                await asyncio.sleep(self.settings.wake_latency)
                for tag in tags or VLLM_TAGS:
                    if tag == "kv_cache":
                        self.kv_cache = True
                    else:  # after level 2 this maps fresh memory: garbage until reload_weights
                        self.weights = "gpu"
                if self.weights == "gpu" and self.kv_cache:
                    self.level = None
                    self._running = True
                    self._gauges_at_sleep = None
                    self.sim.notify()
        if self.settings.vllm_version == "0.33":
            status = "awake" if self.awake else "sleeping"
            return web.json_response({"status": status, "tags": tags or list(VLLM_TAGS)})
        return web.Response()

    async def handle_is_sleeping(self, request: web.Request) -> web.Response:
        return web.json_response({"is_sleeping": not self.awake})

    async def handle_rpc(self, request: web.Request) -> web.Response:
        body = await json_object(request)
        method = body.get("method")
        if method is None:
            raise _ApiError(400, "Missing 'method' in request body", "method")
        if method != "reload_weights":
            raise _ApiError(500, f"method {method!r} is not simulated", "method")
        async with self.sim.control_lock:
            if self.weights != "gpu":
                self.sim.crash("reload_while_asleep", "reload_weights into unmapped memory")
            await asyncio.sleep(self.settings.reload_latency)
            self.weights_valid = True
        return web.json_response({"results": [None]})

    async def handle_health(self, request: web.Request) -> web.Response:
        return web.Response()

    async def handle_version(self, request: web.Request) -> web.Response:
        return web.json_response({"version": f"{self.settings.vllm_version}.0"})

    def observe_latency(self, seconds: float) -> None:
        """Not exported: the contract lists no vLLM latency histogram."""

    def refresh_metrics(self) -> None:
        running, waiting = self._gauges_at_sleep or (self.sim.in_flight, self.sim.queued)
        self.running_gauge.labels(**self.labels).set(running)
        self.waiting_gauge.labels(**self.labels).set(waiting)
        self.kv_gauge.labels(**self.labels).set(self.sim.kv_usage())
        if self.sleep_gauge is not None:
            current = {None: "awake", 1: "weights_offloaded", 2: "discard_all"}.get(self.level)
            for state in ("awake", "weights_offloaded", "discard_all"):
                self.sleep_gauge.labels(**self.labels, sleep_state=state).set(state == current)

    def stats(self) -> dict[str, Any]:
        return {
            "version": self.settings.vllm_version,
            "sleep_level": self.level,
            "weights": self.weights,
            "weights_valid": self.weights_valid,
            "kv_cache": self.kv_cache,
            "frozen": not self._running,
        }


_MODES = ("abort", "wait", "keep")


class _Sglang(_Behaviour):
    """SGLang with the memory saver: tagged release/resume, weights reload, pause/continue."""

    def __init__(self, sim: SimEngine) -> None:
        super().__init__(sim)
        self.released: set[str] = set()
        self.weights_stale = False
        self.paused = False
        names = list(self.labels)
        registry = sim.registry
        self.running_gauge = Gauge(
            "sglang:num_running_reqs",
            "The number of running requests.",
            names,
            registry=registry,
        )
        self.queue_gauge = Gauge(
            "sglang:num_queue_reqs",
            "The number of requests in the waiting queue.",
            names,
            registry=registry,
        )
        self.usage_gauge = Gauge("sglang:token_usage", "The token usage.", names, registry=registry)
        self.throughput_gauge = Gauge(
            "sglang:gen_throughput",
            "The generation throughput (token/s).",
            names,
            registry=registry,
        )
        self.latency = Histogram(
            "sglang:e2e_request_latency_seconds",
            "Histogram of end-to-end request latency in seconds.",
            names,
            registry=registry,
        )

    @property
    def running(self) -> bool:
        return not self.paused

    def state(self) -> str:
        if self.released:
            return "released"
        return "paused" if self.paused else "awake"

    def resident(self) -> tuple[bool, bool]:
        return "weights" not in self.released, "kv_cache" not in self.released

    async def admit(self, request: _Request) -> None:
        if self.released:
            self.sim.served_while_not_awake += 1
            self.sim.crash("request_while_released", f"{request.route} ran on released memory")
        await self.sim.wait_until(lambda: not self.paused or request.aborted)
        if self.weights_stale and not request.aborted:
            self.sim.hazard("stale_weights", f"{request.route} served before weights reload")

    def observe_latency(self, seconds: float) -> None:
        self.latency.labels(**self.labels).observe(seconds)

    def add_routes(self, app: web.Application) -> None:
        add = self.sim.add_control
        add(app, "POST", "/release_memory_occupation", self.handle_release, "sleep")
        add(app, "POST", "/resume_memory_occupation", self.handle_resume, "wake")
        add(app, "POST", "/update_weights_from_disk", self.handle_update_weights, "reload")
        add(app, "POST", "/pause_generation", self.handle_pause)
        add(app, "POST", "/continue_generation", self.handle_continue)
        add(app, "GET", "/health", self.handle_health)
        add(app, "GET", "/health_generate", self.handle_health)
        if not self.settings.legacy_server_info:
            add(app, "GET", "/server_info", self.handle_server_info)
        add(app, "GET", "/get_server_info", self.handle_server_info)
        add(app, "GET", "/get_load", self.handle_get_load)

    async def _tags(self, request: web.Request) -> set[str]:
        # FastAPI would answer a missing body with 422 and a pydantic `detail` list; the
        # simulator answers 400 in SGLang's flat error shape, which routers handle alike.
        body = await json_object(request)
        tags = body.get("tags") or list(SGLANG_TAGS)
        if not isinstance(tags, list) or not set(tags) <= set(SGLANG_TAGS):
            raise _ApiError(400, f"tags must be a list drawn from {SGLANG_TAGS}", "tags")
        return set(tags)

    async def handle_release(self, request: web.Request) -> web.Response:
        tags = await self._tags(request)
        async with self.sim.control_lock:
            if not self.settings.memory_saver:
                return web.json_response(None)
            if self.sim.requests:
                self.sim.crash(
                    "release_while_busy",
                    "release_memory_occupation should be called only when server is idle",
                )
            if tags & self.released:
                self.sim.crash("double_release", f"{sorted(tags & self.released)} already released")
            self.released |= tags
            await asyncio.sleep(self.settings.sleep_latency)
            self.sim.notify()
        return web.json_response(None)

    async def handle_resume(self, request: web.Request) -> web.Response:
        tags = await self._tags(request)
        async with self.sim.control_lock:
            if not self.settings.memory_saver:
                return web.json_response(None)
            if not tags <= self.released:
                self.sim.crash("resume_without_release", f"{sorted(tags - self.released)} held")
            await asyncio.sleep(self.settings.wake_latency)
            self.released -= tags
            if "weights" in tags and not self.settings.weights_cpu_backup:
                self.weights_stale = True
            self.sim.notify()
        return web.json_response(None)

    async def handle_update_weights(self, request: web.Request) -> web.Response:
        body = await json_object(request)
        path = body.get("model_path")
        if not isinstance(path, str):
            raise _ApiError(400, "model_path is required", "model_path")
        async with self.sim.control_lock:
            if "weights" in self.released:
                self.sim.crash("update_weights_while_released", "loaded into released memory")
            if path != self.settings.weights_source:
                return web.json_response(
                    {
                        "success": False,
                        "message": f"Failed to get weights iterator: {path} was not found.",
                        "num_paused_requests": 0,
                    },
                    status=400,
                )
            await asyncio.sleep(self.settings.reload_latency)
            self.weights_stale = False
        return web.json_response(
            {
                "success": True,
                "message": "Succeeded to update model weights.",
                "num_paused_requests": 0,
            }
        )

    async def handle_pause(self, request: web.Request) -> web.Response:
        body = await json_object(request)
        mode = _choice(body.get("mode", "abort"), ("abort", "retract", "in_place"), "mode")
        self.paused = True
        if mode == "abort":
            for req in self.sim.requests:
                self.sim.abort(req, hazard=None)
        self.sim.notify()
        return web.json_response({"message": "Generation paused successfully.", "status": 200})

    async def handle_continue(self, request: web.Request) -> web.Response:
        await json_object(request)
        self.paused = False
        self.sim.notify()
        return web.json_response({"message": "Generation continued successfully.", "status": 200})

    async def handle_health(self, request: web.Request) -> web.Response:
        # Real health checks run a one-token generation, which touches released memory.
        if self.settings.memory_saver and self.released:
            self.sim.hazard("health_while_released", f"{request.path} probed released memory")
            return web.Response(status=503)
        return web.Response()

    async def handle_server_info(self, request: web.Request) -> web.Response:
        info: dict[str, Any] = {
            "model_path": self.settings.weights_source,
            "served_model_name": self.settings.model,
            "version": SGLANG_VERSION,
            "host": self.settings.host,
            "port": self.settings.port,
            "enable_memory_saver": self.settings.memory_saver,
            "enable_weights_cpu_backup": self.settings.weights_cpu_backup,
            "enable_metrics": self.settings.enable_metrics,
        }
        # What was allocated at start, whether released since or not (a pitfall: not a state).
        rank: dict[str, Any] = {
            "memory_usage": {
                "weight": self.settings.weights_gb,
                "kvcache": self.settings.kv_cache_gb,
            }
        }
        if self.settings.incarnation:
            info["startup_time"] = rank["startup_time"] = self.sim.startup_time
        return web.json_response({**info, "internal_states": [rank]})

    async def handle_get_load(self, request: web.Request) -> web.Response:
        """One entry per data-parallel rank; `num_reqs` counts waiting requests too."""
        load = {
            "dp_rank": 0,
            "num_reqs": self.sim.in_flight + self.sim.queued,
            "num_waiting_reqs": self.sim.queued,
            "num_tokens": sum(r.prompt_tokens + r.generated for r in self.sim.requests),
        }
        return web.json_response([load])

    def refresh_metrics(self) -> None:
        self.running_gauge.labels(**self.labels).set(self.sim.in_flight)
        self.queue_gauge.labels(**self.labels).set(self.sim.queued)
        self.usage_gauge.labels(**self.labels).set(self.sim.kv_usage())
        self.throughput_gauge.labels(**self.labels).set(self.sim.recent_throughput())

    def stats(self) -> dict[str, Any]:
        return {
            "version": SGLANG_VERSION,
            "released": sorted(self.released),
            "weights_stale": self.weights_stale,
            "paused": self.paused,
        }


def build_app(sim: SimEngine) -> web.Application:
    """The engine's HTTP surface, plus /sim/stats and /sim/faults for tests and demos."""
    # Real engines (uvicorn) set no body limit; aiohttp's default of 1 MiB would refuse what kvsleep
    # forwards.
    app = web.Application(middlewares=[sim.middleware], client_max_size=1024**3)
    for path in ("/v1/completions", "/v1/chat/completions", "/v1/embeddings"):
        app.router.add_post(path, sim.handle_inference)
    app.router.add_get("/v1/models", sim.handle_models)
    if sim.settings.flavor == "vllm" or sim.settings.enable_metrics:
        app.router.add_get("/metrics", sim.handle_metrics)
    app.router.add_get("/sim/stats", sim.handle_stats)
    app.router.add_post("/sim/faults", sim.handle_faults)
    sim.behaviour.add_routes(app)
    app.on_startup.append(sim.on_startup)
    app.on_shutdown.append(sim.on_shutdown)
    return app


# -- request parsing ------------------------------------------------------------------------


async def json_object(request: web.Request) -> dict[str, Any]:
    """The body as a JSON object, or a 400 in the engine's error shape."""
    raw = await request.read()
    try:
        body = json.loads(raw)
    except ValueError as exc:
        raise _ApiError(400, f"Invalid JSON body: {exc}") from None
    if not isinstance(body, dict):
        raise _ApiError(400, "The request body must be a JSON object")
    return body


def _parse_request(route: str, body: dict[str, Any], default_max_tokens: int) -> _Request:
    if route == "/v1/embeddings":
        return _Request(route, _count_tokens(body.get("input"), "input"))
    if route == "/v1/chat/completions":
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise _ApiError(400, "messages must be a non-empty list", "messages")
        prompt_tokens = sum(_message_tokens(m) for m in messages)
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    else:
        prompt_tokens = _count_tokens(body.get("prompt"), "prompt")
        max_tokens = body.get("max_tokens")
    if max_tokens is None:
        max_tokens = default_max_tokens
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise _ApiError(400, "max_tokens must be a positive integer", "max_tokens")
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise _ApiError(400, "stop must be a string or a list of strings", "stop")
    return _Request(
        route,
        prompt_tokens,
        max_tokens=max_tokens,
        ignore_eos=bool(body.get("ignore_eos", False)),
        stop=frozenset(stop),
    )


def _count_tokens(value: Any, param: str) -> int:
    """Whitespace words stand in for tokens; token-id lists count one per id."""
    if isinstance(value, str):
        return max(1, len(value.split()))
    if isinstance(value, list) and value:
        if _is_ints(value):
            return len(value)
        return sum(_count_tokens(item, param) for item in value)
    raise _ApiError(400, f"{param} must be a string, a list of strings or token ids", param)


def _message_tokens(message: Any) -> int:
    if not isinstance(message, dict) or "role" not in message:
        raise _ApiError(400, "each message needs a role and content", "messages")
    content = message.get("content")
    if isinstance(content, list):  # multi-part content: count the text parts
        content = " ".join(p.get("text", "") for p in content if isinstance(p, dict))
    return len(content.split()) if isinstance(content, str) else 0


def _is_ints(value: list[Any]) -> bool:
    return all(isinstance(v, int) and not isinstance(v, bool) for v in value)


def _choice(value: Any, allowed: tuple[str, ...], param: str) -> str:
    if value not in allowed:
        raise _ApiError(400, f"{param} must be one of {', '.join(allowed)}, not {value!r}", param)
    return value


def _count(value: Any, param: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise _ApiError(400, f"{param} must be a non-negative integer", param)
    return value


def _usage(req: _Request) -> dict[str, int]:
    return {
        "prompt_tokens": req.prompt_tokens,
        "completion_tokens": req.generated,
        "total_tokens": req.prompt_tokens + req.generated,
    }


def _new_id(chat: bool) -> str:
    return f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"


def _embed(item: Any, settings: SimSettings) -> list[float]:
    """A deterministic unit vector per input, so equal texts embed equally."""
    seed = json.dumps(item).encode()
    values: list[float] = []
    block = 0
    while len(values) < settings.embedding_dim:
        digest = hashlib.sha256(seed + block.to_bytes(4, "big")).digest()
        values.extend(b / 127.5 - 1.0 for b in digest)
        block += 1
    values = values[: settings.embedding_dim]
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    return [v / norm for v in values]


def _drop(request: web.Request) -> web.Response:
    """Close the connection without answering, as a dead process would."""
    if request.transport is not None:
        request.transport.close()
    return web.Response()


# -- command line ---------------------------------------------------------------------------


def _default(name: str) -> Any:
    return next(f.default for f in dataclasses.fields(SimSettings) if f.name == name)


def _non_negative(text: str) -> float:
    value = float(text)
    if value < 0 or math.isnan(value):
        raise argparse.ArgumentTypeError(f"must be >= 0, not {text}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, not {text}")
    return value


def _fault_spec(text: str) -> tuple[str, int]:
    op, sep, count = text.partition("=")
    if not sep or op not in FAULT_OPS or not count.isdigit():
        raise argparse.ArgumentTypeError(f"expected OP=N with OP in {FAULT_OPS}, not {text!r}")
    return op, int(count)


def add_sim_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `kvsleep sim-engine`; every SimSettings knob plus fault injection."""
    parser.add_argument("--flavor", choices=FLAVORS, required=True)
    parser.add_argument("--model", required=True, help="served model name")
    parser.add_argument("--host", default=_default("host"))
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port (logged)")
    knobs: list[tuple[str, Callable[[str], Any], str]] = [
        ("tokens_per_second", _non_negative, "generation pace; 0 = as fast as possible"),
        ("default_max_tokens", _positive_int, "tokens generated when max_tokens is absent"),
        ("wake_latency", _non_negative, "seconds a wake_up / resume takes"),
        ("sleep_latency", _non_negative, "seconds a sleep / release takes"),
        ("reload_latency", _non_negative, "seconds reload_weights / update_weights takes"),
        ("startup_seconds", _non_negative, "seconds /health answers 503 after start"),
        ("weights_gb", _non_negative, "simulated weights size"),
        ("kv_cache_gb", _non_negative, "simulated KV cache size"),
        ("embedding_dim", _positive_int, "length of embedding vectors"),
    ]
    for name, kind, text in knobs:
        flag = "--" + name.replace("_", "-")
        parser.add_argument(flag, type=kind, default=_default(name), help=text)
    parser.add_argument("--vllm-version", choices=VLLM_VERSIONS, default=_default("vllm_version"))
    switches = [
        ("dev_mode", "vLLM: register the sleep routes (VLLM_SERVER_DEV_MODE=1)"),
        ("memory_saver", "SGLang: --enable-memory-saver (without it release/resume free nothing)"),
        (
            "weights_cpu_backup",
            "SGLang: keep weights across release (no reload needed after resume)",
        ),
        ("enable_metrics", "SGLang: serve /metrics (without it /metrics is 404)"),
        (
            "legacy_server_info",
            "SGLang: only the older /get_server_info route (404 on /server_info)",
        ),
        (
            "incarnation",
            "report which process answers (SGLang startup_time, vLLM "
            "process_start_time_seconds); --no-incarnation plays an engine that cannot tell",
        ),
    ]
    for name, text in switches:
        parser.add_argument(
            "--" + name.replace("_", "-"),
            action=argparse.BooleanOptionalAction,
            default=_default(name),
            help=text,
        )
    parser.add_argument("--weights-path", help="SGLang: path update_weights_from_disk expects")
    parser.add_argument(
        "--cuda-device",
        type=int,
        default=None,
        metavar="N",
        help="hold real GPU memory on cuda:N (needs torch) while resident",
    )
    for flag, verb in (("--fail-next", "answer 500 to"), ("--hang-next", "never answer")):
        parser.add_argument(
            flag,
            type=_fault_spec,
            action="append",
            default=[],
            metavar="OP=N",
            help=f"{verb} the next N calls of OP (sleep|wake|reload); repeatable",
        )


def settings_from_args(ns: argparse.Namespace) -> SimSettings:
    """Build settings from `add_sim_arguments` flags; a repeated fault OP keeps its last N."""
    return SimSettings(
        flavor=ns.flavor,
        model=ns.model,
        host=ns.host,
        port=ns.port,
        tokens_per_second=ns.tokens_per_second,
        default_max_tokens=ns.default_max_tokens,
        wake_latency=ns.wake_latency,
        sleep_latency=ns.sleep_latency,
        reload_latency=ns.reload_latency,
        startup_seconds=ns.startup_seconds,
        weights_gb=ns.weights_gb,
        kv_cache_gb=ns.kv_cache_gb,
        vllm_version=ns.vllm_version,
        dev_mode=ns.dev_mode,
        memory_saver=ns.memory_saver,
        weights_cpu_backup=ns.weights_cpu_backup,
        weights_path=ns.weights_path,
        enable_metrics=ns.enable_metrics,
        legacy_server_info=ns.legacy_server_info,
        incarnation=ns.incarnation,
        embedding_dim=ns.embedding_dim,
        cuda_device=ns.cuda_device,
        fail_next=dict(ns.fail_next),
        hang_next=dict(ns.hang_next),
    )


async def run_sim(settings: SimSettings) -> None:
    """Serve until SIGTERM/SIGINT; a crash hazard ends the process with CRASH_EXIT_CODE."""
    sim = SimEngine(settings, on_crash=exit_process)
    # No access log: benchmarks send many requests, and /sim/stats keeps the ordered log.
    runner = web.AppRunner(build_app(sim), access_log=None, shutdown_timeout=5.0)
    await runner.setup()
    try:
        await web.TCPSite(runner, settings.host, settings.port, backlog=1024).start()
        host, port = runner.addresses[0][:2]
        host = f"[{host}]" if ":" in host else host
        log.info(
            "sim-engine %s serving %r on http://%s:%d",
            settings.flavor if settings.flavor == "sglang" else f"vllm {settings.vllm_version}",
            settings.model,
            host,
            port,
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await stop.wait()
    finally:
        await runner.cleanup()


def main_sim(settings: SimSettings) -> int:
    """Entry point of `kvsleep sim-engine`; returns the process exit code."""
    if not logging.getLogger().handlers:
        logging.basicConfig(
            level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(message)s"
        )
    try:
        run_event_loop(run_sim(settings))
    except OSError as exc:
        log.error("cannot listen on %s:%d: %s", settings.host, settings.port, exc)
        return 1
    return 0


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(
        prog="kvsleep sim-engine", description="Simulated vLLM/SGLang engine"
    )
    add_sim_arguments(_parser)
    sys.exit(main_sim(settings_from_args(_parser.parse_args())))
