"""In-process hand-offs from the worker to the handlers waiting on a job."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from foreman.job import JSON_TYPE, JobState


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
    """Per-job queues of events; a handler subscribes before its job can start.

    With several nodes sharing a queue, the handler waiting for a job may be
    on another node than the worker running it: `forward` sends what this
    node's worker publishes to the others, and `deliver` hands what the others
    sent to the handlers here.
    """

    def __init__(self) -> None:
        self._subscribers: defaultdict[str, list[Subscription]] = defaultdict(list)
        self.forward: Callable[[str, JobEvent], None] | None = None
        # Someone here follows a job's events (GET /jobs/{id}/events, a cancel): the node running it must know.
        self.on_watch: Callable[[str], None] | None = None
        # Whether a client waits for a job this node runs on another node (its output must not be replayed).
        self.waits_elsewhere: Callable[[str], bool] | None = None

    @contextmanager
    def subscribe(self, job_id: str, *, client: bool) -> Iterator[asyncio.Queue[JobEvent]]:
        subscription = Subscription(asyncio.Queue(), client)
        self._subscribers[job_id].append(subscription)
        if not client and self.on_watch is not None:
            self.on_watch(job_id)
        try:
            yield subscription.queue
        finally:
            subscriptions = self._subscribers[job_id]
            subscriptions.remove(subscription)
            if not subscriptions:
                del self._subscribers[job_id]

    def watched(self) -> list[str]:
        """The jobs someone here waits for or follows."""
        return list(self._subscribers)

    def has_client(self, job_id: str) -> bool:
        """Whether the client that submitted the job is still waiting for it, here or on another node."""
        if self.waits_elsewhere is not None and self.waits_elsewhere(job_id):
            return True
        return any(s.client for s in self._subscribers.get(job_id, ()))

    def publish(self, job_id: str, event: JobEvent) -> None:
        """An event of a job this node runs (or cancelled): to the handlers here and on other nodes."""
        self.deliver(job_id, event)
        if self.forward is not None:
            self.forward(job_id, event)

    def deliver(self, job_id: str, event: JobEvent) -> None:
        """An event for the handlers on this node only."""
        for subscription in self._subscribers.get(job_id, ()):
            subscription.queue.put_nowait(event)

    def end_all(self, event: Ended, sparing: Iterable[str] = ()) -> None:
        """Release every waiting handler but those of `sparing` jobs, e.g. when the daemon shuts down."""
        spared = set(sparing)
        for job_id, subscriptions in self._subscribers.items():
            if job_id not in spared:
                for subscription in subscriptions:
                    subscription.queue.put_nowait(event)
