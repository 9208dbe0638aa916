"""The tables of the Files and Batch APIs and of the webhook outbox (see `foreman/storage/batches.py`).

Created with the jobs' tables (`schema.py`); `IF NOT EXISTS`, so a queue from before them gains them at start.
"""

from __future__ import annotations

SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    id         text PRIMARY KEY,
    filename   text NOT NULL,
    purpose    text NOT NULL,
    bytes      bigint NOT NULL,
    created_at double precision NOT NULL,
    complete   boolean NOT NULL DEFAULT false
);
CREATE TABLE IF NOT EXISTS file_parts (
    file_id text NOT NULL REFERENCES files (id) ON DELETE CASCADE,
    seq     integer NOT NULL,
    data    bytea NOT NULL,
    PRIMARY KEY (file_id, seq)
);
CREATE TABLE IF NOT EXISTS batches (
    id                text PRIMARY KEY,
    status            text NOT NULL,
    endpoint          text NOT NULL,
    input_file_id     text NOT NULL,
    completion_window text NOT NULL,
    created_at        double precision NOT NULL,
    expires_at        double precision NOT NULL,
    times             jsonb NOT NULL DEFAULT '{}',
    output_file_id    text,
    error_file_id     text,
    errors            jsonb,
    metadata          jsonb,
    total             integer NOT NULL DEFAULT 0,
    completed         integer NOT NULL DEFAULT 0,
    failed            integer NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS batches_active ON batches (status, id)
    WHERE status IN ('validating', 'in_progress', 'finalizing', 'cancelling');
-- Retention keeps an input file while a batch names it.
CREATE INDEX IF NOT EXISTS batches_input ON batches (input_file_id);
CREATE TABLE IF NOT EXISTS batch_lines (
    batch_id  text NOT NULL,
    line      integer NOT NULL,
    custom_id text NOT NULL,
    job_id    text,
    status    integer,
    error     text,
    PRIMARY KEY (batch_id, line)
);
-- Retention keeps the jobs of a batch that has not ended.
CREATE INDEX IF NOT EXISTS batch_lines_job ON batch_lines (job_id) WHERE job_id IS NOT NULL;
CREATE TABLE IF NOT EXISTS job_webhooks (
    job_id   text PRIMARY KEY,
    endpoint text NOT NULL
);
CREATE TABLE IF NOT EXISTS webhook_outbox (
    id          text NOT NULL,
    endpoint    text NOT NULL,
    body        bytea NOT NULL,
    state       text NOT NULL,
    attempts    integer NOT NULL DEFAULT 0,
    created_at  double precision NOT NULL,
    next_at     double precision NOT NULL,
    owner       text,
    lease_until double precision,
    last_error  text,
    PRIMARY KEY (id, endpoint)
);
CREATE INDEX IF NOT EXISTS webhook_outbox_due ON webhook_outbox (next_at) WHERE state = 'pending';
CREATE INDEX IF NOT EXISTS webhook_outbox_state ON webhook_outbox (state);
"""
TABLES = frozenset({"files", "file_parts", "batches", "batch_lines", "job_webhooks", "webhook_outbox"})
