"""Tests of stub_ollama, the fake Ollama server foreman is tested against."""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any

import aiohttp
import ollama
import pytest
from aiohttp.test_utils import TestServer

from stub_ollama import (
    STUB,
    Stub,
    StubModel,
    StubServer,
    StubSettings,
    create_app,
    embedding,
    normalise,
    parse_go_duration,
    parse_keep_alive,
    reply_tokens,
    stub_of,
)
from stub_ollama.keepalive import FOREVER, KeepAliveError

A = "llama3:latest"
B = "mistral:latest"
C = "qwen2:latest"
EMBED = "nomic-embed-text:latest"

Started = tuple[str, Stub]
StartStub = Callable[..., Awaitable[Started]]


@pytest.fixture
def start_stub(aiohttp_server: Callable[..., Awaitable[TestServer]]) -> StartStub:
    """Start a stub on a loopback port; returns (base URL, Stub)."""

    async def start(**overrides: Any) -> Started:
        settings = StubSettings(**{"load_delay": 0.01, **overrides})
        app = create_app(settings)
        server = await aiohttp_server(app)
        return str(server.make_url("")).rstrip("/"), stub_of(app)

    return start


async def post(http: aiohttp.ClientSession, url: str, path: str, body: object) -> tuple[int, Any, str]:
    """POST JSON and return (status, parsed body or None, content type)."""
    async with http.post(url + path, json=body) as response:
        text = await response.text()
        try:
            parsed = json.loads(text) if text else None
        except json.JSONDecodeError:
            parsed = None
        return response.status, parsed, response.headers.get("Content-Type", "")


async def chat(
    http: aiohttp.ClientSession, url: str, model: str, content: str = "hi", **extra: Any
) -> tuple[int, Any, str]:
    """A non-streamed chat request."""
    body = {"model": model, "messages": [{"role": "user", "content": content}], "stream": False}
    return await post(http, url, "/api/chat", {**body, **extra})


async def stream_lines(http: aiohttp.ClientSession, url: str, path: str, body: object) -> list[Any]:
    """POST and read a streamed NDJSON reply line by line."""
    lines = []
    async with http.post(url + path, json=body) as response:
        assert response.status == 200
        assert response.headers["Content-Type"] == "application/x-ndjson"
        async for raw in response.content:
            assert raw.endswith(b"\n") and raw.strip(), raw
            lines.append(json.loads(raw))
    return lines


# --------------------------------------------------------------- pure helpers


def test_names_normalise() -> None:
    """Model names normalise like Ollama's: tag, case, default registry/namespace."""
    assert normalise("llama3") == "llama3:latest"
    assert normalise("Llama3:Latest") == "llama3:latest"
    assert normalise("registry.ollama.ai/library/llama3:8b") == "llama3:8b"
    assert normalise("someone/model") == "someone/model:latest"
    assert normalise("localhost:5000/ns/m:v1") == "localhost:5000/ns/m:v1"
    assert normalise("") is None
    assert normalise("bad name") is None


def test_keep_alive_parsing() -> None:
    """keep_alive parses like Go: numbers are seconds, strings need a unit."""
    assert parse_keep_alive(None) is None
    assert parse_keep_alive(300) == 300.0
    assert parse_keep_alive(42.5) == 42.5
    assert parse_keep_alive(-1) == FOREVER
    assert parse_keep_alive("5m") == 300.0
    assert parse_keep_alive("1h30m") == 5400.0
    assert parse_keep_alive("300ms") == pytest.approx(0.3)
    assert parse_keep_alive("0") == 0.0
    assert parse_keep_alive("-1m") == FOREVER
    assert parse_go_duration("1.5h") == 5400.0
    for bad, message in [
        ("300", 'time: missing unit in duration "300"'),
        ("-1", 'time: missing unit in duration "-1"'),
        ("5x", 'time: unknown unit "x" in duration "5x"'),
        ("", 'time: invalid duration ""'),
        (True, "Unsupported type: 'bool'"),
        ({}, "Unsupported type: 'map[string]interface {}'"),
    ]:
        with pytest.raises(KeepAliveError) as info:
            parse_keep_alive(bad)
        assert str(info.value) == message


