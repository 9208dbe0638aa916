"""The official ollama client, pointed at foreman, works as if foreman were Ollama."""

from __future__ import annotations

from collections.abc import Callable

import ollama
import pytest

from stub_ollama import Stub
from tests.support.helpers import Foreman, reply_text


@pytest.fixture
def client(foreman: Foreman, ollama_client: Callable[[str], ollama.AsyncClient]) -> ollama.AsyncClient:
    return ollama_client(foreman.url)


async def test_chat_not_streamed(client: ollama.AsyncClient, foreman: Foreman) -> None:
    """A plain chat answers with Ollama's shape and the stub's text."""
    response = await client.chat(model="llama3", messages=[{"role": "user", "content": "hello"}])
    assert response.message.content == reply_text("llama3", "hello")
    assert response.done and response.done_reason == "stop" and response.model == "llama3"
    assert response.eval_count == 8
    assert foreman.states() == ["done"]


async def test_chat_streamed(client: ollama.AsyncClient) -> None:
    """A streamed chat arrives chunk by chunk and ends with Ollama's done line."""
    parts = [
        part
        async for part in await client.chat(
            model="llama3", messages=[{"role": "user", "content": "hello"}], stream=True
        )
    ]
    assert len(parts) == 9
    assert "".join(p.message.content for p in parts) == reply_text("llama3", "hello")
    assert parts[-1].done and parts[-1].done_reason == "stop" and parts[-1].total_duration
    assert not any(p.done for p in parts[:-1])


async def test_generate(client: ollama.AsyncClient) -> None:
    """/api/generate goes through the queue and returns `response` and `context`."""
    response = await client.generate(model="mistral", prompt="why is the sky blue?")
    assert response.response == reply_text("mistral", "why is the sky blue?")
    assert response.context


async def test_generate_streamed(client: ollama.AsyncClient) -> None:
    """Streamed generate chunks carry `response` pieces."""
    parts = [part async for part in await client.generate(model="mistral", prompt="hi", stream=True)]
    assert "".join(p.response for p in parts) == reply_text("mistral", "hi")


async def test_embed(client: ollama.AsyncClient, stub: Stub) -> None:
    """/api/embed returns one vector per input."""
    response = await client.embed(model="nomic-embed-text", input=["a", "b"])
    assert len(response.embeddings) == 2 and len(response.embeddings[0]) == stub.settings.embedding_dims


async def test_legacy_embeddings(client: ollama.AsyncClient) -> None:
    """The legacy /api/embeddings endpoint is queued too."""
    response = await client.embeddings(model="nomic-embed-text", prompt="a")
    assert len(response.embedding) > 0


async def test_unknown_model_is_ollamas_404(client: ollama.AsyncClient, foreman: Foreman, stub: Stub) -> None:
    """A model Ollama does not have gets Ollama's own 404 at once; no job is made."""
    with pytest.raises(ollama.ResponseError) as raised:
        await client.chat(model="nope", messages=[{"role": "user", "content": "hi"}])
    assert (raised.value.status_code, raised.value.error) == (404, "model 'nope' not found")
    assert foreman.jobs() == []
    assert [r for r in stub.requests if r.model == "nope"] == []


async def test_list_and_ps_pass_through(client: ollama.AsyncClient) -> None:
    """Model listing and residency come straight from Ollama."""
    listed = await client.list()
    assert {m.model for m in listed.models} >= {"llama3:latest", "mistral:latest"}
    await client.chat(model="llama3", messages=[{"role": "user", "content": "hi"}])
    running = await client.ps()
    assert [m.model for m in running.models] == ["llama3:latest"]


async def test_show_version_and_pull_pass_through(client: ollama.AsyncClient) -> None:
    """/api/show, /api/version and streamed /api/pull progress pass through."""
    shown = await client.show("llama3")
    assert shown.modelfile and "FROM" in shown.modelfile
    statuses = [p.status async for p in await client.pull("tinyllama", stream=True)]
    assert statuses[0] == "pulling manifest" and statuses[-1] == "success"
    assert "tinyllama:latest" in {m.model for m in (await client.list()).models}
