"""A streamed reply folded into the one object Ollama answers with `stream: false`.

Ollama builds its non-streamed reply the same way (server/routes.go): the
final chunk, with the text, thinking and tool calls of every chunk joined.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any


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
