"""The kvcached controller's HTTP routes, answered as its `frontend.py` answers them.

Same paths, keys, JSON types and status codes; errors are `{"error": "text"}` as there (the
OpenAI routes keep the OpenAI shape). Where kvsleep answers differently on purpose (a 4xx where
kvcached answers 500 for bad input, decimal seconds accepted, extra keys), docs/kvcached.md says so
and why. The handlers read kvsleep's own state; none keeps any of its own.
"""

from __future__ import annotations

import asyncio
import json
import math
from typing import TYPE_CHECKING, Any

from aiohttp import web
from aiohttp.web_urldispatcher import AbstractRoute

from kvsleep.core.states import ModelState

if TYPE_CHECKING:
    from kvsleep.web.server import GuardedRoutes, KvsleepServer


# Response headers an error keeps when its body is rewritten to kvcached's shape.
_KEPT_HEADERS = ("WWW-Authenticate", "Retry-After", "Allow")


class BadQuery(Exception):
    """A query parameter kvsleep cannot use: 400 (kvcached answers 500)."""


class KvcachedRoutes:
    """Registers the routes on the server's app and answers them from the server's state."""

    def __init__(self, server: KvsleepServer) -> None:
        self.server = server
        self.routes: set[AbstractRoute] = set()

    def register(self, router: GuardedRoutes) -> None:
        control = self.server._control
        for method, path, handler in (
            ("GET", "/health", self.health),
            ("GET", "/models", self.models),
            ("GET", "/get_server_info", self.server_info),
            ("GET", "/health/{model:.+}", self.model_health),
            ("GET", "/traffic/stats", self.traffic_stats),
            ("GET", "/traffic/stats/{model:.+}", self.model_traffic_stats),
            ("GET", "/models/idle", self.idle_models),
            ("GET", "/models/active", self.active_models),
            ("GET", "/sleep/status", self.sleep_status),
            ("GET", "/sleep/candidates", self.sleep_candidates),
            ("POST", "/action/sleep/{model:.+}", control(self.sleep)),
            ("POST", "/action/wakeup/{model:.+}", control(self.wakeup)),
        ):
            self.routes.add(router.add_route(method, path, handler))

    def plain(self, request: web.Request, response: web.StreamResponse) -> web.StreamResponse:
        """kvcached answers errors as `{"error": "text"}`: rewrite kvsleep's OpenAI-shaped ones
        (the access guard's, aiohttp's) on these routes. Applied to the server's final answer,
        so that it sees the error middleware's too."""
        if response.status < 400 or request.match_info.route not in self.routes:
            return response
        if not isinstance(response, web.Response) or not isinstance(response.body, bytes):
            return response
        try:
            error = json.loads(response.body).get("error")
        except (ValueError, AttributeError):
            return response
        if not isinstance(error, dict):
            return response
        kept = {k: v for k, v in response.headers.items() if k in _KEPT_HEADERS}
        return web.json_response(
            {"error": str(error.get("message"))}, status=response.status, headers=kept
        )

    # ---- read routes ---------------------------------------------------------------------

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "healthy"})

    async def server_info(self, request: web.Request) -> web.Response:
        # kvcached answers a placeholder here, for clients that probe an SGLang-style route.
        return web.json_response({"status": "dummy"})

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "models": {
                    name: {
                        "endpoint": slot.cfg.url,
                        "engine": slot.cfg.engine,
                        "state": self.server.manager.reported_state(slot).value,
                    }
                    for name, slot in self.server.manager.slots.items()
                }
            }
        )

    async def model_health(self, request: web.Request) -> web.Response:
        """`all` probes every model; an unknown model has no endpoints, so an empty health."""
        name = request.match_info["model"]
        slots = self.server.manager.slots
        if name == "all":
            names = list(slots)
            healths = await asyncio.gather(*(self._health(n) for n in names))
            return web.json_response(
                {"model": "all", "health": dict(zip(names, healths, strict=True))}
            )
        doc: dict[str, Any] = {"model": name, "health": await self._health(name)}
        if name in slots:
            doc["state"] = self.server.manager.reported_state(slots[name]).value
        elif name in self.server.manager.groups:
            doc["state"] = self.server.manager.groups[name].state.value
        return web.json_response(doc)

    async def _health(self, name: str) -> dict[str, bool]:
        """The model's endpoints (each replica's) and whether each answers."""
        manager = self.server.manager
        slot = manager.slots.get(name)
        group = manager.groups.get(name)
        slots = [slot] if slot is not None else list(group.slots) if group is not None else []
        # Observation, not GET /health: a released SGLang must never run a forward pass.
        observed = await asyncio.gather(*(s.adapter.observe(s.state) for s in slots))
        return {s.cfg.url: seen.up for s, seen in zip(slots, observed, strict=True)}

    async def traffic_stats(self, request: web.Request) -> web.Response:
        try:
            window = _seconds(request, "window", 60)
        except BadQuery as exc:
            return _error(400, str(exc))
        return web.json_response(
            {
                "traffic_stats": self.server.traffic.get_traffic_summary(window),
                "window_seconds": window,
            }
        )

    async def model_traffic_stats(self, request: web.Request) -> web.Response:
        name = request.match_info["model"]
        try:
            window = _seconds(request, "window", 60)
        except BadQuery as exc:
            return _error(400, str(exc))
        if self.server.traffic.get_model_stats(name) is None:
            return _error(404, f"No traffic data found for model {name}")
        stats = {"model_name": name, **self.server.traffic.describe(name, window)}
        return web.json_response({"model_stats": stats, "window_seconds": window})

    async def idle_models(self, request: web.Request) -> web.Response:
        try:
            threshold = _seconds(request, "threshold", self._threshold())
        except BadQuery as exc:
            return _error(400, str(exc))
        idle = self.server.traffic.get_idle_models(threshold)
        details = {
            name: self._brief(name, ("idle_time_seconds", "total_requests", "last_activity_time"))
            for name in idle
        }
        return web.json_response(
            {
                "idle_models": idle,
                "idle_threshold_seconds": threshold,
                "idle_model_details": details,
                "idle_models_count": len(idle),
            }
        )

    async def active_models(self, request: web.Request) -> web.Response:
        try:
            threshold = _seconds(request, "threshold", self._threshold())
            window = _seconds(request, "window", 60)
        except BadQuery as exc:
            return _error(400, str(exc))
        active = self.server.traffic.get_active_models(threshold)
        details = {
            name: self._brief(
                name,
                ("request_rate", "total_requests", "avg_response_time", "last_activity_time"),
                window,
            )
            for name in active
        }
        return web.json_response(
            {
                "active_models": active,
                "idle_threshold_seconds": threshold,
                "window_seconds": window,
                "active_model_details": details,
                "active_models_count": len(active),
            }
        )

    async def sleep_status(self, request: web.Request) -> web.Response:
        return web.json_response(status_document(self.server))

    async def sleep_candidates(self, request: web.Request) -> web.Response:
        manager = self.server.manager
        candidates = manager.get_sleep_candidates()
        details = {
            name: {
                **self._brief(name, ("idle_time_seconds", "total_requests", "last_activity_time")),
                "can_sleep": True,
            }
            for name in candidates
        }
        return web.json_response(
            {
                "sleep_candidates": candidates,
                "candidate_details": details,
                "idle_threshold_seconds": self._threshold(),
                "auto_sleep_enabled": manager.config.auto_sleep_enabled,
            }
        )

    def _threshold(self) -> int | float:
        return _json_seconds(self.server.manager.config.idle_threshold_seconds)

    def _brief(self, name: str, keys: tuple[str, ...], window: float = 60) -> dict[str, Any]:
        full = self.server.traffic.describe(name, window)
        return {k: full[k] for k in keys}

    # ---- control routes ------------------------------------------------------------------

    async def sleep(self, request: web.Request) -> web.Response:
        """kvcached's `put_model_to_sleep`: 400 `success: false` if the model already sleeps.
        kvsleep drains the model's requests first, and answers 409 for an `always_on` model."""
        server = self.server
        name = request.match_info["model"]
        if not server.manager.replicas_of(name):
            return _error(404, f"Model {name} not found")
        try:
            wait = _wait(request)
        except BadQuery as exc:
            return _error(400, str(exc))
        if (owner := server.owner(name)) is not None:
            return await server._ask_owner(owner, request)
        refusal = server.manager.sleep_refusal(name)
        if refusal is not None:
            always_on = all(s.cfg.always_on for s in server.manager.replicas_of(name))
            status = 409 if always_on else 400
            return _action(name, False, f"Model {name} sleep request failed: {refusal}", status)
        return await server._answer(
            name, "sleep", server.manager.request_sleep(name, "manual"), wait
        )

    async def wakeup(self, request: web.Request) -> web.Response:
        """kvcached's `wakeup_model`: 400 `success: false` if the model is not asleep or slept
        less than `min_sleep_duration`."""
        server = self.server
        name = request.match_info["model"]
        if not server.manager.replicas_of(name):
            return _error(404, f"Model {name} not found")
        try:
            wait = _wait(request)
        except BadQuery as exc:
            return _error(400, str(exc))
        refusal = server.manager.wake_refusal(name)
        if refusal is not None:
            return _action(name, False, f"Model {name} wake request failed: {refusal}", 400)
        return await server._answer(name, "wake", server.manager.request_wake(name, "manual"), wait)


