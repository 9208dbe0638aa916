"""What `foreman submit` sends: request bodies from a prompt or a JSONL file, each with its endpoint."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from foreman.job import QUEUED_ENDPOINTS

DEFAULT_ENDPOINT = "/api/chat"


class BadInput(ValueError):
    """A request file foreman cannot use; the message names the line."""


@dataclass(frozen=True, slots=True)
class SubmitRequest:
    endpoint: str
    body: dict[str, Any]
    key: str | None = None  # Idempotency-Key: the same line of the same file is one job
    source: str | None = None  # where it came from, e.g. `batch.jsonl:3`, for messages


def from_prompt(model: str, prompt: str, *, generate: bool = False) -> SubmitRequest:
    """One chat message, or one /api/generate prompt."""
    if generate:
        return SubmitRequest("/api/generate", {"model": model, "prompt": prompt})
    return SubmitRequest(
        DEFAULT_ENDPOINT, {"model": model, "messages": [{"role": "user", "content": prompt}]}
    )


def from_jsonl(name: str, text: str) -> list[SubmitRequest]:
    """One submission per non-blank line of a JSONL file called `name`.

    Each line is a request body with an optional `"endpoint"` field (default
    /api/chat). Its idempotency key comes from the file name, the line number
    and the request, so running the same file again returns the same jobs,
    while an edited line becomes a new job.
    """
    submissions = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        source = f"{name}:{number}"
        try:
            body = json.loads(line)
        except ValueError as exc:
            raise BadInput(f"{source}: not JSON: {exc}") from exc
        if not isinstance(body, dict):
            raise BadInput(f"{source}: a request must be a JSON object")
        key = idempotency_key(name, number, body)
        endpoint = _endpoint(body.pop("endpoint", DEFAULT_ENDPOINT), source)
        submissions.append(SubmitRequest(endpoint, body, key, source))
    if not submissions:
        raise BadInput(f"{name}: no requests in the file")
    return submissions


def idempotency_key(name: str, number: int, request: dict[str, Any]) -> str:
    """`foreman-submit:<file name>:<line>:<hash of the request>`, blind to key order and spacing."""
    canonical = json.dumps(request, sort_keys=True, separators=(",", ":"))
    digest = hashlib.sha256(canonical.encode()).hexdigest()[:24]
    # Quoted: a header value must be plain ASCII whatever the file is called.
    return f"foreman-submit:{quote(name, safe='')}:{number}:{digest}"


def _endpoint(value: object, source: str) -> str:
    """`/api/generate`, or `generate` for short."""
    endpoint = value if isinstance(value, str) and value.startswith("/") else f"/api/{value}"
    if endpoint not in QUEUED_ENDPOINTS:
        choices = ", ".join(QUEUED_ENDPOINTS)
        raise BadInput(f"{source}: endpoint {json.dumps(value)} is not one foreman queues ({choices})")
    return endpoint
