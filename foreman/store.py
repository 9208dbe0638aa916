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
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar

from foreman import embed_store
from foreman.embed_store import CachedVector, CacheEntry, CacheStats, EmbedCacheTable
from foreman.errors import Conflict, ForemanError, QueueFull, StoreError, Unavailable
from foreman.models import Job, JobState, NewJob, Priority
from foreman.scheduler import Decision, Held, ModelQueue

SCHEMA_VERSION = 6
# Marks the file as foreman's (PRAGMA application_id): "FRMN".
APPLICATION_ID = 0x46524D4E

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
    respond_async   INTEGER NOT NULL DEFAULT 0,
    idempotency_key TEXT,
    request_hash    TEXT,           -- tells a retried submission from a different one
    priority        TEXT NOT NULL DEFAULT 'interactive',  -- interactive or batch
    routing         TEXT,           -- alias jobs: JSON {alias, route, rule}
    served_model    TEXT,           -- alias jobs: the model picked to serve it
    cache           TEXT,           -- embeddings: 'no-cache' (asked), 'hit' or 'partial' (served from the cache)
    not_before      REAL            -- put back after a failure: not to run before this time
);
-- The pick: the oldest queued job of a model in a class is the first entry under (key, class).
CREATE INDEX IF NOT EXISTS jobs_queued_by_class ON jobs (model_key, priority, id) WHERE state = 'queued';
-- Listing by state, newest first; counts by state; boot recovery.
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state, id);
CREATE UNIQUE INDEX IF NOT EXISTS jobs_idempotency ON jobs (idempotency_key)
    WHERE idempotency_key IS NOT NULL;
-- The jobs held back after a failure, read at boot: few, so a small partial index.
CREATE INDEX IF NOT EXISTS jobs_held ON jobs (not_before) WHERE state = 'queued' AND not_before IS NOT NULL;
-- Retention finds old finished jobs without scanning the queue.
CREATE INDEX IF NOT EXISTS jobs_finished ON jobs (finished_at) WHERE state IN ('done', 'failed', 'cancelled');

