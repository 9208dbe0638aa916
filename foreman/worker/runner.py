"""The run of one claimed job: load its model if the claim was a swap, call Ollama, stream, finish or put back.

`JobRunner` is what the worker hands each claim to. It tells the job's
waiters (`JobEvents`) what happens, records the outcome in the store, feeds
observed load and run times to the policy driver, and keeps the output of
running jobs for watchers who come late. An embed job may lead a batch
(`foreman.embeddings.batch`): the queued jobs that share its call are taken with
it and run as jobs of their own, started through the worker. A job that
fails on its own goes back with a not-before time (see `_put_back`).
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable, Coroutine
from contextlib import suppress
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import structlog

from foreman.dialects import dialect_for
from foreman.embeddings.batch import Batch, EmbedBatcher
from foreman.embeddings.requests import EmbedRequest
from foreman.errors import (
    TRANSIENT,
    UpstreamFailed,
    UpstreamRejected,
    UpstreamUnreachable,
    error_message,
    is_memory_error,
)
from foreman.job import JSON_TYPE, STREAMED_ENDPOINTS, Job, JobState
from foreman.metrics import Metrics
from foreman.ollama.client import Upstream
from foreman.ollama.names import key_load_options
from foreman.ollama.outages import Outages
from foreman.queue.job_events import Chunk, Ended, JobEvents, StateChanged
from foreman.queue.page_feed import PageFeed
from foreman.retry import RetryPolicy, Sleep
from foreman.routing.aliases import fold, waiting_for
from foreman.scheduling.driver import PolicyDriver
from foreman.scheduling.policy import Decision, Reason
from foreman.storage import Claim, Storage
from foreman.worker.residency import Residency
from foreman.worker.wakeups import WakeUps

log = structlog.get_logger("foreman.worker")

# Ollama's load_duration counts from when it received the request until the
# model was ready, queueing included. Above this, a model we thought resident
# was (re)loaded behind our back, so /api/ps is read again.
_RELOAD_HINT_NS = 500_000_000
_LOAD_DURATION = re.compile(rb'"load_duration":\s*(\d+)')

# Starts a job's run as a task of the worker's (which counts it among the jobs in flight).
Start = Callable[[Coroutine[Any, Any, None], Job], None]


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
    task: asyncio.Task[Exception | None]
    aborted: bool = False


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
        store: Storage,
        upstream: Upstream,
        events: JobEvents,
        metrics: Metrics,
        retry: RetryPolicy,
        driver: PolicyDriver,
        residency: Residency,
        outages: Outages,
        wakeups: WakeUps,
        feed: PageFeed,
        embeds: EmbedBatcher | None = None,
        clock: Callable[[], float],
        monotonic: Callable[[], float],
        sleep: Sleep,
    ) -> None:
        self._store = store
        self._upstream = upstream
        self._events = events
        self._metrics = metrics
        self._retry = retry
        self._driver = driver
        self._residency = residency
        self._outages = outages
        self._wakeups = wakeups
        self._feed = feed  # the queue's watchers (/events, the live page)
        self._embeds = embeds
        self._stopping = False
        self._clock = clock
        self._monotonic = monotonic
        self._sleep = sleep
        self._running: dict[str, _Running] = {}
        # Jobs cancelled while the worker may be claiming them: stopped before they reach Ollama.
        self.cancel_requested: set[str] = set()
        # What each running job has streamed so far, for late watchers and the store.
        self._output: dict[str, list[bytes]] = {}
        self._records: set[asyncio.Future[None]] = set()  # results on their way to the store
        self.swaps = 0
        self.last_error: tuple[float, str] | None = None  # (when, what)

    def is_running(self, job_id: str) -> bool:
        return job_id in self._running

    def running_jobs(self) -> list[str]:
        """The ids of the jobs in flight now, oldest first."""
        return sorted(self._running)

    def output_so_far(self, job_id: str) -> list[bytes]:
        """The chunks a running job has streamed up to now."""
        return list(self._output.get(job_id, ()))

    def abort(self, job_id: str) -> bool:
        """Abort a running job (it ends cancelled); False if it is not running."""
        running = self._running.get(job_id)
        if running is None:
            return False
        running.aborted = True
        running.task.cancel()
        return True

    async def recorded(self) -> None:
        """Wait until the outcomes on their way to the store are written."""
        await asyncio.gather(*self._records, return_exceptions=True)

    def stop(self) -> None:
        """foreman is stopping: a batch gathered from now on sends its companions back to their places."""
        self._stopping = True

    async def run(self, claim: Claim, start: Start) -> None:
        """Run the claimed job to its end, or put it back after a transient failure.

        Jobs taken to share its call (an embedding batch) are run through
        `start`, each as a job of its own.
        """
        await self._job(claim, start)

    async def _job(self, claim: Claim, start: Start, batch: Batch | None = None) -> None:
        try:
            failure = await self._run(claim, start, batch)
        finally:
            if batch is not None:
                batch.leave(claim.job.id)  # a member that ended without the call must not hold it up
        if failure is not None:
            await self._put_back(claim.job, failure)

    async def _run(self, claim: Claim, start: Start, batch: Batch | None) -> Exception | None:
        """Run one claimed job; returns the transient failure to put it back for, if any."""
        job = claim.job
        if job.id in self.cancel_requested:
            self.cancel_requested.discard(job.id)
            await self._end(job, JobState.CANCELLED, 499, error_body("request canceled"))
            log.info(
                "job.cancelled", job_id=job.id, model=job.model_key, endpoint=job.endpoint, before="start"
            )
            return None
        self._publish(job, StateChanged(job.state, job.attempt, model=job.model))
        task = asyncio.create_task(self._execute(claim, start, batch))
        self._running[job.id] = running = _Running(job.id, job.model_key, task)
        try:
            return await task
        except asyncio.CancelledError:
            if running.aborted:
                await self._end(job, JobState.CANCELLED, 499, error_body("request canceled"))
                log.info(
                    "job.cancelled", job_id=job.id, model=job.model_key, endpoint=job.endpoint, before="end"
                )
                return None
            # foreman is stopping: the job keeps its place and runs after the restart.
            await asyncio.shield(self._store.requeue(job, attempt=job.attempt, error=None))
            self._output.pop(job.id, None)
            log.info("job.requeued", job_id=job.id, reason="shutdown")
            raise
        finally:
            del self._running[job.id]

    async def _execute(self, claim: Claim, start: Start, batch: Batch | None) -> Exception | None:
        job = claim.job
        bound = log.bind(
            model=job.model_key,
            job_id=job.id,
            endpoint=job.endpoint,
            attempt=job.attempt,
            priority=job.priority.value,
        )
        wait_s = round(self._clock() - job.created_at, 3)
        waiting = claim.waiting_after
        try:
            if claim.decision.swap:
                if not await self._swap(claim):
                    return None
                await self._store.mark_working(job.id)
                self._publish(job, StateChanged(JobState.WORKING, job.attempt))
                # A load can take a minute; more work may have come for this model meanwhile.
                waiting = (await self._waiting_by_model()).get(job.model_key, 0)
            request = self._embeds.takes(job) if self._embeds is not None and batch is None else None
            if request is not None:
                # The leader of a batch: the queued jobs that may share its call come along.
                batch = await self._lead(claim, request, waiting, start)
                waiting = max(waiting - len(batch.companions), 0)
            bound.info("job.start", wait_s=wait_s, waiting_for_model=waiting)
            started = self._monotonic()
            cache = None
            if batch is not None:
                done = await batch.run(job)
                result, load_ns, cache = _Result(done.body, JSON_TYPE, done.body), done.load_ns, done.cache
            else:
                result, load_ns = await self._call(job, waiting)
        except UpstreamRejected as exc:
            await self._end(job, JobState.FAILED, exc.status, exc.body)
            bound.info("job.failed", status=exc.status, error=exc.message)
            return None
        except StreamBroken as exc:
            # Output already went out: an error line ends the stream (none if Ollama sent its own).
            await self._end(job, JobState.FAILED, 200, exc.tail, error=exc.error)
            bound.warning("job.failed", status=200, error=exc.error, after="output")
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
        await self._end(
            job,
            JobState.DONE,
            200,
            result.body,
            content_type=result.content_type,
            result=result.result,
            cache=cache,
        )
        bound.info("job.done", wait_s=wait_s, run_s=round(run_s, 3), **({"cache": cache} if cache else {}))
        return None

    async def _lead(self, claim: Claim, request: EmbedRequest, waiting: int, start: Start) -> Batch:
        """Gather the batch `claim`'s job leads, and start its companions.

        The companions are taken from the store in one step that runs to its
        end even if the leader is cancelled meanwhile: once taken, they run,
        and the leader leaves the batch instead of holding them up.
        """
        job = claim.job
        gathering = asyncio.ensure_future(self._gather(claim, request, waiting, start))
        try:
            return await asyncio.shield(gathering)
        except asyncio.CancelledError:
            gathering.add_done_callback(
                lambda task: None if task.cancelled() or task.exception() else task.result().leave(job.id)
            )
            raise

    async def _gather(self, claim: Claim, request: EmbedRequest, waiting: int, start: Start) -> Batch:
        assert self._embeds is not None
        job = claim.job
        batch = await self._embeds.gather(job, request, self._clock())
        batch.keep_alive = self._batch_keep_alive(job, request, max(waiting - len(batch.companions), 0))
        if self._stopping:
            # foreman is stopping: the companions go back to their places, uncharged.
            for companion in batch.companions:
                await self._store.requeue(companion, attempt=companion.attempt, error=None)
                batch.leave(companion.id)
            return batch
        # The companions run as jobs of their own, meeting in the batch's call.
        decision = replace(claim.decision, swap=False)
        for companion in batch.companions:
            joined = Claim(companion, decision, claim.waiting_after)
            start(self._job(joined, start, batch), companion)
        return batch

    def _batch_keep_alive(self, job: Job, request: EmbedRequest, waiting_after: int) -> object | None:
        """The keep_alive of a batch's call: the pin while work waits, else the release (see _dispatch_body)."""
        residency = self._residency
        if waiting_after > 0:
            residency.pin(job, endpoint="/api/embed")  # the batch's call goes to /api/embed
            return residency.pin_keep_alive
        if residency.release(job.model_key):
            return request.keep_alive if request.keep_alive is not None else residency.release_keep_alive
        return request.keep_alive

    async def _call(self, job: Job, waiting_after: int) -> tuple[_Result, int]:
        """Send the job to Ollama; stream chunks to its waiters as they arrive."""
        body, keep_alive, releases = self._dispatch_body(job, waiting_after)
        if keep_alive is not None:
            # The endpoint takes no keep_alive (Ollama's /v1): a load request sets it first.
            await self._upstream.load(job.endpoint, job.model, key_load_options(job.model_key), keep_alive)
            self._residency.unpinned(job.model_key, releases)
        async with self._upstream.post(job.endpoint, body) as reply:
            # Accepted: Ollama has applied the request's keep_alive to the model.
            self._residency.unpinned(job.model_key, releases)
            if not reply.streamed:
                data = await reply.read()
                return _Result(data, reply.content_type, data), _load_ns(data)
            dialect = dialect_for(job.endpoint)
            reader = dialect.reader()
            output = self._output[job.id] = []
            delivered = False
            try:
                async for line in reply.lines():
                    chunk = reader.chunk(line)
                    if chunk is None:
                        continue  # framing, such as /v1's [DONE]
                    output.append(chunk)
                    self._events.publish(job.id, Chunk(chunk))
                    delivered = delivered or self._events.has_client(job.id)
            except UpstreamFailed as exc:
                if delivered:
                    raise StreamBroken(exc.message, error_body(exc.message)) from exc
                del self._output[job.id]  # the retry starts the output afresh
                raise
        broken = reader.failure(output)
        if broken is not None:
            raise StreamBroken(*broken)
        last = output[-1] if output else b""
        return _Result(b"", reply.content_type, dialect.merge(job.endpoint, output)), _load_ns(last)

    def _dispatch_body(self, job: Job, waiting_after: int) -> tuple[bytes, object | None, object | None]:
        """The job's body with the keep_alive that pins or releases its model.

        Where the endpoint takes no keep_alive (Ollama's /v1), the keep_alive
        comes back beside the body instead, for a load request to set first.
        The third value is the pin the request releases: it is forgotten once
        Ollama has accepted the request, and released later if not.
        """
        residency = self._residency
        if not job.respond_async and waiting_after == 0 and not residency.pinned(job.model_key):
            return job.body, None, None  # nothing to pin, release or ask for: send it as it came
        dialect = dialect_for(job.endpoint)
        body = json.loads(job.body)
        if _is_unload(job.endpoint, body):
            # The client asked Ollama to unload: do exactly that.
            return job.body, None, residency.releasing(job.model_key)
        changed = False
        if job.respond_async and not job.stream and job.endpoint in STREAMED_ENDPOINTS:
            # Nobody holds a connection for the reply: stream it anyway, so the
            # job's events show its output as it is made.
            dialect.ask_stream(body)
            changed = True
        keep_alive: object | None = None
        releases = None
        if waiting_after > 0:
            if dialect.carries_keep_alive:
                body["keep_alive"] = residency.pin_keep_alive
                changed = True
            elif not residency.pinned(job.model_key):
                keep_alive = residency.pin_keep_alive  # once: the requests that follow leave it alone
            residency.pin(job)
        elif (releases := residency.releasing(job.model_key)) is not None:
            # The last job of this drain hands Ollama back its own expiry.
            if dialect.carries_keep_alive:
                body.setdefault("keep_alive", residency.release_value())
                changed = True
            else:
                keep_alive = residency.release_value()
        body_bytes = json.dumps(body, separators=(",", ":")).encode() if changed else job.body
        return body_bytes, keep_alive, releases

    async def _swap(self, claim: Claim) -> bool:
        """Load the claimed job's model (with the release keep_alive), and log why and what the swap cost.

        Returns False when the load was given up for an interactive job that
        arrived meanwhile (`Policy.abandons`); the job is back in the queue,
        in its place and without an attempt charged.
        """
        job = claim.job
        decision = claim.decision
        key = job.model_key
        leaving = sorted(self._residency.models)
        waiting_now = await self._waiting_by_model()
        waiting_leaving = {k: waiting_now.get(k, 0) for k in leaving}
        await self._residency.make_room(keep=key, evict=decision.evict, waiting=waiting_now)
        expected = self._driver.book.costs().load_s.get(key)
        started = self._monotonic()
        load = self._residency.load(job, expected or 0.0)
        if not self._driver.policy.may_abandon(decision):
            await load
        elif await self._abandoned(asyncio.create_task(load), decision):
            await self._store.requeue(job, attempt=job.attempt, error=None)
            self._publish(job, StateChanged(JobState.QUEUED, job.attempt))
            self._driver.abandoned(decision)
            self._residency.recheck()
            log.info(
                "model.load_abandoned",
                model=key,
                reason=Reason.PRIORITY.value,
                after_s=round(self._monotonic() - started, 3),
                job_id=job.id,
            )
            self._wakeups.look_again()
            return False
        load_s = self._monotonic() - started
        self._driver.loaded(key, load_s, self._clock())
        await self._residency.loaded(job)  # and read /api/ps again before the next pick
        self._wakeups.look_again()  # with FOREMAN_PARALLEL > 1, more jobs for this model may start now
        self.swaps += 1
        self._metrics.swapped(load_s)
        self._feed.swap(
            model=key, reason=decision.reason.value, from_models=leaving, load_s=load_s, at=self._clock()
        )
        log.info(
            "model.swap",
            reason=decision.reason.value,
            priority=decision.priority.value,
            from_models=leaving,
            to_model=key,
            waiting_from=sum(waiting_leaving.values()),
            waiting_to=claim.waiting_after + 1,
            oldest_wait_s=round(decision.waited, 3),
            evict=decision.evict,
            load_s=round(load_s, 3),
            learned_load_s=None if expected is None else round(expected, 3),
        )
        return True

    async def _abandoned(self, load: asyncio.Task[None], decision: Decision) -> bool:
        """Wait for `load`; True if it was cancelled because the policy gives it up.

        Cancelling the request makes Ollama abort the load, as it does for
        any client that leaves while its model loads.
        """
        try:
            while True:
                self._wakeups.arrived.clear()
                arrived = asyncio.ensure_future(self._wakeups.arrived.wait())
                try:
                    done, _ = await asyncio.wait({load, arrived}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    arrived.cancel()
                if load in done:
                    await load  # raises what the load raised
                    return False
                queues = fold(await self._store.queues(), self._driver.before.resident).queues
                if self._driver.abandons(decision, queues, self._clock()):
                    return True
        finally:
            if not load.done():
                load.cancel()
                with suppress(asyncio.CancelledError):
                    await load

    async def _waiting_by_model(self) -> dict[str, int]:
        """Queued jobs per model key, alias jobs counted with the model that would serve them now."""
        resident = self._residency.as_read()
        if resident is None:
            resident = self._driver.state.resident
        return waiting_for(await self._store.waiting_by_model(), resident)

    async def _put_back(self, job: Job, failure: Exception) -> None:
        """Requeue (or finally fail) a job after a transient failure.

        A failure of the job's own (Ollama's 5xx, a stream broken before any
        output went out) holds back only that job: it goes back with a
        not-before time, keeps its place, and the worker serves other work
        meanwhile. Only an unreachable Ollama holds the whole queue: the
        runner waits out the backoff before the worker goes on.
        """
        attempt = job.attempt + 1
        bound = log.bind(model=job.model_key, job_id=job.id, endpoint=job.endpoint, attempt=attempt)
        unreachable = isinstance(failure, UpstreamUnreachable)
        if isinstance(failure, UpstreamUnreachable):
            self._outages.down(failure)
            self._residency.recheck()  # Ollama may come back with nothing loaded
        message = getattr(failure, "message", str(failure))
        self._metrics.upstream_error("unreachable" if unreachable else "failed")
        self.last_error = (self._clock(), message)
        delay = self._retry.delay(attempt)
        if attempt >= self._retry.max_attempts:
            if isinstance(failure, UpstreamFailed) and failure.body:
                status, body = failure.status, failure.body
            else:
                status, body = 502, error_body(f"{message} (gave up after {attempt} attempts)")
            await self._end(job, JobState.FAILED, status, body, error=message, attempt=attempt)
            bound.warning("job.failed", status=status, error=message)
        else:
            if is_memory_error(message):
                busy = {running.model_key for running in self._running.values()}
                await self._residency.free_memory(keep=job.model_key, busy=busy)
            not_before = None if unreachable else self._clock() + delay
            await self._store.requeue(job, attempt=attempt, error=message, not_before=not_before)
            self._output.pop(job.id, None)
            self._publish(job, StateChanged(JobState.QUEUED, attempt))
            self._metrics.retried()
            bound.info("job.retry", error=message, retry_in_s=round(delay, 3), holds_queue=unreachable)
        if unreachable:
            await self._sleep(delay)

    async def _end(
        self,
        job: Job,
        state: JobState,
        status: int,
        body: bytes,
        *,
        content_type: str = JSON_TYPE,
        result: bytes | None = None,
        error: str | None = None,
        attempt: int | None = None,
        cache: str | None = None,
    ) -> None:
        """Record how the job ended, with its output, and tell whoever waits for it.

        A job that succeeded is answered first and recorded right after: the
        record is already on its way to the store, so any later store
        call (GET /jobs/{id}, the next claim) sees it, and neither the client
        nor the next job waits for the commit. If foreman dies in between,
        the job runs again after the restart, as if it had died a moment earlier.
        """
        if state is not JobState.DONE and error is None:
            error = _error_text(body)
        now = self._clock()
        if state is JobState.FAILED:
            self.last_error = (now, error or "")
        chunks = self._output.pop(job.id, ())
        record = asyncio.ensure_future(
            self._store.finish(
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
        )
        if state is JobState.DONE:
            self._records.add(record)
            record.add_done_callback(partial(self._recorded, job.id))
        else:
            await record
        self._publish(job, Ended(state, status, body, content_type, error))
        started = job.started_at if job.started_at is not None else now
        self._metrics.job_ended(job, state, wait=started - job.created_at, run=now - started)

    def _publish(self, job: Job, event: StateChanged | Ended) -> None:
        """Tell the job's waiters, and the queue's watchers, that it moved."""
        self._events.publish(job.id, event)
        attempt = event.attempt if isinstance(event, StateChanged) else job.attempt
        self._feed.job(
            job.id, event.state, self._clock(), model=job.model_key, priority=job.priority, attempt=attempt
        )

    def _recorded(self, job_id: str, record: asyncio.Future[None]) -> None:
        self._records.discard(record)
        if not record.cancelled() and (exc := record.exception()) is not None:
            # The job stays "working" in the store, and runs again after a restart.
            log.error("job.record_failed", job_id=job_id, error=str(exc))


def error_body(message: str) -> bytes:
    return json.dumps({"error": message}).encode()


def _load_ns(data: bytes) -> int:
    match = _LOAD_DURATION.search(data)
    return int(match.group(1)) if match else 0


def _is_unload(endpoint: str, body: dict[str, object]) -> bool:
    empty = not body.get("messages") if endpoint == "/api/chat" else not body.get("prompt")
    return endpoint in ("/api/chat", "/api/generate") and empty and body.get("keep_alive") in (0, "0")


def _error_text(body: bytes) -> str:
    message = error_message(body)
    return message if message is not None else body[:500].decode("utf-8", "replace")
