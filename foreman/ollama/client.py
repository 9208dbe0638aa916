"""Ollama as foreman talks to it: residency, the load step, and job requests.

Every failure is sorted here into what the worker does with it: retry
(`UpstreamUnreachable`, `UpstreamFailed`) or pass on to the client
(`UpstreamRejected`).
"""

from __future__ import annotations

import json
import math
import os
import socket
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any

import aiohttp

from foreman.errors import UpstreamFailed, UpstreamRejected, UpstreamUnreachable, error_message
from foreman.job import JSON_TYPE
from foreman.ollama.names import normalise_model

_CENTURY_S = 100 * 365 * 86400
NDJSON = "application/x-ndjson"
EVENT_STREAM = "text/event-stream"  # how Ollama's /v1 endpoints stream

# The request that makes Ollama load a model without running anything, per
# endpoint family (ollama docs/api.md, "Load a model"). Ollama's /v1 endpoints
# run on the same native handlers, so their models load the same way.
_LOAD_BODIES: dict[str, dict[str, Any]] = {
    "/api/chat": {"messages": []},
    "/api/generate": {"prompt": ""},
    "/api/embed": {"input": []},
}
_LOAD_ENDPOINT = {
    "/api/chat": "/api/chat",
    "/api/generate": "/api/generate",
    "/api/embed": "/api/embed",
    "/api/embeddings": "/api/embed",
    "/v1/chat/completions": "/api/chat",
    "/v1/completions": "/api/generate",
    "/v1/embeddings": "/api/embed",
}


