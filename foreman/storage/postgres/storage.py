"""The queue in PostgreSQL, shared by every foreman node given the same URL.

Each node runs its own worker against its own Ollama. A claim is one
transaction: the policy chooses from what waits (and from what the other
live nodes hold, `ModelQueue.held_elsewhere`), then the oldest job of its
choice is taken with `FOR UPDATE SKIP LOCKED`, so two nodes never take one
job and neither waits on the other's row. Swap decisions take turns (a
transaction-scoped advisory lock): the second node to decide sees the first
one's load and leaves that model to it. A claimed job carries its node and a
lease in the database's own time, which the node's heartbeat renews
(`foreman/storage/postgres/node.py`); every write a node makes to a running job
checks that the job is still its own.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from contextlib import asynccontextmanager
from functools import wraps
from typing import Any, ParamSpec, TypeVar

import psycopg
import structlog
from psycopg.rows import TupleRow
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from foreman.config import redact_url
from foreman.errors import DatabaseAway, QueueFull, StoreError, StoreUnreachable
from foreman.job import Job, JobState, NewJob, Priority
from foreman.scheduling.policy import Held, ModelQueue
from foreman.storage import (
    Accepted,
    CacheAnswer,
    CachedVector,
    CacheEntry,
    CacheStats,
    Chooser,
    Claim,
    DrainOrder,
    IdempotencyConflict,
    RecordedPin,
    Recovered,
    Submission,
)
from foreman.storage.postgres.node_lock import hold_node_name
from foreman.storage.postgres.schema import CHANNEL, LOCK_PRUNE, LOCK_REAP, LOCK_SWAP, prepare

log = structlog.get_logger("foreman.postgres")

Connection = psycopg.AsyncConnection[TupleRow]

_COLUMNS = (
    "id, state, endpoint, model, model_key, stream, body, attempt,"
    " created_at, started_at, finished_at, status, error, result, respond_async, priority, routing, served_model,"
    " cache, not_before"
)
# Pages of jobs show neither the request nor the result.
_SUMMARY_COLUMNS = (
    "id, state, endpoint, model, model_key, stream, ''::bytea, attempt,"
    " created_at, started_at, finished_at, status, error, NULL::bytea, respond_async, priority, routing,"
    " served_model, cache, not_before"
)
_RUNNING = "state IN ('loading', 'working')"
_ENDED = "state IN ('done', 'failed', 'cancelled')"
# Claims retried when another node took the chosen job between the look and the take.
_CLAIM_TRIES = 8

P = ParamSpec("P")
T = TypeVar("T")


def _unavailable(
    method: Callable[P, Coroutine[Any, Any, T]],
) -> Callable[P, Coroutine[Any, Any, T]]:
    """A database that cannot be reached is a 503 for the client, not a stray 500."""

    @wraps(method)
    async def call(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await method(*args, **kwargs)
        except (psycopg.OperationalError, psycopg.errors.AdminShutdown) as exc:
            raise DatabaseAway(f"foreman cannot reach its database: {exc}".strip()) from exc
        except PoolTimeout as exc:
            raise DatabaseAway(f"foreman cannot reach its database: {exc}".strip()) from exc

    return call


class PostgresStorage:
    """Jobs in PostgreSQL, for one node among several (`node`)."""

    def __init__(
        self, pool: AsyncConnectionPool[Connection], url: str, node: str, node_timeout: float
    ) -> None:
        self._pool = pool
        self.url = url
        self.node = node
        self.node_timeout = node_timeout
        self.max_queue = 0
        self.name_lock: Connection | None = None  # holds this node's name (node_lock)
        self._submitting: set[asyncio.Future[Accepted]] = set()
        # Per job this node claimed: the other nodes where a client waits for its events.
        self.watchers: dict[str, set[str]] = {}

    @classmethod
    async def open(
        cls, url: str, *, node: str, node_timeout: float = 15.0, max_queue: int = 0, pool_size: int = 8
    ) -> PostgresStorage:
        """Connect, create or check the tables; StoreError if the database cannot be used."""
        where = redact_url(url)
        # One plain connection first: libpq's own words say what is wrong (refused, password, no database).
        try:
            first = await psycopg.AsyncConnection.connect(url, autocommit=True)
        except psycopg.Error as exc:
            detail = " ".join(line.strip() for line in str(exc).splitlines()) or type(exc).__name__
            raise StoreUnreachable(f"cannot connect to {where}: {detail}") from exc
        async with first:
            await prepare(first, where)
        name = await hold_node_name(url, node, where)  # before any job is read
        pool: AsyncConnectionPool[Connection] = AsyncConnectionPool(
            url,
            min_size=1,
            max_size=pool_size,
            kwargs={"autocommit": True},
            open=False,
            name="foreman",
            # A request waits this long for a connection before it gets its 503.
            timeout=3.0,
        )
        try:
            await pool.open(wait=True, timeout=10.0)
        except PoolTimeout as exc:
            await pool.close()
            await name.close()
            raise StoreUnreachable(f"cannot connect to {where}") from exc
        store = cls(pool, url, node, node_timeout)
        store.max_queue = max_queue
        store.name_lock = name
        return store

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

    @_unavailable
    async def _submit(self, submission: Submission) -> Accepted:
        job = submission.job
        async with self._pool.connection() as conn, conn.transaction():
            if job.idempotency_key is not None:
                cursor = await conn.execute(
                    "SELECT id, request_hash, state, model_key, priority FROM jobs WHERE idempotency_key = %s",
                    (job.idempotency_key,),
                )
                row = await cursor.fetchone()
                if row is not None:
                    return await self._existing(conn, submission, row)
            if self.max_queue:
                cursor = await conn.execute("SELECT count(*) FROM jobs WHERE state = 'queued'")
                (waiting,) = await _one(cursor)
                if waiting >= self.max_queue:
                    raise QueueFull(self.max_queue)
            cursor = await conn.execute(
                "INSERT INTO jobs (id, state, endpoint, model, model_key, stream, body, created_at,"
                " respond_async, idempotency_key, request_hash, priority, routing, cache, watchers)"
                " VALUES (%s, 'queued', %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
                " ON CONFLICT (idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING RETURNING id",
                (
                    job.id,
                    job.endpoint,
                    job.model,
                    job.model_key,
                    job.stream,
                    job.body,
                    job.created_at,
                    job.respond_async,
                    job.idempotency_key,
                    submission.request_hash,
                    job.priority.value,
                    job.routing,
                    job.cache,
                    # A synchronous client waits here for the events, whichever node runs the job.
                    [] if job.respond_async else [self.node],
                ),
            )
            if await cursor.fetchone() is None:
                # Another node took the key a moment ago: that job is this submission's.
                cursor = await conn.execute(
                    "SELECT id, request_hash, state, model_key, priority FROM jobs WHERE idempotency_key = %s",
                    (job.idempotency_key,),
                )
                return await self._existing(conn, submission, await _one(cursor))
            if submission.answer is not None and (result := await self._answer(conn, submission.answer, job)):
                await conn.execute(
                    "UPDATE jobs SET state = 'done', started_at = %s, finished_at = %s, status = 200,"
                    " result = %s, cache = 'hit' WHERE id = %s",
                    (job.created_at, job.created_at, result, job.id),
                )
                return Accepted(job.id, True, JobState.DONE, None, result)
            await _wake(conn, self.node, job.model_key)
            position = None
            if submission.drain_order is not None:
                position = await self._position(
                    conn, job.id, job.model_key, job.priority, submission.drain_order
                )
            return Accepted(job.id, True, JobState.QUEUED, position)

    async def _answer(self, conn: Connection, answer: CacheAnswer, job: NewJob) -> bytes | None:
        """The cache's reply to the job if it holds every vector, else None (the job queues)."""
        found = await _cache_get(conn, answer.keys)
        if len(found) < len(set(answer.keys)):
            return None  # the worker looks again, and sends only what is missing
        try:
            return answer.reply([found[key] for key in answer.keys])
        except Exception:
            # A bug here must not refuse the job: it queues, and the worker serves it.
            log.exception("embed_cache.answer_failed", job_id=job.id)
            return None

    async def _existing(self, conn: Connection, submission: Submission, row: tuple[Any, ...]) -> Accepted:
        job_id, request_hash, state, model_key, priority = row
        key = submission.job.idempotency_key
        assert key is not None
        if request_hash != submission.request_hash:
            raise IdempotencyConflict(key, job_id)
        position = None
        if state == JobState.QUEUED and submission.drain_order is not None:
            position = await self._position(
                conn, job_id, model_key, Priority(priority), submission.drain_order
            )
        return Accepted(job_id, False, JobState(state), position)

    async def insert_many(self, jobs: Sequence[NewJob]) -> int:
        """Write many new jobs in one transaction (bulk loads, benchmarks); returns how many."""
        async with self._pool.connection() as conn, conn.transaction():
            async with conn.cursor() as cursor:
                await cursor.executemany(
                    "INSERT INTO jobs (id, state, endpoint, model, model_key, stream, body, created_at,"
                    " respond_async, idempotency_key, priority, routing)"
                    " VALUES (%s, 'queued', %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                    [
                        (
                            j.id,
                            j.endpoint,
                            j.model,
                            j.model_key,
                            j.stream,
                            j.body,
                            j.created_at,
                            j.respond_async,
                            j.idempotency_key,
                            j.priority.value,
                            j.routing,
                        )
                        for j in jobs
                    ],
                )
            await _wake(conn, self.node, "")
        return len(jobs)

    # The worker

    @_unavailable
    async def recover(self, now: float, max_attempts: int) -> Recovered:
        """Put back what this node ran before it stopped; other nodes' jobs wait for their leases."""
        async with self._pool.connection() as conn, conn.transaction():
            return await _requeue_running(
                conn, now, max_attempts, "node = %s", (self.node,), "a foreman restart"
            )

    async def reap(self, now: float, max_attempts: int) -> list[tuple[str, str]]:
        """Put back the jobs whose node's lease ran out; returns (job id, node) of each.

        One node at a time does it (an advisory lock); the others skip.
        """
        async with self._pool.connection() as conn, conn.transaction():
            cursor = await conn.execute("SELECT pg_try_advisory_xact_lock(%s)", (LOCK_REAP,))
            (locked,) = await _one(cursor)
            if not locked:
                return []
            cursor = await conn.execute(
                f"SELECT id, node FROM jobs WHERE {_RUNNING} AND lease_until < now() ORDER BY id FOR UPDATE"
            )
            lost = [(str(i), str(n)) for i, n in await cursor.fetchall()]
            if lost:
                await _requeue_running(
                    conn,
                    now,
                    max_attempts,
                    "id = ANY(%s)",
                    ([job_id for job_id, _ in lost],),
                    "nodes that stopped answering",
                    orphaned=True,
                )
            return lost

    @_unavailable
    async def queues(self) -> list[ModelQueue]:
        async with self._pool.connection() as conn:
            return await self._queues(conn)

    async def _queues(self, conn: Connection) -> list[ModelQueue]:
        # Jobs held back after a failure (not_before) are listed apart: when they may run is the policy's call.
        cursor = await conn.execute(
            "SELECT model_key, priority, count(*) FILTER (WHERE not_before IS NULL),"
            " min(id) FILTER (WHERE not_before IS NULL),"
            " (array_agg(created_at ORDER BY id) FILTER (WHERE not_before IS NULL))[1],"
            " count(*) FILTER (WHERE orphaned),"
            " array_agg(ARRAY[id, created_at::text, not_before::text] ORDER BY id) FILTER (WHERE not_before IS NOT NULL)"
            " FROM jobs WHERE state = 'queued' GROUP BY model_key, priority"
        )
        rows = await cursor.fetchall()
        if not rows:
            return []
        elsewhere = await self._held_elsewhere(conn)
        queues = []
        for key, priority, free, oldest, oldest_at, orphans, held in rows:
            back = tuple(Held(i, float(at), float(nb)) for i, at, nb in held or ())
            queues.append(
                ModelQueue(
                    key,
                    Priority(priority),
                    int(free),
                    oldest or "",
                    oldest_at or 0.0,
                    back,
                    held_elsewhere=elsewhere.get(key, 0),
                    orphaned=int(orphans),
                )
            )
        return queues

    async def _held_elsewhere(self, conn: Connection) -> dict[str, int]:
        """Per model key, how many other live nodes hold it, load it or run it.

        A node whose Ollama does not answer holds nothing: its models' work is for whoever can run it.
        """
        cursor = await conn.execute(
            "SELECT key, count(DISTINCT name) FROM ("
            "  SELECT name, unnest(resident || serving) AS key FROM nodes"
            "   WHERE name <> %(me)s AND left_at IS NULL AND reachable IS NOT FALSE"
            "   AND heartbeat_at > now() - make_interval(secs => %(timeout)s)"
            f"  UNION ALL SELECT node, model_key FROM jobs WHERE {_RUNNING} AND node <> %(me)s"
            "   AND lease_until > now()"
            ") AS held WHERE key IS NOT NULL GROUP BY key",
            {"me": self.node, "timeout": self.node_timeout},
        )
        return {str(key): int(count) for key, count in await cursor.fetchall()}

    @_unavailable
    async def claim(self, choose: Chooser, now: float) -> Claim | None:
        if self._submitting:
            # As the interface promises: the submissions made before this claim are in the queue it sees.
            await asyncio.wait(set(self._submitting))
        async with self._pool.connection() as conn:
            for _ in range(_CLAIM_TRIES):
                async with conn.transaction():
                    queues = await self._queues(conn)
                    decision = choose(queues)
                    if decision is None:
                        return None
                    if decision.swap:
                        # Decide again in turn with the other nodes' swaps, seeing theirs.
                        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK_SWAP,))
                        queues = await self._queues(conn)
                        decision = choose(queues)
                        if decision is None:
                            return None
                    if not any(
                        (q.model_key, q.priority) == (decision.model_key, decision.priority) for q in queues
                    ):
                        raise RuntimeError(
                            f"no queued {decision.priority} job for {decision.model_key!r} although the policy chose it"
                        )
                    state = JobState.LOADING if decision.swap else JobState.WORKING
                    # The job the decision names (a held one whose time came), else its group's oldest free one.
                    which = (
                        "id = %(id)s AND state = 'queued'"
                        if decision.job_id is not None
                        else "state = 'queued' AND model_key = %(key)s AND priority = %(priority)s"
                        " AND not_before IS NULL ORDER BY id"
                    )
                    cursor = await conn.execute(
                        f"UPDATE jobs SET state = %(state)s, started_at = %(now)s, node = %(me)s,"
                        f" lease_until = now() + make_interval(secs => %(timeout)s), orphaned = false,"
                        f" not_before = NULL"
                        f" WHERE id = (SELECT id FROM jobs WHERE {which} LIMIT 1 FOR UPDATE SKIP LOCKED)"
                        f" RETURNING {_COLUMNS}, watchers",
                        {
                            "state": state.value,
                            "now": now,
                            "me": self.node,
                            "timeout": self.node_timeout,
                            "key": decision.model_key,
                            "priority": decision.priority.value,
                            "id": decision.job_id,
                        },
                    )
                    row = await cursor.fetchone()
                    if row is None:
                        continue  # another node took it between the look and the take: look again
                    await conn.execute(
                        "UPDATE nodes SET serving = %s WHERE name = %s", (decision.model_key, self.node)
                    )
                    if decision.swap:
                        # The others may now leave this model to us, or take what we left.
                        await _wake(conn, self.node, "")
                    cursor = await conn.execute(
                        "SELECT count(*) FROM jobs WHERE state = 'queued' AND model_key = %s",
                        (decision.model_key,),
                    )
                    (waiting,) = await _one(cursor)
                    job = _job_from_row(row[:-1])
                    self.watchers[job.id] = set(row[-1]) - {self.node}
                    return Claim(job, decision, int(waiting))
        return None

    @_unavailable
    async def claim_companions(
        self,
        model_key: str,
        endpoints: Sequence[str],
        pick: Callable[[list[Job]], list[str]],
        now: float,
        scan: int,
    ) -> list[Job]:
        """Take queued jobs of `model_key` to run beside a running one (see `Storage.claim_companions`)."""
        async with self._pool.connection() as conn, conn.transaction():
            # Locked as they are read, skipping what another node is taking: pick sees only what it may take.
            cursor = await conn.execute(
                f"SELECT {_COLUMNS} FROM jobs WHERE state = 'queued' AND model_key = %s AND endpoint = ANY(%s)"
                f" AND (not_before IS NULL OR not_before <= %s) ORDER BY priority = 'batch', id LIMIT %s"
                f" FOR UPDATE SKIP LOCKED",
                (model_key, list(endpoints), now, scan),
            )
            chosen = set(pick([_job_from_row(row) for row in await cursor.fetchall()]))
            if not chosen:
                return []
            cursor = await conn.execute(
                f"UPDATE jobs SET state = 'working', started_at = %s, not_before = NULL, node = %s,"
                f" lease_until = now() + make_interval(secs => %s), orphaned = false"
                f" WHERE state = 'queued' AND id = ANY(%s) RETURNING {_COLUMNS}, watchers",
                (now, self.node, self.node_timeout, sorted(chosen)),
            )
            jobs = []
            for row in await cursor.fetchall():
                job = _job_from_row(row[:-1])
                self.watchers[job.id] = set(row[-1]) - {self.node}
                jobs.append(job)
            return sorted(jobs, key=lambda job: job.id)

    @_unavailable
    async def waiting(self, model_key: str) -> int:
        async with self._pool.connection() as conn:
            cursor = await conn.execute(
                "SELECT count(*) FROM jobs WHERE state = 'queued' AND model_key = %s", (model_key,)
            )
            (count,) = await _one(cursor)
            return int(count)

    @_unavailable
    async def waiting_by_model(self) -> dict[str, int]:
        async with self._pool.connection() as conn:
            cursor = await conn.execute(
                "SELECT model_key, count(*) FROM jobs WHERE state = 'queued' GROUP BY model_key"
            )
            return {str(key): int(count) for key, count in await cursor.fetchall()}

    @_unavailable
    async def mark_working(self, job_id: str) -> None:
        async with self._pool.connection() as conn:
            await conn.execute(
                "UPDATE jobs SET state = 'working' WHERE id = %s AND state = 'loading' AND node = %s",
                (job_id, self.node),
            )

    @_unavailable
    async def requeue(
        self, job: Job, *, attempt: int, error: str | None, not_before: float | None = None
    ) -> None:
        self.watchers.pop(job.id, None)
        async with self._pool.connection() as conn, conn.transaction():
            cursor = await conn.execute(
                f"UPDATE jobs SET state = 'queued', attempt = %s, error = %s, node = NULL, lease_until = NULL,"
                f" served_model = NULL, not_before = %s WHERE id = %s AND {_RUNNING} AND node = %s",
                (attempt, error, not_before, job.id, self.node),
            )
            if cursor.rowcount:
                await _wake(conn, self.node, job.model_key)

    @_unavailable
    async def set_served(self, job_id: str, model: str) -> None:
        async with self._pool.connection() as conn:
            await conn.execute("UPDATE jobs SET served_model = %s WHERE id = %s", (model, job_id))

    @_unavailable
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
    ) -> None:
        async with self._pool.connection() as conn, conn.transaction():
            cursor = await conn.execute(
                f"UPDATE jobs SET state = %s, finished_at = %s, status = %s, result = %s, error = %s,"
                f" attempt = coalesce(%s, attempt), cache = coalesce(%s, cache), node = NULL, lease_until = NULL"
                f" WHERE id = %s AND {_RUNNING} AND node = %s",
                (state.value, now, status, result, error, attempt, cache, job.id, self.node),
            )
            if cursor.rowcount and chunks:
                async with conn.cursor() as insert:
                    await insert.executemany(
                        "INSERT INTO chunks (job_id, seq, data) VALUES (%s, %s, %s)"
                        " ON CONFLICT (job_id, seq) DO UPDATE SET data = excluded.data",
                        [(job.id, seq, data) for seq, data in enumerate(chunks)],
                    )

    @_unavailable
    async def cancel_queued(self, job_id: str, now: float) -> bool:
        async with self._pool.connection() as conn:
            cursor = await conn.execute(
                "UPDATE jobs SET state = 'cancelled', finished_at = %s, status = 499,"
                " error = 'cancelled before it ran' WHERE id = %s AND state = 'queued'",
                (now, job_id),
            )
            return bool(cursor.rowcount)

    @_unavailable
    async def cancel_elsewhere(self, job_id: str) -> bool:
        """Ask the node that runs `job_id`, if it is another node, to abort it; False if none does."""
        async with self._pool.connection() as conn:
            cursor = await conn.execute(
                f"SELECT node FROM jobs WHERE id = %s AND {_RUNNING} AND node <> %s", (job_id, self.node)
            )
            row = await cursor.fetchone()
            if row is None:
                return False
            payload = json.dumps({"n": self.node, "cancel": job_id, "to": row[0]})
            await conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, payload))
            return True

    # Reads

    @_unavailable
    async def get(self, job_id: str) -> Job | None:
        async with self._pool.connection() as conn:
            cursor = await conn.execute(f"SELECT {_COLUMNS} FROM jobs WHERE id = %s", (job_id,))
            row = await cursor.fetchone()
            return None if row is None else _job_from_row(row)

    @_unavailable
    async def list_jobs(
        self, *, state: JobState | None, model_key: str | None, limit: int, before: str | None
    ) -> list[Job]:
        where, args = [], []
        if state is not None:
            where.append("state = %s")
            args.append(str(state))
        if model_key is not None:
            # A model name matches its groups with and without load options;
            # an alias key's head (`@fast`) matches the alias's jobs, whatever their models.
            where.append("(model_key = %s OR starts_with(model_key, %s) OR starts_with(model_key, %s))")
            args += [model_key, model_key + " ", model_key + "("]
        if before is not None:
            where.append("id < %s")
            args.append(before)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        async with self._pool.connection() as conn:
            cursor = await conn.execute(
                f"SELECT {_SUMMARY_COLUMNS} FROM jobs {clause} ORDER BY id DESC LIMIT %s".encode(),
                (*args, limit),
            )
            return [_job_from_row(row) for row in await cursor.fetchall()]

    @_unavailable
    async def chunks(self, job_id: str) -> list[bytes]:
        async with self._pool.connection() as conn:
            cursor = await conn.execute("SELECT data FROM chunks WHERE job_id = %s ORDER BY seq", (job_id,))
            return [bytes(data) for (data,) in await cursor.fetchall()]

    @_unavailable
    async def position(self, job_id: str, model_key: str, priority: Priority, drain_order: DrainOrder) -> int:
        async with self._pool.connection() as conn:
            return await self._position(conn, job_id, model_key, priority, drain_order)

    async def _position(
        self, conn: Connection, job_id: str, model_key: str, priority: Priority, drain_order: DrainOrder
    ) -> int:
        cursor = await conn.execute(
            "SELECT count(*) FROM jobs WHERE state = 'queued' AND model_key = %s AND priority = %s AND id < %s",
            (model_key, priority.value, job_id),
        )
        (ahead,) = await _one(cursor)
        queues = await self._queues(conn)
        waiting = {(q.model_key, q.priority): q.waiting for q in queues}
        before = 0
        for group in drain_order(queues):
            if group == (model_key, priority):
                break
            before += waiting[group]
        return before + int(ahead)

    @_unavailable
    async def counts_by_state(self) -> dict[str, int]:
        async with self._pool.connection() as conn:
            cursor = await conn.execute("SELECT state, count(*) FROM jobs GROUP BY state")
            return {str(state): int(count) for state, count in await cursor.fetchall()}

    # The embedding cache: one table shared by every node, least recently used out

    @_unavailable
    async def cache_get(self, keys: Sequence[bytes]) -> dict[bytes, CachedVector]:
        async with self._pool.connection() as conn:
            return await _cache_get(conn, keys)

    @_unavailable
    async def cache_put(self, entries: Sequence[CacheEntry], limit: int) -> int:
        async with self._pool.connection() as conn, conn.transaction():
            async with conn.cursor() as cursor:
                await cursor.executemany(
                    "INSERT INTO embed_cache (key, digest, vector, tokens, size) VALUES (%s, %s, %s, %s, %s)"
                    " ON CONFLICT (key) DO UPDATE SET digest = excluded.digest, vector = excluded.vector,"
                    " tokens = excluded.tokens, size = excluded.size, used = nextval('embed_cache_used_seq')",
                    [
                        (e.key, e.digest, e.vector, e.tokens, len(e.vector) + _CACHE_ROW_OVERHEAD)
                        for e in entries
                    ],
                )
            return await _cache_evict(conn, limit)

    @_unavailable
    async def cache_evict(self, limit: int) -> int:
        async with self._pool.connection() as conn, conn.transaction():
            return await _cache_evict(conn, limit)

    @_unavailable
    async def cache_invalidate(self, digests: Sequence[str]) -> int:
        async with self._pool.connection() as conn:
            cursor = await conn.execute(
                "DELETE FROM embed_cache WHERE digest = ANY(%s)", (list(set(digests)),)
            )
            return cursor.rowcount

    @_unavailable
    async def cache_stats(self) -> CacheStats:
        async with self._pool.connection() as conn:
            cursor = await conn.execute("SELECT count(*), coalesce(sum(size), 0) FROM embed_cache")
            entries, size = await _one(cursor)
            return CacheStats(int(entries), int(size))

    # Pins: each node's own, for its own Ollama

    @_unavailable
    async def pins(self) -> list[RecordedPin]:
        async with self._pool.connection() as conn:
            cursor = await conn.execute(
                "SELECT model_key, endpoint, model, options FROM pins WHERE node = %s ORDER BY model_key",
                (self.node,),
            )
            return [RecordedPin(*row) for row in await cursor.fetchall()]

    @_unavailable
    async def set_pins(self, pins: Sequence[RecordedPin]) -> None:
        async with self._pool.connection() as conn, conn.transaction():
            await conn.execute("DELETE FROM pins WHERE node = %s", (self.node,))
            for pin in pins:
                await conn.execute(
                    "INSERT INTO pins (node, model_key, endpoint, model, options) VALUES (%s, %s, %s, %s, %s)",
                    (self.node, pin.model_key, pin.endpoint, pin.model, pin.options),
                )

    # Upkeep

    @_unavailable
    async def prune(self, cutoff: float, batch: int) -> int:
        """As for SQLite, but one node at a time: the others find the lock taken and prune nothing."""
        async with self._pool.connection() as conn, conn.transaction():
            cursor = await conn.execute("SELECT pg_try_advisory_xact_lock(%s)", (LOCK_PRUNE,))
            (locked,) = await _one(cursor)
            if not locked:
                return 0
            cursor = await conn.execute(
                f"DELETE FROM jobs WHERE id IN"
                f" (SELECT id FROM jobs WHERE {_ENDED} AND finished_at < %s LIMIT %s)",
                (cutoff, batch),
            )
            return cursor.rowcount

    async def ping(self) -> None:
        async with self._pool.connection() as conn:
            await conn.execute("SELECT 1 FROM jobs LIMIT 0")

    @_unavailable
    async def describe(self) -> dict[str, Any]:
        async with self._pool.connection() as conn:
            cursor = await conn.execute("SELECT pg_database_size(current_database())")
            (size,) = await _one(cursor)
        return {
            "backend": "postgresql",
            "url": redact_url(self.url),
            "node": self.node,
            "size_bytes": int(size),
        }

    @_unavailable
    async def nodes(self) -> list[dict[str, Any]]:
        """Every node that shares the queue, live or not, with its Ollama and its heartbeat's age."""
        async with self._pool.connection() as conn:
            cursor = await conn.execute(
                "SELECT name, upstream, reachable, resident, serving, running, heartbeat_at,"
                " extract(epoch FROM now() - heartbeat_at),"
                " left_at IS NULL AND heartbeat_at > now() - make_interval(secs => %s) FROM nodes ORDER BY name",
                (self.node_timeout,),
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


async def _requeue_running(
    conn: Connection,
    now: float,
    max_attempts: int,
    which: str,
    args: tuple[Any, ...],
    cause: str,
    *,
    orphaned: bool = False,
) -> Recovered:
    """Put running jobs back, charging an attempt; those out of attempts fail. Wakes every node.

    `orphaned`: their node died, so they go next wherever they run (`ModelQueue.orphaned`).
    """
    cursor = await conn.execute(
        f"UPDATE jobs SET state = 'failed', finished_at = %s, status = 500, attempt = attempt + 1,"
        f" error = %s, node = NULL, lease_until = NULL"
        f" WHERE {_RUNNING} AND {which} AND attempt + 1 >= %s",
        (now, f"interrupted by {cause} on every attempt", *args, max_attempts),
    )
    failed = cursor.rowcount
    cursor = await conn.execute(
        f"UPDATE jobs SET state = 'queued', attempt = attempt + 1, node = NULL, lease_until = NULL,"
        f" served_model = NULL, orphaned = %s WHERE {_RUNNING} AND {which}",
        (orphaned, *args),
    )
    requeued = cursor.rowcount
    if requeued:
        await _wake(conn, "", "")
    return Recovered(requeued, failed)


# A row's bookkeeping beside its vector, as the SQLite cache counts it.
_CACHE_ROW_OVERHEAD = 120


async def _cache_get(conn: Connection, keys: Sequence[bytes]) -> dict[bytes, CachedVector]:
    """The vectors cached under `keys` (those found), each marked as just used."""
    unique = list(dict.fromkeys(keys))
    if not unique:
        return {}
    cursor = await conn.execute(
        "UPDATE embed_cache SET used = nextval('embed_cache_used_seq') WHERE key = ANY(%s)"
        " RETURNING key, vector, tokens",
        (unique,),
    )
    return {
        bytes(key): CachedVector(bytes(vector), int(tokens))
        for key, vector, tokens in await cursor.fetchall()
    }


async def _cache_evict(conn: Connection, limit: int) -> int:
    """Drop the least recently used vectors until the cache holds at most `limit` bytes."""
    cursor = await conn.execute(
        "DELETE FROM embed_cache WHERE key IN (SELECT key FROM ("
        "  SELECT key, sum(size) OVER (ORDER BY used DESC) AS kept FROM embed_cache"
        ") AS newest WHERE kept > %s)",
        (limit,),
    )
    return cursor.rowcount


async def _wake(conn: Connection, node: str, model_key: str) -> None:
    """Tell every node's worker (at commit) that the queue changed."""
    await conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, json.dumps({"n": node, "wake": model_key})))


async def _one(cursor: psycopg.AsyncCursor[TupleRow]) -> TupleRow:
    row = await cursor.fetchone()
    if row is None:
        raise StoreError("the database answered no row where one was due")
    return row


def _job_from_row(row: Sequence[Any]) -> Job:
    """A job from a row of `_COLUMNS`; fails loudly on anything else."""
    (
        id_,
        state,
        endpoint,
        model,
        key,
        stream,
        body,
        attempt,
        created,
        started,
        finished,
        status,
        error,
        result,
        bg,
        priority,
        routing,
        served_model,
        cache,
        not_before,
    ) = row
    return Job(
        id=id_,
        state=JobState(state),
        endpoint=endpoint,
        model=model,
        model_key=key,
        stream=bool(stream),
        body=bytes(body),
        attempt=attempt,
        created_at=created,
        started_at=started,
        finished_at=finished,
        status=status,
        error=error,
        result=None if result is None else bytes(result),
        respond_async=bool(bg),
        priority=Priority(priority),
        routing=routing,
        served_model=served_model,
        cache=cache,
        not_before=not_before,
    )
