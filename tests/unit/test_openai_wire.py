"""The /v1 wire as pure code: request rules, stream reading, merged results, error shapes."""

from __future__ import annotations

import json
from typing import Any

import pytest

from foreman.dialects.intake import parse_job
from foreman.dialects.openai import SSEReader, as_openai_error, merge_openai_stream
from foreman.errors import BadRequest

USER = [{"role": "user", "content": "hi"}]


def raw(**fields: object) -> bytes:
    return json.dumps(fields).encode()


def chunk(**fields: Any) -> bytes:
    base = {"id": "chatcmpl-7", "object": "chat.completion.chunk", "created": 1, "model": "llama3"}
    return json.dumps({**base, "system_fingerprint": "fp_ollama", **fields}).encode() + b"\n"


def delta(finish: str | None = None, **fields: Any) -> dict[str, Any]:
    return {"index": 0, "delta": {"role": "assistant", **fields}, "finish_reason": finish}


def test_v1_requests_default_to_one_object_and_ignore_native_fields() -> None:
    """/v1 does not stream unless asked, and keep_alive and options neither fail nor split the model."""
    job = parse_job("/v1/chat/completions", raw(model="Llama3", messages=USER, keep_alive="300"), 0)
    assert not job.stream and job.model_key == "llama3:latest"
    asked = parse_job("/v1/completions", raw(model="m", prompt="x", stream=True, options={"num_ctx": 8}), 0)
    assert asked.stream and asked.model_key == "m:latest"
    assert not parse_job("/v1/embeddings", raw(model="e", input="x", stream=True), 0).stream


@pytest.mark.parametrize(
    ("endpoint", "fields", "message"),
    [
        ("/v1/chat/completions", {"messages": []}, "[] is too short - 'messages'"),
        ("/v1/chat/completions", {"messages": [{"role": "user"}]}, "content is required unless"),
        ("/v1/chat/completions", {"messages": [{"content": 3}]}, "content must be a string or an array"),
        ("/v1/chat/completions", {"messages": USER, "stream": "yes"}, "stream must be a boolean"),
        ("/v1/chat/completions", {"messages": USER, "stream_options": {"include_usage": 1}}, "include_usage"),
        ("/v1/chat/completions", {"messages": USER, "max_tokens": 1.5}, "max_tokens must be a whole number"),
        ("/v1/completions", {"prompt": ["a", "b"]}, "prompt must be a string, not an array"),
        ("/v1/completions", {"prompt": "a", "stop": [1]}, "invalid type for 'stop' field"),
        ("/v1/embeddings", {"input": []}, "invalid input"),
        ("/v1/embeddings", {"input": [1]}, "invalid input type"),
        ("/v1/embeddings", {"input": "a", "encoding_format": "int8"}, "Invalid value for 'encoding_format'"),
    ],
)
def test_what_ollamas_middleware_refuses_fails_at_once(
    endpoint: str, fields: dict[str, Any], message: str
) -> None:
    """Each request Ollama's OpenAI middleware would answer with a 400 is a BadRequest before queueing."""
    with pytest.raises(BadRequest, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_job(endpoint, raw(model="m", **fields), 0)


def test_a_streamed_chat_merges_into_one_completion() -> None:
    """Text and reasoning join, tool calls gather, and the last finish_reason and usage stay."""
    call = {"id": "call_1", "index": 0, "type": "function", "function": {"name": "f", "arguments": "{}"}}
    lines = [
        chunk(choices=[delta(content="", reasoning="think ")]),
        chunk(choices=[delta(content="", reasoning="hard")]),
        chunk(choices=[delta(content="Hel")]),
        chunk(choices=[delta(content="lo", tool_calls=[call])]),
        chunk(choices=[delta("tool_calls", content="")]),
        chunk(choices=[], usage={"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}),
    ]
    merged = json.loads(merge_openai_stream("/v1/chat/completions", lines))
    assert merged == {
        "id": "chatcmpl-7",
        "object": "chat.completion",
        "created": 1,
        "model": "llama3",
        "system_fingerprint": "fp_ollama",
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": "Hello",
                    "reasoning": "think hard",
                    "tool_calls": [call],
                },
                "finish_reason": "tool_calls",
            }
        ],
        "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7},
    }


def test_a_streamed_completion_merges_and_keeps_the_real_usage() -> None:
    """With include_usage every completion chunk carries zeros; the last chunk's usage is the real one."""
    zero = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    lines = [
        chunk(
            object="text_completion", choices=[{"text": "a", "index": 0, "finish_reason": None}], usage=zero
        ),
        chunk(
            object="text_completion",
            choices=[{"text": "b", "index": 0, "finish_reason": "length"}],
            usage=zero,
        ),
        chunk(object="text_completion", choices=[], usage={**zero, "total_tokens": 5}),
    ]
    merged = json.loads(merge_openai_stream("/v1/completions", lines))
    assert merged["object"] == "text_completion"
    assert merged["choices"] == [{"text": "ab", "index": 0, "finish_reason": "length"}]
    assert merged["usage"]["total_tokens"] == 5


def test_a_stream_is_whole_only_with_done() -> None:
    """SSE framing is no chunk; without [DONE] the stream failed, and the client is told in OpenAI's shape."""
    reader = SSEReader()
    line = chunk(choices=[delta(content="x")])
    assert reader.chunk(b"data: " + line) == line
    assert reader.chunk(b": comment\n") is None
    assert reader.failure([line]) is not None
    message, tail = reader.failure([line]) or ("", b"")
    assert "[DONE]" in message and json.loads(tail)["error"]["type"] == "api_error"
    assert reader.chunk(b"data: [DONE]\n") is None
    assert reader.failure([line]) is None


def test_native_errors_become_api_errors_and_openai_errors_pass() -> None:
    """A native {"error": "..."} becomes Ollama's writeError shape for its status; an OpenAI error body is left alone."""
    converted = json.loads(as_openai_error(b'{"error":"model \\"x\\" not found"}', 404))
    assert converted == {
        "error": {"message": 'model "x" not found', "type": "not_found_error", "param": None, "code": None}
    }
    assert json.loads(as_openai_error(b'{"error":"boom"}'))["error"]["type"] == "api_error"
    already = b'{"error":{"message":"m","type":"invalid_request_error","param":null,"code":null}}\n'
    assert as_openai_error(already) == already
    assert json.loads(as_openai_error(b"bad gateway"))["error"]["message"] == "bad gateway"
