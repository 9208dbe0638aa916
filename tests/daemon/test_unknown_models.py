"""A model Ollama does not have is refused at intake with Ollama's 404, from its /api/tags list (ModelTags)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable

import aiohttp
import ollama
import pytest

from foreman.api.keys import MODEL_TAGS
from stub_ollama import StubServer
from tests.support.helpers import ASYNC, Foreman, MakeForeman, chat_body, hold_worker, post, submit


async def test_an_unknown_model_is_refused_at_once_behind_running_work(
    http: aiohttp.ClientSession,
    make_foreman: MakeForeman,
    stub_server: StubServer,
    ollama_client: Callable[[str], ollama.AsyncClient],
) -> None:
    """Behind a running job and a queue, with early headers, the official client still gets Ollama's 404 at once."""
    foreman = await make_foreman(stub_server.url, early_headers=0)
    first = await hold_worker(http, foreman, stub_server.stub, "llama3")
    queued = [await submit(http, foreman, chat_body(model)) for model in ("mistral", "qwen2")]
    client = ollama_client(foreman.url)
    with pytest.raises(ollama.ResponseError) as raised:
        async with asyncio.timeout(5):
            async for _ in await client.chat(
                model="ghost", messages=[{"role": "user", "content": "hi"}], stream=True
            ):
                pass
    assert (raised.value.status_code, raised.value.error) == (404, "model 'ghost' not found")
    assert [job["model"] for job in foreman.jobs()] == ["llama3", "mistral", "qwen2"]
    stub_server.stub.faults.release_hung()
    await first
    for task in queued:
        assert (await task).status == 200


async def test_a_model_pulled_a_moment_ago_works(
    http: aiohttp.ClientSession, foreman: Foreman, stub_server: StubServer
) -> None:
    """A name missing from the list foreman holds makes it read /api/tags again before it refuses."""
    assert (await post(http, foreman.url + "/api/chat", chat_body("llama3"))).status == 200
    assert await foreman.app[MODEL_TAGS].digest("llama3:latest") is not None  # the list is read
    copied = await post(http, stub_server.url + "/api/copy", {"source": "llama3", "destination": "fresh"})
    assert copied.status == 200  # behind foreman's back
    answer = await post(http, foreman.url + "/api/chat", chat_body("fresh"))
    assert answer.status == 200 and answer.json()["done"]


async def test_a_deleted_model_is_refused_after_its_delete_passes_through(
    http: aiohttp.ClientSession, foreman: Foreman, stub_server: StubServer
) -> None:
    """A delete through foreman makes it look at the list again, so the name is refused, not queued."""
    await post(http, stub_server.url + "/api/copy", {"source": "llama3", "destination": "doomed"})
    assert (await post(http, foreman.url + "/api/chat", chat_body("doomed"))).status == 200
    async with http.delete(foreman.url + "/api/delete", json={"model": "doomed"}) as deleted:
        assert deleted.status == 200
    answer = await post(http, foreman.url + "/api/chat", chat_body("doomed"))
    assert (answer.status, answer.json()) == (404, {"error": "model 'doomed' not found"})
    assert len(foreman.jobs()) == 1


@pytest.mark.parametrize(
    ("path", "body", "error"),
    [
        ("/api/generate", {"model": "ghost", "prompt": "x"}, "model 'ghost' not found"),
        ("/api/embed", {"model": "ghost", "input": "x"}, "model 'ghost' not found"),
        (
            "/api/embeddings",
            {"model": "ghost", "prompt": "x"},
            'model "ghost" not found, try pulling it first',
        ),
    ],
)
async def test_each_endpoint_refuses_with_ollamas_own_words(
    http: aiohttp.ClientSession,
    foreman: Foreman,
    stub_server: StubServer,
    path: str,
    body: dict[str, str],
    error: str,
) -> None:
    """The 404 body is what that Ollama handler says, also for an async submission."""
    for headers in ({}, ASYNC):
        answer = await post(http, foreman.url + path, body, headers)
        assert (answer.status, answer.json()) == (404, {"error": error})
        direct = await post(http, stub_server.url + path, body)
        assert (direct.status, direct.json()) == (404, {"error": error})
    assert foreman.jobs() == []


async def test_jobs_are_accepted_while_ollama_cannot_say(
    http: aiohttp.ClientSession, make_foreman: MakeForeman
) -> None:
    """With Ollama unreachable, any model is accepted and queued as before."""
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    foreman = await make_foreman(f"http://127.0.0.1:{port}")
    answer = await post(http, foreman.url + "/api/chat", chat_body("whatever"), ASYNC)
    assert answer.status == 202 and answer.json()["state"] == "queued"


async def test_explicit_cloud_names_are_left_to_ollama(http: aiohttp.ClientSession, foreman: Foreman) -> None:
    """`:cloud` and `-cloud` names are served by Ollama's cloud, not its list: foreman queues them."""
    for model in ("gpt-oss:120b-cloud", "gpt-oss:cloud"):
        answer = await post(http, foreman.url + "/api/chat", chat_body(model), ASYNC)
        assert answer.status == 202


async def test_the_model_list_answers_for_any_spelling_of_a_name(foreman: Foreman) -> None:
    """`llama3`, `Llama3` and `registry.ollama.ai/library/llama3:latest` are one installed model; `ghost` is none."""
    tags = foreman.app[MODEL_TAGS]
    for name in ("Llama3", "llama3:latest", "registry.ollama.ai/library/llama3:latest"):
        assert await tags.has(name) is True
    assert await tags.has("ghost") is False
