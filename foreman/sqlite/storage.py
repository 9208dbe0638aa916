"""`SqliteStorage`: the SQLite queue for coroutines, on one thread that owns the connection.

Every call runs `Store`'s method on that thread, so SQLite never blocks the
event loop and never sees two threads. New jobs go through `submit`, which
commits the submissions that arrive while a commit is under way together in
the next one (group commit), so concurrent clients share a transaction and
its fsync.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from foreman.models import Job, JobState, Priority
from foreman.scheduler import ModelQueue
from foreman.sqlite.store import Store
from foreman.storage import (
    Accepted,
    CachedVector,
    CacheEntry,
    CacheStats,
    Chooser,
    Claim,
    DrainOrder,
    Recovered,
    Submission,
)

T = TypeVar("T")


class SqliteStorage:
    """`foreman.storage.Storage` over one SQLite file."""

    def __init__(self, store: Store, executor: ThreadPoolExecutor) -> None:
        self._store = store
        self._executor = executor
        self.path = store.path
        self._pending: list[tuple[Submission, asyncio.Future[Accepted]]] = []
        self._committing = False

    @classmethod
    async def open(cls, path: Path, *, sync: str = "normal", max_queue: int = 0) -> SqliteStorage:
        """Open or create the queue at `path`; StoreError if the file is not a sound foreman queue."""
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="foreman-store")
        try:
            store = await asyncio.get_running_loop().run_in_executor(
                executor, partial(Store, path, sync=sync, max_queue=max_queue)
            )
        except BaseException:
            executor.shutdown(wait=False)
            raise
        return cls(store, executor)

    async def run(self, call: Callable[[Store], T]) -> T:
        """`call(store)` on the store's thread: for what is SQLite's own (tests, maintenance)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, call, self._store)

    async def _call(self, method: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        # In the caller's context, as asyncio.to_thread does: a line logged
        # on the store's thread names the job whose call it is.
        call = partial(contextvars.copy_context().run, method, *args, **kwargs)
        return await asyncio.get_running_loop().run_in_executor(self._executor, call)

    async def close(self) -> None:
        await self._call(self._store.close)
        self._executor.shutdown(wait=True)

    # Intake

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
            self._executor, self._store.submit, [submission for submission, _ in batch]
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

    # The worker

    async def recover(self, now: float, max_attempts: int) -> Recovered:
        return await self._call(self._store.recover, now, max_attempts)

    async def queues(self) -> list[ModelQueue]:
        return await self._call(self._store.queues)

    async def claim(self, choose: Chooser, now: float) -> Claim | None:
        return await self._call(self._store.claim, choose, now)

    async def claim_companions(
        self,
        model_key: str,
        endpoints: Sequence[str],
        pick: Callable[[list[Job]], list[str]],
        now: float,
        scan: int,
    ) -> list[Job]:
        return await self._call(self._store.claim_companions, model_key, endpoints, pick, now, scan)

    async def waiting(self, model_key: str) -> int:
        return await self._call(self._store.waiting, model_key)

    async def waiting_by_model(self) -> dict[str, int]:
        return await self._call(self._store.waiting_by_model)

    async def mark_working(self, job_id: str) -> None:
        await self._call(self._store.mark_working, job_id)

    async def requeue(
        self, job: Job, *, attempt: int, error: str | None, not_before: float | None = None
    ) -> None:
        await self._call(self._store.requeue, job, attempt=attempt, error=error, not_before=not_before)

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
        await self._call(
            self._store.finish,
            job,
            state,
            now,
            status=status,
            result=result,
            error=error,
            attempt=attempt,
            chunks=chunks,
            cache=cache,
        )

    async def set_served(self, job_id: str, model: str) -> None:
        await self._call(self._store.set_served, job_id, model)

    async def cancel_queued(self, job_id: str, now: float) -> bool:
        return await self._call(self._store.cancel_queued, job_id, now)

    async def cancel_elsewhere(self, job_id: str) -> bool:
        return False  # one file, one node: a job runs here or nowhere

    # Reads

    async def get(self, job_id: str) -> Job | None:
        return await self._call(self._store.get, job_id)

    async def list_jobs(
        self, *, state: JobState | None, model_key: str | None, limit: int, before: str | None
    ) -> list[Job]:
        return await self._call(
            self._store.list_jobs, state=state, model_key=model_key, limit=limit, before=before
        )

    async def chunks(self, job_id: str) -> list[bytes]:
        return await self._call(self._store.chunks, job_id)

    async def position(self, job_id: str, model_key: str, priority: Priority, drain_order: DrainOrder) -> int:
        return await self._call(self._store.position, job_id, model_key, priority, drain_order)

    async def counts_by_state(self) -> dict[str, int]:
        return await self._call(self._store.counts_by_state)

    # The embedding cache

    async def cache_get(self, keys: Sequence[bytes]) -> dict[bytes, CachedVector]:
        return await self._call(self._store.cache_get, keys)

    async def cache_put(self, entries: Sequence[CacheEntry], limit: int) -> int:
        return await self._call(self._store.cache_put, entries, limit)

    async def cache_evict(self, limit: int) -> int:
        return await self._call(self._store.cache_evict, limit)

    async def cache_invalidate(self, digests: Sequence[str]) -> int:
        return await self._call(self._store.cache_invalidate, digests)

    async def cache_stats(self) -> CacheStats:
        return await self._call(self._store.cache_stats)

    # Upkeep

    async def prune(self, cutoff: float, batch: int) -> int:
        return await self._call(self._store.prune, cutoff, batch)

    async def ping(self) -> None:
        await self._call(self._store.ping)

    async def nodes(self) -> list[dict[str, Any]]:
        return []  # one file, one node

    async def describe(self) -> dict[str, Any]:
        return {
            "backend": "sqlite",
            "path": str(self.path),
            "size_bytes": await self._call(self._store.size_bytes),
        }
