"""One foreman node among several sharing a PostgreSQL queue: heartbeat, leases, and LISTEN/NOTIFY.

- **Heartbeat.** Every third of `FOREMAN_NODE_TIMEOUT` the node writes what its
  Ollama holds and runs to its row in `nodes`, renews the leases of its running
  jobs, and puts back the jobs of any node whose lease ran out (one node at a
  time does that). A node whose row has not been written for the timeout is
  dead to the others: they no longer leave its models to it.
- **Wake-ups.** A job written, put back or claimed for a swap sends a NOTIFY
  at commit; every other node's worker then looks at the queue.
- **Replies cross over.** A job records the nodes where a client waits for
  it (`jobs.watchers`: the node a synchronous request came to, and any node
  where someone follows its events later). The node that runs it sends each
  of its events (state, chunk, end) to them as a NOTIFY, in order, and they
  hand them to the waiting handlers as if their own worker had run the job;
  the end of every job goes to every node. An event too big for a payload
  (8000 bytes) goes through the `relay` table. A job's end is announced by
  the statement that records it (`transitions.finish`), after its earlier
  events (`outbox.Outbox.flushed`). A client that leaves cancels its job
  where it runs: the cancel travels the same way.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Coroutine
from contextlib import suppress
from typing import Any

import psycopg
import structlog

from foreman.errors import DatabaseAway
from foreman.job import JSON_TYPE, Ended, JobState
from foreman.storage.postgres.messages import PAYLOAD_LIMIT, decode, event_payload
from foreman.storage.postgres.outbox import Item, Outbox
from foreman.storage.postgres.schema import CHANNEL
from foreman.storage.postgres.storage import PostgresStorage
from foreman.storage.relay import Deliveries, LocalWorker

log = structlog.get_logger("foreman.node")

# The database away, as the raw pool says it (psycopg's errors) or as the storage calls do (DatabaseAway):
# either way the loop tries again, never dies (a dead listen loop leaves waiting clients unanswered).
_AWAY = (psycopg.Error, OSError, DatabaseAway)


class Node:
    """This process's membership in the cluster while its worker runs; `run()` until cancelled."""

    def __init__(
        self,
        store: PostgresStorage,
        outbox: Outbox,
        events: Deliveries,
        worker: LocalWorker,
        *,
        upstream: str,
        max_attempts: int,
        clock: Callable[[], float],
        reachable: Callable[[], bool | None] = lambda: None,
    ) -> None:
        self._store = store
        self._events = events
        self._worker = worker
        self._upstream = upstream
        self._max_attempts = max_attempts
        self._clock = clock
        self._reachable = reachable
        self._outbox = outbox  # filled by the relay (relay.PostgresRelay), sent here
        self._listening = asyncio.Event()
        self._alive: frozenset[str] = frozenset()
        self._beat_now = asyncio.Event()
        self._unsent: list[Item] = []  # the batch a lost connection did not send
        self._connected_since: float | None = None  # loop time of the first heartbeat since the database came
        self._listened = False
        self._told_reachable: bool | None = None  # what the last heartbeat said of this node's Ollama
        self.name = store.node

    @property
    def interval(self) -> float:
        return self._store.node_timeout / 3

    def beat_soon(self) -> None:
        """Write the heartbeat now, not at the next interval: this node's Ollama went away or came back."""
        self._beat_now.set()

    async def listening(self) -> None:
        """Return once the node hears the others' notifications."""
        await self._listening.wait()

    async def register(self) -> None:
        async with self._store.connection() as conn:
            await conn.execute(
                "INSERT INTO nodes (name, upstream) VALUES (%s, %s) ON CONFLICT (name) DO UPDATE"
                " SET upstream = excluded.upstream, started_at = now(), heartbeat_at = now(), left_at = NULL,"
                " resident = '{}', serving = NULL, running = '{}'",
                (self.name, self._upstream),
            )

    async def run(self) -> None:
        """Heartbeat, listen and send until cancelled."""
        tasks = [
            asyncio.create_task(self._forever(self._listen, "listen"), name="foreman-node-listen"),
            asyncio.create_task(self._forever(self._send, "send"), name="foreman-node-send"),
            asyncio.create_task(self._heartbeats(), name="foreman-node-heartbeat"),
        ]
        try:
            await asyncio.gather(*tasks)
        finally:
            self._outbox.stop()  # a finish waiting for its job's events to go out goes on without them
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def leave(self) -> None:
        """A clean stop: the others need not wait for this node's lease to run out."""
        with suppress(psycopg.Error):
            async with self._store.connection() as conn:
                await conn.execute(
                    "UPDATE nodes SET left_at = now(), running = '{}' WHERE name = %s",
                    (self.name,),
                )

    async def _forever(self, step: Callable[[], Coroutine[Any, Any, None]], what: str) -> None:
        """Run `step` again after the database goes away and comes back."""
        while True:
            try:
                await step()
            except _AWAY as exc:
                self._listening.clear()
                log.warning("node.db_lost", task=what, error=str(exc).strip())
                await asyncio.sleep(self.interval)

    async def _heartbeats(self) -> None:
        while True:
            pause = self.interval
            try:
                await self.beat()
                # Wake when the next lease of another node runs out, not up to a beat later.
                pause = min(pause, await self._next_expiry())
            except _AWAY as exc:
                self._connected_since = None
                log.warning("node.heartbeat_failed", error=str(exc).strip())
            with suppress(TimeoutError):
                await asyncio.wait_for(self._beat_now.wait(), pause)
            self._beat_now.clear()

    async def _next_expiry(self) -> float:
        async with self._store.connection() as conn:
            cursor = await conn.execute(
                "SELECT extract(epoch FROM min(lease_until) - now()) FROM jobs"
                " WHERE state IN ('loading', 'working') AND node <> %s",
                (self.name,),
            )
            row = await cursor.fetchone()
        if row is None or row[0] is None:
            return self.interval
        return max(float(row[0]) + 0.01, 0.01)

    async def beat(self) -> None:
        """Write this node's row and renew its leases; put back the jobs of dead nodes."""
        running = self._worker.running_jobs
        reachable = self._reachable()
        async with self._store.connection() as conn, conn.transaction():
            await conn.execute(
                "INSERT INTO nodes (name, upstream, reachable, resident, running) VALUES (%s, %s, %s, %s, %s)"
                " ON CONFLICT (name) DO UPDATE SET heartbeat_at = now(), left_at = NULL, upstream = excluded.upstream,"
                " reachable = excluded.reachable, resident = excluded.resident, running = excluded.running",
                (self.name, self._upstream, reachable, sorted(self._worker.resident), running),
            )
            if reachable != self._told_reachable and self._told_reachable is not None:
                # The others left this node's models to it, or may now: have them look again (at commit).
                payload = json.dumps({"n": self.name, "wake": ""})
                await conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, payload))
            # The jobs the worker runs, and those whose end is being written (the database was away):
            # taken for dead, one would run a second time. Only those: a row that no one here will
            # finish (its record given up) is not held for ever.
            await conn.execute(
                "UPDATE jobs SET lease_until = now() + make_interval(secs => %s)"
                " WHERE state IN ('loading', 'working') AND node = %s AND id = ANY(%s)",
                (self._store.node_timeout, self.name, self._worker.held_jobs),
            )
            cursor = await conn.execute(
                "SELECT name FROM nodes WHERE left_at IS NULL AND heartbeat_at > now() - make_interval(secs => %s)",
                (self._store.node_timeout,),
            )
            alive = frozenset(str(name) for (name,) in await cursor.fetchall())
        self._told_reachable = reachable
        now = asyncio.get_running_loop().time()
        if self._connected_since is None:
            self._connected_since = now
        # After the database was away, every lease looks run out: wait until each live node
        # had a full timeout to renew its own before taking any for dead.
        reaping = now - self._connected_since >= self._store.node_timeout
        for job_id, node in await self._store.reap(self._clock(), self._max_attempts) if reaping else []:
            log.warning("job.lease_expired", job_id=job_id, node=node, timeout_s=self._store.node_timeout)
        if alive != self._alive:
            if self._alive:
                log.info("node.members", alive=sorted(alive), gone=sorted(self._alive - alive))
            self._alive = alive
            # A node that left frees its models, one that came may take some: look again.
            self._worker.wake("")

    async def _listen(self) -> None:
        conn = await psycopg.AsyncConnection.connect(self._store.url, autocommit=True)
        async with conn:
            await conn.execute(f"LISTEN {CHANNEL}")
            self._listening.set()
            # Wake-ups sent while the node was not listening are lost: look at the queue now.
            self._worker.wake("")
            if self._listened:
                await self._catch_up()
            self._listened = True
            async for notice in conn.notifies():
                await self._heard(notice.payload)

    async def _catch_up(self) -> None:
        """The ends of jobs run elsewhere that were sent while this node was not listening, for who waits here."""
        running = set(self._worker.running_jobs)
        for job_id in self._events.watched():
            if job_id in running:
                continue
            job = await self._store.get(job_id)
            if job is None or job.state not in (JobState.DONE, JobState.FAILED, JobState.CANCELLED):
                continue
            if job.state is JobState.DONE:
                ended = Ended(JobState.DONE, job.status or 200, job.result or b"", JSON_TYPE, None)
            else:
                body = json.dumps({"error": job.error or ""}).encode()
                ended = Ended(job.state, job.status or 500, body, JSON_TYPE, job.error)
            self._events.deliver(job_id, ended)

    async def _heard(self, payload: str) -> None:
        message = json.loads(payload)
        if message.get("n") == self.name:
            return  # our own: the worker and the local handlers know already
        if "wake" in message:
            self._worker.wake(message["wake"])
        elif "watch" in message:
            if message["watch"] in self._store.watchers:
                self._store.watchers[message["watch"]].add(message["n"])
        elif "cancel" in message:
            if message.get("to") == self.name:
                await self._worker.cancel(message["cancel"])
        elif "relay" in message:
            async with self._store.connection() as conn:
                cursor = await conn.execute("SELECT data FROM relay WHERE id = %s", (message["relay"],))
                row = await cursor.fetchone()
            if row is not None:
                inner = json.loads(bytes(row[0]))
                self._events.deliver(inner["j"], decode(inner["e"]))
        elif "j" in message:
            self._events.deliver(message["j"], decode(message["e"]))

    async def _send(self) -> None:
        """Send the outbox in order, as many events a transaction as are waiting.

        A batch whose transaction failed (the database went away) is sent again first.
        """
        while True:
            if not self._unsent:
                self._unsent = await self._outbox.take()
            batch = self._unsent
            async with self._store.connection() as conn, conn.transaction():
                for job_id, event in batch:
                    if event is None:
                        await conn.execute(
                            "UPDATE jobs SET watchers = array_append(watchers, %s)"
                            " WHERE id = %s AND NOT %s = ANY(watchers)",
                            (self.name, job_id, self.name),
                        )
                        payload = json.dumps({"n": self.name, "watch": job_id})
                        await conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, payload))
                        continue
                    payload = event_payload(self.name, job_id, event)
                    if len(payload) > PAYLOAD_LIMIT:
                        cursor = await conn.execute(
                            "INSERT INTO relay (job_id, data) VALUES (%s, %s) RETURNING id",
                            (job_id, payload.encode()),
                        )
                        row = await cursor.fetchone()
                        assert row is not None
                        payload = json.dumps({"n": self.name, "relay": row[0]})
                    await conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, payload))
            self._unsent = []
            self._outbox.sent(batch)
