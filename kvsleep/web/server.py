"""The HTTP server: wires config, metrics, traffic, sleep manager and router into one aiohttp app.

Routes: the OpenAI data path (router.py), the kvcached controller's JSON routes
(kvcached_routes.py), control routes (sleep, wake, reload) behind bearer-token or loopback-only
access, and Prometheus conventions (`/metrics`, `/-/reload`, `/-/healthy`, `/-/ready`).
"""

from __future__ import annotations

import asyncio
import gc
import hmac
import ipaddress
import json
import logging
import resource
import socket
import time
from collections.abc import Awaitable, Callable, Coroutine
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError
from prometheus_client.aiohttp import make_aiohttp_handler

from kvsleep.config import Config, ConfigError, ModelConfig, load_config, needs_restart
from kvsleep.control.fleet import MemberAdapter, OwnerAdapter, owner_of
from kvsleep.control.gpu import engine_memory_reader, nvml_free_gb
from kvsleep.control.manager import NotAllowed, SleepManager
from kvsleep.control.policy_source import PrometheusSource
from kvsleep.control.reconciler import Reconciler
from kvsleep.control.state_file import StateStore
from kvsleep.control.traffic import TrafficMonitor
from kvsleep.core.states import ModelState
from kvsleep.engines import (
    EngineAdapter,
    EngineError,
    RetryPolicy,
    SessionSource,
    adapter_for,
)
from kvsleep.web import operator_routes
from kvsleep.web.alertmanager import PayloadError, parse_webhook
from kvsleep.web.connections import (
    ConnectionPool,
    GuardedSite,
    Phase,
    bind,
    connection_limit,
    raise_file_limit,
)
from kvsleep.web.kvcached_routes import KvcachedRoutes
from kvsleep.web.metrics import Metrics
from kvsleep.web.router import INFERENCE_ENDPOINTS, OpenAIError, Router, error_body

