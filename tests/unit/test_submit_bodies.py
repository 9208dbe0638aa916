"""What `foreman submit` sends: bodies, endpoints and idempotency keys from a prompt or a JSONL file."""

from __future__ import annotations

import json

import pytest

from foreman.client.submit import BadInput, SubmitRequest, from_jsonl, from_prompt, idempotency_key


def test_a_prompt_is_one_chat_message_or_a_generate_prompt() -> None:
    """--prompt becomes a user message for /api/chat, or a prompt for /api/generate."""
    assert from_prompt("llama3", "hi") == SubmitRequest(
        "/api/chat", {"model": "llama3", "messages": [{"role": "user", "content": "hi"}]}
    )
    assert from_prompt("llama3", "hi", generate=True) == SubmitRequest(
        "/api/generate", {"model": "llama3", "prompt": "hi"}
    )


def test_jsonl_lines_become_submissions_numbered_as_in_the_file() -> None:
    """Blank lines are skipped but counted; `endpoint` is taken out of the body, /api/chat by default."""
    text = "\n".join(
        [
            json.dumps({"model": "llama3", "messages": []}),
            "",
            json.dumps({"model": "mistral", "prompt": "hi", "endpoint": "generate"}),
            json.dumps({"model": "nomic-embed-text", "input": "x", "endpoint": "/api/embed"}),
        ]
    )
    submissions = from_jsonl("batch.jsonl", text)
    assert [(s.endpoint, s.source) for s in submissions] == [
        ("/api/chat", "batch.jsonl:1"),
        ("/api/generate", "batch.jsonl:3"),
        ("/api/embed", "batch.jsonl:4"),
    ]
    assert submissions[1].body == {"model": "mistral", "prompt": "hi"}
    assert len({s.key for s in submissions}) == 3


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"model": "llama3"}\n{"model": ', "batch.jsonl:2: not JSON"),
        ('["llama3"]', "batch.jsonl:1: a request must be a JSON object"),
        ('{"model": "llama3", "endpoint": "/api/pull"}', 'batch.jsonl:1: endpoint "/api/pull" is not one'),
        ("\n\n", "batch.jsonl: no requests in the file"),
    ],
)
def test_a_bad_file_names_the_line(text: str, message: str) -> None:
    """Nothing is submitted from a file with a bad line, and the error says which line."""
    with pytest.raises(BadInput, match=message):
        from_jsonl("batch.jsonl", text)


def test_keys_follow_file_line_and_request_but_not_formatting() -> None:
    """The same request on the same line of the same file has one key, however its JSON is spaced."""
    request = {"model": "llama3", "prompt": "hi"}
    key = idempotency_key("batch.jsonl", 3, request)
    assert key.startswith("foreman-submit:batch.jsonl:3:")
    assert idempotency_key("batch.jsonl", 3, dict(reversed(request.items()))) == key
    assert from_jsonl("batch.jsonl", '\n\n{ "prompt":"hi",  "model": "llama3" }')[0].key == idempotency_key(
        "batch.jsonl", 3, request
    )
    others = {
        idempotency_key("other.jsonl", 3, request),
        idempotency_key("batch.jsonl", 4, request),
        idempotency_key("batch.jsonl", 3, {**request, "prompt": "bye"}),
    }
    assert key not in others and len(others) == 3


def test_keys_are_ascii_whatever_the_file_is_called() -> None:
    """A header value must be ASCII, so the file name is quoted."""
    assert idempotency_key("prompts é.jsonl", 1, {}).isascii()
