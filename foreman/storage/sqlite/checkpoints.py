"""Checkpoints off the event loop: a thread of their own copies the write-ahead log into the database.

SQLite's automatic checkpoint runs inside the commit that crosses its
threshold (1000 pages): about one commit in a hundred then took 10 to 27 ms,
on whichever thread committed, the event loop's included. foreman's
connections turn it off, and this thread runs a PASSIVE checkpoint from a
connection of its own every `interval` seconds. PASSIVE neither waits for
nor blocks readers and writers: it copies what no reader still needs, and
the next commit after a complete one starts the log from its beginning again.
"""

from __future__ import annotations

import sqlite3
import threading
from contextlib import suppress
from pathlib import Path

import structlog

from foreman.storage.sqlite.schema import connect_beside

log = structlog.get_logger("foreman.store")

INTERVAL_S = 0.25


class Checkpointer:
    """Runs `PRAGMA wal_checkpoint(PASSIVE)` on `path` every `interval` seconds until closed."""

    def __init__(self, path: Path, interval: float = INTERVAL_S) -> None:
        self._db = connect_beside(path)
        self._interval = interval
        self._stop = threading.Event()
        self._failing = False
        self.runs = 0  # checkpoints run so far
        self._thread = threading.Thread(target=self._run, name="foreman-checkpoint", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.checkpoint()

    def checkpoint(self) -> None:
        try:
            self._db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
        except sqlite3.Error as exc:
            # The log only grows meanwhile; say so once, not four times a second.
            if not self._failing:
                log.warning("store.checkpoint_failed", error=str(exc))
            self._failing = True
        else:
            self._failing = False
            self.runs += 1

    def close(self) -> None:
        """Stop the thread and checkpoint once more."""
        self._stop.set()
        self._thread.join()
        with suppress(sqlite3.Error):
            self.checkpoint()
        self._db.close()
