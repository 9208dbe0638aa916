"""A client that goes away stops its job, as it would in Ollama."""

from __future__ import annotations

import aiohttp

from stub_ollama import Stub
from tests.support.helpers import Foreman, chat_body, hold_worker, submit


async def test_leaving_while_queued_cancels_the_job(
    http: aiohttp.ClientSession, foreman: Foreman, stub: Stub
) -> None:
    """The queued job of a client that disconnected is cancelled and never reaches Ollama."""
    first = await hold_worker(http, foreman, stub, "llama3")
    leaver = await submit(http, foreman, chat_body("mistral", "leaver"))
    stayer = await submit(http, foreman, chat_body("llama3", "stayer"))
    leaver.cancel()
    await foreman.wait_states(lambda states: states[1] == "cancelled", "the job to be cancelled")
    stub.faults.release_hung()
    assert (await first).status == 200 and (await stayer).status == 200
    assert [r.prompt for r in stub.requests if r.prompt] == ["first", "stayer"]
    assert stub.loads == ["llama3:latest"]
    assert foreman.states() == ["done", "cancelled", "done"]


async def test_leaving_while_running_aborts_the_upstream_request(
    http: aiohttp.ClientSession, foreman: Foreman, stub: Stub
) -> None:
    """Disconnecting mid-run aborts Ollama's request and marks the job cancelled."""
    running = await hold_worker(http, foreman, stub, "llama3")
    running.cancel()
    await foreman.wait_states(lambda states: states == ["cancelled"], "the job to be cancelled")
    await stub.wait_for(lambda s: s.in_flight == 0)
    assert stub.requests[-1].disconnected
    # The worker is free again.
    answer = await foreman.client.post("/api/chat", json=chat_body("llama3", "next"))
    assert answer.status == 200
