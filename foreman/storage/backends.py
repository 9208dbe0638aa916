"""The backend FOREMAN_DB names, opened: its storage, its batch store, and the relay between the nodes that share it.

A path is a SQLite file this node uses alone (the relay `ALONE`); a
postgresql:// URL is a queue shared with every node given the same URL, and
its relay (`postgres/relay.py`) carries what they tell each other. The rest
of foreman speaks to the two interfaces and never asks which backend it has.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import NamedTuple

from foreman.config import Config
from foreman.errors import StoreError
from foreman.storage import Storage
from foreman.storage.batches import BatchStore
from foreman.storage.relay import ALONE, Relay
from foreman.storage.sqlite.batches import SqliteBatchStore
from foreman.storage.sqlite.storage import SqliteStorage


class Backend(NamedTuple):
    storage: Storage
    relay: Relay
    batches: BatchStore  # the Files and Batch APIs' tables and the webhook outbox, in the same database


@asynccontextmanager
async def opened(config: Config, *, clock: Callable[[], float]) -> AsyncIterator[Backend]:
    """The storage, relay and batch store of FOREMAN_DB for the life of the block; StoreError if it cannot be used.

    `clock` dates what the relay does to jobs on its own (putting back those
    of a node that stopped answering).
    """
    backend = await _open_shared(config, clock) if config.db_url is not None else await _open_file(config)
    try:
        yield backend
    finally:
        try:
            await backend.batches.close()
        finally:
            await backend.storage.close()


async def _open_file(config: Config) -> Backend:
    storage = await SqliteStorage.open(config.db_file, sync=config.sync, max_queue=config.max_queue)
    try:
        batches = await SqliteBatchStore.open(config.db_file)
    except BaseException:
        await storage.close()
        raise
    return Backend(storage, ALONE, batches)


async def _open_shared(config: Config, clock: Callable[[], float]) -> Backend:
    try:
        from foreman.storage.postgres.batches import PostgresBatchStore
        from foreman.storage.postgres.relay import PostgresRelay
        from foreman.storage.postgres.storage import PostgresStorage
    except ImportError as exc:
        raise StoreError(
            f"FOREMAN_DB is a PostgreSQL URL, but its driver is missing ({exc}): pip install 'foreman[postgres]'"
        ) from exc
    storage = await PostgresStorage.open(
        config.db_url or "",
        node=node_name(config),
        node_timeout=config.node_timeout,
        max_queue=config.max_queue,
    )
    relay = PostgresRelay(storage, upstream=config.upstream, max_attempts=config.max_attempts, clock=clock)
    return Backend(storage, relay, PostgresBatchStore(storage))


def node_name(config: Config) -> str:
    """FOREMAN_NODE, or this host's name and foreman's port."""
    return config.node or f"{socket.gethostname()}:{config.port}"
