"""Durations as Ollama writes them: Go's `time.ParseDuration` grammar, which `keep_alive` takes.

foreman's time settings read the same forms (plus days, as in `FOREMAN_RETENTION=7d`)
and bare seconds. Kept apart from the request checks so the settings, and the
client commands that read them, need nothing heavier than a regular expression.
Instants, as the API and the live page write them (`iso`), live here too, in the
lowest layer, so the queue's feed and the API spell them alike.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime

_NUMBER = r"(?:\d+(?:\.\d*)?|\.\d+)"
_GO_UNITS = r"ns|us|µs|μs|ms|s|m|h"
_UNIT_SECONDS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "μs": 1e-6,
    "ms": 1e-3,
    "s": 1,
    "m": 60,
    "h": 3600,
    "d": 86400,
}

# Go's time.ParseDuration grammar, which Ollama uses for string keep_alive values.
_GO_DURATION = re.compile(rf"[-+]?(?:{_NUMBER}(?:{_GO_UNITS}))+")
# The same with days, for foreman's own settings.
_PART = re.compile(rf"({_NUMBER})({_GO_UNITS}|d)")
_DURATION = re.compile(rf"(?:{_PART.pattern})+")


def is_keep_alive(value: object) -> bool:
    """Whether Ollama accepts `value` as a keep_alive (seconds, or a Go duration string)."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int | float):
        return True
    if isinstance(value, str):
        return value == "0" or _GO_DURATION.fullmatch(value) is not None
    return False


def duration(value: str) -> float:
    """Seconds from `90`, `0.5`, `90s`, `15m`, `12h`, `7d`, or Go's `1h30m`; ValueError if it is none of them."""
    text = value.strip().lower()
    try:
        seconds = float(text)
    except ValueError:
        if not _DURATION.fullmatch(text):
            raise ValueError(
                f"not a duration: {value!r} (use seconds, or a number with a unit: 90s, 15m, 12h, 7d, 1h30m)"
            ) from None
        seconds = sum(float(number) * _UNIT_SECONDS[unit] for number, unit in _PART.findall(text))
    if not seconds >= 0:  # also refuses nan
        raise ValueError(f"must not be negative, got {value!r}")
    return seconds


def positive_duration(value: str) -> float:
    """A `duration` that must be more than zero."""
    seconds = duration(value)
    if seconds <= 0:
        raise ValueError(f"must be more than zero, got {value!r}")
    return seconds


def iso(timestamp: float | None) -> str | None:
    """A Unix time as ISO 8601 in UTC to the millisecond (`2026-12-07T09:15:00.123Z`); None stays None."""
    if timestamp is None:
        return None
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
