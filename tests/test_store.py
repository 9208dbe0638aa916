"""The SQLite queue on its own: claims, requeues, recovery, all on a real file with WAL."""

import sqlite3
from contextlib import closing
from pathlib import Path

import pytest
from ulid import ULID

from foreman.models import Job, JobState, NewJob, Priority
from foreman.scheduler import Decision, ModelQueue, Policy, Reason, State
from foreman.store import SCHEMA_VERSION, Store


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store(tmp_path / "q.db")
    yield s
    s.close()


def new_job(key: str, created: float = 0.0, priority: Priority = Priority.INTERACTIVE) -> NewJob:
    return NewJob(
        id=str(ULID()),
        endpoint="/api/chat",
        model=key,
        model_key=key,
        stream=False,
        body=b"{}",
        created_at=created,
        priority=priority,
    )


def pick(queues: list[ModelQueue], loaded: set[str]) -> Decision | None:
    return Policy().pick(queues, State(resident=frozenset(loaded)), now=0)


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


def test_a_held_job_waits_for_its_time_then_goes_first_again(store: Store) -> None:
    """Put back with a not-before time, a job lets the younger ones run, then takes its place again."""
    first, second, third = (new_job("a:latest", created=t) for t in (1.0, 2.0, 3.0))
    for job in (first, second, third):
        store.insert(job)
    claim = store.claim_next(resident("a:latest"), now=5)
    assert claim is not None and claim.job.id == first.id
    store.requeue(claim.job, attempt=1, error="Ollama answered 500", not_before=20.0)
    [queue] = store.queues()
    assert (queue.waiting, queue.oldest_id, [h.job_id for h in queue.held]) == (2, second.id, [first.id])
    assert store.get(first.id).not_before == 20.0  # type: ignore[union-attr]

    def at(now: float):
        return lambda queues: Policy().pick(queues, State(resident=frozenset({"a:latest"})), now=now)

    during = store.claim_next(at(10), now=10)
    assert during is not None and during.job.id == second.id
    after = store.claim_next(at(20), now=20)
    assert after is not None and after.job.id == first.id and after.job.not_before is None
    assert store.queues()[0].held == ()


def test_a_held_job_stays_held_across_a_restart(tmp_path: Path) -> None:
    """The not-before time is in the database: a reopened store holds the job back just the same."""
    store = Store(tmp_path / "q.db")
    job = new_job("a:latest", created=1.0)
    store.insert(job)
    claim = store.claim_next(resident("a:latest"), now=2)
    assert claim is not None
    store.requeue(claim.job, attempt=1, error="boom", not_before=50.0)
    store.close()
    reopened = Store(tmp_path / "q.db")
    [queue] = reopened.queues()
    assert (queue.waiting, [(h.job_id, h.not_before) for h in queue.held]) == (0, [(job.id, 50.0)])
    assert reopened.claim_next(lambda queues: Policy().pick(queues, State(), now=49), now=49) is None
    assert reopened.cancel_queued(job.id, now=49)
    assert reopened.queues() == []
    reopened.close()


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


def test_decision_for_an_unknown_key_is_a_bug_not_a_silent_skip(store: Store) -> None:
    """A policy that names a model with no queued job is reported loudly."""
    store.insert(new_job("a:latest"))

    def wrong(_: list[ModelQueue]) -> Decision:
        return Decision("nope:latest", Reason.COLD)

    with pytest.raises(RuntimeError):
        store.claim_next(wrong, now=0)


def test_each_class_is_picked_from_its_own_queue(store: Store) -> None:
    """An interactive job is claimed before older batch jobs of the same model, counts kept per class."""
    old_batch = new_job("a:latest", 1.0, Priority.BATCH)
    chat = new_job("a:latest", 2.0, Priority.INTERACTIVE)
    store.insert(old_batch)
    store.insert(chat)
    assert sorted((q.priority, q.waiting, q.oldest_at) for q in store.queues()) == [
        (Priority.BATCH, 1, 1.0),
        (Priority.INTERACTIVE, 1, 2.0),
    ]
    first = store.claim_next(resident("a:latest"), now=3)
    assert first is not None and first.job.id == chat.id and first.job.priority is Priority.INTERACTIVE
    assert first.waiting_after == 1
    second = store.claim_next(resident("a:latest"), now=3)
    assert second is not None and second.job.id == old_batch.id and second.job.priority is Priority.BATCH


def test_class_counts_follow_cancel_requeue_and_recovery(tmp_path: Path) -> None:
    """Per-class counts stay right through cancel, requeue and a reopen with recovery."""
    store = Store(tmp_path / "q.db")
    jobs = [new_job("a:latest", i, Priority.BATCH) for i in range(3)]
    for job in jobs:
        store.insert(job)
    assert store.cancel_queued(jobs[2].id, now=1)
    claim = store.claim_next(resident("a:latest"), now=1)
    assert claim is not None
    assert [(q.priority, q.waiting) for q in store.queues()] == [(Priority.BATCH, 1)]
    store.requeue(claim.job, attempt=1, error=None)
    assert [(q.priority, q.waiting) for q in store.queues()] == [(Priority.BATCH, 2)]
    store.claim_next(resident("a:latest"), now=1)
    store.close()
    reopened = Store(tmp_path / "q.db")
    reopened.recover(now=2, max_attempts=8)
    assert [(q.priority, q.waiting) for q in reopened.queues()] == [(Priority.BATCH, 2)]
    reopened.close()


