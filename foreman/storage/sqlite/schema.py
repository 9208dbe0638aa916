"""The SQLite file: is it foreman's, which schema it holds, the pragmas."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from foreman.errors import StoreError
from foreman.storage.sqlite import batch_schema, pin_table, vector_table

SCHEMA_VERSION = 7
# Marks the file as foreman's (PRAGMA application_id): "FRMN".
APPLICATION_ID = 0x46524D4E

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id          TEXT PRIMARY KEY,   -- ULID: sorts by arrival
    state       TEXT NOT NULL,
    endpoint    TEXT NOT NULL,
    model       TEXT NOT NULL,      -- as the client sent it
    model_key   TEXT NOT NULL,      -- what the worker groups by
    stream      INTEGER NOT NULL,
    body        BLOB NOT NULL,
    attempt     INTEGER NOT NULL DEFAULT 0,
    created_at  REAL NOT NULL,
    started_at  REAL,
    finished_at REAL,
    status      INTEGER,
    error       TEXT,
    result      BLOB,
    respond_async   INTEGER NOT NULL DEFAULT 0,
    idempotency_key TEXT,
    request_hash    TEXT,           -- tells a retried submission from a different one
    priority        TEXT NOT NULL DEFAULT 'interactive',  -- interactive or batch
    routing         TEXT,           -- alias jobs: JSON {alias, route, rule}
    served_model    TEXT,           -- alias jobs: the model picked to serve it
    cache           TEXT,           -- embeddings: 'no-cache' (asked), 'hit' or 'partial' (served from the cache)
    not_before      REAL,           -- put back after a failure: not to run before this time
    -- A short stream's chunks, packed (foreman/storage/output.py); longer ones are in `chunks`.
    -- Last, and read by replay alone: a row's columns are stored in order, so a read of any other
    -- column stops before it and never walks its overflow pages. A column added later (ALTER TABLE
    -- appends) comes after it in upgraded files: keep such a column out of the hot reads.
    output          BLOB
);
-- The pick: the oldest queued job of a model in a class is the first entry under (key, class).
CREATE INDEX IF NOT EXISTS jobs_queued_by_class ON jobs (model_key, priority, id) WHERE state = 'queued';
-- Listing by state, newest first; counts by state; boot recovery.
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state, id);
CREATE UNIQUE INDEX IF NOT EXISTS jobs_idempotency ON jobs (idempotency_key)
    WHERE idempotency_key IS NOT NULL;
-- The jobs held back after a failure, read at boot: few, so a small partial index.
CREATE INDEX IF NOT EXISTS jobs_held ON jobs (not_before) WHERE state = 'queued' AND not_before IS NOT NULL;
-- Retention finds old finished jobs without scanning the queue.
CREATE INDEX IF NOT EXISTS jobs_finished ON jobs (finished_at) WHERE state IN ('done', 'failed', 'cancelled');

-- The output of a long stream (over output.OUTPUT_LIMIT), one row per chunk, kept so its events can be replayed.
CREATE TABLE IF NOT EXISTS chunks (
    job_id TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    seq    INTEGER NOT NULL,
    data   BLOB NOT NULL,
    PRIMARY KEY (job_id, seq)
) WITHOUT ROWID;
"""

# What takes a database at version N-1 to version N.
_MIGRATIONS: dict[int, str] = {
    2: """
    ALTER TABLE jobs ADD COLUMN respond_async INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE jobs ADD COLUMN idempotency_key TEXT;
    ALTER TABLE jobs ADD COLUMN request_hash TEXT;
    DROP INDEX IF EXISTS jobs_active;
    """,
    # Priorities: jobs queued before them were all synchronous requests, so interactive.
    3: """
    ALTER TABLE jobs ADD COLUMN priority TEXT NOT NULL DEFAULT 'interactive';
    DROP INDEX IF EXISTS jobs_queued;
    """,
    # Aliases and routes (routes.py): what the client asked for, and which model served it.
    4: """
    ALTER TABLE jobs ADD COLUMN routing TEXT;
    ALTER TABLE jobs ADD COLUMN served_model TEXT;
    """,
    # The embedding cache: its table comes with the schema; jobs say how the cache served them.
    5: """
    ALTER TABLE jobs ADD COLUMN cache TEXT;
    """,
    # Not-before times: no job was held back before them.
    6: """
    ALTER TABLE jobs ADD COLUMN not_before REAL;
    """,
    # Short streams kept with the row; the output of the jobs before stays in `chunks`, read from there.
    7: """
    ALTER TABLE jobs ADD COLUMN output BLOB;
    """,
}
_OUR_TABLES = frozenset({"jobs", "chunks", "embed_cache", "pins"}) | batch_schema.TABLES

