"""Type checks on the fields of a decoded JSON request, with messages a client can act on."""

from __future__ import annotations

from typing import Any

from foreman.errors import BadRequest

_JSON_NAMES = {
    bool: "a boolean",
    dict: "an object",
    list: "an array",
    str: "a string",
    int: "a whole number",
    float: "a number",
}


def expect(body: dict[str, Any], field: str, kind: type, *, where: str = "") -> Any:
    """`body[field]` if it is absent, null or of `kind` (float means any number); else BadRequest."""
    value = body.get(field)
    if value is not None and not _is(value, kind):
        raise BadRequest(f"{where}{field} must be {_JSON_NAMES[kind]}, not {json_name(value)}")
    return value


def _is(value: object, kind: type) -> bool:
    # bool is an int in Python; a JSON true where a number belongs is still wrong.
    if isinstance(value, bool):
        return kind is bool
    if kind is float:
        return isinstance(value, int | float)
    return isinstance(value, kind)


def json_name(value: object) -> str:
    """The JSON type of a decoded value, as a client would call it."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    return _JSON_NAMES.get(type(value), "null")
