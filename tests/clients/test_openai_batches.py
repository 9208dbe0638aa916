"""OpenAI's Files and Batch APIs through the official openai SDK: each line runs as a batch-class job."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import openai
import pytest

from stub_ollama import Stub
from tests.support.helpers import (
    FakeClock,
    Foreman,
    MakeForeman,
    MakeStub,
    eventually,
    hold_worker,
    reply_text,
)

OpenAIClient = Callable[[str], openai.AsyncOpenAI]
CHAT = "/v1/chat/completions"


def chat_line(custom_id: str, model: str, content: str) -> dict[str, Any]:
    body = {"model": model, "messages": [{"role": "user", "content": content}]}
    return {"custom_id": custom_id, "method": "POST", "url": CHAT, "body": body}


def jsonl(items: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(item).encode() + b"\n" for item in items)


async def upload(client: openai.AsyncOpenAI, items: list[dict[str, Any]] | bytes) -> str:
    content = items if isinstance(items, bytes) else jsonl(items)
    file = await client.files.create(file=("requests.jsonl", content), purpose="batch")
    return file.id


async def finished(client: openai.AsyncOpenAI, batch_id: str, within: float = 20.0) -> openai.types.Batch:
    """The batch once it reached an end state."""
    seen: list[openai.types.Batch] = []

    async def poll() -> bool:
        seen.append(await client.batches.retrieve(batch_id))
        return seen[-1].status in ("completed", "failed", "cancelled", "expired")

    await until(poll, within, f"batch {batch_id} to end")
    return seen[-1]


async def until(check: Callable[[], Awaitable[bool]], within: float, what: str) -> None:
    """Poll the coroutine `check` until it holds, failing after `within` seconds."""
    deadline = time.monotonic() + within
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


async def file_lines(client: openai.AsyncOpenAI, file_id: str | None) -> list[dict[str, Any]]:
    assert file_id is not None
    content = await client.files.content(file_id)
    return [json.loads(line) for line in content.content.splitlines()]


async def test_chat_batch_with_a_bad_line(foreman: Foreman, stub: Stub, openai_client: OpenAIClient) -> None:
    """Good lines land in the output file in OpenAI's line format; an unknown model's line in the error file."""
    client = openai_client(foreman.url)
    items = [chat_line(f"r{i}", model, f"q{i}") for i, model in enumerate(["llama3", "mistral", "llama3"])]
    items.append(chat_line("bad", "no-such-model", "q3"))
    batch = await client.batches.create(
        input_file_id=await upload(client, items),
        endpoint=CHAT,
        completion_window="24h",
        metadata={"run": "t1"},
    )
    assert batch.status == "validating" and batch.object == "batch" and batch.metadata == {"run": "t1"}
    done = await finished(client, batch.id)
    assert done.status == "completed"
    assert done.request_counts is not None
    assert (done.request_counts.total, done.request_counts.completed, done.request_counts.failed) == (4, 3, 1)
    assert done.in_progress_at and done.finalizing_at and done.completed_at
    output = await file_lines(client, done.output_file_id)
    assert [line["custom_id"] for line in output] == ["r0", "r1", "r2"]
    for line, (model, prompt) in zip(
        output, [("llama3", "q0"), ("mistral", "q1"), ("llama3", "q2")], strict=True
    ):
        assert line["id"].startswith("batch_req_") and line["error"] is None
        assert line["response"]["status_code"] == 200
        body = line["response"]["body"]
        assert body["object"] == "chat.completion"
        assert body["choices"][0]["message"]["content"] == reply_text(model, prompt)
    [error] = await file_lines(client, done.error_file_id)
    assert error["custom_id"] == "bad" and error["response"]["status_code"] == 404
    assert "no-such-model" in error["response"]["body"]["error"]["message"]
    # Every line ran as a batch-class async job.
    jobs = foreman.jobs()
    assert len(jobs) == 3 and {(j["priority"], j["respond_async"]) for j in jobs} == {("batch", 1)}
    # Drained by model across the file: both llama3 lines back to back.
    models = [r.model for r in stub.inference_requests() if r.outcome == "ok"]
    assert models in (["llama3", "llama3", "mistral"], ["mistral", "llama3", "llama3"]), models


async def test_malformed_file_fails_validation(foreman: Foreman, openai_client: OpenAIClient) -> None:
    """A line that is not JSON, a repeated custom_id and a wrong url fail the batch with OpenAI's errors."""
    client = openai_client(foreman.url)
    content = jsonl([chat_line("a", "llama3", "x"), chat_line("a", "llama3", "y")])
    content += b"{not json\n" + jsonl([{**chat_line("c", "llama3", "z"), "url": "/v1/embeddings"}])
    batch = await client.batches.create(
        input_file_id=await upload(client, content), endpoint=CHAT, completion_window="24h"
    )
    done = await finished(client, batch.id)
    assert done.status == "failed" and done.failed_at
    assert done.errors is not None and done.errors.data is not None
    assert [(e.code, e.line) for e in done.errors.data] == [
        ("duplicate_custom_id", 2),
        ("invalid_json_line", 3),
        ("mismatched_endpoint", 4),
    ]
    assert foreman.jobs() == []


