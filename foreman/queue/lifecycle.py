"""A job's moves, each told once: to the storage, its waiters, the page's feed, the metrics and the log.

A job is queued (or answered from the embedding cache at intake), started,
perhaps put back, and ends: done, failed or cancelled. Whoever moves a job
(the queue front at intake, the worker's runner and swap, a cancel) calls
`Lifecycle`, and nothing else writes those transitions, so every one of them
reaches storage, `JobEvents` (the handlers waiting on that job), `PageFeed`
(the live page), the metrics and the log alike.

It also keeps what a running job has streamed so far (for watchers who come
late, and for the record at its end) and the last failure talking to Ollama
(for /status).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import structlog

from foreman.embeddings.cache import EmbedCache
from foreman.errors import Unavailable, error_message
from foreman.job import JSON_TYPE, Job, JobState, NewJob
from foreman.metrics import Metrics
from foreman.queue.job_events import Chunk, Ended, JobEvents, StateChanged
from foreman.queue.page_feed import PageFeed
from foreman.storage import Storage

log = structlog.get_logger("foreman.worker")
intake_log = structlog.get_logger("foreman.api")

# One spelling with the state and with "cancelled before it ran": the job was cancelled.
CANCELLED = "request cancelled"


# How long a stopping foreman waits for the records of finished jobs to reach a database that is away.
_RECORD_TIMEOUT_S = 10.0


class Lifecycle:
    """Every transition of every job, from its commit to its end."""

    def __init__(
        self,
        *,
        store: Storage,
        events: JobEvents,
        feed: PageFeed,
        metrics: Metrics,
        clock: Callable[[], float],
        cache: EmbedCache | None = None,
    ) -> None:
        self._store = store
        self._events = events
        self._feed = feed
        self._metrics = metrics
        self._clock = clock
        self._cache = cache
        # Jobs cancelled while the worker may be claiming them: stopped before they reach Ollama.
        self._cancelling: set[str] = set()
        # What each running job has streamed so far, for late watchers and the store.
        self._output: dict[str, list[bytes]] = {}
        # Results on their way to the store, with their jobs' ids.
        self._records: dict[asyncio.Future[None], str] = {}
        self.last_error: tuple[float, str] | None = None  # (when, what): Ollama's last failure

    # At intake (the queue front, once the storage committed the job)

    def queued(self, job: NewJob) -> None:
        """The job was committed to the queue."""
        self._feed.arrived(job.id, job.model_key, job.priority, job.created_at)
        # Sizes, never content: prompts stay out of the log.
        intake_log.info(
            "job.queued",
            model=job.model_key,
            job_id=job.id,
            endpoint=job.endpoint,
            priority=job.priority.value,
            respond_async=job.respond_async,
            body_bytes=len(job.body),
        )

    def answered(self, job: NewJob, vectors: int) -> None:
        """The embedding cache answered the job as it was written, with `vectors` cached vectors."""
        if self._cache is not None:
            self._cache.count(vectors, 0)
        self._metrics.job_ended(job, JobState.DONE, wait=0.0, run=0.0)
        self._feed.job(
            job.id, JobState.DONE, job.created_at, model=job.model_key, priority=job.priority, attempt=0
        )
        intake_log.info("job.done", model=job.model_key, job_id=job.id, endpoint=job.endpoint, cache="hit")

    # The worker

    async def start(self, job: Job) -> bool:
        """The worker claimed the job; False if it was cancelled meanwhile (it has ended then)."""
        if job.id in self._cancelling:
            self._cancelling.discard(job.id)
            await self.cancelled(job, before="start")
            return False
        self._publish(job, StateChanged(job.state, job.attempt, model=job.model))
        return True

    async def working(self, job: Job) -> None:
        """The claim's model finished loading: the job runs now."""
        await self._store.mark_working(job.id)
        self._publish(job, StateChanged(JobState.WORKING, job.attempt))

    def calling(self, job: Job, *, wait_s: float, waiting_for_model: int) -> None:
        """The job's call to Ollama begins."""
        log.info("job.start", **_facts(job), wait_s=wait_s, waiting_for_model=waiting_for_model)

    def chunk(self, job_id: str, data: bytes) -> bool:
        """The running job streamed `data`; whether its own client waits for it (here or on another node)."""
        output = self._output.get(job_id)
        if output is None:
            output = self._output[job_id] = []
        output.append(data)
        self._events.publish(job_id, Chunk(data))
        return self._events.has_client(job_id)

    def drop_output(self, job_id: str) -> None:
        """The job's stream broke before anyone saw it: its retry starts the output afresh."""
        self._output.pop(job_id, None)

    def output_so_far(self, job_id: str) -> list[bytes]:
        """The chunks a running job has streamed up to now."""
        return list(self._output.get(job_id, ()))

    def upstream_failed(self, message: str, *, unreachable: bool) -> None:
        """A call to Ollama failed for a reason that may pass (the job is retried or finally fails)."""
        self._metrics.upstream_error("unreachable" if unreachable else "failed")
        self.last_error = (self._clock(), message)

    async def retry(self, job: Job, *, attempt: int, error: str, delay: float, holds_queue: bool) -> None:
        """Back in line after a failure, its `attempt` charged; held for `delay` unless it holds the queue."""
        not_before = None if holds_queue else self._clock() + delay
        await self._store.requeue(job, attempt=attempt, error=error, not_before=not_before)
        self._output.pop(job.id, None)
        self._publish(job, StateChanged(JobState.QUEUED, attempt))
        self._metrics.retried()
        log.info(
            "job.retry",
            **_facts(job, attempt=attempt),
            error=error,
            retry_in_s=round(delay, 3),
            holds_queue=holds_queue,
        )

    async def put_back(self, job: Job, *, shutdown: bool) -> None:
        """Back in line at its place, no attempt charged: foreman stops, or its model's load was given up."""
        # Shielded: foreman stopping cancels the caller, and the job must not stay "working".
        await asyncio.shield(self._store.requeue(job, attempt=job.attempt, error=None))
        self._output.pop(job.id, None)
        if shutdown:
            log.info("job.requeued", job_id=job.id, reason="shutdown")
        else:
            self._publish(job, StateChanged(JobState.QUEUED, job.attempt))

    async def done(
        self,
        job: Job,
        body: bytes,
        *,
        content_type: str,
        result: bytes,
        cache: str | None,
        wait_s: float,
        run_s: float,
    ) -> None:
        """The job succeeded; `body` is what its client still needs (b"" after a stream), `result` what is kept."""
        await self._end(job, JobState.DONE, 200, body, content_type=content_type, result=result, cache=cache)
        cached = {"cache": cache} if cache else {}
        # Logged in the next turn of the loop, once the reply has gone out: the client need not wait for the line.
        asyncio.get_running_loop().call_soon(
            partial(log.info, "job.done", **_facts(job), wait_s=wait_s, run_s=round(run_s, 3), **cached)
        )

    async def failed(
        self,
        job: Job,
        status: int,
        body: bytes,
        *,
        error: str,
        attempt: int | None = None,
        after_output: bool = False,
        refused: bool = False,
    ) -> None:
        """The job failed for good; `refused`: Ollama refused its request (the client's doing, not a fault)."""
        await self._end(job, JobState.FAILED, status, body, error=error, attempt=attempt)
        fields: dict[str, Any] = {"after": "output"} if after_output else {}
        (log.info if refused else log.warning)(
            "job.failed", **_facts(job, attempt=attempt), status=status, error=error, **fields
        )

    async def cancelled(self, job: Job, *, before: str) -> None:
        """The job was cancelled before it started ("start") or while it ran ("end")."""
        self._cancelling.discard(job.id)  # a cancel that came while it was being claimed is served
        await self._end(job, JobState.CANCELLED, 499, error_body(CANCELLED), error=CANCELLED)
        self._logged_cancel(job.id, job, before)

    async def cancel_waiting(self, job_id: str, claimed: Callable[[str], bool]) -> bool:
        """Cancel a job that has not started; False if it is not queued here nor being claimed.

        If the worker claims it before the store sees this, `start` stops it
        before it reaches Ollama; `claimed` tells whether that happened.
        """
        self._cancelling.add(job_id)
        now = self._clock()
        if await self._store.cancel_queued(job_id, now):
            self._cancelling.discard(job_id)
            job = await self._store.get(job_id)
            self._told_end(
                job_id, job, Ended(JobState.CANCELLED, 499, error_body(CANCELLED), error=CANCELLED), now
            )
            self._logged_cancel(job_id, job, "start")
            return True
        if claimed(job_id):
            return True
        self._cancelling.discard(job_id)
        return False

    async def cancel_elsewhere(self, job_id: str) -> bool:
        """Ask another node sharing the queue that runs the job to abort it; its end comes back as events."""
        return await self._events.relay.cancel_elsewhere(job_id)

    async def recorded(self) -> None:
        """Wait until the outcomes on their way to the store are written, or _RECORD_TIMEOUT_S (foreman stops).

        A record still retrying then (its database is away) is given up: its job runs again after the
        restart, as after a crash.
        """
        if not self._records:
            return
        _, pending = await asyncio.wait(set(self._records), timeout=_RECORD_TIMEOUT_S)
        for record in pending:
            record.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

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
        ended = Ended(state, status, body, content_type, error)
        record = asyncio.ensure_future(
            self._until_written(
                job.id,
                partial(
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
                    ended=ended,  # other nodes hear it with the record (PostgreSQL)
                ),
            )
        )
        if state is JobState.DONE:
            self._records[record] = job.id
            record.add_done_callback(partial(self._recorded, job.id))
        else:
            await record
        self._told_end(job.id, job, ended, now)

    @property
    def recording(self) -> list[str]:
        """The jobs whose end is on its way to the store: still this node's, though no longer running."""
        return sorted(self._records.values())

    @staticmethod
    async def _until_written(job_id: str, write: Callable[[], Awaitable[None]]) -> None:
        """`write()` a job's end, again and again while the store cannot be reached (a database restart).

        Its client has its answer, or will have it: given up, the record would leave the
        job "working", and it would run a second time.
        """
        pause = 0.1
        while True:
            try:
                await write()
                return
            except Unavailable as exc:
                if pause == 0.1:
                    log.warning("job.record_waiting", job_id=job_id, error=exc.message)
                await asyncio.sleep(pause)
                pause = min(pause * 2, 2.0)

    def _told_end(self, job_id: str, job: Job | None, ended: Ended, now: float) -> None:
        """Tell the job's waiters that it ended, then the page and the metrics (`job` None: no longer stored).

        The page and the metrics hear it in the next turn of the loop, once a
        waiting client's reply has gone out.
        """
        self._events.publish(job_id, ended)
        asyncio.get_running_loop().call_soon(self._tally_end, job_id, job, ended, now)

    def _tally_end(self, job_id: str, job: Job | None, ended: Ended, now: float) -> None:
        if job is None:
            self._feed.job(job_id, ended.state, now)
            return
        self._feed.job(
            job_id, ended.state, now, model=job.model_key, priority=job.priority, attempt=job.attempt
        )
        if job.started_at is None:  # cancelled while it waited: counted, but it never started to be timed
            self._metrics.job_ended(job, ended.state)
        else:
            started = job.started_at
            self._metrics.job_ended(job, ended.state, wait=started - job.created_at, run=now - started)

    @staticmethod
    def _logged_cancel(job_id: str, job: Job | None, before: str) -> None:
        model, endpoint = (job.model_key, job.endpoint) if job is not None else (None, None)
        log.info("job.cancelled", job_id=job_id, model=model, endpoint=endpoint, before=before)

    def _publish(self, job: Job, event: StateChanged) -> None:
        """Tell the job's waiters, and the queue's watchers, that it moved."""
        self._events.publish(job.id, event)
        self._feed.job(
            job.id,
            event.state,
            self._clock(),
            model=job.model_key,
            priority=job.priority,
            attempt=event.attempt,
        )

    def _recorded(self, job_id: str, record: asyncio.Future[None]) -> None:
        self._records.pop(record, None)
        if not record.cancelled() and (exc := record.exception()) is not None:
            # The job stays "working" in the store, and runs again after a restart.
            log.error("job.record_failed", job_id=job_id, error=str(exc))


def error_body(message: str) -> bytes:
    return json.dumps({"error": message}).encode()


def _facts(job: Job, *, attempt: int | None = None) -> dict[str, Any]:
    """What every line about a job's run says of it."""
    return {
        "model": job.model_key,
        "job_id": job.id,
        "endpoint": job.endpoint,
        "attempt": job.attempt if attempt is None else attempt,
        "priority": job.priority.value,
    }


def _error_text(body: bytes) -> str:
    message = error_message(body)
    return message if message is not None else body[:500].decode("utf-8", "replace")
