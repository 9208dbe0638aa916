"""Ollama's outages in the log: one line when it stops answering, one when it is back."""

from __future__ import annotations

import time
from collections.abc import Callable

import structlog

from foreman.errors import UpstreamUnreachable

log = structlog.get_logger("foreman.worker")


class Outages:
    """Tracks whether Ollama answers, so an outage is logged once, not once per failed call."""

    def __init__(self, base_url: str, clock: Callable[[], float] = time.time) -> None:
        self._base_url = base_url
        self._clock = clock
        self._down = False
        # (when, what) of the latest failure to reach Ollama, for /status: with Ollama down
        # from the start no job may have failed yet, yet the log has said so.
        self.last_error: tuple[float, str] | None = None
        self._when_back: list[Callable[[], None]] = []
        self._when_down: list[Callable[[], None]] = []

    def when_back(self, callback: Callable[[], None]) -> None:
        """Call `callback` each time Ollama answers again after an outage (it may have restarted)."""
        self._when_back.append(callback)

    def when_down(self, callback: Callable[[], None]) -> None:
        """Call `callback` each time an outage begins."""
        self._when_down.append(callback)

    @property
    def reachable(self) -> bool:
        """False from the first failure of an outage until Ollama answers again."""
        return not self._down

    def down(self, exc: UpstreamUnreachable) -> None:
        self.last_error = (self._clock(), exc.message)
        if not self._down:
            self._down = True
            log.warning(
                "upstream.unreachable",
                url=self._base_url,
                error=exc.message,
                hint="is Ollama running? foreman keeps accepting jobs and runs them when it answers",
            )
            for callback in self._when_down:
                callback()

    def up(self) -> None:
        if self._down:
            self._down = False
            log.info("upstream.back", url=self._base_url)
            for callback in self._when_back:
                callback()
