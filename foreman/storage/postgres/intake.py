"""Writing new jobs: one transaction each, the idempotency key held across nodes by a unique index."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from foreman.errors import QueueFull
from foreman.job import JobState, NewJob, Priority
from foreman.storage import Accepted, CacheAnswer, IdempotencyConflict, Submission
from foreman.storage.postgres import cache, reads
from foreman.storage.postgres.connection import Connection, one, wake
from foreman.storage.rows import NEW_JOB, NEW_JOB_COLUMNS, new_job_values

_NEW_JOB_MARKS = ", ".join(["%s"] * len(NEW_JOB_COLUMNS))


async def submit(
    conn: Connection, submission: Submission, me: str, node_timeout: float, max_queue: int
) -> Accepted:
    """Write a new job for node `me` (see `Storage.submit`)."""
    job = submission.job
    async with conn.transaction():
        if job.idempotency_key is not None:
            cursor = await conn.execute(
                "SELECT id, request_hash, state, model_key, priority FROM jobs WHERE idempotency_key = %s",
                (job.idempotency_key,),
            )
            row = await cursor.fetchone()
            if row is not None:
                return await _existing(conn, submission, row, me, node_timeout)
        if max_queue:
            cursor = await conn.execute("SELECT count(*) FROM jobs WHERE state = 'queued'")
            (queued,) = await one(cursor)
            if queued >= max_queue:
                raise QueueFull(max_queue)
        cursor = await conn.execute(
            f"INSERT INTO jobs (state, request_hash, watchers, {NEW_JOB})"
            f" VALUES ('queued', %s, %s, {_NEW_JOB_MARKS})"
            " ON CONFLICT (idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING RETURNING id",
            (
                submission.request_hash,
                # A synchronous client waits here for the events, whichever node runs the job.
                [] if job.respond_async else [me],
                *new_job_values(job),
            ),
        )
        if await cursor.fetchone() is None:
            # Another node took the key a moment ago: that job is this submission's.
            cursor = await conn.execute(
                "SELECT id, request_hash, state, model_key, priority FROM jobs WHERE idempotency_key = %s",
                (job.idempotency_key,),
            )
            return await _existing(conn, submission, await one(cursor), me, node_timeout)
        if submission.answer is not None and (result := await _answer(conn, submission.answer, job)):
            await conn.execute(
                "UPDATE jobs SET state = 'done', started_at = %s, finished_at = %s, status = 200,"
                " result = %s, cache = 'hit' WHERE id = %s",
                (job.created_at, job.created_at, result, job.id),
            )
            return Accepted(job.id, True, JobState.DONE, None, result)
        await wake(conn, me, job.model_key)
        position = None
        if submission.drain_order is not None:
            position = await reads.position(
                conn, job.id, job.model_key, job.priority, submission.drain_order, me, node_timeout
            )
        return Accepted(job.id, True, JobState.QUEUED, position)


async def _answer(conn: Connection, answer: CacheAnswer, job: NewJob) -> bytes | None:
    """The cache's reply to the job if it holds every vector, else None (the job queues)."""
    return answer.from_found(await cache.get(conn, answer.keys), job.id)


async def _existing(
    conn: Connection, submission: Submission, row: tuple[Any, ...], me: str, node_timeout: float
) -> Accepted:
    """The earlier job an idempotency key stands for, if this submission is the same request."""
    job_id, request_hash, state, model_key, priority = row
    key = submission.job.idempotency_key
    assert key is not None
    if request_hash != submission.request_hash:
        raise IdempotencyConflict(key, job_id)
    position = None
    if state == JobState.QUEUED and submission.drain_order is not None:
        position = await reads.position(
            conn, job_id, model_key, Priority(priority), submission.drain_order, me, node_timeout
        )
    return Accepted(job_id, False, JobState(state), position)


async def insert_many(conn: Connection, jobs: Sequence[NewJob], me: str) -> int:
    """Write many new jobs in one transaction (bulk loads, benchmarks); returns how many."""
    async with conn.transaction():
        async with conn.cursor() as cursor:
            await cursor.executemany(
                f"INSERT INTO jobs (state, {NEW_JOB}) VALUES ('queued', {_NEW_JOB_MARKS})",
                [new_job_values(job) for job in jobs],
            )
        await wake(conn, me, "")
    return len(jobs)
