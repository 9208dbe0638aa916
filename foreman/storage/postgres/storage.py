"""`PostgresStorage`: the queue in PostgreSQL for coroutines, shared by every foreman node given the same URL.

Each node runs its own worker against its own Ollama; each call here is one
connection of the pool and, where it writes, one transaction (`intake`,
`claims`, `transitions`, `reads`, `cache`). What the nodes tell each other
beside the queue is the relay's (`relay`, `node`).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

from foreman.job import Ended, Job, JobState, NewJob, Priority
from foreman.scheduling.policy import ModelQueue
from foreman.setting_values import redact_url
from foreman.storage import (
    Accepted,
    CachedVector,
    CacheEntry,
    CacheStats,
    Chooser,
    Claim,
    DrainOrder,
    RecordedPin,
    Recovered,
    Submission,
)
from foreman.storage.postgres import cache, claims, intake, reads, transitions
from foreman.storage.postgres.connection import Connection, Pool, connect, one, unavailable
from foreman.storage.postgres.outbox import Outbox


class PostgresStorage:
    """Jobs in PostgreSQL, for one node among several (`node`)."""

    def __init__(
        self,
        pool: Pool,
        url: str,
        node: str,
        node_timeout: float,
        max_queue: int = 0,
        name_lock: Connection | None = None,
    ) -> None:
        self._pool = pool
        self.name_lock = name_lock  # holds this node's name (node_lock)
        self.url = url
        self.node = node
        self.node_timeout = node_timeout
        self.max_queue = max_queue
        self._submitting: set[asyncio.Future[Accepted]] = set()
        # Per job this node claimed: the other nodes where a client waits for its events.
        self.watchers: dict[str, set[str]] = {}
        # What this node has to say to the others (the relay fills it, node.Node sends it).
        self.outbox = Outbox()

    @classmethod
    async def open(
        cls, url: str, *, node: str, node_timeout: float = 15.0, max_queue: int = 0, pool_size: int = 8
    ) -> PostgresStorage:
        """Connect, create or check the tables; StoreError if the database cannot be used."""
        pool, name_lock = await connect(url, node, pool_size)
        return cls(pool, url, node, node_timeout, max_queue, name_lock)

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[Connection]:
        """A connection of the pool, for what the node does beside the job calls (heartbeat, relay)."""
        async with self._pool.connection() as conn:
            yield conn

    async def close(self) -> None:
        await self._pool.close()
        if self.name_lock is not None:
            await self.name_lock.close()

    # Intake

    def submit(self, submission: Submission) -> Awaitable[Accepted]:
        """Write a new job; a claim asked for after this call waits for the write (see `claim`)."""
        future = asyncio.ensure_future(self._submit(submission))
        self._submitting.add(future)
        future.add_done_callback(self._submitting.discard)
        return future

    @unavailable
    async def _submit(self, submission: Submission) -> Accepted:
        async with self._pool.connection() as conn:
            return await intake.submit(conn, submission, self.node, self.node_timeout, self.max_queue)

    async def insert_many(self, jobs: Sequence[NewJob]) -> int:
        """Write many new jobs in one transaction (bulk loads, benchmarks); returns how many."""
        async with self._pool.connection() as conn:
            return await intake.insert_many(conn, jobs, self.node)

    # The worker

    @unavailable
    async def recover(self, now: float, max_attempts: int) -> Recovered:
        """Put back what this node ran before it stopped; other nodes' jobs wait for their leases."""
        async with self._pool.connection() as conn:
            return await transitions.recover(conn, now, max_attempts, self.node)

    async def reap(self, now: float, max_attempts: int) -> list[tuple[str, str]]:
        """Put back the jobs whose node's lease ran out; returns (job id, node) of each (one node at a time)."""
        async with self._pool.connection() as conn:
            return await transitions.reap(conn, now, max_attempts)

    @unavailable
    async def queues(self) -> list[ModelQueue]:
        async with self._pool.connection() as conn:
            return await claims.queues(conn, self.node, self.node_timeout)

    @unavailable
    async def claim(self, choose: Chooser, now: float) -> Claim | None:
        if self._submitting:
            # As the interface promises: the submissions made before this claim are in the queue it sees.
            await asyncio.wait(set(self._submitting))
        async with self._pool.connection() as conn:
            taken = await claims.claim(conn, choose, now, self.node, self.node_timeout)
        if taken is None:
            return None
        claim, watchers = taken
        self.watchers[claim.job.id] = watchers
        return claim

    @unavailable
    async def claim_companions(
        self,
        model_key: str,
        endpoints: Sequence[str],
        pick: Callable[[list[Job]], list[str]],
        now: float,
        scan: int,
    ) -> list[Job]:
        """Take queued jobs of `model_key` to run beside a running one (see `Storage.claim_companions`)."""
        async with self._pool.connection() as conn:
            taken = await claims.claim_companions(
                conn, model_key, endpoints, pick, now, scan, self.node, self.node_timeout
            )
        for job, watchers in taken:
            self.watchers[job.id] = watchers
        return [job for job, _ in taken]

    @unavailable
    async def waiting(self, model_key: str) -> int:
        async with self._pool.connection() as conn:
            return await reads.waiting(conn, model_key)

    @unavailable
    async def waiting_by_model(self) -> dict[str, int]:
        async with self._pool.connection() as conn:
            return await reads.waiting_by_model(conn)

    @unavailable
    async def mark_working(self, job_id: str) -> None:
        async with self._pool.connection() as conn:
            await transitions.mark_working(conn, job_id, self.node)

    @unavailable
    async def requeue(
        self, job: Job, *, attempt: int, error: str | None, not_before: float | None = None
    ) -> None:
        self.watchers.pop(job.id, None)
        async with self._pool.connection() as conn:
            await transitions.requeue(
                conn, job, self.node, attempt=attempt, error=error, not_before=not_before
            )

    @unavailable
    async def set_served(self, job_id: str, model: str) -> None:
        async with self._pool.connection() as conn:
            await transitions.set_served(conn, job_id, model)

    @unavailable
    async def finish(
        self,
        job: Job,
        state: JobState,
        now: float,
        *,
        status: int,
        result: bytes | None = None,
        error: str | None = None,
        attempt: int | None = None,
        chunks: Sequence[bytes] = (),
        cache: str | None = None,
        ended: Ended | None = None,
    ) -> None:
        """End the job, and announce `ended` to the other nodes with it (`transitions.finish`).

        The job's events still waiting in the outbox go out first: an end never overtakes them.
        """
        if ended is not None:
            await self.outbox.flushed(job.id)
        async with self._pool.connection() as conn:
            await transitions.finish(
                conn,
                job,
                state,
                now,
                self.node,
                status=status,
                result=result,
                error=error,
                attempt=attempt,
                chunks=chunks,
                cache=cache,
                ended=ended,
            )

    @unavailable
    async def cancel_queued(self, job_id: str, now: float) -> bool:
        async with self._pool.connection() as conn:
            return await transitions.cancel_queued(conn, job_id, now)

    # Reads

    @unavailable
    async def get(self, job_id: str) -> Job | None:
        async with self._pool.connection() as conn:
            return await reads.get(conn, job_id)

    @unavailable
    async def list_jobs(
        self, *, state: JobState | None, model_key: str | None, limit: int, before: str | None
    ) -> list[Job]:
        async with self._pool.connection() as conn:
            return await reads.list_jobs(conn, state=state, model_key=model_key, limit=limit, before=before)

    @unavailable
    async def chunks(self, job_id: str) -> list[bytes]:
        async with self._pool.connection() as conn:
            return await reads.chunks(conn, job_id)

    @unavailable
    async def position(self, job_id: str, model_key: str, priority: Priority, drain_order: DrainOrder) -> int:
        async with self._pool.connection() as conn:
            return await reads.position(
                conn, job_id, model_key, priority, drain_order, self.node, self.node_timeout
            )

    @unavailable
    async def counts_by_state(self) -> dict[str, int]:
        async with self._pool.connection() as conn:
            return await reads.counts_by_state(conn)

    # The embedding cache

    @unavailable
    async def cache_get(self, keys: Sequence[bytes]) -> dict[bytes, CachedVector]:
        async with self._pool.connection() as conn:
            return await cache.get(conn, keys)

    @unavailable
    async def cache_put(self, entries: Sequence[CacheEntry], limit: int) -> int:
        async with self._pool.connection() as conn, conn.transaction():
            return await cache.put(conn, entries, limit)

    @unavailable
    async def cache_evict(self, limit: int) -> int:
        async with self._pool.connection() as conn, conn.transaction():
            return await cache.evict(conn, limit)

    @unavailable
    async def cache_invalidate(self, digests: Sequence[str]) -> int:
        async with self._pool.connection() as conn:
            return await cache.invalidate(conn, digests)

    @unavailable
    async def cache_stats(self) -> CacheStats:
        async with self._pool.connection() as conn:
            return await cache.stats(conn)

    # Pins: each node's own, for its own Ollama

    @unavailable
    async def pins(self) -> list[RecordedPin]:
        async with self._pool.connection() as conn:
            cursor = await conn.execute(
                "SELECT model_key, endpoint, model, options FROM pins WHERE node = %s ORDER BY model_key",
                (self.node,),
            )
            return [RecordedPin(*row) for row in await cursor.fetchall()]

    @unavailable
    async def set_pins(self, pins: Sequence[RecordedPin]) -> None:
        async with self._pool.connection() as conn, conn.transaction():
            await conn.execute("DELETE FROM pins WHERE node = %s", (self.node,))
            for pin in pins:
                await conn.execute(
                    "INSERT INTO pins (node, model_key, endpoint, model, options) VALUES (%s, %s, %s, %s, %s)",
                    (self.node, pin.model_key, pin.endpoint, pin.model, pin.options),
                )

    # Upkeep

    @unavailable
    async def prune(self, cutoff: float, batch: int) -> int:
        async with self._pool.connection() as conn:
            return await transitions.prune(conn, cutoff, batch)

    async def ping(self) -> None:
        async with self._pool.connection() as conn:
            await conn.execute("SELECT 1 FROM jobs LIMIT 0")

    @unavailable
    async def describe(self) -> dict[str, Any]:
        async with self._pool.connection() as conn:
            cursor = await conn.execute("SELECT pg_database_size(current_database())")
            (size,) = await one(cursor)
        return {
            "backend": "postgresql",
            "url": redact_url(self.url),
            "node": self.node,
            "size_bytes": int(size),
        }
