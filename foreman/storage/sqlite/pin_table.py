"""The pins foreman has set on its Ollama's models, kept beside the jobs so a restart after kill -9 finds them."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

from foreman.storage import RecordedPin

SCHEMA = """
CREATE TABLE IF NOT EXISTS pins (
    model_key TEXT PRIMARY KEY,
    endpoint  TEXT NOT NULL,
    model     TEXT NOT NULL,
    options   TEXT NOT NULL  -- load options, JSON
) WITHOUT ROWID;
"""


def read(db: sqlite3.Connection) -> list[RecordedPin]:
    rows = db.execute("SELECT model_key, endpoint, model, options FROM pins ORDER BY model_key")
    return [RecordedPin(*row) for row in rows]


def replace(db: sqlite3.Connection, pins: Sequence[RecordedPin]) -> None:
    """Within the caller's transaction."""
    db.execute("DELETE FROM pins")
    db.executemany(
        "INSERT INTO pins (model_key, endpoint, model, options) VALUES (?, ?, ?, ?)",
        [(p.model_key, p.endpoint, p.model, p.options) for p in pins],
    )
