"""Durations as Ollama writes them: Go's `time.ParseDuration` grammar, which `keep_alive` takes.

Kept apart from the request checks so the settings (and the client commands
that read them) need nothing heavier than a regular expression.
"""

from __future__ import annotations

import re

# Go's time.ParseDuration grammar, which Ollama uses for string keep_alive values.
_GO_DURATION = re.compile(r"[-+]?(?:(?:\d+(?:\.\d*)?|\.\d+)(?:ns|us|µs|μs|ms|s|m|h))+")


def is_keep_alive(value: object) -> bool:
    """Whether Ollama accepts `value` as a keep_alive (seconds, or a Go duration string)."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int | float):
        return True
    if isinstance(value, str):
        return value == "0" or _GO_DURATION.fullmatch(value) is not None
    return False
