"""Hand-offs from the worker to the handlers waiting on a job: in process, and through the relay between nodes."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from foreman.job import Chunk, Ended, JobEvent, StateChanged
from foreman.storage.relay import ALONE, Relay

# The events are values (foreman/job.py), the storage's relay carries them too; their old home still names them.
__all__ = ["Chunk", "Ended", "JobEvent", "JobEvents", "StateChanged", "Subscription"]


@dataclass(eq=False, slots=True)
class Subscription:
    queue: asyncio.Queue[JobEvent]
    client: bool  # the job's own client, as opposed to someone watching its events


class JobEvents:
    """Per-job queues of events; a handler subscribes before its job can start.

    With several nodes sharing a queue, the handler waiting for a job may be
    on another node than the worker running it: `publish` sends what this
    node's worker publishes to the others through the storage's `relay`
    (`foreman/storage/relay.py`), which hands what the others sent to
    `deliver`. A node alone has the relay `ALONE`.
    """

    def __init__(self, relay: Relay = ALONE) -> None:
        self._subscribers: defaultdict[str, list[Subscription]] = defaultdict(list)
        self.relay = relay

    @contextmanager
    def subscribe(self, job_id: str, *, client: bool) -> Iterator[asyncio.Queue[JobEvent]]:
        subscription = Subscription(asyncio.Queue(), client)
        self._subscribers[job_id].append(subscription)
        if not client:
            # Someone here follows a job's events (GET /jobs/{id}/events, a cancel): the node running it must know.
            self.relay.watch(job_id)
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
        if self.relay.waits_elsewhere(job_id):
            return True
        return any(s.client for s in self._subscribers.get(job_id, ()))

    def publish(self, job_id: str, event: JobEvent) -> None:
        """An event of a job this node runs (or cancelled): to the handlers here and on other nodes."""
        self.deliver(job_id, event)
        self.relay.forward(job_id, event)

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
