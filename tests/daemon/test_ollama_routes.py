"""Every route Ollama has that foreman does not queue reaches Ollama unchanged, HEAD included."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.support.helpers import MakeForeman


@dataclass(frozen=True)
class Seen:
    method: str
    path: str
    body: bytes
    content_encoding: str | None


@pytest.fixture
async def echo() -> AsyncIterator[tuple[str, list[Seen]]]:
    """An upstream that records every request and answers each with a 200 naming it."""
    seen: list[Seen] = []

    async def record(request: web.Request) -> web.Response:
        body = await request.read()
        if "X-Test" in request.headers:  # the client's, not foreman's own /api/ps and /api/tags reads
            seen.append(Seen(request.method, request.path_qs, body, request.headers.get("Content-Encoding")))
        return web.json_response({"route": f"{request.method} {request.path}"})

    app = web.Application(handler_args={"auto_decompress": False})
    app.router.add_route("*", "/{tail:.*}", record)
    server = TestServer(app)
    await server.start_server()
    yield str(server.make_url("")).rstrip("/"), seen
    await server.close()


# server/routes.go (GenerateRoutes), less the ones foreman queues or answers itself.
PASSED_THROUGH = [
    ("GET", "/api/status"),
    ("POST", "/api/me"),
    ("POST", "/api/signout"),
    ("DELETE", "/api/user/keys/c3NoLWVkMjU1MTk"),
    ("POST", "/api/experimental/web_search"),
    ("POST", "/api/experimental/web_fetch"),
    ("GET", "/api/experimental/model-recommendations"),
    ("POST", "/api/pull"),
    ("POST", "/api/push"),
    ("POST", "/api/create"),
    ("POST", "/api/copy"),
    ("DELETE", "/api/delete"),
    ("POST", "/api/blobs/sha256:abc"),
    ("HEAD", "/api/blobs/sha256:abc"),
    ("GET", "/api/ps"),
    ("GET", "/api/version?x=1"),
    ("HEAD", "/"),
    ("HEAD", "/api/version"),
    ("HEAD", "/api/ps"),
    ("HEAD", "/api/chat"),
    ("HEAD", "/v1/responses"),
    ("HEAD", "/v1/models"),
]


async def test_other_routes_pass_through_unchanged(
    make_foreman: MakeForeman, echo: tuple[str, list[Seen]]
) -> None:
    """Each of Ollama's other routes, and HEAD on any route, reaches Ollama with its method, path and bytes."""
    url, seen = echo
    foreman = await make_foreman(url)
    body = b'{"query":"what is ollama?"}'
    for method, path in PASSED_THROUGH:
        data = body if method in ("POST", "DELETE") else None
        answer = await foreman.client.request(method, path, data=data, headers={"X-Test": "1"})
        assert answer.status == 200, (method, path, await answer.text())
        if method != "HEAD":
            assert (await answer.json())["route"] == f"{method} {path.split('?')[0]}"
    assert [(s.method, s.path) for s in seen] == PASSED_THROUGH
    assert all(s.body == body for s in seen if s.method in ("POST", "DELETE"))
    assert foreman.jobs() == []


async def test_compressed_body_passes_through_as_it_came(
    make_foreman: MakeForeman, echo: tuple[str, list[Seen]]
) -> None:
    """A compressed body on a passed-through route reaches Ollama byte for byte, still compressed."""
    url, seen = echo
    foreman = await make_foreman(url)
    packed = b"\x28\xb5\x2f\xfd not really zstd"
    answer = await foreman.client.post(
        "/api/experimental/web_search", data=packed, headers={"Content-Encoding": "zstd", "X-Test": "1"}
    )
    assert answer.status == 200
    assert seen == [Seen("POST", "/api/experimental/web_search", packed, "zstd")]
