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
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from datetime import datetime
from typing import Any

import aiohttp

from foreman.errors import (
    UpstreamFailed,
    UpstreamRejected,
    UpstreamStalled,
    UpstreamUnreachable,
    error_message,
)
from foreman.job import JSON_TYPE, body_content_type
from foreman.ollama.names import normalise_model
from foreman.ollama.stalls import Stalls

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
    "/v1/responses": "/api/chat",
    "/v1/messages": "/api/chat",
    "/v1/audio/transcriptions": "/api/chat",
}


class _Watch:
    """How one request's silence is judged: the deadline it was sent with, and whether it counts as a job's."""

    def __init__(self, stalls: Stalls | None, seconds: float | None, what: str, counts: bool) -> None:
        self.stalls, self.seconds, self.what, self.counts = stalls, seconds, what, counts

    def stalled(self, exc: BaseException) -> UpstreamStalled:
        seconds = self.seconds or 0.0
        if self.counts and self.stalls is not None:
            self.stalls.stalled(seconds, self.what)
        return UpstreamStalled(
            f"Ollama sent nothing for {seconds:g} s (FOREMAN_STALL_TIMEOUT) and foreman gave the request up: {exc}"
        )

    def answered(self) -> None:
        if self.counts and self.stalls is not None:
            self.stalls.answered()


_UNWATCHED = _Watch(None, None, "", False)


class Reply:
    """Ollama's answer to a job, read as it arrives."""

    def __init__(self, response: aiohttp.ClientResponse, watch: _Watch = _UNWATCHED) -> None:
        self._response = response
        self._watch = watch
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
        except aiohttp.SocketTimeoutError as exc:
            raise self._watch.stalled(exc) from exc
        except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as exc:
            raise UpstreamFailed(f"Ollama dropped the connection mid-reply: {exc}") from exc
        self._watch.answered()
        if buffer.strip():
            yield bytes(buffer) + b"\n"

    async def read(self) -> bytes:
        try:
            body = await self._response.read()
        except aiohttp.SocketTimeoutError as exc:
            raise self._watch.stalled(exc) from exc
        except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as exc:
            raise UpstreamFailed(f"Ollama dropped the connection mid-reply: {exc}") from exc
        self._watch.answered()
        return body


class Upstream:
    """One Ollama server behind one client session."""

    def __init__(self, session: aiohttp.ClientSession, base_url: str, stalls: Stalls | None = None) -> None:
        self.session = session
        self.base_url = base_url.rstrip("/")
        # Every request but the pass-through gets a deadline on Ollama's silence (stalls.py);
        # those of jobs and loads count as stalls.
        self.stalls = stalls

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
        self,
        endpoint: str,
        model: str,
        options: Mapping[str, Any],
        keep_alive: object | None,
        *,
        load_s: float = 0.0,
    ) -> None:
        """Ask Ollama to load `model` with `options` and hold it for `keep_alive` (None: Ollama's default).

        A load sends nothing until it is done: `load_s`, what this model's loads
        took before, is allowed on top of the stall timeout.
        """
        family = _LOAD_ENDPOINT[endpoint]
        body: dict[str, Any] = {"model": model, **_LOAD_BODIES[family]}
        if keep_alive is not None:
            body["keep_alive"] = keep_alive
        if options:
            body["options"] = dict(options)
        async with self._request(
            "POST", family, json.dumps(body).encode(), counts=True, extra=load_s
        ) as reply:
            await reply.read()

    def post(self, endpoint: str, body: bytes) -> AbstractAsyncContextManager[Reply]:
        """POST a job's body; yields the reply once Ollama has accepted it (2xx).

        UpstreamStalled if Ollama then sends nothing for the stall timeout, before its
        first byte or between two chunks; the request is aborted.
        """
        return self._request(
            "POST", endpoint, body, counts=True
        )  # not wrapped again: every job's call comes here

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
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        *,
        counts: bool = False,
        extra: float = 0.0,
        **kwargs: Any,
    ) -> AsyncIterator[Reply]:
        headers = {"Content-Type": body_content_type(body)} if body is not None else None
        seconds = self.stalls.deadline(extra) if self.stalls is not None else None
        watch = _Watch(self.stalls, seconds, f"{method} {path}", counts)
        if seconds is not None and "timeout" not in kwargs:
            # sock_read: the longest wait for the next bytes, headers or body, which closes the connection.
            kwargs["timeout"] = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=seconds)
        try:
            response = await self.send(method, path, data=body, headers=headers, **kwargs)
        except UpstreamUnreachable as exc:
            if isinstance(exc.__cause__, aiohttp.SocketTimeoutError):
                raise watch.stalled(exc.__cause__) from exc.__cause__
            raise
        try:
            reply = Reply(response, watch)
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
