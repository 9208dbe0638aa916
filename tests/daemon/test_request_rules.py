"""Request validation: a bad request fails at once with a message, never after queueing."""

import json

import pytest

from foreman.dialects.intake import parse_job
from foreman.durations import is_keep_alive
from foreman.errors import BadRequest


def body(**fields: object) -> bytes:
    return json.dumps(fields).encode()


def test_a_valid_chat_becomes_a_streaming_job() -> None:
    """`stream` defaults to true, as in Ollama, and the model keeps the client's spelling."""
    job = parse_job("/api/chat", body(model="Llama3", messages=[{"role": "user", "content": "hi"}]), 1.0)
    assert job.stream and job.model == "Llama3" and job.model_key == "llama3:latest"
    assert job.created_at == 1.0 and len(job.id) == 26


def test_embeddings_never_stream() -> None:
    """/api/embed answers one object whatever `stream` says."""
    assert not parse_job("/api/embed", body(model="e", input=["a"], stream=True), 0).stream


@pytest.mark.parametrize(
    ("endpoint", "raw", "message"),
    [
        ("/api/chat", b"", "missing request body"),
        ("/api/chat", b"{nope", "invalid JSON"),
        ("/api/chat", b"[1, 2]", "must be a JSON object"),
        ("/api/chat", body(messages=[]), "model is required"),
        ("/api/chat", body(model=7), "model must be a string"),
        ("/api/chat", body(model="m", messages="hi"), "messages must be an array, not a string"),
        ("/api/chat", body(model="m", messages=[1]), "messages[0] must be an object"),
        ("/api/chat", body(model="m", messages=[{"content": 3}]), "messages[0].content must be a string"),
        ("/api/chat", body(model="m", stream="yes"), "stream must be a boolean"),
        ("/api/chat", body(model="m", options=[1]), "options must be an object"),
        ("/api/chat", body(model="m", keep_alive="300"), "invalid keep_alive"),
        ("/api/chat", body(model="m", keep_alive=True), "invalid keep_alive"),
        ("/api/generate", body(model="m", prompt=["a"]), "prompt must be a string"),
        ("/api/generate", body(model="m", format=3), "invalid format"),
        ("/api/embed", body(model="m", input=5), "invalid input type"),
        ("/api/embed", body(model="m", input=["a", 1]), "invalid input type"),
        ("/api/embeddings", body(model="m", prompt={}), "prompt must be a string"),
    ],
)
def test_bad_requests_are_refused_with_a_reason(endpoint: str, raw: bytes, message: str) -> None:
    """Each malformed body names what is wrong."""
    with pytest.raises(BadRequest) as raised:
        parse_job(endpoint, raw, 0)
    assert message in raised.value.message
    assert raised.value.status == 400


@pytest.mark.parametrize("value", [300, 0, -1, 4.5, "5m", "1h30m", "300ms", "-1m", "0", "1.5h"])
def test_keep_alive_accepts_ollamas_forms(value: object) -> None:
    """Numbers are seconds; strings are Go durations."""
    assert is_keep_alive(value)


@pytest.mark.parametrize("value", ["300", "-1", "", "5 m", "forever", True, None, {}, []])
def test_keep_alive_refuses_what_ollama_refuses(value: object) -> None:
    """A string without a unit is a 400 in Ollama, so it is here."""
    assert not is_keep_alive(value)


def test_priority_comes_from_the_header_else_from_the_callers_default() -> None:
    """Sync requests pass interactive as the default, async submission will pass batch; bad values are 400."""
    from foreman.dialects.intake import parse_priority
    from foreman.job import Priority

    assert parse_priority(None, Priority.INTERACTIVE) is Priority.INTERACTIVE
    assert parse_priority("", Priority.BATCH) is Priority.BATCH
    assert parse_priority(" Batch ", Priority.INTERACTIVE) is Priority.BATCH
    with pytest.raises(BadRequest, match="X-Foreman-Priority"):
        parse_priority("urgent", Priority.INTERACTIVE)
    job = parse_job("/api/generate", body(model="m", prompt="p"), 0, priority=Priority.BATCH)
    assert job.priority is Priority.BATCH
