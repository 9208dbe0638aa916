"""Transient failures are retried with backoff; failures a retry cannot fix are reported once."""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
from structlog.testing import capture_logs

from stub_ollama import Stub
from tests.support.helpers import (
    ASYNC,
    Foreman,
    MakeForeman,
    MakeStub,
    chat_body,
    eventually,
    post,
    reply_text,
    submit,
)


async def test_a_500_is_retried_and_the_job_completes(foreman: Foreman, stub: Stub) -> None:
    """One runner crash costs an attempt, not the job."""
    stub.faults.fail_next(1, status=500)
    answer = await foreman.client.post("/api/chat", json=chat_body("llama3", "hi"))
    assert answer.status == 200
    assert (await answer.json())["message"]["content"] == reply_text("llama3", "hi")
    [job] = foreman.jobs()
    assert job["state"] == "done" and job["attempt"] == 1
    assert [r.outcome for r in stub.inference_requests()] == ["failed", "ok"]


async def test_flapping_connections_lose_nothing(
    http: aiohttp.ClientSession, foreman: Foreman, stub: Stub
) -> None:
    """Connections dropped before Ollama answers, several times over, end with every job done once."""
    stub.faults.drop_next(3, after_chunks=0, streamed_only=False)
    answers = await asyncio.gather(
        *(
            post(http, foreman.url + "/api/chat", chat_body(m, f"p{i}"))
            for i, m in enumerate(["llama3", "mistral"] * 2)
        )
    )
    assert [a.status for a in answers] == [200] * 4
    jobs = foreman.jobs()
    assert [j["state"] for j in jobs] == ["done"] * 4
    assert sum(j["attempt"] for j in jobs) == 3
    completed = [r.prompt for r in stub.inference_requests() if r.outcome == "ok"]
    assert sorted(completed) == ["p0", "p1", "p2", "p3"]


async def test_unreachable_through_every_attempt_is_a_502(
    make_stub: MakeStub, make_foreman: MakeForeman
) -> None:
    """After FOREMAN_MAX_ATTEMPTS connection failures the client gets a 502 that says why."""
    server = await make_stub()
    foreman = await make_foreman(server.url, max_attempts=3)
    server.stub.faults.drop_next(3, after_chunks=0, streamed_only=False)
    answer = await foreman.client.post("/api/chat", json=chat_body("llama3"))
    assert answer.status == 502
    error = (await answer.json())["error"]
    assert "cannot reach Ollama" in error and "3 attempts" in error
    [job] = foreman.jobs()
    assert job["state"] == "failed" and job["attempt"] == 3 and job["status"] == 502


async def test_persistent_ollama_errors_fail_with_ollamas_answer(
    make_stub: MakeStub, make_foreman: MakeForeman
) -> None:
    """A 500 on every attempt reaches the client as Ollama sent it."""
    server = await make_stub()
    foreman = await make_foreman(server.url, max_attempts=2)
    server.stub.faults.fail_next(2, status=500, error="llama runner process has terminated")
    answer = await foreman.client.post("/api/chat", json=chat_body("llama3"))
    assert answer.status == 500
    assert await answer.json() == {"error": "llama runner process has terminated"}


async def test_a_stream_broken_after_output_fails_with_an_error_line(
    http: aiohttp.ClientSession, foreman: Foreman, stub: Stub
) -> None:
    """Text already sent is never replayed: the client gets a final error line, the job fails."""
    stub.faults.drop_next(1, after_chunks=2)
    body = {"model": "llama3", "messages": [{"role": "user", "content": "hi"}]}
    answer = await post(http, foreman.url + "/api/chat", body)
    lines = answer.lines()
    assert answer.status == 200 and len(lines) == 3
    assert [line["message"]["content"] for line in lines[:2]] == ["Hello", " from"]
    assert "error" in lines[2] and "done" not in lines[2]
    [job] = foreman.jobs()
    assert job["state"] == "failed" and job["attempt"] == 0
    assert len(stub.inference_requests()) == 1


