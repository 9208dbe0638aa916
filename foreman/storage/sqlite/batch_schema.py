"""The tables of the Files and Batch APIs and of the webhook outbox (see `foreman/storage/batches.py`).

Created with the jobs' tables (`schema.py`); `IF NOT EXISTS`, so a queue from before them gains them at open.
"""

from __future__ import annotations

SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    id         TEXT PRIMARY KEY,
    filename   TEXT NOT NULL,
    purpose    TEXT NOT NULL,
    bytes      INTEGER NOT NULL,
    created_at REAL NOT NULL,
    complete   INTEGER NOT NULL DEFAULT 0   -- every part is in: listed from then on
);
CREATE TABLE IF NOT EXISTS file_parts (
    file_id TEXT NOT NULL REFERENCES files (id) ON DELETE CASCADE,
    seq     INTEGER NOT NULL,
    data    BLOB NOT NULL,
    PRIMARY KEY (file_id, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS batches (
    id                TEXT PRIMARY KEY,
    status            TEXT NOT NULL,
    endpoint          TEXT NOT NULL,
    input_file_id     TEXT NOT NULL,
    completion_window TEXT NOT NULL,
    created_at        REAL NOT NULL,
    expires_at        REAL NOT NULL,
    times             TEXT NOT NULL DEFAULT '{}',  -- OpenAI's other timestamps, by name
    output_file_id    TEXT,
    error_file_id     TEXT,
    errors            TEXT,                        -- JSON: validation errors
    metadata          TEXT,                        -- JSON
    total             INTEGER NOT NULL DEFAULT 0,
    completed         INTEGER NOT NULL DEFAULT 0,
    failed            INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS batches_active ON batches (status, id)
    WHERE status IN ('validating', 'in_progress', 'finalizing', 'cancelling');
-- Retention keeps an input file while a batch names it.
CREATE INDEX IF NOT EXISTS batches_input ON batches (input_file_id);
CREATE TABLE IF NOT EXISTS batch_lines (
    batch_id  TEXT NOT NULL,
    line      INTEGER NOT NULL,
    custom_id TEXT NOT NULL,
    job_id    TEXT,              -- NULL: refused before it became a job (status, error say why)
    status    INTEGER,
    error     TEXT,
    PRIMARY KEY (batch_id, line)
) WITHOUT ROWID;
-- Retention keeps the jobs of a batch that has not ended.
CREATE INDEX IF NOT EXISTS batch_lines_job ON batch_lines (job_id) WHERE job_id IS NOT NULL;
CREATE TABLE IF NOT EXISTS job_webhooks (
    job_id   TEXT PRIMARY KEY,
    endpoint TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS webhook_outbox (
    id          TEXT NOT NULL,      -- webhook-id: the same on every attempt
    endpoint    TEXT NOT NULL,
    body        BLOB NOT NULL,
    state       TEXT NOT NULL,      -- pending, delivered, failed
    attempts    INTEGER NOT NULL DEFAULT 0,
    created_at  REAL NOT NULL,
    next_at     REAL NOT NULL,
    owner       TEXT,
    lease_until REAL,
    last_error  TEXT,
    PRIMARY KEY (id, endpoint)
);
CREATE INDEX IF NOT EXISTS webhook_outbox_due ON webhook_outbox (next_at) WHERE state = 'pending';
CREATE INDEX IF NOT EXISTS webhook_outbox_state ON webhook_outbox (state);
"""
TABLES = frozenset({"files", "file_parts", "batches", "batch_lines", "job_webhooks", "webhook_outbox"})
