"""How late the event loop runs what is due: the measure of anything that blocks it.

Every request, chunk and wake-up of foreman goes through one event loop, so
whatever holds it (a slow statement, a checkpoint, a big JSON document)
delays everything else by as much. A timer asks to run every `interval`
seconds and counts how late it ran, in the buckets /metrics shows as the
histogram `foreman_event_loop_lag_seconds`.
"""

from __future__ import annotations

import asyncio
from bisect import bisect_left
from collections.abc import Iterator

from prometheus_client.core import HistogramMetricFamily
from prometheus_client.registry import Collector

# Fine at the low end: a loop late by 2 ms is worth telling from one late by 10.
BUCKETS = (0.0005, 0.001, 0.0015, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.05, 0.1, 0.25, 1.0)


class LoopLag(Collector):
    """Counts the lateness of a timer set every `interval` seconds; a Prometheus collector.

    A tick only bumps a counter (prometheus_client's Histogram.observe takes
    a lock and costs ten times more, a hundred times a second).
    """

    def __init__(self, interval: float = 0.01) -> None:
        self._interval = interval
        self._counts = [0] * (len(BUCKETS) + 1)  # the last one: beyond the last bound
        self._sum = 0.0
        self._handle: asyncio.TimerHandle | None = None
        self._due = 0.0

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._due = loop.time() + self._interval
        self._handle = loop.call_at(self._due, self._tick, loop)

    def _tick(self, loop: asyncio.AbstractEventLoop) -> None:
        now = loop.time()
        lag = max(now - self._due, 0.0)
        self._counts[bisect_left(BUCKETS, lag)] += 1
        self._sum += lag
        self._due = now + self._interval
        self._handle = loop.call_at(self._due, self._tick, loop)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def collect(self) -> Iterator[HistogramMetricFamily]:
        cumulative, buckets = 0, []
        for bound, count in zip([*map(str, BUCKETS), "+Inf"], self._counts, strict=True):
            cumulative += count
            buckets.append((bound, float(cumulative)))
        yield HistogramMetricFamily(
            "foreman_event_loop_lag_seconds",
            f"How late the event loop ran a timer set every {self._interval * 1000:g} ms.",
            buckets=buckets,
            sum_value=self._sum,
        )
