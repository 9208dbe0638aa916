"""Shared set-ups: a stub Ollama on a real port, and foreman in front of it."""

from __future__ import annotations

import itertools
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import ollama
import openai
import pytest
import structlog
from aiohttp import web
from aiohttp.test_utils import TestClient

from foreman.app import create_app
from foreman.config import Config
from stub_ollama import Stub, StubServer, StubSettings
from tests.support import postgres
from tests.support.helpers import Foreman, MakeForeman, MakeStub


@pytest.fixture(autouse=True)
def _reset_structlog(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Tests that run the CLI configure structlog for the process; undo it after each.

    `foreman serve` caches its loggers for the life of the process; here a
    cached logger would outlive the test's stdout and ignore capture_logs.
    """
    configure = structlog.configure

    def without_cache(**settings: Any) -> None:
        configure(**{**settings, "cache_logger_on_first_use": False})

    monkeypatch.setattr(structlog, "configure", without_cache)
    yield
    structlog.reset_defaults()


@pytest.fixture(scope="session")
def pg_server() -> Iterator[postgres.Server]:
    """One PostgreSQL server for the whole run; each test gets its own database on it (`pg_url`)."""
    bindir = postgres.server_bindir()
    if bindir is None:
        pytest.skip("no PostgreSQL server installed (initdb not found; .ci/run installs Debian's postgresql)")
    server = postgres.start(bindir)
    yield server
    server.stop()


_databases = itertools.count()


def new_database(server: postgres.Server) -> str:
    """A libpq URL to a new, empty database of `server`."""
    import psycopg

    name = f"t{next(_databases)}"
    with psycopg.connect(server.url(), autocommit=True) as db:
        db.execute(f"CREATE DATABASE {name}")
    return server.url(name)


@pytest.fixture
def pg_url(pg_server: postgres.Server) -> str:
    """A libpq URL to a new, empty database of the test server."""
    return new_database(pg_server)


@pytest.fixture
async def make_stub() -> AsyncIterator[MakeStub]:
    """Start stub Ollamas on free loopback ports; small load delay by default."""
    servers: list[StubServer] = []

    async def make(**overrides: Any) -> StubServer:
        server = StubServer(StubSettings(**{"load_delay": 0.01, **overrides}))
        await server.start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        await server.close()


@pytest.fixture
async def stub_server(make_stub: MakeStub) -> StubServer:
    return await make_stub()


@pytest.fixture
def stub(stub_server: StubServer) -> Stub:
    return stub_server.stub


@pytest.fixture
def make_foreman(
    aiohttp_client: Callable[..., Awaitable[TestClient[web.Request, web.Application]]], tmp_path: Path
) -> MakeForeman:
    """Start foreman in front of `upstream`; retries wait zero seconds unless told otherwise.

    `clock` replaces the time foreman stamps and schedules jobs by.
    """

    async def make(upstream: str, clock: Callable[[], float] = time.time, **overrides: Any) -> Foreman:
        base = Config(db_path=tmp_path / "foreman.db", upstream=upstream, backoff_initial=0, backoff_max=0)
        config = replace(base, **overrides)
        client = await aiohttp_client(create_app(config, clock=clock))
        return Foreman(client, config)

    return make


@pytest.fixture
async def foreman(make_foreman: MakeForeman, stub_server: StubServer) -> Foreman:
    return await make_foreman(stub_server.url)


Client = TypeVar("Client", ollama.AsyncClient, openai.AsyncOpenAI)


async def _clients(
    build: Callable[[str], Client], close: Callable[[Client], Awaitable[object]]
) -> AsyncIterator[Callable[[str], Client]]:
    """A factory of clients for a base URL; every client it made is closed afterwards."""
    clients: list[Client] = []

    def make(url: str) -> Client:
        client = build(url)
        clients.append(client)
        return client

    yield make
    for client in clients:
        await close(client)


@pytest.fixture
async def ollama_client() -> AsyncIterator[Callable[[str], ollama.AsyncClient]]:
    """Official ollama AsyncClients, closed after the test."""
    async for make in _clients(
        lambda url: ollama.AsyncClient(host=url, trust_env=False),
        lambda client: client.close(),  # type: ignore[no-untyped-call]
    ):
        yield make


@pytest.fixture
async def openai_client() -> AsyncIterator[Callable[[str], openai.AsyncOpenAI]]:
    """Official openai AsyncClients on a server's /v1, closed after the test.

    The SDK retries 5xx and 409 answers on its own; that would submit new jobs,
    so tests turn it off.
    """
    async for make in _clients(
        lambda url: openai.AsyncOpenAI(base_url=url + "/v1", api_key="ollama", max_retries=0),
        lambda client: client.close(),
    ):
        yield make


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session
