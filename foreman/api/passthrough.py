"""Everything foreman does not queue goes to Ollama as it came, and back as it comes."""

from __future__ import annotations

import aiohttp
import structlog
from aiohttp import hdrs, web
from multidict import CIMultiDict, CIMultiDictProxy

from foreman.api.keys import CONFIG, MODEL_TAGS, UPSTREAM
from foreman.ollama.tags import MODEL_CHANGES

log = structlog.get_logger("foreman.proxy")

# Headers that describe one connection, not the message (RFC 9110, 7.6.1).
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
    }
)


def _end_to_end(headers: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    return CIMultiDict((k, v) for k, v in headers.items() if k.lower() not in _HOP_BY_HOP)


def forwarded_headers(request: web.Request) -> CIMultiDict[str]:
    headers = _end_to_end(request.headers)
    # foreman's CORS check has let this origin in; Ollama's own would refuse
    # the origins only foreman knows (FOREMAN_ORIGINS), as it never sees the
    # ones of queued jobs either.
    headers.popall(hdrs.ORIGIN, None)
    if request.app[CONFIG].token:
        headers.popall(hdrs.AUTHORIZATION, None)  # foreman's credential, not Ollama's
    return headers


async def passthrough(request: web.Request) -> web.StreamResponse:
    """Forward any request to Ollama, streaming both ways (pull progress, blob uploads)."""
    if request.path in MODEL_CHANGES:
        # From now until the list is read again after it, no digest is trusted.
        request.app[MODEL_TAGS].stale()
        try:
            return await _forward(request)
        finally:
            request.app[MODEL_TAGS].stale()
    return await _forward(request)


async def _forward(request: web.Request) -> web.StreamResponse:
    response = await request.app[UPSTREAM].send(
        request.method,
        request.path_qs,
        headers=forwarded_headers(request),
        data=request.content if request.body_exists else None,
        allow_redirects=False,
    )
    async with response:
        out = web.StreamResponse(
            status=response.status, reason=response.reason, headers=_end_to_end(response.headers)
        )
        await out.prepare(request)
        try:
            async for data in response.content.iter_any():
                await out.write(data)
        except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as exc:
            # Too late for a status: cut the client's connection so it sees the
            # reply is incomplete rather than a clean, truncated one.
            log.warning("proxy.broken", path=request.path, error=str(exc))
            if request.transport is not None:
                request.transport.abort()
            return out
        await out.write_eof()
        return out
