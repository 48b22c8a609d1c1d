"""`python -m bench --autoscale`: a load step from one replica's worth to three, on real processes.

Three simulated replicas of one model behind `kvsleep serve`, a closed-loop load that steps from
`low` to `high` clients, and three ways to meet it:

- **always-on**: the three replicas awake from the start (`min_awake: 3`), the floor;
- **warm**: kvsleep's scaler wakes the asleep replicas (`min_awake: 1`), a wake each;
- **cold**: the extra replicas are not running at the step; a pod autoscaler starts both after
  the same reaction time kvsleep's scaler has, and each engine pays process start plus
  `cold_start_seconds` of answering 503 before it serves (a real one: CUDA init, weight load,
  graph capture). kvsleep only routes (it routes to a replica once its probe finds it up).

Engines are `bench/capsim.py` (kvsleep's sim with a batch limit), so one replica given three
replicas' worth of clients queues them and its latency triples, as a real engine's would.
Timing comes from the engines' own event logs (`/sim/stats`, on the same monotonic clock as this
process): when `/wake_up` reached an engine and when its first request after the step did.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import socket
import sys
import time
import urllib.parse
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from bench import procs as P
from bench.scenarios import JSON_HEADERS, chat_body, say
from bench.stats import pct, rnd
from bench.targets import kvsleep_config, start_kvsleep

MODEL = "bench/chat"
VARIANTS = ("always-on", "warm", "cold")
RESULTS = Path(__file__).resolve().parent / "results"
REPLICAS = 3
POLL_SECONDS = 0.25  # engines' /sim/stats
SCRAPE_SECONDS = 1.0  # kvsleep's /metrics


@dataclass(frozen=True)
class StepPlan:
    """Sizes and clocks of the step; `--quick` shrinks the times, never the structure."""

    quick: bool = False
    low_clients: int = 8  # one replica's worth: target_in_flight and the batch limit
    high_clients: int = 24  # three replicas' worth
    max_num_seqs: int = 8
    target_in_flight: int = 8
    max_tokens: int = 16
    tokens_per_second: float = 32.0  # 16 tokens: 0.5 s per request when not queued
    before_seconds: float = 8.0
    after_seconds: float = 8.0
    wake_seconds: float = 2.0
    cold_start_seconds: float = 30.0
    check_interval_seconds: float = 1.0
    scale_up_after_seconds: float = 1.0
    scale_down_after_seconds: float = 10.0
    trend_window_seconds: float = 0.0
    serve_timeout_seconds: float = 120.0
    scale_down: bool = True

    @classmethod
    def quick_plan(cls) -> StepPlan:
        return cls(
            quick=True,
            before_seconds=2.0,
            after_seconds=2.0,
            wake_seconds=0.5,
            cold_start_seconds=4.0,
            scale_down_after_seconds=3.0,
            serve_timeout_seconds=60.0,
        )

    @property
    def reaction_seconds(self) -> float:
        """What the cold variant's pod autoscaler waits before it starts pods: the same as
        kvsleep's scaler (above target this long, seen at its next pass)."""
        return self.scale_up_after_seconds + self.check_interval_seconds


# ---- load --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    started: float  # monotonic
    seconds: float
    status: int  # 0: no answer (connection error, timeout, cut body)