def test_a_schema_1_database_is_migrated_with_its_jobs_interactive(tmp_path: Path) -> None:
    """Jobs queued before priorities existed keep their place, as interactive jobs."""
    path = tmp_path / "old.db"
    db = sqlite3.connect(path)
    db.executescript(
        """
        CREATE TABLE jobs (id TEXT PRIMARY KEY, state TEXT NOT NULL, endpoint TEXT NOT NULL,
            model TEXT NOT NULL, model_key TEXT NOT NULL, stream INTEGER NOT NULL, body BLOB NOT NULL,
            attempt INTEGER NOT NULL DEFAULT 0, created_at REAL NOT NULL, started_at REAL,
            finished_at REAL, status INTEGER, error TEXT, result BLOB);
        CREATE INDEX jobs_queued ON jobs (model_key, id) WHERE state = 'queued';
        INSERT INTO jobs (id, state, endpoint, model, model_key, stream, body, created_at)
            VALUES ('01OLD', 'queued', '/api/chat', 'a', 'a:latest', 0, X'7B7D', 5.0);
        PRAGMA user_version = 1;
        """
    )
    db.close()
    store = Store(path)
    claim = store.claim_next(resident("a:latest"), now=6)
    assert claim is not None and claim.job.id == "01OLD" and claim.job.priority is Priority.INTERACTIVE
    store.close()
    db = sqlite3.connect(path)
    indexes = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert "jobs_queued" not in indexes and "jobs_queued_by_class" in indexes
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    db.close()


def test_a_schema_5_database_gains_not_before_times(tmp_path: Path) -> None:
    """The migration to schema 6 adds the column and its index; queued jobs stay free to run."""
    from foreman import embed_store, store

    # Schema 5 is today's schema without the column and its index.
    lines = store._SCHEMA.splitlines()
    kept = [line for line in lines if "not_before" not in line]
    schema_5 = "\n".join(kept).replace("cache           TEXT,", "cache           TEXT")
    assert len(kept) == len(lines) - 2
    path = tmp_path / "v5.db"
    db = sqlite3.connect(path)
    db.executescript(
        schema_5
        + embed_store.SCHEMA
        + f"""
        INSERT INTO jobs (id, state, endpoint, model, model_key, stream, body, created_at, priority)
            VALUES ('01OLD', 'queued', '/api/chat', 'a', 'a:latest', 0, X'7B7D', 5.0, 'batch');
        PRAGMA user_version = 5;
        PRAGMA application_id = {store.APPLICATION_ID};
        """
    )
    db.close()
    store = Store(path)
    [queue] = store.queues()
    assert (queue.waiting, queue.oldest_id, queue.held) == (1, "01OLD", ())
    store.close()
    with closing(sqlite3.connect(path)) as db:
        columns = {row[1] for row in db.execute("PRAGMA table_info(jobs)")}
        indexes = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
        assert "not_before" in columns and "jobs_held" in indexes
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 6


def test_hot_path_queries_search_the_index_and_never_scan(store: Store, tmp_path: Path) -> None:
    """The queue snapshot and the claim stay index searches, so a million queued rows cost nothing more."""
    store.insert(new_job("a:latest"))
    store.insert(new_job("a:latest"))
    statements: list[str] = []
    store._db.set_trace_callback(statements.append)  # the SQL the store really runs, values bound
    assert store.claim_next(resident("a:latest"), now=1) is not None
    store._db.set_trace_callback(None)
    reads_and_claims = [sql for sql in statements if sql.lstrip().startswith(("SELECT", "UPDATE"))]
    assert len(reads_and_claims) == 2, statements  # the snapshot of what waits, then the claim
    with closing(sqlite3.connect(tmp_path / "q.db")) as db:
        plans = [
            " | ".join(row[-1] for row in db.execute(f"EXPLAIN QUERY PLAN {sql}")) for sql in reads_and_claims
        ]
    snapshot, claim = plans
    assert "jobs_queued_by_class" in snapshot, snapshot
    assert "sqlite_autoindex_jobs_1 (id=?)" in claim, claim  # the policy names the job: a key lookup
    for plan in plans:
        assert "SCAN" not in plan and "TEMP B-TREE" not in plan, plan


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


def test_an_embed_job_held_after_a_failure_joins_a_batch_only_when_its_time_comes(store: Store) -> None:
    """Companions for a batched embed call skip held jobs until their not-before time."""
    from dataclasses import replace

    held, other = (replace(new_job("e:latest", created=t), endpoint="/api/embed") for t in (1.0, 2.0))
    store.insert(held)
    store.insert(other)
    claim = store.claim_next(resident("e:latest"), now=3)
    assert claim is not None and claim.job.id == held.id
    store.requeue(claim.job, attempt=1, error="boom", not_before=20.0)

    def every(jobs: list[Job]) -> list[str]:
        return [job.id for job in jobs]

    early = store.claim_companions("e:latest", ["/api/embed"], every, now=10, scan=10)
    assert [job.id for job in early] == [other.id]
    assert store.queues()[0].held != ()
    late = store.claim_companions("e:latest", ["/api/embed"], every, now=20, scan=10)
    assert [job.id for job in late] == [held.id] and late[0].not_before is None
    assert store.queues() == []
