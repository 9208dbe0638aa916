"""Reaching the database: the pool, what a lost database becomes, and what every query module shares."""

from __future__ import annotations

import json
from collections.abc import Callable, Coroutine
from functools import wraps
from typing import Any, ParamSpec, TypeVar

import psycopg
from psycopg.rows import TupleRow
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from foreman.errors import DatabaseAway, StoreError, StoreUnreachable
from foreman.setting_values import redact_url
from foreman.storage.postgres.node_lock import hold_node_name
from foreman.storage.postgres.pool import ReconnectingPool
from foreman.storage.postgres.schema import CHANNEL, prepare

Connection = psycopg.AsyncConnection[TupleRow]
Pool = AsyncConnectionPool[Connection]

RUNNING = "state IN ('loading', 'working')"
ENDED = "state IN ('done', 'failed', 'cancelled')"

P = ParamSpec("P")
T = TypeVar("T")


async def connect(url: str, node: str, pool_size: int) -> tuple[Pool, Connection]:
    """A pool of connections to a database whose tables are foreman's, and the connection holding `node`'s name.

    StoreError if the database cannot be used, or another process runs as `node` (`node_lock`).
    """
    where = redact_url(url)
    # One plain connection first: libpq's own words say what is wrong (refused, password, no database).
    try:
        first = await psycopg.AsyncConnection.connect(url, autocommit=True)
    except psycopg.Error as exc:
        detail = " ".join(line.strip() for line in str(exc).splitlines()) or type(exc).__name__
        raise StoreUnreachable(f"cannot connect to {where}: {detail}") from exc
    async with first:
        await prepare(first, where)
    name = await hold_node_name(url, node, where)  # before any job is read
    pool: Pool = ReconnectingPool(
        url,
        min_size=1,
        max_size=pool_size,
        kwargs={"autocommit": True},
        open=False,
        name="foreman",
        # A request waits this long for a connection before it gets its 503.
        timeout=3.0,
    )
    try:
        await pool.open(wait=True, timeout=10.0)
    except PoolTimeout as exc:
        await pool.close()
        await name.close()
        raise StoreUnreachable(f"cannot connect to {where}") from exc
    return pool, name


def unavailable(
    method: Callable[P, Coroutine[Any, Any, T]],
) -> Callable[P, Coroutine[Any, Any, T]]:
    """A database that cannot be reached is a 503 for the client (with Retry-After), not a stray 500."""

    @wraps(method)
    async def call(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await method(*args, **kwargs)
        except (psycopg.OperationalError, psycopg.errors.AdminShutdown) as exc:
            raise DatabaseAway(f"foreman cannot reach its database: {exc}".strip()) from exc
        except PoolTimeout as exc:
            raise DatabaseAway(f"foreman cannot reach its database: {exc}".strip()) from exc

    return call


async def notify(conn: Connection, message: dict[str, Any]) -> None:
    """Send `message` to every node (at commit, inside a transaction); see foreman/storage/postgres/node.py."""
    await conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, json.dumps(message)))


async def wake(conn: Connection, node: str, model_key: str) -> None:
    """Tell every node's worker (at commit) that the queue changed."""
    await notify(conn, {"n": node, "wake": model_key})


async def one(cursor: psycopg.AsyncCursor[TupleRow]) -> TupleRow:
    row = await cursor.fetchone()
    if row is None:
        raise StoreError("the database answered no row where one was due")
    return row
