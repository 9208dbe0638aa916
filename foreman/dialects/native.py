"""Replies of Ollama's own endpoints: NDJSON streams, `{"error": "..."}`, merged results.

A streamed reply is folded into the one object Ollama answers with `stream:
false` the way Ollama builds it (server/routes.go): the final chunk, with the
text, thinking and tool calls of every chunk joined.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from contextlib import suppress
from typing import Any

from foreman.ollama.client import NDJSON


def merge_native_stream(endpoint: str, lines: Sequence[bytes]) -> bytes:
    """The `stream: false` reply for `endpoint` from its NDJSON `lines`."""
    chunks: list[dict[str, Any]] = [json.loads(line) for line in lines]
    if not chunks:
        return b"{}"
    final = dict(chunks[-1])
    if endpoint == "/api/chat":
        messages = [c.get("message") or {} for c in chunks]
        message = dict(final.get("message") or {"role": "assistant"})
        message["content"] = "".join(m.get("content") or "" for m in messages)
        _join_text(message, "thinking", messages)
        tool_calls = [call for m in messages for call in m.get("tool_calls") or ()]
        if tool_calls:
            message["tool_calls"] = tool_calls
        final["message"] = message
    elif endpoint == "/api/generate":
        final["response"] = "".join(c.get("response") or "" for c in chunks)
        _join_text(final, "thinking", chunks)
    logprobs = [entry for c in chunks for entry in c.get("logprobs") or ()]
    if logprobs:
        final["logprobs"] = logprobs
    return json.dumps(final, separators=(",", ":")).encode()


def _join_text(target: dict[str, Any], field: str, parts: Sequence[dict[str, Any]]) -> None:
    text = "".join(p.get(field) or "" for p in parts)
    if text:
        target[field] = text
    else:
        target.pop(field, None)


class Native:
    """Ollama's own API: NDJSON lines, `{"error": "..."}`, and a last error line mid-stream."""

    stream_type = NDJSON
    carries_keep_alive = True

    def error_body(self, status: int, message: str) -> bytes:
        return json.dumps({"error": message}).encode()

    def client_error(self, body: bytes, status: int) -> bytes:
        return body

    def frame(self, chunk: bytes) -> bytes:
        return chunk

    def end(self) -> bytes:
        return b""

    def late_error(self, body: bytes) -> bytes:
        return body.rstrip(b"\n") + b"\n"

    def reader(self) -> NDJSONReader:
        return NDJSONReader()

    def merge(self, endpoint: str, chunks: Sequence[bytes]) -> bytes:
        return merge_native_stream(endpoint, chunks)

    def ask_stream(self, body: dict[str, Any]) -> None:
        body["stream"] = True


class NDJSONReader:
    """Ollama's NDJSON stream: every line is a chunk, and a failure is a last `{"error": ...}` line."""

    def chunk(self, line: bytes) -> bytes | None:
        return line

    def failure(self, chunks: Sequence[bytes]) -> tuple[str, bytes] | None:
        # Ollama reports a failure mid-stream as a last {"error": ...} line,
        # which already went out with the chunks.
        if not chunks or b'"error"' not in chunks[-1]:
            return None
        with suppress(ValueError):
            value = json.loads(chunks[-1])
            if isinstance(value, dict) and "error" in value:
                return str(value["error"]), b""
        return None