class ClosedLoop:
    """`wanted` clients, each sending its next request as soon as its last one is answered.

    Closed loop on purpose: an open loop at three replicas' rate against one replica for a cold
    start's 30 s would queue more than a 2-core machine can carry, and a real client population
    also slows down when answers do.
    """

    def __init__(self, session: aiohttp.ClientSession, url: str, body: str) -> None:
        self.session = session
        self.url = url
        self.body = body
        self.wanted = 0
        self.samples: list[Sample] = []
        self._tasks: dict[int, asyncio.Task[None]] = {}

    def set(self, clients: int) -> None:
        """Clients above `clients` stop after their current request; missing ones start."""
        self.wanted = clients
        for i in range(clients):
            task = self._tasks.get(i)
            if task is None or task.done():
                self._tasks[i] = asyncio.create_task(self._client(i))

    async def stop(self) -> None:
        self.wanted = 0
        await asyncio.gather(*self._tasks.values())

    async def _client(self, index: int) -> None:
        while index < self.wanted:
            started = time.monotonic()
            status = 0
            with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
                async with self.session.post(
                    self.url, data=self.body, headers=JSON_HEADERS
                ) as resp:
                    body = await resp.read()
                    status = resp.status if body else 0
            self.samples.append(Sample(started, time.monotonic() - started, status))
            if status == 0:
                await asyncio.sleep(0.05)  # an engine gone would otherwise spin this loop

    def window(self, start: float, end: float) -> dict[str, Any]:
        """Requests sent in [start, end): count, non-2xx, p50/p99 latency in ms; and the 2xx
        answers that arrived in it (throughput)."""
        picked = [s for s in self.samples if start <= s.started < end]
        ok = [s.seconds * 1000 for s in picked if 200 <= s.status < 300]
        answered = [s for s in self.samples if start <= s.started + s.seconds < end]
        return {
            "seconds": rnd(end - start, 3),
            "requests": len(picked),
            "answers": sum(1 for s in answered if 200 <= s.status < 300),
            "errors": len(picked) - len(ok),
            "p50_ms": rnd(pct(ok, 50), 1),
            "p99_ms": rnd(pct(ok, 99), 1),
        }


# ---- watching the engines and kvsleep ------------------------------------------------------


class Engine:
    """One replica's engine process (it may not be running yet) and what its log showed."""

    def __init__(self, replica: int, port: int) -> None:
        self.replica = replica
        self.port = port
        self.url = f"http://{P.HOST}:{port}"
        self.child: P.Child | None = None
        self.ready_at: float | None = None  # cold: /health first answered 200
        self.joined_at: float | None = None  # cold: added to kvsleep's config (reload)
        self.stats: dict[str, Any] = {}
        self.events: dict[tuple[float, str, str], dict[str, Any]] = {}

    def absorb(self, stats: dict[str, Any]) -> None:
        for event in stats.pop("log", []):
            key = (event["t"], event["event"], str(event.get("route")))
            self.events[key] = event
        self.stats = stats

    def first(self, event: str, after: float, route: str | None = None) -> float | None:
        times = [
            e["t"]
            for e in self.events.values()
            if e["event"] == event and e["t"] >= after and (route is None or e["route"] == route)
        ]
        return min(times) if times else None

    def times(self, event: str, route: str, after: float) -> list[float]:
        return sorted(
            e["t"]
            for e in self.events.values()
            if e["event"] == event and e.get("route") == route and e["t"] >= after
        )


async def watch_engines(
    session: aiohttp.ClientSession, engines: list[Engine], stop: asyncio.Event
) -> None:
    """Poll every engine's /sim/stats; its log holds the last 200 events, polled often enough
    that none is missed at this load (~16 requests/s per replica)."""

    async def poll(engine: Engine) -> None:
        with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError, ValueError):
            async with session.get(engine.url + "/sim/stats") as resp:
                if resp.status == 200:
                    engine.absorb(await resp.json())

    while not stop.is_set():
        await asyncio.gather(*(poll(e) for e in engines))
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), POLL_SECONDS)
    await asyncio.gather(*(poll(e) for e in engines))  # the final counters


def parse_metrics(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Samples by name (`_total`, `_count` ... kept in the name) of a /metrics text."""
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((sample.labels, sample.value))
    return out


def total(metrics: dict[str, list[tuple[dict[str, str], float]]], name: str, **match: str) -> float:
    return sum(
        value
        for labels, value in metrics.get(name, [])
        if all(labels.get(k) == v for k, v in match.items())
    )


class KvsleepWatch:
    """kvsleep's /metrics once a second: replicas awake and desired, demand, held requests."""

    def __init__(self, session: aiohttp.ClientSession, url: str) -> None:
        self.session = session
        self.url = url
        self.timeline: list[dict[str, Any]] = []
        self.last: dict[str, list[tuple[dict[str, str], float]]] = {}

    async def scrape(self) -> dict[str, list[tuple[dict[str, str], float]]]:
        async with self.session.get(
            self.url + "/metrics", headers={"Accept-Encoding": "identity"}
        ) as resp:
            self.last = parse_metrics(await resp.text())
        m = self.last
        self.timeline.append(
            {
                "t": time.monotonic(),
                "awake": total(m, "kvsleep_model_replicas", model=MODEL, state="awake"),
                "desired": total(m, "kvsleep_model_replicas_desired", model=MODEL),
                "demand": rnd(total(m, "kvsleep_model_replica_demand", model=MODEL), 2),
                "held": total(m, "kvsleep_held_requests", model=MODEL),
                "in_flight": {
                    labels["replica"]: value
                    for labels, value in m.get("kvsleep_replica_in_flight_requests", [])
                    if labels.get("model") == MODEL
                },
            }
        )
        return m

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
                await self.scrape()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), SCRAPE_SECONDS)

    def awake(self) -> float:
        return self.timeline[-1]["awake"] if self.timeline else 0.0


