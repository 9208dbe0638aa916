"""The queue in one SQLite file as plain synchronous code: intake, claims and transitions.

`QueueFile` is not thread-safe: one thread owns it (`SqliteStorage` runs it on
its own). The file's vetting and schema live in `schema`, the read models in
`reads`, the waiting counts in `counts`.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

from foreman.errors import ForemanError, QueueFull, Unavailable
from foreman.job import Job, JobState, NewJob, Priority
from foreman.scheduling.policy import Held, ModelQueue, waiting_before
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
    output,
)
from foreman.storage.rows import JOB, NEW_JOB, NEW_JOB_COLUMNS, job_from_row, new_job_values
from foreman.storage.sqlite import pin_table, reads
from foreman.storage.sqlite.counts import WaitingCounts
from foreman.storage.sqlite.schema import ENDED, open_database, wal_path
from foreman.storage.sqlite.vector_table import EmbedCacheTable

_NEW_JOB_MARKS = ", ".join("?" * len(NEW_JOB_COLUMNS))


class Ending(NamedTuple):
    """One job's end, as `QueueFile.finish` takes it."""

    job: Job
    state: JobState
    now: float
    status: int
    result: bytes | None = None
    error: str | None = None
    attempt: int | None = None
    chunks: Sequence[bytes] = ()
    cache: str | None = None


