"""The SQLite store: the storage contract, plus what is SQLite's own (the file, its pragmas, plans, counts)."""

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from foreman.job import JobState, Priority
from foreman.scheduling.policy import Decision, ModelQueue, Policy, Reason, State
from foreman.storage import Accepted, CacheEntry, Storage, Submission
from foreman.storage.sqlite import schema, vector_table
from foreman.storage.sqlite.checkpoints import Checkpointer
from foreman.storage.sqlite.queue_file import QueueFile
from foreman.storage.sqlite.schema import SCHEMA_VERSION
from foreman.storage.sqlite.storage import SqliteStorage
from tests.storage.contract import MakeStorage, StorageContract, new_job, resident


class TestSqliteStorage(StorageContract):
    """SQLite keeps the storage contract."""

    @pytest.fixture
    async def make_storage(self, tmp_path: Path) -> AsyncIterator[MakeStorage]:
        opened: list[SqliteStorage] = []

        async def make(**options: Any) -> Storage:
            storage = await SqliteStorage.open(tmp_path / f"q{len(opened)}.db", **options)
            opened.append(storage)
            return storage

        yield make
        for storage in opened:
            await storage.close()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[QueueFile]:
    s = QueueFile(tmp_path / "q.db")
    yield s
    s.close()


def test_database_is_wal_and_versioned(store: QueueFile, tmp_path: Path) -> None:
    """The queue file uses WAL and records its schema version."""
    db = sqlite3.connect(tmp_path / "q.db")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_insert_is_committed_at_once(store: QueueFile, tmp_path: Path) -> None:
    """Another connection sees a job as soon as insert returns."""
    job = new_job("a:latest")
    store.insert(job)
    other = sqlite3.connect(tmp_path / "q.db")
    assert other.execute("SELECT state, attempt FROM jobs WHERE id = ?", (job.id,)).fetchone() == (
        "queued",
        0,
    )


def test_a_reopened_file_recovers_the_jobs_a_dead_process_left_running(tmp_path: Path) -> None:
    """After a crash, the next process finds the running jobs in the file and puts them back in line."""
    store = QueueFile(tmp_path / "q.db")
    jobs = [new_job("a:latest") for _ in range(3)]
    for job in jobs:
        store.insert(job)
    store.claim(resident("a:latest"), now=0)
    store.close()  # the process dies here, with one job running

    reopened = QueueFile(tmp_path / "q.db")
    assert reopened.recover(now=5, max_attempts=8) == (1, 0)
    claim = reopened.claim(resident("a:latest"), now=6)
    assert claim is not None and claim.job.id == jobs[0].id and claim.job.attempt == 1
    assert claim.waiting_after == 2
    reopened.close()


def test_waiting_counts_survive_a_reopen(tmp_path: Path) -> None:
    """The per-model counts are rebuilt from the table on open."""
    store = QueueFile(tmp_path / "q.db")
    for key in ("a:latest", "a:latest", "b:latest"):
        store.insert(new_job(key))
    store.close()
    reopened = QueueFile(tmp_path / "q.db")
    assert sorted((q.model_key, q.waiting) for q in reopened.queues()) == [("a:latest", 2), ("b:latest", 1)]
    reopened.close()


def test_class_counts_follow_cancel_requeue_and_recovery(tmp_path: Path) -> None:
    """Per-class counts stay right through cancel, requeue and a reopen with recovery."""
    store = QueueFile(tmp_path / "q.db")
    jobs = [new_job("a:latest", i, Priority.BATCH) for i in range(3)]
    for job in jobs:
        store.insert(job)
    assert store.cancel_queued(jobs[2].id, now=1)
    claim = store.claim(resident("a:latest"), now=1)
    assert claim is not None
    assert [(q.priority, q.waiting) for q in store.queues()] == [(Priority.BATCH, 1)]
    store.requeue(claim.job, attempt=1, error=None)
    assert [(q.priority, q.waiting) for q in store.queues()] == [(Priority.BATCH, 2)]
    store.claim(resident("a:latest"), now=1)
    store.close()
    reopened = QueueFile(tmp_path / "q.db")
    reopened.recover(now=2, max_attempts=8)
    assert [(q.priority, q.waiting) for q in reopened.queues()] == [(Priority.BATCH, 2)]
    reopened.close()


