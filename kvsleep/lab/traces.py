"""Seeded synthetic request traces, for `kvsleep simulate --synthetic NAME` and the tests.

Four shapes of traffic, each over three models of different sizes and wake times (the same
models, described by `SYNTHETIC_CONFIG`):

- `poisson`: steady Poisson arrivals, a different rate per model (2 days).
- `bursty`: on/off sessions: requests seconds apart while on, silence for tens of minutes (2 days).
- `diurnal`: a daily cycle, busy afternoons and empty nights (3 days).
- `batch`: one batch job per model (requests back to back for a while), then nothing (1 day).

Two more, for `kvsleep simulate --replicas N` (one model, `chat-8b`, busy enough for several
replicas): `step` (one replica's load, then three replicas' worth, then one again) and `sine` (a
diurnal day: the rate a sine wave from nothing to three replicas' worth).

The same name and seed always give the same trace.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from typing import Any

from kvsleep.lab.simulate import Request, Trace

START = 1_700_006_400.0  # 2023-11-15T00:00:00Z: a midnight, so `diurnal` days line up
HOUR = 3600.0
DAY = 86400.0

MODELS = {
    # name: (GB held awake, wake seconds)
    "chat-8b": (16.0, 4.0),
    "code-32b": (64.0, 20.0),
    "embed-1b": (3.0, 2.0),
}

SYNTHETIC_CONFIG: dict[str, Any] = {
    "sleep_manager": {
        "idle_threshold_seconds": 300,
        "check_interval_seconds": 30,
        "auto_sleep_enabled": True,
        "min_idle_threshold_seconds": 30,
        "max_idle_threshold_seconds": 3600,
    },
    "models": [
        {
            "name": name,
            "engine": "vllm",
            "url": f"http://127.0.0.1:{18000 + i}",
            "memory_gb": gb,
            "wake_eta_seconds": wake,
        }
        for i, (name, (gb, wake)) in enumerate(MODELS.items())
    ],
}


def _duration(rng: random.Random) -> float:
    """Seconds a request takes: mostly a few seconds, sometimes a long generation."""
    return round(min(120.0, 0.3 + rng.expovariate(1 / 3.0)), 3)


def _poisson(
    rng: random.Random, model: str, mean_gap: float, start: float, end: float
) -> list[Request]:
    out, t = [], start + rng.expovariate(1 / mean_gap)
    while t < end:
        out.append(Request(round(t, 3), model, _duration(rng)))
        t += rng.expovariate(1 / mean_gap)
    return out


def poisson(rng: random.Random) -> Trace:
    end = START + 2 * DAY
    gaps = {"chat-8b": 40.0, "code-32b": 240.0, "embed-1b": 1500.0}
    return Trace.of(
        [r for m, g in gaps.items() for r in _poisson(rng, m, g, START, end)], START, end, "poisson"
    )


def bursty(rng: random.Random) -> Trace:
    """Sessions: on for ~`on` seconds with requests ~`gap` apart, then off for ~`off`."""
    end = START + 2 * DAY
    shapes = {
        "chat-8b": (900.0, 8.0, 2700.0),
        "code-32b": (600.0, 20.0, 7200.0),
        "embed-1b": (120.0, 3.0, 1800.0),
    }
    requests = []
    for model, (on, gap, off) in shapes.items():
        t = START + rng.expovariate(1 / off)
        while t < end:
            session_end = min(end, t + rng.expovariate(1 / on))
            requests += _poisson(rng, model, gap, t, session_end)
            t = session_end + rng.expovariate(1 / off)
    return Trace.of(requests, START, end, "bursty")


def diurnal(rng: random.Random) -> Trace:
    """Rate peaks at 15:00 and is zero from 21:00 to 09:00 (thinning of a Poisson process)."""
    end = START + 3 * DAY
    peak_gaps = {"chat-8b": 15.0, "code-32b": 90.0, "embed-1b": 600.0}

    def shape(t: float) -> float:
        hour = ((t - START) % DAY) / HOUR
        return max(0.0, math.sin(math.pi * (hour - 9.0) / 12.0)) ** 2 if 9 <= hour <= 21 else 0.0

    requests = [
        Request(r.t, r.model, r.duration)
        for m, g in peak_gaps.items()
        for r in _poisson(rng, m, g, START, end)
        if rng.random() < shape(r.t)
    ]
    return Trace.of(requests, START, end, "diurnal")


def batch(rng: random.Random) -> Trace:
    """One job per model: requests ~`gap` apart for `length` seconds from `at`, then silence."""
    end = START + DAY
    jobs = {
        "chat-8b": (3 * HOUR, 1800.0, 2.0),
        "code-32b": (10 * HOUR, 3600.0, 6.0),
        "embed-1b": (1 * HOUR, 600.0, 0.5),
    }
    requests = [
        r
        for m, (at, length, gap) in jobs.items()
        for r in _poisson(rng, m, gap, START + at, START + at + length)
    ]
    return Trace.of(requests, START, end, "batch")


SYNTHETIC: dict[str, Callable[[random.Random], Trace]] = {
    "poisson": poisson,
    "bursty": bursty,
    "diurnal": diurnal,
    "batch": batch,
}

# ---- traces for several replicas of one model (`kvsleep simulate --replicas N`) --------------

SCALED_MODEL = "chat-8b"
# One replica's load: requests in flight on average. Under the replica lab's defaults (a replica
# serves 12 at once, the scaler aims at 8 per awake replica) one replica carries it, three
# replicas' worth (18) needs three.
REPLICA_LOAD = 6.0
MEAN_LONG_DURATION = 20.0


def _long_duration(rng: random.Random) -> float:
    """Seconds a chat generation takes: a few seconds to a few minutes (mean about 20 s)."""
    return round(min(300.0, 2.0 + rng.expovariate(1 / (MEAN_LONG_DURATION - 2.0))), 3)


def _rate(replicas: float) -> float:
    """Arrivals per second that keep `replicas` replicas' worth of requests in flight."""
    return replicas * REPLICA_LOAD / MEAN_LONG_DURATION


