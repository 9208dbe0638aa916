"""The queue's transitions as they happen, for watchers of `GET /events`.

Where `events.JobEvents` hands one job's events to the handlers waiting on
that job, the feed tells whoever watches the whole queue (the live page) that
a job changed state or a model was swapped in. It also keeps the last minutes
of the moves that make the timeline (loads, starts, ends), so a page that
connects late can draw what it missed.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from foreman.durations import iso
from foreman.job import JobState, Priority

# What a page that connects is told of the past: the moves of the last
# quarter of an hour, and no more than this many (a busy queue's history
# could otherwise make the first message megabytes long).
HISTORY_S = 15 * 60.0
HISTORY_MAX = 3000
# A watcher this far behind is cut off; its page reconnects and starts afresh.
BACKLOG_MAX = 10_000
# The worker may claim a job before the handler that committed it hears back
# from the store; the arrival it then reports is stale. The ids of the jobs the
# worker moved last tell it so (the gap is one hand-off, so a few suffice).
_RECENTLY_MOVED = 256


class FeedEvent:
    """One transition: `kind` is the SSE event name, `data` its JSON body.

    A job's move keeps only its facts; the body is built when someone reads
    it, so a queue that no page watches builds none.
    """

    __slots__ = ("_data", "_facts", "at", "kind")

    def __init__(
        self, kind: str, at: float, data: dict[str, Any] | None = None, facts: tuple[Any, ...] = ()
    ) -> None:
        self.kind = kind
        self.at = at
        self._data = data
        self._facts = facts

    @property
    def data(self) -> dict[str, Any]:
        if self._data is None:
            self._data = _job_data(*self._facts)
        return self._data


@dataclass(eq=False, slots=True)
class _Watcher:
    queue: asyncio.Queue[FeedEvent | None] = field(default_factory=lambda: asyncio.Queue(BACKLOG_MAX))
    dropped: bool = False


class PageFeed:
    """Fans the queue's transitions out to every watcher, and remembers the recent ones."""

    def __init__(self, history_s: float = HISTORY_S, history_max: int = HISTORY_MAX) -> None:
        self._history: deque[FeedEvent] = deque(maxlen=history_max)
        self._history_s = history_s
        self._watchers: list[_Watcher] = []
        self._moved: deque[str] = deque(maxlen=_RECENTLY_MOVED)

    def arrived(self, job_id: str, model: str, priority: Priority, at: float) -> None:
        """A new job was committed to the queue (said once, and never after the worker moved it)."""
        if not self._watchers or job_id in self._moved:
            return  # arrivals are only for watchers: with none, there is nothing to build
        # Arrivals are many and draw nothing on the timeline: watchers get them, the history does not.
        self._emit(FeedEvent("job", at, facts=(job_id, JobState.QUEUED, at, model, priority, 0)), keep=False)

    def job(
        self,
        job_id: str,
        state: JobState,
        at: float,
        *,
        model: str | None = None,
        priority: Priority | None = None,
        attempt: int | None = None,
    ) -> None:
        """The worker moved a job to `state` at `at`; `model` is None where the caller does not know it."""
        self._moved.append(job_id)
        self._emit(FeedEvent("job", at, facts=(job_id, state, at, model, priority, attempt)), keep=True)

    def swap(self, *, model: str, reason: str, from_models: list[str], load_s: float, at: float) -> None:
        """`model` finished loading at `at`, after `load_s` seconds, for `reason`."""
        data = {
            "model": model,
            "reason": reason,
            "from": from_models,
            "load_s": round(load_s, 3),
            "started_at": iso(at - load_s),
            "at": iso(at),
        }
        self._emit(FeedEvent("swap", at, data), keep=True)

    def history(self, now: float) -> list[FeedEvent]:
        """The remembered transitions of the last minutes, oldest first."""
        while self._history and self._history[0].at < now - self._history_s:
            self._history.popleft()
        return list(self._history)

    @contextmanager
    def watch(self) -> Iterator[asyncio.Queue[FeedEvent | None]]:
        """Every transition from now on; None in the queue means: stop, the feed is closed or you fell behind."""
        watcher = _Watcher()
        self._watchers.append(watcher)
        try:
            yield watcher.queue
        finally:
            self._watchers.remove(watcher)

    def close(self) -> None:
        """End every watcher's stream (foreman is shutting down)."""
        for watcher in self._watchers:
            self._drop(watcher)

    def _emit(self, event: FeedEvent, *, keep: bool) -> None:
        if keep:
            self._history.append(event)
        if not self._watchers:
            return
        for watcher in self._watchers:
            if watcher.dropped:
                continue
            if watcher.queue.qsize() >= BACKLOG_MAX - 1:
                self._drop(watcher)  # the last slot is the None that tells it so
            else:
                watcher.queue.put_nowait(event)

    @staticmethod
    def _drop(watcher: _Watcher) -> None:
        if not watcher.dropped:
            watcher.dropped = True
            watcher.queue.put_nowait(None)


def _job_data(
    job_id: str, state: JobState, at: float, model: str | None, priority: Priority | None, attempt: int | None
) -> dict[str, Any]:
    return {
        "id": job_id,
        "state": state.value,
        "model": model,
        "priority": priority.value if priority is not None else None,
        "attempt": attempt,
        "at": iso(at),
    }
