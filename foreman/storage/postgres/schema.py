"""The PostgreSQL queue's tables, its version, and the refusal of a database that is not foreman's."""

from __future__ import annotations

import psycopg
from psycopg.rows import TupleRow

from foreman.errors import StoreError
from foreman.storage.postgres import batch_schema

SCHEMA_VERSION = 2
# pg_advisory_xact_lock keys: one number per thing only one node may do at a time.
LOCK_SCHEMA = 0x46524D4E00  # creating or migrating the tables
LOCK_SWAP = 0x46524D4E01  # deciding a swap, so two idle nodes do not load the same model
LOCK_PRUNE = 0x46524D4E02  # retention
LOCK_REAP = 0x46524D4E03  # putting back the jobs of a node whose lease ran out

# The LISTEN/NOTIFY channel every node listens on (see foreman/storage/postgres/node.py).
CHANNEL = "foreman"

_TABLES = """
CREATE TABLE IF NOT EXISTS foreman_meta (
    key   text PRIMARY KEY,
    value text NOT NULL
);
CREATE TABLE IF NOT EXISTS jobs (
    id          text PRIMARY KEY,        -- ULID: sorts by arrival
    state       text NOT NULL,
    endpoint    text NOT NULL,
    model       text NOT NULL,           -- as the client sent it
    model_key   text NOT NULL,           -- what the worker groups by
    stream      boolean NOT NULL,
    body        bytea NOT NULL,
    attempt     integer NOT NULL DEFAULT 0,
    created_at  double precision NOT NULL,
    started_at  double precision,
    finished_at double precision,
    status      integer,
    error       text,
    result      bytea,
    respond_async   boolean NOT NULL DEFAULT false,
    idempotency_key text,
    request_hash    text,
    priority    text NOT NULL DEFAULT 'interactive',
    routing     text,                    -- alias jobs: JSON {alias, route, rule}
    served_model text,                   -- alias jobs: the model picked to serve it
    cache       text,                    -- embeddings: 'no-cache' (asked), 'hit' or 'partial'
    not_before  double precision,        -- held back after a failure until then (while queued)
    node        text,                    -- the node running it (loading, working)
    lease_until timestamptz,             -- the database's time after which another node puts it back
    orphaned    boolean NOT NULL DEFAULT false,  -- put back after its node died: it goes next
    watchers    text[] NOT NULL DEFAULT '{}',    -- nodes with a client waiting for its events
    -- A short stream's chunks, packed (foreman/storage/output.py); longer ones are in `chunks`.
    -- Read by replay alone; a big value is stored out of line (TOAST), away from the other columns.
    output      bytea
);
-- The pick: the oldest queued job of a model in a class is the first entry under (key, class).
CREATE INDEX IF NOT EXISTS jobs_queued_by_class ON jobs (model_key, priority, id) WHERE state = 'queued';
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state, id);
CREATE UNIQUE INDEX IF NOT EXISTS jobs_idempotency ON jobs (idempotency_key) WHERE idempotency_key IS NOT NULL;
CREATE INDEX IF NOT EXISTS jobs_finished ON jobs (finished_at) WHERE state IN ('done', 'failed', 'cancelled');
CREATE INDEX IF NOT EXISTS jobs_held ON jobs (model_key, priority, id) WHERE state = 'queued' AND not_before IS NOT NULL;
-- Leases: what each node runs, and what ran out.
CREATE INDEX IF NOT EXISTS jobs_running ON jobs (node, lease_until) WHERE state IN ('loading', 'working');

-- The output of a long stream (over output.OUTPUT_LIMIT), one row per chunk, kept for replay.
CREATE TABLE IF NOT EXISTS chunks (
    job_id text NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    seq    integer NOT NULL,
    data   bytea NOT NULL,
    PRIMARY KEY (job_id, seq)
);

-- Every foreman serve sharing the queue, with what its Ollama holds.
CREATE TABLE IF NOT EXISTS nodes (
    name         text PRIMARY KEY,
    upstream     text NOT NULL,
    reachable    boolean,
    resident     text[] NOT NULL DEFAULT '{}',   -- model keys its Ollama holds
    serving      text,                            -- the model of the latest job it claimed
    running      text[] NOT NULL DEFAULT '{}',   -- job ids in flight
    started_at   timestamptz NOT NULL DEFAULT now(),
    heartbeat_at timestamptz NOT NULL DEFAULT now(),
    left_at      timestamptz                      -- a clean stop: gone without waiting for the timeout
);

-- The embedding cache: vectors keyed by model digest, parameters and input, least recently used out.
CREATE TABLE IF NOT EXISTS embed_cache (
    key    bytea PRIMARY KEY,
    digest text NOT NULL,
    vector bytea NOT NULL,
    tokens integer NOT NULL,
    size   integer NOT NULL,
    used   bigserial
);
CREATE INDEX IF NOT EXISTS embed_cache_lru ON embed_cache (used);
CREATE INDEX IF NOT EXISTS embed_cache_digest ON embed_cache (digest);

-- The pins each node set on its Ollama's models: a restart after kill -9 releases those left behind.
CREATE TABLE IF NOT EXISTS pins (
    node      text NOT NULL,
    model_key text NOT NULL,
    endpoint  text NOT NULL,
    model     text NOT NULL,
    options   text NOT NULL,                  -- load options, JSON
    PRIMARY KEY (node, model_key)
);

-- Job events too big for a NOTIFY payload (8000 bytes) travel through here.
CREATE TABLE IF NOT EXISTS relay (
    id     bigserial PRIMARY KEY,
    job_id text NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    data   bytea NOT NULL
);
"""

# What takes a database at version N-1 to version N.
_MIGRATIONS: dict[int, str] = {
    # Short streams kept with the row; the output of the jobs before stays in `chunks`, read from there.
    2: "ALTER TABLE jobs ADD COLUMN IF NOT EXISTS output bytea;",
}
_OUR_TABLES = (
    frozenset({"foreman_meta", "jobs", "chunks", "nodes", "relay", "embed_cache", "pins"})
    | batch_schema.TABLES
)


async def prepare(conn: psycopg.AsyncConnection[TupleRow], where: str) -> None:
    """Create or migrate the tables; StoreError if the database holds something else.

    Nodes starting together take turns (an advisory lock), so exactly one
    creates the tables.
    """
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK_SCHEMA,))
        cursor = await conn.execute(
            "SELECT table_name FROM information_schema.tables"
            " WHERE table_schema = current_schema() AND table_type = 'BASE TABLE'"
        )
        tables = {str(name) for (name,) in await cursor.fetchall()}
        version = 0
        if tables:
            if "foreman_meta" not in tables or not tables <= _OUR_TABLES:
                raise StoreError(
                    f"{where} is not a foreman queue (tables: {', '.join(sorted(tables))}); foreman leaves it"
                    " untouched: give it a database of its own (createdb foreman)"
                )
            cursor = await conn.execute("SELECT value FROM foreman_meta WHERE key = 'schema_version'")
            row = await cursor.fetchone()
            version = int(str(row[0])) if row is not None else 0
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"{where} was written by a newer foreman (schema {version}, this one knows"
                    f" {SCHEMA_VERSION}); upgrade foreman"
                )
        for step in range(version + 1, SCHEMA_VERSION + 1):
            if version and step in _MIGRATIONS:
                await conn.execute(_MIGRATIONS[step].encode())
        await conn.execute((_TABLES + batch_schema.SCHEMA).encode())
        await conn.execute(
            "INSERT INTO foreman_meta (key, value) VALUES ('schema_version', %s)"
            " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (str(SCHEMA_VERSION),),
        )
