"""Who gets in: the Host guard against DNS rebinding, CORS as Ollama does it, and the bearer token.

Refusals follow Ollama: a Host or Origin that is not allowed gets 403 with an
empty body; a missing or wrong token gets 401 with an Ollama-style error.
"""

from __future__ import annotations

import fnmatch
import hmac
import ipaddress
import re
from collections.abc import Collection, Sequence

from aiohttp import hdrs, web
from aiohttp.typedefs import Handler, Middleware

from foreman.errors import Unauthorized

# Ollama's default CORS origins (envconfig.AllowedOrigins), any port.
DEFAULT_ORIGINS = (
    "http://localhost",
    "https://localhost",
    "http://localhost:*",
    "https://localhost:*",
    "http://127.0.0.1",
    "https://127.0.0.1",
    "http://127.0.0.1:*",
    "https://127.0.0.1:*",
    "http://0.0.0.0",
    "https://0.0.0.0",
    "http://0.0.0.0:*",
    "https://0.0.0.0:*",
    "app://*",
    "file://*",
    "tauri://*",
    "vscode-webview://*",
    "vscode-file://*",
)

_CORS_HEADERS = web.RequestKey("cors_headers", dict)

# Paths a monitor may reach without the token.
_OPEN_PATHS = frozenset({"/healthz"})


def is_loopback(host: str) -> bool:
    """Whether a bind address only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def host_guard(bind_host: str, extra_hosts: Sequence[str]) -> Middleware:
    """Refuse requests whose Host names a server other than this one (DNS rebinding)."""
    allowed = {"localhost", "127.0.0.1", "::1", bind_host.strip("[]").lower()}
    allowed.update(h.strip().lower() for h in extra_hosts if h.strip())

    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        host = _hostname(request.headers.get(hdrs.HOST, ""))
        if host and host not in allowed and not host.endswith(".localhost"):
            return web.Response(status=403)
        return await handler(request)

    return guard


def cors(app: web.Application, extra_origins: Sequence[str]) -> None:
    """Allow browsers from Ollama's default origins and FOREMAN_ORIGINS; refuse others with 403."""
    patterns = [*DEFAULT_ORIGINS, *(o.strip() for o in extra_origins if o.strip())]
    # One compiled pattern, not a glob match per allowed origin on every request.
    matches = re.compile("|".join(fnmatch.translate(p) for p in patterns)).match

    def allowed(origin: str, host: str) -> bool:
        same_host = origin.split("://", 1)[-1] == host
        return same_host or matches(origin) is not None

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        origin = request.headers.get(hdrs.ORIGIN)
        if origin is None:
            return await handler(request)
        if not allowed(origin, request.headers.get(hdrs.HOST, "")):
            return web.Response(status=403)
        headers = {
            hdrs.ACCESS_CONTROL_ALLOW_ORIGIN: origin,
            hdrs.VARY: hdrs.ORIGIN,
            hdrs.ACCESS_CONTROL_EXPOSE_HEADERS: "X-Foreman-Job, Location",
        }
        if request.method == hdrs.METH_OPTIONS and hdrs.ACCESS_CONTROL_REQUEST_METHOD in request.headers:
            headers[hdrs.ACCESS_CONTROL_ALLOW_METHODS] = "GET, POST, PUT, PATCH, DELETE, HEAD, OPTIONS"
            headers[hdrs.ACCESS_CONTROL_ALLOW_HEADERS] = request.headers.get(
                hdrs.ACCESS_CONTROL_REQUEST_HEADERS, "Authorization, Content-Type"
            )
            headers[hdrs.ACCESS_CONTROL_MAX_AGE] = "43200"
            return web.Response(status=204, headers=headers)
        request[_CORS_HEADERS] = headers
        return await handler(request)

    async def add_headers(request: web.Request, response: web.StreamResponse) -> None:
        # Streamed replies send their headers from inside the handler, so the
        # CORS headers go on as any response is prepared.
        response.headers.update(request.get(_CORS_HEADERS, {}))

    app.middlewares.append(check)
    app.on_response_prepare.append(add_headers)


def bearer_token(token: str, public: Collection[str] = ()) -> Middleware:
    """Require `Authorization: Bearer <token>` everywhere but /healthz and the `public` paths.

    `public` is for files that hold no data, such as the live page's, which
    asks for the token itself. CORS preflights never get here: `cors` answers
    them first, as browsers send them without credentials.
    """
    expected = f"Bearer {token}".encode()
    open_paths = _OPEN_PATHS | frozenset(public)

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in open_paths:
            return await handler(request)
        given = request.headers.get(hdrs.AUTHORIZATION, "").encode()
        if not hmac.compare_digest(given, expected):
            # Raised, so the answer takes the shape of the path's API (Ollama's or OpenAI's).
            raise Unauthorized("unauthorized: send Authorization: Bearer <FOREMAN_TOKEN>")
        return await handler(request)

    return check


def _hostname(host_header: str) -> str:
    """The Host header without its port, lower-cased; IPv6 brackets removed."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    if host.count(":") == 1:
        host = host.split(":", 1)[0]
    return host
