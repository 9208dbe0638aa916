"""Faults between processes on a shared PostgreSQL queue: a duplicate node name, a restarted server, a dead Ollama."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp

from tests.cluster.test_shared_queue import down_url, node, query, spawn_node
from tests.support.helpers import MakeForeman, MakeStub, chat_body, eventually, post


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
