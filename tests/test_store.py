"""The SQLite queue on its own: claims, requeues, recovery, all on a real file with WAL."""

import sqlite3
from contextlib import closing
from pathlib import Path

import pytest
from ulid import ULID

from foreman.models import JobState, NewJob
from foreman.scheduler import Decision, ModelQueue, Reason, pick
from foreman.store import SCHEMA_VERSION, Store


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store(tmp_path / "q.db")
    yield s
    s.close()


def new_job(key: str, created: float = 0.0) -> NewJob:
    return NewJob(
        id=str(ULID()),
        endpoint="/api/chat",
        model=key,
        model_key=key,
        stream=False,
        body=b"{}",
        created_at=created,
    )


def resident(*keys: str):
    return lambda queues: pick(queues, set(keys))


def test_database_is_wal_and_versioned(store: Store, tmp_path: Path) -> None:
    """The queue file uses WAL and records its schema version."""
    db = sqlite3.connect(tmp_path / "q.db")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_insert_is_committed_at_once(store: Store, tmp_path: Path) -> None:
    """Another connection sees a job as soon as insert returns."""
    job = new_job("a:latest")
    store.insert(job)
    other = sqlite3.connect(tmp_path / "q.db")
    assert other.execute("SELECT state, attempt FROM jobs WHERE id = ?", (job.id,)).fetchone() == (
        "queued",
        0,
    )


def test_claims_drain_the_resident_model_first(store: Store) -> None:
    """With A loaded, every A job is claimed before the older B job."""
    jobs = [new_job(k) for k in ("b:latest", "a:latest", "b:latest", "a:latest")]
    for job in jobs:
        store.insert(job)
    order = []
    loaded = {"a:latest"}
    while (claim := store.claim_next(lambda qs: pick(qs, set(loaded)), now=1.0)) is not None:
        order.append((claim.job.id, claim.decision.reason))
        loaded.clear()
        loaded.add(claim.job.model_key)
        store.finish(claim.job, JobState.DONE, 2.0, status=200)
    assert [job_id for job_id, _ in order] == [jobs[1].id, jobs[3].id, jobs[0].id, jobs[2].id]
    assert [reason for _, reason in order] == [
        Reason.RESIDENT,
        Reason.RESIDENT,
        Reason.DRAINED,
        Reason.RESIDENT,
    ]


def test_claim_reports_what_still_waits_for_the_model(store: Store) -> None:
    """The worker learns how many jobs remain for the model it serves, to decide the pin."""
    for _ in range(3):
        store.insert(new_job("a:latest"))
    claim = store.claim_next(resident("a:latest"), now=0)
    assert claim is not None and claim.waiting_after == 2
    assert claim.job.state is JobState.WORKING


def test_a_swap_claims_the_job_in_loading_state(store: Store) -> None:
    """A job whose model must be loaded first goes through `loading`."""
    store.insert(new_job("a:latest"))
    claim = store.claim_next(resident("b:latest"), now=0)
    assert claim is not None and claim.job.state is JobState.LOADING


def test_requeue_keeps_the_jobs_place(store: Store) -> None:
    """A retried job is still the oldest, so it goes again before younger ones."""
    first, second = new_job("a:latest"), new_job("a:latest")
    store.insert(first)
    store.insert(second)
    claim = store.claim_next(resident("a:latest"), now=0)
    assert claim is not None
    store.requeue(claim.job, attempt=1, error="refused")
    again = store.claim_next(resident("a:latest"), now=0)
    assert again is not None and again.job.id == first.id and again.job.attempt == 1
    assert again.job.error == "refused"


def test_cancel_only_touches_queued_jobs(store: Store) -> None:
    """A queued job can be cancelled; one already claimed cannot, here."""
    running, waiting = new_job("a:latest"), new_job("a:latest")
    store.insert(running)
    store.insert(waiting)
    claim = store.claim_next(resident("a:latest"), now=0)
    assert claim is not None and claim.job.id == running.id
    assert store.cancel_queued(waiting.id, now=1)
    assert not store.cancel_queued(running.id, now=1)
    assert store.claim_next(resident("a:latest"), now=0) is None
    cancelled = store.get(waiting.id)
    assert cancelled is not None and cancelled.state is JobState.CANCELLED


