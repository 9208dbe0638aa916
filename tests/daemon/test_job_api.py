"""Async submission and the job API: submit, look, follow, cancel."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from typing import Any

import aiohttp
import pytest
from structlog.testing import capture_logs

from foreman.storage.sqlite.queue_file import QueueFile
from stub_ollama import Stub
from tests.support.helpers import (
    ASYNC,
    FakeClock,
    Foreman,
    MakeForeman,
    MakeStub,
    chat_body,
    chunk_text,
    eventually,
    hold_worker,
    read_events,
    reply_text,
)


async def submit_async(foreman: Foreman, body: dict[str, Any], **headers: str) -> tuple[int, dict[str, Any]]:
    answer = await foreman.client.post("/api/chat", json=body, headers={**ASYNC, **headers})
    return answer.status, await answer.json()


async def job(foreman: Foreman, job_id: str) -> dict[str, Any]:
    answer = await foreman.client.get(f"/jobs/{job_id}")
    assert answer.status == 200
    return await answer.json()


async def wait_done(foreman: Foreman, job_id: str) -> dict[str, Any]:
    states: list[str] = []

    async def poll() -> None:
        while (view := await job(foreman, job_id))["state"] not in ("done", "failed", "cancelled"):
            states.append(view["state"])
            await asyncio.sleep(0.01)

    await asyncio.wait_for(poll(), 10)
    return await job(foreman, job_id)


async def test_async_submit_answers_at_once_and_keeps_the_result(foreman: Foreman, stub: Stub) -> None:
    """202 with Location and the job's place; the result is Ollama's `stream: false` shape."""
    answer = await foreman.client.post("/api/chat", json=chat_body("llama3", "hello"), headers=ASYNC)
    assert answer.status == 202
    accepted = await answer.json()
    assert set(accepted) == {"id", "state", "position"} and accepted["state"] == "queued"
    assert answer.headers["Location"] == f"/jobs/{accepted['id']}"
    assert answer.headers["Preference-Applied"] == "respond-async"

    done = await wait_done(foreman, accepted["id"])
    assert done["state"] == "done" and done["async"] is True and done["attempt"] == 0
    direct = await foreman.client.post("/api/chat", json=chat_body("llama3", "hello"))
    expected = await direct.json()
    result = done["result"]
    assert set(result) == set(expected)
    assert (
        result["message"]
        == expected["message"]
        == {"role": "assistant", "content": reply_text("llama3", "hello")}
    )
    assert result["done_reason"] == "stop" and result["model"] == "llama3"
    assert done["queue_wait_s"] >= 0 and done["run_s"] >= 0 and done["finished_at"].endswith("Z")


async def test_async_generate_and_embed(foreman: Foreman) -> None:
    """Every queued endpoint takes async submissions."""
    gen = await foreman.client.post("/api/generate", json={"model": "mistral", "prompt": "hi"}, headers=ASYNC)
    emb = await foreman.client.post(
        "/api/embed", json={"model": "nomic-embed-text", "input": "hi"}, headers=ASYNC
    )
    assert gen.status == emb.status == 202
    generated = await wait_done(foreman, (await gen.json())["id"])
    embedded = await wait_done(foreman, (await emb.json())["id"])
    assert generated["result"]["response"] == reply_text("mistral", "hi") and generated["result"]["context"]
    assert len(embedded["result"]["embeddings"]) == 1


async def test_idempotency_key_gives_one_job(foreman: Foreman, stub: Stub) -> None:
    """The same key with the same body returns the existing job (200); it runs once."""
    body = chat_body("llama3", "once")
    first_status, first = await submit_async(foreman, body, **{"Idempotency-Key": "batch-1/item-7"})
    # The same request with its keys in another order is still the same request.
    again_status, again = await submit_async(
        foreman, dict(reversed(body.items())), **{"Idempotency-Key": "batch-1/item-7"}
    )
    assert (first_status, again_status) == (202, 200)
    assert again["id"] == first["id"]
    await wait_done(foreman, first["id"])
    assert [r.prompt for r in stub.inference_requests()] == ["once"]
    assert len(foreman.jobs()) == 1


async def test_idempotency_key_with_another_body_is_a_conflict(foreman: Foreman) -> None:
    """The same key with a different request is a 409 that says so."""
    await submit_async(foreman, chat_body("llama3", "one"), **{"Idempotency-Key": "k"})
    status, body = await submit_async(foreman, chat_body("llama3", "two"), **{"Idempotency-Key": "k"})
    assert status == 409 and "different request" in body["error"]
    assert len(foreman.jobs()) == 1


async def test_events_replay_a_finished_job(foreman: Foreman) -> None:
    """For a job that already ran, the events replay from the start and the chunks join to the result."""
    _, accepted = await submit_async(foreman, chat_body("llama3", "replay"))
    done = await wait_done(foreman, accepted["id"])
    async with foreman.client.get(f"/jobs/{accepted['id']}/events") as response:
        assert response.headers["Content-Type"] == "text/event-stream"
        events = await read_events(response)
    assert [e.event for e in events[:2]] == ["state", "state"]
    assert [e.data["state"] for e in events[:2]] == ["queued", "working"]
    assert chunk_text(events) == done["result"]["message"]["content"]
    assert events[-1].event == "end" and events[-1].data["state"] == "done"


async def test_events_follow_a_running_job_live(
    http: aiohttp.ClientSession, make_stub: MakeStub, make_foreman: MakeForeman
) -> None:
    """A watcher that connects mid-run gets what it missed, then the live tail, then the end."""
    server = await make_stub(token_delay=0.05, tokens=8)
    foreman = await make_foreman(server.url)
    _, accepted = await submit_async(foreman, chat_body("llama3", "live"))
    await server.stub.wait_for(lambda s: any(r.chunks_sent >= 2 for r in s.inference_requests()))
    async with http.get(f"{foreman.url}/jobs/{accepted['id']}/events") as response:
        queued = [await response.content.readline() for _ in range(3)]  # event, data, blank line
        assert queued[0] == b"event: state\n" and b'"queued"' in queued[1]
        [upstream] = server.stub.inference_requests()
        assert not upstream.finished  # the first event came while the job still ran
        events = await read_events(response)
    assert chunk_text(events) == reply_text("llama3", "live")
    assert events[-1].data["state"] == "done"
    assert [e.data["state"] for e in events if e.event == "state"][-1] == "working"


async def test_a_live_watcher_and_a_replay_see_the_same_end(
    http: aiohttp.ClientSession, make_stub: MakeStub, make_foreman: MakeForeman
) -> None:
    """When Ollama fails mid-stream with its own error line, the live end event and the replay agree."""
    server = await make_stub(token_delay=0.05, tokens=8)
    foreman = await make_foreman(server.url)
    server.stub.faults.fail_next(1, after_chunks=4, error="out of memory")
    _, accepted = await submit_async(foreman, chat_body("llama3", "doomed"))
    await server.stub.wait_for(lambda s: any(r.chunks_sent >= 2 for r in s.inference_requests()))
    url = f"{foreman.url}/jobs/{accepted['id']}/events"
    async with http.get(url) as response:
        live = await read_events(response)
    async with http.get(url) as response:
        replay = await read_events(response)
    assert [e.data["state"] for e in live if e.event == "state"][-1] == "working"  # it was live
    assert live[-1].data["state"] == replay[-1].data["state"] == "failed"
    assert live[-1].data["error"] == replay[-1].data["error"]
    assert "out of memory" in live[-1].data["error"]


async def test_delete_cancels_a_queued_job(http: aiohttp.ClientSession, foreman: Foreman, stub: Stub) -> None:
    """A queued job cancelled through the API never reaches Ollama."""
    first = await hold_worker(http, foreman, stub, "llama3")
    _, accepted = await submit_async(foreman, chat_body("mistral", "never"))
    answer = await foreman.client.delete(f"/jobs/{accepted['id']}")
    assert answer.status == 200 and (await answer.json())["state"] == "cancelled"
    stub.faults.release_hung()
    await first
    assert "never" not in [r.prompt for r in stub.requests]
    again = await foreman.client.delete(f"/jobs/{accepted['id']}")
    assert again.status == 409 and "already ended" in (await again.json())["error"]


async def test_delete_aborts_a_running_job(foreman: Foreman, stub: Stub) -> None:
    """Cancelling a running job aborts Ollama's request."""
    stub.faults.hang_next(1)
    _, accepted = await submit_async(foreman, chat_body("llama3", "abort me"))
    await stub.wait_for(lambda s: s.faults.hung == 1)
    answer = await foreman.client.delete(f"/jobs/{accepted['id']}")
    assert answer.status == 200 and (await answer.json())["state"] == "cancelled"
    await stub.wait_for(lambda s: s.in_flight == 0)
    assert stub.requests[-1].disconnected


