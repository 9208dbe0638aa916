"""The run of one claimed job: call Ollama and stream the reply.

`JobRunner` is what the worker hands each claim to. The swap before the call
is `swap.Swap`'s, the pin its request carries `Residency.dispatch`'s, and
every move of the job (started, put back, ended) `Lifecycle`'s. An embed job
may lead a batch (`EmbedBatcher.lead`): the queued jobs that share its call
are taken with it and run as jobs of their own, started through the worker.
A job that fails on its own goes back with a not-before time (see `_put_back`).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, replace
from typing import Any

from foreman.dialects import dialect_for
from foreman.embeddings.batch import Batch, EmbedBatcher
from foreman.embeddings.requests import EmbedRequest
from foreman.errors import (
    TRANSIENT,
    UpstreamFailed,
    UpstreamRejected,
    UpstreamUnreachable,
    is_memory_error,
)
from foreman.job import JSON_TYPE, Job
from foreman.ollama.client import Upstream
from foreman.ollama.names import key_load_options
from foreman.ollama.outages import Outages
from foreman.queue.lifecycle import Lifecycle, error_body
from foreman.retry import RetryPolicy, Sleep
from foreman.scheduling.driver import PolicyDriver
from foreman.storage import Claim
from foreman.worker.residency import Residency
from foreman.worker.swap import Swap

# Ollama's load_duration counts from when it received the request until the
# model was ready, queueing included. Above this, a model we thought resident
# was (re)loaded behind our back, so /api/ps is read again.
_RELOAD_HINT_NS = 500_000_000
_LOAD_DURATION = re.compile(rb'"load_duration":\s*(\d+)')

# Starts a job's run as a task of the worker's (which counts it among the jobs in flight).
Start = Callable[[Coroutine[Any, Any, object], Job], None]


class StoppedHere(Exception):
    """A job run on its handler's task went back to the queue because foreman stops."""


class StreamBroken(Exception):
    """Ollama failed after output already reached a client: the job cannot be retried.

    `tail` is what still has to reach the client: an error line, or nothing
    when Ollama's own error line already went out with the chunks.
    """

    def __init__(self, error: str, tail: bytes) -> None:
        super().__init__(error)
        self.error = error
        self.tail = tail


@dataclass(slots=True)
class _Running:
    job_id: str
    model_key: str
    task: asyncio.Task[Any]  # cancelled to abort the job: its own, or its handler's
    aborted: bool = False
    interrupted: bool = False  # foreman stops: the job goes back to its place


@dataclass(frozen=True, slots=True)
class _Result:
    body: bytes  # what a waiting client still needs: the whole reply, or b"" after a stream
    content_type: str
    result: bytes  # what the store keeps: the reply, or the stream merged as `stream: false` would give it