async def test_a_stream_broken_before_output_is_retried(foreman: Foreman, stub: Stub) -> None:
    """A drop before the first chunk left the client nothing to replay, so the job is retried."""
    stub.faults.drop_next(1, after_chunks=0)
    body = {"model": "llama3", "messages": [{"role": "user", "content": "hi"}]}
    answer = await foreman.client.post("/api/chat", json=body)
    lines = [json.loads(line) for line in (await answer.read()).splitlines()]
    assert "".join(line["message"]["content"] for line in lines) == reply_text("llama3", "hi")
    assert foreman.jobs()[0]["attempt"] == 1


async def test_ollamas_own_error_line_ends_the_stream_once(
    http: aiohttp.ClientSession, foreman: Foreman, stub: Stub
) -> None:
    """An error Ollama reports mid-stream is passed on as its last line, not doubled."""
    stub.faults.fail_next(1, after_chunks=2, error="out of memory")
    body = {"model": "llama3", "messages": [{"role": "user", "content": "hi"}]}
    answer = await post(http, foreman.url + "/api/chat", body)
    assert answer.lines()[2:] == [{"error": "out of memory"}]
    [job] = foreman.jobs()
    assert job["state"] == "failed" and job["error"] == "out of memory"


async def test_jobs_wait_out_an_ollama_outage(
    http: aiohttp.ClientSession, make_stub: MakeStub, make_foreman: MakeForeman
) -> None:
    """With Ollama down at start, foreman says so once, holds the jobs, and runs them when it is back."""
    server = await make_stub()
    await server.stop_listening()
    with capture_logs() as logs:
        foreman = await make_foreman(server.url, backoff_initial=0.01, backoff_max=0.02)
        tasks = [await submit(http, foreman, chat_body(m, m)) for m in ("llama3", "mistral", "llama3")]
        # Once foreman has found Ollama down, the jobs are held, not failed.
        await eventually(lambda: any(e["event"] == "upstream.unreachable" for e in logs), what="the outage")
        assert foreman.states() == ["queued"] * 3
        assert not any(task.done() for task in tasks)
        await server.resume_listening()
        answers = await asyncio.gather(*tasks)
    assert [a.status for a in answers] == [200] * 3
    events = [e["event"] for e in logs if e["event"].startswith("upstream.")]
    assert events == ["upstream.unreachable", "upstream.back"]
    unreachable = next(e for e in logs if e["event"] == "upstream.unreachable")
    assert unreachable["url"] == server.url and "foreman keeps accepting jobs" in unreachable["hint"]
    assert [j["attempt"] for j in foreman.jobs()] == [0, 0, 0]
    assert server.stub.loads == ["llama3:latest", "mistral:latest"]


async def _submit_async(foreman: Foreman, model: str, prompt: str) -> str:
    answer = await foreman.client.post("/api/chat", json=chat_body(model, prompt), headers=ASYNC)
    assert answer.status == 202
    return str((await answer.json())["id"])


async def test_a_failing_job_waits_out_its_backoff_alone(
    make_stub: MakeStub, make_foreman: MakeForeman
) -> None:
    """A job Ollama answers with 500 goes back with a not-before time; the other models' jobs run meanwhile."""
    server = await make_stub(capacity=2)
    server.stub.faults.fail_model("qwen2:latest")
    foreman = await make_foreman(server.url, backoff_initial=30, backoff_max=30, max_attempts=3)
    submitted = time.time()
    broken = await _submit_async(foreman, "qwen2", "never")
    others = [await _submit_async(foreman, m, f"{m}-{i}") for i in range(3) for m in ("llama3", "mistral")]
    # Without the change the one worker sleeps 15 to 30 s after the first failure.
    await eventually(
        lambda: (
            {j["id"]: j["state"] for j in foreman.jobs() if j["id"] in others}
            == dict.fromkeys(others, "done")
        ),
        what="the other models' jobs",
    )
    view = await (await foreman.client.get(f"/jobs/{broken}")).json()
    assert (view["state"], view["attempt"]) == ("queued", 1)
    assert view["error"] == "Ollama answered 500: llama runner process has terminated: exit status 2"
    row = next(j for j in foreman.jobs() if j["id"] == broken)
    # Held for 15 to 30 s from its failure, which came after `submitted` and before now.
    assert submitted + 15 <= row["not_before"] <= time.time() + 30 and view["not_before"] is not None


