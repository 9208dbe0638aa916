"""`SqliteStorage`: the SQLite queue for coroutines. The loop never waits on SQLite for long.

Where each call runs, and why:

- **On the event loop's thread**, on `QueueFile`'s connection: the hot path,
  short indexed statements that each take a tenth of a millisecond or so
  (intake, the claim, the transitions and the finish) and the waiting counts
  kept in memory. Handing each to another thread and back cost three to
  four times what the statement itself costs (issue 17's profile). The
  submissions of one turn of the loop share a transaction (group commit),
  committed before any other store call runs and before any of them is
  answered: a job's record is in the write-ahead log before its 202 leaves
  and before the worker can claim it.
- **On the store's thread**, on a second connection: whatever can take
  long (reads of whole jobs and their output, pages of jobs, counts over
  every job, the count of the jobs ahead of one, pruning in short
  transactions, the fsync of `FOREMAN_SYNC=full`), and opening the file
  (its `quick_check` and the boot-time counts).
- **On the checkpoint thread**, on a third: copying the write-ahead log into
  the database (`checkpoints.Checkpointer`); no commit ever does it.

With `FOREMAN_SYNC=full` the commit itself stays on the loop, without an
fsync, and the store's thread then fsyncs the write-ahead log: a submission
resolves once an fsync that began after its commit has returned, and the
submissions that commit while one runs share the next.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import os
import sqlite3
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from foreman.job import Ended, Job, JobState, Priority
from foreman.scheduling.policy import ModelQueue
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
from foreman.storage.sqlite import reads
from foreman.storage.sqlite.checkpoints import Checkpointer
from foreman.storage.sqlite.lock import QueueLock
from foreman.storage.sqlite.queue_file import Ending, QueueFile, prune
from foreman.storage.sqlite.schema import connect_beside, wal_path

T = TypeVar("T")

# Jobs deleted per transaction while pruning: each holds the write lock for a
# few milliseconds at most, so a commit on the loop never waits long behind it.
PRUNE_STEP = 100
# How long a commit on the loop waits for another connection's write: longer
# than any prune step, short enough that a program holding the lock for good
# costs a 503, not a stalled daemon.
LOOP_BUSY_TIMEOUT_MS = 250


class SqliteStorage:
    """`foreman.storage.Storage` over one SQLite file."""

    def __init__(
        self,
        store: QueueFile,
        side: sqlite3.Connection,
        executor: ThreadPoolExecutor,
        sync: str,
        lock: QueueLock | None = None,
    ) -> None:
        self._lock = lock  # this process's claim on the file, let go last
        self._store = store
        self._side = side  # the store thread's connection
        self._executor = executor
        self._checkpointer = Checkpointer(store.path)
        self.path = store.path
        self._full = sync == "full"
        self._pending: list[tuple[Submission, asyncio.Future[Accepted]]] = []  # to commit together
        self._ending: list[tuple[Ending, asyncio.Future[None]]] = []  # finishes, to commit together
        self._wal_fd: int | None = None
        self._unsynced: list[asyncio.Future[None]] = []  # commits waiting for an fsync
        self._syncing = False
        self.fsyncs = 0  # of the write-ahead log, with FOREMAN_SYNC=full

    @classmethod
    async def open(cls, path: Path, *, sync: str = "normal", max_queue: int = 0) -> SqliteStorage:
        """Open or create the queue at `path`; StoreError if the file is not a sound foreman queue.

        StoreBusy, before the file is read, if another foreman has it open (`lock.QueueLock`).
        """
        lock = QueueLock.take(path)
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="foreman-store")
        loop = asyncio.get_running_loop()
        try:
            # With FOREMAN_SYNC=full the fsync is the store thread's: the loop's commits never wait for the disk.
            store = await loop.run_in_executor(
                executor,
                partial(
                    QueueFile,
                    path,
                    sync="normal",
                    max_queue=max_queue,
                    autocheckpoint=False,
                    busy_timeout_ms=LOOP_BUSY_TIMEOUT_MS,
                ),
            )
            side = await loop.run_in_executor(executor, connect_beside, path)
        except BaseException:
            executor.shutdown(wait=False)
            lock.release()
            raise
        return cls(store, side, executor, sync, lock)

    async def run(self, call: Callable[[QueueFile], T]) -> T:
        """`call(store)` on the hot path's connection: for what is SQLite's own (tests, maintenance)."""
        return call(self._store)

    @property
    def _hot(self) -> QueueFile:
        """The loop's `QueueFile`, once the submissions made so far are committed: every call sees them."""
        self._commit_pending()
        return self._store

    async def _off_loop(self, work: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """`work(connection, ...)` on the store's thread, with its own connection."""
        self._commit_pending()  # what it reads was submitted before it was asked for
        # In the caller's context, as asyncio.to_thread does: a line logged
        # on the store's thread names the job whose call it is.
        call = partial(contextvars.copy_context().run, work, self._side, *args, **kwargs)
        return await asyncio.get_running_loop().run_in_executor(self._executor, call)

    async def close(self) -> None:
        # The loop's connection closes first, so it is not the last one and
        # does not checkpoint; the checkpoint thread's last checkpoint does.
        self._commit_pending()
        self._store.close()
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._side.close)
        await loop.run_in_executor(self._executor, self._checkpointer.close)
        if self._wal_fd is not None:
            os.close(self._wal_fd)
        self._executor.shutdown(wait=True)
        if self._lock is not None:
            self._lock.release()

    # Intake

    def submit(self, submission: Submission) -> asyncio.Future[Accepted]:
        """Write a new job; the future resolves once it is committed (with `FOREMAN_SYNC=full`, fsynced).

        Submissions made in one turn of the event loop share one transaction,
        committed at the start of the next turn or by the next store call,
        whichever comes first: a claim asked for after this finds the job.
        One that may run at once (`run_now`) is committed before this returns.
        """
        future: asyncio.Future[Accepted] = asyncio.get_running_loop().create_future()
        self._pending.append((submission, future))
        if submission.run_now is not None:
            # A job that may run at once is worth no wait for company: committed now,
            # its caller goes on without a turn of the loop (and runs it, if claimed).
            self._commit_pending()
        elif len(self._pending) == 1:
            asyncio.get_running_loop().call_soon(self._commit_pending)
        return future

    def _commit_pending(self) -> None:
        """Commit the submissions and finishes made so far, each kind in one transaction (group commit)."""
        if self._ending:
            self._commit_endings()
        if not self._pending:
            return
        batch, self._pending = self._pending, []
        try:
            results: list[Any] = self._store.submit(
                [submission for submission, _ in batch], positions_of_earlier=False
            )
        except Exception as exc:  # the batch as a whole failed: no one waits forever
            results = [exc] * len(batch)
        durable: asyncio.Future[None] | None = None
        for (submission, future), result in zip(batch, results, strict=True):
            if future.cancelled():
                continue
            if isinstance(result, BaseException):
                future.set_exception(result)
            elif not result.new and result.state is JobState.QUEUED and submission.drain_order is not None:
                # An earlier job's place is counted off the loop: it may take a while at depth.
                job = submission.job
                place = self.position(result.job_id, job.model_key, job.priority, submission.drain_order)
                asyncio.ensure_future(place).add_done_callback(partial(_placed, future, result))
            elif self._full and result.new:
                durable = durable or self._fsync_after_this()
                durable.add_done_callback(partial(_resolve, future, result))
            else:
                future.set_result(result)

    def _commit_endings(self) -> None:
        batch, self._ending = self._ending, []
        try:
            self._store.finish_many([ending for ending, _ in batch])
        except Exception as exc:  # the lot failed: each finish's caller hears it
            for _, future in batch:
                if not future.cancelled():
                    future.set_exception(exc)
            return
        for _, future in batch:
            if not future.cancelled():
                future.set_result(None)

    def _fsync_after_this(self) -> asyncio.Future[None]:
        """A future resolved by an fsync of the write-ahead log that begins after now."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._unsynced.append(future)
        if not self._syncing:
            self._sync_pending()
        return future

    def _sync_pending(self) -> None:
        batch, self._unsynced = self._unsynced, []
        self._syncing = True
        done = asyncio.get_running_loop().run_in_executor(self._executor, self._fsync_wal)
        done.add_done_callback(partial(self._synced, batch))

    def _fsync_wal(self) -> None:
        if self._wal_fd is None:
            self._wal_fd = os.open(wal_path(self.path), os.O_RDONLY)
        os.fsync(self._wal_fd)
        self.fsyncs += 1

    def _synced(self, batch: list[asyncio.Future[None]], done: asyncio.Future[None]) -> None:
        self._syncing = False
        error = done.exception()
        for future in batch:
            if future.cancelled():
                continue
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(None)
        if self._unsynced:
            self._sync_pending()

    # The worker

    async def recover(self, now: float, max_attempts: int) -> Recovered:
        return self._hot.recover(now, max_attempts)

    async def queues(self) -> list[ModelQueue]:
        return self._hot.queues()

    async def claim(self, choose: Chooser, now: float) -> Claim | None:
        return self._hot.claim(choose, now)

    async def claim_companions(
        self,
        model_key: str,
        endpoints: Sequence[str],
        pick: Callable[[list[Job]], list[str]],
        now: float,
        scan: int,
    ) -> list[Job]:
        return self._hot.claim_companions(model_key, endpoints, pick, now, scan)

    async def waiting(self, model_key: str) -> int:
        return self._hot.waiting(model_key)

    async def waiting_by_model(self) -> dict[str, int]:
        return self._hot.waiting_by_model()

    async def mark_working(self, job_id: str) -> None:
        self._hot.mark_working(job_id)

    async def requeue(
        self, job: Job, *, attempt: int, error: str | None, not_before: float | None = None
    ) -> None:
        self._hot.requeue(job, attempt=attempt, error=error, not_before=not_before)

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
        ended: Ended | None = None,
    ) -> asyncio.Future[None]:
        """End a job; the finishes asked for in one turn of the loop share one transaction (see `submit`).

        `ended` goes nowhere: a queue in one file has no other node to tell.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        ending = Ending(job, state, now, status, result, error, attempt, chunks, cache)
        self._ending.append((ending, future))
        if len(self._ending) == 1 and not self._pending:
            loop.call_soon(self._commit_pending)
        return future

    async def set_served(self, job_id: str, model: str) -> None:
        self._hot.set_served(job_id, model)

    async def cancel_queued(self, job_id: str, now: float) -> bool:
        return self._hot.cancel_queued(job_id, now)

    # Reads: a job's request, result and output may be megabytes, a page or a count may touch many rows.

    async def get(self, job_id: str) -> Job | None:
        return await self._off_loop(reads.get, job_id)

    async def list_jobs(
        self, *, state: JobState | None, model_key: str | None, limit: int, before: str | None
    ) -> list[Job]:
        return await self._off_loop(
            reads.list_jobs, state=state, model_key=model_key, limit=limit, before=before
        )

    async def chunks(self, job_id: str) -> list[bytes]:
        return await self._off_loop(reads.chunks, job_id)

    async def position(self, job_id: str, model_key: str, priority: Priority, drain_order: DrainOrder) -> int:
        # The groups ahead come from the counts kept in memory; the jobs ahead
        # in its own group are counted on the index, which takes a while at depth.
        before = self._hot.groups_before(model_key, priority, drain_order)
        return before + await self._off_loop(reads.ahead_in_group, job_id, model_key, priority)

    async def counts_by_state(self) -> dict[str, int]:
        return await self._off_loop(reads.counts_by_state)

    # The embedding cache: its table keeps its counts in memory beside `QueueFile`'s
    # connection, so it runs where that connection does, on the loop. A put or
    # an eviction of a large batch holds the loop for milliseconds (see README,
    # "Performance": moving the table to the store's thread is left to do).

    async def cache_get(self, keys: Sequence[bytes]) -> dict[bytes, CachedVector]:
        return self._hot.cache_get(keys)

    async def cache_put(self, entries: Sequence[CacheEntry], limit: int) -> int:
        return self._hot.cache_put(entries, limit)

    async def cache_evict(self, limit: int) -> int:
        return self._hot.cache_evict(limit)

    async def cache_invalidate(self, digests: Sequence[str]) -> int:
        return self._hot.cache_invalidate(digests)

    async def cache_stats(self) -> CacheStats:
        return self._hot.cache_stats()

    # Pins

    async def pins(self) -> list[RecordedPin]:
        return self._hot.pins()

    async def set_pins(self, pins: Sequence[RecordedPin]) -> None:
        self._hot.set_pins(pins)

    # Upkeep

    async def prune(self, cutoff: float, batch: int) -> int:
        deleted = 0
        while deleted < batch:
            step = await self._off_loop(prune, cutoff, min(PRUNE_STEP, batch - deleted))
            deleted += step
            if step == 0:
                break
        return deleted

    async def ping(self) -> None:
        # The connection intake writes on is the one whose health matters; the query takes microseconds.
        self._hot.ping()

    async def describe(self) -> dict[str, Any]:
        size = await asyncio.get_running_loop().run_in_executor(self._executor, self._store.size_bytes)
        return {"backend": "sqlite", "path": str(self.path), "size_bytes": size}


def _placed(future: asyncio.Future[Accepted], accepted: Accepted, place: asyncio.Future[int]) -> None:
    if future.cancelled():
        return
    error = place.exception()
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(dataclasses.replace(accepted, position=place.result()))


def _resolve(future: asyncio.Future[Accepted], accepted: Accepted, synced: asyncio.Future[None]) -> None:
    if future.cancelled():
        return
    error = synced.exception()
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(accepted)