def test_reply_tokens_are_deterministic() -> None:
    """Replies depend on model and prompt, and start with a greeting."""
    first = reply_tokens(A, "why?", 8)
    assert first == reply_tokens(A, "why?", 8)
    assert first[:3] == ["Hello", " from", " llama3"]
    assert first != reply_tokens(A, "how?", 8)
    assert len(reply_tokens(A, "x", 3)) == 3


# -------------------------------------------------------------- simple routes


async def test_root_version_tags_and_unknown_path(start_stub: StartStub, http: aiohttp.ClientSession) -> None:
    """/, /api/version, /api/tags and unknown paths answer like Ollama."""
    url, _stub = await start_stub()
    async with http.get(url + "/") as response:
        assert response.status == 200
        assert await response.text() == "Ollama is running"
    async with http.head(url + "/") as response:
        assert response.status == 200
    async with http.get(url + "/api/version") as response:
        assert await response.json() == {"version": "0.33.0"}
    async with http.get(url + "/api/tags") as response:
        models = (await response.json())["models"]
    assert [m["name"] for m in models] == [A, B, C, EMBED]
    assert models[0]["details"]["format"] == "gguf"
    assert len(models[0]["digest"]) == 64
    datetime.fromisoformat(models[0]["modified_at"])
    async with http.get(url + "/api/nope") as response:
        assert response.status == 404
        assert await response.text() == "404 page not found"


async def test_show_pull_copy_delete(start_stub: StartStub, http: aiohttp.ClientSession) -> None:
    """/api/show, /api/pull, /api/copy and /api/delete keep the model list right."""
    url, stub = await start_stub(models=(StubModel("llama3", blob_path="/blobs/llama3.gguf"),))
    status, shown, _ = await post(http, url, "/api/show", {"name": "llama3"})
    assert status == 200
    assert "FROM /blobs/llama3.gguf" in shown["modelfile"]
    assert shown["capabilities"] == ["completion", "tools"]
    status, error, _ = await post(http, url, "/api/show", {"model": "ghost"})
    assert (status, error) == (404, {"error": "model 'ghost' not found"})

    lines = await stream_lines(http, url, "/api/pull", {"model": "phi3"})
    assert lines[0] == {"status": "pulling manifest"}
    assert lines[-1] == {"status": "success"}
    assert any("digest" in line for line in lines)
    assert "phi3:latest" in stub.installed()
    status, reply, _ = await post(http, url, "/api/pull", {"model": "gemma", "stream": False})
    assert (status, reply) == (200, {"status": "success"})

    status, _, _ = await post(http, url, "/api/copy", {"source": "phi3", "destination": "phi4"})
    assert status == 200 and "phi4:latest" in stub.installed()
    async with http.delete(url + "/api/delete", json={"model": "phi4"}) as response:
        assert response.status == 200
    async with http.delete(url + "/api/delete", json={"model": "phi4"}) as response:
        assert response.status == 404
    assert "phi4:latest" not in stub.installed()


# ---------------------------------------------------------- official client


