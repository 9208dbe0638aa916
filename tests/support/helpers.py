"""Helpers the tests share: foreman under test, and waiting with a deadline."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import Awaitable, Callable
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestClient

from foreman.api.keys import STORAGE
from foreman.config import Config
from stub_ollama import Stub, StubServer, normalise, reply_tokens


async def eventually(predicate: Callable[[], bool], within: float = 5.0, what: str = "condition") -> None:
    """Poll `predicate` until it holds, failing after `within` seconds."""
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


@dataclass
class Foreman:
    """foreman running in-process on a loopback port, with its database file."""

    client: TestClient[web.Request, web.Application]
    config: Config

    @property
    def app(self) -> web.Application:
        return self.client.app  # type: ignore[return-value]

    @property
    def url(self) -> str:
        return str(self.client.make_url("")).rstrip("/")

    def jobs(self) -> list[dict[str, Any]]:
        """Every job row, oldest first, read through a separate connection.

        First it lets the store's thread finish what it was handed: foreman
        answers a finished job before its record commits (a few microseconds
        later), and a test reading the file must not see the moment between.
        """
        store = self.app.get(STORAGE)
        if store is not None:
            with suppress(RuntimeError):  # the app has stopped and its thread is gone
                store._executor.submit(lambda: None).result(timeout=5)
        db = sqlite3.connect(self.config.db_path)
        db.row_factory = sqlite3.Row
        try:
            return [dict(row) for row in db.execute("SELECT * FROM jobs ORDER BY id")]
        finally:
            db.close()

    def states(self) -> list[str]:
        return [job["state"] for job in self.jobs()]

    async def wait_states(self, predicate: Callable[[list[str]], bool], what: str = "job states") -> None:
        await eventually(lambda: predicate(self.states()), what=what)

    async def close(self) -> None:
        await self.client.close()


def chat_body(model: str, content: str = "hi", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": content}], "stream": False, **extra}


def reply_text(model: str, prompt: str, tokens: int = 8) -> str:
    """What the stub answers `prompt` with on `model`."""
    return "".join(reply_tokens(normalise(model) or model, prompt, tokens))


@dataclass(frozen=True)
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def lines(self) -> list[Any]:
        return [json.loads(line) for line in self.body.splitlines()]


async def post(
    http: aiohttp.ClientSession, url: str, body: Any, headers: dict[str, str] | None = None
) -> Answer:
    """POST JSON (or raw bytes) and read the whole answer."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    sent = {"Content-Type": "application/json", **(headers or {})}
    async with http.post(url, data=data, headers=sent) as response:
        return Answer(response.status, dict(response.headers), await response.read())


async def submit(
    http: aiohttp.ClientSession,
    foreman: Foreman,
    body: Any,
    path: str = "/api/chat",
    headers: dict[str, str] | None = None,
) -> asyncio.Task[Answer]:
    """Send a request in the background and return once foreman has written its job."""
    before = len(foreman.jobs())
    task = asyncio.create_task(post(http, foreman.url + path, body, headers))
    await eventually(lambda: len(foreman.jobs()) > before or task.done(), what="the job to be written")
    return task


MakeForeman = Callable[..., Awaitable[Foreman]]
MakeStub = Callable[..., Awaitable[StubServer]]


async def hold_worker(
    http: aiohttp.ClientSession, foreman: Foreman, stub: Stub, model: str
) -> asyncio.Task[Answer]:
    """Start one job that the stub holds, so the following ones queue up behind it."""
    stub.faults.hang_next(1)
    task = await submit(http, foreman, chat_body(model, "first"))
    await stub.wait_for(lambda s: s.faults.hung == 1)
    return task


ASYNC = {"Prefer": "respond-async"}


@dataclass(frozen=True)
class ServerEvent:
    event: str
    data: Any


async def read_events(response: aiohttp.ClientResponse) -> list[ServerEvent]:
    """Every Server-Sent Event of a response, until the stream ends."""
    events: list[ServerEvent] = []
    name, data = "message", []
    async for raw in response.content:
        line = raw.decode().rstrip("\n")
        if line.startswith("event: "):
            name = line[len("event: ") :]
        elif line.startswith("data: "):
            data.append(line[len("data: ") :])
        elif line == "" and data:
            events.append(ServerEvent(name, json.loads("\n".join(data))))
            name, data = "message", []
    return events


def chunk_text(events: list[ServerEvent]) -> str:
    """The text the chunk events of a chat or generate job carry."""
    parts = []
    for event in events:
        if event.event == "chunk":
            parts.append(event.data.get("message", {}).get("content") or event.data.get("response") or "")
    return "".join(parts)


class FakeClock:
    """Time that moves only when a test moves it."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now