def test_a_held_job_stays_held_across_a_restart(tmp_path: Path) -> None:
    """The not-before time is in the database: a reopened store holds the job back just the same."""
    store = QueueFile(tmp_path / "q.db")
    job = new_job("a:latest", created=1.0)
    store.insert(job)
    claim = store.claim(resident("a:latest"), now=2)
    assert claim is not None
    store.requeue(claim.job, attempt=1, error="boom", not_before=50.0)
    store.close()
    reopened = QueueFile(tmp_path / "q.db")
    [queue] = reopened.queues()
    assert (queue.waiting, [(h.job_id, h.not_before) for h in queue.held]) == (0, [(job.id, 50.0)])
    assert reopened.claim(lambda queues: Policy().pick(queues, State(), now=49), now=49) is None
    assert reopened.cancel_queued(job.id, now=49)
    assert reopened.queues() == []
    reopened.close()


def test_the_embedding_cache_survives_a_restart(tmp_path: Path) -> None:
    """The vectors live in the jobs' file: a reopened store finds them, with their bytes counted."""
    store = QueueFile(tmp_path / "q.db")
    store.cache_put([CacheEntry(b"k" * 32, "d", b"[1.0]", 2)], limit=10_000)
    stats = store.cache_stats()
    store.close()
    reopened = QueueFile(tmp_path / "q.db")
    assert reopened.cache_stats() == stats
    assert reopened.cache_get([b"k" * 32])[b"k" * 32].tokens == 2
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
    store = QueueFile(path)
    claim = store.claim(resident("a:latest"), now=6)
    assert claim is not None and claim.job.id == "01OLD" and claim.job.priority is Priority.INTERACTIVE
    store.close()
    db = sqlite3.connect(path)
    indexes = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert "jobs_queued" not in indexes and "jobs_queued_by_class" in indexes
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    db.close()


def test_hot_path_queries_search_the_index_and_never_scan(store: QueueFile, tmp_path: Path) -> None:
    """The queue snapshot and the claim stay index searches, so a million queued rows cost nothing more."""
    store.insert(new_job("a:latest"))
    store.insert(new_job("a:latest"))
    statements: list[str] = []
    store._db.set_trace_callback(statements.append)  # the SQL the store really runs, values bound
    assert store.claim(resident("a:latest"), now=1) is not None
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


def test_insert_many_writes_all_or_nothing(store: QueueFile, tmp_path: Path) -> None:
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


def rows_in_the_main_file(path: Path, copy: Path) -> int:
    """Jobs in the database file itself, leaving out what is only in its write-ahead log."""
    copy.write_bytes(path.read_bytes())
    with closing(sqlite3.connect(copy)) as db:
        if db.execute("SELECT count(*) FROM sqlite_master WHERE name = 'jobs'").fetchone()[0] == 0:
            return 0  # even the schema is still only in the log
        return int(db.execute("SELECT count(*) FROM jobs").fetchone()[0])


def test_commits_never_checkpoint_the_checkpointer_does(tmp_path: Path) -> None:
    """With the automatic checkpoint off, no commit copies the log into the file; a PASSIVE checkpoint does."""
    path = tmp_path / "q.db"
    store = QueueFile(path, autocheckpoint=False)
    checkpointer = Checkpointer(path, interval=3600)  # never on its own during the test
    try:
        for i in range(3000):  # well past SQLite's automatic threshold of 1000 pages
            store.insert(new_job("a:latest", body=b"x" * 1000 + str(i).encode()))
        assert rows_in_the_main_file(path, tmp_path / "copy.db") == 0
        checkpointer.checkpoint()
        assert rows_in_the_main_file(path, tmp_path / "copy2.db") == 3000
    finally:
        checkpointer.close()
        store.close()


async def test_the_storage_checkpoints_in_the_background(tmp_path: Path) -> None:
    """Jobs submitted through SqliteStorage reach the database file without a commit checkpointing."""
    path = tmp_path / "q.db"
    storage = await SqliteStorage.open(path)
    try:
        for _ in range(20):
            await storage.submit(Submission(new_job("a:latest")))
        deadline = time.monotonic() + 10
        while rows_in_the_main_file(path, tmp_path / "copy.db") < 20:
            assert time.monotonic() < deadline, "no checkpoint copied the jobs into the file"
            await asyncio.sleep(0.05)
    finally:
        await storage.close()


