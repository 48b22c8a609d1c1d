"""Routes for operators: the status page (`/`), launched engines' logs (`/logs/{model}`), the
OpenAPI description of kvsleep's own API (`/openapi.json`) and `GET /v1/models/{id}`.

Kept out of server.py so that the page and its assets can change without touching the data path.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from functools import cache, partial
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from aiohttp import web

from kvsleep import __version__
from kvsleep.web import status_page
from kvsleep.web.kvcached_routes import status_document
from kvsleep.web.router import OpenAIError

if TYPE_CHECKING:
    from kvsleep.web.server import GuardedRoutes, KvsleepServer

LOG_LINES_DEFAULT = 100
LOG_LINES_MAX = 10_000
# Bounds what one answer reads from the end of a log, however long its lines.
LOG_TAIL_MAX_BYTES = 4 * 1024 * 1024
FOLLOW_POLL_SECONDS = 0.5
FOLLOW_KEEPALIVE_SECONDS = 15.0

# The page loads nothing from elsewhere (works offline, behind any proxy) and cannot be framed.
PAGE_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
ASSETS = {"status.js": "text/javascript", "status.css": "text/css"}

_STOPPING = web.AppKey("kvsleep_operator_stopping", asyncio.Event)


def install(server: KvsleepServer, app: web.Application, add: GuardedRoutes) -> None:
    add.add_get("/", partial(page, server))
    add.add_get("/static/{name}", asset)
    add.add_get("/openapi.json", openapi)
    add.add_get("/v1/models/{model:.+}", partial(v1_model, server))
    add.add_get("/logs/{model:.+}", server._control(partial(logs, server)))
    app[_STOPPING] = asyncio.Event()
    app.on_shutdown.append(_stop_followers)


async def _stop_followers(app: web.Application) -> None:
    """Log streams never end by themselves: end them so that shutdown does not wait its grace."""
    app[_STOPPING].set()


# ---- the status page ---------------------------------------------------------------------


async def page(server: KvsleepServer, request: web.Request) -> web.Response:
    html = status_page.render(status_document(server))
    return web.Response(
        text=html, content_type="text/html", charset="utf-8", headers=_page_headers()
    )


async def asset(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    if name not in ASSETS:
        raise web.HTTPNotFound(text=f"No asset `{name}`.")
    return web.Response(
        body=_asset_bytes(name), content_type=ASSETS[name], charset="utf-8", headers=_page_headers()
    )


def _page_headers() -> dict[str, str]:
    return {
        "Content-Security-Policy": PAGE_CSP,
        "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer",
        "Cache-Control": "no-cache",
    }


@cache
def _asset_bytes(name: str) -> bytes:
    return (resources.files("kvsleep.web") / "static" / name).read_bytes()


# ---- OpenAPI and the OpenAI model route --------------------------------------------------


@cache
def openapi_document() -> dict[str, Any]:
    """kvsleep/web/openapi.yaml (kept in YAML for its comments), served as JSON."""
    doc = yaml.safe_load((resources.files("kvsleep.web") / "openapi.yaml").read_text("utf-8"))
    doc["info"]["version"] = __version__
    return doc


@cache
def _openapi_json() -> bytes:
    return json.dumps(openapi_document()).encode()


async def openapi(request: web.Request) -> web.Response:
    return web.Response(body=_openapi_json(), content_type="application/json")


async def v1_model(server: KvsleepServer, request: web.Request) -> web.Response:
    """OpenAI's `models.retrieve`: ids contain `/`, raw or percent-encoded (aiohttp decodes)."""
    return web.json_response(server.model_object(server.model_in_path(request, engines=False)))


# ---- engine logs -------------------------------------------------------------------------


