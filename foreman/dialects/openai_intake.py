"""What a request to Ollama's OpenAI-compatible endpoints must look like before it may queue.

Ollama's middleware (`middleware/openai.go`) binds the body into the structs of
`openai/openai.go` and answers 400 for what does not fit; foreman refuses the same
requests at once, with the same wording where Ollama has one, instead of after
they waited their turn. `keep_alive` and `options` are not part of these APIs:
Ollama ignores them, and so does foreman.
"""

from __future__ import annotations

from typing import Any

from foreman.dialects.fields import expect, json_name
from foreman.errors import BadRequest


def check_chat(body: dict[str, Any]) -> None:
    """`POST /v1/chat/completions`."""
    messages = expect(body, "messages", list)
    if not messages:
        raise BadRequest("[] is too short - 'messages'")
    for index, message in enumerate(messages):
        where = f"messages[{index}]."
        if not isinstance(message, dict):
            raise BadRequest(f"messages[{index}] must be an object")
        expect(message, "role", str, where=where)
        tool_calls = expect(message, "tool_calls", list, where=where)
        content = message.get("content")
        if content is None and tool_calls is None:
            raise BadRequest(f"{where}content is required unless the message has tool_calls")
        if content is not None and not isinstance(content, str | list):
            raise BadRequest(
                f"{where}content must be a string or an array of parts, not {json_name(content)}"
            )
    expect(body, "tools", list)
    expect(body, "response_format", dict)
    _check_sampling(body)


def check_completion(body: dict[str, Any]) -> None:
    """`POST /v1/completions` (Ollama takes one prompt string, not a list)."""
    expect(body, "prompt", str)
    expect(body, "suffix", str)
    stop = body.get("stop")
    if isinstance(stop, list) and not all(isinstance(s, str) for s in stop):
        raise BadRequest("invalid type for 'stop' field: use a string or a list of strings")
    _check_sampling(body)


def check_embeddings(body: dict[str, Any]) -> None:
    """`POST /v1/embeddings`."""
    value = body.get("input")
    if value is None or value == []:
        raise BadRequest("invalid input")
    texts = value if isinstance(value, list) else [value]
    if not all(isinstance(text, str) for text in texts):
        raise BadRequest("invalid input type: input must be a string or a list of strings")
    encoding = expect(body, "encoding_format", str)
    if encoding and encoding.lower() not in ("float", "base64"):
        raise BadRequest(
            f"Invalid value for 'encoding_format' = {encoding}. Supported values: ['float', 'base64']."
        )
    expect(body, "dimensions", int)


def _check_sampling(body: dict[str, Any]) -> None:
    options = expect(body, "stream_options", dict)
    if options:
        expect(options, "include_usage", bool, where="stream_options.")
    for field in ("max_tokens", "seed"):
        expect(body, field, int)
    for field in ("temperature", "top_p", "frequency_penalty", "presence_penalty"):
        expect(body, field, float)
