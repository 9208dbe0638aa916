"""Several foreman nodes on one PostgreSQL queue, each with its own stub Ollama of capacity 1."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import ollama
import psycopg

from stub_ollama import StubServer
from tests.support.helpers import (
    ASYNC,
    Foreman,
    MakeForeman,
    MakeStub,
    chat_body,
    eventually,
    post,
    reply_text,
)

ROOT = Path(__file__).resolve().parents[2]


def query(url: str, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, autocommit=True) as db:
        cursor = db.execute(sql, args)  # type: ignore[arg-type]
        return cursor.fetchall() if cursor.description is not None else []


def job_states(url: str) -> list[str]:
    return [state for (state,) in query(url, "SELECT state FROM jobs ORDER BY id")]


async def node(
    make_foreman: MakeForeman, stub: StubServer | str, pg_url: str, name: str, **settings: Any
) -> Foreman:
    upstream = stub if isinstance(stub, str) else stub.url
    return await make_foreman(upstream, db_path=pg_url, node=name, **settings)


def down_url() -> str:
    """An Ollama address where nothing listens."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


async def test_two_nodes_drain_one_queue_each_on_its_own_ollama(
    http: aiohttp.ClientSession, make_foreman: MakeForeman, make_stub: MakeStub, pg_url: str
) -> None:
    """Requests sent to one node run on both; each node loads one model, and every job runs once."""
    # A load (1 s) costs more than all the work of a model (4 short jobs): no node joins the other's model.
    stubs = [await make_stub(load_delay=1.0, token_delay=0.005) for _ in range(2)]
    a = await node(make_foreman, stubs[0], pg_url, "a")
    await node(make_foreman, stubs[1], pg_url, "b")
    prompts = [(model, f"{model}-{i}") for i in range(4) for model in ("llama3", "mistral")]
    answers = await asyncio.gather(
        *(post(http, a.url + "/api/chat", chat_body(model, prompt)) for model, prompt in prompts)
    )
    for (model, prompt), answer in zip(prompts, answers, strict=True):
        assert answer.status == 200 and answer.json()["message"]["content"] == reply_text(model, prompt)
    served = [r.prompt for s in stubs for r in s.stub.requests if r.prompt]
    assert sorted(served) == sorted(prompt for _, prompt in prompts)
    assert all(s.stub.requests for s in stubs), "both nodes ran jobs"
    assert sorted(load for s in stubs for load in s.stub.loads) == ["llama3:latest", "mistral:latest"], [
        s.stub.loads for s in stubs
    ]
    # A job is answered first and recorded a moment later.
    await eventually(lambda: set(job_states(pg_url)) == {"done"}, what="every job recorded done")


async def test_an_idle_node_leaves_a_model_another_node_holds_and_takes_other_work(
    http: aiohttp.ClientSession, make_foreman: MakeForeman, make_stub: MakeStub, pg_url: str
) -> None:
    """Older work for the model a busy node holds stays with it; the idle node loads the next model instead."""
    # Loads of 1 s: the two short jobs left behind the busy one are not worth a second load of llama3.
    busy_stub, idle_stub = await make_stub(load_delay=1.0), await make_stub(load_delay=1.0)
    busy = await node(make_foreman, busy_stub, pg_url, "busy")
    busy_stub.stub.faults.hang_next(1)
    for i in range(3):
        assert (await post(http, busy.url + "/api/chat", chat_body("llama3", f"l{i}"), ASYNC)).status == 202
    await busy_stub.stub.wait_for(lambda s: s.faults.hung == 1)
    await node(make_foreman, idle_stub, pg_url, "idle")
    assert (await post(http, busy.url + "/api/chat", chat_body("mistral", "m"), ASYNC)).status == 202
    await idle_stub.stub.wait_for(lambda s: any(r.prompt == "m" and r.finished for r in s.requests))
    busy_stub.stub.faults.release_hung()
    await eventually(lambda: set(job_states(pg_url)) == {"done"}, what="every job done")
    assert idle_stub.stub.loads == ["mistral:latest"]
    assert sorted(r.prompt for r in busy_stub.stub.requests if r.prompt) == ["l0", "l1", "l2"]


