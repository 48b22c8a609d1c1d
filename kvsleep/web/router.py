"""The data path: route OpenAI requests by their `model`, hold them while it wakes, relay answers.

Per request: read the body once, find the model, take a lease from the sleep manager (which may
hold the request while the engine wakes), forward, and relay the answer - streams chunk by chunk
as they arrive, byte for byte. Every outcome the router can name gets its own status code and an
OpenAI-shaped error body; nothing is a bare 500.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from kvsleep.config import RouterConfig
from kvsleep.control.manager import ModelSlot, Rejected, SleepManager
from kvsleep.web.metrics import Metrics

log = logging.getLogger(__name__)

INFERENCE_ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/embeddings")

_HOP_BY_HOP = frozenset(
    h.lower()
    for h in (
        "Connection",
        "Keep-Alive",
        "Proxy-Authenticate",
        "Proxy-Authorization",
        "TE",
        "Trailer",
        "Transfer-Encoding",
        "Upgrade",
        "Host",
        "Content-Length",
    )
)
_NOT_RELAYED = _HOP_BY_HOP | {"date", "server"}
# aiohttp has already decoded a compressed request body by the time it is read and forwarded.
_NOT_FORWARDED = _HOP_BY_HOP | {"content-encoding"}
CLIENT_GONE = 499  # nginx's code for "client closed the request"; bounded like any code


class OpenAIError(Exception):
    """An error answered in the OpenAI shape."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str,
        *,
        param: str | None = None,
        code: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code
        self.retry_after = retry_after

    def response(self) -> web.Response:
        headers = {}
        if self.retry_after is not None:  # rounded up: a client that obeys it comes back in time
            headers["Retry-After"] = str(max(1, math.ceil(self.retry_after)))
        return web.json_response(
            error_body(self.message, self.type, self.param, self.code),
            status=self.status,
            headers=headers,
        )


def error_body(
    message: str, type_: str, param: str | None = None, code: str | int | None = None
) -> dict[str, object]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def parse_model(body: bytes) -> tuple[str, bool, str | None]:
    """The `model`, `stream` and `user` of a request body, or the 400 that explains what is
    wrong (`user` only keys replica affinity: any value that is no string is not a key)."""
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        raise OpenAIError(
            400, "The request body is not valid JSON.", "invalid_request_error", code="invalid_json"
        ) from None
    if not isinstance(doc, dict):
        raise OpenAIError(
            400,
            "The request body must be a JSON object.",
            "invalid_request_error",
            code="invalid_json",
        )
    model = doc.get("model")
    if model is None:
        raise OpenAIError(
            400,
            "You must provide a model parameter.",
            "invalid_request_error",
            param="model",
            code="missing_model",
        )
    if not isinstance(model, str) or not model:
        raise OpenAIError(
            400,
            "The model parameter must be a non-empty string.",
            "invalid_request_error",
            param="model",
            code="invalid_model",
        )
    stream = doc.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise OpenAIError(
            400,
            "The stream parameter must be a boolean.",
            "invalid_request_error",
            param="stream",
            code="invalid_type",
        )
    user = doc.get("user")
    return model, bool(stream), user if isinstance(user, str) else None


def parse_deadline(request: web.Request) -> float | None:
    """`X-Request-Timeout`: seconds the client is willing to wait for its answer to start."""
    raw = request.headers.get("X-Request-Timeout")
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 < value < float("inf"):
        raise OpenAIError(
            400,
            "X-Request-Timeout must be a positive number of seconds.",
            "invalid_request_error",
            code="invalid_header",
        )
    return value


def _sse_error(
    message: str, type_: str = "server_error", code: str | int | None = 502, body: object = None
) -> bytes:
    event = json.dumps(
        body
        if isinstance(body, dict) and "error" in body
        else error_body(message, type_, code=code)
    )
    return f"data: {event}\n\ndata: [DONE]\n\n".encode()


SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}


