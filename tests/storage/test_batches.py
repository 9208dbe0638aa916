"""The batch store's contract, on SQLite and on PostgreSQL: files in parts, batches that end once, the outbox's leases."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from foreman.config import Config
from foreman.storage import backends
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


@pytest.fixture(params=["sqlite", "postgres"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[BatchStore]:
    """The batch store FOREMAN_DB opens, with the rest of the backend."""
    db: Path | str = tmp_path / "q.db"
    if request.param == "postgres":
        db = new_database(request.getfixturevalue("pg_server"))
    async with backends.opened(Config(db_path=db, node="n1"), clock=time.time) as backend:
        yield backend.batches


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