async def test_a_node_whose_ollama_is_down_streams_replies_from_another_node(
    make_foreman: MakeForeman,
    make_stub: MakeStub,
    pg_url: str,
    ollama_client: Callable[[str], ollama.AsyncClient],
) -> None:
    """A client of a node without Ollama gets its chunks live, one by one, from the node that runs the job."""
    stub = await make_stub(token_delay=0.05)
    a = await node(make_foreman, down_url(), pg_url, "a")
    await node(make_foreman, stub, pg_url, "b")
    arrivals: list[float] = []
    parts: list[str] = []
    stream = await ollama_client(a.url).chat(
        model="llama3", messages=[{"role": "user", "content": "far"}], stream=True
    )
    async for chunk in stream:
        arrivals.append(time.monotonic())
        parts.append(chunk.message.content or "")
    assert "".join(parts) == reply_text("llama3", "far")
    # The stub waits 50 ms between tokens: chunks relayed live arrive spread out, not in one burst.
    assert len(arrivals) >= 8 and arrivals[-2] - arrivals[0] >= 0.2
    assert [r.prompt for r in stub.stub.requests if r.prompt] == ["far"]


async def test_a_stream_broken_after_output_reached_a_client_on_another_node_is_not_replayed(
    http: aiohttp.ClientSession, make_foreman: MakeForeman, make_stub: MakeStub, pg_url: str
) -> None:
    """The node running a job knows its client waits elsewhere: a broken stream fails, as for a local client."""
    stub = await make_stub()
    a = await node(make_foreman, down_url(), pg_url, "a")
    await node(make_foreman, stub, pg_url, "b")
    stub.stub.faults.drop_next(1, after_chunks=2)
    body = {"model": "llama3", "messages": [{"role": "user", "content": "hi"}]}
    answer = await post(http, a.url + "/api/chat", body)
    lines = answer.lines()
    assert answer.status == 200 and len(lines) == 3
    assert [line["message"]["content"] for line in lines[:2]] == ["Hello", " from"]
    assert "error" in lines[2] and "done" not in lines[2]
    await eventually(
        lambda: query(pg_url, "SELECT state, attempt FROM jobs") == [("failed", 0)], what="the failure"
    )
    assert len(stub.stub.inference_requests()) == 1


async def test_a_client_that_leaves_cancels_its_job_on_the_node_that_runs_it(
    http: aiohttp.ClientSession, make_foreman: MakeForeman, make_stub: MakeStub, pg_url: str
) -> None:
    """Disconnecting from one node aborts Ollama's request on the other and marks the job cancelled."""
    stub = await make_stub()
    a = await node(make_foreman, down_url(), pg_url, "a")
    await node(make_foreman, stub, pg_url, "b")
    stub.stub.faults.hang_next(1)
    leaving = asyncio.create_task(post(http, a.url + "/api/chat", chat_body("llama3", "leaver")))
    await stub.stub.wait_for(lambda s: s.faults.hung == 1)
    leaving.cancel()
    await eventually(lambda: job_states(pg_url) == ["cancelled"], what="the job to be cancelled")
    await stub.stub.wait_for(lambda s: s.in_flight == 0)
    assert stub.stub.requests[-1].disconnected


async def test_async_jobs_and_their_events_work_on_any_node(
    http: aiohttp.ClientSession, make_foreman: MakeForeman, make_stub: MakeStub, pg_url: str
) -> None:
    """A job submitted to one node can be read, followed and listed on the other."""
    stub = await make_stub()
    a = await node(make_foreman, down_url(), pg_url, "a")
    b = await node(make_foreman, stub, pg_url, "b")
    accepted = await post(http, a.url + "/api/chat", chat_body("llama3", "async"), ASYNC)
    assert accepted.status == 202
    job_id = accepted.json()["id"]
    async with http.get(f"{a.url}/jobs/{job_id}/events") as events:
        text = await events.text()
    assert "event: end" in text and '"state": "done"' in text
    for foreman in (a, b):
        async with http.get(f"{foreman.url}/jobs/{job_id}") as response:
            job = await response.json()
        assert job["state"] == "done" and job["result"]["message"]["content"] == reply_text("llama3", "async")