def test_positions_in_one_group_commit_are_those_of_one_submission_at_a_time(tmp_path: Path) -> None:
    """Submissions committed together get the places they would get one by one, new groups included."""

    def alphabetical(queues: list[ModelQueue]) -> list[tuple[str, Priority]]:
        return sorted((q.model_key, q.priority) for q in queues)

    jobs = [new_job(key) for key in ("b:latest", "a:latest", "b:latest", "c:latest", "a:latest")]
    together, alone = QueueFile(tmp_path / "together.db"), QueueFile(tmp_path / "alone.db")
    batch = together.submit([Submission(job, None, alphabetical) for job in jobs])
    one_by_one = [alone.submit([Submission(job, None, alphabetical)])[0] for job in jobs]
    positions = [[getattr(a, "position", None) for a in answers] for answers in (batch, one_by_one)]
    assert positions == [[0, 0, 2, 3, 1]] * 2
    together.close()
    alone.close()


def test_a_schema_5_database_gains_not_before_times(tmp_path: Path) -> None:
    """The migration to schema 6 adds the column and its index; queued jobs stay free to run."""
    # Schema 5 is today's schema without the column and its index.
    lines = _schema_6().splitlines()
    kept = [line for line in lines if "not_before" not in line]
    schema_5 = "\n".join(kept).replace("cache           TEXT,", "cache           TEXT")
    assert len(kept) == len(lines) - 2
    path = tmp_path / "v5.db"
    db = sqlite3.connect(path)
    db.executescript(
        schema_5
        + vector_table.SCHEMA
        + f"""
        INSERT INTO jobs (id, state, endpoint, model, model_key, stream, body, created_at, priority)
            VALUES ('01OLD', 'queued', '/api/chat', 'a', 'a:latest', 0, X'7B7D', 5.0, 'batch');
        PRAGMA user_version = 5;
        PRAGMA application_id = {schema.APPLICATION_ID};
        """
    )
    db.close()
    store = QueueFile(path)
    [queue] = store.queues()
    assert (queue.waiting, queue.oldest_id, queue.held) == (1, "01OLD", ())
    store.close()
    with closing(sqlite3.connect(path)) as db:
        columns = {row[1] for row in db.execute("PRAGMA table_info(jobs)")}
        indexes = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
        assert "not_before" in columns and "jobs_held" in indexes
        assert "output" in columns
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 7


def test_only_replay_reads_the_output_column(store: QueueFile) -> None:
    """A job read whole or in a page never loads its kept output; replay does."""
    job = new_job("a:latest")
    store.insert(job)
    claim = store.claim(resident("a:latest"), 1.0)
    assert claim is not None
    store.finish(claim.job, JobState.DONE, 2.0, status=200, result=b"{}", chunks=[b"x\n" * 1000])
    read: list[str] = []

    def watch(action: int, table: str | None, column: str | None, *_: object) -> int:
        if action == sqlite3.SQLITE_READ and table == "jobs":
            read.append(column or "")
        return sqlite3.SQLITE_OK

    store._db.set_authorizer(watch)
    store.get(job.id)
    store.list_jobs(state=None, model_key=None, limit=50, before=None)
    assert "output" not in read and "result" in read
    assert store.chunks(job.id) == [b"x\n" * 1000]
    assert "output" in read


def _schema_6() -> str:
    """Schema 6: today's without the output column (and the comment above it)."""
    lines = schema._SCHEMA.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith("not_before"))
    end = next(i for i, line in enumerate(lines) if line.strip().startswith("output "))
    assert end - start == 5
    return "\n".join([*lines[:start], lines[start].replace("REAL,", "REAL "), *lines[end + 1 :]])