-- The output of a job, one row per streamed chunk, kept so its events can be replayed.
CREATE TABLE IF NOT EXISTS chunks (
    job_id TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    seq    INTEGER NOT NULL,
    data   BLOB NOT NULL,
    PRIMARY KEY (job_id, seq)
) WITHOUT ROWID;
"""

# What takes a database at version N-1 to version N.
_MIGRATIONS: dict[int, str] = {
    2: """
    ALTER TABLE jobs ADD COLUMN respond_async INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE jobs ADD COLUMN idempotency_key TEXT;
    ALTER TABLE jobs ADD COLUMN request_hash TEXT;
    DROP INDEX IF EXISTS jobs_active;
    """,
    # Priorities: jobs queued before them were all synchronous requests, so interactive.
    3: """
    ALTER TABLE jobs ADD COLUMN priority TEXT NOT NULL DEFAULT 'interactive';
    DROP INDEX IF EXISTS jobs_queued;
    """,
    # Aliases and routes (routes.py): what the client asked for, and which model served it.
    4: """
    ALTER TABLE jobs ADD COLUMN routing TEXT;
    ALTER TABLE jobs ADD COLUMN served_model TEXT;
    """,
    # The embedding cache: its table comes with the schema; jobs say how the cache served them.
    5: """
    ALTER TABLE jobs ADD COLUMN cache TEXT;
    """,
    # Not-before times: no job was held back before them.
    6: """
    ALTER TABLE jobs ADD COLUMN not_before REAL;
    """,
}
_OUR_TABLES = frozenset({"jobs", "chunks", "embed_cache"})

_COLUMNS = (
    "id, state, endpoint, model, model_key, stream, body, attempt,"
    " created_at, started_at, finished_at, status, error, result, respond_async, priority, routing, served_model, cache,"
    " not_before"
)

# The same columns for pages of jobs, which show neither the request nor the
# result: a page of embeddings would otherwise copy megabytes it never shows.
_SUMMARY_COLUMNS = _COLUMNS.replace(" body,", " x'' AS body,").replace(" result,", " NULL AS result,")

_ENDED = "('done', 'failed', 'cancelled')"


class IdempotencyConflict(Conflict):
    """The idempotency key is taken by a job with a different request."""

    def __init__(self, key: str, job_id: str) -> None:
        super().__init__(f"Idempotency-Key {key!r} was already used for a different request (job {job_id})")
        self.job_id = job_id


T = TypeVar("T")
P = ParamSpec("P")
# The (model, class) queues in the order they will be served.
DrainOrder = Callable[[list[ModelQueue]], list[tuple[str, Priority]]]


@dataclass(frozen=True, slots=True)
class Submission:
    """A job to write; with `drain_order`, its place in line comes back too."""

    job: NewJob
    request_hash: str | None = None
    drain_order: DrainOrder | None = None
    # A reply the store can give at once (the embedding cache, which lives
    # beside the jobs): when it gives one, the job is written as done with it,
    # in the same transaction, and never queues.
    answer: Callable[[Store], bytes | None] | None = None


@dataclass(frozen=True, slots=True)
class Accepted:
    job_id: str
    new: bool  # False: an earlier submission with the same idempotency key
    state: JobState
    position: int | None
    result: bytes | None = None  # the reply, when `Submission.answer` gave it


@dataclass(frozen=True, slots=True)
class Claim:
    """A job the worker took, why, and what still waits for its model."""

    job: Job
    decision: Decision
    waiting_after: int


class Store:
    """Jobs in one SQLite database. Not thread-safe: one thread owns it."""

    def __init__(self, path: Path, *, sync: str = "normal", max_queue: int = 0) -> None:
        """Open or create the queue at `path`; StoreError if the file is not a sound foreman queue.

        `sync` is "normal" (survives a process crash; in WAL mode only power
        loss can undo the last commits) or "full" (an fsync per commit, which
        also survives power loss). `max_queue` > 0 caps the waiting jobs.
        """
        path.parent.mkdir(parents=True, exist_ok=True)
        # Autocommit: each statement is its own transaction unless we BEGIN.
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        try:
            self._prepare(path, sync)
        except BaseException:
            self._db.close()
            raise
        self.max_queue = max_queue
        # Waiting jobs per model key and per (key, class), kept beside the table
        # so that neither the pick nor the pin decision has to count a million rows.
        self._waiting: Counter[str] = Counter()
        self._by_class: Counter[tuple[str, Priority]] = Counter()
        # The pick index holds exactly the queued jobs, in group order: counting
        # them there takes a fifth of the time SQLite's own plan does.
        for key, priority, count in self._db.execute(
            "SELECT model_key, priority, count(*) FROM jobs INDEXED BY jobs_queued_by_class"
            " WHERE state = 'queued' GROUP BY model_key, priority"
        ):
            self._count(key, Priority(priority), count)
        self._cache = EmbedCacheTable(self._db)
        # Queued jobs put back after a failure, per (key, class), with their not-before times.
        self._held: dict[tuple[str, Priority], dict[str, Held]] = {}
        for job_id, key, priority, created_at, not_before in self._db.execute(
            "SELECT id, model_key, priority, created_at, not_before FROM jobs INDEXED BY jobs_held"
            " WHERE state = 'queued' AND not_before IS NOT NULL"
        ):
            self._hold(key, Priority(priority), Held(job_id, created_at, not_before))
        self.path = path

    def _prepare(self, path: Path, sync: str) -> None:
        try:
            version = self._check_ours(path)
            self._db.execute("PRAGMA journal_mode = WAL")
        except sqlite3.DatabaseError as exc:
            message = f"{path} is not a usable SQLite database ({exc}); foreman leaves it untouched"
            raise StoreError(message) from exc
        self._db.execute(f"PRAGMA synchronous = {'FULL' if sync == 'full' else 'NORMAL'}")
        self._db.execute("PRAGMA busy_timeout = 5000")
        self._db.execute("PRAGMA foreign_keys = ON")
        # One script, one transaction: a migration that fails leaves the file as it was.
        pending = range(version + 1, SCHEMA_VERSION + 1) if version else range(0)
        migrations = "".join(_MIGRATIONS[v] for v in pending)
        try:
            self._db.executescript(
                f"BEGIN IMMEDIATE; {migrations} {_SCHEMA} {embed_store.SCHEMA}"
                f" PRAGMA user_version = {SCHEMA_VERSION}; PRAGMA application_id = {APPLICATION_ID}; COMMIT;"
            )
        except BaseException:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise

    def _check_ours(self, path: Path) -> int:
        """The schema version of an existing foreman queue, 0 for a new file; StoreError otherwise."""
        tables = {name for (name,) in self._db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if not tables:
            return 0
        (application_id,) = self._db.execute("PRAGMA application_id").fetchone()
        (version,) = self._db.execute("PRAGMA user_version").fetchone()
        # Queues from before the application id was set carry only our tables.
        older_ours = application_id == 0 and version and tables <= _OUR_TABLES
        if application_id != APPLICATION_ID and not older_ours:
            raise StoreError(
                f"{path} is not a foreman queue (tables: {', '.join(sorted(tables))}); "
                "foreman leaves it untouched: point FOREMAN_DB at another file"
            )
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"{path} was written by a newer foreman (schema {version}, this one knows {SCHEMA_VERSION}); "
                "upgrade foreman"
            )
        problems = [row for (row,) in self._db.execute("PRAGMA quick_check")]
        if problems != ["ok"]:
            raise StoreError(
                f"{path} failed its integrity check ({'; '.join(problems[:3])}); "
                "foreman leaves it untouched: restore a backup or move it aside"
            )
        return int(version)

    def _count(self, key: str, priority: Priority, delta: int) -> None:
        self._waiting[key] += delta
        self._by_class[key, priority] += delta

    def _hold(self, key: str, priority: Priority, held: Held) -> None:
        self._held.setdefault((key, priority), {})[held.job_id] = held

    def _release(self, key: str, priority: Priority, job_id: str) -> None:
        group = self._held.get((key, priority))
        if group is not None and group.pop(job_id, None) is not None and not group:
            del self._held[key, priority]

    def close(self) -> None:
        self._db.close()

    def insert(self, job: NewJob, request_hash: str | None = None) -> str:
        """Write a new job and return its id (see `submit` for idempotency keys and errors)."""
        [accepted] = self.submit([Submission(job, request_hash)])
        if isinstance(accepted, Exception):
            raise accepted
        return accepted.job_id

    def submit(self, submissions: Sequence[Submission]) -> list[Accepted | ForemanError]:
        """Write new jobs in one transaction: one commit (and one fsync) for the lot.

        Each comes back accepted or refused on its own. A job whose
        idempotency key is in use is not written: the existing job comes
        back if it was the same request, IdempotencyConflict if it was not;
        QueueFull beyond `max_queue`. If the database cannot be written at
        all (disk full, or locked by another program), every one is refused
        with Unavailable and nothing is kept: foreman keeps running, and
        everything accepted before stays.
        """
        counts = self._waiting.copy(), self._by_class.copy()
        results: list[Accepted | ForemanError] = []
        # One INSERT is a transaction of its own; every statement saved is a
        # GIL hand-over saved against the busy event loop.
        # A job answered at once is inserted and ended in one transaction.
        grouped = len(submissions) > 1 or any(s.answer is not None for s in submissions)
        try:
            if grouped:
                self._db.execute("BEGIN IMMEDIATE")
            for submission in submissions:
                try:
                    results.append(self._accept(submission))
                except (IdempotencyConflict, QueueFull) as exc:
                    results.append(exc)  # refused before anything of it was written
            if grouped:
                self._db.execute("COMMIT")
        except sqlite3.OperationalError as exc:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            self._waiting, self._by_class = counts
            refused = Unavailable(f"foreman cannot write its queue: {exc}")
            return [refused] * len(submissions)
        return results

    def _accept(self, submission: Submission) -> Accepted:
        job, order = submission.job, submission.drain_order
        job_id = self._insert(job, submission.request_hash)
        if job_id != job.id:
            existing = self.get(job_id)
            assert existing is not None
            position = None
            if existing.state is JobState.QUEUED and order is not None:
                position = self.position(job_id, existing.model_key, existing.priority, order)
            return Accepted(job_id, False, existing.state, position)
        if submission.answer is not None and (result := submission.answer(self)) is not None:
            now = job.created_at
            self._db.execute(
                "UPDATE jobs SET state = 'done', started_at = ?, finished_at = ?, status = 200,"
                " result = ?, cache = 'hit' WHERE id = ?",
                (now, now, result, job.id),
            )
            self._count(job.model_key, job.priority, -1)
            return Accepted(job_id, True, JobState.DONE, None, result)
        position = None
        if order is not None:
            # The newest job of its group: everything in its group is ahead of it.
            position = (
                self._waiting_before(job.model_key, job.priority, order)
                + self._by_class[job.model_key, job.priority]
                - 1
            )
        return Accepted(job_id, True, JobState.QUEUED, position)

    def _insert(self, job: NewJob, request_hash: str | None) -> str:
        if job.idempotency_key is not None:
            row = self._db.execute(
                "SELECT id, request_hash FROM jobs WHERE idempotency_key = ?", (job.idempotency_key,)
            ).fetchone()
            if row is not None:
                if row[1] != request_hash:
                    raise IdempotencyConflict(job.idempotency_key, row[0])
                return str(row[0])
        if self.max_queue and sum(self._waiting.values()) >= self.max_queue:
            raise QueueFull(self.max_queue)
        self._db.execute(
            "INSERT INTO jobs (id, state, endpoint, model, model_key, stream, body, created_at,"
            " respond_async, idempotency_key, request_hash, priority, routing, cache)"
            " VALUES (?, 'queued', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
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
                request_hash,
                job.priority,
                job.routing,
                job.cache,
            ),
        )
        self._count(job.model_key, job.priority, 1)
        return job.id

    def insert_many(self, jobs: Iterable[NewJob]) -> int:
        """Write many new jobs in one transaction (bulk loads, benchmarks); returns how many."""
        counts = self._waiting.copy(), self._by_class.copy()
        self._db.execute("BEGIN IMMEDIATE")
        try:
            count = sum(1 for job in jobs if self._insert(job, None))
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            self._waiting, self._by_class = counts
            raise
        return count

    def queues(self) -> list[ModelQueue]:
        """What waits, per model key and class: one index lookup each for the oldest job not held back.

        Held jobs (put back after a failure, with a not-before time) come as
        they are; whether their time has come is the policy's to say.
        """
        queues = []
        for (key, priority), waiting in self._by_class.items():
            if waiting <= 0:
                continue
            held = self._held.get((key, priority), {})
            free = waiting - len(held)
            oldest, oldest_at = "", 0.0
            if free > 0:
                # Held jobs are few: skipping them in the index costs little.
                oldest, oldest_at = self._db.execute(
                    "SELECT id, created_at FROM jobs WHERE state = 'queued' AND model_key = ? AND priority = ?"
                    f" {'AND not_before IS NULL' if held else ''} ORDER BY id LIMIT 1",
                    (key, priority),
                ).fetchone()
            queues.append(ModelQueue(key, priority, free, oldest, oldest_at, tuple(held.values())))
        return queues

    def claim_next(self, choose: Callable[[list[ModelQueue]], Decision | None], now: float) -> Claim | None:
        """Let `choose` pick from what waits, and take the job it names (else its group's oldest)."""
        decision = choose(self.queues())
        if decision is None:
            return None
        state = JobState.LOADING if decision.swap else JobState.WORKING
        if decision.job_id is not None:
            row = self._db.execute(
                f"UPDATE jobs SET state = ?, started_at = ?, not_before = NULL"
                f" WHERE id = ? AND state = 'queued' RETURNING {_COLUMNS}",
                (state, now, decision.job_id),
            ).fetchone()
        else:
            row = self._db.execute(
                f"UPDATE jobs SET state = ?, started_at = ?, not_before = NULL"
                f" WHERE id = (SELECT id FROM jobs WHERE state = 'queued' AND model_key = ? AND priority = ?"
                f" ORDER BY id LIMIT 1) RETURNING {_COLUMNS}",
                (state, now, decision.model_key, decision.priority),
            ).fetchone()
        if row is None:
            raise RuntimeError(
                f"no queued {decision.priority} job for {decision.model_key!r} although one was counted"
            )
        job = _job_from_row(row)
        self._count(job.model_key, job.priority, -1)
        self._release(job.model_key, job.priority, job.id)
        return Claim(job, decision, self._waiting[decision.model_key])

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
        chunks: Sequence[bytes] = (),
        cache: str | None = None,
    ) -> None:
        """End a running job for good, with its output; a job that already ended stays as it ended.

        `cache` says how the embedding cache served it ('hit', 'partial'), if it did.
        """
        if not chunks:
            self._end(job, state, now, status, result, error, attempt, cache)
            return
        self._db.execute("BEGIN IMMEDIATE")
        try:
            if self._end(job, state, now, status, result, error, attempt, cache):
                self._db.executemany(
                    "INSERT OR REPLACE INTO chunks (job_id, seq, data) VALUES (?, ?, ?)",
                    ((job.id, seq, data) for seq, data in enumerate(chunks)),
                )
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    def _end(
        self,
        job: Job,
        state: JobState,
        now: float,
        status: int,
        result: bytes | None,
        error: str | None,
        attempt: int | None,
        cache: str | None = None,
    ) -> bool:
        ended = self._db.execute(
            "UPDATE jobs SET state = ?, finished_at = ?, status = ?, result = ?, error = ?,"
            " attempt = coalesce(?, attempt), cache = coalesce(?, cache)"
            " WHERE id = ? AND state IN ('loading', 'working')",
            (state, now, status, result, error, attempt, cache, job.id),
        ).rowcount
        return bool(ended)

    def requeue(self, job: Job, *, attempt: int, error: str | None, not_before: float | None = None) -> None:
        """Put a running job back in line, keeping its place (its id).

        It is counted under the key it is stored with: an alias job's, not
        that of the model it was about to run on. With `not_before`, it may
        not run before that time: it failed, and the worker serves other work
        meanwhile.
        """
        row = self._db.execute(
            "UPDATE jobs SET state = 'queued', attempt = ?, error = ?, served_model = NULL, not_before = ?"
            " WHERE id = ? AND state IN ('loading', 'working') RETURNING model_key",
            (attempt, error, not_before, job.id),
        ).fetchone()
        if row is not None:
            self._count(row[0], job.priority, 1)
            if not_before is not None:
                self._hold(row[0], job.priority, Held(job.id, job.created_at, not_before))

    def set_served(self, job_id: str, model: str) -> None:
        """Record which model serves an alias job."""
        self._db.execute("UPDATE jobs SET served_model = ? WHERE id = ?", (model, job_id))

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
        self._release(row[0], Priority(row[1]), job_id)
        return True

    def get(self, job_id: str) -> Job | None:
        row = self._db.execute(f"SELECT {_COLUMNS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return None if row is None else _job_from_row(row)

    def waiting(self, model_key: str) -> int:
        return self._waiting[model_key]

    def waiting_by_model(self) -> dict[str, int]:
        """Queued jobs per model key, all classes together."""
        return {key: count for key, count in self._waiting.items() if count > 0}

    def chunks(self, job_id: str) -> list[bytes]:
        """The output a finished job streamed, in order."""
        rows = self._db.execute("SELECT data FROM chunks WHERE job_id = ? ORDER BY seq", (job_id,))
        return [bytes(data) for (data,) in rows]

    def list_jobs(
        self, *, state: str | None, model_key: str | None, limit: int, before: str | None
    ) -> list[Job]:
        """A page of jobs, newest first, each older than the cursor `before` (a job id).

        They come without body and result (see `_SUMMARY_COLUMNS`).
        """
        where, args = [], []
        if state is not None:
            where.append("state = ?")
            args.append(state)
        if model_key is not None:
            # A model name matches its groups with and without load options;
            # an alias key's head (`@fast`) matches the alias's jobs, whatever their models.
            where.append("(model_key = ? OR model_key LIKE ? ESCAPE '\\' OR model_key LIKE ? ESCAPE '\\')")
            args += [model_key, _like_prefix(model_key) + " %", _like_prefix(model_key) + "(%"]
        if before is not None:
            where.append("id < ?")
            args.append(before)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        rows = self._db.execute(
            f"SELECT {_SUMMARY_COLUMNS} FROM jobs {clause} ORDER BY id DESC LIMIT ?", (*args, limit)
        ).fetchall()
        return [_job_from_row(row) for row in rows]

    def position(self, job_id: str, model_key: str, priority: Priority, drain_order: DrainOrder) -> int:
        """How many queued jobs run before this one if the queue drains in `drain_order`."""
        (ahead,) = self._db.execute(
            "SELECT count(*) FROM jobs INDEXED BY jobs_queued_by_class"
            " WHERE state = 'queued' AND model_key = ? AND priority = ? AND id < ?",
            (model_key, priority, job_id),
        ).fetchone()
        return self._waiting_before(model_key, priority, drain_order) + int(ahead)

    def _waiting_before(self, model_key: str, priority: Priority, drain_order: DrainOrder) -> int:
        """The queued jobs of the groups that drain before (model_key, priority)."""
        queues = self.queues()
        waiting = {(q.model_key, q.priority): q.waiting for q in queues}
        before = 0
        for group in drain_order(queues):
            if group == (model_key, priority):
                break
            before += waiting[group]
        return before

    def counts_by_state(self) -> dict[str, int]:
        return dict(self._db.execute("SELECT state, count(*) FROM jobs GROUP BY state").fetchall())

    def prune(self, cutoff: float, batch: int = 1000) -> int:
        """Delete up to `batch` jobs that ended before `cutoff`, with their chunks; returns how many."""
        return self._db.execute(
            f"DELETE FROM jobs WHERE id IN"
            f" (SELECT id FROM jobs WHERE state IN {_ENDED} AND finished_at < ? LIMIT ?)",
            (cutoff, batch),
        ).rowcount

    def size_bytes(self) -> int:
        """The database's size on disk, write-ahead log included."""
        return sum(p.stat().st_size for p in (self.path, _wal(self.path)) if p.exists())

    def ping(self) -> None:
        """Fail unless the database answers a query."""
        self._db.execute("SELECT count(*) FROM jobs WHERE rowid = 0").fetchone()

    def claim_companions(
        self,
        model_key: str,
        endpoints: Sequence[str],
        pick: Callable[[list[Job]], list[str]],
        now: float,
        scan: int,
    ) -> list[Job]:
        """Take queued jobs of `model_key` to run beside a running one: `pick` chooses among the oldest `scan`.

        Interactive jobs come before batch ones, each class oldest first, as the policy would serve them.
        """
        marks = ",".join("?" * len(endpoints))
        # A job held back after a failure joins only once its time has come.
        rows = self._db.execute(
            f"SELECT {_COLUMNS} FROM jobs WHERE state = 'queued' AND model_key = ? AND endpoint IN ({marks})"
            f" AND (not_before IS NULL OR not_before <= ?) ORDER BY priority = 'batch', id LIMIT ?",
            (model_key, *endpoints, now, scan),
        ).fetchall()
        chosen = set(pick([_job_from_row(row) for row in rows]))
        if not chosen:
            return []
        ids = sorted(chosen)
        taken = self._db.execute(
            f"UPDATE jobs SET state = 'working', started_at = ?, not_before = NULL WHERE state = 'queued'"
            f" AND id IN ({','.join('?' * len(ids))}) RETURNING {_COLUMNS}",
            (now, *ids),
        ).fetchall()
        jobs = sorted((_job_from_row(row) for row in taken), key=lambda job: job.id)
        for job in jobs:
            self._count(job.model_key, job.priority, -1)
            self._release(job.model_key, job.priority, job.id)
        return jobs

    # The embedding cache (see foreman/embed_store.py).

    def cache_get(self, keys: Sequence[bytes]) -> dict[bytes, CachedVector]:
        """The cached vectors found under `keys`, each marked as just used."""
        return self._cache.get(keys)

    def cache_put(self, entries: Sequence[CacheEntry], limit: int) -> int:
        """Store vectors, then evict the least recently used down to `limit` bytes; returns how many went."""
        return self._cache.put(entries, limit)

    def cache_evict(self, limit: int) -> int:
        """Evict the least recently used vectors down to `limit` bytes (a smaller FOREMAN_EMBED_CACHE)."""
        return self._cache.evict(limit)

    def cache_invalidate(self, digests: Sequence[str]) -> int:
        """Drop every vector of the models with these digests."""
        return self._cache.invalidate(digests)

    def cache_stats(self) -> CacheStats:
        return self._cache.stats()

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


def _wal(path: Path) -> Path:
    return path.with_name(path.name + "-wal")


def _like_prefix(text: str) -> str:
    """`text` with LIKE's wildcards escaped, for a prefix match."""
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _job_from_row(row: tuple[Any, ...]) -> Job:
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


class AsyncStore:
    """The store for coroutines: `await store.run(Store.method, ...)` runs it on the store's thread.

    New jobs go through `submit`, which commits the submissions that arrive
    while a commit is under way together in the next one (group commit), so
    concurrent clients share a transaction and its fsync.
    """

    def __init__(self, store: Store, executor: ThreadPoolExecutor) -> None:
        self._store = store
        self._executor = executor
        self.path = store.path
        self._pending: list[tuple[Submission, asyncio.Future[Accepted]]] = []
        self._committing = False

    @classmethod
    async def open(cls, path: Path, *, sync: str = "normal", max_queue: int = 0) -> AsyncStore:
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="foreman-store")
        try:
            store = await asyncio.get_running_loop().run_in_executor(
                executor, partial(Store, path, sync=sync, max_queue=max_queue)
            )
        except BaseException:
            executor.shutdown(wait=False)
            raise
        return cls(store, executor)

    async def close(self) -> None:
        await self.run(Store.close)
        self._executor.shutdown(wait=True)

    async def run(
        self, method: Callable[Concatenate[Store, P], T], /, *args: P.args, **kwargs: P.kwargs
    ) -> T:
        call = partial(method, self._store, *args, **kwargs)
        return await asyncio.get_running_loop().run_in_executor(self._executor, call)

    def submit(self, submission: Submission) -> asyncio.Future[Accepted]:
        """Write a new job: the future resolves once it is committed, or with what `Store.submit` refused.

        With no commit running, the write is on its way to the store's thread
        when this returns, so a store call made after it (the worker's claim)
        runs after the commit. Otherwise it waits for the running commit and
        goes in the next batch, behind whatever store calls came meanwhile.
        """
        future: asyncio.Future[Accepted] = asyncio.get_running_loop().create_future()
        self._pending.append((submission, future))
        if not self._committing:
            self._commit_pending()
        return future

    def _commit_pending(self) -> None:
        batch, self._pending = self._pending, []
        self._committing = True
        done = asyncio.get_running_loop().run_in_executor(
            self._executor, Store.submit, self._store, [submission for submission, _ in batch]
        )
        done.add_done_callback(partial(self._committed, batch))

    def _committed(
        self, batch: list[tuple[Submission, asyncio.Future[Accepted]]], done: asyncio.Future[list[Any]]
    ) -> None:
        self._committing = False
        try:
            results: list[Any] = done.result()
        except BaseException as exc:  # the batch as a whole failed
            results = [exc] * len(batch)
        for (_, future), result in zip(batch, results, strict=True):
            if future.cancelled():
                continue
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)
        if self._pending:
            self._commit_pending()