# ---- processes -----------------------------------------------------------------------------


def listen_port() -> int:
    """A free port below the kernel's ephemeral range, for an engine that listens only later
    (cold): a port from that range could meanwhile become some connection's local port."""
    low = 32768
    with contextlib.suppress(OSError, ValueError):
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for _ in range(100):
        port = random.randrange(max(1024, low - 12000), low)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((P.HOST, port))
            except OSError:
                continue
            return port
    return P.free_port()


def spawn_engine(
    procs: P.Processes, engine: Engine, plan: StepPlan, startup_seconds: float = 0.0
) -> None:
    """A batch-limited sim on the engine's port; returns at once (the caller waits, or not)."""
    engine.child = procs.spawn(
        f"replica-{engine.replica}",
        [
            P.PYTHON,
            "-m",
            "bench.capsim",
            "--max-num-seqs",
            str(plan.max_num_seqs),
            "--flavor",
            "vllm",
            "--model",
            MODEL,
            "--host",
            P.HOST,
            "--port",
            str(engine.port),
            "--tokens-per-second",
            f"{plan.tokens_per_second:g}",
            "--wake-latency",
            f"{plan.wake_seconds:g}",
            "--sleep-latency",
            "0.1",
            "--startup-seconds",
            f"{startup_seconds:g}",
        ],
    )


def scaling_block(plan: StepPlan, variant: str) -> dict[str, Any]:
    rules = {
        "min_awake": 1,
        "max_awake": REPLICAS,
        "target_in_flight": plan.target_in_flight,
        "scale_up_after_seconds": plan.scale_up_after_seconds,
        "scale_down_after_seconds": plan.scale_down_after_seconds,
        "trend_window_seconds": plan.trend_window_seconds,
    }
    if variant == "always-on":
        rules["min_awake"] = REPLICAS
    if variant == "cold":
        # The pod autoscaler owns the replica count (replicas join by reload, so max_awake
        # must not exceed the replicas configured at start); kvsleep sleeps none of them.
        del rules["max_awake"]
        rules["scale_down_after_seconds"] = 3600
    return rules


# ---- one variant -------------------------------------------------------------------------


