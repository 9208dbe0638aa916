"""Restarts and crashes lose nothing: every accepted job runs to completion exactly once."""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import sys
from pathlib import Path

import aiohttp
import pytest

from tests.support.helpers import MakeForeman, MakeStub, chat_body, eventually, submit
from tests.support.processes import free_port, listening, serve


async def test_restart_mid_queue_runs_every_job_once(
    http: aiohttp.ClientSession, make_stub: MakeStub, make_foreman: MakeForeman
) -> None:
    """Stopping foreman with one job running and three queued, then starting it again, completes all four."""
    server = await make_stub()
    stub = server.stub
    first = await make_foreman(server.url, shutdown_grace=0)  # the held job cannot finish
    stub.faults.hang_next(1)
    tasks = [await submit(http, first, chat_body("llama3", "running"))]
    await stub.wait_for(lambda s: s.faults.hung == 1)
    tasks += [await submit(http, first, chat_body(m, f"queued {m}")) for m in ("mistral", "llama3", "qwen2")]

    await first.close()
    answers = await asyncio.gather(*tasks)
    assert {a.status for a in answers} == {503}
    assert "stays queued" in answers[0].json()["error"]
    assert first.states() == ["queued"] * 4
    assert [j["attempt"] for j in first.jobs()] == [0, 0, 0, 0]  # a clean stop costs no attempt

    second = await make_foreman(server.url)
    await second.wait_states(lambda states: states == ["done"] * 4, "every job to finish")
    completed = sorted(r.prompt for r in stub.inference_requests() if r.outcome == "ok")
    assert completed == ["queued llama3", "queued mistral", "queued qwen2", "running"]
    # Drain-by-model holds across the restart: llama3's two jobs ran back to back.
    assert [r.prompt for r in stub.inference_requests() if r.outcome == "ok"][:2] == [
        "running",
        "queued llama3",
    ]


async def test_jobs_found_running_at_boot_are_requeued_with_an_attempt(
    make_stub: MakeStub, make_foreman: MakeForeman, tmp_path: Path
) -> None:
    """A job a crash left in `working` goes back to the queue at boot, attempt + 1, and completes."""
    server = await make_stub()
    first = await make_foreman(server.url)
    answer = await first.client.post("/api/chat", json=chat_body("llama3", "x"))
    assert answer.status == 200
    await first.close()
    db = sqlite3.connect(tmp_path / "foreman.db")
    with db:  # what a kill -9 mid-run leaves behind
        db.execute("UPDATE jobs SET state = 'working', result = NULL, finished_at = NULL")
    db.close()

    second = await make_foreman(server.url)
    await second.wait_states(lambda states: states == ["done"], "the job to run again")
    [job] = second.jobs()
    assert job["attempt"] == 1 and job["result"]


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL")
async def test_kill_9_mid_run_loses_no_acknowledged_job(
    http: aiohttp.ClientSession, make_stub: MakeStub, tmp_path: Path
) -> None:
    """A real `foreman serve` killed with SIGKILL while a job runs finishes every job after a restart."""
    server = await make_stub()
    stub = server.stub
    port, db = free_port(), tmp_path / "crash.db"
    url = f"http://127.0.0.1:{port}"
    process = serve(port, server.url, db, db.with_suffix(".log"))
    try:
        await listening(port, process)
        stub.faults.hang_next(1)
        body = chat_body("llama3", "running")
        tasks = [asyncio.create_task(http.post(url + "/api/chat", json=body))]
        await stub.wait_for(lambda s: s.faults.hung == 1, timeout=20)
        for m in ("mistral", "llama3"):
            tasks.append(asyncio.create_task(http.post(url + "/api/chat", json=chat_body(m, f"queued {m}"))))

        def rows() -> list[tuple[str, int]]:
            with sqlite3.connect(db) as conn:
                return conn.execute("SELECT state, attempt FROM jobs ORDER BY id").fetchall()

        await eventually(lambda: len(rows()) == 3, what="three jobs on disk")
        process.send_signal(signal.SIGKILL)
        process.wait()
        for task in tasks:
            with pytest.raises(aiohttp.ClientError):
                await task
        stub.faults.release_hung()

        process = serve(port, server.url, db, db.with_suffix(".log"))
        await eventually(lambda: [s for s, _ in rows()] == ["done"] * 3, within=20, what="every job done")
        assert [a for _, a in rows()] == [1, 0, 0]
        completed = sorted(r.prompt for r in stub.inference_requests() if r.outcome == "ok")
        assert completed == ["queued llama3", "queued mistral", "running"]
    finally:
        process.kill()
        process.wait()


async def test_sigterm_lets_the_running_job_finish_for_its_client(
    http: aiohttp.ClientSession, make_stub: MakeStub, make_foreman: MakeForeman
) -> None:
    """On shutdown the running job may finish within the grace time: its client gets the answer, the rest 503."""
    server = await make_stub()
    stub = server.stub
    foreman = await make_foreman(server.url, shutdown_grace=10)
    stub.faults.hang_next(1)
    running = await submit(http, foreman, chat_body("llama3", "finish me"))
    await stub.wait_for(lambda s: s.faults.hung == 1)
    waiting = await submit(http, foreman, chat_body("mistral", "later"))

    closing = asyncio.create_task(foreman.close())
    await eventually(lambda: waiting.done(), what="the waiting client to be told foreman is stopping")
    assert (await waiting).status == 503
    assert not running.done()  # the running job's client still waits for its answer
    stub.faults.release_hung()
    answer = await running
    await closing
    assert answer.status == 200 and answer.json()["done"] is True
    assert foreman.states() == ["done", "queued"]


async def test_a_job_still_running_after_the_grace_time_goes_back_to_the_queue(
    http: aiohttp.ClientSession, make_stub: MakeStub, make_foreman: MakeForeman
) -> None:
    """When the grace time runs out, the running job is requeued with no attempt charged."""
    server = await make_stub()
    foreman = await make_foreman(server.url, shutdown_grace=0.05)
    server.stub.faults.hang_next(1)
    running = await submit(http, foreman, chat_body("llama3", "too slow"))
    await server.stub.wait_for(lambda s: s.faults.hung == 1)
    await foreman.close()
    assert (await running).status == 503
    [job] = foreman.jobs()
    assert (job["state"], job["attempt"]) == ("queued", 0)
