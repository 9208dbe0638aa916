"""A job's row, for every backend: the columns are `Job`'s and `NewJob`'s fields, and so is the way back.

Reading a job selects `JOB` (the columns named after `Job`'s fields, in
their order) and `job_from_row` turns the row into a `Job` by position,
each value read as its field's type says. Writing a new job inserts
`NEW_JOB` with `new_job_values`. A field added to `Job` or `NewJob` is a
column of that name in each backend's table, and nothing else.
"""

from __future__ import annotations

import dataclasses
import operator
import typing
from collections.abc import Callable, Sequence
from enum import Enum
from typing import Any

from foreman.job import Job, JobState, NewJob, Priority

JOB_COLUMNS = tuple(field.name for field in dataclasses.fields(Job))
JOB = ", ".join(JOB_COLUMNS)

NEW_JOB_COLUMNS = tuple(field.name for field in dataclasses.fields(NewJob))
NEW_JOB = ", ".join(NEW_JOB_COLUMNS)
_new_job_values = operator.attrgetter(*NEW_JOB_COLUMNS)
_NEW_JOB_HINTS = typing.get_type_hints(NewJob)
# The fields written as their enum's value (a job's class).
_NEW_JOB_ENUMS = tuple(
    i
    for i, name in enumerate(NEW_JOB_COLUMNS)
    if isinstance(kind := _NEW_JOB_HINTS[name], type) and issubclass(kind, Enum)
)


def job_summary(empty_blob: str) -> str:
    """`JOB` for pages of jobs, which show neither the request nor the result (`empty_blob`, NULL).

    A page of embeddings would otherwise copy megabytes it never shows.
    """
    left_out = {"body": f"{empty_blob} AS body", "result": "NULL AS result"}
    return ", ".join(left_out.get(column, column) for column in JOB_COLUMNS)


def new_job_values(job: NewJob) -> tuple[Any, ...]:
    """The values of `NEW_JOB`'s columns for `job`; enums as their values."""
    values = list(_new_job_values(job))
    for i in _NEW_JOB_ENUMS:
        values[i] = values[i].value
    return tuple(values)


def _optional_bytes(value: Any) -> bytes | None:
    return None if value is None else bytes(value)


# What each field's type takes from a database value: None where the value is already right.
_AS_IS: frozenset[object] = frozenset({str, int, float, str | None, int | None, float | None})
_CONVERT: dict[object, Callable[[Any], Any]] = {
    JobState: JobState,
    Priority: Priority,
    bool: bool,  # SQLite keeps booleans as integers
    bytes: bytes,  # SQLite may hand back a memoryview
    bytes | None: _optional_bytes,
}


def _reader(name: str, kind: object) -> Callable[[Any], Any] | None:
    if kind in _AS_IS:
        return None
    if kind in _CONVERT:
        return _CONVERT[kind]
    raise TypeError(f"no way to read Job.{name} ({kind}) from a row: teach foreman/storage/rows.py")


_HINTS = typing.get_type_hints(Job)
# (position, reader) of each column whose value needs reading; the hot path's claims read every job.
_READERS = tuple(
    (i, read) for i, name in enumerate(JOB_COLUMNS) if (read := _reader(name, _HINTS[name])) is not None
)


def job_from_row(row: Sequence[Any]) -> Job:
    """A job from a row selected with `JOB` (or `job_summary`); fails loudly on anything else."""
    values = list(row)
    if len(values) != len(JOB_COLUMNS):
        raise ValueError(f"a job row has {len(JOB_COLUMNS)} columns, not {len(values)}")
    for i, read in _READERS:
        values[i] = read(values[i])
    return Job(*values)
