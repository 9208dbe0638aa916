"""The embedding cache: vectors already computed, keyed by the model's digest, the parameters and the input.

Unchanged content is never embedded twice, and a model that changes (a new
digest in `/api/tags`) never has an old vector served for it: the digest is
part of every key, and the vectors of digests no model has any more are
dropped. The vectors live with the jobs (`Storage.cache_*`), bounded
by FOREMAN_EMBED_CACHE bytes, least recently used out.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field

import structlog

from foreman.embeddings.requests import cache_key
from foreman.metrics import Metrics
from foreman.ollama.tags import ModelTags
from foreman.storage import CachedVector, CacheEntry, CacheStats, Storage

log = structlog.get_logger("foreman.embed_cache")


@dataclass(slots=True)
class Lookup:
    """What the cache holds for some inputs of one model, and under which digest and list epoch it looked."""

    digest: str | None  # None: the model's digest is unknown, so nothing is read or written
    epoch: int
    params: str
    found: dict[str, CachedVector] = field(default_factory=dict)  # by input text


class EmbedCache:
    """Looks vectors up and stores new ones; counts hits and misses for /status and /metrics."""

    def __init__(self, store: Storage, tags: ModelTags, limit: int, metrics: Metrics) -> None:
        self._store = store
        self._tags = tags
        self.limit = limit
        self._metrics = metrics
        self.hits = 0
        self.misses = 0
        self._tasks: set[asyncio.Future[int]] = set()

    async def lookup(
        self, model_key: str, params: str, texts: Sequence[str], *, read: bool = True, count: bool = True
    ) -> Lookup:
        """The cached vectors of `texts`; with `read=False` (Cache-Control: no-cache) none, but new ones may be stored.

        With `count`, the hits and misses count for /status and /metrics.
        """
        epoch = self._tags.epoch
        digest = await self._tags.digest(model_key)
        lookup = Lookup(digest, epoch, params)
        if digest is None or not read:
            return lookup
        keys = {cache_key(digest, params, text): text for text in dict.fromkeys(texts)}
        found = await self._store.cache_get(list(keys))
        lookup.found = {keys[key]: vector for key, vector in found.items()}
        if count:
            hits = sum(1 for text in texts if text in lookup.found)
            self.count(hits, len(texts) - hits)
        return lookup

    async def digest(self, model_key: str) -> str | None:
        """The digest the model's vectors are cached under now; None if unknown (nothing is cached then)."""
        return await self._tags.digest(model_key)

    def count(self, hits: int, misses: int) -> None:
        self.hits += hits
        self.misses += misses
        self._metrics.embed_cache_looked_up(hits, misses)

    async def store(self, lookup: Lookup, vectors: dict[str, CachedVector]) -> None:
        """Keep fresh vectors, unless the model list changed since `lookup` (they may be the old model's)."""
        if lookup.digest is None or not vectors:
            return
        if self._tags.epoch != lookup.epoch:
            log.info("embed_cache.skipped", reason="models changed during the call", vectors=len(vectors))
            return
        digest = lookup.digest
        entries = [
            CacheEntry(cache_key(digest, lookup.params, text), digest, vector.vector, vector.tokens)
            for text, vector in vectors.items()
        ]
        await self._store.cache_put(entries, self.limit)

    def invalidate(self, digests: set[str]) -> None:
        """Drop the vectors of digests no installed model has any more (ModelTags' on_change)."""
        task = asyncio.ensure_future(self._store.cache_invalidate(sorted(digests)))
        self._tasks.add(task)
        task.add_done_callback(self._invalidated)

    def _invalidated(self, task: asyncio.Future[int]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        if (exc := task.exception()) is not None:
            log.error("embed_cache.invalidate_failed", error=str(exc))
        elif dropped := task.result():
            log.info("embed_cache.invalidated", vectors=dropped)

    async def stats(self) -> CacheStats:
        return await self._store.cache_stats()

    async def close(self) -> None:
        await asyncio.gather(*self._tasks, return_exceptions=True)
