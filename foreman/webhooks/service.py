"""`Webhooks`: events into the outbox, and the loop that delivers them.

An event is written to the outbox (`webhook_outbox`) in the same transaction
as what it tells of: a batch's end (`BatchStore.finish`), or a watched job's
end, found by the loop and moved to the outbox in one transaction
(`BatchStore.ended_watched_jobs`). So a crash loses no event, and none is
made twice.

Delivery leases each due delivery to this process for a while (`LEASE_S`),
so with a shared PostgreSQL queue each attempt is made by one node. A 2xx
ends it; anything else, or no answer within `TIMEOUT_S`, schedules the next
attempt with backoff (FOREMAN_WEBHOOK_BACKOFF, doubling up to `MAX_DELAY_S`),
under the same `webhook-id`, until a day has passed since the event: then it
is given up and counted as failed. Every attempt is logged with its result.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp
import structlog
from ulid import ULID

from foreman.job import JobState
from foreman.storage.batches import BatchStore, Delivery
from foreman.webhooks import signing

log = structlog.get_logger("foreman.webhooks")

TIMEOUT_S = 10.0
LEASE_S = 60.0
MAX_DELAY_S = 3600.0
GIVE_UP_S = 24 * 3600.0
TICK_S = 1.0
BATCH_LIMIT = 20  # deliveries taken at a time

_JOB_EVENTS = {
    JobState.DONE: "job.completed",
    JobState.FAILED: "job.failed",
    JobState.CANCELLED: "job.cancelled",
}


@dataclass(frozen=True, slots=True)
class Endpoint:
    name: str
    url: str


def event(kind: str, object_id: str, now: float) -> tuple[str, bytes]:
    """A new event in OpenAI's webhook shape: its id and its body."""
    event_id = f"evt_{ULID()}"
    body = {
        "id": event_id,
        "object": "event",
        "type": kind,
        "created_at": int(now),
        "data": {"id": object_id},
    }
    return event_id, json.dumps(body, separators=(",", ":")).encode()


class Webhooks:
    """The configured endpoints, their outbox, and its delivery."""

    def __init__(
        self,
        store: BatchStore,
        endpoints: tuple[tuple[str, str], ...],
        secret: str,
        *,
        backoff: float,
        clock: Callable[[], float] = time.time,
        tick: float = TICK_S,
    ) -> None:
        self._store = store
        self.endpoints = {name: Endpoint(name, url) for name, url in endpoints}
        self._key = signing.key(secret)
        self._backoff = backoff
        self._clock = clock
        self._tick = tick
        self._owner = f"{socket.gethostname()}:{os.getpid()}:{ULID()}"
        self._nudge = asyncio.Event()
        self.counts: dict[str, int] = {"pending": 0, "failed": 0}

    # Making events

    def announce(self, kind: str, batch_id: str, now: float) -> list[Delivery]:
        """A batch event for every endpoint (`Batches` writes them with the batch's end)."""
        event_id, body = event(kind, batch_id, now)
        self._nudge.set()
        return [Delivery(event_id, name, body, 0, now, now) for name in self.endpoints]

    def job_event(self, job_id: str, endpoint: str, state: JobState) -> Delivery:
        now = self._clock()
        event_id, body = event(_JOB_EVENTS[state], job_id, now)
        return Delivery(event_id, endpoint, body, 0, now, now)

    async def watch(self, job_id: str, endpoint: str) -> None:
        """Send `endpoint` (a configured name) an event when the job ends."""
        await self._store.watch_job(job_id, endpoint)

    # Delivering

    async def run(self) -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=TIMEOUT_S)) as session:
            while True:
                try:
                    await self.step(session)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("webhook.step_failed")
                self._nudge.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._nudge.wait(), self._tick)

    async def step(self, session: aiohttp.ClientSession) -> None:
        await self._store.ended_watched_jobs(self.job_event, 500)
        due = await self._store.due_deliveries(self._clock(), LEASE_S, self._owner, BATCH_LIMIT)
        await asyncio.gather(*(self._attempt(session, delivery) for delivery in due))
        counts = await self._store.delivery_counts()
        self.counts = {"pending": counts.get("pending", 0), "failed": counts.get("failed", 0)}
        if len(due) == BATCH_LIMIT:
            self._nudge.set()  # more may be due

    async def _attempt(self, session: aiohttp.ClientSession, delivery: Delivery) -> None:
        attempt = delivery.attempts + 1
        bound = log.bind(webhook_id=delivery.id, endpoint=delivery.endpoint, attempt=attempt)
        endpoint = self.endpoints.get(delivery.endpoint)
        if endpoint is None:
            await self._store.give_up(delivery, "the endpoint is no longer configured")
            bound.error("webhook.gave_up", error="the endpoint is no longer configured")
            return
        now = self._clock()
        # Signed with the wall clock, whatever clock schedules foreman: the receiver checks it against its own.
        headers = signing.headers(self._key, delivery.id, int(time.time()), delivery.body)
        try:
            async with session.post(endpoint.url, data=delivery.body, headers=headers) as response:
                status = response.status
                await response.read()
            error = None if 200 <= status < 300 else f"answered {status}"
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            status, error = (
                None,
                f"no answer ({type(exc).__name__}: {exc})"
                if str(exc)
                else f"no answer ({type(exc).__name__})",
            )
        if error is None:
            await self._store.delivered(delivery)
            bound.info("webhook.delivered", status=status)
            return
        if now - delivery.created_at >= GIVE_UP_S:
            await self._store.give_up(delivery, error)
            bound.error("webhook.gave_up", status=status, error=error, age_s=round(now - delivery.created_at))
            return
        delay = min(self._backoff * 2 ** (attempt - 1), MAX_DELAY_S)
        await self._store.retry_later(delivery, now + delay, error)
        bound.warning("webhook.retry", status=status, error=error, retry_in_s=round(delay, 3))
