"""stub_ollama's OpenAI-compatible endpoints behave like Ollama's /v1 where foreman depends on it."""

from __future__ import annotations

import base64
import json
import struct
from collections.abc import Callable
from typing import Any

import aiohttp
import openai
import pytest

from stub_ollama import FOREVER, Stub, StubServer, embedding
from stub_ollama.catalog import first_digest
from tests.support.helpers import reply_text

OpenAIClient = Callable[[str], openai.AsyncOpenAI]
USER = [{"role": "user", "content": "hi"}]


async def sse(http: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> tuple[str, list[str]]:
    """POST and split a Server-Sent Events reply into its `data:` payloads."""
    async with http.post(url, json=body) as response:
        assert response.status == 200
        raw = (await response.read()).decode()
    assert raw.endswith("\n\n")
    frames = raw.split("\n\n")[:-1]
    assert all(frame.startswith("data: ") for frame in frames), raw
    return response.headers["Content-Type"], [frame[len("data: ") :] for frame in frames]


async def test_chat_completion_and_its_stream(
    stub_server: StubServer, openai_client: OpenAIClient, http: aiohttp.ClientSession
) -> None:
    """A chat completion has OpenAI's shape; its stream is SSE chunks, usage on request, then [DONE]."""
    client = openai_client(stub_server.url)
    completion = await client.chat.completions.create(model="llama3", messages=USER)
    assert completion.object == "chat.completion" and completion.id.startswith("chatcmpl-")
    assert completion.model == "llama3" and completion.system_fingerprint == "fp_ollama"
    assert completion.choices[0].message.content == reply_text("llama3", "hi")
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None and completion.usage.completion_tokens == 8

    body = {"model": "llama3", "messages": USER, "stream": True, "stream_options": {"include_usage": True}}
    content_type, payloads = await sse(http, stub_server.url + "/v1/chat/completions", body)
    assert content_type == "text/event-stream" and payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert len({c["id"] for c in chunks}) == 1
    assert "".join(c["choices"][0]["delta"]["content"] for c in chunks[:-1]) == reply_text("llama3", "hi")
    assert [c["choices"][0]["finish_reason"] for c in chunks[-3:-1]] == [None, "stop"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] == 9


async def test_completions_embeddings_and_models(
    stub_server: StubServer, openai_client: OpenAIClient
) -> None:
    """Legacy completions, embeddings (float and base64) and the model list answer like Ollama's /v1."""
    client = openai_client(stub_server.url)
    completion = await client.completions.create(model="mistral", prompt="why?")
    assert completion.object == "text_completion" and completion.choices[0].text == reply_text(
        "mistral", "why?"
    )

    floats = await client.embeddings.create(model="nomic-embed-text", input=["a", "b"])
    assert [e.index for e in floats.data] == [0, 1] and floats.model == "nomic-embed-text"
    assert floats.data[0].embedding == pytest.approx(
        embedding(first_digest("nomic-embed-text:latest"), "a", 8)
    )
    packed = await client.embeddings.with_raw_response.create(
        model="nomic-embed-text", input="a", encoding_format="base64"
    )
    vector = json.loads(packed.content)["data"][0]["embedding"]
    assert struct.unpack("<8f", base64.b64decode(vector)) == pytest.approx(floats.data[0].embedding)

    models = [m async for m in client.models.list()]
    assert [m.id for m in models][:2] == ["llama3:latest", "mistral:latest"]
    assert {m.owned_by for m in models} == {"library"}
    assert (await client.models.retrieve("llama3")).id == "llama3"
    with pytest.raises(openai.NotFoundError, match="model 'ghost' not found"):
        await client.models.retrieve("ghost")


async def test_errors_have_openais_shape(stub_server: StubServer, http: aiohttp.ClientSession) -> None:
    """Errors take their type from their status (openai.NewError), the handlers' ones too since Ollama 0.18."""
    url = stub_server.url + "/v1/chat/completions"
    cases = [
        ({"model": "llama3", "messages": []}, 400, "[] is too short - 'messages'", "invalid_request_error"),
        (
            {"model": "llama3", "messages": USER, "stream": "yes"},
            400,
            "json: cannot unmarshal string into Go struct field ChatCompletionRequest.stream of type bool",
            "invalid_request_error",
        ),
        (
            {"model": "ghost", "messages": USER},
            404,
            "model 'ghost' not found",
            "not_found_error",
        ),
        ({"messages": USER}, 400, "model is required", "invalid_request_error"),
    ]
    for body, status, message, kind in cases:
        async with http.post(url, json=body) as response:
            assert response.status == status
            assert await response.json() == {
                "error": {"message": message, "type": kind, "param": None, "code": None}
            }


async def test_v1_shares_the_scheduler_and_takes_no_keep_alive(
    stub_server: StubServer, http: aiohttp.ClientSession
) -> None:
    """/v1 requests use the loaded runner and leave its keep_alive as it was, even when they send one."""
    stub = stub_server.stub
    load = {"model": "llama3", "messages": [], "keep_alive": -1}
    async with http.post(stub_server.url + "/api/chat", json=load) as response:
        assert response.status == 200
    body = {"model": "llama3:latest", "messages": USER, "keep_alive": 0}
    async with http.post(stub_server.url + "/v1/chat/completions", json=body) as response:
        assert response.status == 200
    assert stub.loads == ["llama3:latest"] and stub.keep_alive("llama3") == FOREVER
    async with http.post(stub_server.url + "/v1/completions", json={"model": "mistral", "prompt": "x"}) as r:
        assert r.status == 200
    assert stub.loads == ["llama3:latest", "mistral:latest"]
    assert stub.keep_alive("mistral") == stub.settings.default_keep_alive
    assert [r.prompt for r in stub.requests] == [None, "hi", "x"]


async def test_faults_apply_to_v1(stub: Stub, stub_server: StubServer, http: aiohttp.ClientSession) -> None:
    """Injected failures reach /v1 too: an api_error before output, or a stream cut short without [DONE]."""
    url = stub_server.url + "/v1/chat/completions"
    stub.faults.fail_next(1)
    async with http.post(url, json={"model": "llama3", "messages": USER}) as response:
        assert response.status == 500
        assert (await response.json())["error"]["type"] == "api_error"
    stub.faults.fail_next(1, after_chunks=2)
    _, payloads = await sse(http, url, {"model": "llama3", "messages": USER, "stream": True})
    chunks = [json.loads(p) for p in payloads]
    # Ollama decodes its own {"error"} line as an empty response: one empty chunk, then the end.
    assert [c["choices"][0]["delta"]["content"] for c in chunks] == ["Hello", " from", ""]
    assert chunks[-1]["model"] == "" and "[DONE]" not in payloads
    assert stub.requests[-1].outcome == "failed"
