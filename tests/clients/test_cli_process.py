"""`foreman` as its own process, as a person runs it: pipes that close, Ctrl-C, misspelt variables."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
from pathlib import Path

import aiohttp
import pytest

from stub_ollama import Stub
from tests.support.helpers import Foreman, chat_body, hold_worker

FOREMAN = [sys.executable, "-m", "foreman"]
# A cold interpreter on a loaded 2-core machine can take seconds to start.
DEADLINE = 60


async def read_until(stream: asyncio.StreamReader, wanted: bytes) -> list[bytes]:
    """The lines read up to and including the first that contains `wanted`."""
    lines = []
    while True:
        line = await stream.readline()
        assert line, f"the output ended before {wanted!r}: {b''.join(lines)!r}"
        lines.append(line)
        if wanted in line:
            return lines


async def test_a_closed_pipe_ends_submit_quietly(
    http: aiohttp.ClientSession, foreman: Foreman, stub: Stub, tmp_path: Path
) -> None:
    """`foreman submit --file F --wait | head -2` stops without a traceback once head has gone."""
    batch = tmp_path / "batch.jsonl"
    batch.write_text("".join(json.dumps(chat_body("mistral", f"n{i}")) + "\n" for i in range(5)))
    first = await hold_worker(http, foreman, stub, "llama3")
    read, write = os.pipe()
    process = await asyncio.create_subprocess_exec(
        *FOREMAN,
        "submit",
        "--file",
        str(batch),
        "--wait",
        "--interval",
        "0.05",
        "--host",
        foreman.url,
        stdout=write,
        stderr=asyncio.subprocess.PIPE,
    )
    os.close(write)
    async with asyncio.timeout(DEADLINE):
        with os.fdopen(read, "rb") as head:
            # The ids come first; the results are written once the held job lets the rest run.
            lines = [await asyncio.to_thread(head.readline) for _ in range(2)]
        stub.faults.release_hung()
        await first
        _, err = await process.communicate()
    assert all(line.split()[1] == b"queued," for line in lines), lines
    assert err.count(b"Traceback") == 0, err.decode()
    assert process.returncode == 141, err.decode()


async def test_ctrl_c_stops_the_demo_cleanly() -> None:
    """Ctrl-C while the demo's workload runs: one line on stderr, exit 130, no traceback."""
    process = await asyncio.create_subprocess_exec(
        *FOREMAN,
        "demo",
        "--load-delay",
        "30s",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stdout is not None
    async with asyncio.timeout(DEADLINE):
        await read_until(process.stdout, b"demo.start")
        process.send_signal(signal.SIGINT)
        _, err = await process.communicate()
    assert (process.returncode, err) == (130, b"foreman demo: interrupted\n")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.skipif(sys.platform == "win32", reason="SIGTERM")
async def test_a_misspelt_variable_is_named_at_start_and_foreman_goes_on(tmp_path: Path) -> None:
    """FOREMAN_MAX_WIAT=3s gets one warning naming it and FOREMAN_MAX_WAIT; the daemon still starts."""
    environ = {**os.environ, "FOREMAN_MAX_WIAT": "3s", "FOREMAN_LOG_FORMAT": "json"}
    port = _free_port()
    process = await asyncio.create_subprocess_exec(
        *FOREMAN,
        "serve",
        "--host",
        f"127.0.0.1:{port}",
        "--db",
        str(tmp_path / "foreman.db"),
        "--upstream",
        f"127.0.0.1:{_free_port()}",
        env=environ,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stdout is not None
    try:
        async with asyncio.timeout(DEADLINE):
            lines = await read_until(process.stdout, b"foreman.unknown_variable")
            [warning] = [json.loads(line) for line in lines if b"unknown_variable" in line]
            assert warning["variable"] == "FOREMAN_MAX_WIAT"
            assert warning["did_you_mean"] == "FOREMAN_MAX_WAIT"
            assert warning["level"] == "warning"
            while True:  # it goes on to listen
                try:
                    _, writer = await asyncio.open_connection("127.0.0.1", port)
                except OSError:
                    assert process.returncode is None
                    await asyncio.sleep(0.05)
                else:
                    writer.close()
                    break
    finally:
        process.terminate()
        await process.communicate()
