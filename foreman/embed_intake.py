"""An embed request the cache can answer whole is answered at intake: no queue, no worker, no Ollama call.

It is still a job: written as done (`cache: hit`) with its result, in the
transaction that writes it, so `/jobs/{id}` and idempotency keys work as for
any other, and the lookup costs the store no extra round trip.
"""

from __future__ import annotations

import time

import structlog
from aiohttp import web

from foreman.embeddings import EmbedRequest, cache_key, job_reply, parse_embed
from foreman.keys import EMBED_CACHE
from foreman.models import NewJob
from foreman.store import Store

log = structlog.get_logger("foreman.embed")


def wants_no_cache(request: web.Request) -> bool:
    """Whether the client sent `Cache-Control: no-cache` (or `no-store`): compute the vectors afresh."""
    for header in request.headers.getall("Cache-Control", ()):
        for directive in header.split(","):
            if directive.split("=")[0].strip().lower() in ("no-cache", "no-store"):
                return True
    return False


class Answer:
    """What the store runs as it writes the job: the reply if the cache holds every vector, else None."""

    def __init__(self, job: NewJob, request: EmbedRequest, digest: str) -> None:
        self.inputs = len(request.inputs)
        self._job_id = job.id
        self._request = request
        self._keys = [cache_key(digest, request.params, text) for text in request.inputs]
        self._started = time.monotonic_ns()

    def __call__(self, store: Store) -> bytes | None:
        try:
            found = store.cache_get(self._keys)
            if len(found) < len(set(self._keys)):
                return None  # the worker looks again, and sends only what is missing
            vectors = [found[key] for key in self._keys]
            elapsed = max(time.monotonic_ns() - self._started, 1)
            tokens = sum(v.tokens for v in vectors)
            return job_reply(self._request, [v.vector for v in vectors], tokens, elapsed, 0)
        except Exception:
            # A bug here must not refuse the job: it queues, and the worker serves it.
            log.exception("embed_cache.answer_failed", job_id=self._job_id)
            return None


async def cache_answer(app: web.Application, job: NewJob) -> Answer | None:
    """The cache's answer to run as the job is written; None when the cache cannot answer it at all.

    That is: the cache is off, the client sent no-cache, the job is no embed
    request that can be cached, or the model's digest is unknown.
    """
    cache = app[EMBED_CACHE]
    if cache is None or job.cache == "no-cache":
        return None
    request = parse_embed(job.endpoint, job.body)
    if request is None:
        return None
    digest = await cache.digest(job.model_key)
    if digest is None:
        return None
    return Answer(job, request, digest)