async def run_variant(
    variant: str, plan: StepPlan, procs: P.Processes, workdir: Path
) -> dict[str, Any]:
    say(f"autoscale {variant}: starting 3 replicas' engines and kvsleep")
    engines = [Engine(r, listen_port()) for r in range(REPLICAS)]
    for engine in engines if variant != "cold" else engines[:1]:
        spawn_engine(procs, engine, plan)
    for engine in engines:
        if engine.child is not None:
            P.wait_http(engine.child, engine.url + "/health", 30)
    port = P.free_port()
    config = workdir / f"kvsleep-{variant}.json"
    write_config(config, port, engines if variant != "cold" else engines[:1], plan, variant)
    kv, _ = start_kvsleep(procs, f"kvsleep-{variant}", config, port)
    timeout = aiohttp.ClientTimeout(total=plan.serve_timeout_seconds + 60)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        watch = KvsleepWatch(session, kv.url)
        if variant == "warm":  # replica 0 serves, 1 and 2 asleep, as the scaler leaves them
            for engine in engines[1:]:
                quoted = urllib.parse.quote(f"{MODEL}@{engine.replica}", safe="")
                async with session.post(f"{kv.url}/models/{quoted}/sleep") as resp:
                    if resp.status != 200:
                        raise P.StartError(f"sleeping replica {engine.replica}: {resp.status}")
        await watch.scrape()
        expected_awake = REPLICAS if variant == "always-on" else 1
        if watch.awake() != expected_awake:
            raise P.StartError(f"{variant}: {watch.awake()} awake at start, not {expected_awake}")

        body = chat_body(MODEL, plan.max_tokens, stream=False)
        load = ClosedLoop(session, kv.url + "/v1/chat/completions", body)
        stop = asyncio.Event()
        watchers = [
            asyncio.create_task(watch_engines(session, engines, stop)),
            asyncio.create_task(watch.run(stop)),
        ]
        t0 = time.monotonic()
        load.set(plan.low_clients)
        await asyncio.sleep(plan.before_seconds)
        step = time.monotonic()
        load.set(plan.high_clients)
        say(f"autoscale {variant}: step {plan.low_clients} -> {plan.high_clients} clients")
        started_pods = None
        if variant == "cold":
            await asyncio.sleep(plan.reaction_seconds)
            started_pods = time.monotonic()
            for engine in engines[1:]:
                spawn_engine(procs, engine, plan, startup_seconds=plan.cold_start_seconds)
            pods = asyncio.create_task(
                _add_when_ready(session, kv.url, config, port, engines, plan, step)
            )
        serving = await _until_all_serve(engines, step, plan)
        if variant == "cold":
            await pods
        served = [t for t in serving if t is not None]
        all_serve = max(served) if len(served) == len(serving) else time.monotonic()
        say(
            f"autoscale {variant}: replicas serve "
            + ", ".join("-" if s is None else f"{s - step:.2f}s" for s in serving)
            + " after the step"
        )
        await asyncio.sleep(plan.after_seconds)
        after_end = time.monotonic()
        scale_down = None
        if variant == "warm" and plan.scale_down:
            load.set(plan.low_clients)
            scale_down = await _scale_down(load, watch, engines, after_end, plan)
        await load.stop()
        stop.set()
        await asyncio.gather(*watchers)
        metrics = await watch.scrape()

    for engine in engines:
        if engine.child is not None:
            procs.stop(engine.child)
    procs.stop(kv.child)  # type: ignore[arg-type]
    return _summary(
        variant,
        plan,
        engines,
        load,
        watch,
        metrics,
        marks={
            "t0": t0,
            "step": step,
            "all_serve": all_serve,
            "after_end": after_end,
            "pods_started": started_pods,
        },
        serving=serving,
        scale_down=scale_down,
    )


def write_config(
    path: Path, port: int, engines: list[Engine], plan: StepPlan, variant: str
) -> None:
    kvsleep_config(
        path,
        port,
        [
            {
                "name": MODEL,
                "engine": "vllm",
                "replicas": [{"url": e.url} for e in engines],
                "scaling": scaling_block(plan, variant),
            }
        ],
        path.parent / variant,
        check_interval=plan.check_interval_seconds,
    )


async def _add_when_ready(
    session: aiohttp.ClientSession,
    kv_url: str,
    config: Path,
    port: int,
    engines: list[Engine],
    plan: StepPlan,
    step: float,
) -> None:
    """The cold variant's endpoints controller: a started engine joins the model's replicas
    (config rewritten, `POST /-/reload`) once its /health answers 200, as a pod joins its
    Service once its readiness probe passes (here polled every 0.25 s; Kubernetes' default
    period is 10 s). Replicas join in order, so each keeps its index (its `replica` label)."""
    joined = 1
    deadline = step + plan.serve_timeout_seconds
    while joined < len(engines) and time.monotonic() < deadline:
        await asyncio.sleep(POLL_SECONDS)
        for engine in engines[joined:]:
            if engine.ready_at is None:
                with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
                    async with session.get(engine.url + "/health") as resp:
                        if resp.status == 200:
                            engine.ready_at = time.monotonic()
        ready = joined
        while ready < len(engines) and engines[ready].ready_at is not None:
            ready += 1
        if ready > joined:
            write_config(config, port, engines[:ready], plan, "cold")
            async with session.post(kv_url + "/-/reload") as resp:
                if resp.status != 200:
                    raise P.StartError(f"kvsleep refused the reload: {await resp.text()}")
            for engine in engines[joined:ready]:
                engine.joined_at = time.monotonic()
            joined = ready


