"""What the handlers speak to: submit a job, cancel one, ask its place in line, follow its output.

The front owns "commit, then wake": the worker learns of a job from here and
nowhere else, and the job's arrival reaches the page and the log only once
the storage has it.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

from foreman.job import Job, NewJob
from foreman.queue.lifecycle import Lifecycle
from foreman.storage import Accepted, CacheAnswer, DrainOrder, Storage, Submission


class Intake(Protocol):
    """What the front needs of the worker (`foreman.worker.loop.Worker`)."""

    def wake(self, model_key: str) -> None: ...
    def drain_order_now(self) -> DrainOrder: ...
    async def cancel(self, job_id: str) -> bool: ...


class QueueFront:
    """The queue as the handlers see it."""

    def __init__(self, store: Storage, lifecycle: Lifecycle, worker: Intake) -> None:
        self._store = store
        self._lifecycle = lifecycle
        self._worker = worker

    async def submit(
        self,
        job: NewJob,
        *,
        answer: CacheAnswer | None = None,
        request_hash: str | None = None,
        with_position: bool = False,
    ) -> Accepted:
        """Commit the job (or find the earlier one its idempotency key stands for), then wake the worker.

        Once the write started it lands, even if the caller is cancelled
        meanwhile (a client that left): a cancel then finds the job.
        """
        order = self._worker.drain_order_now() if with_position else None
        committed = self._store.submit(Submission(job, request_hash, order, answer))
        if answer is None:
            # The store orders a claim asked for now behind this commit
            # (`Storage.submit`), so the worker need not wait for the answer.
            self._worker.wake(job.model_key)
        accepted = await asyncio.shield(committed)
        if accepted.result is not None and answer is not None:
            self._lifecycle.answered(job, len(answer.keys))
        elif accepted.new:
            # Again: a claim that ran ahead of a grouped commit (another node's, say) missed the job.
            self._worker.wake(job.model_key)
            self._lifecycle.queued(job)
        return accepted

    async def cancel(self, job_id: str) -> bool:
        """Drop a job that waits, or abort one that runs; False if it had already ended."""
        return await self._worker.cancel(job_id)

    async def position(self, job: Job) -> int:
        """How many queued jobs run before this queued one in the current drain order."""
        return await self._store.position(job.id, job.model_key, job.priority, self._worker.drain_order_now())

    def output_so_far(self, job_id: str) -> list[bytes]:
        """The chunks a running job has streamed up to now."""
        return self._lifecycle.output_so_far(job_id)
