"""Logging set-up: readable in a terminal, JSON lines for journald."""

from __future__ import annotations

import logging
import sys
from typing import TextIO

import structlog


def configure(fmt: str, level: str, stream: TextIO | None = None) -> None:
    """Send structlog events to `stream` (stdout) as `console` text or `json` lines."""
    stream = stream or sys.stdout
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: structlog.types.Processor
    if fmt == "json":
        shared.append(structlog.processors.dict_tracebacks)
        renderer = structlog.processors.JSONRenderer()
    else:
        # Keep fields in the order the code gives them: model and job first.
        renderer = structlog.dev.ConsoleRenderer(colors=stream.isatty(), sort_keys=False)
    structlog.configure(
        processors=[*shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=structlog.PrintLoggerFactory(stream),
        # Not cached: modules hold lazy loggers, and a cached one would keep
        # writing to whatever stream was configured first.
        cache_logger_on_first_use=False,
    )
