"""Batches on a PostgreSQL queue shared by two nodes: any node sees the files, the lines run on the shared queue."""

from __future__ import annotations

import json

import openai

from tests.clients.test_openai_batches import CHAT, chat_line, file_lines, finished, jsonl
from tests.cluster.test_shared_queue import node, query
from tests.daemon.test_webhooks import SECRET, Receiver, receiver
from tests.support.helpers import ASYNC, MakeForeman, MakeStub, chat_body, eventually

__all__ = ["receiver"]  # the fixture, shared with the daemon's webhook tests


async def test_a_batch_across_two_nodes(make_stub: MakeStub, make_foreman: MakeForeman, pg_url: str) -> None:
    """A file uploaded to one node makes a batch on the other; the lines run on the shared queue; each line is output once."""
    stubs = [await make_stub(token_delay=0.005), await make_stub(token_delay=0.005)]
    one = await node(make_foreman, stubs[0], pg_url, "one")
    two = await node(make_foreman, stubs[1], pg_url, "two")
    first = openai.AsyncOpenAI(base_url=one.url + "/v1", api_key="x", max_retries=0)
    second = openai.AsyncOpenAI(base_url=two.url + "/v1", api_key="x", max_retries=0)
    try:
        items = [chat_line(f"r{i}", ["llama3", "mistral"][i % 2], f"q{i}") for i in range(30)]
        file = await first.files.create(file=("in.jsonl", jsonl(items)), purpose="batch")
        assert (await second.files.content(file.id)).content == jsonl(items)
        batch = await second.batches.create(input_file_id=file.id, endpoint=CHAT, completion_window="24h")
        done = await finished(first, batch.id, within=60)
        assert done.status == "completed" and done.request_counts is not None
        assert (done.request_counts.completed, done.request_counts.failed) == (30, 0)
        output = await file_lines(second, done.output_file_id)
        assert [line["custom_id"] for line in output] == [f"r{i}" for i in range(30)]
        assert all(line["response"]["status_code"] == 200 for line in output)
        ran = [len([r for r in s.stub.inference_requests() if r.outcome == "ok"]) for s in stubs]
        assert sum(ran) == 30, ran
        assert [b.id async for b in first.batches.list()] == [batch.id]
        assert len(query(pg_url, "SELECT 1 FROM files WHERE purpose = 'batch_output'")) == 1
    finally:
        await first.close()
        await second.close()


async def test_each_event_is_delivered_by_one_node(
    make_stub: MakeStub, make_foreman: MakeForeman, pg_url: str, receiver: Receiver
) -> None:
    """Two nodes with the same webhook: a batch's event and an async job's event each arrive once."""
    hooks = {"webhook_url": (("hook", receiver.url),), "webhook_secret": SECRET, "webhook_backoff": 0}
    stub = await make_stub()
    one = await node(make_foreman, stub, pg_url, "one", **hooks)
    await node(make_foreman, await make_stub(), pg_url, "two", **hooks)
    client = openai.AsyncOpenAI(base_url=one.url + "/v1", api_key="x", max_retries=0)
    try:
        file = await client.files.create(
            file=("in.jsonl", jsonl([chat_line("a", "llama3", "x")])), purpose="batch"
        )
        batch = await client.batches.create(input_file_id=file.id, endpoint=CHAT, completion_window="24h")
        await finished(client, batch.id, within=30)
        answer = await one.client.post(
            "/api/chat", json=chat_body("mistral"), headers={**ASYNC, "X-Foreman-Webhook": "hook"}
        )
        job_id = (await answer.json())["id"]

        def outbox() -> list[tuple[str, int]]:
            return [
                (str(state), int(n))
                for state, n in query(pg_url, "SELECT state, attempts FROM webhook_outbox")
            ]

        await eventually(lambda: outbox() == [("delivered", 1)] * 2, within=15, what="both events delivered")
        events = sorted(
            (json.loads(body)["type"], json.loads(body)["data"]["id"]) for _, body in receiver.received
        )
        assert events == [("batch.completed", batch.id), ("job.completed", job_id)]
    finally:
        await client.close()
