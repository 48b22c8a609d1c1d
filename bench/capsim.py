"""`kvsleep sim-engine` with a batch limit: at most `--max-num-seqs` requests generate at once.

kvsleep's simulated engine generates every request at its own pace however many there are, so an
engine given three replicas' worth of load answers as fast as with one: a step up would show in
no latency. A real engine batches at most `max_num_seqs` sequences (vLLM's flag) and queues the
rest, so its latency grows with the load beyond that. This module adds that one rule to the sim
(the queued requests show in `vllm:num_requests_waiting`, as vLLM's do) and changes nothing else:
same flags, same routes, same hazard counters, same log line with the port it picked.

    python -m bench.capsim --max-num-seqs 8 --flavor vllm --model M --port 0 ...
"""

from __future__ import annotations

import argparse
import functools
import sys

from kvsleep.sim import engine
from kvsleep.sim.engine import SimEngine, SimSettings, _Request


class BatchLimitedSim(SimEngine):
    """A SimEngine that admits a request only while fewer than `max_num_seqs` are generating."""

    def __init__(self, settings: SimSettings, max_num_seqs: int, **kwargs: object) -> None:
        super().__init__(settings, **kwargs)  # type: ignore[arg-type]
        admit = self.behaviour.admit

        async def admit_within_batch(request: _Request) -> None:
            await admit(request)
            # `in_flight` counts admitted requests; the caller marks this one admitted right
            # after this returns, with no await between, so the limit holds for every waiter.
            await self.wait_until(lambda: request.aborted or self.in_flight < max_num_seqs)

        self.behaviour.admit = admit_within_batch  # type: ignore[method-assign]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.capsim", description=__doc__)
    parser.add_argument(
        "--max-num-seqs", type=int, required=True, help="requests generating at once"
    )
    engine.add_sim_arguments(parser)
    args = parser.parse_args(argv)
    if args.max_num_seqs < 1:
        parser.error("--max-num-seqs must be at least 1")
    # run_sim builds its engine from the module's SimEngine: give it the batch-limited one.
    engine.SimEngine = functools.partial(  # type: ignore[misc]
        BatchLimitedSim, max_num_seqs=args.max_num_seqs
    )
    return engine.main_sim(engine.settings_from_args(args))


if __name__ == "__main__":
    sys.exit(main())