async def test_ollama_client_chat_generate_embed(
    start_stub: StartStub, ollama_client: Callable[[str], ollama.AsyncClient]
) -> None:
    """The official ollama AsyncClient works against the stub for every main call."""
    url, stub = await start_stub(tokens=5)
    client = ollama_client(url)

    reply = await client.chat(model="llama3", messages=[{"role": "user", "content": "hi"}])
    assert reply.message.content == "".join(reply_tokens(A, "hi", 5))
    assert reply.done_reason == "stop"
    assert reply.model == "llama3"
    assert reply.load_duration and reply.total_duration and reply.eval_count == 5

    parts = []
    final = None
    async for chunk in await client.chat(
        model="llama3", messages=[{"role": "user", "content": "hi"}], stream=True
    ):
        parts.append(chunk.message.content or "")
        final = chunk
    assert "".join(parts) == "".join(reply_tokens(A, "hi", 5))
    assert final is not None and final.done and final.done_reason == "stop"

    generated = await client.generate(model="llama3", prompt="tell me", options={"num_predict": 2})
    assert generated.response == "Hello from"
    assert generated.done_reason == "length"
    assert generated.context

    embedded = await client.embed(model="nomic-embed-text", input=["a", "b"])
    assert len(embedded.embeddings) == 2
    assert math.isclose(sum(v * v for v in embedded.embeddings[0]), 1.0, rel_tol=1e-5)

    listed = await client.list()
    assert [m.model for m in listed.models] == [A, B, C, EMBED]
    running = await client.ps()
    assert {m.model for m in running.models} == {EMBED}
    assert stub.loads == [A, EMBED]

    with pytest.raises(ollama.ResponseError) as info:
        await client.chat(model="ghost", messages=[{"role": "user", "content": "hi"}])
    assert info.value.status_code == 404
    assert "not found" in info.value.error


async def test_ps_forever_pin_parses_in_client(
    start_stub: StartStub,
    http: aiohttp.ClientSession,
    ollama_client: Callable[[str], ollama.AsyncClient],
) -> None:
    """A keep_alive -1 pin shows a far-future expires_at that ollama's client parses."""
    url, stub = await start_stub(capacity=2)
    status, empty_ps, _ = await post(http, url, "/api/generate", {"model": "mistral"})
    assert status == 200 and empty_ps["done_reason"] == "load"
    await chat(http, url, "llama3", keep_alive=-1)
    assert stub.keep_alive("llama3") == FOREVER
    running = (await ollama_client(url).ps()).models
    assert [m.model for m in running] == [A, B]  # longest expiry first
    assert running[0].expires_at is not None
    assert running[0].expires_at.year > datetime.now().year + 200
    assert running[1].expires_at is not None
    remaining = running[1].expires_at - datetime.now().astimezone()
    assert timedelta(minutes=4) < remaining <= timedelta(minutes=5)
    assert running[0].context_length == 4096


# --------------------------------------------------------------- residency


async def test_capacity_one_swaps_models(start_stub: StartStub, http: aiohttp.ClientSession) -> None:
    """With capacity 1, chatting A, B, A loads A, B, A and evicts A, B."""
    url, stub = await start_stub()
    for model in ("llama3", "mistral", "llama3:latest"):
        status, reply, content_type = await chat(http, url, model)
        assert status == 200
        assert content_type == "application/json; charset=utf-8"
        assert reply["model"] == model
    assert stub.loads == [A, B, A]
    assert stub.evictions == [A, B]
    assert stub.loaded() == [A]


async def test_same_model_twice_loads_once(start_stub: StartStub, http: aiohttp.ClientSession) -> None:
    """Two requests for a resident model load it once; sequential use never overlaps."""
    url, stub = await start_stub()
    await chat(http, url, "llama3", "one")
    await chat(http, url, "LLAMA3", "two")
    assert stub.loads == [A]
    assert stub.evictions == []
    assert stub.max_in_flight == 1
    assert [r.prompt for r in stub.inference_requests()] == ["one", "two"]


async def test_runner_option_change_reloads(start_stub: StartStub, http: aiohttp.ClientSession) -> None:
    """A different num_ctx reloads the same model; other options do not."""
    url, stub = await start_stub(capacity=3)
    await chat(http, url, "llama3", options={"temperature": 0.1})
    await chat(http, url, "llama3", options={"temperature": 0.9, "num_ctx": 4096})
    assert stub.loads == [A]
    await chat(http, url, "llama3", options={"num_ctx": 8192})
    assert stub.loads == [A, A]
    assert stub.evictions == [A]


async def test_keep_alive_zero_unloads_after_request(
    start_stub: StartStub, http: aiohttp.ClientSession
) -> None:
    """keep_alive 0 unloads the model as soon as the request finishes."""
    url, stub = await start_stub()
    status, _, _ = await chat(http, url, "llama3", keep_alive=0)
    assert status == 200
    await stub.wait_for(lambda s: s.evictions == [A])
    assert stub.loaded() == []


