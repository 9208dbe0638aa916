"""A batch survives `kill -9`: after the restart it goes on, and every custom_id is in its output once."""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
import sys
import time
from pathlib import Path

import openai
import pytest

from tests.support.helpers import MakeForeman, MakeStub, eventually
from tests.support.processes import free_port, listening, serve

CHAT = "/v1/chat/completions"


async def ended(client: openai.AsyncOpenAI, batch_id: str, within: float) -> openai.types.Batch:
    """The batch once it reached an end state, polled through the SDK."""
    deadline = time.monotonic() + within
    while True:
        batch = await client.batches.retrieve(batch_id)
        if batch.status in ("completed", "failed", "cancelled", "expired") or time.monotonic() > deadline:
            return batch
        await asyncio.sleep(0.05)


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL")
async def test_kill_9_mid_batch_then_restart(make_stub: MakeStub, tmp_path: Path) -> None:
    """foreman killed with SIGKILL halfway through a 60-line batch finishes it after a restart, no line lost or doubled."""
    server = await make_stub(token_delay=0.002)
    port, db = free_port(), tmp_path / "crash.db"
    process = serve(port, server.url, db, db.with_suffix(".log"))
    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
    try:
        await listening(port, process)
        models = ["llama3", "mistral", "qwen2"]
        items = [
            {
                "custom_id": f"line-{i}",
                "method": "POST",
                "url": CHAT,
                "body": {"model": models[i % 3], "messages": [{"role": "user", "content": f"q{i}"}]},
            }
            for i in range(60)
        ]
        content = b"".join(json.dumps(item).encode() + b"\n" for item in items)
        file = await client.files.create(file=("in.jsonl", content), purpose="batch")
        batch = await client.batches.create(input_file_id=file.id, endpoint=CHAT, completion_window="24h")

        def done() -> int:
            with sqlite3.connect(db) as conn:
                return int(conn.execute("SELECT count(*) FROM jobs WHERE state = 'done'").fetchone()[0])

        await eventually(lambda: done() >= 15, within=30, what="some lines done")
        process.send_signal(signal.SIGKILL)
        process.wait()
        assert done() < 60, "the batch ended before the kill"

        process = serve(port, server.url, db, db.with_suffix(".log"))
        await listening(port, process)

        final = await ended(client, batch.id, within=60)
        assert final.status == "completed", final
        assert final.request_counts is not None and final.request_counts.completed == 60
        assert final.error_file_id is None and final.output_file_id is not None
        output = [
            json.loads(line)
            for line in (await client.files.content(final.output_file_id)).content.splitlines()
        ]
        assert sorted(line["custom_id"] for line in output) == sorted(f"line-{i}" for i in range(60))
        with sqlite3.connect(db) as conn:
            assert conn.execute("SELECT count(*) FROM jobs").fetchone()[0] == 60
    finally:
        await client.close()
        process.kill()
        process.wait()


async def test_a_crash_mid_enqueue_writes_no_line_twice(
    make_stub: MakeStub, make_foreman: MakeForeman, tmp_path: Path
) -> None:
    """A batch left `validating` with part of its lines written (a crash while enqueueing) enqueues the rest only."""
    server = await make_stub()
    server.stub.faults.hang_next(1)
    first = await make_foreman(server.url, shutdown_grace=0)
    client = openai.AsyncOpenAI(base_url=first.url + "/v1", api_key="x", max_retries=0)
    items = [
        {
            "custom_id": f"c{i}",
            "method": "POST",
            "url": CHAT,
            "body": {"model": "llama3", "messages": [{"role": "user", "content": f"q{i}"}]},
        }
        for i in range(20)
    ]
    content = b"".join(json.dumps(item).encode() + b"\n" for item in items)
    file = await client.files.create(file=("in.jsonl", content), purpose="batch")
    batch = await client.batches.create(input_file_id=file.id, endpoint=CHAT, completion_window="24h")
    await server.stub.wait_for(lambda s: s.faults.hung == 1)
    await client.close()
    await first.close()
    with sqlite3.connect(tmp_path / "foreman.db") as conn:  # what a kill -9 between two chunks leaves behind
        conn.execute("UPDATE batches SET status = 'validating', times = '{}' WHERE id = ?", (batch.id,))
        conn.execute("DELETE FROM batch_lines WHERE batch_id = ? AND line > 7", (batch.id,))
        conn.execute("DELETE FROM jobs WHERE id IN (SELECT id FROM jobs ORDER BY id DESC LIMIT 5)")
    server.stub.faults.release_hung()

    second = await make_foreman(server.url)
    client = openai.AsyncOpenAI(base_url=second.url + "/v1", api_key="x", max_retries=0)
    try:
        final = await ended(client, batch.id, within=30)
        assert final.status == "completed" and final.request_counts is not None
        assert final.request_counts.completed == 20
        assert final.output_file_id is not None
        output = [
            json.loads(line)
            for line in (await client.files.content(final.output_file_id)).content.splitlines()
        ]
        assert [line["custom_id"] for line in output] == [f"c{i}" for i in range(20)]
        assert len(second.jobs()) == 20
        prompts = sorted(r.prompt for r in server.stub.inference_requests() if r.outcome == "ok")
        assert prompts == sorted(f"q{i}" for i in range(20))
    finally:
        await client.close()