ENDED = "('done', 'failed', 'cancelled')"


def open_database(
    path: Path, sync: str, *, autocheckpoint: bool = True, busy_timeout_ms: int = 5000
) -> sqlite3.Connection:
    """A connection to the queue at `path`, created or migrated; StoreError if it is not a sound foreman queue.

    `sync` is "normal" (survives a process crash; in WAL mode only power loss
    can undo the last commits) or "full" (an fsync per commit, which also
    survives power loss). With `autocheckpoint` off, a commit never copies the
    write-ahead log into the database: someone else must checkpoint (see
    `checkpoints.Checkpointer`). A write waits up to `busy_timeout_ms` for
    another connection's write to end. Rows come as `sqlite3.Row`, readable by name.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    # Autocommit: each statement is its own transaction unless we BEGIN.
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        _prepare(db, path, sync)
        if not autocheckpoint:
            db.execute("PRAGMA wal_autocheckpoint = 0")
        db.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
    except BaseException:
        db.close()
        raise
    db.row_factory = sqlite3.Row
    return db


def connect_beside(path: Path) -> sqlite3.Connection:
    """Another connection to a queue `open_database` has opened: for reads, upkeep and checkpoints.

    It never checkpoints on its own commits either; rows come as `sqlite3.Row`.
    """
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA busy_timeout = 5000")
    db.execute("PRAGMA foreign_keys = ON")  # pruning a job deletes its chunks
    db.execute("PRAGMA wal_autocheckpoint = 0")
    db.row_factory = sqlite3.Row
    return db


def _prepare(db: sqlite3.Connection, path: Path, sync: str) -> None:
    try:
        version = _check_ours(db, path)
        db.execute("PRAGMA journal_mode = WAL")
    except sqlite3.DatabaseError as exc:
        message = f"{path} is not a usable SQLite database ({exc}); foreman leaves it untouched"
        raise StoreError(message) from exc
    db.execute(f"PRAGMA synchronous = {'FULL' if sync == 'full' else 'NORMAL'}")
    db.execute("PRAGMA busy_timeout = 5000")
    db.execute("PRAGMA foreign_keys = ON")
    # One script, one transaction: a migration that fails leaves the file as it was.
    pending = range(version + 1, SCHEMA_VERSION + 1) if version else range(0)
    migrations = "".join(_MIGRATIONS[v] for v in pending)
    try:
        db.executescript(
            f"BEGIN IMMEDIATE; {migrations} {_SCHEMA} {vector_table.SCHEMA} {batch_schema.SCHEMA}"
            f" {pin_table.SCHEMA}"
            f" PRAGMA user_version = {SCHEMA_VERSION}; PRAGMA application_id = {APPLICATION_ID}; COMMIT;"
        )
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise


def _check_ours(db: sqlite3.Connection, path: Path) -> int:
    """The schema version of an existing foreman queue, 0 for a new file; StoreError otherwise."""
    tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    if not tables:
        return 0
    (application_id,) = db.execute("PRAGMA application_id").fetchone()
    (version,) = db.execute("PRAGMA user_version").fetchone()
    # Queues from before the application id was set carry only our tables.
    older_ours = application_id == 0 and version and tables <= _OUR_TABLES
    if application_id != APPLICATION_ID and not older_ours:
        raise StoreError(
            f"{path} is not a foreman queue (tables: {', '.join(sorted(tables))}); "
            "foreman leaves it untouched: point FOREMAN_DB at another file"
        )
    if version > SCHEMA_VERSION:
        raise StoreError(
            f"{path} was written by a newer foreman (schema {version}, this one knows {SCHEMA_VERSION}); "
            "upgrade foreman"
        )
    problems = [row for (row,) in db.execute("PRAGMA quick_check")]
    if problems != ["ok"]:
        raise StoreError(
            f"{path} failed its integrity check ({'; '.join(problems[:3])}); "
            "foreman leaves it untouched: restore a backup or move it aside"
        )
    return int(version)


def wal_path(path: Path) -> Path:
    return path.with_name(path.name + "-wal")
