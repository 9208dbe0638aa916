"""The durable queue: jobs in SQLite, written before anything else happens.

`Store` is plain synchronous code over one connection, easy to test and to
reason about. `AsyncStore` runs every call on one dedicated thread that owns
that connection, so SQLite never blocks the event loop and never sees two
threads.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from foreman.models import Job, JobState, NewJob, Priority
from foreman.scheduler import Decision, ModelQueue

SCHEMA_VERSION = 2

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id          TEXT PRIMARY KEY,   -- ULID: sorts by arrival
    state       TEXT NOT NULL,
    endpoint    TEXT NOT NULL,
    model       TEXT NOT NULL,      -- as the client sent it
    model_key   TEXT NOT NULL,      -- what the worker groups by
    stream      INTEGER NOT NULL,
    body        BLOB NOT NULL,
    attempt     INTEGER NOT NULL DEFAULT 0,
    created_at  REAL NOT NULL,
    started_at  REAL,
    finished_at REAL,
    status      INTEGER,
    error       TEXT,
    result      BLOB,
    priority    TEXT NOT NULL DEFAULT 'interactive'  -- interactive or batch
);
-- Boot recovery finds interrupted jobs without scanning the finished ones.
CREATE INDEX IF NOT EXISTS jobs_active ON jobs (state) WHERE state IN ('loading', 'working');
"""

# Indexes go after the migration, which adds the column the pick index needs.
_INDEXES = """
-- The pick: the oldest queued job of a model in a class is the first entry under (key, class).
CREATE INDEX IF NOT EXISTS jobs_queued_by_class ON jobs (model_key, priority, id) WHERE state = 'queued';
"""

# What takes a database at version N-1 to version N.
_MIGRATIONS: dict[int, str] = {
    # Priorities: jobs queued before them were all synchronous requests, so interactive.
    2: """
    ALTER TABLE jobs ADD COLUMN priority TEXT NOT NULL DEFAULT 'interactive';
    DROP INDEX IF EXISTS jobs_queued;
    """,
}

_COLUMNS = (
    "id, state, endpoint, model, model_key, stream, body, attempt,"
    " created_at, started_at, finished_at, status, error, result, priority"
)

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Claim:
    """A job the worker took, why, and what still waits for its model."""

    job: Job
    decision: Decision
    waiting_after: int


