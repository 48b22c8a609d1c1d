"""Soak: the chaos traffic of tests/test_chaos.py against real processes for N minutes.

    python -m bench.soak --minutes 10      # default
    python -m bench.soak --minutes 0.5     # smoke check

Starts three `kvsleep sim-engine` processes (vLLM level 1, vLLM level 2, SGLang) and one
`kvsleep serve` (auto-sleep after 2 s idle, reconcile every 0.5 s) on 127.0.0.1, then sends
seeded traffic for N minutes: plain and streamed completions, chat and embeddings, to a
changing subset of the models (so the others go idle and are slept), with manual sleeps and
wakes over the control routes and Alertmanager webhook payloads mixed in. Every few seconds it
samples kvsleep's resident memory (VmRSS), open file descriptors (/proc/PID/fd) and threads
from /proc; kvsleep exports no asyncio task count and the soak adds nothing to kvsleep, so
tasks are not measured (a task leak shows as memory growth). It reports the trend (median of
the first quartile of samples vs the last, after a warm-up) with a verdict, every answer's
status, and the engines' hazard counters. Writes `soak.json` and `soak.md` to `--out`
(default bench/results).

Meanwhile (unless `--no-hostile`) one hostile client keeps 300 idle connections, 50 that stop
halfway through their head and 50 halfway through their body open, reopening each one kvsleep
closes, and sends a 16 MiB request every 2 s: kvsleep's memory and descriptors must stay flat
and the legitimate requests above must all be answered.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import statistics
import sys
import tempfile
import time
import urllib.parse
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp

from bench import procs as P

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = {
    "soak/vllm-l1": ("vllm", {}),
    "soak/vllm-l2": ("vllm", {"sleep_level": 2}),
    "soak/sglang": ("sglang", {}),
}
RATE = 60.0  # requests started per second (the machine also runs the engines and kvsleep)
CONCURRENCY = 24
HOSTILE = {"idle": 300, "half head": 50, "half body": 50}  # connections kept open
BIG_BODY_BYTES = 16 * 1024 * 1024
BIG_BODY_EVERY_SECONDS = 2.0
# Client limits short enough that a few minutes see many hostile connections closed.
ROUTER_LIMITS = {
    "idle_timeout_seconds": 5,
    "header_timeout_seconds": 3,
    "body_timeout_seconds": 3,
    "max_body_bytes": 2 * BIG_BODY_BYTES,
    "max_held_bytes": 4 * BIG_BODY_BYTES,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m bench.soak",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--minutes", type=float, default=10.0, help="how long to run (default 10)")
    p.add_argument("--out", type=Path, default=RESULTS, help="where soak.json/.md go")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--rate", type=float, default=RATE, help="requests per second")
    p.add_argument(
        "--no-hostile",
        dest="hostile",
        action="store_false",
        help="without the slowloris and big-body client",
    )
    return p.parse_args(argv)


# ---- processes -------------------------------------------------------------------------------


def start_sim(procs: P.Processes, name: str, flavor: str) -> str:
    child = procs.spawn(
        name.replace("/", "-"),
        [
            P.PYTHON,
            "-m",
            "kvsleep",
            "sim-engine",
            "--flavor",
            flavor,
            "--model",
            name,
            "--host",
            P.HOST,
            "--port",
            "0",
            "--tokens-per-second",
            "500",
            "--wake-latency",
            "0.05",
            "--sleep-latency",
            "0.02",
            "--reload-latency",
            "0.02",
            "--log-level",
            "info",
        ],
    )
    match = P.wait_log(child, r"serving .* on http://127\.0\.0\.1:(\d+)", 30)
    url = f"http://{P.HOST}:{match.group(1)}"
    P.wait_http(child, url + "/health", 30)
    return url


def start_kvsleep(procs: P.Processes, workdir: Path, urls: dict[str, str]) -> tuple[P.Child, str]:
    port = P.free_port()
    config = {
        "router": {"host": P.HOST, "port": port, **ROUTER_LIMITS},
        "sleep_manager": {
            "auto_sleep_enabled": True,
            "idle_threshold_seconds": 2,
            "check_interval_seconds": 0.5,
            "min_awake_seconds": 0,
            "min_sleep_duration": 0,
            "wake_timeout_seconds": 30,
        },
        "models": [
            {"name": name, "engine": flavor, "url": urls[name], **extra}
            for name, (flavor, extra) in MODELS.items()
        ],
        "state_dir": str(workdir / "state"),
        "log_dir": str(workdir / "logs"),
    }
    path = workdir / "kvsleep.yaml"
    path.write_text(json.dumps(config, indent=1))
    child = procs.spawn(
        "kvsleep",
        [P.PYTHON, "-m", "kvsleep", "serve", "--config", str(path), "--log-level", "warning"],
    )
    url = f"http://{P.HOST}:{port}"
    P.wait_http(child, url + "/-/ready", 60)
    return child, url


# ---- sampling --------------------------------------------------------------------------------


def proc_sample(pid: int) -> dict[str, int]:
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return {
        "rss_kib": int(fields["VmRSS"].split()[0]),
        "threads": int(fields["Threads"].strip()),
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
    }


def trend(samples: list[dict[str, Any]], key: str, warmup: float) -> dict[str, Any]:
    """Median of the first and the last quartile of the samples taken after the warm-up."""
    kept = [s for s in samples if s["t"] >= warmup] or samples
    quarter = max(1, len(kept) // 4)
    first = statistics.median(s[key] for s in kept[:quarter])
    last = statistics.median(s[key] for s in kept[-quarter:])
    xs, ys = [s["t"] for s in kept], [s[key] for s in kept]
    slope = 0.0
    if len(kept) > 2 and max(xs) > min(xs):
        mx, my = statistics.fmean(xs), statistics.fmean(ys)
        slope = (
            sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
            / sum((x - mx) ** 2 for x in xs)
            * 60
        )
    return {
        "first_quartile_median": first,
        "last_quartile_median": last,
        "change": last - first,
        "change_pct": 100 * (last - first) / first if first else 0,
        "min": min(ys),
        "max": max(ys),
        "slope_per_minute": slope,
        "samples": len(kept),
    }


def verdict(rss: dict[str, Any], fds: dict[str, Any]) -> str:
    """Growth beyond noise: RSS up more than max(5 %, 4 MiB), fds up more than max(10 %, 8)."""
    rss_grew = rss["change"] > max(0.05 * rss["first_quartile_median"], 4096)
    fds_grew = fds["change"] > max(0.10 * fds["first_quartile_median"], 8)
    if not (rss_grew or fds_grew):
        return "not growing"
    parts = []
    if rss_grew:
        parts.append(f"RSS +{rss['change'] / 1024:.1f} MiB")
    if fds_grew:
        parts.append(f"fds +{fds['change']:.0f}")
    return "growing (" + ", ".join(parts) + ")"


# ---- traffic ---------------------------------------------------------------------------------


async def traffic(
    url: str, seconds: float, seed: int, rate: float, statuses: Counter[str], controls: Counter[str]
) -> None:
    rng = random.Random(seed)
    names = list(MODELS)
    slots = asyncio.Semaphore(CONCURRENCY)
    tasks: set[asyncio.Task[None]] = set()
    end = time.monotonic() + seconds
    active = set(names)
    next_phase = next_control = time.monotonic()

    async def request(session: aiohttp.ClientSession) -> None:
        model = rng.choice(sorted(active)) if rng.random() < 0.97 else rng.choice(names)
        kind = rng.choices(["completion", "chat", "embedding"], weights=[5, 4, 1])[0]
        body: dict[str, Any] = {"model": model}
        if kind == "embedding":
            endpoint, body["input"] = "/v1/embeddings", "soak"
        else:
            body.update(max_tokens=rng.randint(1, 8), stream=rng.random() < 0.4)
            if kind == "chat":
                endpoint, body["messages"] = (
                    "/v1/chat/completions",
                    [{"role": "user", "content": "soak"}],
                )
            else:
                endpoint, body["prompt"] = "/v1/completions", "soak"
        try:
            async with session.post(url + endpoint, json=body) as resp:
                raw = await resp.read()
            ok = resp.status == 200 and (
                not body.get("stream") or raw.endswith(b"data: [DONE]\n\n")
            )
            statuses[str(resp.status) if ok or resp.status != 200 else "200-broken"] += 1
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            statuses[type(exc).__name__] += 1
        finally:
            slots.release()

    async def control(session: aiohttp.ClientSession) -> None:
        model = rng.choice(names)
        try:
            if rng.random() < 0.4:
                payload = {
                    "version": "4",
                    "status": "firing",
                    "receiver": "kvsleep",
                    "alerts": [
                        {
                            "status": "firing",
                            "labels": {
                                "alertname": "Soak",
                                "model": model,
                                "action": rng.choice(["sleep", "wake"]),
                            },
                        }
                    ],
                }
                async with session.post(url + "/alertmanager/webhook", json=payload) as resp:
                    controls[f"webhook {resp.status}"] += 1
            else:
                verb = rng.choice(["sleep", "wake"])
                quoted = urllib.parse.quote(model, safe="")
                async with session.post(f"{url}/models/{quoted}/{verb}?wait=false") as resp:
                    controls[f"{verb} {resp.status}"] += 1
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            controls[type(exc).__name__] += 1

    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(
        timeout=timeout, connector=aiohttp.TCPConnector(limit=CONCURRENCY + 4)
    ) as session:
        started = time.monotonic()
        sent = 0
        while (now := time.monotonic()) < end:
            if now >= next_phase:  # a new subset of models is busy; the others go idle
                active = set(rng.sample(names, rng.randint(1, len(names))))
                next_phase = now + rng.uniform(2, 6)
            if now >= next_control:
                task = asyncio.create_task(control(session))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                next_control = now + rng.uniform(1, 4)
            due = int((now - started) * rate) - sent
            for _ in range(max(0, due)):
                await slots.acquire()
                task = asyncio.create_task(request(session))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                sent += 1
            await asyncio.sleep(0.01)
        await asyncio.gather(*tasks)


async def hostile(url: str, seconds: float, counts: Counter[str]) -> None:
    """Slowloris connections (idle, half a head, half a body), each reopened when kvsleep
    closes it, and a 16 MiB request every few seconds."""
    host, port = urllib.parse.urlsplit(url).hostname, urllib.parse.urlsplit(url).port
    end = time.monotonic() + seconds
    head = b"POST /v1/completions HTTP/1.1\r\nHost: soak\r\n"
    first = {
        "idle": b"",
        "half head": head,
        "half body": head + b"Content-Length: 1000\r\n\r\n" + b'{"model": "' + b"x" * 400,
    }

    async def keep(kind: str) -> None:
        while (left := end - time.monotonic()) > 0:
            try:
                reader, writer = await asyncio.open_connection(host, port)
            except OSError as exc:
                counts[f"{kind}: {type(exc).__name__}"] += 1
                await asyncio.sleep(0.5)
                continue
            counts[f"{kind}: opened"] += 1
            try:
                if first[kind]:
                    writer.write(first[kind])
                    await writer.drain()
                await asyncio.wait_for(reader.read(), left)
                counts[f"{kind}: closed by kvsleep"] += 1
            except (OSError, asyncio.TimeoutError):
                pass
            finally:
                writer.close()

    async def big_bodies() -> None:
        model = next(iter(MODELS))
        body = b'{"model": "%s", "max_tokens": 1, "prompt": "' % model.encode()
        body += b"x" * (BIG_BODY_BYTES - len(body) - 2) + b'"}'
        headers = {"Content-Type": "application/json"}
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
            while time.monotonic() < end:
                try:
                    async with session.post(
                        url + "/v1/completions", data=body, headers=headers
                    ) as resp:
                        await resp.read()
                        counts[f"16 MiB request: {resp.status}"] += 1
                except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                    counts[f"16 MiB request: {type(exc).__name__}"] += 1
                await asyncio.sleep(BIG_BODY_EVERY_SECONDS)

    await asyncio.gather(
        big_bodies(), *(keep(kind) for kind, n in HOSTILE.items() for _ in range(n))
    )


async def sampler(
    pid: int,
    sim_pids: list[int],
    started: float,
    every: float,
    samples: list[dict[str, Any]],
    statuses: Counter[str],
    stop: asyncio.Event,
) -> None:
    while True:
        sample: dict[str, Any] = {
            "t": round(time.monotonic() - started, 2),
            **proc_sample(pid),
            "sims_rss_kib": sum(proc_sample(p)["rss_kib"] for p in sim_pids),
            "answers": sum(statuses.values()),
        }
        samples.append(sample)
        try:
            await asyncio.wait_for(stop.wait(), every)
            return
        except asyncio.TimeoutError:
            pass


async def run(args: argparse.Namespace, procs: P.Processes, workdir: Path) -> dict[str, Any]:
    seconds = args.minutes * 60
    urls = {name: start_sim(procs, name, flavor) for name, (flavor, _) in MODELS.items()}
    sim_children = list(procs.children)
    kvsleep, url = start_kvsleep(procs, workdir, urls)
    every = max(1.0, min(10.0, seconds / 120))
    samples: list[dict[str, Any]] = []
    statuses: Counter[str] = Counter()
    controls: Counter[str] = Counter()
    stop = asyncio.Event()
    started = time.monotonic()
    sampling = asyncio.create_task(
        sampler(kvsleep.pid, [c.pid for c in sim_children], started, every, samples, statuses, stop)
    )
    hostile_counts: Counter[str] = Counter()
    attack = asyncio.create_task(hostile(url, seconds, hostile_counts)) if args.hostile else None
    await traffic(url, seconds, args.seed, args.rate, statuses, controls)
    if attack is not None:
        await attack
    stop.set()
    await sampling
    elapsed = time.monotonic() - started

    engines: dict[str, Any] = {}
    async with aiohttp.ClientSession() as session:
        for name, engine_url in urls.items():
            async with session.get(engine_url + "/sim/stats") as resp:
                stats = await resp.json()
            engines[name] = {
                "hazards": stats["hazards"],
                "calls": stats["calls"],
                "served_while_not_awake": stats["requests"]["served_while_not_awake"],
                "completed": stats["requests"]["completed"],
                "aborted": stats["requests"]["aborted"],
            }
        async with session.get(url + "/sleep/status") as resp:
            states = {m: d["state"] for m, d in (await resp.json())["models"].items()}
    os.kill(kvsleep.pid, signal.SIGTERM)
    exit_code = kvsleep.popen.wait(60)
    log = kvsleep.log.read_text(errors="replace")

    warmup = min(60.0, 0.2 * elapsed)
    rss, fds = trend(samples, "rss_kib", warmup), trend(samples, "fds", warmup)
    threads = trend(samples, "threads", warmup)
    answers = sum(statuses.values())
    return {
        "meta": {
            "minutes": args.minutes,
            "seconds": round(elapsed, 1),
            "seed": args.seed,
            "rate": args.rate,
            "concurrency": CONCURRENCY,
            "models": {n: {"engine": f, **e} for n, (f, e) in MODELS.items()},
            "sample_every_seconds": every,
            "warmup_seconds": round(warmup, 1),
            "loadavg": P.loadavg(),
            "python": sys.version.split()[0],
            "tasks": "not measured: kvsleep exports no asyncio task count and the soak "
            "adds nothing to kvsleep (a task leak shows as RSS growth)",
        },
        "summary": {
            "rss_kib": rss,
            "fds": fds,
            "threads": threads,
            "verdict": verdict(rss, fds),
            "requests": answers,
            "requests_ok": statuses.get("200", 0),
            "statuses": dict(statuses),
            "control_answers": dict(controls),
            "hostile_client": dict(sorted(hostile_counts.items())),
            "kvsleep_exit_code": exit_code,
            "tracebacks_in_kvsleep_log": log.count("Traceback"),
            "final_states": states,
            "cycles": {
                name: {
                    "sleeps": e["calls"].get("/sleep", 0)
                    + e["calls"].get("/release_memory_occupation", 0),
                    "wakes": e["calls"].get("/collective_rpc", 0)
                    + e["calls"].get("/resume_memory_occupation", 0)
                    + (e["calls"].get("/wake_up", 0) if name == "soak/vllm-l1" else 0),
                }
                for name, e in engines.items()
            },
        },
        "engines": engines,
        "samples": samples,
    }


def render(result: dict[str, Any]) -> str:
    meta, summ = result["meta"], result["summary"]
    hazards = {n: e["hazards"] for n, e in result["engines"].items()}
    lines = [
        "# kvsleep soak",
        "",
        f"{meta['seconds']:.0f} s of traffic (seed {meta['seed']}, {meta['rate']:g} req/s, "
        f"concurrency {meta['concurrency']}) against `kvsleep serve` and three sim engines "
        f"(vLLM level 1, vLLM level 2, SGLang), auto-sleep after 2 s idle plus random manual "
        f"and Alertmanager sleeps and wakes. Load average at the end: {meta['loadavg']}.",
        "",
        f"**Verdict: {summ['verdict']}** (RSS and open fds of the kvsleep process, median of "
        f"the first vs the last quartile of samples after a {meta['warmup_seconds']:g} s "
        f"warm-up).",
        "",
        "| | first quartile | last quartile | change | min | max | slope / min |",
        "|---|---|---|---|---|---|---|",
    ]
    for key, label, scale in (
        ("rss_kib", "RSS (MiB)", 1024),
        ("fds", "open fds", 1),
        ("threads", "threads", 1),
    ):
        t = summ[key]
        lines.append(
            f"| {label} | {t['first_quartile_median'] / scale:.1f}"
            f" | {t['last_quartile_median'] / scale:.1f} | {t['change'] / scale:+.1f} "
            f"({t['change_pct']:+.1f} %) | {t['min'] / scale:.1f} | "
            f"{t['max'] / scale:.1f} | {t['slope_per_minute'] / scale:+.2f} |"
        )
    lines += [
        "",
        f"Asyncio tasks: {meta['tasks']}.",
        "",
        f"Requests answered: {summ['requests']:,}, of which 200 with a complete body: "
        f"{summ['requests_ok']:,}. All answers: `{json.dumps(summ['statuses'])}`; control "
        f"routes and webhook: `{json.dumps(summ['control_answers'])}`.",
        "",
        "Hostile client (slowloris connections kept open and reopened, 16 MiB requests): "
        + (f"`{json.dumps(summ['hostile_client'])}`." if summ["hostile_client"] else "off."),
        "",
        f"Engine hazards: `{json.dumps(hazards)}`; served while not awake: "
        f"{sum(e['served_while_not_awake'] for e in result['engines'].values())}; "
        f"tracebacks in kvsleep's log: {summ['tracebacks_in_kvsleep_log']}; kvsleep exit code "
        f"after SIGTERM: {summ['kvsleep_exit_code']}.",
        "",
        "Sleeps and wakes the engines received: "
        + ", ".join(
            f"{name} {cycles['sleeps']} / {cycles['wakes']}"
            for name, cycles in summ["cycles"].items()
        )
        + ".",
        "",
        "| t (s) | RSS MiB | fds | threads | sims RSS MiB | answers |",
        "|---|---|---|---|---|---|",
    ]
    samples = result["samples"]
    step = max(1, len(samples) // 12)
    for s in samples[::step] + ([samples[-1]] if (len(samples) - 1) % step else []):
        lines.append(
            f"| {s['t']:.0f} | {s['rss_kib'] / 1024:.1f} | {s['fds']} | {s['threads']} "
            f"| {s['sims_rss_kib'] / 1024:.1f} | {s['answers']:,} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = Path(tempfile.mkdtemp(prefix="kvsleep-soak-"))
    procs = P.Processes(workdir / "logs")
    try:
        result = asyncio.run(run(args, procs, workdir))
    finally:
        procs.stop_all()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "soak.json").write_text(json.dumps(result, indent=1))
    (args.out / "soak.md").write_text(render(result))
    summ = result["summary"]
    print(render(result).split("\n\n| t (s)")[0])
    print(f"logs in {workdir}; results in {args.out}/soak.json and soak.md")
    engines_clean = all(
        not e["hazards"] and not e["served_while_not_awake"] for e in result["engines"].values()
    )
    ok = (
        summ["requests_ok"] == summ["requests"]
        and engines_clean
        and summ["kvsleep_exit_code"] == 0
        and summ["verdict"] == "not growing"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
