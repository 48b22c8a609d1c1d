"""The floor for any aiohttp-based router: a bare reverse proxy to one upstream.

`python -m bench.bareproxy --upstream URL [--port 0]`: forwards every request's method, path,
query, headers (less the hop-by-hop ones) and body to the upstream through one
`ClientSession` (`TCPConnector(limit=0)`, as kvsleep's router), and streams the answer back
chunk by chunk as it arrives (a small answer of known length, as kvsleep does, in one write).
No routing, no body parsing, no metrics, no middleware: what is left is the cost of aiohttp
itself (server, client, event loop), which kvsleep cannot go below. It runs on the same event
loop as `kvsleep serve` (uvloop where installed, through `kvsleep.eventloop`) with the same
listen backlog and no access log, so the two compare fairly.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import socket

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from kvsleep.eventloop import run_event_loop

# RFC 9110 7.6.1 hop-by-hop headers, plus the ones the HTTP libraries write themselves.
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
    }
)
_NOT_RELAYED = _HOP_BY_HOP | {"content-length", "date", "server"}
BACKLOG = 1024  # kvsleep's default `router.listen_backlog`
_WHOLE_BODY_MAX = 1024 * 1024  # larger answers are streamed even when their length is known


class BareProxy:
    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.session: aiohttp.ClientSession | None = None

    async def start(self, app: web.Application) -> None:
        # auto_decompress off: the body is relayed byte for byte, Content-Encoding intact.
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0),
            auto_decompress=False,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=600),
        )

    async def stop(self, app: web.Application) -> None:
        if self.session is not None:
            await self.session.close()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        assert self.session is not None
        headers = CIMultiDict(
            (k, v) for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP
        )
        body = await request.read() if request.body_exists else None
        try:
            upstream = await self.session.request(
                request.method,
                self.upstream + request.rel_url.raw_path_qs,
                headers=headers,
                data=body,
            )
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            return web.Response(status=502, text=f"upstream unreachable: {exc}\n")
        try:
            headers = CIMultiDict(
                (k, v) for k, v in upstream.headers.items() if k.lower() not in _NOT_RELAYED
            )
            length = upstream.content_length
            if (
                length is not None
                and length <= _WHOLE_BODY_MAX
                and request.method != "HEAD"  # its Content-Length describes a body not sent
                and upstream.content_type != "text/event-stream"
            ):
                # A small answer of known length leaves in one write with its head, as
                # kvsleep's router sends it: a StreamResponse sends its head at once, which
                # would cost this floor a second send per answer that a router need not pay.
                try:
                    payload = await upstream.read()
                except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                    return web.Response(status=502, text=f"upstream failed mid-answer: {exc}\n")
                return web.Response(
                    body=payload, status=upstream.status, reason=upstream.reason, headers=headers
                )
            response = web.StreamResponse(
                status=upstream.status, reason=upstream.reason, headers=headers
            )
            # A known length is kept (no chunked framing added); otherwise aiohttp chunks.
            if length is not None:
                response.content_length = length
            await response.prepare(request)
            try:
                async for chunk in upstream.content.iter_any():
                    await response.write(chunk)
                await response.write_eof()
            except (aiohttp.ClientError, asyncio.TimeoutError, ConnectionResetError):
                # Upstream failed mid-answer or the client left: the status line is gone, so
                # the only honest signal is an unfinished answer on a closed connection.
                upstream.close()
                if request.transport is not None:
                    request.transport.close()
            return response
        finally:
            upstream.release()


def build_app(upstream: str) -> web.Application:
    proxy = BareProxy(upstream)
    app = web.Application(client_max_size=16 * 1024 * 1024)  # kvsleep's default body limit
    app.on_startup.append(proxy.start)
    app.on_cleanup.append(proxy.stop)
    app.router.add_route("*", "/{tail:.*}", proxy.handle)
    return app


async def serve(upstream: str, host: str, port: int) -> None:
    runner = web.AppRunner(build_app(upstream), handler_cancellation=True, access_log=None)
    await runner.setup()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    site = web.SockSite(runner, sock, backlog=BACKLOG)
    await site.start()
    # The harness reads the port it picked from this line.
    logging.getLogger("bench.bareproxy").warning(
        "bare proxy on http://%s:%d -> %s", host, sock.getsockname()[1], upstream
    )
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.bareproxy", description=__doc__)
    p.add_argument("--upstream", required=True, help="base URL of the engine, e.g. http://h:p")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0: pick a free port (logged)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    run_event_loop(serve(args.upstream, args.host, args.port))


if __name__ == "__main__":
    main()
