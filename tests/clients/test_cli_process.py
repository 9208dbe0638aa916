"""`foreman` as its own process, as a person runs it: pipes that close, Ctrl-C, misspelt variables."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
from pathlib import Path

import aiohttp
import pytest

from stub_ollama import Stub
from tests.support.helpers import Foreman, chat_body, hold_worker
from tests.support.processes import free_port

README = Path(__file__).resolve().parents[2] / "README.md"
FOREMAN = [sys.executable, "-m", "foreman"]
# As in a person's shell, where stdout into a pipe is buffered until the end (tests may run unbuffered).
BUFFERED = {name: value for name, value in os.environ.items() if name != "PYTHONUNBUFFERED"}
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
        env=BUFFERED,
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


async def test_a_pipe_closed_before_anything_is_written_ends_quietly(foreman: Foreman) -> None:
    """`foreman jobs | true`: the output, buffered to the end, meets a closed pipe; no traceback."""
    read, write = os.pipe()
    os.close(read)
    process = await asyncio.create_subprocess_exec(
        *FOREMAN, "jobs", "--host", foreman.url, stdout=write, stderr=asyncio.subprocess.PIPE, env=BUFFERED
    )
    os.close(write)
    async with asyncio.timeout(DEADLINE):
        _, err = await process.communicate()
    assert (process.returncode, err) == (141, b"")


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


@pytest.mark.skipif(sys.platform == "win32", reason="SIGTERM")
async def test_a_misspelt_variable_is_named_at_start_and_foreman_goes_on(tmp_path: Path) -> None:
    """FOREMAN_MAX_WIAT=3s gets one warning naming it and FOREMAN_MAX_WAIT; the daemon still starts."""
    environ = {**os.environ, "FOREMAN_MAX_WIAT": "3s", "FOREMAN_LOG_FORMAT": "json"}
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        *FOREMAN,
        "serve",
        "--host",
        f"127.0.0.1:{port}",
        "--db",
        str(tmp_path / "foreman.db"),
        "--upstream",
        f"127.0.0.1:{free_port()}",
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


# What differs from one run of the demo to the next: times, ids, ports, the temporary folder,
# and the counts at the first claim, which races the second arrival.
_VARIES = [
    (re.compile(r"^\S+Z "), ""),
    (re.compile(r"\b[0-9A-HJKMNP-TV-Z]{26}\b"), "<id>"),
    (re.compile(r"127\.0\.0\.1:\d+"), "127.0.0.1:<port>"),
    (re.compile(r"/tmp/foreman-demo-\w+/"), "<tmp>/"),
    (re.compile(r"\b(waiting_from|waiting_to)=\d+"), r"\1=<n>"),
    (re.compile(r"\b\d+\.\d+\b"), "<s>"),
]


_FIELD = re.compile(r"\w+=(?:'[^']*'|\[[^\]]*\]|\S+)")


def _steady(line: str) -> str:
    """The line without what varies, its fields sorted (the context's fields come in either order)."""
    for pattern, replacement in _VARIES:
        line = pattern.sub(replacement, line)
    fields = _FIELD.findall(line)
    head = _FIELD.sub("", line)
    return " ".join([*head.split(), *sorted(fields)])


def readme_demo_output() -> list[list[str]]:
    """README's demo output, as runs of consecutive lines (`…` separates them)."""
    text = README.read_text(encoding="utf-8")
    block = text.split("<!-- demo output -->\n```text\n", 1)[1].split("```", 1)[0]
    runs: list[list[str]] = [[]]
    for line in block.splitlines():
        if line == "…":
            runs.append([])
        else:
            runs[-1].append(_steady(line))
    return runs


async def test_readmes_demo_output_is_what_the_demo_prints() -> None:
    """Each run of lines README shows comes out of `foreman demo`, in order; no warm-up noise in between."""
    process = await asyncio.create_subprocess_exec(
        *FOREMAN, "demo", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    async with asyncio.timeout(DEADLINE):
        out, err = await process.communicate()
    assert (process.returncode, err) == (0, b"")
    printed = [_steady(line) for line in out.decode().splitlines()]
    assert not [line for line in printed if "warm" in line]
    at = 0
    for run in readme_demo_output():
        found = next((i for i in range(at, len(printed)) if printed[i : i + len(run)] == run), None)
        assert found is not None, (
            f"README's lines from {run[0]!r} are not what the demo printed:\n" + "\n".join(printed[at:])
        )
        at = found + len(run)
