"""Drain-by-model: what the worker runs, in what order, and how it keeps models loaded."""

from __future__ import annotations

import asyncio
import json

import aiohttp

from stub_ollama import Stub
from tests.support.helpers import Foreman, MakeForeman, MakeStub, chat_body, hold_worker, reply_text, submit


async def test_mixed_queue_drains_by_model(http: aiohttp.ClientSession, foreman: Foreman, stub: Stub) -> None:
    """A,B,A,B,A,B,C,A queued behind a running A job loads each model once, not once per job."""
    first = await hold_worker(http, foreman, stub, "llama3")
    order = ["llama3", "mistral", "llama3", "mistral", "llama3", "mistral", "qwen2", "llama3"]
    tasks = [await submit(http, foreman, chat_body(m, f"job {i}")) for i, m in enumerate(order)]
    stub.faults.release_hung()
    answers = await asyncio.gather(first, *tasks)

    assert [a.status for a in answers] == [200] * 9
    assert [a.json()["message"]["content"] for a in answers[1:]] == [
        reply_text(m, f"job {i}") for i, m in enumerate(order)
    ]
    assert stub.loads == ["llama3:latest", "mistral:latest", "qwen2:latest"]
    served = [r.model for r in stub.inference_requests()]
    assert served == ["llama3"] * 5 + ["mistral"] * 3 + ["qwen2"]


async def test_jobs_run_one_at_a_time(make_stub: MakeStub, make_foreman: MakeForeman) -> None:
    """Concurrent clients never make Ollama serve two requests at once."""
    # Replies that take a while, so that jobs run side by side would overlap at the stub.
    server = await make_stub(token_delay=0.01, tokens=4)
    foreman = await make_foreman(server.url)
    stub = server.stub
    answers = await asyncio.gather(
        *(
            foreman.client.post("/api/chat", json=chat_body(m, str(i)))
            for i, m in enumerate(["llama3", "mistral", "llama3", "qwen2"] * 3)
        )
    )
    assert [a.status for a in answers] == [200] * 12
    assert stub.max_in_flight == 1
    assert foreman.states() == ["done"] * 12


async def test_job_rows_record_the_lifecycle(
    http: aiohttp.ClientSession, foreman: Foreman, stub: Stub
) -> None:
    """Each request is a row: queued while it waits, done with its result when answered."""
    first = await hold_worker(http, foreman, stub, "llama3")
    second = await submit(http, foreman, chat_body("mistral", "second"))
    running, waiting = foreman.jobs()
    assert (running["state"], waiting["state"]) == ("working", "queued")
    assert waiting["model"] == "mistral" and waiting["model_key"] == "mistral:latest"
    assert waiting["endpoint"] == "/api/chat" and waiting["attempt"] == 0
    assert json.loads(waiting["body"]) == chat_body("mistral", "second")
    stub.faults.release_hung()
    answer = await second
    await first
    assert answer.headers["X-Foreman-Job"] == waiting["id"]
    done = foreman.jobs()[1]
    assert done["state"] == "done" and json.loads(done["result"]) == answer.json()
    assert done["started_at"] >= done["created_at"] and done["finished_at"] >= done["started_at"]


async def test_waiting_work_pins_the_model_and_the_last_job_releases_it(
    http: aiohttp.ClientSession, foreman: Foreman, stub: Stub
) -> None:
    """keep_alive is foreman's -1 while jobs wait for the model, and the client's own on the last one."""
    first = await hold_worker(http, foreman, stub, "llama3")
    tasks = [
        await submit(http, foreman, chat_body("llama3", "a", keep_alive="10m")),
        await submit(http, foreman, chat_body("llama3", "b", keep_alive="10m")),
        await submit(http, foreman, chat_body("llama3", "c", keep_alive="10m")),
    ]
    stub.faults.release_hung()
    await asyncio.gather(first, *tasks)
    sent = [
        (r.prompt, r.body.get("keep_alive"), "keep_alive" in r.body.get("options", {})) for r in stub.requests
    ]
    # The swap loads with Ollama's default; "first" ran alone (as it came),
    # "a" and "b" had work behind them, and "c" ends the drain with the client's value.
    assert sent == [
        (None, None, False),
        ("first", None, False),
        ("a", -1, False),
        ("b", -1, False),
        ("c", "10m", False),
    ]
    assert stub.keep_alive("llama3") == 600


async def test_release_restores_ollamas_own_default_when_the_client_gave_none(
    http: aiohttp.ClientSession, make_stub: MakeStub, make_foreman: MakeForeman
) -> None:
    """Without a client keep_alive, the last job hands the model back to Ollama's OLLAMA_KEEP_ALIVE (24h here)."""
    server = await make_stub(default_keep_alive=86400)
    foreman, stub = await make_foreman(server.url), server.stub
    first = await hold_worker(http, foreman, stub, "llama3")
    pinned = await submit(http, foreman, chat_body("llama3", "pinned"))
    last = await submit(http, foreman, chat_body("llama3", "last"))
    stub.faults.release_hung()
    await asyncio.gather(first, pinned, last)
    assert "keep_alive" not in stub.requests[0].body  # the swap: Ollama applies its default
    assert [r.body.get("keep_alive") for r in stub.requests[-2:]] == [-1, 86400]
    assert stub.keep_alive("llama3") == 86400


