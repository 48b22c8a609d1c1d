"""The four scenarios: non-streaming, streaming, wake path, and scale (1,000 models)."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.parse
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from bench import procs as P
from bench.stats import diff, median, pct, ratio, rnd
from bench.targets import Target, kvsleep_config, start_kvsleep
from bench.wrk import Load, WrkError, run_wrk

ENDPOINT = "/v1/chat/completions"
BARE_PROXY = "aiohttp-proxy"  # bench/bareproxy.py: the CPU floor an aiohttp router can reach
JSON_HEADERS = {"Content-Type": "application/json"}


@dataclass(frozen=True)
class Plan:
    """How long and how often; `--quick` shrinks every knob, never the structure."""

    quick: bool
    rounds: int
    seconds: float
    stream_seconds: float
    warmup_seconds: float
    warmup_every_point: bool
    nonstream_concurrency: tuple[int, ...] = (1, 16, 256)
    nonstream_max_tokens: int = 16
    stream_concurrency: tuple[int, ...] = (64, 512)
    stream_max_tokens: int = 64
    wake_requests: int = 1000
    wake_rounds: int = 3
    wake_latency: float = 1.0
    wake_single_cycles: int = 5
    scale_models: int = 1000
    scale_ticks: int = 5
    scale_scrapes: int = 20
    scale_engines_down: bool = True
    profile_seconds: float = 10.0

    @classmethod
    def full(cls) -> Plan:
        # Streams at c=512 take ~0.5 s each and wrk counts only finished ones: long runs.
        return cls(
            quick=False,
            rounds=3,
            seconds=5,
            stream_seconds=8,
            warmup_seconds=2,
            warmup_every_point=True,
        )

    @classmethod
    def quick_plan(cls) -> Plan:
        return cls(
            quick=True,
            rounds=2,
            seconds=1,
            stream_seconds=1,
            warmup_seconds=1,
            warmup_every_point=False,
            wake_rounds=1,
            wake_latency=0.5,
            wake_single_cycles=2,
            scale_ticks=2,
            scale_scrapes=5,
            scale_engines_down=False,
            profile_seconds=5,
        )


def chat_body(model: str, max_tokens: int, stream: bool) -> str:
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": "Say something."}],
        "max_tokens": max_tokens,
    }
    if stream:
        body.update(stream=True, ignore_eos=True)  # exactly max_tokens chunks
    return json.dumps(body, separators=(",", ":"))


def say(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


# ---- (a) and (b): wrk against every target, interleaved ------------------------------------


async def _ttfb_probe(url: str, body: str, stop: asyncio.Event) -> list[float]:
    """Time to the first body byte of one stream at a time, while wrk loads the target.

    Python on purpose: wrk's Lua `response` hook runs only once the whole answer is in, so wrk
    cannot see a first byte. One sequential stream every 20 ms is a sampler, not load.
    """
    samples: list[float] = []
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(
        timeout=timeout, connector=aiohttp.TCPConnector(limit=1)
    ) as session:
        while not stop.is_set() and len(samples) < 5000:
            started = time.perf_counter()
            try:
                async with session.post(url, data=body, headers=JSON_HEADERS) as resp:
                    first = await resp.content.readany()
                    elapsed = time.perf_counter() - started
                    await resp.read()
                    if 200 <= resp.status < 300 and first:
                        samples.append(elapsed * 1000)
            except (aiohttp.ClientError, asyncio.TimeoutError):
                pass
            await asyncio.sleep(0.02)
    return samples


def _cpu(children: dict[str, P.Child | None]) -> dict[str, float | None]:
    return {k: (P.cpu_seconds(c.pid) if c is not None else None) for k, c in children.items()}


async def _one_run(
    target: Target, load: Load, probe_body: str | None, engine: P.Child | None = None
) -> dict[str, Any]:
    if target.child is not None and not target.child.alive():
        return {"error": f"{target.name} is not running (exit {target.child.popen.returncode})"}
    # CPU time per 2xx answer: far less sensitive to a shared, noisy machine than throughput.
    watched = {"engine": engine, "proxy": target.child if target.child is not engine else None}
    cpu_before = _cpu(watched)
    overflows = P.listen_overflows()
    stop = asyncio.Event()
    probe = (
        asyncio.create_task(_ttfb_probe(load.url, probe_body, stop))
        if probe_body is not None
        else None
    )
    try:
        result = await run_wrk(load)
    except WrkError as exc:
        result = {"error": str(exc)[-500:]}
    finally:
        stop.set()
        samples = await probe if probe is not None else []
    cpu_after = _cpu(watched)
    result["listen_overflows"] = diff(P.listen_overflows(), overflows)
    for key in watched:
        spent = diff(cpu_after[key], cpu_before[key])
        result[f"{key}_cpu_us_per_2xx"] = (
            spent / result["ok2xx"] * 1e6 if spent is not None and result.get("ok2xx") else None
        )
    if probe is not None:
        result["ttfb_p50_ms"] = pct(samples, 50)
        result["ttfb_p90_ms"] = pct(samples, 90)
        result["ttfb_samples"] = len(samples)
    if result.get("ok2xx") == 0:  # latency of error answers says nothing
        for key in ("p50_ms", "p90_ms", "p99_ms", "mean_ms", "max_ms"):
            result[key] = None
    return result


def _summarize(runs: list[dict[str, Any]], sse: bool) -> dict[str, Any]:
    good = [r for r in runs if "error" not in r]
    out: dict[str, Any] = {
        "ok_per_s": rnd(median([r["ok_per_s"] for r in good]), 1),
        "p50_ms": rnd(median([r["p50_ms"] for r in good])),
        "p99_ms": rnd(median([r["p99_ms"] for r in good])),
        "proxy_cpu_us_per_2xx": rnd(median([r["proxy_cpu_us_per_2xx"] for r in good]), 1),
        "engine_cpu_us_per_2xx": rnd(median([r["engine_cpu_us_per_2xx"] for r in good]), 1),
        "non2xx": sum(r["non2xx"] for r in good),
        "socket_errors": sum(r["socket_errors"] for r in good),
        "listen_overflows": sum(r["listen_overflows"] or 0 for r in good),
        "rounds": [{k: rnd(v) if isinstance(v, float) else v for k, v in r.items()} for r in runs],
    }
    errors = [r["error"] for r in runs if "error" in r]
    if errors:
        out["errors"] = errors
    if sse:
        out["chunks_per_s"] = rnd(median([r["events_per_s"] for r in good]), 1)
        out["ttfb_p50_ms"] = rnd(median([r.get("ttfb_p50_ms") for r in good]))
        out["ttfb_p90_ms"] = rnd(median([r.get("ttfb_p90_ms") for r in good]))
    return out


async def wrk_scenario(
    targets: list[Target],
    skipped: dict[str, str],
    plan: Plan,
    *,
    model: str,
    stream: bool,
    engine: P.Child | None,
) -> dict[str, Any]:
    """Every concurrency point: warm up, then `rounds` rounds of A B C ... (medians, ratios)."""
    levels = plan.stream_concurrency if stream else plan.nonstream_concurrency
    max_tokens = plan.stream_max_tokens if stream else plan.nonstream_max_tokens
    body = chat_body(model, max_tokens, stream)
    seconds = plan.stream_seconds if stream else plan.seconds
    points: dict[str, Any] = {}
    for index, conc in enumerate(levels):
        runs: dict[str, list[dict[str, Any]]] = {t.name: [] for t in targets}

        def load(target: Target, seconds: float, conc: int = conc) -> Load:
            return Load(
                target.url + ENDPOINT,
                body,
                conc,
                seconds,
                sse=stream,
                timeout_s=30 if stream else 10,
            )

        if plan.warmup_every_point or index == 0:
            for target in targets:
                await _one_run(target, load(target, plan.warmup_seconds), None, engine)
        for rnd_no in range(plan.rounds):
            for target in targets:
                result = await _one_run(
                    target, load(target, seconds), body if stream else None, engine
                )
                runs[target.name].append(result)
                metric = (
                    f"{result.get('events_per_s', 0):.0f} chunks/s"
                    if stream
                    else f"{result.get('ok_per_s', 0):.0f} 2xx/s"
                )
                say(
                    f"{'stream' if stream else 'nonstream'} c={conc} round {rnd_no + 1} "
                    f"{target.name}: {result.get('error') or metric}"
                )
        summary = {name: _summarize(r, stream) for name, r in runs.items()}
        direct = summary.get("direct", {})
        floor = summary.get(BARE_PROXY, {}).get("proxy_cpu_us_per_2xx")
        for name, s in summary.items():
            if name == "direct":
                continue
            if name != BARE_PROXY:
                s["cpu_ratio_to_bare_proxy"] = rnd(ratio(s["proxy_cpu_us_per_2xx"], floor))
            if stream:
                s["ratio_to_direct"] = rnd(ratio(s["chunks_per_s"], direct.get("chunks_per_s")))
                s["ttfb_added_ms"] = rnd(diff(s["ttfb_p50_ms"], direct.get("ttfb_p50_ms")))
            else:
                s["ratio_to_direct"] = rnd(ratio(s["ok_per_s"], direct.get("ok_per_s")))
                s["added_p50_ms"] = rnd(diff(s["p50_ms"], direct.get("p50_ms")))
                s["added_p99_ms"] = rnd(diff(s["p99_ms"], direct.get("p99_ms")))
        for name, why in skipped.items():
            summary[name] = {"skipped": why}
        points[f"c{conc}"] = {"concurrency": conc, "targets": summary}
    return {
        "endpoint": ENDPOINT,
        "max_tokens": max_tokens,
        "stream": stream,
        "rounds": plan.rounds,
        "seconds_per_run": seconds,
        "points": points,
    }


# ---- (c) wake path ------------------------------------------------------------------------


async def _burst(
    session: aiohttp.ClientSession, url: str, body: str, n: int
) -> tuple[list[float], list[float], int, float]:
    """`n` requests at once on warm connections: (ttfb ms, first-byte times, errors, spread)."""
    ttfb: list[float] = []
    firsts: list[float] = []
    sent: list[float] = []
    errors = 0

    async def one() -> None:
        nonlocal errors
        started = time.perf_counter()
        sent.append(started)
        try:
            async with session.post(url, data=body, headers=JSON_HEADERS) as resp:
                first = time.perf_counter()
                await resp.read()
                if resp.status != 200:
                    errors += 1
                    return
        except (aiohttp.ClientError, asyncio.TimeoutError):
            errors += 1
            return
        ttfb.append((first - started) * 1000)
        firsts.append(first)

    await asyncio.gather(*(one() for _ in range(n)))
    return ttfb, firsts, errors, (max(sent) - min(sent)) * 1000 if sent else 0.0


async def _warm(session: aiohttp.ClientSession, url: str, n: int) -> None:
    """Open `n` keep-alive connections, so a burst measures the hold, not TCP handshakes."""

    async def one() -> None:
        async with session.get(url) as resp:
            await resp.read()

    await asyncio.gather(*(one() for _ in range(n)))


async def _json(session: aiohttp.ClientSession, url: str) -> Any:
    async with session.get(url) as resp:
        return await resp.json(content_type=None)


async def _text(session: aiohttp.ClientSession, url: str) -> str:
    async with session.get(url, headers={"Accept-Encoding": "identity"}) as resp:
        return await resp.text()


def _metric(text: str, name: str, labels: str = "") -> float:
    """Sum of the samples of `name` whose label text contains `labels`."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and (line[len(name)] in " {") and labels in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


async def _single_hold(
    session: aiohttp.ClientSession,
    base: str,
    sim: str,
    quoted: str,
    body: str,
    wake: float,
    cycles: int,
) -> dict[str, Any]:
    """Lone requests at an asleep model: the hold's own cost, free of a burst's queueing.

    The sim logs its events with time.monotonic(), the same clock as ours (CLOCK_MONOTONIC is
    machine-wide), so each hold splits into: request sent -> /wake_up reaches the engine
    (reaction), /wake_up answered -> the held request reaches the engine (release: the
    post-wake probe, state file, forwarding), and engine -> client (relay).
    """
    url = base + ENDPOINT
    awake: list[float] = []
    errors = 0
    for _ in range(20):
        ttfb, _, failed, _ = await _burst(session, url, body, 1)
        awake += ttfb
        errors += failed
    awake_ms = median(awake)
    added: list[float] = []
    parts: dict[str, list[float]] = {"reaction_ms": [], "release_ms": [], "relay_ms": []}
    for _ in range(cycles):
        async with session.post(f"{base}/models/{quoted}/sleep") as resp:
            await resp.read()
        sent = time.monotonic()
        try:
            async with session.post(url, data=body, headers=JSON_HEADERS) as resp:
                first = time.monotonic()
                await resp.read()
                ok = resp.status == 200
        except (aiohttp.ClientError, asyncio.TimeoutError):
            ok = False
        if not ok:
            errors += 1
            continue
        added.append((first - sent - wake) * 1000 - (awake_ms or 0))
        log = (await _json(session, sim + "/sim/stats"))["log"]
        events = [e for e in log if e["t"] >= sent]
        woke = [e["t"] for e in events if e.get("route") == "/wake_up"]
        done = [
            e["t"] for e in events if e["event"] == "control_done" and e.get("route") == "/wake_up"
        ]
        served = [e["t"] for e in events if e["event"] == "request"]
        if woke and done and served:
            parts["reaction_ms"].append((woke[0] - sent) * 1000)
            parts["release_ms"].append((served[0] - done[0]) * 1000)
            parts["relay_ms"].append((first - served[0]) * 1000)
    return {
        "single_awake_ttfb_ms": awake_ms,
        "single_hold_added_ms": median(added),
        "single_hold_added_max_ms": max(added) if added else None,
        "single_hold_samples": [rnd(a) for a in added],
        **{f"single_{k}": median(v) for k, v in parts.items()},
        "single_errors": errors,
    }


async def wake_scenario(kv: Target, sim: Target, model: str, plan: Plan) -> dict[str, Any]:
    """1,000 requests at an asleep model: one wake, zero errors, and what the hold adds."""
    n, wake = plan.wake_requests, plan.wake_latency
    body = chat_body(model, 4, False)
    quoted = urllib.parse.quote(model, safe="")
    rounds: list[dict[str, Any]] = []
    timeout = aiohttp.ClientTimeout(total=120)
    for rnd_no in range(plan.wake_rounds):
        r: dict[str, Any] = {}
        for name, base, health in (
            ("direct", sim.url, "/health"),
            ("kvsleep", kv.url, "/-/healthy"),
        ):
            async with aiohttp.ClientSession(
                timeout=timeout, connector=aiohttp.TCPConnector(limit=0)
            ) as session:
                await _warm(session, base + health, n)
                # Twice, keeping the second: the first also opens kvsleep's 1,000 connections
                # to the engine (SYN drops on its 128-deep accept queue cost 1 s each); the
                # wake burst, a few seconds later, finds them open.
                _, _, first_errors, _ = await _burst(session, base + ENDPOINT, body, n)
                overflows = P.listen_overflows()
                ttfb, _, errors, _ = await _burst(session, base + ENDPOINT, body, n)
            r[f"awake_{name}"] = {
                "ttfb_p50_ms": pct(ttfb, 50),
                "ttfb_p99_ms": pct(ttfb, 99),
                "errors": errors + first_errors,
                "syn_drops": diff(P.listen_overflows(), overflows),
            }
        async with aiohttp.ClientSession(
            timeout=timeout, connector=aiohttp.TCPConnector(limit=0)
        ) as session:
            async with session.post(f"{kv.url}/models/{quoted}/sleep") as resp:
                slept = resp.status == 200
                await resp.read()
            before = await _json(session, sim.url + "/sim/stats")
            metrics_before = await _text(session, kv.url + "/metrics")
            await _warm(session, kv.url + "/-/healthy", n)
            overflows = P.listen_overflows()
            burst_start = time.perf_counter()
            ttfb, firsts, errors, spread = await _burst(session, kv.url + ENDPOINT, body, n)
            syn_drops = diff(P.listen_overflows(), overflows)
            after = await _json(session, sim.url + "/sim/stats")
            metrics_after = await _text(session, kv.url + "/metrics")
            single = await _single_hold(
                session, kv.url, sim.url, quoted, body, wake, plan.wake_single_cycles
            )
        since_start = [(t - burst_start) * 1000 - wake * 1000 for t in firsts]
        wake_seen = _metric(metrics_after, "kvsleep_wake_duration_seconds_sum") - _metric(
            metrics_before, "kvsleep_wake_duration_seconds_sum"
        )
        r.update(
            {
                "slept": slept,
                "wake_calls": after["calls"].get("/wake_up", 0)
                - before["calls"].get("/wake_up", 0),
                "errors": errors,
                "served_while_not_awake": after["requests"]["served_while_not_awake"]
                - before["requests"]["served_while_not_awake"],
                "send_spread_ms": spread,
                "syn_drops": syn_drops,
                "ttfb_p50_ms": pct(ttfb, 50),
                "ttfb_p99_ms": pct(ttfb, 99),
                "ttfb_minus_wake_p50_ms": diff(pct(ttfb, 50), wake * 1000),
                "ttfb_minus_wake_p99_ms": diff(pct(ttfb, 99), wake * 1000),
                "burst_start_to_first_byte_minus_wake_p99_ms": pct(since_start, 99),
                "wake_call_overhead_ms": wake_seen * 1000 - wake * 1000,
                **single,
            }
        )
        r["hold_added_p50_ms"] = diff(
            r["ttfb_minus_wake_p50_ms"], r["awake_kvsleep"]["ttfb_p50_ms"]
        )
        r["hold_added_p99_ms"] = diff(
            r["ttfb_minus_wake_p99_ms"], r["awake_kvsleep"]["ttfb_p99_ms"]
        )
        say(
            f"wake round {rnd_no + 1}: wake_calls={r['wake_calls']} errors={errors} "
            f"ttfb-wake p50={rnd(r['ttfb_minus_wake_p50_ms'], 1)} ms "
            f"p99={rnd(r['ttfb_minus_wake_p99_ms'], 1)} ms (awake kvsleep burst p99="
            f"{rnd(r['awake_kvsleep']['ttfb_p99_ms'], 1)} ms; one request's hold "
            f"{rnd(r['single_hold_added_ms'], 2)} ms)"
        )
        rounds.append(
            {
                k: (
                    {kk: rnd(vv) for kk, vv in v.items()}
                    if isinstance(v, dict)
                    else rnd(v)
                    if isinstance(v, float)
                    else v
                )
                for k, v in r.items()
            }
        )

    samples = [a for x in rounds for a in x["single_hold_samples"]]

    def med(key: str, sub: str | None = None) -> float | None:
        return rnd(median([(x[key][sub] if sub else x[key]) for x in rounds]))

    return {
        "requests": n,
        "wake_latency_s": wake,
        "rounds": rounds,
        "wake_calls": [x["wake_calls"] for x in rounds],
        "errors": sum(
            x["errors"]
            + x["awake_kvsleep"]["errors"]
            + x["awake_direct"]["errors"]
            + x["single_errors"]
            for x in rounds
        ),
        "served_while_not_awake": sum(x["served_while_not_awake"] for x in rounds),
        "ttfb_minus_wake_p50_ms": med("ttfb_minus_wake_p50_ms"),
        "ttfb_minus_wake_p99_ms": med("ttfb_minus_wake_p99_ms"),
        "awake_burst_direct_p99_ms": med("awake_direct", "ttfb_p99_ms"),
        "awake_burst_kvsleep_p99_ms": med("awake_kvsleep", "ttfb_p99_ms"),
        "hold_added_p50_ms": med("hold_added_p50_ms"),
        "hold_added_p99_ms": med("hold_added_p99_ms"),
        "wake_call_overhead_ms": med("wake_call_overhead_ms"),
        "single_hold_added_ms": rnd(median(samples)),
        "single_hold_added_max_ms": rnd(max(samples)) if samples else None,
        "single_hold_count": len(samples),
        "single_reaction_ms": med("single_reaction_ms"),
        "single_release_ms": med("single_release_ms"),
        "single_relay_ms": med("single_relay_ms"),
    }


# ---- (d) scale: 1,000 configured models ----------------------------------------------------


async def scale_variant(
    procs: P.Processes, workdir: Path, plan: Plan, engines_up: bool
) -> dict[str, Any]:
    """kvsleep with `scale_models` models; scrape cost, reconcile tick, resident memory."""
    n = plan.scale_models
    tag = "up" if engines_up else "down"
    multisim = None
    if engines_up:
        ports_file = workdir / "multisim-ports.json"
        ports_file.unlink(missing_ok=True)
        multisim = procs.spawn(
            "multisim",
            [P.PYTHON, "-m", "bench.multisim", "--count", str(n), "--ports-file", str(ports_file)],
        )
        deadline = time.monotonic() + 60
        while not ports_file.exists():
            if not multisim.alive() or time.monotonic() > deadline:
                raise P.StartError(
                    f"multisim did not start; log {multisim.log}:\n{multisim.tail()}"
                )
            await asyncio.sleep(0.1)
        ports = json.loads(ports_file.read_text())
    else:
        ports = P.closed_ports(n)
    models = [
        {"name": f"bench/scale-{i:04d}", "engine": "vllm", "url": f"http://{P.HOST}:{p}"}
        for i, p in enumerate(ports)
    ]
    config = workdir / f"kvsleep-scale-{tag}.json"
    port = P.free_port()
    kvsleep_config(config, port, models, workdir / f"scale-{tag}", check_interval=1.0)
    try:
        kv, ready_s = start_kvsleep(procs, f"kvsleep-scale-{tag}", config, port, timeout=120)
        assert kv.child is not None
        out: dict[str, Any] = {"models": n, "engines": tag, "startup_to_ready_s": rnd(ready_s)}
        identity = {"Accept-Encoding": "identity"}
        async with aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=30), auto_decompress=False
        ) as session:

            async def scrape(headers: dict[str, str]) -> tuple[float, int, str]:
                started = time.perf_counter()
                async with session.get(kv.url + "/metrics", headers=headers) as resp:
                    raw = await resp.read()
                return (
                    (time.perf_counter() - started) * 1000,
                    len(raw),
                    resp.headers.get("Content-Encoding", "identity"),
                )

            async def ticks() -> tuple[float, float]:
                text = await _text(session, kv.url + "/metrics")
                return (
                    _metric(text, "kvsleep_reconcile_duration_seconds_sum"),
                    _metric(text, "kvsleep_reconcile_duration_seconds_count"),
                )

            deadline = time.monotonic() + 30 + plan.scale_ticks * 5
            first = await ticks()
            while first[1] < 1 and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
                first = await ticks()
            last = first
            while last[1] < first[1] + plan.scale_ticks and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
                last = await ticks()
            count = last[1] - first[1]
            out["reconcile_ticks_measured"] = int(count)
            out["reconcile_tick_mean_ms"] = rnd(
                (last[0] - first[0]) / count * 1000 if count else None
            )
            plain = [await scrape(identity) for _ in range(plan.scale_scrapes)]
            gzip = [
                await scrape({"Accept-Encoding": "gzip"})
                for _ in range(max(1, plan.scale_scrapes // 4))
            ]
            status = await _json(session, kv.url + "/sleep/status")
            families: Counter[str] = Counter(
                line.split("{", 1)[0].split(" ", 1)[0]
                for line in (await _text(session, kv.url + "/metrics")).splitlines()
                if line and not line.startswith("#")
            )
        out.update(
            {
                "scrape_ms_p50": rnd(pct([p[0] for p in plain], 50)),
                "scrape_ms_max": rnd(max(p[0] for p in plain)),
                "scrape_bytes": plain[-1][1],
                "scrape_ms_min": rnd(min(p[0] for p in plain)),
                "scrape_series": sum(families.values()),
                "scrape_series_top": dict(families.most_common(8)),
                "scrape_gzip_ms_p50": rnd(pct([g[0] for g in gzip], 50)),
                "scrape_gzip_bytes": gzip[-1][1],
                "scrape_gzip_encoding": gzip[-1][2],
                "engines_up_seen": sum(1 for m in status["models"].values() if m["engine_up"]),
            }
        )
        rss = P.rss_kib(kv.child.pid)
        out["rss_mib"] = rnd(rss.get("VmRSS", 0) / 1024, 1)
        out["peak_rss_mib"] = rnd(rss.get("VmHWM", 0) / 1024, 1)
        procs.stop(kv.child)
        say(
            f"scale engines {tag}: scrape p50 {out['scrape_ms_p50']} ms "
            f"({out['scrape_bytes']} B), tick {out['reconcile_tick_mean_ms']} ms, "
            f"RSS {out['rss_mib']} MiB"
        )
        return out
    finally:
        if multisim is not None:
            procs.stop(multisim)
