"""The daemon's JSON lines: what journald and the tests that read the log get."""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterator

import pytest
import structlog

from foreman import log as logging_setup


class _Binary(io.StringIO):
    """A text stream over a byte buffer, as a process's stdout is."""

    def __init__(self) -> None:
        super().__init__()
        self.buffer = io.BytesIO()


@pytest.fixture
def lines() -> Iterator[_Binary]:
    stream = _Binary()
    logging_setup.configure("json", "info", stream)
    yield stream
    structlog.reset_defaults()


def test_a_json_line_has_the_fields_the_level_and_an_iso_utc_timestamp(lines: _Binary) -> None:
    """Fields in the order given, then event, level and a UTC timestamp to the microsecond."""
    with structlog.contextvars.bound_contextvars(job_id="J1"):
        structlog.get_logger("foreman.worker").warning("job.failed", model="llama3", status=500)
    [line] = lines.buffer.getvalue().splitlines()
    record = json.loads(line)
    assert list(record) == [
        "model",
        "status",
        "event",
        "job_id",
        "level",
        "timestamp",
    ]  # as structlog's own chain
    assert record["event"] == "job.failed" and record["level"] == "warning"
    assert (record["model"], record["status"], record["job_id"]) == ("llama3", 500, "J1")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", record["timestamp"])


def test_an_exception_is_rendered_as_a_structured_traceback(lines: _Binary) -> None:
    """log.exception keeps what journald needs to show the error, as structlog's dict_tracebacks does."""
    try:
        raise ValueError("broken")
    except ValueError:
        structlog.get_logger("foreman.api").exception("request.error", path="/api/chat")
    record = json.loads(lines.buffer.getvalue())
    assert record["level"] == "error"
    [frame] = record["exception"]
    assert (frame["exc_type"], frame["exc_value"]) == ("ValueError", "broken")
    assert "exc_info" not in record


def test_a_value_json_cannot_hold_is_written_as_its_repr(lines: _Binary) -> None:
    """A field of any type gives a line, never a lost one."""
    structlog.get_logger("foreman.api").info("odd", thing=object())
    record = json.loads(lines.buffer.getvalue())
    assert record["thing"].startswith("<")
