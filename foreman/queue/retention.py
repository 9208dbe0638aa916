"""What ended long ago is deleted in the background, so the database does not grow without bound.

One setting, FOREMAN_RETENTION, and one loop cover the jobs that ended, the
batches that ended (their lines, their input, output and error files) and the
webhook deliveries that were delivered or given up. Files no batch used, such
as an upload still waiting for its batch, are the user's: kept until deleted.
"""

from __future__ import annotations

from collections.abc import Callable

import structlog

from foreman.errors import Unavailable
from foreman.retry import Sleep
from foreman.storage import Storage
from foreman.storage.batches import BatchStore

log = structlog.get_logger("foreman.retention")

# Deleting in batches keeps each write transaction short, so intake never
# waits long behind a prune.
BATCH = 1000
# Batches ended per transaction: a few rows each (their lines went when they ended).
BATCHES_STEP = 100
# File parts (a MB each) deleted per transaction: a 200 MB output file goes in
# 200 commits of a few milliseconds, not in one that holds the write lock for a second.
PARTS_STEP = 1


async def prune_once(store: Storage, batches: BatchStore, now: float, retention: float) -> int:
    """Delete every job, batch and delivery that ended more than `retention` seconds before `now`; how many jobs."""
    cutoff = now - retention
    total = 0
    while (deleted := await store.prune(cutoff, BATCH)) > 0:
        total += deleted
    if total:
        log.info("jobs.pruned", count=total, older_than_s=retention)
    await _prune_batches(batches, cutoff, retention)
    return total


async def _prune_batches(batches: BatchStore, cutoff: float, retention: float) -> None:
    pruned = files = deliveries = 0
    while (ended := await batches.prune_batches(cutoff, BATCHES_STEP))[0] > 0:
        pruned += ended[0]
        for file_id in ended[1]:
            dropped = False
            while await batches.drop_file_parts(file_id, PARTS_STEP):
                dropped = True
            files += dropped
    while (deleted := await batches.prune_deliveries(cutoff, BATCH)) > 0:
        deliveries += deleted
    if pruned or files or deliveries:
        log.info("batches.pruned", count=pruned, files=files, deliveries=deliveries, older_than_s=retention)


async def prune_forever(
    store: Storage, batches: BatchStore, retention: float, clock: Callable[[], float], sleep: Sleep
) -> None:
    """Prune now, then every tenth of the retention period (at least hourly).

    A database that fails meanwhile (a shared one gone for a while) costs one
    round, not the pruning: the next round tries again.
    """
    interval = min(retention / 10, 3600.0)
    while True:
        try:
            await prune_once(store, batches, clock(), retention)
        except Unavailable as exc:
            log.warning("jobs.prune_failed", error=exc.message)
        await sleep(interval)
