"""The agent APIs through foreman: OpenAI Responses with the openai SDK, Anthropic Messages with the anthropic SDK."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import anthropic
import openai
import pytest

from stub_ollama import Stub
from tests.support.helpers import (
    ASYNC,
    Foreman,
    MakeForeman,
    MakeStub,
    eventually,
    post,
    read_events,
    reply_text,
)

OpenAIClient = Callable[[str], openai.AsyncOpenAI]
AnthropicClient = Callable[[str], anthropic.AsyncAnthropic]


@pytest.fixture
async def anthropic_client() -> AsyncIterator[AnthropicClient]:
    """Official anthropic AsyncClients on a server, closed after the test (no retries of their own)."""
    clients: list[anthropic.AsyncAnthropic] = []

    def make(url: str) -> anthropic.AsyncAnthropic:
        client = anthropic.AsyncAnthropic(base_url=url, api_key="ollama", max_retries=0)
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.close()


def messages_body(model: str, content: str = "hi", **extra: Any) -> dict[str, Any]:
    return {"model": model, "max_tokens": 64, "messages": [{"role": "user", "content": content}], **extra}


async def test_responses_create_is_a_job(foreman: Foreman, stub: Stub, openai_client: OpenAIClient) -> None:
    """responses.create runs as a job under the model's one key and answers with Ollama's response object."""
    client = openai_client(foreman.url)
    raw = await client.responses.with_raw_response.create(model="llama3", input="hello")
    response = raw.parse()
    assert response.object == "response" and response.status == "completed"
    assert response.output_text == reply_text("llama3", "hello")
    [job] = foreman.jobs()
    assert raw.headers["X-Foreman-Job"] == job["id"]
    assert (job["endpoint"], job["model_key"], job["state"], job["stream"]) == (
        "/v1/responses",
        "llama3:latest",
        "done",
        0,
    )
    assert [r.path for r in stub.inference_requests()] == ["/v1/responses"]


async def test_responses_stream(
    make_stub: MakeStub, make_foreman: MakeForeman, openai_client: OpenAIClient
) -> None:
    """responses.create(stream=True) gets Ollama's named events, in order; the job keeps the final response."""
    server = await make_stub(tokens=4)
    foreman = await make_foreman(server.url)
    stream = await openai_client(foreman.url).responses.create(model="mistral", input="why?", stream=True)
    events = [event async for event in stream]
    assert events[0].type == "response.created" and events[-1].type == "response.completed"
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == reply_text("mistral", "why?", 4)
    assert [e.sequence_number for e in events] == list(range(len(events)))
    [job] = foreman.jobs()
    assert (job["endpoint"], job["state"], job["stream"]) == ("/v1/responses", "done", 1)
    result = json.loads(job["result"])
    assert result["status"] == "completed" and result["output"][0]["content"][0]["text"] == text


async def test_messages_create_is_a_job(
    foreman: Foreman, stub: Stub, anthropic_client: AnthropicClient
) -> None:
    """messages.create runs as a job and answers with Anthropic's message object."""
    client = anthropic_client(foreman.url)
    raw = await client.messages.with_raw_response.create(
        model="qwen2", max_tokens=64, messages=[{"role": "user", "content": "hello"}]
    )
    message = await raw.parse()
    assert message.type == "message" and message.role == "assistant"
    assert message.content[0].type == "text"
    assert message.content[0].text == reply_text("qwen2", "hello")
    assert message.stop_reason == "end_turn" and message.usage.output_tokens == 8
    [job] = foreman.jobs()
    assert raw.headers["X-Foreman-Job"] == job["id"]
    assert (job["endpoint"], job["model_key"], job["state"]) == ("/v1/messages", "qwen2:latest", "done")
    assert [r.path for r in stub.inference_requests()] == ["/v1/messages"]


async def test_messages_stream(foreman: Foreman, anthropic_client: AnthropicClient) -> None:
    """messages.stream yields the text as Ollama streams it; the job keeps the whole message."""
    client = anthropic_client(foreman.url)
    async with client.messages.stream(
        model="llama3", max_tokens=64, messages=[{"role": "user", "content": "tell me"}]
    ) as stream:
        text = "".join([piece async for piece in stream.text_stream])
        final = await stream.get_final_message()
    assert text == reply_text("llama3", "tell me")
    assert final.content[0].text == text and final.stop_reason == "end_turn"  # type: ignore[union-attr]
    [job] = foreman.jobs()
    assert (job["endpoint"], job["state"], job["stream"]) == ("/v1/messages", "done", 1)
    result = json.loads(job["result"])
    assert result["type"] == "message" and result["content"] == [{"type": "text", "text": text}]
    assert result["stop_reason"] == "end_turn"