class JobRunner:
    """Runs claimed jobs against Ollama, one call of `run` per claim."""

    def __init__(
        self,
        *,
        upstream: Upstream,
        lifecycle: Lifecycle,
        swap: Swap,
        residency: Residency,
        driver: PolicyDriver,
        outages: Outages,
        retry: RetryPolicy,
        embeds: EmbedBatcher | None = None,
        clock: Callable[[], float],
        monotonic: Callable[[], float],
        sleep: Sleep,
    ) -> None:
        self._upstream = upstream
        self._lifecycle = lifecycle
        self._swap = swap
        self._residency = residency
        self._driver = driver
        self._outages = outages
        self._retry = retry
        self._embeds = embeds
        self._clock = clock
        self._monotonic = monotonic
        self._sleep = sleep
        self._running: dict[str, _Running] = {}

    @property
    def swaps(self) -> int:
        return self._swap.swaps

    @property
    def loading(self) -> dict[str, int]:
        return self._swap.loading

    def is_running(self, job_id: str) -> bool:
        return job_id in self._running

    def running_jobs(self) -> list[str]:
        """The ids of the jobs in flight now, oldest first."""
        return sorted(self._running)

    def abort(self, job_id: str) -> bool:
        """Abort a running job (it ends cancelled); False if it is not running."""
        running = self._running.get(job_id)
        if running is None:
            return False
        running.aborted = True
        running.task.cancel()
        return True

    def interrupt(self, job_id: str) -> None:
        """foreman stops: a job run on its handler's task goes back to the queue, as the worker's own do."""
        running = self._running.get(job_id)
        if running is not None:
            running.interrupted = True
            running.task.cancel()

    def stop(self) -> None:
        """foreman is stopping: a batch gathered from now on sends its companions back to their places."""
        if self._embeds is not None:
            self._embeds.stop()

    async def run(self, claim: Claim, start: Start) -> None:
        """Run the claimed job to its end, or put it back after a transient failure.

        Jobs taken to share its call (an embedding batch) are run through
        `start`, each as a job of its own.
        """
        await self._job(claim, start)

    async def run_here(self, claim: Claim, start: Start) -> bool:
        """`run` for a job claimed at intake, on its handler's task; False if the job went back to the queue.

        The handler's cancellation (its client left) cancels the job, as Ollama does.
        """
        return await self._job(claim, start, here=True)

    async def _job(
        self, claim: Claim, start: Start, batch: Batch | None = None, *, here: bool = False
    ) -> bool:
        try:
            failure = await self._run(claim, start, batch, here)
        finally:
            if batch is not None:
                batch.leave(claim.job.id)  # a member that ended without the call must not hold it up
        if failure is None:
            return True
        if not isinstance(failure, StoppedHere):
            await self._put_back(claim.job, failure)
        return False

    async def _run(
        self, claim: Claim, start: Start, batch: Batch | None, here: bool = False
    ) -> Exception | None:
        """Run one claimed job; returns the transient failure to put it back for, if any."""
        job = claim.job
        if not await self._lifecycle.start(job):
            return None  # cancelled while the worker claimed it
        if here:
            return await self._run_here(claim, start)
        task = asyncio.create_task(self._execute(claim, start, batch))
        self._running[job.id] = running = _Running(job.id, job.model_key, task)
        try:
            return await task
        except asyncio.CancelledError:
            if running.aborted:
                await self._lifecycle.cancelled(job, before="end")
                return None
            # foreman is stopping: the job keeps its place and runs after the restart.
            await self._lifecycle.put_back(job, shutdown=True)
            raise
        finally:
            del self._running[job.id]

    async def _run_here(self, claim: Claim, start: Start) -> Exception | None:
        """`_run`'s call on the handler's own task: an abort or foreman stopping cancels that task, and is undone here."""
        job = claim.job
        here = asyncio.current_task()
        assert here is not None
        self._running[job.id] = running = _Running(job.id, job.model_key, here)
        try:
            return await self._execute(claim, start, None)
        except asyncio.CancelledError:
            if not (running.aborted or running.interrupted):
                # The handler was cancelled: its client left.
                await self._lifecycle.cancelled(job, before="end")
                raise
            here.uncancel()  # the handler goes on, to tell its client
            if running.aborted:
                await self._lifecycle.cancelled(job, before="end")
                return None
            # foreman is stopping: the job keeps its place and runs after the restart.
            await self._lifecycle.put_back(job, shutdown=True)
            return StoppedHere()  # the handler answers what shutting down says
        finally:
            del self._running[job.id]

    async def _execute(self, claim: Claim, start: Start, batch: Batch | None) -> Exception | None:
        job = claim.job
        lifecycle = self._lifecycle
        wait_s = round(self._clock() - job.created_at, 3)
        waiting = claim.waiting_after
        try:
            if claim.decision.swap:
                if not await self._swap(claim):
                    return None
                await lifecycle.working(job)
                # A load can take a minute; more work may have come for this model meanwhile.
                waiting = (await self._swap.waiting_by_model()).get(job.model_key, 0)
            request = self._embeds.takes(job) if self._embeds is not None and batch is None else None
            if request is not None:
                # The leader of a batch: the queued jobs that may share its call come along.
                batch = await self._lead(claim, request, waiting, start)
                waiting = max(waiting - len(batch.companions), 0)
            lifecycle.calling(job, wait_s=wait_s, waiting_for_model=waiting)
            started = self._monotonic()
            cache = None
            if batch is not None:
                done = await batch.run(job)
                result, load_ns, cache = _Result(done.body, JSON_TYPE, done.body), done.load_ns, done.cache
            else:
                result, load_ns = await self._call(job, waiting)
        except UpstreamRejected as exc:
            await lifecycle.failed(job, exc.status, exc.body, error=exc.message, refused=True)
            return None
        except StreamBroken as exc:
            # Output already went out: an error line ends the stream (none if Ollama sent its own).
            await lifecycle.failed(job, 200, exc.tail, error=exc.error, after_output=True)
            return None
        except TRANSIENT as exc:
            if claim.decision.swap:
                self._residency.recheck()  # the load failed: what Ollama holds now is for /api/ps to say
            return exc
        self._outages.up()
        if not claim.decision.swap and load_ns > _RELOAD_HINT_NS:
            self._residency.recheck()
        run_s = self._monotonic() - started
        # A job that shared a call costs its share of it.
        self._driver.ran(job.model_key, run_s / (batch.size if batch is not None else 1))
        await lifecycle.done(
            job,
            result.body,
            content_type=result.content_type,
            result=result.result,
            cache=cache,
            wait_s=wait_s,
            run_s=run_s,
        )
        return None

    async def _lead(self, claim: Claim, request: EmbedRequest, waiting: int, start: Start) -> Batch:
        """Gather the batch `claim`'s job leads; its companions start as jobs of their own."""
        assert self._embeds is not None
        job, lifecycle, residency = claim.job, self._lifecycle, self._residency
        decision = replace(claim.decision, swap=False)

        def keep_alive(taken: int) -> object | None:
            return residency.batch_keep_alive(job, request.keep_alive, max(waiting - taken, 0))

        def join(companion: Job, batch: Batch) -> None:
            start(self._job(Claim(companion, decision, claim.waiting_after), start, batch), companion)

        def send_back(companion: Job) -> Awaitable[None]:
            return lifecycle.put_back(companion, shutdown=True)

        now = self._clock()
        return await self._embeds.lead(
            job, request, now, keep_alive=keep_alive, join=join, send_back=send_back
        )

    async def _call(self, job: Job, waiting_after: int) -> tuple[_Result, int]:
        """Send the job to Ollama; stream chunks to its waiters as they arrive."""
        dispatch = self._residency.dispatch(job, waiting_after)
        if dispatch.keep_alive is not None:
            # The endpoint takes no keep_alive (Ollama's /v1): a load request sets it first.
            options = key_load_options(job.model_key)
            await self._upstream.load(job.endpoint, job.model, options, dispatch.keep_alive)
            dispatch.accepted()
        async with self._upstream.post(job.endpoint, dispatch.body) as reply:
            dispatch.accepted()
            if not reply.streamed:
                data = await reply.read()
                return _Result(data, reply.content_type, data), _load_ns(data)
            dialect = dialect_for(job.endpoint)
            reader = dialect.reader()
            output: list[bytes] = []
            delivered = False
            try:
                async for line in reply.lines():
                    chunk = reader.chunk(line)
                    if chunk is None:
                        continue  # framing, such as /v1's [DONE]
                    output.append(chunk)
                    delivered = self._lifecycle.chunk(job.id, chunk) or delivered
                    if len(output) == 1:
                        # The client's first chunk goes out now, not after the rest Ollama already sent.
                        await asyncio.sleep(0)
            except UpstreamFailed as exc:
                if delivered:
                    raise StreamBroken(exc.message, error_body(exc.message)) from exc
                self._lifecycle.drop_output(job.id)  # the retry starts the output afresh
                raise
        broken = reader.failure(output)
        if broken is not None:
            raise StreamBroken(*broken)
        last = output[-1] if output else b""
        return _Result(b"", reply.content_type, dialect.merge(job.endpoint, output)), _load_ns(last)

    async def _put_back(self, job: Job, failure: Exception) -> None:
        """Requeue (or finally fail) a job after a transient failure.

        A failure of the job's own (Ollama's 5xx, a stream broken before any
        output went out) holds back only that job: it goes back with a
        not-before time, keeps its place, and the worker serves other work
        meanwhile. Only an unreachable Ollama holds the whole queue: the
        runner waits out the backoff before the worker goes on.
        """
        attempt = job.attempt + 1
        unreachable = isinstance(failure, UpstreamUnreachable)
        if isinstance(failure, UpstreamUnreachable):
            self._outages.down(failure)
            self._residency.recheck()  # Ollama may come back with nothing loaded
        message = getattr(failure, "message", str(failure))
        self._lifecycle.upstream_failed(message, unreachable=unreachable)
        delay = self._retry.delay(attempt)
        if attempt >= self._retry.max_attempts:
            if isinstance(failure, UpstreamFailed) and failure.body:
                status, body = failure.status, failure.body
            else:
                status, body = 502, error_body(f"{message} (gave up after {attempt} attempts)")
            await self._lifecycle.failed(job, status, body, error=message, attempt=attempt)
        else:
            if is_memory_error(message):
                busy = {running.model_key for running in self._running.values()}
                await self._residency.free_memory(keep=job.model_key, busy=busy)
            await self._lifecycle.retry(
                job, attempt=attempt, error=message, delay=delay, holds_queue=unreachable
            )
        if unreachable:
            await self._sleep(delay)


def _load_ns(data: bytes) -> int:
    match = _LOAD_DURATION.search(data)
    return int(match.group(1)) if match else 0
