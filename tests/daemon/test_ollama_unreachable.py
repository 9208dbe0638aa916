"""Ollama not answering at all, as a person sees it: errors in plain words, and `foreman status` saying so."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest

from foreman.api.keys import OUTAGES
from foreman.client.layout import format_status
from tests.support.helpers import MakeForeman, eventually


@pytest.fixture
def dead_port() -> Iterator[int]:
    """A loopback port with nothing listening: bound, so nobody else takes it, but not accepting."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


async def test_a_passed_through_request_says_which_address_and_why(
    make_foreman: MakeForeman, dead_port: int
) -> None:
    """`cannot reach Ollama at http://127.0.0.1:PORT: connection refused`, not aiohttp's `ssl:default [...]`."""
    foreman = await make_foreman(f"http://127.0.0.1:{dead_port}")
    answer = await foreman.client.get("/api/tags")
    assert answer.status == 502
    assert await answer.json() == {
        "error": f"cannot reach Ollama at http://127.0.0.1:{dead_port}: connection refused; is it running there?"
    }


async def test_status_shows_ollama_down_since_start_as_the_last_error(
    make_foreman: MakeForeman, dead_port: int
) -> None:
    """With Ollama down from the start and no job run, `foreman status` has the error the log has."""
    foreman = await make_foreman(f"http://127.0.0.1:{dead_port}")
    outages = foreman.app[OUTAGES]
    await eventually(lambda: outages.last_error is not None, what="the worker to find Ollama down")
    status = await (await foreman.client.get("/status")).json()
    assert status["last_error"]["message"] == (
        f"cannot reach Ollama at http://127.0.0.1:{dead_port}: connection refused; is it running there?"
    )
    [shown] = [
        line for line in format_status(status, time.time()).splitlines() if line.startswith("last error")
    ]
    assert shown.endswith("connection refused; is it running there?"), shown
