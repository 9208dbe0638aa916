"""Replies of the two agent APIs Ollama serves: OpenAI Responses (`/v1/responses`) and Anthropic Messages (`/v1/messages`).

Both stream Server-Sent Events with a name on every frame (`event: NAME` then
`data: {json}`), and the JSON carries the same name as its `type`
(`middleware/openai.go` `writeEvent`, `middleware/anthropic.go` `writeSSE`). So
foreman keeps each frame's JSON as the job's chunk, and the name can always be
read back from it when the frame is written again. Neither stream ends with a
`[DONE]`: a stream is whole when its last event came (`response.completed`,
`message_stop`). Ollama reports no failure inside these streams either (its
error line decodes as an empty chunk, and the stream stops short), so a stream
without its last event is broken, and foreman says so with an `event: error`
frame, which both SDKs raise.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from contextlib import suppress
from typing import Any

from foreman.dialects.openai import as_openai_error, error_body
from foreman.ollama.client import EVENT_STREAM

_BROKEN = "Ollama ended the stream before its last event; the reply is incomplete"


def frame(chunk: bytes) -> bytes:
    """One chunk as the named SSE frame Ollama wrote it as."""
    data = chunk.rstrip(b"\n")
    name = "message"
    with suppress(ValueError):
        value = json.loads(data)
        if isinstance(value, dict) and isinstance(value.get("type"), str):
            name = value["type"]
    return b"event: " + name.encode() + b"\ndata: " + data + b"\n\n"


class NamedEventReader:
    """Takes a named-event stream apart: the `data:` JSON of each frame, and whether the last event came."""

    def __init__(self, last: frozenset[str], failed: frozenset[str], late_error: bytes) -> None:
        self._last = last  # the events that end a stream
        self._failed = failed  # those of them that say it failed
        self._late_error = late_error  # the error body a broken stream still owes its client
        self.done = False

    def chunk(self, line: bytes) -> bytes | None:
        if not line.startswith(b"data:"):
            return None  # the `event:` line: its name is in the data too
        data = line[len(b"data:") :].strip()
        with suppress(ValueError):
            if json.loads(data).get("type") in self._last:
                self.done = True
        return data + b"\n"

    def failure(self, chunks: Sequence[bytes]) -> tuple[str, bytes] | None:
        if chunks:
            with suppress(ValueError, AttributeError):
                last = json.loads(chunks[-1])
                if last.get("type") in self._failed:
                    return _message_in(last), b""  # the error already went out with the chunks
        if self.done:
            return None
        return _BROKEN, self._late_error


def _message_in(event: dict[str, Any]) -> str:
    for holder in (event.get("error"), (event.get("response") or {}).get("error"), event):
        if isinstance(holder, dict) and isinstance(holder.get("message"), str):
            return str(holder["message"])
    return "the stream reported an error"


class Responses:
    """OpenAI's Responses API (`/v1/responses`, Codex): OpenAI's error object, `response.*` events."""

    stream_type = EVENT_STREAM
    carries_keep_alive = False

    def error_body(self, status: int, message: str) -> bytes:
        return error_body(status, message)

    def client_error(self, body: bytes, status: int) -> bytes:
        return as_openai_error(body, status)

    def frame(self, chunk: bytes) -> bytes:
        return frame(chunk)

    def end(self) -> bytes:
        return b""

    def late_error(self, body: bytes) -> bytes:
        return frame(self._error_event(json.loads(as_openai_error(body))["error"]))

    def _error_event(self, error: dict[str, Any]) -> bytes:
        # The documented `error` event (type, code, message, param), and the
        # `error` object the openai SDKs raise an APIError for.
        event = {"type": "error", "code": error.get("code"), "message": error.get("message")}
        return json.dumps({**event, "param": None, "error": error}).encode()

    def reader(self) -> NamedEventReader:
        return NamedEventReader(
            frozenset({"response.completed", "response.failed", "response.incomplete", "error"}),
            frozenset({"response.failed", "error"}),
            error_body(500, _BROKEN),
        )

    def merge(self, endpoint: str, chunks: Sequence[bytes]) -> bytes:
        """The response object of the stream's last event: what `stream: false` answers."""
        for line in reversed(chunks):
            event = json.loads(line)
            if isinstance(event.get("response"), dict):
                return json.dumps(event["response"], separators=(",", ":")).encode()
        return b"{}"

    def ask_stream(self, body: dict[str, Any]) -> None:
        body["stream"] = True


