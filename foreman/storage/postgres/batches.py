"""`BatchStore` over the shared PostgreSQL queue: every node sees the same files, batches and outbox.

Deliveries are leased like jobs: a node takes the due ones with
`FOR UPDATE SKIP LOCKED` and a lease, so each event goes out from one node at
a time, and a node that dies lets go of its own when the lease runs out.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from psycopg import AsyncConnection
from psycopg.rows import TupleRow
from psycopg.types.json import Jsonb

from foreman.job import JobState
from foreman.storage.batches import (
    ACTIVE,
    ENDED,
    Delivery,
    JobEventMaker,
    Line,
    Outcome,
    StoredBatch,
    StoredFile,
    split,
)
from foreman.storage.postgres.connection import unavailable
from foreman.storage.postgres.storage import PostgresStorage

Connection = AsyncConnection[TupleRow]

_BATCH = (
    "id, status, endpoint, input_file_id, completion_window, created_at, expires_at, times,"
    " output_file_id, error_file_id, errors, metadata, total, completed, failed"
)
_JSON_FIELDS = frozenset({"times", "errors", "metadata"})
_ENDED = "('done', 'failed', 'cancelled')"
_DELIVERY = "id, endpoint, body, attempts, created_at, next_at"


def _batch(row: Sequence[Any]) -> StoredBatch:
    return StoredBatch(
        id=row[0],
        status=row[1],
        endpoint=row[2],
        input_file_id=row[3],
        completion_window=row[4],
        created_at=row[5],
        expires_at=row[6],
        times=dict(row[7]),
        output_file_id=row[8],
        error_file_id=row[9],
        errors=row[10],
        metadata=row[11],
        total=row[12],
        completed=row[13],
        failed=row[14],
    )


def _file(row: Sequence[Any]) -> StoredFile:
    return StoredFile(row[0], row[1], row[2], int(row[3]), row[4])


def _delivery(row: Sequence[Any]) -> Delivery:
    return Delivery(row[0], row[1], bytes(row[2]), row[3], row[4], row[5])


class PostgresBatchStore:
    """`foreman.storage.batches.BatchStore` on the pool of the node's `PostgresStorage`."""

    def __init__(self, store: PostgresStorage) -> None:
        self._store = store

    # Files

    async def put_file(self, file: StoredFile, parts: Sequence[bytes]) -> None:
        async with self._store.connection() as conn:
            await conn.execute(
                "INSERT INTO files (id, filename, purpose, bytes, created_at) VALUES (%s, %s, %s, %s, %s)",
                (file.id, file.filename, file.purpose, file.bytes, file.created_at),
            )
            for seq, part in enumerate(parts):
                await conn.execute(
                    "INSERT INTO file_parts (file_id, seq, data) VALUES (%s, %s, %s)", (file.id, seq, part)
                )
            await conn.execute("UPDATE files SET complete = true WHERE id = %s", (file.id,))

    async def file(self, file_id: str) -> StoredFile | None:
        async with self._store.connection() as conn:
            cursor = await conn.execute(
                "SELECT id, filename, purpose, bytes, created_at FROM files WHERE id = %s AND complete",
                (file_id,),
            )
            row = await cursor.fetchone()
        return None if row is None else _file(row)

    async def files(
        self, *, purpose: str | None, after: str | None, limit: int, newest_first: bool
    ) -> list[StoredFile]:
        where, args = ["complete"], []
        if purpose is not None:
            where.append("purpose = %s")
            args.append(purpose)
        if after is not None:
            where.append("id < %s" if newest_first else "id > %s")
            args.append(after)
        order = "DESC" if newest_first else "ASC"
        sql = (
            f"SELECT id, filename, purpose, bytes, created_at FROM files WHERE {' AND '.join(where)}"
            f" ORDER BY id {order} LIMIT %s"
        )
        async with self._store.connection() as conn:
            cursor = await conn.execute(sql.encode(), (*args, limit))
            return [_file(row) for row in await cursor.fetchall()]

    async def content(self, file_id: str) -> bytes | None:
        async with self._store.connection() as conn:
            cursor = await conn.execute("SELECT 1 FROM files WHERE id = %s AND complete", (file_id,))
            if await cursor.fetchone() is None:
                return None
            cursor = await conn.execute(
                "SELECT data FROM file_parts WHERE file_id = %s ORDER BY seq", (file_id,)
            )
            return b"".join(bytes(data) for (data,) in await cursor.fetchall())

    async def drop_unfinished_uploads(self, before: float) -> int:
        async with self._store.connection() as conn:
            cursor = await conn.execute("DELETE FROM files WHERE NOT complete AND created_at < %s", (before,))
            return cursor.rowcount

    async def delete_file(self, file_id: str) -> bool:
        async with self._store.connection() as conn:
            cursor = await conn.execute("DELETE FROM files WHERE id = %s", (file_id,))
            return cursor.rowcount > 0

    # Batches

    async def put_batch(self, batch: StoredBatch) -> None:
        async with self._store.connection() as conn:
            await conn.execute(
                f"INSERT INTO batches ({_BATCH}) VALUES ({', '.join(['%s'] * 15)})".encode(),
                (
                    batch.id,
                    batch.status,
                    batch.endpoint,
                    batch.input_file_id,
                    batch.completion_window,
                    batch.created_at,
                    batch.expires_at,
                    Jsonb(batch.times),
                    batch.output_file_id,
                    batch.error_file_id,
                    None if batch.errors is None else Jsonb(batch.errors),
                    None if batch.metadata is None else Jsonb(batch.metadata),
                    batch.total,
                    batch.completed,
                    batch.failed,
                ),
            )

    async def batch(self, batch_id: str) -> StoredBatch | None:
        async with self._store.connection() as conn:
            cursor = await conn.execute(f"SELECT {_BATCH} FROM batches WHERE id = %s".encode(), (batch_id,))
            row = await cursor.fetchone()
        return None if row is None else _batch(row)

    async def batches(self, *, after: str | None, limit: int) -> list[StoredBatch]:
        async with self._store.connection() as conn:
            if after is None:
                cursor = await conn.execute(
                    f"SELECT {_BATCH} FROM batches ORDER BY id DESC LIMIT %s".encode(), (limit,)
                )
            else:
                cursor = await conn.execute(
                    f"SELECT {_BATCH} FROM batches WHERE id < %s ORDER BY id DESC LIMIT %s".encode(),
                    (after, limit),
                )
            return [_batch(row) for row in await cursor.fetchall()]

    async def active(self) -> list[StoredBatch]:
        async with self._store.connection() as conn:
            cursor = await conn.execute(
                f"SELECT {_BATCH} FROM batches WHERE status = ANY(%s) ORDER BY id".encode(), (list(ACTIVE),)
            )
            return [_batch(row) for row in await cursor.fetchall()]

    async def update(self, batch_id: str, expect: Sequence[str], **changes: Any) -> bool:
        async with self._store.connection() as conn, conn.transaction():
            return await _update(conn, batch_id, expect, changes)

    async def add_lines(self, batch_id: str, lines: Sequence[Line]) -> None:
        async with self._store.connection() as conn, conn.transaction(), conn.cursor() as cursor:
            await cursor.executemany(
                "INSERT INTO batch_lines (batch_id, line, custom_id, job_id, status, error)"
                " VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
                [(batch_id, ln.line, ln.custom_id, ln.job_id, ln.status, ln.error) for ln in lines],
            )

    async def line_states(self, batch_id: str) -> dict[str, int]:
        async with self._store.connection() as conn:
            cursor = await conn.execute(
                "SELECT coalesce(j.state, 'rejected'), count(*) FROM batch_lines b"
                " LEFT JOIN jobs j ON j.id = b.job_id WHERE b.batch_id = %s GROUP BY 1",
                (batch_id,),
            )
            return {str(state): int(n) for state, n in await cursor.fetchall()}

    async def queued_jobs(self, batch_id: str) -> list[str]:
        async with self._store.connection() as conn:
            cursor = await conn.execute(
                "SELECT j.id FROM batch_lines b JOIN jobs j ON j.id = b.job_id"
                " WHERE b.batch_id = %s AND j.state = 'queued'",
                (batch_id,),
            )
            return [str(job_id) for (job_id,) in await cursor.fetchall()]

    async def outcomes(self, batch_id: str) -> list[Outcome]:
        async with self._store.connection() as conn:
            cursor = await conn.execute(
                "SELECT b.line, b.custom_id, b.job_id, j.state, coalesce(j.status, b.status),"
                " coalesce(j.error, b.error), j.result FROM batch_lines b LEFT JOIN jobs j ON j.id = b.job_id"
                " WHERE b.batch_id = %s ORDER BY b.line",
                (batch_id,),
            )
            rows = await cursor.fetchall()
        return [
            Outcome(
                line,
                custom_id,
                job_id,
                None if state is None else JobState(state),
                status,
                error,
                None if result is None else bytes(result),
            )
            for line, custom_id, job_id, state, status, error, result in rows
        ]

    async def finish(
        self,
        batch_id: str,
        expect: Sequence[str],
        changes: dict[str, Any],
        files: Sequence[tuple[StoredFile, bytes]],
        deliveries: Sequence[Delivery],
    ) -> bool:
        async with self._store.connection() as conn, conn.transaction():
            if not await _update(conn, batch_id, expect, changes):
                return False
            async with conn.cursor() as cursor:
                for file, data in files:
                    await cursor.execute(
                        "INSERT INTO files (id, filename, purpose, bytes, created_at, complete)"
                        " VALUES (%s, %s, %s, %s, %s, true)",
                        (file.id, file.filename, file.purpose, file.bytes, file.created_at),
                    )
                    await cursor.executemany(
                        "INSERT INTO file_parts (file_id, seq, data) VALUES (%s, %s, %s)",
                        [(file.id, seq, part) for seq, part in enumerate(split(data))],
                    )
            await _enqueue(conn, deliveries)
            await conn.execute("DELETE FROM batch_lines WHERE batch_id = %s", (batch_id,))
            return True

    # Retention: a database away is `Unavailable`, which costs the retention loop one round

    @unavailable
    async def prune_batches(self, cutoff: float, limit: int) -> tuple[int, list[str]]:
        async with self._store.connection() as conn, conn.transaction():
            # SKIP LOCKED: nodes pruning at once take different batches.
            cursor = await conn.execute(
                "DELETE FROM batches WHERE id IN (SELECT id FROM batches WHERE status = ANY(%s)"
                " AND (times ->> (status || '_at'))::double precision < %s ORDER BY id LIMIT %s"
                " FOR UPDATE SKIP LOCKED) RETURNING id, input_file_id, output_file_id, error_file_id",
                (list(ENDED), cutoff, limit),
            )
            rows = await cursor.fetchall()
            if not rows:
                return 0, []
            await conn.execute("DELETE FROM batch_lines WHERE batch_id = ANY(%s)", ([r[0] for r in rows],))
            left = [f for row in rows for f in (row[2], row[3]) if f]
            cursor = await conn.execute(
                "SELECT f FROM unnest(%s::text[]) AS f WHERE NOT EXISTS"
                " (SELECT 1 FROM batches WHERE input_file_id = f)",
                (list(dict.fromkeys(row[1] for row in rows)),),
            )
            left += [f for (f,) in await cursor.fetchall()]
            await conn.execute("UPDATE files SET complete = false WHERE id = ANY(%s)", (left,))
            return len(rows), left

    @unavailable
    async def drop_file_parts(self, file_id: str, limit: int) -> bool:
        async with self._store.connection() as conn, conn.transaction():
            cursor = await conn.execute(
                "SELECT 1 FROM files WHERE id = %s AND NOT complete FOR UPDATE", (file_id,)
            )
            if await cursor.fetchone() is None:
                return False
            cursor = await conn.execute(
                "DELETE FROM file_parts WHERE file_id = %s AND seq IN"
                " (SELECT seq FROM file_parts WHERE file_id = %s ORDER BY seq LIMIT %s)",
                (file_id, file_id, limit),
            )
            if cursor.rowcount == 0:
                await conn.execute("DELETE FROM files WHERE id = %s", (file_id,))
            return True

    @unavailable
    async def prune_deliveries(self, cutoff: float, limit: int) -> int:
        async with self._store.connection() as conn, conn.transaction():
            cursor = await conn.execute(
                "DELETE FROM webhook_outbox WHERE (id, endpoint) IN (SELECT id, endpoint FROM webhook_outbox"
                " WHERE state IN ('delivered', 'failed') AND next_at < %s LIMIT %s FOR UPDATE SKIP LOCKED)",
                (cutoff, limit),
            )
            return cursor.rowcount

    # The webhook outbox

    async def watch_job(self, job_id: str, endpoint: str) -> None:
        async with self._store.connection() as conn:
            await conn.execute(
                "INSERT INTO job_webhooks (job_id, endpoint) VALUES (%s, %s)"
                " ON CONFLICT (job_id) DO UPDATE SET endpoint = excluded.endpoint",
                (job_id, endpoint),
            )

    async def ended_watched_jobs(self, make: JobEventMaker, limit: int) -> int:
        async with self._store.connection() as conn, conn.transaction():
            cursor = await conn.execute(
                f"SELECT w.job_id, w.endpoint, j.state FROM job_webhooks w LEFT JOIN jobs j ON j.id = w.job_id"
                f" WHERE j.state IS NULL OR j.state IN {_ENDED} LIMIT %s FOR UPDATE OF w SKIP LOCKED".encode(),
                (limit,),
            )
            rows = await cursor.fetchall()
            ended = [
                (job_id, endpoint, JobState(state)) for job_id, endpoint, state in rows if state is not None
            ]
            await _enqueue(conn, [make(*entry) for entry in ended])
            if rows:
                await conn.execute(
                    "DELETE FROM job_webhooks WHERE job_id = ANY(%s)", ([row[0] for row in rows],)
                )
            return len(ended)

    async def enqueue_events(self, deliveries: Sequence[Delivery]) -> None:
        async with self._store.connection() as conn, conn.transaction():
            await _enqueue(conn, deliveries)

    async def due_deliveries(self, now: float, lease: float, owner: str, limit: int) -> list[Delivery]:
        async with self._store.connection() as conn, conn.transaction():
            cursor = await conn.execute(
                f"UPDATE webhook_outbox SET owner = %s, lease_until = %s WHERE (id, endpoint) IN ("
                f" SELECT id, endpoint FROM webhook_outbox WHERE state = 'pending' AND next_at <= %s"
                f" AND (lease_until IS NULL OR lease_until < %s) ORDER BY next_at LIMIT %s FOR UPDATE SKIP LOCKED"
                f") RETURNING {_DELIVERY}".encode(),
                (owner, now + lease, now, now, limit),
            )
            return [_delivery(row) for row in await cursor.fetchall()]

    async def delivered(self, delivery: Delivery) -> None:
        await self._set(delivery, "delivered", delivery.next_at, None)

    async def retry_later(self, delivery: Delivery, next_at: float, error: str) -> None:
        await self._set(delivery, "pending", next_at, error)

    async def give_up(self, delivery: Delivery, error: str) -> None:
        await self._set(delivery, "failed", delivery.next_at, error)

    async def _set(self, delivery: Delivery, state: str, next_at: float, error: str | None) -> None:
        async with self._store.connection() as conn:
            await conn.execute(
                "UPDATE webhook_outbox SET state = %s, attempts = attempts + 1, next_at = %s, last_error = %s,"
                " owner = NULL, lease_until = NULL WHERE id = %s AND endpoint = %s",
                (state, next_at, error, delivery.id, delivery.endpoint),
            )

    async def delivery_counts(self) -> dict[str, int]:
        async with self._store.connection() as conn:
            cursor = await conn.execute(
                "SELECT state, count(*) FROM webhook_outbox WHERE state IN ('pending', 'failed') GROUP BY state"
            )
            return {str(state): int(n) for state, n in await cursor.fetchall()}

    async def close(self) -> None:
        """The pool is the job store's, closed with it."""


async def _update(conn: Connection, batch_id: str, expect: Sequence[str], changes: dict[str, Any]) -> bool:
    cursor = await conn.execute("SELECT status, times FROM batches WHERE id = %s FOR UPDATE", (batch_id,))
    row = await cursor.fetchone()
    if row is None or row[0] not in expect:
        return False
    values = dict(changes)
    if "times" in values:
        values["times"] = {**dict(row[1]), **values["times"]}
    if values:
        assignments = ", ".join(f"{name} = %s" for name in values)
        args = [Jsonb(v) if name in _JSON_FIELDS and v is not None else v for name, v in values.items()]
        await conn.execute(f"UPDATE batches SET {assignments} WHERE id = %s".encode(), (*args, batch_id))
    return True


async def _enqueue(conn: Connection, deliveries: Sequence[Delivery]) -> None:
    if not deliveries:
        return
    async with conn.cursor() as cursor:
        await cursor.executemany(
            "INSERT INTO webhook_outbox (id, endpoint, body, state, attempts, created_at, next_at)"
            " VALUES (%s, %s, %s, 'pending', %s, %s, %s) ON CONFLICT DO NOTHING",
            [(d.id, d.endpoint, d.body, d.attempts, d.created_at, d.next_at) for d in deliveries],
        )