async def logs(server: KvsleepServer, request: web.Request) -> web.StreamResponse:
    """The last lines of a launched engine's log; with `?follow=1`, then every new line (SSE)."""
    name = server.model_in_path(request)
    path = server.engine_log_file(name)
    if path is None:
        raise OpenAIError(
            404,
            f"kvsleep did not launch the engine of `{name}`, so it has no log of it.",
            "invalid_request_error",
            param="model",
            code="not_launched",
        )
    count = _lines_param(request)
    follow = request.query.get("follow", "0").lower()
    if follow not in ("0", "1", "true", "false"):
        raise OpenAIError(
            400,
            "Query parameter `follow` must be 1 or 0.",
            "invalid_request_error",
            param="follow",
            code="invalid_value",
        )
    lines, offset = await asyncio.to_thread(last_lines, path, count)
    if follow in ("0", "false"):
        text = "".join(line + "\n" for line in lines)
        return web.Response(
            text=text,
            content_type="text/plain",
            charset="utf-8",
            headers={"X-Content-Type-Options": "nosniff"},
        )
    return await _follow(request, path, lines, offset)


def _lines_param(request: web.Request) -> int:
    raw = request.query.get("lines", str(LOG_LINES_DEFAULT))
    if not (raw.isascii() and raw.isdigit() and 1 <= int(raw) <= LOG_LINES_MAX):
        raise OpenAIError(
            400,
            f"Query parameter `lines` must be an integer from 1 to {LOG_LINES_MAX}.",
            "invalid_request_error",
            param="lines",
            code="invalid_value",
        )
    return int(raw)


def last_lines(path: Path, count: int) -> tuple[list[str], int]:
    """The last `count` complete lines of `path` and the offset just after them, reading
    backwards from the end so that a large log costs no more than its tail."""
    try:
        with path.open("rb") as fh:
            end = fh.seek(0, os.SEEK_END)
            data = b""
            pos = end
            while pos > 0 and data.count(b"\n") <= count and end - pos < LOG_TAIL_MAX_BYTES:
                step = min(64 * 1024, pos)
                pos -= step
                fh.seek(pos)
                data = fh.read(step) + data
    except OSError:
        return [], 0
    complete = data[: data.rfind(b"\n") + 1]  # a line still being written waits for its end
    lines = complete.decode("utf-8", "replace").splitlines()
    if pos > 0 and lines:
        lines = lines[1:]  # the first one read may be cut
    return lines[-count:], end - (len(data) - len(complete))


async def _follow(
    request: web.Request, path: Path, lines: list[str], offset: int
) -> web.StreamResponse:
    response = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
        }
    )
    await response.prepare(request)
    stopping = request.app[_STOPPING]
    inode = _identity(path)[0]
    pending = b""
    idle = 0.0
    with contextlib.suppress(ConnectionResetError):
        await _send_lines(response, lines)
        while not stopping.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stopping.wait(), FOLLOW_POLL_SECONDS)
            now_inode, size = _identity(path)
            if now_inode != inode or size < offset:
                inode, offset, pending = now_inode, 0, b""  # rotated or truncated: start over
            chunk = await asyncio.to_thread(_read_from, path, offset)
            offset += len(chunk)
            pending += chunk
            complete, newline, pending = pending.rpartition(b"\n")
            if newline:
                await _send_lines(response, complete.decode("utf-8", "replace").split("\n"))
                idle = 0.0
            elif (idle := idle + FOLLOW_POLL_SECONDS) >= FOLLOW_KEEPALIVE_SECONDS:
                await response.write(b": keep-alive\n\n")
                idle = 0.0
    return response


async def _send_lines(response: web.StreamResponse, lines: list[str]) -> None:
    if lines:
        # SSE ends a field at CR as well as LF: a CR inside a line would split it.
        await response.write(
            "".join(f"data: {line.replace(chr(13), '')}\n\n" for line in lines).encode()
        )


def _identity(path: Path) -> tuple[int | None, int]:
    """(inode, size); a new inode means the file was rotated, None that it is gone."""
    try:
        st = path.stat()
    except OSError:
        return None, 0
    return st.st_ino, st.st_size


def _read_from(path: Path, offset: int) -> bytes:
    try:
        with path.open("rb") as fh:
            fh.seek(offset)
            return fh.read(LOG_TAIL_MAX_BYTES)
    except OSError:
        return b""
