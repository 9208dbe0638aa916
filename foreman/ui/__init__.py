"""The live page: `GET /ui` and its files, and `GET /events`, the stream of queue transitions it draws.

The files hold no data, so they are served without the token; everything the
page shows comes from the API, with the same Host, Origin and token rules as
any client. The page runs no inline script or style: the
Content-Security-Policy allows only this origin's files and API.
"""

from __future__ import annotations

import asyncio
import json
from contextlib import suppress
from importlib import resources
from typing import Any

from aiohttp import web

from foreman.api.keys import CLOCK, PAGE_FEED
from foreman.durations import iso
from foreman.errors import NotFound
from foreman.queue.page_feed import FeedEvent

CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self';"
    " base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_PAGE_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cache-Control": "no-cache",
}
_TYPES = {
    "html": "text/html; charset=utf-8",
    "js": "text/javascript; charset=utf-8",
    "css": "text/css; charset=utf-8",
    "svg": "image/svg+xml",
}
_FILES = ("index.html", "app.js", "batches.js", "style.css", "favicon.svg")
# The page is at /ui; its files beside it, under /ui/.
PUBLIC_PATHS = frozenset({"/ui", "/ui/", *(f"/ui/{name}" for name in _FILES if name != "index.html")})

_SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
# A comment line this often keeps idle proxies from closing the stream, and finds watchers that left.
KEEPALIVE_S = 15.0


def setup(app: web.Application) -> None:
    """Serve the page and the queue's event stream on `app`."""
    static = resources.files(__name__).joinpath("static")
    # Read once; each request gets a response of its own (aiohttp responses are one-shot).
    files = {
        name: (
            static.joinpath(name).read_bytes(),
            {**_PAGE_HEADERS, "Content-Type": _TYPES[name.rsplit(".", 1)[1]]},
        )
        for name in _FILES
    }

    async def page(request: web.Request) -> web.Response:
        name = request.match_info.get("name") or "index.html"
        if name not in files:
            raise NotFound(f"no such file: /ui/{name}")
        body, headers = files[name]
        return web.Response(body=body, headers=headers)

    app.router.add_get("/ui", page)
    app.router.add_get("/ui/{name:.*}", page)
    app.router.add_get("/events", queue_events)


async def queue_events(request: web.Request) -> web.StreamResponse:
    """Server-Sent Events: `hello` with the last minutes' transitions, then each `job` and `swap` as it happens."""
    app = request.app
    with app[PAGE_FEED].watch() as inbox:
        now = app[CLOCK]()
        history = [_event_view(event) for event in app[PAGE_FEED].history(now)]
        response = web.StreamResponse(headers=_SSE_HEADERS)
        await response.prepare(request)
        with suppress(ConnectionResetError):  # the watcher left
            await _send(response, "hello", {"now": iso(now), "history": history})
            while (event := await _next(inbox, response)) is not None:
                await _send(response, event.kind, event.data)
    return response


async def _next(inbox: asyncio.Queue[FeedEvent | None], response: web.StreamResponse) -> FeedEvent | None:
    """The next transition; a comment line every KEEPALIVE_S while there is none."""
    while True:
        try:
            return await asyncio.wait_for(inbox.get(), KEEPALIVE_S)
        except TimeoutError:
            await response.write(b": keep-alive\n\n")


def _event_view(event: FeedEvent) -> dict[str, Any]:
    return {"event": event.kind, "data": event.data}


async def _send(response: web.StreamResponse, event: str, data: dict[str, Any]) -> None:
    await response.write(f"event: {event}\ndata: {json.dumps(data)}\n\n".encode())
