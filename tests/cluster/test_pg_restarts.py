"""PostgreSQL goes away and comes back under two nodes: clients kept, new ones told 503, every job done once."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest

from stub_ollama import StubServer
from tests.cluster.test_shared_queue import job_states, node
from tests.conftest import new_database
from tests.support import postgres
from tests.support.helpers import (
    Answer,
    Foreman,
    MakeForeman,
    MakeStub,
    chat_body,
    eventually,
    post,
    reply_text,
)

JOBS = 12


@pytest.fixture
def own_pg() -> Iterator[postgres.Server]:
    """A PostgreSQL server of this test's own, which it may restart and stop."""
    bindir = postgres.server_bindir()
    if bindir is None:
        pytest.skip("no PostgreSQL server installed")
    server = postgres.start(bindir)
    yield server
    with contextlib.suppress(subprocess.CalledProcessError):  # a test that failed may have left it stopped
        server.stop()
    shutil.rmtree(server.root, ignore_errors=True)


async def _drain_under(
    http: aiohttp.ClientSession, make_foreman: MakeForeman, make_stub: MakeStub, url: str, **settings: Any
) -> tuple[list[Foreman], list[asyncio.Task[Answer]], list[StubServer]]:
    stubs = [await make_stub(token_delay=0.05), await make_stub(token_delay=0.05)]
    nodes = [await node(make_foreman, stubs[i], url, name, **settings) for i, name in enumerate("ab")]
    clients = [
        asyncio.create_task(
            post(
                http, nodes[i % 2].url + "/api/chat", chat_body(("llama3", "mistral")[i % 3 % 2], f"job {i}")
            )
        )
        for i in range(JOBS)
    ]
    await eventually(lambda: len(job_states(url)) == JOBS, what="every job accepted")
    return nodes, clients, stubs


def _ran_once(stubs: list[StubServer], prompts: list[str]) -> None:
    ran = Counter(r.prompt for s in stubs for r in s.stub.inference_requests() if r.outcome == "ok")
    assert {p: ran[p] for p in prompts} == dict.fromkeys(prompts, 1)


async def test_a_postgresql_restart_mid_drain_loses_and_doubles_nothing(
    own_pg: postgres.Server, http: aiohttp.ClientSession, make_foreman: MakeForeman, make_stub: MakeStub
) -> None:
    """`pg_ctl restart -m fast` while two nodes drain: every waiting client gets its reply, every job is done once."""
    url = new_database(own_pg)
    _, clients, stubs = await _drain_under(http, make_foreman, make_stub, url)
    await eventually(lambda: job_states(url).count("done") >= 2, within=20, what="the drain under way")
    await asyncio.to_thread(own_pg.restart)
    async with asyncio.timeout(60):
        answers = await asyncio.gather(*clients)
    assert [a.status for a in answers] == [200] * JOBS, [a.body[:200] for a in answers if a.status != 200]
    for i, answer in enumerate(answers):
        assert answer.json()["message"]["content"] == reply_text(("llama3", "mistral")[i % 3 % 2], f"job {i}")
    await eventually(lambda: job_states(url) == ["done"] * JOBS, within=20, what="every job recorded done")
    _ran_once(stubs, [f"job {i}" for i in range(JOBS)])


async def test_postgresql_stopped_for_a_while_answers_new_clients_503_and_keeps_the_others(
    own_pg: postgres.Server, http: aiohttp.ClientSession, make_foreman: MakeForeman, make_stub: MakeStub
) -> None:
    """With the server stopped past the nodes' leases, new requests get 503 and Retry-After; the others get replies."""
    url = new_database(own_pg)
    # Leases of 2 s, shorter than the outage: back, no node may take the other's running jobs for dead.
    nodes, clients, stubs = await _drain_under(http, make_foreman, make_stub, url, node_timeout=2.0)
    await eventually(lambda: job_states(url).count("done") >= 2, within=20, what="the drain under way")
    await asyncio.to_thread(own_pg.halt)
    stopped = time.monotonic()
    for n in nodes:
        refused = await post(http, n.url + "/api/chat", chat_body("llama3", "while gone"))
        assert refused.status == 503 and "database" in refused.json()["error"]
        assert int(refused.headers["Retry-After"]) > 0
    await asyncio.sleep(max(0.0, 3.0 - (time.monotonic() - stopped)))  # the outage itself: 3 s of it
    await asyncio.to_thread(own_pg.resume)
    async with asyncio.timeout(60):
        answers = await asyncio.gather(*clients)
    assert [a.status for a in answers] == [200] * JOBS, [a.body[:200] for a in answers if a.status != 200]
    await eventually(lambda: job_states(url) == ["done"] * JOBS, within=20, what="every job recorded done")
    _ran_once(stubs, [f"job {i}" for i in range(JOBS)])
    answer = await post(http, nodes[0].url + "/api/chat", chat_body("llama3", "after"))
    assert answer.status == 200
