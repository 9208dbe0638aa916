"""``keep_alive`` parsing exactly like Ollama's ``api.Duration.UnmarshalJSON``.

Numbers are seconds (negative means forever), strings go through Go's
``time.ParseDuration`` (a negative duration means forever; a bare number other
than ``"0"`` is an error), ``null``/absent means "not specified", anything else is
``Unsupported type``. Forever is represented as ``math.inf`` seconds.
"""

from __future__ import annotations

import math

FOREVER = math.inf

# Go's time.Duration is an int64 of nanoseconds.
_MAX_NS = (1 << 63) - 1

_UNITS: dict[str, int] = {
    "ns": 1,
    "us": 1_000,
    "\u00b5s": 1_000,  # U+00B5 micro sign
    "\u03bcs": 1_000,  # U+03BC Greek mu
    "ms": 1_000_000,
    "s": 1_000_000_000,
    "m": 60 * 1_000_000_000,
    "h": 3600 * 1_000_000_000,
}

_GO_TYPES: dict[type, str] = {
    bool: "bool",
    dict: "map[string]interface {}",
    list: "[]interface {}",
}


class KeepAliveError(ValueError):
    """A ``keep_alive`` value Ollama would reject with 400; ``str()`` is Ollama's message."""


def _quote(text: str) -> str:
    """Quote like Go's ``strconv.Quote`` for the characters that matter here."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    return f'"{escaped}"'


def parse_go_duration(text: str) -> float:
    """Parse a Go duration string (``"1h30m"``, ``"300ms"``, ``"-1m"``) into seconds.

    Raises :class:`KeepAliveError` with Go's exact message on failure.
    """
    orig = text
    s = text
    negative = False
    if s and s[0] in "+-":
        negative = s[0] == "-"
        s = s[1:]
    if s == "0":
        return 0.0
    if not s:
        raise KeepAliveError(f"time: invalid duration {_quote(orig)}")
    total = 0
    while s:
        if not (s[0] == "." or (s[0].isascii() and s[0].isdigit())):
            raise KeepAliveError(f"time: invalid duration {_quote(orig)}")
        i = 0
        while i < len(s) and s[i].isascii() and s[i].isdigit():
            i += 1
        whole_digits, s = s[:i], s[i:]
        frac_digits = ""
        if s.startswith("."):
            s = s[1:]
            j = 0
            while j < len(s) and s[j].isascii() and s[j].isdigit():
                j += 1
            frac_digits, s = s[:j], s[j:]
        if not whole_digits and not frac_digits:
            raise KeepAliveError(f"time: invalid duration {_quote(orig)}")
        k = 0
        while k < len(s) and not (s[k] == "." or (s[k].isascii() and s[k].isdigit())):
            k += 1
        if k == 0:
            raise KeepAliveError(f"time: missing unit in duration {_quote(orig)}")
        unit_text, s = s[:k], s[k:]
        unit = _UNITS.get(unit_text)
        if unit is None:
            raise KeepAliveError(f"time: unknown unit {_quote(unit_text)} in duration {_quote(orig)}")
        whole = int(whole_digits or "0")
        value = whole * unit
        if frac_digits:
            value += int(int(frac_digits) * (unit / 10 ** len(frac_digits)))
        total += value
        if total > _MAX_NS:
            raise KeepAliveError(f"time: invalid duration {_quote(orig)}")
    if negative:
        total = -total
    return total / 1e9


def parse_keep_alive(value: object) -> float | None:
    """Turn a request's ``keep_alive`` JSON value into seconds.

    Returns ``None`` when the value is ``null`` (not specified), :data:`FOREVER`
    for negative values, otherwise the seconds (``0`` = unload when idle).
    """
    if value is None:
        return None
    if isinstance(value, bool):
        raise KeepAliveError("Unsupported type: 'bool'")
    if isinstance(value, int | float):
        if value < 0:
            return FOREVER
        return float(value)
    if isinstance(value, str):
        seconds = parse_go_duration(value)
        return FOREVER if seconds < 0 else seconds
    go_type = next((name for kind, name in _GO_TYPES.items() if isinstance(value, kind)), "?")
    raise KeepAliveError(f"Unsupported type: '{go_type}'")


def parse_env_keep_alive(text: str) -> float:
    """Parse an ``OLLAMA_KEEP_ALIVE``-style value: a Go duration or bare integer seconds."""
    text = text.strip()
    try:
        seconds = float(int(text))
    except ValueError:
        seconds = parse_go_duration(text)
    return FOREVER if seconds < 0 else seconds
