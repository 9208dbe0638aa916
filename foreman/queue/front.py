"""What the handlers speak to: submit a job, cancel one, ask its place in line, follow its output.

The front owns "commit, then wake": the worker learns of a job from here and
nowhere else, and the job's arrival reaches the page and the log only once
the storage has it.
"""

from __future__ import annotations

import asyncio
from functools import partial
from typing import Protocol

from foreman.job import Job, NewJob
from foreman.queue.lifecycle import Lifecycle
from foreman.storage import Accepted, CacheAnswer, Chooser, Claim, DrainOrder, Storage, Submission


class Intake(Protocol):
    """What the front needs of the worker (`foreman.worker.loop.Worker`)."""

    def wake(self, model_key: str) -> None: ...
    def drain_order_now(self) -> DrainOrder: ...
    def run_now(self) -> Chooser | None: ...
    def unclaimed(self, job_id: str) -> None: ...
    async def run_here(self, claim: Claim) -> None: ...
    async def cancel(self, job_id: str) -> bool: ...


class QueueFront:
    """The queue as the handlers see it."""

    def __init__(self, store: Storage, lifecycle: Lifecycle, worker: Intake) -> None:
        self._store = store
        self._lifecycle = lifecycle
        self._worker = worker
        self._leaving: set[asyncio.Future[None]] = set()

    async def submit(
        self,
        job: NewJob,
        *,
        answer: CacheAnswer | None = None,
        request_hash: str | None = None,
        with_position: bool = False,
        run_here: bool = False,
    ) -> Accepted:
        """Commit the job (or find the earlier one its idempotency key stands for), then wake the worker.

        With `run_here` (a caller that waits for the job), the job may be
        claimed as it is written, when the worker could start it at once:
        `Accepted.claim` is then the caller's to run with `run`, and the
        worker is not woken.

        Once the write started it lands, even if the caller is cancelled
        meanwhile (a client that left): a cancel then finds the job.
        """
        order = self._worker.drain_order_now() if with_position else None
        run_now = self._worker.run_now() if run_here and job.routing is None else None
        committed = self._store.submit(Submission(job, request_hash, order, answer, run_now))
        if answer is None and run_now is None:
            # The store orders a claim asked for now behind this commit
            # (`Storage.submit`), so the worker need not wait for the answer.
            self._worker.wake(job.model_key)
        committed = asyncio.ensure_future(committed)
        try:
            accepted = await asyncio.shield(committed)
        except asyncio.CancelledError:
            if run_now is not None:
                committed.add_done_callback(partial(self._left, job))
            raise
        except Exception:
            self._worker.unclaimed(job.id)
            raise
        if accepted.claim is not None:
            self._lifecycle.queued(job)
            return accepted
        self._worker.unclaimed(job.id)  # written queued after all
        if accepted.result is not None and answer is not None:
            self._lifecycle.answered(job, len(answer.keys))
        elif accepted.new:
            # Again: a claim that ran ahead of a grouped commit (another node's, say) missed the job.
            self._worker.wake(job.model_key)
            self._lifecycle.queued(job)
        return accepted

    async def run(self, claim: Claim) -> None:
        """Run a job claimed at intake (`Accepted.claim`) on the caller's task; its events come as any job's."""
        await self._worker.run_here(claim)

    def _left(self, job: NewJob, committed: asyncio.Future[Accepted]) -> None:
        """The client left while its job was written: a job claimed on the way ends cancelled, not running."""
        if committed.cancelled() or committed.exception() is not None:
            self._worker.unclaimed(job.id)
            return
        claim = committed.result().claim
        if claim is None:
            self._worker.unclaimed(job.id)
            return
        self._lifecycle.queued(job)
        task = asyncio.ensure_future(self._cancel_claimed(claim))
        self._leaving.add(task)
        task.add_done_callback(self._leaving.discard)

    async def _cancel_claimed(self, claim: Claim) -> None:
        try:
            await self._lifecycle.cancelled(claim.job, before="start")
        finally:
            self._worker.unclaimed(claim.job.id)

    async def cancel(self, job_id: str) -> bool:
        """Drop a job that waits, or abort one that runs; False if it had already ended."""
        return await self._worker.cancel(job_id)

    async def position(self, job: Job) -> int:
        """How many queued jobs run before this queued one in the current drain order."""
        return await self._store.position(job.id, job.model_key, job.priority, self._worker.drain_order_now())

    def output_so_far(self, job_id: str) -> list[bytes]:
        """The chunks a running job has streamed up to now."""
        return self._lifecycle.output_so_far(job_id)
