"""`python -m bench`: start everything on 127.0.0.1, run the scenarios, write the results."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

from bench import autoscale
from bench import procs as P
from bench.profile import profile_kvsleep
from bench.report import acceptance, data_path_cost, render
from bench.scenarios import BARE_PROXY, Plan, say, scale_variant, wake_scenario, wrk_scenario
from bench.targets import (
    Target,
    find_peer,
    kvsleep_config,
    start_bare_proxy,
    start_kvsleep,
    start_litellm,
    start_sim,
    start_vllm_router,
)
from bench.wrk import wrk_path

SCENARIOS = ("nonstream", "stream", "wake", "scale")
RESULTS = Path(__file__).resolve().parent / "results"
FAST_MODEL = "bench/fast"
WAKE_MODEL = "bench/wake"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run in under a minute (1 s runs, 2 rounds, 1 wake round)",
    )
    p.add_argument(
        "--scenarios",
        default=",".join(SCENARIOS),
        help=f"comma-separated subset of {','.join(SCENARIOS)}",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=RESULTS,
        help="directory for latest.json / latest.md (default bench/results)",
    )
    p.add_argument("--rounds", type=int, help="override the number of interleaved rounds")
    p.add_argument("--seconds", type=float, help="override the seconds of each wrk run")
    p.add_argument(
        "--profile",
        action="store_true",
        help="also sample kvsleep with py-spy (non-streaming c=16, streams c=64)",
    )
    p.add_argument("--no-peers", action="store_true", help="skip vllm-router and litellm")
    p.add_argument(
        "--vllm-router",
        help="vllm-router executable (default $BENCH_VLLM_ROUTER or vllm-router on PATH)",
    )
    p.add_argument(
        "--litellm", help="litellm executable (default $BENCH_LITELLM or litellm on PATH)"
    )
    p.add_argument(
        "--autoscale",
        action="store_true",
        help="instead: the autoscaling step (warm vs cold vs always-on; bench/autoscale.py, "
        "see python -m bench --autoscale --help)",
    )
    return p


def _peers(
    args: argparse.Namespace, procs: P.Processes, sim: Target, workdir: Path, meta: dict[str, Any]
) -> tuple[list[Target], dict[str, str]]:
    started: list[Target] = []
    skipped: dict[str, str] = {}
    for name, flag, env, start in (
        (
            "vllm-router",
            args.vllm_router,
            "BENCH_VLLM_ROUTER",
            lambda prog: start_vllm_router(procs, prog, sim.url),
        ),
        (
            "litellm",
            args.litellm,
            "BENCH_LITELLM",
            lambda prog: start_litellm(procs, prog, FAST_MODEL, sim.url, workdir),
        ),
    ):
        program = None if args.no_peers else find_peer(flag, env, name)
        if program is None:
            why = "--no-peers" if args.no_peers else f"not installed ({name} not on PATH)"
            skipped[name] = why
            meta["targets"][name] = {"available": False, "note": f"skipped: {why}"}
            say(f"{name}: skipped, {why}")
            continue
        try:
            target = start(program)
        except P.StartError as exc:
            skipped[name] = f"failed to start: {str(exc).splitlines()[0]}"
            meta["targets"][name] = {"available": False, "note": skipped[name]}
            say(f"{name}: {exc}")
            continue
        meta["targets"][name] = {
            "available": True,
            "program": program,
            "note": f"{program}, one route to the sim",
        }
        started.append(target)
    return started, skipped


async def run(
    args: argparse.Namespace, procs: P.Processes, workdir: Path, out_dir: Path
) -> dict[str, Any]:
    plan = Plan.quick_plan() if args.quick else Plan.full()
    if args.rounds:
        plan = _replace(plan, rounds=args.rounds)
    if args.seconds:
        plan = _replace(plan, seconds=args.seconds, stream_seconds=args.seconds)
    wanted = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = set(wanted) - set(SCENARIOS)
    if unknown:
        raise SystemExit(f"unknown scenarios: {', '.join(sorted(unknown))}")
    started = time.time()
    meta: dict[str, Any] = {
        "mode": "quick" if plan.quick else "full",
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(started)),
        "cpus": os.cpu_count(),
        "loadavg_start": P.loadavg(),
        "python": sys.version.split()[0],
        "rounds": plan.rounds,
        "seconds_per_run": plan.seconds,
        "stream_seconds_per_run": plan.stream_seconds,
        "scenarios": wanted,
        "targets": {},
        "logs": str(procs.log_dir),
        "notes": [],
    }
    results: dict[str, Any] = {"meta": meta, "scenarios": {}}
    scenarios = results["scenarios"]

    say("starting sim engines and kvsleep")
    fast = start_sim(procs, "sim-fast", FAST_MODEL, tokens_per_second=0)
    wake_sim = start_sim(
        procs, "sim-wake", WAKE_MODEL, tokens_per_second=0, wake_latency=plan.wake_latency
    )
    port = P.free_port()
    config = workdir / "kvsleep.json"
    kvsleep_config(
        config,
        port,
        [
            {"name": FAST_MODEL, "engine": "vllm", "url": fast.url},
            {"name": WAKE_MODEL, "engine": "vllm", "url": wake_sim.url},
        ],
        workdir / "kvsleep",
    )
    kv, _ = start_kvsleep(procs, "kvsleep", config, port)
    direct = Target("direct", fast.url, fast.child)
    meta["targets"]["direct"] = {
        "available": True,
        "note": "kvsleep sim-engine (vLLM flavor), tokens-per-second 0",
    }
    meta["targets"]["kvsleep"] = {"available": True, "note": "kvsleep serve, one process"}
    bare = start_bare_proxy(procs, fast.url)
    meta["targets"]["aiohttp-proxy"] = {
        "available": True,
        "note": "bench/bareproxy.py, a bare aiohttp streaming proxy (the floor)",
    }
    peers, skipped = _peers(args, procs, fast, workdir, meta)
    targets = [direct, kv, bare, *peers]

    if "nonstream" in wanted:
        scenarios["nonstream"] = await wrk_scenario(
            targets, skipped, plan, model=FAST_MODEL, stream=False, engine=fast.child
        )
    if args.profile:
        results["profile"] = await profile_kvsleep(kv, FAST_MODEL, plan, out_dir)
    if "stream" in wanted:
        scenarios["stream"] = await wrk_scenario(
            targets, skipped, plan, model=FAST_MODEL, stream=True, engine=fast.child
        )
    if args.profile:
        results["profile_stream"] = await profile_kvsleep(
            kv, FAST_MODEL, plan, out_dir, concurrency=64, stream=True
        )
    if "wake" in wanted:
        scenarios["wake"] = await wake_scenario(kv, wake_sim, WAKE_MODEL, plan)
    for target in (*peers, bare, kv, wake_sim, fast):
        if target.child is not None:
            procs.stop(target.child)

    if "scale" in wanted:
        scale: dict[str, Any] = {
            "note": (
                "engines up: one process (bench/multisim.py) serves one simulated vLLM "
                "engine on 1,000 loopback ports, so every model's probe really succeeds; "
                "engines down: 1,000 closed ports (probes fail fast with ECONNREFUSED). "
                "Auto-sleep off; /metrics and reconcile measured while the 1 s reconcile "
                "loop runs."
            ),
        }
        scale["engines_up"] = await scale_variant(procs, workdir, plan, engines_up=True)
        if plan.scale_engines_down:
            scale["engines_down"] = await scale_variant(procs, workdir, plan, engines_up=False)
        scenarios["scale"] = scale

    meta["loadavg_end"] = P.loadavg()
    meta["elapsed_s"] = round(time.time() - started, 1)
    if (meta["loadavg_start"] or [0])[0] > 0.5 * (os.cpu_count() or 1):
        meta["notes"].append(
            f"load average {meta['loadavg_start'][0]} at start on "
            f"{os.cpu_count()} CPUs: other work shared the machine; treat the "
            "numbers as noisy."
        )
    results["data_path_cost"] = cost = data_path_cost(results)
    for point in cost["points"]:
        say(
            f"CPU µs/2xx {point['scenario']} {point['point']}: kvsleep "
            f"{point['kvsleep_cpu_us_per_2xx']}, {BARE_PROXY} {point['bare_proxy_cpu_us_per_2xx']}"
            f", ratio {point['ratio']}"
            + ("" if point["judged"] else " (not judged: runs too short)")
        )
    if cost["worst"] is not None:
        worst = cost["worst"]
        say(
            f"data path cost: worst kvsleep / {BARE_PROXY} CPU ratio {worst['ratio']} "
            f"({worst['scenario']} {worst['point']}), limit {cost['limit']:g}: "
            + ("PASS" if cost["pass"] else "FAIL")
        )
    results["acceptance"] = acceptance(results)
    return results


def _replace(plan: Plan, **changes: Any) -> Plan:
    import dataclasses

    return dataclasses.replace(plan, **changes)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--autoscale" in argv:  # its own flags and results (autoscale.json/.md); no wrk
        return autoscale.main(argv)
    args = build_parser().parse_args(argv)
    if wrk_path() is None:
        print("bench: wrk is not installed (apt-get install wrk)", file=sys.stderr)
        return 2
    out_dir: Path = args.out
    done = P.run_children(
        "kvsleep-bench",
        lambda procs, workdir: run(args, procs, workdir, out_dir),
        out_dir,
        "latest",
        render,
    )
    if done is None:
        return 1
    results, logs = done
    say(
        f"wrote {out_dir / 'latest.json'} and {out_dir / 'latest.md'} "
        f"({results['meta']['elapsed_s']:.0f} s; logs in {logs})"
    )
    return 0
