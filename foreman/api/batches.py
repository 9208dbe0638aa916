"""OpenAI's Batch API: `/v1/batches` create, get, list (after, limit) and cancel.

The work is `foreman.batches.service.Batches`'; these handlers read and check requests.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from foreman.api.keys import BATCH_STORE, CLOCK, MODEL_TAGS, QUEUE, ROUTES, STORAGE
from foreman.background import running
from foreman.batches.service import Batches, batch_view
from foreman.errors import BadRequest, NotFound

BATCHES = web.AppKey("batches", Batches)
UNFINISHED_UPLOAD_S = 3600.0


async def create(request: web.Request) -> web.Response:
    body = await _json(request)
    for field in ("input_file_id", "endpoint", "completion_window"):
        if not isinstance(body.get(field), str) or not body[field]:
            raise BadRequest(f"Missing required parameter: '{field}'.")
    metadata = body.get("metadata")
    if metadata is not None and not (
        isinstance(metadata, dict)
        and len(metadata) <= 16
        and all(
            isinstance(k, str) and len(k) <= 64 and isinstance(v, str) and len(v) <= 512
            for k, v in metadata.items()
        )
    ):
        raise BadRequest(
            "Invalid 'metadata': at most 16 string keys (64 characters) with string values (512)."
        )
    batch = await request.app[BATCHES].create(
        body["input_file_id"], body["endpoint"], body["completion_window"], metadata or None
    )
    return web.json_response(batch_view(batch))


async def get(request: web.Request) -> web.Response:
    batch_id = request.match_info["id"]
    batch = await request.app[BATCHES].batches.batch(batch_id)
    if batch is None:
        raise NotFound(f"No such batch: {batch_id}")
    return web.json_response(batch_view(batch))


async def list_batches(request: web.Request) -> web.Response:
    limit = int_param(request.query.get("limit"), 20, 1, 100, "limit")
    found = await request.app[BATCHES].batches.batches(
        after=request.query.get("after") or None, limit=limit + 1
    )
    return web.json_response(page([batch_view(b) for b in found], limit))


async def cancel(request: web.Request) -> web.Response:
    batch = await request.app[BATCHES].cancel(request.match_info["id"])
    return web.json_response(batch_view(batch))


async def _json(request: web.Request) -> dict[str, Any]:
    try:
        body = json.loads(await request.read())
    except (ValueError, RecursionError) as exc:
        raise BadRequest(f"invalid JSON in request body: {exc}") from exc
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    return body


async def store_ctx(app: web.Application) -> AsyncIterator[None]:
    """The node's `Batches` over the batch store opened with the job store (before the worker starts)."""
    store = app[BATCH_STORE]
    # An upload a crash cut short is never listed; an hour on, no node is still writing it.
    await store.drop_unfinished_uploads(app[CLOCK]() - UNFINISHED_UPLOAD_S)
    app[BATCHES] = Batches(
        store=app[STORAGE],
        batches=store,
        tags=app[MODEL_TAGS],
        routes=app[ROUTES],
        clock=app[CLOCK],
    )
    yield


async def run_ctx(app: web.Application) -> AsyncIterator[None]:
    """Batches advancing while the worker runs."""
    app[BATCHES].front = app[QUEUE]
    async with running(app[BATCHES].run(), "foreman-batches"):
        yield


def page(data: list[dict[str, Any]], limit: int) -> dict[str, Any]:
    """OpenAI's list object, from up to `limit + 1` items (one more says there are more)."""
    shown = data[:limit]
    return {
        "object": "list",
        "data": shown,
        "first_id": shown[0]["id"] if shown else None,
        "last_id": shown[-1]["id"] if shown else None,
        "has_more": len(data) > limit,
    }


def int_param(text: str | None, default: int, low: int, high: int, name: str) -> int:
    if text is None or text == "":
        return default
    try:
        value = int(text)
    except ValueError:
        raise BadRequest(f"Invalid value for '{name}': {text!r} is not an integer.") from None
    if not low <= value <= high:
        raise BadRequest(f"Invalid value for '{name}': it must be between {low} and {high}.")
    return value


def setup(app: web.Application) -> None:
    app.router.add_post("/v1/batches", create)
    app.router.add_get("/v1/batches", list_batches, allow_head=False)
    app.router.add_get("/v1/batches/{id}", get, allow_head=False)
    app.router.add_post("/v1/batches/{id}/cancel", cancel)
