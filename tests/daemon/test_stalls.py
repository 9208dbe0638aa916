"""A wedged Ollama: a request it accepted and then went silent on is given up after FOREMAN_STALL_TIMEOUT."""

from __future__ import annotations

import asyncio
import json
import shlex
import sys
from pathlib import Path

import aiohttp
from structlog.testing import capture_logs

from stub_ollama import Stub
from tests.support.helpers import ASYNC, MakeForeman, MakeStub, chat_body, eventually, post, reply_text


async def test_a_request_ollama_never_answers_is_given_up_and_the_job_runs_again(
    http: aiohttp.ClientSession, make_stub: MakeStub, make_foreman: MakeForeman
) -> None:
    """No byte for the stall timeout before the first one: the request is aborted, the job retried with attempt + 1."""
    server = await make_stub()
    stub: Stub = server.stub
    foreman = await make_foreman(server.url, stall_timeout=0.5)
    stub.faults.hang_next(1)
    with capture_logs() as logs:
        async with asyncio.timeout(20):  # without a stall timeout, for ever
            answer = await post(http, foreman.url + "/api/chat", chat_body("llama3", "wedged"))
    assert answer.status == 200
    assert answer.json()["message"]["content"] == reply_text("llama3", "wedged")
    [job] = foreman.jobs()
    assert (job["state"], job["attempt"]) == ("done", 1)
    [stalled] = [line for line in logs if line["event"] == "ollama.stalled"]
    assert (stalled["job_id"], stalled["model"], stalled["seconds"]) == (job["id"], "llama3:latest", 0.5)
    # The first request was aborted, not left running beside the retry.
    await stub.wait_for(lambda s: s.faults.hung == 0)
    assert [r.outcome for r in stub.inference_requests()] == ["disconnected", "ok"]
    async with http.get(foreman.url + "/metrics") as metrics:
        assert "foreman_upstream_stalls_total 1.0" in await metrics.text()
    async with http.get(foreman.url + "/status") as status:
        stalls = (await status.json())["stalls"]
    assert (stalls["total"], stalls["in_a_row"], stalls["timeout_s"]) == (1, 0, 0.5)
    assert stalls["last_at"] is not None


async def test_a_stream_that_goes_silent_after_output_reached_its_client_fails_with_a_clear_error(
    http: aiohttp.ClientSession, make_stub: MakeStub, make_foreman: MakeForeman
) -> None:
    """Silence between two chunks, with output already sent: the stream ends with an error line, the job fails."""
    server = await make_stub()
    foreman = await make_foreman(server.url, stall_timeout=0.5)
    server.stub.faults.stall_next(1, after_chunks=2)
    async with asyncio.timeout(20):
        answer = await post(http, foreman.url + "/api/chat", chat_body("llama3", "silent", stream=True))
    assert answer.status == 200
    lines = answer.lines()
    assert len(lines) == 3 and "sent nothing for 0.5 s" in lines[-1]["error"]
    [job] = foreman.jobs()
    assert job["state"] == "failed" and "FOREMAN_STALL_TIMEOUT" in job["error"]
    assert len(server.stub.inference_requests()) == 1  # output went out: not replayed


async def test_a_stream_that_goes_silent_with_no_client_watching_runs_again(
    http: aiohttp.ClientSession, make_stub: MakeStub, make_foreman: MakeForeman
) -> None:
    """An async job whose stream stalls between chunks reached no client: it goes back with attempt + 1 and ends done."""
    server = await make_stub()
    foreman = await make_foreman(server.url, stall_timeout=0.5)
    server.stub.faults.stall_next(1, after_chunks=2)
    accepted = await post(http, foreman.url + "/api/chat", chat_body("llama3", "later"), ASYNC)
    assert accepted.status == 202
    await foreman.wait_states(lambda states: states == ["done"], "the job to run again")
    [job] = foreman.jobs()
    assert job["attempt"] == 1
    assert reply_text("llama3", "later") in json.loads(job["result"])["message"]["content"]


async def test_stalls_in_a_row_run_the_restart_command_once(
    http: aiohttp.ClientSession, make_stub: MakeStub, make_foreman: MakeForeman, tmp_path: Path
) -> None:
    """Three stalls in a row with FOREMAN_RESTART_AFTER_STALLS=2: the command runs once (then backs off), its result logged."""
    server = await make_stub()
    ran = tmp_path / "restarts"
    command = f"{shlex.quote(sys.executable)} -c \"open({str(ran)!r}, 'a').write('x')\"; echo restarted"
    foreman = await make_foreman(
        server.url, stall_timeout=0.3, ollama_restart=command, restart_after_stalls=2, max_attempts=10
    )
    server.stub.faults.hang_next(3)
    with capture_logs() as logs:
        async with asyncio.timeout(20):
            answer = await post(http, foreman.url + "/api/chat", chat_body("llama3", "third time"))
        assert answer.status == 200
        await eventually(
            lambda: any(line["event"] == "ollama.restarted" for line in logs), what="the restart"
        )
    assert ran.read_text() == "x"
    [restarted] = [line for line in logs if line["event"] == "ollama.restarted"]
    assert restarted["output"] == "restarted"
    assert [line["in_a_row"] for line in logs if line["event"] == "ollama.stalled"] == [1, 2, 3]
    async with http.get(foreman.url + "/status") as status:
        stalls = (await status.json())["stalls"]
    assert (stalls["total"], stalls["in_a_row"], stalls["restarts"]) == (3, 0, 1)
