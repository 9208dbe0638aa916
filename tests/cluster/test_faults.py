"""Faults between processes on a shared PostgreSQL queue: a duplicate node name, a restarted server, a dead Ollama."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import aiohttp

from tests.cluster.test_shared_queue import ROOT, down_url, node, query, spawn_node
from tests.support.helpers import MakeForeman, MakeStub, chat_body, eventually, post, reply_text
from tests.support.processes import free_port


async def test_a_second_node_with_the_same_name_is_refused_and_changes_nothing(
    http: aiohttp.ClientSession, make_foreman: MakeForeman, make_stub: MakeStub, pg_url: str, tmp_path: Path
) -> None:
    """A second `foreman serve` with a live node's FOREMAN_NODE exits at once; that node's running job is untouched."""
    server = await make_stub()
    a = await node(make_foreman, server, pg_url, "a")
    server.stub.faults.hang_next(1)
    reply = asyncio.create_task(post(http, a.url + "/api/chat", chat_body("llama3", "running")))
    await server.stub.wait_for(lambda s: s.faults.hung == 1)
    log = tmp_path / "twin.log"
    twin = spawn_node(pg_url, "a", down_url(), 3.0, log)
    try:
        assert await asyncio.to_thread(twin.wait, 30) == 1
    finally:
        twin.kill()
    lines = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
    errors = [line for line in lines if line["level"] == "error"]
    assert [e["event"] for e in errors] == ["foreman.db_busy"], log.read_text()
    assert "'a'" in errors[0]["error"] and "FOREMAN_NODE" in errors[0]["error"]
    assert query(pg_url, "SELECT state, attempt, node FROM jobs") == [("working", 0, "a")]
    server.stub.faults.release_hung()
    assert (await reply).status == 200
    await eventually(lambda: query(pg_url, "SELECT state, attempt FROM jobs") == [("done", 0)])
    assert len([r for r in server.stub.inference_requests() if r.prompt == "running"]) == 1


def _spawn(pg_url: str, name: str, upstream: str, port: int, log: Path) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "FOREMAN_DB": pg_url,
        "FOREMAN_NODE": name,
        "FOREMAN_UPSTREAM": upstream,
        "FOREMAN_LOG_FORMAT": "json",
        "FOREMAN_HOST": f"127.0.0.1:{port}",
    }
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "foreman", "serve"], env=env, stdout=out, stderr=out, cwd=ROOT
        )


async def test_a_node_whose_ollama_went_down_leaves_its_models_work_to_a_node_that_can_run_it(
    http: aiohttp.ClientSession, make_foreman: MakeForeman, make_stub: MakeStub, pg_url: str, tmp_path: Path
) -> None:
    """Node A held mistral, then its Ollama went down: a streamed mistral request sent to A is answered by B."""
    stub_a, stub_b = await make_stub(), await make_stub()
    port, log = free_port(), tmp_path / "a.log"
    a = _spawn(pg_url, "a", stub_a.url, port, log)
    a_url = f"http://127.0.0.1:{port}"
    try:
        await eventually(
            lambda: '"foreman.ready"' in log.read_text() or a.poll() is not None, within=30, what="A"
        )
        assert a.poll() is None, log.read_text()
        warm = await post(http, a_url + "/api/chat", chat_body("mistral", "warm"))
        assert warm.status == 200 and "mistral:latest" in stub_a.stub.loaded()
        await node(make_foreman, stub_b, pg_url, "b")
        await stub_a.close()  # A's Ollama goes down

        async with asyncio.timeout(30):  # on a node that keeps holding mistral: no reply, ever
            answer = await post(http, a_url + "/api/chat", chat_body("mistral", "after", stream=True))
        assert answer.status == 200
        assert "".join(line["message"]["content"] for line in answer.lines()) == reply_text(
            "mistral", "after"
        )
        assert [r.prompt for r in stub_b.stub.inference_requests() if r.outcome == "ok"] == ["after"]
        assert query(pg_url, "SELECT reachable FROM nodes WHERE name = 'a'") == [(False,)]
    finally:
        a.terminate()
        a.wait()