async def test_keep_alive_expiry_timer(start_stub: StartStub, http: aiohttp.ClientSession) -> None:
    """A short keep_alive expires the idle model by timer."""
    url, stub = await start_stub()
    await chat(http, url, "llama3", keep_alive="50ms")
    assert stub.loaded() == [A]
    await stub.wait_for(lambda s: s.evictions == [A], timeout=2)


async def test_load_and_unload_short_cuts(start_stub: StartStub, http: aiohttp.ClientSession) -> None:
    """Empty messages load the model (done_reason load); with keep_alive 0 they unload it."""
    url, stub = await start_stub()
    status, reply, _ = await post(http, url, "/api/chat", {"model": "llama3", "stream": True})
    assert status == 200
    assert reply["done_reason"] == "load" and reply["message"] == {
        "role": "assistant",
        "content": "",
    }
    assert stub.loaded() == [A]
    status, reply, _ = await post(
        http, url, "/api/generate", {"model": "llama3", "prompt": "", "keep_alive": 0}
    )
    assert (status, reply["done_reason"], reply["response"]) == (200, "unload", "")
    await stub.wait_for(lambda s: s.loaded() == [])
    status, reply, _ = await post(http, url, "/api/embed", {"model": "nomic-embed-text"})
    assert (status, reply) == (200, {"model": "nomic-embed-text", "embeddings": []})
    status, reply, _ = await post(http, url, "/api/embeddings", {"model": "nomic-embed-text", "prompt": ""})
    assert (status, reply) == (200, {"embedding": []})
    assert stub.inference_requests() == []
    assert len(stub.inference_requests(exclude_loads=False)) == 4


async def test_fifo_queue_evicts_idle_victim_first(
    start_stub: StartStub, http: aiohttp.ClientSession
) -> None:
    """With capacity 2 the idle, shortest-keep_alive model is the victim."""
    url, stub = await start_stub(capacity=2)
    await chat(http, url, "llama3", keep_alive=-1)
    await chat(http, url, "mistral", keep_alive="10m")
    await chat(http, url, "qwen2")
    assert stub.evictions == [B]
    assert sorted(stub.loaded()) == [A, C]


async def test_busy_runner_is_waited_for(start_stub: StartStub, http: aiohttp.ClientSession) -> None:
    """A swap waits for the busy model's stream to finish instead of aborting it."""
    url, stub = await start_stub(token_delay=0.01, tokens=6)
    first = asyncio.create_task(
        stream_lines(
            http, url, "/api/chat", {"model": "llama3", "messages": [{"role": "user", "content": "long"}]}
        )
    )
    await stub.wait_for(lambda s: s.generating == 1)
    second = asyncio.create_task(chat(http, url, "mistral"))
    lines = await first
    assert lines[-1]["done"] is True
    status, _, _ = await second
    assert status == 200
    assert stub.loads == [A, B]
    assert stub.evictions == [A]


async def test_concurrency_counts_and_num_parallel(
    start_stub: StartStub, http: aiohttp.ClientSession
) -> None:
    """Two concurrent requests overlap in generation only when num_parallel is 2."""
    for parallel in (1, 2):
        url, stub = await start_stub(num_parallel=parallel, token_delay=0.01, tokens=4)
        await post(http, url, "/api/chat", {"model": "llama3"})  # preload
        await asyncio.gather(chat(http, url, "llama3", "x"), chat(http, url, "llama3", "y"))
        assert stub.max_in_flight == 2
        assert stub.max_generating == parallel
        assert stub.loads == [A]


async def test_client_disconnect_releases_runner(start_stub: StartStub, http: aiohttp.ClientSession) -> None:
    """A client leaving mid-stream stops generation and frees the runner."""
    url, stub = await start_stub(token_delay=0.02, tokens=50)
    body = {"model": "llama3", "messages": [{"role": "user", "content": "hi"}]}
    async with http.post(url + "/api/chat", json=body) as response:
        await response.content.readline()
        response.close()
    await stub.wait_for(lambda s: s.in_flight == 0 and s.generating == 0)
    assert stub.requests[-1].disconnected
    assert stub.scheduler.runners[A].refcount == 0


