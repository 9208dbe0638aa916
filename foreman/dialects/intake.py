"""Turning a client's request body into a job, or a 400 that says what is wrong.

foreman checks what it relies on (the model, `stream`, `keep_alive`, `options`)
and the shape of the fields Ollama would reject anyway, so a bad request fails
at once instead of after it has waited its turn in the queue. Anything subtler
is Ollama's to judge; its 4xx then reaches the client unchanged. The rules for
Ollama's OpenAI-compatible endpoints are in `foreman.dialects.openai_intake`,
those of the agent APIs (Responses, Anthropic Messages) in `foreman.dialects.agent_intake`.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
from ulid import ULID

from foreman.dialects import agent_intake, openai_intake
from foreman.dialects.fields import expect as _expect
from foreman.dialects.fields import json_name as _json_name
from foreman.dialects.multipart import form_fields
from foreman.durations import is_keep_alive
from foreman.errors import BadRequest
from foreman.job import MULTIPART_ENDPOINTS, STREAMED_ENDPOINTS, NewJob, Priority
from foreman.ollama.names import model_key

# More messages than any real conversation has; a bigger array is an attack or a bug.
MAX_MESSAGES = 10_000


def parse_job(
    endpoint: str,
    raw: bytes,
    now: float,
    *,
    priority: Priority = Priority.INTERACTIVE,
    respond_async: bool = False,
    idempotency_key: str | None = None,
    content_type: str | None = None,
) -> NewJob:
    """Validate `raw` for `endpoint` and make it a job of class `priority`; raises BadRequest."""
    if endpoint in MULTIPART_ENDPOINTS:
        uploaded_for, _ = form_fields(raw, content_type)
        return NewJob(
            id=str(ULID()),
            endpoint=endpoint,
            model=uploaded_for,
            model_key=model_key(uploaded_for, None),
            stream=False,
            body=raw,  # the upload as it came: Ollama reads the form itself
            created_at=now,
            respond_async=respond_async,
            idempotency_key=idempotency_key,
            priority=priority,
        )
    body = _json_object(raw)
    model = body.get("model")
    if model is None or model == "":
        raise BadRequest("model is required")
    if not isinstance(model, str):
        raise BadRequest("model must be a string")
    rules = _RULES[endpoint]
    _expect(body, "stream", bool)
    if rules.native:
        _check_native_fields(body)
    rules.check(body)
    asked = body.get("stream")
    stream = endpoint in STREAMED_ENDPOINTS and (rules.streams_by_default if asked is None else asked)
    return NewJob(
        id=str(ULID()),
        endpoint=endpoint,
        model=model,
        # Ollama's /v1 endpoints take no options: their model always loads with the defaults.
        model_key=model_key(model, body.get("options") if rules.native else None),
        stream=stream,
        body=raw,
        created_at=now,
        respond_async=respond_async,
        idempotency_key=idempotency_key,
        priority=priority,
    )


def request_hash(job: NewJob) -> str:
    """A fingerprint of what was asked, blind to key order and spacing in the JSON (an upload's bytes as they are)."""
    if job.endpoint in MULTIPART_ENDPOINTS:
        return hashlib.sha256(job.endpoint.encode() + b"\n" + job.body).hexdigest()
    canonical = json.dumps(json.loads(job.body), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(f"{job.endpoint}\n{canonical}".encode()).hexdigest()


def parse_priority(value: str | None, default: Priority) -> Priority:
    """The class an `X-Foreman-Priority` header asks for; `default` when there is none.

    The default is the caller's: synchronous requests and async submissions
    default to different classes.
    """
    if value is None or not value.strip():
        return default
    try:
        return Priority(value.strip().lower())
    except ValueError:
        choices = ", ".join(p.value for p in Priority)
        raise BadRequest(f"invalid X-Foreman-Priority {value!r}: use one of {choices}") from None


def _json_object(raw: bytes) -> dict[str, Any]:
    if not raw.strip():
        raise BadRequest("missing request body")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        # orjson is faster and stricter (UTF-8 only, no NaN): the standard
        # library decides what it refuses, so foreman takes what it always took.
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError) as exc:
            raise BadRequest(f"invalid JSON in request body: {exc}") from exc
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    return body


def _check_native_fields(body: dict[str, Any]) -> None:
    options = _expect(body, "options", dict)
    if options:
        check_options(options)
    keep_alive = body.get("keep_alive")
    if keep_alive is not None and not is_keep_alive(keep_alive):
        raise BadRequest(
            f"invalid keep_alive {json.dumps(keep_alive)}: use seconds (300) "
            'or a duration with a unit ("5m", "1h", "-1" as a number pins forever)'
        )


# The typed fields of Ollama's Options (api/types.go). Ollama answers a wrong
# type here with a 500 after scheduling; foreman says 400 before queueing.
_WHOLE_OPTIONS = frozenset(
    {"num_ctx", "num_batch", "num_gpu", "main_gpu", "num_thread", "num_keep", "seed", "num_predict", "top_k"}
    | {"repeat_last_n"}
)
_NUMBER_OPTIONS = frozenset(
    {"temperature", "top_p", "min_p", "typical_p", "repeat_penalty", "presence_penalty", "frequency_penalty"}
)
_BOOL_OPTIONS = frozenset({"use_mmap", "numa", "low_vram", "use_mlock"})


def check_options(options: dict[str, Any]) -> None:
    """The typed fields of Ollama's Options; BadRequest for a wrong type."""
    for key, value in options.items():
        if value is None:
            continue
        if key in _WHOLE_OPTIONS and not _is_whole(value):
            raise BadRequest(f"option {key!r} must be a whole number, not {json.dumps(value)[:40]}")
        if key in _NUMBER_OPTIONS and not _is_number(value):
            raise BadRequest(f"option {key!r} must be a number, not {_json_name(value)}")
        if key in _BOOL_OPTIONS and not isinstance(value, bool):
            raise BadRequest(f"option {key!r} must be a boolean, not {_json_name(value)}")
        if key == "stop" and not (isinstance(value, list) and all(isinstance(s, str) for s in value)):
            raise BadRequest("option 'stop' must be an array of strings")


def _is_number(value: object) -> bool:
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, float) and math.isfinite(value))