async def test_unknown_jobs_are_404(foreman: Foreman) -> None:
    """Looking for a job that does not exist is a clear 404."""
    for method, path in [("GET", "/jobs/nope"), ("DELETE", "/jobs/nope"), ("GET", "/jobs/nope/events")]:
        answer = await foreman.client.request(method, path)
        assert answer.status == 404 and "not found" in (await answer.json())["error"]


async def test_positions_match_the_drain_order(
    http: aiohttp.ClientSession, foreman: Foreman, stub: Stub
) -> None:
    """Each queued job's position is how many jobs run before it, and they run in that order."""
    first = await hold_worker(http, foreman, stub, "llama3")
    ids = {}
    for name, model in [
        ("b1", "mistral"),
        ("a1", "llama3"),
        ("c1", "qwen2"),
        ("b2", "mistral"),
        ("a2", "llama3"),
    ]:
        _, accepted = await submit_async(foreman, chat_body(model, name))
        ids[name] = accepted["id"]
    positions = {name: (await job(foreman, job_id))["position"] for name, job_id in ids.items()}
    assert positions == {"a1": 0, "a2": 1, "b1": 2, "b2": 3, "c1": 4}
    stub.faults.release_hung()
    await first
    for job_id in ids.values():
        await wait_done(foreman, job_id)
    ran = [r.prompt for r in stub.inference_requests()][1:]
    assert ran == sorted(positions, key=positions.__getitem__)


