"""What a refused request must leave untouched: model states, engines, metric series, logs.

`Snapshot.take` before a batch of bad input and `assert_unchanged` after it; `assert_no_traceback`
on pytest's caplog. Used by the bad-input and access tests.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

SeriesKey = tuple[str, frozenset[tuple[str, str]]]


async def series(session: aiohttp.ClientSession, url: str) -> dict[SeriesKey, float]:
    """Every sample of kvsleep's /metrics, keyed by name and labels."""
    async with session.get(f"{url}/metrics") as resp:
        assert resp.status == 200
        text = await resp.text()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def engine_requests(sim: Any) -> int:
    """Inference requests the engine has seen (its ordered log, capped at 200 events)."""
    return sum(1 for e in sim.sim.events if e["event"] == "request")


@dataclass
class Snapshot:
    states: dict[str, str]
    held: dict[str, int]
    control_calls: list[dict[str, int]]
    engine_requests: list[int]
    series: set[SeriesKey]

    @classmethod
    async def take(cls, session: aiohttp.ClientSession, kv: Any, sims: list[Any]) -> Snapshot:
        await asyncio.sleep(0.05)  # let anything a refused request might have started show
        slots = kv.manager.slots
        return cls(
            states={name: slot.state.value for name, slot in slots.items()},
            held={name: len(slot.waiters) for name, slot in slots.items()},
            control_calls=[dict(sim.sim.calls) for sim in sims],
            engine_requests=[engine_requests(sim) for sim in sims],
            series=set(await series(session, kv.url)),
        )

    def assert_unchanged(self, after: Snapshot, what: str) -> None:
        assert after.states == self.states, f"{what}: model states changed"
        assert after.held == self.held, f"{what}: requests left held"
        assert after.control_calls == self.control_calls, f"{what}: engines got control calls"
        assert after.engine_requests == self.engine_requests, f"{what}: engines got requests"
        new = sorted(after.series - self.series, key=str)
        assert not new, f"{what}: new metric series {new[:5]}"
        gone = sorted(self.series - after.series, key=str)
        assert not gone, f"{what}: metric series vanished {gone[:5]}"


def assert_no_traceback(
    records: list[logging.LogRecord],
    what: str,
    *,
    errors_allowed_from: tuple[str, ...] = (),
    ignored: tuple[str, ...] = (),
) -> None:
    """No record carries a traceback or aiohttp's "Error handling request", and nothing logs
    at ERROR except the loggers in `errors_allowed_from` (e.g. a rejected config reload says
    so, without a traceback). Loggers in `ignored` are not looked at."""
    for record in records:
        if ignored and record.name.startswith(ignored):
            continue
        text = record.getMessage()
        assert record.exc_info is None, f"{what}: traceback logged by {record.name}: {text}"
        assert "Traceback" not in text and "Error handling request" not in text, (what, text)
        if not (errors_allowed_from and record.name.startswith(errors_allowed_from)):
            assert record.levelno < logging.ERROR, f"{what}: {record.name} logged {text!r}"