class Router:
    def __init__(self, manager: SleepManager, metrics: Metrics, config: RouterConfig) -> None:
        self.manager = manager
        self.metrics = metrics
        self.session: aiohttp.ClientSession | None = None
        self.config = config

    @property
    def config(self) -> RouterConfig:
        return self._config

    @config.setter
    def config(self, config: RouterConfig) -> None:
        """A reload's timeouts apply to the next request (built once, not per request)."""
        self._config = config
        self.timeout = aiohttp.ClientTimeout(
            total=None,
            sock_connect=config.connect_timeout_seconds,
            sock_read=config.upstream_timeout_seconds,
        )

    async def start(self) -> None:
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300),
            auto_decompress=False,
            timeout=self.timeout,
        )

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()
            self.session = None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        resource = request.match_info.route.resource
        assert resource is not None  # only routed requests reach this handler
        endpoint = resource.canonical
        body = await request.read()
        model, stream, user = parse_model(body)
        deadline = parse_deadline(request)
        group = self.manager.groups.get(model)
        if group is None:
            self.metrics.unknown_model_requests.labels(endpoint).inc()
            raise OpenAIError(
                404,
                f"The model `{model}` does not exist.",
                "invalid_request_error",
                param="model",
                code="model_not_found",
            )
        started = time.perf_counter()
        traffic = self.manager.traffic_monitor
        stats = traffic.record_request_start(model, endpoint)
        code = CLIENT_GONE
        slot = group.only or group.route(self._affinity_key(group.affinity, request, user))
        try:
            if self.manager.admit_now(slot):  # awake: no waiting, no coroutine for it
                lease: ModelSlot | Rejected = slot
                early: web.StreamResponse | None = None
            else:
                lease, early = await self._hold(request, slot, stream, deadline, len(body))
            if isinstance(lease, Rejected):
                code = lease.status
                rejected = OpenAIError(
                    lease.status,
                    str(lease),
                    "service_unavailable",
                    param="model",
                    code=lease.reason,
                    retry_after=lease.retry_after,
                )
                if early is None:
                    return rejected.response()
                await _finish(early, _sse_error(str(lease), "service_unavailable", lease.reason))
                return early
            try:
                response, code = await self._forward(request, lease, body, early)
            except OpenAIError as exc:
                code = exc.status
                if early is None:
                    raise
                await _finish(early, _sse_error(exc.message, exc.type, exc.code))
                return early
            finally:
                self.manager.release(lease)
            # A relayed stream ends only now: the engine is done with the request once its
            # answer has ended, and a client must not see the end before kvsleep does (its next
            # request would find this one still counted, and be routed by a stale count).
            if response.prepared and code != CLIENT_GONE:
                code = await _end(response, code)
            return response
        finally:
            traffic.record_request_end(stats, success=code < 400)
            if self.manager.groups.get(model) is group:  # a removed model leaves no series
                self.metrics.count_request(model, endpoint, code, time.perf_counter() - started)

    @staticmethod
    def _affinity_key(affinity: str | None, request: web.Request, user: str | None) -> str | None:
        """What keeps a client on one replica, where the model asks for it."""
        if affinity is None:
            return None
        if affinity == "user":
            return user
        return request.headers.get(affinity.removeprefix("header:"))

    async def _hold(
        self, request: web.Request, slot: ModelSlot, stream: bool, deadline: float | None, size: int
    ) -> tuple[ModelSlot | Rejected, web.StreamResponse | None]:
        """Get the model's lease; a streaming request held for a wake gets SSE comment lines
        (`: waking MODEL, eta Ns`) meanwhile, which OpenAI clients ignore and which keep
        proxies and load balancers from timing the connection out."""
        interval = self.config.hold_keepalive_seconds
        early: web.StreamResponse | None = None

        async def keepalive() -> None:
            nonlocal early
            if early is None:
                early = web.StreamResponse(status=200, headers=SSE_HEADERS)
                await early.prepare(request)
            eta = self.manager.eta_remaining(slot)
            note = f", eta {eta:.0f}s" if eta is not None else ""
            await early.write(f": waking {_one_line(slot.cfg.served_name)}{note}\n\n".encode())

        try:
            lease = await self.manager.acquire(
                slot.cfg.name,
                deadline,
                keepalive if stream and interval else None,
                interval or 5.0,
                size,
            )
        except Rejected as exc:
            return exc, early
        except ConnectionResetError:  # the client left while held
            raise asyncio.CancelledError from None
        return lease, early

    async def _forward(
        self, request: web.Request, slot: ModelSlot, body: bytes, early: web.StreamResponse | None
    ) -> tuple[web.StreamResponse, int]:
        """Send to the engine and relay its answer; `early` is a stream already started."""
        assert self.session is not None
        headers = CIMultiDict(
            (k, v) for k, v in request.headers.items() if k.lower() not in _NOT_FORWARDED
        )
        # rel_url, not raw_path: an absolute-form target (`POST http://host/v1/...`) is routed
        # by its path, as HTTP/1.1 servers must accept it.
        url = slot.cfg.url.rstrip("/") + request.rel_url.raw_path_qs
        try:
            upstream = await self.session.request(
                request.method, url, data=body, headers=headers, timeout=self.timeout
            )
        except asyncio.TimeoutError:
            raise OpenAIError(
                504,
                f"The engine of model `{slot.cfg.name}` did not answer in time.",
                "server_error",
                code="engine_timeout",
            ) from None
        except aiohttp.ClientError as exc:
            if isinstance(exc, aiohttp.ClientConnectorError):
                self.manager.engine_unreachable(slot.cfg.name, str(exc))
            raise OpenAIError(
                502,
                f"The engine of model `{slot.cfg.name}` is unreachable: {exc}",
                "server_error",
                code="engine_unreachable",
            ) from None
        try:
            streamed = upstream.content_type == "text/event-stream"
            if early is not None and not (streamed and upstream.status == 200):
                payload = await self._read(slot, upstream)
                try:
                    detail = json.loads(payload)
                except ValueError:
                    detail = None
                await _finish(
                    early,
                    _sse_error(
                        payload.decode(errors="replace")[:500], code=upstream.status, body=detail
                    ),
                )
                return early, upstream.status
            if early is not None:
                return await self._relay(request, slot, upstream, early)
            out_headers = CIMultiDict(
                (k, v) for k, v in upstream.headers.items() if k.lower() not in _NOT_RELAYED
            )
            if upstream.content_length is not None and not streamed:
                payload = await self._read(slot, upstream)
                return (
                    web.Response(body=payload, status=upstream.status, headers=out_headers),
                    upstream.status,
                )
            response = web.StreamResponse(status=upstream.status, headers=out_headers)
            await response.prepare(request)
            return await self._relay(request, slot, upstream, response)
        finally:
            upstream.release()

    @staticmethod
    async def _read(slot: ModelSlot, upstream: aiohttp.ClientResponse) -> bytes:
        try:
            return await upstream.read()
        except asyncio.TimeoutError:
            raise OpenAIError(
                504,
                f"The engine of model `{slot.cfg.name}` stopped answering.",
                "server_error",
                code="engine_timeout",
            ) from None
        except aiohttp.ClientError as exc:
            raise OpenAIError(
                502,
                f"The engine of model `{slot.cfg.name}` failed mid-answer: {exc}",
                "server_error",
                code="engine_error",
            ) from None

    async def _relay(
        self,
        request: web.Request,
        slot: ModelSlot,
        upstream: aiohttp.ClientResponse,
        response: web.StreamResponse,
    ) -> tuple[web.StreamResponse, int]:
        """Relay a stream chunk by chunk into a started response; an engine failure
        mid-stream ends it in SSE form."""
        try:
            async for chunk in upstream.content.iter_any():
                try:
                    await response.write(chunk)
                except ConnectionResetError:
                    upstream.close()
                    return response, CLIENT_GONE
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            log.warning("engine of model %s failed mid-stream: %r", slot.cfg.name, exc)
            upstream.close()
            if upstream.content_type == "text/event-stream":
                with contextlib.suppress(ConnectionResetError):
                    await response.write(
                        _sse_error(f"The engine of model `{slot.cfg.name}` failed mid-stream.")
                    )
            return response, 502
        except asyncio.CancelledError:
            upstream.close()
            raise
        return response, upstream.status  # the caller ends the response (write_eof)


async def _end(response: web.StreamResponse, code: int) -> int:
    """End a relayed answer; a client that left as it ended is gone (499), not an error."""
    try:
        await response.write_eof()
    except ConnectionResetError:
        return CLIENT_GONE
    return code


async def _finish(response: web.StreamResponse, last: bytes) -> None:
    """Write a started stream's last event and end it; a client already gone is no error."""
    with contextlib.suppress(ConnectionResetError):
        await response.write(last)
        await response.write_eof()


def _one_line(text: str) -> str:
    return text.replace("\r", " ").replace("\n", " ")
