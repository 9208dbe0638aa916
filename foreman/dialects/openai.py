"""Replies of Ollama's OpenAI-compatible endpoints: error objects, SSE streams, merged results.

The shapes are Ollama's own (`openai/openai.go`, `middleware/openai.go`):

- A stream is Server-Sent Events, one `data: {chunk}` frame per chunk, and ends
  with `data: [DONE]`. foreman keeps each chunk's JSON as the job's chunk (what
  `/jobs/{id}/events` shows) and frames it again for the client.
- Ollama never reports a failure inside a /v1 stream: its error line decodes as
  an empty chunk and the stream ends without `[DONE]`. A stream without `[DONE]`
  is therefore broken, and foreman tells the client so with a last
  `data: {"error": {...}}` frame, which the openai SDKs raise as an APIError.
- Errors are `{"error": {"message", "type", "param": null, "code": null}}`.
  `openai.NewError` sets `type` from the status; Ollama's native handlers' errors
  reach /v1 clients through `writeError`, which keeps their status and (since
  Ollama 0.18) gives them its type: a 404 is `not_found_error`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from contextlib import suppress
from typing import Any

from foreman.ollama.client import EVENT_STREAM

DONE = b"data: [DONE]\n\n"


def error_type(status: int) -> str:
    """The `type` `openai.NewError` gives an error with this status."""
    return {400: "invalid_request_error", 404: "not_found_error"}.get(status, "api_error")


def error_body(status: int, message: str, kind: str | None = None) -> bytes:
    """OpenAI's error object for `message`."""
    error = {"message": message, "type": kind or error_type(status), "param": None, "code": None}
    return json.dumps({"error": error}).encode()


def as_openai_error(body: bytes, status: int = 500) -> bytes:
    """An error body as a /v1 client expects it.

    Ollama's /v1 errors pass unchanged. A native `{"error": "..."}` (from the
    load step on /api/*, or made by foreman) becomes what Ollama's `writeError`
    would have made of it with this status.
    """
    message = body.decode("utf-8", "replace")
    with suppress(ValueError):
        value = json.loads(body)
        if isinstance(value, dict):
            error = value.get("error")
            if isinstance(error, dict):
                return body
            if error is not None:
                message = str(error)
    return error_body(status, message)


class SSEReader:
    """Takes Ollama's /v1 stream apart, line by line: the chunks, and whether `[DONE]` came."""

    def __init__(self) -> None:
        self.done = False

    def chunk(self, line: bytes) -> bytes | None:
        """The chunk JSON in a `data:` line (newline-terminated), or None for anything else."""
        if not line.startswith(b"data:"):
            return None
        data = line[len(b"data:") :].strip()
        if data == b"[DONE]":
            self.done = True
            return None
        return data + b"\n"

    def failure(self, chunks: Sequence[bytes]) -> tuple[str, bytes] | None:
        """How the stream failed, if it did: the error, and the frame the client still needs."""
        if chunks:
            with suppress(ValueError):
                last = json.loads(chunks[-1])
                if isinstance(last, dict) and isinstance(last.get("error"), dict):
                    # An error frame already went out with the chunks.
                    return str(last["error"].get("message")), b""
        if self.done:
            return None
        message = "Ollama ended the stream before [DONE]; the reply is incomplete"
        return message, error_body(500, message, "api_error")


class OpenAI:
    """The seam's /v1 side (see `foreman.dialects`)."""

    stream_type = EVENT_STREAM
    carries_keep_alive = False

    def error_body(self, status: int, message: str) -> bytes:
        return error_body(status, message)

    def client_error(self, body: bytes, status: int) -> bytes:
        return as_openai_error(body, status)

    def frame(self, chunk: bytes) -> bytes:
        return b"data: " + chunk.rstrip(b"\n") + b"\n\n"

    def end(self) -> bytes:
        return DONE

    def late_error(self, body: bytes) -> bytes:
        return self.frame(as_openai_error(body))

    def reader(self) -> SSEReader:
        return SSEReader()

    def merge(self, endpoint: str, chunks: Sequence[bytes]) -> bytes:
        return merge_openai_stream(endpoint, chunks)

    def ask_stream(self, body: dict[str, Any]) -> None:
        # With usage, so the merged result carries it as the stream: false reply would.
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}


def merge_openai_stream(endpoint: str, lines: Sequence[bytes]) -> bytes:
    """The `chat.completion` or `text_completion` Ollama answers with `stream: false`, from its chunks."""
    chunks: list[dict[str, Any]] = [json.loads(line) for line in lines]
    choices = [c["choices"][0] for c in chunks if c.get("choices")]
    reasons = [c.get("finish_reason") for c in choices if c.get("finish_reason")]
    choice: dict[str, Any]
    if endpoint == "/v1/chat/completions":
        kind = "chat.completion"
        choice = {"index": 0, "message": _message([c.get("delta") or {} for c in choices])}
    else:
        kind = "text_completion"
        choice = {"text": "".join(c.get("text") or "" for c in choices), "index": 0}
    choice["finish_reason"] = reasons[-1] if reasons else None
    logprobs = [entry for c in choices for entry in (c.get("logprobs") or {}).get("content") or ()]
    if logprobs:
        choice["logprobs"] = {"content": logprobs}
    first, last = (chunks[0], chunks[-1]) if chunks else ({}, {})
    result: dict[str, Any] = {
        "id": first.get("id"),
        "object": kind,
        "created": last.get("created"),
        "model": next((c["model"] for c in chunks if c.get("model")), ""),
        "system_fingerprint": first.get("system_fingerprint"),
        "choices": [choice],
    }
    # Usage comes only when asked for (stream_options.include_usage), in the last chunk.
    usage = next((c["usage"] for c in reversed(chunks) if c.get("usage")), None)
    if usage is not None:
        result["usage"] = usage
    return json.dumps(result, separators=(",", ":")).encode()


def _message(deltas: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The assistant message the deltas spell: text and reasoning joined, tool calls gathered."""
    message: dict[str, Any] = {
        "role": "assistant",
        "content": "".join(d.get("content") or "" for d in deltas),
    }
    reasoning = "".join(d.get("reasoning") or "" for d in deltas)
    if reasoning:
        message["reasoning"] = reasoning
    tool_calls = [call for d in deltas for call in d.get("tool_calls") or ()]
    if tool_calls:
        message["tool_calls"] = tool_calls
    return message