class QueueFile:
    """Jobs in one SQLite database. Not thread-safe: one thread owns it."""

    def __init__(
        self,
        path: Path,
        *,
        sync: str = "normal",
        max_queue: int = 0,
        autocheckpoint: bool = True,
        busy_timeout_ms: int = 5000,
    ) -> None:
        """Open or create the queue at `path` (see `schema.open_database`); `max_queue` > 0 caps the waiting jobs."""
        self._db = open_database(path, sync, autocheckpoint=autocheckpoint, busy_timeout_ms=busy_timeout_ms)
        self.path = path
        self.max_queue = max_queue
        self._waiting = WaitingCounts()
        for row in self._db.execute(
            "SELECT model_key, priority, count(*) FROM jobs INDEXED BY jobs_queued_by_class"
            " WHERE state = 'queued' GROUP BY model_key, priority"
        ):
            self._waiting.add(row[0], Priority(row[1]), row[2])
        for job_id, key, priority, created_at, not_before in self._db.execute(
            "SELECT id, model_key, priority, created_at, not_before FROM jobs INDEXED BY jobs_held"
            " WHERE state = 'queued' AND not_before IS NOT NULL"
        ):
            self._waiting.hold(key, Priority(priority), Held(job_id, created_at, not_before))
        self._cache = EmbedCacheTable(self._db)

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def _transaction(self, begin: bool = True) -> Iterator[None]:
        """One write transaction (or, with `begin=False`, autocommit statements), rolled back on failure."""
        if begin:
            self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
            if begin:
                self._db.execute("COMMIT")
        except BaseException:
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise

    # Intake

    def insert(self, job: NewJob, request_hash: str | None = None) -> str:
        """Write a new job and return its id (see `submit` for idempotency keys and errors)."""
        [accepted] = self.submit([Submission(job, request_hash)])
        if isinstance(accepted, Exception):
            raise accepted
        return accepted.job_id

    def submit(
        self, submissions: Sequence[Submission], *, positions_of_earlier: bool = True
    ) -> list[Accepted | ForemanError]:
        """Write new jobs in one transaction: one commit (and one fsync) for the lot.

        Each comes back accepted or refused on its own, as `Storage.submit`
        describes. If the database cannot be written at all (disk full, or
        locked by another program), every one is refused with Unavailable and
        nothing of them is kept. Without `positions_of_earlier`, a submission
        that stands for an earlier job comes back without its position:
        counting the jobs ahead of it may take a while in a long queue.
        """
        results: list[Accepted | ForemanError] = []
        drain: list[tuple[str, Priority]] = []  # the batch's drain order, for the positions
        # One INSERT is a transaction of its own; every statement saved is a
        # GIL hand-over saved against the busy event loop.
        try:
            # A job answered at once is inserted and ended in one transaction.
            grouped = len(submissions) > 1 or any(s.answer is not None for s in submissions)
            with self._waiting.transaction(), self._transaction(begin=grouped):
                for submission in submissions:
                    try:
                        results.append(self._accept(submission, positions_of_earlier, drain))
                    except (IdempotencyConflict, QueueFull) as exc:
                        results.append(exc)  # refused before anything of it was written
        except sqlite3.OperationalError as exc:
            refused = Unavailable(f"foreman cannot write its queue: {exc}")
            return [refused] * len(submissions)
        return results

    def _accept(
        self,
        submission: Submission,
        positions_of_earlier: bool = True,
        drain: list[tuple[str, Priority]] | None = None,
    ) -> Accepted:
        job, order = submission.job, submission.drain_order
        if (
            submission.run_now is not None
            and submission.answer is None
            and job.idempotency_key is None
            and self._waiting.total == 0
        ):
            claim = self._run_now(submission.run_now, job)
            if claim is not None:
                return Accepted(job.id, True, JobState.WORKING, None, claim=claim)
        job_id = self._insert(job, submission.request_hash)
        if job_id != job.id:
            existing = self.get(job_id)
            assert existing is not None
            position = None
            if existing.state is JobState.QUEUED and order is not None and positions_of_earlier:
                position = self.position(job_id, existing.model_key, existing.priority, order)
            return Accepted(job_id, False, existing.state, position)
        if submission.answer is not None and (result := self._answer(submission.answer, job)) is not None:
            now = job.created_at
            self._db.execute(
                "UPDATE jobs SET state = 'done', started_at = ?, finished_at = ?, status = 200,"
                " result = ?, cache = 'hit' WHERE id = ?",
                (now, now, result, job.id),
            )
            self._waiting.add(job.model_key, job.priority, -1)
            return Accepted(job_id, True, JobState.DONE, None, result)
        if submission.run_now is not None and self._waiting.total == 1:
            # The cache missed, and this job is all that waits.
            claim = self._run_now(submission.run_now, job, written=True)
            if claim is not None:
                return Accepted(job_id, True, JobState.WORKING, None, claim=claim)
        position = None
        if order is not None:
            # The newest job of its group: everything in its group is ahead of it.
            group = (job.model_key, job.priority)
            drain = [] if drain is None else drain
            if not drain or self._waiting.of_class(*group) == 1:
                # The drain order depends on which groups wait and how long, hardly on
                # how many jobs each holds (only a swap's eviction victim does): one
                # batch computes it once, and again when a group appears. Positions
                # were already exact only to within the jobs of the same moment.
                drain[:] = order(self.queues())
            before = 0
            for ahead in drain:
                if ahead == group:
                    break
                before += self._waiting.of_class(*ahead)
            position = before + self._waiting.of_class(*group) - 1
        return Accepted(job_id, True, JobState.QUEUED, position)

    def _run_now(self, choose: Chooser, job: NewJob, *, written: bool = False) -> Claim | None:
        """Claim `job` as it is written if `choose` picks it, alone in the queue; None leaves it queued.

        A job not yet `written` is inserted claimed: one statement for the insert and the claim.
        """
        decision = choose([ModelQueue(job.model_key, job.priority, 1, job.id, job.created_at)])
        if decision is None:
            return None
        now = job.created_at
        if written:
            self._db.execute("UPDATE jobs SET state = 'working', started_at = ? WHERE id = ?", (now, job.id))
            self._waiting.add(job.model_key, job.priority, -1)
        else:
            self._insert(job, None, started_at=now)
        return Claim(job.started(now), decision, 0)

    def _answer(self, answer: CacheAnswer, job: NewJob) -> bytes | None:
        """The cache's reply to the job if it holds every vector, else None (the job queues)."""
        return answer.from_found(self._cache.get(answer.keys), job.id)

    def _insert(self, job: NewJob, request_hash: str | None, started_at: float | None = None) -> str:
        if job.idempotency_key is not None:
            row = self._db.execute(
                "SELECT id, request_hash FROM jobs WHERE idempotency_key = ?", (job.idempotency_key,)
            ).fetchone()
            if row is not None:
                if row["request_hash"] != request_hash:
                    raise IdempotencyConflict(job.idempotency_key, row["id"])
                return str(row["id"])
        if self.max_queue and self._waiting.total >= self.max_queue and started_at is None:
            raise QueueFull(self.max_queue)
        self._db.execute(
            f"INSERT INTO jobs (state, started_at, request_hash, {NEW_JOB}) VALUES (?, ?, ?, {_NEW_JOB_MARKS})",
            ("queued" if started_at is None else "working", started_at, request_hash, *new_job_values(job)),
        )
        if started_at is None:
            self._waiting.add(job.model_key, job.priority, 1)
        return job.id

    def insert_many(self, jobs: Iterable[NewJob]) -> int:
        """Write many new jobs in one transaction (bulk loads, benchmarks); returns how many."""
        with self._waiting.transaction(), self._transaction():
            return sum(1 for job in jobs if self._insert(job, None))

    # The worker

    def recover(self, now: float, max_attempts: int) -> Recovered:
        """After a crash or restart, requeue jobs that were running (see `Storage.recover`)."""
        with self._transaction():
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
        for key, priority in requeued:
            self._waiting.add(key, Priority(priority), 1)
        return Recovered(len(requeued), failed)

    def queues(self) -> list[ModelQueue]:
        """What waits, per model key and class: one index lookup each for the oldest job not held back.

        Held jobs (put back after a failure, with a not-before time) come as
        they are; whether their time has come is the policy's to say.
        """
        queues = []
        for (key, priority), waiting in self._waiting.by_class().items():
            held = self._waiting.held(key, priority)
            free = waiting - len(held)
            oldest_id, oldest_at = "", 0.0
            if free > 0:
                oldest_id, oldest_at = reads.oldest_queued(self._db, key, priority, skip_held=bool(held))
            queues.append(ModelQueue(key, priority, free, oldest_id, oldest_at, held))
        return queues

    def claim(self, choose: Chooser, now: float) -> Claim | None:
        """Let `choose` pick from what waits, and take the job it names (else its group's oldest)."""
        decision = choose(self.queues())
        if decision is None:
            return None
        state = JobState.LOADING if decision.swap else JobState.WORKING
        if decision.job_id is not None:
            row = self._db.execute(
                f"UPDATE jobs SET state = ?, started_at = ?, not_before = NULL"
                f" WHERE id = ? AND state = 'queued' RETURNING {JOB}",
                (state, now, decision.job_id),
            ).fetchone()
        else:
            row = self._db.execute(
                f"UPDATE jobs SET state = ?, started_at = ?, not_before = NULL"
                f" WHERE id = (SELECT id FROM jobs WHERE state = 'queued' AND model_key = ? AND priority = ?"
                f" ORDER BY id LIMIT 1) RETURNING {JOB}",
                (state, now, decision.model_key, decision.priority),
            ).fetchone()
        if row is None:
            raise RuntimeError(
                f"no queued {decision.priority} job for {decision.model_key!r} although one was counted"
            )
        job = job_from_row(row)
        self._taken(job)
        return Claim(job, decision, self._waiting.of_model(decision.model_key))

    def claim_companions(
        self,
        model_key: str,
        endpoints: Sequence[str],
        pick: Callable[[list[Job]], list[str]],
        now: float,
        scan: int,
    ) -> list[Job]:
        """Take queued jobs of `model_key` to run beside a running one (see `Storage.claim_companions`)."""
        marks = ",".join("?" * len(endpoints))
        # A job held back after a failure joins only once its time has come.
        rows = self._db.execute(
            f"SELECT {JOB} FROM jobs WHERE state = 'queued' AND model_key = ? AND endpoint IN ({marks})"
            f" AND (not_before IS NULL OR not_before <= ?) ORDER BY priority = 'batch', id LIMIT ?",
            (model_key, *endpoints, now, scan),
        ).fetchall()
        chosen = set(pick([job_from_row(row) for row in rows]))
        if not chosen:
            return []
        ids = sorted(chosen)
        taken = self._db.execute(
            f"UPDATE jobs SET state = 'working', started_at = ?, not_before = NULL WHERE state = 'queued'"
            f" AND id IN ({','.join('?' * len(ids))}) RETURNING {JOB}",
            (now, *ids),
        ).fetchall()
        jobs = sorted((job_from_row(row) for row in taken), key=lambda job: job.id)
        for job in jobs:
            self._taken(job)
        return jobs

    def _taken(self, job: Job) -> None:
        """A queued job left the queue to run."""
        self._waiting.add(job.model_key, job.priority, -1)
        self._waiting.release(job.model_key, job.priority, job.id)

    def waiting(self, model_key: str) -> int:
        return self._waiting.of_model(model_key)

    def waiting_by_model(self) -> dict[str, int]:
        """Queued jobs per model key, all classes together."""
        return self._waiting.by_model()

    def mark_working(self, job_id: str) -> None:
        self._db.execute("UPDATE jobs SET state = 'working' WHERE id = ?", (job_id,))

    def requeue(self, job: Job, *, attempt: int, error: str | None, not_before: float | None = None) -> None:
        """Put a running job back in line, keeping its place (its id); with `not_before`, held until then.

        It is counted under the key it is stored with: an alias job's, not
        that of the model it was about to run on.
        """
        row = self._db.execute(
            "UPDATE jobs SET state = 'queued', attempt = ?, error = ?, served_model = NULL, not_before = ?"
            " WHERE id = ? AND state IN ('loading', 'working') RETURNING model_key",
            (attempt, error, not_before, job.id),
        ).fetchone()
        if row is not None:
            self._waiting.add(row["model_key"], job.priority, 1)
            if not_before is not None:
                self._waiting.hold(row["model_key"], job.priority, Held(job.id, job.created_at, not_before))

    def set_served(self, job_id: str, model: str) -> None:
        """Record which model serves an alias job."""
        self._db.execute("UPDATE jobs SET served_model = ? WHERE id = ?", (model, job_id))

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
        self.finish_many([Ending(job, state, now, status, result, error, attempt, chunks, cache)])

    def finish_many(self, endings: Sequence[Ending]) -> None:
        """End jobs in one transaction; one statement for one job whose output fits its row."""
        if len(endings) == 1:
            e = endings[0]
            packed = output.pack(e.chunks)
            if packed is not None or not e.chunks:
                self._end(e, packed)  # one statement commits on its own
                return
        with self._transaction():
            for e in endings:
                self._end(e, output.pack(e.chunks))

    def _end(self, e: Ending, packed: bytes | None) -> None:
        """End one job: its output in the row when `packed`, else (a long stream) in `chunks`."""
        ended = self._db.execute(
            "UPDATE jobs SET state = ?, finished_at = ?, status = ?, result = ?, error = ?,"
            " attempt = coalesce(?, attempt), cache = coalesce(?, cache), output = ?"
            " WHERE id = ? AND state IN ('loading', 'working')",
            (e.state, e.now, e.status, e.result, e.error, e.attempt, e.cache, packed, e.job.id),
        ).rowcount
        if ended and e.chunks and packed is None:
            self._db.executemany(
                "INSERT OR REPLACE INTO chunks (job_id, seq, data) VALUES (?, ?, ?)",
                ((e.job.id, seq, data) for seq, data in enumerate(e.chunks)),
            )

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
        self._waiting.add(row["model_key"], Priority(row["priority"]), -1)
        self._waiting.release(row["model_key"], Priority(row["priority"]), job_id)
        return True

    # Reads

    def get(self, job_id: str) -> Job | None:
        return reads.get(self._db, job_id)

    def list_jobs(
        self, *, state: JobState | None, model_key: str | None, limit: int, before: str | None
    ) -> list[Job]:
        return reads.list_jobs(self._db, state=state, model_key=model_key, limit=limit, before=before)

    def chunks(self, job_id: str) -> list[bytes]:
        return reads.chunks(self._db, job_id)

    def position(self, job_id: str, model_key: str, priority: Priority, drain_order: DrainOrder) -> int:
        """How many queued jobs run before this one if the queue drains in `drain_order`."""
        before = self.groups_before(model_key, priority, drain_order)
        return before + reads.ahead_in_group(self._db, job_id, model_key, priority)

    def groups_before(self, model_key: str, priority: Priority, drain_order: DrainOrder) -> int:
        """The queued jobs of the (model, class) groups that drain before this one: from the counts."""
        queues = self.queues()
        return waiting_before(queues, (model_key, priority), drain_order(queues))

    def counts_by_state(self) -> dict[str, int]:
        return reads.counts_by_state(self._db)

    # Pins (see foreman/storage/sqlite/pin_table.py).

    def pins(self) -> list[RecordedPin]:
        return pin_table.read(self._db)

    def set_pins(self, pins: Sequence[RecordedPin]) -> None:
        with self._transaction():
            pin_table.replace(self._db, pins)

    # The embedding cache (see foreman/storage/sqlite/vector_table.py).

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

    # Upkeep

    def prune(self, cutoff: float, batch: int = 1000) -> int:
        """Delete up to `batch` jobs that ended before `cutoff`, with their chunks; returns how many."""
        return prune(self._db, cutoff, batch)

    def size_bytes(self) -> int:
        """The database's size on disk, write-ahead log included."""
        return sum(p.stat().st_size for p in (self.path, wal_path(self.path)) if p.exists())

    def ping(self) -> None:
        """Fail unless the database answers a query."""
        ping(self._db)


def prune(db: sqlite3.Connection, cutoff: float, batch: int) -> int:
    """Delete up to `batch` jobs that ended before `cutoff`, with their chunks; returns how many.

    A line of a batch that has not ended keeps its job: the batch's output file is written from it.
    """
    return db.execute(
        f"DELETE FROM jobs WHERE id IN (SELECT id FROM jobs WHERE state IN {ENDED} AND finished_at < ?"
        f" AND NOT EXISTS (SELECT 1 FROM batch_lines b WHERE b.job_id = jobs.id) LIMIT ?)",
        (cutoff, batch),
    ).rowcount


def ping(db: sqlite3.Connection) -> None:
    """Fail unless the database answers a query."""
    db.execute("SELECT count(*) FROM jobs WHERE rowid = 0").fetchone()