async def test_a_held_job_keeps_its_place_when_its_time_comes(
    make_stub: MakeStub, make_foreman: MakeForeman
) -> None:
    """Back from its backoff, a job runs before the jobs of its model that came after it."""
    server = await make_stub(token_delay=0.06)  # each job takes about half a second
    foreman = await make_foreman(server.url, backoff_initial=0.2, backoff_max=0.2)
    server.stub.faults.fail_next(1)
    ids = [await _submit_async(foreman, "llama3", p) for p in ("a1", "a2", "a3")]
    await eventually(lambda: foreman.states() == ["done"] * 3, what="the three jobs")
    assert [(r.prompt, r.outcome) for r in server.stub.inference_requests()] == [
        ("a1", "failed"),
        ("a2", "ok"),  # a1 is held back for 0.1 to 0.2 s: a2 goes first...
        ("a1", "ok"),  # ... and a1 is due again before a3
        ("a3", "ok"),
    ]
    assert [j["attempt"] for j in foreman.jobs() if j["id"] in ids] == [1, 0, 0]


async def test_a_job_that_keeps_failing_ends_failed_with_ollamas_last_error(
    make_stub: MakeStub, make_foreman: MakeForeman
) -> None:
    """With nothing else to wake the worker, each backoff still ends and the job fails after the last attempt."""
    server = await make_stub()
    server.stub.faults.fail_model("llama3:latest", error="llama runner process has terminated: exit status 2")
    foreman = await make_foreman(server.url, max_attempts=3, backoff_initial=0.05, backoff_max=0.05)
    answer = await foreman.client.post("/api/chat", json=chat_body("llama3"))
    assert answer.status == 500
    assert await answer.json() == {"error": "llama runner process has terminated: exit status 2"}
    [job] = foreman.jobs()
    assert (job["state"], job["attempt"]) == ("failed", 3)
    assert [r.outcome for r in server.stub.inference_requests()] == ["failed"] * 3


async def test_a_memory_error_unloads_the_other_idle_models_before_the_retry(
    make_stub: MakeStub, make_foreman: MakeForeman
) -> None:
    """Ollama's "requires more system memory" makes foreman unload what else it loaded, so the retry fits."""
    server = await make_stub(capacity=2)
    foreman = await make_foreman(server.url)
    assert (await foreman.client.post("/api/chat", json=chat_body("llama3"))).status == 200
    assert server.stub.loaded() == ["llama3:latest"]
    memory = "model requires more system memory (9.1 GiB) than is available (4.0 GiB)"
    server.stub.faults.fail_next(1, error=memory, include_loads=True)
    with capture_logs() as logs:
        answer = await foreman.client.post("/api/chat", json=chat_body("mistral"))
    assert answer.status == 200
    unpinned = [e for e in logs if e["event"] == "model.unpinned" and e["reason"] == "memory"]
    assert unpinned == [
        {
            "event": "model.unpinned",
            "model": "llama3:latest",
            "keep_alive": 0,
            "reason": "memory",
            "for_model": "mistral:latest",
            "log_level": "info",
        }
    ]
    assert server.stub.loaded() == ["mistral:latest"]
    [_, job] = foreman.jobs()
    assert (job["state"], job["attempt"]) == ("done", 1)
