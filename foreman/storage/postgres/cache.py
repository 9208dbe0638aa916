"""The embedding cache in PostgreSQL: one table shared by every node, least recently used out."""

from __future__ import annotations

from collections.abc import Sequence

from foreman.storage import CachedVector, CacheEntry, CacheStats
from foreman.storage.postgres.connection import Connection, one

# A row's bookkeeping beside its vector, as the SQLite cache counts it.
_CACHE_ROW_OVERHEAD = 120


async def get(conn: Connection, keys: Sequence[bytes]) -> dict[bytes, CachedVector]:
    """The vectors cached under `keys` (those found), each marked as just used."""
    unique = list(dict.fromkeys(keys))
    if not unique:
        return {}
    cursor = await conn.execute(
        "UPDATE embed_cache SET used = nextval('embed_cache_used_seq') WHERE key = ANY(%s)"
        " RETURNING key, vector, tokens",
        (unique,),
    )
    return {
        bytes(key): CachedVector(bytes(vector), int(tokens))
        for key, vector, tokens in await cursor.fetchall()
    }


async def put(conn: Connection, entries: Sequence[CacheEntry], limit: int) -> int:
    """Store vectors, then evict down to `limit` bytes (in the caller's transaction); returns how many went."""
    async with conn.cursor() as cursor:
        await cursor.executemany(
            "INSERT INTO embed_cache (key, digest, vector, tokens, size) VALUES (%s, %s, %s, %s, %s)"
            " ON CONFLICT (key) DO UPDATE SET digest = excluded.digest, vector = excluded.vector,"
            " tokens = excluded.tokens, size = excluded.size, used = nextval('embed_cache_used_seq')",
            [(e.key, e.digest, e.vector, e.tokens, len(e.vector) + _CACHE_ROW_OVERHEAD) for e in entries],
        )
    return await evict(conn, limit)


async def evict(conn: Connection, limit: int) -> int:
    """Drop the least recently used vectors until the cache holds at most `limit` bytes."""
    cursor = await conn.execute(
        "DELETE FROM embed_cache WHERE key IN (SELECT key FROM ("
        "  SELECT key, sum(size) OVER (ORDER BY used DESC) AS kept FROM embed_cache"
        ") AS newest WHERE kept > %s)",
        (limit,),
    )
    return cursor.rowcount


async def invalidate(conn: Connection, digests: Sequence[str]) -> int:
    cursor = await conn.execute("DELETE FROM embed_cache WHERE digest = ANY(%s)", (list(set(digests)),))
    return cursor.rowcount


async def stats(conn: Connection) -> CacheStats:
    cursor = await conn.execute("SELECT count(*), coalesce(sum(size), 0) FROM embed_cache")
    entries, size = await one(cursor)
    return CacheStats(int(entries), int(size))
