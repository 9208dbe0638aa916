"""In-process hand-offs from the worker to the handlers waiting on a job."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from foreman.models import JobState


@dataclass(frozen=True, slots=True)
class Chunk:
    """One NDJSON line of Ollama's streamed reply, newline included."""

    data: bytes


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
    content_type: str = "application/json; charset=utf-8"


JobEvent = Chunk | Ended


class JobEvents:
    """Per-job queues of events; a handler subscribes before its job can start."""

    def __init__(self) -> None:
        self._subscribers: defaultdict[str, list[asyncio.Queue[JobEvent]]] = defaultdict(list)

    @contextmanager
    def subscribe(self, job_id: str) -> Iterator[asyncio.Queue[JobEvent]]:
        queue: asyncio.Queue[JobEvent] = asyncio.Queue()
        self._subscribers[job_id].append(queue)
        try:
            yield queue
        finally:
            queues = self._subscribers[job_id]
            queues.remove(queue)
            if not queues:
                del self._subscribers[job_id]

    def has_subscribers(self, job_id: str) -> bool:
        return job_id in self._subscribers

    def publish(self, job_id: str, event: JobEvent) -> None:
        for queue in self._subscribers.get(job_id, ()):
            queue.put_nowait(event)

    def end_all(self, event: Ended) -> None:
        """Release every waiting handler, e.g. when the daemon shuts down."""
        for queues in self._subscribers.values():
            for queue in queues:
                queue.put_nowait(event)
