"""Errors that carry the HTTP status a client should see."""

from __future__ import annotations

import json
from contextlib import suppress


class ForemanError(Exception):
    """An error answered as Ollama answers errors: `{"error": message}` with `status`."""

    status = 500
    headers: dict[str, str] = {}  # noqa: RUF012 - a read-only default, replaced per instance

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status


class BadRequest(ForemanError):
    status = 400


class NotFound(ForemanError):
    status = 404


class Conflict(ForemanError):
    status = 409


class Unauthorized(ForemanError):
    status = 401

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.headers = {"WWW-Authenticate": 'Bearer realm="foreman"'}


class Unavailable(ForemanError):
    """foreman cannot take the request now; nothing already accepted is affected."""

    status = 503


class DatabaseAway(Unavailable):
    """The database cannot be reached now (a PostgreSQL restart): the client may try again in a moment."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.headers = {"Retry-After": "2"}


class QueueFull(Unavailable):
    def __init__(self, limit: int) -> None:
        # Ollama's own wording (two spaces included), so clients that handle
        # Ollama's queue-full answer handle foreman's too.
        wording = "server busy, please try again.  maximum pending requests exceeded"
        super().__init__(f"{wording} ({limit} jobs wait in foreman)")
        self.headers = {"Retry-After": "5"}


class StoreError(Exception):
    """The database cannot be used; foreman stops rather than risk it."""


class StoreUnreachable(StoreError):
    """The database server did not answer at start: a restart may well find it."""


class StoreBusy(StoreError):
    """Another foreman holds the database (or this node's name in a shared one): this one must not touch it."""


class UpstreamUnreachable(ForemanError):
    """Ollama could not be reached: refused, reset, or gone before it answered."""

    status = 502


class UpstreamFailed(ForemanError):
    """Ollama answered but failed in a way worth retrying (5xx), or dropped a stream."""

    status = 502

    def __init__(self, message: str, status: int = 502, body: bytes | None = None) -> None:
        super().__init__(message, status)
        self.body = body


class UpstreamStalled(UpstreamFailed):
    """Ollama accepted the request and then sent nothing for FOREMAN_STALL_TIMEOUT: foreman gave it up."""


class UpstreamRejected(ForemanError):
    """Ollama refused the request (4xx); retrying would not help."""

    def __init__(self, status: int, body: bytes) -> None:
        # The job's error (GET /jobs/{id}, a batch's error line, the log) is Ollama's message;
        # its client gets the body as Ollama sent it.
        super().__init__(error_message(body) or body.decode("utf-8", "replace"), status)
        self.body = body


# What the worker retries: the request may well succeed a moment later.
TRANSIENT = (UpstreamUnreachable, UpstreamFailed)

# How Ollama says a model did not fit: its system-memory check, and the
# allocation failures of its runners (llama.cpp, CUDA).
_MEMORY_ERRORS = ("model requires more system memory", "out of memory")


def is_memory_error(message: str) -> bool:
    """Whether Ollama's error says the model did not fit in memory."""
    lowered = message.lower()
    return any(marker in lowered for marker in _MEMORY_ERRORS)


def error_message(body: bytes) -> str | None:
    """The message in an error body, native (`{"error": "..."}`) or OpenAI-shaped; None if it is not one."""
    with suppress(ValueError):
        value = json.loads(body)
        if isinstance(value, dict) and (error := value.get("error")) is not None:
            return str(error.get("message")) if isinstance(error, dict) else str(error)
    return None
