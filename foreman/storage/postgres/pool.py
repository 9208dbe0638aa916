"""The connection pool, reconnecting within a second of the database coming back.

psycopg_pool retries a lost connection after 1, 2, 4, 8, 16... seconds: after a 20 s
outage a node would wait up to 16 s more, and the other node, whose pool came back first,
would take its running jobs for dead (their leases unrenewed) and run them a second time.
Nodes must come back together, so the wait between two attempts is capped.
"""

from __future__ import annotations

import psycopg
from psycopg.rows import TupleRow
from psycopg_pool import AsyncConnectionPool
from psycopg_pool.base import AttemptWithBackoff

# Between two attempts to reach a database that went away: a cheap connect attempt a second.
RECONNECT_EVERY_S = 1.0


class _CappedBackoff(AttemptWithBackoff):
    def update_delay(self, now: float) -> None:
        super().update_delay(now)
        self.delay = min(self.delay, RECONNECT_EVERY_S)


class ReconnectingPool(AsyncConnectionPool[psycopg.AsyncConnection[TupleRow]]):
    """An AsyncConnectionPool whose reconnection attempts come at most `RECONNECT_EVERY_S` apart."""

    async def _add_connection(self, attempt: AttemptWithBackoff | None, growing: bool = False) -> None:
        await super()._add_connection(attempt or _CappedBackoff(timeout=self.reconnect_timeout), growing)