async def test_a_schema_6_database_gains_the_output_column_and_replays_its_old_streams(
    tmp_path: Path,
) -> None:
    """Upgraded in place: a stream ended before it replays from `chunks`, a new short one from its row."""
    path = tmp_path / "v6.db"
    db = sqlite3.connect(path)
    db.executescript(
        _schema_6()
        + vector_table.SCHEMA
        + f"""
        INSERT INTO jobs (id, state, endpoint, model, model_key, stream, body, created_at, finished_at, status)
            VALUES ('01OLD', 'done', '/api/chat', 'a', 'a:latest', 1, X'7B7D', 5.0, 6.0, 200);
        INSERT INTO chunks (job_id, seq, data) VALUES ('01OLD', 0, X'610A'), ('01OLD', 1, X'0A62');
        PRAGMA user_version = 6;
        PRAGMA application_id = {schema.APPLICATION_ID};
        """
    )
    db.close()
    storage = await SqliteStorage.open(path)
    try:
        assert await storage.chunks("01OLD") == [b"a\n", b"\nb"]
        job = new_job("a:latest")
        await storage.submit(Submission(job))
        claim = await storage.claim(resident("a:latest"), 1.0)
        assert claim is not None
        await storage.finish(claim.job, JobState.DONE, 2.0, status=200, chunks=[b"x\n", b"y\n"])
        assert await storage.chunks(job.id) == [b"x\n", b"y\n"]
    finally:
        await storage.close()
    with closing(sqlite3.connect(path)) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 7
        assert db.execute("SELECT count(*) FROM chunks WHERE job_id = ?", (job.id,)).fetchone() == (0,)
        assert db.execute("SELECT output IS NOT NULL FROM jobs WHERE id = ?", (job.id,)).fetchone() == (1,)


def test_a_job_asked_to_run_now_is_written_claimed_only_when_nothing_waits(tmp_path: Path) -> None:
    """`Submission.run_now`: alone in the queue and picked, the job is written working; else it queues."""
    asked: list[list[ModelQueue]] = []

    def pick(queues: list[ModelQueue]) -> Decision | None:
        asked.append(queues)
        return Decision(queues[0].model_key, Reason.RESIDENT, job_id=queues[0].oldest_id)

    store = QueueFile(tmp_path / "q.db")
    try:
        first, second, third = new_job("a:latest"), new_job("a:latest"), new_job("b:latest")
        [claimed] = store.submit([Submission(first, run_now=pick)])
        assert isinstance(claimed, Accepted) and claimed.claim is not None
        assert (claimed.claim.job.state, claimed.claim.job.started_at) == ("working", first.created_at)
        assert [(q.model_key, q.waiting, q.oldest_id) for q in asked[0]] == [("a:latest", 1, first.id)]
        stored = store.get(first.id)
        assert stored is not None and stored.state == "working" and store.waiting("a:latest") == 0
        # Another job waits: the next is written queued, and the pick is not asked.
        store.submit([Submission(second)])
        [queued] = store.submit([Submission(third, run_now=pick)])
        assert isinstance(queued, Accepted) and queued.claim is None and queued.state == "queued"
        assert len(asked) == 1
        # Not picked: queued as without it.
        store2 = QueueFile(tmp_path / "q2.db")
        [refused] = store2.submit([Submission(new_job("c:latest"), run_now=lambda queues: None)])
        assert isinstance(refused, Accepted) and refused.claim is None and store2.waiting("c:latest") == 1
        store2.close()
    finally:
        store.close()


async def test_finishes_asked_for_in_one_turn_share_one_commit(tmp_path: Path) -> None:
    """An embedding batch's members end in the same turn: their finishes go to the file in one transaction."""
    storage = await SqliteStorage.open(tmp_path / "q.db")
    try:
        for _ in range(3):
            await storage.submit(Submission(new_job("a:latest")))
        claims = [await storage.claim(resident("a:latest"), 1.0) for _ in range(3)]
        statements: list[str] = []
        await storage.run(lambda store: store._db.set_trace_callback(statements.append))
        ended = [storage.finish(c.job, JobState.DONE, 2.0, status=200, result=b"{}") for c in claims if c]
        await asyncio.gather(*ended)
        kinds = [s.split()[0] for s in statements]
        assert kinds == ["BEGIN", "UPDATE", "UPDATE", "UPDATE", "COMMIT"]
        assert [job.state for job in [await storage.get(c.job.id) for c in claims if c] if job] == [
            "done"
        ] * 3
    finally:
        await storage.close()
