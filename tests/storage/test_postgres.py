"""The PostgreSQL queue's own behaviour, on a real server: schema, claims between nodes, leases, pruning in turn."""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

import psycopg
import pytest
from ulid import ULID

from foreman.cli import main
from foreman.errors import StoreError
from foreman.job import Ended, JobState, NewJob, Priority
from foreman.scheduling.policy import Decision, ModelQueue, Policy, State
from foreman.storage import IdempotencyConflict, Storage, Submission
from foreman.storage.postgres.relay import PostgresRelay
from foreman.storage.postgres.schema import LOCK_PRUNE, SCHEMA_VERSION
from foreman.storage.postgres.storage import PostgresStorage
from tests.conftest import new_database
from tests.storage.contract import MakeStorage, StorageContract
from tests.support import postgres
from tests.support.processes import free_port

OpenNode = Callable[..., Awaitable[PostgresStorage]]


class TestPostgresStorage(StorageContract):
    """PostgreSQL keeps the storage contract."""

    @pytest.fixture
    async def make_storage(self, pg_server: postgres.Server) -> AsyncIterator[MakeStorage]:
        opened: list[PostgresStorage] = []

        async def make(**options: Any) -> Storage:
            storage = await PostgresStorage.open(new_database(pg_server), node="n1", **options)
            opened.append(storage)
            return storage

        yield make
        for storage in opened:
            await storage.close()


@pytest.fixture
async def open_node(pg_url: str) -> AsyncIterator[OpenNode]:
    """Open the test database as one node or another; all are closed afterwards."""
    stores: list[PostgresStorage] = []

    async def open_(name: str, **options: object) -> PostgresStorage:
        store = await PostgresStorage.open(pg_url, node=name, **options)  # type: ignore[arg-type]
        stores.append(store)
        return store

    yield open_
    for store in stores:
        await store.close()


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


def relay(store: PostgresStorage) -> PostgresRelay:
    """The node's line to the others, not joined: what it asks of the database alone."""
    return PostgresRelay(store, upstream="http://ollama", max_attempts=3, clock=lambda: 0.0)


def holding(*keys: str) -> Callable[[list[ModelQueue]], Decision | None]:
    """The policy's choice for a node whose Ollama holds `keys`."""
    return lambda queues: Policy().pick(queues, State(resident=frozenset(keys)), now=0)


async def test_the_schema_is_versioned_and_a_newer_one_refused(open_node: OpenNode, pg_url: str) -> None:
    """The database records its schema version; a foreman that knows an older one refuses to start."""
    store = await open_node("a")
    await store.close()
    with psycopg.connect(pg_url, autocommit=True) as db:
        assert db.execute("SELECT value FROM foreman_meta").fetchone() == (str(SCHEMA_VERSION),)
        db.execute("UPDATE foreman_meta SET value = %s", (str(SCHEMA_VERSION + 1),))
    with pytest.raises(StoreError, match="newer foreman"):
        await open_node("a")


