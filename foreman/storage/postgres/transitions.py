"""A taken job's way to its end, and the way back to the queue when its node stopped.

Every write to a running job checks that it is still the writing node's
(`node = me`): a node whose lease ran out, and whose job another node put
back and took, cannot end it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from foreman.job import Ended, Job, JobState
from foreman.storage import Recovered, output
from foreman.storage.postgres.connection import ENDED, RUNNING, Connection, one, wake
from foreman.storage.postgres.messages import PAYLOAD_LIMIT, end_payloads
from foreman.storage.postgres.schema import CHANNEL, LOCK_PRUNE, LOCK_REAP


async def mark_working(conn: Connection, job_id: str, me: str) -> None:
    await conn.execute(
        "UPDATE jobs SET state = 'working' WHERE id = %s AND state = 'loading' AND node = %s",
        (job_id, me),
    )


async def requeue(
    conn: Connection, job: Job, me: str, *, attempt: int, error: str | None, not_before: float | None
) -> None:
    async with conn.transaction():
        cursor = await conn.execute(
            f"UPDATE jobs SET state = 'queued', attempt = %s, error = %s, node = NULL, lease_until = NULL,"
            f" served_model = NULL, not_before = %s WHERE id = %s AND {RUNNING} AND node = %s",
            (attempt, error, not_before, job.id, me),
        )
        if cursor.rowcount:
            await wake(conn, me, job.model_key)


async def set_served(conn: Connection, job_id: str, model: str) -> None:
    await conn.execute("UPDATE jobs SET served_model = %s WHERE id = %s", (model, job_id))


async def finish(
    conn: Connection,
    job: Job,
    state: JobState,
    now: float,
    me: str,
    *,
    status: int,
    result: bytes | None,
    error: str | None,
    attempt: int | None,
    chunks: Sequence[bytes],
    cache: str | None,
    ended: Ended | None = None,
) -> bool:
    """End a running job of node `me`, with its output, in one statement; False if it is no longer `me`'s.

    With `ended`, the same statement announces the end to every node (a NOTIFY
    at its commit, or a `relay` row for a payload over the limit): an end is
    heard if and only if it was recorded, and a retry after a lost answer
    finds the job ended and announces nothing twice. The nodes where a
    client waits for the job (`jobs.watchers`, read in the statement) hear it
    with its reply, the others without. A short stream's chunks are packed
    into `jobs.output`; a long one's are inserted into `chunks` by the same
    statement.
    """
    packed = output.pack(chunks)
    args: dict[str, Any] = {
        "state": state.value,
        "now": now,
        "status": status,
        "result": result,
        "error": error,
        "attempt": attempt,
        "cache": cache,
        "output": packed,
        "id": job.id,
        "me": me,
        "channel": CHANNEL,
    }
    update = (
        "UPDATE jobs SET state = %(state)s, finished_at = %(now)s, status = %(status)s, result = %(result)s,"
        " error = %(error)s, attempt = coalesce(%(attempt)s, attempt), cache = coalesce(%(cache)s, cache),"
        f" output = %(output)s, node = NULL, lease_until = NULL WHERE id = %(id)s AND {RUNNING} AND node = %(me)s"
    )
    long_stream = bool(chunks) and packed is None
    if ended is None and not long_stream:
        cursor = await conn.execute(update, args)
        return bool(cursor.rowcount)
    steps = [f"ended AS ({update} RETURNING id, cardinality(array_remove(watchers, %(me)s)) > 0 AS watched)"]
    if long_stream:
        args["chunks"] = list(chunks)
        steps.append(
            "stored AS (INSERT INTO chunks (job_id, seq, data)"
            " SELECT ended.id, c.seq - 1, c.data FROM ended, unnest(%(chunks)s::bytea[]) WITH ORDINALITY AS c(data, seq)"
            " ON CONFLICT (job_id, seq) DO UPDATE SET data = excluded.data)"
        )
    if ended is None:
        select = "SELECT 1 FROM ended"
    else:
        args["full"], args["bare"] = end_payloads(me, job.id, ended)
        if len(args["full"]) <= PAYLOAD_LIMIT:
            select = (
                "SELECT pg_notify(%(channel)s, CASE WHEN watched THEN %(full)s ELSE %(bare)s END) FROM ended"
            )
        else:
            # Too big for a payload: a relay row, named by the notification (node.Node._heard reads it).
            args["full"] = args["full"].encode()
            args["relay_bare"] = len(args["bare"]) > PAYLOAD_LIMIT
            steps.append(
                "relayed AS (INSERT INTO relay (job_id, data)"
                " SELECT id, CASE WHEN watched THEN %(full)s ELSE convert_to(%(bare)s, 'UTF8') END FROM ended"
                " WHERE watched OR %(relay_bare)s RETURNING id)"
            )
            select = (
                "SELECT pg_notify(%(channel)s, coalesce((SELECT json_build_object('n', %(me)s::text, 'relay', id)::text"
                " FROM relayed), %(bare)s)) FROM ended"
            )
    cursor = await conn.execute(f"WITH {', '.join(steps)} {select}", args)
    return bool(await cursor.fetchall())


async def cancel_queued(conn: Connection, job_id: str, now: float) -> bool:
    cursor = await conn.execute(
        "UPDATE jobs SET state = 'cancelled', finished_at = %s, status = 499,"
        " error = 'cancelled before it ran' WHERE id = %s AND state = 'queued'",
        (now, job_id),
    )
    return bool(cursor.rowcount)


async def recover(conn: Connection, now: float, max_attempts: int, me: str) -> Recovered:
    """Put back what node `me` ran before it stopped; other nodes' jobs wait for their leases."""
    async with conn.transaction():
        return await _requeue_running(conn, now, max_attempts, "node = %s", (me,), "a foreman restart")


