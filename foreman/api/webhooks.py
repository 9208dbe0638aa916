"""Webhooks in the app: the delivery loop's context, `X-Foreman-Webhook` on async jobs, and the counts.

An async job asks for an event at its end by naming one of the configured
endpoints (`X-Foreman-Webhook: NAME`); a URL from a request is never called.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web
from aiohttp.typedefs import Handler
from prometheus_client import Gauge

from foreman.api.batches import BATCHES
from foreman.api.keys import CLOCK, CONFIG, METRICS
from foreman.background import running
from foreman.errors import BadRequest
from foreman.job import QUEUED_ENDPOINTS
from foreman.webhooks.service import Webhooks

WEBHOOK_HEADER = "X-Foreman-Webhook"
WEBHOOKS = web.AppKey("webhooks", Webhooks)
_QUEUED = frozenset(QUEUED_ENDPOINTS)


async def ctx(app: web.Application) -> AsyncIterator[None]:
    """With FOREMAN_WEBHOOK_URL: the outbox's delivery for the life of the app, and batch events."""
    config = app[CONFIG]
    if not config.webhook_url or config.webhook_secret is None:
        yield
        return
    webhooks = Webhooks(
        app[BATCHES].batches,
        config.webhook_url,
        config.webhook_secret,
        backoff=config.webhook_backoff,
        clock=app[CLOCK],
    )
    app[WEBHOOKS] = webhooks
    app[BATCHES].announce = webhooks.announce
    registry = app[METRICS].registry
    gauge = Gauge(
        "foreman_webhook_deliveries",
        "Webhook deliveries not delivered, by state.",
        ["state"],
        registry=registry,
    )
    for state in ("pending", "failed"):
        gauge.labels(state).set_function(lambda state=state: webhooks.counts[state])  # type: ignore[misc]
    try:
        async with running(webhooks.run(), "foreman-webhooks"):
            yield
    finally:
        registry.unregister(gauge)


@web.middleware
async def job_webhooks(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Record `X-Foreman-Webhook` of an async job once it is committed, before its 202 leaves."""
    name = request.headers.get(WEBHOOK_HEADER)
    if name is None or request.method != "POST" or request.path not in _QUEUED:
        return await handler(request)
    webhooks = request.app.get(WEBHOOKS)
    if webhooks is None:
        raise BadRequest(f"{WEBHOOK_HEADER} names an endpoint, but this foreman has no FOREMAN_WEBHOOK_URL")
    if name not in webhooks.endpoints:
        raise BadRequest(
            f"{WEBHOOK_HEADER} {name!r} is not one of the configured endpoints ({', '.join(webhooks.endpoints)})"
        )
    if "respond-async" not in ",".join(request.headers.getall("Prefer", ())).lower():
        raise BadRequest(f"{WEBHOOK_HEADER} goes with async jobs: add Prefer: respond-async")
    response = await handler(request)
    job_id = response.headers.get("X-Foreman-Job")
    if job_id is not None and response.status in (200, 202):
        await webhooks.watch(job_id, name)
    return response


def status_view(app: web.Application) -> dict[str, Any] | None:
    """/status's `webhooks`: the endpoints' names and the deliveries pending and failed; None without webhooks."""
    webhooks = app.get(WEBHOOKS)
    if webhooks is None:
        return None
    return {"endpoints": sorted(webhooks.endpoints), **webhooks.counts}