async def _until_all_serve(
    engines: list[Engine], step: float, plan: StepPlan
) -> list[float | None]:
    """When each replica's first request after the step reached it (None: not by the timeout)."""
    deadline = step + plan.serve_timeout_seconds
    while True:
        serving = [e.first("request", step) for e in engines]
        if None not in serving or time.monotonic() > deadline:
            return serving
        await asyncio.sleep(POLL_SECONDS)


async def _scale_down(
    load: ClosedLoop, watch: KvsleepWatch, engines: list[Engine], drop: float, plan: StepPlan
) -> dict[str, Any]:
    """Back to one replica's load: wait for kvsleep to drain and sleep back to one awake."""
    say(f"autoscale warm: load back to {plan.low_clients} clients, waiting for 1 awake")
    deadline = drop + 3 * plan.scale_down_after_seconds + 30
    back = None
    while time.monotonic() < deadline:
        await asyncio.sleep(SCRAPE_SECONDS)
        states = [e.stats.get("state") for e in engines]
        if watch.awake() == 1 and states.count("asleep") == REPLICAS - 1:
            back = time.monotonic()
            break
    end = back or time.monotonic()
    await asyncio.sleep(0.5)  # the last poll of the engines' logs
    sleeps = sorted(t for e in engines for t in e.times("control", "/sleep", drop))
    return {
        "back_to_one_awake_s": rnd(back - drop, 2) if back else None,
        "sleeps_at_s": [rnd(t - drop, 2) for t in sleeps],
        "aborted": sum(e.stats.get("requests", {}).get("aborted", 0) for e in engines),
        "latency": load.window(drop, end),
    }


def _summary(
    variant: str,
    plan: StepPlan,
    engines: list[Engine],
    load: ClosedLoop,
    watch: KvsleepWatch,
    metrics: dict[str, list[tuple[dict[str, str], float]]],
    *,
    marks: dict[str, float | None],
    serving: list[float | None],
    scale_down: dict[str, Any] | None,
) -> dict[str, Any]:
    step = marks["step"]
    assert step is not None and marks["t0"] is not None
    extra = sorted(serving[1:], key=lambda s: float("inf") if s is None else s)
    replicas = []
    for engine, first in zip(engines, serving, strict=True):
        wake = engine.first("control", step, "/wake_up")
        woken = engine.first("control_done", step, "/wake_up")
        requests = engine.stats.get("requests", {})
        replicas.append(
            {
                "replica": str(engine.replica),
                "first_request_after_step_s": rnd(first - step, 3) if first else None,
                "wake_up_reached_engine_s": rnd(wake - step, 3) if wake else None,
                "wake_done_s": rnd(woken - step, 3) if woken else None,
                "control_calls_until_serving": [
                    [rnd(e["t"] - step, 3), e["event"], e["route"]]
                    for e in sorted(engine.events.values(), key=lambda e: e["t"])
                    if e["event"].startswith("control") and step <= e["t"] <= (first or step)
                ],
                "ready_s": rnd(engine.ready_at - step, 3) if engine.ready_at else None,
                "joined_s": rnd(engine.joined_at - step, 3) if engine.joined_at else None,
                "wake_up_calls": engine.stats.get("calls", {}).get("/wake_up", 0),
                "sleep_calls": engine.stats.get("calls", {}).get("/sleep", 0),
                "completed": requests.get("completed"),
                "aborted": requests.get("aborted"),
                "served_while_not_awake": requests.get("served_while_not_awake"),
                "hazards": engine.stats.get("hazards", {}),
            }
        )
    codes = Counter[str]()
    for labels, value in metrics.get("kvsleep_requests_total", []):
        if labels.get("model") == MODEL and value:
            codes[labels["code"]] += int(value)
    hazards = sum(sum(r["hazards"].values()) for r in replicas)
    after = [p for p in watch.timeline if marks["all_serve"] <= p["t"] <= marks["after_end"]]
    spread = (
        {
            r: rnd(sum(p["in_flight"].get(r, 0.0) for p in after) / len(after), 1)
            for r in (str(e.replica) for e in engines)
        }
        if after
        else {}
    )
    all_serve = marks["all_serve"]
    after_end = marks["after_end"]
    assert all_serve is not None and after_end is not None
    return {
        "variant": variant,
        "second_serves_s": rnd(extra[0] - step, 2) if extra[0] is not None else None,
        "third_serves_s": rnd(extra[1] - step, 2) if extra[1] is not None else None,
        "pods_started_s": rnd(marks["pods_started"] - step, 2) if marks["pods_started"] else None,
        "latency": {
            "before": load.window(marks["t0"], step),
            "during": load.window(step, all_serve),
            "after": load.window(all_serve, after_end),
        },
        "in_flight_after": spread,
        # What the step cost the clients in all: every request's wait beyond its own
        # generation time, from the step to the end of the "after" window.
        "excess_latency_s": rnd(
            sum(
                max(0.0, s.seconds - plan.max_tokens / plan.tokens_per_second)
                for s in load.samples
                if step <= s.started < after_end
            ),
            1,
        ),
        "requests": len(load.samples),
        "errors": sum(1 for s in load.samples if not 200 <= s.status < 300),
        "kvsleep_codes": dict(codes),
        "held": int(total(metrics, "kvsleep_request_hold_seconds_count", model=MODEL)),
        "wakes_scale_up": int(
            total(metrics, "kvsleep_wakes_total", reason="scale_up", result="ok")
        ),
        "scale_events": {
            f"{labels['direction']} {labels['replica']} ({labels['reason']})": int(value)
            for labels, value in metrics.get("kvsleep_scale_events_total", [])
            if value
        },
        "hazards": hazards,
        "served_while_not_awake": sum(r["served_while_not_awake"] or 0 for r in replicas),
        "replicas": replicas,
        "scale_down": scale_down,
        "timeline": [{**point, "t": rnd(point["t"] - step, 2)} for point in watch.timeline],
    }


