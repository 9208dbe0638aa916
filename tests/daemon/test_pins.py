"""No pin outlives the work it was set for: after an abort, a failure, a cancel, an empty queue or SIGTERM,
every model foreman pinned is back on Ollama's own expiry (the stub's default keep_alive, 300 s)."""

from __future__ import annotations

import asyncio
import contextlib

import aiohttp
from structlog.testing import capture_logs

from stub_ollama import FOREVER, Stub
from tests.support.helpers import (
    ASYNC,
    Foreman,
    MakeForeman,
    MakeStub,
    chat_body,
    eventually,
    hold_worker,
    post,
    submit,
)

DEFAULT = 300.0  # the stub's OLLAMA_KEEP_ALIVE


async def test_a_lone_job_aborted_after_its_load_leaves_no_pin(
    http: aiohttp.ClientSession, foreman: Foreman, stub: Stub
) -> None:
    """The only job after a swap is aborted before Ollama took its request: the model keeps Ollama's expiry."""
    stub.faults.hang_next(1)
    client = asyncio.create_task(post(http, foreman.url + "/api/chat", chat_body("llama3", "gone")))
    await stub.wait_for(lambda s: s.faults.hung == 1)
    client.cancel()  # the client leaves, as curl -m 1 does
    with contextlib.suppress(asyncio.CancelledError):
        await client
    await foreman.wait_states(lambda states: states == ["cancelled"])
    await stub.wait_for(lambda s: s.in_flight == 0)
    assert stub.keep_alive("llama3") == DEFAULT


async def test_a_lone_job_that_fails_leaves_no_pin(foreman: Foreman, stub: Stub) -> None:
    """Ollama refuses the only job after a swap: the model keeps Ollama's expiry, not foreman's -1."""
    stub.faults.fail_next(1, status=400, error="bad request")
    answer = await foreman.client.post("/api/chat", json=chat_body("llama3"))
    assert answer.status == 400
    assert stub.keep_alive("llama3") == DEFAULT


async def test_a_pin_whose_work_was_cancelled_is_released_when_the_queue_empties(
    http: aiohttp.ClientSession, foreman: Foreman, stub: Stub
) -> None:
    """A job ran pinned for the one behind it; that one is cancelled: with nothing left, the pin goes."""
    first = await hold_worker(http, foreman, stub, "llama3")
    pinned = await submit(http, foreman, chat_body("llama3", "pinned"))
    behind = await post(http, foreman.url + "/api/chat", chat_body("llama3", "behind"), ASYNC)
    stub.faults.hang_next(1)  # "pinned" is held once it has the model
    stub.faults.release_hung()
    await first
    await stub.wait_for(lambda s: s.faults.hung == 1 and s.requests[-1].prompt == "pinned")
    with capture_logs() as logs:
        assert (await foreman.client.delete(f"/jobs/{behind.json()['id']}")).status == 200
        stub.faults.release_hung()
        await pinned
        await eventually(lambda: stub.keep_alive("llama3") == DEFAULT, what="the pin to be released")
    assert {
        "event": "model.unpinned",
        "model": "llama3:latest",
        "keep_alive": 300,
        "reason": "idle",
        "log_level": "info",
    } in logs


async def test_sigterm_releases_every_pin(
    http: aiohttp.ClientSession, make_stub: MakeStub, make_foreman: MakeForeman
) -> None:
    """A job runs pinned for work behind it when foreman stops: before it exits, the pin is released."""
    server = await make_stub(token_delay=0.05)
    stub = server.stub
    foreman = await make_foreman(server.url, shutdown_grace=0)
    first = await hold_worker(http, foreman, stub, "llama3")
    waiting = [await submit(http, foreman, chat_body("llama3", p)) for p in ("a", "b")]
    stub.faults.release_hung()
    await first
    await stub.wait_for(lambda s: s.keep_alive("llama3") == FOREVER)
    await foreman.close()
    assert stub.keep_alive("llama3") == DEFAULT
    for task in waiting:
        assert (await task).status == 503  # their jobs wait for the restart
