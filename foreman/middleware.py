"""Every error a client sees is Ollama-shaped: `{"error": "..."}` with a fitting status."""

from __future__ import annotations

import structlog
from aiohttp import web
from aiohttp.typedefs import Handler

from foreman.errors import ForemanError

log = structlog.get_logger("foreman.api")


def error_response(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


@web.middleware
async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ForemanError as exc:
        response = error_response(exc.status, exc.message)
        response.headers.update(exc.headers)
        return response
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return error_response(exc.status, exc.text or exc.reason)
    except Exception:
        log.exception("request.error", method=request.method, path=request.path)
        return error_response(500, "internal error in foreman; the log has the details")
