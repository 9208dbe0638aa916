"""Who gets in: the Host guard against DNS rebinding, CORS as Ollama does it, and the bearer token.

Both guards are ports of Ollama's own: `allowedHostsMiddleware` and
`allowedHost` in server/routes.go, and gin-contrib/cors as Ollama configures
it (envconfig.AllowedOrigins). Refusals follow Ollama: a Host or Origin that
is not allowed gets 403 with an empty body; a missing or wrong token gets
401 with an Ollama-style error.
"""

from __future__ import annotations

import hmac
import ipaddress
import socket
from collections.abc import Collection, Sequence

from aiohttp import hdrs, web
from aiohttp.typedefs import Handler, Middleware

from foreman.errors import Unauthorized

# Ollama's default CORS origins (envconfig.AllowedOrigins), any port.
DEFAULT_ORIGINS = (
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

# What Ollama's preflight answers allow (routes.go, GenerateRoutes), plus the
# headers of foreman's own API.
_ALLOW_HEADERS = ",".join(
    (
        "Authorization",
        "Content-Type",
        "User-Agent",
        "Accept",
        "X-Requested-With",
        "Openai-Beta",
        "X-Stainless-Arch",
        "X-Stainless-Async",
        "X-Stainless-Custom-Poll-Interval",
        "X-Stainless-Helper-Method",
        "X-Stainless-Lang",
        "X-Stainless-Os",
        "X-Stainless-Package-Version",
        "X-Stainless-Poll-Helper",
        "X-Stainless-Retry-Count",
        "X-Stainless-Runtime",
        "X-Stainless-Runtime-Version",
        "X-Stainless-Timeout",
        "Prefer",
        "Idempotency-Key",
        "X-Foreman-Priority",
    )
)
_ALLOW_METHODS = "GET,POST,PUT,PATCH,DELETE,HEAD,OPTIONS"
_LOCAL_SUFFIXES = (".localhost", ".local", ".internal")
_KNOWN_HOSTS = 64  # Host headers remembered as accepted; more distinct ones are parsed each time

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


def host_guard(extra_hosts: Sequence[str]) -> Middleware:
    """Refuse requests whose Host names a server other than this one (DNS rebinding), as Ollama does.

    Accepted: loopback, private and unspecified addresses and this machine's
    own; `localhost`, this machine's hostname and names ending in
    `.localhost`, `.local` or `.internal`; and `extra_hosts`. Ollama answers
    an OPTIONS request for an accepted name itself, with 204.
    """
    extra = {h.strip().lower() for h in extra_hosts if h.strip()}
    # Host headers that name a loopback or private address, accepted for good: the next request
    # with the same header (a local client's every request) skips parsing it.
    known: set[str] = set()

    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        header = request.headers.get(hdrs.HOST, "")
        if header in known:
            return await handler(request)
        host = _split_host(header)
        if _allowed_address(host):
            if len(known) < _KNOWN_HOSTS and _fixed_address(host):
                known.add(header)
            return await handler(request)
        if _allowed_name(host) or host.lower() in extra:
            if request.method == hdrs.METH_OPTIONS:
                return web.Response(status=204)
            return await handler(request)
        return web.Response(status=403)

    return guard


def cors(app: web.Application, extra_origins: Sequence[str]) -> None:
    """Allow browsers from Ollama's default origins, OLLAMA_ORIGINS and FOREMAN_ORIGINS; refuse others with 403."""
    patterns = [*(o for o in extra_origins if o), *DEFAULT_ORIGINS]
    allow_all = "*" in patterns
    exact = {p.strip().lower() for p in patterns}
    # gin-contrib/cors: one * per pattern, matched as a prefix and a suffix.
    wildcards = [tuple(p.split("*", 1)) for p in patterns if "*" in p]

    def allowed(origin: str) -> bool:
        if allow_all or origin in exact:
            return True
        return any(origin.startswith(head) and origin.endswith(tail) for head, tail in wildcards)

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        origin = request.headers.get(hdrs.ORIGIN, "")
        host = request.headers.get(hdrs.HOST, "")
        if not origin or origin in (f"http://{host}", f"https://{host}"):
            return await handler(request)  # not a cross-origin request
        if not allowed(origin):
            return web.Response(status=403)
        headers = {hdrs.ACCESS_CONTROL_ALLOW_ORIGIN: "*" if allow_all else origin}
        if request.method == hdrs.METH_OPTIONS:
            # Every OPTIONS from an allowed origin is a preflight to gin-contrib/cors.
            headers[hdrs.ACCESS_CONTROL_ALLOW_METHODS] = _ALLOW_METHODS
            headers[hdrs.ACCESS_CONTROL_ALLOW_HEADERS] = _ALLOW_HEADERS
            headers[hdrs.ACCESS_CONTROL_MAX_AGE] = "43200"
            response = web.Response(status=204, headers=headers)
            if not allow_all:
                for vary in (
                    hdrs.ORIGIN,
                    hdrs.ACCESS_CONTROL_REQUEST_METHOD,
                    hdrs.ACCESS_CONTROL_REQUEST_HEADERS,
                ):
                    response.headers.add(hdrs.VARY, vary)
            return response
        if not allow_all:
            headers[hdrs.VARY] = hdrs.ORIGIN
        # foreman's own: a page may read the job id and an async job's Location.
        headers[hdrs.ACCESS_CONTROL_EXPOSE_HEADERS] = "X-Foreman-Job, Location"
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


def _split_host(header: str) -> str:
    """The host part of a Host header as Go's net.SplitHostPort gives it, or the whole header where it fails."""
    colon = header.rfind(":")
    if colon < 0:
        return header
    if header.startswith("["):
        end = header.find("]")
        if end < 0 or end + 1 != colon:
            return header
        host, after_host = header[1:end], end + 1
    else:
        host, after_host = header[:colon], 0
        if ":" in host:
            return header
    if "[" in header[1 if header.startswith("[") else 0 :] or "]" in header[after_host:]:
        return header
    return host


def _allowed_address(host: str) -> bool:
    """An IP address Ollama accepts in Host: loopback, private, unspecified, or one of this machine's."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return _always_allowed(address) or _is_local(address)


def _fixed_address(host: str) -> bool:
    """An address accepted whatever the machine's interfaces are (loopback, private, unspecified)."""
    try:
        return _always_allowed(ipaddress.ip_address(host))
    except ValueError:
        return False


def _always_allowed(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    plain = address
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        plain = address.ipv4_mapped  # Go's netip unmaps for these two tests, not for the others
    if plain.is_loopback or _is_private(plain):
        return True
    return address in (ipaddress.IPv4Address(0), ipaddress.IPv6Address(0))


def _is_private(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Go's netip.Addr.IsPrivate: RFC 1918 and RFC 4193, narrower than Python's is_private."""
    if isinstance(address, ipaddress.IPv4Address):
        return any(address in net for net in _PRIVATE_V4)
    return address in _PRIVATE_V6


_PRIVATE_V4 = tuple(ipaddress.IPv4Network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"))
_PRIVATE_V6 = ipaddress.IPv6Network("fc00::/7")


def _is_local(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Whether an interface of this machine has this address (Ollama's isLocalIP).

    Binding a socket to an address succeeds only where the machine owns it,
    which answers the question without listing the interfaces. Ollama compares
    the address's text with the interfaces', so a zone or an IPv4-mapped form
    never matches, and no interface has a multicast address.
    """
    if address.is_multicast:
        return False
    if isinstance(address, ipaddress.IPv6Address) and (address.scope_id or address.ipv4_mapped):
        return False
    family = socket.AF_INET if address.version == 4 else socket.AF_INET6
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.bind((str(address), 0))
    except OSError:
        return False
    return True


def _allowed_name(host: str) -> bool:
    """Ollama's allowedHost: empty, localhost, this machine's hostname, or a local top-level domain."""
    host = host.lower()
    if host in ("", "localhost", socket.gethostname().lower()):
        return True
    return host.endswith(_LOCAL_SUFFIXES)
