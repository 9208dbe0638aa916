"""The one worker: takes jobs in the order `scheduler.Policy` decides and runs them against Ollama.

Up to `parallel` jobs run at once, all for the model Ollama already holds;
a job for any other model waits until they are done, so Ollama never serves
two models for foreman at the same time.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field, replace
from functools import partial

import structlog

from foreman.aliases import Why, alias_of, fold, is_alias_key, waiting_for
from foreman.dialects import dialect_for
from foreman.embed_batch import Batch, EmbedBatcher
from foreman.embeddings import EmbedRequest
from foreman.errors import (
    TRANSIENT,
    UpstreamFailed,
    UpstreamRejected,
    UpstreamUnreachable,
    error_message,
    is_memory_error,
)
from foreman.events import Chunk, Ended, JobEvents, StateChanged
from foreman.feed import QueueFeed
from foreman.metrics import Metrics
from foreman.models import JSON_TYPE, STREAMED_ENDPOINTS, Job, JobState, ModelStats, Priority
from foreman.names import key_load_options, key_model_name
from foreman.retry import RetryPolicy, Sleep
from foreman.scheduler import CostBook, Decision, ModelQueue, Policy, Reason, State, drain_order, next_due
from foreman.store import AsyncStore, Claim, Store
from foreman.upstream import Upstream
from foreman.warm import Warmer

log = structlog.get_logger("foreman.worker")

# Ollama's load_duration counts from when it received the request until the
# model was ready, queueing included. Above this, a model we thought resident
# was (re)loaded behind our back, so /api/ps is read again.
_RELOAD_HINT_NS = 500_000_000
# After the queue ran dry for longer than this, /api/ps is read again before
# the next job: other programs or keep_alive expiry may have changed what
# Ollama holds. A shorter gap (a client sending requests one after another)
# is not worth an extra round trip per request.
_IDLE_RECHECK_S = 2.0
# On SIGTERM, the pins foreman set are released within this many seconds.
_RELEASE_TIMEOUT_S = 5.0
# Ollama's keep_alive when OLLAMA_KEEP_ALIVE is unset (envconfig.KeepAlive).
_OLLAMA_DEFAULT_KEEP_ALIVE = "5m"
_LOAD_DURATION = re.compile(rb'"load_duration":\s*(\d+)')


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


@dataclass(slots=True)
class _Pin:
    endpoint: str
    model: str
    options: dict[str, object] = field(default_factory=dict)


class Worker:
    """Runs queued jobs in the policy's order, serving loaded models before paying for a swap."""

    def __init__(
        self,
        *,
        store: AsyncStore,
        upstream: Upstream,
        events: JobEvents,
        retry: RetryPolicy,
        pin_keep_alive: object,
        release_keep_alive: object | None,
        metrics: Metrics,
        policy: Policy | None = None,
        parallel: int = 1,
        warmer: Warmer | None = None,
        feed: QueueFeed | None = None,
        embeds: EmbedBatcher | None = None,
        clock: Callable[[], float] = time.time,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self._store = store
        self._embeds = embeds
        self._metrics = metrics
        self._upstream = upstream
        self._events = events
        self._retry = retry
        self._pin_keep_alive = pin_keep_alive
        self._release_keep_alive = release_keep_alive  # None: Ollama's own default, as learned
        self._server_keep_alive: object | None = None  # Ollama's default, read off a model foreman loaded
        self._policy = policy or Policy()
        self._parallel = parallel
        self._warmer = warmer
        self._feed = feed if feed is not None else QueueFeed()
        self._clock = clock
        self._sleep = sleep
        self._work = asyncio.Event()
        self._arrived = asyncio.Event()  # a job was queued: a load for batch work may be given up
        self._arrived_for: set[str] = set()  # model keys of the jobs queued since the last look
        # Model keys Ollama holds; None means "read /api/ps before the next pick".
        self._resident: frozenset[str] | None = None
        # What the policy remembers between picks (its resident set is refreshed from _resident).
        self._state = State()
        self._picked_from = self._state  # the state the latest claim was decided in
        self._costs = CostBook()
        # /api/ps names models, not load options: remember which key we loaded each name as.
        self._loaded_as: dict[str, str] = {}
        # Models foreman has asked Ollama to hold beyond their own expiry. Each
        # stays here until a request that hands the model back was accepted,
        # so no pin outlives the work it was set for (see _release_pins).
        self._pins: dict[str, _Pin] = {}
        # How to load each model key foreman has loaded, to pin or unpin it later.
        self._known: dict[str, _Pin] = {}
        self._running: dict[str, _Running] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._crashed: list[BaseException] = []
        self._cancel_requested: set[str] = set()
        # What each running job has streamed so far, for late watchers and the store.
        self._output: dict[str, list[bytes]] = {}
        self._records: set[asyncio.Future[None]] = set()  # results on their way to the store
        self._upstream_down = False
        self._stopping = False
        self._idle_since: float | None = None  # when the queue last ran dry
        self._due: float | None = None  # when the next held job may run, if only held jobs wait
        self.swaps = 0
        self.last_error: tuple[float, str] | None = None  # (when, what)

    @property
    def running_jobs(self) -> list[str]:
        """The ids of the jobs in flight now, oldest first."""
        return sorted(self._running)

    @property
    def resident(self) -> frozenset[str]:
        """Model keys Ollama holds, as far as the worker knows (its own view while /api/ps is due)."""
        return self._resident if self._resident is not None else self._state.resident

    def output_so_far(self, job_id: str) -> list[bytes]:
        """The chunks a running job has streamed up to now."""
        return list(self._output.get(job_id, ()))

    def drain_order_now(self) -> Callable[[list[ModelQueue]], list[tuple[str, Priority]]]:
        """The order (model, class) queues will be served in if nothing else arrives, as things stand now.

        A pure function of a snapshot, so the store's thread can run it.
        """
        policy, state = self._policy, replace(self._state, resident=self.resident)
        now, costs = self._clock(), self._costs.costs()

        def order(queues: list[ModelQueue]) -> list[tuple[str, Priority]]:
            folded = fold(queues, state.resident)
            return folded.stored_order(drain_order(policy, folded.queues, state, now, costs))

        return order

    def wake(self, model_key: str) -> None:
        """New work for `model_key` is in the store."""
        self._work.set()
        self._arrived.set()
        self._arrived_for.add(model_key)

    def model_stats(self) -> list[ModelStats]:
        """Per model: residency, scheduling state and learned costs, for /status."""
        observed = self._costs.observed()
        state, resident = self._state, self.resident
        keys = set(observed) | resident | ({state.serving} if state.serving else set())
        stats = []
        for key in sorted(keys):
            seen = observed.get(key)
            stats.append(
                ModelStats(
                    model_key=key,
                    resident=key in resident,
                    serving=key == state.serving,
                    draining=state.drain is not None and state.drain.model_key == key,
                    pinned=key in self._pins,
                    loads=seen.loads if seen else 0,
                    mean_load_s=seen.mean_load_s if seen and seen.loads else None,
                    last_load_s=seen.last_load_s if seen and seen.loads else None,
                    runs=seen.runs if seen else 0,
                    mean_run_s=seen.mean_run_s if seen and seen.runs else None,
                )
            )
        return stats

    async def run(self) -> None:
        """Work until cancelled; each wake-up drains everything that waits."""
        try:
            with suppress(UpstreamUnreachable):
                await self._read_residency()
            self._work.set()  # jobs may be waiting from before a restart
            while True:
                await self._wait_for_work()
                self._work.clear()
                try:
                    await self._drain()
                except Exception:
                    # A bug or a broken disk must not stop the only worker: log it,
                    # pause, and look at the queue again.
                    log.exception("worker.error")
                    self._resident = None
                    self._work.set()
                    await self._sleep(self._retry.maximum)
        finally:
            # Stopping: jobs in flight go back to the queue (see _run).
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await asyncio.gather(*self._records, return_exceptions=True)
            # A pin must not outlive foreman: the jobs it was set for wait for the restart.
            with suppress(TimeoutError):
                async with asyncio.timeout(_RELEASE_TIMEOUT_S):
                    await self._release_pins("shutdown")
            if self._warmer is not None:
                await self._warmer.close()

    async def cancel(self, job_id: str) -> bool:
        """Drop a job that waits, or abort one that runs; False if it had already ended."""
        running = self._running.get(job_id)
        if running is not None:
            running.aborted = True
            running.task.cancel()
            return True
        # If the worker claims the job before the store sees this, the flag stops it.
        self._cancel_requested.add(job_id)
        if await self._store.run(Store.cancel_queued, job_id, self._clock()):
            self._cancel_requested.discard(job_id)
            ended = Ended(JobState.CANCELLED, 499, _error_body("request canceled"), error="request canceled")
            self._events.publish(job_id, ended)
            self._feed.job(job_id, JobState.CANCELLED, self._clock())
            job = await self._store.run(Store.get, job_id)
            model, endpoint = (job.model_key, job.endpoint) if job is not None else (None, None)
            log.info("job.cancelled", job_id=job_id, model=model, endpoint=endpoint, before="start")
            return True
        if job_id in self._running:
            return True  # claimed meanwhile: the flag cancels it before it reaches Ollama
        self._cancel_requested.discard(job_id)
        return False

    def stop(self) -> None:
        """Take no new jobs (foreman is shutting down)."""
        self._stopping = True
        self._work.set()

    async def wait_for_running(self, grace: float) -> None:
        """Give the jobs in flight up to `grace` seconds to finish.

        What is still running after that is cancelled when the worker's task
        is, and goes back to the queue without an attempt charged.
        """
        if not self._tasks:
            return
        log.info("worker.stopping", in_flight=len(self._tasks), grace_s=grace)
        _, pending = await asyncio.wait(set(self._tasks), timeout=grace)
        if pending:
            log.warning("worker.grace_over", requeued=len(pending), grace_s=grace)

    async def _drain(self) -> None:
        while not self._stopping:
            if self._crashed:
                raise self._crashed.pop()
            if len(self._tasks) >= self._parallel:
                await self._wait_for_a_slot()
                continue
            if self._idle_since is not None and time.monotonic() - self._idle_since > _IDLE_RECHECK_S:
                self._resident = None
            self._idle_since = None
            if self._resident is None:
                await self._await_residency()
            self._work.clear()  # from here on, a new job or a finished one wakes the loop again
            now = self._clock()
            state = replace(self._state, resident=self._resident or frozenset())
            upcoming: list[str | None] = []
            picked: list[_Picked] = []
            due: list[float] = []
            chooser = self._chooser(state, now, upcoming, picked, due)
            claim = await self._store.run(Store.claim_next, chooser, now)
            if claim is None:
                self._due = due[0] if due else None
                if not self._tasks:
                    # Idle: other clients and keep_alive expiry may change what
                    # Ollama holds before the next job comes. A pin left by a
                    # job that failed or was cancelled has no work left.
                    await self._release_pins("idle")
                    self._idle_since = time.monotonic()
                    return
                await self._wait_for_work()
                continue
            claim = await self._resolved(claim, picked[0])
            self._picked_from, self._state = state, state.after(claim.decision, now)
            task = asyncio.create_task(self._job(claim), name=f"foreman-job {claim.job.id}")
            self._tasks.add(task)
            task.add_done_callback(self._job_ended)
            following = upcoming[0] if upcoming else None
            if self._warmer is not None and following not in (None, claim.job.model_key):
                self._warmer.prepare(following)

    async def _wait_for_a_slot(self) -> None:
        """Wait until a job in flight ends; meanwhile, new work may change the model to warm."""
        if self._warmer is None:
            await asyncio.wait(self._tasks, return_when=asyncio.FIRST_COMPLETED)
            return
        self._work.clear()
        self._arrived_for.clear()
        arrived = asyncio.ensure_future(self._work.wait())
        try:
            done, _ = await asyncio.wait({*self._tasks, arrived}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            arrived.cancel()
        # More work for the model being served cannot change which model follows
        # it, so only work for another model is worth a look at the queues.
        if arrived in done and self._arrived_for - {self._state.serving}:
            state = replace(self._state, resident=self.resident)
            queues = fold(await self._store.run(Store.queues), state.resident).queues
            following = self._policy.upcoming(queues, state, self._clock(), self._costs.costs())
            if following is not None and following != state.serving:
                self._warmer.prepare(following)

    async def _wait_for_work(self) -> None:
        """Until something wakes the worker, or the time of the next held job comes."""
        if self._due is None:
            await self._work.wait()
            return
        with suppress(TimeoutError):
            await asyncio.wait_for(self._work.wait(), max(0.0, self._due - self._clock()))
        self._due = None

    def _chooser(
        self,
        state: State,
        now: float,
        upcoming: list[str | None],
        picked: list[_Picked],
        due: list[float],
    ) -> Callable[[list[ModelQueue]], Decision | None]:
        """The pick the store runs (on its own thread) against what waits.

        Alias jobs count with the model that would serve them now (see
        `foreman.aliases`). The policy's decision, which names that model, goes
        to `picked`; the store gets one that names the stored key to claim from.
        When nothing is free to run, `due` gets the time the next held job may.
        """
        busy = bool(self._tasks)
        costs = self._costs.costs()
        policy = self._policy
        want_upcoming = self._warmer is not None

        def choose(queues: list[ModelQueue]) -> Decision | None:
            folded = fold(queues, state.resident)
            decision = policy.pick(folded.queues, state, now, costs)
            if decision is None:
                if (when := next_due(queues, now)) is not None:
                    due.append(when)
                return None
            if busy and (decision.swap or decision.model_key != state.serving):
                # Never two models at once: this one waits until the jobs in flight end.
                return None
            if want_upcoming:
                # The model after this one: the one this claim serves counts as loaded.
                upcoming.append(policy.upcoming(folded.queues, state.after(decision, now), now, costs))
            source = folded.source(decision.model_key, decision.priority, decision.job_id)
            why = folded.resolved[source][1] if is_alias_key(source) else None
            picked.append(_Picked(decision, folded.waiting(decision.model_key) - 1, why))
            return replace(decision, model_key=source)

        return choose

    async def _resolved(self, claim: Claim, picked: _Picked) -> Claim:
        """The claim as the worker runs it: an alias job becomes a job for the model picked for it."""
        job, decision = claim.job, picked.decision
        if is_alias_key(job.model_key):
            name = key_model_name(decision.model_key)
            body = json.loads(job.body)
            body["model"] = name  # Ollama names the model that served it in the reply
            routing = json.loads(job.routing) if job.routing else {"alias": alias_of(job.model_key)}
            log.info(
                "job.routed",
                job_id=job.id,
                alias=routing.get("alias"),
                route=routing.get("route"),
                rule=routing.get("rule"),
                model=decision.model_key,
                why=(picked.why or Why.PREFERRED).value,
            )
            await self._store.run(Store.set_served, job.id, name)
            job = replace(
                job,
                model=name,
                model_key=decision.model_key,
                body=json.dumps(body, separators=(",", ":")).encode(),
                served_model=name,
            )
        return Claim(job, decision, picked.waiting_after)

    async def _waiting_by_model(self) -> dict[str, int]:
        """Queued jobs per model key, alias jobs counted with the model that would serve them now."""
        return waiting_for(await self._store.run(Store.waiting_by_model), self.resident)

    async def _job(self, claim: Claim, batch: Batch | None = None) -> None:
        try:
            failure = await self._run(claim, batch)
        finally:
            if batch is not None:
                batch.leave(claim.job.id)  # a member that ended without the call must not hold it up
        if failure is not None:
            await self._put_back(claim.job, failure)

    async def _lead(self, claim: Claim, request: EmbedRequest, waiting: int) -> Batch:
        """Gather the batch `claim`'s job leads, and start its companions.

        The companions are taken from the store in one step that runs to its
        end even if the leader is cancelled meanwhile: once taken, they run,
        and the leader leaves the batch instead of holding them up.
        """
        assert self._embeds is not None
        job = claim.job
        gathering = asyncio.ensure_future(self._gather(claim, request, waiting))
        try:
            return await asyncio.shield(gathering)
        except asyncio.CancelledError:
            gathering.add_done_callback(
                lambda task: None if task.cancelled() or task.exception() else task.result().leave(job.id)
            )
            raise

    async def _gather(self, claim: Claim, request: EmbedRequest, waiting: int) -> Batch:
        assert self._embeds is not None
        job = claim.job
        batch = await self._embeds.gather(job, request, self._clock())
        batch.keep_alive = self._batch_keep_alive(job, request, max(waiting - len(batch.companions), 0))
        if self._stopping:
            # foreman is stopping: the companions go back to their places, uncharged.
            for companion in batch.companions:
                await self._store.run(Store.requeue, companion, attempt=companion.attempt, error=None)
                batch.leave(companion.id)
            return batch
        self._start_companions(claim, batch)
        return batch

    def _start_companions(self, claim: Claim, batch: Batch) -> None:
        """Run the jobs gathered beside `claim`'s as jobs of their own, meeting in `batch`'s call."""
        decision = replace(claim.decision, swap=False)
        for job in batch.companions:
            companion = Claim(job, decision, claim.waiting_after)
            task = asyncio.create_task(self._job(companion, batch), name=f"foreman-job {job.id}")
            self._tasks.add(task)
            task.add_done_callback(self._job_ended)

    def _batch_keep_alive(self, job: Job, request: EmbedRequest, waiting_after: int) -> object | None:
        """The keep_alive of a batch's call: the pin while work waits, else the release (see _dispatch_body)."""
        key = job.model_key
        if waiting_after > 0:
            self._pins[key] = _Pin("/api/embed", job.model, key_load_options(key))
            return self._pin_keep_alive
        if self._pins.pop(key, None) is not None:
            return request.keep_alive if request.keep_alive is not None else self._release_keep_alive
        return request.keep_alive

    def _job_ended(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        error = None if task.cancelled() else task.exception()
        if error is not None:
            self._crashed.append(error)
        self._work.set()

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

    async def _run(self, claim: Claim, batch: Batch | None = None) -> Exception | None:
        """Run one claimed job; returns the transient failure to back off from, if any."""
        job = claim.job
        if job.id in self._cancel_requested:
            self._cancel_requested.discard(job.id)
            await self._end(job, JobState.CANCELLED, 499, _error_body("request canceled"))
            log.info(
                "job.cancelled", job_id=job.id, model=job.model_key, endpoint=job.endpoint, before="start"
            )
            return None
        self._publish(job, StateChanged(job.state, job.attempt, model=job.model))
        task = asyncio.create_task(self._execute(claim, batch))
        self._running[job.id] = running = _Running(job.id, job.model_key, task)
        try:
            return await task
        except asyncio.CancelledError:
            if running.aborted:
                await self._end(job, JobState.CANCELLED, 499, _error_body("request canceled"))
                log.info(
                    "job.cancelled", job_id=job.id, model=job.model_key, endpoint=job.endpoint, before="end"
                )
                return None
            # foreman is stopping: the job keeps its place and runs after the restart.
            await asyncio.shield(self._store.run(Store.requeue, job, attempt=job.attempt, error=None))
            self._output.pop(job.id, None)
            log.info("job.requeued", job_id=job.id, reason="shutdown")
            raise
        finally:
            del self._running[job.id]

    async def _execute(self, claim: Claim, batch: Batch | None = None) -> Exception | None:
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
                await self._store.run(Store.set_state, job.id, JobState.WORKING)
                self._publish(job, StateChanged(JobState.WORKING, job.attempt))
                # A load can take a minute; more work may have come for this model meanwhile.
                waiting = (await self._waiting_by_model()).get(job.model_key, 0)
            request = self._embeds.takes(job) if self._embeds is not None and batch is None else None
            if request is not None:
                # The leader of a batch: the queued jobs that may share its call come along.
                batch = await self._lead(claim, request, waiting)
                waiting = max(waiting - len(batch.companions), 0)
            bound.info("job.start", wait_s=wait_s, waiting_for_model=waiting)
            started = time.monotonic()
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
                self._resident = None  # the load failed: what Ollama holds now is for /api/ps to say
            return exc
        self._note_upstream_ok()
        if not claim.decision.swap and load_ns > _RELOAD_HINT_NS:
            self._resident = None
        run_s = time.monotonic() - started
        # A job that shared a call costs its share of it.
        self._costs.record_run(job.model_key, run_s / (batch.size if batch is not None else 1))
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

    async def _call(self, job: Job, waiting_after: int) -> tuple[_Result, int]:
        """Send the job to Ollama; stream chunks to its waiters as they arrive."""
        body, keep_alive, releases = self._dispatch_body(job, waiting_after)
        if keep_alive is not None:
            # The endpoint takes no keep_alive (Ollama's /v1): a load request sets it first.
            await self._upstream.load(job.endpoint, job.model, key_load_options(job.model_key), keep_alive)
            self._unpinned(job.model_key, releases)
        async with self._upstream.post(job.endpoint, body) as reply:
            # Accepted: Ollama has applied the request's keep_alive to the model.
            self._unpinned(job.model_key, releases)
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

    def _dispatch_body(self, job: Job, waiting_after: int) -> tuple[bytes, object | None, _Pin | None]:
        """The job's body with the keep_alive that pins or releases its model.

        Where the endpoint takes no keep_alive (Ollama's /v1), the keep_alive
        comes back beside the body instead, for a load request to set first.
        The third value is the pin the request releases: it is forgotten once
        Ollama has accepted the request, and released later if not.
        """
        if not job.respond_async and waiting_after == 0 and job.model_key not in self._pins:
            return job.body, None, None  # nothing to pin, release or ask for: send it as it came
        dialect = dialect_for(job.endpoint)
        body = json.loads(job.body)
        if _is_unload(job.endpoint, body):
            return (
                job.body,
                None,
                self._pins.get(job.model_key),
            )  # the client asked Ollama to unload: do exactly that
        changed = False
        if job.respond_async and not job.stream and job.endpoint in STREAMED_ENDPOINTS:
            # Nobody holds a connection for the reply: stream it anyway, so the
            # job's events show its output as it is made.
            dialect.ask_stream(body)
            changed = True
        key = job.model_key
        keep_alive: object | None = None
        releases = None
        if waiting_after > 0:
            if dialect.carries_keep_alive:
                body["keep_alive"] = self._pin_keep_alive
                changed = True
            elif key not in self._pins:
                keep_alive = self._pin_keep_alive  # once: the requests that follow leave it alone
            # Recorded before the request goes, so that whatever becomes of it the pin is known.
            self._pins[key] = self._known[key] = _Pin(job.endpoint, job.model, key_load_options(key))
        elif (releases := self._pins.get(key)) is not None:
            # The last job of this drain hands Ollama back its own expiry.
            if dialect.carries_keep_alive:
                body.setdefault("keep_alive", self._release_value())
                changed = True
            else:
                keep_alive = self._release_value()
        body_bytes = json.dumps(body, separators=(",", ":")).encode() if changed else job.body
        return body_bytes, keep_alive, releases

    def _unpinned(self, key: str, released: _Pin | None) -> None:
        """A request that hands `key` back was accepted: forget the pin, unless a later job pinned it anew."""
        if released is not None and self._pins.get(key) is released:
            del self._pins[key]

    def _release_value(self) -> object:
        """The keep_alive a released model gets: FOREMAN_RELEASE_KEEP_ALIVE, else Ollama's own default."""
        if self._release_keep_alive is not None:
            return self._release_keep_alive
        if self._server_keep_alive is not None:
            return self._server_keep_alive
        return _OLLAMA_DEFAULT_KEEP_ALIVE  # not learned yet: what Ollama uses when OLLAMA_KEEP_ALIVE is unset

    async def _release_pins(self, reason: str) -> None:
        """Hand every model foreman still pins back to Ollama's expiry (idle, or shutting down).

        A release is a load request, so only models Ollama still holds get
        one: the others have no pin left to release, and would be loaded.
        """
        if not self._pins:
            return
        try:
            await self._read_residency()
        except UpstreamUnreachable:
            self._pins.clear()  # an Ollama that comes back has nothing loaded
            return
        resident = self._resident or frozenset()
        for key, pin in sorted(self._pins.items()):
            del self._pins[key]
            if key not in resident:
                continue
            keep_alive = self._release_value()
            try:
                await self._upstream.load(pin.endpoint, pin.model, pin.options, keep_alive)
            except (UpstreamUnreachable, UpstreamFailed, UpstreamRejected) as exc:
                log.warning("model.unpin_failed", model=key, reason=reason, error=exc.message)
                continue
            log.info("model.unpinned", model=key, keep_alive=keep_alive, reason=reason)

    async def _swap(self, claim: Claim) -> bool:
        """Load the claimed job's model (with the release keep_alive), and log why and what the swap cost.

        Returns False when the load was given up for an interactive job that
        arrived meanwhile (`Policy.abandons`); the job is back in the queue,
        in its place and without an attempt charged.
        """
        job = claim.job
        decision = claim.decision
        key = job.model_key
        leaving = sorted(self._resident or ())
        waiting_now = await self._waiting_by_model()
        waiting_leaving = {k: waiting_now.get(k, 0) for k in leaving}
        await self._make_room(keep=key, evict=decision.evict)
        options = key_load_options(key)
        expected = self._costs.costs().load_s.get(key)
        started = time.monotonic()
        # The load sets the model's expiry as it will be after the drain: the
        # jobs pin it while work waits. So a load that is given up or whose job
        # fails leaves no pin behind. Until foreman knows Ollama's default, it
        # lets Ollama apply it, and reads it off the loaded model.
        learning = self._release_keep_alive is None and self._server_keep_alive is None
        keep_alive = None if learning else self._release_value()
        if keep_alive in (0, "0", "0s"):
            keep_alive = self._pin_keep_alive  # expiring at once would unload it before its job
            self._pins[key] = self._known[key] = _Pin(job.endpoint, job.model, options)
        load = self._upstream.load(job.endpoint, job.model, options, keep_alive)
        if not self._policy.may_abandon(decision):
            await load
        elif await self._abandoned(asyncio.create_task(load), decision):
            await self._store.run(Store.requeue, job, attempt=job.attempt, error=None)
            self._publish(job, StateChanged(JobState.QUEUED, job.attempt))
            self._state, self._resident = self._picked_from.gave_up(decision), None
            log.info(
                "model.load_abandoned",
                model=key,
                reason=Reason.PRIORITY.value,
                after_s=round(time.monotonic() - started, 3),
                job_id=job.id,
            )
            self._work.set()
            return False
        load_s = time.monotonic() - started
        if learning:
            await self._learn_server_keep_alive(key)
        self._costs.record_load(key, load_s)
        self._state = self._state.loaded(key, self._clock())
        self._known[key] = _Pin(job.endpoint, job.model, options)
        self._loaded_as[key_model_name(key)] = key
        self._resident = None  # read /api/ps again before the next pick
        self._work.set()  # with FOREMAN_PARALLEL > 1, more jobs for this model may start now
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

    async def _learn_server_keep_alive(self, key: str) -> None:
        """Read Ollama's default keep_alive off a model it has just loaded without one."""
        try:
            left = await self._upstream.expires_in(key_model_name(key))
        except (UpstreamUnreachable, UpstreamFailed, UpstreamRejected):
            return  # next time
        # Not listed: Ollama unloaded it as soon as the load ended (OLLAMA_KEEP_ALIVE=0).
        # Otherwise the time left falls short of the default by the moments since
        # Ollama set it: rounding up gives back a default of whole seconds.
        learned: object = 0 if left is None else -1 if math.isinf(left) else max(math.ceil(left), 0)
        self._server_keep_alive = learned
        log.info("ollama.keep_alive", default=learned, model=key)

    async def _abandoned(self, load: asyncio.Task[None], decision: Decision) -> bool:
        """Wait for `load`; True if it was cancelled because the policy gives it up.

        Cancelling the request makes Ollama abort the load, as it does for
        any client that leaves while its model loads.
        """
        try:
            while True:
                self._arrived.clear()
                arrived = asyncio.ensure_future(self._arrived.wait())
                try:
                    done, _ = await asyncio.wait({load, arrived}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    arrived.cancel()
                if load in done:
                    await load  # raises what the load raised
                    return False
                queues = fold(await self._store.run(Store.queues), self._picked_from.resident).queues
                now = self._clock()
                if self._policy.abandons(decision, queues, self._picked_from, now, self._costs.costs()):
                    return True
        finally:
            if not load.done():
                load.cancel()
                with suppress(asyncio.CancelledError):
                    await load

    async def _make_room(self, keep: str, evict: str | None) -> None:
        """Before a load: leave only the policy's victim and idle models without a pin.

        Ollama makes room by evicting an idle model with the shortest
        keep_alive. A released pin (FOREMAN_RELEASE_KEEP_ALIVE) is shorter than
        a pin, so foreman unpins models with no work left and the victim (the
        loaded model with the least waiting work), and pins again any other
        loaded model that still has work but whose last drain had released it.
        """
        waiting_now = await self._waiting_by_model()
        for key in sorted((self._resident or frozenset()) | set(self._pins)):
            if key == keep:
                continue
            pinned = key in self._pins
            waiting = waiting_now.get(key, 0)
            if pinned and (key not in (self._resident or ())):
                del self._pins[key]  # gone already; a release would load it again
                continue
            if pinned and (key == evict or waiting == 0):
                pin = self._pins.pop(key)
                keep_alive = self._release_value()
                event, why = "model.unpinned", "make_room" if key == evict else "idle"
            elif not pinned and key != evict and waiting > 0 and key in self._known:
                pin = self._pins[key] = self._known[key]
                keep_alive = self._pin_keep_alive
                event, why = "model.pinned", "make_room"
            else:
                continue
            await self._upstream.load(pin.endpoint, pin.model, pin.options, keep_alive)
            log.info(event, model=key, keep_alive=keep_alive, reason=why)

    async def _put_back(self, job: Job, failure: Exception) -> None:
        """Requeue (or finally fail) a job after a transient failure.

        A failure of the job's own (Ollama's 5xx, a stream broken before any
        output went out) holds back only that job: it goes back with a
        not-before time, keeps its place, and the worker serves other work
        meanwhile. Only an unreachable Ollama holds the whole queue: the
        worker waits out the backoff before it goes on.
        """
        attempt = job.attempt + 1
        bound = log.bind(model=job.model_key, job_id=job.id, endpoint=job.endpoint, attempt=attempt)
        unreachable = isinstance(failure, UpstreamUnreachable)
        if isinstance(failure, UpstreamUnreachable):
            self._note_outage(failure)
            self._resident = None  # Ollama may come back with nothing loaded
        message = getattr(failure, "message", str(failure))
        self._metrics.upstream_error("unreachable" if unreachable else "failed")
        self.last_error = (self._clock(), message)
        delay = self._retry.delay(attempt)
        if attempt >= self._retry.max_attempts:
            if isinstance(failure, UpstreamFailed) and failure.body:
                status, body = failure.status, failure.body
            else:
                status, body = 502, _error_body(f"{message} (gave up after {attempt} attempts)")
            await self._end(job, JobState.FAILED, status, body, error=message, attempt=attempt)
            bound.warning("job.failed", status=status, error=message)
        else:
            if is_memory_error(message):
                await self._free_memory(keep=job.model_key)
            not_before = None if unreachable else self._clock() + delay
            await self._store.run(Store.requeue, job, attempt=attempt, error=message, not_before=not_before)
            self._output.pop(job.id, None)
            self._publish(job, StateChanged(JobState.QUEUED, attempt))
            self._metrics.retried()
            bound.info("job.retry", error=message, retry_in_s=round(delay, 3), holds_queue=unreachable)
        if unreachable:
            await self._sleep(delay)

    async def _free_memory(self, keep: str) -> None:
        """Ollama ran out of memory for `keep`: unload every other model foreman loaded that has no job running.

        Ollama frees memory only by evicting idle models, and a model pinned
        by foreman, or released with a long keep_alive, may stay; unloading
        them (keep_alive 0) gives the retry room.
        """
        try:
            names = await self._upstream.resident_models()
        except (UpstreamUnreachable, UpstreamFailed, UpstreamRejected) as exc:
            log.warning("model.unpin_failed", reason="memory", error=exc.message)
            return
        held = {self._loaded_as.get(name, name) for name in names} | set(self._pins)
        busy = {running.model_key for running in self._running.values()}
        for key in sorted(held - busy - {keep}):
            pin = self._pins.pop(key, None) or self._known.get(key)
            if pin is None:
                continue  # loaded by another program: not foreman's to unload
            try:
                await self._upstream.load(pin.endpoint, pin.model, pin.options, 0)
            except (UpstreamUnreachable, UpstreamFailed, UpstreamRejected) as exc:
                log.warning("model.unpin_failed", model=key, reason="memory", error=exc.message)
                continue
            log.info("model.unpinned", model=key, keep_alive=0, reason="memory", for_model=keep)
        self._resident = None

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
        record is already on its way to the store's thread, so any later store
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
            self._store.run(
                Store.finish,
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
            self._server_keep_alive = None  # a restarted Ollama may have another default
            log.info("upstream.back", url=self._upstream.base_url)


@dataclass(frozen=True, slots=True)
class _Picked:
    """The policy's decision for a claim, before the store saw it."""

    decision: Decision  # names the model that serves the job, also for an alias job
    waiting_after: int  # jobs still waiting for that model, its aliases' included
    why: Why | None  # for an alias job: why that model


@dataclass(frozen=True, slots=True)
class _Result:
    body: bytes  # what a waiting client still needs: the whole reply, or b"" after a stream
    content_type: str
    result: bytes  # what the store keeps: the reply, or the stream merged as `stream: false` would give it


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
