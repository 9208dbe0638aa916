"""The read models: what the job API and /status show, read straight from the tables."""

from __future__ import annotations

import sqlite3

from foreman.job import Job, JobState, Priority
from foreman.storage import output
from foreman.storage.rows import JOB, job_from_row, job_summary

# Pages of jobs show neither the request nor the result.
JOB_SUMMARY = job_summary("x''")


def get(db: sqlite3.Connection, job_id: str) -> Job | None:
    row = db.execute(f"SELECT {JOB} FROM jobs WHERE id = ?", (job_id,)).fetchone()
    return None if row is None else job_from_row(row)


def list_jobs(
    db: sqlite3.Connection, *, state: JobState | None, model_key: str | None, limit: int, before: str | None
) -> list[Job]:
    """A page of jobs, newest first, each older than the cursor `before`; without body and result."""
    where: list[str] = []
    args: list[object] = []
    if state is not None:
        where.append("state = ?")
        args.append(state)
    if model_key is not None:
        # A model name matches its groups with and without load options;
        # an alias key's head (`@fast`) matches the alias's jobs, whatever their models.
        where.append("(model_key = ? OR model_key LIKE ? ESCAPE '\\' OR model_key LIKE ? ESCAPE '\\')")
        args += [model_key, _like_prefix(model_key) + " %", _like_prefix(model_key) + "(%"]
    if before is not None:
        where.append("id < ?")
        args.append(before)
    clause = f"WHERE {' AND '.join(where)}" if where else ""
    rows = db.execute(
        f"SELECT {JOB_SUMMARY} FROM jobs {clause} ORDER BY id DESC LIMIT ?", (*args, limit)
    ).fetchall()
    return [job_from_row(row) for row in rows]


def chunks(db: sqlite3.Connection, job_id: str) -> list[bytes]:
    """The output a finished job streamed, in order: kept with its row, or (a long stream, an older job) in `chunks`."""
    row = db.execute("SELECT output FROM jobs WHERE id = ?", (job_id,)).fetchone()
    if row is not None and row[0] is not None:
        return output.unpack(bytes(row[0]), job_id)
    rows = db.execute("SELECT data FROM chunks WHERE job_id = ? ORDER BY seq", (job_id,))
    return [bytes(data) for (data,) in rows]


def counts_by_state(db: sqlite3.Connection) -> dict[str, int]:
    return {state: count for state, count in db.execute("SELECT state, count(*) FROM jobs GROUP BY state")}


def oldest_queued(
    db: sqlite3.Connection, model_key: str, priority: Priority, *, skip_held: bool = False
) -> tuple[str, float]:
    """The id and arrival time of the oldest queued job of a group (with `skip_held`, not held back).

    One index lookup; held jobs are few, so skipping them in the index costs little.
    """
    oldest_id, oldest_at = db.execute(
        "SELECT id, created_at FROM jobs WHERE state = 'queued' AND model_key = ? AND priority = ?"
        f" {'AND not_before IS NULL' if skip_held else ''} ORDER BY id LIMIT 1",
        (model_key, priority),
    ).fetchone()
    return oldest_id, oldest_at


def ahead_in_group(db: sqlite3.Connection, job_id: str, model_key: str, priority: Priority) -> int:
    """Queued jobs of the same (model key, class) that came before `job_id`."""
    (ahead,) = db.execute(
        # The pick index holds exactly the queued jobs, in group order: counting
        # them there takes a fifth of the time SQLite's own plan does.
        "SELECT count(*) FROM jobs INDEXED BY jobs_queued_by_class"
        " WHERE state = 'queued' AND model_key = ? AND priority = ? AND id < ?",
        (model_key, priority, job_id),
    ).fetchone()
    return int(ahead)


def _like_prefix(text: str) -> str:
    """`text` with LIKE's wildcards escaped, for a prefix match."""
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
