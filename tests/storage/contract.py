"""The contract every `foreman.storage.Storage` keeps, as tests any backend can run.

A backend's test module subclasses `StorageContract` and provides the
`make_storage` fixture: an async factory of fresh, empty storages
(`await make_storage(max_queue=0)`), closed by the fixture afterwards
(the pattern of huey's `StorageTests`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import MISSING, fields, replace
from functools import partial
from typing import Any

import pytest
from ulid import ULID

from foreman.errors import QueueFull
from foreman.job import Job, JobState, NewJob, Priority
from foreman.scheduling.policy import Decision, ModelQueue, Policy, Reason, State, drain_order
from foreman.storage import (
    Accepted,
    CacheAnswer,
    CachedVector,
    CacheEntry,
    CacheStats,
    IdempotencyConflict,
    RecordedPin,
    Storage,
    Submission,
)
from foreman.storage.output import OUTPUT_LIMIT, pack

MakeStorage = Callable[..., Awaitable[Storage]]


def new_job(
    key: str,
    created: float = 0.0,
    priority: Priority = Priority.INTERACTIVE,
    *,
    idempotency_key: str | None = None,
    body: bytes = b"{}",
) -> NewJob:
    return NewJob(
        id=str(ULID()),
        endpoint="/api/chat",
        model=key,
        model_key=key,
        stream=False,
        body=body,
        created_at=created,
        priority=priority,
        respond_async=idempotency_key is not None,
        idempotency_key=idempotency_key,
    )


def resident(*keys: str) -> Callable[[list[ModelQueue]], Decision | None]:
    """The policy's choice with `keys` loaded."""
    return lambda queues: Policy().pick(queues, State(resident=frozenset(keys)), now=0)


def in_order(queues: list[ModelQueue]) -> list[tuple[str, Priority]]:
    """The drain order with nothing loaded."""
    return drain_order(Policy(), queues, State(), now=0)


