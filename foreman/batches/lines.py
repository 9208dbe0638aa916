"""A batch's input file, read and checked as OpenAI does, and its output and error lines.

A file that is not a batch at all (bad JSON, a line without `custom_id`, a
`url` that is not the batch's endpoint, a `custom_id` used twice) fails the
batch at validation with OpenAI's errors. A well-formed line whose request
foreman would refuse (its body, an unknown model) still belongs to the batch:
it goes to the error file and counts as failed, as OpenAI's per-request
failures do.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from foreman.job import JobState
from foreman.storage.batches import Outcome

# The endpoints a batch may name (OpenAI's, where Ollama has them).
ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses")
# OpenAI's limits on a batch input file.
MAX_LINES = 50_000
# Validation errors reported at most (OpenAI lists the first few, not ten thousand).
MAX_ERRORS = 100


@dataclass(frozen=True, slots=True)
class Request:
    line: int  # 1-based
    custom_id: str
    body: bytes  # the request body, as JSON


class Invalid(Exception):
    """The file is not a batch: OpenAI's BatchError objects, one per problem found."""

    def __init__(self, errors: list[dict[str, Any]]) -> None:
        super().__init__(errors[0]["message"] if errors else "invalid batch file")
        self.errors = errors


def _error(code: str, message: str, line: int | None = None, param: str | None = None) -> dict[str, Any]:
    return {"code": code, "message": message, "param": param, "line": line}


def parse(content: bytes, endpoint: str) -> list[Request]:
    """The requests of a batch input file for `endpoint`; Invalid lists what is wrong."""
    errors: list[dict[str, Any]] = []
    requests: list[Request] = []
    seen: set[str] = set()
    for number, raw in enumerate(content.splitlines(), start=1):
        if not raw.strip():
            continue
        if len(errors) >= MAX_ERRORS:
            break
        try:
            item = json.loads(raw)
        except (ValueError, RecursionError):
            errors.append(_error("invalid_json_line", f"Line {number} is not valid JSON.", number))
            continue
        if not isinstance(item, dict):
            errors.append(_error("invalid_json_line", f"Line {number} is not a JSON object.", number))
            continue
        problem = _check(item, endpoint, number, seen)
        if problem is not None:
            errors.append(problem)
            continue
        seen.add(item["custom_id"])
        requests.append(Request(number, item["custom_id"], json.dumps(item["body"]).encode()))
    if not errors and not requests:
        errors.append(_error("empty_file", "The input file has no requests."))
    if not errors and len(requests) > MAX_LINES:
        errors.append(
            _error(
                "too_many_requests",
                f"The input file has {len(requests)} requests; a batch takes at most {MAX_LINES}.",
            )
        )
    if errors:
        raise Invalid(errors)
    return requests


def _check(item: dict[str, Any], endpoint: str, number: int, seen: set[str]) -> dict[str, Any] | None:
    for field in ("custom_id", "method", "url", "body"):
        if field not in item:
            return _error("missing_required_parameter", f"Line {number} is missing '{field}'.", number, field)
    custom_id, method, url, body = item["custom_id"], item["method"], item["url"], item["body"]
    if not isinstance(custom_id, str) or not custom_id:
        return _error(
            "invalid_value", f"Line {number}: 'custom_id' must be a non-empty string.", number, "custom_id"
        )
    if custom_id in seen:
        return _error(
            "duplicate_custom_id",
            f"The custom_id '{custom_id}' on line {number} is not unique.",
            number,
            "custom_id",
        )
    if method != "POST":
        return _error("invalid_value", f"Line {number}: 'method' must be 'POST'.", number, "method")
    if url != endpoint:
        return _error(
            "mismatched_endpoint",
            f"Line {number}: the url '{url}' does not match the batch's endpoint '{endpoint}'.",
            number,
            "url",
        )
    if not isinstance(body, dict):
        return _error("invalid_value", f"Line {number}: 'body' must be a JSON object.", number, "body")
    return None


def request_id(batch_id: str, line: int) -> str:
    """The id of a line's output: `batch_req_` and something unique to the line."""
    return f"batch_req_{batch_id.removeprefix('batch_')}_{line}"


def output_line(batch_id: str, outcome: Outcome, ended: str) -> tuple[bool, bytes]:
    """The line's output in OpenAI's format, and whether it belongs to the error file.

    `ended` names why a line that never finished stops: `batch_cancelled` or `batch_expired`.
    """
    entry: dict[str, Any] = {"id": request_id(batch_id, outcome.line), "custom_id": outcome.custom_id}
    failed = True
    if outcome.state is JobState.DONE and outcome.result is not None:
        body = json.loads(outcome.result)
        entry["response"] = {"status_code": outcome.status or 200, "request_id": outcome.job_id, "body": body}
        entry["error"] = None
        failed = False
    elif outcome.state is JobState.CANCELLED or (outcome.state is not None and not outcome.state.terminal):
        entry["response"] = None
        message = (
            "The batch expired before this request ran."
            if ended == "batch_expired"
            else "The request was cancelled."
        )
        entry["error"] = {"code": ended, "message": message}
    else:
        status = outcome.status or 500
        message = outcome.error or "the request failed"
        entry["response"] = {
            "status_code": status,
            "request_id": outcome.job_id,
            "body": {"error": {"message": message, "type": _error_type(status), "param": None, "code": None}},
        }
        entry["error"] = None
    return failed, json.dumps(entry, separators=(",", ":")).encode() + b"\n"


def _error_type(status: int) -> str:
    if status == 404:
        return "not_found_error"
    return "invalid_request_error" if 400 <= status < 500 else "api_error"
