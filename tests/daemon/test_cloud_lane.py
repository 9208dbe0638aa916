"""Cloud models (`:cloud`, `-cloud`) run at once in a lane of their own: jobs, but never behind the GPU."""

from __future__ import annotations

import asyncio
import json

import aiohttp

from stub_ollama import Stub
from tests.support.helpers import (
    ASYNC,
    Foreman,
    MakeForeman,
    MakeStub,
    chat_body,
    eventually,
    hold_worker,
    post,
    reply_text,
    submit,
)

CLOUD = "gpt-oss:120b-cloud"


async def test_cloud_job_is_answered_while_the_worker_is_busy(
    http: aiohttp.ClientSession, foreman: Foreman, stub: Stub
) -> None:
    """A cloud request overtakes held local work, and foreman sends Ollama no load or pin for it."""
    first = await hold_worker(http, foreman, stub, "llama3")
    behind = await submit(http, foreman, chat_body("mistral", "behind"))
    async with asyncio.timeout(10):  # behind the held job, it would wait for ever
        answer = await post(
            http,
            foreman.url + "/v1/chat/completions",
            {"model": CLOUD, "messages": [{"role": "user", "content": "hi"}]},
        )
    assert answer.status == 200, answer.body
    assert answer.json()["choices"][0]["message"]["content"] == reply_text(CLOUD, "hi")
    assert not first.done() and not behind.done()  # the local work is still held
    stub.faults.release_hung()
    await asyncio.gather(first, behind)
    cloud = [r for r in stub.requests if r.model == CLOUD]
    assert len(cloud) == 1 and not cloud[0].is_load and "keep_alive" not in (cloud[0].body or {})
    assert CLOUD not in " ".join(stub.loads)
    job = next(j for j in foreman.jobs() if j["model"] == CLOUD)
    assert (job["model_key"], job["state"], job["endpoint"]) == (CLOUD, "done", "/v1/chat/completions")
    async with http.get(f"{foreman.url}/jobs/{job['id']}") as response:
        assert (await response.json())["lane"] == "cloud"


async def test_async_cloud_jobs_run_side_by_side_without_pins(
    http: aiohttp.ClientSession, make_stub: MakeStub, make_foreman: MakeForeman
) -> None:
    """Async cloud jobs run at once, up to FOREMAN_CLOUD_PARALLEL side by side, none preceded by a load request."""
    server = await make_stub()
    stub = server.stub
    foreman = await make_foreman(server.url, cloud_parallel=3)
    stub.faults.hang_next(3)  # each holds its place upstream until all three are there
    for i in range(4):
        answer = await post(
            http, foreman.url + "/api/chat", chat_body("qwen3-coder:480b-cloud", str(i)), ASYNC
        )
        assert answer.status == 202
    await stub.wait_for(lambda s: s.faults.hung == 3)
    assert len(stub.requests) == 3  # the fourth waits for a free place in the lane
    stub.faults.release_hung()
    await eventually(lambda: foreman.states() == ["done"] * 4, what="the cloud jobs to finish")
    assert [r.is_load for r in stub.requests] == [False] * 4
    assert stub.loads == []
    assert all("keep_alive" not in (r.body or {}) for r in stub.requests)


async def test_cloud_job_is_cancelled_when_its_client_leaves(
    http: aiohttp.ClientSession, foreman: Foreman, stub: Stub
) -> None:
    """A running cloud job ends cancelled when DELETE /jobs/{id} asks, and the lane takes the next one."""
    stub.faults.hang_next(1)
    task = await submit(http, foreman, chat_body(CLOUD, "slow"))
    await stub.wait_for(lambda s: s.faults.hung == 1)
    [job] = foreman.jobs()
    async with http.delete(f"{foreman.url}/jobs/{job['id']}") as response:
        assert response.status == 200
    answer = await task
    assert answer.status == 499
    await eventually(lambda: foreman.states() == ["cancelled"], what="the cloud job to be cancelled")
    after = await post(http, foreman.url + "/api/chat", chat_body(CLOUD, "next"))
    assert after.status == 200 and json.loads(after.body)["message"]["content"] == reply_text(CLOUD, "next")
