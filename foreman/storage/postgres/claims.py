"""What waits, and taking it: the queues the policy sees (with the other nodes' models) and the claims.

A claim is one transaction: the policy chooses from what waits (and from
what the other live nodes hold, `ModelQueue.held_elsewhere`), then the
oldest job of its choice is taken with `FOR UPDATE SKIP LOCKED`, so two
nodes never take one job and neither waits on the other's row. Swap
decisions take turns (a transaction-scoped advisory lock): the second node
to decide sees the first one's load and leaves that model to it. A claimed
job carries its node and a lease in the database's own time.

Each taken job comes with the other nodes where a client waits for its
events (`jobs.watchers`), for the relay to send them there.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from foreman.job import Job, JobState, Priority
from foreman.scheduling.policy import Held, ModelQueue
from foreman.storage import Chooser, Claim
from foreman.storage.postgres.connection import RUNNING, Connection, one, wake
from foreman.storage.postgres.schema import LOCK_SWAP
from foreman.storage.rows import JOB, job_from_row

# Claims retried when another node took the chosen job between the look and the take.
_CLAIM_TRIES = 8

Watchers = set[str]


async def queues(conn: Connection, me: str, node_timeout: float) -> list[ModelQueue]:
    """What waits, per (model key, class), with how many other live nodes hold each model."""
    # Jobs held back after a failure (not_before) are listed apart: when they may run is the policy's call.
    cursor = await conn.execute(
        "SELECT model_key, priority, count(*) FILTER (WHERE not_before IS NULL),"
        " min(id) FILTER (WHERE not_before IS NULL),"
        " (array_agg(created_at ORDER BY id) FILTER (WHERE not_before IS NULL))[1],"
        " count(*) FILTER (WHERE orphaned),"
        " array_agg(ARRAY[id, created_at::text, not_before::text] ORDER BY id) FILTER (WHERE not_before IS NOT NULL)"
        " FROM jobs WHERE state = 'queued' GROUP BY model_key, priority"
    )
    rows = await cursor.fetchall()
    if not rows:
        return []
    elsewhere = await _held_elsewhere(conn, me, node_timeout)
    found = []
    for key, priority, free, oldest, oldest_at, orphans, held in rows:
        back = tuple(Held(i, float(at), float(nb)) for i, at, nb in held or ())
        found.append(
            ModelQueue(
                key,
                Priority(priority),
                int(free),
                oldest or "",
                oldest_at or 0.0,
                back,
                held_elsewhere=elsewhere.get(key, 0),
                orphaned=int(orphans),
            )
        )
    return found


async def _held_elsewhere(conn: Connection, me: str, node_timeout: float) -> dict[str, int]:
    """Per model key, how many other live nodes hold it, load it or run it.

    A node whose Ollama does not answer holds nothing: its models' work is for whoever can run it.
    """
    cursor = await conn.execute(
        "SELECT key, count(DISTINCT name) FROM ("
        "  SELECT name, unnest(resident || serving) AS key FROM nodes"
        "   WHERE name <> %(me)s AND left_at IS NULL AND reachable IS NOT FALSE"
        "   AND heartbeat_at > now() - make_interval(secs => %(timeout)s)"
        f"  UNION ALL SELECT node, model_key FROM jobs WHERE {RUNNING} AND node <> %(me)s"
        "   AND lease_until > now()"
        ") AS held WHERE key IS NOT NULL GROUP BY key",
        {"me": me, "timeout": node_timeout},
    )
    return {str(key): int(count) for key, count in await cursor.fetchall()}


async def claim(
    conn: Connection, choose: Chooser, now: float, me: str, node_timeout: float
) -> tuple[Claim, Watchers] | None:
    """Let `choose` pick from what waits, and take the job of its choice for node `me` (see `Storage.claim`)."""
    for _ in range(_CLAIM_TRIES):
        async with conn.transaction():
            waiting = await queues(conn, me, node_timeout)
            decision = choose(waiting)
            if decision is None:
                return None
            if decision.swap:
                # Decide again in turn with the other nodes' swaps, seeing theirs.
                await conn.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK_SWAP,))
                waiting = await queues(conn, me, node_timeout)
                decision = choose(waiting)
                if decision is None:
                    return None
            if not any((q.model_key, q.priority) == (decision.model_key, decision.priority) for q in waiting):
                raise RuntimeError(
                    f"no queued {decision.priority} job for {decision.model_key!r} although the policy chose it"
                )
            state = JobState.LOADING if decision.swap else JobState.WORKING
            # The job the decision names (a held one whose time came), else its group's oldest free one.
            which = (
                "id = %(id)s AND state = 'queued'"
                if decision.job_id is not None
                else "state = 'queued' AND model_key = %(key)s AND priority = %(priority)s"
                " AND not_before IS NULL ORDER BY id"
            )
            cursor = await conn.execute(
                f"UPDATE jobs SET state = %(state)s, started_at = %(now)s, node = %(me)s,"
                f" lease_until = now() + make_interval(secs => %(timeout)s), orphaned = false,"
                f" not_before = NULL"
                f" WHERE id = (SELECT id FROM jobs WHERE {which} LIMIT 1 FOR UPDATE SKIP LOCKED)"
                f" RETURNING {JOB}, watchers",
                {
                    "state": state.value,
                    "now": now,
                    "me": me,
                    "timeout": node_timeout,
                    "key": decision.model_key,
                    "priority": decision.priority.value,
                    "id": decision.job_id,
                },
            )
            row = await cursor.fetchone()
            if row is None:
                continue  # another node took it between the look and the take: look again
            await conn.execute("UPDATE nodes SET serving = %s WHERE name = %s", (decision.model_key, me))
            if decision.swap:
                # The others may now leave this model to us, or take what we left.
                await wake(conn, me, "")
            cursor = await conn.execute(
                "SELECT count(*) FROM jobs WHERE state = 'queued' AND model_key = %s",
                (decision.model_key,),
            )
            (left,) = await one(cursor)
            return Claim(job_from_row(row[:-1]), decision, int(left)), set(row[-1]) - {me}
    return None


async def claim_companions(
    conn: Connection,
    model_key: str,
    endpoints: Sequence[str],
    pick: Callable[[list[Job]], list[str]],
    now: float,
    scan: int,
    me: str,
    node_timeout: float,
) -> list[tuple[Job, Watchers]]:
    """Take queued jobs of `model_key` to run beside a running one (see `Storage.claim_companions`)."""
    async with conn.transaction():
        # Locked as they are read, skipping what another node is taking: pick sees only what it may take.
        cursor = await conn.execute(
            f"SELECT {JOB} FROM jobs WHERE state = 'queued' AND model_key = %s AND endpoint = ANY(%s)"
            f" AND (not_before IS NULL OR not_before <= %s) ORDER BY priority = 'batch', id LIMIT %s"
            f" FOR UPDATE SKIP LOCKED",
            (model_key, list(endpoints), now, scan),
        )
        chosen = set(pick([job_from_row(row) for row in await cursor.fetchall()]))
        if not chosen:
            return []
        cursor = await conn.execute(
            f"UPDATE jobs SET state = 'working', started_at = %s, not_before = NULL, node = %s,"
            f" lease_until = now() + make_interval(secs => %s), orphaned = false"
            f" WHERE state = 'queued' AND id = ANY(%s) RETURNING {JOB}, watchers",
            (now, me, node_timeout, sorted(chosen)),
        )
        taken = [(job_from_row(row[:-1]), set(row[-1]) - {me}) for row in await cursor.fetchall()]
        return sorted(taken, key=lambda pair: pair[0].id)