def _is_whole(value: object) -> bool:
    return _is_number(value) and (isinstance(value, int) or float(value).is_integer())  # type: ignore[arg-type]


def _check_chat(body: dict[str, Any]) -> None:
    messages = _expect(body, "messages", list)
    if messages is not None and len(messages) > MAX_MESSAGES:
        raise BadRequest(f"too many messages: {len(messages)} (foreman takes at most {MAX_MESSAGES})")
    if messages is not None:
        for index, message in enumerate(messages):
            if not isinstance(message, dict):
                raise BadRequest(f"messages[{index}] must be an object")
            _expect(message, "role", str, where=f"messages[{index}].")
            _expect(message, "content", str, where=f"messages[{index}].")
            _expect(message, "images", list, where=f"messages[{index}].")
    _expect(body, "tools", list)
    _check_format(body)


def _check_generate(body: dict[str, Any]) -> None:
    for field in ("prompt", "suffix", "system", "template"):
        _expect(body, field, str)
    _expect(body, "raw", bool)
    _expect(body, "images", list)
    _expect(body, "context", list)
    _check_format(body)


def _check_embed(body: dict[str, Any]) -> None:
    value = body.get("input")
    if value is None or isinstance(value, str):
        return
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return
    raise BadRequest("invalid input type: input must be a string or a list of strings")


def _check_embeddings(body: dict[str, Any]) -> None:
    _expect(body, "prompt", str)


def _check_format(body: dict[str, Any]) -> None:
    value = body.get("format")
    if value is not None and not isinstance(value, str | dict):
        raise BadRequest('invalid format: use "json" or a JSON schema object')


@dataclass(frozen=True, slots=True)
class _Rules:
    check: Callable[[dict[str, Any]], None]
    streams_by_default: bool = True  # when the request leaves `stream` out
    native: bool = True  # takes `options` and `keep_alive`; Ollama's /v1 ignores both


_RULES = {
    "/api/chat": _Rules(_check_chat),
    "/api/generate": _Rules(_check_generate),
    "/api/embed": _Rules(_check_embed),
    "/api/embeddings": _Rules(_check_embeddings),
    "/v1/chat/completions": _Rules(openai_intake.check_chat, streams_by_default=False, native=False),
    "/v1/completions": _Rules(openai_intake.check_completion, streams_by_default=False, native=False),
    "/v1/embeddings": _Rules(openai_intake.check_embeddings, streams_by_default=False, native=False),
    "/v1/responses": _Rules(agent_intake.check_responses, streams_by_default=False, native=False),
    "/v1/messages": _Rules(agent_intake.check_messages, streams_by_default=False, native=False),
}