class Store:
    """Jobs in one SQLite database. Not thread-safe: one thread owns it."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Autocommit: each statement is its own transaction unless we BEGIN.
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode = WAL")
        # NORMAL in WAL mode survives a process crash; only power loss can
        # undo the last commits.
        self._db.execute("PRAGMA synchronous = NORMAL")
        self._db.execute("PRAGMA busy_timeout = 5000")
        self._migrate()
        # Waiting jobs per model key and per (key, class), kept beside the table
        # so that neither the pick nor the pin decision has to count a million rows.
        self._waiting: Counter[str] = Counter()
        self._by_class: Counter[tuple[str, Priority]] = Counter()
        for key, priority, count in self._db.execute(
            "SELECT model_key, priority, count(*) FROM jobs WHERE state = 'queued'"
            " GROUP BY model_key, priority"
        ):
            self._count(key, Priority(priority), count)
        self.path = path

    def _migrate(self) -> None:
        (version,) = self._db.execute("PRAGMA user_version").fetchone()
        has_jobs = self._db.execute("SELECT 1 FROM sqlite_master WHERE name = 'jobs'").fetchone()
        if has_jobs:
            for step in range(max(version, 1) + 1, SCHEMA_VERSION + 1):
                self._db.executescript(_MIGRATIONS[step])
        self._db.executescript(_SCHEMA + _INDEXES)
        self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def _count(self, key: str, priority: Priority, delta: int) -> None:
        self._waiting[key] += delta
        self._by_class[key, priority] += delta

    def close(self) -> None:
        self._db.close()

    def insert(self, job: NewJob) -> None:
        self._db.execute(
            "INSERT INTO jobs (id, state, endpoint, model, model_key, stream, body, created_at, priority)"
            " VALUES (?, 'queued', ?, ?, ?, ?, ?, ?, ?)",
            (
                job.id,
                job.endpoint,
                job.model,
                job.model_key,
                job.stream,
                job.body,
                job.created_at,
                job.priority,
            ),
        )
        self._count(job.model_key, job.priority, 1)

    def queues(self) -> list[ModelQueue]:
        """What waits, per model key and class: one index lookup each for the oldest job."""
        queues = []
        for (key, priority), waiting in self._by_class.items():
            if waiting <= 0:
                continue
            oldest, oldest_at = self._db.execute(
                "SELECT id, created_at FROM jobs WHERE state = 'queued' AND model_key = ? AND priority = ?"
                " ORDER BY id LIMIT 1",
                (key, priority),
            ).fetchone()
            queues.append(ModelQueue(key, priority, waiting, oldest, oldest_at))
        return queues

    def claim_next(self, choose: Callable[[list[ModelQueue]], Decision | None], now: float) -> Claim | None:
        """Let `choose` pick a model from what waits, and take that model's oldest job."""
        decision = choose(self.queues())
        if decision is None:
            return None
        state = JobState.LOADING if decision.swap else JobState.WORKING
        row = self._db.execute(
            f"UPDATE jobs SET state = ?, started_at = ?"
            f" WHERE id = (SELECT id FROM jobs WHERE state = 'queued' AND model_key = ? AND priority = ?"
            f" ORDER BY id LIMIT 1) RETURNING {_COLUMNS}",
            (state, now, decision.model_key, decision.priority),
        ).fetchone()
        if row is None:
            raise RuntimeError(
                f"no queued {decision.priority} job for {decision.model_key!r} although one was counted"
            )
        self._count(decision.model_key, decision.priority, -1)
        return Claim(_job_from_row(row), decision, self._waiting[decision.model_key])

    def set_state(self, job_id: str, state: JobState) -> None:
        self._db.execute("UPDATE jobs SET state = ? WHERE id = ?", (state, job_id))

    def finish(
        self,
        job: Job,
        state: JobState,
        now: float,
        *,
        status: int,
        result: bytes | None = None,
        error: str | None = None,
        attempt: int | None = None,
    ) -> None:
        """End a running job for good; a job that already ended stays as it ended."""
        self._db.execute(
            "UPDATE jobs SET state = ?, finished_at = ?, status = ?, result = ?, error = ?,"
            " attempt = coalesce(?, attempt) WHERE id = ? AND state IN ('loading', 'working')",
            (state, now, status, result, error, attempt, job.id),
        )

    def requeue(self, job: Job, *, attempt: int, error: str | None) -> None:
        """Put a running job back in line, keeping its place (its id)."""
        changed = self._db.execute(
            "UPDATE jobs SET state = 'queued', attempt = ?, error = ?"
            " WHERE id = ? AND state IN ('loading', 'working')",
            (attempt, error, job.id),
        ).rowcount
        self._count(job.model_key, job.priority, changed)

    def cancel_queued(self, job_id: str, now: float) -> bool:
        """Cancel a job that has not started; False if it is no longer queued."""
        row = self._db.execute(
            "UPDATE jobs SET state = 'cancelled', finished_at = ?, status = 499,"
            " error = 'cancelled before it ran' WHERE id = ? AND state = 'queued'"
            " RETURNING model_key, priority",
            (now, job_id),
        ).fetchone()
        if row is None:
            return False
        self._count(row[0], Priority(row[1]), -1)
        return True

    def get(self, job_id: str) -> Job | None:
        row = self._db.execute(f"SELECT {_COLUMNS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return None if row is None else _job_from_row(row)

    def waiting(self, model_key: str) -> int:
        return self._waiting[model_key]

    def recover(self, now: float, max_attempts: int) -> tuple[int, int]:
        """After a crash or restart, requeue jobs that were running; returns (requeued, failed).

        Being interrupted costs an attempt, so a job that brings the daemon
        down every time it runs fails after `max_attempts` instead of forever.
        """
        self._db.execute("BEGIN IMMEDIATE")
        try:
            failed = self._db.execute(
                "UPDATE jobs SET state = 'failed', finished_at = ?, status = 500, attempt = attempt + 1,"
                " error = 'interrupted by a foreman restart on every attempt'"
                " WHERE state IN ('loading', 'working') AND attempt + 1 >= ?",
                (now, max_attempts),
            ).rowcount
            requeued = self._db.execute(
                "UPDATE jobs SET state = 'queued', attempt = attempt + 1"
                " WHERE state IN ('loading', 'working') RETURNING model_key, priority"
            ).fetchall()
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        for key, priority in requeued:
            self._count(key, Priority(priority), 1)
        return len(requeued), failed


def _job_from_row(row: tuple[Any, ...]) -> Job:
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
        priority,
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
        priority=Priority(priority),
    )


class AsyncStore:
    """The store for coroutines: each call runs on the store's own thread."""

    def __init__(self, store: Store, executor: ThreadPoolExecutor) -> None:
        self._store = store
        self._executor = executor
        self.path = store.path

    @classmethod
    async def open(cls, path: Path) -> AsyncStore:
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="foreman-store")
        store = await asyncio.get_running_loop().run_in_executor(executor, Store, path)
        return cls(store, executor)

    async def close(self) -> None:
        await self._run(self._store.close)
        self._executor.shutdown(wait=True)

    async def _run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        call = partial(fn, *args, **kwargs) if kwargs else partial(fn, *args)
        return await asyncio.get_running_loop().run_in_executor(self._executor, call)

    async def insert(self, job: NewJob) -> None:
        await self._run(self._store.insert, job)

    async def queues(self) -> list[ModelQueue]:
        return await self._run(self._store.queues)

    async def claim_next(
        self, choose: Callable[[list[ModelQueue]], Decision | None], now: float
    ) -> Claim | None:
        return await self._run(self._store.claim_next, choose, now)

    async def set_state(self, job_id: str, state: JobState) -> None:
        await self._run(self._store.set_state, job_id, state)

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
    ) -> None:
        await self._run(
            self._store.finish, job, state, now, status=status, result=result, error=error, attempt=attempt
        )

    async def requeue(self, job: Job, *, attempt: int, error: str | None) -> None:
        await self._run(self._store.requeue, job, attempt=attempt, error=error)

    async def cancel_queued(self, job_id: str, now: float) -> bool:
        return await self._run(self._store.cancel_queued, job_id, now)

    async def get(self, job_id: str) -> Job | None:
        return await self._run(self._store.get, job_id)

    async def waiting(self, model_key: str) -> int:
        return await self._run(self._store.waiting, model_key)

    async def recover(self, now: float, max_attempts: int) -> tuple[int, int]:
        return await self._run(self._store.recover, now, max_attempts)
