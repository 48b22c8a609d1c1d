"""Per-model traffic: counts, in-flight requests, last activity and recent request rate.

The kvcached controller's TrafficMonitor API, kept call for call (docs/kvcached.md). Two changes of
meaning make it safe to drive sleep decisions from: a request is *in flight* from arrival until its
last byte is relayed, and the last-activity time moves at both ends, so idle time counts from the
end of the last request (a ten-minute stream is not "idle for ten minutes" when it finishes).

Models kvsleep is configured with are known before their first request, so that a model nobody
uses still becomes idle and can be slept; the kvcached views of traffic (`get_traffic_summary`,
`get_active_models`, `get_model_stats`) list, as kvcached does, only models that saw traffic.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
import time
from collections import defaultdict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

# Called on every arrival with (model, now, idle gap): the seconds since the model's last
# activity when nothing was in flight, else None (a request joining others is no idle gap).
ArrivalListener = Callable[[str, float, float | None], None]

# Request-rate history is kept in one-second buckets for at most this long, so memory stays
# bounded whatever the request rate.
MAX_WINDOW_SECONDS = 3600
# How often a started monitor drops the history of models that stopped receiving requests
# (kvcached's cleanup period).
CLEANUP_INTERVAL_SECONDS = 300.0

log = logging.getLogger(__name__)


@dataclass(slots=True)
class RequestStats:
    """One request, from `record_request_start` to `record_request_end`."""

    timestamp: float
    model_name: str
    endpoint_path: str
    response_time: float | None = None
    success: bool = True
    error_message: str | None = None
    ended: bool = False


@dataclass
class ModelActivityStats:
    """Counters for one model, and the clock they are read against.

    The first five fields are kvcached's, in its order, so `ModelActivityStats()` and positional
    construction work as they do there.
    """

    total_requests: int = 0
    successful_requests: int = 0
    failed_requests: int = 0
    last_activity_time: float = 0.0
    avg_response_time: float = 0.0
    clock: Callable[[], float] = field(default=time.time, repr=False)
    known_since: float | None = None
    in_flight: int = 0
    # The integral of in_flight over time (request-seconds) up to `in_flight_changed`: the
    # scaler weighs the mean over its pass, not whatever is in flight the instant it looks.
    in_flight_area: float = 0.0
    in_flight_changed: float = 0.0
    _buckets: deque[list[float]] = field(default_factory=deque, repr=False)

    def __post_init__(self) -> None:
        if self.known_since is None:
            self.known_since = self.clock()

    def in_flight_area_at(self, now: float) -> float:
        """Request-seconds in flight from the start up to `now`."""
        return self.in_flight_area + self.in_flight * max(0.0, now - self.in_flight_changed)

    @property
    def has_traffic(self) -> bool:
        """A request has arrived (kvcached lists only such models)."""
        return self.total_requests > 0 or self.in_flight > 0

    def add_request(self, request_stats: RequestStats) -> None:
        """Count a finished request whose start is its activity time (kvcached's method, for
        code that feeds statistics itself; the monitor's own path is `record_request_end`)."""
        self.note_arrival(request_stats.timestamp)
        self.last_activity_time = max(self.last_activity_time, request_stats.timestamp)
        self.count(request_stats)

    def count(self, request_stats: RequestStats) -> None:
        """Add a finished request to the totals and the running mean of response time."""
        self.total_requests += 1
        if request_stats.success:
            self.successful_requests += 1
            if request_stats.response_time:
                n = self.successful_requests
                self.avg_response_time += (request_stats.response_time - self.avg_response_time) / n
        else:
            self.failed_requests += 1

    def note_arrival(self, when: float) -> None:
        second = float(int(when))
        buckets = self._buckets
        if buckets and buckets[-1][0] == second:
            buckets[-1][1] += 1
        elif not buckets or buckets[-1][0] < second:
            buckets.append([second, 1])
        else:  # an earlier time (add_request of a past request): keep the buckets in order
            i = bisect.bisect_left([b[0] for b in buckets], second)
            if buckets[i][0] == second:
                buckets[i][1] += 1
            else:
                buckets.insert(i, [second, 1])
        self.prune(buckets[-1][0])

    def prune(self, now: float) -> None:
        """Drop rate history older than the longest window anyone may ask for."""
        while self._buckets and self._buckets[0][0] < int(now) - MAX_WINDOW_SECONDS:
            self._buckets.popleft()

    def get_request_rate(self, window_seconds: float = 60) -> float:
        """Requests per second that arrived within the last `window_seconds`."""
        if window_seconds <= 0:
            return 0.0
        cutoff = self.clock() - window_seconds
        count = sum(n for second, n in reversed(self._buckets) if second >= int(cutoff))
        return count / window_seconds

    def get_idle_time(self) -> float:
        """Seconds since the last request started or ended (or since the model became known)."""
        if self.in_flight:
            return 0.0
        return max(0.0, self.clock() - max(self.last_activity_time, self.known_since or 0.0))

    def is_idle(self, idle_threshold_seconds: float = 300) -> bool:
        return self.in_flight == 0 and self.get_idle_time() > idle_threshold_seconds


class TrafficMonitor:
    """Traffic per model. Single-threaded (asyncio): no locks, every update is O(1)."""

    def __init__(
        self,
        idle_threshold_seconds: float = 300,
        clock: Callable[[], float] = time.time,
        models: Iterable[str] = (),
    ) -> None:
        self.idle_threshold_seconds = idle_threshold_seconds
        self.clock = clock
        # A defaultdict as in kvcached: `model_stats[name]` makes a model known.
        self.model_stats: defaultdict[str, ModelActivityStats] = defaultdict(self._new_stats)
        self.arrival_listeners: list[ArrivalListener] = []
        self._running = False
        self._cleanup_task: asyncio.Task[None] | None = None
        for name in models:
            self.add_model(name)

    def _new_stats(self) -> ModelActivityStats:
        return ModelActivityStats(clock=self.clock)

    async def start(self) -> None:
        """Start the periodic cleanup of stale rate history (memory is bounded without it)."""
        self._running = True
        if self._cleanup_task is None:
            self._cleanup_task = asyncio.create_task(
                self._periodic_cleanup(), name="kvsleep-traffic-cleanup"
            )

    async def stop(self) -> None:
        self._running = False
        task, self._cleanup_task = self._cleanup_task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _periodic_cleanup(self, interval: float = CLEANUP_INTERVAL_SECONDS) -> None:
        """Every `interval` seconds, drop rate history older than the longest window, also of
        models that no longer receive requests (kvcached's name; its users call it)."""
        while self._running:
            await asyncio.sleep(interval)
            self.cleanup()

    def cleanup(self) -> None:
        now = self.clock()
        for stats in self.model_stats.values():
            stats.prune(now)
        log.debug("pruned traffic history of %d models", len(self.model_stats))

    def add_model(self, name: str) -> ModelActivityStats:
        """Make a model known with no traffic yet, so it can be idle before anyone calls it."""
        return self.model_stats[name]

    def remove_model(self, name: str) -> None:
        self.model_stats.pop(name, None)

    def record_request_start(self, model_name: str, endpoint_path: str) -> RequestStats:
        now = self.clock()
        stats = self.add_model(model_name)
        if self.arrival_listeners:
            idle = stats.in_flight == 0 and stats.total_requests > 0
            gap = max(0.0, now - stats.last_activity_time) if idle else None
            for listener in self.arrival_listeners:
                listener(model_name, now, gap)
        # Inline, not a method: this runs for every request (see in_flight_area_at; a wall
        # clock set back adds nothing).
        if now > stats.in_flight_changed:
            stats.in_flight_area += stats.in_flight * (now - stats.in_flight_changed)
        stats.in_flight_changed = now
        stats.in_flight += 1
        stats.last_activity_time = now
        stats.note_arrival(now)
        return RequestStats(timestamp=now, model_name=model_name, endpoint_path=endpoint_path)

    def record_request_end(
        self,
        request_stats: RequestStats,
        success: bool = True,
        response_time: float | None = None,
        error_message: str | None = None,
    ) -> None:
        if request_stats.ended:
            return
        now = self.clock()
        request_stats.ended = True
        request_stats.response_time = (
            now - request_stats.timestamp if response_time is None else response_time
        )
        request_stats.success = success
        request_stats.error_message = error_message
        stats = self.model_stats.get(request_stats.model_name)
        if stats is None:  # removed while the request ran: it must not come back
            return
        if now > stats.in_flight_changed:
            stats.in_flight_area += stats.in_flight * (now - stats.in_flight_changed)
        stats.in_flight_changed = now
        stats.in_flight = max(0, stats.in_flight - 1)
        stats.last_activity_time = now
        stats.count(request_stats)

    def get_model_stats(self, model_name: str) -> ModelActivityStats | None:
        """The model's statistics, or None when it saw no traffic (as kvcached)."""
        stats = self.model_stats.get(model_name)
        return stats if stats is not None and stats.has_traffic else None

    def get_all_model_stats(self) -> dict[str, ModelActivityStats]:
        return {name: s for name, s in self.model_stats.items() if s.has_traffic}

    def get_idle_models(self, idle_threshold_seconds: float | None = None) -> list[str]:
        threshold = self._threshold(idle_threshold_seconds)
        return [name for name, s in self.model_stats.items() if s.is_idle(threshold)]

    def get_active_models(self, idle_threshold_seconds: float | None = None) -> list[str]:
        """Models that saw traffic and are not idle (a model never used is not active)."""
        threshold = self._threshold(idle_threshold_seconds)
        return [
            name
            for name, s in self.model_stats.items()
            if s.has_traffic and not s.is_idle(threshold)
        ]

    def get_traffic_summary(self, window_seconds: float = 60) -> dict[str, dict[str, object]]:
        """kvcached's per-model summary, of the models that saw traffic."""
        return {
            name: self.describe(name, window_seconds)
            for name, s in self.model_stats.items()
            if s.has_traffic
        }

    def describe(self, model_name: str, window_seconds: float = 60) -> dict[str, object]:
        """The kvcached controller's per-model keys, plus `in_flight`."""
        s = self.model_stats[model_name]
        return {
            "total_requests": s.total_requests,
            "successful_requests": s.successful_requests,
            "failed_requests": s.failed_requests,
            "in_flight": s.in_flight,
            "request_rate": s.get_request_rate(window_seconds),
            "avg_response_time": s.avg_response_time,
            "last_activity_time": s.last_activity_time,
            "idle_time_seconds": s.get_idle_time(),
            "is_idle": s.is_idle(self.idle_threshold_seconds),
        }

    def _threshold(self, value: float | None) -> float:
        return self.idle_threshold_seconds if value is None else value