def test_finish_never_overwrites_an_ended_job(store: Store) -> None:
    """Once done, a late requeue or second finish changes nothing."""
    store.insert(new_job("a:latest"))
    claim = store.claim_next(resident("a:latest"), now=0)
    assert claim is not None
    store.finish(claim.job, JobState.DONE, 1.0, status=200, result=b"ok")
    store.requeue(claim.job, attempt=0, error=None)
    store.finish(claim.job, JobState.CANCELLED, 2.0, status=499)
    job = store.get(claim.job.id)
    assert job is not None and job.state is JobState.DONE and job.result == b"ok"
    assert store.queues() == []


def test_recover_requeues_interrupted_jobs_and_charges_an_attempt(tmp_path: Path) -> None:
    """After a crash, running jobs go back to the queue with attempt + 1, in their old order."""
    store = Store(tmp_path / "q.db")
    jobs = [new_job("a:latest") for _ in range(3)]
    for job in jobs:
        store.insert(job)
    store.claim_next(resident("a:latest"), now=0)
    store.close()  # the process dies here, with one job running

    reopened = Store(tmp_path / "q.db")
    assert reopened.recover(now=5, max_attempts=8) == (1, 0)
    claim = reopened.claim_next(resident("a:latest"), now=6)
    assert claim is not None and claim.job.id == jobs[0].id and claim.job.attempt == 1
    assert claim.waiting_after == 2
    reopened.close()


def test_recover_fails_a_job_that_keeps_killing_the_daemon(store: Store) -> None:
    """A job interrupted on its last allowed attempt fails instead of looping forever."""
    store.insert(new_job("a:latest"))
    claim = store.claim_next(resident("a:latest"), now=0)
    assert claim is not None
    store.requeue(claim.job, attempt=7, error=None)
    store.claim_next(resident("a:latest"), now=0)
    assert store.recover(now=1, max_attempts=8) == (0, 1)
    job = store.get(claim.job.id)
    assert job is not None and job.state is JobState.FAILED and job.attempt == 8


def test_waiting_counts_survive_a_reopen(tmp_path: Path) -> None:
    """The per-model counts are rebuilt from the table on open."""
    store = Store(tmp_path / "q.db")
    for key in ("a:latest", "a:latest", "b:latest"):
        store.insert(new_job(key))
    store.close()
    reopened = Store(tmp_path / "q.db")
    assert sorted((q.model_key, q.waiting) for q in reopened.queues()) == [("a:latest", 2), ("b:latest", 1)]
    reopened.close()


def test_pick_query_uses_the_queued_index(store: Store, tmp_path: Path) -> None:
    """The oldest-job lookup is an index search, not a table scan."""
    db = sqlite3.connect(tmp_path / "q.db")
    plan = db.execute(
        "EXPLAIN QUERY PLAN SELECT id FROM jobs WHERE state = 'queued' AND model_key = ? ORDER BY id LIMIT 1",
        ("a",),
    ).fetchall()
    assert any("jobs_queued" in row[-1] for row in plan), plan


def test_decision_for_an_unknown_key_is_a_bug_not_a_silent_skip(store: Store) -> None:
    """A policy that names a model with no queued job is reported loudly."""
    store.insert(new_job("a:latest"))

    def wrong(_: list[ModelQueue]) -> Decision:
        return Decision("nope:latest", Reason.COLD)

    with pytest.raises(RuntimeError):
        store.claim_next(wrong, now=0)


def test_insert_many_writes_all_or_nothing(store: Store, tmp_path: Path) -> None:
    """A bulk insert lands in one transaction; one bad job leaves neither rows nor counts behind."""
    assert store.insert_many(new_job(k) for k in ("a:latest", "b:latest", "a:latest")) == 3
    assert (store.waiting("a:latest"), store.waiting("b:latest")) == (2, 1)
    taken = new_job("c:latest")
    store.insert(taken)
    with pytest.raises(sqlite3.IntegrityError):
        store.insert_many([new_job("c:latest"), taken])  # the second id is already in the queue
    assert store.waiting("c:latest") == 1
    with closing(sqlite3.connect(tmp_path / "q.db")) as other:
        assert other.execute("SELECT count(*) FROM jobs").fetchone()[0] == 4
