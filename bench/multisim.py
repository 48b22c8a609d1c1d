"""One simulated vLLM engine listening on many loopback ports (the scale scenario's engines).

kvsleep refuses two models on the same host:port, and a thousand sim processes would not fit on
a 2-core machine, so one process serves one `SimEngine` on N ports: every port answers the
probes (`/is_sleeping`, `/health`) like a separate, awake engine would. Nothing in the scale
scenario sleeps or wakes a model, so the shared sleep state is never observed.

    python -m bench.multisim --count 1000 --ports-file PORTS.json

writes the list of ports to PORTS.json once every port listens, then serves until SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
from pathlib import Path

from aiohttp import web

from kvsleep.sim.engine import SimEngine, SimSettings, build_app


async def serve(count: int, ports_file: Path, host: str) -> None:
    sim = SimEngine(SimSettings(flavor="vllm", model="bench/scale", tokens_per_second=0))
    runner = web.AppRunner(build_app(sim), access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    try:
        for _ in range(count):
            await web.TCPSite(runner, host, 0, backlog=1024).start()
        ports = [addr[1] for addr in runner.addresses]
        tmp = ports_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(ports))
        os.replace(tmp, ports_file)
        logging.info("multisim: %d ports listening", len(ports))
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await stop.wait()
    finally:
        await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.multisim")
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--ports-file", type=Path, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    asyncio.run(serve(args.count, args.ports_file, args.host))


if __name__ == "__main__":
    main()