def anthropic_error_type(status: int) -> str:
    """The error `type` Ollama's `anthropic.NewError` gives a status."""
    kinds = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error"}
    kinds |= {
        404: "not_found_error",
        429: "rate_limit_error",
        503: "overloaded_error",
        529: "overloaded_error",
    }
    return kinds.get(status, "api_error")


def anthropic_error(status: int, message: str) -> bytes:
    """Anthropic's error object: `{"type": "error", "error": {"type", "message"}}`."""
    return json.dumps(
        {"type": "error", "error": {"type": anthropic_error_type(status), "message": message}}
    ).encode()


class Anthropic:
    """Anthropic's Messages API (`/v1/messages`, Claude Code): its own error object, `message_*` events."""

    stream_type = EVENT_STREAM
    carries_keep_alive = False

    def error_body(self, status: int, message: str) -> bytes:
        return anthropic_error(status, message)

    def client_error(self, body: bytes, status: int) -> bytes:
        """Ollama's Anthropic errors pass unchanged; a native or OpenAI-shaped one is reshaped."""
        message = body.decode("utf-8", "replace")
        with suppress(ValueError):
            value = json.loads(body)
            if isinstance(value, dict):
                if value.get("type") == "error":
                    return body
                error = value.get("error")
                if isinstance(error, dict):
                    message = str(error.get("message"))
                elif error is not None:
                    message = str(error)
        return anthropic_error(status, message)

    def frame(self, chunk: bytes) -> bytes:
        return frame(chunk)

    def end(self) -> bytes:
        return b""

    def late_error(self, body: bytes) -> bytes:
        return frame(self.client_error(body, 500))

    def reader(self) -> NamedEventReader:
        late = anthropic_error(500, _BROKEN)
        return NamedEventReader(frozenset({"message_stop", "error"}), frozenset({"error"}), late)

    def merge(self, endpoint: str, chunks: Sequence[bytes]) -> bytes:
        return merge_messages(chunks)

    def ask_stream(self, body: dict[str, Any]) -> None:
        body["stream"] = True


def merge_messages(chunks: Sequence[bytes]) -> bytes:
    """The `message` Ollama answers with `stream: false`, from the events of a stream."""
    message: dict[str, Any] = {}
    blocks: dict[int, dict[str, Any]] = {}
    partial_json: dict[int, str] = {}
    for line in chunks:
        event = json.loads(line)
        kind = event.get("type")
        if kind == "message_start":
            message = dict(event.get("message") or {})
        elif kind == "content_block_start":
            blocks[event["index"]] = dict(event.get("content_block") or {})
        elif kind == "content_block_delta":
            block = blocks.setdefault(event["index"], {})
            delta = event.get("delta") or {}
            for field in ("text", "thinking", "signature"):
                if field in delta:
                    block[field] = block.get(field, "") + delta[field]
            if "partial_json" in delta:
                partial_json[event["index"]] = partial_json.get(event["index"], "") + delta["partial_json"]
        elif kind == "message_delta":
            message.update({k: v for k, v in (event.get("delta") or {}).items() if v is not None})
            usage = event.get("usage")
            if isinstance(usage, dict):
                message["usage"] = {**(message.get("usage") or {}), **usage}
    for index, text in partial_json.items():
        with suppress(ValueError):
            blocks[index]["input"] = json.loads(text)
    message["content"] = [blocks[index] for index in sorted(blocks)]
    return json.dumps(message, separators=(",", ":")).encode()
