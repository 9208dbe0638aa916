"""A job the worker can start at once runs on its handler's task: every way it can end still ends it right.

With its model loaded, a free slot and nothing waiting, a job is written
already claimed and runs in the handler that waits for it (issue 25:
dispatch without a hop): on the handler's own task for `stream: false`,
beside it for a stream (the handler writes the chunks). These tests load
the model with a first job, so the job they watch takes that path, and run
each case both ways.
"""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from foreman.storage import Claim
from foreman.worker.runner import JobRunner
from stub_ollama import Stub
from tests.support.helpers import (
    Answer,
    Foreman,
    MakeForeman,
    MakeStub,
    chat_body,
    eventually,
    post,
    reply_text,
    submit,
)

STREAMED = pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])


async def _held_after_warm(
    http: aiohttp.ClientSession, foreman: Foreman, stub: Stub, stream: bool = False
) -> asyncio.Task[Answer]:
    """One job to load llama3, then one the stub holds: it runs at once, on its handler."""
    warm = await foreman.client.post("/api/chat", json=chat_body("llama3", "warm"))
    assert warm.status == 200
    stub.faults.hang_next(1)
    task = await submit(http, foreman, chat_body("llama3", "held", stream=stream))
    await stub.wait_for(lambda s: s.faults.hung == 1)
    return task


@pytest.mark.parametrize("sync", ["normal", "full"])
@STREAMED
async def test_a_job_run_at_once_is_working_in_the_store_before_ollama_answers(
    http: aiohttp.ClientSession, make_stub: MakeStub, make_foreman: MakeForeman, sync: str, stream: bool
) -> None:
    """The job is written claimed (as working) before its request reaches Ollama, and ends done."""
    server = await make_stub()
    foreman = await make_foreman(server.url, sync=sync)
    held = await _held_after_warm(http, foreman, server.stub, stream)
    assert foreman.states() == ["done", "working"]
    server.stub.faults.release_hung()
    answer = await held
    assert answer.status == 200
    assert foreman.states() == ["done", "done"]
    [_, job] = foreman.jobs()
    # Claimed in the statement that wrote it (the worker's claim would start it later): no wait at all.
    assert job["attempt"] == 0 and job["started_at"] == job["created_at"]
    if stream:
        lines = answer.lines()
        assert lines[-1]["done"] is True
        assert "".join(line["message"]["content"] for line in lines) == reply_text("llama3", "held")


@STREAMED
async def test_leaving_while_a_job_runs_at_once_cancels_it(
    http: aiohttp.ClientSession, make_stub: MakeStub, make_foreman: MakeForeman, stream: bool
) -> None:
    """A client that disconnects aborts Ollama's request; the job ends cancelled, not back in line."""
    server = await make_stub()
    stub = server.stub
    foreman = await make_foreman(server.url)
    held = await _held_after_warm(http, foreman, stub, stream)
    held.cancel()
    await foreman.wait_states(lambda states: states == ["done", "cancelled"], "the job to be cancelled")
    await stub.wait_for(lambda s: s.in_flight == 0)
    assert stub.requests[-1].disconnected
    answer = await foreman.client.post("/api/chat", json=chat_body("llama3", "next"))
    assert answer.status == 200
    assert foreman.states() == ["done", "cancelled", "done"]


@STREAMED
async def test_delete_aborts_a_job_run_at_once_and_its_client_hears_499(
    http: aiohttp.ClientSession, make_stub: MakeStub, make_foreman: MakeForeman, stream: bool
) -> None:
    """DELETE /jobs/{id} ends a job running on its handler: its client gets the cancellation."""
    server = await make_stub()
    foreman = await make_foreman(server.url)
    held = await _held_after_warm(http, foreman, server.stub, stream)
    job_id = foreman.jobs()[1]["id"]
    deleted = await foreman.client.delete(f"/jobs/{job_id}")
    assert deleted.status in (200, 202)
    answer = await held
    assert answer.status == 499
    assert foreman.states() == ["done", "cancelled"]


@STREAMED
async def test_shutdown_puts_a_job_run_at_once_back_and_tells_its_client(
    http: aiohttp.ClientSession, make_stub: MakeStub, make_foreman: MakeForeman, stream: bool
) -> None:
    """Stopping foreman mid-run puts the job back at its place, uncharged, and its client gets a 503."""
    server = await make_stub()
    foreman = await make_foreman(server.url, shutdown_grace=0)
    held = await _held_after_warm(http, foreman, server.stub, stream)
    await foreman.close()
    answer = await held
    assert answer.status == 503
    assert "stays queued" in answer.json()["error"]
    assert foreman.states() == ["done", "queued"]
    assert [j["attempt"] for j in foreman.jobs()] == [0, 0]


@STREAMED
async def test_jobs_behind_a_job_run_at_once_wait_for_it(
    http: aiohttp.ClientSession, make_stub: MakeStub, make_foreman: MakeForeman, stream: bool
) -> None:
    """With one slot, the next job waits until the one running on its handler ends, also for the same model."""
    server = await make_stub()
    stub = server.stub
    foreman = await make_foreman(server.url)
    held = await _held_after_warm(http, foreman, stub, stream)
    same = await submit(http, foreman, chat_body("llama3", "same"))
    other = await submit(http, foreman, chat_body("mistral", "other"))
    await eventually(lambda: foreman.states() == ["done", "working", "queued", "queued"], what="two queued")
    assert stub.in_flight == 1
    stub.faults.release_hung()
    assert [(await t).status for t in (held, other, same)] == [200, 200, 200]
    # Drain by model holds: llama3's waiting job ran before mistral's load.
    prompts = [r.prompt for r in stub.inference_requests() if r.outcome == "ok"]
    assert prompts == ["warm", "held", "same", "other"]


async def test_a_stream_whose_run_fails_on_a_bug_ends_its_clients_wait(
    http: aiohttp.ClientSession,
    make_stub: MakeStub,
    make_foreman: MakeForeman,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A stream's job run beside its handler that dies on a bug answers 500, instead of leaving its client waiting."""
    server = await make_stub()
    foreman = await make_foreman(server.url)
    warm = await foreman.client.post("/api/chat", json=chat_body("llama3", "warm"))
    assert warm.status == 200

    async def broken(self: JobRunner, claim: Claim, start: object) -> bool:
        raise RuntimeError("a bug")

    monkeypatch.setattr(JobRunner, "run_here", broken)
    answer = await asyncio.wait_for(
        post(http, foreman.url + "/api/chat", chat_body("llama3", "x", stream=True)), 10
    )
    assert answer.status == 500
    assert "internal error" in answer.json()["error"]
