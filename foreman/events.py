"""In-process hand-offs from the worker to the handlers waiting on a job."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from foreman.models import JSON_TYPE, JobState


@dataclass(frozen=True, slots=True)
class Chunk:
    """One NDJSON line of Ollama's streamed reply, newline included."""

    data: bytes


@dataclass(frozen=True, slots=True)
class StateChanged:
    state: JobState
    attempt: int
    model: str | None = None  # when the job starts: the model that serves it


@dataclass(frozen=True, slots=True)
class Ended:
    """The job is over for this handler.

    `body` is the whole reply when nothing was streamed (a `stream: false`
    answer, or an error before the first chunk); after chunks, a non-empty
    body is an error to send as the stream's last line.
    """

    state: JobState
    status: int
    body: bytes
    content_type: str = JSON_TYPE
    error: str | None = None  # what went wrong, as the job's record keeps it


JobEvent = Chunk | StateChanged | Ended


@dataclass(eq=False, slots=True)
class Subscription:
    queue: asyncio.Queue[JobEvent]
    client: bool  # the job's own client, as opposed to someone watching its events


class JobEvents:
    """Per-job queues of events; a handler subscribes before its job can start."""

    def __init__(self) -> None:
        self._subscribers: defaultdict[str, list[Subscription]] = defaultdict(list)

    @contextmanager
    def subscribe(self, job_id: str, *, client: bool) -> Iterator[asyncio.Queue[JobEvent]]:
        subscription = Subscription(asyncio.Queue(), client)
        self._subscribers[job_id].append(subscription)
        try:
            yield subscription.queue
        finally:
            subscriptions = self._subscribers[job_id]
            subscriptions.remove(subscription)
            if not subscriptions:
                del self._subscribers[job_id]

    def has_client(self, job_id: str) -> bool:
        """Whether the client that submitted the job is still waiting for it."""
        return any(s.client for s in self._subscribers.get(job_id, ()))

    def publish(self, job_id: str, event: JobEvent) -> None:
        for subscription in self._subscribers.get(job_id, ()):
            subscription.queue.put_nowait(event)

    def end_all(self, event: Ended, sparing: Iterable[str] = ()) -> None:
        """Release every waiting handler but those of `sparing` jobs, e.g. when the daemon shuts down."""
        spared = set(sparing)
        for job_id, subscriptions in self._subscribers.items():
            if job_id not in spared:
                for subscription in subscriptions:
                    subscription.queue.put_nowait(event)