def _varying(
    rng: random.Random, rate: Callable[[float], float], top: float, start: float, end: float
) -> list[Request]:
    """A Poisson process of rate `rate(t)` <= `top` (thinning), durations `_long_duration`."""
    out, t = [], start + rng.expovariate(top)
    while t < end:
        if rng.random() * top < rate(t):
            out.append(Request(round(t, 3), SCALED_MODEL, _long_duration(rng)))
        t += rng.expovariate(top)
    return out


def step(rng: random.Random) -> Trace:
    """A load one replica carries with room to spare (4 in flight on average, half the default
    target, so chance peaks seldom cross it) for 20 min, three replicas' worth for 30 min, the
    first load again for 40 min: the step itself is what the strategies answer differently."""
    up, down, end = START + 20 * 60, START + 50 * 60, START + 90 * 60

    def rate(t: float) -> float:
        return _rate(3.0 if up <= t < down else 4 / REPLICA_LOAD)

    return Trace.of(_varying(rng, rate, _rate(3.0), START, end), START, end, "step")


def sine(rng: random.Random) -> Trace:
    """A diurnal day: the rate is a sine wave from nothing at 03:00 to three replicas' worth at
    15:00."""
    end = START + DAY

    def rate(t: float) -> float:
        phase = 2 * math.pi * ((t - START) / DAY - 3 / 24)
        return _rate(3.0) * (1 - math.cos(phase)) / 2

    return Trace.of(_varying(rng, rate, _rate(3.0), START, end), START, end, "sine")


REPLICA_TRACES: dict[str, Callable[[random.Random], Trace]] = {"step": step, "sine": sine}


def synthetic(name: str, seed: int = 0) -> Trace:
    shapes = {**SYNTHETIC, **REPLICA_TRACES}
    if name not in shapes:
        raise KeyError(f"unknown synthetic trace {name!r} (one of: {', '.join(shapes)})")
    trace = shapes[name](random.Random(f"{name}/{seed}"))
    trace.name = f"synthetic {name} (seed {seed})"
    return trace
