"""The queue file: refused when it is not ours or not sound, migrated when old, and never lost to a full disk."""

from __future__ import annotations

import asyncio
import json
import socket
import sqlite3
from pathlib import Path

import aiohttp
import pytest

from foreman.api.keys import STORAGE
from foreman.cli import main
from foreman.errors import StoreError
from foreman.storage.sqlite.queue_file import QueueFile
from foreman.storage.sqlite.schema import APPLICATION_ID, SCHEMA_VERSION
from stub_ollama import StubServer
from tests.support.helpers import Foreman, MakeForeman, chat_body, hold_worker, submit

# The schema of the first foreman release, before the job API.
SCHEMA_V1 = """
CREATE TABLE jobs (
    id TEXT PRIMARY KEY, state TEXT NOT NULL, endpoint TEXT NOT NULL, model TEXT NOT NULL,
    model_key TEXT NOT NULL, stream INTEGER NOT NULL, body BLOB NOT NULL,
    attempt INTEGER NOT NULL DEFAULT 0, created_at REAL NOT NULL, started_at REAL,
    finished_at REAL, status INTEGER, error TEXT, result BLOB
);
CREATE INDEX jobs_queued ON jobs (model_key, id) WHERE state = 'queued';
CREATE INDEX jobs_active ON jobs (state) WHERE state IN ('loading', 'working');
PRAGMA user_version = 1;
"""


def test_another_programs_database_is_refused_and_left_alone(tmp_path: Path) -> None:
    """A SQLite file that is not foreman's stops start-up with a clear message and is not written to."""
    path = tmp_path / "app.db"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE users (name TEXT)")
    before = path.read_bytes()
    with pytest.raises(StoreError, match="not a foreman queue"):
        QueueFile(path)
    assert path.read_bytes() == before


def test_a_file_that_is_not_sqlite_is_refused_and_left_alone(tmp_path: Path) -> None:
    """Pointing FOREMAN_DB at some other file never overwrites it."""
    path = tmp_path / "notes.txt"
    path.write_text("my notes\n" * 500)
    with pytest.raises(StoreError, match="not a usable SQLite database"):
        QueueFile(path)
    assert path.read_text() == "my notes\n" * 500


def test_a_damaged_queue_is_refused(tmp_path: Path) -> None:
    """A queue that fails its integrity check is not used."""
    path = tmp_path / "q.db"
    store = QueueFile(path)
    store._db.executemany(
        "INSERT INTO jobs (id, state, endpoint, model, model_key, stream, body, created_at)"
        " VALUES (?, 'queued', '/api/chat', 'm', 'm:latest', 0, ?, 0)",
        ((f"{i:026d}", b"x" * 200) for i in range(2000)),
    )
    store._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    store.close()
    data = bytearray(path.read_bytes())
    page = 4096
    data[3 * page : 7 * page] = b"\xff" * (4 * page)  # scribble over four b-tree pages
    path.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="failed its integrity check"):
        QueueFile(path)


def test_a_queue_from_a_newer_foreman_is_refused(tmp_path: Path) -> None:
    """foreman will not guess at a schema it does not know."""
    path = tmp_path / "q.db"
    QueueFile(path).close()
    with sqlite3.connect(path) as db:
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(StoreError, match="newer foreman"):
        QueueFile(path)


def test_an_old_queue_migrates_forward_with_its_jobs(tmp_path: Path) -> None:
    """A schema-1 queue with waiting work opens as the current schema, and the work is still there."""
    path = tmp_path / "q.db"
    with sqlite3.connect(path) as db:
        db.executescript(SCHEMA_V1)
        db.execute(
            "INSERT INTO jobs (id, state, endpoint, model, model_key, stream, body, created_at)"
            " VALUES ('01J0000000000000000000000A', 'queued', '/api/chat', 'llama3', 'llama3:latest', 0, ?, 1)",
            (json.dumps(chat_body("llama3")).encode(),),
        )
    store = QueueFile(path)
    assert store._db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert store._db.execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID
    [queue] = store.queues()
    assert (queue.model_key, queue.waiting) == ("llama3:latest", 1)
    job = store.get("01J0000000000000000000000A")
    assert job is not None and job.respond_async is False
    store.close()


