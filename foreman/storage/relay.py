"""What the nodes sharing one queue tell each other beside the queue; a node alone tells no one.

With several nodes sharing a queue (PostgreSQL), the handler waiting for a
job may be on another node than the worker running it: the relay sends what
this node's worker publishes to the nodes where someone waits, hands what
the others sent to the handlers here, carries cancels to the node that runs
the job, and lists the members. A queue only one node uses (SQLite) has the
relay `ALONE`, which sends nothing and knows no other node.

`foreman.storage.backends.opened` opens a backend's storage and its relay
together; `foreman.queue.job_events.JobEvents` speaks to the relay.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, Protocol

from foreman.job import JobEvent


class LocalWorker(Protocol):
    """What a node's membership needs of its own worker."""

    @property
    def running_jobs(self) -> list[str]: ...

    @property
    def held_jobs(self) -> list[str]: ...

    @property
    def resident(self) -> frozenset[str]: ...

    def wake(self, model_key: str) -> None: ...

    async def cancel(self, job_id: str) -> bool: ...


class Deliveries(Protocol):
    """Where the events other nodes send end up: the handlers on this node."""

    def deliver(self, job_id: str, event: JobEvent) -> None: ...

    def watched(self) -> list[str]:
        """The jobs someone here waits for or follows."""
        ...


class OllamaHealth(Protocol):
    """Whether this node's Ollama answers, and word when that changes (`foreman/ollama/outages.py`)."""

    @property
    def reachable(self) -> bool | None: ...

    def when_down(self, callback: Callable[[], None]) -> None: ...

    def when_back(self, callback: Callable[[], None]) -> None: ...


class Relay(Protocol):
    """This node's line to the others sharing its queue."""

    def forward(self, job_id: str, event: JobEvent) -> None:
        """Send an event of a job this node runs to the nodes that wait for it (in order, in the background)."""
        ...

    def watch(self, job_id: str) -> None:
        """Someone here follows a job's events: have the node that runs it send them here too."""
        ...

    def waits_elsewhere(self, job_id: str) -> bool:
        """Whether a client on another node waits for this job, which this node runs."""
        ...

    async def cancel_elsewhere(self, job_id: str) -> bool:
        """Ask another node that runs `job_id` to abort it.

        False when no other node runs it: it ended, or it runs here, or there
        are no other nodes. The job's end reaches the caller as events.
        """
        ...

    async def nodes(self) -> list[dict[str, Any]]:
        """The foreman nodes sharing the queue, each with its Ollama and heartbeat; [] for a node alone."""
        ...

    def joined(
        self, worker: LocalWorker, events: Deliveries, ollama: OllamaHealth
    ) -> AbstractAsyncContextManager[None]:
        """This node as a member for the life of the block (its worker runs): heartbeat, leases, hearing the others.

        The others learn whether this node's Ollama answers (`ollama`) as soon as that changes.
        """
        ...


class Alone:
    """The relay of a queue only this node uses: there is no one to tell or to hear."""

    def forward(self, job_id: str, event: JobEvent) -> None:
        pass

    def watch(self, job_id: str) -> None:
        pass

    def waits_elsewhere(self, job_id: str) -> bool:
        return False

    async def cancel_elsewhere(self, job_id: str) -> bool:
        return False  # a job runs here or nowhere

    async def nodes(self) -> list[dict[str, Any]]:
        return []

    @asynccontextmanager
    async def joined(
        self, worker: LocalWorker, events: Deliveries, ollama: OllamaHealth
    ) -> AsyncIterator[None]:
        yield


ALONE: Relay = Alone()