# ---- the run and its report --------------------------------------------------------------


async def run(plan: StepPlan, variants: list[str], procs: P.Processes, workdir: Path) -> dict:
    started = time.time()
    results: dict[str, Any] = {
        "meta": {
            "mode": "quick" if plan.quick else "full",
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(started)),
            "cpus": os.cpu_count(),
            "loadavg_start": P.loadavg(),
            "python": sys.version.split()[0],
            "plan": asdict(plan),
            "logs": str(procs.log_dir),
        },
        "variants": {},
    }
    for variant in variants:
        results["variants"][variant] = await run_variant(variant, plan, procs, workdir)
    results["meta"]["loadavg_end"] = P.loadavg()
    results["meta"]["elapsed_s"] = round(time.time() - started, 1)
    return results


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.2f}" if abs(value) < 100 else f"{value:,.0f}"
    return str(value)


def _lat(window: dict[str, Any]) -> str:
    if not window["requests"]:
        return "-"
    return f"{_fmt(window['p50_ms'])} / {_fmt(window['p99_ms'])} ({window['requests']})"


def _rate(window: dict[str, Any]) -> str:
    """Answers per second; not for a window under a second (always-on's step has none)."""
    return f"{window['answers'] / window['seconds']:.1f}" if window["seconds"] >= 1 else "-"