if TYPE_CHECKING:
    from kvsleep.control.launcher import Launcher

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class KvsleepServer:
    """One kvsleep instance. `app` is what aiohttp serves; `start`/`stop` run with it."""

    def __init__(
        self,
        config: Config,
        *,
        config_path: str | None = None,
        clock: Callable[[], float] = time.time,
        retry: RetryPolicy | None = None,
        overrides: Callable[[Config], Config] | None = None,
    ) -> None:
        self.config = config
        self.config_path = config_path
        # The command line's changes to the file (`serve --port`, ...), applied to each reload.
        self.overrides = overrides
        self.clock = clock
        self.metrics = Metrics()
        self.traffic = TrafficMonitor(config.sleep_manager.idle_threshold_seconds, clock=clock)
        self.manager = SleepManager(
            config.sleep_manager,
            self.traffic,
            metrics=self.metrics,
            state_store=StateStore(config.state_dir),
            clock=clock,
            retry=retry,
            adapter_factory=self._adapter,
            owns=lambda name: self.owner(name) is None,
        )
        self.manager.gpu_memory_of = engine_memory_reader()
        for model in config.models:
            self.manager.add_model(model)
        self._apply_gpus(config)
        self.reconciler = Reconciler(
            self.manager,
            PrometheusSource(config.policy_source, self.metrics.policy_source_up)
            if config.policy_source.type == "prometheus"
            else None,
        )
        self.manager.reconciler = self.reconciler
        self.router = Router(self.manager, self.metrics, config.router)
        self.file_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        self.connections = ConnectionPool(
            lambda: self.config.router,
            self.metrics.client_connections_closed,
            self.metrics.client_connections.set,
            0,
        )
        self._apply_router(config)
        self.ready = False
        self.launching = False  # launched engines' first start under way (kvsleep serve)
        # Set by `kvsleep serve`, which launches engines: /logs serves only what it launched.
        self.launcher: Launcher | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._mark_reload(True)
        self.app = self._build_app()

    def _apply_router(self, config: Config) -> None:
        self.manager.max_held_bytes = config.router.max_held_bytes
        self.connections.max_connections = connection_limit(
            config.router.max_client_connections, self.file_limit
        )

    def _apply_gpus(self, config: Config) -> None:
        self.manager.gpu_budgets = {gpu.id: gpu.memory_gb for gpu in config.gpus}
        self.manager.gpu_free = nvml_free_gb(self.manager.gpu_budgets)

    # ---- fleet ---------------------------------------------------------------------------

    def owner(self, model: str) -> str | None:
        """The replica that sleeps and wakes `model`, when that is not this one."""
        owner = owner_of(model, self.config.fleet)
        return None if owner == self.config.fleet.self_url else owner

    def _adapter(
        self, model: ModelConfig, sessions: SessionSource, retry: RetryPolicy
    ) -> EngineAdapter:
        inner = adapter_for(model, sessions, retry)
        if not self.config.fleet.peers:
            return inner
        token = self.config.router.admin_token
        owner = self.owner(model.name)
        if owner is None:
            return OwnerAdapter(inner, token, self.config.fleet.peers)
        return MemberAdapter(inner, token, owner)

    async def _ask_owner_to_sleep(self, owner: str, model: str) -> None:
        adapter = self.manager.slots[model].adapter
        assert isinstance(adapter, MemberAdapter)
        try:
            await adapter.ask(owner, "sleep", {"wait": "false"}, 10.0)
        except EngineError as exc:
            log.warning("alert sleep of %s not passed to its owner: %s", model, exc)

    def _background(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _ask_owner(self, owner: str, request: web.Request) -> web.Response:
        """Pass an operator's sleep to the replica that owns the model."""
        headers = {k: v for k, v in request.headers.items() if k.lower() == "authorization"}
        async with self.manager.session.post(owner + request.path_qs, headers=headers) as resp:
            return web.Response(
                body=await resp.read(), status=resp.status, content_type=resp.content_type
            )

    # ---- lifecycle -----------------------------------------------------------------------

    def _build_app(self) -> web.Application:
        self._app_max_body = self.config.router.max_body_bytes
        self.kvcached = KvcachedRoutes(self)
        app = web.Application(client_max_size=self._app_max_body)
        add = GuardedRoutes(
            app.router, lambda handler: partial(self._every_request, handler=handler)
        )
        for path in INFERENCE_ENDPOINTS:
            add.add_post(path, self.router.handle)
        add.add_get("/v1/models", self.v1_models)
        self.kvcached.register(add)
        add.add_post("/models/{model:.+}/sleep", self._control(self.sleep))
        add.add_post("/models/{model:.+}/wake", self._control(self.wake))
        add.add_post("/models/{model:.+}/adopt", self._control(self.adopt))
        add.add_get("/metrics", make_aiohttp_handler(self.metrics.registry))
        add.add_post("/-/reload", self._control(self.reload))
        add.add_post("/alertmanager/webhook", self._control(self.alertmanager_webhook))
        add.add_get("/-/healthy", self.healthy)
        add.add_get("/-/ready", self.readiness)
        operator_routes.install(self, app, add)
        # Last: what no route above matches gets its 404 or 405 in the OpenAI shape too.
        self.unrouted = add.add_route("*", r"/{path:[\s\S]*}", self._unrouted).resource
        app.cleanup_ctx.append(self._lifespan)
        return app

    async def _unrouted(self, request: web.Request) -> web.StreamResponse:
        allowed: set[str] = set()
        for candidate in request.app.router.resources():
            if candidate is not self.unrouted:
                allowed |= (await candidate.resolve(request))[1]
        if allowed:
            raise web.HTTPMethodNotAllowed(request.method, allowed)
        raise web.HTTPNotFound()

    async def _lifespan(self, app: web.Application):
        await self.start()
        yield
        await self.stop()

    async def start(self) -> None:
        await self.router.start()
        await self.manager.start()
        # Everything made so far (modules, config, the app) lives as long as the process: keep
        # it out of the collector's passes, which otherwise rescan it every few thousand
        # requests' worth of allocations.
        gc.freeze()
        self.ready = True

    async def stop(self) -> None:
        self.ready = False
        await self.manager.stop()
        await self.router.close()
        if self.reconciler.source is not None:
            await self.reconciler.source.close()

    # ---- middleware and access -----------------------------------------------------------

    async def _every_request(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Around every handler, instead of middlewares (once an app has one, aiohttp adds two
        coroutine layers to every request: a measurable part of the data path). The connection
        is inside a request, so no idle or head timer runs (a held request or a long generation
        is never cut); the body is read within its deadline; errors leave in the OpenAI shape,
        or in kvcached's on its routes."""
        guard = self.connections.find(request.transport)
        if guard is not None:
            self.connections.enter(guard, Phase.REQUEST)
        try:
            if request.body_exists:
                request = await self._read_body(request)
            response = await handler(request)
        except (_Answered, OpenAIError, RequestPayloadError, web.HTTPException) as exc:
            response = self._error_response(request, exc)
        finally:
            if guard is not None:
                self.connections.enter(guard, Phase.IDLE)
        return self.kvcached.plain(request, response)

    def _error_response(self, request: web.Request, exc: Exception) -> web.StreamResponse:
        """Every error leaves in the OpenAI shape, including aiohttp's own (413, 404, 405)."""
        if isinstance(exc, _Answered):
            return exc.response
        if isinstance(exc, OpenAIError):
            return exc.response()
        if isinstance(exc, RequestPayloadError):
            # A body aiohttp cannot decode (e.g. bad gzip): its parser has given up on this
            # connection, so answer and close it; nothing is left to read (no lingering read).
            request.content.feed_eof()
            response = OpenAIError(
                400,
                "The request body cannot be decoded (Content-Encoding or framing).",
                "invalid_request_error",
                code="invalid_body",
            ).response()
            response.force_close()
            return response
        assert isinstance(exc, web.HTTPException)
        if exc.status < 400:
            raise exc
        kind = "invalid_request_error" if exc.status < 500 else "server_error"
        message = exc.text if exc.text and not exc.text.startswith(str(exc.status)) else exc.reason
        if exc.status == 413:
            message = (
                f"The request body is larger than the limit of "
                f"{self.config.router.max_body_bytes} bytes."
            )
        return web.json_response(
            error_body(message, kind, code=exc.status),
            status=exc.status,
            headers=_kept_headers(exc),
        )

    async def _read_body(self, request: web.Request) -> web.Request:
        """The whole body, read now, within `body_timeout_seconds` plus its size at
        `body_min_bytes_per_second`; handlers' `read()` then returns it at once."""
        cfg = self.config.router
        if cfg.max_body_bytes != self._app_max_body:  # changed by a reload
            request = request.clone(client_max_size=cfg.max_body_bytes)
        length = request.content_length
        if length is not None and length > cfg.max_body_bytes:
            raise web.HTTPRequestEntityTooLarge(max_size=cfg.max_body_bytes, actual_size=length)
        if request.content.is_eof():  # all of it came with the head: the usual case, no timer
            await request.read()
            return request
        expected = length if length is not None else cfg.max_body_bytes
        limit = cfg.body_timeout_seconds + expected / cfg.body_min_bytes_per_second
        try:
            await asyncio.wait_for(request.read(), limit)
        except asyncio.TimeoutError:
            self.connections.count("body_timeout", f"a request body took over {limit:g}s")
            response = OpenAIError(
                408,
                f"The request body was not received within {limit:g}s.",
                "invalid_request_error",
                code="body_timeout",
            ).response()
            response.force_close()
            raise _Answered(response) from None
        return request

    def _control(self, handler: Handler) -> Handler:
        """Bearer token when one is configured; otherwise loopback clients only."""

        async def guarded(request: web.Request) -> web.StreamResponse:
            token = self.config.router.admin_token
            if token:
                scheme, _, given = request.headers.get("Authorization", "").partition(" ")
                # surrogateescape: a header with non-UTF-8 bytes is a wrong token, not a 500.
                same = hmac.compare_digest(
                    given.strip().encode("utf-8", "surrogateescape"),
                    token.encode("utf-8", "surrogateescape"),
                )
                if not (same and scheme.lower() == "bearer"):
                    refused = OpenAIError(
                        401,
                        "A valid bearer token is required for control routes.",
                        "authentication_error",
                        code="unauthorized",
                    ).response()
                    refused.headers["WWW-Authenticate"] = 'Bearer realm="kvsleep"'
                    return refused
            elif not _is_loopback(request.remote):
                raise OpenAIError(
                    403,
                    "Control routes answer loopback clients only unless an "
                    "admin token is configured.",
                    "permission_error",
                    code="forbidden",
                )
            return await handler(request)

        return guarded

    # ---- OpenAI and operator read routes -------------------------------------------------

    async def v1_models(self, request: web.Request) -> web.Response:
        data = [self.model_object(name) for name in self.manager.groups]
        return web.json_response({"object": "list", "data": data})

    def engine_log_file(self, model: str) -> Path | None:
        """The log file of an engine this kvsleep launched, or None (it did not launch it): the
        one place /logs and the status page learn where launched engines write."""
        return self.launcher.log_file(model) if self.launcher is not None else None

    def model_object(self, name: str) -> dict[str, Any]:
        """The OpenAI model object of a configured model, with its sleep state (a model with
        replicas is awake when any of them is)."""
        group = self.manager.groups[name]
        return {
            "id": name,
            "object": "model",
            "created": int(self.clock()),
            "owned_by": group.slots[0].cfg.engine,
            "state": group.state.value,
        }

    async def healthy(self, request: web.Request) -> web.Response:
        return web.Response(text="kvsleep is Healthy.\n")

    async def readiness(self, request: web.Request) -> web.Response:
        """Ready once started and launched engines have had their first start; models starting
        or down are named either way. A model down does not make kvsleep unready: it still
        serves the others (and a probe that fails for one engine must not pull the router)."""
        by_state: dict[ModelState, list[str]] = {}
        for name, slot in self.manager.slots.items():
            by_state.setdefault(self.manager.reported_state(slot), []).append(name)
        starting, down = by_state.get(ModelState.STARTING, []), by_state.get(ModelState.DOWN, [])
        details = "".join(
            f"{label}: {', '.join(names)}\n"
            for label, names in (("starting", starting), ("down", down))
            if names
        )
        if not self.ready or self.launching:
            return web.Response(status=503, text="kvsleep is not ready.\n" + details)
        return web.Response(text="kvsleep is Ready.\n" + details)

    # ---- control routes ------------------------------------------------------------------

    async def sleep(self, request: web.Request) -> web.Response:
        name = self.model_in_path(request)
        from_owner = _choice(request, "from", ("owner",)) == "owner"
        wait = _choice(request, "wait", ("true", "false")) != "false"
        owner = self.owner(name)
        if owner is not None and not from_owner:
            return await self._ask_owner(owner, request)
        try:
            outcome = self.manager.request_sleep(name, "reconcile" if from_owner else "manual")
        except NotAllowed as exc:
            return _action(name, False, str(exc), 409)
        return await self._answer(name, "sleep", outcome, wait)

    async def wake(self, request: web.Request) -> web.Response:
        name = self.model_in_path(request)
        reason = _choice(request, "reason", ("request", "manual")) or "manual"
        wait = _choice(request, "wait", ("true", "false")) != "false"
        if reason != "request" and (at := self.manager.defer_wake(name, reason)) is not None:
            return _action(
                name,
                True,
                f"Model {name} slept less than min_sleep_duration; wake "
                f"scheduled in {at - self.clock():.0f}s",
                202,
            )
        return await self._answer(name, "wake", self.manager.request_wake(name, reason), wait)

    async def adopt(self, request: web.Request) -> web.Response:
        """An operator's word on an engine kvsleep cannot read (state `unknown`)."""
        name = self.model_in_path(request)
        state = _choice(request, "state", ("asleep", "awake"))
        if state is None:
            raise OpenAIError(
                400,
                "Query parameter `state` is required: asleep or awake (what the engine is).",
                "invalid_request_error",
                param="state",
                code="missing_value",
            )
        try:
            await self.manager.adopt_state(name, ModelState(state))
        except NotAllowed as exc:
            return _action(name, False, str(exc), 409)
        now = self.manager.slots[name].state.value
        return _action(name, True, f"Model {name} adopted as {state}; now {now}", 200)

    async def _answer(
        self, name: str, verb: str, outcome: asyncio.Future[bool], wait: bool
    ) -> web.Response:
        """Answer once the operation is over, as the kvcached controller did (or at once with
        `?wait=false`); 409 when the model left the configuration meanwhile."""
        if not wait:
            return _action(name, True, f"Model {name} {verb} requested", 202)
        ok = await outcome
        if not self.manager.replicas_of(name):
            # a reload removed it: the call is settled at once
            return _action(
                name,
                False,
                f"Model {name} was removed from the configuration before its {verb} ended",
                409,
            )
        slot = self.manager.slots.get(name)
        detail = "" if ok or slot is None or not slot.last_error else f": {slot.last_error}"
        return _action(
            name,
            ok,
            f"Model {name} {verb} request {'successful' if ok else 'failed'}{detail}",
            200 if ok else 400,
        )

    async def alertmanager_webhook(self, request: web.Request) -> web.Response:
        try:  # bytes: json detects UTF-8/16/32 itself, whatever charset the header claims
            payload = json.loads(await request.read())
        except (ValueError, RecursionError):
            payload = None
        try:
            # Alerts name models as the metrics do (a model's name), or one replica's engine.
            actions = parse_webhook(payload, self.manager.slots.keys() | self.manager.groups.keys())
        except PayloadError as exc:
            raise OpenAIError(
                400,
                f"Alertmanager payload refused: {exc}",
                "invalid_request_error",
                code="invalid_payload",
            ) from None
        results = []
        for act in actions:
            try:
                if act.action == "sleep" and (owner := self.owner(act.model)) is not None:
                    self._background(self._ask_owner_to_sleep(owner, act.model))
                    outcome = f"sleep passed to owner {owner}"
                elif act.action == "sleep" and (
                    why := next(
                        (
                            slot.cannot_sleep
                            for slot in self.manager.replicas_of(act.model)
                            if slot.cannot_sleep is not None
                        ),
                        None,
                    )
                ):
                    outcome = f"ignored: the model cannot sleep ({why})"
                elif act.action == "sleep":
                    self.manager.request_sleep(act.model, "alert")
                    outcome = "sleep requested"
                elif (at := self.manager.defer_wake(act.model, "alert")) is not None:
                    outcome = f"wake deferred {at - self.clock():.0f}s (min_sleep_duration)"
                else:
                    self.manager.request_wake(act.model, "alert")
                    outcome = "wake requested"
            except NotAllowed as exc:
                outcome = f"ignored: {exc}"
            log.info("alert %r: %s %s: %s", act.alertname, act.action, act.model, outcome)
            results.append({"model": act.model, "action": act.action, "result": outcome})
        return web.json_response({"status": "accepted", "actions": results})

    async def reload(self, request: web.Request) -> web.Response:
        try:
            self.reload_config()
        except ConfigError as exc:
            return web.json_response({"status": "error", "errors": exc.problems}, status=400)
        return web.json_response({"status": "success"})

    def reload_config(self) -> None:
        """Re-read the config file; a bad file changes nothing. Policy applies on the next pass."""
        if self.config_path is None:
            raise ConfigError(["<config>: no configuration file to reload"])
        try:
            new = load_config(self.config_path)
            if self.overrides is not None:
                new = self.overrides(new)
        except ConfigError as exc:
            self._mark_reload(False)
            log.error("reload rejected, keeping the running configuration:\n%s", exc)
            raise
        if restart := needs_restart(self.config, new):
            self._mark_reload(False)
            problems = [
                f"{new.source}: {key}: changed; this takes a restart of kvsleep "
                "(reload refused, nothing applied)"
                for key in restart
            ]
            log.error(
                "reload rejected, keeping the running configuration:\n%s", "\n".join(problems)
            )
            raise ConfigError(problems)
        old_names = {m.name for m in self.config.models}
        new_names = {m.name for m in new.models}
        for name in old_names - new_names:
            self.manager.remove_model(name)
        for model in new.models:
            if model.name in old_names:
                self.manager.update_model(model)
            else:
                self.manager.add_model(model)
        self.manager.config = new.sleep_manager
        self._apply_gpus(new)
        self.traffic.idle_threshold_seconds = new.sleep_manager.idle_threshold_seconds
        self.router.config = new.router
        self.config = new
        self._apply_router(new)
        self._mark_reload(True)
        log.info("configuration reloaded: %d models", len(new.models))

    def _mark_reload(self, ok: bool) -> None:
        self.metrics.config_last_reload_successful.set(1 if ok else 0)
        if ok:
            self.metrics.config_last_reload_success_timestamp.set(self.clock())

    def model_in_path(self, request: web.Request, *, engines: bool = True) -> str:
        """The model named in the path, raw (`a/b`) or percent-encoded (`a%2Fb`, which aiohttp
        has already decoded): a name clients use, or (with `engines`) one replica's engine."""
        name = request.match_info["model"]
        if name not in self.manager.groups and not (engines and name in self.manager.slots):
            raise OpenAIError(
                404,
                f"The model `{name}` does not exist.",
                "invalid_request_error",
                param="model",
                code="model_not_found",
            )
        return name


class GuardedRoutes:
    """`app.router` for kvsleep's routes, each handler wrapped (see `_every_request`)."""

    def __init__(self, router: web.UrlDispatcher, wrap: Callable[[Handler], Handler]) -> None:
        self.router = router
        self.wrap = wrap

    def add_route(self, method: str, path: str, handler: Handler) -> web.AbstractRoute:
        return self.router.add_route(method, path, self.wrap(handler))

    def add_get(self, path: str, handler: Handler) -> web.AbstractRoute:
        return self.router.add_get(path, self.wrap(handler))

    def add_post(self, path: str, handler: Handler) -> web.AbstractRoute:
        return self.router.add_post(path, self.wrap(handler))


class _Answered(Exception):
    """A middleware's final answer, passed out through the error middleware."""

    def __init__(self, response: web.Response) -> None:
        super().__init__(response.reason)
        self.response = response


def _action(name: str, success: bool, message: str, status: int) -> web.Response:
    return web.json_response(
        {"model_name": name, "success": success, "message": message}, status=status
    )


def _choice(request: web.Request, key: str, allowed: tuple[str, ...]) -> str | None:
    """A query parameter that takes one of a few words: a typo is an error, not the default."""
    values = request.query.getall(key, [])
    if not values:
        return None
    if len(values) > 1 or values[0] not in allowed:
        raise OpenAIError(
            400,
            f"Query parameter `{key}` must be one of: {', '.join(allowed)}.",
            "invalid_request_error",
            param=key,
            code="invalid_value",
        )
    return values[0]


def _is_loopback(remote: str | None) -> bool:
    try:
        return remote is not None and ipaddress.ip_address(remote).is_loopback
    except ValueError:
        return False


def _kept_headers(exc: web.HTTPException) -> dict[str, str]:
    return {k: v for k, v in exc.headers.items() if k.lower() in ("allow", "retry-after")}


class _ClientErrorsQuietly(logging.Filter):
    """aiohttp logs a malformed request (bad framing, a header too long) as an ERROR with a
    traceback; it is the client's fault and anyone can send one, so it becomes one DEBUG line
    instead of a way to flood the log."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, HttpProcessingError):
            return True
        record.exc_info = record.exc_text = None
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        record.msg, record.args = "malformed request from a client: %s", (exc,)
        return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)


logging.getLogger("aiohttp.server").addFilter(_ClientErrorsQuietly())


async def listen(server: KvsleepServer, sock: socket.socket) -> web.AppRunner:
    """Serve `server.app` on a bound socket, each connection under the server's limits."""
    cfg = server.config.router
    server.file_limit = raise_file_limit()
    server.connections.max_connections = connection_limit(
        cfg.max_client_connections, server.file_limit
    )
    runner = web.AppRunner(
        server.app,
        handler_cancellation=True,
        access_log=None,
        shutdown_timeout=cfg.shutdown_grace_seconds,
    )
    await runner.setup()
    await GuardedSite(
        runner, sock, server.connections, {"access_log": None}, backlog=cfg.listen_backlog
    ).start()
    return runner


async def serve(
    server: KvsleepServer, stop: asyncio.Event, sock: socket.socket | None = None
) -> None:
    """Serve until `stop` is set, then stop accepting and let in-flight requests finish.

    `sock`: the router's socket, already bound (kvsleep serve binds before launching)."""
    cfg = server.config.router
    runner = await listen(server, sock if sock is not None else bind(cfg.host, cfg.port))
    log.info(
        "kvsleep listening on http://%s:%d with %d models (%d engines)",
        cfg.host,
        cfg.port,
        len(server.manager.groups),
        len(server.manager.slots),
    )
    try:
        await stop.wait()
    finally:
        log.info(
            "shutting down: finishing in-flight requests (at most %gs)", cfg.shutdown_grace_seconds
        )
        await runner.cleanup()