async def test_disconnect_while_loading_aborts_load(
    start_stub: StartStub, http: aiohttp.ClientSession
) -> None:
    """A client leaving during the load aborts it, as in Ollama."""
    url, stub = await start_stub(load_delay=5.0)
    task = asyncio.create_task(chat(http, url, "llama3"))
    await stub.wait_for(lambda s: s.loading() == [A])
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await stub.wait_for(lambda s: s.loading() == [] and s.in_flight == 0)
    assert stub.loads == [A] and stub.evictions == [A]


# ---------------------------------------------------------------- streaming


async def test_streamed_chat_and_generate_shapes(start_stub: StartStub, http: aiohttp.ClientSession) -> None:
    """Streams are compact NDJSON with message/response chunks and a final metrics line."""
    url, _stub = await start_stub(tokens=3)
    lines = await stream_lines(
        http, url, "/api/chat", {"model": "llama3", "messages": [{"role": "user", "content": "é"}]}
    )
    assert len(lines) == 4
    assert all(line["message"]["role"] == "assistant" for line in lines)
    assert all(line["created_at"].endswith("Z") for line in lines)
    assert "total_duration" not in lines[0]
    final = lines[-1]
    assert final["done"] and final["done_reason"] == "stop" and final["message"]["content"] == ""
    for key in ("total_duration", "load_duration", "prompt_eval_count", "eval_count"):
        assert isinstance(final[key], int) and final[key] > 0

    lines = await stream_lines(http, url, "/api/generate", {"model": "llama3", "prompt": "p", "stream": None})
    assert [line.get("response") for line in lines[:-1]] == reply_tokens(A, "p", 3)
    assert isinstance(lines[-1]["context"], list)


# ------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("path", "body", "status", "error"),
    [
        ("/api/chat", {"model": "llama3", "keep_alive": "300"}, 400,
         'time: missing unit in duration "300"'),
        ("/api/chat", {"model": "llama3", "keep_alive": True}, 400, "Unsupported type: 'bool'"),
        ("/api/chat", {"messages": []}, 400, "model is required"),
        ("/api/generate", {"model": ""}, 400, "invalid model name"),
        ("/api/chat", {"model": "ghost"}, 404, "model 'ghost' not found"),
        ("/api/embed", {"model": "ghost", "input": "x"}, 404, "model 'ghost' not found"),
        ("/api/embeddings", {"model": "ghost", "prompt": "x"}, 404,
         'model "ghost" not found, try pulling it first'),
        ("/api/chat", {"model": "llama3", "messages": "hi"}, 400,
         "json: cannot unmarshal string into Go struct field ChatRequest.messages of type "
         "[]api.Message"),
        ("/api/chat", {"model": "llama3", "stream": "yes"}, 400,
         "json: cannot unmarshal string into Go struct field ChatRequest.stream of type bool"),
        ("/api/chat", {"model": "nomic-embed-text", "messages": [{"role": "user"}]}, 400,
         '"nomic-embed-text" does not support chat'),
        ("/api/generate", {"model": "nomic-embed-text", "prompt": "x"}, 400,
         '"nomic-embed-text" does not support generate'),
        ("/api/embed", {"model": "nomic-embed-text", "input": 3}, 400, "invalid input type"),
    ],
)  # fmt: skip
async def test_request_errors(
    start_stub: StartStub,
    http: aiohttp.ClientSession,
    path: str,
    body: dict[str, Any],
    status: int,
    error: str,
) -> None:
    """Bad requests get Ollama's status and error wording, and load nothing."""
    url, stub = await start_stub()
    got_status, reply, content_type = await post(http, url, path, body)
    assert (got_status, reply) == (status, {"error": error})
    assert content_type.startswith("application/json")
    assert stub.loads == []