async def test_a_watcher_on_another_node_gets_the_live_tail_of_a_running_job(
    http: aiohttp.ClientSession, make_foreman: MakeForeman, make_stub: MakeStub, pg_url: str
) -> None:
    """GET /jobs/{id}/events on one node while another runs the job: its chunks and its end arrive."""
    stub = await make_stub(token_delay=0.02)
    a = await node(make_foreman, down_url(), pg_url, "a")
    await node(make_foreman, stub, pg_url, "b")
    stub.stub.faults.hang_next(1)
    accepted = await post(http, a.url + "/api/chat", chat_body("llama3", "watched"), ASYNC)
    job_id = accepted.json()["id"]
    await stub.stub.wait_for(lambda s: s.faults.hung == 1)
    async with http.get(f"{a.url}/jobs/{job_id}/events") as events:
        await eventually(lambda: query(pg_url, "SELECT watchers FROM jobs") == [(["a"],)], what="the watch")
        stub.stub.faults.release_hung()
        text = await events.text()
    assert "event: chunk" in text and '"state": "done"' in text


async def test_status_lists_every_node_with_its_ollama(
    http: aiohttp.ClientSession, make_foreman: MakeForeman, make_stub: MakeStub, pg_url: str
) -> None:
    """/status on any node shows every node, what its Ollama holds, and its heartbeat."""
    stub = await make_stub()
    # Alive means a heartbeat (every third of the timeout) within the timeout: long enough
    # that a busy machine cannot stall a heartbeat past it, short enough that a's models show soon.
    a = await node(make_foreman, stub, pg_url, "a", node_timeout=3.0)
    b = await node(make_foreman, down_url(), pg_url, "b", node_timeout=3.0)
    assert (await post(http, a.url + "/api/chat", chat_body("llama3"))).status == 200

    async def nodes() -> dict[str, Any]:
        async with http.get(b.url + "/status") as response:
            status = await response.json()
        return {n["name"]: n for n in status["nodes"]}

    listed: dict[str, Any] = {}

    async def holds_llama3() -> bool:
        listed.update(await nodes())
        return listed.get("a", {}).get("resident") == ["llama3:latest"]

    deadline = time.monotonic() + 5
    while not await holds_llama3():
        assert time.monotonic() < deadline, f"node a never reported llama3: {listed}"
        await asyncio.sleep(0.05)
    assert listed["a"]["upstream"] == stub.url and listed["a"]["alive"]
    assert listed["b"]["resident"] == [] and listed["b"]["alive"]
    assert listed["a"]["heartbeat_age_s"] < 5
    async with http.get(b.url + "/metrics") as response:
        assert response.status == 200 and "foreman_queue_depth" in await response.text()


def joined(url: str, name: str) -> bool:
    """Whether the node has written its row (once it made the tables)."""
    try:
        return bool(query(url, "SELECT 1 FROM nodes WHERE name = %s", name))
    except psycopg.errors.UndefinedTable:
        return False


def spawn_node(pg_url: str, name: str, upstream: str, timeout: float, log: Path) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "FOREMAN_DB": pg_url,
        "FOREMAN_NODE": name,
        "FOREMAN_NODE_TIMEOUT": str(timeout),
        "FOREMAN_UPSTREAM": upstream,
        "FOREMAN_LOG_FORMAT": "json",
        "FOREMAN_HOST": down_url(),
    }
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "foreman", "serve"], env=env, stdout=out, stderr=out, cwd=ROOT
        )


