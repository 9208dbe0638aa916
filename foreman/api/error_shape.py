"""Every error a client sees is Ollama-shaped, with a fitting status.

That is `{"error": "..."}` on Ollama's own paths, and OpenAI's
`{"error": {"message", "type", "param", "code"}}` on /v1, where Ollama answers so.
"""

from __future__ import annotations

import structlog
from aiohttp import web
from aiohttp.typedefs import Handler

from foreman.dialects import dialect_for
from foreman.errors import ForemanError
from foreman.job import JSON_TYPE

log = structlog.get_logger("foreman.api")


def error_response(request: web.Request, status: int, message: str) -> web.Response:
    body = dialect_for(request.path).error_body(status, message)
    return web.Response(status=status, body=body, headers={"Content-Type": JSON_TYPE})


@web.middleware
async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ForemanError as exc:
        response = error_response(request, exc.status, exc.message)
        response.headers.update(exc.headers)
        return response
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return error_response(request, exc.status, exc.text or exc.reason)
    except Exception:
        log.exception("request.error", method=request.method, path=request.path)
        return error_response(request, 500, "internal error in foreman; the log has the details")
