"""Chaos: 3,000 requests across four models while sleeps and wakes fire at random.

A seeded RNG interleaves bursts of plain and streamed requests (completions, chat, embeddings)
to two vLLM engines (one at sleep level 2) and two SGLang engines with idle sleeps (FakeClock
advance + reconcile), manual sleeps and wakes over the HTTP control routes, and Alertmanager
webhook payloads. Every request is answered 200 in full, held requests are let through to
their engine in the order they were held, the engines suffer no hazard and see nothing while
not awake, and kvsleep's state, its metrics and the engines' call counts agree at the end.
Three seeds; each run takes 3-5 s on 2 shared cores (and fails past 50 s).
"""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import json
import random
import time
import urllib.parse
from collections import defaultdict, deque
from typing import Any

import aiohttp
import pytest

from tests.kvsleep_harness import sim_model

SEEDS = (20261127, 7, 1234)
REQUESTS = 3000
CONCURRENCY = 48
A, B, C, D = "chaos/vllm-a", "chaos/vllm-b-level2", "chaos/sglang-c", "chaos/sglang-d"
MODELS = (A, B, C, D)
FAST = {
    "tokens_per_second": 2000.0,
    "wake_latency": 0.02,
    "sleep_latency": 0.01,
    "reload_latency": 0.01,
}


class RecordingDeque(deque):
    """A model's hold queue that notes the ticket of each request as it is held."""

    def __init__(self, log: list[int], ticket: contextvars.ContextVar[int]) -> None:
        super().__init__()
        self._log, self._ticket = log, ticket

    def append(self, item: Any) -> None:
        self._log.append(self._ticket.get())
        super().append(item)


class Order:
    """Per model: the order requests were held in, and the order they reached the engine."""

    def __init__(self, kv: Any) -> None:
        self.held: dict[str, list[int]] = defaultdict(list)
        self.forwarded: dict[str, list[int]] = defaultdict(list)
        ticket: contextvars.ContextVar[int] = contextvars.ContextVar("ticket")
        numbers = itertools.count()
        router = kv.server.router
        hold, forward = router._hold, router._forward

        async def tracked_hold(request: Any, model: str, *args: Any, **kwargs: Any) -> Any:
            ticket.set(next(numbers))
            return await hold(request, model, *args, **kwargs)

        async def tracked_forward(request: Any, slot: Any, *args: Any, **kwargs: Any) -> Any:
            # A request for an awake model is admitted without `_hold`: numbered here.
            self.forwarded[slot.cfg.name].append(ticket.get(next(numbers)))
            return await forward(request, slot, *args, **kwargs)

        router._hold, router._forward = tracked_hold, tracked_forward
        for name, slot in kv.manager.slots.items():
            slot.waiters = RecordingDeque(self.held[name], ticket)

    def check(self) -> int:
        total = 0
        for model, held in self.held.items():
            seen = set(held)
            assert len(seen) == len(held), f"{model}: a request was held twice"
            let_through = [t for t in self.forwarded[model] if t in seen]
            assert let_through == held, (
                f"{model}: held {held[:20]}..., let through {let_through[:20]}..."
            )
            total += len(held)
        return total


def request_body(rng: random.Random, model: str) -> tuple[str, dict[str, Any]]:
    kind = rng.choices(["completion", "chat", "embedding"], weights=[5, 4, 1])[0]
    if kind == "embedding":
        return "/v1/embeddings", {"model": model, "input": ["a", "b"][: rng.randint(1, 2)]}
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": rng.randint(1, 4),
        "stream": rng.random() < 0.45,
    }
    if kind == "chat":
        return "/v1/chat/completions", {**body, "messages": [{"role": "user", "content": "x"}]}
    return "/v1/completions", {**body, "prompt": "x"}


def alert_payload(rng: random.Random) -> dict[str, Any]:
    alerts = [
        {
            "status": rng.choice(["firing", "firing", "resolved"]),
            "labels": {
                "alertname": "Chaos",
                "model": rng.choice(MODELS),
                "action": rng.choice(["sleep", "sleep", "wake"]),
            },
        }
        for _ in range(rng.randint(1, 3))
    ]
    return {"version": "4", "status": "firing", "receiver": "kvsleep", "alerts": alerts}


