"""The worker's loop on its own: a real store, fakes for what Ollama holds and for the run of a job."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from structlog.contextvars import merge_contextvars
from structlog.testing import capture_logs
from ulid import ULID

from foreman.job import JobState, NewJob
from foreman.metrics import Metrics
from foreman.queue.job_events import Ended, JobEvents
from foreman.queue.lifecycle import Lifecycle
from foreman.queue.page_feed import PageFeed
from foreman.retry import RetryPolicy
from foreman.scheduling.driver import PolicyDriver
from foreman.scheduling.policy import Policy, Reason
from foreman.storage import Claim, Submission
from foreman.storage.sqlite.storage import SqliteStorage
from foreman.worker.loop import Worker
from foreman.worker.wakeups import WakeUps
from stub_ollama import StubServer
from tests.support.helpers import FakeClock, MakeForeman, chat_body, eventually


class FakeResidency:
    """Ollama holds `models`, and /api/ps always answers."""

    def __init__(self, *models: str) -> None:
        self.models = frozenset(models)
        self.due = False

    def as_read(self) -> frozenset[str]:
        return self.models

    def recheck(self) -> None:
        pass

    async def read(self) -> None:
        pass

    async def read_until_answered(self, retry: object, sleep: object) -> None:
        pass

    async def release_pins(self, reason: str) -> None:
        pass


class FakeRunner:
    """Runs a claim by holding it until the test lets it go, then marks it done in the store."""

    def __init__(self, store: SqliteStorage, residency: FakeResidency) -> None:
        self._store = store
        self._residency = residency
        self.claims: list[Claim] = []
        self.release = asyncio.Event()
        self.swaps = 0
        self.loading: dict[str, int] = {}
        self._running: set[str] = set()

    async def run(self, claim: Claim, start: object) -> None:
        self.claims.append(claim)
        self._running.add(claim.job.id)
        await self.release.wait()
        self.release.clear()
        self._residency.models = frozenset({claim.job.model_key})
        await self._store.finish(claim.job, JobState.DONE, 0.0, status=200)
        self._running.discard(claim.job.id)

    def stop(self) -> None:
        pass

    def is_running(self, job_id: str) -> bool:
        return job_id in self._running

    def running_jobs(self) -> list[str]:
        return sorted(self._running)

    def abort(self, job_id: str) -> bool:
        return False


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStorage]:
    storage = await SqliteStorage.open(tmp_path / "q.db")
    yield storage
    await storage.close()


def new_job(key: str) -> NewJob:
    return NewJob(str(ULID()), "/api/chat", key, key, False, b"{}", FakeClock().now)


async def test_the_loop_hands_claims_to_the_runner_in_the_policys_order(store: SqliteStorage) -> None:
    """The loaded model's jobs go first, one at a time; a queued job can be cancelled; stop ends the intake."""
    events = JobEvents()
    residency = FakeResidency("a")
    runner = FakeRunner(store, residency)
    wakeups = WakeUps()
    lifecycle = Lifecycle(store=store, events=events, feed=PageFeed(), metrics=Metrics(), clock=FakeClock())
    worker = Worker(
        store=store,
        lifecycle=lifecycle,
        driver=PolicyDriver(Policy()),
        residency=residency,  # type: ignore[arg-type]
        runner=runner,
        retry=RetryPolicy(3, 0, 0),
        wakeups=wakeups,
        clock=FakeClock(),
        monotonic=FakeClock(),
    )
    jobs = [new_job(key) for key in ("b", "a", "a", "c")]
    for job in jobs:
        await store.submit(Submission(job))
    loop = asyncio.create_task(worker.run())
    try:
        await eventually(lambda: len(runner.claims) == 1, what="the first claim")
        assert runner.claims[0].decision.reason is Reason.RESIDENT and runner.claims[0].job.id == jobs[1].id
        assert worker.running_jobs == [jobs[1].id]
        with events.subscribe(jobs[3].id, client=False) as inbox:
            assert await worker.cancel(jobs[3].id)
            ended = inbox.get_nowait()
        assert isinstance(ended, Ended) and ended.status == 499
        for count, expected in ((2, jobs[2]), (3, jobs[0])):
            runner.release.set()
            await eventually(lambda n=count: len(runner.claims) == n, what="the next claim")
            assert runner.claims[-1].job.id == expected.id
        assert [c.decision.swap for c in runner.claims] == [False, False, True]
        worker.stop()
        await store.submit(Submission(new_job("b")))
        worker.wake("b")
        runner.release.set()
        await eventually(lambda: not runner.running_jobs(), what="the last job to end")
        assert len(runner.claims) == 3  # stopped: the new job stays queued
        assert await store.waiting("b") == 1
        assert (await store.get(jobs[3].id)).state is JobState.CANCELLED  # type: ignore[union-attr]
    finally:
        loop.cancel()
        await asyncio.gather(loop, return_exceptions=True)


async def test_lines_logged_while_a_job_runs_carry_its_id_and_model(
    stub_server: StubServer, make_foreman: MakeForeman
) -> None:
    """structlog's contextvars name the job on every line of its run, such as the swap that loads its model."""
    foreman = await make_foreman(stub_server.url)
    with capture_logs(processors=[merge_contextvars]) as logs:
        answer = await foreman.client.post("/api/chat", json=chat_body("llama3"))
        assert answer.status == 200
    job_id = answer.headers["X-Foreman-Job"]
    swap = next(e for e in logs if e["event"] == "model.swap")
    assert (swap["job_id"], swap["model"]) == (job_id, "llama3:latest")
