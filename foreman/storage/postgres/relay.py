"""`PostgresRelay`: this node's line to the others sharing the PostgreSQL queue (`foreman.storage.relay.Relay`).

The relay queues what this node has to say (its jobs' events, its watches)
from the moment the storage opens; its membership (`node.Node`, while the
worker runs) sends them in order and hears the others.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from typing import Any

import structlog

from foreman.background import running
from foreman.job import Ended, JobEvent
from foreman.storage.postgres.connection import RUNNING, notify, unavailable
from foreman.storage.postgres.node import Node
from foreman.storage.postgres.storage import PostgresStorage
from foreman.storage.relay import Deliveries, LocalWorker, OllamaHealth

log = structlog.get_logger("foreman.node")


class PostgresRelay:
    """What this node and the others sharing `store` tell each other."""

    def __init__(
        self, store: PostgresStorage, *, upstream: str, max_attempts: int, clock: Callable[[], float]
    ) -> None:
        self._store = store
        self._upstream = upstream
        self._max_attempts = max_attempts
        self._clock = clock
        self._outbox = store.outbox

    def forward(self, job_id: str, event: JobEvent) -> None:
        """Send an event of a job this node runs to the nodes that wait for it (in order, in the background).

        The end of a job goes to every node, so that one that began to follow
        it a moment ago does not wait for ever; its reply only where it is awaited.
        The end of a job this node claimed is announced by the statement that
        records it (`Storage.finish` with `ended`, see `transitions.finish`),
        not from here: only if it was recorded, and after the job's events.
        """
        if isinstance(event, Ended):
            if self._store.watchers.pop(job_id, None) is None:
                # Not run here (a queued job cancelled here): no record of a run to announce it with.
                self._outbox.put(job_id, replace(event, body=b""))
        elif self._store.watchers.get(job_id):
            self._outbox.put(job_id, event)

    def watch(self, job_id: str) -> None:
        """Someone here follows a job: have the node that runs it send its events here too."""
        self._outbox.put(job_id, None)

    def waits_elsewhere(self, job_id: str) -> bool:
        """Whether a client on another node waits for this job, which this node runs."""
        return bool(self._store.watchers.get(job_id))

    @unavailable
    async def cancel_elsewhere(self, job_id: str) -> bool:
        """Ask the node that runs `job_id`, if it is another node, to abort it; False if none does."""
        me = self._store.node
        async with self._store.connection() as conn:
            cursor = await conn.execute(
                f"SELECT node FROM jobs WHERE id = %s AND {RUNNING} AND node <> %s", (job_id, me)
            )
            row = await cursor.fetchone()
            if row is None:
                return False
            await notify(conn, {"n": me, "cancel": job_id, "to": row[0]})
            return True

    @unavailable
    async def nodes(self) -> list[dict[str, Any]]:
        """Every node that shares the queue, live or not, with its Ollama and its heartbeat's age."""
        async with self._store.connection() as conn:
            cursor = await conn.execute(
                "SELECT name, upstream, reachable, resident, serving, running, heartbeat_at,"
                " extract(epoch FROM now() - heartbeat_at),"
                " left_at IS NULL AND heartbeat_at > now() - make_interval(secs => %s) FROM nodes ORDER BY name",
                (self._store.node_timeout,),
            )
            rows = await cursor.fetchall()
        return [
            {
                "name": name,
                "upstream": upstream,
                "reachable": reachable,
                "resident": list(resident),
                "serving": serving,
                "running": list(running),
                "heartbeat_at": heartbeat.isoformat(),
                "heartbeat_age_s": round(float(age), 1),
                "alive": bool(alive),
            }
            for name, upstream, reachable, resident, serving, running, heartbeat, age, alive in rows
        ]

    @asynccontextmanager
    async def joined(
        self, worker: LocalWorker, events: Deliveries, ollama: OllamaHealth
    ) -> AsyncIterator[None]:
        """This node's heartbeat, leases and notifications for the life of the block."""
        node = Node(
            self._store,
            self._outbox,
            events,
            worker,
            upstream=self._upstream,
            max_attempts=self._max_attempts,
            clock=self._clock,
            reachable=lambda: ollama.reachable,
        )
        await node.register()
        # The others must stop leaving this node's models to it the moment its Ollama stops answering.
        ollama.when_down(node.beat_soon)
        ollama.when_back(node.beat_soon)
        async with running(node.run(), "foreman-node"):
            await node.listening()
            log.info("node.joined", node=node.name, timeout_s=self._store.node_timeout)
            try:
                yield
            finally:
                await node.leave()
