"""Old finished jobs are deleted in the background, so the database does not grow without bound."""

from __future__ import annotations

from collections.abc import Callable

import structlog

from foreman.errors import Unavailable
from foreman.retry import Sleep
from foreman.storage import Storage

log = structlog.get_logger("foreman.retention")

# Deleting in batches keeps each write transaction short, so intake never
# waits long behind a prune.
BATCH = 1000


async def prune_once(store: Storage, now: float, retention: float) -> int:
    """Delete every job that ended more than `retention` seconds before `now`; returns how many."""
    total = 0
    while (deleted := await store.prune(now - retention, BATCH)) > 0:
        total += deleted
    if total:
        log.info("jobs.pruned", count=total, older_than_s=retention)
    return total


async def prune_forever(store: Storage, retention: float, clock: Callable[[], float], sleep: Sleep) -> None:
    """Prune now, then every tenth of the retention period (at least hourly).

    A database that fails meanwhile (a shared one gone for a while) costs one
    round, not the pruning: the next round tries again.
    """
    interval = min(retention / 10, 3600.0)
    while True:
        try:
            await prune_once(store, clock(), retention)
        except Unavailable as exc:
            log.warning("jobs.prune_failed", error=exc.message)
        await sleep(interval)