def status_document(server: KvsleepServer) -> dict[str, Any]:
    """`/sleep/status`: kvcached's keys plus every model's timers, queue and wake ETA, and the
    GPU budgets. The status page and `kvsleep status` show this same document."""
    manager, traffic = server.manager, server.traffic
    now = server.clock()
    models = {
        name: {
            "model": slot.cfg.served_name,
            "replica": slot.cfg.replica,
            "state": manager.reported_state(slot).value,
            "state_since": slot.state_since,
            "engine": slot.cfg.engine,
            "held_requests": len(slot.waiters),
            # A replica's: the requests inside its engine and held for its wake.
            "in_flight": traffic.model_stats[name].in_flight
            if name == slot.cfg.served_name
            else slot.in_engine + len(slot.waiters),
            "engine_up": slot.engine_up,
            "last_error": slot.last_error,
            "idle_threshold_seconds": _json_seconds(manager.thresholds.threshold_for(slot.cfg)),
            "auto_sleep_enabled": slot.cfg.policy.auto_sleep_enabled,
            "always_on": slot.cfg.always_on,
            "idle_seconds": traffic.model_stats[slot.cfg.served_name].get_idle_time()
            if slot.state is ModelState.AWAKE
            else None,
            "seconds_in_state": now - slot.state_since,
            "wake_eta_seconds": manager.wake_eta(slot),
            "waiting_for_memory": slot.waiting_for_memory,
            "cannot_sleep": slot.cannot_sleep,
            "sleep_failures": slot.sleep_failures,
            "next_sleep_attempt": slot.sleep_retry_at if slot.sleep_retry_at > now else None,
            "launched": server.engine_log_file(name) is not None,
        }
        for name, slot in manager.slots.items()
    }
    return {
        "sleeping_models": manager.get_sleeping_models(),
        "sleep_candidates": manager.get_sleep_candidates(),
        "auto_sleep_enabled": manager.config.auto_sleep_enabled,
        "idle_threshold_seconds": _json_seconds(manager.config.idle_threshold_seconds),
        "wakeup_on_request": manager.config.wakeup_on_request,
        "models": models,
        "gpus": {
            str(gpu): {"budget_gb": budget, "committed_gb": committed}
            for gpu, budget, committed in manager.gpu_snapshots()
        },
    }


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def _action(name: str, success: bool, message: str, status: int) -> web.Response:
    return web.json_response(
        {"model_name": name, "success": success, "message": message}, status=status
    )


def _wait(request: web.Request) -> bool:
    """kvsleep's `?wait=false` (answer 202 at once); a word other than true or false is refused
    before anything is done, not taken as the default."""
    values = request.query.getall("wait", [])
    if values not in ([], ["true"], ["false"]):
        raise BadQuery("Query parameter wait must be true or false")
    return values != ["false"]


def _json_seconds(value: float) -> int | float:
    """Whole seconds as a JSON integer, as kvcached answers them (`300`, not `300.0`)."""
    return int(value) if float(value).is_integer() else value


def _seconds(request: web.Request, key: str, default: float) -> int | float:
    """A non-negative number of seconds from the query; whole numbers stay integers."""
    raw = request.query.get(key)
    if raw is None:
        return _json_seconds(default)
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not math.isfinite(value) or value < 0:
        raise BadQuery(
            f"Query parameter {key} must be a non-negative number of seconds, got {raw!r}"
        )
    return _json_seconds(value)