async def test_a_schema_1_database_gains_the_output_column_and_replays_its_old_streams(
    open_node: OpenNode, pg_url: str
) -> None:
    """Upgraded in place: a stream ended before it replays from `chunks`, a new short one from its row."""
    store = await open_node("a")
    await store.close()
    # Schema 1 is today's without the column; a stream it ended kept its chunks as rows.
    with psycopg.connect(pg_url, autocommit=True) as db:
        db.execute("ALTER TABLE jobs DROP COLUMN output")
        db.execute("UPDATE foreman_meta SET value = '1' WHERE key = 'schema_version'")
        db.execute(
            "INSERT INTO jobs (id, state, endpoint, model, model_key, stream, body, created_at, finished_at, status)"
            " VALUES ('01OLD', 'done', '/api/chat', 'a', 'a:latest', true, '{}', 5, 6, 200)"
        )
        db.execute(
            "INSERT INTO chunks (job_id, seq, data) VALUES ('01OLD', 0, %s), ('01OLD', 1, %s)",
            (b"a\n", b"\nb"),
        )
    store = await open_node("a")
    assert await store.chunks("01OLD") == [b"a\n", b"\nb"]
    job = new_job("m1")
    await store.insert_many([job])
    claim = await store.claim(holding("m1"), 1.0)
    assert claim is not None
    await store.finish(claim.job, JobState.DONE, 2.0, status=200, chunks=[b"x\n", b"y\n"])
    assert await store.chunks(job.id) == [b"x\n", b"y\n"]
    with psycopg.connect(pg_url, autocommit=True) as db:
        assert db.execute("SELECT value FROM foreman_meta").fetchone() == (str(SCHEMA_VERSION),) == ("2",)
        assert db.execute("SELECT count(*) FROM chunks WHERE job_id = %s", (job.id,)).fetchone() == (0,)
        assert db.execute("SELECT output IS NOT NULL FROM jobs WHERE id = %s", (job.id,)).fetchone() == (
            True,
        )


async def test_a_database_of_something_else_is_refused(pg_url: str) -> None:
    """A database with tables foreman did not make is left untouched."""
    with psycopg.connect(pg_url, autocommit=True) as db:
        db.execute("CREATE TABLE invoices (id int)")
    with pytest.raises(StoreError, match=r"not a foreman queue \(tables: invoices\)"):
        await PostgresStorage.open(pg_url, node="a")
    with psycopg.connect(pg_url, autocommit=True) as db:
        assert db.execute(
            "SELECT count(*) FROM information_schema.tables WHERE table_name = 'jobs'"
        ).fetchone() == (0,)


async def test_no_server_is_one_clear_refusal(pg_server: object) -> None:
    """A URL nobody answers at is a StoreError that names the server, without the password."""
    with pytest.raises(StoreError, match=r"cannot connect to postgresql://u:\*\*\*@127\.0\.0\.1:1/x"):
        await PostgresStorage.open("postgresql://u:secret@127.0.0.1:1/x?connect_timeout=1", node="a")


async def test_nodes_claiming_at_once_never_take_the_same_job(open_node: OpenNode) -> None:
    """Three nodes claim a shared queue as fast as they can: every job is taken exactly once."""
    nodes = [await open_node(name) for name in ("a", "b", "c")]
    jobs = [new_job(f"m{i % 2}") for i in range(120)]
    await nodes[0].insert_many(jobs)

    # On a busy machine one node could drain the queue before another's first round trip:
    # each waits, after its first job, until all three are claiming, so they race from there.
    all_claiming = asyncio.Barrier(len(nodes))

    async def drain(store: PostgresStorage) -> list[str]:
        taken = []
        # Every node holds both models: nobody leaves anything to the others.
        while (claim := await store.claim(holding("m0", "m1"), 1.0)) is not None:
            taken.append(claim.job.id)
            await store.finish(claim.job, JobState.DONE, 2.0, status=200)
            if len(taken) == 1:
                await asyncio.wait_for(all_claiming.wait(), 30)
        return taken

    taken = await asyncio.gather(*(drain(node) for node in nodes))
    every = [job_id for ids in taken for job_id in ids]
    assert sorted(every) == sorted(j.id for j in jobs)
    assert len(set(every)) == len(every)
    assert all(taken), "each node took a share"


async def test_a_model_no_node_holds_is_loaded_by_one_idle_node(open_node: OpenNode) -> None:
    """Two idle nodes, two cold models: each loads one; neither loads the model the other took."""
    a, b = await open_node("a"), await open_node("b")
    await a.insert_many([new_job("m1", 0), new_job("m1", 0), new_job("m2", 1)])
    first = await a.claim(holding(), 1.0)
    second = await b.claim(holding(), 1.0)
    assert first is not None and second is not None
    assert (first.job.model_key, second.job.model_key) == ("m1", "m2")
    assert first.decision.swap and second.decision.swap
    # Only m1's second job is left, and a holds m1: b leaves it to a.
    assert await b.claim(holding("m2"), 1.0) is None
    assert [q.held_elsewhere for q in await b.queues()] == [1]


