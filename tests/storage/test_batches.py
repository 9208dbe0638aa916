"""The batch store's contract, on SQLite and on PostgreSQL: files in parts, batches that end once, the outbox's leases."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from foreman.config import Config
from foreman.job import JobState
from foreman.storage import Submission, backends
from foreman.storage.batches import (
    PART_BYTES,
    BatchStore,
    Delivery,
    Line,
    StoredBatch,
    StoredFile,
    split,
)
from tests.conftest import new_database
from tests.storage.contract import new_job, resident


@pytest.fixture(params=["sqlite", "postgres"])
async def backend(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[backends.Backend]:
    """The backend FOREMAN_DB opens: its job store and its batch store."""
    db: Path | str = tmp_path / "q.db"
    if request.param == "postgres":
        db = new_database(request.getfixturevalue("pg_server"))
    async with backends.opened(Config(db_path=db, node="n1"), clock=time.time) as opened:
        yield opened


@pytest.fixture
def store(backend: backends.Backend) -> BatchStore:
    return backend.batches


def batch(batch_id: str, status: str = "finalizing") -> StoredBatch:
    return StoredBatch(batch_id, status, "/v1/chat/completions", "file-in", "24h", 100.0, 100.0 + 86400)


async def test_a_file_comes_back_whole_from_its_parts(store: BatchStore) -> None:
    """A file of several parts reads back byte for byte; listing pages by id in either order."""
    data = bytes(range(256)) * (PART_BYTES // 256 * 2 + 3)
    await store.put_file(StoredFile("file-a", "a.jsonl", "batch", len(data), 1.0), split(data))
    await store.put_file(StoredFile("file-b", "b.jsonl", "batch", 1, 2.0), [b"x"])
    assert await store.content("file-a") == data
    assert [f.id for f in await store.files(purpose="batch", after=None, limit=10, newest_first=True)] == [
        "file-b",
        "file-a",
    ]
    assert [f.id for f in await store.files(purpose=None, after="file-a", limit=10, newest_first=False)] == [
        "file-b"
    ]
    assert await store.delete_file("file-a") and await store.content("file-a") is None
    assert not await store.delete_file("file-a")


async def test_a_batch_ends_once_with_its_files_and_events(store: BatchStore) -> None:
    """`finish` writes the files, the change and the deliveries together, and only while the status is expected."""
    await store.put_batch(batch("batch_1"))
    await store.add_lines("batch_1", [Line(1, "a", None, 404, "model 'x' not found")])
    out = StoredFile("file-out", "o.jsonl", "batch_output", 3, 5.0)
    event = Delivery("evt_1", "hook", b"{}", 0, 5.0, 5.0)
    changes = {
        "status": "completed",
        "completed": 3,
        "output_file_id": out.id,
        "times": {"completed_at": 5.0},
    }
    assert await store.finish("batch_1", ("finalizing",), changes, [(out, b"a\nb")], [event])
    again = StoredFile("file-out-2", "o.jsonl", "batch_output", 3, 6.0)
    assert not await store.finish("batch_1", ("finalizing",), changes, [(again, b"x")], [event])
    ended = await store.batch("batch_1")
    assert ended is not None and (ended.status, ended.completed, ended.output_file_id) == (
        "completed",
        3,
        out.id,
    )
    assert ended.times == {"completed_at": 5.0}
    assert await store.content("file-out") == b"a\nb" and await store.file("file-out-2") is None
    assert await store.delivery_counts() == {"pending": 1}
    assert await store.outcomes("batch_1") == []  # the output file holds the lines now


class CutShort(list[bytes]):
    """Parts of an upload whose client went away after the first: what a crash mid-upload leaves too."""

    def __iter__(self) -> Iterator[bytes]:
        yield b"first part"
        raise ConnectionResetError("the client went away")


async def test_an_upload_cut_short_is_dropped(store: BatchStore) -> None:
    """A file whose parts never all arrived is not listed, and is deleted once it is old enough."""
    await store.put_file(StoredFile("file-done", "d.jsonl", "batch", 1, 10.0), [b"x"])
    with pytest.raises(ConnectionResetError):
        await store.put_file(StoredFile("file-cut", "c.jsonl", "batch", 20, 10.0), CutShort())
    assert await store.file("file-cut") is None and await store.content("file-cut") is None
    assert [f.id for f in await store.files(purpose=None, after=None, limit=10, newest_first=True)] == [
        "file-done"
    ]
    assert await store.drop_unfinished_uploads(5.0) == 0  # too young: another node may still be writing it
    assert await store.drop_unfinished_uploads(11.0) == 1
    assert await store.drop_unfinished_uploads(11.0) == 0


async def test_a_delivery_is_leased_to_one_owner(store: BatchStore) -> None:
    """Two owners asking at once: one gets the delivery; after a retry it is due again; given up, it counts as failed."""
    await store.enqueue_events([Delivery("evt_1", "hook", b"{}", 0, 10.0, 10.0)])
    first = await store.due_deliveries(10.0, 60.0, "node-a", 10)
    assert [d.id for d in first] == ["evt_1"]
    assert await store.due_deliveries(11.0, 60.0, "node-b", 10) == []
    await store.retry_later(first[0], 20.0, "answered 500")
    assert await store.due_deliveries(15.0, 60.0, "node-b", 10) == []
    [second] = await store.due_deliveries(20.0, 60.0, "node-b", 10)
    assert (second.id, second.attempts) == ("evt_1", 1)
    await store.give_up(second, "answered 500")
    assert await store.delivery_counts() == {"failed": 1}
    assert await store.due_deliveries(10_000.0, 60.0, "node-a", 10) == []


async def test_a_lease_that_runs_out_lets_another_owner_deliver(store: BatchStore) -> None:
    """A node that took a delivery and died: after the lease, another takes it, same id."""
    await store.enqueue_events([Delivery("evt_1", "hook", b"{}", 0, 10.0, 10.0)])
    assert len(await store.due_deliveries(10.0, 60.0, "dead", 10)) == 1
    [taken] = await store.due_deliveries(71.0, 60.0, "alive", 10)
    assert taken.id == "evt_1"


async def ended(store: BatchStore, batch_id: str, input_file: str, at: float, files: bool = True) -> None:
    """A batch on `input_file` that completed at `at`, with an output and an error file of three parts."""
    await store.put_batch(
        StoredBatch(batch_id, "finalizing", "/v1/chat/completions", input_file, "24h", 1.0, 1.0 + 86400)
    )
    data = b"x" * (PART_BYTES * 2 + 1)
    outputs = [
        (StoredFile(f"{batch_id}-{name}", "o.jsonl", "batch_output", len(data), at), data)
        for name in (("out", "err") if files else ())
    ]
    changes = {"status": "completed", "times": {"completed_at": at}}
    if files:
        changes |= {"output_file_id": f"{batch_id}-out", "error_file_id": f"{batch_id}-err"}
    assert await store.finish(batch_id, ("finalizing",), changes, outputs, [])


async def prune(store: BatchStore, cutoff: float) -> tuple[int, set[str]]:
    """One retention round over the batches: how many went, and the files that went with them."""
    count, gone = 0, set()
    while (round_ := await store.prune_batches(cutoff, 2))[0]:
        count += round_[0]
        for file_id in round_[1]:
            assert await store.file(file_id) is None  # hidden at once, before its parts go
            while await store.drop_file_parts(file_id, 1):
                gone.add(file_id)
            assert await store.file(file_id) is None and await store.content(file_id) is None
    return count, gone


async def test_ended_batches_go_with_their_files_and_running_ones_stay(store: BatchStore) -> None:
    """Past the cutoff an ended batch goes with its output, error and input files; a running batch, the
    input file another kept batch names, and an upload no batch used stay."""
    for name in ("file-shared", "file-running", "file-unused"):
        await store.put_file(StoredFile(name, "in.jsonl", "batch", 1, 0.0), [b"{"])
    await ended(store, "batch_a", "file-shared", at=10.0)
    await ended(store, "batch_b", "file-shared", at=100.0, files=False)
    await ended(store, "batch_c", "file-other", at=20.0)  # its input file was deleted by the user
    await store.put_batch(replace(batch("batch_run", "in_progress"), input_file_id="file-running"))
    await store.add_lines("batch_run", [Line(1, "a", "job-1")])
    assert await prune(store, 50.0) == (2, {"batch_a-out", "batch_a-err", "batch_c-out", "batch_c-err"})
    assert await store.batch("batch_a") is None and await store.batch("batch_c") is None
    assert await store.content("file-shared") == b"{"  # batch_b still names it
    assert await prune(store, 50.0) == (0, set())
    assert await prune(store, 1e9) == (1, {"file-shared"})
    assert [b.id for b in await store.batches(after=None, limit=10)] == ["batch_run"]
    assert await store.line_states("batch_run") == {"rejected": 1}  # its lines stay with it
    kept = await store.files(purpose=None, after=None, limit=10, newest_first=False)
    assert [f.id for f in kept] == ["file-running", "file-unused"]


async def test_a_listed_file_is_never_dropped_part_by_part(store: BatchStore) -> None:
    """drop_file_parts only deletes files retention hid; a complete one stays whole."""
    await store.put_file(StoredFile("file-a", "a.jsonl", "batch", 3, 0.0), [b"abc"])
    assert not await store.drop_file_parts("file-a", 1)
    assert await store.content("file-a") == b"abc"


async def test_delivered_and_given_up_deliveries_are_pruned_and_pending_ones_kept(store: BatchStore) -> None:
    """The outbox keeps what still has to go out; what went or was given up before the cutoff goes."""
    await store.enqueue_events([Delivery(f"evt_{i}", "hook", b"{}", 0, 1.0, 10.0) for i in range(4)])
    sent, dropped, late, _ = await store.due_deliveries(10.0, 60.0, "node-a", 10)
    await store.delivered(sent)
    await store.give_up(dropped, "410 Gone")
    await store.delivered(replace(late, next_at=100.0))
    assert await store.prune_deliveries(50.0, 10) == 2
    assert await store.prune_deliveries(50.0, 10) == 0
    assert await store.delivery_counts() == {"pending": 1}
    assert await store.prune_deliveries(1e9, 10) == 1
    assert await store.delivery_counts() == {"pending": 1}


async def test_the_jobs_of_a_running_batch_outlive_the_retention(backend: backends.Backend) -> None:
    """A line's job that ended long ago stays while its batch runs (its output is written from it), then goes."""
    jobs, store = backend.storage, backend.batches
    job = new_job("a:latest")
    await jobs.submit(Submission(job))
    claim = await jobs.claim(resident("a:latest"), now=0)
    assert claim is not None
    await jobs.finish(claim.job, JobState.DONE, 1.0, status=200, result=b"{}")
    await store.put_batch(batch("batch_run", "in_progress"))
    await store.add_lines("batch_run", [Line(1, "a", job.id)])
    assert await jobs.prune(cutoff=50.0, batch=10) == 0
    assert await store.line_states("batch_run") == {"done": 1}
    assert await store.update("batch_run", ("in_progress",), status="finalizing")
    assert await store.finish("batch_run", ("finalizing",), {"status": "completed"}, [], [])
    assert await jobs.prune(cutoff=50.0, batch=10) == 1