class StorageContract:
    """What the worker, the endpoints, the job API, /status and retention rely on, whatever the backend."""

    @pytest.fixture
    async def storage(self, make_storage: MakeStorage) -> Storage:
        return await make_storage()

    async def submit(self, storage: Storage, *jobs: NewJob) -> None:
        for job in jobs:
            await storage.submit(Submission(job))

    async def test_a_submitted_job_reads_back_queued_with_its_request(self, storage: Storage) -> None:
        """A job reads back as it was submitted, queued, with no attempt yet."""
        job = new_job("a:latest", 5.0, body=b'{"model": "a"}')
        accepted = await storage.submit(Submission(job))
        assert (accepted.job_id, accepted.new, accepted.state) == (job.id, True, JobState.QUEUED)
        stored = await storage.get(job.id)
        assert stored is not None
        assert (stored.state, stored.body, stored.attempt, stored.created_at) == (
            JobState.QUEUED,
            b'{"model": "a"}',
            0,
            5.0,
        )
        assert (stored.model_key, stored.priority, stored.started_at, stored.result) == (
            "a:latest",
            Priority.INTERACTIVE,
            None,
            None,
        )
        assert await storage.get("01NOSUCHJOB") is None
        assert await storage.counts_by_state() == {"queued": 1}

    async def test_every_field_of_a_new_job_reads_back_as_written(self, storage: Storage) -> None:
        """Each field a submission carries (none left at its default) is in the job read back and claimed."""
        job = replace(
            new_job("@fast", 7.5, Priority.BATCH, idempotency_key="k1", body=b'{"x": 1}'),
            endpoint="/api/embed",
            model="fast",
            stream=True,
            routing='{"alias": "fast"}',
            cache="no-cache",
        )
        assert all(getattr(job, f.name) != f.default for f in fields(NewJob) if f.default is not MISSING)
        await storage.submit(Submission(job, "h1"))
        claim = await storage.claim(resident("@fast"), now=8)
        assert claim is not None
        stored = await storage.get(job.id)
        shared = [f.name for f in fields(NewJob) if f.name in {g.name for g in fields(Job)}]
        for read in (stored, claim.job):
            assert {name: getattr(read, name) for name in shared} == {
                name: getattr(job, name) for name in shared
            }

    async def test_a_claim_asked_for_after_submit_finds_the_job(self, storage: Storage) -> None:
        """submit's write is under way when it returns: a claim issued next, unawaited, sees the job."""
        job = new_job("a:latest")
        committed = storage.submit(Submission(job))
        claim = await storage.claim(resident("a:latest"), now=1.0)
        await committed
        assert claim is not None and claim.job.id == job.id

    async def test_claims_drain_the_resident_model_first(self, storage: Storage) -> None:
        """With A loaded, every A job is claimed before the older B job."""
        jobs = [new_job(k) for k in ("b:latest", "a:latest", "b:latest", "a:latest")]
        await self.submit(storage, *jobs)
        order = []
        loaded = {"a:latest"}
        while (claim := await storage.claim(resident(*loaded), now=1.0)) is not None:
            order.append((claim.job.id, claim.decision.reason))
            loaded = {claim.job.model_key}
            await storage.finish(claim.job, JobState.DONE, 2.0, status=200)
        assert [job_id for job_id, _ in order] == [jobs[1].id, jobs[3].id, jobs[0].id, jobs[2].id]
        assert [reason for _, reason in order] == [
            Reason.RESIDENT,
            Reason.RESIDENT,
            Reason.DRAINED,
            Reason.RESIDENT,
        ]

    async def test_a_claim_stamps_the_start_and_reports_what_still_waits(self, storage: Storage) -> None:
        """The worker learns how many jobs remain for the model it serves, to decide the pin."""
        await self.submit(storage, *(new_job("a:latest") for _ in range(3)))
        claim = await storage.claim(resident("a:latest"), now=7.0)
        assert claim is not None and claim.waiting_after == 2
        assert (claim.job.state, claim.job.started_at) == (JobState.WORKING, 7.0)
        assert await storage.waiting("a:latest") == 2
        assert await storage.waiting_by_model() == {"a:latest": 2}

    async def test_a_swap_claims_the_job_loading_until_marked_working(self, storage: Storage) -> None:
        """A job whose model must be loaded first goes through `loading`, then `working`."""
        await self.submit(storage, new_job("a:latest"))
        claim = await storage.claim(resident("b:latest"), now=0)
        assert claim is not None and claim.job.state is JobState.LOADING
        await storage.mark_working(claim.job.id)
        job = await storage.get(claim.job.id)
        assert job is not None and job.state is JobState.WORKING

    async def test_nothing_is_claimed_when_the_policy_picks_nothing(self, storage: Storage) -> None:
        """An empty queue, or a policy that declines, claims nothing."""
        assert await storage.claim(resident(), now=0) is None
        await self.submit(storage, new_job("a:latest"))
        assert await storage.claim(lambda queues: None, now=0) is None
        assert await storage.waiting("a:latest") == 1

    async def test_a_decision_for_an_unknown_key_is_a_bug_not_a_silent_skip(self, storage: Storage) -> None:
        """A policy that names a model with no queued job is reported loudly."""
        await self.submit(storage, new_job("a:latest"))
        with pytest.raises(RuntimeError):
            await storage.claim(lambda _: Decision("nope:latest", Reason.COLD), now=0)

    async def test_requeue_keeps_the_jobs_place(self, storage: Storage) -> None:
        """A retried job is still the oldest, so it goes again before younger ones."""
        first, second = new_job("a:latest"), new_job("a:latest")
        await self.submit(storage, first, second)
        claim = await storage.claim(resident("a:latest"), now=0)
        assert claim is not None
        await storage.requeue(claim.job, attempt=1, error="refused")
        assert await storage.waiting("a:latest") == 2
        again = await storage.claim(resident("a:latest"), now=0)
        assert again is not None and again.job.id == first.id and again.job.attempt == 1
        assert again.job.error == "refused"

    async def test_an_alias_job_records_its_model_until_it_is_put_back(self, storage: Storage) -> None:
        """set_served names the model serving an alias job; a requeue forgets it and counts the job under its alias."""
        alias = "@fast(a:latest|b:latest)"
        job = new_job(alias)
        await self.submit(storage, job, new_job("a:latest"))
        claim = await storage.claim(lambda queues: Decision(alias, Reason.COLD, swap=True), now=0)
        assert claim is not None and claim.job.id == job.id
        await storage.set_served(job.id, "b")
        served = await storage.get(job.id)
        assert served is not None and served.served_model == "b"
        await storage.requeue(claim.job, attempt=1, error=None)
        back = await storage.get(job.id)
        assert back is not None and back.served_model is None and back.model_key == alias
        assert await storage.waiting_by_model() == {alias: 1, "a:latest": 1}
        page = await storage.list_jobs(state=None, model_key="@fast", limit=10, before=None)
        assert [j.id for j in page] == [job.id]

    async def test_cancel_only_touches_queued_jobs(self, storage: Storage) -> None:
        """A queued job can be cancelled (499); one already claimed cannot, here."""
        running, waiting = new_job("a:latest"), new_job("a:latest")
        await self.submit(storage, running, waiting)
        claim = await storage.claim(resident("a:latest"), now=0)
        assert claim is not None and claim.job.id == running.id
        assert await storage.cancel_queued(waiting.id, now=1)
        assert not await storage.cancel_queued(running.id, now=1)
        assert not await storage.cancel_queued("01NOSUCHJOB", now=1)
        assert await storage.claim(resident("a:latest"), now=0) is None
        cancelled = await storage.get(waiting.id)
        assert cancelled is not None and cancelled.state is JobState.CANCELLED
        assert (cancelled.status, cancelled.finished_at) == (499, 1)

    async def test_finish_keeps_the_result_or_the_chunks(self, storage: Storage) -> None:
        """A finished job keeps its reply, or its streamed lines in order, and its status and attempt."""
        whole, streamed = new_job("a:latest"), new_job("a:latest")
        await self.submit(storage, whole, streamed)
        claim = await storage.claim(resident("a:latest"), now=1)
        assert claim is not None
        await storage.finish(claim.job, JobState.DONE, 3.0, status=200, attempt=2, result=b'{"done": true}')
        claim = await storage.claim(resident("a:latest"), now=1)
        assert claim is not None
        await storage.finish(
            claim.job, JobState.DONE, 3.0, status=200, chunks=[b"one\n", b"two\n", b"three\n"]
        )
        done = await storage.get(whole.id)
        assert done is not None
        assert (done.state, done.status, done.result, done.finished_at, done.attempt) == (
            JobState.DONE,
            200,
            b'{"done": true}',
            3.0,
            2,
        )
        assert await storage.chunks(streamed.id) == [b"one\n", b"two\n", b"three\n"]
        assert await storage.chunks(whole.id) == []

    async def test_short_and_long_streams_come_back_chunk_for_chunk(self, storage: Storage) -> None:
        """A stream kept with its row and one over the limit (in `chunks`) replay exactly, whatever their bytes."""
        odd = [b"", b"\n", b"a\nb\n\n", b"\x00\xff\xfe\r\n" * 3, bytes(range(256)), b'{"done": true}\n']
        short = [b'{"message": {"content": "Hi"}}\n', *odd]
        long = [bytes([i % 256]) * 999 + b"\n" for i in range(OUTPUT_LIMIT // 1000 + 1)] + odd
        assert pack(short) is not None and pack(long) is None
        jobs = [new_job("a:latest") for _ in range(2)]
        await self.submit(storage, *jobs)
        for chunks in (short, long):
            claim = await storage.claim(resident("a:latest"), now=1)
            assert claim is not None
            await storage.finish(claim.job, JobState.DONE, 2.0, status=200, result=b"{}", chunks=chunks)
        assert [await storage.chunks(job.id) for job in jobs] == [short, long]
        done = await storage.get(jobs[0].id)
        assert done is not None and (done.state, done.result) == (JobState.DONE, b"{}")
        # Pruning takes all of them, the long stream's rows too.
        assert await storage.prune(cutoff=3.0, batch=10) == 2
        assert [await storage.chunks(job.id) for job in jobs] == [[], []]

    async def test_finish_never_overwrites_an_ended_job(self, storage: Storage) -> None:
        """Once ended, a late requeue or second finish changes nothing, chunks included."""
        await self.submit(storage, new_job("a:latest"))
        claim = await storage.claim(resident("a:latest"), now=0)
        assert claim is not None
        await storage.finish(claim.job, JobState.FAILED, 1.0, status=500, error="boom")
        await storage.requeue(claim.job, attempt=0, error=None)
        await storage.finish(claim.job, JobState.DONE, 2.0, status=200, chunks=[b"late\n"])
        job = await storage.get(claim.job.id)
        assert job is not None and (job.state, job.error, job.finished_at) == (JobState.FAILED, "boom", 1.0)
        assert await storage.chunks(claim.job.id) == []
        assert await storage.queues() == []

    async def test_recover_requeues_interrupted_jobs_and_charges_an_attempt(self, storage: Storage) -> None:
        """Jobs left running go back to the queue with attempt + 1, in their old order."""
        jobs = [new_job("a:latest") for _ in range(3)]
        await self.submit(storage, *jobs)
        assert await storage.claim(resident("a:latest"), now=0) is not None
        assert await storage.claim(resident("b:latest"), now=0) is not None  # a swap: loading
        assert await storage.recover(now=5, max_attempts=8) == (2, 0)
        claim = await storage.claim(resident("a:latest"), now=6)
        assert claim is not None and claim.job.id == jobs[0].id and claim.job.attempt == 1
        assert claim.waiting_after == 2

    async def test_recover_fails_a_job_that_keeps_killing_the_daemon(self, storage: Storage) -> None:
        """A job interrupted on its last allowed attempt fails instead of looping forever."""
        await self.submit(storage, new_job("a:latest"))
        claim = await storage.claim(resident("a:latest"), now=0)
        assert claim is not None
        await storage.requeue(claim.job, attempt=7, error=None)
        await storage.claim(resident("a:latest"), now=0)
        assert await storage.recover(now=1, max_attempts=8) == (0, 1)
        job = await storage.get(claim.job.id)
        assert job is not None and (job.state, job.attempt, job.status) == (JobState.FAILED, 8, 500)
        assert await storage.waiting("a:latest") == 0

    async def test_each_class_is_picked_from_its_own_queue(self, storage: Storage) -> None:
        """An interactive job is claimed before older batch jobs of the same model, counts kept per class."""
        old_batch = new_job("a:latest", 1.0, Priority.BATCH)
        chat = new_job("a:latest", 2.0, Priority.INTERACTIVE)
        await self.submit(storage, old_batch, chat)
        assert sorted((q.priority, q.waiting, q.oldest_id, q.oldest_at) for q in await storage.queues()) == [
            (Priority.BATCH, 1, old_batch.id, 1.0),
            (Priority.INTERACTIVE, 1, chat.id, 2.0),
        ]
        first = await storage.claim(resident("a:latest"), now=3)
        assert first is not None and first.job.id == chat.id and first.job.priority is Priority.INTERACTIVE
        assert first.waiting_after == 1
        second = await storage.claim(resident("a:latest"), now=3)
        assert second is not None and second.job.id == old_batch.id

    async def test_class_counts_follow_cancel_requeue_and_recovery(self, storage: Storage) -> None:
        """Per-class counts stay right through cancel, requeue and recovery."""
        jobs = [new_job("a:latest", i, Priority.BATCH) for i in range(3)]
        await self.submit(storage, *jobs)
        assert await storage.cancel_queued(jobs[2].id, now=1)
        claim = await storage.claim(resident("a:latest"), now=1)
        assert claim is not None
        assert [(q.priority, q.waiting) for q in await storage.queues()] == [(Priority.BATCH, 1)]
        await storage.requeue(claim.job, attempt=1, error=None)
        assert [(q.priority, q.waiting) for q in await storage.queues()] == [(Priority.BATCH, 2)]
        await storage.claim(resident("a:latest"), now=1)
        await storage.recover(now=2, max_attempts=8)
        assert [(q.priority, q.waiting) for q in await storage.queues()] == [(Priority.BATCH, 2)]

    async def test_an_idempotency_key_stands_for_its_first_job(self, storage: Storage) -> None:
        """The same request under a used key resolves to the first job; a different one is refused."""
        first = new_job("a:latest", idempotency_key="k1")
        assert (await storage.submit(Submission(first, "hash-1"))).new
        again = await storage.submit(Submission(new_job("a:latest", idempotency_key="k1"), "hash-1"))
        assert (again.job_id, again.new, again.state) == (first.id, False, JobState.QUEUED)
        with pytest.raises(IdempotencyConflict) as refused:
            await storage.submit(Submission(new_job("a:latest", idempotency_key="k1"), "hash-2"))
        assert refused.value.job_id == first.id and refused.value.status == 409
        assert await storage.waiting("a:latest") == 1

    async def test_a_full_queue_refuses_new_jobs_and_keeps_the_rest(self, make_storage: MakeStorage) -> None:
        """Beyond max_queue waiting jobs a submission is refused; a claim makes room again."""
        storage = await make_storage(max_queue=2)
        await self.submit(storage, new_job("a:latest"), new_job("b:latest"))
        with pytest.raises(QueueFull):
            await storage.submit(Submission(new_job("a:latest")))
        assert await storage.claim(resident("a:latest"), now=0) is not None
        await storage.submit(Submission(new_job("a:latest")))
        assert await storage.counts_by_state() == {"queued": 2, "working": 1}

    async def test_concurrent_submissions_are_each_answered(self, storage: Storage) -> None:
        """Twins under one key at once: one is kept as its own job, the other refused naming it."""
        jobs = [new_job("a:latest", idempotency_key=f"k{i % 5}") for i in range(10)]
        results = await asyncio.gather(
            *(storage.submit(Submission(job, f"h{i}")) for i, job in enumerate(jobs)), return_exceptions=True
        )
        # Which twin wins is the backend's race to settle (PostgreSQL's transactions run side by side).
        kept, refused = {}, {}
        for job, result in zip(jobs, results, strict=True):
            if isinstance(result, Accepted):
                assert (result.job_id, result.new, result.state) == (job.id, True, JobState.QUEUED)
                kept[job.idempotency_key] = job.id
            else:
                assert isinstance(result, IdempotencyConflict), result
                refused[job.idempotency_key] = result.job_id
        assert kept == refused and len(kept) == 5
        queued = await storage.list_jobs(state=JobState.QUEUED, model_key=None, limit=20, before=None)
        assert sorted(j.id for j in queued) == sorted(kept.values())

    async def test_position_counts_the_jobs_that_drain_first(self, storage: Storage) -> None:
        """A job's place in line is the groups served before it plus the older jobs of its own group."""
        b_jobs = [new_job("b:latest", 1.0) for _ in range(2)]
        a_jobs = [new_job("a:latest", 2.0) for _ in range(3)]
        await self.submit(storage, *b_jobs, *a_jobs)
        batch = await storage.submit(
            Submission(new_job("a:latest", 3.0, Priority.BATCH), drain_order=in_order)
        )
        assert batch.position == 5
        assert await storage.position(a_jobs[1].id, "a:latest", Priority.INTERACTIVE, in_order) == 3
        assert await storage.position(b_jobs[0].id, "b:latest", Priority.INTERACTIVE, in_order) == 0
        late = await storage.submit(Submission(new_job("b:latest", 4.0), drain_order=in_order))
        assert late.position == 2

    async def test_pages_of_jobs_come_newest_first_without_request_or_result(self, storage: Storage) -> None:
        """list_jobs pages by cursor, filters by state and model (with its variants) and omits the bodies."""
        jobs = [
            new_job(k)
            for k in ("a_b:latest", 'a_b:latest {"num_ctx":8}', 'aXb:latest {"num_ctx":8}', "b:latest")
        ]
        await self.submit(storage, *jobs)
        claim = await storage.claim(resident("b:latest"), now=1)
        assert claim is not None
        await storage.finish(claim.job, JobState.DONE, 2, status=200, result=b"big")
        page = await storage.list_jobs(state=None, model_key=None, limit=3, before=None)
        assert [j.id for j in page] == [jobs[3].id, jobs[2].id, jobs[1].id]
        assert all(j.body == b"" and j.result is None for j in page)
        rest = await storage.list_jobs(state=None, model_key=None, limit=3, before=page[-1].id)
        assert [j.id for j in rest] == [jobs[0].id]
        done = await storage.list_jobs(state=JobState.DONE, model_key=None, limit=10, before=None)
        assert [j.id for j in done] == [jobs[3].id]
        a_b = await storage.list_jobs(state=None, model_key="a_b:latest", limit=10, before=None)
        assert [j.id for j in a_b] == [jobs[1].id, jobs[0].id]  # not aXb: `_` is no wildcard

    async def test_prune_deletes_only_jobs_that_ended_before_the_cutoff(self, storage: Storage) -> None:
        """Retention removes old ended jobs and their output, in batches; waiting and running jobs stay."""
        jobs = [new_job("a:latest") for _ in range(5)]
        await self.submit(storage, *jobs)
        for finished_at in (1.0, 2.0, 10.0):
            claim = await storage.claim(resident("a:latest"), now=0)
            assert claim is not None
            await storage.finish(claim.job, JobState.DONE, finished_at, status=200, chunks=[b"x\n"])
        assert await storage.claim(resident("a:latest"), now=0) is not None  # running
        assert await storage.prune(cutoff=5.0, batch=1) == 1
        assert await storage.prune(cutoff=5.0, batch=10) == 1
        assert await storage.prune(cutoff=5.0, batch=10) == 0
        assert [await storage.get(j.id) is None for j in jobs] == [True, True, False, False, False]
        assert await storage.chunks(jobs[0].id) == []
        assert await storage.counts_by_state() == {"done": 1, "working": 1, "queued": 1}

    async def test_the_store_answers_ping_and_describes_itself(self, storage: Storage) -> None:
        """/healthz's ping returns; /status's description names the backend and is JSON-ready."""
        await storage.ping()
        described: dict[str, Any] = await storage.describe()
        assert isinstance(described["backend"], str)
        assert all(isinstance(value, str | int | float | bool | None) for value in described.values())

    # Jobs held back after a failure

    async def test_a_held_job_waits_for_its_time_then_goes_first_again(self, storage: Storage) -> None:
        """Put back with a not-before time, a job lets the younger ones run, then takes its place again."""
        first, second, third = (new_job("a:latest", created=t) for t in (1.0, 2.0, 3.0))
        await self.submit(storage, first, second, third)
        claim = await storage.claim(resident("a:latest"), now=5)
        assert claim is not None and claim.job.id == first.id
        await storage.requeue(claim.job, attempt=1, error="Ollama answered 500", not_before=20.0)
        [queue] = await storage.queues()
        assert (queue.waiting, queue.oldest_id, [h.job_id for h in queue.held]) == (2, second.id, [first.id])
        held = await storage.get(first.id)
        assert held is not None and held.not_before == 20.0 and held.state is JobState.QUEUED
        assert await storage.waiting("a:latest") == 3  # held jobs still wait

        def at(now: float) -> Callable[[list[ModelQueue]], Decision | None]:
            return lambda queues: Policy().pick(queues, State(resident=frozenset({"a:latest"})), now=now)

        during = await storage.claim(at(10), now=10)
        assert during is not None and during.job.id == second.id
        after = await storage.claim(at(20), now=20)
        assert after is not None and after.job.id == first.id and after.job.not_before is None
        [queue] = await storage.queues()
        assert queue.held == () and queue.oldest_id == third.id

    async def test_a_held_job_can_be_cancelled_and_leaves_the_queue(self, storage: Storage) -> None:
        """Cancelling a held job takes it out of the held set too: nothing is left waiting."""
        job = new_job("a:latest", created=1.0)
        await self.submit(storage, job)
        claim = await storage.claim(resident("a:latest"), now=2)
        assert claim is not None
        await storage.requeue(claim.job, attempt=1, error="boom", not_before=50.0)
        assert await storage.claim(lambda queues: Policy().pick(queues, State(), now=49), now=49) is None
        assert await storage.cancel_queued(job.id, now=49)
        assert await storage.queues() == []
        assert await storage.waiting_by_model() == {}
        later = new_job("a:latest", created=60.0)
        await self.submit(storage, later)
        [queue] = await storage.queues()
        assert (queue.waiting, queue.oldest_id, queue.held) == (1, later.id, ())

    async def test_a_claim_takes_the_job_the_decision_names(self, storage: Storage) -> None:
        """`Decision.job_id` claims that job by its id, not its group's oldest."""
        older, younger = new_job("a:latest", created=1.0), new_job("a:latest", created=2.0)
        await self.submit(storage, older, younger)
        claim = await storage.claim(lambda _: Decision("a:latest", Reason.COLD, job_id=younger.id), now=3)
        assert claim is not None and claim.job.id == younger.id and claim.waiting_after == 1

    # Embedding batches and the cache

    async def test_companions_are_taken_as_picked_and_held_ones_only_when_due(self, storage: Storage) -> None:
        """claim_companions shows queued embed jobs of the model, interactive first, skipping those still held."""
        embed = partial(replace, endpoint="/api/embed")
        held, batch, interactive = (
            embed(new_job("e:latest", created=1.0)),
            embed(new_job("e:latest", created=2.0, priority=Priority.BATCH)),
            embed(new_job("e:latest", created=3.0)),
        )
        await self.submit(storage, held, batch, interactive, new_job("e:latest", created=4.0))
        claim = await storage.claim(resident("e:latest"), now=5)
        assert claim is not None and claim.job.id == held.id
        await storage.requeue(claim.job, attempt=1, error="boom", not_before=20.0)
        shown: list[list[str]] = []

        def every(jobs: list[Job]) -> list[str]:
            shown.append([job.id for job in jobs])
            return [job.id for job in jobs]

        early = await storage.claim_companions("e:latest", ["/api/embed"], every, now=10, scan=10)
        assert shown == [[interactive.id, batch.id]]  # the chat job is not shown; the held one not yet
        assert [job.id for job in early] == [batch.id, interactive.id]  # oldest first
        assert all(job.state is JobState.WORKING and job.started_at == 10 for job in early)
        late = await storage.claim_companions("e:latest", ["/api/embed"], every, now=20, scan=10)
        assert [job.id for job in late] == [held.id] and late[0].not_before is None
        assert await storage.waiting("e:latest") == 1  # the chat job
        assert await storage.claim_companions("e:latest", ["/api/embed"], lambda _: [], now=20, scan=10) == []

    async def test_the_cache_keeps_vectors_evicts_the_least_recently_used_and_drops_a_digest(
        self, storage: Storage
    ) -> None:
        """cache_put/get/evict/invalidate/stats: the bound holds, a read refreshes, a digest goes whole."""
        entries = [CacheEntry(bytes([i]) * 32, "d1" if i < 3 else "d2", b"[0.5,0.25]", i) for i in range(4)]
        assert await storage.cache_put(entries, limit=1 << 20) == 0
        found = await storage.cache_get([entries[1].key, b"x" * 32])
        assert found == {entries[1].key: CachedVector(b"[0.5,0.25]", 1)}
        stats = await storage.cache_stats()
        assert stats.entries == 4 and stats.bytes > 0
        assert await storage.cache_evict(limit=stats.bytes) == 0
        assert await storage.cache_invalidate(["d1"]) == 3
        assert set(await storage.cache_get([e.key for e in entries])) == {entries[3].key}
        assert await storage.cache_evict(limit=0) == 1
        assert await storage.cache_stats() == CacheStats(0, 0)

    async def test_a_submission_the_cache_answers_is_written_done_with_its_reply(
        self, storage: Storage
    ) -> None:
        """With every vector cached, the job is done at once with `reply`'s bytes; else it queues as usual."""
        entry = CacheEntry(b"k" * 32, "d", b"[1.0]", 3)
        await storage.cache_put([entry], limit=1 << 20)

        def reply(vectors: list[CachedVector]) -> bytes:
            return b'{"embeddings":[' + b",".join(v.vector for v in vectors) + b"]}"

        hit = replace(new_job("e:latest", created=7.0), endpoint="/api/embed")
        accepted = await storage.submit(Submission(hit, answer=CacheAnswer((entry.key, entry.key), reply)))
        assert (accepted.new, accepted.state, accepted.result) == (
            True,
            JobState.DONE,
            b'{"embeddings":[[1.0],[1.0]]}',
        )
        done = await storage.get(hit.id)
        assert done is not None and done.state is JobState.DONE and done.cache == "hit"
        assert (done.status, done.result, done.finished_at) == (200, accepted.result, 7.0)
        miss = replace(new_job("e:latest"), endpoint="/api/embed")
        accepted = await storage.submit(Submission(miss, answer=CacheAnswer((entry.key, b"m" * 32), reply)))
        assert (accepted.state, accepted.result) == (JobState.QUEUED, None)

        def broken(vectors: list[CachedVector]) -> bytes:
            raise ValueError("a bug in the reply")

        queued = replace(new_job("e:latest"), endpoint="/api/embed")
        accepted = await storage.submit(Submission(queued, answer=CacheAnswer((entry.key,), broken)))
        assert accepted.state is JobState.QUEUED  # a bug must not refuse the job
        assert await storage.waiting("e:latest") == 2
        assert await storage.counts_by_state() == {"done": 1, "queued": 2}

    async def test_finish_records_how_the_cache_served_a_job(self, storage: Storage) -> None:
        """finish(cache=...) keeps 'partial'; a job asked with no-cache keeps it when finished without."""
        partial_job = replace(new_job("e:latest"), endpoint="/api/embed")
        fresh = replace(new_job("e:latest"), endpoint="/api/embed", cache="no-cache")
        await self.submit(storage, partial_job, fresh)
        for cache in ("partial", None):
            claim = await storage.claim(resident("e:latest"), now=1)
            assert claim is not None
            await storage.finish(claim.job, JobState.DONE, 2.0, status=200, result=b"{}", cache=cache)
        first, second = await storage.get(partial_job.id), await storage.get(fresh.id)
        assert first is not None and first.cache == "partial"
        assert second is not None and second.cache == "no-cache"

    async def test_set_pins_replaces_the_recorded_pins(self, storage: Storage) -> None:
        """pins() returns what the last set_pins recorded, by model key; an empty set clears them."""
        assert await storage.pins() == []
        one = RecordedPin("llama3", "/api/chat", "llama3", "{}")
        two = RecordedPin('qwen {"num_ctx":8192}', "/api/generate", "qwen", '{"num_ctx":8192}')
        await storage.set_pins([two, one])
        assert await storage.pins() == [one, two]
        await storage.set_pins([two])
        assert await storage.pins() == [two]
        await storage.set_pins([])
        assert await storage.pins() == []
