"""The read models: what the job API, /status and the worker's counts read straight from the tables."""

from __future__ import annotations

from foreman.job import Job, JobState, Priority
from foreman.storage import DrainOrder, output
from foreman.storage.postgres import claims
from foreman.storage.postgres.connection import Connection, one
from foreman.storage.rows import JOB, job_from_row, job_summary

# Pages of jobs show neither the request nor the result.
_JOB_SUMMARY = job_summary("''::bytea")


async def get(conn: Connection, job_id: str) -> Job | None:
    cursor = await conn.execute(f"SELECT {JOB} FROM jobs WHERE id = %s", (job_id,))
    row = await cursor.fetchone()
    return None if row is None else job_from_row(row)


async def list_jobs(
    conn: Connection, *, state: JobState | None, model_key: str | None, limit: int, before: str | None
) -> list[Job]:
    """A page of jobs, newest first, each older than the cursor `before`; without body and result."""
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
    cursor = await conn.execute(
        f"SELECT {_JOB_SUMMARY} FROM jobs {clause} ORDER BY id DESC LIMIT %s".encode(),
        (*args, limit),
    )
    return [job_from_row(row) for row in await cursor.fetchall()]


async def chunks(conn: Connection, job_id: str) -> list[bytes]:
    """The output a finished job streamed, in order: kept with its row, or (a long stream, an older job) in `chunks`."""
    cursor = await conn.execute(
        "SELECT output, CASE WHEN output IS NULL THEN"
        " ARRAY(SELECT data FROM chunks WHERE job_id = jobs.id ORDER BY seq) END FROM jobs WHERE id = %s",
        (job_id,),
    )
    row = await cursor.fetchone()
    if row is None:
        return []
    packed, rows = row
    if packed is not None:
        return output.unpack(bytes(packed), job_id)
    return [bytes(data) for data in rows]


async def position(
    conn: Connection,
    job_id: str,
    model_key: str,
    priority: Priority,
    drain_order: DrainOrder,
    me: str,
    node_timeout: float,
) -> int:
    """How many queued jobs run before this one if the queue drains in `drain_order`."""
    cursor = await conn.execute(
        "SELECT count(*) FROM jobs WHERE state = 'queued' AND model_key = %s AND priority = %s AND id < %s",
        (model_key, priority.value, job_id),
    )
    (ahead,) = await one(cursor)
    queues = await claims.queues(conn, me, node_timeout)
    waiting = {(q.model_key, q.priority): q.waiting for q in queues}
    before = 0
    for group in drain_order(queues):
        if group == (model_key, priority):
            break
        before += waiting[group]
    return before + int(ahead)


async def counts_by_state(conn: Connection) -> dict[str, int]:
    cursor = await conn.execute("SELECT state, count(*) FROM jobs GROUP BY state")
    return {str(state): int(count) for state, count in await cursor.fetchall()}


async def waiting(conn: Connection, model_key: str) -> int:
    cursor = await conn.execute(
        "SELECT count(*) FROM jobs WHERE state = 'queued' AND model_key = %s", (model_key,)
    )
    (count,) = await one(cursor)
    return int(count)


async def waiting_by_model(conn: Connection) -> dict[str, int]:
    cursor = await conn.execute(
        "SELECT model_key, count(*) FROM jobs WHERE state = 'queued' GROUP BY model_key"
    )
    return {str(key): int(count) for key, count in await cursor.fetchall()}