async def test_a_node_joins_a_held_model_when_its_work_outlasts_a_load(open_node: OpenNode) -> None:
    """With much work waiting for the model another node runs, an idle node loads it too."""
    a, b = await open_node("a"), await open_node("b")
    # Unlearned costs: 10 s a load, 1 s a job, so 30 jobs are worth a second node, 5 are not.
    await a.insert_many([new_job("m1") for _ in range(6)])
    assert await a.claim(holding(), 1.0) is not None
    assert await b.claim(holding(), 1.0) is None
    await a.insert_many([new_job("m1") for _ in range(30)])
    joined = await b.claim(holding(), 1.0)
    assert joined is not None and joined.job.model_key == "m1" and joined.decision.swap


def test_swap_decisions_take_turns(pg_url: str) -> None:
    """Idle nodes that all decided to load one cold model at the same moment: exactly one loads it.

    Each node runs in its own thread and event loop, and every node's first
    decision waits until all have made theirs, so they really overlap.
    """
    count = 4
    decided = threading.Barrier(count, timeout=20)

    def first_decision_waits_for_all() -> Callable[[list[ModelQueue]], Decision | None]:
        calls = itertools.count()

        def choose(queues: list[ModelQueue]) -> Decision | None:
            decision = holding()(queues)
            if next(calls) == 0:
                decided.wait()
            return decision

        return choose

    async def enqueue() -> None:
        store = await PostgresStorage.open(pg_url, node="intake")
        await store.insert_many([new_job("m1") for _ in range(3)])
        await store.close()

    async def one_node(name: str) -> bool:
        store = await PostgresStorage.open(pg_url, node=name)
        try:
            return await store.claim(first_decision_waits_for_all(), 1.0) is not None
        finally:
            await store.close()

    asyncio.run(enqueue())
    with ThreadPoolExecutor(count) as pool:
        claimed = list(pool.map(lambda i: asyncio.run(one_node(f"n{i}")), range(count)))
    # 3 jobs of a second each are not worth a second load of 10 s: the others leave them to the first.
    assert sorted(claimed) == [False] * (count - 1) + [True]


async def test_an_expired_lease_puts_the_job_back_and_its_old_node_cannot_end_it(open_node: OpenNode) -> None:
    """A node that stops renewing loses its job to the others; its late finish changes nothing."""
    # A lease long enough that a busy machine cannot outlast it between the claim and the first reap.
    a = await open_node("a", node_timeout=1.0)
    b = await open_node("b", node_timeout=1.0)
    await a.insert_many([new_job("m1")])
    claim = await a.claim(holding("m1"), 1.0)
    assert claim is not None
    assert await b.reap(2.0, max_attempts=8) == []  # the lease still runs
    deadline = asyncio.get_running_loop().time() + 5
    while not (lost := await b.reap(2.0, max_attempts=8)):
        assert asyncio.get_running_loop().time() < deadline, "the lease never ran out"
        await asyncio.sleep(0.05)
    assert lost == [(claim.job.id, "a")]
    job = await b.get(claim.job.id)
    assert job is not None and (job.state, job.attempt) == (JobState.QUEUED, 1)
    await a.finish(claim.job, JobState.DONE, 3.0, status=200, result=b"late")
    again = await b.claim(holding("m1"), 4.0)
    assert again is not None and again.job.id == claim.job.id
    await b.finish(again.job, JobState.DONE, 5.0, status=200, result=b"ok")
    ended = await a.get(claim.job.id)
    assert ended is not None and ended.result == b"ok"


