"""The cloud lane: jobs for cloud models run at once, beside the worker, never behind local work.

Ollama forwards a request for a cloud model (`gpt-oss:120b-cloud`,
`qwen3-coder:480b-cloud`, any `:cloud` tag: `foreman.ollama.names.is_cloud`)
to its cloud; nothing loads on this machine's GPU. Such a job is still a job
(written, listed, replayable, cancellable), but waiting for the GPU would only
delay it, and loading, pinning or releasing its model would be wrong: there is
no local model to hold. So the worker leaves cloud queues alone (`fold` drops
them from what it sees), and this lane claims them as they arrive, up to
`FOREMAN_CLOUD_PARALLEL` at a time, oldest first with interactive jobs before
batch ones. A claim here is never a swap and never says that work waits
behind it, so the runner sends the request as it came: no load request, no
`keep_alive` of foreman's. Retries, cancellation and the shutdown requeue are
the runner's and the lifecycle's, as for any job.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from contextlib import suppress
from typing import Any, Protocol

import structlog

from foreman.job import Job, Priority
from foreman.ollama.names import is_cloud
from foreman.queue.front import Intake
from foreman.scheduling.policy import Decision, ModelQueue, Reason
from foreman.storage import Chooser, Claim, DrainOrder, Storage

log = structlog.get_logger("foreman.cloud")

Start = Callable[[Coroutine[Any, Any, object], Job], None]


class Runs(Protocol):
    """What the lane needs of the runner (`foreman.worker.runner.JobRunner`), which the worker shares."""

    async def run(self, claim: Claim, start: Start) -> None: ...


class CloudLane:
    """Claims and runs the jobs of cloud models as soon as they are queued."""

    def __init__(self, *, store: Storage, runner: Runs, parallel: int, clock: Callable[[], float]) -> None:
        self._store = store
        self._runner = runner
        self._parallel = parallel
        self._clock = clock
        self._work = asyncio.Event()
        self._tasks: set[asyncio.Task[object]] = set()
        self._due: float | None = None  # when the next held-back cloud job may run
        self._stopping = False

    @property
    def running(self) -> int:
        return len(self._tasks)

    def wake(self) -> None:
        """A cloud job was queued (or a held one came due)."""
        self._work.set()

    def stop(self) -> None:
        """Take no new jobs (foreman is shutting down)."""
        self._stopping = True
        self._work.set()

    async def run(self) -> None:
        """Claim cloud jobs while there is room, until cancelled; jobs in flight go back to the queue then."""
        try:
            while not self._stopping:
                self._work.clear()
                while len(self._tasks) < self._parallel and not self._stopping:
                    claim = await self._store.claim(self._choose, self._clock())
                    if claim is None:
                        break
                    # Nothing waits behind a cloud job: its request carries no pin.
                    self._start(self._runner.run(Claim(claim.job, claim.decision, 0), self._start), claim.job)
                await self._wait()
        finally:
            for task in self._tasks:
                task.cancel()
            with suppress(asyncio.CancelledError):
                await asyncio.gather(*self._tasks, return_exceptions=True)

    async def wait_for_running(self, grace: float) -> None:
        """Give the cloud jobs in flight up to `grace` seconds to finish."""
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=grace)

    def _start(self, run: Coroutine[Any, Any, object], job: Job) -> None:
        with structlog.contextvars.bound_contextvars(job_id=job.id, model=job.model_key, lane="cloud"):
            task = asyncio.create_task(run, name=f"foreman-cloud-job {job.id}")
        self._tasks.add(task)
        task.add_done_callback(self._ended)

    def _ended(self, task: asyncio.Task[object]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (error := task.exception()) is not None:
            log.error("cloud.job_crashed", error=repr(error))
        self._work.set()

    async def _wait(self) -> None:
        """Until woken (a job queued, one ended), or the next held job's time."""
        due, self._due = self._due, None
        if due is None:
            await self._work.wait()
            return
        with suppress(TimeoutError):
            await asyncio.wait_for(self._work.wait(), max(0.0, due - self._clock()))

    def _choose(self, queues: list[ModelQueue]) -> Decision | None:
        """The next cloud job: interactive before batch, then the oldest; held ones once their time came."""
        now = self._clock()
        ready: list[tuple[int, str, Decision]] = []
        for queue in queues:
            if not is_cloud(queue.model_key):
                continue
            rank = 0 if queue.priority is Priority.INTERACTIVE else 1
            decision = Decision(queue.model_key, Reason.CLOUD, queue.priority)
            if queue.waiting > 0:
                ready.append((rank, queue.oldest_id, decision))
            for held in queue.held:
                if held.not_before <= now:
                    ready.append(
                        (
                            rank,
                            held.job_id,
                            Decision(queue.model_key, Reason.CLOUD, queue.priority, job_id=held.job_id),
                        )
                    )
                elif self._due is None or held.not_before < self._due:
                    self._due = held.not_before
        if not ready:
            return None
        return min(ready, key=lambda entry: entry[:2])[2]


class Lanes:
    """Who runs a job, as the queue front sees it: the cloud lane for cloud models, the worker for the rest."""

    def __init__(self, worker: Intake, cloud: CloudLane) -> None:
        self._worker = worker
        self._cloud = cloud

    def wake(self, model_key: str) -> None:
        if is_cloud(model_key):
            self._cloud.wake()
        else:
            self._worker.wake(model_key)

    def drain_order_now(self) -> DrainOrder:
        return self._worker.drain_order_now()

    def run_now(self) -> Chooser | None:
        # Intake's fast path is the worker's: its policy never picks a cloud job there (a cloud
        # model is never loaded, so it would be a swap), and those wake the lane instead.
        return self._worker.run_now()

    def unclaimed(self, job_id: str) -> None:
        self._worker.unclaimed(job_id)

    async def run_here(self, claim: Claim) -> None:
        await self._worker.run_here(claim)

    async def cancel(self, job_id: str) -> bool:
        # The lane shares the worker's runner: the worker finds a running cloud job there.
        return await self._worker.cancel(job_id)
