"""One daemon per database: a second `foreman serve` on the same queue changes nothing and says who holds it."""

from __future__ import annotations

import asyncio
import socket
import sqlite3
import subprocess
import time
from pathlib import Path

import aiohttp

from tests.support.helpers import MakeStub, chat_body, eventually
from tests.support.processes import free_port, json_lines, serve


def _rows(db: Path) -> list[tuple[str, str, int]]:
    with sqlite3.connect(db) as conn:
        return conn.execute("SELECT body, state, attempt FROM jobs ORDER BY id").fetchall()


async def _listening(port: int, process: subprocess.Popen[bytes]) -> None:
    def accepts() -> bool:
        assert process.poll() is None, "foreman exited; see its log"
        with socket.socket() as sock:
            return sock.connect_ex(("127.0.0.1", port)) == 0

    await eventually(accepts, within=20, what="foreman to listen")


async def test_a_second_daemon_on_the_same_database_exits_at_once_and_changes_nothing(
    http: aiohttp.ClientSession, make_stub: MakeStub, tmp_path: Path
) -> None:
    """Started on the same port, then on another: each second daemon exits naming the database and the first's pid."""
    server = await make_stub()
    stub = server.stub
    port, db = free_port(), tmp_path / "queue.db"
    first = serve(port, server.url, db, tmp_path / "first.log")
    try:
        await _listening(port, first)
        url = f"http://127.0.0.1:{port}"
        stub.faults.hang_next(1)
        tasks = [asyncio.create_task(http.post(url + "/api/chat", json=chat_body("llama3", "running")))]
        await stub.wait_for(lambda s: s.faults.hung == 1, timeout=20)
        for prompt in ("queued 1", "queued 2"):
            tasks.append(asyncio.create_task(http.post(url + "/api/chat", json=chat_body("mistral", prompt))))
        await eventually(lambda: len(_rows(db)) == 3, what="three jobs on disk")
        before = _rows(db)

        for name, second_port in (("same-port", port), ("other-port", free_port())):
            log = tmp_path / f"{name}.log"
            started = time.monotonic()
            second = serve(second_port, server.url, db, log)
            assert second.wait(timeout=20) == 1
            assert time.monotonic() - started < 15
            errors = [line for line in json_lines(log) if line["level"] == "error"]
            assert len(errors) == 1, log.read_text()
            assert errors[0]["event"] == "foreman.db_busy"
            assert str(db) in errors[0]["error"] and f"pid {first.pid}" in errors[0]["error"]
            assert not [
                line for line in json_lines(log) if line["event"] in ("queue.recovered", "foreman.ready")
            ]
            assert _rows(db) == before  # nothing requeued, nothing charged an attempt

        stub.faults.release_hung()
        answers = await asyncio.gather(*tasks)
        assert [a.status for a in answers] == [200, 200, 200]
        # Each is answered first and recorded right after.
        await eventually(
            lambda: [(s, a) for _, s, a in _rows(db)] == [("done", 0)] * 3, what="three done, once"
        )
        ran = sorted(r.prompt for r in stub.inference_requests() if r.outcome == "ok")
        assert ran == ["queued 1", "queued 2", "running"]  # each once
        assert first.poll() is None
    finally:
        first.terminate()
        first.wait()


async def test_a_taken_port_stops_foreman_before_it_touches_the_database(
    make_stub: MakeStub, tmp_path: Path
) -> None:
    """With its port taken, foreman exits without recovering a job and without logging foreman.ready."""
    server = await make_stub()
    db, log = tmp_path / "queue.db", tmp_path / "foreman.log"
    port = free_port()
    first_log = tmp_path / "first.log"
    first = serve(port, server.url, db, first_log)
    await eventually(
        lambda: "foreman.ready" in [line["event"] for line in json_lines(first_log)], within=20, what="ready"
    )
    first.terminate()
    first.wait()
    with sqlite3.connect(db) as conn:  # what a crash mid-run leaves: a job still marked running
        conn.execute(
            "INSERT INTO jobs (id, state, endpoint, model, model_key, stream, body, created_at)"
            " VALUES ('01J0000000000000000000000', 'working', '/api/chat', 'llama3', 'llama3', 0, x'7b7d', 0)"
        )
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        process = serve(port, server.url, db, log)
        assert process.wait(timeout=20) == 1
    events = [line["event"] for line in json_lines(log)]
    assert "foreman.listen_failed" in events
    assert "queue.recovered" not in events and "foreman.ready" not in events
    assert [(state, attempt) for _, state, attempt in _rows(db)] == [("working", 0)]
