"""What a request to the two agent APIs must look like before it may queue.

Ollama binds `/v1/responses` into `openai.ResponsesRequest` (`openai/responses.go`,
`middleware/openai.go` `ResponsesMiddleware`) and `/v1/messages` into
`anthropic.MessagesRequest` (`anthropic/anthropic.go`, `middleware/anthropic.go`),
and answers 400 for what does not fit. foreman refuses the same requests at
once, with Ollama's wording where it has its own, instead of after they waited
their turn; the error middleware shapes them for the API.
"""

from __future__ import annotations

from typing import Any

from foreman.dialects.fields import expect, json_name
from foreman.errors import BadRequest

# openai/responses.go, unmarshalResponsesInputItem and unmarshalResponsesContent.
_INPUT_ITEMS = frozenset({"message", "function_call", "function_call_output", "reasoning", "web_search_call"})
_CONTENT_TYPES = frozenset({"input_text", "input_image", "output_text", "input_file"})


def check_responses(body: dict[str, Any]) -> None:
    """`POST /v1/responses` (OpenAI Responses)."""
    value = body.get("input")
    if value is not None and not isinstance(value, str):
        if not isinstance(value, list):
            raise BadRequest(f"input must be a string or array, not {json_name(value)}")
        for index, item in enumerate(value):
            _check_input_item(index, item)
    for field in ("instructions", "truncation", "previous_response_id"):
        expect(body, field, str)
    expect(body, "max_output_tokens", int)
    for field in ("temperature", "top_p"):
        expect(body, field, float)
    expect(body, "tools", list)
    expect(body, "text", dict)
    expect(body, "reasoning", dict)
    expect(body, "include", list)


def _check_input_item(index: int, item: object) -> None:
    where = f"input[{index}]: "
    if not isinstance(item, dict):
        raise BadRequest(f"{where}an input item must be an object, not {json_name(item)}")
    kind = item.get("type") or ""
    if not isinstance(kind, str):
        raise BadRequest(f"{where}type must be a string, not {json_name(kind)}")
    if kind == "" and item.get("role"):
        kind = "message"  # the shorthand {"role", "content"}
    if kind == "":
        raise BadRequest(f"{where}input item missing required 'type' field")
    if kind not in _INPUT_ITEMS:
        raise BadRequest(f'{where}unknown input item type: "{kind}"')
    if kind != "message":
        return
    content = item.get("content")
    if isinstance(content, str) or content is None:
        return
    if not isinstance(content, list):
        raise BadRequest(f"{where}content must be a string or array, not {json_name(content)}")
    for position, part in enumerate(content):
        part_type = part.get("type") if isinstance(part, dict) else None
        if part_type not in _CONTENT_TYPES:
            raise BadRequest(f"{where}content[{position}]: unknown content type: {part_type or ''}")


def check_messages(body: dict[str, Any]) -> None:
    """`POST /v1/messages` (Anthropic Messages), in the order `AnthropicMessagesMiddleware` checks."""
    max_tokens = expect(body, "max_tokens", int)
    if max_tokens is None or max_tokens <= 0:
        raise BadRequest("max_tokens is required and must be positive")
    messages = expect(body, "messages", list)
    if not messages:
        raise BadRequest("messages is required")
    for index, message in enumerate(messages):
        where = f"messages[{index}]."
        if not isinstance(message, dict):
            raise BadRequest(f"messages[{index}] must be an object, not {json_name(message)}")
        expect(message, "role", str, where=where)
        content = message.get("content")
        if content is not None and not isinstance(content, str | list):
            raise BadRequest(
                f"{where}content must be a string or an array of blocks, not {json_name(content)}"
            )
        for position, block in enumerate(content if isinstance(content, list) else ()):
            if not isinstance(block, dict):
                raise BadRequest(f"{where}content[{position}] must be an object, not {json_name(block)}")
            expect(block, "type", str, where=f"{where}content[{position}].")
    system = body.get("system")
    if system is not None and not isinstance(system, str | list):
        raise BadRequest(f"system must be a string or an array of blocks, not {json_name(system)}")
    for field in ("temperature", "top_p"):
        expect(body, field, float)
    expect(body, "top_k", int)
    stops = expect(body, "stop_sequences", list)
    if stops is not None and not all(isinstance(stop, str) for stop in stops):
        raise BadRequest("stop_sequences must be an array of strings")
    expect(body, "tools", list)
    expect(body, "thinking", dict)