async def test_a_restart_recovers_only_its_own_jobs(open_node: OpenNode) -> None:
    """A node's boot puts back what it ran itself, not what the other nodes run."""
    a, b = await open_node("a"), await open_node("b")
    await a.insert_many([new_job("m1"), new_job("m2")])
    mine = await a.claim(holding("m1"), 1.0)
    theirs = await b.claim(holding("m2"), 1.0)
    assert mine is not None and theirs is not None
    assert await a.recover(2.0, max_attempts=8) == (1, 0)
    assert (await a.get(mine.job.id)).state is JobState.QUEUED  # type: ignore[union-attr]
    assert (await a.get(theirs.job.id)).state is JobState.WORKING  # type: ignore[union-attr]


async def test_one_node_prunes_at_a_time(open_node: OpenNode, pg_url: str) -> None:
    """While another node prunes (holds the lock), a node's prune deletes nothing."""
    a = await open_node("a")
    await a.insert_many([new_job("m1")])
    claim = await a.claim(holding("m1"), 1.0)
    assert claim is not None
    await a.finish(claim.job, JobState.DONE, 2.0, status=200)
    async with await psycopg.AsyncConnection.connect(pg_url) as other, other.transaction():
        await other.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK_PRUNE,))
        assert await a.prune(100.0, 1000) == 0
    assert await a.prune(100.0, 1000) == 1


async def test_cancel_elsewhere_reaches_only_a_job_another_node_runs(
    open_node: OpenNode, pg_url: str
) -> None:
    """A job running on another node gets a cancel notification addressed to that node."""
    a, b = await open_node("a"), await open_node("b")
    await a.insert_many([new_job("m1"), new_job("m1")])
    claim = await b.claim(holding("m1"), 1.0)
    assert claim is not None
    async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as listener:
        await listener.execute("LISTEN foreman")
        assert await relay(a).cancel_elsewhere(claim.job.id)
        assert not await relay(b).cancel_elsewhere(claim.job.id)  # its own job: the worker aborts it itself
        async for notice in listener.notifies(timeout=5):
            message = json.loads(notice.payload)
            assert (message["cancel"], message["to"]) == (claim.job.id, "b")
            break
        else:
            raise AssertionError("no cancel notification")


async def _heard_before_marker(listener: psycopg.AsyncConnection[Any], pg_url: str) -> list[dict[str, Any]]:
    """What `listener` heard up to a marker sent now: NOTIFYs arrive in commit order, so nothing sent before is left out."""
    async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as other:
        await other.execute("SELECT pg_notify('foreman', '{\"marker\": true}')")
    heard = []
    async for notice in listener.notifies(timeout=10):
        message = json.loads(notice.payload)
        if message.get("marker"):
            return heard
        heard.append(message)
    raise AssertionError(f"no marker after {heard}")


