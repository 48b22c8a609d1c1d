"""Client connections: what one client can cost is bounded.

aiohttp reads a request head or body as slowly as a client sends it and keeps an idle
connection for an hour, so one client holding a thousand sockets (slowloris) would starve every
other client of file descriptors. Every accepted connection therefore gets a guard that knows
which phase it is in:

- idle (fresh, or between requests): closed after `idle_timeout_seconds`;
- reading a request head: closed after `header_timeout_seconds` from its first byte, with a 408;
- inside a request, from the end of its head until its answer is written: no timer here. The
  body has its own deadline (`read_body`, proportional to its size) and a held request or a
  long generation is never cut.

At `max_client_connections` a new connection evicts the one that has been idle, or stuck in its
head, the longest (as nginx reuses keep-alive connections); only when every connection is inside
a request is the newcomer refused. Each connection kvsleep closes is counted in
`kvsleep_client_connections_closed_total{reason}` and logged at most once a minute per reason.
"""

from __future__ import annotations

import asyncio
import enum
import json
import logging
import re
import resource
import socket
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web
from prometheus_client import Counter

from kvsleep.config import RouterConfig

log = logging.getLogger(__name__)

# File descriptors kept for everything but client sockets: engines' connections are counted
# per client (one upstream socket per proxied request), this is for logs, state and probes.
FD_RESERVE = 64
MAX_LINE = 8190  # aiohttp's own limit for a request line
SWEEP_SECONDS = 0.5  # how often timeouts are checked: their resolution
_HTTP09 = re.compile(rb"[A-Z]+ /[!-~]*")  # a request line without an HTTP version
LOG_EVERY_SECONDS = 60.0


class Phase(enum.Enum):
    IDLE = "idle"
    HEAD = "head"
    REQUEST = "request"