async def test_async_messages_replay_from_events(http: aiohttp.ClientSession, foreman: Foreman) -> None:
    """`Prefer: respond-async` on /v1/messages: 202, and /jobs/{id}/events replays the message's events."""
    answer = await post(http, foreman.url + "/v1/messages", messages_body("llama3", "later"), ASYNC)
    assert answer.status == 202
    job_id = answer.json()["id"]
    await eventually(lambda: foreman.states() == ["done"], what="the async job to finish")
    async with http.get(f"{foreman.url}/jobs/{job_id}/events") as response:
        events = await read_events(response)
    chunks = [e.data for e in events if e.event == "chunk"]
    assert chunks[0]["type"] == "message_start" and chunks[-1]["type"] == "message_stop"
    text = "".join(c["delta"]["text"] for c in chunks if c["type"] == "content_block_delta")
    assert text == reply_text("llama3", "later")
    async with http.get(f"{foreman.url}/jobs/{job_id}") as response:
        view = await response.json()
    assert view["result"]["content"] == [{"type": "text", "text": text}]


async def test_unknown_model_404_per_dialect(
    foreman: Foreman, stub: Stub, openai_client: OpenAIClient, anthropic_client: AnthropicClient
) -> None:
    """A model Ollama lacks is refused at once, in each API's error shape, and never queued."""
    with pytest.raises(openai.NotFoundError) as responses_error:
        await openai_client(foreman.url).responses.create(model="nope", input="hi")
    assert responses_error.value.body == {
        "message": "model 'nope' not found",
        "type": "not_found_error",
        "param": None,
        "code": None,
    }
    with pytest.raises(anthropic.NotFoundError) as messages_error:
        await anthropic_client(foreman.url).messages.create(
            model="nope", max_tokens=8, messages=[{"role": "user", "content": "hi"}]
        )
    assert messages_error.value.body == {
        "type": "error",
        "error": {"type": "not_found_error", "message": "model 'nope' not found"},
    }
    assert foreman.jobs() == [] and stub.requests == []


async def test_bad_bodies_refused_at_intake(
    http: aiohttp.ClientSession, foreman: Foreman, stub: Stub
) -> None:
    """What Ollama's middlewares refuse is a 400 in the API's shape before any job is written."""
    no_max = {"model": "llama3", "messages": [{"role": "user", "content": "hi"}]}
    answer = await post(http, foreman.url + "/v1/messages", no_max)
    assert (answer.status, answer.json()) == (
        400,
        {
            "type": "error",
            "error": {
                "type": "invalid_request_error",
                "message": "max_tokens is required and must be positive",
            },
        },
    )
    answer = await post(http, foreman.url + "/v1/messages", messages_body("llama3") | {"messages": []})
    assert (answer.status, answer.json()["error"]["message"]) == (400, "messages is required")
    answer = await post(http, foreman.url + "/v1/responses", {"model": "llama3", "input": [{"content": "x"}]})
    assert answer.status == 400
    assert answer.json()["error"] == {
        "message": "input[0]: input item missing required 'type' field",
        "type": "invalid_request_error",
        "param": None,
        "code": None,
    }
    assert foreman.jobs() == [] and stub.requests == []


async def test_broken_messages_stream_ends_with_an_error_event(
    make_stub: MakeStub, make_foreman: MakeForeman, anthropic_client: AnthropicClient
) -> None:
    """Ollama stopping a Messages stream short reaches the anthropic SDK as an error, and the job fails."""
    server = await make_stub(tokens=4)
    server.stub.faults.fail_next(1, status=500, error="runner crashed", after_chunks=2)
    foreman = await make_foreman(server.url, max_attempts=1)
    client = anthropic_client(foreman.url)
    with pytest.raises(anthropic.APIStatusError) as error:
        async with client.messages.stream(
            model="llama3", max_tokens=64, messages=[{"role": "user", "content": "hi"}]
        ) as stream:
            async for _ in stream.text_stream:
                pass
    assert "incomplete" in str(error.value)
    await eventually(lambda: foreman.states() == ["failed"], what="the job to fail")