async def test_embeddings_batch(foreman: Foreman, openai_client: OpenAIClient) -> None:
    """An embeddings batch answers each line with OpenAI's embedding list."""
    client = openai_client(foreman.url)
    items = [
        {
            "custom_id": f"e{i}",
            "method": "POST",
            "url": "/v1/embeddings",
            "body": {"model": "nomic-embed-text", "input": text},
        }
        for i, text in enumerate(["alpha", "beta", "gamma"])
    ]
    batch = await client.batches.create(
        input_file_id=await upload(client, items), endpoint="/v1/embeddings", completion_window="24h"
    )
    done = await finished(client, batch.id)
    assert done.status == "completed" and done.error_file_id is None
    output = await file_lines(client, done.output_file_id)
    assert [line["custom_id"] for line in output] == ["e0", "e1", "e2"]
    for line in output:
        body = line["response"]["body"]
        assert body["object"] == "list" and body["data"][0]["object"] == "embedding"
        assert len(body["data"][0]["embedding"]) == 8


async def test_cancel_stops_the_waiting_lines(
    make_stub: MakeStub, make_foreman: MakeForeman, openai_client: OpenAIClient
) -> None:
    """Cancelling a batch whose first line runs cancels the lines still queued; the running one finishes."""
    server = await make_stub()
    foreman = await make_foreman(server.url)
    client = openai_client(foreman.url)
    server.stub.faults.hang_next(1)
    items = [chat_line(f"r{i}", "llama3", f"q{i}") for i in range(5)]
    batch = await client.batches.create(
        input_file_id=await upload(client, items), endpoint=CHAT, completion_window="24h"
    )
    await server.stub.wait_for(lambda s: s.faults.hung == 1)
    cancelling = await client.batches.cancel(batch.id)
    assert cancelling.status == "cancelling" and cancelling.cancelling_at
    await eventually(
        lambda: foreman.states().count("cancelled") == 4, what="the queued lines to be cancelled"
    )
    server.stub.faults.release_hung()
    done = await finished(client, batch.id)
    assert done.status == "cancelled" and done.cancelled_at
    assert done.request_counts is not None
    assert (done.request_counts.completed, done.request_counts.failed) == (1, 4)
    [output] = await file_lines(client, done.output_file_id)
    assert output["custom_id"] == "r0"
    errors = await file_lines(client, done.error_file_id)
    assert [(e["custom_id"], e["error"]["code"]) for e in errors] == [
        (f"r{i}", "batch_cancelled") for i in range(1, 5)
    ]
    assert len(server.stub.inference_requests()) == 1
    with pytest.raises(openai.ConflictError):
        await client.batches.cancel(batch.id)


async def test_list_pages_with_after_and_limit(foreman: Foreman, openai_client: OpenAIClient) -> None:
    """GET /v1/batches lists newest first, a page at a time, and the SDK's auto-paging walks them all."""
    client = openai_client(foreman.url)
    file_id = await upload(client, [chat_line("a", "llama3", "x")])
    created = [
        (await client.batches.create(input_file_id=file_id, endpoint=CHAT, completion_window="24h")).id
        for _ in range(5)
    ]
    first = await client.batches.list(limit=2)
    assert [b.id for b in first.data] == created[::-1][:2] and first.has_more
    second = await client.batches.list(limit=2, after=first.data[-1].id)
    assert [b.id for b in second.data] == created[::-1][2:4]
    assert [b.id async for b in client.batches.list(limit=2)] == created[::-1]


async def test_files_api(make_stub: MakeStub, make_foreman: MakeForeman, openai_client: OpenAIClient) -> None:
    """Upload, list, retrieve, read and delete a file; past the size limit or a wrong purpose is a clear 400."""
    server = await make_stub()
    foreman = await make_foreman(server.url, file_max=1000)
    client = openai_client(foreman.url)
    content = jsonl([chat_line("a", "llama3", "x")])
    file = await client.files.create(file=("mine.jsonl", content), purpose="batch")
    assert (file.object, file.filename, file.bytes, file.purpose, file.status) == (
        "file",
        "mine.jsonl",
        len(content),
        "batch",
        "processed",
    )
    assert (await client.files.retrieve(file.id)).id == file.id
    assert [f.id async for f in client.files.list(purpose="batch")] == [file.id]
    assert (await client.files.content(file.id)).content == content
    with pytest.raises(openai.BadRequestError, match="at most 1000 bytes"):
        await client.files.create(file=("big.jsonl", b"x" * 1001), purpose="batch")
    with pytest.raises(openai.BadRequestError, match="purpose"):
        await client.files.create(file=("f.jsonl", content), purpose="fine-tune")
    deleted = await client.files.delete(file.id)
    assert deleted.deleted and deleted.id == file.id
    with pytest.raises(openai.NotFoundError):
        await client.files.retrieve(file.id)
    assert [f.id async for f in client.files.list()] == []


async def test_too_many_lines_is_a_400(foreman: Foreman, openai_client: OpenAIClient) -> None:
    """A batch file of more than 50,000 lines is refused at upload, as OpenAI refuses it."""
    client = openai_client(foreman.url)
    line = json.dumps(chat_line("x", "llama3", "x")).encode() + b"\n"
    with pytest.raises(openai.BadRequestError, match="at most 50000"):
        await client.files.create(file=("big.jsonl", line * 50_001), purpose="batch")


async def test_batch_past_its_window_expires(
    make_stub: MakeStub, make_foreman: MakeForeman, openai_client: OpenAIClient
) -> None:
    """A batch still waiting 24 hours after it was created expires: its queued lines are cancelled."""
    server = await make_stub()
    clock = FakeClock(1_800_000_000.0)
    foreman = await make_foreman(server.url, clock=clock)
    client = openai_client(foreman.url)
    server.stub.faults.hang_next(1)
    items = [chat_line(f"r{i}", "llama3", f"q{i}") for i in range(3)]
    batch = await client.batches.create(
        input_file_id=await upload(client, items), endpoint=CHAT, completion_window="24h"
    )
    assert batch.expires_at == batch.created_at + 24 * 3600
    await server.stub.wait_for(lambda s: s.faults.hung == 1)
    clock.now += 24 * 3600 + 1
    await eventually(
        lambda: foreman.states().count("cancelled") == 2, what="the waiting lines to be cancelled"
    )
    server.stub.faults.release_hung()
    done = await finished(client, batch.id)
    assert done.status == "expired" and done.expired_at
    errors = await file_lines(client, done.error_file_id)
    assert [e["error"]["code"] for e in errors] == ["batch_expired", "batch_expired"]


async def test_lines_ollama_refuses_or_keeps_failing_go_to_the_error_file(
    make_stub: MakeStub, make_foreman: MakeForeman, openai_client: OpenAIClient
) -> None:
    """An Ollama 400 and a line that fails every attempt end in the error file with their status; the rest complete."""
    server = await make_stub()
    server.stub.faults.fail_model("qwen2:latest", status=400, error="invalid options")
    server.stub.faults.fail_model("mistral:latest", status=500, error="the runner crashed")
    foreman = await make_foreman(server.url, max_attempts=2)
    client = openai_client(foreman.url)
    items = [
        chat_line("ok", "llama3", "a"),
        chat_line("refused", "qwen2", "b"),
        chat_line("broken", "mistral", "c"),
    ]
    batch = await client.batches.create(
        input_file_id=await upload(client, items), endpoint=CHAT, completion_window="24h"
    )
    done = await finished(client, batch.id)
    assert done.status == "completed" and done.request_counts is not None
    assert (done.request_counts.completed, done.request_counts.failed) == (1, 2)
    assert [line["custom_id"] for line in await file_lines(client, done.output_file_id)] == ["ok"]
    errors = {line["custom_id"]: line for line in await file_lines(client, done.error_file_id)}
    assert errors["refused"]["response"]["status_code"] == 400
    # Ollama's message, not its JSON body quoted whole.
    assert errors["refused"]["response"]["body"]["error"]["message"] == "invalid options"
    assert errors["broken"]["response"]["status_code"] == 500 and errors["broken"]["error"] is None


async def test_retention_prunes_an_ended_batch_with_its_files_and_spares_a_running_one(
    http: aiohttp.ClientSession, make_stub: MakeStub, make_foreman: MakeForeman, openai_client: OpenAIClient
) -> None:
    """Past FOREMAN_RETENTION an ended batch goes with its input and output files; a running batch, its
    input file and an upload no batch used stay, however old."""
    server = await make_stub()
    clock = FakeClock(1_800_000_000.0)
    foreman = await make_foreman(server.url, clock=clock, retention=0.3)
    client = openai_client(foreman.url)
    unused = await upload(client, [chat_line("u", "llama3", "u")])
    ended_input = await upload(client, [chat_line(f"r{i}", "llama3", f"q{i}") for i in range(3)])
    ended = await finished(
        client,
        (await client.batches.create(input_file_id=ended_input, endpoint=CHAT, completion_window="24h")).id,
    )
    assert ended.status == "completed" and ended.output_file_id is not None
    first = await hold_worker(http, foreman, server.stub, "llama3")
    running_input = await upload(client, [chat_line("w", "llama3", "waits")])
    running = await client.batches.create(input_file_id=running_input, endpoint=CHAT, completion_window="24h")
    await until(
        lambda: _status_is(client, running.id, "in_progress"), 10, "the second batch to queue its line"
    )
    clock.now += 3600  # everything is an hour old now; only what ended may go

    async def ended_gone() -> bool:
        try:
            await client.batches.retrieve(ended.id)
        except openai.NotFoundError:
            return True
        return False

    await until(ended_gone, 10, "the ended batch to be pruned")
    for file_id in (ended_input, ended.output_file_id):
        with pytest.raises(openai.NotFoundError):
            await client.files.retrieve(file_id)
    assert sorted([f.id async for f in client.files.list()]) == sorted([unused, running_input])
    server.stub.faults.release_hung()
    await first
    assert (await finished(client, running.id)).status == "completed"


async def _status_is(client: openai.AsyncOpenAI, batch_id: str, status: str) -> bool:
    return (await client.batches.retrieve(batch_id)).status == status


async def test_a_batch_line_gets_the_answer_its_request_gets_alone(
    foreman: Foreman, stub: Stub, openai_client: OpenAIClient
) -> None:
    """Models Ollama lacks, with a source suffix or two, are refused in a batch line as in a request alone:
    the same status and message, and never queued."""
    client = openai_client(foreman.url)
    models = ["no-such:local", "llama3:local:cloud", "no-such"]
    alone: dict[str, tuple[int, str]] = {}
    for model in models:
        with pytest.raises(openai.APIStatusError) as refused:
            await client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}])
        assert isinstance(refused.value.body, dict)
        alone[model] = (refused.value.status_code, refused.value.body["message"])
    items = [chat_line(model, model, "hi") for model in models]
    batch = await client.batches.create(
        input_file_id=await upload(client, items), endpoint=CHAT, completion_window="24h"
    )
    done = await finished(client, batch.id)
    lines = {line["custom_id"]: line["response"] for line in await file_lines(client, done.error_file_id)}
    assert {
        model: (response["status_code"], response["body"]["error"]["message"])
        for model, response in lines.items()
    } == alone
    assert all(response["request_id"] is None for response in lines.values())  # never became jobs
    assert stub.requests == []