async def test_jobs_list_newest_first_with_a_cursor(foreman: Foreman) -> None:
    """Sync and async jobs alike are listed, newest first, a page at a time, filtered by state and model."""
    await foreman.client.post("/api/chat", json=chat_body("llama3", "sync"))
    for i in range(3):
        _, accepted = await submit_async(foreman, chat_body("mistral", f"async {i}"))
    await wait_done(foreman, accepted["id"])
    page = await (await foreman.client.get("/jobs?limit=3")).json()
    assert [j["model"] for j in page["jobs"]] == ["mistral"] * 3 and page["next"] == page["jobs"][-1]["id"]
    rest = await (await foreman.client.get(f"/jobs?limit=3&after={page['next']}")).json()
    assert [j["model"] for j in rest["jobs"]] == ["llama3"] and rest["next"] is None
    assert rest["jobs"][0]["async"] is False
    by_model = await (await foreman.client.get("/jobs?model=llama3:latest&state=done")).json()
    assert len(by_model["jobs"]) == 1
    by_state = await (await foreman.client.get("/jobs?state=done&model=mistral")).json()
    assert len(by_state["jobs"]) == 3
    assert (await (await foreman.client.get("/jobs?state=failed")).json())["jobs"] == []
    bad = await foreman.client.get("/jobs?state=sleeping")
    assert bad.status == 400 and "unknown state" in (await bad.json())["error"]


async def test_status_shows_the_queue_by_model_in_drain_order(
    http: aiohttp.ClientSession, foreman: Foreman, stub: Stub
) -> None:
    """/status shows the running job, what waits for which model in drain order, and the daemon's state."""
    first = await hold_worker(http, foreman, stub, "llama3")
    for model in ("qwen2", "mistral", "llama3", "mistral"):
        await submit_async(foreman, chat_body(model))
    status = await (await foreman.client.get("/status")).json()
    assert status["upstream"] == {
        "url": foreman.config.upstream,
        "reachable": True,
        "loaded": ["llama3:latest"],
    }
    assert status["resident"] == ["llama3:latest"]
    assert status["running"]["model"] == "llama3" and status["running"]["state"] == "working"
    assert [(q["model"], q["waiting"]) for q in status["queue"]] == [
        ("llama3:latest", 1),
        ("qwen2:latest", 1),
        ("mistral:latest", 2),
    ]
    assert status["jobs"] == {"working": 1, "queued": 4}
    assert status["swaps"] == 1 and status["last_error"] is None
    assert status["db"]["path"] == str(foreman.config.db_path) and status["db"]["size_bytes"] > 0
    stub.faults.release_hung()
    await first


