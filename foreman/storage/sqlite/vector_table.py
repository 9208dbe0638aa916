"""The embedding cache's table: vectors keyed by model digest, parameters and input, least recently used out.

It lives in the jobs' database (its own table beside theirs), so it survives
restarts and is written on `QueueFile`'s connection like the rest of the hot path; `QueueFile`
exposes it through its `cache_*` methods, as `Storage` asks.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Sequence

from foreman.storage import CachedVector, CacheEntry, CacheStats

SCHEMA = """
CREATE TABLE IF NOT EXISTS embed_cache (
    key    BLOB PRIMARY KEY,   -- sha256 of the model's digest, the parameters and the input
    digest TEXT NOT NULL,      -- the model's digest, to drop a model's vectors when it changes
    vector BLOB NOT NULL,      -- the vector as Ollama's JSON array
    tokens INTEGER NOT NULL,   -- the input's share of prompt_eval_count
    size   INTEGER NOT NULL,   -- what the entry counts against FOREMAN_EMBED_CACHE
    used   INTEGER NOT NULL    -- recency: larger is more recent
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS embed_cache_lru ON embed_cache (used);
CREATE INDEX IF NOT EXISTS embed_cache_digest ON embed_cache (digest);
"""

# A row's bookkeeping beside its vector (key, digest, integers, b-tree cell), roughly.
_ROW_OVERHEAD = 120


class EmbedCacheTable:
    """The cache's rows on one connection; the caller's thread owns it."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db
        entries, size, used = db.execute(
            "SELECT count(*), coalesce(sum(size), 0), coalesce(max(used), 0) FROM embed_cache"
        ).fetchone()
        self._entries, self._bytes, self._used = int(entries), int(size), int(used)

    def get(self, keys: Sequence[bytes]) -> dict[bytes, CachedVector]:
        """The vectors cached under `keys` (those found), each marked as just used.

        Recency is approximate: an entry in the more recent half of the cache
        is not written again when read, so a corpus read again and again costs
        reads, not writes. Eviction still takes the least recently used half first.
        """
        found: dict[bytes, CachedVector] = {}
        stale: list[bytes] = []
        recent = self._used - self._entries // 2
        unique = list(dict.fromkeys(keys))
        for start in range(0, len(unique), 500):  # SQLite's bound on host parameters
            part = unique[start : start + 500]
            marks = ",".join("?" * len(part))
            rows = self._db.execute(
                f"SELECT key, vector, tokens, used FROM embed_cache WHERE key IN ({marks})", part
            )
            for key, vector, tokens, used in rows:
                found[bytes(key)] = CachedVector(bytes(vector), int(tokens))
                if used <= recent:
                    stale.append(key)
        if stale:
            self._db.executemany(
                "UPDATE embed_cache SET used = ? WHERE key = ?", ((self._next(), key) for key in stale)
            )
        return found

    def put(self, entries: Iterable[CacheEntry], limit: int) -> int:
        """Store `entries`, then evict the least recently used down to `limit` bytes; returns how many went."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            for entry in entries:
                size = len(entry.vector) + _ROW_OVERHEAD
                old = self._db.execute("SELECT size FROM embed_cache WHERE key = ?", (entry.key,)).fetchone()
                self._db.execute(
                    "INSERT OR REPLACE INTO embed_cache (key, digest, vector, tokens, size, used)"
                    " VALUES (?, ?, ?, ?, ?, ?)",
                    (entry.key, entry.digest, entry.vector, entry.tokens, size, self._next()),
                )
                if old is None:
                    self._entries += 1
                    self._bytes += size
                else:
                    self._bytes += size - int(old[0])
            evicted = self._evict(limit)
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            self._recount()
            raise
        return evicted

    def evict(self, limit: int) -> int:
        """Drop the least recently used entries until the cache holds at most `limit` bytes."""
        return self._evict(limit)

    def invalidate(self, digests: Iterable[str]) -> int:
        """Drop every vector of models with these digests; returns how many."""
        dropped = 0
        for digest in set(digests):
            rows = self._db.execute(
                "DELETE FROM embed_cache WHERE digest = ? RETURNING size", (digest,)
            ).fetchall()
            dropped += len(rows)
            self._entries -= len(rows)
            self._bytes -= sum(int(size) for (size,) in rows)
        return dropped

    def stats(self) -> CacheStats:
        return CacheStats(self._entries, self._bytes)

    def _evict(self, limit: int) -> int:
        evicted = 0
        while self._bytes > limit and self._entries > 0:
            # Oldest first, a page at a time, so one put never reads the whole table.
            oldest = self._db.execute("SELECT key, size FROM embed_cache ORDER BY used LIMIT 256").fetchall()
            if not oldest:
                break
            going = []
            for key, size in oldest:
                going.append(key)
                self._entries -= 1
                self._bytes -= int(size)
                if self._bytes <= limit:
                    break
            self._db.executemany("DELETE FROM embed_cache WHERE key = ?", ((key,) for key in going))
            evicted += len(going)
        return evicted

    def _next(self) -> int:
        self._used += 1
        return self._used

    def _recount(self) -> None:
        entries, size = self._db.execute(
            "SELECT count(*), coalesce(sum(size), 0) FROM embed_cache"
        ).fetchone()
        self._entries, self._bytes = int(entries), int(size)
