"""Pins after kill -9: a restarted foreman releases the pins a dead one left on models no waiting work needs."""

from __future__ import annotations

import asyncio
import signal
import sqlite3
from pathlib import Path

import aiohttp

from stub_ollama import FOREVER
from tests.support.helpers import MakeStub, chat_body, eventually
from tests.support.processes import free_port, json_lines, serve

DEFAULT = 300.0  # the stub's OLLAMA_KEEP_ALIVE
# The job the kill interrupts fails at the restart instead of running again,
# so no waiting work needs the model it pinned.
_SETTINGS = {"FOREMAN_MAX_ATTEMPTS": "1"}


async def _ready(log: Path, times: int) -> None:
    def ready() -> bool:
        return [e["event"] for e in json_lines(log)].count("foreman.ready") == times

    await eventually(ready, within=20, what="foreman.ready")


async def test_a_pin_left_by_a_killed_foreman_is_released_at_the_next_start(
    http: aiohttp.ClientSession, make_stub: MakeStub, tmp_path: Path
) -> None:
    """kill -9 while a model runs pinned: the next start hands it back to Ollama's expiry, as SIGTERM would have."""
    server = await make_stub(tokens=60, token_delay=0.05)
    stub = server.stub
    port, db, log = free_port(), tmp_path / "queue.db", tmp_path / "foreman.log"
    url = f"http://127.0.0.1:{port}"
    process = serve(port, server.url, db, log, **_SETTINGS)
    try:
        await _ready(log, 1)
        stub.faults.hang_next(1)  # hold the worker on mistral while llama3's two jobs queue
        held = asyncio.create_task(http.post(url + "/api/chat", json=chat_body("mistral", "hold")))
        await stub.wait_for(lambda s: s.faults.hung == 1, timeout=20)
        running = asyncio.create_task(http.post(url + "/api/chat", json=chat_body("llama3", "running")))
        async with http.post(
            url + "/api/chat", json=chat_body("llama3", "behind"), headers={"Prefer": "respond-async"}
        ) as accepted:
            behind = (await accepted.json())["id"]
        stub.faults.release_hung()
        await held
        # "running" streams with the pin, for the job behind it.
        await stub.wait_for(lambda s: s.keep_alive("llama3") == FOREVER, timeout=20)
        async with http.delete(f"{url}/jobs/{behind}") as cancelled:
            assert cancelled.status == 200
        process.send_signal(signal.SIGKILL)
        process.wait()
        running.cancel()
        await stub.wait_for(lambda s: s.in_flight == 0, timeout=20)
        assert stub.keep_alive("llama3") == FOREVER  # what kill -9 leaves: loaded for good

        process = serve(port, server.url, db, log, **_SETTINGS)
        await _ready(log, 2)
        await stub.wait_for(lambda s: s.keep_alive("llama3") == DEFAULT, timeout=20)
        unpinned = [e for e in json_lines(log) if e["event"] == "model.unpinned"]
        assert [(e["model"], e["reason"]) for e in unpinned] == [("llama3:latest", "left_behind")]
        with sqlite3.connect(db) as conn:
            assert conn.execute("SELECT count(*) FROM pins").fetchone() == (0,)
    finally:
        process.kill()
        process.wait()