async def test_metrics_count_jobs_swaps_and_queue_depth(
    http: aiohttp.ClientSession, foreman: Foreman, stub: Stub
) -> None:
    """/metrics is Prometheus text with jobs by final state, swaps, and the queue depth now."""
    await foreman.client.post("/api/chat", json=chat_body("llama3"))
    await foreman.client.post("/api/chat", json=chat_body("nomic-embed-text"))  # cannot chat: fails
    first = await hold_worker(http, foreman, stub, "mistral")
    await submit_async(foreman, chat_body("qwen2"))
    await submit_async(foreman, chat_body("qwen2"), **{"X-Foreman-Priority": "interactive"})
    text = await (await foreman.client.get("/metrics")).text()
    assert 'foreman_jobs_total{endpoint="/api/chat",model="llama3:latest",state="done"} 1.0' in text
    assert (
        'foreman_jobs_total{endpoint="/api/chat",model="nomic-embed-text:latest",state="failed"} 1.0' in text
    )
    assert 'foreman_queue_depth{model="qwen2:latest"} 2.0' in text  # both classes
    assert "foreman_swaps_total 2.0" in text
    assert "foreman_model_load_seconds_count 2.0" in text
    assert "foreman_queue_wait_seconds_bucket" in text and "foreman_run_seconds_bucket" in text
    stub.faults.release_hung()
    await first


async def test_metrics_count_a_job_cancelled_while_it_waited(
    http: aiohttp.ClientSession, foreman: Foreman, stub: Stub
) -> None:
    """A job cancelled in the queue shows in foreman_jobs_total as cancelled, and adds no wait or run time."""
    first = await hold_worker(http, foreman, stub, "llama3")
    _, queued = await submit_async(foreman, chat_body("mistral", "never runs"))
    assert (await foreman.client.delete(f"/jobs/{queued['id']}")).status == 200
    text = await (await foreman.client.get("/metrics")).text()
    assert 'foreman_jobs_total{endpoint="/api/chat",model="mistral:latest",state="cancelled"} 1.0' in text
    assert "foreman_queue_wait_seconds_count 0.0" in text  # it never started: nothing to time
    stub.faults.release_hung()
    await first


async def test_healthz_is_ok_while_ollama_is_down(make_stub: MakeStub, make_foreman: MakeForeman) -> None:
    """The daemon is healthy when its database works, whether or not Ollama answers."""
    server = await make_stub()
    await server.stop_listening()
    foreman = await make_foreman(server.url, backoff_initial=0.01, backoff_max=0.02)
    answer = await foreman.client.get("/healthz")
    assert answer.status == 200
    status = await (await foreman.client.get("/status")).json()
    assert status["upstream"]["reachable"] is False


async def test_healthz_fails_when_the_database_does(
    foreman: Foreman, monkeypatch: pytest.MonkeyPatch
) -> None:
    """/healthz asks the database, so a monitor learns when foreman can no longer keep jobs."""

    def broken(store: QueueFile) -> None:
        raise sqlite3.DatabaseError("disk I/O error")

    monkeypatch.setattr(QueueFile, "ping", broken)
    answer = await foreman.client.get("/healthz")
    assert answer.status == 503
    assert (await answer.json())["error"] == "database check failed: disk I/O error"


async def test_job_ages_are_told_by_the_clock_that_stamped_them(
    http: aiohttp.ClientSession, make_stub: MakeStub, make_foreman: MakeForeman
) -> None:
    """A queued job's wait is measured on foreman's clock, the one its created_at came from."""
    server = await make_stub()
    clock = FakeClock()
    foreman = await make_foreman(server.url, clock=clock)
    first = await hold_worker(http, foreman, server.stub, "llama3")
    _, queued = await submit_async(foreman, chat_body("mistral", "waits"))
    clock.now += 42
    assert (await job(foreman, queued["id"]))["queue_wait_s"] == 42
    [listed] = [
        j for j in (await (await foreman.client.get("/jobs")).json())["jobs"] if j["id"] == queued["id"]
    ]
    assert listed["queue_wait_s"] == 42
    server.stub.faults.release_hung()
    await first


