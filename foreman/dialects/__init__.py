"""The APIs foreman queues, behind one seam: Ollama's native `/api/*`, its OpenAI-compatible `/v1/*`,
OpenAI's Responses (`/v1/responses`) and Anthropic's Messages (`/v1/messages`).

The handlers, the worker and the error middleware ask `dialect_for(path)` how a
stream is framed, how an error looks and whether a request can carry
`keep_alive`, instead of testing paths themselves. Each side lives with its
API: `foreman.dialects.native`, `foreman.dialects.openai` and
`foreman.dialects.named_events` (the two agent APIs).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from foreman.dialects.named_events import Anthropic, Responses
from foreman.dialects.native import Native
from foreman.dialects.openai import OpenAI


class StreamReader(Protocol):
    """Reads one streamed reply from Ollama, line by line."""

    def chunk(self, line: bytes) -> bytes | None:
        """The job's chunk in this line (newline-terminated JSON), or None for framing."""
        ...

    def failure(self, chunks: Sequence[bytes]) -> tuple[str, bytes] | None:
        """How the stream failed, if it did: the error, and what the client still needs to hear of it."""
        ...


class Dialect(Protocol):
    """How one of the APIs frames streams and errors, and what its requests can carry."""

    stream_type: str  # Content-Type of a streamed reply
    carries_keep_alive: bool  # whether a request can set Ollama's keep_alive itself

    def error_body(self, status: int, message: str) -> bytes:
        """foreman's own error, shaped for this API."""
        ...

    def client_error(self, body: bytes, status: int) -> bytes:
        """An error body from Ollama or the worker, with its status, as this API's clients expect it."""
        ...

    def frame(self, chunk: bytes) -> bytes:
        """A job's chunk as the streaming client receives it."""
        ...

    def end(self) -> bytes:
        """What follows the last chunk of a stream that went well."""
        ...

    def late_error(self, body: bytes) -> bytes:
        """An error reported after the stream started."""
        ...

    def reader(self) -> StreamReader: ...

    def merge(self, endpoint: str, chunks: Sequence[bytes]) -> bytes:
        """The `stream: false` reply Ollama would have given, from a stream's chunks."""
        ...

    def ask_stream(self, body: dict[str, Any]) -> None:
        """Make a request stream its reply (async jobs always run streamed)."""
        ...


NATIVE: Dialect = Native()
OPENAI: Dialect = OpenAI()
RESPONSES: Dialect = Responses()
ANTHROPIC: Dialect = Anthropic()

_BY_PATH = {"/v1/responses": RESPONSES, "/v1/messages": ANTHROPIC}


def dialect_for(path: str) -> Dialect:
    """The API a request path belongs to."""
    found = _BY_PATH.get(path)
    if found is not None:
        return found
    return OPENAI if path.startswith("/v1/") else NATIVE
