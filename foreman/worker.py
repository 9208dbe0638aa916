"""The one worker: takes jobs in drain-by-model order and runs them against Ollama."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field

import structlog

from foreman import scheduler
from foreman.dialects import dialect_for
from foreman.errors import TRANSIENT, UpstreamFailed, UpstreamRejected, UpstreamUnreachable, error_message
from foreman.events import Chunk, Ended, JobEvents, StateChanged
from foreman.metrics import Metrics
from foreman.models import STREAMED_ENDPOINTS, Job, JobState
from foreman.names import key_load_options, key_model_name
from foreman.retry import RetryPolicy, Sleep
from foreman.scheduler import ModelQueue
from foreman.store import AsyncStore, Claim, Store
from foreman.upstream import Upstream

log = structlog.get_logger("foreman.worker")

# Ollama's load_duration counts from when it received the request until the
# model was ready, queueing included. Above this, a model we thought resident
# was (re)loaded behind our back, so /api/ps is read again.
_RELOAD_HINT_NS = 500_000_000
_LOAD_DURATION = re.compile(rb'"load_duration":\s*(\d+)')
_JSON = "application/json; charset=utf-8"


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
    task: asyncio.Task[Exception | None]
    aborted: bool = False


@dataclass(slots=True)
class _Pin:
    endpoint: str
    model: str
    options: dict[str, object] = field(default_factory=dict)


class Worker:
    """Runs queued jobs one at a time, serving loaded models before paying for a swap."""

    def __init__(
        self,
        *,
        store: AsyncStore,
        upstream: Upstream,
        events: JobEvents,
        retry: RetryPolicy,
        pin_keep_alive: object,
        release_keep_alive: object,
        metrics: Metrics,
        clock: Callable[[], float] = time.time,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self._store = store
        self._metrics = metrics
        self._upstream = upstream
        self._events = events
        self._retry = retry
        self._pin_keep_alive = pin_keep_alive
        self._release_keep_alive = release_keep_alive
        self._clock = clock
        self._sleep = sleep
        self._work = asyncio.Event()
        # Model keys Ollama holds; None means "read /api/ps before the next pick".
        self._resident: frozenset[str] = frozenset()
        # Whether to read /api/ps before the next pick: the worker was idle,
        # swapped, or saw signs that Ollama loaded something behind its back.
        self._resident_stale = True
        # /api/ps names models, not load options: remember which key we loaded each name as.
        self._loaded_as: dict[str, str] = {}
        self._pins: dict[str, _Pin] = {}
        self._running: _Running | None = None
        self._cancel_requested: set[str] = set()
        # What each running job has streamed so far, for late watchers and the store.
        self._output: dict[str, list[bytes]] = {}
        self._upstream_down = False
        self.swaps = 0
        self.last_error: tuple[float, str] | None = None  # (when, what)

    @property
    def running_job(self) -> str | None:
        """The id of the job running now, if any."""
        return None if self._running is None else self._running.job_id

    @property
    def resident(self) -> frozenset[str]:
        """Model keys Ollama holds, as far as the worker knows."""
        return self._resident

    @property
    def upstream_down(self) -> bool:
        return self._upstream_down

    def output_so_far(self, job_id: str) -> list[bytes]:
        """The chunks a running job has streamed up to now."""
        return list(self._output.get(job_id, ()))

    def wake(self) -> None:
        """New work is in the store."""
        self._work.set()

    async def run(self) -> None:
        """Work until cancelled; each wake-up drains everything that waits."""
        with suppress(UpstreamUnreachable):
            await self._read_residency()
        self._work.set()  # jobs may be waiting from before a restart
        while True:
            await self._work.wait()
            self._work.clear()
            try:
                await self._drain()
            except Exception:
                # A bug or a broken disk must not stop the only worker: log it,
                # pause, and look at the queue again.
                log.exception("worker.error")
                self._resident_stale = True
                self._work.set()
                await self._sleep(self._retry.maximum)

    async def cancel(self, job_id: str) -> bool:
        """Drop a job that waits, or abort one that runs; False if it had already ended."""
        running = self._running
        if running is not None and running.job_id == job_id:
            running.aborted = True
            running.task.cancel()
            return True
        # If the worker claims the job before the store sees this, the flag stops it.
        self._cancel_requested.add(job_id)
        if await self._store.run(Store.cancel_queued, job_id, self._clock()):
            self._cancel_requested.discard(job_id)
            self._events.publish(job_id, Ended(JobState.CANCELLED, 499, _error_body("request canceled")))
            log.info("job.cancelled", job_id=job_id, before="start")
            return True
        running = self._running
        if running is not None and running.job_id == job_id:
            return True  # claimed meanwhile: the flag cancels it before it reaches Ollama
        self._cancel_requested.discard(job_id)
        return False

    async def _drain(self) -> None:
        while True:
            if self._resident_stale:
                await self._await_residency()
            claim = await self._store.run(Store.claim_next, self._choose, self._clock())
            if claim is None:
                # Idle: other clients and keep_alive expiry may change what
                # Ollama holds before the next job comes.
                self._resident_stale = True
                return
            failure = await self._run(claim)
            if failure is not None:
                await self._back_off(claim.job, failure)

    def _choose(self, queues: list[ModelQueue]) -> scheduler.Decision | None:
        return scheduler.pick(queues, self._resident)

    async def _await_residency(self) -> None:
        async for attempt in self._retry.until_answered(self._sleep):
            with attempt:
                await self._read_residency()

    async def _read_residency(self) -> None:
        try:
            names = await self._upstream.resident_models()
        except UpstreamUnreachable as exc:
            self._note_outage(exc)
            raise
        except (UpstreamFailed, UpstreamRejected) as exc:
            # Ollama answers but not with a model list: assume nothing is
            # loaded, which at worst costs a swap that was not needed.
            log.warning("upstream.ps_failed", error=exc.message)
            names = set()
        self._note_upstream_ok()
        self._resident = frozenset(self._loaded_as.get(name, name) for name in names)
        self._resident_stale = False

    async def _run(self, claim: Claim) -> Exception | None:
        """Run one claimed job; returns the transient failure to back off from, if any."""
        job = claim.job
        if job.id in self._cancel_requested:
            self._cancel_requested.discard(job.id)
            await self._end(job, JobState.CANCELLED, 499, _error_body("request canceled"))
            log.info("job.cancelled", job_id=job.id, before="start")
            return None
        self._events.publish(job.id, StateChanged(job.state, job.attempt))
        task = asyncio.create_task(self._execute(claim))
        self._running = running = _Running(job.id, task)
        try:
            return await task
        except asyncio.CancelledError:
            if running.aborted:
                await self._end(job, JobState.CANCELLED, 499, _error_body("request canceled"))
                log.info("job.cancelled", job_id=job.id, before="end")
                return None
            # foreman is stopping: the job keeps its place and runs after the restart.
            await asyncio.shield(self._store.run(Store.requeue, job, attempt=job.attempt, error=None))
            self._output.pop(job.id, None)
            log.info("job.requeued", job_id=job.id, reason="shutdown")
            raise
        finally:
            self._running = None

    async def _execute(self, claim: Claim) -> Exception | None:
        job = claim.job
        bound = log.bind(model=job.model_key, job_id=job.id, endpoint=job.endpoint, attempt=job.attempt)
        wait_s = round(self._clock() - job.created_at, 3)
        waiting = claim.waiting_after
        try:
            if claim.decision.swap:
                await self._swap(claim)
                await self._store.run(Store.set_state, job.id, JobState.WORKING)
                self._events.publish(job.id, StateChanged(JobState.WORKING, job.attempt))
                # A load can take a minute; more work may have come for this model meanwhile.
                waiting = await self._store.run(Store.waiting, job.model_key)
            bound.info("job.start", wait_s=wait_s, waiting_for_model=waiting)
            started = time.monotonic()
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
            return exc
        self._note_upstream_ok()
        if not claim.decision.swap and load_ns > _RELOAD_HINT_NS:
            self._resident_stale = True
        await self._end(
            job, JobState.DONE, 200, result.body, content_type=result.content_type, result=result.result
        )
        bound.info("job.done", wait_s=wait_s, run_s=round(time.monotonic() - started, 3))
        return None

    async def _call(self, job: Job, waiting_after: int) -> tuple[_Result, int]:
        """Send the job to Ollama; stream chunks to its waiters as they arrive."""
        body, keep_alive = self._dispatch_body(job, waiting_after)
        if keep_alive is not None:
            # The endpoint takes no keep_alive (Ollama's /v1): a load request sets it first.
            await self._upstream.load(job.endpoint, job.model, key_load_options(job.model_key), keep_alive)
        async with self._upstream.post(job.endpoint, body) as reply:
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
                    raise StreamBroken(exc.message, _error_body(exc.message)) from exc
                del self._output[job.id]  # the retry starts the output afresh
                raise
        broken = reader.failure(output)
        if broken is not None:
            raise StreamBroken(*broken)
        last = output[-1] if output else b""
        return _Result(b"", reply.content_type, dialect.merge(job.endpoint, output)), _load_ns(last)

    def _dispatch_body(self, job: Job, waiting_after: int) -> tuple[bytes, object | None]:
        """The job's body with the keep_alive that pins or releases its model.

        Where the endpoint takes no keep_alive (Ollama's /v1), the keep_alive
        comes back beside the body instead, for a load request to set first.
        """
        dialect = dialect_for(job.endpoint)
        body = json.loads(job.body)
        if _is_unload(job.endpoint, body):
            return job.body, None  # the client asked Ollama to unload: do exactly that
        changed = False
        if job.respond_async and not job.stream and job.endpoint in STREAMED_ENDPOINTS:
            # Nobody holds a connection for the reply: stream it anyway, so the
            # job's events show its output as it is made.
            dialect.ask_stream(body)
            changed = True
        key = job.model_key
        keep_alive: object | None = None
        if waiting_after > 0:
            if dialect.carries_keep_alive:
                body["keep_alive"] = self._pin_keep_alive
                changed = True
            elif key not in self._pins:
                keep_alive = self._pin_keep_alive  # once: the requests that follow leave it alone
            self._pins[key] = _Pin(job.endpoint, job.model, key_load_options(key))
        elif self._pins.pop(key, None) is not None:
            # The last job of this drain hands Ollama back its own expiry.
            if dialect.carries_keep_alive:
                body.setdefault("keep_alive", self._release_keep_alive)
                changed = True
            else:
                keep_alive = self._release_keep_alive
        return json.dumps(body, separators=(",", ":")).encode() if changed else job.body, keep_alive

    async def _swap(self, claim: Claim) -> None:
        """Load the claimed job's model, pinned, and log what the swap cost."""
        job = claim.job
        key = job.model_key
        leaving = sorted(self._resident)
        waiting_leaving = {k: await self._store.run(Store.waiting, k) for k in leaving}
        await self._release_idle_pins(keep=key)
        options = key_load_options(key)
        started = time.monotonic()
        await self._upstream.load(job.endpoint, job.model, options, self._pin_keep_alive)
        load_s = round(time.monotonic() - started, 3)
        self._pins[key] = _Pin(job.endpoint, job.model, options)
        self._loaded_as[key_model_name(key)] = key
        self._resident = frozenset({key})
        self._resident_stale = True  # read /api/ps again before the next pick
        self.swaps += 1
        self._metrics.swapped(load_s)
        log.info(
            "model.swap",
            reason=claim.decision.reason.value,
            from_models=leaving,
            to_model=key,
            waiting_from=sum(waiting_leaving.values()),
            waiting_to=claim.waiting_after + 1,
            load_s=load_s,
        )

    async def _release_idle_pins(self, keep: str) -> None:
        """Unpin models with no work left, so Ollama may evict them for the next one."""
        for key, pin in list(self._pins.items()):
            if key == keep or await self._store.run(Store.waiting, key) > 0:
                continue
            await self._upstream.load(pin.endpoint, pin.model, pin.options, self._release_keep_alive)
            del self._pins[key]
            log.info("model.unpinned", model=key, keep_alive=self._release_keep_alive)

    async def _back_off(self, job: Job, failure: Exception) -> None:
        """Requeue (or finally fail) a job after a transient failure, then wait."""
        attempt = job.attempt + 1
        bound = log.bind(model=job.model_key, job_id=job.id, endpoint=job.endpoint, attempt=attempt)
        if isinstance(failure, UpstreamUnreachable):
            self._note_outage(failure)
            # Ollama may come back with nothing loaded.
            self._resident, self._resident_stale = frozenset(), True
        message = getattr(failure, "message", str(failure))
        self._metrics.upstream_error("unreachable" if isinstance(failure, UpstreamUnreachable) else "failed")
        self.last_error = (self._clock(), message)
        if attempt >= self._retry.max_attempts:
            if isinstance(failure, UpstreamFailed) and failure.body:
                status, body = failure.status, failure.body
            else:
                status, body = 502, _error_body(f"{message} (gave up after {attempt} attempts)")
            await self._end(job, JobState.FAILED, status, body, error=message, attempt=attempt)
            bound.warning("job.failed", status=status, error=message)
        else:
            await self._store.run(Store.requeue, job, attempt=attempt, error=message)
            self._output.pop(job.id, None)
            self._events.publish(job.id, StateChanged(JobState.QUEUED, attempt))
            self._metrics.retried()
            bound.info("job.retry", error=message)
        await self._sleep(self._retry.delay(attempt))

    async def _end(
        self,
        job: Job,
        state: JobState,
        status: int,
        body: bytes,
        *,
        content_type: str = _JSON,
        result: bytes | None = None,
        error: str | None = None,
        attempt: int | None = None,
    ) -> None:
        """Record how the job ended, with its output, then tell whoever waits for it."""
        if state is not JobState.DONE and error is None:
            error = _error_text(body)
        now = self._clock()
        if state is JobState.FAILED:
            self.last_error = (now, error or "")
        chunks = self._output.pop(job.id, ())
        await self._store.run(
            Store.finish,
            job,
            state,
            now,
            status=status,
            result=result,
            error=error,
            attempt=attempt,
            chunks=chunks,
        )
        self._events.publish(job.id, Ended(state, status, body, content_type))
        started = job.started_at if job.started_at is not None else now
        self._metrics.job_ended(job, state, wait=started - job.created_at, run=now - started)

    def _note_outage(self, exc: UpstreamUnreachable) -> None:
        if not self._upstream_down:
            self._upstream_down = True
            log.warning(
                "upstream.unreachable",
                url=self._upstream.base_url,
                error=exc.message,
                hint="is Ollama running? foreman keeps accepting jobs and runs them when it answers",
            )

    def _note_upstream_ok(self) -> None:
        if self._upstream_down:
            self._upstream_down = False
            log.info("upstream.back", url=self._upstream.base_url)


@dataclass(frozen=True, slots=True)
class _Result:
    body: bytes  # what a waiting client still needs: the whole reply, or b"" after a stream
    content_type: str
    result: bytes  # what the store keeps: the reply, or the stream's final chunk


def _load_ns(data: bytes) -> int:
    match = _LOAD_DURATION.search(data)
    return int(match.group(1)) if match else 0


def _is_unload(endpoint: str, body: dict[str, object]) -> bool:
    empty = not body.get("messages") if endpoint == "/api/chat" else not body.get("prompt")
    return endpoint in ("/api/chat", "/api/generate") and empty and body.get("keep_alive") in (0, "0")


def _error_body(message: str) -> bytes:
    return json.dumps({"error": message}).encode()


def _error_text(body: bytes) -> str:
    message = error_message(body)
    return message if message is not None else body[:500].decode("utf-8", "replace")