def raise_file_limit() -> int:
    """Raise the soft file limit to the hard one (what a shell's default leaves unused) and
    return it: every client costs a socket, and usually a second one towards its engine."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if wanted > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-file limit from %d: %s", soft, exc)
    return soft


def connection_limit(configured: int, file_limit: int) -> int:
    """`max_client_connections`, or (0 = auto) what the file limit allows: half of it less a
    reserve, since each client may also hold a socket to its engine."""
    auto = max(16, (file_limit - FD_RESERVE) // 2)
    return min(configured, auto) if configured else auto


class ConnectionPool:
    """Every open client connection and its phase.

    The data path pays no timer per request: a phase change notes the time and moves the
    connection to the end of its phase's queue (oldest first), and one sweep every
    SWEEP_SECONDS closes those past their phase's timeout from the front of each queue."""

    def __init__(
        self,
        config: Callable[[], RouterConfig],
        closed: Counter,
        open_gauge: Callable[[int], None],
        max_connections: int,
    ) -> None:
        self._config = config
        self._closed = closed
        self._open_gauge = open_gauge
        self.max_connections = max_connections
        self._guards: dict[asyncio.BaseTransport, _Guard] = {}
        # The connections that may be closed or evicted, by phase, oldest first.
        self._waiting: dict[Phase, dict[_Guard, None]] = {Phase.IDLE: {}, Phase.HEAD: {}}
        self._sweeper: asyncio.TimerHandle | None = None
        self._last_log: dict[str, float] = {}

    def __len__(self) -> int:
        return len(self._guards)

    def protocol(self, make_inner: Callable[[], asyncio.Protocol]) -> asyncio.Protocol:
        return _Guard(self, make_inner())

    def find(self, transport: asyncio.BaseTransport | None) -> _Guard | None:
        return None if transport is None else self._guards.get(transport)

    # ---- called by guards and by the server's middleware ----------------------------------

    def opened(self, guard: _Guard) -> bool:
        """Admit a new connection, evicting the longest-waiting one at the limit."""
        assert guard.transport is not None
        if len(self._guards) >= self.max_connections:
            victim = self._longest_waiting()
            if victim is None:
                self._shed(guard, "limit", "every connection is inside a request")
                return False
            self._shed(victim, "limit", "evicted the longest-waiting connection for a new one")
        self._guards[guard.transport] = guard
        self._open_gauge(len(self._guards))
        self.enter(guard, Phase.IDLE)
        return True

    def enter(self, guard: _Guard, phase: Phase) -> None:
        if phase is Phase.REQUEST is guard.phase:
            return  # the head's end was seen: the server's wrapper finds it already inside
        waiting = self._waiting.get(guard.phase)
        if waiting is not None:
            waiting.pop(guard, None)
        guard.phase = phase
        queue = self._waiting.get(phase)
        if queue is None or guard.transport not in self._guards:
            return
        guard.since = time.monotonic()
        queue[guard] = None
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().call_later(SWEEP_SECONDS, self._sweep)

    def closed(self, guard: _Guard) -> None:
        waiting = self._waiting.get(guard.phase)
        if waiting is not None:
            waiting.pop(guard, None)
        if guard.transport is not None and self._guards.pop(guard.transport, None) is not None:
            self._open_gauge(len(self._guards))

    def count(self, reason: str, detail: str) -> None:
        """Count (and now and then log) a connection kvsleep closes for `reason`."""
        self._closed.labels(reason).inc()
        now = time.monotonic()
        if now - self._last_log.get(reason, -LOG_EVERY_SECONDS) >= LOG_EVERY_SECONDS:
            self._last_log[reason] = now
            log.warning(
                "closing client connections (%s): %s; "
                "kvsleep_client_connections_closed_total counts them",
                reason,
                detail,
            )

    # ---- internals ------------------------------------------------------------------------

    def _longest_waiting(self) -> _Guard | None:
        fronts = [next(iter(queue)) for queue in self._waiting.values() if queue]
        return min(fronts, key=lambda guard: guard.since, default=None)

    def _sweep(self) -> None:
        cfg = self._config()
        now = time.monotonic()
        for phase, timeout, reason, detail in (
            (
                Phase.IDLE,
                cfg.idle_timeout_seconds,
                "idle_timeout",
                f"idle for {cfg.idle_timeout_seconds:g}s",
            ),
            (
                Phase.HEAD,
                cfg.header_timeout_seconds,
                "header_timeout",
                f"no complete request head within {cfg.header_timeout_seconds:g}s",
            ),
        ):
            queue = self._waiting[phase]
            while queue:
                guard = next(iter(queue))
                if now - guard.since < timeout:
                    break
                self._shed(guard, reason, detail)
        self._sweeper = None
        if any(self._waiting.values()):
            self._sweeper = asyncio.get_running_loop().call_later(SWEEP_SECONDS, self._sweep)

    def _shed(self, guard: _Guard, reason: str, detail: str) -> None:
        self.count(reason, detail)
        transport = guard.transport
        self.closed(guard)
        if transport is None or transport.is_closing():
            return
        if guard.phase is Phase.HEAD and isinstance(transport, asyncio.WriteTransport):
            transport.write(
                error_response(
                    408,
                    "Request Timeout",
                    "The request head was not received in time.",
                    "header_timeout",
                )
            )
        transport.close()


