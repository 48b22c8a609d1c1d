"""Per-model traffic: counts, in-flight requests, last activity and recent request rate.

The kvcached controller's TrafficMonitor API, kept call for call. Two changes of meaning make it
safe to drive sleep decisions from: a request is *in flight* from arrival until its last byte is
relayed, and the last-activity time moves at both ends, so idle time counts from the end of the
last request (a ten-minute stream is not "idle for ten minutes" when it finishes).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

# Called on every arrival with (model, now, idle gap): the seconds since the model's last
# activity when nothing was in flight, else None (a request joining others is no idle gap).
ArrivalListener = Callable[[str, float, float | None], None]

# Request-rate history is kept in one-second buckets for at most this long, so memory stays
# bounded whatever the request rate.
MAX_WINDOW_SECONDS = 3600


@dataclass
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
    """Counters for one model, and the clock they are read against."""

    clock: Callable[[], float]
    known_since: float
    total_requests: int = 0
    successful_requests: int = 0
    failed_requests: int = 0
    in_flight: int = 0
    last_activity_time: float = 0.0
    avg_response_time: float = 0.0
    _buckets: deque[list[float]] = field(default_factory=deque, repr=False)

    def note_arrival(self, now: float) -> None:
        second = float(int(now))
        if self._buckets and self._buckets[-1][0] == second:
            self._buckets[-1][1] += 1
        else:
            self._buckets.append([second, 1])
            while self._buckets[0][0] < second - MAX_WINDOW_SECONDS:
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
        return max(0.0, self.clock() - max(self.last_activity_time, self.known_since))

    def is_idle(self, idle_threshold_seconds: float = 300) -> bool:
        return self.in_flight == 0 and self.get_idle_time() > idle_threshold_seconds


class TrafficMonitor:
    """Traffic per model. Single-threaded (asyncio): no locks, every update is O(1)."""

    def __init__(self, idle_threshold_seconds: float = 300,
                 clock: Callable[[], float] = time.time,
                 models: Iterable[str] = ()) -> None:
        self.idle_threshold_seconds = idle_threshold_seconds
        self.clock = clock
        self.model_stats: dict[str, ModelActivityStats] = {}
        self.arrival_listeners: list[ArrivalListener] = []
        for name in models:
            self.add_model(name)

    async def start(self) -> None:
        """Kept for API compatibility: nothing runs in the background (memory is bounded)."""

    async def stop(self) -> None:
        """Kept for API compatibility."""

    def add_model(self, name: str) -> ModelActivityStats:
        """Make a model known with no traffic yet, so it can be idle before anyone calls it."""
        stats = self.model_stats.get(name)
        if stats is None:
            stats = self.model_stats[name] = ModelActivityStats(self.clock, self.clock())
        return stats

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
        stats.in_flight += 1
        stats.last_activity_time = now
        stats.note_arrival(now)
        return RequestStats(timestamp=now, model_name=model_name, endpoint_path=endpoint_path)

    def record_request_end(self, request_stats: RequestStats, success: bool = True,
                           response_time: float | None = None,
                           error_message: str | None = None) -> None:
        if request_stats.ended:
            return
        now = self.clock()
        request_stats.ended = True
        request_stats.response_time = (now - request_stats.timestamp
                                       if response_time is None else response_time)
        request_stats.success = success
        request_stats.error_message = error_message
        stats = self.model_stats.get(request_stats.model_name)
        if stats is None:  # removed while the request ran: it must not come back
            return
        stats.in_flight = max(0, stats.in_flight - 1)
        stats.last_activity_time = now
        stats.total_requests += 1
        if success:
            stats.successful_requests += 1
            n = stats.successful_requests
            stats.avg_response_time += (request_stats.response_time - stats.avg_response_time) / n
        else:
            stats.failed_requests += 1

    def get_model_stats(self, model_name: str) -> ModelActivityStats | None:
        return self.model_stats.get(model_name)

    def get_all_model_stats(self) -> dict[str, ModelActivityStats]:
        return dict(self.model_stats)

    def get_idle_models(self, idle_threshold_seconds: float | None = None) -> list[str]:
        threshold = self._threshold(idle_threshold_seconds)
        return [name for name, s in self.model_stats.items() if s.is_idle(threshold)]

    def get_active_models(self, idle_threshold_seconds: float | None = None) -> list[str]:
        threshold = self._threshold(idle_threshold_seconds)
        return [name for name, s in self.model_stats.items() if not s.is_idle(threshold)]

    def get_traffic_summary(self, window_seconds: float = 60) -> dict[str, dict[str, object]]:
        return {name: self.describe(name, window_seconds) for name in self.model_stats}

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