def test_serve_refuses_a_foreign_database_with_exit_78(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`foreman serve` on someone else's database says why and exits with EX_CONFIG, so systemd stops retrying."""
    path = tmp_path / "app.db"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE users (name TEXT)")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    argv = ["serve", "--host", f"127.0.0.1:{port}", "--db", str(path), "--log-format", "json"]
    assert main(argv, environ={}) == 78
    out = capsys.readouterr().out
    assert "foreman.db_refused" in out and "not a foreman queue" in out and "Traceback" not in out


async def test_a_full_disk_refuses_new_work_and_keeps_the_old(
    http: aiohttp.ClientSession, stub_server: StubServer, make_foreman: MakeForeman
) -> None:
    """When the database cannot grow, new requests get 503; the daemon and its accepted jobs carry on."""
    foreman = await make_foreman(stub_server.url)
    running = await hold_worker(http, foreman, stub_server.stub, "llama3")
    waiting = await submit(http, foreman, chat_body("mistral", "accepted before"))
    store = foreman.app[STORAGE]

    def fill_the_disk(s: QueueFile) -> None:
        (pages,) = s._db.execute("PRAGMA page_count").fetchone()
        s._db.execute(f"PRAGMA max_page_count = {pages}")  # SQLite's own "disk full"

    await store.run(fill_the_disk)
    big = chat_body("llama3", "x" * 50_000)
    answer = await foreman.client.post("/api/chat", json=big)
    assert answer.status == 503
    assert "cannot write its queue" in (await answer.json())["error"]
    assert (await foreman.client.get("/healthz")).status == 200
    stub_server.stub.faults.release_hung()
    assert [answer.status for answer in await asyncio.gather(running, waiting)] == [200, 200]
    assert foreman.states() == ["done", "done"]


async def test_a_database_locked_by_another_program_gets_503(
    stub_server: StubServer, make_foreman: MakeForeman
) -> None:
    """Another process holding the write lock makes intake answer 503 instead of hanging or crashing."""
    foreman = await make_foreman(stub_server.url)
    store = foreman.app[STORAGE]
    await store.run(lambda s: s._db.execute("PRAGMA busy_timeout = 50"))
    other = sqlite3.connect(foreman.config.db_path, isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    try:
        answer = await foreman.client.post("/api/chat", json=chat_body("llama3"))
        assert answer.status == 503 and "locked" in (await answer.json())["error"]
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert (await foreman.client.post("/api/chat", json=chat_body("llama3"))).status == 200


async def test_a_full_queue_answers_like_a_busy_ollama(
    stub_server: StubServer, make_foreman: MakeForeman
) -> None:
    """Beyond FOREMAN_MAX_QUEUE waiting jobs, new ones get Ollama's 503 wording and a Retry-After."""
    foreman = await make_foreman(stub_server.url, max_queue=2)
    await stub_server.stop_listening()  # nothing drains
    for i in range(2):
        answer = await foreman.client.post(
            "/api/chat", json=chat_body("llama3", str(i)), headers={"Prefer": "respond-async"}
        )
        assert answer.status == 202
    answer = await foreman.client.post("/api/chat", json=chat_body("llama3", "one too many"))
    assert answer.status == 503 and answer.headers["Retry-After"] == "5"
    assert (await answer.json())["error"].startswith(
        "server busy, please try again.  maximum pending requests exceeded"
    )
    assert len(foreman.jobs()) == 2


async def test_sync_full_answers_only_after_an_fsync_of_the_log(
    stub_server: StubServer, make_foreman: MakeForeman
) -> None:
    """FOREMAN_SYNC=full fsyncs the write-ahead log before a job's 202 leaves; the default does not."""
    from foreman.api.keys import STORAGE

    for sync, fsyncs in (("full", 1), ("normal", 0)):
        foreman = await make_foreman(stub_server.url, sync=sync)
        await stub_server.stop_listening()  # nothing drains
        answer = await foreman.client.post(
            "/api/chat", json=chat_body("llama3"), headers={"Prefer": "respond-async"}
        )
        assert answer.status == 202
        assert foreman.app[STORAGE].fsyncs == fsyncs, sync
        await foreman.close()
        await stub_server.resume_listening()


async def test_too_many_messages_is_a_400(foreman: Foreman) -> None:
    """A messages array beyond any real conversation is refused with a reason."""
    body = {"model": "llama3", "messages": [{"role": "user", "content": ""}] * 10_001}
    answer = await foreman.client.post("/api/chat", json=body)
    assert answer.status == 400 and "too many messages" in (await answer.json())["error"]


async def test_a_slow_body_times_out_with_408(stub_server: StubServer, make_foreman: MakeForeman) -> None:
    """A client that stops sending its body is cut off instead of holding a handler."""
    foreman = await make_foreman(stub_server.url, read_timeout=0.2)
    host, port = foreman.client.server.host, foreman.client.server.port
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(b'POST /api/chat HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1000\r\n\r\n{"model":')
    await writer.drain()
    status_line = await asyncio.wait_for(reader.readline(), 5)
    writer.close()
    await writer.wait_closed()
    assert b" 408 " in status_line
    assert foreman.jobs() == []
