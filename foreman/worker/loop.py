"""The one worker: takes jobs in the order `scheduler.Policy` decides and hands each to the job runner.

Up to `parallel` jobs run at once, all for the model Ollama already holds;
a job for any other model waits until they are done, so Ollama never serves
two models for foreman at the same time. The worker is the loop, its
wake-ups, cancellation and stopping; the policy's memory is the
`PolicyDriver`'s, what Ollama holds the `Residency`'s, and the run of one job
the `JobRunner`'s.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Coroutine, Mapping
from contextlib import suppress
from dataclasses import dataclass, replace
from typing import Any, Protocol

import structlog

from foreman.errors import UpstreamUnreachable
from foreman.job import Job, ModelStats, Priority
from foreman.ollama.names import key_model_name
from foreman.queue.lifecycle import Lifecycle
from foreman.retry import RetryPolicy, Sleep
from foreman.routing.aliases import Why, alias_of, fold, is_alias_key
from foreman.scheduling.driver import Choice, PolicyDriver
from foreman.scheduling.policy import Decision, ModelQueue, next_due
from foreman.storage import Chooser, Claim, Storage
from foreman.worker.residency import Residency
from foreman.worker.wakeups import WakeUps
from foreman.worker.warm import Warmer

log = structlog.get_logger("foreman.worker")

# After the queue ran dry for longer than this, /api/ps is read again before
# the next job: other programs or keep_alive expiry may have changed what
# Ollama holds. A shorter gap (a client sending requests one after another)
# is not worth an extra round trip per request.
_IDLE_RECHECK_S = 2.0
# On SIGTERM, the pins foreman set are released within this many seconds.
_RELEASE_TIMEOUT_S = 5.0


class Runner(Protocol):
    """What the worker needs of whoever runs its claims (`runner.JobRunner`)."""

    @property
    def swaps(self) -> int: ...
    @property
    def loading(self) -> Mapping[str, int]:
        """Model key → loads under way for claimed jobs: as good as resident for drain orders."""
        ...

    async def run(self, claim: Claim, start: Callable[[Coroutine[Any, Any, object], Job], None]) -> None: ...
    async def run_here(
        self, claim: Claim, start: Callable[[Coroutine[Any, Any, object], Job], None]
    ) -> bool: ...
    def interrupt(self, job_id: str) -> None: ...
    def stop(self) -> None: ...
    def is_running(self, job_id: str) -> bool: ...
    def running_jobs(self) -> list[str]: ...
    def abort(self, job_id: str) -> bool: ...


class Worker:
    """Claims queued jobs in the policy's order, serving loaded models before paying for a swap."""

    def __init__(
        self,
        *,
        store: Storage,
        lifecycle: Lifecycle,
        driver: PolicyDriver,
        residency: Residency,
        runner: Runner,
        retry: RetryPolicy,
        wakeups: WakeUps,
        parallel: int = 1,
        warmer: Warmer | None = None,
        clock: Callable[[], float],
        monotonic: Callable[[], float],
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self._store = store
        self._lifecycle = lifecycle
        self._driver = driver
        self._residency = residency
        self._runner = runner
        self._retry = retry
        self._parallel = parallel
        self._warmer = warmer
        self._clock = clock
        self._monotonic = monotonic
        self._sleep = sleep
        self._wakeups = wakeups
        self._work = wakeups.work
        # The jobs in flight: the worker's tasks, and a slot for each job that runs on its handler's task.
        self._tasks: set[asyncio.Future[Any]] = set()
        self._here: dict[str, asyncio.Future[None]] = {}  # job id -> slot, for the jobs run on their handlers
        self._crashed: list[BaseException] = []
        self._stopping = False
        self._idle_since: float | None = None  # when the queue last ran dry
        self._due: float | None = None  # when the next held job may run, if only held jobs wait

    @property
    def running_jobs(self) -> list[str]:
        """The ids of the jobs in flight now, oldest first."""
        return self._runner.running_jobs()

    @property
    def held_jobs(self) -> list[str]:
        """The jobs this node still holds: in flight, or ended with the end not yet written (the database away).

        Their leases must last: taken for dead, such a job would run a second time.
        """
        return sorted({*self._runner.running_jobs(), *self._lifecycle.recording})

    @property
    def resident(self) -> frozenset[str]:
        """Model keys Ollama holds, as far as the worker knows (its own view while /api/ps is due)."""
        read = self._residency.as_read()
        return read if read is not None else self._driver.state.resident

    @property
    def swaps(self) -> int:
        return self._runner.swaps

    @property
    def last_error(self) -> tuple[float, str] | None:
        return self._lifecycle.last_error

    def drain_order_now(self) -> Callable[[list[ModelQueue]], list[tuple[str, Priority]]]:
        """The order (model, class) queues will be served in if nothing else arrives, as things stand now.

        A pure function of a snapshot, so the store can run it wherever it runs (another thread, for some backends).
        """
        resident = self.resident
        loading = self._runner.loading.keys()
        if loading:
            # /api/ps lists a model only once it has loaded, and still lists the one the load
            # evicts: the worker's own view says which goes, and the loading one runs next.
            resident = (resident & self._driver.state.resident) | loading
        choice = self._driver.frozen(resident, self._clock())

        def order(queues: list[ModelQueue]) -> list[tuple[str, Priority]]:
            folded = fold(queues, choice.state.resident)
            return folded.stored_order(choice.drain_order(folded.queues))

        return order

    def wake(self, model_key: str) -> None:
        """New work for `model_key` is in the store."""
        self._wakeups.job_queued(model_key)

    def model_stats(self) -> list[ModelStats]:
        """Per model: residency, scheduling state and learned costs, for /status."""
        return self._driver.stats(self.resident, self._residency.pinned_models())

    async def run(self) -> None:
        """Work until cancelled; each wake-up drains everything that waits."""
        try:
            with suppress(UpstreamUnreachable):
                await self._residency.read()
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
                    self._residency.recheck()
                    self._work.set()
                    await self._sleep(self._retry.maximum)
        finally:
            # Stopping: jobs in flight go back to the queue (see JobRunner.run).
            self._interrupt_here()
            for task in self._tasks:
                if task not in self._here.values():
                    task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await self._lifecycle.recorded()
            # A pin must not outlive foreman: the jobs it was set for wait for the restart.
            with suppress(TimeoutError):
                async with asyncio.timeout(_RELEASE_TIMEOUT_S):
                    await self._residency.release_pins("shutdown")
            if self._warmer is not None:
                await self._warmer.close()

    async def cancel(self, job_id: str) -> bool:
        """Drop a job that waits, or abort one that runs; False if it had already ended."""
        if self._runner.abort(job_id):
            return True  # its run ends it (Lifecycle.cancelled)
        if await self._lifecycle.cancel_waiting(job_id, claimed=self._claimed):
            return True
        # Another node sharing the queue may run it.
        return await self._lifecycle.cancel_elsewhere(job_id)

    def _claimed(self, job_id: str) -> bool:
        """Whether the job is taken to run here: running, or claimed at intake and about to start."""
        return self._runner.is_running(job_id) or job_id in self._here

    def stop(self) -> None:
        """Take no new jobs (foreman is shutting down)."""
        self._stopping = True
        self._runner.stop()
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
            # A job run on its handler's task goes back now, so its client hears why before the server closes.
            self._interrupt_here()

    def run_now(self) -> Chooser | None:
        """The pick that lets intake claim a job as it writes it, or None when the worker cannot take one now.

        The job then runs on its handler's task (`run_here`): no wake-up, no
        hand-off. That takes a free slot, nothing else waiting (the store's
        to tell, see `Storage.submit`) and the policy picking the job without
        a swap: the policy judges, as for any claim, on the loop.
        """
        if self._stopping or self._crashed or len(self._tasks) >= self._parallel or self._residency.due:
            return None
        if self._idle_since is not None and self._monotonic() - self._idle_since > _IDLE_RECHECK_S:
            return None  # what Ollama holds is worth a look first: the worker's way reads /api/ps
        now = self._clock()
        choice = self._driver.choice(self._residency.models, now)

        def choose(queues: list[ModelQueue]) -> Decision | None:
            # Asked later in the same turn (a group commit): the slots may be taken by then.
            if self._stopping or len(self._tasks) >= self._parallel:
                return None
            decision = choice.pick(queues)
            if decision is None or decision.swap or is_alias_key(decision.model_key):
                return None
            if self._tasks and decision.model_key != self._driver.state.serving:
                return None  # never two models at once
            self._driver.claimed(decision, now)
            self._idle_since = None
            slot: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._tasks.add(slot)
            self._here[queues[0].oldest_id] = slot
            return decision

        return choose

    def unclaimed(self, job_id: str) -> None:
        """A job `run_now` picked was not written claimed after all (the write failed): free its slot."""
        slot = self._here.pop(job_id, None)
        if slot is not None:
            self._tasks.discard(slot)
            slot.cancel()

    async def run_here(self, claim: Claim) -> None:
        """Run a job claimed at intake on the caller's task, as one of the jobs in flight."""
        job = claim.job
        slot = self._here[job.id]
        ended = False
        # Every line logged while the job runs names it (bound by hand: the context manager costs more).
        bound = structlog.contextvars.bind_contextvars(job_id=job.id, model=job.model_key)
        try:
            ended = await self._runner.run_here(claim, self._start)
        finally:
            structlog.contextvars.reset_contextvars(**bound)
            del self._here[job.id]
            self._tasks.discard(slot)
            slot.set_result(None)  # a worker waiting for a slot looks again
            if not ended or self._stopping or self._residency.pinned_models():
                self._work.set()  # put back, or pins to hand back: the worker's to see to
            elif not self._tasks:
                self._idle_since = self._monotonic()

    def _interrupt_here(self) -> None:
        for job_id in list(self._here):
            self._runner.interrupt(job_id)

    async def _drain(self) -> None:
        while not self._stopping:
            if self._crashed:
                raise self._crashed.pop()
            if len(self._tasks) >= self._parallel:
                await self._wait_for_a_slot()
                continue
            if self._idle_since is not None and self._monotonic() - self._idle_since > _IDLE_RECHECK_S:
                self._residency.recheck()
            self._idle_since = None
            if self._residency.due:
                await self._residency.read_until_answered(self._retry, self._sleep)
            self._work.clear()  # from here on, a new job or a finished one wakes the loop again
            now = self._clock()
            choice = self._driver.choice(self._residency.models, now)
            upcoming: list[str | None] = []
            picked: list[_Picked] = []
            due: list[float] = []
            claim = await self._store.claim(self._chooser(choice, upcoming, picked, due), now)
            if claim is None:
                self._due = due[0] if due else None
                if not self._tasks:
                    # Idle: other clients and keep_alive expiry may change what
                    # Ollama holds before the next job comes. A pin left by a
                    # job that failed or was cancelled has no work left.
                    await self._residency.release_pins("idle")
                    self._idle_since = self._monotonic()
                    return
                await self._wait_for_work()
                continue
            claim = await self._resolved(claim, picked[0])
            self._driver.claimed(claim.decision, now)
            job = claim.job
            self._start(self._runner.run(claim, self._start), job)
            following = upcoming[-1] if upcoming else None  # a backend may ask the chooser twice
            if self._warmer is not None and following not in (None, job.model_key):
                with structlog.contextvars.bound_contextvars(job_id=job.id, model=job.model_key):
                    self._warmer.prepare(following)

    def _start(self, run: Coroutine[Any, Any, object], job: Job) -> None:
        """Run `job` as one of those in flight (a claim, or a job taken to share a claim's call)."""
        # Every line logged while the job runs, here or in the store, upstream or warmer, names it.
        with structlog.contextvars.bound_contextvars(job_id=job.id, model=job.model_key):
            task = asyncio.create_task(run, name=f"foreman-job {job.id}")
        self._tasks.add(task)
        task.add_done_callback(self._job_ended)

    async def _wait_for_work(self) -> None:
        """Until something wakes the worker, or the time of the next held job comes."""
        if self._due is None:
            await self._work.wait()
            return
        with suppress(TimeoutError):
            await asyncio.wait_for(self._work.wait(), max(0.0, self._due - self._clock()))
        self._due = None

    async def _wait_for_a_slot(self) -> None:
        """Wait until a job in flight ends; meanwhile, new work may change the model to warm."""
        if self._warmer is None:
            await asyncio.wait(self._tasks, return_when=asyncio.FIRST_COMPLETED)
            return
        self._work.clear()
        self._wakeups.arrived_for.clear()
        arrived = asyncio.ensure_future(self._work.wait())
        try:
            done, _ = await asyncio.wait({*self._tasks, arrived}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            arrived.cancel()
        # More work for the model being served cannot change which model follows
        # it, so only work for another model is worth a look at the queues.
        serving = self._driver.state.serving
        if arrived in done and self._wakeups.arrived_for - {serving}:
            resident = self.resident
            queues = fold(await self._store.queues(), resident).queues
            following = self._driver.upcoming(queues, resident, self._clock())
            if following is not None and following != serving:
                self._warmer.prepare(following)

    def _chooser(
        self, choice: Choice, upcoming: list[str | None], picked: list[_Picked], due: list[float]
    ) -> Callable[[list[ModelQueue]], Decision | None]:
        """The pick the store runs against what waits, inside its claim (on another thread, for some backends).

        Alias jobs count with the model that would serve them now (see
        `foreman.routing.aliases`). The policy's decision, which names that model, goes
        to `picked`; the store gets one that names the stored key to claim from.
        When nothing is free to run, `due` gets the time the next held job may.
        """
        want_upcoming = self._warmer is not None

        def choose(queues: list[ModelQueue]) -> Decision | None:
            # Read now, not when the claim was asked for: intake may have claimed a job in between.
            busy, serving = bool(self._tasks), self._driver.state.serving
            if len(self._tasks) >= self._parallel:
                return None
            folded = fold(queues, choice.state.resident)
            decision = choice.pick(folded.queues)
            if decision is None:
                if (when := next_due(queues, choice.now)) is not None:
                    due.append(when)
                return None
            if busy and (decision.swap or decision.model_key != serving):
                # Never two models at once: this one waits until the jobs in flight end.
                return None
            if want_upcoming:
                # The model after this one: the one this claim serves counts as loaded.
                upcoming.append(choice.upcoming_after(folded.queues, decision))
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
            await self._store.set_served(job.id, name)
            job = replace(
                job,
                model=name,
                model_key=decision.model_key,
                body=json.dumps(body, separators=(",", ":")).encode(),
                served_model=name,
            )
        return Claim(job, decision, picked.waiting_after)

    def _job_ended(self, task: asyncio.Future[Any]) -> None:
        self._tasks.discard(task)
        error = None if task.cancelled() else task.exception()
        if error is not None:
            self._crashed.append(error)
        self._work.set()


@dataclass(frozen=True, slots=True)
class _Picked:
    """The policy's decision for a claim, before the store saw it."""

    decision: Decision  # names the model that serves the job, also for an alias job
    waiting_after: int  # jobs still waiting for that model, its aliases' included
    why: Why | None  # for an alias job: why that model
