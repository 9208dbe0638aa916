"""Ollama's Host and Origin guards (``allowedHostsMiddleware`` and gin-contrib/cors).

* Host: only when the connection arrived on a loopback address (Ollama checks its
  listener; the stub checks the socket the request came in on). The ``Host``
  header, port stripped and lower-cased, must be empty, ``localhost``, this
  machine's hostname, end in ``.localhost``/``.local``/``.internal``, or be a
  loopback, private or unspecified IP. Anything else: 403 with an empty body.
* Origin: a request with an ``Origin`` header that is neither same-host nor on
  the allow-list (localhost, 127.0.0.1, 0.0.0.0 on http/https with any port,
  app/file/tauri/vscode schemes, plus ``StubSettings.allowed_origins``) gets
  403 with an empty body. Browser extensions are not on the default list: as
  Ollama's FAQ says, they need ``OLLAMA_ORIGINS``.
* An ``OPTIONS`` request from an allowed cross origin (a preflight), or for a
  Host that is a name rather than an address, gets 204.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import socket
from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.typedefs import Middleware

_DEFAULT_ORIGINS: tuple[str, ...] = (
    *(
        pattern
        for host in ("localhost", "127.0.0.1", "0.0.0.0")
        for pattern in (f"http://{host}", f"https://{host}", f"http://{host}:*", f"https://{host}:*")
    ),
    "app://*",
    "file://*",
    "tauri://*",
    "vscode-webview://*",
    "vscode-file://*",
)

# Go's netip IsPrivate: narrower than Python's is_private.
_PRIVATE = tuple(
    ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7")
)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _split_host(header: str) -> str:
    """The host part as Go's ``net.SplitHostPort`` gives it, or the whole header where it fails."""
    colon = header.rfind(":")
    if colon < 0:
        return header
    if header.startswith("["):
        end = header.find("]")
        if end < 0 or end + 1 != colon:
            return header  # "[::1]" without a port fails, and stays as it is
        host, after_host = header[1:end], end + 1
    else:
        host, after_host = header[:colon], 0
        if ":" in host:
            return header
    if "[" in header[1 if header.startswith("[") else 0 :] or "]" in header[after_host:]:
        return header
    return host


def host_allowed(header: str) -> bool:
    """Whether Ollama would serve a request with this ``Host`` header on loopback."""
    host = _split_host(header).lower()
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        address = None
    if address is not None:
        plain = address.ipv4_mapped or address if isinstance(address, ipaddress.IPv6Address) else address
        private = any(plain in net for net in _PRIVATE if net.version == plain.version)
        return plain.is_loopback or private or address.is_unspecified
    if host in ("", "localhost", socket.gethostname().lower()):
        return True
    return host.endswith((".localhost", ".local", ".internal"))


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def origin_allowed(origin: str, host: str, extra: tuple[str, ...]) -> bool:
    """Whether the CORS check lets a request with this ``Origin`` through."""
    if origin in (f"http://{host}", f"https://{host}"):
        return True
    patterns = _DEFAULT_ORIGINS + extra
    return any(p == "*" or fnmatch.fnmatchcase(origin, p) for p in patterns)


def _arrived_on_loopback(request: web.Request) -> bool:
    transport = request.transport
    sockname = transport.get_extra_info("sockname") if transport is not None else None
    if not isinstance(sockname, tuple) or not sockname:
        return False
    try:
        return ipaddress.ip_address(str(sockname[0]).split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def guard_middleware(check_host: bool, extra_origins: tuple[str, ...]) -> Middleware:
    """Build the middleware applying both guards."""

    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        origin = request.headers.get("Origin", "")
        cross = origin not in ("", f"http://{request.host}", f"https://{request.host}")
        if cross and not origin_allowed(origin, request.host, extra_origins):
            return web.Response(status=403)
        if cross and request.method == "OPTIONS":
            return web.Response(status=204)  # a preflight
        if check_host and _arrived_on_loopback(request):
            host = request.headers.get("Host", "")
            if not host_allowed(host):
                return web.Response(status=403)
            if request.method == "OPTIONS" and not _is_address(_split_host(host)):
                return web.Response(status=204)
        return await handler(request)

    return guard