async def test_body_errors(start_stub: StartStub, http: aiohttp.ClientSession) -> None:
    """Empty and malformed bodies are 400s; any Content-Type is parsed as JSON."""
    url, _stub = await start_stub()
    async with http.post(url + "/api/chat", data=b"") as response:
        assert (response.status, await response.json()) == (400, {"error": "missing request body"})
    async with http.post(url + "/api/chat", data=b"{nope") as response:
        assert response.status == 400
        assert "invalid character" in (await response.json())["error"]
    async with http.post(
        url + "/api/chat",
        data=json.dumps({"model": "llama3", "messages": [], "stream": False}),
        headers={"Content-Type": "text/plain"},
    ) as response:
        assert response.status == 200


async def test_host_guard(start_stub: StartStub, http: aiohttp.ClientSession) -> None:
    """On loopback a foreign Host header is refused with an empty 403."""
    url, _stub = await start_stub()
    async with http.get(url + "/api/version", headers={"Host": "evil.example.com"}) as response:
        assert response.status == 403
        assert await response.read() == b""
    async with http.get(url + "/api/version", headers={"Host": "localhost:11434"}) as response:
        assert response.status == 200
    async with http.get(url + "/", headers={"Origin": "https://evil.example.com"}) as response:
        assert response.status == 403


# ------------------------------------------------------------------- faults


async def test_fail_next(start_stub: StartStub, http: aiohttp.ClientSession) -> None:
    """fail_next answers the chosen status before output, skipping load short-cuts."""
    url, stub = await start_stub()
    stub.faults.fail_next(1, status=503, error="busy")
    status, _, _ = await post(http, url, "/api/chat", {"model": "llama3"})  # load: not failed
    assert status == 200
    status, reply, _ = await chat(http, url, "llama3")
    assert (status, reply) == (503, {"error": "busy"})
    status, _, _ = await chat(http, url, "llama3")
    assert status == 200
    assert [r.outcome for r in stub.requests] == ["load", "failed", "ok"]


async def test_fail_mid_stream(start_stub: StartStub, http: aiohttp.ClientSession) -> None:
    """fail_next(after_chunks=1) sends a chunk, then an error line and no done line."""
    url, stub = await start_stub()
    stub.faults.fail_next(after_chunks=1, error="boom")
    lines = await stream_lines(
        http, url, "/api/chat", {"model": "llama3", "messages": [{"role": "user", "content": "x"}]}
    )
    assert len(lines) == 2
    assert lines[1] == {"error": "boom"}


async def test_drop_next_mid_stream(start_stub: StartStub, http: aiohttp.ClientSession) -> None:
    """drop_next(after_chunks=2) cuts the connection after two lines."""
    url, stub = await start_stub()
    stub.faults.drop_next(after_chunks=2)
    body = {"model": "llama3", "messages": [{"role": "user", "content": "x"}]}
    received = []
    with pytest.raises((aiohttp.ClientPayloadError, aiohttp.ClientConnectionError)):
        async with http.post(url + "/api/chat", json=body) as response:
            assert response.status == 200
            async for raw in response.content:
                received.append(json.loads(raw))
    assert len(received) == 2
    await stub.wait_for(lambda s: s.in_flight == 0)
    assert stub.requests[-1].outcome == "dropped"
    status, _, _ = await chat(http, url, "llama3")
    assert status == 200


async def test_drop_next_before_headers(start_stub: StartStub, http: aiohttp.ClientSession) -> None:
    """drop_next(after_chunks=0) closes the connection before any response."""
    url, stub = await start_stub()
    stub.faults.drop_next(after_chunks=0)
    body = {"model": "llama3", "messages": [{"role": "user", "content": "x"}]}
    with pytest.raises(aiohttp.ClientConnectionError):
        async with http.post(url + "/api/chat", json=body) as response:
            await response.read()
    await stub.wait_for(lambda s: s.in_flight == 0)


async def test_hang_next(start_stub: StartStub, http: aiohttp.ClientSession) -> None:
    """hang_next holds a request until released."""
    url, stub = await start_stub()
    stub.faults.hang_next()
    task = asyncio.create_task(chat(http, url, "llama3"))
    await stub.wait_for(lambda s: s.faults.hung == 1)
    assert not task.done()
    stub.faults.release_hung()
    status, _, _ = await task
    assert status == 200


