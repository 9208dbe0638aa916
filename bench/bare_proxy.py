"""The floor: the least an aiohttp reverse proxy can do, to price one extra Python HTTP hop.

    python bench/bare_proxy.py --port 18080 --upstream http://127.0.0.1:11434
    python bench/bare_proxy.py --port 18081 --accept

With --upstream it reads each request body, forwards it, and streams the
answer back as it arrives: no queue, no database, no validation. With
--accept it answers every request 202 with a made-up job id after reading the
body, storing nothing: what foreman's async intake is measured against.
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

UPSTREAM: web.AppKey[str] = web.AppKey("upstream", str)
SESSION: web.AppKey[aiohttp.ClientSession] = web.AppKey("session", aiohttp.ClientSession)


async def forward(request: web.Request) -> web.StreamResponse:
    body = await request.read()
    session = request.app[SESSION]
    headers = {"Content-Type": request.headers.get("Content-Type", "application/json")}
    async with session.request(
        request.method, request.app[UPSTREAM] + request.path_qs, data=body, headers=headers
    ) as upstream:
        response = web.StreamResponse(
            status=upstream.status,
            headers={"Content-Type": upstream.headers.get("Content-Type", "application/json")},
        )
        await response.prepare(request)
        async for data in upstream.content.iter_any():
            await response.write(data)
        await response.write_eof()
        return response


_ids = itertools.count()


async def accept(request: web.Request) -> web.Response:
    await request.read()
    return web.json_response({"id": f"{next(_ids):026d}", "state": "queued", "position": 0}, status=202)


def create_app(upstream: str | None) -> web.Application:
    app = web.Application(client_max_size=32 * 1024 * 1024)
    if upstream is None:
        app.router.add_route("*", "/{tail:.*}", accept)
        return app
    app[UPSTREAM] = upstream.rstrip("/")

    async def session_ctx(app: web.Application) -> AsyncIterator[None]:
        async with aiohttp.ClientSession(auto_decompress=False) as session:
            app[SESSION] = session
            yield

    app.cleanup_ctx.append(session_ctx)
    app.router.add_route("*", "/{tail:.*}", forward)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--port", type=int, required=True)
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--upstream", help="base URL to forward to, e.g. http://127.0.0.1:11434")
    target.add_argument("--accept", action="store_true", help="answer 202 without forwarding or storing")
    args = parser.parse_args()
    web.run_app(create_app(args.upstream), host="127.0.0.1", port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
