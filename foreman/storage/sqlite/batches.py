"""`BatchStore` over the jobs' SQLite file: files, batches, their lines and the webhook outbox.

It has a connection of its own on a thread of its own: nothing here runs on
the event loop, and its transactions are short (a file goes in part by part),
so the loop's commits never wait long behind them.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

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
from foreman.storage.sqlite.schema import connect_beside

T = TypeVar("T")

_BATCH = (
    "id, status, endpoint, input_file_id, completion_window, created_at, expires_at, times,"
    " output_file_id, error_file_id, errors, metadata, total, completed, failed"
)
_JSON_FIELDS = frozenset({"times", "errors", "metadata"})
_ENDED = "('done', 'failed', 'cancelled')"


def _batch(row: sqlite3.Row) -> StoredBatch:
    return StoredBatch(
        id=row["id"],
        status=row["status"],
        endpoint=row["endpoint"],
        input_file_id=row["input_file_id"],
        completion_window=row["completion_window"],
        created_at=row["created_at"],
        expires_at=row["expires_at"],
        times=json.loads(row["times"]),
        output_file_id=row["output_file_id"],
        error_file_id=row["error_file_id"],
        errors=json.loads(row["errors"]) if row["errors"] else None,
        metadata=json.loads(row["metadata"]) if row["metadata"] else None,
        total=row["total"],
        completed=row["completed"],
        failed=row["failed"],
    )


def _file(row: sqlite3.Row) -> StoredFile:
    return StoredFile(row["id"], row["filename"], row["purpose"], row["bytes"], row["created_at"])


def _delivery(row: sqlite3.Row) -> Delivery:
    return Delivery(
        row["id"], row["endpoint"], bytes(row["body"]), row["attempts"], row["created_at"], row["next_at"]
    )


class SqliteBatchStore:
    """`foreman.storage.batches.BatchStore` over the jobs' SQLite file."""

    def __init__(self, db: sqlite3.Connection, executor: ThreadPoolExecutor) -> None:
        self._db = db
        self._executor = executor

    @classmethod
    async def open(cls, path: Path) -> SqliteBatchStore:
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="foreman-batches")
        db = await asyncio.get_running_loop().run_in_executor(executor, connect_beside, path)
        return cls(db, executor)

    async def _run(self, call: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, partial(call, *args))

    def _tx(self, work: Callable[[sqlite3.Connection], T]) -> T:
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            result = work(db)
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
        return result

    # Files

    async def put_file(self, file: StoredFile, parts: Sequence[bytes]) -> None:
        def head(db: sqlite3.Connection) -> None:
            db.execute(
                "INSERT INTO files (id, filename, purpose, bytes, created_at) VALUES (?, ?, ?, ?, ?)",
                (file.id, file.filename, file.purpose, file.bytes, file.created_at),
            )

        await self._run(self._tx, head)
        for seq, part in enumerate(parts):
            await self._run(
                self._db.execute,
                "INSERT INTO file_parts (file_id, seq, data) VALUES (?, ?, ?)",
                (file.id, seq, part),
            )
        await self._run(self._db.execute, "UPDATE files SET complete = 1 WHERE id = ?", (file.id,))

    async def file(self, file_id: str) -> StoredFile | None:
        def read() -> StoredFile | None:
            row = self._db.execute("SELECT * FROM files WHERE id = ? AND complete", (file_id,)).fetchone()
            return None if row is None else _file(row)

        return await self._run(read)

    async def files(
        self, *, purpose: str | None, after: str | None, limit: int, newest_first: bool
    ) -> list[StoredFile]:
        def read() -> list[StoredFile]:
            where, args = ["complete"], []
            if purpose is not None:
                where.append("purpose = ?")
                args.append(purpose)
            if after is not None:
                where.append("id < ?" if newest_first else "id > ?")
                args.append(after)
            order = "DESC" if newest_first else "ASC"
            sql = f"SELECT * FROM files WHERE {' AND '.join(where)} ORDER BY id {order} LIMIT ?"
            return [_file(row) for row in self._db.execute(sql, (*args, limit))]

        return await self._run(read)

    async def content(self, file_id: str) -> bytes | None:
        def read() -> bytes | None:
            if (
                self._db.execute("SELECT 1 FROM files WHERE id = ? AND complete", (file_id,)).fetchone()
                is None
            ):
                return None
            rows = self._db.execute("SELECT data FROM file_parts WHERE file_id = ? ORDER BY seq", (file_id,))
            return b"".join(bytes(data) for (data,) in rows)

        return await self._run(read)

    async def drop_unfinished_uploads(self, before: float) -> int:
        def delete(db: sqlite3.Connection) -> int:
            return db.execute("DELETE FROM files WHERE NOT complete AND created_at < ?", (before,)).rowcount

        return await self._run(self._tx, delete)

    async def delete_file(self, file_id: str) -> bool:
        def delete(db: sqlite3.Connection) -> bool:
            return db.execute("DELETE FROM files WHERE id = ?", (file_id,)).rowcount > 0

        return await self._run(self._tx, delete)

    # Batches

    async def put_batch(self, batch: StoredBatch) -> None:
        def insert(db: sqlite3.Connection) -> None:
            db.execute(
                f"INSERT INTO batches ({_BATCH}) VALUES ({', '.join('?' * 15)})",
                (
                    batch.id,
                    batch.status,
                    batch.endpoint,
                    batch.input_file_id,
                    batch.completion_window,
                    batch.created_at,
                    batch.expires_at,
                    json.dumps(batch.times),
                    batch.output_file_id,
                    batch.error_file_id,
                    None if batch.errors is None else json.dumps(batch.errors),
                    None if batch.metadata is None else json.dumps(batch.metadata),
                    batch.total,
                    batch.completed,
                    batch.failed,
                ),
            )

        await self._run(self._tx, insert)

    async def batch(self, batch_id: str) -> StoredBatch | None:
        def read() -> StoredBatch | None:
            row = self._db.execute(f"SELECT {_BATCH} FROM batches WHERE id = ?", (batch_id,)).fetchone()
            return None if row is None else _batch(row)

        return await self._run(read)

    async def batches(self, *, after: str | None, limit: int) -> list[StoredBatch]:
        def read() -> list[StoredBatch]:
            rows = self._db.execute(
                f"SELECT {_BATCH} FROM batches WHERE id < ? ORDER BY id DESC LIMIT ?",
                (after if after is not None else "\U0010ffff", limit),
            )
            return [_batch(row) for row in rows]

        return await self._run(read)

    async def active(self) -> list[StoredBatch]:
        def read() -> list[StoredBatch]:
            marks = ", ".join("?" * len(ACTIVE))
            rows = self._db.execute(
                f"SELECT {_BATCH} FROM batches WHERE status IN ({marks}) ORDER BY id", ACTIVE
            )
            return [_batch(row) for row in rows]

        return await self._run(read)

    async def update(self, batch_id: str, expect: Sequence[str], **changes: Any) -> bool:
        return await self._run(self._tx, partial(_update, batch_id=batch_id, expect=expect, changes=changes))

    async def add_lines(self, batch_id: str, lines: Sequence[Line]) -> None:
        def insert(db: sqlite3.Connection) -> None:
            db.executemany(
                "INSERT OR IGNORE INTO batch_lines (batch_id, line, custom_id, job_id, status, error)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                [(batch_id, ln.line, ln.custom_id, ln.job_id, ln.status, ln.error) for ln in lines],
            )

        await self._run(self._tx, insert)

    async def line_states(self, batch_id: str) -> dict[str, int]:
        def read() -> dict[str, int]:
            rows = self._db.execute(
                "SELECT coalesce(j.state, 'rejected'), count(*) FROM batch_lines b"
                " LEFT JOIN jobs j ON j.id = b.job_id WHERE b.batch_id = ? GROUP BY 1",
                (batch_id,),
            )
            return {str(state): int(n) for state, n in rows}

        return await self._run(read)

    async def queued_jobs(self, batch_id: str) -> list[str]:
        def read() -> list[str]:
            rows = self._db.execute(
                "SELECT j.id FROM batch_lines b JOIN jobs j ON j.id = b.job_id"
                " WHERE b.batch_id = ? AND j.state = 'queued'",
                (batch_id,),
            )
            return [str(job_id) for (job_id,) in rows]

        return await self._run(read)

    async def outcomes(self, batch_id: str) -> list[Outcome]:
        def read() -> list[Outcome]:
            rows = self._db.execute(
                "SELECT b.line, b.custom_id, b.job_id, j.state, coalesce(j.status, b.status),"
                " coalesce(j.error, b.error), j.result FROM batch_lines b LEFT JOIN jobs j ON j.id = b.job_id"
                " WHERE b.batch_id = ? ORDER BY b.line",
                (batch_id,),
            )
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

        return await self._run(read)

    async def finish(
        self,
        batch_id: str,
        expect: Sequence[str],
        changes: dict[str, Any],
        files: Sequence[tuple[StoredFile, bytes]],
        deliveries: Sequence[Delivery],
    ) -> bool:
        def work(db: sqlite3.Connection) -> bool:
            if not _update(db, batch_id=batch_id, expect=expect, changes=changes):
                return False
            for file, data in files:
                db.execute(
                    "INSERT INTO files (id, filename, purpose, bytes, created_at, complete) VALUES (?, ?, ?, ?, ?, 1)",
                    (file.id, file.filename, file.purpose, file.bytes, file.created_at),
                )
                db.executemany(
                    "INSERT INTO file_parts (file_id, seq, data) VALUES (?, ?, ?)",
                    [(file.id, seq, part) for seq, part in enumerate(split(data))],
                )
            _enqueue(db, deliveries)
            # The files hold every line's outcome now; the lines would only outlive their jobs.
            db.execute("DELETE FROM batch_lines WHERE batch_id = ?", (batch_id,))
            return True

        return await self._run(self._tx, work)

    # Retention

    async def prune_batches(self, cutoff: float, limit: int) -> tuple[int, list[str]]:
        def work(db: sqlite3.Connection) -> tuple[int, list[str]]:
            rows = db.execute(
                f"SELECT id, input_file_id, output_file_id, error_file_id FROM batches"
                f" WHERE status IN {ENDED!r} AND json_extract(times, '$.' || status || '_at') < ?"
                f" ORDER BY id LIMIT ?",
                (cutoff, limit),
            ).fetchall()
            ids = [(row["id"],) for row in rows]
            db.executemany("DELETE FROM batch_lines WHERE batch_id = ?", ids)
            db.executemany("DELETE FROM batches WHERE id = ?", ids)
            left = [f for row in rows for f in (row["output_file_id"], row["error_file_id"]) if f]
            for input_file in dict.fromkeys(row["input_file_id"] for row in rows):
                named = db.execute("SELECT 1 FROM batches WHERE input_file_id = ?", (input_file,))
                if named.fetchone() is None:
                    left.append(input_file)
            db.executemany("UPDATE files SET complete = 0 WHERE id = ?", [(f,) for f in left])
            return len(rows), left

        return await self._run(self._tx, work)

    async def drop_file_parts(self, file_id: str, limit: int) -> bool:
        def work(db: sqlite3.Connection) -> bool:
            if db.execute("SELECT 1 FROM files WHERE id = ? AND NOT complete", (file_id,)).fetchone() is None:
                return False
            deleted = db.execute(
                "DELETE FROM file_parts WHERE file_id = ? AND seq IN"
                " (SELECT seq FROM file_parts WHERE file_id = ? ORDER BY seq LIMIT ?)",
                (file_id, file_id, limit),
            ).rowcount
            if deleted == 0:
                db.execute("DELETE FROM files WHERE id = ?", (file_id,))
            return True

        return await self._run(self._tx, work)

    async def prune_deliveries(self, cutoff: float, limit: int) -> int:
        def work(db: sqlite3.Connection) -> int:
            return db.execute(
                "DELETE FROM webhook_outbox WHERE rowid IN (SELECT rowid FROM webhook_outbox"
                " WHERE state IN ('delivered', 'failed') AND next_at < ? LIMIT ?)",
                (cutoff, limit),
            ).rowcount

        return await self._run(self._tx, work)

    # The webhook outbox

    async def watch_job(self, job_id: str, endpoint: str) -> None:
        await self._run(
            self._db.execute,
            "INSERT OR REPLACE INTO job_webhooks (job_id, endpoint) VALUES (?, ?)",
            (job_id, endpoint),
        )

    async def ended_watched_jobs(self, make: JobEventMaker, limit: int) -> int:
        def work(db: sqlite3.Connection) -> int:
            rows = db.execute(
                f"SELECT w.job_id, w.endpoint, j.state FROM job_webhooks w LEFT JOIN jobs j ON j.id = w.job_id"
                f" WHERE j.state IS NULL OR j.state IN {_ENDED} LIMIT ?",
                (limit,),
            ).fetchall()
            ended = [
                (job_id, endpoint, JobState(state)) for job_id, endpoint, state in rows if state is not None
            ]
            _enqueue(db, [make(*entry) for entry in ended])
            db.executemany("DELETE FROM job_webhooks WHERE job_id = ?", [(row[0],) for row in rows])
            return len(ended)

        return await self._run(self._tx, work)

    async def enqueue_events(self, deliveries: Sequence[Delivery]) -> None:
        await self._run(self._tx, partial(_enqueue, deliveries=deliveries))

    async def due_deliveries(self, now: float, lease: float, owner: str, limit: int) -> list[Delivery]:
        def work(db: sqlite3.Connection) -> list[Delivery]:
            rows = db.execute(
                "SELECT * FROM webhook_outbox WHERE state = 'pending' AND next_at <= ?"
                " AND (lease_until IS NULL OR lease_until < ?) ORDER BY next_at LIMIT ?",
                (now, now, limit),
            ).fetchall()
            db.executemany(
                "UPDATE webhook_outbox SET owner = ?, lease_until = ? WHERE id = ? AND endpoint = ?",
                [(owner, now + lease, row["id"], row["endpoint"]) for row in rows],
            )
            return [_delivery(row) for row in rows]

        return await self._run(self._tx, work)

    async def delivered(self, delivery: Delivery) -> None:
        await self._set(delivery, "delivered", delivery.next_at, None)

    async def retry_later(self, delivery: Delivery, next_at: float, error: str) -> None:
        await self._set(delivery, "pending", next_at, error)

    async def give_up(self, delivery: Delivery, error: str) -> None:
        await self._set(delivery, "failed", delivery.next_at, error)

    async def _set(self, delivery: Delivery, state: str, next_at: float, error: str | None) -> None:
        await self._run(
            self._db.execute,
            "UPDATE webhook_outbox SET state = ?, attempts = attempts + 1, next_at = ?, last_error = ?,"
            " owner = NULL, lease_until = NULL WHERE id = ? AND endpoint = ?",
            (state, next_at, error, delivery.id, delivery.endpoint),
        )

    async def delivery_counts(self) -> dict[str, int]:
        def read() -> dict[str, int]:
            rows = self._db.execute(
                "SELECT state, count(*) FROM webhook_outbox WHERE state IN ('pending', 'failed') GROUP BY state"
            )
            return {str(state): int(n) for state, n in rows}

        return await self._run(read)

    async def close(self) -> None:
        await self._run(self._db.close)
        self._executor.shutdown(wait=True)


def _update(db: sqlite3.Connection, *, batch_id: str, expect: Sequence[str], changes: dict[str, Any]) -> bool:
    row = db.execute("SELECT status, times FROM batches WHERE id = ?", (batch_id,)).fetchone()
    if row is None or row["status"] not in expect:
        return False
    values = dict(changes)
    if "times" in values:
        values["times"] = {**json.loads(row["times"]), **values["times"]}
    assignments = ", ".join(f"{name} = ?" for name in values)
    args = [json.dumps(v) if name in _JSON_FIELDS and v is not None else v for name, v in values.items()]
    if assignments:
        db.execute(f"UPDATE batches SET {assignments} WHERE id = ?", (*args, batch_id))
    return True


def _enqueue(db: sqlite3.Connection, deliveries: Sequence[Delivery]) -> None:
    db.executemany(
        "INSERT OR IGNORE INTO webhook_outbox (id, endpoint, body, state, attempts, created_at, next_at)"
        " VALUES (?, ?, ?, 'pending', ?, ?, ?)",
        [(d.id, d.endpoint, d.body, d.attempts, d.created_at, d.next_at) for d in deliveries],
    )
