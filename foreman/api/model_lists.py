"""Ollama's model lists with foreman's aliases and routes beside the real models.

Model pickers in chat UIs and editor plugins offer what `/api/tags` or
`/v1/models` list, so each alias and route is listed there with the details of
its first model; `/api/show` and `/v1/models/{model}` answer for that model.
Without a routes file, these paths pass through untouched.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import hdrs, web

from foreman.api.keys import ROUTES, UPSTREAM
from foreman.api.passthrough import forwarded_headers, passthrough
from foreman.ollama.names import normalise_model

# Headers of Ollama's answer that no longer describe a body foreman rewrote.
_BODY_HEADERS = frozenset({"content-length", "content-encoding", "transfer-encoding", "connection"})


async def tags(request: web.Request) -> web.StreamResponse:
    """`GET /api/tags`: Ollama's models, then every alias and route."""
    routes = request.app[ROUTES].current
    if not routes:
        return await passthrough(request)
    status, headers, answer = await _ask(request, request.method, "/api/tags")
    if status != 200 or not isinstance(answer, dict):
        return _reply(status, headers, answer)
    models: list[dict[str, Any]] = answer.get("models") or []
    by_name = {normalise_model(str(m.get("name", ""))): m for m in models}
    for name, first in routes.names():
        entry = dict(by_name.get(first) or {"modified_at": "", "size": 0, "digest": "", "details": {}})
        models.append({**entry, "name": name, "model": name})
    return _reply(status, headers, {**answer, "models": models})


async def show(request: web.Request) -> web.StreamResponse:
    """`POST /api/show`: for an alias or a route, what Ollama shows for its first model."""
    routes = request.app[ROUTES].current
    if not routes:
        return await passthrough(request)
    raw = await request.read()
    try:
        body = json.loads(raw)
    except ValueError:
        body = None
    if isinstance(body, dict):
        for field in ("model", "name"):
            first = routes.first_model(body[field]) if isinstance(body.get(field), str) else None
            if first is not None:
                body[field] = first
                raw = json.dumps(body).encode()
    status, headers, answer = await _ask(request, "POST", "/api/show", raw)
    return _reply(status, headers, answer)


async def openai_models(request: web.Request) -> web.StreamResponse:
    """`GET /v1/models`: Ollama's models, then every alias and route."""
    routes = request.app[ROUTES].current
    if not routes:
        return await passthrough(request)
    status, headers, answer = await _ask(request, "GET", "/v1/models")
    if status != 200 or not isinstance(answer, dict):
        return _reply(status, headers, answer)
    data: list[dict[str, Any]] = answer.get("data") or []
    by_id = {normalise_model(str(m.get("id", ""))): m for m in data}
    for name, first in routes.names():
        entry = by_id.get(first) or {"object": "model", "created": 0, "owned_by": "library"}
        data.append({**entry, "id": name})
    return _reply(status, headers, {**answer, "data": data})


async def openai_model(request: web.Request) -> web.StreamResponse:
    """`GET /v1/models/{model}`: for an alias or a route, its first model's entry under its own name."""
    name = request.match_info["model"]
    first = request.app[ROUTES].current.first_model(name)
    if first is None:
        return await passthrough(request)
    status, headers, answer = await _ask(request, "GET", f"/v1/models/{first}")
    if status == 200 and isinstance(answer, dict):
        answer = {**answer, "id": name}
    return _reply(status, headers, answer)


async def _ask(
    request: web.Request, method: str, path: str, body: bytes | None = None
) -> tuple[int, dict[str, str], Any]:
    """Ollama's status, headers and decoded JSON answer (its raw bytes if it is not JSON)."""
    headers = forwarded_headers(request)
    headers.popall(hdrs.ACCEPT_ENCODING, None)  # foreman rewrites the body: it must come uncompressed
    headers.popall(hdrs.CONTENT_LENGTH, None)
    response = await request.app[UPSTREAM].send(method, path, headers=headers, data=body)
    async with response:
        raw = await response.read()
        kept = {k: v for k, v in response.headers.items() if k.lower() not in _BODY_HEADERS}
    try:
        return response.status, kept, json.loads(raw)
    except ValueError:
        return response.status, kept, raw


def _reply(status: int, headers: dict[str, str], answer: Any) -> web.Response:
    body = answer if isinstance(answer, bytes) else json.dumps(answer, separators=(",", ":")).encode()
    return web.Response(status=status, body=body, headers=headers)