# ------------------------------------------------------------------- server


async def test_stub_server_stop_and_resume() -> None:
    """stop_listening refuses connections and forgets models; resume uses the same port."""
    async with StubServer(StubSettings(load_delay=0.01)) as server, aiohttp.ClientSession() as http:
        assert server.url == f"http://127.0.0.1:{server.port}"
        status, _, _ = await chat(http, server.url, "llama3")
        assert status == 200 and server.stub.loaded() == [A]
        port = server.port
        await server.stop_listening()
        assert server.stub.loaded() == []
        with pytest.raises(aiohttp.ClientConnectorError):
            async with http.get(server.url + "/"):
                pass
        await server.resume_listening()
        assert server.port == port
        status, _, _ = await chat(http, server.url, "llama3")
        assert status == 200
        assert server.stub.loads == [A, A]
        assert server.app[STUB] is server.stub


# ------------------------------------------------------------------ embeddings


async def test_an_embed_call_costs_a_fixed_part_plus_a_part_per_input(
    start_stub: StartStub, http: aiohttp.ClientSession
) -> None:
    """Like Ollama: each call pays its fixed cost and each input its own, one call at a time per slot."""
    url, stub = await start_stub(embed_call_delay=0.05, embed_input_delay=0.02)
    await post(http, url, "/api/embed", {"model": EMBED, "input": []})  # load first
    started = asyncio.get_running_loop().time()
    status, reply, _ = await post(http, url, "/api/embed", {"model": EMBED, "input": ["a"] * 5})
    assert status == 200 and len(reply["embeddings"]) == 5
    assert asyncio.get_running_loop().time() - started >= 0.05 + 5 * 0.02
    await asyncio.gather(*(post(http, url, "/api/embed", {"model": EMBED, "input": "x"}) for _ in range(3)))
    assert stub.max_in_flight >= 3 and stub.max_generating == 1


async def test_vectors_follow_the_digest_and_a_pull_changes_it(
    start_stub: StartStub, http: aiohttp.ClientSession
) -> None:
    """The same text embeds differently after a pull (new digest); a copy shares its source's digest and vectors."""
    url, stub = await start_stub()
    digests = {}
    async with http.get(url + "/api/tags") as response:
        digests = {m["name"]: m["digest"] for m in (await response.json())["models"]}
    _, before, _ = await post(http, url, "/api/embed", {"model": EMBED, "input": "x"})
    await post(http, url, "/api/pull", {"model": EMBED, "stream": False})
    async with http.get(url + "/api/tags") as response:
        after_pull = {m["name"]: m["digest"] for m in (await response.json())["models"]}
    assert after_pull[EMBED] != digests[EMBED] and after_pull[A] == digests[A]
    _, after, _ = await post(http, url, "/api/embed", {"model": EMBED, "input": "x"})
    assert after["embeddings"] != before["embeddings"]
    assert after["embeddings"][0] == pytest.approx(embedding(after_pull[EMBED], "x", 8))
    await post(http, url, "/api/copy", {"source": EMBED, "destination": "copied-embed"})
    assert stub.find("copied-embed").digest == after_pull[EMBED]  # type: ignore[union-attr]
    _, copied, _ = await post(http, url, "/api/embed", {"model": "copied-embed", "input": "x"})
    assert copied["embeddings"] == after["embeddings"]


async def test_an_input_over_the_context_is_refused_without_truncate(
    start_stub: StartStub, http: aiohttp.ClientSession
) -> None:
    """truncate: false and an input longer than num_ctx: Ollama's 400 for the whole call."""
    url, _ = await start_stub(num_ctx=3)
    body = {"model": EMBED, "input": ["short", "one two three four"], "truncate": False}
    status, reply, _ = await post(http, url, "/api/embed", body)
    assert (status, reply) == (400, {"error": "the input length exceeds the context length"})
    status, _, _ = await post(http, url, "/api/embed", {**body, "truncate": True})
    assert status == 200