class Reply:
    """Ollama's answer to a job, read as it arrives."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response
        self.status = response.status
        self.content_type = response.headers.get("Content-Type", JSON_TYPE)
        self.streamed = self.content_type.startswith((NDJSON, EVENT_STREAM))

    async def lines(self) -> AsyncIterator[bytes]:
        """Non-blank lines (NDJSON, or SSE fields) with their newline, each as soon as it is complete."""
        buffer = bytearray()
        scanned = 0
        try:
            async for data in self._response.content.iter_any():
                buffer += data
                start = 0
                while (end := buffer.find(b"\n", scanned)) != -1:
                    line = bytes(buffer[start : end + 1])
                    start = scanned = end + 1
                    if line.strip():
                        yield line
                del buffer[:start]
                scanned = len(buffer)
        except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as exc:
            raise UpstreamFailed(f"Ollama dropped the connection mid-reply: {exc}") from exc
        if buffer.strip():
            yield bytes(buffer) + b"\n"

    async def read(self) -> bytes:
        try:
            return await self._response.read()
        except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as exc:
            raise UpstreamFailed(f"Ollama dropped the connection mid-reply: {exc}") from exc


class Upstream:
    """One Ollama server behind one client session."""

    def __init__(self, session: aiohttp.ClientSession, base_url: str) -> None:
        self.session = session
        self.base_url = base_url.rstrip("/")

    def url(self, path_qs: str) -> str:
        return self.base_url + path_qs

    async def resident_models(self, **kwargs: Any) -> set[str]:
        """Normalised names of the models Ollama holds now (`/api/ps`); `kwargs` such as a timeout go to aiohttp."""
        async with self._request("GET", "/api/ps", **kwargs) as reply:
            body = await reply.read()
        try:
            models = json.loads(body)["models"] or []
            return {normalise_model(m["name"]) for m in models}
        except (ValueError, KeyError, TypeError) as exc:
            raise UpstreamFailed(f"Ollama's /api/ps answer is not what foreman expects: {exc}") from exc

    async def installed_models(self, **kwargs: Any) -> dict[str, str]:
        """Normalised name → digest of every model Ollama has installed (`/api/tags`)."""
        async with self._request("GET", "/api/tags", **kwargs) as reply:
            body = await reply.read()
        try:
            models = json.loads(body)["models"] or []
            return {normalise_model(m["name"]): str(m["digest"]) for m in models}
        except (ValueError, KeyError, TypeError) as exc:
            raise UpstreamFailed(f"Ollama's /api/tags answer is not what foreman expects: {exc}") from exc

    async def expires_in(self, model: str) -> float | None:
        """Seconds until Ollama unloads `model` as `/api/ps` tells it (inf: never); None if not loaded."""
        async with self._request("GET", "/api/ps") as reply:
            body = await reply.read()
        now = time.time()
        try:
            for entry in json.loads(body)["models"] or []:
                if normalise_model(entry["name"]) == normalise_model(model):
                    expires = datetime.fromisoformat(entry["expires_at"]).timestamp()
                    # Ollama's "forever" is the year 2318 (now + the longest Go duration).
                    return math.inf if expires - now > _CENTURY_S else expires - now
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise UpstreamFailed(f"Ollama's /api/ps answer is not what foreman expects: {exc}") from exc
        return None

    async def blob_path(self, model: str) -> str | None:
        """The weights file `/api/show` names after FROM in the modelfile, if it names one."""
        async with self.post("/api/show", json.dumps({"model": model}).encode()) as reply:
            body = await reply.read()
        try:
            modelfile = json.loads(body).get("modelfile") or ""
        except (ValueError, AttributeError) as exc:
            raise UpstreamFailed(f"Ollama's /api/show answer is not what foreman expects: {exc}") from exc
        for line in modelfile.splitlines():
            if line.startswith("FROM "):
                target = line[5:].strip()
                if target.startswith("/"):
                    return target
        return None

    async def load(
        self, endpoint: str, model: str, options: Mapping[str, Any], keep_alive: object | None
    ) -> None:
        """Ask Ollama to load `model` with `options` and hold it for `keep_alive` (None: Ollama's default)."""
        family = _LOAD_ENDPOINT[endpoint]
        body: dict[str, Any] = {"model": model, **_LOAD_BODIES[family]}
        if keep_alive is not None:
            body["keep_alive"] = keep_alive
        if options:
            body["options"] = dict(options)
        async with self.post(family, json.dumps(body).encode()) as reply:
            await reply.read()

    @asynccontextmanager
    async def post(self, endpoint: str, body: bytes) -> AsyncIterator[Reply]:
        """POST a job's body; yields the reply once Ollama has accepted it (2xx)."""
        async with self._request("POST", endpoint, body) as reply:
            yield reply

    async def send(self, method: str, path_qs: str, **kwargs: Any) -> aiohttp.ClientResponse:
        """Send any request to Ollama and return its response, whatever its status.

        UpstreamUnreachable when Ollama cannot be reached (refused, reset, timed out).
        """
        try:
            return await self.session.request(method, self.url(path_qs), **kwargs)
        except (aiohttp.ClientConnectionError, TimeoutError) as exc:
            raise UpstreamUnreachable(
                f"cannot reach Ollama at {self.base_url}: {why_unreachable(exc)}; is it running there?"
            ) from exc

    @asynccontextmanager
    async def _request(
        self, method: str, path: str, body: bytes | None = None, **kwargs: Any
    ) -> AsyncIterator[Reply]:
        headers = {"Content-Type": "application/json"} if body is not None else None
        response = await self.send(method, path, data=body, headers=headers, **kwargs)
        try:
            reply = Reply(response)
            if response.status >= 500:
                error = await reply.read()
                raise UpstreamFailed(_error_text(error, response.status), response.status, error)
            if response.status >= 400:
                raise UpstreamRejected(response.status, await reply.read())
            yield reply
        finally:
            response.release()


def why_unreachable(exc: BaseException) -> str:
    """In plain words: `connection refused`, not `Cannot connect to host ... ssl:default [Connect call failed ...]`."""
    if isinstance(exc, TimeoutError):
        return "no answer in time"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "it closed the connection without an answer"
    error = exc.os_error if isinstance(exc, aiohttp.ClientConnectorError) else exc
    if isinstance(error, socket.gaierror):
        return f"the host name does not resolve ({str(error.strerror).lower()})"
    if isinstance(error, OSError) and error.errno:
        return os.strerror(error.errno).lower()
    return str(exc) or type(exc).__name__


def _error_text(body: bytes, status: int) -> str:
    message = error_message(body)
    if message is None:
        message = body[:200].decode("utf-8", "replace")
    return f"Ollama answered {status}: {message}"
