"""Wire-level helpers: Ollama's JSON encoding, timestamps, bodies and error replies."""

from __future__ import annotations

import json
import math
import time
from datetime import UTC, datetime, timedelta
from typing import Any, TypeGuard

from aiohttp import web

JSON_TYPE = "application/json; charset=utf-8"
NDJSON_TYPE = "application/x-ndjson"

# Go's MaxInt64 nanoseconds: what Ollama adds to "now" for keep_alive forever.
_FOREVER = timedelta(microseconds=((1 << 63) - 1) // 1000)


class RequestError(Exception):
    """An error answered before any output: ``status`` and Ollama's ``message``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def dumps(obj: object) -> str:
    """Compact JSON with non-ASCII escaped (clients split lines on U+2028 and friends)."""
    return json.dumps(obj, ensure_ascii=True, separators=(",", ":"))


def ndjson_line(obj: object) -> bytes:
    """One NDJSON line."""
    return (dumps(obj) + "\n").encode("ascii")


def _trim_fraction(text: str) -> str:
    # Go's RFC3339Nano trims trailing zeros of the fraction (and the dot).
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return text


def format_time(moment: datetime) -> str:
    """RFC 3339 with a trimmed fraction; UTC is written as ``Z`` like Go."""
    base = _trim_fraction(moment.strftime("%Y-%m-%dT%H:%M:%S.%f"))
    offset = moment.utcoffset()
    if offset is None or offset == timedelta(0):
        return base + "Z"
    total = int(offset.total_seconds())
    sign = "+" if total >= 0 else "-"
    hours, minutes = divmod(abs(total) // 60, 60)
    return f"{base}{sign}{hours:02d}:{minutes:02d}"


def utc_now() -> str:
    """``created_at`` of chat/generate replies: UTC with ``Z``."""
    return format_time(datetime.now(UTC))


def local_time(epoch: float) -> str:
    """A wall-clock time in the local zone (``expires_at``, ``modified_at``).

    ``math.inf`` means forever: about 292 years ahead, like Ollama.
    """
    if math.isinf(epoch):
        return format_time(datetime.now().astimezone() + _FOREVER)
    return format_time(datetime.fromtimestamp(epoch).astimezone())


def now_ns() -> int:
    """A monotonic clock in nanoseconds, for durations."""
    return time.perf_counter_ns()


def json_response(obj: object, status: int = 200) -> web.Response:
    """A buffered JSON reply like gin's ``c.JSON`` (no trailing newline)."""
    return web.Response(status=status, body=dumps(obj).encode("ascii"), headers={"Content-Type": JSON_TYPE})


def error_response(status: int, message: str) -> web.Response:
    """``{"error": message}`` with ``status``."""
    return json_response({"error": message}, status)


def not_found_page() -> web.Response:
    """gin's default 404 for unknown routes."""
    return web.Response(status=404, text="404 page not found", content_type="text/plain")


async def send(request: web.Request, response: web.StreamResponse) -> web.StreamResponse:
    """Write ``response`` completely before returning (so finish times are exact)."""
    await response.prepare(request)
    await response.write_eof()
    return response


def _go_json_error(exc: json.JSONDecodeError) -> str:
    """Approximate Go's ``encoding/json`` syntax error for a Python decode error."""
    doc, pos = exc.doc, exc.pos
    if pos >= len(doc.rstrip()):
        return "unexpected EOF"
    char = doc[pos]
    shown = "'\\''" if char == "'" else f"'{char}'"
    if exc.msg.startswith("Extra data"):
        where = "after top-level value"
    elif exc.msg.startswith("Expecting property name"):
        where = "looking for beginning of object key string"
    elif exc.msg.startswith("Expecting ':'"):
        where = "after object key"
    elif exc.msg.startswith("Expecting ','"):
        where = "after object key:value pair" if "{" in doc[:pos] else "after array element"
    elif exc.msg.startswith("Invalid control character"):
        where = "in string literal"
    else:
        where = "looking for beginning of value"
    return f"invalid character {shown} {where}"


def _reject_constant(name: str) -> Any:
    # Go's decoder has no NaN/Infinity literals.
    raise ValueError(name)


async def read_json_object(request: web.Request, go_type: str) -> dict[str, Any]:
    """Parse the body as JSON whatever the Content-Type, with Ollama's 400 messages."""
    raw = await request.read()
    if not raw.strip():
        raise RequestError(400, "missing request body")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RequestError(400, "invalid character in string literal") from exc
    try:
        value = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise RequestError(400, _go_json_error(exc)) from exc
    except ValueError as exc:
        raise RequestError(400, f"invalid character '{str(exc)[:1]}' looking for beginning of value") from exc
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise RequestError(400, f"json: cannot unmarshal {json_kind(value)} into Go value of type {go_type}")
    return value


def json_kind(value: object) -> str:
    """The JSON type name Go's decoder uses in its errors."""
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return "null"


def is_go_int(value: object) -> TypeGuard[int | float]:
    """Whether Go's decoder takes `value` for an int field (a JSON number with no fraction)."""
    return not isinstance(value, bool) and (
        isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    )


def type_error(struct: str, path: str, go_type: str, value: object) -> RequestError:
    """Go's error for a JSON value of the wrong type in field `struct.path`."""
    kind = json_kind(value)
    if kind == "number" and go_type == "int":
        kind = f"number {value}"
    return RequestError(
        400, f"json: cannot unmarshal {kind} into Go struct field {struct}.{path} of type {go_type}"
    )