async def test_a_job_cancelled_before_it_ran_stops_waiting(
    http: aiohttp.ClientSession, make_stub: MakeStub, make_foreman: MakeForeman
) -> None:
    """queue_wait_s of a job cancelled in the queue is its time in the queue, not a wait that grows for ever."""
    server = await make_stub()
    clock = FakeClock()
    foreman = await make_foreman(server.url, clock=clock)
    first = await hold_worker(http, foreman, server.stub, "llama3")
    _, queued = await submit_async(foreman, chat_body("mistral", "never runs"))
    clock.now += 5
    with capture_logs() as logs:
        assert (await foreman.client.delete(f"/jobs/{queued['id']}")).status == 200
    clock.now += 3600
    assert (await job(foreman, queued["id"]))["queue_wait_s"] == 5
    [listed] = [
        j for j in (await (await foreman.client.get("/jobs")).json())["jobs"] if j["id"] == queued["id"]
    ]
    assert listed["queue_wait_s"] == 5 and listed["run_s"] is None
    [cancelled] = [e for e in logs if e["event"] == "job.cancelled"]
    assert (cancelled["model"], cancelled["endpoint"]) == ("mistral:latest", "/api/chat")
    server.stub.faults.release_hung()
    await first


async def test_cancel_logs_carry_the_model_and_endpoint_as_every_job_event(
    foreman: Foreman, stub: Stub
) -> None:
    """job.cancelled of a running /v1 job names its model and endpoint, for the README's jq recipe."""
    stub.faults.hang_next(1)
    body = {"model": "llama3", "messages": [{"role": "user", "content": "abort me"}]}
    answer = await foreman.client.post("/v1/chat/completions", json=body, headers=ASYNC)
    accepted = await answer.json()
    await stub.wait_for(lambda s: s.faults.hung == 1)
    with capture_logs() as logs:
        assert (await foreman.client.delete(f"/jobs/{accepted['id']}")).status == 200
        await eventually(lambda: any(e["event"] == "job.cancelled" for e in logs), what="job.cancelled")
    [cancelled] = [e for e in logs if e["event"] == "job.cancelled"]
    assert (cancelled["model"], cancelled["endpoint"]) == ("llama3:latest", "/v1/chat/completions")


async def test_old_finished_jobs_are_pruned_and_waiting_ones_kept(
    http: aiohttp.ClientSession, make_stub: MakeStub, make_foreman: MakeForeman
) -> None:
    """With a short retention, a finished job disappears; running and queued ones stay however old."""
    server = await make_stub()
    clock = FakeClock()
    foreman = await make_foreman(server.url, clock=clock, retention=0.3)
    await foreman.client.post("/api/chat", json=chat_body("llama3", "finished"))
    first = await hold_worker(http, foreman, server.stub, "llama3")
    _, queued = await submit_async(foreman, chat_body("mistral", "queued"))
    clock.now += 3600  # every job is now an hour old; only the finished one may go
    await eventually(lambda: "done" not in foreman.states(), what="the finished job to be pruned")
    assert foreman.states() == ["working", "queued"]
    server.stub.faults.release_hung()
    await first
    await wait_done(foreman, queued["id"])


async def test_metrics_show_how_long_the_event_loop_was_held(foreman: Foreman) -> None:
    """/metrics' loop-lag histogram counts a moment the event loop could not run anything."""

    def lag_over_1s(text: str) -> float:
        line = next(
            x for x in text.splitlines() if x.startswith('foreman_event_loop_lag_seconds_bucket{le="1.0"}')
        )
        count = next(x for x in text.splitlines() if x.startswith("foreman_event_loop_lag_seconds_count"))
        return float(count.split()[-1]) - float(line.split()[-1])

    before = lag_over_1s(await (await foreman.client.get("/metrics")).text())
    time.sleep(1.2)  # noqa: ASYNC251 - blocking the loop on purpose: that is what the metric measures
    deadline = time.monotonic() + 10
    while lag_over_1s(await (await foreman.client.get("/metrics")).text()) == before:
        assert time.monotonic() < deadline, "the blocked loop never showed in foreman_event_loop_lag_seconds"
        await asyncio.sleep(0.01)