class _Guard(asyncio.Protocol):
    """Wraps aiohttp's protocol for one connection and tells the pool its phase."""

    def __init__(self, pool: ConnectionPool, inner: asyncio.Protocol) -> None:
        self.pool = pool
        self.inner = inner
        self.transport: asyncio.BaseTransport | None = None
        self.phase = Phase.IDLE
        self.since = 0.0  # when it entered its phase (time.monotonic)
        self._tail = b""
        self._line: bytes | None = b""  # the start of the request line, until it is checked

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.inner.connection_made(transport)
        self.pool.opened(self)

    def data_received(self, data: bytes) -> None:
        if self.phase is not Phase.REQUEST:
            if self.phase is Phase.IDLE:
                self._line = b""
            if self._line is not None and not self._request_line_ok(data):
                return
            # A head ends with an empty line; aiohttp's parser takes bare LF too. The end may
            # straddle two reads: the tail of the last one is searched with the start of this.
            edge = self._tail + data[:2]
            if b"\n\r\n" in data or b"\n\n" in data or b"\n\r\n" in edge or b"\n\n" in edge:
                self._tail = b""
                self.pool.enter(self, Phase.REQUEST)
            else:
                self._tail = (self._tail + data[-2:])[-2:]
                if self.phase is Phase.IDLE:
                    self.pool.enter(self, Phase.HEAD)
        self.inner.data_received(data)

    def _request_line_ok(self, data: bytes) -> bool:
        """Refuse a request line without an HTTP version (HTTP/0.9, which aiohttp would leave
        unanswered or answer in a made-up "HTTP/0.9" status line) with a 505."""
        assert self._line is not None
        if self._line:  # the line began in an earlier read
            data = self._line + data[:MAX_LINE]
        end = data.find(b"\n", 0, MAX_LINE)
        if end < 0:
            self._line = data[:MAX_LINE]
            return True
        self._line = None
        if data[end - 1 : end] == b"\r":
            end -= 1
        if data[end - 9 : end - 1] == b" HTTP/1." or not _HTTP09.fullmatch(data, 0, end):
            return True  # HTTP/1.x, or garbage that aiohttp answers with a 400
        if isinstance(self.transport, asyncio.WriteTransport):
            self.transport.write(
                error_response(
                    505,
                    "HTTP Version Not Supported",
                    "kvsleep speaks HTTP/1.0 and HTTP/1.1; the request line has no HTTP version.",
                    "http_version_not_supported",
                )
            )
        self.pool.closed(self)
        if self.transport is not None:
            self.transport.close()
        return False

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self.pool.closed(self)
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()


def error_response(status: int, reason: str, message: str, code: str) -> bytes:
    """An answer for a connection aiohttp never turned into a request, so that no handler can
    answer: in the OpenAI error shape, like every other error."""
    body = json.dumps(
        {
            "error": {
                "message": message,
                "type": "invalid_request_error",
                "param": None,
                "code": code,
            }
        }
    ).encode()
    return (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
        f"Connection: close\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body


class OpenAIErrorsHandler(web.RequestHandler):
    """aiohttp's protocol, answering requests it cannot parse in the OpenAI error shape (its
    own answer is plain text) so that every client sees one error format."""

    __slots__ = ()

    def handle_error(
        self,
        request: Any,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        super().handle_error(request, status, exc, message)  # logs; raises if output started
        kind = "invalid_request_error" if status < 500 else "server_error"
        text = message or (str(exc) if exc else "") or "The request could not be handled."
        response = web.json_response(
            {"error": {"message": text, "type": kind, "param": None, "code": status}}, status=status
        )
        response.force_close()
        return response


class GuardedSite(web.BaseSite):
    """A TCP listener whose connections go through a ConnectionPool. It starts from a socket
    bound beforehand, so that the port is ours before anything else starts."""

    def __init__(
        self,
        runner: web.BaseRunner,
        sock: socket.socket,
        pool: ConnectionPool,
        handler_args: dict[str, Any],
        backlog: int = 128,
    ) -> None:
        super().__init__(runner, backlog=backlog)
        self._sock = sock
        self._pool = pool
        self._handler_args = handler_args

    @property
    def name(self) -> str:
        host, port = self._sock.getsockname()[:2]
        return f"http://{host}:{port}"

    async def start(self) -> None:
        await super().start()
        loop = asyncio.get_running_loop()
        server = self._runner.server
        assert server is not None

        def make() -> asyncio.Protocol:
            return OpenAIErrorsHandler(server, loop=loop, **self._handler_args)

        self._server = await loop.create_server(
            lambda: self._pool.protocol(make), sock=self._sock, backlog=self._backlog
        )


def bind(host: str, port: int) -> socket.socket:
    """Bind the listener's socket (SO_REUSEADDR, as aiohttp does); OSError when taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    info = socket.getaddrinfo(host, port, family, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)
    sock = socket.socket(info[0][0], socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(info[0][4])
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock
