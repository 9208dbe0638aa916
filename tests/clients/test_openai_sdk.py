"""Ollama's OpenAI-compatible API through foreman: the official openai client, the same queue."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import aiohttp
import openai
import pytest

from stub_ollama import FOREVER, Stub, StubServer
from tests.support.helpers import (
    ASYNC,
    Foreman,
    MakeForeman,
    MakeStub,
    chat_body,
    eventually,
    hold_worker,
    read_events,
    reply_text,
    submit,
)

OpenAIClient = Callable[[str], openai.AsyncOpenAI]
CHAT = "/v1/chat/completions"


def v1_chat(model: str, content: str = "hi", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": content}], **extra}


def frames(body: bytes) -> list[str]:
    """The `data:` payloads of a Server-Sent Events body."""
    raw = body.decode()
    assert raw.endswith("\n\n"), raw
    parts = raw.split("\n\n")[:-1]
    assert all(p.startswith("data: ") for p in parts), raw
    return [p[len("data: ") :] for p in parts]


async def job_view(foreman: Foreman, job_id: str) -> dict[str, Any]:
    answer = await foreman.client.get(f"/jobs/{job_id}")
    return dict(await answer.json())


async def test_chat_completion_is_a_job(foreman: Foreman, stub: Stub, openai_client: OpenAIClient) -> None:
    """A chat completion runs as a job and answers in Ollama's chat.completion shape."""
    client = openai_client(foreman.url)
    raw = await client.chat.completions.with_raw_response.create(
        model="llama3", messages=[{"role": "user", "content": "hello"}]
    )
    completion = raw.parse()
    assert completion.object == "chat.completion" and completion.model == "llama3"
    assert completion.choices[0].message.content == reply_text("llama3", "hello")
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None and completion.usage.total_tokens == 9
    [job] = foreman.jobs()
    assert raw.headers["X-Foreman-Job"] == job["id"]
    assert (job["endpoint"], job["model_key"], job["state"], job["stream"]) == (
        CHAT,
        "llama3:latest",
        "done",
        0,
    )
    assert json.loads(job["result"]) == completion.model_dump(exclude_unset=True)
    assert [r.path for r in stub.inference_requests()] == [CHAT]


async def test_chat_completion_streams_live(
    http: aiohttp.ClientSession, make_stub: MakeStub, make_foreman: MakeForeman, openai_client: OpenAIClient
) -> None:
    """SSE chunks reach the client while Ollama still writes; [DONE] ends it; the job keeps the merge."""
    server = await make_stub(token_delay=0.1, tokens=4)
    foreman = await make_foreman(server.url)
    async with http.post(foreman.url + CHAT, json=v1_chat("llama3", stream=True)) as response:
        assert response.headers["Content-Type"] == "text/event-stream"
        first = json.loads((await response.content.readline()).removeprefix(b"data: "))
        assert first["object"] == "chat.completion.chunk"
        assert first["choices"][0]["delta"]["content"] == "Hello"
        [upstream] = server.stub.inference_requests()
        assert not upstream.finished and upstream.chunks_sent < 4
        rest = frames((await response.read()).lstrip(b"\n"))
    assert rest[-1] == "[DONE]" and "[DONE]" not in rest[:-1]

    stream = await openai_client(foreman.url).chat.completions.create(
        model="llama3", messages=[{"role": "user", "content": "hi"}], stream=True
    )
    parts = [chunk async for chunk in stream]
    assert "".join(p.choices[0].delta.content or "" for p in parts) == reply_text("llama3", "hi", 4)
    assert parts[-1].choices[0].finish_reason == "stop"
    result = await job_view(foreman, response.headers["X-Foreman-Job"])
    assert result["result"]["object"] == "chat.completion"
    assert result["result"]["choices"][0]["message"] == {
        "role": "assistant",
        "content": reply_text("llama3", "hi", 4),
    }


async def test_completion_and_embeddings(foreman: Foreman, openai_client: OpenAIClient) -> None:
    """Legacy completions and embeddings go through the queue with OpenAI's shapes."""
    client = openai_client(foreman.url)
    completion = await client.completions.create(model="mistral", prompt="why?")
    assert completion.object == "text_completion"
    assert completion.choices[0].text == reply_text("mistral", "why?")
    vectors = await client.embeddings.create(model="nomic-embed-text", input=["a", "b"])
    assert [e.index for e in vectors.data] == [0, 1] and len(vectors.data[0].embedding) == 8
    assert [(j["endpoint"], j["state"]) for j in foreman.jobs()] == [
        ("/v1/completions", "done"),
        ("/v1/embeddings", "done"),
    ]


async def test_models_pass_through(foreman: Foreman, openai_client: OpenAIClient) -> None:
    """Model listing and retrieval answer from Ollama, without a job."""
    client = openai_client(foreman.url)
    models = [m.id async for m in client.models.list()]
    assert models[:3] == ["llama3:latest", "mistral:latest", "qwen2:latest"]
    assert (await client.models.retrieve("llama3")).id == "llama3"
    with pytest.raises(openai.NotFoundError):
        await client.models.retrieve("ghost")
    assert foreman.jobs() == []


async def test_unknown_model_is_not_found(foreman: Foreman, openai_client: OpenAIClient) -> None:
    """The SDK raises NotFoundError with Ollama's message and type, at once; no job is made."""
    with pytest.raises(openai.NotFoundError) as info:
        await openai_client(foreman.url).chat.completions.create(
            model="ghost", messages=[{"role": "user", "content": "hi"}]
        )
    assert info.value.message == "Error code: 404 - model 'ghost' not found"
    assert info.value.type == "not_found_error"
    assert foreman.jobs() == []


async def test_foreman_refuses_bad_requests_in_openais_shape(
    foreman: Foreman, stub: Stub, openai_client: OpenAIClient, http: aiohttp.ClientSession
) -> None:
    """Validation errors are 400 invalid_request_error objects the SDK parses; nothing is queued."""
    client = openai_client(foreman.url)
    with pytest.raises(openai.BadRequestError) as info:
        await client.chat.completions.create(model="llama3", messages=[])
    assert info.value.type == "invalid_request_error"
    assert info.value.message == "Error code: 400 - [] is too short - 'messages'"
    with pytest.raises(openai.BadRequestError, match="input"):
        await client.embeddings.create(model="nomic-embed-text", input=[])
    async with http.post(foreman.url + "/v1/completions", data=b"{") as response:
        assert response.status == 400
        error = (await response.json())["error"]
    assert error["type"] == "invalid_request_error" and error["param"] is None and error["code"] is None
    assert foreman.jobs() == [] and stub.requests == []


async def test_too_large_is_openai_shaped(make_foreman: MakeForeman, stub_server: StubServer) -> None:
    """A body over FOREMAN_MAX_BODY on /v1 gets a 413 in OpenAI's error shape."""
    foreman = await make_foreman(stub_server.url, max_body=1000)
    answer = await foreman.client.post(CHAT, json=v1_chat("llama3", "x" * 2000))
    assert answer.status == 413
    error = (await answer.json())["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "api_error"


async def test_failures_after_retries_are_openai_shaped(
    make_foreman: MakeForeman, stub_server: StubServer, stub: Stub, openai_client: OpenAIClient
) -> None:
    """Ollama's 500 after the last retry, and foreman's 502 for a dropped connection, parse in the SDK."""
    foreman = await make_foreman(stub_server.url, max_attempts=2)
    client = openai_client(foreman.url)
    await client.chat.completions.create(model="llama3", messages=[{"role": "user", "content": "warm"}])
    stub.faults.fail_next(2, status=500, error="llama runner process has terminated")
    with pytest.raises(openai.InternalServerError) as failed:
        await client.chat.completions.create(model="llama3", messages=[{"role": "user", "content": "a"}])
    assert failed.value.status_code == 500
    assert failed.value.message.endswith("llama runner process has terminated")
    stub.faults.drop_next(2, after_chunks=0, streamed_only=False)
    with pytest.raises(openai.InternalServerError) as dropped:
        await client.chat.completions.create(model="llama3", messages=[{"role": "user", "content": "b"}])
    assert dropped.value.status_code == 502 and dropped.value.type == "api_error"
    assert "gave up after 2 attempts" in dropped.value.message
    assert [j["attempt"] for j in foreman.jobs()[1:]] == [2, 2]


async def test_stream_cut_short_ends_with_an_error_frame(
    foreman: Foreman, stub: Stub, openai_client: OpenAIClient
) -> None:
    """A /v1 stream Ollama ends without [DONE] fails the job, and the SDK raises the error frame."""
    stub.faults.fail_next(1, after_chunks=2)
    stream = await openai_client(foreman.url).chat.completions.create(
        model="llama3", messages=[{"role": "user", "content": "hi"}], stream=True
    )
    seen = []
    with pytest.raises(openai.APIError, match="before \\[DONE\\]"):
        async for chunk in stream:
            seen.append(chunk.choices[0].delta.content)
    assert seen == ["Hello", " from", ""]
    [job] = foreman.jobs()
    assert job["state"] == "failed" and job["attempt"] == 0


async def test_async_v1_job(foreman: Foreman, stub: Stub) -> None:
    """respond-async: 202, then a chat.completion result with usage, and chunk events in OpenAI's shape."""
    answer = await foreman.client.post(CHAT, json=v1_chat("llama3", "later"), headers=ASYNC)
    assert answer.status == 202
    job_id = (await answer.json())["id"]
    async with foreman.client.get(f"/jobs/{job_id}/events") as response:
        events = await read_events(response)
    assert events[-1].event == "end" and events[-1].data["state"] == "done"
    chunks = [e.data for e in events if e.event == "chunk"]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    text = "".join(c["choices"][0]["delta"]["content"] for c in chunks if c["choices"])
    assert text == reply_text("llama3", "later")

    done = await job_view(foreman, job_id)
    direct = await foreman.client.post(CHAT, json=v1_chat("llama3", "later"))
    expected = await direct.json()
    result = done["result"]
    assert set(result) == set(expected) and result["object"] == "chat.completion"
    assert result["choices"] == expected["choices"]
    assert result["usage"] == expected["usage"] and result["model"] == "llama3"
    # Nobody waited on the connection, so foreman ran it streamed, with usage.
    sent = stub.inference_requests()[0].body
    assert sent is not None and sent["stream"] is True and sent["stream_options"] == {"include_usage": True}


async def test_v1_and_native_jobs_drain_together_by_model(
    http: aiohttp.ClientSession, foreman: Foreman, stub: Stub
) -> None:
    """A mixed /v1 and /api/chat queue over two models loads each model once; llama3 == llama3:latest."""
    first = await hold_worker(http, foreman, stub, "mistral")
    queued = [
        (CHAT, v1_chat("llama3", "1")),
        ("/api/chat", chat_body("mistral", "2")),
        ("/api/chat", chat_body("llama3:latest", "3")),
        (CHAT, v1_chat("mistral", "4")),
        (CHAT, v1_chat("llama3", "5")),
        ("/api/chat", chat_body("llama3", "6")),
    ]
    tasks = [await submit(http, foreman, body, path) for path, body in queued]
    stub.faults.release_hung()
    answers = await asyncio.gather(first, *tasks)
    assert [a.status for a in answers] == [200] * 7
    assert stub.loads == ["mistral:latest", "llama3:latest"]
    served = [(r.path, r.prompt) for r in stub.inference_requests()]
    assert served == [
        ("/api/chat", "first"),
        ("/api/chat", "2"),
        (CHAT, "4"),
        (CHAT, "1"),
        ("/api/chat", "3"),
        (CHAT, "5"),
        ("/api/chat", "6"),
    ]
    assert answers[4].json()["choices"][0]["message"]["content"] == reply_text("mistral", "4")


async def test_v1_jobs_are_pinned_by_load_requests(
    http: aiohttp.ClientSession, foreman: Foreman, stub: Stub
) -> None:
    """/v1 takes no keep_alive: a native load pins the model while /v1 work waits, another releases it."""
    first = await hold_worker(http, foreman, stub, "llama3")
    tasks = [await submit(http, foreman, v1_chat("llama3", p), CHAT) for p in ("a", "b", "c")]
    stub.faults.release_hung()
    await asyncio.gather(first, *tasks)
    sent = [(r.path, r.prompt, (r.body or {}).get("keep_alive")) for r in stub.requests]
    assert sent == [
        ("/api/chat", None, None),  # the swap loads the model with Ollama's default
        ("/api/chat", "first", None),  # alone when it started: as it came
        ("/api/chat", None, -1),  # "a" has work behind it: pin, once
        (CHAT, "a", None),
        (CHAT, "b", None),
        ("/api/chat", None, 300),  # before the last /v1 job of the drain: release to Ollama's default
        (CHAT, "c", None),
    ]
    assert stub.loads == ["llama3:latest"] and stub.keep_alive("llama3") == 300


async def test_a_pinned_model_stays_pinned_across_v1_jobs(
    http: aiohttp.ClientSession, foreman: Foreman, stub: Stub
) -> None:
    """Between the pin and the release, /v1 requests leave Ollama's keep_alive at forever."""
    first = await hold_worker(http, foreman, stub, "llama3")
    stub.faults.hang_next(1)
    held = await submit(http, foreman, v1_chat("llama3", "a"), CHAT)
    rest = await submit(http, foreman, v1_chat("llama3", "b"), CHAT)
    stub.faults.release_hung()
    await stub.wait_for(lambda s: s.faults.hung == 1 and s.requests[-1].prompt == "a")
    assert stub.keep_alive("llama3") == FOREVER
    stub.faults.release_hung()
    await asyncio.gather(first, held, rest)
    assert stub.keep_alive("llama3") == 300


async def test_v1_job_survives_a_restart(
    http: aiohttp.ClientSession, make_stub: MakeStub, make_foreman: MakeForeman
) -> None:
    """A waiting /v1 client gets an OpenAI-shaped 503 at shutdown; its job runs after the restart."""
    server = await make_stub()
    first = await make_foreman(server.url, shutdown_grace=0)  # the held job cannot finish
    held = await hold_worker(http, first, server.stub, "llama3")
    waiting = await submit(http, first, v1_chat("mistral", "queued"), CHAT)
    await first.close()
    answer = await waiting
    await held
    assert answer.status == 503 and answer.json()["error"]["type"] == "api_error"
    assert answer.headers["x-should-retry"] == "false"  # the job is still queued
    assert "stays queued" in answer.json()["error"]["message"]

    second = await make_foreman(server.url)
    await second.wait_states(lambda states: states == ["done", "done"], "both jobs to finish")
    result = json.loads(second.jobs()[1]["result"])
    assert result["choices"][0]["message"]["content"] == reply_text("mistral", "queued")
    await eventually(lambda: server.stub.in_flight == 0, what="the stub to go idle")


async def test_early_headers_keep_the_sse_framing(
    make_foreman: MakeForeman, stub_server: StubServer, stub: Stub, openai_client: OpenAIClient
) -> None:
    """After early headers a /v1 stream still ends in [DONE], and a failure comes as an error frame."""
    foreman = await make_foreman(stub_server.url, early_headers=0)
    client = openai_client(foreman.url)
    stream = await client.chat.completions.create(
        model="llama3", messages=[{"role": "user", "content": "hi"}], stream=True
    )
    assert "".join([c.choices[0].delta.content or "" async for c in stream]) == reply_text("llama3", "hi")
    stub.faults.fail_next(1, status=400, error="something Ollama refused")
    late = await client.chat.completions.create(
        model="llama3", messages=[{"role": "user", "content": "again"}], stream=True
    )
    assert late.response.status_code == 200
    with pytest.raises(openai.APIError, match="something Ollama refused"):
        async for _ in late:
            pass
    assert [j["state"] for j in foreman.jobs()] == ["done", "failed"]