def render(results: dict[str, Any]) -> str:
    meta = results["meta"]
    plan = meta["plan"]
    variants = results["variants"]
    names = list(variants)
    head = {
        "always-on": "always-on (floor)",
        "warm": "warm (kvsleep wakes)",
        "cold": "cold (pods start)",
    }
    lines = [
        "# kvsleep autoscaling benchmark: a load step from 1 replica's worth to 3",
        "",
        f"{meta['started']}, {meta['mode']} run, {meta['elapsed_s']:.0f} s, "
        f"{meta['cpus']} CPUs, load average {meta['loadavg_start']} -> {meta['loadavg_end']}.",
        "",
        f"One model, three replicas (`bench/capsim.py`: kvsleep's sim engine with at most "
        f"{plan['max_num_seqs']} requests generating at once, the rest queued; "
        f"{plan['max_tokens']} tokens at {plan['tokens_per_second']:g} tokens/s = "
        f"{plan['max_tokens'] / plan['tokens_per_second']:.2f} s per request unqueued). "
        f"Closed loop: {plan['low_clients']} clients for {plan['before_seconds']:g} s, then "
        f"{plan['high_clients']} (the step) until every replica serves, then "
        f"{plan['after_seconds']:g} s more. Scaler: target_in_flight "
        f"{plan['target_in_flight']}, scale_up_after {plan['scale_up_after_seconds']:g} s, "
        f"scale_down_after {plan['scale_down_after_seconds']:g} s, check_interval "
        f"{plan['check_interval_seconds']:g} s, trend "
        + (f"window {plan['trend_window_seconds']:g} s" if plan["trend_window_seconds"] else "off")
        + ".",
        "",
        "- **always-on**: all three awake from the start (`min_awake: 3`).",
        f"- **warm**: replica 0 awake, 1 and 2 asleep (vLLM sleep level 1); kvsleep's scaler "
        f"wakes them, one wake = {plan['wake_seconds']:g} s.",
        f"- **cold**: replicas 1 and 2 not running at the step. A pod autoscaler starts both "
        f"{plan['scale_up_after_seconds'] + plan['check_interval_seconds']:g} s after the step "
        f"(kvsleep's own reaction time; HPA's default sync period alone is 15 s), and each "
        f"engine then pays its process start plus {plan['cold_start_seconds']:g} s of "
        f"answering 503 (standing in for CUDA init, weight load and graph capture, which take "
        f"minutes on a real 8B vLLM). An engine joins the model's replicas (kvsleep config "
        f"reload) once its /health answers 200, as a pod joins its Service once ready.",
        "",
        "| | " + " | ".join(head.get(n, n) for n in names) + " |",
        "|---|" + "---|" * len(names),
    ]

    def row(label: str, cells: list[str]) -> None:
        lines.append(f"| {label} | " + " | ".join(cells) + " |")

    v = [variants[n] for n in names]
    row("2nd replica serves, s after the step", [_fmt(x["second_serves_s"]) for x in v])
    row("3rd replica serves, s after the step", [_fmt(x["third_serves_s"]) for x in v])
    row("p50 / p99 ms (requests) before the step", [_lat(x["latency"]["before"]) for x in v])
    row("p50 / p99 ms (requests) step → 3rd serves", [_lat(x["latency"]["during"]) for x in v])
    row(
        f"p50 / p99 ms (requests) {plan['after_seconds']:g} s after",
        [_lat(x["latency"]["after"]) for x in v],
    )
    row(
        "2xx answers/s step → 3rd serves (after)",
        [f"{_rate(x['latency']['during'])} ({_rate(x['latency']['after'])})" for x in v],
    )
    row(
        "in flight per replica after (kvsleep, mean of 1 s samples)",
        [" / ".join(_fmt(n) for n in x["in_flight_after"].values()) or "-" for x in v],
    )
    row(
        "latency beyond the unqueued "
        f"{plan['max_tokens'] / plan['tokens_per_second']:g} s, summed from the step on, "
        "client-s",
        [_fmt(x["excess_latency_s"]) for x in v],
    )
    row("requests, errors (non-2xx or none)", [f"{x['requests']}, {x['errors']}" for x in v])
    row("requests held (kvsleep)", [_fmt(x["held"]) for x in v])
    row(
        "/wake_up calls per replica",
        [" / ".join(str(r["wake_up_calls"]) for r in x["replicas"]) for x in v],
    )
    row(
        "engine hazards, served while not awake",
        [f"{x['hazards']}, {x['served_while_not_awake']}" for x in v],
    )
    lines.append("")
    warm = variants.get("warm")
    if warm:
        lines += ["## Warm: where the seconds go", ""]
        lines += ["| replica | /wake_up reaches the engine | wake done | first request |"]
        lines += ["|---|---|---|---|"]
        for r in warm["replicas"][1:]:
            lines.append(
                f"| {r['replica']} | {_fmt(r['wake_up_reached_engine_s'])} s | "
                f"{_fmt(r['wake_done_s'])} s | {_fmt(r['first_request_after_step_s'])} s |"
            )
        lines += [
            "",
            "Seconds after the step, from the engines' own event logs. The scaler wakes one "
            "replica at a time (`kvsleep/core/scaling.py`: no second demand wake while one is "
            "under way), so the 3rd replica's `/wake_up` comes once the 2nd's wake is done, at "
            "the earliest. From wake done to the first request: kvsleep marks the replica "
            "awake, then the next request a client sends goes there; the queued replica "
            f"answers in batches of {plan['max_num_seqs']}, so clients send in bursts up to "
            f"{plan['max_tokens'] / plan['tokens_per_second']:g} s apart.",
            "",
            "Scale events: "
            + ", ".join(f"{k}: {n}" for k, n in sorted(warm["scale_events"].items())),
            "",
        ]
        down = warm.get("scale_down")
        if down:
            lines += [
                f"**Scale-down**: load back to {plan['low_clients']} clients; "
                f"back to 1 awake replica after {_fmt(down['back_to_one_awake_s'])} s "
                f"(sleeps at {', '.join(_fmt(s) for s in down['sleeps_at_s'])} s, each "
                f"after a drain: requests aborted {down['aborted']}, engine hazards "
                f"{warm['hazards']}); "
                f"p50 / p99 meanwhile {_lat(down['latency'])}, errors "
                f"{down['latency']['errors']}.",
                "",
            ]
    cold = variants.get("cold")
    if cold and cold["pods_started_s"] is not None:
        lines += ["## Cold: where the seconds go", ""]
        lines += ["| replica | pod started | /health 200 | joined (reload) | first request |"]
        lines += ["|---|---|---|---|---|"]
        for r in cold["replicas"][1:]:
            lines.append(
                f"| {r['replica']} | {_fmt(cold['pods_started_s'])} s | {_fmt(r['ready_s'])} s "
                f"| {_fmt(r['joined_s'])} s | {_fmt(r['first_request_after_step_s'])} s |"
            )
        lines += [
            "",
            "Seconds after the step. From pod start to /health 200: the process start (Python "
            "imports on a loaded machine) plus the cold start.",
            "",
        ]
    lines += [
        "Latency is the whole answer's, per request, by when it was sent. Errors count every "
        "answer that was not 2xx or did not come (must be 0). Held: kvsleep's "
        "`kvsleep_request_hold_seconds_count` (a request held for a wake because no replica "
        "was awake; 0 with `min_awake: 1`).",
        "",
    ]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench --autoscale",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--autoscale", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--quick", action="store_true", help="smoke run (about a minute)")
    p.add_argument(
        "--variants",
        default=",".join(VARIANTS),
        help=f"comma-separated subset of {','.join(VARIANTS)}",
    )
    p.add_argument("--out", type=Path, default=RESULTS, help="directory for autoscale.json/.md")
    p.add_argument("--wake-seconds", type=float, help="warm: one wake (default 2)")
    p.add_argument(
        "--cold-start-seconds", type=float, help="cold: engine start after its process (30)"
    )
    p.add_argument(
        "--trend-window", type=float, help="scaler's trend_window_seconds (default 0: off)"
    )
    p.add_argument("--no-scale-down", action="store_true", help="warm: skip the scale-down")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    plan = StepPlan.quick_plan() if args.quick else StepPlan()
    for flag, field in (
        ("wake_seconds", "wake_seconds"),
        ("cold_start_seconds", "cold_start_seconds"),
        ("trend_window", "trend_window_seconds"),
    ):
        if getattr(args, flag) is not None:
            plan = replace(plan, **{field: getattr(args, flag)})
    if args.no_scale_down:
        plan = replace(plan, scale_down=False)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        raise SystemExit(f"unknown variants: {', '.join(sorted(unknown))}")
    out_dir: Path = args.out
    done = P.run_children(
        "kvsleep-autoscale",
        lambda procs, workdir: run(plan, variants, procs, workdir),
        out_dir,
        "autoscale",
        render,
    )
    if done is None:
        return 1
    results, logs = done
    print(render(results))
    say(
        f"wrote {out_dir / 'autoscale.json'} and {out_dir / 'autoscale.md'} "
        f"({results['meta']['elapsed_s']:.0f} s; logs in {logs})"
    )
    bad = sum(v["errors"] + v["hazards"] for v in results["variants"].values())
    return 0 if bad == 0 else 3
