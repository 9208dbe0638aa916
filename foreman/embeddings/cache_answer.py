"""An embed request the cache can answer whole is answered at intake: no queue, no worker, no Ollama call.

It is still a job: the storage looks the vectors up as it writes the job
(`storage.CacheAnswer`) and, when it holds them all, writes it as done
(`cache: hit`) with its reply in the same transaction, so `/jobs/{id}` and
idempotency keys work as for any other, and the lookup costs no extra round trip.
"""

from __future__ import annotations

import time
from functools import partial

from aiohttp import web

from foreman.embeddings.cache import EmbedCache
from foreman.embeddings.requests import EmbedRequest, cache_key, job_reply, parse_embed
from foreman.job import NewJob
from foreman.storage import CacheAnswer, CachedVector


def wants_no_cache(request: web.Request) -> bool:
    """Whether the client sent `Cache-Control: no-cache` (or `no-store`): compute the vectors afresh."""
    for header in request.headers.getall("Cache-Control", ()):
        for directive in header.split(","):
            if directive.split("=")[0].strip().lower() in ("no-cache", "no-store"):
                return True
    return False


def _reply(request: EmbedRequest, started_ns: int, vectors: list[CachedVector]) -> bytes:
    """The client's reply from the cached vectors, in its endpoint's shape (run by the storage as it writes)."""
    elapsed = max(time.monotonic_ns() - started_ns, 1)
    tokens = sum(v.tokens for v in vectors)
    return job_reply(request, [v.vector for v in vectors], tokens, elapsed, 0)


async def cache_answer(cache: EmbedCache | None, job: NewJob) -> CacheAnswer | None:
    """What the storage looks up as it writes the job; None when the cache cannot answer it at all.

    That is: the cache is off, the client sent no-cache, the job is no embed
    request that can be cached, or the model's digest is unknown.
    """
    if cache is None or job.cache == "no-cache":
        return None
    request = parse_embed(job.endpoint, job.body)
    if request is None:
        return None
    digest = await cache.digest(job.model_key)
    if digest is None:
        return None
    keys = tuple(cache_key(digest, request.params, text) for text in request.inputs)
    return CacheAnswer(keys, partial(_reply, request, time.monotonic_ns()))