async def test_foreman_release_keep_alive_overrides_ollamas_default(
    http: aiohttp.ClientSession, make_stub: MakeStub, make_foreman: MakeForeman
) -> None:
    """FOREMAN_RELEASE_KEEP_ALIVE, when set, is what a model foreman loaded or pinned ends with."""
    server = await make_stub(default_keep_alive=86400)
    foreman, stub = await make_foreman(server.url, release_keep_alive="5m"), server.stub
    first = await hold_worker(http, foreman, stub, "llama3")
    pinned = await submit(http, foreman, chat_body("llama3", "pinned"))
    last = await submit(http, foreman, chat_body("llama3", "last"))
    stub.faults.release_hung()
    await asyncio.gather(first, pinned, last)
    assert stub.requests[0].body["keep_alive"] == "5m"  # the swap
    assert [r.body.get("keep_alive") for r in stub.requests[-2:]] == [-1, "5m"]
    assert stub.keep_alive("llama3") == 300


async def test_a_lone_request_keeps_the_clients_keep_alive(foreman: Foreman, stub: Stub) -> None:
    """With nothing queued behind it, foreman does not touch a job's keep_alive."""
    await foreman.client.post("/api/chat", json=chat_body("llama3", keep_alive=0))
    assert stub.requests[-1].body["keep_alive"] == 0


async def test_load_options_group_apart(http: aiohttp.ClientSession, foreman: Foreman, stub: Stub) -> None:
    """Same name, different num_ctx: two groups, each drained in one load."""
    first = await hold_worker(http, foreman, stub, "llama3")
    big = {"num_ctx": 8192}
    tasks = [
        await submit(http, foreman, chat_body("llama3", "1", options=big)),
        await submit(http, foreman, chat_body("llama3", "2")),
        await submit(http, foreman, chat_body("llama3", "3", options=big)),
        await submit(http, foreman, chat_body("llama3", "4")),
    ]
    stub.faults.release_hung()
    await asyncio.gather(first, *tasks)
    assert [r.prompt for r in stub.inference_requests()] == ["first", "2", "4", "1", "3"]
    assert stub.loads == ["llama3:latest", "llama3:latest"]
    assert stub.requests[-3].body["options"] == big  # the swap loaded it with the job's num_ctx


async def test_spellings_of_one_model_drain_together(
    http: aiohttp.ClientSession, foreman: Foreman, stub: Stub
) -> None:
    """`llama3`, `llama3:latest` and `Llama3` are one model for the ordering."""
    first = await hold_worker(http, foreman, stub, "llama3")
    tasks = [
        await submit(http, foreman, chat_body("mistral", "m")),
        await submit(http, foreman, chat_body("llama3:latest", "1")),
        await submit(http, foreman, chat_body("Llama3", "2")),
    ]
    stub.faults.release_hung()
    answers = await asyncio.gather(first, *tasks)
    assert [r.prompt for r in stub.inference_requests()] == ["first", "1", "2", "m"]
    assert answers[3].json()["model"] == "Llama3"  # Ollama echoes the name as sent
    assert stub.loads == ["llama3:latest", "mistral:latest"]


async def test_chunks_reach_the_client_while_the_job_runs(
    http: aiohttp.ClientSession, make_stub: MakeStub, make_foreman: MakeForeman
) -> None:
    """A streaming client reads the first chunk while Ollama is still producing the rest."""
    server = await make_stub(token_delay=0.15, tokens=6)
    foreman = await make_foreman(server.url)
    body = {"model": "llama3", "messages": [{"role": "user", "content": "hi"}]}
    async with http.post(foreman.url + "/api/chat", json=body) as response:
        assert response.headers["Content-Type"] == "application/x-ndjson"
        first = json.loads(await response.content.readline())
        assert first["done"] is False and first["message"]["content"] == "Hello"
        [upstream] = server.stub.inference_requests()
        assert not upstream.finished and upstream.chunks_sent < 6
        rest = [json.loads(line) async for line in response.content]
    assert rest[-1]["done"] is True and len(rest) == 6


def _dialect_request(index: int, model: str) -> tuple[str, dict[str, object]]:
    """The `index`-th of four dialects, each asking `model` one thing."""
    content = f"job {index}"
    chat = [{"role": "user", "content": content}]
    return [
        ("/api/chat", chat_body(model, content)),
        ("/v1/chat/completions", {"model": model, "messages": chat}),
        ("/v1/responses", {"model": model, "input": content}),
        ("/v1/messages", {"model": model, "max_tokens": 32, "messages": chat}),
    ][index % 4]


async def test_every_dialect_drains_by_model(
    http: aiohttp.ClientSession, make_stub: MakeStub, make_foreman: MakeForeman
) -> None:
    """16 requests interleaved over two models and four APIs: at most 3 loads, one request at a time upstream."""
    server = await make_stub(token_delay=0.01, tokens=4)
    foreman = await make_foreman(server.url)
    stub = server.stub
    first = await hold_worker(http, foreman, stub, "llama3")
    # Each API asks for both models: llama3, mistral, llama3, mistral, then mistral, llama3, ...
    requests = [_dialect_request(i, ("llama3", "mistral")[(i + i // 4) % 2]) for i in range(16)]
    tasks = [await submit(http, foreman, body, path) for path, body in requests]
    stub.faults.release_hung()
    answers = await asyncio.gather(first, *tasks)
    assert [a.status for a in answers] == [200] * 17
    assert len(stub.loads) <= 3, stub.loads
    assert stub.max_in_flight == 1
    jobs = foreman.jobs()[1:]
    assert [j["endpoint"] for j in jobs] == [path for path, _ in requests]
    assert {j["model_key"] for j in jobs} == {"llama3:latest", "mistral:latest"}