async def reap(conn: Connection, now: float, max_attempts: int) -> list[tuple[str, str]]:
    """Put back the jobs whose node's lease ran out; returns (job id, node) of each.

    One node at a time does it (an advisory lock); the others skip.
    """
    async with conn.transaction():
        cursor = await conn.execute("SELECT pg_try_advisory_xact_lock(%s)", (LOCK_REAP,))
        (locked,) = await one(cursor)
        if not locked:
            return []
        cursor = await conn.execute(
            f"SELECT id, node FROM jobs WHERE {RUNNING} AND lease_until < now() ORDER BY id FOR UPDATE"
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


async def prune(conn: Connection, cutoff: float, batch: int) -> int:
    """As for SQLite, but one node at a time: the others find the lock taken and prune nothing."""
    async with conn.transaction():
        cursor = await conn.execute("SELECT pg_try_advisory_xact_lock(%s)", (LOCK_PRUNE,))
        (locked,) = await one(cursor)
        if not locked:
            return 0
        cursor = await conn.execute(
            # A line of a batch that has not ended keeps its job: the batch's output file is written from it.
            f"DELETE FROM jobs WHERE id IN (SELECT id FROM jobs WHERE {ENDED} AND finished_at < %s"
            f" AND NOT EXISTS (SELECT 1 FROM batch_lines b WHERE b.job_id = jobs.id) LIMIT %s)",
            (cutoff, batch),
        )
        return cursor.rowcount


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
        f" WHERE {RUNNING} AND {which} AND attempt + 1 >= %s",
        (now, f"interrupted by {cause} on every attempt", *args, max_attempts),
    )
    failed = cursor.rowcount
    cursor = await conn.execute(
        f"UPDATE jobs SET state = 'queued', attempt = attempt + 1, node = NULL, lease_until = NULL,"
        f" served_model = NULL, orphaned = %s WHERE {RUNNING} AND {which}",
        (orphaned, *args),
    )
    requeued = cursor.rowcount
    if requeued:
        await wake(conn, "", "")
    return Recovered(requeued, failed)