async def test_a_finish_announces_the_end_in_its_own_statement(open_node: OpenNode, pg_url: str) -> None:
    """The end is heard once, when the row is ended: with the reply where a client waits, never for a job lost."""
    a = await open_node("a")
    watched, unwatched, lost, big = (new_job("m1") for _ in range(4))
    await a.insert_many([watched, unwatched, lost, big])
    claims = [await a.claim(holding("m1"), 1.0) for _ in range(4)]
    assert all(claims)
    jobs = {c.job.id: c.job for c in claims if c}
    with psycopg.connect(pg_url, autocommit=True) as db:
        db.execute("UPDATE jobs SET watchers = '{a,b}' WHERE id = ANY(%s)", ([watched.id, big.id],))
    reply = b'{"message": {"content": "hi"}}'
    async with await psycopg.AsyncConnection.connect(pg_url, autocommit=True) as listener:
        await listener.execute("LISTEN foreman")
        for job_id in (watched.id, unwatched.id):
            ended = Ended(JobState.DONE, 200, reply)
            await a.finish(jobs[job_id], JobState.DONE, 2.0, status=200, result=reply, ended=ended)
            # Once more, as after an answer lost with the connection: ended already, nothing is said twice.
            await a.finish(jobs[job_id], JobState.DONE, 2.0, status=200, result=reply, ended=ended)
        heard = await _heard_before_marker(listener, pg_url)
        assert [(m["n"], m["j"], m["e"]["k"], m["e"]["s"]) for m in heard] == [
            ("a", watched.id, "end", "done"),
            ("a", unwatched.id, "end", "done"),
        ]
        # Node b waits for `watched`: it hears the reply; for `unwatched` no one does.
        assert [base64.b64decode(m["e"]["b"]) for m in heard] == [reply, b""]
        assert {(await a.get(job_id)).state for job_id in (watched.id, unwatched.id)} == {JobState.DONE}  # type: ignore[union-attr]
        # Another node took the job meanwhile (this one's lease ran out): no record, so no end.
        with psycopg.connect(pg_url, autocommit=True) as db:
            db.execute("UPDATE jobs SET node = 'b' WHERE id = %s", (lost.id,))
        await a.finish(
            jobs[lost.id],
            JobState.DONE,
            2.0,
            status=200,
            result=reply,
            ended=Ended(JobState.DONE, 200, reply),
        )
        assert await _heard_before_marker(listener, pg_url) == []
        assert (await a.get(lost.id)).state is JobState.WORKING  # type: ignore[union-attr]
        # A reply too big for a payload goes as a relay row, named by the notification.
        large = b'"' + b"x" * 9000 + b'"'
        await a.finish(
            jobs[big.id], JobState.DONE, 2.0, status=200, result=large, ended=Ended(JobState.DONE, 200, large)
        )
        [relayed] = await _heard_before_marker(listener, pg_url)
        assert relayed["n"] == "a"
        with psycopg.connect(pg_url, autocommit=True) as db:
            row = db.execute("SELECT job_id, data FROM relay WHERE id = %s", (relayed["relay"],)).fetchone()
        assert row is not None and row[0] == big.id
        assert base64.b64decode(json.loads(bytes(row[1]))["e"]["b"]) == large


async def test_idempotency_keys_hold_across_nodes(open_node: OpenNode) -> None:
    """The same key sent to two nodes makes one job; a different request under it is refused."""
    a, b = await open_node("a"), await open_node("b")
    keyed = replace(new_job("m1"), idempotency_key="k1")
    first = await a.submit(Submission(keyed, "h1"))
    again = await b.submit(Submission(replace(keyed, id=str(ULID())), "h1"))
    assert first.new and not again.new and again.job_id == first.job_id
    with pytest.raises(IdempotencyConflict):
        await b.submit(Submission(replace(keyed, id=str(ULID())), "h2"))


def test_serve_with_no_database_server_exits_1_for_systemd_to_retry(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """An unreachable server is not a bad setting: one line, exit 1 (restarted), the password not shown."""
    url = f"postgresql://foreman:secret@127.0.0.1:{free_port()}/foreman"
    argv = ["serve", "--host", f"127.0.0.1:{free_port()}", "--db", url, "--log-format", "json"]
    assert main(argv, environ={}) == 1
    out = capsys.readouterr().out
    assert "foreman.db_unreachable" in out and "Connection refused" in out
    assert "secret" not in out and "Traceback" not in out


def test_serve_on_a_database_of_something_else_exits_78(
    pg_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A database that holds other tables stops `foreman serve` with EX_CONFIG, so systemd stops retrying."""
    with psycopg.connect(pg_url, autocommit=True) as db:
        db.execute("CREATE TABLE invoices (id int)")
    argv = ["serve", "--host", f"127.0.0.1:{free_port()}", "--db", pg_url, "--log-format", "json"]
    assert main(argv, environ={}) == 78
    out = capsys.readouterr().out
    assert "foreman.db_refused" in out and "not a foreman queue" in out
