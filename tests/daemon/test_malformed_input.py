"""Malformed requests get an Ollama-style 4xx at once and leave nothing in the queue."""

from __future__ import annotations

import pytest

from stub_ollama import StubServer
from tests.support.helpers import Foreman, MakeForeman


@pytest.mark.parametrize(
    ("path", "body", "status"),
    [
        ("/api/chat", b"", 400),
        ("/api/chat", b"{not json", 400),
        ("/api/chat", b'"just a string"', 400),
        ("/api/chat", b'{"messages": []}', 400),
        ("/api/chat", b'{"model": 12}', 400),
        ("/api/chat", b'{"model": "llama3", "messages": {"role": "user"}}', 400),
        ("/api/chat", b'{"model": "llama3", "stream": "no"}', 400),
        ("/api/chat", b'{"model": "llama3", "keep_alive": "300"}', 400),
        ("/api/generate", b'{"model": "llama3", "prompt": 5}', 400),
        ("/api/embed", b'{"model": "nomic-embed-text", "input": {"a": 1}}', 400),
        ("/api/embeddings", b'{"model": "nomic-embed-text", "options": "fast"}', 400),
        ("/api/chat", b"\xff\xfe\x00", 400),
        ("/api/chat", b"[" * 100_000 + b"]" * 100_000, 400),
    ],
)
async def test_malformed_bodies_are_refused(foreman: Foreman, path: str, body: bytes, status: int) -> None:
    """Each malformed body gets {"error": ...} with a 4xx, and no job is written."""
    answer = await foreman.client.post(path, data=body, headers={"Content-Type": "application/json"})
    assert answer.status == status
    payload = await answer.json()
    assert isinstance(payload["error"], str) and payload["error"]
    assert foreman.jobs() == []


async def test_oversized_bodies_get_413(stub_server: StubServer, make_foreman: MakeForeman) -> None:
    """A body over FOREMAN_MAX_BODY is refused with 413 and an Ollama-style error."""
    foreman = await make_foreman(stub_server.url, max_body=1024)
    answer = await foreman.client.post("/api/generate", json={"model": "llama3", "prompt": "x" * 2000})
    assert answer.status == 413
    assert "error" in await answer.json()
    assert foreman.jobs() == []


async def test_other_methods_on_queued_paths_go_to_ollama(foreman: Foreman) -> None:
    """A GET on /api/chat is Ollama's to answer, as it would be without foreman."""
    answer = await foreman.client.get("/api/chat")
    assert answer.status == 404
    assert foreman.jobs() == []
