"""Pins after kill -9: a restarted foreman releases the pins a dead one left on models no waiting work needs."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import aiohttp

from stub_ollama import FOREVER
from tests.support.helpers import MakeStub, chat_body, eventually

DEFAULT = 300.0  # the stub's OLLAMA_KEEP_ALIVE


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _serve(port: int, upstream: str, db: Path, log: Path) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "FOREMAN_LOG_FORMAT": "json",
        "FOREMAN_BACKOFF_INITIAL": "0",
        "FOREMAN_BACKOFF_MAX": "0",
        # The job the kill interrupts fails at the restart instead of running again,
        # so no waiting work needs the model it pinned.
        "FOREMAN_MAX_ATTEMPTS": "1",
    }
    command = [sys.executable, "-m", "foreman", "serve", "--host", f"127.0.0.1:{port}"]
    with log.open("ab") as out:
        return subprocess.Popen(
            [*command, "--upstream", upstream, "--db", str(db)], env=env, stdout=out, stderr=subprocess.STDOUT
        )


def _events(log: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]


async def _ready(log: Path, times: int) -> None:
    def ready() -> bool:
        return [e["event"] for e in _events(log)].count("foreman.ready") == times

    await eventually(ready, within=20, what="foreman.ready")


async def test_a_pin_left_by_a_killed_foreman_is_released_at_the_next_start(
    http: aiohttp.ClientSession, make_stub: MakeStub, tmp_path: Path
) -> None:
    """kill -9 while a model runs pinned: the next start hands it back to Ollama's expiry, as SIGTERM would have."""
    server = await make_stub(tokens=60, token_delay=0.05)
    stub = server.stub
    port, db, log = _free_port(), tmp_path / "queue.db", tmp_path / "foreman.log"
    url = f"http://127.0.0.1:{port}"
    process = _serve(port, server.url, db, log)
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

        process = _serve(port, server.url, db, log)
        await _ready(log, 2)
        await stub.wait_for(lambda s: s.keep_alive("llama3") == DEFAULT, timeout=20)
        unpinned = [e for e in _events(log) if e["event"] == "model.unpinned"]
        assert [(e["model"], e["reason"]) for e in unpinned] == [("llama3:latest", "left_behind")]
        with sqlite3.connect(db) as conn:
            assert conn.execute("SELECT count(*) FROM pins").fetchone() == (0,)
    finally:
        process.kill()
        process.wait()
