"""How late the event loop runs what is due: the measure of anything that blocks it.

Every request, chunk and wake-up of foreman goes through one event loop, so
whatever holds it (a slow statement, a checkpoint, a big JSON document)
delays everything else by as much. A timer asks to run every `interval`
seconds and records how late it ran; /metrics shows the distribution as
`foreman_event_loop_lag_seconds`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class LoopLag:
    """Feeds `observe` the lateness of a timer set every `interval` seconds, until stopped."""

    def __init__(self, observe: Callable[[float], None], interval: float = 0.01) -> None:
        self._observe = observe
        self._interval = interval
        self._handle: asyncio.TimerHandle | None = None

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._handle = loop.call_at(
            loop.time() + self._interval, self._tick, loop, loop.time() + self._interval
        )

    def _tick(self, loop: asyncio.AbstractEventLoop, due: float) -> None:
        now = loop.time()
        self._observe(max(now - due, 0.0))
        self._handle = loop.call_at(now + self._interval, self._tick, loop, now + self._interval)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
