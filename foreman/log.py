"""Logging set-up: readable in a terminal, JSON lines for journald."""

from __future__ import annotations

import logging
import sys
from typing import TextIO

import orjson
import structlog


def configure(fmt: str, level: str, stream: TextIO | None = None, *, cache: bool = False) -> None:
    """Send structlog events to `stream` (stdout) as `console` text or `json` lines.

    With `cache`, each module's logger is built once, at its first line, for
    the life of the process: the daemon's way (a line then costs half as
    much). Without it, `configure` may be called again and every logger
    follows, as tests and the client commands need.
    """
    stream = stream or sys.stdout
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: structlog.types.Processor
    factory: structlog.types.WrappedLogger
    buffer = getattr(stream, "buffer", None)
    if fmt == "json":
        shared.append(structlog.processors.dict_tracebacks)
        if buffer is not None:
            # orjson renders a line in a third of the standard library's time, as bytes.
            renderer = structlog.processors.JSONRenderer(serializer=orjson.dumps)
            factory = structlog.BytesLoggerFactory(buffer)
        else:
            renderer = structlog.processors.JSONRenderer()
            factory = structlog.PrintLoggerFactory(stream)
    else:
        # Keep fields in the order the code gives them: model and job first.
        renderer = structlog.dev.ConsoleRenderer(colors=stream.isatty(), sort_keys=False)
        factory = structlog.PrintLoggerFactory(stream)
    structlog.configure(
        processors=[*shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=factory,
        cache_logger_on_first_use=cache,
    )