async def test_a_killed_nodes_job_resumes_on_another_node_after_its_lease(
    http: aiohttp.ClientSession, make_foreman: MakeForeman, make_stub: MakeStub, pg_url: str, tmp_path: Path
) -> None:
    """kill -9 of the node running a job: another node runs it after the lease, once, and nothing is lost."""
    doomed_stub, stub = await make_stub(), await make_stub()
    doomed_stub.stub.faults.hang_next(1)
    doomed = spawn_node(pg_url, "doomed", doomed_stub.url, 1.0, tmp_path / "doomed.log")
    try:
        # Until "doomed" holds the job, the other node is not there to take it.
        await eventually(
            lambda: joined(pg_url, "doomed") or doomed.poll() is not None, within=30, what="a join"
        )
        assert doomed.poll() is None, (tmp_path / "doomed.log").read_text()
        insert = await node(make_foreman, down_url(), pg_url, "intake", node_timeout=1.0)
        accepted = await post(http, insert.url + "/api/chat", chat_body("llama3", "survivor"), ASYNC)
        job_id = accepted.json()["id"]
        await doomed_stub.stub.wait_for(lambda s: s.faults.hung == 1)
        assert query(pg_url, "SELECT state, node FROM jobs") == [("working", "doomed")]
        await node(make_foreman, stub, pg_url, "heir", node_timeout=1.0)
        doomed.send_signal(signal.SIGKILL)
        doomed.wait()
        killed_at = time.monotonic()
        await eventually(
            lambda: job_states(pg_url) == ["done"], within=10, what="the job to finish elsewhere"
        )
        resumed = [r for r in stub.stub.requests if r.prompt == "survivor"]
        assert len(resumed) == 1
        # Not before its lease ran out (1 s, renewed at most a third of that before the kill).
        # How soon after is bench/cluster.py's figure.
        assert resumed[0].arrived_at - killed_at >= 1.0 * 2 / 3 - 0.05
        await doomed_stub.stub.wait_for(lambda s: s.in_flight == 0)
        assert doomed_stub.stub.requests[-1].finished_at <= resumed[0].arrived_at
        assert query(pg_url, "SELECT attempt FROM jobs") == [(1,)]  # the lost run counts as an attempt
        async with http.get(f"{insert.url}/jobs/{job_id}") as response:
            assert (await response.json())["result"]["message"]["content"] == reply_text("llama3", "survivor")
    finally:
        doomed.kill()
        doomed.wait()


async def test_a_node_that_loses_the_database_answers_503_and_recovers(
    http: aiohttp.ClientSession, make_foreman: MakeForeman, make_stub: MakeStub, pg_url: str
) -> None:
    """With the database gone, requests get 503 (nothing is kept in memory); when it is back, they work again."""
    stub = await make_stub()
    a = await node(make_foreman, stub, pg_url, "a")
    database = pg_url.rsplit("/", 1)[1]
    admin = pg_url.rsplit("/", 1)[0] + "/postgres"
    query(admin, f"ALTER DATABASE {database} WITH ALLOW_CONNECTIONS false")
    query(admin, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", database)
    refused = await post(http, a.url + "/api/chat", chat_body("llama3", "lost"))
    assert refused.status == 503 and "database" in refused.json()["error"]
    async with http.get(a.url + "/healthz") as health:
        assert health.status == 503
    query(admin, f"ALTER DATABASE {database} WITH ALLOW_CONNECTIONS true")
    deadline = time.monotonic() + 15
    while (answer := await post(http, a.url + "/api/chat", chat_body("llama3", "back"))).status != 200:
        assert answer.status == 503 and time.monotonic() < deadline
    await eventually(lambda: job_states(pg_url) == ["done"], what="the job recorded done")


async def test_a_client_on_one_node_gets_the_whole_stream_then_the_end_from_the_node_that_runs_it(
    http: aiohttp.ClientSession, make_foreman: MakeForeman, make_stub: MakeStub, pg_url: str
) -> None:
    """Streams of 1200 chunks sent as fast as they come: every chunk reaches the other node before the end."""
    tokens = 1200
    stub = await make_stub(tokens=tokens)
    a = await node(make_foreman, down_url(), pg_url, "a")
    await node(make_foreman, stub, pg_url, "b")
    for i in range(3):
        answer = await post(http, a.url + "/api/chat", chat_body("llama3", f"s{i}", stream=True))
        lines = answer.lines()
        assert answer.status == 200
        # The end came after the chunks: none is missing, and the last one is Ollama's closing line.
        assert "".join(line["message"]["content"] for line in lines) == reply_text("llama3", f"s{i}", tokens)
        assert len(lines) == tokens + 1 and lines[-1]["done"] is True
    # A reply too big for a NOTIFY payload comes through the relay table, with the end that records it.
    whole = await post(http, a.url + "/api/chat", chat_body("llama3", "whole"))
    assert whole.status == 200 and whole.json()["message"]["content"] == reply_text("llama3", "whole", tokens)
    assert query(pg_url, "SELECT count(*) FROM relay") == [(1,)]
    assert query(pg_url, "SELECT count(*) FROM jobs WHERE state = 'done'") == [(4,)]