def truth(stats: dict[str, Any]) -> str:
    if stats["flavor"] == "vllm":
        return "asleep" if stats["engine"]["sleep_level"] is not None else "awake"
    return "asleep" if stats["engine"]["released"] else "awake"


@pytest.mark.timeout(50)
@pytest.mark.parametrize("seed", SEEDS)
async def test_chaos_every_admitted_request_is_served_in_order_without_hazards(
    seed, sim_factory, kvsleep_factory
):
    sims = {
        A: await sim_factory("vllm", A, **FAST),
        B: await sim_factory("vllm", B, **FAST),
        C: await sim_factory("sglang", C, **FAST),
        D: await sim_factory("sglang", D, weights_path="/weights/d", **FAST),
    }
    kv = await kvsleep_factory(
        [
            sim_model(sims[A]),
            sim_model(sims[B], sleep_level=2),
            sim_model(sims[C]),
            sim_model(sims[D], weights_path="/weights/d"),
        ],
        idle_threshold_seconds=30,
        wake_timeout_seconds=20,
        max_held_requests=100_000,
    )
    order = Order(kv)
    rng = random.Random(seed)
    slots = asyncio.Semaphore(CONCURRENCY)
    failures: list[Any] = []
    answers: list[tuple[str, int, str]] = []
    requests: list[asyncio.Task[None]] = []
    controls: list[asyncio.Task[None]] = []
    ops: dict[str, int] = defaultdict(int)

    async def one(session: aiohttp.ClientSession, endpoint: str, body: dict[str, Any]) -> None:
        try:
            async with session.post(kv.url + endpoint, json=body) as resp:
                raw = await resp.read()
            if resp.status != 200:
                failures.append((endpoint, body, resp.status, raw[:300]))
            elif body.get("stream"):
                events = [
                    line[6:] for line in raw.decode().split("\n") if line.startswith("data: ")
                ]
                if (
                    events[-1:] != ["[DONE]"]
                    or any('"error"' in e for e in events)
                    or any('"abort"' in e for e in events)
                ):
                    failures.append((endpoint, body, "bad stream", raw[-300:]))
            elif not ({"choices", "data"} & set(json.loads(raw))):
                failures.append((endpoint, body, "bad answer", raw[:300]))
        except Exception as exc:  # counted, not raised: every failure is reported at the end
            failures.append((endpoint, body, repr(exc)))
        finally:
            slots.release()

    async def control(
        session: aiohttp.ClientSession, what: str, path: str, payload: Any = None
    ) -> None:
        async with session.post(kv.url + path, json=payload) as resp:
            answers.append((what, resp.status, (await resp.text())[:300]))

    started = time.monotonic()
    async with aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=30),
        connector=aiohttp.TCPConnector(limit=CONCURRENCY + 16),
    ) as session:
        launched = 0
        while launched < REQUESTS:
            op = rng.choices(
                ["burst", "idle", "quiet-idle", "manual", "alert", "pause"],
                weights=[12, 3, 1, 3, 2, 3],
            )[0]
            ops[op] += 1
            if op == "burst":
                for _ in range(min(rng.randint(1, 40), REQUESTS - launched)):
                    await slots.acquire()
                    endpoint, body = request_body(rng, rng.choice(MODELS))
                    requests.append(asyncio.create_task(one(session, endpoint, body)))
                    launched += 1
            elif op in ("idle", "quiet-idle"):
                if op == "quiet-idle":  # let everything finish so that every model is idle
                    await asyncio.gather(*requests, *controls)
                kv.clock.advance(31)
                await kv.reconcile()
            elif op == "manual":
                model = rng.choice(MODELS)
                name = urllib.parse.quote(model, safe="") if rng.random() < 0.5 else model
                verb = rng.choice(["sleep", "sleep", "wake"])
                path = rng.choice(
                    [
                        f"/models/{name}/{verb}",
                        f"/action/{'sleep' if verb == 'sleep' else 'wakeup'}/{name}",
                    ]
                )
                if rng.random() < 0.5:
                    path += "?wait=false"
                controls.append(asyncio.create_task(control(session, verb, path)))
            elif op == "alert":
                controls.append(
                    asyncio.create_task(
                        control(session, "alert", "/alertmanager/webhook", alert_payload(rng))
                    )
                )
            else:
                await asyncio.sleep(rng.uniform(0, 0.005))
        await asyncio.wait_for(asyncio.gather(*requests, *controls), 30)
        for slot in kv.manager.slots.values():
            if slot.worker is not None:
                await asyncio.wait_for(asyncio.shield(slot.worker), 10)
    elapsed = time.monotonic() - started

    assert not failures, f"{len(failures)} of {REQUESTS} failed, e.g. {failures[:3]}"
    assert len(requests) == REQUESTS
    for what, status, text in answers:
        # A manual sleep may lose to requests held meanwhile (400 "failed"), and, as kvcached's
        # routes do, a sleep of an asleep model or a wake of an awake one is 400; nothing else.
        allowed = {"sleep": (200, 202, 400), "wake": (200, 202, 400), "alert": (200,)}[what]
        assert status in allowed, (what, status, text)
    held = order.check()
    assert held >= 100, f"only {held} requests were held: the chaos did not bite"

    registry = kv.server.metrics.registry

    def metric(name: str, **labels: str) -> float:
        return registry.get_sample_value(name, labels) or 0.0

    served = sum(
        metric("kvsleep_requests_total", model=m, endpoint=e, code="200")
        for m in MODELS
        for e in ("/v1/completions", "/v1/chat/completions", "/v1/embeddings")
    )
    assert served == REQUESTS
    sleeps = {
        r: sum(metric("kvsleep_sleeps_total", model=m, reason=r, result="ok") for m in MODELS)
        for r in ("idle", "manual", "alert")
    }
    assert all(sleeps.values()), f"every kind of sleep should have happened: {sleeps}"
    assert (
        sum(metric("kvsleep_wakes_total", model=m, reason="request", result="ok") for m in MODELS)
        > 0
    )
    for model, sim in sims.items():
        stats = sim.sim.stats()
        assert stats["hazards"] == {}, (model, stats["hazards"])
        assert stats["requests"]["served_while_not_awake"] == 0, model
        assert stats["requests"]["aborted"] == 0, model
        assert stats["state"] != "dead", model
        slot = kv.manager.slots[model]
        assert not slot.waiters and slot.in_engine == 0, model
        assert slot.state.value in ("awake", "asleep") and slot.state.value == truth(stats), (
            model,
            slot.state.value,
            stats["engine"],
        )
        assert metric("kvsleep_held_requests", model=model) == 0
        assert metric("kvsleep_requests_in_flight", model=model) == 0
        for result in ("error",):
            for reason in ("idle", "manual", "alert", "request", "reconcile"):
                assert (
                    metric("kvsleep_sleeps_total", model=model, reason=reason, result=result) == 0
                ), (model, reason)
                assert (
                    metric("kvsleep_wakes_total", model=model, reason=reason, result=result) == 0
                ), (model, reason)
        ok_sleeps = sum(
            metric("kvsleep_sleeps_total", model=model, reason=r, result="ok")
            for r in ("idle", "manual", "alert", "reconcile")
        )
        ok_wakes = sum(
            metric("kvsleep_wakes_total", model=model, reason=r, result="ok")
            for r in ("request", "manual", "alert", "reconcile")
        )
        calls = stats["calls"]
        if model == A:
            assert (calls.get("/sleep", 0), calls.get("/wake_up", 0)) == (ok_sleeps, ok_wakes)
        elif model == B:  # level 2: wake weights, reload, wake the KV cache
            assert calls.get("/sleep", 0) == ok_sleeps
            assert calls.get("/wake_up", 0) == 2 * ok_wakes
            assert calls.get("/collective_rpc", 0) == ok_wakes
        else:
            assert calls.get("/release_memory_occupation", 0) == ok_sleeps
            assert calls.get("/resume_memory_occupation", 0) == ok_wakes
            assert calls.get("/update_weights_from_disk", 0) == ok_wakes
        assert ok_sleeps - ok_wakes == (1 if slot.state.value == "asleep" else 0), model
        assert ok_wakes > 0, f"{model} never woke"
    print(
        f"\nchaos seed {seed}: {REQUESTS} requests, {held} held, sleeps {sleeps}, ops {dict(ops)}, "
        f"{elapsed:.1f}s"
    )
